//! Serving an API: bounded HTTP/1.1 servers on a unix socket (root-only)
//! and optionally on loopback TCP.
//!
//! [`serve_bounded`] is the one server loop of both daemons: the agent's
//! unix and TCP listeners (`vmdk_agent::server::serve`) and the plugin
//! socket of `vmdk-plugin`. Every client is untrusted, so every resource a client
//! can hold is bounded by [`ServeLimits`]:
//!
//! * a request line and headers must arrive within
//!   [`ServeLimits::header_timeout`], counted from accept and, on a
//!   keep-alive connection, from the end of the previous response (so it is
//!   also the idle timeout);
//! * a request body must arrive within [`ServeLimits::body_timeout`] and
//!   hold at most [`ServeLimits::max_body_bytes`]; it is read whole before
//!   the handler runs, and a late or oversized one is answered 408 or 413
//!   in the API's own error shape, the connection then closed;
//! * a response write that makes no progress for
//!   [`ServeLimits::send_timeout`] (a client that does not read) ends the
//!   connection;
//! * at most [`ServeLimits::max_connections`] connections are open; the
//!   next one is accepted only when one closes, so excess clients wait in
//!   the kernel's listen backlog (and are served once slow clients time
//!   out) instead of being refused;
//! * at most [`ServeLimits::max_requests`] requests run their handler at
//!   once; others wait for a slot.
//!
//! Handlers themselves have no deadline: creating a large eagerzeroedthick
//! disk can take minutes and Docker waits for it.
//!
//! TCP is served only on loopback addresses (the agent's configuration
//! refuses others), and error responses sent over TCP
//! pass through [`redacting`], which replaces host paths by datastore names
//! ([`redact_host_paths`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;
use vmdk_protocol::{ErrorBody, ErrorCode};

/// Binds a unix socket at `path` with mode 0600, replacing a stale socket
/// file left by a previous run (but refusing to steal a live one).
pub async fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// What one listener lets its clients hold. See the module documentation
/// for how each limit is enforced; `Default` gives the production values,
/// chosen for Docker and the plugin, which send each request whole at once.
///
/// As text (flag `--limits`, env `VMDK_SERVE_LIMITS`) it is a comma-separated
/// list of `key=value` overriding the defaults, e.g.
/// `header-timeout=10s,body-timeout=10s,send-timeout=30s,max-connections=256,max-requests=64,max-body-bytes=65536`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time to receive a request line and headers, from accept or from the
    /// end of the previous response on a keep-alive connection (hyper's
    /// header read timeout also runs while a kept-alive connection idles,
    /// so it doubles as the idle timeout). Default 10 s.
    pub header_timeout: Duration,
    /// Time to receive a request body once its headers are in. Default 10 s.
    pub body_timeout: Duration,
    /// Time a response write may make no progress (the client does not
    /// read) before the connection is closed. Default 30 s.
    pub send_timeout: Duration,
    /// Open connections at most; further clients wait in the listen
    /// backlog. Default 256, and never more than half the open-file limit
    /// shared among the listeners ([`ServeLimits::fit_fd_limit`]).
    pub max_connections: usize,
    /// Requests whose handler runs at once, at most; others wait. Default 64.
    pub max_requests: usize,
    /// Largest request body in bytes. Default 64 KiB (the API's bodies are
    /// small JSON documents).
    pub max_body_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_requests: 64,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Largest count [`ServeLimits`] accepts for connections and requests.
pub const MAX_LIMIT_COUNT: usize = 1_000_000;
/// Longest timeout [`ServeLimits`] accepts (one day).
pub const MAX_LIMIT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The keys of [`ServeLimits`] as text, for error messages.
const LIMIT_KEYS: &str =
    "header-timeout, body-timeout, send-timeout (durations such as 10s), max-connections, max-requests, max-body-bytes (positive integers)";

