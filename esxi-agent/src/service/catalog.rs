//! The volume catalog: what Get and List need of every volume, in memory,
//! revalidated against the datastore by change times instead of read again.
//!
//! Only datastores this host reaches as directories (the `local` backend)
//! have one; every file is looked at through the datastore door
//! (`store::Dir`), never through a link.
//!
//! * **List** stats the vmgroup folder (one `fstat` of a freshly opened
//!   folder: identity, mtime, ctime). Unchanged since the last scan, the
//!   entries are used as they are. Changed (an entry was created, deleted
//!   or renamed into it: every sidecar rewrite is an atomic rename, by this
//!   process, another agent, or `vmdk-agent set`), it is listed again and
//!   each sidecar stat'ed; only volumes whose sidecar changed (inode, ctime,
//!   size) or whose disk files are missing are read again.
//! * **Get** stats the volume's sidecar, descriptor and extent and compares
//!   them with the entry; equal, it answers from memory (the extent's
//!   allocated bytes come fresh from that stat), else it reads the volume.
//!
//! Timestamps are coarse (a clock tick, or a second on some file systems):
//! a stamp younger than [`RACY_NS`] when it was taken is not trusted, so
//! two changes within one tick are never mistaken for one. A folder whose
//! stamp has not changed since the last scan but is still that young is
//! answered from the catalog until the stamp is old enough, and then
//! scanned once more (so one scan, not one per List, follows a change).
//!
//! * **The agent's own writes** (create, attach, detach, formatted, set,
//!   remove) update their entry in place, under the volume's lock, right
//!   after the write. They change the folder too, so while this agent is
//!   changing a folder, List does not rescan it for every change: it
//!   answers from the catalog while a scan started within the last
//!   [`Catalog::tolerance`] (at least a second, and ten times the
//!   last scan's duration, so verification costs at most a tenth of the
//!   time), and a scan runs in the background to verify. So a change
//!   another process makes in a folder this agent is busy changing is seen
//!   by List within that time; Get, and every operation that writes, see it
//!   at once (they look at the volume's own files). A folder nobody here
//!   changed is checked on every List as before.
//!
//! An entry keeps compact strings and no sidecar: see [`Entry`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmdk_protocol::{AttachStatus, FormatRecord, PolicyState};

use crate::backend::{DiskBackend, DiskInfo, DiskRef};
use crate::datastore::{Datastore, LocalFolder, VolumeFiles, DEFAULT_VMGROUP};
use crate::meta::{VolumeMeta, META_VERSION};
use crate::store::{FileKind, Stat};

/// Stamps younger than this (nanoseconds) are not trusted: two seconds,
/// the coarsest timestamp granularity of the file systems a datastore may
/// be on.
pub const RACY_NS: i128 = 2_000_000_000;

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// What identifies one version of a file (or folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    ino: u64,
    size: u64,
    ctime_ns: i64,
    mtime_ns: i64,
}

impl Stamp {
    /// The stamp of `st`; `None` when it is too young to be trusted (or
    /// not a regular file or directory).
    pub(super) fn trusted(st: &Stat, now: i128, racy_ns: i128) -> Option<Self> {
        if !matches!(st.kind, FileKind::Regular | FileKind::Directory) {
            return None;
        }
        if now - st.ctime_ns.max(st.mtime_ns) < racy_ns {
            return None;
        }
        Some(Self::of(st))
    }

    fn of(st: &Stat) -> Self {
        Self {
            ino: st.id.ino,
            size: st.size,
            ctime_ns: st.ctime_ns as i64,
            mtime_ns: st.mtime_ns as i64,
        }
    }

    /// An extent changes with every write to the disk: only its identity
    /// and size (what the descriptor is checked against) count.
    fn extent(st: &Stat) -> Self {
        Self {
            ino: st.id.ino,
            size: st.size,
            ctime_ns: 0,
            mtime_ns: 0,
        }
    }
}

/// The stamps of a volume's three files, taken before they are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamps {
    meta: Stamp,
    descriptor: Stamp,
    extent: Stamp,
}

