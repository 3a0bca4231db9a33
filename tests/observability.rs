//! Root-only: `vmdk-plugin serve` (embedded agent, real loop devices, mkfs
//! and mount) with its admin listener and JSON logs. Driven over its socket
//! as Docker does, it must show in `/metrics` what was done (requests per
//! method, active mounts going 1 then 0, the volume count), answer
//! `/healthz` and `/readyz`, log each request in a span naming the volume
//! and the operation, and write an audit line for each mutating call.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{require_root, KernelCleanup};
use vmdk_plugin::http1::{self, Endpoint};

/// A GET over plain HTTP/1.1 to `addr`: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample (`name{labels}`) in an exposition; 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| {
            v.trim().parse().unwrap_or_else(|e| panic!("{series}: {v:?}: {e}"))
        })
}

/// Polls `f` until it gives a value, for at most `secs` seconds.
fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon whose stderr (JSON log lines) is collected.
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn spawn(cmd: &mut Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start daemon (built by cargo test --workspace)");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stderr.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Daemon { child, lines }
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The admin address the daemon logged (it was given port 0).
    fn admin_addr(&mut self) -> String {
        wait_for("the admin listener's address in the log", 60, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("daemon exited ({st}):\n{}", self.log().join("\n"));
            }
            self.log().iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                v["fields"]["admin"].as_str().map(str::to_owned)
            })
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(sock: &Path, endpoint: &str, body: Value) -> Value {
    let (status, bytes) = http1::request(
        &Endpoint::Unix(sock.to_owned()),
        hyper::Method::POST,
        &format!("/{endpoint}"),
        &[("Accept", "application/vnd.docker.plugins.v1.2+json")],
        Some(format!("{body}\n").into_bytes()),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(status.is_success(), "{endpoint} {body}: {status} {v}");
    v
}

/// `vmdk-plugin serve` in `root` (embedded agent, no Docker), JSON logs,
/// admin listener on a free port.
fn start_plugin(root: &Path, sock: &Path) -> Daemon {
    Daemon::spawn(
        Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
            .args(["--log-format", "json", "serve", "--admin-listen", "127.0.0.1:0"])
            .args(["--vm-id", "obs-vm", "--reconcile-interval", "0"])
            .arg("--socket")
            .arg(sock)
            .arg("--datastore")
            .arg(format!("local={}", root.join("ds").display()))
            .arg("--mount-root")
            .arg(root.join("mnt"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--docker-socket")
            .arg(root.join("no-docker.sock"))
            .env_remove("VMDK_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_health_and_logs_follow_the_docker_calls() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let _cleanup = KernelCleanup(root.clone());
    let sock = root.join("vmdk-obs.sock");
    let mut plugin = start_plugin(&root, &sock);
    let admin = plugin.admin_addr();
    assert_eq!(http_get(&admin, "/healthz"), (200, "ok\n".to_owned()));
    wait_for("/readyz to answer 200", 60, || {
        (http_get(&admin, "/readyz").0 == 200).then_some(())
    });
    let (status, body) = http_get(&admin, "/nope");
    assert_eq!(status, 404);
    assert!(body.contains("/healthz, /readyz and /metrics"), "{body}");

    let (status, before) = http_get(&admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        before.contains("vmdk_build_info{program=\"vmdk-plugin\",version=\"")
            && before.contains("# TYPE vmdk_plugin_requests_total counter"),
        "{before}"
    );
    let req = |m: &str| format!("vmdk_plugin_requests_total{{method=\"VolumeDriver.{m}\",result=\"ok\"}}");
    let detached = "vmdk_volumes{state=\"detached\"}";
    let attached = "vmdk_volumes{state=\"attached\"}";

    // Docker looks the volume up before creating it.
    let v = call(&sock, "VolumeDriver.Get", serde_json::json!({"Name": "obsvol"})).await;
    assert_eq!(v["Volume"], Value::Null);
    call(
        &sock,
        "VolumeDriver.Create",
        serde_json::json!({"Name": "obsvol", "Opts": {"size": "20mb"}}),
    )
    .await;
    let after_create = http_get(&admin, "/metrics").1;
    assert_eq!(
        sample(&after_create, detached),
        sample(&before, detached) + 1.0,
        "{after_create}"
    );

    call(
        &sock,
        "VolumeDriver.Mount",
        serde_json::json!({"Name": "obsvol", "ID": "mount-id-1"}),
    )
    .await;
    let mounted = http_get(&admin, "/metrics").1;
    assert_eq!(sample(&mounted, "vmdk_plugin_active_mounts"), 1.0, "{mounted}");
    assert_eq!(sample(&mounted, attached), 1.0, "{mounted}");
    assert_eq!(sample(&mounted, detached), sample(&before, detached), "{mounted}");

    call(
        &sock,
        "VolumeDriver.Unmount",
        serde_json::json!({"Name": "obsvol", "ID": "mount-id-1"}),
    )
    .await;
    let unmounted = http_get(&admin, "/metrics").1;
    assert_eq!(sample(&unmounted, "vmdk_plugin_active_mounts"), 0.0, "{unmounted}");
    call(&sock, "VolumeDriver.Remove", serde_json::json!({"Name": "obsvol"})).await;

    let after = http_get(&admin, "/metrics").1;
    for m in ["Get", "Create", "Mount", "Unmount", "Remove"] {
        assert_eq!(sample(&after, &req(m)), sample(&before, &req(m)) + 1.0, "{m}: {after}");
        let count = format!("vmdk_plugin_request_duration_seconds_count{{method=\"VolumeDriver.{m}\",result=\"ok\"}}");
        assert_eq!(sample(&after, &count), sample(&before, &count) + 1.0, "{m}: {after}");
    }
    assert_eq!(sample(&after, detached), sample(&before, detached), "{after}");
    assert_eq!(sample(&after, attached), 0.0, "{after}");
    let attach = "vmdk_agent_operation_duration_seconds_count{op=\"attach\",result=\"ok\"}";
    assert_eq!(sample(&after, attach), sample(&before, attach) + 1.0, "{after}");

    // The Remove's audit line was written before its answer, but the
    // thread collecting stderr may not have read it yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !plugin
        .log()
        .iter()
        .any(|l| l.contains("\"audit\"") && l.contains("VolumeDriver.Remove"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The logs: JSON lines; the Mount's lines carry the span's volume,
    // operation and mount ID; each mutating call has its audit line; the
    // Get before Create is no refusal or warning.
    let log: Vec<Value> = plugin
        .log()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    let all = || log.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n");
    assert!(
        log.iter().any(|v| v["span"]["operation"] == "VolumeDriver.Mount"
            && v["span"]["volume"] == "obsvol"
            && v["span"]["mount_id"] == "mount-id-1"),
        "no log line in the Mount's span:\n{}",
        all()
    );
    for op in ["Create", "Mount", "Unmount", "Remove"] {
        let op = format!("VolumeDriver.{op}");
        assert!(
            log.iter().any(|v| v["target"] == "audit"
                && v["fields"]["operation"] == op.as_str()
                && v["fields"]["volume"] == "obsvol"
                && v["fields"]["caller"] == "docker"
                && v["fields"]["result"] == "ok"),
            "no audit line for {op}:\n{}",
            all()
        );
    }
    let get_noise: Vec<&Value> = log
        .iter()
        .filter(|v| v["span"]["operation"] == "VolumeDriver.Get" && v["level"] != "DEBUG" && v["level"] != "TRACE")
        .collect();
    assert!(get_noise.is_empty(), "the Get before Create logged: {get_noise:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_admin_port_is_a_warning_and_the_plugin_serves() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let sock = root.join("vmdk-obs2.sock");
    let plugin = Daemon::spawn(
        Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
            .args(["--log-format", "json", "serve", "--admin-listen", &addr])
            .args(["--vm-id", "obs-vm-2", "--reconcile-interval", "0"])
            .arg("--socket")
            .arg(&sock)
            .arg("--datastore")
            .arg(format!("local={}", root.join("ds").display()))
            .arg("--mount-root")
            .arg(root.join("mnt"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--docker-socket")
            .arg(root.join("no-docker.sock")),
    );
    wait_for("the plugin socket", 60, || {
        std::os::unix::net::UnixStream::connect(&sock).ok()
    });
    let v = call(&sock, "VolumeDriver.List", serde_json::json!({})).await;
    assert_eq!(v["Volumes"], serde_json::json!([]));
    let warning = wait_for("the warning about the admin port", 30, || {
        plugin
            .log()
            .into_iter()
            .find(|l| l.contains("WARN") && l.contains(&addr))
    });
    assert!(warning.contains("--admin-listen"), "{warning}");
    drop(taken);
}

/// Under systemd (`JOURNAL_STREAM` names the daemon's stderr) the plugin
/// logs to the journal: with a journal socket nothing more reaches stderr;
/// without one it says so on stderr and logs there. A `JOURNAL_STREAM`
/// that names another file is not systemd's: text on stderr, no attempt.
#[test]
fn journal_stream_on_stderr_selects_the_journal() {
    let journal_socket = Path::new("/run/systemd/journal/socket").exists();
    let run = |matching: bool| -> String {
        let dir = tempfile::tempdir().unwrap();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let st = nix::sys::stat::fstat(&wr).unwrap();
        let stream = if matching {
            format!("{}:{}", st.st_dev, st.st_ino)
        } else {
            format!("{}:{}", st.st_dev, st.st_ino + 1)
        };
        // `serve` with its socket below a regular file logs its start, then
        // fails to bind and exits.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmdk-plugin"))
            .args(["serve", "--admin-listen", "off", "--vm-id", "j-vm"])
            .arg("--socket")
            .arg(blocker.join("vmdk.sock"))
            .arg("--datastore")
            .arg(format!("local={}", dir.path().join("ds").display()))
            .arg("--mount-root")
            .arg(dir.path().join("mnt"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("JOURNAL_STREAM", stream)
            .env_remove("INVOCATION_ID")
            .env_remove("VMDK_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::from(wr))
            .spawn()
            .unwrap();
        let mut text = String::new();
        std::fs::File::from(rd).read_to_string(&mut text).unwrap();
        child.wait().unwrap();
        text
    };
    let other = run(false);
    assert!(
        other.contains("INFO") && other.contains("embedded agent configuration"),
        "{other}"
    );
    assert!(!other.contains("systemd journal"), "{other}");
    let journal = run(true);
    if journal_socket {
        assert!(
            !journal.contains("embedded agent configuration"),
            "logged to stderr, not the journal: {journal}"
        );
    } else {
        assert!(
            journal.contains("cannot connect to the systemd journal; logging to stderr instead")
                && journal.contains("embedded agent configuration"),
            "{journal}"
        );
    }
}

/// After a crash (SIGKILL while a volume was mounted) and the volume
/// unmounted behind the plugin's back, start-up recovery repairs the state,
/// and `vmdk_plugin_reconcile_actions_total` counts what it did.
#[tokio::test(flavor = "multi_thread")]
async fn recovery_actions_are_counted() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let _cleanup = KernelCleanup(root.clone());
    let sock = root.join("vmdk-obs3.sock");
    let mut plugin = start_plugin(&root, &sock);
    let admin = plugin.admin_addr();
    wait_for("/readyz to answer 200", 60, || {
        (http_get(&admin, "/readyz").0 == 200).then_some(())
    });
    call(
        &sock,
        "VolumeDriver.Create",
        serde_json::json!({"Name": "crashvol", "Opts": {"size": "20mb"}}),
    )
    .await;
    call(
        &sock,
        "VolumeDriver.Mount",
        serde_json::json!({"Name": "crashvol", "ID": "m1"}),
    )
    .await;
    plugin.child.kill().unwrap();
    plugin.child.wait().unwrap();
    use vmdk_plugin::sys::System;
    let mounted: Vec<_> = vmdk_plugin::sys::LinuxSystem
        .mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.target.starts_with(&root))
        .collect();
    assert_eq!(mounted.len(), 1, "{mounted:?}");
    nix::mount::umount2(&mounted[0].target, nix::mount::MntFlags::empty()).unwrap();

    let mut plugin = start_plugin(&root, &sock);
    let admin = plugin.admin_addr();
    wait_for("/readyz to answer 200 after recovery", 60, || {
        (http_get(&admin, "/readyz").0 == 200).then_some(())
    });
    let m = http_get(&admin, "/metrics").1;
    let action = |a: &str| sample(&m, &format!("vmdk_plugin_reconcile_actions_total{{action=\"{a}\"}}"));
    assert_eq!(action("drop_record"), 1.0, "{m}");
    assert_eq!(action("detach_stray"), 1.0, "{m}");
    assert_eq!(action("remove_dir"), 1.0, "{m}");
    assert_eq!(action("adopt"), 0.0, "{m}");
    assert_eq!(sample(&m, "vmdk_plugin_active_mounts"), 0.0, "{m}");
    assert_eq!(sample(&m, "vmdk_volumes{state=\"attached\"}"), 0.0, "{m}");
    call(&sock, "VolumeDriver.Remove", serde_json::json!({"Name": "crashvol"})).await;
}
