//! The plugin socket under hostile clients: half-sent requests held open by
//! the thousand (slowloris), stalled and oversized bodies.
//!
//! Each test runs the built `vmdk-plugin serve` (embedded agent on a temp
//! datastore) under `ulimit -n 1024`, the open-file limit of a default
//! host, so a server that keeps every connection open runs out of
//! descriptors as in the reported finding, with short limits given through
//! `VMDK_SERVE_LIMITS` so the tests take seconds. No operation here touches
//! loop devices or mounts. Time bounds are generous liveness bounds.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinSet;

/// The limits the plugin runs with in these tests.
const LIMITS: &str = "header-timeout=1s,body-timeout=1s,max-connections=128";
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const BODY_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_CONNECTIONS: usize = 128;
/// More half-sent requests than a 1024 open-file limit can hold.
const ATTACKERS: usize = 1100;
/// Slack on top of a limit for a reply to arrive on a loaded machine.
const SLACK: Duration = Duration::from_secs(10);

/// How long a well-formed request may wait behind `ATTACKERS` stalled
/// ones: they are served `MAX_CONNECTIONS` at a time, each batch cut off
/// after the header timeout.
fn behind_attackers() -> Duration {
    HEADER_TIMEOUT * ATTACKERS.div_ceil(MAX_CONNECTIONS) as u32 + SLACK
}

/// Reads one response: status code and body (by Content-Length).
async fn read_response<R: AsyncRead + Unpin>(s: &mut R) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed before a response; got {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, String::from_utf8_lossy(&buf[head_end..]).to_string()))
}

/// Whether the server closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    let mut sink = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Docker's request head (moby pkg/plugins/client.go) for `endpoint`.
fn docker_head(endpoint: &str, body_len: usize) -> String {
    format!(
        "POST /{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\n\
         Content-Length: {body_len}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n"
    )
}

/// One Docker call on a fresh connection.
async fn call(sock: &PathBuf, endpoint: &str, body: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(format!("{}{body}", docker_head(endpoint, body.len())).as_bytes())
        .await
        .unwrap();
    let (status, body) = read_response(&mut s).await.unwrap();
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{endpoint}: not JSON ({e}): {body:?}"));
    (status, json)
}

