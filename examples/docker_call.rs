//! Sends one request to a Docker volume plugin's socket with the bytes
//! dockerd sends, and prints the answer; a test helper for
//! `tests/vsphere_plugin_guest.rs`, which runs it inside a QEMU guest in
//! place of Docker.
//!
//! ```text
//! docker_call SOCKET ENDPOINT [BODY]
//! docker_call /run/vmdk.sock VolumeDriver.Mount '{"Name":"web","ID":"6b1f..."}'
//! ```
//!
//! The request is Docker Engine's (Go's `net/http` client through its
//! plugin client): `POST /<ENDPOINT> HTTP/1.1` with `Host:
//! plugin.moby.localhost`, `User-Agent: Go-http-client/1.1`,
//! `Content-Length`, `Accept: application/vnd.docker.plugins.v1.2+json`,
//! `Accept-Encoding: gzip`, and the body as Go's `json.Encoder` writes it,
//! with a trailing newline (see `tests/plugin_protocol.rs`). The
//! connection stays open (keep-alive), as Docker's does.
//!
//! Prints the status line on the first line of stdout and the body on the
//! second, and exits 0 when the status is 200, 1 otherwise, 2 when the
//! socket cannot be used or the answer is not HTTP/1.1 with a
//! `Content-Length`. Waits at most 300 s for the answer (a liveness bound:
//! a Mount attaches, formats and mounts a disk).
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The longest answer read (the plugin's answers are a few hundred bytes).
const MAX_BODY: usize = 1 << 20;

fn fail(what: &str) -> ! {
    eprintln!("docker_call: {what}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(socket), Some(endpoint)) = (args.first(), args.get(1)) else {
        fail("usage: docker_call SOCKET ENDPOINT [BODY]");
    };
    let body = match args.get(2) {
        Some(b) => format!("{b}\n"),
        None => String::new(),
    };
    let request = format!(
        "POST /{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\n\
         Content-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
        body.len()
    );
    let mut stream = UnixStream::connect(socket).unwrap_or_else(|e| fail(&format!("connecting to {socket}: {e}")));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| fail(&format!("sending to {socket}: {e}")));
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader
        .read_line(&mut status)
        .unwrap_or_else(|e| fail(&format!("reading the answer to {endpoint}: {e}")));
    let status = status.trim_end().to_owned();
    let code = match status.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)) {
        Some(c) => c.to_owned(),
        None => fail(&format!("{endpoint}: not an HTTP/1.1 status line: {status:?}")),
    };
    let mut length = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => fail(&format!("{endpoint}: the connection closed in the headers")),
            Ok(_) => {}
            Err(e) => fail(&format!("reading the headers of {endpoint}: {e}")),
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let Some(length) = length.filter(|l| *l <= MAX_BODY) else {
        fail(&format!(
            "{endpoint}: no Content-Length (or over {MAX_BODY} bytes) in the answer"
        ));
    };
    let mut answer = vec![0u8; length];
    reader
        .read_exact(&mut answer)
        .unwrap_or_else(|e| fail(&format!("reading the body of {endpoint}: {e}")));
    println!("{status}\n{}", String::from_utf8_lossy(&answer).trim_end());
    std::process::exit(if code == "200" { 0 } else { 1 });
}
