//! VSAN storage policies: named policy expressions kept on the datastore.
//!
//! A policy is a file `<vsan datastore>/dockvols/policies/<name>` holding
//! one VSAN policy expression and a newline, exactly as the original vDVS
//! kept them, so every host that sees the datastore sees the same policies.
//! Policies live on the first datastore configured with `vsan = true` (the
//! original's rule: a host sees one vSAN datastore).
//!
//! * [`expr`]: the expression parser and capability checks;
//! * [`PolicyStore`]: the folder, its files and its lock;
//! * the operations themselves (create, update, remove, list, use by a
//!   volume) are [`crate::VolumeService`] methods, because they need the
//!   volumes that use a policy.
//!
//! Locking: `dockvols/policies/.lock` is taken shared by a volume create
//! that uses a policy and exclusive by policy create, update and remove, so
//! a policy cannot disappear between the check and the volume's metadata
//! write. The policy lock is always taken before any volume lock.

pub mod expr;

use std::fmt;
use std::io;
use std::path::PathBuf;

use vmdk_protocol::ErrorCode;

pub use expr::{ContentError, PolicyExpr};

use crate::datastore::Datastore;
use crate::store::{Dir, DsPath, FileKind, FileLock, StoreError};

/// Folder of the policy files under `dockvols/`.
pub const POLICIES_DIR: &str = "policies";
/// Lock file inside the policy folder (hidden, so never a policy name).
pub const LOCK_FILE: &str = ".lock";
/// Folder inside the policy folder recording, per policy, the volumes a
/// `policy update` could not re-apply it to (the original kept
/// `<name>.failed_volume_updates`; hidden here, so never a policy name).
pub const FAILED_UPDATES_DIR: &str = ".failed_volume_updates";
/// Version of the failed-updates record format.
pub const FAILED_UPDATES_VERSION: u32 = 1;

/// The volumes on which a policy's current content is not applied,
/// because `policy update` failed there. Kept as versioned JSON in
/// `dockvols/policies/.failed_volume_updates/<name>` until a later update
/// succeeds on them or the policy is removed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailedUpdates {
    /// Format version ([`FAILED_UPDATES_VERSION`]).
    pub version: u32,
    /// The policy content that could not be applied.
    pub content: String,
    /// When the update ran (RFC 3339).
    pub at: String,
    /// Each volume (`vol@ds`) and why it failed, sorted.
    pub failed: Vec<FailedVolume>,
}

/// One volume a policy update failed on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailedVolume {
    /// `vol@ds`.
    pub volume: String,
    /// The error.
    pub error: String,
}
/// Longest policy name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest policy name in UTF-8 bytes (it is a file name).
pub const MAX_NAME_BYTES: usize = 240;