/// A `--limits` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid limit {item:?}: {reason}; valid keys are {LIMIT_KEYS}, e.g. header-timeout=10s,max-connections=256")]
pub struct LimitsError {
    /// The offending `key=value` item.
    pub item: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for ServeLimits {
    type Err = LimitsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut limits = Self::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = |reason: String| LimitsError {
                item: item.to_owned(),
                reason,
            };
            let (key, value) = item.split_once('=').ok_or_else(|| bad("expected key=value".into()))?;
            let (key, value) = (key.trim(), value.trim());
            let duration = || -> Result<Duration, LimitsError> {
                let d = humantime::parse_duration(value).map_err(|e| bad(format!("not a duration: {e}")))?;
                if d.is_zero() || d > MAX_LIMIT_TIMEOUT {
                    return Err(bad("a timeout must be more than 0 and at most 1 day".into()));
                }
                Ok(d)
            };
            let count = |max: usize| -> Result<usize, LimitsError> {
                match value.parse::<usize>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(n),
                    _ => Err(bad(format!("expected an integer from 1 to {max}"))),
                }
            };
            match key {
                "header-timeout" => limits.header_timeout = duration()?,
                "body-timeout" => limits.body_timeout = duration()?,
                "send-timeout" => limits.send_timeout = duration()?,
                "max-connections" => limits.max_connections = count(MAX_LIMIT_COUNT)?,
                "max-requests" => limits.max_requests = count(MAX_LIMIT_COUNT)?,
                "max-body-bytes" => limits.max_body_bytes = count(1 << 30)?,
                _ => return Err(bad(format!("unknown key {key:?}"))),
            }
        }
        Ok(limits)
    }
}

impl std::fmt::Display for ServeLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "header-timeout={},body-timeout={},send-timeout={},max-connections={},max-requests={},max-body-bytes={}",
            humantime::format_duration(self.header_timeout),
            humantime::format_duration(self.body_timeout),
            humantime::format_duration(self.send_timeout),
            self.max_connections,
            self.max_requests,
            self.max_body_bytes
        )
    }
}

impl ServeLimits {
    /// These limits with `max_connections` lowered, if needed, so that
    /// `listeners` listeners together hold at most half of `nofile` open
    /// files (the other half is left for datastore files, devices and
    /// child processes). Logs when it lowers the limit.
    pub fn fit_fd_limit(self, nofile: u64, listeners: usize) -> Self {
        let share = nofile / 2 / (listeners.max(1) as u64);
        let budget = usize::try_from(share).unwrap_or(usize::MAX).max(1);
        if self.max_connections <= budget {
            return self;
        }
        tracing::warn!(
            configured = self.max_connections,
            allowed = budget,
            open_file_limit = nofile,
            "lowering max-connections to fit the open-file limit"
        );
        Self {
            max_connections: budget,
            ..self
        }
    }
}

/// The soft limit on open files (`RLIMIT_NOFILE`) of this process.
pub fn fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the rlimit we own and pass by
    // a valid, exclusive pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Raises the soft limit on open files to the hard limit (capped at 2^20
/// when the hard limit is unlimited), so a daemon is not stopped by the
/// traditional soft limit of 1024. Returns the soft limit before and after.
/// Call at daemon start, before serving.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as in `fd_limit`, getrlimit writes only into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        1 << 20
    } else {
        lim.rlim_max
    };
    if before >= target {
        return Ok((before, before));
    }
    let new = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit only reads the rlimit we pass by a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, target))
}

// ---------------------------------------------------------------------------
// The server loop
// ---------------------------------------------------------------------------

/// A bound listener [`serve_bounded`] can serve.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket (see [`bind_unix`]).
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Self::Unix(l)
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Self::Tcp(l)
    }
}

/// An accepted connection.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            Self::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

/// Builds an error response in an API's own shape, for the errors the
/// server answers itself (408 body too slow, 413 body too large, 400 body
/// unreadable): the status and a message saying what was wrong.
pub type ErrorReply = fn(StatusCode, String) -> Response;

