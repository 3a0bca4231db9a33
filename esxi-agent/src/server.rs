//! Serving the agent API: the unix socket (root-only) and, optionally,
//! loopback TCP, each through the bounded server of `vmdk-common`
//! ([`serve_bounded`]).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use vmdk_common::server::*;

use crate::datastore::Datastore;
use crate::service::VolumeService;

/// The roots to hide for `datastores`: each root as configured and, when
/// different, as canonicalized, with the datastore's name.
pub fn redaction_roots(datastores: &[Datastore]) -> Vec<(PathBuf, String)> {
    let mut roots = Vec::new();
    for ds in datastores {
        let Some(root) = &ds.root else { continue };
        roots.push((root.clone(), ds.name.clone()));
        if let Ok(canonical) = std::fs::canonicalize(root) {
            if &canonical != root {
                roots.push((canonical, ds.name.clone()));
            }
        }
    }
    roots
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

/// Where the agent listens, and within which limits.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Optional TCP address; must be loopback
    /// ([`crate::config::check_tcp_address`]).
    pub tcp: Option<std::net::SocketAddr>,
    /// Limits of each listener (`max_connections` is further lowered to
    /// fit the open-file limit).
    pub limits: ServeLimits,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`), or off.
    pub admin: vmdk_common::admin::AdminListen,
}

/// Serves the agent API until `shutdown` resolves: on the unix socket
/// (mode 0600) and, if configured, on a loopback TCP address, where error
/// messages carry no host paths ([`redacting`]). Each listener has its own
/// [`ServeLimits`], so a flood on TCP does not block the local socket.
pub async fn serve(
    svc: Arc<VolumeService>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    if let Some(addr) = listeners.tcp {
        crate::config::check_tcp_address(addr, "--tcp")
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    }
    let readiness = vmdk_common::admin::Readiness::new("start-up recovery is running");
    let _admin = crate::obs::start_admin(listeners.admin, svc.clone(), readiness.clone()).await;
    {
        // Each release is logged by the service.
        let svc = svc.clone();
        svc.recover_on_start().await;
    }
    let count = 1 + usize::from(listeners.tcp.is_some());
    let limits = listeners.limits.fit_fd_limit(fd_limit().unwrap_or(1024), count);
    let app = crate::api::router(svc.clone());
    // The socket systemd's vmdk-agent.socket holds, else our own.
    let listen = vmdk_common::systemd::listen_unix(&listeners.socket, 0o600).await?;
    let (unix, inherited) = (listen.listener, listen.inherited);
    tracing::info!(socket = %listeners.socket.display(), %limits, from_systemd = inherited, "agent API listening");
    readiness.set_ready();
    let (tx, rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut tasks = Vec::new();
    if let Some(addr) = listeners.tcp {
        let tcp = TcpListener::bind(addr).await?;
        tracing::info!(%addr, "agent API listening on TCP (loopback only; errors carry no host paths)");
        let app = redacting(app.clone(), redaction_roots(svc.datastores()));
        tasks.push(tokio::spawn(serve_bounded(
            tcp.into(),
            app,
            limits,
            agent_error_reply,
            stopped(rx.clone()),
        )));
    }
    tasks.push(tokio::spawn(serve_bounded(
        unix.into(),
        app,
        limits,
        agent_error_reply,
        stopped(rx.clone()),
    )));
    vmdk_common::systemd::notify_ready(shutdown).await.await;
    let _ = tx.send(true);
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    // A socket from systemd stays: clients queue on it until we are back.
    if !inherited {
        let _ = std::fs::remove_file(&listeners.socket);
    }
    drop(rx);
    Ok(())
}
