//! The packages, installed and used as a new user would (issue "Install and
//! run it like a real service", section "Packages"):
//!
//! * `packaging/build.sh` builds the .deb and .rpm of both programs (from
//!   the binaries this `cargo test` built, `--profile dev --no-build`);
//! * `dpkg -i` installs the .debs; the files are checked (`dpkg -L`) and
//!   the installed units pass `systemd-analyze verify`;
//! * the installed plugin is started the way its units would start it:
//!   `systemd-socket-activate` on the socket unit's `ListenStream=`, the
//!   service's `ExecStart=` with its `EnvironmentFile=`, and `READY=1` is
//!   awaited on `NOTIFY_SOCKET` (systemd is not PID 1 on the test machine);
//! * a volume round trip through the real Docker Engine, and the seed's
//!   policy flow on the installed defaults with no flags;
//! * an upgrade to a rebuilt package with a higher version keeps the
//!   modified configuration and asks for a service restart, never a stop
//!   or disable. systemd not being PID 1, the maintainer scripts' calls are
//!   recorded by `deb-systemd-invoke` and `systemctl` wrappers put first in
//!   PATH (`systemctl --root=/ preset`, which works on files, is passed on
//!   to the real systemctl, so enabling really creates the unit links);
//! * `dpkg -r` and `--purge` remove the programs and units but leave the
//!   volumes and data in /var/lib/vmdk;
//! * the .rpm: `rpm -qpl`, `rpm -qp --scripts`, and `rpm --root` into a
//!   scratch root, its scriptlets run by busybox's sh (no systemd there).
//!
//! Needs root, a running Docker Engine, `dpkg`, `rpm` and `systemd`
//! (tests/run.sh installs them). It holds the Docker tests' lock, and it
//! fails rather than touch a host where the vmdk packages or
//! /var/lib/vmdk already exist that it did not make.

#[path = "common/docker.rs"]
mod docker;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use docker::*;

/// Left in /var/lib/vmdk by this test, so a crashed run's leftovers are
/// recognised as its own.
const MARKER: &str = "/var/lib/vmdk/.vmdk-packaging-test";
const DATA_DIR: &str = "/var/lib/vmdk";
const PLUGIN_STATE: &str = "/var/lib/vmdk-plugin";
const MOUNT_ROOT: &str = "/mnt/vmdk";
const ETC: &str = "/etc/vmdk";
const PACKAGES: [&str; 2] = ["vmdk-plugin", "vmdk-agent"];
const VOLUME: &str = "vmdkpkg-data";
const POLICY: &str = r#"(("proportionalCapacity" i50) ("hostFailuresToTolerate" i0))"#;

fn sh(cmd: &mut Command) -> Output {
    run(cmd, Duration::from_secs(600))
}

fn sh_ok(cmd: &mut Command) -> String {
    sh(cmd).ok()
}

/// A wrapper directory for PATH: `deb-systemd-invoke` and `systemctl`
/// append their command line to `calls.log`; `systemctl --root=...`
/// (offline, on unit files) then runs the real systemctl.
struct Shims {
    dir: PathBuf,
}

impl Shims {
    fn new(dir: &Path) -> Shims {
        let dir = dir.join("shims");
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("calls.log");
        let record = format!("echo \"$(basename \"$0\") $*\" >> {}\n", log.display());
        let invoke = format!("#!/bin/sh\n{record}exit 0\n");
        let systemctl = format!(
            "#!/bin/sh\n{record}case \" $* \" in *' --root='*) exec /usr/bin/systemctl \"$@\" ;; esac\nexit 0\n"
        );
        for (name, text) in [("deb-systemd-invoke", invoke), ("systemctl", systemctl)] {
            let p = dir.join(name);
            fs::write(&p, text).unwrap();
            sh_ok(Command::new("chmod").arg("755").arg(&p));
        }
        Shims { dir }
    }