/// [`ErrorReply`] in the agent API's shape:
/// `{"code": "invalid_request", "message": ...}` with the given status.
pub fn agent_error_reply(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorBody::new(ErrorCode::InvalidRequest, message))).into_response()
}

/// Shortest pause after a failed accept (out of file descriptors, memory).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after repeated failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Largest request head (line and headers) hyper buffers, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves `router` on `listener` within `limits` until `shutdown`
/// resolves; then stops accepting, lets in-flight requests finish (idle
/// connections are closed at once) and returns when every connection is
/// closed. `reply` shapes the errors the server answers itself.
///
/// Accept errors that concern one connection are skipped; others (out of
/// file descriptors or memory) are logged and retried after a pause that
/// grows from 10 ms to 1 s, so the loop neither spins nor stops.
pub async fn serve_bounded(
    listener: Listener,
    router: Router,
    limits: ServeLimits,
    reply: ErrorReply,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let max_connections = limits.max_connections.clamp(1, MAX_LIMIT_COUNT);
    let connections = Arc::new(Semaphore::new(max_connections));
    let handler = Arc::new(Handler {
        router,
        limits,
        reply,
        in_flight: Arc::new(Semaphore::new(limits.max_requests.clamp(1, MAX_LIMIT_COUNT))),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // Wait for a free slot before accepting: excess clients stay in the
        // kernel's backlog until a connection closes.
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(stream) => {
                backoff = ACCEPT_BACKOFF_MIN;
                match stream {
                    Stream::Unix(s) => spawn_connection(s, permit, handler.clone(), stop_rx.clone()),
                    Stream::Tcp(s) => spawn_connection(s, permit, handler.clone(), stop_rx.clone()),
                }
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it closes.
    let _all = connections.acquire_many(max_connections as u32).await;
    Ok(())
}

/// Accept errors that concern only the connection being accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

fn spawn_connection<S>(io: S, permit: OwnedSemaphorePermit, handler: Arc<Handler>, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let limits = handler.limits;
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(req).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        let conn = builder.serve_connection(TokioIo::new(SendTimeout::new(io, limits.send_timeout)), service);
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended");
        }
    });
}

/// Reads each request's body within the limits, then runs the router.
struct Handler {
    router: Router,
    limits: ServeLimits,
    reply: ErrorReply,
    in_flight: Arc<Semaphore>,
}

impl Handler {
    async fn handle(&self, req: Request<Incoming>) -> Response {
        let (parts, body) = req.into_parts();
        let max = self.limits.max_body_bytes;
        if content_length(&parts.headers).is_some_and(|n| n > max as u64) {
            return self.refuse(StatusCode::PAYLOAD_TOO_LARGE, too_large(max));
        }
        let read = tokio::time::timeout(self.limits.body_timeout, Limited::new(body, max).collect()).await;
        let bytes = match read {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return self.refuse(StatusCode::PAYLOAD_TOO_LARGE, too_large(max));
            }
            Ok(Err(e)) => {
                return self.refuse(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"));
            }
            Err(_) => {
                let message = format!(
                    "the request body did not arrive within {}; send the whole request at once",
                    humantime::format_duration(self.limits.body_timeout)
                );
                return self.refuse(StatusCode::REQUEST_TIMEOUT, message);
            }
        };
        let Ok(_slot) = self.in_flight.acquire().await else {
            return self.refuse(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down".into());
        };
        let req = Request::from_parts(parts, Body::from(bytes));
        match self.router.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    /// An error answered by the server itself; the connection is closed
    /// after it, since the rest of the body was not read.
    fn refuse(&self, status: StatusCode, message: String) -> Response {
        tracing::info!(%status, %message, "request refused by the server");
        let mut resp = (self.reply)(status, message);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }
}

fn too_large(max: usize) -> String {
    format!("the request body is larger than {max} bytes, the most this server accepts")
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// A stream whose writes fail with `TimedOut` once they have made no
/// progress for `limit` (a client that stopped reading its response).
struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when a write is pending: fails once it has been pending for
    /// the whole limit.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read its response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, p: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match p {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(p, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(p, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(p, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(p, cx)
    }
}

// ---------------------------------------------------------------------------
// Host paths in errors sent over TCP
// ---------------------------------------------------------------------------

/// Characters that continue a path component or a word: a `/` right after
/// one of them is inside a relative path or a word (`read/write`), not the
/// start of an absolute path.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '~' | '+' | '@' | '%' | '#' | '$')
}

