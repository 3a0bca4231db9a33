//! Is `vmdk-agent serve` running? Ask it: `GET /v1/version` on its socket.
//! And, for `vmdk-agent ls`, its volumes: `GET /v1/volumes`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use vmdk_protocol::{VersionInfo, VolumeInfo, VolumeList, PATH_VERSION, PATH_VOLUMES};

/// What the socket said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceState {
    /// The agent answered.
    Running(VersionInfo),
    /// Nothing listens: no socket file, or a stale one.
    Stopped {
        /// Why we think so.
        reason: String,
    },
    /// Something listens but did not answer like the agent.
    NotResponding {
        /// What went wrong.
        reason: String,
    },
}

impl ServiceState {
    /// `Running`, `Stopped` or `Not responding`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Running(_) => "Running",
            Self::Stopped { .. } => "Stopped",
            Self::NotResponding { .. } => "Not responding",
        }
    }
}

/// Probes the agent socket with `GET /v1/version`.
pub fn probe(socket: &Path, timeout: Duration) -> ServiceState {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return ServiceState::Stopped {
                reason: format!("no socket at {}", socket.display()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return ServiceState::Stopped {
                reason: format!("nothing listens on {} (stale socket file)", socket.display()),
            }
        }
        Err(e) => {
            return ServiceState::NotResponding {
                reason: format!("cannot connect to {}: {e}", socket.display()),
            }
        }
    };
    match request_version(&mut stream, timeout) {
        Ok(v) => ServiceState::Running(v),
        Err(reason) => ServiceState::NotResponding { reason },
    }
}

fn request_version(stream: &mut UnixStream, timeout: Duration) -> Result<VersionInfo, String> {
    get_json(stream, PATH_VERSION, 1 << 20, timeout).map_err(|e| match e.strip_prefix("not JSON: ") {
        Some(why) => format!("GET {PATH_VERSION}: not an agent version: {why}"),
        None => e,
    })
}

/// The largest volume list [`list_volumes`] reads: about 400,000 volumes.
const MAX_LIST_BYTES: u64 = 256 << 20;

/// `GET /v1/volumes` of the agent (or plugin with its agent embedded)
/// answering on `socket`, as the administrator (no `VM-Id`).
pub fn list_volumes(socket: &Path, timeout: Duration) -> Result<Vec<VolumeInfo>, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    get_json::<VolumeList>(&mut stream, PATH_VOLUMES, MAX_LIST_BYTES, timeout).map(|l| l.volumes)
}

/// `GET path` over `stream`, the answer (at most `limit` bytes) decoded as
/// JSON; an error says what went wrong.
fn get_json<T: DeserializeOwned>(
    stream: &mut UnixStream,
    path: &str,
    limit: u64,
    timeout: Duration,
) -> Result<T, String> {
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .map_err(|e| format!("send request: {e}"))?;
    let mut raw = Vec::new();
    stream
        .take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("read answer: {e}"))?;
    if raw.len() as u64 > limit {
        return Err(format!("GET {path}: the answer is larger than {limit} bytes"));
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "answer is not HTTP".to_owned())?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("GET {path} answered {status:?}"));
    }
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked { dechunk(body)? } else { body.to_owned() };
    serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}"))
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("truncated chunk")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.push_str(chunk);
        body = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn serve_once(answer: &'static str) -> (tempfile::TempDir, std::path::PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(answer.as_bytes()).unwrap();
        });
        (dir, path, h)
    }

    #[test]
    fn states() {
        let dir = tempfile::tempdir().unwrap();
        let missing = probe(&dir.path().join("none.sock"), Duration::from_secs(1));
        assert_eq!(missing.label(), "Stopped");

        let body = r#"{"version":"0.1.0","api":"v1","backend":"local","datastores":["a"]}"#;
        let answer: &'static str =
            Box::leak(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_boxed_str());
        let (_d, p, h) = serve_once(answer);
        match probe(&p, Duration::from_secs(5)) {
            ServiceState::Running(v) => assert_eq!(v.datastores, vec!["a"]),
            other => panic!("{other:?}"),
        }
        h.join().unwrap();

        let (_d, p, h) = serve_once("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"ver\r\n3b\r\nsion\":\"0.1.0\",\"api\":\"v1\",\"backend\":\"local\",\"datastores\":[]}\r\n0\r\n\r\n");
        assert_eq!(probe(&p, Duration::from_secs(5)).label(), "Running");
        h.join().unwrap();

        let (_d, p, h) = serve_once("SSH-2.0-nope\r\n");
        assert_eq!(probe(&p, Duration::from_secs(5)).label(), "Not responding");
        h.join().unwrap();
    }
}
