//! Both daemons under socket activation, as systemd runs them from
//! `vmdk-plugin.socket` / `vmdk-agent.socket` (issue "Install and run it
//! like a real service", section "systemd").
//!
//! `systemd-socket-activate -l PATH` (from the `systemd` package) binds
//! PATH and, on the first connection, starts the daemon with the listening
//! socket as fd 3 and `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` set,
//! exactly as systemd does (systemd is not PID 1 on the test machine). The
//! test connects and sends its request *before* the daemon exists, so the
//! request waits in the socket's queue, as Docker's requests do while the
//! service (re)starts. It then checks the answer, the `READY=1` on
//! `NOTIFY_SOCKET`, a second request, `STOPPING=1` on SIGTERM, and that the
//! daemon leaves the socket file (owned by the socket unit) in place.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PLUGIN: &str = env!("CARGO_BIN_EXE_vmdk-plugin");
/// Liveness bound for each step; the steps take milliseconds.
const WAIT: Duration = Duration::from_secs(60);

fn agent_bin() -> PathBuf {
    let p = PathBuf::from(PLUGIN).with_file_name("vmdk-agent");
    assert!(p.is_file(), "{} is missing: run `cargo test --workspace`", p.display());
    p
}

fn socket_activate() -> &'static str {
    let p = "/usr/bin/systemd-socket-activate";
    assert!(
        Path::new(p).is_file(),
        "{p} is missing: install the Debian package `systemd` (tests/run.sh does)"
    );
    p
}

/// The daemon under `systemd-socket-activate`, killed on drop.
struct Activated {
    child: Child,
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `program args` under `systemd-socket-activate -l socket`, with
/// `NOTIFY_SOCKET=notify`, and waits until the socket exists (bound by
/// systemd-socket-activate, not by the daemon, which starts only on the
/// first connection).
fn activate(socket: &Path, notify: &Path, program: &Path, args: &[String]) -> Activated {
    let child = Command::new(socket_activate())
        .arg("-l")
        .arg(socket)
        .arg("--fdname=vmdk")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
        .arg("--setenv=PATH")
        .arg("--setenv=VMDK_LOG=info")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start systemd-socket-activate");
    let mut a = Activated { child };
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        if let Ok(Some(status)) = a.child.try_wait() {
            panic!("systemd-socket-activate exited with {status} before binding");
        }
        assert!(Instant::now() < deadline, "{} was not bound", socket.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    a
}

/// Connects to `socket`; systemd-socket-activate binds the file before it
/// listens, so a refusal in between is retried.
fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + WAIT;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("connect to the activated socket {}: {e}", socket.display()),
        }
    }
}

/// Sends one HTTP request on `s` and returns the whole response.
fn exchange(mut s: UnixStream, request: &str) -> String {
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
}

