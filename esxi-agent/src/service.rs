//! The volume service: what each agent operation means.
//!
//! [`VolumeService`] knows names, options, datastores, metadata and locking;
//! it knows no HTTP. The API layer, the admin CLI and the guest's embedded
//! mode all call it. Its methods block (file locks, disk I/O, device
//! ioctls), so async callers run them on a blocking thread.
//!
//! Rules every operation follows:
//! * input is validated before anything touches the disk;
//! * each volume operation runs under the volume's cross-process lock
//!   ([`crate::lock::VolumeLock`]), and operations on different volumes
//!   never wait on each other;
//! * every step is idempotent: create of an existing volume says
//!   `already_exists`, attach returns the existing attachment, detach of a
//!   detached volume succeeds;
//! * metadata is a hint checked against the backend's live state before a
//!   decision that depends on it (remove, attach from another VM).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use vmdk_protocol::options::{self as opt, VolumeOptions};
use vmdk_protocol::size::MIB;
use vmdk_protocol::{
    AccessMode, AttachAs, AttachInfo, AttachStatus, CreateRequest, DiskFormat, FormatRecord, FsType, VersionInfo,
    VolumeInfo, VolumeRef, API_VERSION,
};

use crate::backend::{Attachment, BackendError, DiskBackend, DiskInfo, DiskRef};
use crate::config::AgentConfig;
use crate::datastore::{Datastore, Marker, VolumeFiles, VolumeFolder, DEFAULT_VMGROUP};
use crate::error::AgentError;
use crate::lock::VolumeLock;
use crate::meta::{VolumeMeta, META_VERSION};
use crate::policy::PolicyLock;
use crate::store::{DsPath, FileKind, StoreError};

mod admin;
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

/// The agent's domain service.
#[derive(Debug)]
pub struct VolumeService {
    datastores: Vec<Datastore>,
    backend: Arc<dyn DiskBackend>,
}

impl VolumeService {
    /// Builds the service; every datastore directory must exist.
    pub fn new(config: &AgentConfig, backend: Arc<dyn DiskBackend>) -> Result<Self, AgentError> {
        config
            .validate()
            .map_err(|e| AgentError::InvalidRequest(crate::error::error_chain(&e)))?;
        let mut datastores = Vec::new();
        let mut seen: Vec<(std::path::PathBuf, &str)> = Vec::new();
        for ds in &config.datastores {
            let meta = std::fs::metadata(&ds.path).map_err(|source| AgentError::Io {
                op: "datastore directory",
                path: format!("{} (datastore {})", ds.path.display(), ds.name),
                source,
            })?;
            if !meta.is_dir() {
                return Err(AgentError::InvalidRequest(format!(
                    "datastore {} path {} is not a directory",
                    ds.name,
                    ds.path.display()
                )));
            }
            // One directory under two names would show every volume twice
            // and let one disk be mounted under two names.
            let real = std::fs::canonicalize(&ds.path).unwrap_or_else(|_| ds.path.clone());
            if let Some((_, other)) = seen.iter().find(|(p, _)| *p == real) {
                return Err(AgentError::InvalidRequest(format!(
                    "datastores {other} and {} are the same directory {}; give each datastore its own directory",
                    ds.name,
                    real.display()
                )));
            }
            seen.push((real, &ds.name));
            datastores.push(Datastore {
                name: ds.name.clone(),
                root: ds.path.clone(),
                vsan: ds.vsan,
            });
        }
        Ok(Self { datastores, backend })
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
        }
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

    fn resolve(&self, name: &str) -> Result<Target<'_>, AgentError> {
        let r = VolumeRef::parse(name)?;
        let ds = self.datastore(r.datastore.as_deref())?;
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

    /// The volume's vmgroup folder, through the datastore door; `None`
    /// when it does not exist (and `create` is false).
    fn folder(t: &Target<'_>, create: bool) -> Result<Option<Folder>, AgentError> {
        Ok(t.ds
            .folder(DEFAULT_VMGROUP, create)
            .map_err(Self::store_err(t))?
            .map(|f| Box::new(f) as Folder))
    }

