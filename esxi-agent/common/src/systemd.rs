//! The two parts of systemd's service protocol the daemons use, without
//! libsystemd:
//!
//! * **Socket activation** (`sd_listen_fds(3)`): a `.socket` unit owns the
//!   listening socket and hands it to the service as fd 3 onwards, named in
//!   `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`. [`init_from_env`]
//!   takes those fds (checking each is a listening unix stream socket),
//!   marks them close-on-exec and clears the variables, so child processes
//!   (mkfs, mount) neither see nor inherit them. [`listen_unix`] then serves
//!   an inherited socket whose path (or `FileDescriptorName=`) matches, and
//!   binds the path itself otherwise, as when run by hand.
//! * **Readiness** (`sd_notify(3)`): [`notify`] sends `READY=1`,
//!   `STOPPING=1` and the like to `NOTIFY_SOCKET` (a path, or an abstract
//!   name written `@name`), so a `Type=notify` unit is "started" exactly
//!   when the daemon serves.
//!
//! Outside systemd (no variables) all of this does nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The most fds accepted from `LISTEN_FDS`; a larger count is a broken
/// environment, not a real socket unit.
const MAX_LISTEN_FDS: usize = 64;

/// Why the socket-activation environment was not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenEnvError {
    /// `LISTEN_PID` is not a process id.
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a count in 0..=64.
    #[error("LISTEN_FDS={0:?} is not a count of file descriptors (0 to 64)")]
    BadCount(String),
    /// `LISTEN_FDNAMES` names a different number of fds than `LISTEN_FDS`.
    #[error("LISTEN_FDNAMES={names:?} has {got} names, but LISTEN_FDS={count}")]
    NameCount {
        /// The variable's value.
        names: String,
        /// How many names it has.
        got: usize,
        /// `LISTEN_FDS`.
        count: usize,
    },
}

/// One fd announced by the environment: its number and, if given, its
/// `FileDescriptorName=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenFd {
    /// The fd number (3 onwards).
    pub fd: RawFd,
    /// Its name from `LISTEN_FDNAMES` (systemd's default is the socket
    /// unit's name, e.g. `vmdk-plugin.socket`).
    pub name: Option<String>,
}

/// Parses the socket-activation variables. `Ok(empty)` when they are
/// absent or meant for another process (`LISTEN_PID` is not `my_pid`),
/// which is how `sd_listen_fds` treats them too.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Vec<ListenFd>, ListenEnvError> {
    let (Some(pid), Some(count)) = (listen_pid, listen_fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid.trim().parse().map_err(|_| ListenEnvError::BadPid(pid.to_owned()))?;
    if pid != my_pid {
        return Ok(Vec::new());
    }
    let n: usize = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= MAX_LISTEN_FDS)
        .ok_or_else(|| ListenEnvError::BadCount(count.to_owned()))?;
    let names: Vec<Option<String>> = match listen_fdnames {
        None => vec![None; n],
        Some(s) => {
            let names: Vec<&str> = s.split(':').collect();
            if names.len() != n {
                return Err(ListenEnvError::NameCount {
                    names: s.to_owned(),
                    got: names.len(),
                    count: n,
                });
            }
            names
                .into_iter()
                .map(|s| (!s.is_empty()).then(|| s.to_owned()))
                .collect()
        }
    };
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| ListenFd {
            fd: LISTEN_FDS_START + i as RawFd,
            name,
        })
        .collect())
}

/// A listening unix stream socket handed over by systemd.
#[derive(Debug)]
struct Inherited {
    fd: OwnedFd,
    name: Option<String>,
    path: Option<PathBuf>,
}

/// What [`init_from_env`] took from the environment.
#[derive(Debug, Default)]
struct State {
    sockets: Vec<Inherited>,
    notify: Option<String>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What [`init_from_env`] found, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activation {
    /// The inherited sockets, as `path` or `name`.
    pub sockets: Vec<String>,
    /// Whether `NOTIFY_SOCKET` was set.
    pub notify: bool,
    /// Announced fds that were not listening unix stream sockets (closed
    /// and ignored), with the reason.
    pub rejected: Vec<String>,
}

/// Takes the sockets and the notification socket systemd passed, and
/// removes `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES` and
/// `NOTIFY_SOCKET` from the environment.
///
/// Call it first thing in `main`, before any thread starts (the
/// environment is changed, and the fds must be owned before anything else
/// opens files). Calling it again does nothing.
pub fn init_from_env() -> Result<Activation, ListenEnvError> {
    let mut state = lock();
    if state.is_some() {
        return Ok(Activation::default());
    }
    let var = |k: &str| std::env::var(k).ok();
    let parsed = parse_listen_env(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    let notify = var("NOTIFY_SOCKET").filter(|s| !s.is_empty());
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"] {
        std::env::remove_var(k);
    }
    let mut report = Activation {
        notify: notify.is_some(),
        ..Activation::default()
    };
    let mut new = State {
        sockets: Vec::new(),
        notify,
    };
    let fds = match parsed {
        Ok(fds) => fds,
        Err(e) => {
            *state = Some(new);
            return Err(e);
        }
    };
    for ListenFd { fd, name } in fds {
        // Only take an fd that is open; a closed number is not ours to own.
        // SAFETY: F_GETFD only reads the flags of fd number `fd`; an fd that
        // is not open gives EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            report.rejected.push(format!("fd {fd}: not open"));
            continue;
        }
        // SAFETY: systemd passed this open fd to this process (LISTEN_PID
        // matched) and nothing else in the process owns it: this runs once,
        // before any other code opens or closes files.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match check_listening_unix_stream(&owned) {
            Ok(path) => {
                let _ = fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
                report.sockets.push(match (&path, &name) {
                    (Some(p), _) => p.display().to_string(),
                    (None, Some(n)) => n.clone(),
                    (None, None) => format!("fd {fd}"),
                });
                new.sockets.push(Inherited { fd: owned, name, path });
            }
            // Dropping `owned` closes it: a wrong kind of fd is not kept open.
            Err(why) => report.rejected.push(format!("fd {fd}: {why}")),
        }
    }
    *state = Some(new);
    Ok(report)
}

