//! The plugin's logs and metrics at the edge of the Docker API: one span
//! and one request count/duration per Docker call ([`track`]), an audit
//! line per mutating call ([`audit`]), and counters of what recovery and
//! the reconcile pass did ([`reconcile_action`]). See docs/operations.md.

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use vmdk_common::metrics;

/// `vmdk_plugin_requests_total`.
pub const REQUESTS: &str = "vmdk_plugin_requests_total";
/// `vmdk_plugin_request_duration_seconds`.
pub const REQUEST_DURATION: &str = "vmdk_plugin_request_duration_seconds";
/// `vmdk_plugin_active_mounts`.
pub const ACTIVE_MOUNTS: &str = "vmdk_plugin_active_mounts";
/// `vmdk_plugin_reconcile_actions_total`.
pub const RECONCILE_ACTIONS: &str = "vmdk_plugin_reconcile_actions_total";

/// The Docker methods, as the `method` label shows them. Anything else is
/// `other`, so that a client probing paths cannot grow the label set.
const METHODS: &[&str] = &[
    "Plugin.Activate",
    "VolumeDriver.Capabilities",
    "VolumeDriver.Create",
    "VolumeDriver.Remove",
    "VolumeDriver.Mount",
    "VolumeDriver.Unmount",
    "VolumeDriver.Path",
    "VolumeDriver.Get",
    "VolumeDriver.List",
];

/// The calls that change something, for the audit log and the volume count.
const MUTATING: &[&str] = &[
    "VolumeDriver.Create",
    "VolumeDriver.Remove",
    "VolumeDriver.Mount",
    "VolumeDriver.Unmount",
];

/// Middleware of the plugin router: runs the request in its span, counts
/// it and times it.
pub async fn track(req: Request, next: Next) -> Response {
    let path = req.uri().path().trim_start_matches('/');
    let method = METHODS.iter().copied().find(|m| *m == path).unwrap_or("other");
    let span = vmdk_common::logging::request_span(method);
    let start = Instant::now();
    let resp = next.run(req).instrument(span).await;
    let result = if resp.status().is_success() { "ok" } else { "error" };
    let labels = [("method", method), ("result", result)];
    let r = metrics::global();
    r.inc_counter(
        REQUESTS,
        "Docker volume plugin requests, by method and result.",
        &labels,
        1.0,
    );
    r.observe(
        REQUEST_DURATION,
        "Time to answer a Docker volume plugin request, by method and result.",
        &labels,
        start.elapsed().as_secs_f64(),
    );
    if MUTATING.contains(&method) {
        metrics::VolumeCensus::global().mark_dirty();
    }
    resp
}

/// The audit line of a mutating Docker call. The caller is Docker (the
/// only client of the plugin socket).
pub fn audit<T, E: std::error::Error>(operation: &str, volume: &str, result: &Result<T, E>) {
    let err = result.as_ref().err().map(|e| crate::error_chain(e));
    vmdk_common::logging::audit("docker", operation, volume, err.as_deref().map_or(Ok(()), Err));
}

/// Counts one action of recovery or the reconcile pass: `adopt`,
/// `drop_record`, `release`, `remount`, `detach_stray`, `remove_dir`.
pub fn reconcile_action(action: &str) {
    metrics::global().inc_counter(
        RECONCILE_ACTIONS,
        "Actions taken by start-up recovery and the reconcile pass, by action.",
        &[("action", action)],
        1.0,
    );
}

/// Declares the plugin's counters so that a scrape shows them before the
/// first request, and sets the build info.
pub fn describe() {
    let r = metrics::global();
    r.describe_counter(REQUESTS, "Docker volume plugin requests, by method and result.");
    r.describe_counter(
        RECONCILE_ACTIONS,
        "Actions taken by start-up recovery and the reconcile pass, by action.",
    );
    metrics::build_info("vmdk-plugin", env!("CARGO_PKG_VERSION"));
}
