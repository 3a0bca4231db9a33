//! What each Docker volume operation means on this VM.
//!
//! [`VolumeManager`] owns the mount state: it attaches a volume through the
//! agent, finds the device, formats it on first use, mounts it under
//! `<mount-root>/<vol@ds>/`, and reference-counts Docker mount IDs. It knows
//! no HTTP; [`crate::plugin`] translates Docker's requests into calls here.
//!
//! Concurrency: Mount, Unmount and Remove of one volume are serialized by a
//! per-volume lock (Docker sends concurrent Mounts of one volume when two
//! containers start together); different volumes proceed in parallel.
//! Until start-up recovery has finished, those three operations and Create
//! wait for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{OnceCell, RwLock};
use vmdk_protocol::options::VolumeOptions;
use vmdk_protocol::size::human_bytes;
use vmdk_protocol::{
    AccessMode, AttachStatus, CreateRequest, ErrorCode, FormatRecord, FsType, NameError, OptionError, VolumeInfo,
    VolumeRef,
};

use crate::agent_client::{AgentCallError, AgentClient};
use crate::docker_api;
use crate::state::{MountRecord, PluginState, StateStore};
use crate::sys::{DataDir, SysError, System};
use vmdk_agent::service::{NameList, NamesKey};

/// Name of the directory inside each volume that Docker mounts.
pub const DATA_DIR: &str = "data";
/// How long a device may take to appear after attach.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// Mount IDs younger than this are never released by the periodic
/// reconcile (the container may still be starting).
pub const ID_GRACE: Duration = Duration::from_secs(120);
/// Prefix of IDs standing for containers found running at recovery.
pub const RECOVERED_PREFIX: &str = "recovered:";

