//! The hypervisor seam: how disks are created, attached and detached.
//!
//! [`DiskBackend`] is everything that differs between a Linux host with
//! directory datastores ([`local::LocalBackend`]) and a real ESXi or vCenter
//! (the `vsphere` backend, a later issue). The volume service above it owns
//! names, options, metadata, locking and idempotency; a backend only moves
//! bytes and devices, and each method is idempotent on its own so a retried
//! request never fails halfway.

pub mod local;
pub mod loopdev;
pub mod slots;
pub mod vsphere;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use vmdk_protocol::{AttachAs, DiskFormat, DiskLocation, ErrorCode, PolicyState};

use crate::datastore::{Datastore, VolumeFiles, VolumeFolder};
use crate::progress::Progress;
use crate::store::{DsPath, StoreError};
use crate::vmdk::DescriptorError;

/// Which disk an operation is about: datastore, vmgroup folder, volume.
#[derive(Debug, Clone, Copy)]
pub struct DiskRef<'a> {
    /// The datastore.
    pub datastore: &'a Datastore,
    /// The vmgroup folder.
    pub vmgroup: &'a str,
    /// The volume part of the name.
    pub volume: &'a str,
}

impl DiskRef<'_> {
    /// The volume's file names.
    pub fn files(&self) -> VolumeFiles {
        VolumeFiles::new(self.volume)
    }

    /// `[ds] dockvols/<vmgroup>/<file>`, for messages.
    pub fn shown(&self, file: &str) -> DsPath {
        DsPath::new(
            &self.datastore.name,
            &format!("{}/{}/{file}", crate::datastore::DOCKVOLS, self.vmgroup),
        )
    }
}

/// A VSAN policy as a backend applies it: its name and its expression
/// (`(("stripeWidth" i2))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySpec<'a> {
    /// The policy's name (`SW=2`).
    pub name: &'a str,
    /// Its expression, as stored.
    pub content: &'a str,
}

/// What [`DiskBackend::release_if_powered_off`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRelease {
    /// The VM is powered off: the disk is no longer in its configuration
    /// (it was removed now, or was not there). The file is untouched.
    Released,
    /// The VM is running (or suspended): nothing was changed.
    Running,
    /// The backend knows no power states (`local`).
    Unknown,
}

/// What a backend knows about a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Virtual size.
    pub capacity_bytes: u64,
    /// Bytes the disk really occupies.
    pub allocated_bytes: u64,
    /// Whether it is thin provisioned.
    pub thin: bool,
    /// Disk UUID in ESXi's `60 00 C2 9...` form, when known.
    pub uuid: Option<String>,
}

/// A live attachment of a disk to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The VM the disk is attached to, when the backend knows it (a
    /// hypervisor does; a loop device does not, and the service's records
    /// say).
    pub vm: Option<String>,
    /// Where the guest finds the disk.
    pub location: DiskLocation,
    /// Bound by this very call, from a backing file that held no data
    /// (every byte reads zero). Only the `local` backend proves it.
    pub blank: bool,
}

impl Attachment {
    /// The block device node, for backends that attach on this host.
    pub fn device(&self) -> Option<&str> {
        match &self.location {
            DiskLocation::Device { path } => Some(path),
            DiskLocation::Scsi { .. } => None,
        }
    }
}

/// Why a backend operation failed. Files are named as [`DsPath`]s, never
/// by host path.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A datastore file could not be used (missing folder, a planted link,
    /// a full datastore, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file the disk needs is not there.
    #[error("{file} is missing")]
    Missing {
        /// The file.
        file: DsPath,
    },
    /// The descriptor could not be read.
    #[error("bad descriptor {file}")]
    Descriptor {
        /// The descriptor file.
        file: DsPath,
        /// The cause.
        #[source]
        source: DescriptorError,
    },
    /// The disk's files do not agree with each other.
    #[error("{file}: {what}")]
    Inconsistent {
        /// The file.
        file: DsPath,
        /// What does not agree.
        what: String,
    },
    /// A file operation on an open disk file failed.
    #[error("cannot {op} {file}")]
    Io {
        /// What was being done, e.g. `allocate`.
        op: &'static str,
        /// The file.
        file: DsPath,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding or unbinding a device failed.
    #[error("cannot {op} {device}")]
    Device {
        /// What was being done, e.g. `attach loop device for`.
        op: &'static str,
        /// The disk or device.
        device: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The device is still in use on the host (mounted or held open), so it
    /// was not detached; it stays attached and recorded as such.
    #[error("{device} is still in use (mounted or open); it was not detached and stays attached")]
    Busy {
        /// The device.
        device: String,
    },
    /// The hypervisor does not know an object (a VM, a datastore, a disk).
    #[error("{what} not found")]
    NotFound {
        /// What, e.g. `VM with BIOS UUID 4211...`.
        what: String,
    },
    /// The operation conflicts with the state of the disk (attached to
    /// another VM, locked, ...).
    #[error("{what}")]
    Conflict {
        /// What is in the way.
        what: String,
    },
    /// Every slot on the VM's controllers is taken (the original's text).
    #[error(
        "Failed to add disk to VM {vm}: maximum number of supported volumes attached ({max}); detach a volume first"
    )]
    NoFreeSlot {
        /// The VM.
        vm: String,
        /// How many volumes a VM can hold.
        max: u32,
    },
    /// The hypervisor refused or failed a call; its own text.
    #[error("{method} failed: {fault}: {message}")]
    Fault {
        /// The call, e.g. `ReconfigVM_Task`.
        method: String,
        /// The fault type, e.g. `FileNotFound`.
        fault: String,
        /// The hypervisor's message.
        message: String,
    },
    /// The hypervisor did not answer, or a task did not finish, in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: std::time::Duration,
    },
}

