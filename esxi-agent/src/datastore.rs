//! Datastores: named directories laid out like ESXi's `dockvols`, and the
//! volume folders in them, reached only through the [`crate::store`] door.
//!
//! ```text
//! <datastore>/dockvols/                          0700
//! <datastore>/dockvols/.vmdk-reserve             space kept back for a full datastore
//! <datastore>/dockvols/.vmdk-datastore           the datastore's type (VSAN or not)
//! <datastore>/dockvols/_DEFAULT/                 0700, a vmgroup folder
//! <datastore>/dockvols/_DEFAULT/<vol>.vmdk       descriptor        0600
//! <datastore>/dockvols/_DEFAULT/<vol>-flat.vmdk  extent            0600
//! <datastore>/dockvols/_DEFAULT/<vol>.vmfd       metadata sidecar  0600
//! <datastore>/dockvols/_DEFAULT/<vol>.lck        lock file         0600
//! ```
//!
//! The datastore root is the administrator's (configured); everything from
//! `dockvols` down is shared ground and never followed through a link, with
//! one exception: a vmgroup folder may be a symbolic link to a folder
//! directly inside the same `dockvols` (how vDVS named tenants' folders).
//!
//! [`VolumeFolder`] is what the volume service needs of a vmgroup folder:
//! locks, sidecars, markers, the names present. [`LocalFolder`] is the
//! directory implementation; the `vsphere` backend (datastore file API) and
//! shared-datastore leases put theirs behind the same trait.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::lock::VolumeLock;
use crate::meta::{MetaError, VolumeMeta, MAX_META_BYTES};
use crate::store::{Access, Dir, DsPath, Entry, FileKind, Stat, StoreError, DIR_MODE, FILE_MODE, TEMP_PREFIX};

/// Folder of all volumes on a datastore.
pub const DOCKVOLS: &str = "dockvols";
/// The vmgroup every VM belongs to until vmgroups are configured.
pub const DEFAULT_VMGROUP: &str = "_DEFAULT";
/// Space kept back in `dockvols/` so that a full datastore still lets the
/// agent record detaches and removes (see [`LocalFolder`]).
pub const RESERVE_FILE: &str = ".vmdk-reserve";
/// Size of the reserve.
pub const RESERVE_BYTES: u64 = 8 << 20;
/// How much of the reserve one write that hit a full datastore frees.
pub const RESERVE_CHUNK: u64 = 256 << 10;

/// The datastore's recorded type, in `dockvols/`: `{"version":1,"vsan":true}`.
/// Kept with the datastore so that every process using it (the plugin's
/// embedded agent, `vmdk-agent serve`, the admin commands, another host)
/// agrees on whether it is VSAN, whatever flags each was started with.
pub const TYPE_FILE: &str = ".vmdk-datastore";
/// Version of [`TYPE_FILE`]'s format.
pub const TYPE_VERSION: u32 = 1;
/// Larger [`TYPE_FILE`]s are not read.
const MAX_TYPE_BYTES: u64 = 4096;

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TypeRecord {
    version: u32,
    vsan: bool,
}

/// A configured datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    /// Name used in `vol@name`.
    pub name: String,
    /// Directory holding `dockvols/` (trusted: the administrator's), for a
    /// datastore this host reaches as a directory (`local` backend). A
    /// `vsphere` datastore has none: its files are reached over HTTP.
    pub root: Option<PathBuf>,
    /// Whether VSAN policies may be used here.
    pub vsan: bool,
}

impl Datastore {
    /// `[name]`, how the datastore is named in messages.
    pub fn shown(&self) -> DsPath {
        DsPath::new(&self.name, "")
    }

    fn root_dir(&self) -> Result<Dir, StoreError> {
        let root = self.root.as_deref().ok_or_else(|| StoreError::Io {
            op: "open",
            file: self.shown(),
            source: std::io::Error::other("this datastore is not a directory on this host"),
        })?;
        Dir::open_trusted(root, self.shown())
    }