    fn load_meta(t: &Target<'_>, folder: &dyn VolumeFolder) -> Result<Option<VolumeMeta>, AgentError> {
        folder.read_meta(&t.volume).map_err(|source| AgentError::Meta {
            name: t.full.clone(),
            source,
        })
    }

    fn store_meta(t: &Target<'_>, folder: &dyn VolumeFolder, meta: &VolumeMeta) -> Result<(), AgentError> {
        folder.write_meta(&t.volume, meta).map_err(|source| AgentError::Meta {
            name: t.full.clone(),
            source,
        })
    }

    fn backend_err<'a>(t: &'a Target<'_>) -> impl FnOnce(BackendError) -> AgentError + 'a {
        |source| AgentError::Backend {
            name: t.full.clone(),
            source,
        }
    }

    fn lock(t: &Target<'_>, folder: &dyn VolumeFolder) -> Result<VolumeLock, AgentError> {
        folder.lock(&t.volume).map_err(Self::store_err(t))
    }

    /// Drops the lock file of a name that is no volume (any more), so
    /// looking up a missing volume leaves nothing behind.
    fn release(t: &Target<'_>, folder: &dyn VolumeFolder, lock: VolumeLock) {
        if matches!(folder.entry(&t.files().meta), Ok(None)) {
            let _ = lock.unlink();
        }
    }

    /// Runs `f` under the volume's lock, with its folder (created first
    /// when `create`).
    fn locked<T>(
        &self,
        t: &Target<'_>,
        create: bool,
        f: impl FnOnce(&dyn VolumeFolder) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let folder = Self::folder(t, create)?.ok_or_else(|| Self::not_found(t))?;
        let lock = Self::lock(t, &*folder)?;
        let out = f(&*folder);
        Self::release(t, &*folder, lock);
        out
    }

    fn info(&self, t: &Target<'_>, meta: &VolumeMeta) -> Result<VolumeInfo, AgentError> {
        let disk = self.backend.disk_info(&t.disk()).map_err(Self::backend_err(t))?;
        Ok(build_info(&t.full, t.ds, DEFAULT_VMGROUP, meta, &disk))
    }

    /// `GET /v1/volumes/{name}`. Takes no lock: a read never waits behind a
    /// slow create or attach of the same name. A volume whose files are
    /// damaged (sidecar, descriptor or extent missing, unreadable, of the
    /// wrong kind) is an error naming the file, never reported healthy.
    pub fn get(&self, name: &str) -> Result<VolumeInfo, AgentError> {
        let t = self.resolve(name)?;
        let folder = Self::folder(&t, false)?.ok_or_else(|| Self::not_found(&t))?;
        let meta = Self::load_meta(&t, &*folder)?.ok_or_else(|| Self::not_found(&t))?;
        self.info(&t, &meta)
    }

    /// `GET /v1/volumes`: every volume on every datastore, sorted by name.
    /// A volume whose files cannot be read is skipped (and logged), so one
    /// bad volume never hides the others.
    pub fn list(&self) -> Result<Vec<VolumeInfo>, AgentError> {
        self.inventory()
    }

