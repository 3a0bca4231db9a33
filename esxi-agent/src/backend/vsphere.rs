//! The `vsphere` backend: VMDKs on ESXi or vCenter datastores, hot-added to
//! the calling VM on a ParaVirtual SCSI controller.
//!
//! * disks: `FileManager.MakeDirectory` for `[ds] dockvols/<vmgroup>`, then
//!   `VirtualDiskManager.CreateVirtualDisk_Task` (thin, preallocated or
//!   eagerZeroedThick), `CopyVirtualDisk_Task` for clones,
//!   `DeleteVirtualDisk_Task` for removes; what a disk is (capacity, thin,
//!   UUID) is read from its descriptor through the datastore file API and
//!   parsed by the same bounded parser as the `local` backend's;
//! * attach: the VM (found by its BIOS UUID, `SearchIndex.FindByUuid`) gets
//!   a `VirtualDisk` with a FlatVer2 backing of the existing file at the
//!   slot [`super::slots::pick_slot`] chooses, adding a PVSCSI controller
//!   when every slot is taken; the answer names the controller's bus, the
//!   unit and the disk UUID ([`DiskLocation::Scsi`]), which the guest's
//!   locator turns into a block device. Detach removes the device and never
//!   the file;
//! * sidecars, markers: files next to the disk, through the datastore file
//!   API ([`VsphereFolder`]), so one volume format serves both backends;
//! * locks: within this agent process (one agent serves a datastore until
//!   shared-datastore leases come).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmdk_protocol::{AttachAs, DiskFormat, DiskLocation};
use vmdk_vsphere::{
    AdapterType, BiosUuid, Client, Config, Datacenter, DatastorePath, DeviceChange, DiskMode, DiskSpec, DiskType,
    Error as VsError, Moref, Password, ScsiControllerKind, TlsTrust, VmInfo,
};

use super::slots::{self, Controller, ControllerKind, Slot};
use super::{Attachment, BackendError, DiskBackend, DiskInfo, DiskRef};
use crate::config::{DatastoreConfig, VsphereConfig};
use crate::datastore::{Datastore, Marker, VolumeFiles, VolumeFolder, DOCKVOLS};
use crate::lock::VolumeLock;
use crate::meta::{MetaError, VolumeMeta, MAX_META_BYTES};
use crate::progress::Progress;
use crate::store::{DsPath, Entry, FileId, FileKind, Stat, StoreError};
use crate::vmdk::{Descriptor, MAX_DESCRIPTOR_BYTES};

/// Temporary device keys of one reconfiguration (negative, as vSphere
/// wants for new devices).
const NEW_CONTROLLER_KEY: i32 = -100;
const NEW_DISK_KEY: i32 = -101;

/// Per-volume locks within this process.
type LockMap = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// The vSphere backend; see the module docs.
#[derive(Debug, Clone)]
pub struct VsphereBackend {
    client: Client,
    dc: Datacenter,
    locks: Arc<LockMap>,
}

/// What went wrong with a vSphere call, as a backend error.
fn vs_err(method: &str) -> impl FnOnce(VsError) -> BackendError + '_ {
    move |e| match e {
        VsError::Fault {
            method,
            fault_type,
            message,
            ..
        } => BackendError::Fault {
            method,
            fault: fault_type,
            message,
        },
        VsError::NotFound { what } => BackendError::NotFound { what },
        VsError::Timeout { what, after } => BackendError::Timeout { what, after },
        other => BackendError::Fault {
            method: method.to_owned(),
            fault: "vSphere".into(),
            message: vmdk_common::error_chain(&other),
        },
    }
}

fn fault_is(e: &VsError, ty: &str) -> bool {
    matches!(e, VsError::Fault { fault_type, .. } if fault_type == ty)
}

