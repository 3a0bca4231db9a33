//! One configuration for both programs: `vmdk-agent`'s admin commands see
//! the datastores, the datastore type and the running agent of a
//! `vmdk-plugin` that embeds its agent (issue "Install and run it like a
//! real service", section "One configuration"). Runs both real binaries.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PLUGIN: &str = env!("CARGO_BIN_EXE_vmdk-plugin");
const SW2: &str = r#"(("stripeWidth" i2))"#;

fn agent_bin() -> PathBuf {
    let p = PathBuf::from(PLUGIN).with_file_name("vmdk-agent");
    assert!(p.is_file(), "{} is missing: run `cargo test --workspace`", p.display());
    p
}

/// A `vmdk-plugin serve` with its agent embedded, killed on drop.
struct Served {
    child: Child,
    socket: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, args: &[String]) -> Served {
    let socket = dir.join("plugin.sock");
    let child = Command::new(PLUGIN)
        .args(["serve", "--admin-listen", "off"])
        .arg("--socket")
        .arg(&socket)
        .args(["--vm-id", "vm-1", "--reconcile-interval", "0"])
        .arg("--mount-root")
        .arg(dir.join("mnt"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--docker-socket")
        .arg(dir.join("no-docker.sock"))
        .args(args)
        .env_remove("VMDK_AGENT_CONFIG")
        .env_remove("VMDK_AGENT_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vmdk-plugin");
    let mut s = Served { child, socket };
    // Liveness bound only: the socket is bound within milliseconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(&s.socket).is_err() {
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!("vmdk-plugin exited with {status} before serving");
        }
        assert!(
            Instant::now() < deadline,
            "vmdk-plugin did not serve {}",
            s.socket.display()
        );
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(5));
    }
    s
}

/// One request on the plugin socket as Docker sends it; the JSON answer.
fn call(socket: &Path, method: &str, body: &str) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "POST /{method} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{method}: {raw}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{method}: {e}: {body}"))
}

fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .env_remove("VMDK_AGENT_CONFIG")
        .env_remove("VMDK_LOG")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = agent(args);
    assert!(out.status.success(), "vmdk-agent {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The seed's flow with the plugin's agent embedded: the admin commands,
/// given only the datastore's directory (not its type), see it as VSAN
/// because the plugin recorded the type on the datastore; `status` reports
/// the embedded agent as serving; a policy made by the admin command is
/// used by a create through the plugin and shown by `ls`.
#[test]
fn admin_commands_agree_with_a_plugin_that_embeds_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let plugin = serve(
        dir.path(),
        &["--datastore".into(), format!("vsanDatastore={},vsan", ds.display())],
    );
    // The plugin serves its socket before its start-up work, which
    // prepares the datastore and records its type (docs/recovery.md); a
    // Remove waits for that work, as every mutating call does.
    let removed = call(&plugin.socket, "VolumeDriver.Remove", r#"{"Name":"no-such-volume"}"#);
    assert_eq!(removed["Err"], "", "{removed}");
    let flag = format!("vsanDatastore={}", ds.display());
    let none = dir.path().join("no-agent.sock");
    let status = ok(&[
        "--datastore",
        &flag,
        "status",
        "--socket",
        none.to_str().unwrap(),
        "--plugin-socket",
        plugin.socket.to_str().unwrap(),
    ]);
    assert!(status.contains("Status: Running"), "{status}");
    assert!(status.contains("Serving: embedded in vmdk-plugin"), "{status}");
    assert!(
        status.contains(&format!("Socket: {}", plugin.socket.display())),
        "{status}"
    );
    let row = status
        .lines()
        .find(|l| l.starts_with("vsanDatastore"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        row.split_whitespace().nth(2) == Some("yes"),
        "the datastore's recorded type is VSAN: {status}"
    );

    ok(&[
        "--datastore",
        &flag,
        "policy",
        "create",
        "--name",
        "SW=2",
        "--content",
        SW2,
    ]);
    let created = call(
        &plugin.socket,
        "VolumeDriver.Create",
        r#"{"Name":"vsanvol3","Opts":{"size":"20mb","vsan-policy-name":"SW=2"}}"#,
    );
    assert_eq!(created["Err"], "", "{created}");
    let ls = ok(&["--datastore", &flag, "ls", "--format", "json"]);
    let vols: Value = serde_json::from_str(&ls).unwrap();
    let v = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"].as_str().is_some_and(|n| n.starts_with("vsanvol3")))
        .unwrap_or_else(|| panic!("{ls}"));
    assert_eq!(v["policy"], "SW=2", "{ls}");

    // A plugin using a separate agent is not an embedded agent.
    drop(plugin);
    let status = ok(&[
        "--datastore",
        &flag,
        "status",
        "--socket",
        none.to_str().unwrap(),
        "--plugin-socket",
        dir.path().join("plugin.sock").to_str().unwrap(),
    ]);
    assert!(status.contains("Status: Stopped"), "{status}");
    assert!(status.contains("no plugin with an embedded agent"), "{status}");
}

/// A configuration that says `vsan = false` is recorded on the datastore,
/// so that every process agrees from then on; one that says nothing uses
/// the record.
#[test]
fn the_datastore_type_is_recorded_with_the_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let plain = format!("d={}", ds.display());
    let vsan = format!("d={},vsan", ds.display());
    let vsan_of = |flag: &str| -> bool {
        let j: Value = serde_json::from_str(&ok(&["--datastore", flag, "status", "--format", "json"])).unwrap();
        j["datastores"][0]["vsan"].as_bool().unwrap()
    };
    assert!(!vsan_of(&plain), "nothing recorded: not VSAN");
    assert!(vsan_of(&vsan));
    assert!(
        !ds.join("dockvols").exists(),
        "a command that writes nothing leaves the datastore alone"
    );
    // The first write records the type with the new dockvols/.
    ok(&[
        "--datastore",
        &vsan,
        "policy",
        "create",
        "--name",
        "p0",
        "--content",
        SW2,
    ]);
    assert!(vsan_of(&plain), "recorded by the previous run");
    let record = ds.join("dockvols/.vmdk-datastore");
    let text = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        serde_json::json!({"version": 1, "vsan": true})
    );

    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!("[[datastore]]\nname = \"d\"\npath = {:?}\nvsan = false\n", ds),
    )
    .unwrap();
    let j: Value =
        serde_json::from_str(&ok(&["--config", cfg.to_str().unwrap(), "status", "--format", "json"])).unwrap();
    assert_eq!(j["datastores"][0]["vsan"], false);
    assert!(!vsan_of(&plain));
    let out = agent(&[
        "--datastore",
        &plain,
        "policy",
        "create",
        "--name",
        "p",
        "--content",
        SW2,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("VSAN datastore does not exist"),
        "{out:?}"
    );

    // A record vmdk did not write is reported, never trusted or replaced.
    std::fs::write(&record, "garbage").unwrap();
    let out = agent(&["--datastore", &plain, "status"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read the datastore's recorded type"), "{err}");
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "garbage");
}