    /// `POST /v1/volumes`: creates a volume (or a clone).
    pub fn create(&self, vm: &str, req: &CreateRequest) -> Result<VolumeInfo, AgentError> {
        validate_vm_id(vm)?;
        let t = self.resolve(&req.name)?;
        let opts = VolumeOptions::parse(&req.opts)?;
        // Held until the volume's metadata is written, so the policy cannot
        // be removed in between.
        let _policy_lock = match &opts.vsan_policy {
            Some(policy) => self.check_policy(t.ds, policy)?,
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
            return self.locked(&t, true, |folder| {
                self.create_locked(vm, &t, folder, &opts, &req.opts, None)
            });
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
        let src_folder = Self::folder(&src, false)?.ok_or_else(not_found)?;
        if src_folder
            .entry(&src.files().meta)
            .map_err(Self::store_err(&src))?
            .is_none()
        {
            return Err(not_found());
        }
        let folder = Self::folder(&t, true)?.expect("created");
        // Lock both volumes in name order so two clones in opposite
        // directions cannot deadlock.
        let (first, second) = if (&t.ds.name, &t.volume) < (&src.ds.name, &src.volume) {
            ((&t, &*folder), (&src, &*src_folder))
        } else {
            ((&src, &*src_folder), (&t, &*folder))
        };
        let l1 = Self::lock(first.0, first.1)?;
        let l2 = Self::lock(second.0, second.1)?;
        let out = self.create_locked(vm, &t, &*folder, &opts, &req.opts, Some((&src, &*src_folder)));
        Self::release(second.0, second.1, l2);
        Self::release(first.0, first.1, l1);
        out
    }

    /// Create, under the new volume's lock (and the source's, for a clone).
    fn create_locked(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        opts: &VolumeOptions,
        raw: &BTreeMap<String, String>,
        source: Option<(&Target<'_>, &dyn VolumeFolder)>,
    ) -> Result<VolumeInfo, AgentError> {
        let files = t.files();
        if let Some(st) = folder.entry(&files.meta).map_err(Self::store_err(t))? {
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
        if !folder.marked(&t.volume).map_err(Self::store_err(t))? {
            for f in [&files.descriptor, &files.flat] {
                if folder.entry(f).map_err(Self::store_err(t))?.is_some() {
                    return Err(AgentError::ForeignFiles {
                        name: t.full.clone(),
                        path: t.shown(f).to_string(),
                    });
                }
            }
        }
        folder.mark(&t.volume, Marker::Creating).map_err(Self::store_err(t))?;
        let res = match source {
            None => self.create_new(vm, t, folder, opts, raw),
            Some((src, src_folder)) => self.create_clone(vm, t, folder, src, src_folder, opts),
        };
        // A failed create removes whatever it wrote (a step after the disk,
        // such as applying the policy, may have failed).
        if res.is_err() && matches!(folder.entry(&files.meta), Ok(None)) {
            if let Err(e) = self.backend.delete_disk(&t.disk()) {
                tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot clean up a failed create; the next start does");
            }
        }
        // Done, or cleaned up: the marker goes. If cleanup left files, it
        // stays, so the next start collects them.
        let leftovers = [&files.descriptor, &files.flat]
            .iter()
            .any(|f| !matches!(folder.entry(f), Ok(None)));
        if res.is_ok() || !leftovers {
            if let Err(e) = folder.clear_markers(&t.volume) {
                tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot remove the create marker; the next start does");
            }
        }
        res
    }

    /// A VSAN policy must exist and the datastore must be VSAN; see
    /// [`crate::policy`].
    fn check_policy(&self, ds: &Datastore, policy: &str) -> Result<Option<PolicyLock>, AgentError> {
        self.use_policy(ds, policy)
    }

    fn create_new(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        opts: &VolumeOptions,
        raw: &BTreeMap<String, String>,
    ) -> Result<VolumeInfo, AgentError> {
        let size_mb = opts.size_mb.unwrap_or(opt::DEFAULT_SIZE_MB);
        self.backend
            .create_disk(&t.disk(), size_mb * MIB, opts.disk_format)
            .map_err(Self::backend_err(t))?;
        self.apply_new_policy(t, opts)?;
        let mut vol_opts = raw.clone();
        vol_opts.insert(opt::DISKFORMAT.into(), opts.disk_format.to_string());
        vol_opts.insert(
            opt::FSTYPE.into(),
            opts.fstype.unwrap_or(vmdk_protocol::FsType::Ext4).to_string(),
        );
        vol_opts.insert(opt::ACCESS.into(), opts.access.to_string());
        vol_opts.insert(opt::ATTACH_AS.into(), opts.attach_as.to_string());
        self.commit_new(vm, t, folder, vol_opts, None)
    }

    fn create_clone(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        src: &Target<'_>,
        src_folder: &dyn VolumeFolder,
        opts: &VolumeOptions,
    ) -> Result<VolumeInfo, AgentError> {
        let src_meta = Self::load_meta(src, src_folder)?.ok_or_else(|| AgentError::CloneSourceNotFound {
            source_name: src.full.clone(),
        })?;
        if self.live_attachment(src, src_folder, &src_meta)?.is_some() {
            return Err(AgentError::CloneSourceAttached {
                name: src.full.clone(),
                vm: src_meta.attached_vm.clone().unwrap_or_else(|| "unknown".into()),
            });
        }
        self.backend
            .clone_disk(&src.disk(), &t.disk(), opts.disk_format)
            .map_err(Self::backend_err(t))?;
        self.apply_new_policy(t, opts)?;
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
        self.commit_new(vm, t, folder, vol_opts, src_meta.formatted.clone())
    }

    /// Writes the sidecar of a new volume: the commit point of create.
    fn commit_new(
        &self,
        vm: &str,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        vol_opts: BTreeMap<String, String>,
        formatted: Option<FormatRecord>,
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
        };
        Self::store_meta(t, folder, &meta)?;
        tracing::info!(volume = %t.full, vm, "created volume");
        self.info(t, &meta)
    }

    /// The backend's live attachment, healing metadata that claims an
    /// attachment the backend no longer has (e.g. after a host reboot).
    fn live_attachment(
        &self,
        t: &Target<'_>,
        folder: &dyn VolumeFolder,
        meta: &VolumeMeta,
    ) -> Result<Option<Attachment>, AgentError> {
        let live = self.backend.attachment(&t.disk()).map_err(Self::backend_err(t))?;
        if live.is_none() && meta.status == AttachStatus::Attached {
            tracing::warn!(volume = %t.full, vm = ?meta.attached_vm, "metadata says attached but no device is bound; marking detached");
            let mut healed = meta.clone();
            clear_attachment(&mut healed);
            Self::store_meta(t, folder, &healed)?;
        }
        Ok(live)
    }

    /// `DELETE /v1/volumes/{name}`. Refused while the volume is attached,
    /// and when one of its files is not a regular file (nothing is deleted
    /// then). Works on a full datastore: it writes nothing before it frees.
    pub fn remove(&self, vm: &str, name: &str) -> Result<(), AgentError> {
        validate_vm_id(vm)?;
        let t = self.resolve(name)?;
        self.locked(&t, false, |folder| {
            let meta = Self::load_meta(&t, folder)?.ok_or_else(|| Self::not_found(&t))?;
            if let Some(att) = self.live_attachment(&t, folder, &meta)? {
                let holder = match (&meta.status, &meta.attached_vm) {
                    (AttachStatus::Attached, Some(vm)) => vm.clone(),
                    _ => format!("unknown (device {})", att.device.unwrap_or_default()),
                };
                return Err(AgentError::InUse {
                    name: t.full.clone(),
                    vm: holder,
                });
            }
            let files = t.files();
            for f in [&files.descriptor, &files.flat] {
                if let Some(st) = folder.entry(f).map_err(Self::store_err(&t))? {
                    if st.kind != FileKind::Regular {
                        return Err(Self::store_err(&t)(StoreError::WrongKind {
                            file: t.shown(f),
                            found: st.kind,
                            expected: FileKind::Regular,
                        }));
                    }
                }
            }
            // The sidecar becomes the remove marker in one rename, so a
            // crash part-way leaves files the next start knows to be ours.
            folder.begin_remove(&t.volume).map_err(Self::store_err(&t))?;
            self.backend.delete_disk(&t.disk()).map_err(Self::backend_err(&t))?;
            folder.clear_markers(&t.volume).map_err(Self::store_err(&t))?;
            t.ds.refill_reserve();
            tracing::info!(volume = %t.full, vm, "removed volume");
            Ok(())
        })
    }

    /// `POST /v1/volumes/{name}/attach`. Exclusive: refused while another
    /// VM holds the volume; repeated by the holder, returns the same device.
    pub fn attach(&self, vm: &str, name: &str) -> Result<AttachInfo, AgentError> {
        validate_vm_id(vm)?;
        let t = self.resolve(name)?;
        self.locked(&t, false, |folder| {
            let mut meta = Self::load_meta(&t, folder)?.ok_or_else(|| Self::not_found(&t))?;
            if meta.status == AttachStatus::Attached && meta.attached_vm.as_deref() != Some(vm) {
                if self.live_attachment(&t, folder, &meta)?.is_some() {
                    return Err(AgentError::AttachedElsewhere {
                        name: t.full.clone(),
                        vm: meta.attached_vm.clone().unwrap_or_default(),
                        requester: vm.to_owned(),
                    });
                }
                clear_attachment(&mut meta);
            }
            // Intent first: the metadata names the VM before the device is
            // bound, so a crash in between leaves a claim the live check
            // heals, never a bound device nobody recorded.
            let fresh = meta.status != AttachStatus::Attached;
            if fresh {
                meta.status = AttachStatus::Attached;
                meta.attached_vm = Some(vm.to_owned());
                meta.attached_device = None;
                meta.attached_at = Some(now_rfc3339());
                Self::store_meta(&t, folder, &meta)?;
            }
            let att = match self.backend.attach(vm, &t.disk()) {
                Ok(a) => a,
                Err(e) => {
                    if fresh {
                        clear_attachment(&mut meta);
                        if let Err(me) = Self::store_meta(&t, folder, &meta) {
                            tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&me), "cannot undo attach intent; the next operation heals it");
                        }
                    }
                    return Err(Self::backend_err(&t)(e));
                }
            };
            let device = att.device.clone();
            if fresh {
                tracing::info!(volume = %t.full, vm, device = ?device, "attached volume");
            }
            let info = self.info(&t, &meta)?;
            Ok(AttachInfo {
                disk_uuid: info.disk_uuid.clone(),
                volume: info,
                location: device.clone().map(|path| vmdk_protocol::DiskLocation::Device { path }),
                device,
            })
        })
    }