    /// The `dockvols` folder (created 0700 when `create`); `None` when it
    /// does not exist. It must be a real directory.
    pub fn dockvols(&self, create: bool) -> Result<Option<Dir>, StoreError> {
        let root = self.root_dir()?;
        if !create {
            return root.subdir(DOCKVOLS, None);
        }
        let fresh = root.stat(DOCKVOLS)?.is_none();
        let dockvols = root.subdir(DOCKVOLS, Some(DIR_MODE))?;
        if fresh {
            // A new datastore gets its type recorded with it (see TYPE_FILE).
            if let Some(d) = &dockvols {
                if let Err(e) = write_type(d, self.vsan) {
                    tracing::warn!(datastore = %self.name, error = %crate::error::error_chain(&e), "cannot record the datastore's type");
                }
            }
        }
        Ok(dockvols)
    }

    /// The vmgroup folder `vmgroup` (created 0700 when `create`); `None`
    /// when it does not exist.
    pub fn folder(&self, vmgroup: &str, create: bool) -> Result<Option<LocalFolder>, StoreError> {
        let Some(dockvols) = self.dockvols(create)? else {
            return Ok(None);
        };
        let dir = match dockvols.subdir(vmgroup, create.then_some(DIR_MODE)) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(StoreError::WrongKind {
                found: FileKind::Symlink,
                ..
            }) => follow_group_link(&dockvols, vmgroup)?,
            Err(e) => return Err(e),
        };
        Ok(Some(LocalFolder::new(dir, dockvols, vmgroup, &self.name)))
    }

    /// The policy folder `dockvols/policies` (created when `create`).
    pub fn policies(&self, create: bool) -> Result<Option<Dir>, StoreError> {
        match self.dockvols(create)? {
            Some(d) => d.subdir(crate::policy::POLICIES_DIR, create.then_some(DIR_MODE)),
            None => Ok(None),
        }
    }

    /// The type recorded in [`TYPE_FILE`]: `Some(vsan)`, or `None` when
    /// nothing is recorded (no `dockvols/` or no file). A record that is not
    /// ours (bad JSON, unknown version) is an error naming the file.
    pub fn recorded_vsan(&self) -> Result<Option<bool>, StoreError> {
        let Some(dockvols) = self.dockvols(false)? else {
            return Ok(None);
        };
        let Some(bytes) = dockvols.read_bounded(TYPE_FILE, MAX_TYPE_BYTES)? else {
            return Ok(None);
        };
        let invalid = |why: String| StoreError::Io {
            op: "use the datastore type record",
            file: dockvols.file(TYPE_FILE),
            source: std::io::Error::other(why),
        };
        let rec: TypeRecord = serde_json::from_slice(&bytes).map_err(|e| {
            invalid(format!(
                "it is not {{\"version\":{TYPE_VERSION},\"vsan\":true|false}}: {e}"
            ))
        })?;
        if rec.version != TYPE_VERSION {
            return Err(invalid(format!(
                "its version {} is not {TYPE_VERSION}; a newer vmdk wrote it",
                rec.version
            )));
        }
        Ok(Some(rec.vsan))
    }

    /// Records the type in [`TYPE_FILE`] (atomically, durably) if the
    /// datastore has a `dockvols/`; a new `dockvols/` gets it when it is
    /// made ([`Datastore::dockvols`]), so a command that changes nothing
    /// else leaves an unused directory untouched. `false` when there is no
    /// `dockvols/` yet.
    pub fn record_vsan(&self, vsan: bool) -> Result<bool, StoreError> {
        match self.dockvols(false)? {
            Some(d) => write_type(&d, vsan).map(|()| true),
            None => Ok(false),
        }
    }

    /// What the agent does to a datastore when it starts serving: makes
    /// `dockvols/` and the default vmgroup folder private (0700, tightening
    /// looser modes left by older versions or other tools) and fills the
    /// space reserve.
    pub fn prepare(&self) -> Result<(), StoreError> {
        let dockvols = self.dockvols(true)?.expect("created");
        if dockvols.tighten_mode(DIR_MODE)? {
            tracing::warn!(folder = %dockvols.shown(), "made the folder private (0700)");
        }
        if let Some(f) = self.folder(DEFAULT_VMGROUP, true)? {
            if f.dir().tighten_mode(DIR_MODE)? {
                tracing::warn!(folder = %f.dir().shown(), "made the folder private (0700)");
            }
        }
        refill_reserve(&dockvols);
        Ok(())
    }

    /// Fills the space reserve back up, if there is room (after a remove
    /// freed space). Never fails: without room it stays as it is. Only a
    /// reserve [`Datastore::prepare`] made is refilled.
    pub fn refill_reserve(&self) {
        if let Ok(Some(d)) = self.dockvols(false) {
            if d.stat(RESERVE_FILE).is_ok_and(|s| s.is_some()) {
                refill_reserve(&d);
            }
        }
    }
}