    fn path(&self) -> String {
        format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap_or_default())
    }

    /// The calls recorded since the last `take`.
    fn take(&self) -> String {
        let log = self.dir.join("calls.log");
        let s = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        s
    }
}

/// `dpkg ARGS` with the wrappers first in PATH. Waits while another dpkg
/// or apt holds the dpkg lock (dpkg itself does not wait).
fn dpkg(shims: &Shims, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let out = sh(Command::new("dpkg").args(args).env("PATH", shims.path()));
        let locked = out.stderr.contains("dpkg frontend lock") || out.stderr.contains("dpkg status database is locked");
        if !locked || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("ii"))
}

fn known_to_dpkg(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty())
}

/// `vmdk-agent ARGS` as installed, with no configuration flags.
fn agent(args: &[&str]) -> Output {
    sh(Command::new("/usr/bin/vmdk-agent")
        .args(args)
        .env_remove("VMDK_AGENT_CONFIG")
        .env_remove("VMDK_LOG"))
}

/// What `systemd-socket-activate` needs to run a unit pair: the socket
/// path and the service's command line and environment.
#[derive(Debug)]
struct UnitRun {
    listen: String,
    exec: Vec<String>,
    env: Vec<(String, String)>,
}

/// Reads the installed vmdk-plugin units and their EnvironmentFile= the
/// way systemd does for these simple files: `KEY=VALUE` lines, and an
/// unquoted `$VAR` in ExecStart= split into words.
fn plugin_unit_run() -> UnitRun {
    let socket = fs::read_to_string("/lib/systemd/system/vmdk-plugin.socket").unwrap();
    let service = fs::read_to_string("/lib/systemd/system/vmdk-plugin.service").unwrap();
    let value = |text: &str, key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in\n{text}"))
            .trim()
            .to_owned()
    };
    let listen = value(&socket, "ListenStream");
    assert_eq!(value(&service, "Type"), "notify");
    let env_file = value(&service, "EnvironmentFile");
    let env_file = env_file.trim_start_matches('-');
    let mut env = Vec::new();
    for line in fs::read_to_string(env_file).unwrap().lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{env_file}: {line}"));
        env.push((k.to_owned(), v.trim_matches('"').to_owned()));
    }
    let mut exec = Vec::new();
    for word in value(&service, "ExecStart").split_whitespace() {
        match word.strip_prefix('$') {
            Some(var) => {
                let v = env
                    .iter()
                    .find(|(k, _)| k == var)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                exec.extend(v.split_whitespace().map(str::to_owned));
            }
            None => exec.push(word.to_owned()),
        }
    }
    UnitRun { listen, exec, env }
}

/// The installed plugin under `systemd-socket-activate`.
struct Activated {
    child: Child,
    log: PathBuf,
}

impl Activated {
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the installed plugin did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the installed plugin as its units would, sends Docker's first
/// request before it runs, and waits for its answer and READY=1.
fn start_installed_plugin(dir: &Path, tag: &str) -> Activated {
    let unit = plugin_unit_run();
    let socket = plugin_socket();
    assert_eq!(unit.listen, "/run/docker/plugins/vmdk.sock");
    let _ = fs::remove_file(&socket);
    let notify = dir.join(format!("notify-{tag}"));
    let _ = fs::remove_file(&notify);
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let log = dir.join(format!("installed-plugin-{tag}.log"));
    let mut cmd = Command::new("/usr/bin/systemd-socket-activate");
    cmd.arg("-l")
        .arg(&socket)
        .arg("--fdname=vmdk-plugin.socket")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
        .arg("--setenv=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in &unit.env {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    if socket != unit.listen {
        // VMDK_E2E_DRIVER: the same units, on the other driver's socket.
        cmd.arg(format!("--setenv=VMDK_PLUGIN_SOCKET={socket}"));
    }
    cmd.args(&unit.exec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let child = cmd.spawn().expect("start systemd-socket-activate");
    let mut a = Activated { child, log };
    let deadline = Instant::now() + WAIT;
    while !Path::new(&socket).exists() {
        if let Ok(Some(s)) = a.child.try_wait() {
            panic!(
                "systemd-socket-activate exited with {s}: {}",
                fs::read_to_string(&a.log).unwrap()
            );
        }
        assert!(Instant::now() < deadline, "{socket} was not bound");
        std::thread::sleep(Duration::from_millis(10));
    }
    // systemd-socket-activate binds the file before it listens.
    let mut s = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("connect to {socket}: {e}"),
        }
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("VolumeDriver"),
        "Plugin.Activate on the activated socket: {answer:?}\n{}",
        fs::read_to_string(&a.log).unwrap_or_default()
    );
    let mut buf = [0u8; 4096];
    let n = rx.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no READY=1 from the installed plugin: {e}\n{}",
            fs::read_to_string(&a.log).unwrap_or_default()
        )
    });
    let ready = String::from_utf8_lossy(&buf[..n]);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let log = fs::read_to_string(&a.log).unwrap();
    assert!(log.contains("socket handed over by systemd"), "{log}");
    a
}

