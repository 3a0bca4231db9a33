//! The volume service: what each agent operation means.
//!
//! [`VolumeService`] knows names, options, datastores, metadata and locking;
//! it knows no HTTP. The API layer, the admin CLI and the guest's embedded
//! mode all call it, each saying who calls ([`Caller`]). It is async: the
//! backend may be a remote hypervisor, and blocking file and device calls
//! run on tokio's blocking pool below it.
//!
//! Rules every operation follows:
//! * input is validated before anything touches the disk;
//! * each volume operation runs under the volume's cross-process lock
//!   ([`crate::lock::VolumeLock`]), and operations on different volumes
//!   never wait on each other; reads (get, list) take no lock, so they
//!   never wait behind a slow create or attach;
//! * every step is idempotent: create of an existing volume says
//!   `already_exists`, attach returns the existing attachment, detach of a
//!   detached volume succeeds;
//! * metadata is a hint checked against the backend's live state before a
//!   decision that depends on it (remove, attach from another VM).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use vmdk_protocol::options::{self as opt, VolumeOptions};
use vmdk_protocol::size::MIB;
use vmdk_protocol::{
    AccessMode, AttachAs, AttachInfo, AttachStatus, CreateRequest, DiskFormat, FormatRecord, FsType, PolicyState,
    VersionInfo, VolumeInfo, VolumeRef, API_VERSION,
};

use crate::backend::{Attachment, BackendError, DiskBackend, DiskInfo, DiskRef, PolicySpec, PowerRelease};
use crate::config::AgentConfig;
use crate::datastore::{Datastore, Marker, VolumeFiles, VolumeFolder, DEFAULT_VMGROUP};
use crate::error::AgentError;
use crate::lock::VolumeLock;
use crate::meta::{VolumeMeta, META_VERSION};
use crate::policy::PolicyLock;
use crate::progress::Progress;
use crate::store::{DsPath, FileKind, StoreError};

mod admin;
mod catalog;
mod pending;
mod recover;

pub use admin::{DatastoreUsage, PolicyInfo, PolicyUpdate, EDITABLE_OPTIONS};
pub use recover::StartupRecovery;

/// Longest accepted VM id.
pub const MAX_VM_ID_LEN: usize = 256;

/// Validates a caller's VM id (from the `VM-Id` header or `--vm-id`).
pub fn validate_vm_id(vm: &str) -> Result<(), AgentError> {
    if vm.is_empty() {
        return Err(AgentError::MissingVmId("it is empty".into()));
    }
    if vm.len() > MAX_VM_ID_LEN {
        return Err(AgentError::MissingVmId(format!("longer than {MAX_VM_ID_LEN} bytes")));
    }
    if vm.chars().any(char::is_control) {
        return Err(AgentError::MissingVmId("it contains control characters".into()));
    }
    Ok(())
}

/// Who an operation acts for, decided in one place per way in: the `VM-Id`
/// header for the API ([`crate::api`]), the plugin's own VM for an embedded
/// agent, the administrator for the admin CLI. (The tenancy issue derives
/// the VM from the guest's credentials instead of a header.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A VM, by its id (the BIOS UUID for the `vsphere` backend).
    Vm(String),
    /// The host's administrator (admin CLI): may read and manage every
    /// volume, but is no VM to attach to.
    Admin,
}

impl Caller {
    /// A VM caller; the id is validated.
    pub fn vm(id: &str) -> Result<Self, AgentError> {
        validate_vm_id(id)?;
        Ok(Self::Vm(id.to_owned()))
    }

    /// The VM this caller is; an operation that acts for a VM refuses the
    /// administrator.
    pub fn vm_id(&self) -> Result<&str, AgentError> {
        match self {
            Self::Vm(id) => Ok(id),
            Self::Admin => Err(AgentError::MissingVmId(
                "this operation acts for a VM; the administrator is not one".into(),
            )),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vm(id) => write!(f, "VM {id}"),
            Self::Admin => f.write_str("administrator"),
        }
    }
}

/// Whether a directory datastore is VSAN: the type recorded on it (see
/// [`crate::datastore::TYPE_FILE`]) unless the configuration says, in which
/// case that is recorded (a change is logged). A record that cannot be read
/// or written is logged and the configuration (else not VSAN) used.
fn settle_vsan(ds: &Datastore, configured: Option<bool>) -> bool {
    let err = crate::error::error_chain;
    let recorded = match ds.recorded_vsan() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(datastore = %ds.name, error = %err(&e), "cannot read the datastore's recorded type");
            None
        }
    };
    let Some(want) = configured else {
        return recorded.unwrap_or(false);
    };
    if recorded != Some(want) {
        if let Some(was) = recorded {
            tracing::warn!(datastore = %ds.name, was_vsan = was, now_vsan = want, "the configuration changes the datastore's recorded type");
        }
        if let Err(e) = ds.record_vsan(want) {
            tracing::warn!(datastore = %ds.name, vsan = want, error = %err(&e), "cannot record the datastore's type; other processes may not see it");
        }
    }
    want
}

/// A resolved volume: its canonical name, datastore and volume part.
#[derive(Debug, Clone)]
struct Target<'a> {
    full: String,
    ds: &'a Datastore,
    volume: String,
}

impl Target<'_> {
    fn disk(&self) -> DiskRef<'_> {
        DiskRef {
            datastore: self.ds,
            vmgroup: DEFAULT_VMGROUP,
            volume: &self.volume,
        }
    }

    fn files(&self) -> VolumeFiles {
        VolumeFiles::new(&self.volume)
    }

    fn shown(&self, file: &str) -> DsPath {
        self.disk().shown(file)
    }
}

/// A vmgroup folder as the service uses it.
type Folder = Box<dyn VolumeFolder>;

/// What [`VolumeService::list_names_since`] lists: the names, as `(vol@ds,
/// vol, ds)`, sorted, and the key that stands for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameList {
    /// `Some` when the same names will come with the same key, for as long
    /// as this service runs (a list with a create under way, or a volume
    /// the catalog could not keep, has none).
    pub key: Option<NamesKey>,
    /// `(vol@ds, vol, ds)` of every volume.
    pub names: Vec<(String, String, String)>,
}

/// Stands for the names of one [`NameList`]: per datastore, whether its
/// folder is there and the count of changes to its catalog's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamesKey(Vec<u64>);

/// What the catalogs say of the volume names.
enum FromCatalogs {
    /// Those of the list whose key the caller knew.
    Same,
    /// These.
    Listed(NameList),
    /// A datastore has no catalog, or another process is creating a
    /// volume: only a full list says.
    Unavailable,
}

/// The agent's domain service. Cloning shares it (the backend, the
/// creates running in the background).
#[derive(Debug, Clone)]
pub struct VolumeService {
    datastores: Vec<Datastore>,
    backend: Arc<dyn DiskBackend>,
    pending: Arc<pending::Registry>,
    answer_within: Duration,
    catalog: Arc<catalog::Catalog>,
}

/// How long a create whose long part (zeroing, copying) has begun may run
/// before it is answered and continues in the background (Docker gives a
/// managed plugin's Create 30 s in all).
pub const CREATE_ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long an attach waits for a create still running in the background
/// (Docker gives a Mount 2 minutes).
pub const ATTACH_WAITS_FOR_CREATE: Duration = Duration::from_secs(90);