/// Why a volume operation failed. The text is what Docker shows.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The volume name breaks the rules.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A create option is bad.
    #[error(transparent)]
    InvalidOption(#[from] OptionError),
    /// The filesystem asked for cannot be made on this VM.
    #[error("Not found mkfs for {fstype}\nSupported filesystems found: {found}")]
    MkfsMissing {
        /// The fstype asked for.
        fstype: FsType,
        /// The filesystems whose mkfs exists.
        found: String,
    },
    /// The agent refused or failed.
    #[error("{source}")]
    Agent {
        /// The volume.
        name: String,
        /// The cause.
        source: AgentCallError,
    },
    /// The volume does not exist.
    #[error("volume {0} does not exist")]
    NotFound(String),
    /// Remove of a volume this VM still has mounted.
    #[error("Remove failure - volume is still mounted.  volume={name}, refcount={refcount}")]
    StillMounted {
        /// The volume.
        name: String,
        /// Mount IDs holding it.
        refcount: usize,
    },
    /// The agent attached the disk but did not say where it is.
    #[error("volume {name}: the agent attached disk {disk_uuid} but did not say where this VM finds it (no device and no location)")]
    NoDevice {
        /// The volume.
        name: String,
        /// The disk UUID.
        disk_uuid: String,
    },
    /// A kernel call or program failed.
    #[error("volume {name}: {op} failed")]
    Sys {
        /// The volume.
        name: String,
        /// The step.
        op: &'static str,
        /// The cause.
        #[source]
        source: SysError,
    },
    /// The state file could not be written.
    #[error("volume {name}: cannot save mount state")]
    State {
        /// The volume.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered about another volume than the one asked for,
    /// or with a name that is not a valid `vol@datastore`.
    #[error("the agent answered for volume {got:?} when asked about {asked:?}; vmdk does not use an answer about another volume or with an invalid name")]
    AgentAnswer {
        /// The name asked about.
        asked: String,
        /// The name in the answer.
        got: String,
    },
    /// A name that should be canonical (`vol@datastore`) is not.
    #[error("{0:?} is not a volume name of the form vol@datastore")]
    NotCanonical(String),
    /// The agent named a device node outside `/dev`.
    #[error("volume {name}: the agent reported device {device:?}, which is not a device path under /dev; vmdk does not format or mount it")]
    BadDevice {
        /// The volume.
        name: String,
        /// The device path the agent gave.
        device: String,
    },
    /// The volume is recorded as formatted but its disk shows no
    /// filesystem: never formatted again.
    #[error("{}", formatted_but_blank_text(.name, .record, .device, .extent))]
    FormattedButBlank {
        /// The volume.
        name: String,
        /// What the agent recorded.
        record: FormatRecord,
        /// The device it was attached as.
        device: String,
        /// Where its extent lives on a `local` datastore.
        extent: String,
    },
    /// A never-formatted disk that holds data without a signature.
    #[error("volume {name}: its disk {device} holds data but no filesystem signature (the first non-zero byte is at offset {offset}); vmdk will not format over unknown data, so nothing was changed and the disk was detached again. Look at it with `blkid -p DISK` or `file -s DISK`; if the volume never held anything (its first Mount was cut off while formatting), remove it and create it again")]
    UnknownData {
        /// The volume.
        name: String,
        /// The device it was attached as.
        device: String,
        /// Offset of the first non-zero byte.
        offset: usize,
    },
    /// A never-formatted disk whose end holds data without a signature
    /// `blkid` reports (a backup GPT, RAID or ZFS labels).
    #[error("volume {name}: its disk {device} holds data but no filesystem signature: its last MiB, where backup partition tables (GPT) and RAID and ZFS labels sit, is not blank (a non-zero byte at offset {offset} of {size} bytes); vmdk will not format over unknown data, so nothing was changed and the disk was detached again. Look at it with `blkid -p DISK`, `wipefs DISK` or `fdisk -l DISK`; if the volume never held anything, remove it and create it again")]
    UnknownDataAtEnd {
        /// The volume.
        name: String,
        /// The device it was attached as.
        device: String,
        /// Offset of the first non-zero byte of the disk's last MiB.
        offset: u64,
        /// The disk's size in bytes.
        size: u64,
    },
    /// The filesystem was made (or found) but recording it failed.
    #[error("volume {name}: cannot record that its disk holds {fstype}; the Mount was rolled back")]
    RecordFormat {
        /// The volume.
        name: String,
        /// The filesystem type.
        fstype: FsType,
        /// The cause.
        #[source]
        source: AgentCallError,
    },
    /// `data` on the volume is not a real directory on its filesystem.
    #[error("volume {name}: {path} cannot be handed to Docker: {reason}. vmdk hands Docker only a real directory on the volume's own filesystem, so nothing was mounted into a container")]
    DataDir {
        /// The volume.
        name: String,
        /// `<mount dir>/data`.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
}

/// How many bytes at the start of a never-formatted disk must be zero
/// before vmdk formats it: enough for every partition table and every
/// filesystem's primary superblock (ext4 at 1 KiB, xfs at 0, GPT at 512).
/// The same number of bytes at its end must be zero too: backup GPT
/// headers, md RAID 0.90 and 1.0 superblocks, ZFS's last two labels and
/// the firmware RAID formats sit there.
pub const BLANK_CHECK_BYTES: usize = 1 << 20;

fn formatted_but_blank_text(name: &str, record: &FormatRecord, device: &str, extent: &str) -> String {
    let repair = match record.fstype.as_str() {
        "ext4" => "`e2fsck -b 32768 DISK` (for volumes under 512 MB: `-b 8193`) restores it from a backup superblock; `mke2fs -n DISK` lists the backups and changes nothing".to_owned(),
        "xfs" => "`xfs_repair DISK` finds a secondary superblock (`xfs_repair -f FILE` for an extent file)".to_owned(),
        other => format!("use the {other} repair tools"),
    };
    format!(
        "volume {name} is recorded as formatted with {fstype} on {at} (by VM {by}), but its disk {device} shows no filesystem signature: its filesystem is damaged. vmdk never formats a volume twice: nothing was changed, and the disk was detached again. To recover, repair the filesystem while nothing mounts the volume; DISK is the device the disk is attached as or, for the local backend, its extent {extent}: {repair}. Then mount the volume again",
        fstype = record.fstype,
        at = record.at,
        by = record.by,
    )
}

/// Whether `device` is a plain path under `/dev` (a device node or a
/// `/dev/disk/by-*` link), as a remote agent is a network peer.
fn device_path_ok(device: &str) -> bool {
    use std::path::Component;
    let p = Path::new(device);
    p.starts_with("/dev/")
        && p.components().count() > 2
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Whether `full` is a valid canonical `vol@datastore`: exactly one path
/// component below the mount root (never `.`, `..` or containing `/`).
fn canonical(full: &str) -> Result<VolumeRef, PluginError> {
    let r = VolumeRef::parse(full)?;
    if r.datastore.is_none() {
        return Err(PluginError::NotCanonical(full.to_owned()));
    }
    Ok(r)
}

/// Whether the agent's canonical `got` is the volume `asked` names.
fn answer_names(asked: &str, got: &str) -> bool {
    let Ok(g) = canonical(got) else { return false };
    let Ok(a) = VolumeRef::parse(asked) else { return false };
    a.volume == g.volume
        && match (&a.datastore, &g.datastore) {
            (Some(x), Some(y)) => x.to_lowercase() == y.to_lowercase(),
            _ => true,
        }
}

/// Drops one Mount of `id` (the ID itself with its last); returns how many
/// IDs are left.
fn drop_id(r: &mut MountRecord, id: &str) -> usize {
    match r.nested.get_mut(id) {
        Some(n) if *n > 1 => *n -= 1,
        Some(_) => {
            r.nested.remove(id);
        }
        None => {
            r.ids.remove(id);
        }
    }
    r.ids.len()
}

fn add_id(rec: &mut MountRecord, id: &str, now: u64) {
    if rec.ids.contains_key(id) {
        *rec.nested.entry(id.to_owned()).or_insert(0) += 1;
    } else {
        rec.ids.insert(id.to_owned(), now);
    }
}

/// Whether a recorded mount is really there.
enum Live {
    /// Mounted at its mount dir from the recorded device, `data` valid.
    Yes,
    /// Not mounted (or something else is): the text says what.
    Gone(String),
}

impl PluginError {
    fn agent(name: &str) -> impl FnOnce(AgentCallError) -> PluginError + '_ {
        move |source| PluginError::Agent {
            name: name.to_owned(),
            source,
        }
    }
}

/// Settings of a [`VolumeManager`].
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This VM's id, sent to the agent.
    pub vm_id: String,
    /// Where volumes are mounted (`/mnt/vmdk`).
    pub mount_root: PathBuf,
    /// Where the state file lives (`/var/lib/vmdk-plugin`).
    pub state_dir: PathBuf,
    /// Docker's API socket, for recovery.
    pub docker_socket: PathBuf,
    /// How long a volume stays mounted and attached after its last
    /// Unmount, so that Docker's Mount/Unmount/Mount (copy-up, `docker
    /// cp`, a quick restart) does not detach and attach the disk again.
    /// Zero (the default) releases at once.
    pub detach_grace: std::time::Duration,
}

/// The in-memory mount state and its generation (bumped by every change).
#[derive(Debug, Default)]
struct Versioned {
    state: PluginState,
    generation: u64,
    /// The generation of the newest update that must be durable when it
    /// returns (any but a release, see [`releases`]).
    claimed: u64,
}

/// Saves: the generation last saved, and the last saved durably.
#[derive(Debug, Default)]
struct Saved {
    any: u64,
    durable: u64,
}

/// Whether a record going from `before` to `after` only releases: the
/// record goes, or loses mount IDs or nested mounts and nothing else
/// changes. A crash that loses such a save leaves a record claiming more
/// mounts than are live, which recovery and the next Mount check against
/// the live system (docs/recovery.md), so its rename need not be durable
/// before the Unmount answers.
fn releases(before: Option<&MountRecord>, after: Option<&MountRecord>) -> bool {
    match (before, after) {
        (Some(_), None) => true,
        (Some(b), Some(a)) => {
            a.device == b.device
                && a.fstype == b.fstype
                && a.read_only == b.read_only
                && a.ids.iter().all(|(id, t)| b.ids.get(id) == Some(t))
                && a.nested.iter().all(|(id, n)| b.nested.get(id).is_some_and(|m| n <= m))
        }
        _ => false,
    }
}

/// The mount logic and state of this VM.
#[derive(Debug)]
pub struct VolumeManager {
    agent: AgentClient,
    sys: Arc<dyn System>,
    cfg: ManagerConfig,
    store: StateStore,
    state: Mutex<Versioned>,
    /// Held by the one save under way; holds the generations last saved.
    /// Concurrent updates coalesce: a save writes the newest state, so an
    /// update whose generation it covers returns without writing again.
    saved: tokio::sync::Mutex<Saved>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    gate: Arc<RwLock<()>>,
    default_ds: OnceCell<String>,
    docker_reconciled: std::sync::atomic::AtomicBool,
    /// Docker's List answer as last encoded, with the key of the agent's
    /// names it came from (see [`VolumeManager::list_answer`]).
    list_answer: Mutex<Option<(NamesKey, bytes::Bytes)>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VolumeManager {
    /// The agent this manager talks to.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The agent running in this process, if it is embedded.
    pub fn embedded_agent(&self) -> Option<&Arc<vmdk_agent::VolumeService>> {
        match &self.agent {
            AgentClient::Embedded(svc) => Some(svc),
            AgentClient::Http(_) => None,
        }
    }

    /// A manager; call [`VolumeManager::recover`] once before serving
    /// mounts (the plugin does this in the background).
    ///
    /// The mount root and the state dir are made private (0700), tightening
    /// looser modes; they must belong to this process's user. The mount
    /// root is used by its canonical path, as `/proc/self/mountinfo`
    /// shows it.
    pub fn new(agent: AgentClient, sys: Arc<dyn System>, mut cfg: ManagerConfig) -> std::io::Result<Arc<Self>> {
        crate::state::private_dir(&cfg.mount_root, "mount root")?;
        cfg.mount_root = std::fs::canonicalize(&cfg.mount_root)?;
        let store = StateStore::new(&cfg.state_dir)?;
        Ok(Arc::new(Self {
            agent,
            sys,
            store,
            state: Mutex::new(Versioned::default()),
            saved: tokio::sync::Mutex::new(Saved::default()),
            locks: Mutex::new(HashMap::new()),
            gate: Arc::new(RwLock::new(())),
            default_ds: OnceCell::new(),
            list_answer: Mutex::new(None),
            docker_reconciled: std::sync::atomic::AtomicBool::new(false),
            cfg,
        }))
    }

    /// This VM's id.
    pub fn vm_id(&self) -> &str {
        &self.cfg.vm_id
    }

    /// `<mount-root>/<vol@ds>`. `full` must be a valid canonical name, so
    /// the path is always one directory directly below the mount root.
    pub fn mount_dir(&self, full: &str) -> Result<PathBuf, PluginError> {
        canonical(full)?;
        Ok(self.cfg.mount_root.join(full))
    }

    /// `<mount-root>/<vol@ds>/data`, the path Docker mounts into containers.
    pub fn mountpoint(&self, full: &str) -> Result<PathBuf, PluginError> {
        Ok(self.mount_dir(full)?.join(DATA_DIR))
    }

    /// The mount root in use (canonical).
    pub fn mount_root(&self) -> &Path {
        &self.cfg.mount_root
    }

    /// A copy of the current mount state.
    pub fn snapshot(&self) -> PluginState {
        self.state.lock().unwrap().state.clone()
    }

    fn volume_lock(&self, full: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap().entry(full.to_owned()).or_default().clone()
    }

    fn save(&self, name: &str, state: &PluginState) -> Result<(), PluginError> {
        self.store.save(state).map_err(|source| PluginError::State {
            name: name.to_owned(),
            source,
        })
    }

    /// Applies `f` to the record of volume `name` (the only record it may
    /// change) and persists the state before returning; on a failed save
    /// the record is rolled back. The state lock is never held across the
    /// write: the write runs on the blocking pool, and updates of other
    /// volumes that arrive meanwhile are saved together by the next write
    /// (group commit), so N concurrent Mounts cost about two writes, not N.
    /// A save that covers only releases (see [`releases`]) leaves its
    /// rename to the file system's next commit; one that covers any other
    /// change makes it durable before the update returns.
    async fn update<T>(&self, name: &str, f: impl FnOnce(&mut PluginState) -> T) -> Result<T, PluginError> {
        let (out, before, after, mine, claim) = {
            let mut g = self.state.lock().unwrap();
            let before = g.state.mounts.get(name).cloned();
            let out = f(&mut g.state);
            let after = g.state.mounts.get(name).cloned();
            if after == before {
                return Ok(out);
            }
            g.generation += 1;
            let claim = !releases(before.as_ref(), after.as_ref());
            if claim {
                g.claimed = g.generation;
            }
            (out, before, after, g.generation, claim)
        };
        let mut saved = self.saved.lock().await;
        // Covered by a save that began after this update, durable if this
        // update must be.
        if saved.any >= mine && (!claim || saved.durable >= mine) {
            return Ok(out);
        }
        let (snapshot, generation, durable) = {
            let g = self.state.lock().unwrap();
            (g.state.clone(), g.generation, g.claimed > saved.durable)
        };
        let store = self.store.clone();
        let res = vmdk_common::runtime::spawn_blocking(move || store.save_with(&snapshot, durable))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match res {
            Ok(()) => {
                saved.any = generation;
                if durable {
                    saved.durable = generation;
                }
                Ok(out)
            }
            Err(source) => {
                // Only this update's change is undone (the caller holds the
                // volume's lock, so nobody else changed the record since),
                // before the next save may start: it must not write it.
                let mut g = self.state.lock().unwrap();
                if g.state.mounts.get(name) == after.as_ref() {
                    match before {
                        Some(r) => g.state.mounts.insert(name.to_owned(), r),
                        None => g.state.mounts.remove(name),
                    };
                    g.generation += 1;
                }
                drop(g);
                drop(saved);
                Err(PluginError::State {
                    name: name.to_owned(),
                    source,
                })
            }
        }
    }

    async fn sys<T: Send + 'static>(
        &self,
        name: &str,
        op: &'static str,
        f: impl FnOnce(&dyn System) -> Result<T, SysError> + Send + 'static,
    ) -> Result<T, PluginError> {
        let sys = self.sys.clone();
        vmdk_common::runtime::spawn_blocking(move || f(sys.as_ref()))
            .await
            .unwrap_or_else(|e| {
                Err(SysError::Io {
                    op: "worker",
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
            .map_err(|source| PluginError::Sys {
                name: name.to_owned(),
                op,
                source,
            })
    }

    /// The datastore this VM's short names go to (the agent says: the one
    /// holding the VM for `vsphere`, else its first).
    pub async fn default_datastore(&self) -> Option<String> {
        self.default_ds
            .get_or_try_init(|| async {
                let v = self.agent.version(&self.cfg.vm_id).await?;
                v.home_datastore
                    .or_else(|| v.datastores.first().cloned())
                    .ok_or(AgentCallError::Transport("agent has no datastore".into()))
            })
            .await
            .ok()
            .cloned()
    }

    /// The canonical name for `name` without asking the agent: as given if
    /// it has `@`, else on the default datastore.
    pub async fn full_name_hint(&self, name: &str) -> String {
        if name.contains('@') {
            return name.to_owned();
        }
        // Path is called constantly: look in the state without copying it.
        let mounted = {
            let st = self.state.lock().unwrap();
            st.state
                .mounts
                .keys()
                .find(|k| k.rsplit_once('@').map(|(v, _)| v) == Some(name))
                .cloned()
        };
        if let Some(full) = mounted {
            return full;
        }
        match self.default_datastore().await {
            Some(ds) => format!("{name}@{ds}"),
            None => name.to_owned(),
        }
    }

    // ----- Docker operations -------------------------------------------

    /// `VolumeDriver.Create`. Creating a volume that exists succeeds (Docker
    /// and users retry).
    pub async fn create(&self, name: &str, opts: BTreeMap<String, String>) -> Result<(), PluginError> {
        VolumeRef::parse(name)?;
        let parsed = VolumeOptions::parse(&opts)?;
        // After the start-up checks, which delete what cut-off creates left.
        let _gate = self.gate.read().await;
        if let Some(fs) = parsed.fstype {
            if !self.sys.mkfs_available(fs) {
                let found: Vec<&str> = [FsType::Ext4, FsType::Xfs]
                    .into_iter()
                    .filter(|f| self.sys.mkfs_available(*f))
                    .map(FsType::as_str)
                    .collect();
                return Err(PluginError::MkfsMissing {
                    fstype: fs,
                    found: found.join(", "),
                });
            }
        }
        let req = CreateRequest {
            name: name.to_owned(),
            opts,
        };
        match self.agent.create(&self.cfg.vm_id, req).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::AlreadyExists) => Ok(()),
            Err(e) => Err(PluginError::agent(name)(e)),
        }
    }

    /// `VolumeDriver.Get`: `Ok(None)` means "does not exist".
    pub async fn get(&self, name: &str) -> Result<Option<VolumeInfo>, PluginError> {
        if VolumeRef::parse(name).is_err() {
            return Ok(None);
        }
        match self.agent.get(&self.cfg.vm_id, name).await {
            Ok(info) if answer_names(name, &info.name) => Ok(Some(info)),
            Ok(info) => Err(PluginError::AgentAnswer {
                asked: name.to_owned(),
                got: info.name,
            }),
            Err(e)
                if matches!(
                    e.code(),
                    Some(ErrorCode::NotFound | ErrorCode::InvalidName | ErrorCode::UnknownDatastore)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(PluginError::agent(name)(e)),
        }
    }

    /// `VolumeDriver.List`: canonical names, shortened on the default
    /// datastore, with their mount points.
    pub async fn list(&self) -> Result<Vec<(String, PathBuf)>, PluginError> {
        let names = self.list_names(None).await?.map(|l| l.names).unwrap_or_default();
        Ok(self.shown(names).await)
    }

    /// [`VolumeManager::list`] as `encode` writes it for Docker. The answer
    /// is kept with the key of the agent's names it came from, and given
    /// again as it is while the agent says the names are the same: a List
    /// then costs the agent's check of each folder and no encoding. Lists
    /// without a key (a separate agent, a create under way) are encoded
    /// every time.
    pub async fn list_answer<E>(
        &self,
        encode: impl FnOnce(&[(String, PathBuf)]) -> Result<Vec<u8>, E>,
    ) -> Result<Result<bytes::Bytes, E>, PluginError> {
        // The answer and its key, taken together: a newer answer stored
        // meanwhile never goes out under an older key.
        let cached = self.list_answer.lock().unwrap().clone();
        let list = match (self.list_names(cached.as_ref().map(|(k, _)| k)).await?, cached) {
            (None, Some((_, body))) => return Ok(Ok(body)),
            (Some(list), _) => list,
            // Not answered without a known key; asked again in full.
            (None, None) => self.list_names(None).await?.unwrap_or(NameList {
                key: None,
                names: Vec::new(),
            }),
        };
        let body = match encode(&self.shown(list.names).await) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => return Ok(Err(e)),
        };
        // Names shown in full because the default datastore was not known
        // yet are not kept.
        let key = list.key.filter(|_| self.default_ds.get().is_some());
        *self.list_answer.lock().unwrap() = key.map(|k| (k, body.clone()));
        Ok(Ok(body))
    }

    async fn list_names(&self, known: Option<&NamesKey>) -> Result<Option<NameList>, PluginError> {
        self.agent
            .list_names_since(&self.cfg.vm_id, known)
            .await
            .map_err(PluginError::agent("*"))
    }

    /// Docker's names (shortened on the default datastore) and mount points
    /// of `(vol@ds, vol, ds)`.
    async fn shown(&self, names: Vec<(String, String, String)>) -> Vec<(String, PathBuf)> {
        let default = self.default_datastore().await;
        names
            .into_iter()
            .filter_map(|(name, volume, datastore)| {
                // A name that is not a valid vol@ds (or does not match its
                // parts) never becomes a path.
                let mp = match self.mountpoint(&name) {
                    Ok(mp)
                        if name.len() == volume.len() + 1 + datastore.len()
                            && name.starts_with(volume.as_str())
                            && name[volume.len()..].starts_with('@')
                            && name.ends_with(datastore.as_str()) =>
                    {
                        mp
                    }
                    _ => {
                        tracing::warn!(name = ?name, "the agent listed an invalid volume name; skipping it");
                        return None;
                    }
                };
                let shown = if Some(&datastore) == default.as_ref() {
                    volume
                } else {
                    name
                };
                Some((shown, mp))
            })
            .collect()
    }

    /// The mount record of a volume, if this VM has it mounted.
    pub fn record(&self, full: &str) -> Option<MountRecord> {
        self.state.lock().unwrap().state.mounts.get(full).cloned()
    }

    /// `VolumeDriver.Remove`. Refused while this VM has it mounted; the
    /// agent refuses while any VM has it attached.
    pub async fn remove(&self, name: &str) -> Result<(), PluginError> {
        VolumeRef::parse(name)?;
        let _gate = self.gate.read().await;
        let info = match self.get(name).await? {
            Some(i) => i,
            None => return Ok(()),
        };
        let lock = self.volume_lock(&info.name);
        let _l = lock.lock().await;
        if let Some(rec) = self.record(&info.name) {
            if !rec.ids.is_empty() {
                return Err(PluginError::StillMounted {
                    name: info.name.clone(),
                    refcount: rec.ids.len(),
                });
            }
            // Held by no mount (in its detach grace, or a release that
            // failed earlier): release it now.
            self.deactivate(&info.name).await?;
        }
        match self.agent.remove(&self.cfg.vm_id, &info.name).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(()),
            Err(e) => Err(PluginError::agent(name)(e)),
        }
    }

    /// `VolumeDriver.Mount`: returns the mountpoint. A Mount of an ID
    /// already held is counted, and needs its own Unmount (see
    /// [`MountRecord::nested`]).
    pub async fn mount(&self, name: &str, id: &str) -> Result<PathBuf, PluginError> {
        VolumeRef::parse(name)?;
        let _gate = self.gate.read().await;
        let info = self
            .get(name)
            .await?
            .ok_or_else(|| PluginError::NotFound(name.to_owned()))?;
        let full = info.name.clone();
        let mountpoint = self.mountpoint(&full)?;
        let lock = self.volume_lock(&full);
        let _l = lock.lock().await;
        let now = now_secs();
        // A record is a claim, proved against the live mounts before a
        // Mount joins it: after an unclean reboot or a plugin killed in an
        // Unmount it may describe a mount that is gone.
        let kept = match self.record(&full) {
            Some(rec) => match self.check_live(&full, &rec).await? {
                Live::Yes => {
                    self.update(&full, |s| {
                        if let Some(r) = s.mounts.get_mut(&full) {
                            add_id(r, id, now);
                        }
                    })
                    .await?;
                    return Ok(mountpoint);
                }
                Live::Gone(why) => {
                    tracing::warn!(volume = %full, why, "recorded as mounted, but it is not; mounting it again");
                    let d = self.mount_dir(&full)?;
                    self.sys(&full, "unmount", move |s| s.unmount(&d)).await?;
                    Some(rec)
                }
            },
            None => None,
        };
        let fresh = self.activate(&info).await?;
        let mut rec = match kept {
            Some(old) => MountRecord {
                ids: old.ids,
                nested: old.nested,
                ..fresh
            },
            None => fresh,
        };
        add_id(&mut rec, id, now);
        let saved = self
            .update(&full, |s| {
                s.mounts.insert(full.clone(), rec.clone());
            })
            .await;
        if let Err(e) = saved {
            self.deactivate(&full).await.ok();
            return Err(e);
        }
        tracing::info!(volume = %full, device = %rec.device, "mounted");
        Ok(mountpoint)
    }

    /// `VolumeDriver.Unmount`: drops one Mount of the ID, and the ID with
    /// its last; the last ID unmounts and detaches. An unknown ID succeeds.
    pub async fn unmount(self: &Arc<Self>, name: &str, id: &str) -> Result<(), PluginError> {
        VolumeRef::parse(name)?;
        let _gate = self.gate.read().await;
        // Only the record of the volume Docker names, and only if it holds
        // the ID: an Unmount never releases another volume, even when a
        // caller reuses an ID.
        let holders = |default_ds: Option<&str>| -> Vec<String> {
            let st = self.state.lock().unwrap();
            st.state
                .mounts
                .iter()
                .filter(|(k, r)| docker_api::names_volume(name, k, default_ds) && r.ids.contains_key(id))
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut found = holders(None);
        if found.len() > 1 {
            // A short name held on several datastores: it names the one
            // on the default datastore (asked only in this rare case).
            let default_ds = self.default_datastore().await;
            found = holders(default_ds.as_deref());
        }
        let full = match found.as_slice() {
            [one] => one.clone(),
            [] => {
                tracing::info!(volume = name, id, "unmount of an unknown mount ID; nothing to do");
                return Ok(());
            }
            many => {
                tracing::warn!(volume = name, id, holders = ?many, "the default datastore is unknown (agent unreachable), so it is unclear which volume this Unmount names; nothing released, the reconcile pass releases what no container uses");
                return Ok(());
            }
        };
        let lock = self.volume_lock(&full);
        let _l = lock.lock().await;
        // The last ID going without a grace: the record is written once,
        // when it goes after the unmount and detach (a crash before that
        // leaves a record of a mount that is gone or no container uses,
        // which recovery releases). Otherwise the ID's removal is saved.
        let after = self.record(&full).map(|mut r| {
            drop_id(&mut r, id);
            r
        });
        if let Some(r) = after.filter(|r| r.ids.is_empty() && self.cfg.detach_grace.is_zero()) {
            return self.release(&full, Some(r)).await;
        }
        let left = self
            .update(&full, |s| s.mounts.get_mut(&full).map(|r| drop_id(r, id)))
            .await?;
        match left {
            Some(0) if self.cfg.detach_grace.is_zero() => self.deactivate(&full).await,
            Some(0) => {
                tracing::info!(volume = %full, grace = ?self.cfg.detach_grace, "last unmount; releasing after the grace period unless mounted again");
                self.release_after_grace(full);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// After the detach grace, unmounts and detaches `full` if it is still
    /// held by no mount ID. A Mount in between keeps it; a plugin restart
    /// in between leaves the recovery pass to release it.
    fn release_after_grace(self: &Arc<Self>, full: String) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.cfg.detach_grace).await;
            let _gate = me.gate.read().await;
            let lock = me.volume_lock(&full);
            let _l = lock.lock().await;
            if me.record(&full).is_some_and(|r| r.ids.is_empty()) {
                if let Err(e) = me.deactivate(&full).await {
                    tracing::warn!(volume = %full, error = %crate::error_chain(&e), "release after the grace period failed; the reconcile pass retries it");
                }
            }
        });
    }

    /// `VolumeDriver.Path`: the would-be mountpoint, always directly below
    /// the mount root; an invalid name is an error.
    pub async fn path(&self, name: &str) -> Result<PathBuf, PluginError> {
        VolumeRef::parse(name)?;
        self.mountpoint(&self.full_name_hint(name).await)
    }

    // ----- attach + format + mount, and the way back ----------------------

    /// Attaches, formats on first use and mounts. Rolls everything back on
    /// failure, because Docker sends no Unmount after a failed Mount.
    async fn activate(&self, info: &VolumeInfo) -> Result<MountRecord, PluginError> {
        let full = info.name.clone();
        let dir = self.mount_dir(&full)?;
        let att = self
            .agent
            .attach(&self.cfg.vm_id, &full)
            .await
            .map_err(PluginError::agent(&full))?;
        let res = if att.volume.name == full {
            // The volume as the attach left it: its format record is fresh.
            // Agents that predate DiskLocation name a loop device only.
            let location = att.location.clone().or_else(|| {
                att.device
                    .clone()
                    .map(|path| vmdk_protocol::DiskLocation::Device { path })
            });
            // The agent's word that the disk reads all zeros counts only
            // for a device it bound on this host (its own extent file).
            let blank = att.blank && matches!(location, Some(vmdk_protocol::DiskLocation::Device { .. }));
            self.format_and_mount(&att.volume, location, &att.disk_uuid, blank, &dir)
                .await
        } else {
            Err(PluginError::AgentAnswer {
                asked: full.clone(),
                got: att.volume.name.clone(),
            })
        };
        match res {
            Ok(rec) => Ok(rec),
            Err(e) => {
                tracing::warn!(volume = %full, error = %crate::error_chain(&e), "mount failed; rolling back");
                let d = dir.clone();
                let _ = self.sys(&full, "unmount", move |s| s.unmount(&d)).await;
                let _ = std::fs::remove_dir(&dir);
                if let Err(de) = self.agent.detach(&self.cfg.vm_id, &full).await {
                    tracing::error!(volume = %full, error = %de, "rollback detach failed");
                }
                Err(e)
            }
        }
    }

    /// Records with the agent that the disk holds `fstype`; the Mount fails
    /// (and rolls back) if it cannot.
    async fn record_format(&self, full: &str, fstype: FsType) -> Result<(), PluginError> {
        self.agent
            .mark_formatted(&self.cfg.vm_id, full, fstype.as_str())
            .await
            .map(|_| ())
            .map_err(|source| PluginError::RecordFormat {
                name: full.to_owned(),
                fstype,
                source,
            })
    }

    /// Finds or makes the filesystem: a signature on the device is used
    /// (and recorded if it was not); a disk recorded as formatted without
    /// one is refused; a never-formatted disk is formatted only if its
    /// first and last [`BLANK_CHECK_BYTES`] are zero, and recorded before
    /// the Mount answers.
    ///
    /// `blank`: the agent bound this device just now from a file that held
    /// no data, so every byte reads zero: no signature anywhere (neither at
    /// the start nor at the end, where GPT backups, md 1.0 and ZFS labels
    /// sit, nor at 1 and 2 MiB, where VMFS does). A never-formatted disk is
    /// then formatted without probing or reading it; the outcome is the one
    /// `blkid` and the read would give.
    async fn filesystem(&self, info: &VolumeInfo, dev: &Path, blank: bool) -> Result<String, PluginError> {
        let full = info.name.clone();
        if blank && info.formatted.is_none() {
            tracing::debug!(volume = %full, "the agent bound a disk that holds no data; formatting it without probing");
            return self.make_filesystem(info, dev).await;
        }
        let d = dev.to_owned();
        let found = self.sys(&full, "probe filesystem", move |s| s.probe_fs(&d)).await?;
        if let Some(t) = found {
            if t != info.fstype {
                tracing::warn!(volume = %full, found = %t, recorded = %info.fstype, "disk holds another filesystem than recorded; using what is on disk");
            }
            match (&info.formatted, t.parse::<FsType>()) {
                (None, Ok(fs)) => {
                    tracing::info!(volume = %full, fstype = %fs, "disk holds a filesystem not yet recorded; recording it");
                    self.record_format(&full, fs).await?;
                }
                (None, Err(_)) => {
                    tracing::warn!(volume = %full, found = %t, "disk holds a filesystem vmdk does not make; not recording it")
                }
                (Some(_), _) => {}
            }
            return Ok(t);
        }
        if let Some(record) = &info.formatted {
            return Err(PluginError::FormattedButBlank {
                name: full.clone(),
                record: record.clone(),
                device: dev.display().to_string(),
                extent: format!("<datastore>/dockvols/{}/{}-flat.vmdk", info.vmgroup, info.volume),
            });
        }
        let d = dev.to_owned();
        let head = self
            .sys(&full, "read the start of the disk", move |s| {
                s.read_head(&d, BLANK_CHECK_BYTES)
            })
            .await?;
        if let Some(offset) = head.iter().position(|b| *b != 0) {
            return Err(PluginError::UnknownData {
                name: full.clone(),
                device: dev.display().to_string(),
                offset,
            });
        }
        let d = dev.to_owned();
        let (start, tail) = self
            .sys(&full, "read the end of the disk", move |s| {
                s.read_tail(&d, BLANK_CHECK_BYTES)
            })
            .await?;
        if let Some(at) = tail.iter().position(|b| *b != 0) {
            return Err(PluginError::UnknownDataAtEnd {
                name: full.clone(),
                device: dev.display().to_string(),
                offset: start + at as u64,
                size: start + tail.len() as u64,
            });
        }
        self.make_filesystem(info, dev).await
    }

    /// Formats a never-formatted disk proved blank, and records it.
    async fn make_filesystem(&self, info: &VolumeInfo, dev: &Path) -> Result<String, PluginError> {
        let full = info.name.clone();
        let want: FsType = info.fstype.parse().unwrap_or(FsType::Ext4);
        let (d, label) = (dev.to_owned(), info.volume.clone());
        tracing::info!(volume = %full, fstype = %want, "formatting on first use");
        self.sys(&full, "make filesystem", move |s| s.mkfs(&d, want, &label))
            .await?;
        // Durable with the agent before Docker hears of the mount: from
        // here on this disk is never formatted again.
        self.record_format(&full, want).await?;
        Ok(want.to_string())
    }

    async fn format_and_mount(
        &self,
        info: &VolumeInfo,
        location: Option<vmdk_protocol::DiskLocation>,
        disk_uuid: &str,
        blank: bool,
        dir: &Path,
    ) -> Result<MountRecord, PluginError> {
        let full = info.name.clone();
        let location = location.ok_or_else(|| PluginError::NoDevice {
            name: full.clone(),
            disk_uuid: disk_uuid.to_owned(),
        })?;
        if let vmdk_protocol::DiskLocation::Device { path } = &location {
            if !device_path_ok(path) {
                return Err(PluginError::BadDevice {
                    name: full.clone(),
                    device: path.clone(),
                });
            }
        }
        let dev = self
            .sys(&full, "find the attached disk", move |s| {
                s.locate(&location, DEVICE_TIMEOUT)
            })
            .await?;
        let fstype = self.filesystem(info, &dev, blank).await?;
        self.make_mount_dir(&full, dir)?;
        let read_only = info.access == AccessMode::ReadOnly;
        let (d, t, fs) = (dev.clone(), dir.to_owned(), fstype.clone());
        self.sys(&full, "mount", move |s| s.mount(&d, &t, &fs, read_only))
            .await?;
        let t = dir.to_owned();
        let found = self
            .sys(&full, "check data directory", move |s| s.data_dir(&t, DATA_DIR))
            .await?;
        match found {
            DataDir::Valid => {}
            DataDir::Invalid(reason) => return Err(self.data_dir_error(&full, dir, reason)),
            DataDir::Missing => {
                // A fresh filesystem: make the data directory (empty, so
                // Docker copies image content into it), briefly read-write
                // if needed.
                let t = dir.to_owned();
                if read_only {
                    self.sys(&full, "remount read-write", move |s| s.remount(&t, false))
                        .await?;
                }
                let t = dir.to_owned();
                let made = self
                    .sys(&full, "create data directory", move |s| {
                        s.make_data_dir(&t, DATA_DIR)?;
                        s.data_dir(&t, DATA_DIR)
                    })
                    .await;
                if read_only {
                    let t = dir.to_owned();
                    self.sys(&full, "remount read-only", move |s| s.remount(&t, true))
                        .await?;
                }
                match made? {
                    DataDir::Valid => {}
                    DataDir::Invalid(reason) => return Err(self.data_dir_error(&full, dir, reason)),
                    DataDir::Missing => {
                        return Err(self.data_dir_error(&full, dir, "it vanished right after it was made".into()))
                    }
                }
            }
        }
        Ok(MountRecord {
            ids: BTreeMap::new(),
            nested: BTreeMap::new(),
            device: dev.display().to_string(),
            fstype,
            read_only,
        })
    }

    fn data_dir_error(&self, full: &str, dir: &Path, reason: String) -> PluginError {
        PluginError::DataDir {
            name: full.to_owned(),
            path: dir.join(DATA_DIR),
            reason,
        }
    }

    /// Makes `<mount-root>/<vol@ds>` (0700) if missing; it must be a real
    /// directory, never a symlink, since mount(2) would follow one.
    fn make_mount_dir(&self, full: &str, dir: &Path) -> Result<(), PluginError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |op: &'static str, source: std::io::Error| PluginError::Sys {
            name: full.to_owned(),
            op: "create mount directory",
            source: SysError::Io {
                op,
                path: dir.to_owned(),
                source,
            },
        };
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("mkdir", e)),
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|e| io("lstat", e))?;
        if !meta.file_type().is_dir() {
            return Err(io(
                "lstat",
                std::io::Error::other("exists and is not a directory (a symlink?); it is left alone"),
            ));
        }
        Ok(())
    }

    /// Whether the record's mount is really there: `/proc/self/mountinfo`
    /// shows the recorded device mounted at the mount dir. If it is, its
    /// `data` must pass the same check as at mount; an error otherwise
    /// (the mount is left alone: other containers hold it).
    async fn check_live(&self, full: &str, rec: &MountRecord) -> Result<Live, PluginError> {
        let dir = self.mount_dir(full)?;
        let all = self.sys(full, "read mounts", |s| s.mounts()).await?;
        // The last entry for a path is the mount on top.
        let top = all.into_iter().rev().find(|m| m.target == dir);
        match top {
            None => Ok(Live::Gone(format!("nothing is mounted at {}", dir.display()))),
            Some(m) if m.source != rec.device => Ok(Live::Gone(format!(
                "{} is mounted at {}, not the recorded {}",
                m.source,
                dir.display(),
                rec.device
            ))),
            Some(_) => {
                let t = dir.clone();
                match self
                    .sys(full, "check data directory", move |s| s.data_dir(&t, DATA_DIR))
                    .await?
                {
                    DataDir::Valid => Ok(Live::Yes),
                    DataDir::Missing => Err(self.data_dir_error(full, &dir, "it does not exist".into())),
                    DataDir::Invalid(reason) => Err(self.data_dir_error(full, &dir, reason)),
                }
            }
        }
    }

    /// Unmounts and detaches a volume whose last ID is gone. If the
    /// unmount fails (something still holds the filesystem), the record is
    /// kept with no IDs so the periodic reconcile retries.
    async fn deactivate(&self, full: &str) -> Result<(), PluginError> {
        self.release(full, None).await
    }

    /// [`Self::deactivate`] when the change that left the record without
    /// IDs is not saved yet (`unsaved`, the record as it is now): the
    /// state is written once, when the record goes; only if the unmount
    /// fails is `unsaved` written instead.
    async fn release(&self, full: &str, unsaved: Option<MountRecord>) -> Result<(), PluginError> {
        let dir = self.mount_dir(full)?;
        let d = dir.clone();
        if let Err(e) = self.sys(full, "unmount", move |s| s.unmount(&d)).await {
            if let Some(r) = unsaved {
                self.update(full, |s| {
                    s.mounts.insert(full.to_owned(), r);
                })
                .await?;
            }
            return Err(e);
        }
        let _ = std::fs::remove_dir(&dir);
        let detached = match self.agent.detach(&self.cfg.vm_id, full).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(()),
            Err(e) => Err(e),
        };
        self.update(full, |s| {
            s.mounts.remove(full);
        })
        .await?;
        match detached {
            Ok(()) => {
                tracing::info!(volume = %full, "unmounted and detached");
                Ok(())
            }
            Err(e) => {
                tracing::error!(volume = %full, error = %e, "unmounted, but detach failed; the reconcile pass retries it");
                Err(PluginError::agent(full)(e))
            }
        }
    }

    // ----- recovery ----------------------------------------------------------

    /// Start-up recovery. Holds off Create, Mount, Unmount and Remove until
    /// done.
    ///
    /// 1. Load the state file (a hint).
    /// 2. Adopt volumes mounted under the mount root that the state lacks.
    /// 3. Ask Docker which running containers use which volumes: release
    ///    volumes nobody uses, remount volumes in use that lost their mount,
    ///    and stand in for lost mount IDs with `recovered:<container>`.
    ///    If Docker does not answer, the state is kept as is and the
    ///    periodic reconcile retries.
    /// 4. Detach disks the agent says are attached to this VM that nothing
    ///    here holds, and remove empty leftover mount directories.
    pub async fn recover(self: &Arc<Self>) {
        let gate = self.gate.clone().write_owned().await;
        self.recover_holding(gate).await;
    }

    /// Takes the recovery gate at once, then runs `first` (the embedded
    /// agent's attachment checks) and [`Self::recover`] in the background: a
    /// Create, Mount, Unmount or Remove that arrives as soon as the socket is
    /// served waits for both instead of overtaking them.
    pub async fn spawn_recovery(
        self: &Arc<Self>,
        first: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let gate = self.gate.clone().write_owned().await;
        let me = self.clone();
        tokio::spawn(async move {
            first.await;
            me.recover_holding(gate).await
        })
    }

    async fn recover_holding(self: &Arc<Self>, _gate: tokio::sync::OwnedRwLockWriteGuard<()>) {
        let loaded = self.store.load();
        let mut state = loaded.clone();
        state.mounts.retain(|name, _| match canonical(name) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(name = ?name, error = %e, "dropping a state record with an invalid volume name");
                crate::obs::reconcile_action("drop_record");
                false
            }
        });
        let mounted = self.mounted_here().await;
        for (name, m) in &mounted {
            if canonical(name).is_err() {
                tracing::warn!(dir = %m.target.display(), "a filesystem is mounted under the mount root at a name that is no volume; leaving it alone");
                continue;
            }
            state.mounts.entry(name.clone()).or_insert_with(|| {
                tracing::warn!(volume = %name, "found mounted without state; adopting");
                crate::obs::reconcile_action("adopt");
                MountRecord {
                    ids: BTreeMap::new(),
                    nested: BTreeMap::new(),
                    device: m.source.clone(),
                    fstype: m.fstype.clone(),
                    read_only: m.read_only,
                }
            });
        }
        // What recovery adopted or dropped is saved now, so the state file
        // (and `vmdk-plugin status`) agrees with the live mounts.
        if state != loaded {
            if let Err(e) = self.save("*", &state) {
                tracing::error!(error = %crate::error_chain(&e), "cannot save state");
            }
        }
        {
            let mut g = self.state.lock().unwrap();
            g.state = state;
            g.generation += 1;
        }
        match docker_api::volume_users(&self.cfg.docker_socket, &self.cfg.mount_root).await {
            Ok(users) => {
                self.reconcile_users(&users, None).await;
                self.docker_reconciled.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Docker did not answer; keeping the recorded mounts that are really mounted until it does");
                self.drop_unmounted_records(&mounted).await;
            }
        }
        self.release_stray_attachments().await;
        self.clean_mount_root().await;
        let st = self.snapshot();
        tracing::info!(
            mounted = st.mounts.len(),
            ids = st.mounts.values().map(|r| r.ids.len()).sum::<usize>(),
            "recovery finished"
        );
    }

    /// Periodic pass: the same checks as recovery, releasing only IDs older
    /// than [`ID_GRACE`] (unless Docker has never answered before, in which
    /// case this is the first real reconcile).
    pub async fn reconcile(self: &Arc<Self>) {
        let users = match docker_api::volume_users(&self.cfg.docker_socket, &self.cfg.mount_root).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "Docker did not answer; skipping reconcile");
                return;
            }
        };
        let first = !self.docker_reconciled.swap(true, std::sync::atomic::Ordering::SeqCst);
        let grace = if first { None } else { Some(ID_GRACE) };
        self.reconcile_users(&users, grace).await;
        self.release_stray_attachments().await;
    }

    /// Without Docker's word, a record whose mount is gone (an unclean
    /// reboot, a plugin killed during an Unmount) is dropped: a later Mount
    /// then activates afresh, and the stray-attachment pass detaches its
    /// disk.
    async fn drop_unmounted_records(&self, mounted: &BTreeMap<String, crate::sys::MountEntry>) {
        let gone: Vec<String> = self
            .snapshot()
            .mounts
            .into_keys()
            .filter(|name| !mounted.contains_key(name))
            .collect();
        for name in gone {
            tracing::warn!(volume = %name, "recorded as mounted, but nothing is mounted at its mount directory (VM rebooted, or the plugin was killed during an Unmount); dropping the record");
            crate::obs::reconcile_action("drop_record");
            if let Err(e) = self
                .update(&name, |s| {
                    s.mounts.remove(&name);
                })
                .await
            {
                tracing::error!(volume = %name, error = %crate::error_chain(&e), "cannot save state");
            }
        }
    }

    async fn mounted_here(&self) -> BTreeMap<String, crate::sys::MountEntry> {
        let root = self.cfg.mount_root.clone();
        match self.sys("*", "read mounts", |s| s.mounts()).await {
            Ok(all) => volume_mounts(all, &root),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot read mounts");
                BTreeMap::new()
            }
        }
    }

    /// Brings the state in line with Docker's running containers.
    /// `grace: None` releases every ID no running container explains.
    async fn reconcile_users(self: &Arc<Self>, users: &docker_api::VolumeUsers, grace: Option<Duration>) {
        let names: Vec<String> = self.snapshot().mounts.keys().cloned().collect();
        let mounted = self.mounted_here().await;
        let now = now_secs();
        let default_ds = if users.keys().any(|k| !k.contains('@')) {
            self.default_datastore().await
        } else {
            None
        };
        for full in names {
            let lock = self.volume_lock(&full);
            let _l = lock.lock().await;
            let containers: BTreeSet<String> = users
                .iter()
                .filter(|(k, _)| docker_api::names_volume(k, &full, default_ds.as_deref()))
                .flat_map(|(_, cs)| cs.iter().cloned())
                .collect();
            let containers = &containers;
            let is_mounted = mounted.contains_key(&full);
            let Some(mut rec) = self.record(&full) else { continue };
            rec.ids.retain(|id, at| match id.strip_prefix(RECOVERED_PREFIX) {
                Some(c) => containers.contains(c),
                None => !containers.is_empty() || grace.is_some_and(|g| now.saturating_sub(*at) < g.as_secs()),
            });
            let ids = &rec.ids;
            rec.nested.retain(|id, _| ids.contains_key(id));
            if rec.ids.is_empty() {
                for c in containers {
                    rec.ids.insert(format!("{RECOVERED_PREFIX}{c}"), now);
                }
            }
            let res = if rec.ids.is_empty() {
                // Released with one write of the state (see `release`).
                Ok(Some((0, rec)))
            } else {
                let r = rec.clone();
                self.update(&full, |s| {
                    s.mounts.insert(full.clone(), r);
                })
                .await
                .map(|()| Some((rec.ids.len(), rec)))
            };
            match res {
                Ok(Some((0, unsaved))) => {
                    tracing::info!(volume = %full, "no running container uses it; releasing");
                    crate::obs::reconcile_action("release");
                    if let Err(e) = self.release(&full, Some(unsaved)).await {
                        tracing::error!(volume = %full, error = %crate::error_chain(&e), "release failed");
                    }
                }
                Ok(Some((_, rec))) if !is_mounted => {
                    tracing::warn!(volume = %full, "in use but not mounted (VM rebooted?); mounting again");
                    crate::obs::reconcile_action("remount");
                    if let Err(e) = self.remount(&full, rec).await {
                        tracing::error!(volume = %full, error = %crate::error_chain(&e), "recovery mount failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(volume = %full, error = %crate::error_chain(&e), "cannot save state"),
            }
        }
    }

    async fn remount(&self, full: &str, rec: MountRecord) -> Result<(), PluginError> {
        let info = self
            .get(full)
            .await?
            .ok_or_else(|| PluginError::NotFound(full.to_owned()))?;
        let fresh = self.activate(&info).await?;
        self.update(full, |s| {
            s.mounts.insert(
                full.to_owned(),
                MountRecord {
                    ids: rec.ids,
                    nested: rec.nested,
                    ..fresh
                },
            );
        })
        .await
    }

    async fn release_stray_attachments(&self) {
        let vols = match self.agent.list_attached(&self.cfg.vm_id).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list volumes to find stray attachments");
                return;
            }
        };
        for v in vols {
            if v.status != AttachStatus::Attached || v.attached_to.as_deref() != Some(self.cfg.vm_id.as_str()) {
                continue;
            }
            let lock = self.volume_lock(&v.name);
            let _l = lock.lock().await;
            if self.record(&v.name).is_some() {
                continue;
            }
            if canonical(&v.name).is_err() {
                tracing::warn!(name = ?v.name, "the agent listed an invalid volume name; skipping it");
                continue;
            }
            tracing::warn!(volume = %v.name, "attached to this VM but not mounted; detaching");
            crate::obs::reconcile_action("detach_stray");
            if let Err(e) = self.agent.detach(&self.cfg.vm_id, &v.name).await {
                tracing::error!(volume = %v.name, error = %e, "detach of stray attachment failed");
            }
        }
    }

    async fn clean_mount_root(&self) {
        let st = self.snapshot();
        let Ok(entries) = std::fs::read_dir(&self.cfg.mount_root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !st.mounts.contains_key(&name) && e.path().is_dir() {
                // remove_dir refuses non-empty directories: only leftovers go.
                if std::fs::remove_dir(e.path()).is_ok() {
                    tracing::info!(dir = %e.path().display(), "removed leftover mount directory");
                    crate::obs::reconcile_action("remove_dir");
                }
            }
        }
    }
}

