//! Just enough of the Docker Engine API to learn which running containers
//! use which vmdk volumes (recovery after a restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde::Deserialize;

use crate::http1::{self, Endpoint};

/// Default Docker socket.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

#[derive(Debug, Deserialize)]
struct Container {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Mounts", default)]
    mounts: Vec<Mount>,
}

#[derive(Debug, Deserialize)]
struct Mount {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Driver", default)]
    driver: String,
    #[serde(rename = "Source", default)]
    source: String,
}

/// Running containers per volume: keyed by the canonical `vol@ds` when
/// Docker reports the mount source under `mount_root`, else by the volume
/// name Docker knows (`vol` or `vol@ds`, see [`names_volume`]).
pub type VolumeUsers = BTreeMap<String, BTreeSet<String>>;

/// Asks Docker for running, paused and restarting containers and maps each
/// volume they mount to the containers using it. `Err` means Docker did
/// not answer.
///
/// Docker reports an empty `Source` for a plugin volume whose path it has
/// not cached (seen with 20.10 for the first container to mount a volume),
/// so a volume mount without a usable source counts by its name.
pub async fn volume_users(socket: &Path, mount_root: &Path) -> Result<VolumeUsers, String> {
    let ep = Endpoint::Unix(PathBuf::from(socket));
    let filters = r#"{"status":["running","paused","restarting"]}"#;
    let path = format!(
        "/v1.24/containers/json?all=1&filters={}",
        vmdk_protocol::agent::percent_encode(filters)
    );
    let (status, body) = http1::request(&ep, Method::GET, &path, &[], None, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("docker answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    let containers: Vec<Container> = serde_json::from_slice(&body).map_err(|e| format!("bad docker response: {e}"))?;
    Ok(users_from(containers, mount_root))
}

fn users_from(containers: Vec<Container>, mount_root: &Path) -> VolumeUsers {
    let mut out = VolumeUsers::new();
    for c in containers {
        for m in c.mounts {
            let key = match volume_of_source(Path::new(&m.source), mount_root) {
                Some(full) => full,
                // Local volumes are never vmdk volumes.
                None if m.kind == "volume" && m.driver != "local" && !m.name.is_empty() => m.name,
                None => continue,
            };
            out.entry(key).or_default().insert(c.id.clone());
        }
    }
    out
}

/// Whether `key`, a [`VolumeUsers`] key, names the volume `full`
/// (`vol@ds`): the same name, or the short name when `ds` is the default
/// datastore. With the default unknown (agent unreachable) a short name
/// matches, so a volume in use is never released for want of an answer.
/// Datastore names compare case-insensitively, as the agent resolves them.
pub fn names_volume(key: &str, full: &str, default_ds: Option<&str>) -> bool {
    let Some((vol, ds)) = full.rsplit_once('@') else {
        return key == full;
    };
    match key.rsplit_once('@') {
        Some((kv, kds)) => kv == vol && kds.eq_ignore_ascii_case(ds),
        None => {
            key == vol
                && match default_ds {
                    Some(d) => d.eq_ignore_ascii_case(ds),
                    None => true,
                }
        }
    }
}

/// `<mount_root>/<vol@ds>/data` → `vol@ds`.
pub fn volume_of_source(source: &Path, mount_root: &Path) -> Option<String> {
    let rest = source.strip_prefix(mount_root).ok()?;
    let first = rest.components().next()?;
    Some(first.as_os_str().to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_sources_to_volumes() {
        let json = r#"[{"Id":"c1","Mounts":[{"Type":"volume","Name":"v","Source":"/mnt/vmdk/v@local/data","Driver":"vmdk"},
                        {"Type":"bind","Source":"/etc"}]},
                       {"Id":"c2","Mounts":[{"Source":"/mnt/vmdk/v@local/data"}]}]"#;
        let cs: Vec<Container> = serde_json::from_str(json).unwrap();
        let u = users_from(cs, Path::new("/mnt/vmdk"));
        assert_eq!(u.len(), 1);
        assert_eq!(u["v@local"].len(), 2);
    }

    #[test]
    fn volume_mounts_without_source_count_by_name() {
        let json = r#"[{"Id":"c1","Mounts":[{"Type":"volume","Name":"v","Source":"","Driver":"vmdk"},
                        {"Type":"volume","Name":"loc","Source":"","Driver":"local"}]},
                       {"Id":"c2","Mounts":[{"Type":"volume","Name":"w@ds2","Driver":"vmdk"}]}]"#;
        let cs: Vec<Container> = serde_json::from_str(json).unwrap();
        let u = users_from(cs, Path::new("/mnt/vmdk"));
        assert_eq!(u.keys().collect::<Vec<_>>(), ["v", "w@ds2"]);
        assert!(names_volume("v", "v@local", Some("local")));
        assert!(names_volume("v", "v@local", None));
        assert!(!names_volume("v", "v@ds2", Some("local")));
        assert!(names_volume("w@DS2", "w@ds2", Some("local")));
        assert!(!names_volume("w@ds2", "v@ds2", Some("local")));
        assert!(!names_volume("vv", "v@local", Some("local")));
    }
}