/// Why a policy operation failed. The texts follow the original where it
/// had one.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The name cannot be a policy name.
    #[error("invalid policy name {name:?}: {reason}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The content is not a valid policy expression.
    #[error("policy {name}")]
    BadContent {
        /// The policy.
        name: String,
        /// Where and what.
        #[source]
        source: ContentError,
    },
    /// No datastore is marked VSAN.
    #[error("VSAN datastore does not exist: policies live in dockvols/policies on a VSAN datastore (with the vsphere backend, one whose type vSphere reports as vsan; with the local backend, one marked `vsan = true` in the agent configuration or --datastore NAME=DIR,vsan)")]
    NoVsanDatastore,
    /// A policy was used for a volume on a datastore that is not VSAN.
    #[error("Cannot use a VSAN policy on a non-VSAN datastore (datastore {datastore} is not VSAN: vSphere does not report it as vsan, or, with the local backend, it is not marked vsan in the agent configuration)")]
    NotVsan {
        /// The volume's datastore.
        datastore: String,
    },
    /// `policy create` of a name that exists.
    #[error("Policy {name} already exists (file: {path})")]
    AlreadyExists {
        /// The policy.
        name: String,
        /// Its file.
        path: String,
    },
    /// The policy does not exist.
    #[error("Policy {name} does not exist.{}", available_text(.available))]
    NotFound {
        /// The policy asked for.
        name: String,
        /// The policies that do exist, sorted.
        available: Vec<String>,
    },
    /// `policy rm` of a policy that volumes still use.
    #[error("Cannot remove. Policy {name} is in use by {}", in_use_text(.volumes))]
    InUse {
        /// The policy.
        name: String,
        /// The volumes using it (`vol@ds`), sorted.
        volumes: Vec<String>,
    },
    /// `policy update` with the content the policy already has.
    #[error("New policy is identical to old policy. Ignoring. (policy {name})")]
    Identical {
        /// The policy.
        name: String,
    },
    /// `policy update` could not re-apply the policy to any volume using
    /// it, so the old content was restored.
    #[error("Failed to update policy {name}: it could not be applied to any of the {} volumes using it; the old policy content was restored.{}", failures.len(), failures_text(.failures))]
    UpdateFailed {
        /// The policy.
        name: String,
        /// Each volume and why it failed.
        failures: Vec<(String, String)>,
    },
    /// A file of the policy folder could not be used (a planted link, a
    /// FIFO, too large, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The policy folder or a policy file could not be read or written.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn available_text(available: &[String]) -> String {
    if available.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = available.iter().map(|p| format!("'{p}'")).collect();
    format!(" Available policies are: [{}]", quoted.join(", "))
}

fn in_use_text(volumes: &[String]) -> String {
    const NAMED: usize = 5;
    match volumes {
        [] => "no volume".into(),
        [one] => one.clone(),
        [first, rest @ ..] => format!(
            "{first} and {} more volume{} ({}{})",
            rest.len(),
            if rest.len() == 1 { "" } else { "s" },
            rest.iter().take(NAMED).cloned().collect::<Vec<_>>().join(", "),
            if rest.len() > NAMED { ", ..." } else { "" }
        ),
    }
}

fn failures_text(failures: &[(String, String)]) -> String {
    failures.iter().map(|(v, e)| format!("\n  {v}: {e}")).collect()
}

impl PolicyError {
    /// The wire code (one exhaustive match, like [`crate::AgentError::code`]).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadName { .. }
            | Self::BadContent { .. }
            | Self::NoVsanDatastore
            | Self::NotVsan { .. }
            | Self::NotFound { .. }
            | Self::Identical { .. } => ErrorCode::InvalidPolicy,
            Self::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            Self::InUse { .. } => ErrorCode::InUse,
            Self::UpdateFailed { .. } => ErrorCode::Backend,
            Self::Io { .. } | Self::Store(_) => ErrorCode::Io,
        }
    }
}

