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
//! a stamp younger than [`RACY_NS`] when it was taken is not trusted (the
//! next call looks again), so two changes within one tick are never
//! mistaken for one.
//!
//! An entry keeps compact strings and no sidecar: see [`Entry`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use vmdk_protocol::{AttachStatus, FormatRecord, PolicyState};

use crate::backend::DiskInfo;
use crate::datastore::{LocalFolder, VolumeFiles};
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
    /// is missing, not a regular file, or too young to be trusted. The
    /// extent's stat is returned too (its allocated bytes are current).
    pub(super) fn take(folder: &LocalFolder, volume: &str, racy_ns: i128) -> Option<(Self, Stat)> {
        let files = VolumeFiles::new(volume);
        let now = now_ns();
        let st = |name: &str| folder.dir().stat(name).ok().flatten();
        let meta = Stamp::trusted(&st(&files.meta)?, now, racy_ns)?;
        let descriptor = Stamp::trusted(&st(&files.descriptor)?, now, racy_ns)?;
        let ext = st(&files.flat)?;
        if ext.kind != FileKind::Regular {
            return None;
        }
        Some((
            Self {
                meta,
                descriptor,
                extent: Stamp::extent(&ext),
            },
            ext,
        ))
    }
}

/// What the catalog keeps of one volume: the three file stamps, the
/// sizes, flags, and every string in one allocation (144 bytes
/// inline and about 100 of text; see docs/performance.md).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    stamps: FileStamps,
    capacity_bytes: u64,
    allocated_bytes: u64,
    /// The attached VM, creation time, creator, disk UUID, and the format
    /// record's filesystem, time and VM, each ended by [`FIELD_END`]; then
    /// the options, `key KEY_END value PAIR_END` ...
    text: Box<str>,
    policy_state: Option<Box<PolicyState>>,
    /// [`ATTACHED`], [`THIN`], [`HAS_VM`], [`HAS_UUID`], [`FORMATTED`].
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

impl Entry {
    /// An entry for a volume read with `stamps` taken before the read;
    /// `None` when the metadata cannot be packed (a separator in a string:
    /// such a volume is simply read every time).
    pub(super) fn new(stamps: FileStamps, meta: &VolumeMeta, disk: &DiskInfo) -> Option<Self> {
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
            capacity_bytes: disk.capacity_bytes,
            allocated_bytes: disk.allocated_bytes,
            text: text.into_boxed_str(),
            policy_state: meta.policy_state.clone().map(Box::new),
            flags: flag(meta.status == AttachStatus::Attached, ATTACHED)
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
    /// The folder's stamp at the last complete scan; `None`: scan again.
    pub(super) scanned: Option<Stamp>,
    /// Volumes by name.
    pub(super) vols: HashMap<Box<str>, Entry>,
    /// Names with a `.creating` marker and no sidecar at the last scan.
    pub(super) creating: Vec<Box<str>>,
}

/// One [`FolderCatalog`] per datastore (same order as the service's).
#[derive(Debug, Default)]
pub(super) struct Catalog {
    /// Stamps younger than this are not trusted ([`RACY_NS`]).
    pub(super) racy_ns: i128,
    pub(super) folders: Vec<Mutex<FolderCatalog>>,
    /// Serializes scans of a folder (a second caller then finds it done).
    pub(super) scanning: Vec<tokio::sync::Mutex<()>>,
}

impl Catalog {
    pub(super) fn new(datastores: usize) -> Self {
        Self {
            racy_ns: RACY_NS,
            folders: (0..datastores).map(|_| Mutex::default()).collect(),
            scanning: (0..datastores).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// Get's check: the entry of `volume` if its files still carry the
    /// stamps it was read with, with the extent's current allocation.
    pub(super) fn lookup(&self, ds: usize, folder: &LocalFolder, volume: &str) -> Option<(VolumeMeta, DiskInfo)> {
        let (now, ext) = FileStamps::take(folder, volume, self.racy_ns)?;
        let cat = self.folders.get(ds)?.lock().unwrap();
        let e = cat.vols.get(volume).filter(|e| e.stamps == now)?;
        Some((e.meta(), e.disk(Some(ext.allocated))))
    }

    /// Records what a read of `volume` found (stamps taken before it).
    pub(super) fn store(&self, ds: usize, volume: &str, stamps: FileStamps, meta: &VolumeMeta, disk: &DiskInfo) {
        let Some(cat) = self.folders.get(ds) else { return };
        let mut cat = cat.lock().unwrap();
        match Entry::new(stamps, meta, disk) {
            Some(e) => {
                cat.vols.insert(volume.into(), e);
            }
            None => {
                cat.vols.remove(volume);
            }
        }
    }
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

/// The folder's current stamp, as [`FolderCatalog::scanned`] holds it.
pub(super) fn folder_stamp(st: &Stat) -> Stamp {
    Stamp::of(st)
}

/// Whether an entry is still good for List: same sidecar, disks there.
pub(super) fn entry_current(e: &Entry, sidecar: Option<Stamp>, disks: bool) -> bool {
    disks && sidecar == Some(e.stamps.meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_pack_options_and_give_back_the_metadata() {
        let st = Stamp {
            ino: 1,
            size: 2,
            ctime_ns: 3,
            mtime_ns: 4,
        };
        let stamps = FileStamps {
            meta: st,
            descriptor: st,
            extent: st,
        };
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
        let e = Entry::new(stamps, &meta, &disk).unwrap();
        assert_eq!(e.meta(), meta);
        assert_eq!(e.holder(), Some("vm-2"));
        assert_eq!(e.disk(None), disk);
        assert_eq!(e.disk(Some(8192)).allocated_bytes, 8192);
        let mut odd = meta.clone();
        odd.vol_opts.insert("k".into(), "a\u{1f}b".into());
        assert!(Entry::new(stamps, &odd, &disk).is_none());
        let mut odd = meta.clone();
        odd.created_by = "vm\u{1d}x".into();
        assert!(Entry::new(stamps, &odd, &disk).is_none());
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
        let e = Entry::new(stamps, &bare, &bare_disk).unwrap();
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
        let e = Entry::new(stamps, &empty, &disk).unwrap();
        assert_eq!(e.meta(), empty);
        assert_eq!(e.holder(), Some(""));
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