fn write_type(dockvols: &Dir, vsan: bool) -> Result<(), StoreError> {
    let rec = serde_json::to_vec(&TypeRecord {
        version: TYPE_VERSION,
        vsan,
    })
    .expect("serializable");
    // Durable (write_atomic fsyncs): the type decides whether policies may
    // be used, so it must not revert after a crash.
    dockvols.write_atomic(TYPE_FILE, &rec)
}

/// Opens the target of vmgroup link `name` in `dockvols`: allowed only
/// when it names a real folder directly inside the same `dockvols`
/// (`other`, `./other`, or any path whose parent is this `dockvols`). The
/// folder is then opened by name beneath `dockvols`, never through the link.
fn follow_group_link(dockvols: &Dir, name: &str) -> Result<Dir, StoreError> {
    let foreign = || StoreError::ForeignLink {
        file: dockvols.file(name),
    };
    let target = dockvols.read_link(name)?;
    let trimmed = target.trim_end_matches('/');
    let (parent, last) = match trimmed.rsplit_once('/') {
        Some((p, l)) => (Some(if p.is_empty() { "/" } else { p }), l),
        None => (None, trimmed),
    };
    if last.is_empty() || last == "." || last == ".." || last == name {
        return Err(foreign());
    }
    if let Some(parent) = parent {
        // Identity only: the parent is compared with our `dockvols`, never
        // used to open anything.
        let st = nix::sys::stat::fstatat(dockvols.fd(), parent, nix::fcntl::AtFlags::empty()).map_err(|_| foreign())?;
        let here = dockvols.stat_self()?;
        if st.st_dev != here.id.dev || st.st_ino != here.id.ino {
            return Err(foreign());
        }
    }
    match dockvols.subdir(last, None) {
        Ok(Some(d)) => Ok(d.named(dockvols.file(name))),
        Ok(None) | Err(StoreError::WrongKind { .. }) | Err(StoreError::BadName { .. }) => Err(foreign()),
        Err(e) => Err(e),
    }
}

fn refill_reserve(dockvols: &Dir) {
    let file = match dockvols.create_new(RESERVE_FILE, FILE_MODE) {
        Ok(f) => f,
        Err(StoreError::Exists { .. }) => match dockvols.open(RESERVE_FILE, Access::ReadWrite) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot use the space reserve");
                return;
            }
        },
        Err(e) => {
            tracing::debug!(error = %crate::error::error_chain(&e), "cannot create the space reserve");
            return;
        }
    };
    // SAFETY: `file` is open for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, RESERVE_BYTES as libc::off_t) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "the space reserve is not full");
    }
}

/// Frees a chunk of the reserve in `dockvols`; `false` when it is empty
/// (or missing).
fn release_reserve(dockvols: &Dir) -> bool {
    let Ok(Some(file)) = dockvols.open(RESERVE_FILE, Access::ReadWrite) else {
        return false;
    };
    let Ok(meta) = file.metadata() else { return false };
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    if allocated == 0 {
        return false;
    }
    let start = allocated.saturating_sub(RESERVE_CHUNK);
    let len = if start == 0 {
        RESERVE_BYTES.max(allocated)
    } else {
        RESERVE_CHUNK
    };
    // SAFETY: `file` is open for the duration of the call.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return false;
    }
    tracing::warn!(datastore = %dockvols.shown().datastore(), freed = len, "the datastore is full; used part of the space reserve to record a change");
    true
}