impl VolumeService {
    /// Builds the service; every datastore directory must exist.
    pub fn new(config: &AgentConfig, backend: Arc<dyn DiskBackend>) -> Result<Self, AgentError> {
        config
            .validate()
            .map_err(|e| AgentError::InvalidRequest(crate::error::error_chain(&e)))?;
        let mut datastores = Vec::new();
        let mut seen: Vec<(std::path::PathBuf, &str)> = Vec::new();
        for ds in &config.datastores {
            let Some(path) = &ds.path else {
                return Err(AgentError::InvalidRequest(format!(
                    "datastore {} has no directory; a datastore of the local backend is a directory",
                    ds.name
                )));
            };
            if ds.is_built_in() {
                // The built-in datastore is made on first use, privately; a
                // configured one must exist (a missing one is more likely an
                // unmounted share than a wish for an empty datastore).
                std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                    .create(path)
                    .map_err(|source| AgentError::Io {
                        op: "create the built-in datastore directory",
                        path: format!("{} (datastore {})", path.display(), ds.name),
                        source,
                    })?;
            }
            let meta = std::fs::metadata(path).map_err(|source| AgentError::Io {
                op: "datastore directory",
                path: format!("{} (datastore {})", path.display(), ds.name),
                source,
            })?;
            if !meta.is_dir() {
                return Err(AgentError::InvalidRequest(format!(
                    "datastore {} path {} is not a directory",
                    ds.name,
                    path.display()
                )));
            }
            // One directory under two names would show every volume twice
            // and let one disk be mounted under two names.
            let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            if let Some((_, other)) = seen.iter().find(|(p, _)| *p == real) {
                return Err(AgentError::InvalidRequest(format!(
                    "datastores {other} and {} are the same directory {}; give each datastore its own directory",
                    ds.name,
                    real.display()
                )));
            }
            seen.push((real, &ds.name));
            let mut store = Datastore {
                name: ds.name.clone(),
                root: Some(path.clone()),
                vsan: false,
            };
            store.vsan = settle_vsan(&store, ds.vsan);
            datastores.push(store);
        }
        Ok(Self::assemble(datastores, backend))
    }

    fn assemble(datastores: Vec<Datastore>, backend: Arc<dyn DiskBackend>) -> Self {
        Self {
            catalog: Arc::new(catalog::Catalog::new(datastores.len())),
            datastores,
            backend,
            pending: Default::default(),
            answer_within: CREATE_ANSWER_WITHIN,
        }
    }

    /// Sets how young a file's change time may be before the catalog (see
    /// `service::catalog`) stops trusting it (default two seconds, for the
    /// coarsest file system clocks). For tests on file systems with fine
    /// clocks; set before the service is used.
    #[doc(hidden)]
    pub fn with_catalog_window(mut self, d: Duration) -> Self {
        let mut c = catalog::Catalog::new(self.datastores.len());
        c.racy_ns = d.as_nanos() as i128;
        self.catalog = Arc::new(c);
        self
    }

    /// Whether every datastore's catalog is complete and trusted, so the
    /// next List reads no volume file unless a folder changed (tests).
    #[doc(hidden)]
    pub fn catalog_settled(&self) -> bool {
        self.catalog.folders.iter().all(|f| f.read().unwrap().scanned.is_some())
    }

    /// Sets how long a create whose long part has begun runs before it is
    /// answered (default [`CREATE_ANSWER_WITHIN`]); see `service::pending`.
    pub fn with_answer_within(mut self, d: Duration) -> Self {
        self.answer_within = d;
        self
    }

    /// The service a configuration describes: the `local` backend on its
    /// datastore directories (with the kernel's loop devices), or the
    /// `vsphere` backend connected and logged in, on the configured
    /// datastores (or every datastore it sees).
    pub async fn from_config(config: &AgentConfig) -> Result<Self, AgentError> {
        use crate::config::BackendKind;
        match config.backend {
            BackendKind::Local => {
                let loops = Arc::new(crate::backend::loopdev::LinuxLoops::default());
                Self::new(config, Arc::new(crate::backend::local::LocalBackend::new(loops)))
            }
            BackendKind::Vsphere => {
                config
                    .validate()
                    .map_err(|e| AgentError::InvalidRequest(crate::error::error_chain(&e)))?;
                let vs = config.vsphere.as_ref().expect("validated");
                let backend = crate::backend::vsphere::VsphereBackend::connect(vs)
                    .await
                    .map_err(|source| AgentError::Backend {
                        name: vs.url.clone(),
                        source,
                    })?;
                let datastores =
                    backend
                        .datastores(&config.datastores)
                        .await
                        .map_err(|source| AgentError::Backend {
                            name: vs.url.clone(),
                            source,
                        })?;
                Self::from_datastores(datastores, Arc::new(backend))
            }
        }
    }

    /// A service on datastores the backend found (`vsphere`: from the
    /// server); the first is the default for callers without a home
    /// datastore. At least one is needed.
    pub fn from_datastores(datastores: Vec<Datastore>, backend: Arc<dyn DiskBackend>) -> Result<Self, AgentError> {
        if datastores.is_empty() {
            return Err(AgentError::InvalidRequest(
                "no datastore is usable: none configured is known to the server, or the account sees none".into(),
            ));
        }
        Ok(Self::assemble(datastores, backend))
    }

    /// The configured datastores; the first is the default.
    pub fn datastores(&self) -> &[Datastore] {
        &self.datastores
    }

    /// The backend in use.
    pub fn backend(&self) -> &Arc<dyn DiskBackend> {
        &self.backend
    }

