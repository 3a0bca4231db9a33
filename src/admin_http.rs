//! The plugin's admin listener (`--admin-listen`, default
//! 127.0.0.1:9581): `/healthz`, `/readyz`, `/metrics`, served by
//! [`vmdk_common::admin`]. Gauges are computed at scrape time from what
//! the plugin holds: active mounts from its mount state, volumes by state
//! from the agent's list (cached, see [`vmdk_common::metrics::VolumeCensus`]).

use std::sync::Arc;

use vmdk_common::admin::{self, AdminListen, AdminServer, AdminState, Readiness};
use vmdk_common::metrics;

use crate::volume::VolumeManager;

/// Starts the admin listener for `manager`; `None` when off or not bound.
pub async fn start(listen: AdminListen, manager: Arc<VolumeManager>, readiness: Readiness) -> Option<AdminServer> {
    crate::obs::describe();
    let refresh: admin::Refresh = Arc::new(move || {
        let m = manager.clone();
        Box::pin(async move {
            let st = m.snapshot();
            let ids: usize = st.mounts.values().map(|r| r.ids.len()).sum();
            metrics::global().set_gauge(
                crate::obs::ACTIVE_MOUNTS,
                "Docker mounts (mount IDs) the plugin holds.",
                &[],
                ids as f64,
            );
            metrics::VolumeCensus::global()
                .refresh(|| async { m.agent().list(m.vm_id()).await.map_err(|e| e.to_string()) })
                .await;
        })
    });
    admin::start(
        "vmdk-plugin",
        listen,
        AdminState {
            readiness,
            refresh: Some(refresh),
        },
    )
    .await
}