impl FileStamps {
    /// Stats the volume's sidecar, descriptor and extent: `None` when one
    /// is missing or not a regular file. The extent's stat is returned too
    /// (its allocated bytes are current), and whether the stamps can be
    /// trusted (none is younger than `racy_ns`).
    pub(super) fn take(folder: &LocalFolder, volume: &str, racy_ns: i128) -> Option<(Self, Stat, bool)> {
        let files = VolumeFiles::new(volume);
        let now = now_ns();
        let st = |name: &str| folder.dir().stat(name).ok().flatten();
        let (meta, descriptor) = (st(&files.meta)?, st(&files.descriptor)?);
        let ext = st(&files.flat)?;
        if [meta.kind, descriptor.kind, ext.kind]
            .iter()
            .any(|k| *k != FileKind::Regular)
        {
            return None;
        }
        let trusted =
            Stamp::trusted(&meta, now, racy_ns).is_some() && Stamp::trusted(&descriptor, now, racy_ns).is_some();
        Some((
            Self {
                meta: Stamp::of(&meta),
                descriptor: Stamp::of(&descriptor),
                extent: Stamp::extent(&ext),
            },
            ext,
            trusted,
        ))
    }
}

/// What the catalog keeps of one volume: the three file stamps, the
/// sizes, flags, and every string in one allocation (144 bytes
/// inline and about 100 of text; see docs/performance.md).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    stamps: FileStamps,
    /// The folder's [`FolderCatalog::seq`] when this agent last wrote the
    /// volume (0: read, not written): a read that began before that write
    /// never replaces it.
    seq: u64,
    capacity_bytes: u64,
    allocated_bytes: u64,
    /// The attached VM, creation time, creator, disk UUID, and the format
    /// record's filesystem, time and VM, each ended by [`FIELD_END`]; then
    /// the options, `key KEY_END value PAIR_END` ...
    text: Box<str>,
    policy_state: Option<Box<PolicyState>>,
    /// [`ATTACHED`], [`THIN`], [`HAS_VM`], [`HAS_UUID`], [`FORMATTED`],
    /// [`VERIFIED`] (the stamps were old enough to be trusted when taken).
    flags: u8,
}

const KEY_END: char = '\u{1f}';
const PAIR_END: char = '\u{1e}';
const FIELD_END: char = '\u{1d}';
/// Fields before the options in [`Entry::text`].
const FIELDS: usize = 7;
const ATTACHED: u8 = 1;
const THIN: u8 = 2;
const HAS_VM: u8 = 4;
const HAS_UUID: u8 = 8;
const FORMATTED: u8 = 16;
const VERIFIED: u8 = 32;

