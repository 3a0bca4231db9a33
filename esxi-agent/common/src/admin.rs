//! The admin listener: a local HTTP listener apart from the API socket,
//! with `/healthz`, `/readyz` and `/metrics`. `vmdk-plugin` listens on
//! [`PLUGIN_ADMIN_DEFAULT`], `vmdk-agent serve` on [`AGENT_ADMIN_DEFAULT`];
//! `--admin-listen ADDR` moves it and `--admin-listen off` turns it off.
//!
//! It is served by [`crate::server::serve_bounded`] with the default
//! limits. Failing to bind it (the port is taken) is logged as a warning
//! and the daemon serves volumes anyway: the API socket matters more.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The plugin's default admin address.
pub const PLUGIN_ADMIN_DEFAULT: &str = "127.0.0.1:9581";
/// The agent's default admin address.
pub const AGENT_ADMIN_DEFAULT: &str = "127.0.0.1:9582";

/// `--admin-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    /// No admin listener.
    Off,
    /// Listen here (port 0: any free port, logged at start).
    At(SocketAddr),
}

impl AdminListen {
    /// Parses a flag value; empty (an unset setting in an environment file
    /// or a managed plugin's settings) means `default`.
    pub fn parse_or(value: &str, default: &str) -> Result<Self, AdminListenError> {
        if value.trim().is_empty() {
            default.parse()
        } else {
            value.parse()
        }
    }
}

/// An `--admin-listen` value that is neither `off` nor an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid admin address {0:?}; expected IP:PORT such as 127.0.0.1:9581, or off")]
pub struct AdminListenError(pub String);

impl FromStr for AdminListen {
    type Err = AdminListenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" | "disabled" => Ok(Self::Off),
            a => a.parse().map(Self::At).map_err(|_| AdminListenError(s.to_owned())),
        }
    }
}

impl std::fmt::Display for AdminListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::At(a) => write!(f, "{a}"),
        }
    }
}

/// Whether the daemon is ready: `/readyz` answers 200, or 503 with the
/// reason. Cheap to clone; all clones share one state.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Mutex<Option<String>>>);

impl Readiness {
    /// Not ready, for `reason` (e.g. "starting").
    pub fn new(reason: &str) -> Self {
        Self(Arc::new(Mutex::new(Some(reason.to_owned()))))
    }

    /// Ready.
    pub fn set_ready(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Not ready, for `reason`.
    pub fn set_not_ready(&self, reason: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
    }

    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), String> {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(r) => Err(r.clone()),
        }
    }
}

/// Run before each `/metrics` scrape, to update gauges computed on demand.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the admin listener serves.
#[derive(Clone)]
pub struct AdminState {
    /// Ready or not (`/readyz`).
    pub readiness: Readiness,
    /// Updates gauges before a scrape.
    pub refresh: Option<Refresh>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("readiness", &self.readiness)
            .finish()
    }
}

async fn healthz() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], "ok\n").into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.readiness.check() {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            "ready\n".to_owned(),
        )
            .into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    if let Some(refresh) = &s.refresh {
        refresh().await;
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::global().render(),
    )
        .into_response()
}

async fn unknown(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain")],
        format!(
            "{} is not an admin endpoint; the endpoints are /healthz, /readyz and /metrics\n",
            uri.path()
        ),
    )
        .into_response()
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(unknown)
        .with_state(state)
}

fn text_reply(status: StatusCode, message: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], message).into_response()
}

/// A running admin listener; dropping it stops it.
#[derive(Debug)]
pub struct AdminServer {
    /// The address bound (the real port when 0 was asked).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the admin listener of `program`. `None` when it is off, or when
/// its address cannot be bound (then a warning says why and what to do).
pub async fn start(program: &str, listen: AdminListen, state: AdminState) -> Option<AdminServer> {
    let AdminListen::At(addr) = listen else {
        tracing::info!("admin listener off (--admin-listen off): no /healthz, /readyz, /metrics");
        return None;
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                %addr,
                error = %e,
                "cannot listen for /healthz, /readyz and /metrics on {addr}: {e}; {program} serves volumes without them. \
                 Stop what holds the port, or pass --admin-listen with another address (or off)"
            );
            return None;
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(admin = %bound, "admin listener on http://{bound} (/healthz, /readyz, /metrics)");
    let app = router(state);
    let task = tokio::spawn(async move {
        if let Err(e) = crate::server::serve_bounded(
            listener.into(),
            app,
            crate::server::ServeLimits::default(),
            text_reply,
            std::future::pending(),
        )
        .await
        {
            tracing::warn!(error = %e, "admin listener stopped");
        }
    });
    Some(AdminServer { addr: bound, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values_parse() {
        assert_eq!("off".parse::<AdminListen>().unwrap(), AdminListen::Off);
        assert_eq!(
            "127.0.0.1:9581".parse::<AdminListen>().unwrap(),
            AdminListen::At("127.0.0.1:9581".parse().unwrap())
        );
        assert_eq!(
            AdminListen::parse_or(" ", PLUGIN_ADMIN_DEFAULT).unwrap(),
            AdminListen::At("127.0.0.1:9581".parse().unwrap())
        );
        let e = "localhost".parse::<AdminListen>().unwrap_err().to_string();
        assert!(e.contains("\"localhost\"") && e.contains("or off"), "{e}");
    }

    #[test]
    fn readiness_says_why() {
        let r = Readiness::new("starting");
        assert_eq!(r.check(), Err("starting".into()));
        r.clone().set_ready();
        assert_eq!(r.check(), Ok(()));
    }
}