/// The create and remove markers (see [`VolumeFiles::creating`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// `<vol>.creating`.
    Creating,
    /// `<vol>.removing`.
    Removing,
}

/// The file names that make up one volume in its vmgroup folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFiles {
    /// Volume part of the name.
    pub volume: String,
    /// `<vol>.vmdk`.
    pub descriptor: String,
    /// `<vol>-flat.vmdk`.
    pub flat: String,
    /// `<vol>.vmfd`.
    pub meta: String,
    /// `<vol>.lck`.
    pub lock: String,
    /// `<vol>.creating`: present while a create is under way. Files of a
    /// name without metadata are the agent's own leftovers only when this
    /// (or [`VolumeFiles::removing`]) marks them; anything else in the
    /// folder is never deleted or overwritten.
    pub creating: String,
    /// `<vol>.removing`: the sidecar, renamed when a remove starts.
    pub removing: String,
    /// Temp files older versions wrote beside the descriptor and sidecar.
    pub legacy_temps: [String; 2],
}

impl VolumeFiles {
    /// The names of `volume`'s files (a validated volume name).
    pub fn new(volume: &str) -> Self {
        Self {
            volume: volume.to_owned(),
            descriptor: format!("{volume}.vmdk"),
            flat: format!("{volume}-flat.vmdk"),
            meta: format!("{volume}.vmfd"),
            lock: format!("{volume}.lck"),
            creating: format!("{volume}.creating"),
            removing: format!("{volume}.removing"),
            legacy_temps: [format!("{volume}.vmdk.tmp"), format!("{volume}.vmfd.tmp")],
        }
    }

    /// A marker's file name.
    pub fn marker(&self, m: Marker) -> &str {
        match m {
            Marker::Creating => &self.creating,
            Marker::Removing => &self.removing,
        }
    }

    /// The volume a file in a vmgroup folder belongs to, with the kind of
    /// file it is, by the names [`VolumeFiles::new`] gives.
    pub fn volume_of_file(file: &str) -> Option<(&str, VolumeFile)> {
        use VolumeFile::*;
        [
            (".vmfd.tmp", Temp),
            (".vmdk.tmp", Temp),
            ("-flat.vmdk", Disk),
            (".vmdk", Disk),
            (".vmfd", Meta),
            (".lck", Lock),
            (".creating", Marker),
            (".removing", Marker),
        ]
        .into_iter()
        .find_map(|(suffix, kind)| Some((file.strip_suffix(suffix)?, kind)))
    }
}

/// What a `.creating` marker holds while its create runs on after its
/// answer (see `service::pending`): `{"step":"zeroing","percent":42}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct NotedProgress {
    step: String,
    percent: u8,
}
/// Larger markers are not read.
const MAX_NOTE_BYTES: u64 = 256;

/// The kinds of file a volume has in its vmgroup folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeFile {
    /// Descriptor or extent.
    Disk,
    /// The `.vmfd` sidecar.
    Meta,
    /// The lock file.
    Lock,
    /// A create or remove marker.
    Marker,
    /// `<vol>.vmfd.tmp` or `<vol>.vmdk.tmp`: a temp file of an atomic
    /// write of an older version (which named them after the volume).
    Temp,
}