/// Checks that `name` can be a policy (and so a file) name: 1–100
/// characters, none of `/ \ "`, NUL or control characters, not starting
/// with `.` (hidden files are the store's own) and not ending in `.tmp`
/// (atomic writes use it). `SW=2`, `gold`, `RAID-5 fast` are fine.
pub fn validate_name(name: &str) -> Result<(), PolicyError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.chars().count() > MAX_NAME_CHARS || name.len() > MAX_NAME_BYTES {
        Some("it is longer than 100 characters (240 bytes)")
    } else if name
        .chars()
        .any(|c| matches!(c, '/' | '\\' | '"' | '\0') || c.is_control())
    {
        Some("it contains '/', '\\', '\"', NUL or control characters")
    } else if name.starts_with('.') {
        Some("it starts with '.' ('.', '..' and hidden files are reserved)")
    } else if name.ends_with(".tmp") {
        Some("it ends with '.tmp' (reserved for files being written)")
    } else if name.trim() != name {
        Some("it starts or ends with whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PolicyError::BadName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Parses `content` as the content of policy `name`.
pub fn parse_content(name: &str, content: &str) -> Result<PolicyExpr, PolicyError> {
    PolicyExpr::parse(content).map_err(|source| PolicyError::BadContent {
        name: name.to_owned(),
        source,
    })
}

/// A held policy-folder lock, released on drop.
#[derive(Debug)]
pub struct PolicyLock {
    _lock: LockGuard,
}

/// What holds a [`PolicyLock`]: a file lock (a directory datastore, shared
/// with other processes) or a lock within this process (a datastore reached
/// over the vSphere datastore file API, which has no locks).
#[derive(Debug)]
enum LockGuard {
    File(#[allow(dead_code)] FileLock),
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

impl PolicyLock {
    /// A shared lock held within this process.
    pub fn in_process_shared(guard: tokio::sync::OwnedRwLockReadGuard<()>) -> Self {
        Self {
            _lock: LockGuard::Shared(guard),
        }
    }

    /// An exclusive lock held within this process.
    pub fn in_process_exclusive(guard: tokio::sync::OwnedRwLockWriteGuard<()>) -> Self {
        Self {
            _lock: LockGuard::Exclusive(guard),
        }
    }
}

/// The policy folder `dockvols/policies` of the first VSAN datastore,
/// wherever that datastore is: a directory on this host ([`PolicyStore`],
/// through the datastore door) or the vSphere datastore file API (the
/// `vsphere` backend's). The policy operations of [`crate::VolumeService`]
/// work on this.
///
/// Contract: names are validated by the caller ([`validate_name`]); reads
/// are bounded; `lock_shared` creates nothing and answers `None` when no
/// policy was ever created; writes create the folders they need.
#[async_trait::async_trait]
pub trait PolicyFiles: Send + Sync + fmt::Debug {
    /// The datastore holding the policies.
    fn datastore(&self) -> &str;
    /// `[datastore] dockvols/policies`, for messages.
    fn shown(&self) -> DsPath {
        DsPath::new(
            self.datastore(),
            &format!("{}/{POLICIES_DIR}", crate::datastore::DOCKVOLS),
        )
    }
    /// How a policy's file is named in messages.
    fn path(&self, name: &str) -> DsPath {
        self.shown().join(name)
    }
    /// Shared lock for using a policy; `None` when the folder does not
    /// exist (no policy was ever created).
    async fn lock_shared(&self) -> Result<Option<PolicyLock>, PolicyError>;
    /// Exclusive lock for changing policies; creates the folder.
    async fn lock_exclusive(&self) -> Result<PolicyLock, PolicyError>;
    /// A policy's content (without the trailing newline).
    async fn read(&self, name: &str) -> Result<Option<String>, PolicyError>;
    /// Every policy as (name, content), sorted by name; entries that cannot
    /// be policies are skipped.
    async fn list(&self) -> Result<Vec<(String, String)>, PolicyError>;
    /// The policy names, sorted.
    async fn names(&self) -> Result<Vec<String>, PolicyError> {
        Ok(self.list().await?.into_iter().map(|(n, _)| n).collect())
    }
    /// Writes a policy (content plus a newline).
    async fn write(&self, name: &str, content: &str) -> Result<(), PolicyError>;
    /// Removes a policy and its failed-updates record.
    async fn remove(&self, name: &str) -> Result<(), PolicyError>;
    /// The volumes a policy's last update could not reach, if any.
    async fn failed_updates(&self, name: &str) -> Result<Option<FailedUpdates>, PolicyError>;
    /// Records the volumes an update could not reach.
    async fn record_failed_updates(&self, name: &str, record: &FailedUpdates) -> Result<(), PolicyError>;
    /// Drops the failed-updates record of a policy, if there is one.
    async fn clear_failed_updates(&self, name: &str) -> Result<(), PolicyError>;
}

/// A policy file's bytes as its content: UTF-8 text without the trailing
/// newline.
pub fn decode_policy(bytes: Vec<u8>, file: &DsPath) -> Result<String, PolicyError> {
    let text = String::from_utf8(bytes).map_err(|_| PolicyError::Io {
        op: "read policy",
        path: file.to_string(),
        source: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"),
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// A failed-updates record's bytes, checked for its version. An unreadable
/// record is an error, never ignored: it is the administrator's only list
/// of volumes left on old settings.
pub fn decode_failed_updates(bytes: &[u8], file: &DsPath) -> Result<FailedUpdates, PolicyError> {
    let bad = |what: String| PolicyError::Io {
        op: "read failed policy updates",
        path: file.to_string(),
        source: io::Error::new(io::ErrorKind::InvalidData, what),
    };
    let record: FailedUpdates = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if record.version != FAILED_UPDATES_VERSION {
        return Err(bad(format!(
            "unsupported version {} (this agent reads {FAILED_UPDATES_VERSION})",
            record.version
        )));
    }
    Ok(record)
}

/// The bytes of a failed-updates record.
pub fn encode_failed_updates(record: &FailedUpdates) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(record).expect("plain data serializes");
    json.push(b'\n');
    json
}

/// Largest policy file read (an expression is a line of text).
pub const MAX_POLICY_BYTES: u64 = 64 * 1024;

/// The policy folder of one VSAN datastore, reached through the datastore
/// door ([`crate::store`]): no file in it is followed through a link, and
/// only regular files are read.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    ds: Datastore,
}

impl PolicyStore {
    /// The store of the first VSAN datastore in `datastores`.
    pub fn of(datastores: &[Datastore]) -> Result<Self, PolicyError> {
        let ds = datastores.iter().find(|d| d.vsan).ok_or(PolicyError::NoVsanDatastore)?;
        Ok(Self { ds: ds.clone() })
    }

    /// `[datastore] dockvols/policies`, for messages.
    pub fn shown(&self) -> DsPath {
        DsPath::new(&self.ds.name, &format!("{}/{POLICIES_DIR}", crate::datastore::DOCKVOLS))
    }

    /// `<datastore>/dockvols/policies` on this host (a datastore reached as
    /// a directory).
    pub fn dir(&self) -> PathBuf {
        self.ds
            .root
            .clone()
            .unwrap_or_default()
            .join(crate::datastore::DOCKVOLS)
            .join(POLICIES_DIR)
    }

    /// The datastore holding the policies.
    pub fn datastore(&self) -> &str {
        &self.ds.name
    }

    /// How a (validated) policy name's file is named in messages.
    pub fn path(&self, name: &str) -> DsPath {
        self.shown().join(name)
    }

    fn folder(&self, create: bool) -> Result<Option<Dir>, PolicyError> {
        self.ds.policies(create).map_err(PolicyError::Store)
    }

    fn lock(&self, dir: &Dir, exclusive: bool) -> Result<PolicyLock, PolicyError> {
        let l = dir.lock_file(LOCK_FILE, exclusive, true)?;
        Ok(PolicyLock {
            _lock: LockGuard::File(l.expect("a blocking lock is always taken")),
        })
    }

    /// Shared lock for using a policy; `None` when no policy was ever
    /// created (the folder does not exist, and using a policy creates
    /// nothing).
    pub fn lock_shared(&self) -> Result<Option<PolicyLock>, PolicyError> {
        match self.folder(false)? {
            Some(d) => self.lock(&d, false).map(Some),
            None => Ok(None),
        }
    }

    /// Exclusive lock for changing policies; creates the folder.
    pub fn lock_exclusive(&self) -> Result<PolicyLock, PolicyError> {
        let d = self.folder(true)?.expect("created");
        self.lock(&d, true)
    }

    /// The content of a policy (without the trailing newline).
    pub fn read(&self, name: &str) -> Result<Option<String>, PolicyError> {
        let Some(dir) = self.folder(false)? else {
            return Ok(None);
        };
        Self::read_in(&dir, name)
    }

    fn read_in(dir: &Dir, name: &str) -> Result<Option<String>, PolicyError> {
        let Some(bytes) = dir.read_bounded(name, MAX_POLICY_BYTES)? else {
            return Ok(None);
        };
        decode_policy(bytes, &dir.file(name)).map(Some)
    }

    /// Every policy as (name, content), sorted by name. Entries that cannot
    /// be policies (the lock, temp files, anything but a regular file) are
    /// skipped.
    pub fn list(&self) -> Result<Vec<(String, String)>, PolicyError> {
        let Some(dir) = self.folder(false)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in dir.entries()? {
            if validate_name(&entry.name).is_err() || entry.kind.is_some_and(|k| k != FileKind::Regular) {
                continue;
            }
            match Self::read_in(&dir, &entry.name) {
                Ok(Some(content)) => out.push((entry.name, content)),
                Ok(None) => {}
                Err(PolicyError::Store(StoreError::WrongKind { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort();
        Ok(out)
    }

    /// The policy names, sorted.
    pub fn names(&self) -> Result<Vec<String>, PolicyError> {
        Ok(self.list()?.into_iter().map(|(n, _)| n).collect())
    }

    /// Writes a policy file atomically (content plus a newline).
    pub fn write(&self, name: &str, content: &str) -> Result<(), PolicyError> {
        let dir = self.folder(true)?.expect("created");
        Ok(dir.write_atomic(name, format!("{content}\n").as_bytes())?)
    }

    /// Removes a policy file and its failed-updates record.
    pub fn remove(&self, name: &str) -> Result<(), PolicyError> {
        if let Some(dir) = self.folder(false)? {
            dir.remove(name)?;
            dir.sync()?;
        }
        self.clear_failed_updates(name)
    }

    fn failed_dir(&self, create: bool) -> Result<Option<Dir>, PolicyError> {
        match self.folder(create)? {
            Some(d) => Ok(d.subdir(FAILED_UPDATES_DIR, create.then_some(crate::store::DIR_MODE))?),
            None => Ok(None),
        }
    }

    /// The volumes a policy's last update could not reach, if any. An
    /// unreadable record is reported as an error, never ignored: it is the
    /// administrator's only list of volumes left on old settings.
    pub fn failed_updates(&self, name: &str) -> Result<Option<FailedUpdates>, PolicyError> {
        let Some(dir) = self.failed_dir(false)? else {
            return Ok(None);
        };
        let Some(text) = dir.read_bounded(name, MAX_FAILED_UPDATES_BYTES)? else {
            return Ok(None);
        };
        decode_failed_updates(&text, &dir.file(name)).map(Some)
    }

    /// Records (atomically) the volumes an update could not reach.
    pub fn record_failed_updates(&self, name: &str, record: &FailedUpdates) -> Result<(), PolicyError> {
        let dir = self.failed_dir(true)?.expect("created");
        Ok(dir.write_atomic(name, &encode_failed_updates(record))?)
    }

    /// Drops the failed-updates record of a policy, if there is one.
    pub fn clear_failed_updates(&self, name: &str) -> Result<(), PolicyError> {
        if let Some(dir) = self.failed_dir(false)? {
            if dir.remove(name)? {
                dir.sync()?;
            }
        }
        Ok(())
    }
}

/// Largest failed-updates record read.
pub const MAX_FAILED_UPDATES_BYTES: u64 = 16 << 20;

impl PolicyStore {
    /// Runs a blocking store call on tokio's blocking pool (file locks
    /// wait, and file calls block).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&PolicyStore) -> Result<T, PolicyError> + Send + 'static,
    ) -> Result<T, PolicyError> {
        let store = self.clone();
        vmdk_common::runtime::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| PolicyError::Io {
                op: "run policy worker for",
                path: self.shown().to_string(),
                source: io::Error::other(e.to_string()),
            })?
    }
}

/// The directory implementation: every call runs on the blocking pool.
#[async_trait::async_trait]
impl PolicyFiles for PolicyStore {
    fn datastore(&self) -> &str {
        &self.ds.name
    }

    async fn lock_shared(&self) -> Result<Option<PolicyLock>, PolicyError> {
        self.blocking(|s| s.lock_shared()).await
    }

    async fn lock_exclusive(&self) -> Result<PolicyLock, PolicyError> {
        self.blocking(|s| s.lock_exclusive()).await
    }

    async fn read(&self, name: &str) -> Result<Option<String>, PolicyError> {
        let name = name.to_owned();
        self.blocking(move |s| s.read(&name)).await
    }

    async fn list(&self) -> Result<Vec<(String, String)>, PolicyError> {
        self.blocking(|s| s.list()).await
    }

    async fn write(&self, name: &str, content: &str) -> Result<(), PolicyError> {
        let (name, content) = (name.to_owned(), content.to_owned());
        self.blocking(move |s| s.write(&name, &content)).await
    }

    async fn remove(&self, name: &str) -> Result<(), PolicyError> {
        let name = name.to_owned();
        self.blocking(move |s| s.remove(&name)).await
    }

    async fn failed_updates(&self, name: &str) -> Result<Option<FailedUpdates>, PolicyError> {
        let name = name.to_owned();
        self.blocking(move |s| s.failed_updates(&name)).await
    }

    async fn record_failed_updates(&self, name: &str, record: &FailedUpdates) -> Result<(), PolicyError> {
        let (name, record) = (name.to_owned(), record.clone());
        self.blocking(move |s| s.record_failed_updates(&name, &record)).await
    }

    async fn clear_failed_updates(&self, name: &str) -> Result<(), PolicyError> {
        let name = name.to_owned();
        self.blocking(move |s| s.clear_failed_updates(&name)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["SW=2", "gold", "RAID-5 fast", "a.b", "FTT=1,SW=2", "ünï"] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a\\b",
            "a\"b",
            "a\0b",
            "a\nb",
            "x.tmp",
            " x",
            "x ",
            &"n".repeat(101),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn messages_follow_the_original() {
        let e = PolicyError::NotFound {
            name: "X".into(),
            available: vec!["gold".into(), "silver".into()],
        };
        assert_eq!(
            e.to_string(),
            "Policy X does not exist. Available policies are: ['gold', 'silver']"
        );
        let e = PolicyError::NotFound {
            name: "X".into(),
            available: vec![],
        };
        assert_eq!(e.to_string(), "Policy X does not exist.");
        let e = PolicyError::InUse {
            name: "SW=2".into(),
            volumes: vec!["a@vsan".into(), "b@vsan".into()],
        };
        assert_eq!(
            e.to_string(),
            "Cannot remove. Policy SW=2 is in use by a@vsan and 1 more volume (b@vsan)"
        );
    }

    #[test]
    fn store_round_trip_skips_non_policies() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore {
            name: "vsan".into(),
            root: Some(dir.path().to_owned()),
            vsan: true,
        };
        let store = PolicyStore::of(std::slice::from_ref(&ds)).unwrap();
        assert!(store.lock_shared().unwrap().is_none());
        assert!(!store.dir().exists(), "a shared lock must not create the folder");
        let _l = store.lock_exclusive().unwrap();
        store.write("SW=2", r#"(("stripeWidth" i2))"#).unwrap();
        std::fs::write(store.dir().join("junk.tmp"), "x").unwrap();
        std::fs::create_dir(store.dir().join("subdir")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", store.dir().join("linked")).unwrap();
        assert_eq!(
            std::fs::read_to_string(store.dir().join("SW=2")).unwrap(),
            "((\"stripeWidth\" i2))\n"
        );
        assert!(matches!(
            store.read("linked"),
            Err(PolicyError::Store(StoreError::WrongKind { .. }))
        ));
        assert_eq!(
            store.list().unwrap(),
            vec![("SW=2".to_string(), r#"(("stripeWidth" i2))"#.to_string())]
        );
        let plain = Datastore { vsan: false, ..ds };
        assert!(matches!(PolicyStore::of(&[plain]), Err(PolicyError::NoVsanDatastore)));
    }
}
