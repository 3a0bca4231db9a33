//! `vmdk-plugin doctor`: checks what the plugin needs on this VM and says,
//! for each problem, what to do. It changes nothing. See
//! docs/operations.md for each check.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http1::{self, Endpoint};

/// What doctor looks at.
#[derive(Debug, Clone)]
pub struct DoctorConfig {
    /// The plugin socket.
    pub socket: PathBuf,
    /// The mount root.
    pub mount_root: PathBuf,
    /// A separate agent's URL, if the plugin uses one.
    pub agent: Option<String>,
    /// The embedded agent's configuration file (`--agent-config`).
    pub agent_config: Option<PathBuf>,
    /// The embedded agent's `--datastore` flags.
    pub datastores: Vec<String>,
    /// Docker's API socket.
    pub docker_socket: PathBuf,
    /// Where the plugin looks for mkfs and blkid.
    pub tool_path: Vec<PathBuf>,
    /// The default agent configuration file.
    pub default_config: PathBuf,
}

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but may bite.
    Warn,
    /// Broken: the plugin will not work as it is.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// How it ended.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, for a warning or failure.
    pub fix: Option<String>,
}

fn ok(name: &'static str, detail: String) -> Check {
    Check {
        name,
        status: Status::Ok,
        detail,
        fix: None,
    }
}

fn bad(name: &'static str, status: Status, detail: String, fix: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail,
        fix: Some(fix.into()),
    }
}

const START_PLUGIN: &str =
    "start the plugin: `systemctl start vmdk-plugin` (logs: `journalctl -u vmdk-plugin`), or run `vmdk-plugin serve`";

/// Runs every check.
pub async fn run(cfg: &DoctorConfig) -> Vec<Check> {
    let mut out = vec![socket_dir(&cfg.socket)];
    out.push(socket(&cfg.socket).await);
    out.push(propagation(&cfg.mount_root));
    out.push(configuration(cfg));
    out.push(agent(cfg).await);
    for (tool, package, required) in [
        ("mkfs.ext4", "e2fsprogs", true),
        ("mkfs.xfs", "xfsprogs", false),
        ("blkid", "util-linux", true),
    ] {
        out.push(program(&cfg.tool_path, tool, package, required));
    }
    out.push(docker(&cfg.docker_socket, &cfg.socket).await);
    out
}

/// The report, one block per check; failures and warnings with their fix.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Ok => "OK  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        // A multi-line detail (a TOML error with its caret) stays
        // indented under its check.
        let detail = c.detail.trim_end().replace('\n', "\n      ");
        s.push_str(&format!("{tag}  {}: {detail}\n", c.name));
        if let Some(fix) = &c.fix {
            s.push_str(&format!("      fix: {fix}\n"));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    s.push_str(&match (failed, warned) {
        (0, 0) => "\nAll checks passed.\n".to_owned(),
        (0, w) => format!("\nNo failures; {w} warning(s).\n"),
        (f, w) => format!("\n{f} check(s) failed, {w} warning(s).\n"),
    });
    s
}

fn socket_dir(socket: &Path) -> Check {
    const N: &str = "socket directory";
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return bad(
            N,
            Status::Fail,
            format!("{} has no directory", socket.display()),
            "pass --socket with an absolute path such as /run/docker/plugins/vmdk.sock",
        );
    };
    let md = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return bad(
                N,
                Status::Fail,
                format!(
                    "{} does not exist; Docker finds volume plugins by their socket there",
                    dir.display()
                ),
                format!("{START_PLUGIN}; it creates the directory"),
            )
        }
        Err(e) => {
            return bad(
                N,
                Status::Fail,
                format!("cannot read {}: {e}", dir.display()),
                "run doctor as root",
            )
        }
    };
    if !md.is_dir() {
        return bad(
            N,
            Status::Fail,
            format!("{} is not a directory", dir.display()),
            format!("remove {} and {START_PLUGIN}", dir.display()),
        );
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return bad(
            N,
            Status::Fail,
            format!(
                "{} is writable by others (mode {mode:04o}): anyone could put a socket there and answer Docker for a volume driver",
                dir.display()
            ),
            format!("chmod 755 {}", dir.display()),
        );
    }
    if md.uid() != 0 && nix::unistd::Uid::effective().is_root() {
        return bad(
            N,
            Status::Warn,
            format!("{} belongs to uid {}, not root", dir.display(), md.uid()),
            format!("chown root:root {}", dir.display()),
        );
    }
    ok(
        N,
        format!("{} exists (mode {mode:04o}, owner uid {})", dir.display(), md.uid()),
    )
}

