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

use std::fmt;
use std::io;
use std::path::PathBuf;

use vmdk_protocol::DiskFormat;

use crate::datastore::DiskPaths;
use crate::vmdk::{Descriptor, DescriptorError};

/// A live attachment of a disk to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Block device node in the guest, when the backend knows it.
    pub device: Option<String>,
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A file operation on the datastore failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done, e.g. `create extent`.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The descriptor could not be read.
    #[error("bad descriptor {path}")]
    Descriptor {
        /// The descriptor file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DescriptorError,
    },
    /// Binding or unbinding a device failed.
    #[error("{op} {path}")]
    Device {
        /// What was being done, e.g. `attach loop device for`.
        op: &'static str,
        /// The disk or device.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Creates, deletes, attaches and detaches disks.
///
/// Contract for every implementation:
/// * `create_disk` writes a complete disk or returns an error having removed
///   what it wrote;
/// * `delete_disk`, `detach` succeed when there is nothing to do;
/// * `attach` returns the existing attachment when the disk is already
///   attached, so a retried attach is harmless;
/// * `attachment` reports the live state, not what metadata says.
pub trait DiskBackend: Send + Sync + fmt::Debug {
    /// Backend name shown by `GET /v1/version` (`local`, `vsphere`).
    fn kind(&self) -> &'static str;
    /// Creates descriptor and extent for a new disk.
    fn create_disk(
        &self,
        disk: &DiskPaths,
        capacity_bytes: u64,
        format: DiskFormat,
    ) -> Result<Descriptor, BackendError>;
    /// Copies a detached disk into a new one with the given format.
    fn clone_disk(&self, src: &DiskPaths, dst: &DiskPaths, format: DiskFormat) -> Result<Descriptor, BackendError>;
    /// Deletes descriptor and extent.
    fn delete_disk(&self, disk: &DiskPaths) -> Result<(), BackendError>;
    /// Reads the descriptor.
    fn descriptor(&self, disk: &DiskPaths) -> Result<Descriptor, BackendError>;
    /// Bytes the extent really occupies.
    fn allocated_bytes(&self, disk: &DiskPaths) -> Result<u64, BackendError>;
    /// Attaches the disk to `vm` (or returns the existing attachment).
    fn attach(&self, vm: &str, disk: &DiskPaths) -> Result<Attachment, BackendError>;
    /// Detaches the disk from whatever it is attached to.
    fn detach(&self, disk: &DiskPaths) -> Result<(), BackendError>;
    /// The live attachment, if any.
    fn attachment(&self, disk: &DiskPaths) -> Result<Option<Attachment>, BackendError>;
    /// Applies VSAN policy `name`, whose expression is `content`, to an
    /// existing disk (at create, and again for each volume using the policy
    /// when `vmdk-agent policy update` changes it). The service records the
    /// policy name in the volume's metadata; a backend makes the storage
    /// follow it (`vsphere`: set the policy of the disk's vSAN object;
    /// `local`: there is nothing to apply to a file, so applying means only
    /// that recording). Fails when the disk does not exist.
    fn apply_policy(&self, disk: &DiskPaths, name: &str, content: &str) -> Result<(), BackendError>;
    /// Every extent this backend currently has attached, with its
    /// attachment. The service uses it at start to release attachments no
    /// metadata records (an agent killed between binding a device and
    /// writing the sidecar).
    fn attached_extents(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError>;
}