/// What the volume service needs of one vmgroup folder. Every method
/// touches only the named volume's files, refuses entries that are not
/// regular files, and names files as [`DsPath`]s in its errors. Async,
/// because the `vsphere` backend reaches its datastores over HTTP and
/// shared-datastore leases over the network; [`LocalFolder`] runs its file
/// calls on tokio's blocking pool.
#[async_trait::async_trait]
pub trait VolumeFolder: Send + Sync + fmt::Debug {
    /// `[datastore] dockvols/<vmgroup>/<file>`, for messages.
    fn shown(&self, file: &str) -> DsPath;
    /// Waits until the volume's lock is held (across processes and hosts
    /// that share the datastore). Dropping it releases the lock, and
    /// removes the lock file if the volume has no sidecar then.
    async fn lock(&self, volume: &str) -> Result<VolumeLock, StoreError>;
    /// Takes the volume's lock, or `None` at once when it is held.
    async fn try_lock(&self, volume: &str) -> Result<Option<VolumeLock>, StoreError>;
    /// The volume's sidecar; `None` when there is none.
    async fn read_meta(&self, volume: &str) -> Result<Option<VolumeMeta>, MetaError>;
    /// Writes the volume's sidecar atomically and durably.
    async fn write_meta(&self, volume: &str, meta: &VolumeMeta) -> Result<(), MetaError>;
    /// Notes a running create's progress in its `.creating` marker, for
    /// `vmdk-agent ls` in other processes: a hint, not synced. By default
    /// nothing is noted.
    async fn note_progress(&self, _volume: &str, _step: &str, _percent: u8) -> Result<(), StoreError> {
        Ok(())
    }
    /// The progress noted in the volume's `.creating` marker: `(step,
    /// percent)`, or `None` when there is no marker or nothing (valid) in it.
    async fn noted_progress(&self, _volume: &str) -> Result<Option<(String, u8)>, StoreError> {
        Ok(None)
    }
    /// The entry `file` of this folder, not followed.
    async fn entry(&self, file: &str) -> Result<Option<Stat>, StoreError>;
    /// Creates a marker durably (a marker left by a crash is reused).
    async fn mark(&self, volume: &str, marker: Marker) -> Result<(), StoreError>;
    /// Whether a create or remove marker of the volume's exists.
    async fn marked(&self, volume: &str) -> Result<bool, StoreError>;
    /// Starts a remove: the sidecar becomes the remove marker, in one
    /// rename that needs no free space, so from here on the name is no
    /// volume and its leftovers are known to be ours.
    async fn begin_remove(&self, volume: &str) -> Result<(), StoreError>;
    /// Deletes both markers (not synced: a marker that comes back after a
    /// crash only makes the next start look at that name again).
    async fn clear_markers(&self, volume: &str) -> Result<(), StoreError>;
    /// Every entry of the folder.
    async fn list(&self) -> Result<Vec<Entry>, StoreError>;
    /// Deletes temp files of atomic writes whose writer is gone.
    async fn remove_stale_temp_files(&self) -> Result<usize, StoreError>;
    /// Deletes the volume's temp files of older versions (under its lock).
    async fn remove_legacy_temps(&self, volume: &str) -> Result<(), StoreError>;
}

/// A vmgroup folder on a directory datastore. Cheap to clone (the open
/// directories are shared).
///
/// When the datastore is full, writes that record a state change (sidecar
/// updates, markers) free a chunk of the datastore's space reserve
/// ([`RESERVE_FILE`]) and try once more, so that detach, unmount and remove
/// still work and say what really happened; creates never use the reserve.
#[derive(Debug, Clone)]
pub struct LocalFolder {
    inner: Arc<FolderInner>,
}

#[derive(Debug)]
struct FolderInner {
    dir: Dir,
    dockvols: Dir,
    vmgroup: String,
    datastore: String,
}

impl LocalFolder {
    fn new(dir: Dir, dockvols: Dir, vmgroup: &str, datastore: &str) -> Self {
        Self {
            inner: Arc::new(FolderInner {
                dir,
                dockvols,
                vmgroup: vmgroup.to_owned(),
                datastore: datastore.to_owned(),
            }),
        }
    }

    /// The folder's directory.
    pub fn dir(&self) -> &Dir {
        &self.inner.dir
    }

    /// The vmgroup.
    pub fn vmgroup(&self) -> &str {
        &self.inner.vmgroup
    }

    /// The datastore.
    pub fn datastore(&self) -> &str {
        &self.inner.datastore
    }

