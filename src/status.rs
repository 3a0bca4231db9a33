//! `vmdk-plugin status`: what the plugin on this VM holds, read without
//! changing anything, and checked against the live mounts.
//!
//! It reads the state file the daemon keeps (never setting it aside, as the
//! daemon's own load does with a bad file), `/proc/self/mountinfo` through
//! the [`System`](crate::sys::System) seam, and whether the plugin socket
//! answers. Disagreements are listed as problems: they are what the
//! daemon's recovery would fix at its next start.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::state::{PluginState, StateFileError, StateStore, STATE_FILE};
use crate::sys::MountEntry;

/// One volume the state records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeStatus {
    /// `vol@ds`.
    pub volume: String,
    /// Block device recorded.
    pub device: String,
    /// Filesystem type recorded.
    pub fstype: String,
    /// Whether it is mounted read-only.
    pub read_only: bool,
    /// Docker mount IDs holding it (none: in its detach grace, or a
    /// release that failed and will be retried).
    pub ids: Vec<String>,
    /// Whether a filesystem is mounted at its mount directory now.
    pub mounted: bool,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// The plugin socket.
    pub socket: PathBuf,
    /// Whether something answers on it.
    pub serving: bool,
    /// The state file read.
    pub state_file: PathBuf,
    /// Volumes the state records, sorted.
    pub volumes: Vec<VolumeStatus>,
    /// What does not add up.
    pub problems: Vec<String>,
}

/// Builds the report from the state dir, the mount root, the live mounts
/// and whether the socket answers.
pub fn report(
    socket: &Path,
    serving: bool,
    mount_root: &Path,
    state_dir: &Path,
    mounts: &[MountEntry],
) -> StatusReport {
    let state_file = state_dir.join(STATE_FILE);
    let mut problems = Vec::new();
    let state = match StateStore::at(state_dir).read() {
        Ok(s) => s.unwrap_or_default(),
        Err(StateFileError::Read(e)) => {
            problems.push(format!("cannot read {}: {e}", state_file.display()));
            PluginState::default()
        }
        Err(StateFileError::Unusable(why)) => {
            problems.push(format!(
                "{} is unreadable ({why}); the daemon will set it aside",
                state_file.display()
            ));
            PluginState::default()
        }
    };
    let here = crate::volume::volume_mounts(mounts.iter().cloned(), mount_root);
    // The state's map is sorted by name, and so are the volumes.
    let volumes: Vec<VolumeStatus> = state
        .mounts
        .iter()
        .map(|(name, rec)| {
            let live = here.get(name);
            match live {
                None => problems.push(format!(
                    "{name} is recorded but not mounted at {}",
                    mount_root.join(name).display()
                )),
                Some(m) if m.source != rec.device => problems.push(format!(
                    "{name} is recorded on {} but {} is mounted there",
                    rec.device, m.source
                )),
                Some(_) => {}
            }
            VolumeStatus {
                volume: name.clone(),
                device: rec.device.clone(),
                fstype: rec.fstype.clone(),
                read_only: rec.read_only,
                ids: rec.ids.keys().cloned().collect(),
                mounted: live.is_some(),
            }
        })
        .collect();
    for (name, m) in &here {
        if !state.mounts.contains_key(name) {
            problems.push(format!(
                "{} ({}) is mounted but not recorded",
                m.target.display(),
                m.source
            ));
        }
    }
    if !serving {
        problems.push(format!(
            "nothing answers on {}: the plugin is not running",
            socket.display()
        ));
    }
    StatusReport {
        socket: socket.to_owned(),
        serving,
        state_file,
        volumes,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{MountRecord, StateStore};

    fn entry(target: &Path, source: &str) -> MountEntry {
        MountEntry {
            target: target.to_owned(),
            source: source.into(),
            fstype: "ext4".into(),
            read_only: false,
        }
    }

    #[test]
    fn reports_volumes_and_what_does_not_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        let state_dir = dir.path().join("state");
        let store = StateStore::new(&state_dir).unwrap();
        let rec = |dev: &str, ids: &[&str]| MountRecord {
            ids: ids.iter().map(|i| (i.to_string(), 0)).collect(),
            nested: BTreeMap::new(),
            device: dev.into(),
            fstype: "ext4".into(),
            read_only: false,
        };
        let mut st = PluginState::default();
        st.mounts.insert("db@local".into(), rec("/dev/loop1", &["c1", "c2"]));
        st.mounts.insert("gone@local".into(), rec("/dev/loop2", &["c3"]));
        st.mounts.insert("idle@local".into(), rec("/dev/loop3", &[]));
        store.save(&st).unwrap();
        let mounts = vec![
            entry(&root.join("db@local"), "/dev/loop1"),
            entry(&root.join("idle@local"), "/dev/loop9"),
            entry(&root.join("stray@local"), "/dev/loop4"),
            entry(Path::new("/elsewhere"), "/dev/sda1"),
        ];
        let r = report(Path::new("/run/x.sock"), true, &root, &state_dir, &mounts);
        assert!(r.serving);
        let names: Vec<_> = r
            .volumes
            .iter()
            .map(|v| (v.volume.as_str(), v.mounted, v.ids.len()))
            .collect();
        assert_eq!(
            names,
            [("db@local", true, 2), ("gone@local", false, 1), ("idle@local", true, 0)]
        );
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
        assert!(r.problems[0].starts_with("gone@local is recorded but not mounted"));
        assert!(r.problems[1].contains("idle@local is recorded on /dev/loop3 but /dev/loop9"));
        assert!(r.problems[2].contains("stray@local (/dev/loop4) is mounted but not recorded"));
        // Read only: the file is untouched.
        assert_eq!(StateStore::new(&state_dir).unwrap().load(), st);
    }

    #[test]
    fn a_bad_state_file_is_a_problem_and_stays_in_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let r = report(
            Path::new("/run/x.sock"),
            false,
            &dir.path().join("mnt"),
            dir.path(),
            &[],
        );
        assert!(r.volumes.is_empty());
        assert!(r.problems[0].contains("is unreadable"), "{:?}", r.problems);
        assert!(r.problems[1].contains("the plugin is not running"), "{:?}", r.problems);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap(),
            "{not json"
        );
    }
}