/// The filesystems mounted directly below `mount_root`, by the name of
/// their directory (`vol@ds`).
pub fn volume_mounts(
    all: impl IntoIterator<Item = crate::sys::MountEntry>,
    mount_root: &Path,
) -> BTreeMap<String, crate::sys::MountEntry> {
    all.into_iter()
        .filter(|m| m.target.parent() == Some(mount_root))
        .filter_map(|m| Some((m.target.file_name()?.to_string_lossy().into_owned(), m)))
        .collect()
}

/// The `Status` of a volume in Get's answer (what `docker volume inspect`
/// shows). Borrowed from the volume, and serialized with its keys in byte
/// order (as a `serde_json::Map` would have them).
#[derive(Debug, serde::Serialize)]
pub struct InspectStatus<'a> {
    access: &'a str,
    #[serde(rename = "attach-as")]
    attach_as: &'a str,
    #[serde(rename = "attached to VM")]
    attached_to: &'a str,
    capacity: Capacity,
    #[serde(rename = "clone-from")]
    clone_from: &'a str,
    created: &'a str,
    #[serde(rename = "created by VM")]
    created_by: &'a str,
    datastore: &'a str,
    #[serde(rename = "disk-uuid")]
    disk_uuid: &'a str,
    diskformat: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    formatted: String,
    fstype: &'a str,
    mounts: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<String>,
    status: &'a str,
    vmgroup: &'a str,
    #[serde(rename = "vsan-policy-name")]
    vsan_policy_name: &'a str,
    #[serde(rename = "vsan-policy-state", skip_serializing_if = "Option::is_none")]
    vsan_policy_state: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct Capacity {
    allocated: String,
    size: String,
}