    /// Runs a state-recording write; on a full datastore frees part of the
    /// reserve and runs it once more.
    fn with_reserve<T>(&self, f: impl Fn() -> Result<T, StoreError>) -> Result<T, StoreError> {
        match f() {
            Err(e) if e.is_no_space() && release_reserve(&self.inner.dockvols) => f(),
            other => other,
        }
    }

    /// Opens the regular file `file` of this folder.
    pub fn open(&self, file: &str, access: Access) -> Result<Option<File>, StoreError> {
        self.dir().open(file, access)
    }

    /// Runs a blocking file call on tokio's blocking pool.
    async fn run<T, E>(&self, f: impl FnOnce(&LocalFolder) -> Result<T, E> + Send + 'static) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let me = self.clone();
        let shown = self.dir().shown().clone();
        vmdk_common::runtime::spawn_blocking(move || f(&me))
            .await
            .unwrap_or_else(|e| {
                Err(E::from(StoreError::Io {
                    op: "run a file call in",
                    file: shown,
                    source: std::io::Error::other(e.to_string()),
                }))
            })
    }

    /// [`VolumeFolder::lock`], on the calling thread.
    pub fn lock_blocking(&self, volume: &str, wait: bool) -> Result<Option<VolumeLock>, StoreError> {
        let files = VolumeFiles::new(volume);
        let l = self.with_reserve(|| self.dir().lock_file(&files.lock, true, wait))?;
        Ok(l.map(|l| VolumeLock::for_volume(l, files.meta.clone())))
    }

    /// [`VolumeFolder::read_meta`], on the calling thread.
    pub fn read_meta_blocking(&self, volume: &str) -> Result<Option<VolumeMeta>, MetaError> {
        let name = VolumeFiles::new(volume).meta;
        let Some(bytes) = self.dir().read_bounded(&name, MAX_META_BYTES)? else {
            return Ok(None);
        };
        VolumeMeta::decode(&bytes)
            .map(Some)
            .map_err(|source| MetaError::Corrupt {
                file: self.dir().file(&name),
                source,
            })
    }

    fn mark_blocking(&self, volume: &str, marker: Marker) -> Result<(), StoreError> {
        let files = VolumeFiles::new(volume);
        let name = files.marker(marker);
        let made = self.with_reserve(|| match self.dir().create_new(name, FILE_MODE) {
            Ok(_) => Ok(true),
            Err(StoreError::Exists { .. }) => Ok(false),
            Err(e) => Err(e),
        })?;
        if !made {
            // A marker of a crashed operation, reused; anything else under
            // the name is not ours.
            match self.dir().stat(name)? {
                Some(st) if st.kind == FileKind::Regular => {}
                Some(st) => {
                    return Err(StoreError::WrongKind {
                        file: self.dir().file(name),
                        found: st.kind,
                        expected: FileKind::Regular,
                    })
                }
                None => return self.mark_blocking(volume, marker),
            }
        }
        // The marker's existence (not its content) must survive a crash.
        self.dir().sync()
    }