/// The next notification, or a failure naming what was awaited.
fn recv_notification(rx: &UnixDatagram, what: &str) -> String {
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    let n = rx
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no {what} on NOTIFY_SOCKET within {WAIT:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The scenario common to both daemons: a request queued before start,
/// READY=1, a second request, STOPPING=1 on SIGTERM, socket file kept.
fn queued_ready_served_stopping(
    dir: &Path,
    program: &Path,
    args: &[String],
    first: (&str, &str),
    second: (&str, &str),
) {
    let socket = dir.join("vmdk.sock");
    let notify = dir.join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    let mut a = activate(&socket, &notify, program, args);

    // Connected and sent while only systemd-socket-activate exists: the
    // daemon is started by this very connection.
    let early = connect(&socket);
    let answer = exchange(early, first.0);
    assert!(answer.starts_with("HTTP/1.1 200"), "queued request: {answer}");
    assert!(
        answer.contains(first.1),
        "queued request, expected {:?}: {answer}",
        first.1
    );

    let ready = recv_notification(&rx, "READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification: {ready:?}");

    let answer = exchange(connect(&socket), second.0);
    assert!(answer.starts_with("HTTP/1.1 200"), "second request: {answer}");
    assert!(
        answer.contains(second.1),
        "second request, expected {:?}: {answer}",
        second.1
    );

    // systemd-socket-activate exec()s the daemon: the child is the daemon.
    // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
    let rc = unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let stopping = recv_notification(&rx, "STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "on SIGTERM: {stopping:?}");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit on SIGTERM: {status}");
    assert!(
        socket.exists(),
        "the daemon removed {}, which belongs to the socket unit",
        socket.display()
    );
}

#[test]
fn plugin_serves_the_socket_systemd_hands_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args: Vec<String> = vec![
        "serve".into(),
        "--socket".into(),
        d.join("vmdk.sock").display().to_string(),
        "--vm-id".into(),
        "vm-1".into(),
        "--reconcile-interval".into(),
        "0".into(),
        "--datastore".into(),
        format!("local={}", d.join("ds").display()),
        "--mount-root".into(),
        d.join("mnt").display().to_string(),
        "--state-dir".into(),
        d.join("state").display().to_string(),
        "--docker-socket".into(),
        d.join("no-docker.sock").display().to_string(),
        "--agent-config".into(),
        d.join("no-agent.toml").display().to_string(),
    ];
    // An agent configuration path that does not exist must not be read from
    // /etc/vmdk: write an empty one.
    std::fs::write(d.join("no-agent.toml"), "").unwrap();
    queued_ready_served_stopping(
        d,
        Path::new(PLUGIN),
        &args,
        (&post("/Plugin.Activate", "{}"), "VolumeDriver"),
        (&post("/VolumeDriver.Capabilities", "{}"), "\"Scope\""),
    );
}

#[test]
fn agent_serves_the_socket_systemd_hands_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("agent.toml");
    std::fs::write(&config, "").unwrap();
    // A configured datastore directory must exist.
    std::fs::create_dir(d.join("ds")).unwrap();
    let args: Vec<String> = vec![
        "--config".into(),
        config.display().to_string(),
        "--datastore".into(),
        format!("local={}", d.join("ds").display()),
        "serve".into(),
        "--socket".into(),
        d.join("vmdk.sock").display().to_string(),
    ];
    queued_ready_served_stopping(
        d,
        &agent_bin(),
        &args,
        (&get("/v1/version"), "{"),
        (&get("/v1/volumes"), "["),
    );
}

/// The units in packaging/systemd/ pass `systemd-analyze verify`, with
/// ExecStart= pointing at this build's binaries (tests/packaging.rs
/// verifies the installed ones), and keep the properties the plugin
/// needs: socket activation, Type=notify, no dependency on Docker and no
/// mount-namespace isolation.
#[test]
fn the_units_verify_and_keep_dockerd_able_to_see_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/systemd"));
    let mut units = Vec::new();
    for name in [
        "vmdk-plugin.socket",
        "vmdk-plugin.service",
        "vmdk-agent.socket",
        "vmdk-agent.service",
    ] {
        let text = std::fs::read_to_string(src.join(name)).unwrap();
        let text = text
            .replace("/usr/bin/vmdk-plugin", PLUGIN)
            .replace("/usr/bin/vmdk-agent", agent_bin().to_str().unwrap());
        std::fs::write(dir.path().join(name), text).unwrap();
        units.push(dir.path().join(name));
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("run systemd-analyze (Debian package systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let plugin_socket = std::fs::read_to_string(src.join("vmdk-plugin.socket")).unwrap();
    assert!(plugin_socket.contains("\nListenStream=/run/docker/plugins/vmdk.sock\n"));
    assert!(plugin_socket.contains("\nBefore=docker.service\n"));
    assert!(plugin_socket.contains("\nWantedBy=sockets.target\n"));
    let agent_socket = std::fs::read_to_string(src.join("vmdk-agent.socket")).unwrap();
    assert!(agent_socket.contains("\nListenStream=/run/vmdk/agent.sock\n"));
    for unit in ["vmdk-plugin.service", "vmdk-agent.service"] {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        let directives: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(directives.contains(&"Type=notify"), "{unit}");
        assert!(directives.contains(&"Restart=on-failure"), "{unit}");
        for bad in [
            "Requires=docker.service",
            "PrivateTmp=",
            "PrivateMounts=",
            "ProtectSystem=",
            "ProtectHome=",
            "MountFlags=",
        ] {
            assert!(!directives.iter().any(|l| l.starts_with(bad)), "{unit} has {bad}");
        }
    }
}