/// The `Status` of `info` in Get's answer, `rec` its mount record here.
pub fn inspect_status<'a>(info: &'a VolumeInfo, rec: Option<&MountRecord>) -> InspectStatus<'a> {
    let mut st = InspectStatus {
        access: info.access.as_str(),
        attach_as: info.attach_as.as_str(),
        attached_to: info.attached_to.as_deref().unwrap_or("detached"),
        capacity: Capacity {
            allocated: human_bytes(info.allocated_bytes),
            size: human_bytes(info.capacity_bytes),
        },
        clone_from: info.clone_from.as_deref().unwrap_or("None"),
        created: &info.created,
        created_by: &info.created_by,
        datastore: &info.datastore,
        disk_uuid: &info.disk_uuid,
        diskformat: info.disk_format.as_str(),
        error: None,
        formatted: match &info.formatted {
            Some(f) => format!("{} on {} by VM {}", f.fstype, f.at, f.by),
            None => "not yet (formatted at the first mount)".to_owned(),
        },
        fstype: &info.fstype,
        mounts: rec.map_or(0, |r| r.ids.len()),
        progress: None,
        status: match info.status {
            AttachStatus::Attached => "attached",
            AttachStatus::Detached => "detached",
        },
        vmgroup: &info.vmgroup,
        vsan_policy_name: info.vsan_policy.as_deref().unwrap_or("[VSAN default]"),
        vsan_policy_state: info.vsan_policy_state.as_ref().map(|state| match state {
            vmdk_protocol::PolicyState::Applied { profile, .. } => format!("applied (storage profile {profile})"),
            vmdk_protocol::PolicyState::Pending { profile, .. } => {
                format!("pending (storage profile {profile}, set at the next attach)")
            }
            vmdk_protocol::PolicyState::Recorded { reason } => format!("recorded, not applied: {reason}"),
        }),
    };
    // A create that runs on after its answer (eagerzeroedthick, clone).
    if let Some(c) = &info.creating {
        match &c.failed {
            None => {
                st.status = "creating";
                st.progress = Some(format!("{} {}%", c.step, c.percent));
            }
            Some(cause) => {
                st.status = "failed";
                st.error = Some(format!("the create failed: {cause}"));
            }
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_release_of_mounts_is_saved_without_a_durable_rename() {
        let rec = |ids: &[&str], nested: &[(&str, u32)]| MountRecord {
            ids: ids.iter().map(|i| (i.to_string(), 7)).collect(),
            nested: nested.iter().map(|(i, n)| (i.to_string(), *n)).collect(),
            device: "/dev/loop0".into(),
            fstype: "ext4".into(),
            read_only: false,
        };
        let two = rec(&["a", "b"], &[("a", 2)]);
        // Releases: the record goes, an ID goes, a nested mount goes.
        assert!(releases(Some(&two), None));
        assert!(releases(Some(&two), Some(&rec(&["a"], &[("a", 2)]))));
        assert!(releases(Some(&two), Some(&rec(&["a", "b"], &[("a", 1)]))));
        assert!(releases(Some(&two), Some(&rec(&["a", "b"], &[]))));
        // Claims: a new record, a new ID, a nested mount more, an ID taken
        // again at another time, another device or mode.
        assert!(!releases(None, Some(&two)));
        assert!(!releases(Some(&two), Some(&rec(&["a", "b", "c"], &[("a", 2)]))));
        assert!(!releases(Some(&two), Some(&rec(&["a", "b"], &[("a", 3)]))));
        assert!(!releases(Some(&two), Some(&rec(&["a", "b"], &[("a", 2), ("b", 1)]))));
        let mut later = two.clone();
        later.ids.insert("a".into(), 8);
        assert!(!releases(Some(&two), Some(&later)));
        let mut other = rec(&["a"], &[]);
        other.device = "/dev/loop1".into();
        assert!(!releases(Some(&two), Some(&other)));
        let mut ro = rec(&["a"], &[]);
        ro.read_only = true;
        assert!(!releases(Some(&two), Some(&ro)));
    }

    #[test]
    fn device_paths_from_the_agent_must_stay_under_dev() {
        for ok in ["/dev/loop0", "/dev/disk/by-id/wwn-0x6000c29", "/dev/sdb"] {
            assert!(device_path_ok(ok), "{ok}");
        }
        for bad in ["/etc/shadow", "/dev", "/dev/", "/dev/../etc/x", "dev/loop0", ""] {
            assert!(!device_path_ok(bad), "{bad}");
        }
    }

    #[test]
    fn answers_must_name_the_volume_asked_about() {
        assert!(answer_names("v", "v@local"));
        assert!(answer_names("v@LOCAL", "v@local"));
        assert!(!answer_names("v", "w@local"));
        assert!(!answer_names("v@ds1", "v@ds2"));
        assert!(!answer_names("v", "v"));
        assert!(!answer_names("x", "../../etc@local"));
        assert!(!answer_names("x", "x@a/b"));
    }

    /// `docker volume inspect` shows a create running on after its answer,
    /// and one that failed, in Status.
    #[test]
    fn inspect_shows_a_create_in_progress_or_failed() {
        let json = serde_json::json!({
            "name": "big@local", "volume": "big", "datastore": "local", "vmgroup": "_DEFAULT",
            "capacity_bytes": 1073741824u64, "allocated_bytes": 0, "disk_format": "eagerzeroedthick",
            "fstype": "ext4", "vsan_policy": null, "access": "read-write",
            "attach_as": "independent_persistent", "status": "detached", "attached_to": null,
            "created": "2026-12-01T00:00:00Z", "created_by": "vm-1", "clone_from": null,
            "disk_uuid": "", "options": {},
            "creating": {"step": "zeroing", "percent": 42, "started": "2026-12-01T00:00:00Z"}
        });
        let mut info: VolumeInfo = serde_json::from_value(json).unwrap();
        let st = serde_json::to_value(inspect_status(&info, None)).unwrap();
        assert_eq!(st[vmdk_protocol::options::VSAN_POLICY_NAME], "[VSAN default]");
        assert_eq!(st["status"], "creating");
        assert_eq!(st["progress"], "zeroing 42%");
        assert!(st.get("error").is_none());
        info.creating.as_mut().unwrap().failed = Some("no space left".into());
        let st = serde_json::to_value(inspect_status(&info, None)).unwrap();
        assert_eq!(st["status"], "failed");
        assert_eq!(st["error"], "the create failed: no space left");
        info.creating = None;
        let st = serde_json::to_value(inspect_status(&info, None)).unwrap();
        assert_eq!(st["status"], "detached");
        assert!(st.get("progress").is_none());
        assert!(st.get("vsan-policy-state").is_none());
        info.vsan_policy_state = Some(vmdk_protocol::PolicyState::Recorded {
            reason: "ESXi without vCenter has no storage policies".into(),
        });
        let st = serde_json::to_value(inspect_status(&info, None)).unwrap();
        assert_eq!(
            st["vsan-policy-state"],
            "recorded, not applied: ESXi without vCenter has no storage policies"
        );
    }
}