impl Entry {
    /// An entry for a volume read with `stamps` taken before the read;
    /// `verified`: the stamps were old enough to be trusted (an entry whose
    /// stamps are not, just written, serves List, never Get, and the next
    /// scan reads the volume again). `None` when the metadata cannot be packed (a separator in a string:
    /// such a volume is simply read every time).
    pub(super) fn new(stamps: FileStamps, verified: bool, meta: &VolumeMeta, disk: &DiskInfo) -> Option<Self> {
        let fmt = meta.formatted.as_ref();
        let fields = [
            meta.attached_vm.as_deref().unwrap_or(""),
            &meta.created,
            &meta.created_by,
            disk.uuid.as_deref().unwrap_or(""),
            fmt.map_or("", |f| f.fstype.as_str()),
            fmt.map_or("", |f| f.at.as_str()),
            fmt.map_or("", |f| f.by.as_str()),
        ];
        let seps = [KEY_END, PAIR_END, FIELD_END];
        let opts = meta.vol_opts.iter().flat_map(|(k, v)| [k, v]);
        if fields
            .iter()
            .copied()
            .chain(opts.clone().map(String::as_str))
            .any(|s| s.contains(seps))
        {
            return None;
        }
        let len = fields.iter().map(|f| f.len() + 1).sum::<usize>()
            + meta.vol_opts.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>();
        let mut text = String::with_capacity(len);
        for f in fields {
            text.push_str(f);
            text.push(FIELD_END);
        }
        for (k, v) in &meta.vol_opts {
            text.push_str(k);
            text.push(KEY_END);
            text.push_str(v);
            text.push(PAIR_END);
        }
        let flag = |on: bool, f: u8| if on { f } else { 0 };
        Some(Self {
            stamps,
            seq: 0,
            capacity_bytes: disk.capacity_bytes,
            allocated_bytes: disk.allocated_bytes,
            text: text.into_boxed_str(),
            policy_state: meta.policy_state.clone().map(Box::new),
            flags: flag(meta.status == AttachStatus::Attached, ATTACHED)
                | flag(verified, VERIFIED)
                | flag(disk.thin, THIN)
                | flag(meta.attached_vm.is_some(), HAS_VM)
                | flag(disk.uuid.is_some(), HAS_UUID)
                | flag(fmt.is_some(), FORMATTED),
        })
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The first [`FIELDS`] strings, then the packed options.
    fn fields(&self) -> ([&str; FIELDS], &str) {
        let mut it = self.text.splitn(FIELDS + 1, FIELD_END);
        let fields = std::array::from_fn(|_| it.next().unwrap_or(""));
        (fields, it.next().unwrap_or(""))
    }

    /// The metadata as far as Get and List use it (the attachment's device
    /// and time are not kept: an operation that writes the sidecar reads
    /// it again under the volume's lock).
    pub(super) fn meta(&self) -> VolumeMeta {
        let ([vm, created, created_by, _, fstype, at, by], opts) = self.fields();
        let vol_opts: BTreeMap<String, String> = opts
            .split_terminator(PAIR_END)
            .filter_map(|p| p.split_once(KEY_END))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        VolumeMeta {
            version: META_VERSION,
            status: if self.has(ATTACHED) {
                AttachStatus::Attached
            } else {
                AttachStatus::Detached
            },
            vol_opts,
            created: created.to_owned(),
            created_by: created_by.to_owned(),
            attached_vm: self.has(HAS_VM).then(|| vm.to_owned()),
            attached_device: None,
            attached_at: None,
            formatted: self.has(FORMATTED).then(|| FormatRecord {
                fstype: fstype.to_owned(),
                at: at.to_owned(),
                by: by.to_owned(),
            }),
            policy_state: self.policy_state.as_deref().cloned(),
        }
    }

    /// The VM the records say holds the volume.
    pub(super) fn holder(&self) -> Option<&str> {
        let [vm, ..] = self.fields().0;
        (self.has(ATTACHED) && self.has(HAS_VM)).then_some(vm)
    }

    /// The disk as it was read, with `allocated` if a fresher figure is known.
    pub(super) fn disk(&self, allocated: Option<u64>) -> DiskInfo {
        let [_, _, _, uuid, ..] = self.fields().0;
        DiskInfo {
            capacity_bytes: self.capacity_bytes,
            allocated_bytes: allocated.unwrap_or(self.allocated_bytes),
            thin: self.has(THIN),
            uuid: self.has(HAS_UUID).then(|| uuid.to_owned()),
        }
    }
}

/// The catalog of one datastore's default vmgroup folder.
#[derive(Debug, Default)]
pub(super) struct FolderCatalog {
    /// The folder's stamp at the last complete scan, if it could be
    /// trusted; `None`: scan again before answering from the catalog
    /// (unless [`Catalog::answer`] tolerates it).
    pub(super) scanned: Option<Stamp>,
    /// Volumes by name.
    pub(super) vols: Vols,
    /// Names with a `.creating` marker and no sidecar at the last scan.
    pub(super) creating: Vec<Box<str>>,
    /// Every volume the last scan found has an entry (none was left out
    /// for options the catalog cannot pack), and every write of this agent
    /// since updated its entry.
    complete: bool,
    /// When the last scan began, and how long it took.
    last_scan: Option<(Instant, Duration)>,
    /// The folder's stamp when the last scan began, trusted or not.
    seen_folder: Option<Stamp>,
    /// This agent changed the folder since the last scan began.
    self_changed: bool,
    /// A verification scan is running in the background.
    verifying: bool,
    /// Counts this agent's writes (see [`Entry::seq`]) and the volumes
    /// found gone.
    seq: u64,
    /// Volumes this agent removed, with the [`FolderCatalog::seq`] of the
    /// removal: a read that began before it never brings one back.
    removed: Vec<(Box<str>, u64)>,
}

/// A folder's entries by volume name, with a count of the changes to the
/// set of names: equal counts, equal names (what lets Docker's List reuse
/// its last answer, see [`VolumeService::list_names_since`]). Every change
/// goes through these methods, so no change to the names can miss the
/// count.
///
/// [`VolumeService::list_names_since`]: crate::service::VolumeService::list_names_since
#[derive(Debug, Default)]
pub(super) struct Vols {
    map: HashMap<Box<str>, Entry>,
    names: u64,
}

impl Vols {
    pub(super) fn get(&self, volume: &str) -> Option<&Entry> {
        self.map.get(volume)
    }