impl BackendError {
    /// The wire code (one exhaustive match).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Busy { .. } | Self::Conflict { .. } => ErrorCode::InUse,
            Self::NoFreeSlot { .. } => ErrorCode::NoFreeSlot,
            Self::Timeout { .. } => ErrorCode::Timeout,
            Self::Store(_)
            | Self::Missing { .. }
            | Self::Descriptor { .. }
            | Self::Inconsistent { .. }
            | Self::Io { .. }
            | Self::Device { .. }
            | Self::Fault { .. }
            // Not `not_found`: that code means "no such volume", and Docker
            // forgets a volume it is told does not exist. A volume whose VM
            // or disk the hypervisor cannot find is damaged, not gone.
            | Self::NotFound { .. } => ErrorCode::Backend,
        }
    }
}

/// Creates, deletes, attaches and detaches disks. Async, because a
/// hypervisor is a remote peer; the `local` backend runs its blocking file
/// and device calls on tokio's blocking pool.
///
/// Contract for every implementation:
/// * `create_disk` writes a complete disk or returns an error having removed
///   what it wrote;
/// * `delete_disk`, `detach` succeed when there is nothing to do; neither
///   ever deletes or releases what is not the named volume's;
/// * `detach` succeeds only when the disk really was released from `vm`;
/// * `attach` returns the existing attachment when the disk is already
///   attached to `vm`, so a retried attach is harmless;
/// * `attachment` reports the live state, not what metadata says.
#[async_trait::async_trait]
pub trait DiskBackend: Send + Sync + fmt::Debug {
    /// Backend name shown by `GET /v1/version` (`local`, `vsphere`).
    fn kind(&self) -> &'static str;
    /// Creates a new disk. A long one (eagerzeroedthick) calls
    /// [`Progress::start`] when the long part begins, reports into
    /// `progress` as it goes, and stops (removing what it wrote) when it is
    /// cancelled.
    async fn create_disk(
        &self,
        disk: &DiskRef<'_>,
        capacity_bytes: u64,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError>;
    /// Copies a detached disk into a new one with the given format,
    /// reporting into `progress` like [`DiskBackend::create_disk`].
    async fn clone_disk(
        &self,
        src: &DiskRef<'_>,
        dst: &DiskRef<'_>,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError>;
    /// Deletes the disk.
    async fn delete_disk(&self, disk: &DiskRef<'_>) -> Result<(), BackendError>;
    /// What is known about the disk; an error when it is not whole.
    async fn disk_info(&self, disk: &DiskRef<'_>) -> Result<DiskInfo, BackendError>;
    /// [`DiskBackend::disk_info`] read at once on the calling thread from
    /// the disk's vmgroup `folder`, for a backend whose disks are files this
    /// host reaches (`local`); `None` (the default) for one that must ask
    /// elsewhere. Blocking: for the catalog's scans, which run on the
    /// blocking pool and read many volumes in one go.
    fn disk_info_in(
        &self,
        _folder: &crate::datastore::LocalFolder,
        _disk: &DiskRef<'_>,
    ) -> Option<Result<DiskInfo, BackendError>> {
        None
    }
    /// Creates a new disk that follows VSAN policy `policy` from the start;
    /// returns how the policy took effect (see `apply_policy`). Like
    /// `create_disk`, it leaves nothing behind when it fails. By default:
    /// `create_disk`, then `apply_policy` (the service deletes the disk when
    /// that fails).
    async fn create_disk_with_policy(
        &self,
        disk: &DiskRef<'_>,
        capacity_bytes: u64,
        format: DiskFormat,
        policy: PolicySpec<'_>,
        progress: &Progress,
    ) -> Result<(DiskInfo, Option<PolicyState>), BackendError> {
        let info = self.create_disk(disk, capacity_bytes, format, progress).await?;
        let state = self.apply_policy(disk, policy, None).await?;
        Ok((info, state))
    }
    /// Attaches the disk to `vm` (or returns the existing attachment). With
    /// `policy`, a backend with storage policies gives the disk that policy
    /// as it attaches it (vSphere: the device's SPBM profile, on vCenter).
    async fn attach(
        &self,
        vm: &str,
        disk: &DiskRef<'_>,
        attach_as: AttachAs,
        policy: Option<PolicySpec<'_>>,
    ) -> Result<Attachment, BackendError>;
    /// Detaches the disk from `vm`.
    async fn detach(&self, vm: &str, disk: &DiskRef<'_>) -> Result<(), BackendError>;
    /// The live attachment, if any. `vm_hint` is the VM the records say
    /// holds the disk; a hypervisor backend looks there.
    async fn attachment(&self, disk: &DiskRef<'_>, vm_hint: Option<&str>) -> Result<Option<Attachment>, BackendError>;
    /// Whether `vm` is powered off, for a backend that knows VMs' power
    /// states (`vsphere`); `None` when it does not, or does not know the VM.
    async fn powered_off(&self, _vm: &str) -> Result<Option<bool>, BackendError> {
        Ok(None)
    }
    /// Releases the disk from `vm` when, and only when, the hypervisor says
    /// `vm` is powered off (what the original's power-state listener did):
    /// the disk leaves the VM's configuration and its file stays. The power
    /// state is read together with the VM's devices, right before the
    /// change; a running or suspended VM is never touched.
    async fn release_if_powered_off(&self, _vm: &str, _disk: &DiskRef<'_>) -> Result<PowerRelease, BackendError> {
        Ok(PowerRelease::Unknown)
    }
    /// The vmgroup folder `vmgroup` of `datastore`, where the service keeps
    /// volumes' sidecars, markers and locks (created when `create`); `None`
    /// when it does not exist.
    async fn folder(
        &self,
        datastore: &Datastore,
        vmgroup: &str,
        create: bool,
    ) -> Result<Option<Box<dyn VolumeFolder>>, StoreError>;
    /// The datastore a VM's short volume names go to: the one holding the
    /// VM (`vsphere`, as the original did). `None`: the service's default.
    async fn home_datastore(&self, _vm: &str) -> Result<Option<String>, BackendError> {
        Ok(None)
    }
    /// Refuses a caller the hypervisor does not know (`vsphere`: no VM with
    /// that BIOS UUID), so that no volume is created for a VM that could
    /// never attach it. `local` knows no VMs and accepts every caller.
    async fn check_vm(&self, _vm: &str) -> Result<(), BackendError> {
        Ok(())
    }
    /// Applies VSAN policy `policy` to an existing disk (after a clone, and
    /// for each volume using the policy when `vmdk-agent policy update`
    /// changes it); `holder` is the VM the disk is attached to, if any. The
    /// service records the policy name in the volume's metadata, with the
    /// state returned: `vsphere` on vCenter gives an attached disk the
    /// policy's SPBM profile now, and a detached one at its next attach
    /// (`Pending`); without vCenter the policy is only `Recorded`. `None`:
    /// the backend has no storage under a hypervisor at all (`local`: a
    /// directory stands in for a VSAN datastore, and its policies are
    /// records by definition). Fails when the disk does not exist or the
    /// hypervisor refuses the policy.
    async fn apply_policy(
        &self,
        disk: &DiskRef<'_>,
        policy: PolicySpec<'_>,
        holder: Option<&str>,
    ) -> Result<Option<PolicyState>, BackendError>;
    /// Where the policy files of datastore `ds` are, when the backend
    /// reaches them its own way (`vsphere`: the datastore file API); `None`:
    /// a directory on this host ([`crate::policy::PolicyStore`]).
    fn policy_files(&self, _ds: &Datastore) -> Option<Arc<dyn crate::policy::PolicyFiles>> {
        None
    }
    /// Every disk this backend currently has attached on this host, by the
    /// host path the kernel shows, with its attachment. The service uses it
    /// at start to release attachments no metadata records (an agent killed
    /// between binding a device and writing the sidecar). Backends that do
    /// not attach on this host return nothing.
    async fn attached_extents(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError>;
    /// The disks the hypervisor has attached to `vm`, as the datastore
    /// paths of their descriptors (`[ds] dockvols/_DEFAULT/vol.vmdk`), read
    /// in one call; empty when it does not know `vm`. `None` (the default):
    /// this backend attaches on this host, and [`DiskBackend::attached_extents`]
    /// says what is attached. The service uses it to find what a restarted
    /// guest may hold without reading every volume's files.
    async fn disks_of_vm(&self, _vm: &str) -> Result<Option<Vec<String>>, BackendError> {
        Ok(None)
    }
}