async fn socket(socket: &Path) -> Check {
    const N: &str = "plugin socket";
    let md = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return bad(
                N,
                Status::Fail,
                format!("no socket at {}: the plugin is not running", socket.display()),
                START_PLUGIN,
            )
        }
        Err(e) => {
            return bad(
                N,
                Status::Fail,
                format!("cannot read {}: {e}", socket.display()),
                "run doctor as root",
            )
        }
    };
    if !md.file_type().is_socket() {
        return bad(
            N,
            Status::Fail,
            format!("{} is not a socket (a {:?})", socket.display(), md.file_type()),
            format!("remove {} and {START_PLUGIN}", socket.display()),
        );
    }
    if let Err(e) = std::os::unix::net::UnixStream::connect(socket) {
        return bad(
            N,
            Status::Fail,
            format!(
                "stale socket file: nothing listens on {} ({e}); a plugin that was killed left it",
                socket.display()
            ),
            format!(
                "{START_PLUGIN}; it replaces the stale file (or remove it: rm {})",
                socket.display()
            ),
        );
    }
    let answer = http1::request(
        &Endpoint::Unix(socket.to_owned()),
        hyper::Method::POST,
        "/Plugin.Activate",
        &[],
        Some(Vec::new()),
        Duration::from_secs(10),
    )
    .await;
    match answer {
        Ok((status, body)) if status.is_success() && String::from_utf8_lossy(&body).contains("VolumeDriver") => {
            let mode = md.mode() & 0o777;
            if mode & 0o006 != 0 {
                return bad(
                    N,
                    Status::Warn,
                    format!("{} answers, but anyone may call it (mode {mode:04o})", socket.display()),
                    format!("chmod 660 {} (the plugin makes it 0660 itself)", socket.display()),
                );
            }
            ok(
                N,
                format!("{} answers Plugin.Activate as a volume driver", socket.display()),
            )
        }
        Ok((status, body)) => bad(
            N,
            Status::Fail,
            format!(
                "{} answers, but not as a volume plugin: {status} {}",
                socket.display(),
                String::from_utf8_lossy(&body)
            ),
            "another program holds the socket; stop it, then start vmdk-plugin",
        ),
        Err(e) => bad(
            N,
            Status::Fail,
            format!("{} accepts connections but does not answer: {e}", socket.display()),
            "the plugin may be stuck: look at its log (`journalctl -u vmdk-plugin`) and restart it",
        ),
    }
}

/// One line of mountinfo: its mount point and propagation tags.
#[derive(Debug)]
struct MountLine {
    point: PathBuf,
    tags: Vec<String>,
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mountinfo(path: &Path) -> std::io::Result<Vec<MountLine>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let point = PathBuf::from(unescape(f.get(4)?));
            let tags = f
                .iter()
                .skip(6)
                .take_while(|t| **t != "-")
                .map(|t| (*t).to_owned())
                .collect();
            Some(MountLine { point, tags })
        })
        .collect())
}

/// The mount holding `path`: the last mounted one whose point is its
/// longest prefix.
fn holding<'a>(mounts: &'a [MountLine], path: &Path) -> Option<&'a MountLine> {
    let mut best: Option<&MountLine> = None;
    for m in mounts {
        if path.starts_with(&m.point)
            && best.is_none_or(|b| m.point.components().count() >= b.point.components().count())
        {
            best = Some(m);
        }
    }
    best
}

