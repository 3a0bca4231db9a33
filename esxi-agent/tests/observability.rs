//! `vmdk-agent serve` with its admin listener and JSON logs: `/readyz`
//! answers once it serves, `/metrics` shows the operations done (their
//! duration histogram moves) and the volume count, and each mutating call
//! has its audit line naming the calling VM.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

fn exchange(mut s: impl Read + Write, request: &str) -> (u16, String) {
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    exchange(
        s,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

fn api(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    exchange(
        s,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nVM-Id: obs-vm\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

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

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_admin_listener_shows_its_operations() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    std::fs::create_dir_all(dir.path().join("ds")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmdk-agent"))
        .arg("--datastore")
        .arg(format!("local={}", dir.path().join("ds").display()))
        .args([
            "--log-format",
            "json",
            "serve",
            "--admin-listen",
            "127.0.0.1:0",
            "--socket",
        ])
        .arg(&sock)
        .env_remove("VMDK_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("INVOCATION_ID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmdk-agent");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let out = child.stderr.take().unwrap();
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    let _agent = Agent(child);
    let log = || lines.lock().unwrap().clone();
    let admin = wait_for("the admin address in the log", 60, || {
        log().iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            v["fields"]["admin"].as_str().map(str::to_owned)
        })
    });
    assert_eq!(http_get(&admin, "/healthz").0, 200);
    wait_for("/readyz 200", 60, || {
        (http_get(&admin, "/readyz").0 == 200).then_some(())
    });
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());

    let before = http_get(&admin, "/metrics").1;
    assert!(before.contains("vmdk_build_info{program=\"vmdk-agent\""), "{before}");
    let create = "vmdk_agent_operation_duration_seconds_count{op=\"create\",result=\"ok\"}";
    let get_missing = "vmdk_agent_operation_duration_seconds_count{op=\"get\",result=\"error\"}";
    let detached = "vmdk_volumes{state=\"detached\"}";

    assert_eq!(api(&sock, "GET", "/v1/volumes/obsvol", "").0, 404);
    let (status, body) = api(
        &sock,
        "POST",
        "/v1/volumes",
        r#"{"name":"obsvol","opts":{"size":"10mb"}}"#,
    );
    assert_eq!(status, 201, "{body}");
    let created = http_get(&admin, "/metrics").1;
    assert_eq!(sample(&created, create), sample(&before, create) + 1.0, "{created}");
    assert_eq!(
        sample(&created, get_missing),
        sample(&before, get_missing) + 1.0,
        "{created}"
    );
    assert_eq!(sample(&created, detached), sample(&before, detached) + 1.0, "{created}");

    // `vmdk-agent ls` on this host asks the agent serving the same
    // datastore (its catalog answers); with --direct, or configured with
    // another directory under the same name, it reads the files itself.
    let listed = "vmdk_agent_operation_duration_seconds_count{op=\"list\",result=\"ok\"}";
    let ls = |ds: &Path, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vmdk-agent"))
            .arg("--datastore")
            .arg(format!("local={}", ds.display()))
            .args(["ls", "-c", "volume,datastore", "--plugin-socket", "/nonexistent"])
            .arg("--socket")
            .arg(&sock)
            .args(extra)
            .env_remove("VMDK_AGENT_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let m0 = sample(&http_get(&admin, "/metrics").1, listed);
    let served = ls(&dir.path().join("ds"), &[]);
    assert!(served.lines().any(|l| l.starts_with("obsvol ")), "{served}");
    let m1 = sample(&http_get(&admin, "/metrics").1, listed);
    assert_eq!(m1, m0 + 1.0, "ls did not ask the running agent");
    assert_eq!(ls(&dir.path().join("ds"), &["--direct"]), served);
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    vmdk_agent::testkit::write_volume(&other, "elsewhere", 1 << 20, 0, &[]).unwrap();
    let own = ls(&other, &[]);
    assert!(
        own.lines().any(|l| l.starts_with("elsewhere ")) && !own.contains("obsvol"),
        "{own}"
    );
    assert_eq!(sample(&http_get(&admin, "/metrics").1, listed), m1);

    let (status, body) = api(&sock, "DELETE", "/v1/volumes/obsvol", "");
    assert_eq!(status, 204, "{body}");
    let removed = http_get(&admin, "/metrics").1;
    assert_eq!(sample(&removed, detached), sample(&before, detached), "{removed}");

    // The remove's audit line was written before its answer, but the
    // thread collecting stderr may not have read it yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log()
        .iter()
        .any(|l| l.contains("\"audit\"") && l.contains("\"remove\""))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let log: Vec<Value> = log().iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let all = || log.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n");
    for op in ["create", "remove"] {
        assert!(
            log.iter().any(|v| v["target"] == "audit"
                && v["fields"]["operation"] == op
                && v["fields"]["volume"] == "obsvol"
                && v["fields"]["caller"] == "VM obs-vm"
                && v["fields"]["result"] == "ok"
                && v["span"]["operation"] == op),
            "no audit line for {op}:\n{}",
            all()
        );
    }
    // Docker's lookup before a create is not logged as a refusal.
    assert!(
        !log.iter()
            .any(|v| v["span"]["operation"] == "get" && v["level"] != "DEBUG"),
        "the not-found lookup was logged:\n{}",
        all()
    );
}