    fn marked_blocking(&self, volume: &str) -> Result<bool, StoreError> {
        let files = VolumeFiles::new(volume);
        for name in [&files.creating, &files.removing] {
            if self.dir().stat(name)?.is_some_and(|s| s.kind == FileKind::Regular) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn begin_remove_blocking(&self, volume: &str) -> Result<(), StoreError> {
        let files = VolumeFiles::new(volume);
        match self.dir().rename_noreplace(&files.meta, &files.removing) {
            Ok(()) => {}
            Err(StoreError::Exists { .. }) => {
                // A marker of an earlier remove that stopped before it
                // deleted anything (the sidecar is still here): replace it.
                self.dir().remove(&files.removing)?;
                self.dir().rename_noreplace(&files.meta, &files.removing)?;
            }
            Err(e) => return Err(e),
        }
        self.dir().sync()
    }

    fn note_progress_blocking(&self, volume: &str, step: &str, percent: u8) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let files = VolumeFiles::new(volume);
        // Only an existing marker (a regular file, opened beneath the
        // folder) is written: never created here, never followed.
        let Some(f) = self.dir().open(&files.creating, Access::ReadWrite)? else {
            return Ok(());
        };
        let text = serde_json::to_vec(&NotedProgress {
            step: step.to_owned(),
            percent,
        })
        .expect("serializable");
        let io = |source| StoreError::Io {
            op: "note progress in",
            file: self.dir().file(&files.creating),
            source,
        };
        f.set_len(0).map_err(io)?;
        f.write_all_at(&text, 0).map_err(io)
    }

    fn noted_progress_blocking(&self, volume: &str) -> Result<Option<(String, u8)>, StoreError> {
        let files = VolumeFiles::new(volume);
        let Some(bytes) = self.dir().read_bounded(&files.creating, MAX_NOTE_BYTES)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<NotedProgress>(&bytes)
            .ok()
            .filter(|n| n.percent <= 100 && !n.step.is_empty() && n.step.len() <= 32)
            .map(|n| (n.step, n.percent)))
    }