fn peer_group(m: &MountLine) -> Option<&str> {
    m.tags.iter().find_map(|t| t.strip_prefix("shared:"))
}

fn dockerd_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "dockerd").then_some(pid)
    })
}

fn propagation(mount_root: &Path) -> Check {
    const N: &str = "mount propagation";
    // The mount root may not exist yet: its nearest existing ancestor is
    // where it will be.
    let mut at = mount_root.to_owned();
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p.to_owned(),
            None => break,
        }
    }
    let at = std::fs::canonicalize(&at).unwrap_or(at);
    let ours = match mountinfo(Path::new("/proc/self/mountinfo")) {
        Ok(m) => m,
        Err(e) => {
            return bad(
                N,
                Status::Fail,
                format!("cannot read /proc/self/mountinfo: {e}"),
                "run doctor on the VM, as root",
            )
        }
    };
    let Some(m) = holding(&ours, &at) else {
        return bad(
            N,
            Status::Fail,
            format!("no mount holds {}", at.display()),
            "check /proc/self/mountinfo",
        );
    };
    let fix_shared = format!(
        "make it shared: `mount --make-rshared {}` (and keep it so at boot, e.g. a systemd unit; a managed plugin sets this up itself with propagatedMount)",
        m.point.display()
    );
    let dockerd = dockerd_pid();
    let same_ns = dockerd.is_some_and(|pid| {
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == std::fs::read_link("/proc/self/ns/mnt").ok()
    });
    match (peer_group(m), dockerd) {
        (Some(group), Some(pid)) if !same_ns => {
            // dockerd sees the plugin's mounts if its copy of this mount is
            // in the same peer group, or receives from it.
            let theirs = mountinfo(Path::new(&format!("/proc/{pid}/mountinfo"))).unwrap_or_default();
            let receives = theirs.iter().any(|t| {
                t.tags
                    .iter()
                    .any(|tag| tag == &format!("shared:{group}") || tag == &format!("master:{group}"))
            });
            if receives {
                ok(
                    N,
                    format!(
                        "{} is on {} (shared:{group}); dockerd (pid {pid}, another mount namespace) receives its mounts",
                        mount_root.display(),
                        m.point.display()
                    ),
                )
            } else {
                bad(
                    N,
                    Status::Fail,
                    format!(
                        "{} is on {} (shared:{group}), but dockerd (pid {pid}, another mount namespace) is in no peer group of it: volumes the plugin mounts stay invisible to containers",
                        mount_root.display(),
                        m.point.display()
                    ),
                    "run the plugin in dockerd's mount namespace (no PrivateMounts= in its unit), or make the mount shared before dockerd starts",
                )
            }
        }
        (Some(group), _) => ok(
            N,
            format!(
                "{} is on {} with shared propagation (shared:{group}){}",
                mount_root.display(),
                m.point.display(),
                if same_ns { "; dockerd runs in this mount namespace" } else { "" }
            ),
        ),
        (None, Some(pid)) if same_ns => bad(
            N,
            Status::Warn,
            format!(
                "{} is on {} with private propagation ({}); dockerd (pid {pid}) shares this mount namespace, so it sees the plugin's mounts, but a plugin or dockerd moved to its own namespace would not",
                mount_root.display(),
                m.point.display(),
                if m.tags.is_empty() { "no peer group".to_owned() } else { m.tags.join(" ") }
            ),
            fix_shared,
        ),
        (None, Some(pid)) => bad(
            N,
            Status::Fail,
            format!(
                "{} is on {} with private propagation and dockerd (pid {pid}) runs in another mount namespace: volumes the plugin mounts stay invisible to containers",
                mount_root.display(),
                m.point.display()
            ),
            fix_shared,
        ),
        (None, None) => bad(
            N,
            Status::Warn,
            format!(
                "{} is on {} with private propagation (no dockerd process found to compare with)",
                mount_root.display(),
                m.point.display()
            ),
            fix_shared,
        ),
    }
}

