//! `vmdk-plugin serve`: bind the socket at once, recover in the background.

use std::sync::Arc;
use std::time::Duration;

use vmdk_agent::config::AgentConfig;
use vmdk_agent::VolumeService;

use crate::agent_client::AgentClient;
use crate::config::ServeConfig;
use crate::http1::Endpoint;
use crate::sys::{LinuxSystem, System};
use crate::volume::{ManagerConfig, VolumeManager};

/// Why the plugin could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad flag or config.
    #[error("{0}")]
    Config(String),
    /// A startup I/O step failed.
    #[error("{op} {path}")]
    Io {
        /// The step.
        op: &'static str,
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Builds the agent client: remote when a URL is given, else an embedded
/// agent on the given datastores (directories created if missing), whose
/// start-up checks [`run_with`] runs.
pub async fn agent_client(cfg: &ServeConfig) -> Result<AgentClient, ServeError> {
    if let Some(url) = &cfg.agent {
        return Endpoint::parse(url).map(AgentClient::Http).map_err(ServeError::Config);
    }
    let (acfg, source) = AgentConfig::load(
        cfg.agent_config.as_deref(),
        std::path::Path::new(vmdk_agent::config::DEFAULT_CONFIG),
        &cfg.datastores,
    )
    .map_err(|e| ServeError::Config(crate::error_chain(&e)))?;
    tracing::info!(config = %source, backend = ?acfg.backend, "embedded agent configuration");
    // The --datastore flags' datastores (the last ones) get their
    // directories made if missing: given by hand, they are a wish. A
    // configuration file's must exist; the built-in one the service makes.
    let flagged = &acfg.datastores[acfg.datastores.len().saturating_sub(cfg.datastores.len())..];
    for path in flagged.iter().filter_map(|d| d.path.as_ref()) {
        // A datastore directory the plugin makes is private (an existing
        // one is the administrator's; its dockvols/ is made 0700 anyway).
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(path)
            .map_err(|source| ServeError::Io {
                op: "create datastore directory",
                path: path.display().to_string(),
                source,
            })?;
    }
    if acfg.backend != vmdk_agent::config::BackendKind::Local
        && cfg.vm_id_source == crate::config::VmIdSource::MachineId
    {
        return Err(ServeError::Config(crate::config::machine_id_refused("vsphere")));
    }
    // Its start-up checks (VolumeService::recover_on_start) run once the
    // socket is served (see run_with).
    let svc = VolumeService::from_config(&acfg)
        .await
        .map_err(|e| ServeError::Config(crate::error_chain(&e)))?;
    Ok(AgentClient::Embedded(Arc::new(svc)))
}

/// The errors the server answers itself (a body too slow or too large),
/// in the plugin API's shape `{"Err": ...}`, which Docker shows as
/// `VolumeDriver.<Method>: <Err>`.
pub fn plugin_error_reply(status: axum::http::StatusCode, message: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        status,
        [(axum::http::header::CONTENT_TYPE, crate::plugin::CONTENT_TYPE)],
        serde_json::json!({ "Err": message }).to_string(),
    )
        .into_response()
}

/// Runs the plugin until `shutdown` resolves.
pub async fn run(
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let agent = agent_client(&cfg).await?;
    run_with(cfg, agent, Arc::new(LinuxSystem), shutdown).await
}

/// [`run`] with an explicit agent and kernel seam. The socket is served by
/// [`vmdk_common::server::serve_bounded`] within `cfg.limits`, at once; an
/// embedded agent's attachment checks and then the plugin's recovery run in
/// the background, and mutating calls wait for them (the agent's collection
/// of leftovers follows beside them).
pub async fn run_with(
    cfg: ServeConfig,
    agent: AgentClient,
    sys: Arc<dyn System>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let manager = VolumeManager::new(
        agent,
        sys,
        ManagerConfig {
            vm_id: cfg.vm_id.clone(),
            mount_root: cfg.mount_root.clone(),
            state_dir: cfg.state_dir.clone(),
            docker_socket: cfg.docker_socket.clone(),
            detach_grace: Duration::from_secs(cfg.detach_grace),
        },
    )
    .map_err(|source| ServeError::Io {
        op: "prepare",
        path: format!("{} and {}", cfg.mount_root.display(), cfg.state_dir.display()),
        source,
    })?;
    let readiness = vmdk_common::admin::Readiness::new("the plugin socket is not bound yet");
    let _admin = crate::admin_http::start(cfg.admin_listen, manager.clone(), readiness.clone()).await;
    // The socket systemd's vmdk-plugin.socket holds, else our own.
    let listen = vmdk_common::systemd::listen_unix(&cfg.socket, 0o660)
        .await
        .map_err(|source| ServeError::Io {
            op: "bind plugin socket",
            path: cfg.socket.display().to_string(),
            source,
        })?;
    let (listener, inherited) = (listen.listener, listen.inherited);
    tracing::info!(socket = %cfg.socket.display(), vm = %cfg.vm_id, from_systemd = inherited, "vmdk plugin listening");
    let m = manager.clone();
    let interval = cfg.reconcile_interval;
    readiness.set_not_ready("start-up recovery is running");
    // The socket is served from here on: Activate, Capabilities, Get, List
    // and Path answer at once; Create, Mount, Unmount and Remove wait for
    // the embedded agent's attachment checks and then the plugin's
    // recovery, which hold the manager's gate. The agent's collection of
    // what cut-off creates and removes left (a listing of every folder)
    // follows beside them: it touches only names that are no volume, under
    // locks it takes without waiting. /readyz says ready after all three.
    let embedded = manager.embedded_agent().cloned();
    let agent_checks = embedded.clone().map(|svc| async move {
        svc.recover_attachments_on_start().await;
    });
    let recovery = manager
        .spawn_recovery(async move {
            if let Some(checks) = agent_checks {
                checks.await;
            }
        })
        .await;
    let background = tokio::spawn(async move {
        let _ = recovery.await;
        if let Some(svc) = embedded {
            svc.collect_incomplete_volumes().await;
            tracing::info!("agent start-up checks finished");
        }
        readiness.set_ready();
        if interval == 0 {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(interval)).await;
            m.reconcile().await;
        }
    });
    let limits = cfg
        .limits
        .fit_fd_limit(vmdk_common::server::fd_limit().unwrap_or(1024), 1);
    tracing::info!(%limits, "plugin socket limits");
    let shutdown = vmdk_common::systemd::notify_ready(shutdown).await;
    let res = vmdk_common::server::serve_bounded(
        listener.into(),
        crate::plugin::router(manager),
        limits,
        plugin_error_reply,
        shutdown,
    )
    .await;
    background.abort();
    // A socket from systemd stays: clients queue on it until we are back.
    if !inherited {
        let _ = std::fs::remove_file(&cfg.socket);
    }
    res.map_err(|source| ServeError::Io {
        op: "serve",
        path: cfg.socket.display().to_string(),
        source,
    })
}