fn sha256(path: &Path) -> String {
    first_word(&sh_ok(Command::new("sha256sum").arg(path)))
}

/// Every file below `dir` with its size, mode and modification time, and
/// the checksum of the small ones (a 20 GB sparse disk is not read).
fn tree_sums(dir: &Path) -> Vec<(PathBuf, String)> {
    let out = sh_ok(
        Command::new("find")
            .arg(dir)
            .args(["-type", "f", "-printf", "%p\\t%s %m %T@\\n"]),
    );
    let mut files: Vec<(PathBuf, String)> = out
        .lines()
        .map(|l| {
            let (p, meta) = l.split_once('\t').unwrap();
            let size: u64 = meta.split(' ').next().unwrap().parse().unwrap();
            let p = PathBuf::from(p);
            let sum = if size <= 128 << 20 { sha256(&p) } else { String::new() };
            (p, format!("{meta} {sum}"))
        })
        .collect();
    files.sort();
    files
}

/// Undoes everything the test installed or made, also when it fails: the
/// activated plugin, Docker volumes (served once more by this build's
/// plugin on the same defaults), the packages (purged), the unit links,
/// and the directories it created.
struct Cleanup {
    shims: Shims,
    dir: PathBuf,
    activated: Option<Activated>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(a) = &self.activated {
                eprintln!(
                    "----- installed plugin log -----\n{}",
                    fs::read_to_string(&a.log).unwrap_or_default()
                );
            }
        }
        drop(self.activated.take());
        let _ = fs::remove_file(plugin_socket());
        // The volumes: removed through a plugin on the packages' defaults.
        let mut plugin = Command::new(plugin_bin())
            .args(["serve", "--reconcile-interval", "0", "--socket", &plugin_socket()])
            .env_remove("VMDK_AGENT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(plugin_socket()).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let ids = docker(&["ps", "-aq", "--filter", &format!("label={LABEL}")]).stdout;
        for id in ids.split_whitespace() {
            let _ = docker(&["rm", "-f", "-v", id]);
        }
        for v in [VOLUME, "vsanvol3"] {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        if let Some(p) = plugin.as_mut() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(p.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = p.wait();
        }
        let _ = fs::remove_file(plugin_socket());
        for m in mounts_under(Path::new(MOUNT_ROOT)) {
            let _ = Command::new("umount").arg("-l").arg(&m.target).status();
        }
        for (dev, _) in loops_under(Path::new(DATA_DIR)) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        for pkg in PACKAGES {
            if known_to_dpkg(pkg) {
                let _ = dpkg(&self.shims, &["--purge", pkg]);
            }
        }
        for d in [DATA_DIR, PLUGIN_STATE, MOUNT_ROOT, ETC] {
            let _ = fs::remove_dir_all(d);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Refuses a host where the packages or their data exist and are not a
/// crashed run's of this test (those are removed).
fn check_host_is_ours(shims: &Shims) {
    if Path::new(MARKER).exists() {
        eprintln!("removing what a crashed run of this test left");
        for pkg in PACKAGES {
            if known_to_dpkg(pkg) {
                let _ = dpkg(shims, &["--purge", pkg]);
            }
        }
        for d in [DATA_DIR, PLUGIN_STATE, MOUNT_ROOT, ETC] {
            let _ = fs::remove_dir_all(d);
        }
    }
    for pkg in PACKAGES {
        assert!(
            !known_to_dpkg(pkg),
            "the {pkg} package is already installed on this host; this test installs and removes it, \
             so it refuses to run here (dpkg --purge {pkg} first, or run it on a test machine)"
        );
    }
    for d in [DATA_DIR, PLUGIN_STATE, ETC] {
        assert!(
            !Path::new(d).exists(),
            "{d} exists and was not made by this test; the installed packages use it, so the test \
             refuses to run here (move it away, or run on a test machine)"
        );
    }
}

fn build_packages(out: &Path, version: Option<&str>) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .args(["--profile", "dev", "--no-build", "--fast", "--out"])
        .arg(out);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    // The binaries are those this test was built with.
    assert_eq!(
        plugin_bin().parent().unwrap(),
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target/debug")),
        "build.sh packages target/debug/; this test's binaries are elsewhere (CARGO_TARGET_DIR?)"
    );
    let started = Instant::now();
    sh_ok(&mut cmd);
    eprintln!("packaging: build.sh took {:.1?}", started.elapsed());
    let find = |prefix: &str, ext: &str| -> PathBuf {
        fs::read_dir(out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with(prefix) && n.ends_with(ext) && version.is_none_or(|v| n.contains(v))
            })
            .unwrap_or_else(|| panic!("no {prefix}*{ext} in {}", out.display()))
    };
    (
        find("vmdk-plugin_", ".deb"),
        find("vmdk-agent_", ".deb"),
        find("vmdk-plugin-", ".rpm"),
        find("vmdk-agent-", ".rpm"),
    )
}

#[test]
fn packages_install_serve_upgrade_and_remove_like_a_real_service() {
    let mut h = Harness::new("packaging");
    // The installed plugin serves the plugin socket in this test.
    h.stop_plugin();
    let busybox = image("busybox");
    let dir = h.dir.join("packaging");
    fs::create_dir_all(&dir).unwrap();
    let shims = Shims::new(&dir);
    // Before the cleanup guard exists: a refused host is left as it is.
    check_host_is_ours(&shims);
    let mut c = Cleanup {
        shims,
        dir: dir.clone(),
        activated: None,
    };

    h.step("building the packages (build.sh --profile dev --no-build)");
    let (plugin_deb, agent_deb, plugin_rpm, agent_rpm) = build_packages(&dir.join("v1"), None);
    let control = sh_ok(Command::new("dpkg-deb").arg("-f").arg(&plugin_deb));
    assert!(control.contains("Package: vmdk-plugin"), "{control}");
    let depends = control.lines().find(|l| l.starts_with("Depends:")).unwrap_or_default();
    assert!(depends.contains("vmdk-agent"), "{control}");
    let version = sh_ok(Command::new("dpkg-deb").arg("-f").arg(&plugin_deb).arg("Version"))
        .trim()
        .to_owned();

    h.step("dpkg -i");
    let out = dpkg(
        &c.shims,
        &["-i", agent_deb.to_str().unwrap(), plugin_deb.to_str().unwrap()],
    );
    fs::create_dir_all(DATA_DIR).unwrap();
    fs::write(MARKER, "").unwrap();
    assert!(out.success(), "{out}");
    let calls = c.shims.take();
    assert!(
        calls.contains("deb-systemd-invoke start vmdk-plugin.socket"),
        "install starts the socket: {calls}"
    );
    assert!(
        calls.contains("preset vmdk-plugin.socket"),
        "install enables the units: {calls}"
    );
    let socket_link = Path::new("/etc/systemd/system/sockets.target.wants/vmdk-plugin.socket");
    let service_link = Path::new("/etc/systemd/system/multi-user.target.wants/vmdk-plugin.service");
    assert!(
        socket_link.is_symlink() && service_link.is_symlink(),
        "enabled: {calls}"
    );
    assert!(
        !Path::new("/etc/systemd/system/sockets.target.wants/vmdk-agent.socket").exists(),
        "the stand-alone agent is not enabled by default"
    );
    let files = sh_ok(Command::new("dpkg").args(["-L", "vmdk-plugin", "vmdk-agent"]));
    for f in [
        "/usr/bin/vmdk-plugin",
        "/usr/bin/vmdk-agent",
        "/lib/systemd/system/vmdk-plugin.socket",
        "/lib/systemd/system/vmdk-plugin.service",
        "/lib/systemd/system/vmdk-agent.socket",
        "/lib/systemd/system/vmdk-agent.service",
        "/etc/default/vmdk-plugin",
        "/etc/default/vmdk-agent",
        "/etc/vmdk/agent.toml",
        "/usr/share/doc/vmdk-plugin/install-debian.md",
        "/usr/share/doc/vmdk-agent/admin-cli.md",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} not installed: {files}");
        assert!(Path::new(f).exists(), "{f} missing");
    }
    let conffiles = sh_ok(Command::new("dpkg-query").args(["-W", "-f", "${Conffiles}\n", "vmdk-agent"]));
    assert!(conffiles.contains("/etc/vmdk/agent.toml"), "{conffiles}");
    let v = sh_ok(Command::new("/usr/bin/vmdk-plugin").arg("--version"));
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");

    h.step("systemd-analyze verify the installed units");
    sh_ok(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/vmdk-plugin.socket",
        "/lib/systemd/system/vmdk-plugin.service",
        "/lib/systemd/system/vmdk-agent.socket",
        "/lib/systemd/system/vmdk-agent.service",
    ]));

    h.step("the installed plugin, socket-activated, and a volume round trip");
    c.activated = Some(start_installed_plugin(&dir, "v1"));
    docker_ok(&[
        "volume",
        "create",
        "--driver",
        driver(),
        "--name",
        VOLUME,
        "-o",
        "size=64mb",
    ]);
    run_container(&[
        "--rm",
        "-v",
        &format!("{VOLUME}:/d"),
        &busybox,
        "sh",
        "-c",
        "echo installed > /d/f",
    ]);
    let back = run_container(&["--rm", "-v", &format!("{VOLUME}:/d"), &busybox, "cat", "/d/f"]);
    assert_eq!(back.trim(), "installed");

    h.step("the seed's policy flow on the installed defaults, no flags");
    let out = agent(&["policy", "create", "--name", "SW=2", "--content", POLICY]);
    assert!(out.success(), "{out}");
    docker_ok(&[
        "volume",
        "create",
        &format!("--driver={}", driver()),
        "--name=vsanvol3",
        "-o",
        "size=20gb",
        "-o",
        "vsan-policy-name=SW=2",
    ]);
    let ls = agent(&["ls"]).ok();
    let row = ls
        .lines()
        .find(|l| l.starts_with("vsanvol3 "))
        .unwrap_or_else(|| panic!("vmdk-agent ls has no vsanvol3: {ls}"));
    assert!(row.contains("SW=2"), "{ls}");
    let mut status_args = vec!["status".to_owned()];
    if driver() != "vmdk" {
        status_args.extend(["--plugin-socket".to_owned(), plugin_socket()]);
    }
    let status_args: Vec<&str> = status_args.iter().map(String::as_str).collect();
    let status = agent(&status_args).ok();
    assert!(status.contains("Status: Running"), "{status}");
    assert!(status.contains("Serving: embedded in vmdk-plugin"), "{status}");
    c.activated.take().unwrap().stop();
    let data = tree_sums(Path::new(DATA_DIR));
    assert!(
        data.iter().any(|(p, _)| p.to_string_lossy().contains(VOLUME)),
        "the volume is in {DATA_DIR}: {data:?}"
    );

    h.step("upgrade to a rebuilt package, configuration modified");
    let new_version = format!("{}+upgrade1", env!("CARGO_PKG_VERSION"));
    let (plugin_deb2, agent_deb2, _, _) = build_packages(&dir.join("v2"), Some(&new_version));
    let new_version = sh_ok(Command::new("dpkg-deb").arg("-f").arg(&plugin_deb2).arg("Version"))
        .trim()
        .to_owned();
    let newer = Command::new("dpkg")
        .args(["--compare-versions", &new_version, "gt", &version])
        .status()
        .unwrap();
    assert!(newer.success(), "{new_version} is not newer than {version}");
    let mut cfg = fs::read_to_string("/etc/vmdk/agent.toml").unwrap();
    cfg.push_str("\n# changed by the administrator\n");
    fs::write("/etc/vmdk/agent.toml", &cfg).unwrap();
    let default = fs::read_to_string("/etc/default/vmdk-plugin")
        .unwrap()
        .replace("#VMDK_VM_ID=", "VMDK_VM_ID=pkgtest-vm");
    fs::write("/etc/default/vmdk-plugin", &default).unwrap();
    let out = dpkg(
        &c.shims,
        &["-i", agent_deb2.to_str().unwrap(), plugin_deb2.to_str().unwrap()],
    );
    assert!(out.success(), "{out}");
    let calls = c.shims.take();
    assert!(
        calls.contains("deb-systemd-invoke try-restart vmdk-plugin.service"),
        "upgrade restarts the service: {calls}"
    );
    assert!(
        !calls.contains("stop") && !calls.contains("disable"),
        "upgrade stops or disables nothing: {calls}"
    );
    assert!(socket_link.is_symlink() && service_link.is_symlink(), "still enabled");
    assert_eq!(
        fs::read_to_string("/etc/vmdk/agent.toml").unwrap(),
        cfg,
        "agent.toml kept"
    );
    assert_eq!(
        fs::read_to_string("/etc/default/vmdk-plugin").unwrap(),
        default,
        "/etc/default/vmdk-plugin kept"
    );
    for p in ["/etc/vmdk/agent.toml.dpkg-new", "/etc/vmdk/agent.toml.dpkg-dist"] {
        assert!(!Path::new(p).exists(), "{p}");
    }
    let installed_version = sh_ok(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "vmdk-plugin"]));
    assert_eq!(installed_version, new_version);
    // The upgraded plugin, started as systemd would restart it, with the
    // kept settings, still serves the data.
    c.activated = Some(start_installed_plugin(&dir, "v2"));
    let back = run_container(&["--rm", "-v", &format!("{VOLUME}:/d"), &busybox, "cat", "/d/f"]);
    assert_eq!(back.trim(), "installed");
    let log = fs::read_to_string(&c.activated.as_ref().unwrap().log).unwrap();
    assert!(
        log.contains("vm=pkgtest-vm"),
        "VMDK_VM_ID from the kept /etc/default file: {log}"
    );
    c.activated.take().unwrap().stop();
    let data = tree_sums(Path::new(DATA_DIR));

    h.step("dpkg -r, then --purge");
    let out = dpkg(&c.shims, &["-r", "vmdk-plugin", "vmdk-agent"]);
    assert!(out.success(), "{out}");
    let calls = c.shims.take();
    assert!(
        calls.contains("deb-systemd-invoke stop vmdk-plugin.socket vmdk-plugin.service"),
        "removal stops the units: {calls}"
    );
    assert!(
        !socket_link.exists() && !service_link.exists(),
        "removal disables the units"
    );
    for f in [
        "/usr/bin/vmdk-plugin",
        "/usr/bin/vmdk-agent",
        "/lib/systemd/system/vmdk-plugin.service",
    ] {
        assert!(!Path::new(f).exists(), "{f} left after dpkg -r");
    }
    assert!(
        Path::new("/etc/vmdk/agent.toml").exists(),
        "dpkg -r keeps configuration"
    );
    assert_eq!(
        tree_sums(Path::new(DATA_DIR)),
        data,
        "dpkg -r leaves volumes and data alone"
    );
    let out = dpkg(&c.shims, &["--purge", "vmdk-plugin", "vmdk-agent"]);
    assert!(out.success(), "{out}");
    assert!(
        !Path::new("/etc/vmdk/agent.toml").exists(),
        "purge removes configuration"
    );
    assert!(!known_to_dpkg("vmdk-plugin") && !installed("vmdk-agent"));
    assert_eq!(
        tree_sums(Path::new(DATA_DIR)),
        data,
        "purge leaves volumes and data alone"
    );

    h.step("the .rpm packages");
    let list = sh_ok(Command::new("rpm").arg("-qpl").arg(&plugin_rpm).arg(&agent_rpm));
    for f in [
        "/usr/bin/vmdk-plugin",
        "/usr/lib/systemd/system/vmdk-plugin.socket",
        "/usr/lib/systemd/system/vmdk-plugin.service",
        "/etc/default/vmdk-plugin",
        "/usr/bin/vmdk-agent",
        "/usr/lib/systemd/system/vmdk-agent.socket",
        "/etc/vmdk/agent.toml",
    ] {
        assert!(list.lines().any(|l| l == f), "{f} not in the rpms: {list}");
    }
    let configs = sh_ok(Command::new("rpm").arg("-qpc").arg(&agent_rpm));
    assert!(configs.contains("/etc/vmdk/agent.toml"), "{configs}");
    // %config(noreplace): an upgrade keeps the administrator's version.
    let flags = sh_ok(
        Command::new("rpm")
            .args(["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]"])
            .arg(&agent_rpm)
            .arg(&plugin_rpm),
    );
    for f in [
        "/etc/vmdk/agent.toml",
        "/etc/default/vmdk-agent",
        "/etc/default/vmdk-plugin",
    ] {
        assert!(
            flags.lines().any(|l| l == format!("{f} cn")),
            "{f} is not %config(noreplace): {flags}"
        );
    }
    let scripts = sh_ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&plugin_rpm));
    for s in [
        "systemctl enable vmdk-plugin.socket vmdk-plugin.service",
        "systemctl try-restart vmdk-plugin.service",
        "systemctl stop vmdk-plugin.socket vmdk-plugin.service",
    ] {
        assert!(scripts.contains(s), "{s:?} not in the scripts: {scripts}");
    }
    let requires = sh_ok(Command::new("rpm").args(["-qp", "--requires"]).arg(&plugin_rpm));
    assert!(requires.contains("vmdk-agent"), "{requires}");
    // A scratch root with only a shell (busybox) for the scriptlets: no
    // systemd, no systemctl; the scriptlets must still succeed.
    let root = dir.join("rpm-root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let out = sh(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["--nodeps", "-i"])
        .arg(&agent_rpm)
        .arg(&plugin_rpm));
    assert!(out.success() && !out.stderr.contains("scriptlet failed"), "{out}");
    for f in [
        "usr/bin/vmdk-plugin",
        "usr/bin/vmdk-agent",
        "usr/lib/systemd/system/vmdk-plugin.socket",
        "etc/vmdk/agent.toml",
    ] {
        assert!(root.join(f).exists(), "{f} not installed into the scratch root");
    }
    let out = sh(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["--nodeps", "-e", "vmdk-plugin", "vmdk-agent"]));
    assert!(out.success() && !out.stderr.contains("scriptlet failed"), "{out}");
    assert!(!root.join("usr/bin/vmdk-plugin").exists());
    drop(c);
}