fn configuration(cfg: &DoctorConfig) -> Check {
    const N: &str = "configuration";
    if let Some(url) = &cfg.agent {
        return ok(
            N,
            format!("the agent is separate ({url}); its own configuration is checked by `vmdk-agent status`"),
        );
    }
    match vmdk_agent::config::AgentConfig::load(cfg.agent_config.as_deref(), &cfg.default_config, &cfg.datastores) {
        Ok((c, source)) => ok(
            N,
            format!(
                "{source}: backend {:?}, datastores {}",
                c.backend,
                c.datastores
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(e) => bad(
            N,
            Status::Fail,
            crate::error_chain(&e),
            "correct the file (see docs/configuration.md); the plugin refuses to start with it",
        ),
    }
}

async fn agent(cfg: &DoctorConfig) -> Check {
    const N: &str = "agent connection";
    let (ep, what) = match &cfg.agent {
        Some(url) => match Endpoint::parse(url) {
            Ok(ep) => (ep, format!("the agent at {url}")),
            Err(e) => {
                return bad(
                    N,
                    Status::Fail,
                    e,
                    "pass --agent unix:///run/vmdk/agent.sock or http://127.0.0.1:PORT",
                )
            }
        },
        None => {
            // The embedded agent answers on the plugin socket while the
            // plugin runs; otherwise its datastores are checked directly.
            if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
                (
                    Endpoint::Unix(cfg.socket.clone()),
                    "the plugin's embedded agent".to_owned(),
                )
            } else {
                return match vmdk_agent::config::AgentConfig::load(
                    cfg.agent_config.as_deref(),
                    &cfg.default_config,
                    &cfg.datastores,
                ) {
                    Ok((c, _)) => {
                        // The plugin makes the directories of --datastore
                        // flags and of the built-in datastore itself; a
                        // configuration file's must exist.
                        let built_in =
                            cfg.agent_config.is_none() && !cfg.default_config.exists() && cfg.datastores.is_empty();
                        let from_file = if built_in {
                            0
                        } else {
                            c.datastores.len().saturating_sub(cfg.datastores.len())
                        };
                        let missing: Vec<String> = c
                            .datastores
                            .iter()
                            .take(from_file)
                            .filter_map(|d| {
                                d.path
                                    .as_ref()
                                    .filter(|p| !p.is_dir())
                                    .map(|p| format!("{}={}", d.name, p.display()))
                            })
                            .collect();
                        if missing.is_empty() {
                            ok(
                                N,
                                "embedded agent (the plugin is not running): its configuration loads and its datastore directories exist or are made at start".to_owned(),
                            )
                        } else {
                            bad(
                                N,
                                Status::Fail,
                                format!("embedded agent: datastore directories missing: {}", missing.join(", ")),
                                "create them (`mkdir -p DIR`), or correct the datastores in the configuration file",
                            )
                        }
                    }
                    Err(_) => bad(
                        N,
                        Status::Fail,
                        "embedded agent: its configuration does not load (see configuration)".to_owned(),
                        "correct the configuration first",
                    ),
                };
            }
        }
    };
    match http1::request(
        &ep,
        hyper::Method::GET,
        vmdk_protocol::PATH_VERSION,
        &[],
        None,
        Duration::from_secs(10),
    )
    .await
    {
        Ok((status, body)) if status.is_success() => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            ok(
                N,
                format!(
                    "{what} answers /v1/version (version {}, backend {})",
                    v["version"].as_str().unwrap_or("?"),
                    v["backend"].as_str().unwrap_or("?")
                ),
            )
        }
        Ok((status, body)) => bad(
            N,
            Status::Fail,
            format!(
                "{what} answers /v1/version with {status}: {}",
                String::from_utf8_lossy(&body)
            ),
            "check that --agent names a vmdk-agent (see docs/agent-api.md)",
        ),
        Err(e) => bad(
            N,
            Status::Fail,
            format!("{what} does not answer: {e}"),
            "start it: `systemctl start vmdk-agent` on the host (logs: `journalctl -u vmdk-agent`), or correct --agent",
        ),
    }
}