/// Characters that end an absolute path token in a message.
fn ends_path(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '"' | '\'' | '`' | ',' | ';' | ':' | '(' | ')' | '[' | ']' | '{' | '}' | '<' | '>' | '|'
        )
}

/// A message with its host paths hidden, for callers on the network.
///
/// Each datastore root in `roots` (`(directory, datastore name)`; give
/// both the configured and the canonical directory) becomes
/// `[<datastore name>]`, with the `/` after it turned into a space, which
/// is ESXi's way of naming datastore files
/// (`/srv/ds1/dockvols/_DEFAULT/v.vmdk` becomes
/// `[ds1] dockvols/_DEFAULT/v.vmdk`). Every other absolute path (a `/`
/// at the start of the message or after a space, quote, `=`, `:` or
/// bracket, up to the next such character) becomes `<path>`. Roots that
/// are not absolute, or are `/` itself, are skipped (their canonical form
/// covers them). A pure function of its input that never panics; its
/// result contains none of the roots.
pub fn redact_host_paths(message: &str, roots: &[(PathBuf, String)]) -> String {
    let mut roots: Vec<(String, &str)> = roots
        .iter()
        .filter_map(|(dir, name)| {
            let dir = dir.to_string_lossy();
            let dir = dir.trim_end_matches('/');
            (dir.starts_with('/') && !dir.contains('\0')).then(|| (dir.to_owned(), name.as_str()))
        })
        .collect();
    // Longest first, so a root inside another root's tree is named by the
    // innermost datastore.
    roots.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    let mut out = message.to_owned();
    for (root, name) in &roots {
        out = name_root(&out, root, name);
    }
    out = hide_absolute_paths(&out);
    // A root can still sit inside a word (`x/srv/ds1`); hide it too. Each
    // pass removes at least one `/` (a root starts with one and neither a
    // name nor `<path>` holds one), so this ends.
    while let Some((root, _)) = roots.iter().find(|(root, _)| out.contains(root.as_str())) {
        out = out.replace(root.as_str(), "<path>");
    }
    out
}