    #[cfg(test)]
    pub(super) fn contains_key(&self, volume: &str) -> bool {
        self.map.contains_key(volume)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Box<str>, &Entry)> {
        self.map.iter()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &Box<str>> {
        self.map.keys()
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The count of changes to the set of names (not to the entries).
    pub(super) fn names(&self) -> u64 {
        self.names
    }

    fn insert(&mut self, volume: Box<str>, e: Entry) {
        if self.map.insert(volume, e).is_none() {
            self.names += 1;
        }
    }

    fn remove(&mut self, volume: &str) -> Option<Entry> {
        let e = self.map.remove(volume);
        if e.is_some() {
            self.names += 1;
        }
        e
    }

    fn retain(&mut self, keep: impl FnMut(&Box<str>, &mut Entry) -> bool) {
        let before = self.map.len();
        self.map.retain(keep);
        if self.map.len() != before {
            self.names += 1;
        }
    }
}

/// How [`Catalog::answer`] says List may use a folder's catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// The folder has not changed since the last complete scan.
    Fresh,
    /// Only this agent is known to have changed it, and a scan began
    /// recently; `verify`: start a scan in the background now.
    Tolerated { verify: bool },
    /// Scan first.
    Stale,
}

/// One [`FolderCatalog`] per datastore (same order as the service's).
#[derive(Debug, Default)]
pub(super) struct Catalog {
    /// Stamps younger than this are not trusted ([`RACY_NS`]).
    pub(super) racy_ns: i128,
    pub(super) folders: Vec<RwLock<FolderCatalog>>,
    /// Serializes scans of a folder (a second caller then finds it done).
    pub(super) scanning: Vec<tokio::sync::Mutex<()>>,
}

/// How many volumes a scan looks at per hold of a folder's lock.
const LOCK_CHUNK: usize = 512;

/// The least time between two verification scans of a folder this agent
/// is changing.
const VERIFY_EVERY: Duration = Duration::from_secs(1);

/// What a scan read of the volumes whose entry could not be kept (an
/// option the catalog cannot pack): answered from the read, read again by
/// the next scan.
pub(super) type Uncached = Vec<(String, VolumeMeta, DiskInfo)>;

impl Catalog {
    pub(super) fn new(datastores: usize) -> Self {
        Self {
            racy_ns: RACY_NS,
            folders: (0..datastores).map(|_| RwLock::default()).collect(),
            scanning: (0..datastores).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// How often a folder this agent keeps changing is verified by a scan,
    /// after a scan that took `took`: every second at least, and no more
    /// than a tenth of the time.
    pub(super) fn tolerance(took: Duration) -> Duration {
        VERIFY_EVERY.max(took * 10)
    }

    /// Whether List may answer from catalog `ds` for a folder whose stat is
    /// `st` (see the module's documentation). `Tolerated { verify: true }`
    /// also marks a verification as started: the caller must run
    /// [`Catalog::refresh_blocking`] and then [`Catalog::verified`].
    pub(super) fn answer(&self, ds: usize, st: &Stat) -> Answer {
        let Some(cat) = self.folders.get(ds) else {
            return Answer::Stale;
        };
        let mut cat = cat.write().unwrap();
        if cat.scanned.is_some() && cat.scanned == Some(Stamp::of(st)) {
            return Answer::Fresh;
        }
        // Unchanged since the last scan, but too young to rule out a change
        // within the same clock tick: answered as it is until the stamp is
        // old enough, then scanned once more.
        if cat.complete
            && !cat.self_changed
            && cat.seen_folder == Some(Stamp::of(st))
            && Stamp::trusted(st, now_ns(), self.racy_ns).is_none()
        {
            return Answer::Tolerated { verify: false };
        }
        match cat.last_scan {
            Some((at, took)) if cat.complete && cat.self_changed => {
                let every = Self::tolerance(took);
                let age = at.elapsed();
                if age >= every * 2 {
                    return Answer::Stale;
                }
                let verify = age >= every && !cat.verifying;
                cat.verifying |= verify;
                Answer::Tolerated { verify }
            }
            _ => Answer::Stale,
        }
    }

    /// A background verification started by [`Catalog::answer`] or
    /// [`Catalog::wrote`] ended.
    pub(super) fn verified(&self, ds: usize) {
        if let Some(cat) = self.folders.get(ds) {
            cat.write().unwrap().verifying = false;
        }
    }

    /// Get's check: the entry of `volume` if its files still carry the
    /// stamps it was read with, with the extent's current allocation.
    pub(super) fn lookup(&self, ds: usize, folder: &LocalFolder, volume: &str) -> Option<(VolumeMeta, DiskInfo)> {
        let (now, ext, trusted) = FileStamps::take(folder, volume, self.racy_ns)?;
        if !trusted {
            return None;
        }
        let cat = self.folders.get(ds)?.read().unwrap();
        let e = cat.vols.get(volume).filter(|e| e.has(VERIFIED) && e.stamps == now)?;
        Some((e.meta(), e.disk(Some(ext.allocated))))
    }

    /// The folder's write count, taken before a read whose result is then
    /// given to [`Catalog::store`].
    pub(super) fn seq(&self, ds: usize) -> u64 {
        self.folders.get(ds).map_or(0, |c| c.read().unwrap().seq)
    }

    /// Records what a read of `volume` found (stamps taken before it, when
    /// the folder's write count was `seen`): kept unless this agent wrote
    /// or removed the volume since.
    pub(super) fn store(
        &self,
        ds: usize,
        volume: &str,
        (stamps, trusted): (FileStamps, bool),
        meta: &VolumeMeta,
        disk: &DiskInfo,
        seen: u64,
    ) {
        let Some(cat) = self.folders.get(ds) else { return };
        let mut cat = cat.write().unwrap();
        if cat.superseded(volume, seen) {
            return;
        }
        match Entry::new(stamps, trusted, meta, disk) {
            Some(e) => {
                cat.vols.insert(volume.into(), e);
            }
            None => {
                cat.vols.remove(volume);
                cat.complete = false;
            }
        }
    }

    /// This agent wrote `volume`'s sidecar (`meta`), under the volume's
    /// lock: its entry is updated in place. `disk` is the disk's
    /// description when the write made the volume (create); other writes
    /// keep the entry's. Returns whether a background verification should
    /// start now (see [`Catalog::answer`]).
    pub(super) fn wrote(
        &self,
        ds: usize,
        folder: &LocalFolder,
        volume: &str,
        meta: &VolumeMeta,
        disk: Option<&DiskInfo>,
    ) -> bool {
        let Some(cat) = self.folders.get(ds) else { return false };
        let taken = FileStamps::take(folder, volume, self.racy_ns);
        let mut cat = cat.write().unwrap();
        cat.seq += 1;
        cat.self_changed = true;
        let seq = cat.seq;
        cat.removed.retain(|(v, _)| **v != *volume);
        cat.creating.retain(|v| **v != *volume);
        let disk = match (disk, cat.vols.get(volume)) {
            (Some(d), _) => Some(d.clone()),
            (None, Some(e)) => Some(e.disk(taken.as_ref().map(|(_, ext, _)| ext.allocated))),
            (None, None) => None,
        };
        let entry = taken
            .zip(disk)
            .and_then(|((stamps, _, trusted), disk)| Entry::new(stamps, trusted, meta, &disk));
        match entry {
            Some(mut e) => {
                e.seq = seq;
                cat.vols.insert(volume.into(), e);
            }
            None => {
                cat.vols.remove(volume);
                cat.complete = false;
            }
        }
        cat.kick()
    }

    /// A write of this agent to `volume`'s sidecar failed: its entry goes,
    /// and List scans again before it answers from the catalog.
    pub(super) fn forget(&self, ds: usize, volume: &str) {
        let Some(cat) = self.folders.get(ds) else { return };
        let mut cat = cat.write().unwrap();
        cat.seq += 1;
        cat.vols.remove(volume);
        cat.complete = false;
        cat.scanned = None;
    }

    /// A read found `volume` gone though the catalog holds it (another
    /// process removed it): the entry goes, and List scans again before it
    /// answers from the catalog.
    pub(super) fn gone(&self, ds: usize, volume: &str) {
        let Some(cat) = self.folders.get(ds) else { return };
        let mut cat = cat.write().unwrap();
        if cat.vols.remove(volume).is_some() {
            // Counted, so a scan that ends meanwhile does not trust the
            // folder.
            cat.seq += 1;
            cat.complete = false;
            cat.scanned = None;
        }
    }

    /// This agent removed `volume` (its files are gone).
    pub(super) fn removed(&self, ds: usize, volume: &str) -> bool {
        let Some(cat) = self.folders.get(ds) else { return false };
        let mut cat = cat.write().unwrap();
        cat.seq += 1;
        cat.self_changed = true;
        let seq = cat.seq;
        cat.vols.remove(volume);
        cat.creating.retain(|v| **v != *volume);
        cat.removed.retain(|(v, _)| **v != *volume);
        cat.removed.push((volume.into(), seq));
        cat.kick()
    }

    /// Brings catalog `ds` up to date with its folder (blocking: run on the
    /// blocking pool, holding [`Catalog::scanning`]): lists the folder,
    /// stats each sidecar and reads again only the volumes that are new or
    /// changed, in parallel on a few threads.
    pub(super) fn refresh_blocking(
        &self,
        ds_index: usize,
        ds: &Datastore,
        folder: &LocalFolder,
        backend: &dyn DiskBackend,
    ) -> Result<Uncached, crate::store::StoreError> {
        let Some(cat) = self.folders.get(ds_index) else {
            return Ok(Vec::new());
        };
        let began = Instant::now();
        let seen = {
            let mut c = cat.write().unwrap();
            c.self_changed = false;
            c.seq
        };
        let folder_stat = folder.dir().stat_self()?;
        let scan = Scan::run(folder, &folder_stat, self.racy_ns)?;
        // Looked at in chunks, each under the lock on its own: a Get waits
        // for one chunk at most, never for the whole folder. `found` counts
        // the volumes found that have an entry, for the set of names the
        // count of changes `names_before` stands for.
        let names_before = cat.read().unwrap().vols.names();
        let mut found = 0;
        let reload: Vec<&str> = scan
            .volumes
            .chunks(LOCK_CHUNK)
            .flat_map(|chunk| {
                let c = cat.read().unwrap();
                chunk
                    .iter()
                    .filter(|(v, side, disks)| match c.vols.get(v.as_str()) {
                        Some(e) => {
                            found += 1;
                            !entry_current(e, *side, *disks)
                        }
                        None => true,
                    })
                    .map(|(v, _, _)| v.as_str())
                    .collect::<Vec<_>>()
            })
            .collect();
        let read = |volume: &str| -> Option<Result<Entry, (VolumeMeta, DiskInfo)>> {
            let full = format!("{volume}@{}", ds.name);
            let taken = FileStamps::take(folder, volume, self.racy_ns);
            let meta = match folder.read_meta_blocking(volume) {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(volume = %full, error = %crate::error::error_chain(&e), "skipping unreadable volume");
                    return None;
                }
            };
            let disk = DiskRef {
                datastore: ds,
                vmgroup: DEFAULT_VMGROUP,
                volume,
            };
            let disk = match backend.disk_info_in(folder, &disk)? {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(volume = %full, error = %crate::error::error_chain(&e), "skipping unreadable volume");
                    return None;
                }
            };
            // Packed at once: the full metadata of every volume is never
            // held at the same time.
            match taken.and_then(|(stamps, _, trusted)| Entry::new(stamps, trusted, &meta, &disk)) {
                Some(e) => Some(Ok(e)),
                None => Some(Err((meta, disk))),
            }
        };
        let results = read_in_parallel(&reload, &read);
        let mut c = cat.write().unwrap();
        // Entries of volumes no longer in the folder go, unless this agent
        // wrote them since the scan began (newer than the listing). None
        // can be there when no name changed since the chunks above and each
        // entry is of a volume found: then the whole map is not walked
        // under the lock.
        if c.vols.names() != names_before || c.vols.len() != found {
            let present: HashSet<&str> = scan.volumes.iter().map(|(v, _, _)| v.as_str()).collect();
            c.vols.retain(|v, e| e.seq > seen || present.contains(&**v));
        }
        let mut uncached = Vec::new();
        for (volume, r) in reload.iter().zip(results) {
            if c.superseded(volume, seen) {
                continue;
            }
            match r {
                Some(Ok(e)) => {
                    c.vols.insert((*volume).into(), e);
                }
                Some(Err((meta, disk))) => {
                    c.vols.remove(volume);
                    uncached.push((volume.to_string(), meta, disk));
                }
                None => {
                    c.vols.remove(volume);
                }
            }
        }
        c.seen_folder = Some(Stamp::of(&folder_stat));
        c.complete = uncached.is_empty();
        c.creating = scan.creating.iter().map(|v| v.as_str().into()).collect();
        c.removed.retain(|(_, at)| *at > seen);
        c.last_scan = Some((began, began.elapsed()));
        let updated = c.seq;
        drop(c);
        // Trusted only when every volume found has a current entry (one
        // too young to trust, or unreadable, is looked at again), checked
        // in chunks, and nothing was written or found gone meanwhile.
        let settled = scan.volumes.chunks(LOCK_CHUNK).all(|chunk| {
            let c = cat.read().unwrap();
            chunk.iter().all(|(v, side, disks)| c.current(v, *side, *disks))
        });
        let mut c = cat.write().unwrap();
        c.scanned = if settled && !c.self_changed && c.seq == updated {
            scan.folder
        } else {
            None
        };
        drop(c);
        // A big re-read leaves its temporary allocations behind.
        if reload.len() >= vmdk_common::memory::TRIM_VOLUMES {
            vmdk_common::memory::trim();
        }
        Ok(uncached)
    }
}

impl FolderCatalog {
    /// Whether `volume`'s entry is current for what a scan found (see
    /// [`entry_current`]).
    fn current(&self, volume: &str, sidecar: Option<Stamp>, disks: bool) -> bool {
        self.vols.get(volume).is_some_and(|e| entry_current(e, sidecar, disks))
    }