    /// `POST /v1/volumes/{name}/detach`. Succeeds when there is nothing to
    /// detach, including when another VM holds the volume (that VM's
    /// attachment is left alone, as the original did). A device still in
    /// use (mounted or open) is not released: the detach fails with
    /// `in_use` and the volume stays recorded as attached.
    pub fn detach(&self, vm: &str, name: &str) -> Result<(), AgentError> {
        validate_vm_id(vm)?;
        let t = self.resolve(name)?;
        self.locked(&t, false, |folder| {
            let mut meta = Self::load_meta(&t, folder)?.ok_or_else(|| Self::not_found(&t))?;
            if meta.status == AttachStatus::Attached && meta.attached_vm.as_deref() != Some(vm) {
                tracing::info!(volume = %t.full, vm, holder = ?meta.attached_vm, "detach ignored: attached to another VM");
                return Ok(());
            }
            self.backend.detach(&t.disk()).map_err(Self::backend_err(&t))?;
            if meta.status == AttachStatus::Attached {
                clear_attachment(&mut meta);
                Self::store_meta(&t, folder, &meta)?;
                tracing::info!(volume = %t.full, vm, "detached volume");
            }
            Ok(())
        })
    }

    /// `POST /v1/volumes/{name}/formatted`: records, durably, that the
    /// disk now holds a filesystem of `fstype`. Only the VM the volume is
    /// attached to may record it (it is the one that ran `mkfs`). Recording
    /// the same type again is a no-op; another type is refused, because a
    /// recorded filesystem is never replaced.
    pub fn mark_formatted(&self, vm: &str, name: &str, fstype: &str) -> Result<VolumeInfo, AgentError> {
        validate_vm_id(vm)?;
        let fstype: FsType = fstype.parse()?;
        let t = self.resolve(name)?;
        self.locked(&t, false, |folder| {
            let mut meta = Self::load_meta(&t, folder)?.ok_or_else(|| Self::not_found(&t))?;
            if meta.status != AttachStatus::Attached || meta.attached_vm.as_deref() != Some(vm) {
                return Err(AgentError::InvalidRequest(format!(
                    "volume {} is not attached to VM {vm}; only the VM holding a volume records its filesystem",
                    t.full
                )));
            }
            match &meta.formatted {
                Some(rec) if rec.fstype == fstype.as_str() => return self.info(&t, &meta),
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
            Self::store_meta(&t, folder, &meta)?;
            tracing::info!(volume = %t.full, vm, %fstype, "recorded filesystem");
            self.info(&t, &meta)
        })
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
    }
}

pub use crate::datastore::is_within;
