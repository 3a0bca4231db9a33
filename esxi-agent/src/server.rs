//! Serving the API on a unix socket (root-only) and optionally TCP.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use crate::service::VolumeService;

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

/// Where the agent listens.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Optional TCP address.
    pub tcp: Option<std::net::SocketAddr>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    svc: Arc<VolumeService>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    {
        // Each release is logged by the service.
        let svc = svc.clone();
        let _ = tokio::task::spawn_blocking(move || svc.recover_on_start()).await;
    }
    let app = crate::api::router(svc);
    let unix = bind_unix(&listeners.socket, 0o600).await?;
    tracing::info!(socket = %listeners.socket.display(), "agent API listening");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(addr) = listeners.tcp {
        let tcp = TcpListener::bind(addr).await?;
        tracing::info!(%addr, "agent API listening on TCP");
        let app = app.clone();
        let mut rx = rx.clone();
        tasks.push(tokio::spawn(async move {
            axum::serve(tcp, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await
        }));
    }
    let mut rx2 = rx.clone();
    tasks.push(tokio::spawn(async move {
        axum::serve(unix, app)
            .with_graceful_shutdown(async move {
                let _ = rx2.wait_for(|v| *v).await;
            })
            .await
    }));
    shutdown.await;
    let _ = tx.send(true);
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    let _ = std::fs::remove_file(&listeners.socket);
    drop(rx);
    Ok(())
}