/// The plugin binary, killed on drop.
struct Plugin {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Plugin {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    fn volume_files(&self) -> Vec<String> {
        let group = self.dir.path().join("ds/dockvols/_DEFAULT");
        let mut names: Vec<String> = std::fs::read_dir(&group)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn assert_no_volumes(&self) {
        let (status, list) = call(&self.sock, "VolumeDriver.List", "{}\n").await;
        assert_eq!((status, &list), (200, &json!({"Volumes": [], "Err": ""})));
        assert!(self.volume_files().is_empty(), "{:?}", self.volume_files());
    }
}

/// Starts the plugin with its embedded agent and the open-file limit of a
/// default host (1024, hard and soft); waits until it answers.
async fn start_plugin() -> Plugin {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let sock = d("plugins/vmdk.sock");
    let log = std::fs::File::create(d("plugin.log")).unwrap();
    let child = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 1024 && exec \"$@\"",
            "sh",
            env!("CARGO_BIN_EXE_vmdk-plugin"),
            "serve",
            "--admin-listen",
            "off",
        ])
        .arg("--socket")
        .arg(&sock)
        .arg("--datastore")
        .arg(format!("local={}", d("ds").display()))
        .args(["--vm-id", "vm-limits", "--reconcile-interval", "0", "--mount-root"])
        .arg(d("mnt"))
        .arg("--state-dir")
        .arg(d("state"))
        .arg("--docker-socket")
        .arg(d("no-docker.sock"))
        .env("VMDK_SERVE_LIMITS", LIMITS)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut plugin = Plugin { child, dir, sock };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = tokio::time::timeout(SLACK, async {
            let mut s = UnixStream::connect(&plugin.sock).await?;
            s.write_all(docker_head("Plugin.Activate", 0).as_bytes()).await?;
            read_response(&mut s).await
        })
        .await;
        if let Ok(Ok((200, _))) = probe {
            return plugin;
        }
        if let Ok(Some(status)) = plugin.child.try_wait() {
            panic!("vmdk-plugin exited with {status}: {}", plugin.log());
        }
        assert!(
            Instant::now() < deadline,
            "vmdk-plugin did not answer: {}",
            plugin.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_plugin_socket_does_not_block_docker() {
    let (_, nofile) = vmdk_common::server::raise_fd_limit().unwrap();
    assert!(
        nofile >= 4 * ATTACKERS as u64,
        "this test opens {ATTACKERS} connections at once; raise the hard open-file limit (ulimit -Hn)"
    );
    let plugin = start_plugin().await;
    let mut set = JoinSet::new();
    for _ in 0..ATTACKERS {
        let sock = plugin.sock.clone();
        set.spawn(async move {
            let mut s = UnixStream::connect(&sock).await?;
            s.write_all(b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: plugin.moby.localhost\r\nContent-Le")
                .await?;
            Ok::<_, std::io::Error>(s)
        });
    }
    let mut stalled = Vec::new();
    while let Some(r) = set.join_next().await {
        stalled.push(r.unwrap().unwrap_or_else(|e| panic!("open a stalled connection: {e}")));
    }

    let started = Instant::now();
    let answer = tokio::time::timeout(behind_attackers(), call(&plugin.sock, "VolumeDriver.Capabilities", "")).await;
    let Ok((status, caps)) = answer else {
        panic!(
            "Capabilities not answered within {:?} behind {ATTACKERS} stalled requests; plugin log:\n{}",
            behind_attackers(),
            plugin.log()
        );
    };
    assert_eq!((status, &caps), (200, &json!({"Capabilities": {"Scope": "global"}})));
    eprintln!(
        "answered after {:?} behind {ATTACKERS} stalled requests",
        started.elapsed()
    );

    let mut set = JoinSet::new();
    for mut s in stalled.drain(..) {
        set.spawn(async move { closed_within(&mut s, behind_attackers()).await });
    }
    let mut still_open = 0;
    while let Some(closed) = set.join_next().await {
        still_open += usize::from(!closed.unwrap());
    }
    assert_eq!(still_open, 0, "stalled connections the plugin did not cut off");

    let answer = tokio::time::timeout(SLACK, call(&plugin.sock, "VolumeDriver.Capabilities", "")).await;
    assert_eq!(answer.expect("Capabilities after the attack").0, 200);
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_creates_nothing() {
    let plugin = start_plugin().await;
    let body = "{\"Name\":\"stalled\",\"Opts\":{\"size\":\"10mb\"}}\n";
    let mut s = UnixStream::connect(&plugin.sock).await.unwrap();
    s.write_all(docker_head("VolumeDriver.Create", body.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(&body.as_bytes()[..10]).await.unwrap();
    let (status, reply) = tokio::time::timeout(BODY_TIMEOUT + SLACK, read_response(&mut s))
        .await
        .expect("no reply to a stalled body")
        .unwrap();
    assert_eq!(status, 408, "{reply}");
    let err: Value = serde_json::from_str(&reply).unwrap();
    assert!(
        err["Err"].as_str().unwrap().contains("did not arrive within 1s"),
        "{err}"
    );
    assert!(closed_within(&mut s, SLACK).await, "connection left open after 408");
    let _ = s.write_all(&body.as_bytes()[10..]).await;
    plugin.assert_no_volumes().await;
}

#[tokio::test]
async fn an_oversized_body_gets_413_and_creates_nothing() {
    let plugin = start_plugin().await;
    // A valid Create padded past the 64 KiB limit.
    let body = format!(
        "{{\"Name\":\"big\",\"Opts\":{{\"size\":\"10mb\"}}}}{}\n",
        " ".repeat(100_000)
    );
    let (status, err) = call(&plugin.sock, "VolumeDriver.Create", &body).await;
    assert_eq!(status, 413, "{err}");
    assert!(
        err["Err"].as_str().unwrap().contains("larger than 65536 bytes"),
        "{err}"
    );
    plugin.assert_no_volumes().await;
}