    /// This agent wrote or removed `volume` after a read that began at
    /// write count `seen`.
    fn superseded(&self, volume: &str, seen: u64) -> bool {
        self.vols.get(volume).is_some_and(|e| e.seq > seen)
            || self.removed.iter().any(|(v, at)| **v == *volume && *at > seen)
    }

    /// After a write of this agent: whether to start a verification scan
    /// now (one began more than [`Catalog::tolerance`] ago and none runs).
    fn kick(&mut self) -> bool {
        let due = match self.last_scan {
            Some((at, took)) => self.complete && at.elapsed() >= Catalog::tolerance(took),
            None => false,
        };
        let verify = due && !self.verifying;
        self.verifying |= verify;
        verify
    }
}

/// `read` of every name, on up to four threads when there are many.
fn read_in_parallel<T: Send>(names: &[&str], read: &(dyn Fn(&str) -> T + Sync)) -> Vec<T> {
    const PER_THREAD: usize = 256;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(names.len().div_ceil(PER_THREAD))
        .max(1);
    if threads == 1 {
        return names.iter().map(|n| read(n)).collect();
    }
    let chunk = names.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = names
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|n| read(n)).collect::<Vec<T>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// What a scan of a folder found: the folder's stamp (if trustworthy),
/// each volume whose sidecar is a regular file with the stamp of it and
/// whether its disk files are both there as regular files, and the names
/// being created.
pub(super) struct Scan {
    pub(super) folder: Option<Stamp>,
    pub(super) volumes: Vec<(String, Option<Stamp>, bool)>,
    pub(super) creating: Vec<String>,
}

impl Scan {
    /// Lists `folder` and stats each sidecar (blocking).
    pub(super) fn run(
        folder: &LocalFolder,
        folder_stat: &Stat,
        racy_ns: i128,
    ) -> Result<Self, crate::store::StoreError> {
        let now = now_ns();
        let entries = folder.dir().entries()?;
        let regular: std::collections::HashSet<&str> = entries
            .iter()
            .filter(|e| matches!(e.kind, Some(FileKind::Regular) | None))
            .map(|e| e.name.as_str())
            .collect();
        let mut volumes = Vec::new();
        let mut creating = Vec::new();
        for e in &entries {
            if let Some(volume) = e.name.strip_suffix(".creating") {
                if !regular.contains(format!("{volume}.vmfd").as_str())
                    && vmdk_protocol::name::validate_volume(volume).is_ok()
                {
                    creating.push(volume.to_owned());
                }
                continue;
            }
            let Some(volume) = e.name.strip_suffix(".vmfd") else {
                continue;
            };
            if vmdk_protocol::name::validate_volume(volume).is_err() {
                continue;
            }
            let files = VolumeFiles::new(volume);
            let disks = regular.contains(files.descriptor.as_str()) && regular.contains(files.flat.as_str());
            let stamp = match folder.dir().stat(&e.name) {
                Ok(Some(st)) => Stamp::trusted(&st, now, racy_ns),
                _ => None,
            };
            volumes.push((volume.to_owned(), stamp, disks));
        }
        Ok(Self {
            folder: Stamp::trusted(folder_stat, now, racy_ns),
            volumes,
            creating,
        })
    }
}

/// Whether an entry is still good: read with trusted stamps, same
/// sidecar, disks there.
pub(super) fn entry_current(e: &Entry, sidecar: Option<Stamp>, disks: bool) -> bool {
    disks && e.has(VERIFIED) && sidecar == Some(e.stamps.meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_stamps() -> FileStamps {
        let st = Stamp {
            ino: 1,
            size: 2,
            ctime_ns: 3,
            mtime_ns: 4,
        };
        FileStamps {
            meta: st,
            descriptor: st,
            extent: st,
        }
    }

    #[test]
    fn entries_pack_options_and_give_back_the_metadata() {
        let stamps = some_stamps();
        let meta = VolumeMeta {
            version: META_VERSION,
            status: AttachStatus::Attached,
            vol_opts: [
                ("size".to_string(), "1gb".to_string()),
                ("access".into(), "read-only".into()),
            ]
            .into(),
            created: "2026-12-01T00:00:00Z".into(),
            created_by: "vm-1".into(),
            attached_vm: Some("vm-2".into()),
            attached_device: None,
            attached_at: None,
            formatted: Some(FormatRecord {
                fstype: "ext4".into(),
                at: "2026-12-01T00:00:01Z".into(),
                by: "vm-2".into(),
            }),
            policy_state: None,
        };
        let disk = DiskInfo {
            capacity_bytes: 1 << 30,
            allocated_bytes: 4096,
            thin: true,
            uuid: Some("60 00 C2 9a".into()),
        };
        let e = Entry::new(stamps, true, &meta, &disk).unwrap();
        assert_eq!(e.meta(), meta);
        assert_eq!(e.holder(), Some("vm-2"));
        assert_eq!(e.disk(None), disk);
        assert_eq!(e.disk(Some(8192)).allocated_bytes, 8192);
        let mut odd = meta.clone();
        odd.vol_opts.insert("k".into(), "a\u{1f}b".into());
        assert!(Entry::new(stamps, true, &odd, &disk).is_none());
        let mut odd = meta.clone();
        odd.created_by = "vm\u{1d}x".into();
        assert!(Entry::new(stamps, true, &odd, &disk).is_none());
        // Absent and empty strings stay apart.
        let bare = VolumeMeta {
            status: AttachStatus::Detached,
            vol_opts: BTreeMap::new(),
            created_by: String::new(),
            attached_vm: None,
            formatted: None,
            policy_state: Some(PolicyState::Pending {
                profile: "p".into(),
                profile_id: "id".into(),
            }),
            ..meta.clone()
        };
        let bare_disk = DiskInfo {
            thin: false,
            uuid: None,
            ..disk.clone()
        };
        let e = Entry::new(stamps, true, &bare, &bare_disk).unwrap();
        assert_eq!(e.meta(), bare);
        assert_eq!(e.disk(None), bare_disk);
        assert_eq!(e.holder(), None);
        let empty = VolumeMeta {
            attached_vm: Some(String::new()),
            formatted: Some(FormatRecord {
                fstype: String::new(),
                at: String::new(),
                by: String::new(),
            }),
            ..meta.clone()
        };
        let e = Entry::new(stamps, true, &empty, &disk).unwrap();
        assert_eq!(e.meta(), empty);
        assert_eq!(e.holder(), Some(""));
    }

    #[test]
    fn a_read_that_began_before_a_remove_never_brings_the_volume_back() {
        let stamps = some_stamps();
        let meta = VolumeMeta {
            version: META_VERSION,
            status: AttachStatus::Detached,
            vol_opts: Default::default(),
            created: "2026-12-01T00:00:00Z".into(),
            created_by: "vm-1".into(),
            attached_vm: None,
            attached_device: None,
            attached_at: None,
            formatted: None,
            policy_state: None,
        };
        let disk = DiskInfo {
            capacity_bytes: 1 << 30,
            allocated_bytes: 0,
            thin: true,
            uuid: None,
        };
        let c = Catalog::new(1);
        let has = |c: &Catalog| c.folders[0].read().unwrap().vols.contains_key("v");
        let seen = c.seq(0);
        c.store(0, "v", (stamps, true), &meta, &disk, seen);
        assert!(has(&c));
        // A read begins, this agent removes the volume, the read ends.
        let seen = c.seq(0);
        c.removed(0, "v");
        assert!(!has(&c));
        c.store(0, "v", (stamps, true), &meta, &disk, seen);
        assert!(!has(&c), "a read older than the remove brought the volume back");
        // A read that began after the remove (the volume made again) counts.
        let seen = c.seq(0);
        c.store(0, "v", (stamps, true), &meta, &disk, seen);
        assert!(has(&c));
    }

    #[test]
    fn young_stamps_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let d = crate::store::Dir::open_trusted(dir.path(), crate::store::DsPath::new("ds", "")).unwrap();
        let st = d.stat("f").unwrap().unwrap();
        assert!(Stamp::trusted(&st, now_ns(), RACY_NS).is_none());
        assert!(Stamp::trusted(&st, now_ns() + RACY_NS, RACY_NS).is_some());
    }
}