fn program(path: &[PathBuf], tool: &'static str, package: &str, required: bool) -> Check {
    match path.iter().map(|d| d.join(tool)).find(|p| p.is_file()) {
        Some(p) => ok(tool, format!("{}", p.display())),
        None => bad(
            tool,
            if required { Status::Fail } else { Status::Warn },
            format!(
                "{tool} is not in {}{}",
                std::env::join_paths(path).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
                if required { "" } else { "; volumes with -o fstype=xfs cannot be formatted" }
            ),
            format!("install {package}: `apt-get install {package}` (Debian/Ubuntu) or `tdnf install {package}` (Photon OS)"),
        ),
    }
}

async fn docker(socket: &Path, plugin_socket: &Path) -> Check {
    const N: &str = "Docker API";
    let ep = Endpoint::Unix(socket.to_owned());
    let fix_start = "start Docker (`systemctl start docker`), or point doctor at its socket with --docker-socket or DOCKER_HOST=unix:///path";
    match http1::request(&ep, hyper::Method::GET, "/_ping", &[], None, Duration::from_secs(10)).await {
        Ok((status, body)) if status.is_success() && body.as_ref() == b"OK" => {}
        Ok((status, body)) => {
            return bad(
                N,
                Status::Fail,
                format!(
                    "{} answers /_ping with {status}: {}",
                    socket.display(),
                    String::from_utf8_lossy(&body)
                ),
                fix_start,
            )
        }
        Err(e) => {
            return bad(
                N,
                Status::Fail,
                format!("no Docker API at {}: {e}", socket.display()),
                fix_start,
            )
        }
    }
    let driver = plugin_socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let filter = format!("{{\"driver\":[\"{driver}\"]}}");
    let q: String = filter
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    match http1::request(
        &ep,
        hyper::Method::GET,
        &format!("/volumes?filters={q}"),
        &[],
        None,
        Duration::from_secs(60),
    )
    .await
    {
        Ok((status, body)) if status.is_success() => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let warnings: Vec<String> = v["Warnings"]
                .as_array()
                .map(|w| w.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let n = v["Volumes"].as_array().map_or(0, Vec::len);
            if warnings.iter().any(|w| w.contains(&driver)) {
                bad(
                    N,
                    Status::Fail,
                    format!(
                        "Docker answers, but cannot list the {driver} volumes: {}",
                        warnings.join("; ")
                    ),
                    "see the plugin socket check above; `docker volume ls` shows the same warning",
                )
            } else {
                ok(
                    N,
                    format!(
                        "Docker answers at {}; `docker volume ls` lists {n} {driver} volume(s)",
                        socket.display()
                    ),
                )
            }
        }
        Ok((status, body)) => bad(
            N,
            Status::Fail,
            format!(
                "Docker answers /volumes with {status}: {}",
                String::from_utf8_lossy(&body)
            ),
            "look at dockerd's log (`journalctl -u docker`)",
        ),
        Err(e) => bad(
            N,
            Status::Fail,
            format!("Docker does not answer /volumes: {e}"),
            fix_start,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mount_holding_a_path_and_its_peer_group() {
        let text = "27 1 254:0 / / rw - ext4 /dev/vda rw\n40 27 0:50 / /mnt/my\\040dir rw shared:7 - tmpfs t rw\n";
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mi");
        std::fs::write(&p, text).unwrap();
        let m = mountinfo(&p).unwrap();
        let h = holding(&m, Path::new("/mnt/my dir/vmdk")).unwrap();
        assert_eq!(h.point, Path::new("/mnt/my dir"));
        assert_eq!(peer_group(h), Some("7"));
        let root = holding(&m, Path::new("/var")).unwrap();
        assert_eq!(peer_group(root), None);
    }
}
