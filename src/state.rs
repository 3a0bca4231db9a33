//! The plugin's durable mount state: which Docker mount IDs hold which
//! volume, and what is mounted for it.
//!
//! Written atomically after every change to `<state-dir>/mounts.json`. At
//! start it is only a hint: recovery checks it against `/proc/self/mountinfo`,
//! the agent's attachments and Docker's running containers.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Current state file version.
pub const STATE_VERSION: u32 = 1;
/// File name inside the state dir.
pub const STATE_FILE: &str = "mounts.json";

/// What the plugin holds for one mounted volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Docker mount IDs holding the volume, with the unix time each was
    /// taken. IDs named `recovered:<container>` stand for a running
    /// container found at recovery whose real mount ID was lost.
    pub ids: BTreeMap<String, u64>,
    /// Mounts of an ID beyond its first, each still owed an Unmount.
    /// Docker mounts a running container's volumes again under the
    /// container's own mount ID for `docker cp` and the like
    /// (`MountPoint.Setup` reuses `m.ID` and counts `active`), then sends
    /// one Unmount per Mount; the container keeps its hold throughout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nested: BTreeMap<String, u32>,
    /// The block device mounted.
    pub device: String,
    /// Filesystem type.
    pub fstype: String,
    /// Whether it is mounted read-only.
    pub read_only: bool,
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginState {
    /// Format version, [`STATE_VERSION`].
    pub version: u32,
    /// Mounted volumes by canonical `vol@ds`.
    pub mounts: BTreeMap<String, MountRecord>,
}

impl Default for PluginState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            mounts: BTreeMap::new(),
        }
    }
}

/// Largest state file read: a record is a few hundred bytes, so this is
/// room for tens of thousands of mounted volumes.
pub const MAX_STATE_BYTES: u64 = 16 << 20;

impl PluginState {
    /// Decodes state file bytes: a pure function that never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(format!("larger than {MAX_STATE_BYTES} bytes"));
        }
        match serde_json::from_slice::<PluginState>(bytes) {
            Ok(s) if s.version == STATE_VERSION => Ok(s),
            Ok(s) => Err(format!("version {} is not {STATE_VERSION}", s.version)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The bytes [`PluginState::decode`] reads back.
    pub fn encode(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("state serializes");
        json.push(b'\n');
        json
    }
}

/// Why the state file cannot be used.
#[derive(Debug)]
pub enum StateFileError {
    /// It could not be read.
    Read(io::Error),
    /// It is not JSON of this format, or of another version.
    Unusable(String),
}

/// Loads and saves [`PluginState`].
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

/// Creates `dir` (and missing parents) with mode 0700, or makes an
/// existing one 0700, logging what it tightened. It must be a directory
/// owned by this process's user: a directory another user controls would
/// let that user swap what the plugin mounts on or reads.
pub fn private_dir(dir: &Path, what: &str) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let uid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid {
        return Err(io::Error::other(format!(
            "{what} {} must be a directory owned by uid {uid} (it is owned by uid {}); fix it with chown {uid} {}",
            dir.display(),
            meta.uid(),
            dir.display()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        tracing::warn!(dir = %dir.display(), was = format!("{mode:04o}"), "{what} was accessible to other users; made it 0700");
    }
    Ok(())
}

impl StateStore {
    /// A store in `dir` (created if missing, made private: 0700).
    pub fn new(dir: &Path) -> io::Result<Self> {
        private_dir(dir, "state dir")?;
        Ok(Self::at(dir))
    }

    /// The store in `dir`, creating nothing (for reading only).
    pub fn at(dir: &Path) -> Self {
        Self {
            path: dir.join(STATE_FILE),
        }
    }

    /// The state file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state without changing anything: `Ok(None)` when there is
    /// no file yet.
    pub fn read(&self) -> Result<Option<PluginState>, StateFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateFileError::Read(e)),
        };
        PluginState::decode(&bytes).map(Some).map_err(StateFileError::Unusable)
    }

    /// Loads the state. A missing file is an empty state; an unreadable or
    /// foreign-version file is moved aside (`mounts.json.corrupt`) and an
    /// empty state returned, since recovery rebuilds what it can from the
    /// live system.
    pub fn load(&self) -> PluginState {
        match self.read() {
            Ok(s) => s.unwrap_or_default(),
            Err(StateFileError::Read(e)) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot read state; starting empty");
                PluginState::default()
            }
            Err(StateFileError::Unusable(why)) => {
                self.set_aside(&why);
                PluginState::default()
            }
        }
    }

    fn set_aside(&self, why: &str) {
        let aside = self.path.with_extension("json.corrupt");
        tracing::error!(path = %self.path.display(), aside = %aside.display(), why, "unusable state file set aside; recovering from the live system");
        let _ = std::fs::rename(&self.path, aside);
    }

    /// Saves atomically; the file is readable by its owner only (0600).
    pub fn save(&self, state: &PluginState) -> io::Result<()> {
        self.save_with(state, true)
    }

    /// [`StateStore::save`]; with `durable` false the rename is left to
    /// the file system's next commit (see
    /// [`vmdk_common::store::Dir::write_atomic_deferred`]): for saves that
    /// only release mounts, whose loss in a crash leaves records that
    /// recovery checks against the live mounts.
    pub fn save_with(&self, state: &PluginState, durable: bool) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        vmdk_common::store::atomic_write_with(&self.path, &state.encode(), durable)?;
        if std::fs::metadata(&self.path)?.permissions().mode() & 0o777 != 0o600 {
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path()).unwrap();
        assert_eq!(store.load(), PluginState::default());
        let mut s = PluginState::default();
        s.mounts.insert(
            "v@local".into(),
            MountRecord {
                ids: [("abc".to_string(), 1)].into(),
                nested: [("abc".to_string(), 2)].into(),
                device: "/dev/loop0".into(),
                fstype: "ext4".into(),
                read_only: false,
            },
        );
        store.save(&s).unwrap();
        assert_eq!(store.load(), s);
        // A save whose rename is left to the next commit reads back the same.
        s.mounts.clear();
        store.save_with(&s, false).unwrap();
        assert_eq!(store.load(), s);
        s.mounts.insert(
            "w@local".into(),
            MountRecord {
                ids: [("def".to_string(), 3)].into(),
                nested: BTreeMap::new(),
                device: "/dev/loop1".into(),
                fstype: "xfs".into(),
                read_only: true,
            },
        );
        store.save(&s).unwrap();
        assert_eq!(store.load(), s);
        std::fs::write(store.path(), b"{not json").unwrap();
        assert_eq!(store.load(), PluginState::default());
        assert!(dir.path().join("mounts.json.corrupt").exists());
    }
}