    fn clear_markers_blocking(&self, volume: &str) -> Result<(), StoreError> {
        let files = VolumeFiles::new(volume);
        for name in [&files.creating, &files.removing] {
            self.dir().remove(name)?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl VolumeFolder for LocalFolder {
    fn shown(&self, file: &str) -> DsPath {
        self.dir().file(file)
    }

    async fn lock(&self, volume: &str) -> Result<VolumeLock, StoreError> {
        let volume = volume.to_owned();
        let l = self.run(move |f| f.lock_blocking(&volume, true)).await?;
        Ok(l.expect("a blocking lock is always taken"))
    }

    async fn try_lock(&self, volume: &str) -> Result<Option<VolumeLock>, StoreError> {
        let volume = volume.to_owned();
        self.run(move |f| f.lock_blocking(&volume, false)).await
    }

    async fn read_meta(&self, volume: &str) -> Result<Option<VolumeMeta>, MetaError> {
        let volume = volume.to_owned();
        self.run(move |f| f.read_meta_blocking(&volume)).await
    }

    async fn write_meta(&self, volume: &str, meta: &VolumeMeta) -> Result<(), MetaError> {
        let name = VolumeFiles::new(volume).meta;
        let bytes = meta.encode();
        self.run(move |f| Ok(f.with_reserve(|| f.dir().write_atomic(&name, &bytes))?))
            .await
    }

    async fn entry(&self, file: &str) -> Result<Option<Stat>, StoreError> {
        let file = file.to_owned();
        self.run(move |f| f.dir().stat(&file)).await
    }

    async fn mark(&self, volume: &str, marker: Marker) -> Result<(), StoreError> {
        let volume = volume.to_owned();
        self.run(move |f| f.mark_blocking(&volume, marker)).await
    }

    async fn marked(&self, volume: &str) -> Result<bool, StoreError> {
        let volume = volume.to_owned();
        self.run(move |f| f.marked_blocking(&volume)).await
    }

    async fn begin_remove(&self, volume: &str) -> Result<(), StoreError> {
        let volume = volume.to_owned();
        self.run(move |f| f.begin_remove_blocking(&volume)).await
    }

    async fn clear_markers(&self, volume: &str) -> Result<(), StoreError> {
        let volume = volume.to_owned();
        self.run(move |f| f.clear_markers_blocking(&volume)).await
    }

    async fn note_progress(&self, volume: &str, step: &str, percent: u8) -> Result<(), StoreError> {
        let (volume, step) = (volume.to_owned(), step.to_owned());
        self.run(move |f| f.note_progress_blocking(&volume, &step, percent))
            .await
    }

    async fn noted_progress(&self, volume: &str) -> Result<Option<(String, u8)>, StoreError> {
        let volume = volume.to_owned();
        self.run(move |f| f.noted_progress_blocking(&volume)).await
    }

    async fn list(&self) -> Result<Vec<Entry>, StoreError> {
        self.run(|f| f.dir().entries()).await
    }

    async fn remove_legacy_temps(&self, volume: &str) -> Result<(), StoreError> {
        let volume = volume.to_owned();
        self.run(move |f| {
            for name in &VolumeFiles::new(&volume).legacy_temps {
                f.dir().remove(name)?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_stale_temp_files(&self) -> Result<usize, StoreError> {
        self.run(|f| {
            let mut n = 0;
            for e in f.dir().entries()? {
                if e.name.starts_with(TEMP_PREFIX) && f.dir().remove_stale_temp(&e.name)? {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }
}

/// Whether `path` is inside `root` after resolving both (used by tests and
/// admin tools to assert no file escaped its datastore).
pub fn is_within(root: &Path, path: &Path) -> bool {
    match (std::fs::canonicalize(root), std::fs::canonicalize(path)) {
        (Ok(r), Ok(p)) => p.starts_with(r),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn ds() -> (tempfile::TempDir, Datastore) {
        let t = tempfile::tempdir().unwrap();
        let ds = Datastore {
            name: "local".into(),
            root: Some(t.path().to_owned()),
            vsan: false,
        };
        (t, ds)
    }

    #[test]
    fn vmgroup_links_only_within_the_same_dockvols() {
        let (t, ds) = ds();
        let dv = t.path().join(DOCKVOLS);
        std::fs::create_dir_all(dv.join("11111111-uuid")).unwrap();
        symlink("11111111-uuid", dv.join("tenant1")).unwrap();
        symlink(dv.join("11111111-uuid"), dv.join("tenant2")).unwrap();
        symlink("./11111111-uuid/", dv.join("tenant3")).unwrap();
        for g in ["tenant1", "tenant2", "tenant3"] {
            let f = ds.folder(g, false).unwrap().unwrap_or_else(|| panic!("{g}"));
            assert_eq!(f.shown("x").to_string(), format!("[local] dockvols/{g}/x"));
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("11111111-uuid")).unwrap();
        symlink(outside.path().join("11111111-uuid"), dv.join("evil1")).unwrap();
        symlink("/etc", dv.join("evil2")).unwrap();
        symlink("..", dv.join("evil3")).unwrap();
        symlink("tenant1", dv.join("evil4")).unwrap();
        symlink("11111111-uuid/deeper", dv.join("evil5")).unwrap();
        for g in ["evil1", "evil2", "evil3", "evil4", "evil5"] {
            let e = ds.folder(g, false).unwrap_err();
            assert!(matches!(e, StoreError::ForeignLink { .. }), "{g}: {e}");
        }
        assert!(ds.folder("evil2", true).is_err());
        assert!(!Path::new("/etc/x.lck").exists());
    }

    #[test]
    fn a_linked_dockvols_is_refused() {
        let (t, ds) = ds();
        let elsewhere = tempfile::tempdir().unwrap();
        symlink(elsewhere.path(), t.path().join(DOCKVOLS)).unwrap();
        assert!(matches!(
            ds.folder(DEFAULT_VMGROUP, true),
            Err(StoreError::WrongKind { .. })
        ));
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn folders_are_private_and_markers_refuse_links() {
        use std::os::unix::fs::PermissionsExt;
        let (t, ds) = ds();
        let f = ds.folder(DEFAULT_VMGROUP, true).unwrap().unwrap();
        for d in [t.path().join(DOCKVOLS), t.path().join(DOCKVOLS).join(DEFAULT_VMGROUP)] {
            assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        }
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        symlink(&target, t.path().join("dockvols/_DEFAULT/v.creating")).unwrap();
        assert!(matches!(
            f.mark("v", Marker::Creating).await,
            Err(StoreError::WrongKind { .. })
        ));
        assert!(!f.marked("v").await.unwrap());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        f.mark("w", Marker::Creating).await.unwrap();
        f.mark("w", Marker::Creating).await.unwrap();
        assert!(f.marked("w").await.unwrap());
        f.clear_markers("w").await.unwrap();
        assert!(!f.marked("w").await.unwrap());
    }
}
