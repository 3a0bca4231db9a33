//! The agent's logs and metrics at the edge of its API: one span per
//! request and its duration in `vmdk_agent_operation_duration_seconds`
//! ([`track`]), one audit line per mutating call ([`audit`]), and the admin
//! listener's gauges ([`start_admin`]). See docs/operations.md.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use vmdk_common::admin::{self, AdminListen, AdminServer, AdminState, Readiness};
use vmdk_common::metrics;

use crate::service::{Caller, VolumeService};

/// The operation an API request asks for, as the `op` label and the
/// span's `operation` show it.
pub fn operation(method: &Method, path: &str) -> &'static str {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["v1", "version"]) => "version",
        ("GET", ["v1", "volumes"]) => "list",
        ("POST", ["v1", "volumes"]) => "create",
        ("GET", ["v1", "volumes", _]) => "get",
        ("DELETE", ["v1", "volumes", _]) => "remove",
        ("POST", ["v1", "volumes", _, "attach"]) => "attach",
        ("POST", ["v1", "volumes", _, "detach"]) => "detach",
        ("POST", ["v1", "volumes", _, "formatted"]) => "formatted",
        _ => "other",
    }
}

/// Middleware of the API router: runs the request in its span and times it.
pub async fn track(req: Request, next: Next) -> Response {
    let op = operation(req.method(), req.uri().path());
    let span = vmdk_common::logging::request_span(op);
    let start = Instant::now();
    let resp = next.run(req).instrument(span).await;
    metrics::agent_operation(op, resp.status().is_success(), start.elapsed().as_secs_f64());
    if matches!(op, "create" | "remove" | "attach" | "detach") {
        metrics::VolumeCensus::global().mark_dirty();
    }
    resp
}

/// The audit line of a mutating call.
pub fn audit<T>(caller: &Caller, operation: &str, volume: &str, result: &Result<T, crate::AgentError>) {
    let err = result.as_ref().err().map(|e| crate::error::error_chain(e));
    vmdk_common::logging::audit(
        &caller.to_string(),
        operation,
        volume,
        err.as_deref().map_or(Ok(()), Err),
    );
}

/// Starts the agent's admin listener: `vmdk_volumes` from the service's
/// list (cached), the build info.
pub async fn start_admin(listen: AdminListen, svc: Arc<VolumeService>, readiness: Readiness) -> Option<AdminServer> {
    metrics::build_info("vmdk-agent", env!("CARGO_PKG_VERSION"));
    let refresh: admin::Refresh = Arc::new(move || {
        let svc = svc.clone();
        Box::pin(async move {
            metrics::VolumeCensus::global()
                .refresh(|| async {
                    svc.list(&Caller::Admin)
                        .await
                        .map_err(|e| crate::error::error_chain(&e))
                })
                .await;
        })
    });
    admin::start(
        "vmdk-agent",
        listen,
        AdminState {
            readiness,
            refresh: Some(refresh),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_their_operation() {
        assert_eq!(operation(&Method::POST, "/v1/volumes"), "create");
        assert_eq!(operation(&Method::DELETE, "/v1/volumes/a@b"), "remove");
        assert_eq!(operation(&Method::POST, "/v1/volumes/a/attach"), "attach");
        assert_eq!(operation(&Method::GET, "/v1/volumes/a"), "get");
        assert_eq!(operation(&Method::GET, "/etc/passwd"), "other");
    }
}
