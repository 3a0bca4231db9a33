//! A small typed vSphere client for the vmdk agent's `vsphere` backend.
//!
//! It speaks SOAP over HTTPS (reqwest, rustls with the `ring` provider,
//! quick-xml) for exactly the calls the backend needs: the session
//! (`RetrieveServiceContent`, `Login`, transparent re-login once on
//! `NotAuthenticated`), the inventory (datacenters, datastores,
//! `SearchIndex.FindByUuid`, a VM's devices and power state), files and
//! disks (`MakeDirectory`, `CreateVirtualDisk_Task`, `DeleteVirtualDisk_Task`,
//! `CopyVirtualDisk_Task`, `QueryVirtualDiskUuid`, `DeleteDatastoreFile_Task`
//! and the datastore file HTTP API), `ReconfigVM_Task` (add a PVSCSI
//! controller, attach and detach an existing disk) and, on vCenter, storage
//! policies through PBM at `/pbm`.
//!
//! Tasks are waited for by polling `info.state`; a failed task's
//! `info.error` comes back as [`Error::Fault`] with the fault's type.
//! Request bodies keep the element order of the vim25 XSD, which real
//! hostd and vpxd enforce. See `docs/vsphere.md`.

mod client;
mod error;
mod pbm;
mod tls;
mod types;
mod vim;
mod xml;

pub use client::{Client, Config, OnProgress, Password};
pub use error::{Error, Result, TlsFailure};
pub use tls::{Thumbprint, ThumbprintAlgorithm, TlsTrust};
pub use types::{
    About, AdapterType, ApiType, BiosUuid, Datacenter, Datastore, DatastorePath, DeviceChange, DiskMode, DiskSpec,
    DiskType, FolderEntry, Moref, OtherDevice, PowerState, Profile, ProfileId, ProfileRule, RuleValue, ScsiController,
    ScsiControllerKind, VirtualDisk, VmInfo, VsanRule,
};
