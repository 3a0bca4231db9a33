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
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use vmdk_protocol::options::{self as opt, VolumeOptions};
use vmdk_protocol::size::MIB;
use vmdk_protocol::{
    AccessMode, AttachAs, AttachInfo, AttachStatus, CreateRequest, DiskFormat, FormatRecord, FsType, VersionInfo,
    VolumeInfo, VolumeRef, API_VERSION,
};

use crate::backend::{Attachment, DiskBackend};
use crate::config::AgentConfig;
use crate::datastore::{Datastore, DiskPaths, DEFAULT_VMGROUP};
use crate::error::AgentError;
use crate::lock::VolumeLock;
use crate::meta::{VolumeMeta, META_VERSION};
use crate::policy::PolicyLock;

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

/// A resolved volume: its canonical name, datastore and files.
#[derive(Debug, Clone)]
struct Target<'a> {
    full: String,
    ds: &'a Datastore,
    disk: DiskPaths,
}

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
            disk: ds.disk(DEFAULT_VMGROUP, &r.volume),
        })
    }

    fn not_found(t: &Target<'_>) -> AgentError {
        AgentError::NotFound {
            name: t.full.clone(),
            path: t.disk.descriptor.display().to_string(),
        }
    }

    fn load_meta(t: &Target<'_>) -> Result<Option<VolumeMeta>, AgentError> {
        VolumeMeta::load(&t.disk.meta).map_err(|source| AgentError::Meta {
            name: t.full.clone(),
            source,
        })
    }

    fn store_meta(t: &Target<'_>, meta: &VolumeMeta) -> Result<(), AgentError> {
        meta.store(&t.disk.meta).map_err(|source| AgentError::Meta {
            name: t.full.clone(),
            source,
        })
    }

    fn backend_err<'a>(t: &'a Target<'_>) -> impl FnOnce(crate::backend::BackendError) -> AgentError + 'a {
        |source| AgentError::Backend {
            name: t.full.clone(),
            source,
        }
    }

    /// Runs `f` under the volume's lock. If the volume does not exist
    /// afterwards, the lock file is removed too, so looking up a missing
    /// volume leaves nothing behind.
    fn locked<T>(&self, t: &Target<'_>, f: impl FnOnce(&VolumeLock) -> Result<T, AgentError>) -> Result<T, AgentError> {
        if !t.disk.dir.is_dir() {
            return Err(Self::not_found(t));
        }
        let lock = VolumeLock::acquire(&t.disk.lock).map_err(|source| AgentError::Io {
            op: "lock",
            path: t.disk.lock.display().to_string(),
            source,
        })?;
        let out = f(&lock);
        if !t.disk.meta.exists() {
            let _ = lock.unlink();
        }
        out
    }

    fn info(&self, t: &Target<'_>, meta: &VolumeMeta) -> Result<VolumeInfo, AgentError> {
        let desc = self.backend.descriptor(&t.disk).map_err(Self::backend_err(t))?;
        let allocated = self.backend.allocated_bytes(&t.disk).unwrap_or(0);
        Ok(build_info(&t.full, t.ds, DEFAULT_VMGROUP, meta, &desc, allocated))
    }

    /// `GET /v1/volumes/{name}`.
    pub fn get(&self, name: &str) -> Result<VolumeInfo, AgentError> {
        let t = self.resolve(name)?;
        let meta = Self::load_meta(&t)?.ok_or_else(|| Self::not_found(&t))?;
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
                    disk: ds.disk(DEFAULT_VMGROUP, &r.volume),
                })
            }
            None => None,
        };
        if let Some(src) = &source {
            if src.disk.meta == t.disk.meta {
                return Err(AgentError::InvalidRequest(format!(
                    "cannot clone volume {} onto itself",
                    t.full
                )));
            }
            if !src.disk.meta.exists() {
                return Err(AgentError::CloneSourceNotFound {
                    source_name: src.full.clone(),
                });
            }
        }
        std::fs::create_dir_all(&t.disk.dir).map_err(|source| AgentError::Io {
            op: "create folder",
            path: t.disk.dir.display().to_string(),
            source,
        })?;
        let create = || {
            if Self::load_meta(&t)?.is_some() {
                return Err(AgentError::AlreadyExists {
                    name: t.full.clone(),
                    path: t.disk.descriptor.display().to_string(),
                });
            }
            // Files under this name without metadata are ours to replace
            // only if a create of ours marked them; anything else (a disk
            // the original vDVS or an administrator put there) is kept.
            if !t.disk.marked() {
                if let Some(f) = t.disk.existing_disk_file() {
                    return Err(AgentError::ForeignFiles {
                        name: t.full.clone(),
                        path: f.display().to_string(),
                    });
                }
            }
            Self::mark(&t.disk.creating, "create")?;
            let res = match &source {
                None => self.create_new(vm, &t, &opts, &req.opts),
                Some(src) => self.create_clone(vm, &t, src, &opts),
            };
            // A failed create removes whatever it wrote (a step after the
            // disk, such as applying the policy, may have failed).
            if res.is_err() && !t.disk.meta.exists() {
                if let Err(e) = self.backend.delete_disk(&t.disk) {
                    tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot clean up a failed create; the next start does");
                }
            }
            // Done, or cleaned up: the marker goes. If cleanup left files,
            // it stays, so the next start collects them.
            if res.is_ok() || t.disk.existing_disk_file().is_none() {
                if let Err(e) = Self::clear_markers(&t.disk) {
                    tracing::warn!(volume = %t.full, error = %crate::error::error_chain(&e), "cannot remove the create marker; the next start does");
                }
            }
            res
        };
        match &source {
            None => self.locked(&t, |_| create()),
            Some(src) => {
                if !src.disk.dir.is_dir() {
                    return Err(AgentError::CloneSourceNotFound {
                        source_name: src.full.clone(),
                    });
                }
                // Lock both volumes in path order so two clones in opposite
                // directions cannot deadlock.
                let (first, second) = if t.disk.lock < src.disk.lock {
                    (&t, src)
                } else {
                    (src, &t)
                };
                self.locked(first, |_| self.locked(second, |_| create()))
            }
        }
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
        opts: &VolumeOptions,
        raw: &BTreeMap<String, String>,
    ) -> Result<VolumeInfo, AgentError> {
        let size_mb = opts.size_mb.unwrap_or(opt::DEFAULT_SIZE_MB);
        self.backend
            .create_disk(&t.disk, size_mb * MIB, opts.disk_format)
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
        self.commit_new(vm, t, vol_opts, None)
    }

    fn create_clone(
        &self,
        vm: &str,
        t: &Target<'_>,
        src: &Target<'_>,
        opts: &VolumeOptions,
    ) -> Result<VolumeInfo, AgentError> {
        let src_meta = Self::load_meta(src)?.ok_or_else(|| AgentError::CloneSourceNotFound {
            source_name: src.full.clone(),
        })?;
        if let Some(att) = self.live_attachment(src, &src_meta)? {
            let _ = att;
            return Err(AgentError::CloneSourceAttached {
                name: src.full.clone(),
                vm: src_meta.attached_vm.clone().unwrap_or_else(|| "unknown".into()),
            });
        }
        self.backend
            .clone_disk(&src.disk, &t.disk, opts.disk_format)
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
        self.commit_new(vm, t, vol_opts, src_meta.formatted.clone())
    }

    /// Writes the sidecar of a new volume: the commit point of create.
    fn commit_new(
        &self,
        vm: &str,
        t: &Target<'_>,
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
        if let Err(e) = Self::store_meta(t, &meta) {
            let _ = crate::fsutil::remove_if_exists(&t.disk.meta);
            let _ = self.backend.delete_disk(&t.disk);
            return Err(e);
        }
        tracing::info!(volume = %t.full, vm, "created volume");
        self.info(t, &meta)
    }

    /// Writes a create or remove marker (see [`DiskPaths::creating`])
    /// durably, before the operation touches any other file.
    fn mark(marker: &Path, what: &str) -> Result<(), AgentError> {
        crate::fsutil::write_marker(marker, what).map_err(|source| AgentError::Io {
            op: "write",
            path: marker.display().to_string(),
            source,
        })
    }

    /// Removes both markers. Not synced: a marker that comes back after a
    /// crash only makes the next start look at that name again.
    fn clear_markers(disk: &DiskPaths) -> Result<(), AgentError> {
        for marker in disk.markers() {
            crate::fsutil::remove_if_exists(marker).map_err(|source| AgentError::Io {
                op: "delete",
                path: marker.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// The backend's live attachment, healing metadata that claims an
    /// attachment the backend no longer has (e.g. after a host reboot).
    fn live_attachment(&self, t: &Target<'_>, meta: &VolumeMeta) -> Result<Option<Attachment>, AgentError> {
        let live = self.backend.attachment(&t.disk).map_err(Self::backend_err(t))?;
        if live.is_none() && meta.status == AttachStatus::Attached {
            tracing::warn!(volume = %t.full, vm = ?meta.attached_vm, "metadata says attached but no device is bound; marking detached");
            let mut healed = meta.clone();
            clear_attachment(&mut healed);
            Self::store_meta(t, &healed)?;
        }
        Ok(live)
    }

    /// `DELETE /v1/volumes/{name}`. Refused while the volume is attached.
    pub fn remove(&self, vm: &str, name: &str) -> Result<(), AgentError> {
        validate_vm_id(vm)?;
        let t = self.resolve(name)?;
        self.locked(&t, |lock| {
            let meta = Self::load_meta(&t)?.ok_or_else(|| Self::not_found(&t))?;
            if let Some(att) = self.live_attachment(&t, &meta)? {
                let holder = match (&meta.status, &meta.attached_vm) {
                    (AttachStatus::Attached, Some(vm)) => vm.clone(),
                    _ => format!("unknown (device {})", att.device.unwrap_or_default()),
                };
                return Err(AgentError::InUse {
                    name: t.full.clone(),
                    vm: holder,
                });
            }
            // Marked first, so a crash part-way leaves files the next start
            // knows to be ours and collects.
            Self::mark(&t.disk.removing, "remove")?;
            crate::fsutil::remove_if_exists(&t.disk.meta).map_err(|source| AgentError::Io {
                op: "delete",
                path: t.disk.meta.display().to_string(),
                source,
            })?;
            self.backend.delete_disk(&t.disk).map_err(Self::backend_err(&t))?;
            Self::clear_markers(&t.disk)?;
            let _ = lock.unlink();
            tracing::info!(volume = %t.full, vm, "removed volume");
            Ok(())
        })
    }

    /// `POST /v1/volumes/{name}/attach`. Exclusive: refused while another
    /// VM holds the volume; repeated by the holder, returns the same device.
    pub fn attach(&self, vm: &str, name: &str) -> Result<AttachInfo, AgentError> {
        validate_vm_id(vm)?;
        let t = self.resolve(name)?;
        self.locked(&t, |_| {
            let mut meta = Self::load_meta(&t)?.ok_or_else(|| Self::not_found(&t))?;
            if meta.status == AttachStatus::Attached && meta.attached_vm.as_deref() != Some(vm) {
                if self.live_attachment(&t, &meta)?.is_some() {
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
                Self::store_meta(&t, &meta)?;
            }
            let att = match self.backend.attach(vm, &t.disk) {
                Ok(a) => a,
                Err(e) => {
                    if fresh {
                        clear_attachment(&mut meta);
                        if let Err(me) = Self::store_meta(&t, &meta) {
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
                device,
            })
        })
    }

    /// `POST /v1/volumes/{name}/detach`. Succeeds when there is nothing to
    /// detach, including when another VM holds the volume (that VM's
    /// attachment is left alone, as the original did).
    pub fn detach(&self, vm: &str, name: &str) -> Result<(), AgentError> {
        validate_vm_id(vm)?;
        let t = self.resolve(name)?;
        self.locked(&t, |_| {
            let mut meta = Self::load_meta(&t)?.ok_or_else(|| Self::not_found(&t))?;
            if meta.status == AttachStatus::Attached && meta.attached_vm.as_deref() != Some(vm) {
                tracing::info!(volume = %t.full, vm, holder = ?meta.attached_vm, "detach ignored: attached to another VM");
                return Ok(());
            }
            self.backend.detach(&t.disk).map_err(Self::backend_err(&t))?;
            if meta.status == AttachStatus::Attached {
                clear_attachment(&mut meta);
                Self::store_meta(&t, &meta)?;
                tracing::info!(volume = %t.full, vm, "detached volume");
            }
            Ok(())
        })
    }
}

impl VolumeService {
    /// `POST /v1/volumes/{name}/formatted`: records, durably, that the
    /// disk now holds a filesystem of `fstype`. Only the VM the volume is
    /// attached to may record it (it is the one that ran `mkfs`). Recording
    /// the same type again is a no-op; another type is refused, because a
    /// recorded filesystem is never replaced.
    pub fn mark_formatted(&self, vm: &str, name: &str, fstype: &str) -> Result<VolumeInfo, AgentError> {
        validate_vm_id(vm)?;
        let fstype: FsType = fstype.parse()?;
        let t = self.resolve(name)?;
        self.locked(&t, |_| {
            let mut meta = Self::load_meta(&t)?.ok_or_else(|| Self::not_found(&t))?;
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
            Self::store_meta(&t, &meta)?;
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

/// Builds the wire view of a volume from its metadata and descriptor.
pub fn build_info(
    full: &str,
    ds: &Datastore,
    vmgroup: &str,
    meta: &VolumeMeta,
    desc: &crate::vmdk::Descriptor,
    allocated: u64,
) -> VolumeInfo {
    let volume = full.rsplit_once('@').map(|(v, _)| v).unwrap_or(full);
    let parse_or = |key: &str| meta.opt(key).map(str::to_owned);
    VolumeInfo {
        name: full.to_owned(),
        volume: volume.to_owned(),
        datastore: ds.name.clone(),
        vmgroup: vmgroup.to_owned(),
        capacity_bytes: desc.capacity_bytes(),
        allocated_bytes: allocated,
        disk_format: meta
            .opt(opt::DISKFORMAT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(if desc.is_thin() {
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
        disk_uuid: desc.uuid().unwrap_or_default().to_owned(),
        options: meta.vol_opts.clone(),
        formatted: meta.formatted.clone(),
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