    /// `GET /v1/version`.
    pub fn version(&self) -> VersionInfo {
        VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api: API_VERSION.to_owned(),
            backend: self.backend.kind().to_owned(),
            datastores: self.datastores.iter().map(|d| d.name.clone()).collect(),
            datastore_ids: self.datastore_ids().unwrap_or_default(),
            home_datastore: None,
            embedded_in: None,
        }
    }

    /// The identity (`<device>:<inode>`) of every datastore's directory,
    /// if each is a directory on this host (see
    /// [`VersionInfo::datastore_ids`]).
    pub fn datastore_ids(&self) -> Option<Vec<String>> {
        self.datastores
            .iter()
            .map(|d| d.root.as_deref().and_then(datastore_id))
            .collect()
    }

    /// [`VolumeService::version`] for `caller`, naming the datastore its
    /// short volume names go to.
    pub async fn version_for(&self, caller: &Caller) -> VersionInfo {
        let mut v = self.version();
        v.home_datastore = Some(self.home_datastore(caller).await.name.clone());
        v
    }

    fn datastore(&self, name: Option<&str>) -> Result<&Datastore, AgentError> {
        let default = &self.datastores[0];
        let Some(name) = name else { return Ok(default) };
        if let Some(ds) = self.datastores.iter().find(|d| d.name == name) {
            return Ok(ds);
        }
        let lower = name.to_lowercase();
        let matches: Vec<&Datastore> = self
            .datastores
            .iter()
            .filter(|d| d.name.to_lowercase() == lower)
            .collect();
        match matches.as_slice() {
            [one] => Ok(one),
            _ => Err(AgentError::UnknownDatastore {
                datastore: name.to_owned(),
                known: self.datastores.iter().map(|d| d.name.clone()).collect(),
                default: default.name.clone(),
            }),
        }
    }

    /// The datastore `caller`'s short volume names go to: the one holding
    /// its VM when the backend knows (`vsphere`, as the original did), else
    /// the first configured.
    pub async fn home_datastore(&self, caller: &Caller) -> &Datastore {
        if let Caller::Vm(vm) = caller {
            match self.backend.home_datastore(vm).await {
                Ok(Some(name)) => {
                    if let Some(ds) = self.datastores.iter().find(|d| d.name == name) {
                        return ds;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(vm, error = %crate::error::error_chain(&e), "cannot find the VM's datastore; short names go to the default")
                }
            }
        }
        &self.datastores[0]
    }

    async fn resolve(&self, caller: &Caller, name: &str) -> Result<Target<'_>, AgentError> {
        let r = VolumeRef::parse(name)?;
        let ds = match r.datastore.as_deref() {
            Some(n) => self.datastore(Some(n))?,
            None => self.home_datastore(caller).await,
        };
        Ok(Target {
            full: r.full_name(&ds.name),
            ds,
            volume: r.volume,
        })
    }

    fn not_found(t: &Target<'_>) -> AgentError {
        AgentError::NotFound {
            name: t.full.clone(),
            path: t.shown(&t.files().descriptor).to_string(),
        }
    }

    fn store_err<'a>(t: &'a Target<'_>) -> impl FnOnce(StoreError) -> AgentError + 'a {
        |source| AgentError::Store {
            name: t.full.clone(),
            source,
        }
    }

    /// The volume's vmgroup folder (the backend's: a directory through the
    /// datastore door, or the datastore file API); `None` when it does not
    /// exist (and `create` is false).
    async fn folder(&self, t: &Target<'_>, create: bool) -> Result<Option<Folder>, AgentError> {
        self.backend
            .folder(t.ds, DEFAULT_VMGROUP, create)
            .await
            .map_err(Self::store_err(t))
    }

    /// The folder of a volume that must exist.
    async fn existing_folder(&self, t: &Target<'_>) -> Result<Folder, AgentError> {
        self.folder(t, false).await?.ok_or_else(|| Self::not_found(t))
    }

    async fn load_meta(t: &Target<'_>, folder: &dyn VolumeFolder) -> Result<Option<VolumeMeta>, AgentError> {
        folder.read_meta(&t.volume).await.map_err(|source| AgentError::Meta {
            name: t.full.clone(),
            source,
        })
    }

    /// The sidecar of a volume that must exist.
    async fn existing_meta(t: &Target<'_>, folder: &dyn VolumeFolder) -> Result<VolumeMeta, AgentError> {
        Self::load_meta(t, folder).await?.ok_or_else(|| Self::not_found(t))
    }

    /// Writes the volume's sidecar (under its lock) and updates its
    /// catalog entry in place.
    async fn store_meta(&self, t: &Target<'_>, folder: &dyn VolumeFolder, meta: &VolumeMeta) -> Result<(), AgentError> {
        let res = Self::write_sidecar(t, folder, meta).await;
        self.catalog_wrote(t, res.as_ref().ok().map(|()| meta), None);
        res
    }

    async fn write_sidecar(t: &Target<'_>, folder: &dyn VolumeFolder, meta: &VolumeMeta) -> Result<(), AgentError> {
        folder
            .write_meta(&t.volume, meta)
            .await
            .map_err(|source| AgentError::Meta {
                name: t.full.clone(),
                source,
            })
    }

    /// Updates the volume's catalog entry after this agent wrote its
    /// sidecar: `meta` is what it wrote (`None`: the write failed, so the
    /// sidecar may hold either version), `disk` the disk a create made.
    fn catalog_wrote(&self, t: &Target<'_>, meta: Option<&VolumeMeta>, disk: Option<&crate::backend::DiskInfo>) {
        let Some((i, local)) = self.catalog_folder(t.ds) else {
            return;
        };
        let verify = match meta {
            Some(meta) => self.catalog.wrote(i, &local, &t.volume, meta, disk),
            None => {
                self.catalog.forget(i, &t.volume);
                false
            }
        };
        if verify {
            self.spawn_verify(i);
        }
    }

    /// This agent removed the volume's files.
    fn catalog_removed(&self, t: &Target<'_>) {
        if let Some((i, _)) = self.catalog_folder(t.ds) {
            if self.catalog.removed(i, &t.volume) {
                self.spawn_verify(i);
            }
        }
    }

    fn backend_err<'a>(t: &'a Target<'_>) -> impl FnOnce(BackendError) -> AgentError + 'a {
        |source| AgentError::Backend {
            name: t.full.clone(),
            source,
        }
    }

    /// The volume's lock; dropping it releases the lock (and removes the
    /// lock file when the name is no volume then).
    async fn lock(t: &Target<'_>, folder: &dyn VolumeFolder) -> Result<VolumeLock, AgentError> {
        folder.lock(&t.volume).await.map_err(Self::store_err(t))
    }

    async fn entry(
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        file: &str,
    ) -> Result<Option<crate::store::Stat>, AgentError> {
        folder.entry(file).await.map_err(Self::store_err(t))
    }

    async fn info(&self, t: &Target<'_>, meta: &VolumeMeta) -> Result<VolumeInfo, AgentError> {
        let disk = self.backend.disk_info(&t.disk()).await.map_err(Self::backend_err(t))?;
        Ok(build_info(&t.full, t.ds, DEFAULT_VMGROUP, meta, &disk))
    }

    /// `GET /v1/volumes/{name}`. Takes no lock: a read never waits behind a
    /// slow create or attach of the same name. A volume whose files are
    /// damaged (sidecar, descriptor or extent missing, unreadable, of the
    /// wrong kind) is an error naming the file, never reported healthy.
    pub async fn get(&self, caller: &Caller, name: &str) -> Result<VolumeInfo, AgentError> {
        let t = self.resolve(caller, name).await?;
        if let Some(p) = self.pending.get(&t.full) {
            return Ok(p.info());
        }
        // The catalog answers when the volume's files carry the stamps it
        // read them with (a few stats on this thread, no hop).
        let cat = self.catalog_folder(t.ds);
        let mut stamps = None;
        let seen = cat.as_ref().map_or(0, |(i, _)| self.catalog.seq(*i));
        if let Some((i, folder)) = &cat {
            if let Some((meta, disk)) = self.catalog.lookup(*i, folder, &t.volume) {
                let holder_checked = match attached_vm(&meta) {
                    Some(holder) => self.holder_powered_off(&t, holder).await.is_none(),
                    None => true,
                };
                if holder_checked {
                    return Ok(build_info(&t.full, t.ds, DEFAULT_VMGROUP, &meta, &disk));
                }
            }
            stamps = catalog::FileStamps::take(folder, &t.volume, self.catalog.racy_ns).map(|(s, _, ok)| (s, ok));
        }
        let folder = self.existing_folder(&t).await?;
        let mut meta = match Self::existing_meta(&t, &*folder).await {
            Ok(m) => m,
            Err(e) => {
                // What Get found is the truth: a volume the catalog holds
                // but whose files are gone (removed by another agent) must
                // not come back in the next List.
                if let (Some((i, _)), AgentError::NotFound { .. }) = (&cat, &e) {
                    self.catalog.gone(*i, &t.volume);
                }
                return Err(e);
            }
        };
        if let Some(holder) = attached_vm(&meta) {
            if let Some(off) = self.holder_powered_off(&t, holder).await {
                if let Some(checked) = self.recheck_unlocked(&t, &*folder, off).await {
                    meta = checked;
                    stamps = None;
                }
            }
        }
        let disk = self.backend.disk_info(&t.disk()).await.map_err(Self::backend_err(&t))?;
        if let (Some((i, _)), Some(stamps)) = (&cat, stamps) {
            self.catalog.store(*i, &t.volume, stamps, &meta, &disk, seen);
        }
        Ok(build_info(&t.full, t.ds, DEFAULT_VMGROUP, &meta, &disk))
    }

    /// The catalog's index of `ds` and its default vmgroup folder, opened
    /// through the datastore door, when the catalog serves it: datastores
    /// this host reaches as directories, with the `local` backend. `None`
    /// also when the folder does not exist (yet).
    fn catalog_folder(&self, ds: &Datastore) -> Option<(usize, crate::datastore::LocalFolder)> {
        if self.backend.kind() != "local" || ds.root.is_none() {
            return None;
        }
        let i = self.datastores.iter().position(|d| std::ptr::eq(d, ds))?;
        let folder = ds.folder(DEFAULT_VMGROUP, false).ok()??;
        Some((i, folder))
    }

    /// Whether the hypervisor says `vm`, which the records say holds a
    /// volume, is powered off; `None` when the backend knows no power
    /// states or not this VM. An error is logged and read as `None`: a read
    /// never fails because of it.
    async fn holder_powered_off(&self, t: &Target<'_>, vm: &str) -> Option<bool> {
        match self.backend.powered_off(vm).await {
            Ok(off) => off,
            Err(e) => {
                tracing::warn!(volume = %t.full, vm, error = %crate::error::error_chain(&e), "cannot read the power state of the VM holding the volume");
                None
            }
        }
    }

    /// For a read (get, list) of a volume recorded as attached to a VM the
    /// hypervisor knows: releases it when that VM is powered off
    /// (`powered_off`), else checks that the VM really has the disk and
    /// heals the records when it does not (an attach cut off half-way).
    /// Only if the volume's lock is free right now: a read never waits
    /// behind an operation. Returns the metadata after a change, `None`
    /// when nothing changed.
    async fn recheck_unlocked(
        &self,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        powered_off: bool,
    ) -> Option<VolumeMeta> {
        let _lock = match folder.try_lock(&t.volume).await {
            Ok(Some(l)) => l,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot lock the volume to check its attachment");
                return None;
            }
        };
        let result = async {
            let mut meta = Self::existing_meta(t, folder).await?;
            if attached_vm(&meta).is_none() {
                return Ok(Some(meta));
            }
            if powered_off {
                return Ok(self.release_powered_off(t, folder, &mut meta).await?.then_some(meta));
            }
            if self.live_attachment(t, folder, &meta).await?.is_none() {
                // live_attachment recorded it as detached.
                clear_attachment(&mut meta);
                return Ok(Some(meta));
            }
            Ok(None)
        }
        .await;
        result.unwrap_or_else(|e: AgentError| {
            tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot check the volume's attachment");
            None
        })
    }

    /// What the original's power-state listener did, done when the records
    /// are used instead of by a listener: a volume whose holder the
    /// hypervisor reports powered off leaves that VM's configuration (the
    /// file stays) and is recorded as detached, so another VM can attach
    /// it. A running or suspended holder keeps it. Under the volume's lock;
    /// `meta` is updated. Returns whether it released the volume.
    async fn release_powered_off(
        &self,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        meta: &mut VolumeMeta,
    ) -> Result<bool, AgentError> {
        let Some(holder) = attached_vm(meta).map(str::to_owned) else {
            return Ok(false);
        };
        match self
            .backend
            .release_if_powered_off(&holder, &t.disk())
            .await
            .map_err(Self::backend_err(t))?
        {
            PowerRelease::Released => {
                clear_attachment(meta);
                self.store_meta(t, folder, meta).await?;
                tracing::warn!(volume = %t.full, vm = %holder, "released the volume from a powered-off VM (its file is kept)");
                Ok(true)
            }
            PowerRelease::Running | PowerRelease::Unknown => Ok(false),
        }
    }

    /// `GET /v1/volumes`: every volume on every datastore, sorted by name.
    /// A volume whose files cannot be read is skipped (and logged), so one
    /// bad volume never hides the others.
    pub async fn list(&self, _caller: &Caller) -> Result<Vec<VolumeInfo>, AgentError> {
        let mut all = self.inventory().await?;
        let pending = self.pending.all();
        if !pending.is_empty() {
            all.retain(|v| pending.iter().all(|p| p.preview.name != v.name));
            all.extend(pending.iter().map(|p| p.info()));
            all.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(all)
    }

    /// The volumes attached to the calling VM, by the backend's live view
    /// and their records (what a restarted guest checks for stray
    /// attachments); see [`VolumeService::attached_here`].
    pub async fn list_attached(&self, caller: &Caller) -> Result<Vec<VolumeInfo>, AgentError> {
        self.attached_here(caller).await
    }

    /// The names of what [`VolumeService::list`] lists, as `(vol@ds,
    /// vol, ds)`, sorted: what Docker's List needs. From the catalogs
    /// (brought up to date first when a folder changed; no `VolumeInfo` is
    /// built); from a full [`VolumeService::list`] when a datastore has no
    /// catalog or another process is creating a volume.
    pub async fn list_names(&self, caller: &Caller) -> Result<Vec<(String, String, String)>, AgentError> {
        Ok(self
            .list_names_since(caller, None)
            .await?
            .map(|l| l.names)
            .unwrap_or_default())
    }

    /// [`VolumeService::list_names`], or `None` when the names are those of
    /// the list whose [`NameList::key`] was `known`. A caller that keeps
    /// what it made of a list (Docker's List answer) reuses it while the
    /// key holds, and a List then costs a `stat` of each folder.
    pub async fn list_names_since(
        &self,
        caller: &Caller,
        known: Option<&NamesKey>,
    ) -> Result<Option<NameList>, AgentError> {
        let mut list = match self.catalog_names(known).await? {
            FromCatalogs::Same => return Ok(None),
            FromCatalogs::Listed(l) => l,
            FromCatalogs::Unavailable => {
                let names: Vec<_> = self
                    .list(caller)
                    .await?
                    .into_iter()
                    .map(|v| (v.name, v.volume, v.datastore))
                    .collect();
                // The full list built for this is freed: give it back.
                if names.len() >= vmdk_common::memory::TRIM_VOLUMES {
                    vmdk_common::memory::trim();
                }
                return Ok(Some(NameList { key: None, names }));
            }
        };
        let pending = self.pending.all();
        if !pending.is_empty() {
            // Creates under way come and go without a trace in the
            // catalogs: a list that shows them is never reused.
            list.key = None;
            list.names.extend(pending.iter().map(|p| {
                (
                    p.preview.name.clone(),
                    p.preview.volume.clone(),
                    p.preview.datastore.clone(),
                )
            }));
            list.names.sort();
            list.names.dedup();
        }
        Ok(Some(list))
    }

    /// Every volume name in the catalogs, each brought up to date first
    /// unless List may answer from it as it is (see `service::catalog`).
    async fn catalog_names(&self, known: Option<&NamesKey>) -> Result<FromCatalogs, AgentError> {
        if self.backend.kind() != "local" || self.datastores.iter().any(|d| d.root.is_none()) {
            return Ok(FromCatalogs::Unavailable);
        }
        let mut folders = Vec::with_capacity(self.datastores.len());
        let mut reusable = true;
        for (i, ds) in self.datastores.iter().enumerate() {
            let uncached = match self.catalog_folder(ds) {
                Some((_, folder)) => Some(self.catalog_current(i, &folder).await?),
                None => None,
            };
            // A volume the catalog could not keep is listed from the
            // scan's read, not from the catalog's names.
            reusable &= uncached.as_ref().is_none_or(Vec::is_empty);
            folders.push(uncached);
        }
        // Whether a folder is there, and its count of name changes.
        let key_of = |i: usize, cat: &catalog::FolderCatalog| cat.vols.names() << 1 | u64::from(folders[i].is_some());
        if let Some(known) = known.filter(|_| reusable) {
            let mut same = known.0.len() == self.datastores.len();
            for i in 0..self.datastores.len() {
                let cat = self.catalog.folders[i].read().unwrap();
                if !cat.creating.is_empty() {
                    return Ok(FromCatalogs::Unavailable);
                }
                same &= known.0.get(i) == Some(&key_of(i, &cat));
            }
            if same {
                return Ok(FromCatalogs::Same);
            }
        }
        let mut names = Vec::new();
        let mut key = Vec::with_capacity(self.datastores.len());
        for (i, ds) in self.datastores.iter().enumerate() {
            let cat = self.catalog.folders[i].read().unwrap();
            if !cat.creating.is_empty() {
                return Ok(FromCatalogs::Unavailable);
            }
            key.push(key_of(i, &cat));
            let Some(uncached) = &folders[i] else {
                continue;
            };
            let name = |v: &str| (format!("{v}@{}", ds.name), v.to_string(), ds.name.clone());
            names.extend(cat.vols.keys().map(|v| name(v)));
            names.extend(uncached.iter().map(|(v, _, _)| name(v)));
        }
        names.sort();
        Ok(FromCatalogs::Listed(NameList {
            key: reusable.then_some(NamesKey(key)),
            names,
        }))
    }

    /// `POST /v1/volumes`: creates a volume (or a clone). A create whose
    /// long part (eagerzeroedthick zeroing, a clone's copy) has begun and
    /// that runs longer than [`VolumeService::with_answer_within`] is
    /// answered with `creating` set and finishes in the background (see
    /// `service::pending`); a retry of it with the same options gets its
    /// state.
    pub async fn create(&self, caller: &Caller, req: &CreateRequest) -> Result<VolumeInfo, AgentError> {
        caller.vm_id()?;
        let t = self.resolve(caller, &req.name).await?;
        if let Some(p) = self.pending.get(&t.full) {
            match p.failed() {
                // A failed one is gone; this create starts afresh.
                Some(_) => self.pending.forget(&t.full),
                None if p.opts == req.opts => return Ok(p.info()),
                None => {
                    return Err(AgentError::Creating {
                        name: t.full.clone(),
                        step: p.step,
                        percent: p.progress.percent(),
                    })
                }
            }
        }
        let progress = Progress::new();
        let (svc, c, r, p) = (self.clone(), caller.clone(), req.clone(), progress.clone());
        let mut task = tokio::spawn(async move { svc.create_now(&c, &r, &p).await });
        let long_part = async {
            tokio::time::sleep(self.answer_within).await;
            progress.wait_started().await;
        };
        tokio::select! {
            joined = &mut task => return joined.unwrap_or_else(|e| Err(AgentError::Internal(format!("the create task failed: {e}")))),
            () = long_part => {}
        }
        // Checks passed and the long part runs: answer, finish later.
        let opts = VolumeOptions::parse(&req.opts)?;
        let step = if opts.clone_from.is_some() {
            "copying"
        } else {
            "zeroing"
        };
        let preview = preview_info(&t, caller.vm_id()?, &opts, &req.opts);
        let p = self.pending.follow(
            step,
            req.opts.clone(),
            preview,
            progress,
            task,
            t.ds.clone(),
            self.backend.clone(),
        );
        Ok(p.info())
    }

    /// The create itself, reporting its long part into `progress`.
    async fn create_now(
        &self,
        caller: &Caller,
        req: &CreateRequest,
        progress: &Progress,
    ) -> Result<VolumeInfo, AgentError> {
        let vm = caller.vm_id()?;
        let t = self.resolve(caller, &req.name).await?;
        let opts = VolumeOptions::parse(&req.opts)?;
        if let Caller::Vm(id) = caller {
            self.backend.check_vm(id).await.map_err(Self::backend_err(&t))?;
        }
        // Held until the volume's metadata is written, so the policy cannot
        // be removed in between.
        let _policy_lock = match &opts.vsan_policy {
            Some(policy) => self.check_policy(t.ds, policy).await?,
            None => None,
        };
        let source = match &opts.clone_from {
            Some(src) => {
                let r = VolumeRef::parse(src).map_err(|_| AgentError::CloneSourceNotFound {
                    source_name: src.clone(),
                })?;
                let ds = match r.datastore.as_deref() {
                    Some(name) => self.datastore(Some(name))?,
                    None => t.ds,
                };
                Some(Target {
                    full: r.full_name(&ds.name),
                    ds,
                    volume: r.volume,
                })
            }
            None => None,
        };
        let Some(src) = source else {
            let folder = self.folder(&t, true).await?.ok_or_else(|| Self::not_found(&t))?;
            let _lock = Self::lock(&t, &*folder).await?;
            return self
                .create_locked(vm, &t, &*folder, &opts, &req.opts, None, progress)
                .await;
        };
        if src.full == t.full {
            return Err(AgentError::InvalidRequest(format!(
                "cannot clone volume {} onto itself",
                t.full
            )));
        }
        let not_found = || AgentError::CloneSourceNotFound {
            source_name: src.full.clone(),
        };
        let src_folder = self.folder(&src, false).await?.ok_or_else(not_found)?;
        if Self::entry(&src, &*src_folder, &src.files().meta).await?.is_none() {
            return Err(not_found());
        }
        let folder = self.folder(&t, true).await?.ok_or_else(|| Self::not_found(&t))?;
        // Lock both volumes in name order so two clones in opposite
        // directions cannot deadlock.
        let (_l1, _l2) = if (&t.ds.name, &t.volume) < (&src.ds.name, &src.volume) {
            let a = Self::lock(&t, &*folder).await?;
            (a, Self::lock(&src, &*src_folder).await?)
        } else {
            let a = Self::lock(&src, &*src_folder).await?;
            (a, Self::lock(&t, &*folder).await?)
        };
        self.create_locked(vm, &t, &*folder, &opts, &req.opts, Some((&src, &*src_folder)), progress)
            .await
    }

    /// Create, under the new volume's lock (and the source's, for a clone).
    #[allow(clippy::too_many_arguments)]
    async fn create_locked(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        opts: &VolumeOptions,
        raw: &BTreeMap<String, String>,
        source: Option<(&Target<'_>, &dyn VolumeFolder)>,
        progress: &Progress,
    ) -> Result<VolumeInfo, AgentError> {
        let files = t.files();
        if let Some(st) = Self::entry(t, folder, &files.meta).await? {
            return Err(match st.kind {
                FileKind::Regular => AgentError::AlreadyExists {
                    name: t.full.clone(),
                    path: t.shown(&files.descriptor).to_string(),
                },
                found => Self::store_err(t)(StoreError::WrongKind {
                    file: t.shown(&files.meta),
                    found,
                    expected: FileKind::Regular,
                }),
            });
        }
        // Files under this name without metadata are ours to replace only
        // if a create of ours marked them; anything else (a disk the
        // original vDVS or an administrator put there) is kept.
        if !folder.marked(&t.volume).await.map_err(Self::store_err(t))? {
            for f in [&files.descriptor, &files.flat] {
                if Self::entry(t, folder, f).await?.is_some() {
                    return Err(AgentError::ForeignFiles {
                        name: t.full.clone(),
                        path: t.shown(f).to_string(),
                    });
                }
            }
        }
        folder
            .mark(&t.volume, Marker::Creating)
            .await
            .map_err(Self::store_err(t))?;
        let res = match source {
            None => self.create_new(vm, t, folder, opts, raw, progress).await,
            Some((src, src_folder)) => self.create_clone(vm, t, folder, src, src_folder, opts, progress).await,
        };
        // A failed create removes whatever it wrote (a step after the disk,
        // such as applying the policy, may have failed).
        if res.is_err() && matches!(folder.entry(&files.meta).await, Ok(None)) {
            if let Err(e) = self.backend.delete_disk(&t.disk()).await {
                tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot clean up a failed create; the next start does");
            }
        }
        // Done, or cleaned up: the marker goes. If cleanup left files, it
        // stays, so the next start collects them.
        let mut leftovers = false;
        for f in [&files.descriptor, &files.flat] {
            leftovers |= !matches!(folder.entry(f).await, Ok(None));
        }
        if res.is_ok() || !leftovers {
            if let Err(e) = folder.clear_markers(&t.volume).await {
                tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot remove the create marker; the next start does");
            }
        }
        res
    }

    /// A VSAN policy must exist and the datastore must be VSAN; see
    /// [`crate::policy`].
    async fn check_policy(&self, ds: &Datastore, policy: &str) -> Result<Option<PolicyLock>, AgentError> {
        self.use_policy(ds, policy).await
    }

    async fn create_new(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        opts: &VolumeOptions,
        raw: &BTreeMap<String, String>,
        progress: &Progress,
    ) -> Result<VolumeInfo, AgentError> {
        let size_mb = opts.size_mb.unwrap_or(opt::DEFAULT_SIZE_MB);
        let policy_state = match self.new_policy(opts).await? {
            Some((name, content)) => {
                let spec = PolicySpec {
                    name: &name,
                    content: &content,
                };
                let (_, state) = self
                    .backend
                    .create_disk_with_policy(&t.disk(), size_mb * MIB, opts.disk_format, spec, progress)
                    .await
                    .map_err(Self::backend_err(t))?;
                log_policy_state(t, &name, state.as_ref());
                state
            }
            None => {
                self.backend
                    .create_disk(&t.disk(), size_mb * MIB, opts.disk_format, progress)
                    .await
                    .map_err(Self::backend_err(t))?;
                None
            }
        };
        let mut vol_opts = raw.clone();
        vol_opts.insert(opt::DISKFORMAT.into(), opts.disk_format.to_string());
        vol_opts.insert(
            opt::FSTYPE.into(),
            opts.fstype.unwrap_or(vmdk_protocol::FsType::Ext4).to_string(),
        );
        vol_opts.insert(opt::ACCESS.into(), opts.access.to_string());
        vol_opts.insert(opt::ATTACH_AS.into(), opts.attach_as.to_string());
        self.commit_new(vm, t, folder, vol_opts, None, policy_state).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_clone(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        src: &Target<'_>,
        src_folder: &dyn VolumeFolder,
        opts: &VolumeOptions,
        progress: &Progress,
    ) -> Result<VolumeInfo, AgentError> {
        let mut src_meta = Self::load_meta(src, src_folder)
            .await?
            .ok_or_else(|| AgentError::CloneSourceNotFound {
                source_name: src.full.clone(),
            })?;
        self.release_powered_off(src, src_folder, &mut src_meta).await?;
        if self.live_attachment(src, src_folder, &src_meta).await?.is_some() {
            return Err(AgentError::CloneSourceAttached {
                name: src.full.clone(),
                vm: src_meta.attached_vm.clone().unwrap_or_else(|| "unknown".into()),
            });
        }
        self.backend
            .clone_disk(&src.disk(), &t.disk(), opts.disk_format, progress)
            .await
            .map_err(Self::backend_err(t))?;
        let policy_state = match self.new_policy(opts).await? {
            Some((name, content)) => {
                let spec = PolicySpec {
                    name: &name,
                    content: &content,
                };
                let state = self
                    .backend
                    .apply_policy(&t.disk(), spec, None)
                    .await
                    .map_err(Self::backend_err(t))?;
                log_policy_state(t, &name, state.as_ref());
                state
            }
            None => None,
        };
        let mut vol_opts = src_meta.vol_opts.clone();
        vol_opts.insert(opt::CLONE_FROM.into(), src.full.clone());
        vol_opts.insert(opt::DISKFORMAT.into(), opts.disk_format.to_string());
        vol_opts.insert(opt::ACCESS.into(), opts.access.to_string());
        vol_opts.insert(opt::ATTACH_AS.into(), opts.attach_as.to_string());
        match &opts.vsan_policy {
            Some(p) => vol_opts.insert(opt::VSAN_POLICY_NAME.into(), p.clone()),
            None => vol_opts.remove(opt::VSAN_POLICY_NAME),
        };
        // A copy of a formatted disk holds the same filesystem.
        self.commit_new(vm, t, folder, vol_opts, src_meta.formatted.clone(), policy_state)
            .await
    }

    /// Writes the sidecar of a new volume: the commit point of create.
    async fn commit_new(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        vol_opts: BTreeMap<String, String>,
        formatted: Option<FormatRecord>,
        policy_state: Option<PolicyState>,
    ) -> Result<VolumeInfo, AgentError> {
        let meta = VolumeMeta {
            version: META_VERSION,
            status: AttachStatus::Detached,
            vol_opts,
            created: now_rfc3339(),
            created_by: vm.to_owned(),
            attached_vm: None,
            attached_device: None,
            attached_at: None,
            formatted,
            policy_state,
        };
        Self::write_sidecar(t, folder, &meta).await?;
        tracing::info!(volume = %t.full, vm, "created volume");
        let disk = self.backend.disk_info(&t.disk()).await;
        self.catalog_wrote(t, Some(&meta), disk.as_ref().ok());
        let disk = disk.map_err(Self::backend_err(t))?;
        Ok(build_info(&t.full, t.ds, DEFAULT_VMGROUP, &meta, &disk))
    }

    /// The backend's live attachment, healing metadata that claims an
    /// attachment the backend no longer has (e.g. after a host reboot).
    async fn live_attachment(
        &self,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        meta: &VolumeMeta,
    ) -> Result<Option<Attachment>, AgentError> {
        let hint = meta.attached_vm.as_deref();
        let live = self
            .backend
            .attachment(&t.disk(), hint)
            .await
            .map_err(Self::backend_err(t))?;
        if live.is_none() && meta.status == AttachStatus::Attached {
            tracing::warn!(volume = %t.full, vm = ?meta.attached_vm, "metadata says attached but the disk is not; marking detached");
            let mut healed = meta.clone();
            clear_attachment(&mut healed);
            self.store_meta(t, folder, &healed).await?;
        }
        Ok(live)
    }

    /// `DELETE /v1/volumes/{name}`. Refused while the volume is attached,
    /// and when one of its files is not a regular file (nothing is deleted
    /// then). Works on a full datastore: it writes nothing before it frees.
    pub async fn remove(&self, caller: &Caller, name: &str) -> Result<(), AgentError> {
        let vm = caller.vm_id()?;
        let t = self.resolve(caller, name).await?;
        if let Some(p) = self.pending.get(&t.full) {
            // A create still running stops (removing what it wrote); one
            // that failed left nothing. Either way the name is then free,
            // unless the create finished first.
            p.progress.cancel();
            let outcome = p.wait(ATTACH_WAITS_FOR_CREATE).await;
            self.pending.forget(&t.full);
            match outcome {
                pending::Outcome::Failed(_) => {
                    tracing::info!(volume = %t.full, vm, "removed volume (its create was stopped or had failed)");
                    return Ok(());
                }
                pending::Outcome::Created => {}
                pending::Outcome::Running { step, percent } => {
                    return Err(AgentError::Creating {
                        name: t.full.clone(),
                        step,
                        percent,
                    })
                }
            }
        }
        let folder = self.existing_folder(&t).await?;
        let _lock = Self::lock(&t, &*folder).await?;
        let mut meta = Self::existing_meta(&t, &*folder).await?;
        self.release_powered_off(&t, &*folder, &mut meta).await?;
        if let Some(att) = self.live_attachment(&t, &*folder, &meta).await? {
            let holder = match (&meta.status, &meta.attached_vm, &att.vm) {
                (_, _, Some(vm)) => vm.clone(),
                (AttachStatus::Attached, Some(vm), None) => vm.clone(),
                _ => format!("unknown (device {})", att.device().unwrap_or_default()),
            };
            return Err(AgentError::InUse {
                name: t.full.clone(),
                vm: holder,
            });
        }
        let files = t.files();
        for f in [&files.descriptor, &files.flat] {
            if let Some(st) = Self::entry(&t, &*folder, f).await? {
                if st.kind != FileKind::Regular {
                    return Err(Self::store_err(&t)(StoreError::WrongKind {
                        file: t.shown(f),
                        found: st.kind,
                        expected: FileKind::Regular,
                    }));
                }
            }
        }
        // The sidecar becomes the remove marker in one rename, so a crash
        // part-way leaves files the next start knows to be ours.
        folder.begin_remove(&t.volume).await.map_err(Self::store_err(&t))?;
        // Its sidecar is gone: no List shows it from here on.
        self.catalog_removed(&t);
        self.backend
            .delete_disk(&t.disk())
            .await
            .map_err(Self::backend_err(&t))?;
        folder.clear_markers(&t.volume).await.map_err(Self::store_err(&t))?;
        let ds = t.ds.clone();
        let _ = vmdk_common::runtime::spawn_blocking(move || ds.refill_reserve()).await;
        tracing::info!(volume = %t.full, vm, "removed volume");
        Ok(())
    }

    /// `POST /v1/volumes/{name}/attach`. Exclusive: refused while another
    /// VM holds the volume; repeated by the holder, returns the same
    /// attachment.
    pub async fn attach(&self, caller: &Caller, name: &str) -> Result<AttachInfo, AgentError> {
        let vm = caller.vm_id()?;
        let t = self.resolve(caller, name).await?;
        if let Some(p) = self.pending.get(&t.full) {
            match p.wait(ATTACH_WAITS_FOR_CREATE).await {
                pending::Outcome::Created => {}
                pending::Outcome::Failed(cause) => {
                    return Err(AgentError::CreateFailed {
                        name: t.full.clone(),
                        cause,
                    })
                }
                pending::Outcome::Running { step, percent } => {
                    return Err(AgentError::Creating {
                        name: t.full.clone(),
                        step,
                        percent,
                    })
                }
            }
        }
        let folder = self.existing_folder(&t).await?;
        let _lock = Self::lock(&t, &*folder).await?;
        let mut meta = Self::existing_meta(&t, &*folder).await?;
        if meta.status == AttachStatus::Attached
            && meta.attached_vm.as_deref() != Some(vm)
            && !self.release_powered_off(&t, &*folder, &mut meta).await?
        {
            if let Some(live) = self.live_attachment(&t, &*folder, &meta).await? {
                return Err(AgentError::AttachedElsewhere {
                    name: t.full.clone(),
                    vm: live.vm.or_else(|| meta.attached_vm.clone()).unwrap_or_default(),
                    requester: vm.to_owned(),
                });
            }
            clear_attachment(&mut meta);
        }
        // Intent first: the metadata names the VM before the disk is
        // attached, so a crash in between leaves a claim the live check
        // heals, never an attachment nobody recorded.
        let fresh = meta.status != AttachStatus::Attached;
        if fresh {
            meta.status = AttachStatus::Attached;
            meta.attached_vm = Some(vm.to_owned());
            meta.attached_device = None;
            meta.attached_at = Some(now_rfc3339());
            self.store_meta(&t, &*folder, &meta).await?;
        }
        let attach_as = meta
            .opt(opt::ATTACH_AS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(AttachAs::IndependentPersistent);
        let policy = self.attach_policy(&t, &meta).await;
        let spec = policy.as_ref().map(|(name, content)| PolicySpec { name, content });
        let att = match self.backend.attach(vm, &t.disk(), attach_as, spec).await {
            Ok(a) => a,
            Err(e) => {
                if fresh {
                    clear_attachment(&mut meta);
                    if let Err(me) = self.store_meta(&t, &*folder, &meta).await {
                        tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&me), "cannot undo attach intent; the next operation heals it");
                    }
                }
                return Err(Self::backend_err(&t)(e));
            }
        };
        if fresh {
            tracing::info!(volume = %t.full, vm, location = ?att.location, "attached volume");
        }
        // A profile waiting for the disk's next attach came with it.
        if let (true, Some(PolicyState::Pending { profile, profile_id })) =
            (fresh && spec.is_some(), meta.policy_state.clone())
        {
            tracing::info!(volume = %t.full, profile = %profile, "the volume's VSAN policy now applies to its disk");
            meta.policy_state = Some(PolicyState::Applied { profile, profile_id });
            self.store_meta(&t, &*folder, &meta).await?;
        }
        let info = self.info(&t, &meta).await?;
        Ok(AttachInfo {
            disk_uuid: info.disk_uuid.clone(),
            volume: info,
            device: att.device().map(str::to_owned),
            blank: att.blank && att.device().is_some(),
            location: Some(att.location),
        })
    }

    /// `POST /v1/volumes/{name}/detach`. Succeeds when there is nothing to
    /// detach, including when another VM holds the volume (that VM's
    /// attachment is left alone, as the original did). A disk still in use
    /// (a loop device mounted or open) is not released: the detach fails
    /// with `in_use` and the volume stays recorded as attached.
    pub async fn detach(&self, caller: &Caller, name: &str) -> Result<(), AgentError> {
        let vm = caller.vm_id()?;
        let t = self.resolve(caller, name).await?;
        let folder = self.existing_folder(&t).await?;
        let _lock = Self::lock(&t, &*folder).await?;
        let mut meta = Self::existing_meta(&t, &*folder).await?;
        if meta.status == AttachStatus::Attached && meta.attached_vm.as_deref() != Some(vm) {
            tracing::info!(volume = %t.full, vm, holder = ?meta.attached_vm, "detach ignored: attached to another VM");
            return Ok(());
        }
        self.backend
            .detach(vm, &t.disk())
            .await
            .map_err(Self::backend_err(&t))?;
        if meta.status == AttachStatus::Attached {
            clear_attachment(&mut meta);
            self.store_meta(&t, &*folder, &meta).await?;
            tracing::info!(volume = %t.full, vm, "detached volume");
        }
        Ok(())
    }

    /// `POST /v1/volumes/{name}/formatted`: records, durably, that the
    /// disk now holds a filesystem of `fstype`. Only the VM the volume is
    /// attached to may record it (it is the one that ran `mkfs`). Recording
    /// the same type again is a no-op; another type is refused, because a
    /// recorded filesystem is never replaced.
    pub async fn mark_formatted(&self, caller: &Caller, name: &str, fstype: &str) -> Result<VolumeInfo, AgentError> {
        let vm = caller.vm_id()?;
        let fstype: FsType = fstype.parse()?;
        let t = self.resolve(caller, name).await?;
        let folder = self.existing_folder(&t).await?;
        let _lock = Self::lock(&t, &*folder).await?;
        let mut meta = Self::existing_meta(&t, &*folder).await?;
        if meta.status != AttachStatus::Attached || meta.attached_vm.as_deref() != Some(vm) {
            return Err(AgentError::InvalidRequest(format!(
                "volume {} is not attached to VM {vm}; only the VM holding a volume records its filesystem",
                t.full
            )));
        }
        match &meta.formatted {
            Some(rec) if rec.fstype == fstype.as_str() => return self.info(&t, &meta).await,
            Some(rec) => {
                return Err(AgentError::InvalidRequest(format!(
                    "volume {} is recorded as formatted with {} (on {}); it is never formatted again",
                    t.full, rec.fstype, rec.at
                )))
            }
            None => {}
        }
        meta.formatted = Some(FormatRecord {
            fstype: fstype.to_string(),
            at: now_rfc3339(),
            by: vm.to_owned(),
        });
        self.store_meta(&t, &*folder, &meta).await?;
        tracing::info!(volume = %t.full, vm, %fstype, "recorded filesystem");
        self.info(&t, &meta).await
    }
}

/// The identity of datastore directory `root` on this host:
/// `<device>:<inode>`, following a link as the service does when it opens
/// the datastore (see [`VersionInfo::datastore_ids`]).
pub fn datastore_id(root: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(root).ok()?;
    m.is_dir().then(|| format!("{}:{}", m.dev(), m.ino()))
}

/// The VM the records say holds the volume.
fn attached_vm(meta: &VolumeMeta) -> Option<&str> {
    match meta.status {
        AttachStatus::Attached => meta.attached_vm.as_deref(),
        AttachStatus::Detached => None,
    }
}

/// Says plainly when a policy was only recorded.
fn log_policy_state(t: &Target<'_>, policy: &str, state: Option<&PolicyState>) {
    let Some(state) = state else {
        tracing::debug!(volume = %t.full, policy, "VSAN policy recorded (the backend has no storage policies)");
        return;
    };
    match state {
        PolicyState::Applied { profile, .. } => {
            tracing::info!(volume = %t.full, policy, profile = %profile, "VSAN policy applied as a storage profile")
        }
        PolicyState::Pending { profile, .. } => {
            tracing::info!(volume = %t.full, policy, profile = %profile, "VSAN policy's storage profile is applied at the disk's next attach")
        }
        PolicyState::Recorded { reason } => {
            tracing::warn!(volume = %t.full, policy, %reason, "VSAN policy recorded, NOT applied")
        }
    }
}

fn clear_attachment(meta: &mut VolumeMeta) {
    meta.status = AttachStatus::Detached;
    meta.attached_vm = None;
    meta.attached_device = None;
    meta.attached_at = None;
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// What Get shows of a volume whose create runs on after its answer: the
/// request's settings (the capacity of a clone is not known yet: 0).
fn preview_info(t: &Target<'_>, vm: &str, opts: &VolumeOptions, raw: &BTreeMap<String, String>) -> VolumeInfo {
    VolumeInfo {
        name: t.full.clone(),
        volume: t.volume.clone(),
        datastore: t.ds.name.clone(),
        vmgroup: DEFAULT_VMGROUP.to_owned(),
        capacity_bytes: match opts.clone_from {
            Some(_) => 0,
            None => opts.size_mb.unwrap_or(opt::DEFAULT_SIZE_MB) * MIB,
        },
        allocated_bytes: 0,
        disk_format: opts.disk_format,
        fstype: opts.fstype.unwrap_or(vmdk_protocol::FsType::Ext4).to_string(),
        vsan_policy: opts.vsan_policy.clone(),
        access: opts.access,
        attach_as: opts.attach_as,
        status: AttachStatus::Detached,
        attached_to: None,
        created: now_rfc3339(),
        created_by: vm.to_owned(),
        clone_from: opts.clone_from.clone(),
        disk_uuid: String::new(),
        options: raw.clone(),
        formatted: None,
        creating: None,
        vsan_policy_state: None,
    }
}

/// Builds the wire view of a volume from its metadata and what the
/// backend knows of its disk.
pub fn build_info(full: &str, ds: &Datastore, vmgroup: &str, meta: &VolumeMeta, disk: &DiskInfo) -> VolumeInfo {
    let volume = full.rsplit_once('@').map(|(v, _)| v).unwrap_or(full);
    let parse_or = |key: &str| meta.opt(key).map(str::to_owned);
    VolumeInfo {
        name: full.to_owned(),
        volume: volume.to_owned(),
        datastore: ds.name.clone(),
        vmgroup: vmgroup.to_owned(),
        capacity_bytes: disk.capacity_bytes,
        allocated_bytes: disk.allocated_bytes,
        disk_format: meta
            .opt(opt::DISKFORMAT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(if disk.thin {
                DiskFormat::Thin
            } else {
                DiskFormat::ZeroedThick
            }),
        fstype: parse_or(opt::FSTYPE).unwrap_or_else(|| "ext4".into()),
        vsan_policy: parse_or(opt::VSAN_POLICY_NAME),
        access: meta
            .opt(opt::ACCESS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(AccessMode::ReadWrite),
        attach_as: meta
            .opt(opt::ATTACH_AS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(AttachAs::IndependentPersistent),
        status: meta.status,
        attached_to: match meta.status {
            AttachStatus::Attached => meta.attached_vm.clone(),
            AttachStatus::Detached => None,
        },
        created: meta.created.clone(),
        created_by: meta.created_by.clone(),
        clone_from: parse_or(opt::CLONE_FROM),
        disk_uuid: disk.uuid.clone().unwrap_or_default(),
        options: meta.vol_opts.clone(),
        formatted: meta.formatted.clone(),
        creating: None,
        vsan_policy_state: meta.opt(opt::VSAN_POLICY_NAME).and(meta.policy_state.clone()),
    }
}

pub use crate::datastore::is_within;