/// Replaces `root` where it is a whole path prefix by `[name]`, eating the
/// slashes after it (`root/x` becomes `[name] x`). A name holding `/` is
/// not used (valid names never do), so no root can be re-created.
fn name_root(s: &str, root: &str, name: &str) -> String {
    let label = if name.contains('/') {
        "<path>".to_owned()
    } else {
        format!("[{name}]")
    };
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(root) {
        let after = &rest[i + root.len()..];
        match after.chars().next() {
            // `/srv/ds10` is not inside `/srv/ds1`.
            Some(c) if is_word_char(c) => {
                let step = i + root.len();
                out.push_str(&rest[..step]);
                rest = after;
                continue;
            }
            Some('/') => {
                out.push_str(&rest[..i]);
                out.push_str(&label);
                let trimmed = after.trim_start_matches('/');
                if !trimmed.is_empty() && !trimmed.starts_with(ends_path) {
                    out.push(' ');
                }
                rest = trimmed;
            }
            _ => {
                out.push_str(&rest[..i]);
                out.push_str(&label);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Replaces each absolute path token by `<path>`.
fn hide_absolute_paths(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev: Option<char> = None;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let starts_path = c == '/' && !prev.is_some_and(is_word_char);
        if !starts_path {
            out.push(c);
            prev = Some(c);
            continue;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, d)) = chars.peek() {
            if ends_path(d) {
                break;
            }
            end = j + d.len_utf8();
            chars.next();
        }
        if &s[i..end] == "/" {
            // A lone slash names nothing.
            out.push('/');
        } else {
            out.push_str("<path>");
        }
        prev = Some('>');
    }
    out
}

/// Largest error body [`redacting`] rewrites; a larger one is replaced.
const MAX_ERROR_BODY: usize = 1 << 20;

/// `router` with every error response (status 4xx or 5xx) passed through
/// [`redact_host_paths`]: each string in a JSON body (the agent's
/// `{"code", "message"}`), or the whole text of any other body. For the
/// listeners whose callers must not learn host paths (TCP).
pub fn redacting(router: Router, roots: Vec<(PathBuf, String)>) -> Router {
    router.layer(axum::middleware::map_response_with_state(Arc::new(roots), redact_error))
}

async fn redact_error(State(roots): State<Arc<Vec<(PathBuf, String)>>>, resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(mut json) => {
                redact_json(&mut json, &roots);
                Bytes::from(json.to_string())
            }
            Err(_) => Bytes::from(redact_host_paths(&String::from_utf8_lossy(&bytes), &roots)),
        },
        Err(_) => {
            parts.headers.remove(header::CONTENT_TYPE);
            Bytes::from_static(b"error details withheld")
        }
    };
    Response::from_parts(parts, Body::from(body))
}