/// Checks `fd` is a listening unix stream socket; returns its path (none
/// for an abstract or unnamed socket).
fn check_listening_unix_stream(fd: &OwnedFd) -> Result<Option<PathBuf>, String> {
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| format!("not a socket ({e})"))?;
    let unix = addr.as_unix_addr().ok_or("not a unix socket")?;
    let ty = getsockopt(fd, sockopt::SockType).map_err(|e| format!("cannot read its type ({e})"))?;
    if ty != SockType::Stream {
        return Err(format!("a {ty:?} socket, not a stream socket"));
    }
    if !getsockopt(fd, sockopt::AcceptConn).map_err(|e| format!("cannot read SO_ACCEPTCONN ({e})"))? {
        return Err("not listening".into());
    }
    Ok(unix.path().map(Path::to_path_buf))
}

/// Whether an inherited socket is the one for `path`: the same path, or a
/// `FileDescriptorName=` equal to the path's file name or its stem (e.g.
/// `vmdk.sock` or `vmdk` for `/run/docker/plugins/vmdk.sock`).
fn matches(s: &Inherited, path: &Path) -> bool {
    if s.path.as_deref() == Some(path) {
        return true;
    }
    if let (Some(a), Ok(b)) = (&s.path, std::fs::canonicalize(path)) {
        if std::fs::canonicalize(a).is_ok_and(|a| a == b) {
            return true;
        }
    }
    let Some(name) = &s.name else { return false };
    let file = path.file_name().and_then(|f| f.to_str());
    let stem = path.file_stem().and_then(|f| f.to_str());
    Some(name.as_str()) == file || Some(name.as_str()) == stem
}

/// Takes the inherited listening socket for `path`, if systemd passed one.
pub fn take_unix_listener(path: &Path) -> Option<std::os::unix::net::UnixListener> {
    let mut state = lock();
    let sockets = &mut state.as_mut()?.sockets;
    let i = sockets.iter().position(|s| matches(s, path))?;
    Some(sockets.swap_remove(i).fd.into())
}

/// Inherited sockets no listener took, as `path` or `name` (to warn about).
pub fn unused_sockets() -> Vec<String> {
    lock()
        .as_ref()
        .map(|s| {
            s.sockets
                .iter()
                .map(|i| match (&i.path, &i.name) {
                    (Some(p), _) => p.display().to_string(),
                    (None, Some(n)) => n.clone(),
                    (None, None) => format!("fd {}", i.fd.as_raw_fd()),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A unix listener and where it came from.
#[derive(Debug)]
pub struct UnixListen {
    /// The listener.
    pub listener: tokio::net::UnixListener,
    /// Whether systemd handed it over. Then the socket file belongs to the
    /// socket unit: the daemon must not remove it on exit, so that clients
    /// queue on it while the service restarts.
    pub inherited: bool,
}

/// The listener for `path`: the socket systemd passed for it, else a new
/// one bound by [`crate::server::bind_unix`] with `mode`.
pub async fn listen_unix(path: &Path, mode: u32) -> io::Result<UnixListen> {
    if let Some(l) = take_unix_listener(path) {
        l.set_nonblocking(true)?;
        return Ok(UnixListen {
            listener: tokio::net::UnixListener::from_std(l)?,
            inherited: true,
        });
    }
    Ok(UnixListen {
        listener: crate::server::bind_unix(path, mode).await?,
        inherited: false,
    })
}

/// Sends `state` (e.g. `READY=1`, `STOPPING=1`, `STATUS=...`) to the
/// service manager. `Ok(false)` when not run by one (no `NOTIFY_SOCKET`
/// was given to [`init_from_env`]).
pub fn notify(state: &str) -> io::Result<bool> {
    let target = match lock().as_ref().and_then(|s| s.notify.clone()) {
        Some(t) => t,
        None => return Ok(false),
    };
    notify_to(&target, state)?;
    Ok(true)
}

/// Sends `state` to the notification socket `target`: a path, or an
/// abstract name written `@name`.
pub fn notify_to(target: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else if target.starts_with('/') {
        sock.send_to(state.as_bytes(), target)?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={target:?} is neither an absolute path nor an abstract name (@name)"),
        ));
    }
    Ok(())
}

/// [`notify`], logging a failure instead of returning it (a lost
/// notification must not stop the daemon; systemd then times the start out
/// and says so).
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "cannot notify the service manager");
    }
}

