//! A keep-alive HTTP/1.1 client over a unix socket, sending requests the
//! way dockerd sends them to a volume plugin (the bytes of
//! `examples/docker_call.rs`), and plain requests for the Docker and agent
//! APIs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One keep-alive connection.
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<UnixStream>,
    what: String,
}

impl Conn {
    /// Connects to `socket`.
    pub fn open(socket: &Path) -> anyhow::Result<Conn> {
        let s = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(600)))?;
        Ok(Conn {
            reader: BufReader::new(s),
            what: socket.display().to_string(),
        })
    }

    /// Sends a volume plugin request as dockerd does (`POST /<endpoint>`,
    /// Go's headers, the JSON body with a trailing newline) and returns the
    /// status and body.
    pub fn plugin(&mut self, endpoint: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let body = format!("{body}\n");
        let req = format!(
            "POST /{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\n\
             Content-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
            body.len()
        );
        self.send(&req)
    }

    /// A plugin call that must answer 200 without an `Err`.
    pub fn ok(&mut self, endpoint: &str, body: &str) -> anyhow::Result<String> {
        let (s, b) = self.plugin(endpoint, body)?;
        if s != 200 {
            bail!("{endpoint} {body}: HTTP {s}: {b}");
        }
        Ok(b)
    }

    /// Times one plugin call that must succeed.
    pub fn timed(&mut self, endpoint: &str, body: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.ok(endpoint, body)?;
        Ok(t.elapsed())
    }

    /// A plain request (Docker API, agent API).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let req = match body {
            Some(b) => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ),
            None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n"),
        };
        self.send(&req)
    }

    fn send(&mut self, req: &str) -> anyhow::Result<(u16, String)> {
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .with_context(|| format!("send to {}", self.what))?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: not an HTTP/1.1 status line: {line:?}", self.what))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h)? == 0 {
                bail!("{}: connection closed in the headers", self.what);
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut l = String::new();
                self.reader.read_line(&mut l)?;
                let n = usize::from_str_radix(l.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("bad chunk size {l:?}"))?;
                let mut chunk = vec![0u8; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.reader.read_exact(&mut body)?;
        } else if status != 204 && status != 304 {
            bail!("{}: answer without Content-Length", self.what);
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Waits until `socket` accepts a connection; returns how long that took
/// from `since`.
pub fn wait_socket(socket: &Path, since: Instant, timeout: Duration) -> anyhow::Result<Duration> {
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            bail!("{} not served after {timeout:?}", socket.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