fn redact_json(v: &mut serde_json::Value, roots: &[(PathBuf, String)]) {
    match v {
        serde_json::Value::String(s) => *s = redact_host_paths(s, roots),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| redact_json(i, roots)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|i| redact_json(i, roots)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roots() -> Vec<(PathBuf, String)> {
        vec![
            (PathBuf::from("/srv/ds1"), "ds1".into()),
            (PathBuf::from("/var/lib/vmdk/datastores/local/"), "local".into()),
        ]
    }

    #[test]
    fn datastore_files_are_named_the_esxi_way() {
        let r = roots();
        assert_eq!(
            redact_host_paths("cannot read /srv/ds1/dockvols/_DEFAULT/v.vmfd: bad JSON", &r),
            "cannot read [ds1] dockvols/_DEFAULT/v.vmfd: bad JSON"
        );
        assert_eq!(
            redact_host_paths(
                "sidecar \"/var/lib/vmdk/datastores/local/dockvols/_DEFAULT/v.vmfd\" is damaged",
                &r
            ),
            "sidecar \"[local] dockvols/_DEFAULT/v.vmfd\" is damaged"
        );
        assert_eq!(
            redact_host_paths("datastore /srv/ds1 is full", &r),
            "datastore [ds1] is full"
        );
    }

    #[test]
    fn other_absolute_paths_are_hidden_and_words_kept() {
        let r = roots();
        assert_eq!(
            redact_host_paths("open /etc/passwd failed (file=/root/x): denied", &r),
            "open <path> failed (file=<path>): denied"
        );
        // A longer sibling of a root is not that datastore.
        assert_eq!(redact_host_paths("see /srv/ds10/a", &r), "see <path>");
        assert_eq!(
            redact_host_paths("access must be read-write/read-only; a / b", &r),
            "access must be read-write/read-only; a / b"
        );
        assert_eq!(redact_host_paths("unix:///run/vmdk/agent.sock", &r), "unix:<path>");
        // A root inside a word is still hidden.
        assert_eq!(redact_host_paths("x/srv/ds1", &r), "x[ds1]");
        assert_eq!(redact_host_paths("x/srv/ds10", &r), "x<path>0");
    }

    #[test]
    fn limits_parse_with_clear_errors() {
        let l: ServeLimits = "header-timeout=1s, max-connections=32,max-body-bytes=100"
            .parse()
            .unwrap();
        assert_eq!(l.header_timeout, Duration::from_secs(1));
        assert_eq!(l.max_connections, 32);
        assert_eq!(l.max_body_bytes, 100);
        assert_eq!(l.body_timeout, ServeLimits::default().body_timeout);
        assert_eq!(l.to_string().parse::<ServeLimits>().unwrap(), l);
        for bad in [
            "max-connections=0",
            "header-timeout=0s",
            "speed=3",
            "max-requests",
            "body-timeout=soon",
        ] {
            let e = bad.parse::<ServeLimits>().unwrap_err().to_string();
            assert!(e.contains("valid keys are header-timeout"), "{bad}: {e}");
        }
        assert_eq!("".parse::<ServeLimits>().unwrap(), ServeLimits::default());
    }

    #[test]
    fn connections_fit_half_the_open_file_limit() {
        let l = ServeLimits::default();
        assert_eq!(l.fit_fd_limit(1024, 1).max_connections, 256);
        assert_eq!(l.fit_fd_limit(1024, 4).max_connections, 128);
        assert_eq!(l.fit_fd_limit(0, 2).max_connections, 1);
        assert_eq!(l.fit_fd_limit(1 << 20, 2).max_connections, 256);
    }

    /// Slack on top of a limit for a reply to arrive on a loaded machine.
    const SLACK: Duration = Duration::from_secs(10);

    /// Serves `router` on a unix socket in a temp dir; returns the socket,
    /// the dir, the shutdown trigger and the server task.
    async fn start(
        router: Router,
        limits: ServeLimits,
    ) -> (
        PathBuf,
        tempfile::TempDir,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = bind_unix(&sock, 0o600).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_bounded(
            listener.into(),
            router,
            limits,
            agent_error_reply,
            async move {
                let _ = rx.await;
            },
        ));
        (sock, dir, tx, server)
    }

    /// Reads until the peer closes; returns what arrived.
    async fn read_all(s: &mut UnixStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get(sock: &Path, path: &str) -> String {
        use tokio::io::AsyncWriteExt;
        let mut s = UnixStream::connect(sock).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_all(&mut s).await
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_lets_in_flight_requests_finish() {
        use axum::routing::get as route_get;
        use tokio::io::AsyncWriteExt;
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (e, r) = (entered.clone(), release.clone());
        let router = Router::new().route(
            "/slow",
            route_get(move || async move {
                e.notify_one();
                r.notified().await;
                "done"
            }),
        );
        let (sock, _dir, stop, server) = start(router, ServeLimits::default()).await;
        let mut busy = UnixStream::connect(&sock).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        entered.notified().await;
        let mut idle = UnixStream::connect(&sock).await.unwrap();
        stop.send(()).unwrap();

        // New clients are refused once the listener is closed.
        let deadline = std::time::Instant::now() + SLACK;
        while UnixStream::connect(&sock).await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "still accepting after shutdown");
            tokio::task::yield_now().await;
        }
        // A connection with no request is closed at once, long before
        // the 10 s header timeout.
        let closed = tokio::time::timeout(Duration::from_secs(5), read_all(&mut idle)).await;
        assert_eq!(closed.as_deref(), Ok(""), "idle connection kept open by shutdown");
        assert!(!server.is_finished(), "returned while a request was in flight");
        release.notify_one();
        let reply = tokio::time::timeout(SLACK, read_all(&mut busy)).await.unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("done"),
            "{reply:?}"
        );
        tokio::time::timeout(SLACK, server).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_its_response_loses_its_connection() {
        use axum::routing::get as route_get;
        use tokio::io::AsyncWriteExt;
        let router = Router::new()
            .route("/big", route_get(|| async { vec![b'x'; 32 << 20] }))
            .route("/small", route_get(|| async { "ok" }));
        let limits = ServeLimits {
            send_timeout: Duration::from_secs(1),
            max_connections: 1,
            ..ServeLimits::default()
        };
        let (sock, _dir, _stop, _server) = start(router, limits).await;
        // Takes the only connection slot and never reads.
        let mut hog = UnixStream::connect(&sock).await.unwrap();
        hog.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let reply = tokio::time::timeout(limits.send_timeout + SLACK, get(&sock, "/small"))
            .await
            .expect("a client that does not read holds the only connection slot");
        assert!(reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok"), "{reply:?}");
    }

    #[tokio::test]
    async fn errors_through_the_redacting_layer_name_datastores_not_paths() {
        use axum::routing::get as route_get;
        let router = Router::new()
            .route(
                "/json",
                route_get(|| async {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        Json(ErrorBody::new(
                            ErrorCode::Io,
                            "cannot open /srv/ds1/dockvols/_DEFAULT/v.vmfd: it links to /etc/shadow",
                        )),
                    )
                }),
            )
            .route(
                "/ok",
                route_get(|| async { Json(serde_json::json!({"device": "/dev/loop3"})) }),
            )
            .fallback(|| async { (StatusCode::NOT_FOUND, "no route under /srv/ds1/x") });
        let app = redacting(router, roots());
        let call = |path: &'static str| {
            let app = app.clone();
            async move {
                let resp = app
                    .oneshot(Request::get(path).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let status = resp.status();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let (status, body) = call("/json").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let err: ErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(err.code, ErrorCode::Io);
        assert_eq!(
            err.message,
            "cannot open [ds1] dockvols/_DEFAULT/v.vmfd: it links to <path>"
        );
        assert_eq!(call("/nowhere").await.1, "no route under [ds1] x");
        // Successful replies are the API's data and pass unchanged.
        assert_eq!(call("/ok").await.1, r#"{"device":"/dev/loop3"}"#);
    }

    fn message() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/srv/ds1".to_owned()),
            Just("/srv/ds1/".to_owned()),
            Just("/srv/ds10".to_owned()),
            Just("/var/lib/vmdk/datastores/local".to_owned()),
            Just("/".to_owned()),
            Just("dockvols/_DEFAULT/v.vmdk".to_owned()),
            "[ \"':=,()/a-z0-9._-]{0,6}",
            any::<String>(),
        ];
        proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat())
    }

    fn any_roots() -> impl Strategy<Value = Vec<(PathBuf, String)>> {
        let root = prop_oneof![
            Just("/srv/ds1".to_owned()),
            Just("/var/lib/vmdk/datastores/local/".to_owned()),
            "/[a-z/]{0,8}",
            any::<String>(),
        ];
        let name = "[^/@\"\\\\\u{0}-\u{1f}]{0,8}";
        proptest::collection::vec((root.prop_map(PathBuf::from), name), 0..4)
    }

    proptest! {
        #[test]
        fn redaction_never_panics_and_leaves_no_root_or_absolute_path(msg in message(), roots in any_roots()) {
            let out = redact_host_paths(&msg, &roots);
            for (root, _) in &roots {
                let root = root.to_string_lossy();
                let root = root.trim_end_matches('/');
                if root.starts_with('/') && !root.contains('\0') {
                    prop_assert!(!out.contains(root), "{out:?} contains {root:?}");
                }
            }
            // Every remaining `/` is inside a word or stands alone.
            let chars: Vec<char> = out.chars().collect();
            for (i, c) in chars.iter().enumerate() {
                if *c == '/' {
                    let after_word = i > 0 && is_word_char(chars[i - 1]);
                    let lone = chars.get(i + 1).is_none_or(|n| ends_path(*n));
                    prop_assert!(after_word || lone, "absolute path left in {out:?}");
                }
            }
            if !msg.contains('/') {
                prop_assert_eq!(out, msg);
            }
        }
    }
}