/// Tells the service manager the daemon serves, and returns `shutdown`
/// wrapped to send `STOPPING=1` when it resolves.
///
/// `shutdown` is polled once first, so that the signal handlers it
/// installs on its first poll (tokio's `signal()`) are in place before
/// `READY=1`: a `systemctl stop` right after start is then a clean stop,
/// not death by SIGTERM's default action.
pub async fn notify_ready<F>(shutdown: F) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut shutdown = Box::pin(shutdown);
    // Polls the future once, then gives up at once if it is pending.
    let stopped = tokio::time::timeout(std::time::Duration::ZERO, shutdown.as_mut())
        .await
        .is_ok();
    notify_or_log("READY=1");
    Box::pin(async move {
        if !stopped {
            shutdown.await;
        }
        notify_or_log("STOPPING=1");
    })
}

/// Logs what [`init_from_env`] found (call once logging is set up).
pub fn log_activation(found: &Result<Activation, ListenEnvError>) {
    match found {
        Ok(a) => {
            for s in &a.sockets {
                tracing::info!(socket = %s, "socket handed over by systemd");
            }
            for r in &a.rejected {
                tracing::warn!(fd = %r, "ignoring a file descriptor systemd passed: not a listening unix stream socket");
            }
        }
        Err(e) => tracing::warn!(error = %e, "ignoring the socket-activation environment"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(fd: RawFd, name: Option<&str>) -> ListenFd {
        ListenFd {
            fd,
            name: name.map(str::to_owned),
        }
    }

    #[test]
    fn absent_or_foreign_environment_means_no_sockets() {
        assert_eq!(parse_listen_env(None, None, None, 7), Ok(vec![]));
        assert_eq!(parse_listen_env(Some("7"), None, None, 7), Ok(vec![]));
        assert_eq!(parse_listen_env(None, Some("1"), None, 7), Ok(vec![]));
        // Meant for another process (a parent that did not clear them).
        assert_eq!(parse_listen_env(Some("8"), Some("2"), None, 7), Ok(vec![]));
    }

    #[test]
    fn fds_start_at_3_with_their_names() {
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("vmdk-plugin.socket:extra"), 7),
            Ok(vec![fd(3, Some("vmdk-plugin.socket")), fd(4, Some("extra"))])
        );
        assert_eq!(parse_listen_env(Some(" 7"), Some("1 "), None, 7), Ok(vec![fd(3, None)]));
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some(":b"), 7),
            Ok(vec![fd(3, None), fd(4, Some("b"))])
        );
        assert_eq!(parse_listen_env(Some("7"), Some("0"), None, 7), Ok(vec![]));
    }

    #[test]
    fn broken_environment_is_named() {
        assert_eq!(
            parse_listen_env(Some("x"), Some("1"), None, 7),
            Err(ListenEnvError::BadPid("x".into()))
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("-1"), None, 7),
            Err(ListenEnvError::BadCount("-1".into()))
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("65"), None, 7),
            Err(ListenEnvError::BadCount("65".into()))
        );
        let e = parse_listen_env(Some("7"), Some("2"), Some("one"), 7).unwrap_err();
        assert_eq!(
            e,
            ListenEnvError::NameCount {
                names: "one".into(),
                got: 1,
                count: 2
            }
        );
        assert!(e.to_string().contains("LISTEN_FDS=2"), "{e}");
    }

    #[test]
    fn only_listening_unix_stream_sockets_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let owned: OwnedFd = l.into();
        assert_eq!(check_listening_unix_stream(&owned), Ok(Some(path.clone())));

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check_listening_unix_stream(&a.into()).unwrap_err();
        assert!(e.contains("not listening"), "{e}");

        let d = UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
        let e = check_listening_unix_stream(&d.into()).unwrap_err();
        assert!(e.contains("not a stream socket"), "{e}");

        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = check_listening_unix_stream(&t.into()).unwrap_err();
        assert!(e.contains("not a unix socket"), "{e}");

        let f = std::fs::File::open("/proc/self/status").unwrap();
        let e = check_listening_unix_stream(&f.into()).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
    }

    #[test]
    fn inherited_socket_matches_its_path_or_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmdk.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let by_path = Inherited {
            fd: l.into(),
            name: Some("vmdk-plugin.socket".into()),
            path: Some(path.clone()),
        };
        assert!(matches(&by_path, &path));
        assert!(!matches(&by_path, &dir.path().join("other.sock")));
        let named = Inherited {
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            name: Some("vmdk".into()),
            path: None,
        };
        assert!(matches(&named, Path::new("/run/docker/plugins/vmdk.sock")));
        assert!(!matches(&named, Path::new("/run/vmdk/agent.sock")));
    }

    #[test]
    fn notification_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vmdk-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        let e = notify_to("relative", "READY=1").unwrap_err();
        assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
    }
}