/// The 32 hex digits of a disk UUID in any of its written forms
/// (`6000C29a-...`, `60 00 c2 9a ... -...`), lower-cased.
fn uuid_hex(u: &str) -> Option<String> {
    let hex: String = u.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

impl VsphereBackend {
    /// Connects and logs in as `[vsphere]` says (credentials file, TLS
    /// trust), and finds the datacenter.
    pub async fn connect(cfg: &VsphereConfig) -> Result<Self, BackendError> {
        let creds = cfg.load_credentials().map_err(|e| BackendError::Fault {
            method: "vSphere login".into(),
            fault: "configuration".into(),
            message: e.to_string(),
        })?;
        let tls = match (&cfg.thumbprint, &cfg.ca_file, cfg.insecure) {
            (Some(t), _, _) => TlsTrust::Thumbprint(t.parse().map_err(vs_err("vSphere TLS settings"))?),
            (None, Some(ca), _) => TlsTrust::CaFile(ca.clone()),
            _ => {
                tracing::warn!(url = %cfg.url, "insecure = true: the vSphere server's certificate is not checked; set thumbprint or ca_file");
                TlsTrust::Insecure
            }
        };
        let config = Config::new(cfg.url.clone(), creds.user, Password::new(creds.password), tls);
        let client = Client::connect(config).await.map_err(vs_err("vSphere login"))?;
        let dc = client
            .datacenter(cfg.datacenter.as_deref())
            .await
            .map_err(vs_err("find the datacenter"))?;
        tracing::info!(url = %cfg.url, datacenter = %dc.name, server = %client.about().full_name, "connected to vSphere");
        Ok(Self {
            client,
            dc,
            locks: Arc::default(),
        })
    }

    /// The datastores to serve: those configured (each must exist), else
    /// every datastore of the datacenter. Whether one is VSAN comes from
    /// vSphere.
    pub async fn datastores(&self, configured: &[DatastoreConfig]) -> Result<Vec<Datastore>, BackendError> {
        let all = self
            .client
            .datastores(&self.dc)
            .await
            .map_err(vs_err("list datastores"))?;
        let pick = |d: &vmdk_vsphere::Datastore| Datastore {
            name: d.name.clone(),
            root: None,
            vsan: d.is_vsan(),
        };
        if configured.is_empty() {
            return Ok(all.iter().filter(|d| d.accessible).map(pick).collect());
        }
        configured
            .iter()
            .map(|c| {
                all.iter()
                    .find(|d| d.name == c.name)
                    .map(pick)
                    .ok_or_else(|| BackendError::NotFound {
                        what: format!(
                            "datastore {:?} in datacenter {} (it has: {})",
                            c.name,
                            self.dc.name,
                            all.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    })
            })
            .collect()
    }

    fn disk_path(disk: &DiskRef<'_>) -> Result<DatastorePath, BackendError> {
        Self::file_path(&disk.datastore.name, disk.vmgroup, &disk.files().descriptor)
    }

    fn file_path(ds: &str, vmgroup: &str, file: &str) -> Result<DatastorePath, BackendError> {
        DatastorePath::new(ds, format!("{DOCKVOLS}/{vmgroup}/{file}")).map_err(vs_err("name a datastore file"))
    }

    async fn vm(&self, vm: &str) -> Result<(Moref, VmInfo), BackendError> {
        let uuid: BiosUuid = vm.parse().map_err(|_| BackendError::NotFound {
            what: format!("VM {vm:?}: the vsphere backend finds VMs by their BIOS UUID, and this is not one"),
        })?;
        let moref = self
            .client
            .find_vm_by_bios_uuid(Some(&self.dc), &uuid)
            .await
            .map_err(vs_err("FindByUuid"))?;
        let info = self
            .client
            .vm_info(&moref)
            .await
            .map_err(vs_err("read the VM's devices"))?;
        Ok((moref, info))
    }

    /// Where the guest finds the disk `file` of `info`, if the VM has it.
    fn location_of(info: &VmInfo, file: &DatastorePath, fallback_uuid: Option<&str>) -> Option<DiskLocation> {
        let shown = file.to_string();
        let disk = info
            .disks
            .iter()
            .find(|d| d.file_name.as_deref() == Some(shown.as_str()))?;
        let controller = info.controllers.iter().find(|c| Some(c.key) == disk.controller_key)?;
        Some(DiskLocation::Scsi {
            controller_bus: u32::try_from(controller.bus_number).ok()?,
            // vSphere's pciSlotNumber needs the VM's PCI bridge layout to
            // become a guest address; without it the guest finds the disk
            // by its WWN (the disk UUID).
            pci_address: None,
            unit: u32::try_from(disk.unit_number?).ok()?,
            disk_uuid: disk.uuid.as_deref().or(fallback_uuid).and_then(uuid_hex),
        })
    }

    async fn descriptor(&self, disk: &DiskRef<'_>) -> Result<Descriptor, BackendError> {
        let path = Self::disk_path(disk)?;
        let bytes = match self
            .client
            .read_datastore_file(&self.dc, &path, MAX_DESCRIPTOR_BYTES)
            .await
        {
            Ok(b) => b,
            Err(VsError::NotFound { .. }) => {
                return Err(BackendError::Missing {
                    file: disk.shown(&disk.files().descriptor),
                })
            }
            Err(e) => return Err(vs_err("read the descriptor")(e)),
        };
        Descriptor::parse_bytes(&bytes).map_err(|source| BackendError::Descriptor {
            file: disk.shown(&disk.files().descriptor),
            source,
        })
    }
}

#[async_trait::async_trait]
impl DiskBackend for VsphereBackend {
    fn kind(&self) -> &'static str {
        "vsphere"
    }

    async fn create_disk(
        &self,
        disk: &DiskRef<'_>,
        capacity_bytes: u64,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        // The server does the work in one task; its progress is not
        // followed yet, so a long create shows 0% until it is done.
        progress.start(capacity_bytes);
        let path = Self::disk_path(disk)?;
        let spec = DiskSpec {
            disk_type: match format {
                DiskFormat::Thin => DiskType::Thin,
                DiskFormat::ZeroedThick => DiskType::Preallocated,
                DiskFormat::EagerZeroedThick => DiskType::EagerZeroedThick,
            },
            adapter_type: AdapterType::LsiLogic,
            capacity_kb: capacity_bytes.div_ceil(1024),
            profile: None,
        };
        match self.client.create_virtual_disk(&self.dc, &path, &spec).await {
            Ok(_) => {}
            Err(e) if fault_is(&e, "FileAlreadyExists") => {
                return Err(BackendError::Conflict {
                    what: format!("{path} already exists on the datastore; vmdk does not overwrite it"),
                })
            }
            Err(e) => return Err(vs_err("CreateVirtualDisk_Task")(e)),
        }
        self.disk_info(disk).await
    }

    async fn clone_disk(
        &self,
        src: &DiskRef<'_>,
        dst: &DiskRef<'_>,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        // Not followed yet either: 0% until done.
        progress.start(1);
        // The copy keeps the source's allocation: CopyVirtualDisk_Task's
        // destination spec is refused by vCenter for plain files.
        let _ = format;
        let (from, to) = (Self::disk_path(src)?, Self::disk_path(dst)?);
        self.client
            .copy_virtual_disk(&self.dc, &from, &to, false)
            .await
            .map_err(vs_err("CopyVirtualDisk_Task"))?;
        self.disk_info(dst).await
    }

    async fn delete_disk(&self, disk: &DiskRef<'_>) -> Result<(), BackendError> {
        let path = Self::disk_path(disk)?;
        match self.client.delete_virtual_disk(&self.dc, &path).await {
            Ok(()) => Ok(()),
            Err(VsError::NotFound { .. }) => Ok(()),
            Err(e) if fault_is(&e, "FileNotFound") => Ok(()),
            Err(e) => Err(vs_err("DeleteVirtualDisk_Task")(e)),
        }
    }

    async fn disk_info(&self, disk: &DiskRef<'_>) -> Result<DiskInfo, BackendError> {
        let d = self.descriptor(disk).await?;
        Ok(DiskInfo {
            capacity_bytes: d.capacity_bytes(),
            // The datastore file API does not say how much a file occupies.
            allocated_bytes: 0,
            thin: d.is_thin(),
            uuid: d.uuid().map(str::to_owned),
        })
    }

    async fn attach(&self, vm: &str, disk: &DiskRef<'_>, attach_as: AttachAs) -> Result<Attachment, BackendError> {
        let path = Self::disk_path(disk)?;
        let fallback = self.descriptor(disk).await?.uuid().map(str::to_owned);
        let (moref, info) = self.vm(vm).await?;
        if let Some(location) = Self::location_of(&info, &path, fallback.as_deref()) {
            return Ok(Attachment {
                vm: Some(vm.to_owned()),
                location,
            });
        }
        // Units in use come from every device's controller key and unit:
        // a CD-ROM can sit on a SCSI controller too.
        let used = |key: i32| -> Vec<u32> {
            let disks = info.disks.iter().map(|d| (d.controller_key, d.unit_number));
            let others = info.other_devices.iter().map(|d| (d.controller_key, d.unit_number));
            disks
                .chain(others)
                .filter(|(c, _)| *c == Some(key))
                .filter_map(|(_, u)| u.and_then(|u| u32::try_from(u).ok()))
                .collect()
        };
        let controllers: Vec<Controller> = info
            .controllers
            .iter()
            .filter_map(|c| {
                Some(Controller {
                    key: c.key,
                    bus: u32::try_from(c.bus_number).ok()?,
                    kind: if c.kind == ScsiControllerKind::ParaVirtual {
                        ControllerKind::ParaVirtual
                    } else {
                        ControllerKind::Other
                    },
                    used_units: used(c.key),
                })
            })
            .collect();
        let slot = slots::pick_slot(&controllers).map_err(|_| BackendError::NoFreeSlot {
            vm: info.name.clone(),
            max: slots::MAX_DISKS,
        })?;
        let disk_mode = match attach_as {
            AttachAs::IndependentPersistent => DiskMode::IndependentPersistent,
            AttachAs::Persistent => DiskMode::Persistent,
        };
        let attach = |controller_key: i32, unit: u32| DeviceChange::AttachDisk {
            temp_key: NEW_DISK_KEY,
            controller_key,
            unit_number: unit as i32,
            file: path.clone(),
            disk_mode: disk_mode.clone(),
        };
        let changes = match slot {
            Slot::Existing {
                controller_key, unit, ..
            } => vec![attach(controller_key, unit)],
            Slot::NewController { bus, unit } => vec![
                DeviceChange::AddPvscsiController {
                    temp_key: NEW_CONTROLLER_KEY,
                    bus_number: bus as i32,
                },
                attach(NEW_CONTROLLER_KEY, unit),
            ],
        };
        // Disks report their UUID as their WWN only with disk.EnableUUID
        // (read at power-on): set it for the VM's next boot.
        let enable_uuid = info
            .extra_config
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("disk.EnableUUID") && v.eq_ignore_ascii_case("true"));
        let extra = if enable_uuid {
            Vec::new()
        } else {
            vec![("disk.EnableUUID".to_owned(), "TRUE".to_owned())]
        };
        self.client
            .reconfigure_vm(&moref, &changes, &extra)
            .await
            .map_err(vs_err("ReconfigVM_Task"))?;
        let after = self
            .client
            .vm_info(&moref)
            .await
            .map_err(vs_err("read the VM's devices"))?;
        let location = Self::location_of(&after, &path, fallback.as_deref()).ok_or_else(|| BackendError::Fault {
            method: "ReconfigVM_Task".into(),
            fault: "NotAttached".into(),
            message: format!("the VM does not list {path} after the reconfiguration"),
        })?;
        Ok(Attachment {
            vm: Some(vm.to_owned()),
            location,
        })
    }

    async fn detach(&self, vm: &str, disk: &DiskRef<'_>) -> Result<(), BackendError> {
        if vm.is_empty() {
            return Ok(());
        }
        let path = Self::disk_path(disk)?.to_string();
        let (moref, info) = match self.vm(vm).await {
            Ok(v) => v,
            // A VM that is gone holds nothing.
            Err(BackendError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(device) = info
            .disks
            .iter()
            .find(|d| d.file_name.as_deref() == Some(path.as_str()))
        else {
            return Ok(());
        };
        self.client
            .reconfigure_vm(&moref, &[DeviceChange::RemoveDisk(device.clone())], &[])
            .await
            .map_err(vs_err("ReconfigVM_Task"))
    }

    async fn attachment(&self, disk: &DiskRef<'_>, vm_hint: Option<&str>) -> Result<Option<Attachment>, BackendError> {
        let Some(vm) = vm_hint else {
            return Ok(None);
        };
        let path = Self::disk_path(disk)?;
        let info = match self.vm(vm).await {
            Ok((_, info)) => info,
            Err(BackendError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Self::location_of(&info, &path, None).map(|location| Attachment {
            vm: Some(vm.to_owned()),
            location,
        }))
    }

    async fn apply_policy(&self, disk: &DiskRef<'_>, name: &str, _content: &str) -> Result<(), BackendError> {
        Err(BackendError::Fault {
            method: "apply storage policy".into(),
            fault: "NotImplemented".into(),
            message: format!(
                "the vsphere backend does not apply VSAN policies yet (policy {name}, volume {}); create the volume without vsan-policy-name",
                disk.volume
            ),
        })
    }

    async fn attached_extents(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError> {
        // Nothing is attached on the agent's own host.
        Ok(Vec::new())
    }

    async fn folder(
        &self,
        datastore: &Datastore,
        vmgroup: &str,
        create: bool,
    ) -> Result<Option<Box<dyn VolumeFolder>>, StoreError> {
        let folder = VsphereFolder {
            client: self.client.clone(),
            dc: self.dc.clone(),
            datastore: datastore.name.clone(),
            vmgroup: vmgroup.to_owned(),
            locks: self.locks.clone(),
        };
        if create {
            let dir = DatastorePath::new(&datastore.name, format!("{DOCKVOLS}/{vmgroup}"))
                .map_err(|e| folder.io("name", "", e))?;
            match self.client.make_directory(&self.dc, &dir, true).await {
                Ok(()) => {}
                Err(e) if fault_is(&e, "FileAlreadyExists") => {}
                Err(e) => return Err(folder.io("create folder", "", e)),
            }
        }
        // A folder that does not exist shows as a volume without sidecar.
        Ok(Some(Box::new(folder)))
    }

    async fn home_datastore(&self, vm: &str) -> Result<Option<String>, BackendError> {
        let (_, info) = match self.vm(vm).await {
            Ok(v) => v,
            Err(BackendError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(first) = info.datastores.first() else {
            return Ok(None);
        };
        let all = self
            .client
            .datastores(&self.dc)
            .await
            .map_err(vs_err("list datastores"))?;
        Ok(all.into_iter().find(|d| &d.moref == first).map(|d| d.name))
    }
}

/// A vmgroup folder on a vSphere datastore, through the datastore file API.
#[derive(Debug)]
pub struct VsphereFolder {
    client: Client,
    dc: Datacenter,
    datastore: String,
    vmgroup: String,
    locks: Arc<LockMap>,
}

impl VsphereFolder {
    fn rel(&self, file: &str) -> String {
        if file.is_empty() {
            format!("{DOCKVOLS}/{}", self.vmgroup)
        } else {
            format!("{DOCKVOLS}/{}/{file}", self.vmgroup)
        }
    }

    fn path(&self, file: &str) -> Result<DatastorePath, StoreError> {
        DatastorePath::new(&self.datastore, self.rel(file)).map_err(|e| self.io("name", file, e))
    }

    fn io(&self, op: &'static str, file: &str, e: VsError) -> StoreError {
        StoreError::Io {
            op,
            file: DsPath::new(&self.datastore, &self.rel(file)),
            source: std::io::Error::other(vmdk_common::error_chain(&e)),
        }
    }

    fn lock_of(&self, volume: &str) -> Arc<tokio::sync::Mutex<()>> {
        let key = format!("{}/{}/{volume}", self.datastore, self.vmgroup);
        self.locks.lock().unwrap().entry(key).or_default().clone()
    }

    async fn exists(&self, file: &str) -> Result<bool, StoreError> {
        match self.client.read_datastore_file(&self.dc, &self.path(file)?, 0).await {
            Ok(_) | Err(VsError::TooLarge { .. }) => Ok(true),
            Err(VsError::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.io("look at", file, e)),
        }
    }

    async fn delete(&self, file: &str) -> Result<(), StoreError> {
        match self.client.delete_datastore_file(&self.dc, &self.path(file)?).await {
            Ok(()) | Err(VsError::NotFound { .. }) => Ok(()),
            Err(e) if fault_is(&e, "FileNotFound") => Ok(()),
            Err(e) => Err(self.io("delete", file, e)),
        }
    }

    async fn write(&self, file: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.client
            .write_datastore_file(&self.dc, &self.path(file)?, bytes)
            .await
            .map_err(|e| self.io("write", file, e))
    }
}

#[async_trait::async_trait]
impl VolumeFolder for VsphereFolder {
    fn shown(&self, file: &str) -> DsPath {
        DsPath::new(&self.datastore, &self.rel(file))
    }

    async fn lock(&self, volume: &str) -> Result<VolumeLock, StoreError> {
        Ok(VolumeLock::in_process(self.lock_of(volume).lock_owned().await))
    }

    async fn try_lock(&self, volume: &str) -> Result<Option<VolumeLock>, StoreError> {
        Ok(self.lock_of(volume).try_lock_owned().ok().map(VolumeLock::in_process))
    }

    async fn read_meta(&self, volume: &str) -> Result<Option<VolumeMeta>, MetaError> {
        let name = VolumeFiles::new(volume).meta;
        let bytes = match self
            .client
            .read_datastore_file(&self.dc, &self.path(&name)?, MAX_META_BYTES)
            .await
        {
            Ok(b) => b,
            Err(VsError::NotFound { .. }) => return Ok(None),
            Err(VsError::TooLarge { .. }) => {
                return Err(StoreError::TooLarge {
                    file: self.shown(&name),
                    limit: MAX_META_BYTES,
                }
                .into())
            }
            Err(e) => return Err(self.io("read", &name, e).into()),
        };
        VolumeMeta::decode(&bytes)
            .map(Some)
            .map_err(|source| MetaError::Corrupt {
                file: self.shown(&name),
                source,
            })
    }

    async fn write_meta(&self, volume: &str, meta: &VolumeMeta) -> Result<(), MetaError> {
        let name = VolumeFiles::new(volume).meta;
        Ok(self.write(&name, &meta.encode()).await?)
    }

    async fn entry(&self, file: &str) -> Result<Option<Stat>, StoreError> {
        // The file API says only whether a file is there.
        Ok(self.exists(file).await?.then_some(Stat {
            kind: FileKind::Regular,
            size: 0,
            mode: 0o600,
            allocated: 0,
            id: FileId { dev: 0, ino: 0 },
            ctime_ns: 0,
        }))
    }

    async fn mark(&self, volume: &str, marker: Marker) -> Result<(), StoreError> {
        let files = VolumeFiles::new(volume);
        self.write(files.marker(marker), b"").await
    }

    async fn marked(&self, volume: &str) -> Result<bool, StoreError> {
        let files = VolumeFiles::new(volume);
        Ok(self.exists(&files.creating).await? || self.exists(&files.removing).await?)
    }

    async fn begin_remove(&self, volume: &str) -> Result<(), StoreError> {
        // The file API cannot rename: the marker first, then the sidecar
        // goes. A crash in between leaves both, which the next start reads
        // as a remove that stopped before it deleted anything.
        let files = VolumeFiles::new(volume);
        self.write(&files.removing, b"").await?;
        self.delete(&files.meta).await
    }

    async fn clear_markers(&self, volume: &str) -> Result<(), StoreError> {
        let files = VolumeFiles::new(volume);
        self.delete(&files.creating).await?;
        self.delete(&files.removing).await
    }

    async fn list(&self) -> Result<Vec<Entry>, StoreError> {
        match self.client.list_datastore_folder(&self.dc, &self.path("")?).await {
            Ok(files) => Ok(files
                .into_iter()
                .map(|f| Entry {
                    name: f.name,
                    kind: Some(if f.is_folder {
                        FileKind::Directory
                    } else {
                        FileKind::Regular
                    }),
                })
                .collect()),
            Err(VsError::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.io("list", "", e)),
        }
    }

    async fn remove_stale_temp_files(&self) -> Result<usize, StoreError> {
        // Sidecars are written in one PUT: there are no temp files.
        Ok(0)
    }

    async fn remove_legacy_temps(&self, _volume: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_uuids_in_every_written_form() {
        assert_eq!(
            uuid_hex("6000C29a-bcde-f012-3456-789abcdef012").as_deref(),
            Some("6000c29abcdef0123456789abcdef012")
        );
        assert_eq!(
            uuid_hex("60 00 c2 9a bc de f0 12-34 56 78 9a bc de f0 12").as_deref(),
            Some("6000c29abcdef0123456789abcdef012")
        );
        assert_eq!(uuid_hex("not a uuid"), None);
        assert_eq!(uuid_hex("60 00"), None);
    }
}
