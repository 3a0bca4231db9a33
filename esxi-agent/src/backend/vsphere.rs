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
//! * VSAN policies (vCenter): each vmdk policy becomes an SPBM storage
//!   profile vmdk creates and owns ([`profile_identity`]), given to the disk
//!   when it is created (`FileBackedVirtualDiskSpec.profile`) and whenever it
//!   is attached (`VirtualDeviceConfigSpec.profile`); without vCenter the
//!   policy is only recorded. The policy files themselves live in
//!   `[vsan ds] dockvols/policies` ([`VspherePolicies`]);
//! * a powered-off VM releases its volumes when the records are next used
//!   ([`DiskBackend::release_if_powered_off`]); there is no listener;
//! * locks: within this agent process (one agent serves a datastore until
//!   shared-datastore leases come).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmdk_protocol::{AttachAs, DiskFormat, DiskLocation, PolicyState};
use vmdk_vsphere::{
    AdapterType, BiosUuid, Client, Config, Datacenter, DatastorePath, DeviceChange, DiskMode, DiskSpec, DiskType,
    Error as VsError, Moref, Password, PowerState, Profile, ProfileId, RuleValue, ScsiControllerKind, TlsTrust, VmInfo,
    VsanRule,
};

use super::slots::{self, Controller, ControllerKind, Slot};
use super::{Attachment, BackendError, DiskBackend, DiskInfo, DiskRef, PolicySpec, PowerRelease};
use crate::config::{DatastoreConfig, VsphereConfig};
use crate::datastore::{Datastore, Marker, VolumeFiles, VolumeFolder, DOCKVOLS};
use crate::lock::VolumeLock;
use crate::meta::{MetaError, VolumeMeta, MAX_META_BYTES};
use crate::policy::{self as policies, PolicyError, PolicyExpr, PolicyFiles, PolicyLock};
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
    /// The policy folder's lock (within this process).
    policy_lock: Arc<tokio::sync::RwLock<()>>,
    /// Serializes finding-or-creating storage profiles, so two creates with
    /// one policy make one profile.
    profile_lock: Arc<tokio::sync::Mutex<()>>,
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
        // The server is down, restarting or unreachable: the call may or may
        // not have been carried out, and a retry finds out.
        VsError::Http { what, message } => BackendError::Fault {
            method: method.to_owned(),
            fault: "Unreachable".into(),
            message: format!("{what}: {message}"),
        },
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

/// Why a policy is only recorded on this server.
fn no_spbm_reason(client: &Client) -> String {
    format!(
        "{} is a standalone ESXi host ({}), not vCenter: storage policies (SPBM profiles) need vCenter, so vmdk recorded the policy and the disk has the datastore's default policy",
        client.url(),
        client.about().full_name
    )
}

/// The SPBM profile vmdk makes for a policy: its name and its description.
///
/// The name is `vmdk:<policy name>:<12 hex digits>`, the digits a SHA-256
/// of the policy's name and canonical expression, so a changed expression
/// gets a new profile and no profile is ever changed. A profile is taken
/// for vmdk's only when its name, its description and its rules are all
/// exactly these; anything else under such a name is somebody else's, and
/// vmdk neither uses nor changes it.
pub fn profile_identity(policy: &str, expr: &PolicyExpr) -> (String, String) {
    let canonical = expr.to_string();
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{policy}\n{canonical}").as_bytes());
    let hex: String = digest.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
    // Long policy names are cut (profile names have a length limit); the
    // digest tells such policies apart.
    let short: String = policy.chars().take(48).collect();
    (
        format!("vmdk:{short}:{hex}"),
        format!("Created by vmdk for its VSAN policy {policy:?} = {canonical}. vmdk never changes it."),
    )
}

/// The PBM rules of a policy expression (namespace `VSAN`): booleans as
/// `xsd:boolean`, `i` as `xsd:int`, `l` as `xsd:long`, strings as strings.
pub fn vsan_rules(expr: &PolicyExpr) -> Vec<VsanRule> {
    use policies::expr::{Accepts, Value, CAPABILITIES};
    expr.rules
        .iter()
        .map(|r| {
            let boolean = CAPABILITIES
                .iter()
                .any(|(n, a)| *n == r.capability && *a == Accepts::Bool);
            VsanRule {
                capability: r.capability.clone(),
                value: match &r.value {
                    Value::Int(v) if boolean => RuleValue::Bool(*v != 0),
                    Value::Int(v) => RuleValue::Int(*v),
                    Value::Long(v) => RuleValue::Long(*v),
                    Value::Str(s) => RuleValue::String(s.clone()),
                },
            }
        })
        .collect()
}

/// Whether `profile` is the one vmdk made for these rules (see
/// [`profile_identity`]).
fn is_our_profile(profile: &Profile, description: &str, rules: &[VsanRule]) -> bool {
    profile.description.as_deref() == Some(description)
        && profile.rules.len() == rules.len()
        && profile.rules.iter().zip(rules).all(|(have, want)| {
            have.namespace == "VSAN" && have.capability == want.capability && have.value.as_ref() == Some(&want.value)
        })
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
            policy_lock: Arc::default(),
            profile_lock: Arc::default(),
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

    /// The SPBM profile vmdk owns for `policy`, created when missing;
    /// `None` without vCenter. Never uses or changes a profile vmdk did not
    /// create.
    async fn profile_for(&self, policy: PolicySpec<'_>) -> Result<Option<Profile>, BackendError> {
        if !self.client.is_vcenter() {
            return Ok(None);
        }
        let expr = PolicyExpr::parse(policy.content).map_err(|e| BackendError::Fault {
            method: "read VSAN policy".into(),
            fault: "InvalidPolicy".into(),
            message: format!("policy {}: {e}", policy.name),
        })?;
        let (name, description) = profile_identity(policy.name, &expr);
        let rules = vsan_rules(&expr);
        let _one_at_a_time = self.profile_lock.lock().await;
        let check = |found: Option<Profile>| -> Result<Option<Profile>, BackendError> {
            match found {
                Some(p) if is_our_profile(&p, &description, &rules) => Ok(Some(p)),
                Some(p) => Err(BackendError::Fault {
                    method: "find the VSAN policy's storage profile".into(),
                    fault: "ProfileNotOurs".into(),
                    message: format!(
                        "vCenter has a storage profile named {name:?} (id {}) that vmdk did not create for VSAN policy {:?}: its description or rules differ. vmdk neither uses nor changes profiles it did not create; rename or delete that profile",
                        p.id, policy.name
                    ),
                }),
                None => Ok(None),
            }
        };
        let by_name = || async {
            self.client
                .pbm_profile_by_name(&name)
                .await
                .map_err(vs_err("PbmQueryProfile"))
        };
        if let Some(p) = check(by_name().await?)? {
            return Ok(Some(p));
        }
        match self.client.pbm_create_vsan_profile(&name, &description, &rules).await {
            Ok(id) => {
                tracing::info!(policy = policy.name, profile = %name, %id, "created a storage profile for the VSAN policy");
                Ok(Some(Profile {
                    id,
                    name,
                    description: Some(description),
                    rules: Vec::new(),
                }))
            }
            // Another agent made it in between.
            Err(e) if e.fault_type().is_some_and(|t| t.contains("DuplicateName")) => {
                check(by_name().await?)?.map(Some).ok_or_else(|| BackendError::Fault {
                    method: "PbmCreate".into(),
                    fault: "PbmDuplicateName".into(),
                    message: format!("vCenter says storage profile {name:?} exists but does not list it"),
                })
            }
            Err(e) => Err(vs_err("PbmCreate")(e)),
        }
    }

    /// `CreateVirtualDisk_Task`, with an SPBM profile when given. Leftovers
    /// of a create of ours that was cut off (only those reach here: the
    /// service refuses files it did not mark) are deleted and the create
    /// made again.
    async fn create_with(
        &self,
        disk: &DiskRef<'_>,
        capacity_bytes: u64,
        format: DiskFormat,
        profile: Option<ProfileId>,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        // The server does the work in one task: its `info.progress`
        // (percent) is the create's progress.
        let report = percent_reporter(progress);
        let path = Self::disk_path(disk)?;
        let spec = DiskSpec {
            disk_type: match format {
                DiskFormat::Thin => DiskType::Thin,
                DiskFormat::ZeroedThick => DiskType::Preallocated,
                DiskFormat::EagerZeroedThick => DiskType::EagerZeroedThick,
            },
            adapter_type: AdapterType::LsiLogic,
            capacity_kb: capacity_bytes.div_ceil(1024),
            profile,
        };
        match self
            .client
            .create_virtual_disk_reporting(&self.dc, &path, &spec, &report)
            .await
        {
            Ok(_) => {}
            Err(e) if fault_is(&e, "FileAlreadyExists") => {
                tracing::info!(disk = %path, "deleting what a cut-off create left, then creating again");
                self.delete_leftovers(disk).await?;
                self.client
                    .create_virtual_disk_reporting(&self.dc, &path, &spec, &report)
                    .await
                    .map_err(vs_err("CreateVirtualDisk_Task"))?;
            }
            Err(e) => return Err(vs_err("CreateVirtualDisk_Task")(e)),
        }
        self.disk_info(disk).await
    }

    /// Deletes the descriptor and extent of a disk one file at a time (a
    /// cut-off create may have left only one of them).
    async fn delete_leftovers(&self, disk: &DiskRef<'_>) -> Result<(), BackendError> {
        let files = disk.files();
        for f in [&files.descriptor, &files.flat] {
            let path = Self::file_path(&disk.datastore.name, disk.vmgroup, f)?;
            match self.client.delete_datastore_file(&self.dc, &path).await {
                Ok(()) | Err(VsError::NotFound { .. }) => {}
                Err(e) if fault_is(&e, "FileNotFound") => {}
                Err(e) => return Err(vs_err("DeleteDatastoreFile_Task")(e)),
            }
        }
        Ok(())
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
        self.create_with(disk, capacity_bytes, format, None, progress).await
    }

    async fn create_disk_with_policy(
        &self,
        disk: &DiskRef<'_>,
        capacity_bytes: u64,
        format: DiskFormat,
        policy: PolicySpec<'_>,
        progress: &Progress,
    ) -> Result<(DiskInfo, Option<PolicyState>), BackendError> {
        match self.profile_for(policy).await? {
            Some(profile) => {
                let info = self
                    .create_with(disk, capacity_bytes, format, Some(profile.id.clone()), progress)
                    .await?;
                Ok((
                    info,
                    Some(PolicyState::Applied {
                        profile: profile.name,
                        profile_id: profile.id.0,
                    }),
                ))
            }
            None => {
                let info = self.create_with(disk, capacity_bytes, format, None, progress).await?;
                Ok((
                    info,
                    Some(PolicyState::Recorded {
                        reason: no_spbm_reason(&self.client),
                    }),
                ))
            }
        }
    }

    async fn clone_disk(
        &self,
        src: &DiskRef<'_>,
        dst: &DiskRef<'_>,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        // The copy task's `info.progress`, as for a create.
        let report = percent_reporter(progress);
        // The copy keeps the source's allocation: CopyVirtualDisk_Task's
        // destination spec is refused by vCenter for plain files.
        let _ = format;
        let (from, to) = (Self::disk_path(src)?, Self::disk_path(dst)?);
        match self
            .client
            .copy_virtual_disk_reporting(&self.dc, &from, &to, false, &report)
            .await
        {
            Ok(()) => {}
            Err(e) if fault_is(&e, "FileAlreadyExists") => {
                // What a cut-off clone of ours left (see create_with).
                self.delete_leftovers(dst).await?;
                self.client
                    .copy_virtual_disk_reporting(&self.dc, &from, &to, false, &report)
                    .await
                    .map_err(vs_err("CopyVirtualDisk_Task"))?;
            }
            Err(e) => return Err(vs_err("CopyVirtualDisk_Task")(e)),
        }
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

    async fn attach(
        &self,
        vm: &str,
        disk: &DiskRef<'_>,
        attach_as: AttachAs,
        policy: Option<PolicySpec<'_>>,
    ) -> Result<Attachment, BackendError> {
        let path = Self::disk_path(disk)?;
        let fallback = self.descriptor(disk).await?.uuid().map(str::to_owned);
        let (moref, info) = self.vm(vm).await?;
        if let Some(location) = Self::location_of(&info, &path, fallback.as_deref()) {
            return Ok(Attachment {
                vm: Some(vm.to_owned()),
                location,
                blank: false,
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
        // The volume's policy comes with the disk (vCenter): this is how a
        // clone, or a volume whose policy changed while it was detached,
        // gets its profile.
        let profile = match policy {
            Some(p) => self.profile_for(p).await?.map(|p| p.id),
            None => None,
        };
        let attach = |controller_key: i32, unit: u32| DeviceChange::AttachDisk {
            temp_key: NEW_DISK_KEY,
            controller_key,
            unit_number: unit as i32,
            file: path.clone(),
            disk_mode: disk_mode.clone(),
            profile: profile.clone(),
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
            blank: false,
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
            blank: false,
        }))
    }

    async fn powered_off(&self, vm: &str) -> Result<Option<bool>, BackendError> {
        match self.vm(vm).await {
            Ok((_, info)) => Ok(Some(info.power_state == PowerState::PoweredOff)),
            Err(BackendError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn release_if_powered_off(&self, vm: &str, disk: &DiskRef<'_>) -> Result<PowerRelease, BackendError> {
        let path = Self::disk_path(disk)?.to_string();
        let (moref, info) = match self.vm(vm).await {
            Ok(v) => v,
            // A VM vSphere does not know is for the live check to judge.
            Err(BackendError::NotFound { .. }) => return Ok(PowerRelease::Unknown),
            Err(e) => return Err(e),
        };
        // Read together with the devices, right before the change. (A VM
        // powered on in the moment between this read and the
        // reconfiguration would lose the disk: the original's listener had
        // the same window; vSphere offers no conditional reconfiguration.)
        if info.power_state != PowerState::PoweredOff {
            return Ok(PowerRelease::Running);
        }
        if let Some(device) = info
            .disks
            .iter()
            .find(|d| d.file_name.as_deref() == Some(path.as_str()))
        {
            self.client
                .reconfigure_vm(&moref, &[DeviceChange::RemoveDisk(device.clone())], &[])
                .await
                .map_err(vs_err("ReconfigVM_Task"))?;
            tracing::info!(vm, vm_name = %info.name, disk = %path, "removed the disk from the powered-off VM's configuration");
        }
        Ok(PowerRelease::Released)
    }

    async fn apply_policy(
        &self,
        disk: &DiskRef<'_>,
        policy: PolicySpec<'_>,
        holder: Option<&str>,
    ) -> Result<Option<PolicyState>, BackendError> {
        // The disk must be there, whatever happens to the policy.
        self.descriptor(disk).await?;
        let Some(profile) = self.profile_for(policy).await? else {
            return Ok(Some(PolicyState::Recorded {
                reason: no_spbm_reason(&self.client),
            }));
        };
        let pending = Some(PolicyState::Pending {
            profile: profile.name.clone(),
            profile_id: profile.id.0.clone(),
        });
        // vSphere changes an existing disk's profile only through a VM that
        // has it: now if one does, else at the disk's next attach.
        let Some(vm) = holder else { return Ok(pending) };
        let (moref, info) = match self.vm(vm).await {
            Ok(v) => v,
            Err(BackendError::NotFound { .. }) => return Ok(pending),
            Err(e) => return Err(e),
        };
        let path = Self::disk_path(disk)?.to_string();
        let Some(device) = info
            .disks
            .iter()
            .find(|d| d.file_name.as_deref() == Some(path.as_str()))
        else {
            return Ok(pending);
        };
        self.client
            .reconfigure_vm(
                &moref,
                &[DeviceChange::SetDiskProfile {
                    disk: device.clone(),
                    profile: profile.id.clone(),
                }],
                &[],
            )
            .await
            .map_err(vs_err("ReconfigVM_Task"))?;
        Ok(Some(PolicyState::Applied {
            profile: profile.name,
            profile_id: profile.id.0,
        }))
    }

    fn policy_files(&self, ds: &Datastore) -> Option<Arc<dyn PolicyFiles>> {
        Some(Arc::new(VspherePolicies {
            client: self.client.clone(),
            dc: self.dc.clone(),
            datastore: ds.name.clone(),
            lock: self.policy_lock.clone(),
        }))
    }

    async fn attached_extents(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError> {
        // Nothing is attached on the agent's own host.
        Ok(Vec::new())
    }

    async fn disks_of_vm(&self, vm: &str) -> Result<Option<Vec<String>>, BackendError> {
        match self.vm(vm).await {
            Ok((_, info)) => Ok(Some(info.disks.into_iter().filter_map(|d| d.file_name).collect())),
            // A VM the server does not know holds nothing.
            Err(BackendError::NotFound { .. }) => Ok(Some(Vec::new())),
            Err(e) => Err(e),
        }
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

    async fn check_vm(&self, vm: &str) -> Result<(), BackendError> {
        self.vm(vm).await.map(|_| ())
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

/// Starts `progress` in percent and returns what the client calls with each
/// `info.progress` of the server's task. A cancel (the volume's remove)
/// cannot stop that task, so its error is not passed on: the remove waits.
fn percent_reporter(progress: &Progress) -> impl Fn(u8) + Send + Sync + '_ {
    progress.start(100);
    move |pct| {
        let _ = progress.set_done(u64::from(pct));
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
            mtime_ns: 0,
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

/// The policy folder `[vsan ds] dockvols/policies` through the datastore
/// file API. Its lock is within this process (the file API has none): run
/// `vmdk-agent policy` commands against the agent that serves the
/// datastore's volumes, not beside it.
#[derive(Debug)]
pub struct VspherePolicies {
    client: Client,
    dc: Datacenter,
    datastore: String,
    lock: Arc<tokio::sync::RwLock<()>>,
}

impl VspherePolicies {
    fn rel(sub: Option<&str>, name: &str) -> String {
        let mut p = format!("{DOCKVOLS}/{}", policies::POLICIES_DIR);
        for part in sub.into_iter().chain((!name.is_empty()).then_some(name)) {
            p.push('/');
            p.push_str(part);
        }
        p
    }

    fn path(&self, sub: Option<&str>, name: &str) -> Result<DatastorePath, PolicyError> {
        DatastorePath::new(&self.datastore, Self::rel(sub, name)).map_err(|e| self.io("name", sub, name, e))
    }

    fn io(&self, op: &'static str, sub: Option<&str>, name: &str, e: VsError) -> PolicyError {
        PolicyError::Io {
            op,
            path: DsPath::new(&self.datastore, &Self::rel(sub, name)).to_string(),
            source: std::io::Error::other(vmdk_common::error_chain(&e)),
        }
    }

    async fn mkdir(&self, sub: Option<&str>) -> Result<(), PolicyError> {
        match self.client.make_directory(&self.dc, &self.path(sub, "")?, true).await {
            Ok(()) => Ok(()),
            Err(e) if fault_is(&e, "FileAlreadyExists") => Ok(()),
            Err(e) => Err(self.io("create folder", sub, "", e)),
        }
    }

    async fn get(&self, sub: Option<&str>, name: &str, limit: u64) -> Result<Option<Vec<u8>>, PolicyError> {
        match self
            .client
            .read_datastore_file(&self.dc, &self.path(sub, name)?, limit)
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(VsError::NotFound { .. }) => Ok(None),
            Err(VsError::TooLarge { .. }) => Err(PolicyError::Store(StoreError::TooLarge {
                file: DsPath::new(&self.datastore, &Self::rel(sub, name)),
                limit,
            })),
            Err(e) => Err(self.io("read", sub, name, e)),
        }
    }

    async fn put(&self, sub: Option<&str>, name: &str, bytes: &[u8]) -> Result<(), PolicyError> {
        self.client
            .write_datastore_file(&self.dc, &self.path(sub, name)?, bytes)
            .await
            .map_err(|e| self.io("write", sub, name, e))
    }

    async fn delete(&self, sub: Option<&str>, name: &str) -> Result<(), PolicyError> {
        match self
            .client
            .delete_datastore_file(&self.dc, &self.path(sub, name)?)
            .await
        {
            Ok(()) | Err(VsError::NotFound { .. }) => Ok(()),
            Err(e) if fault_is(&e, "FileNotFound") => Ok(()),
            Err(e) => Err(self.io("delete", sub, name, e)),
        }
    }
}

#[async_trait::async_trait]
impl PolicyFiles for VspherePolicies {
    fn datastore(&self) -> &str {
        &self.datastore
    }

    async fn lock_shared(&self) -> Result<Option<PolicyLock>, PolicyError> {
        // Nothing to create; a missing folder reads as no policies.
        Ok(Some(PolicyLock::in_process_shared(
            self.lock.clone().read_owned().await,
        )))
    }

    async fn lock_exclusive(&self) -> Result<PolicyLock, PolicyError> {
        let guard = self.lock.clone().write_owned().await;
        self.mkdir(None).await?;
        Ok(PolicyLock::in_process_exclusive(guard))
    }

    async fn read(&self, name: &str) -> Result<Option<String>, PolicyError> {
        match self.get(None, name, policies::MAX_POLICY_BYTES).await? {
            Some(bytes) => policies::decode_policy(bytes, &PolicyFiles::path(self, name)).map(Some),
            None => Ok(None),
        }
    }

    async fn list(&self) -> Result<Vec<(String, String)>, PolicyError> {
        let entries = match self.client.list_datastore_folder(&self.dc, &self.path(None, "")?).await {
            Ok(e) => e,
            Err(VsError::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.io("list", None, "", e)),
        };
        let mut out = Vec::new();
        for e in entries {
            if e.is_folder || policies::validate_name(&e.name).is_err() {
                continue;
            }
            if let Some(content) = self.read(&e.name).await? {
                out.push((e.name, content));
            }
        }
        out.sort();
        Ok(out)
    }

    async fn write(&self, name: &str, content: &str) -> Result<(), PolicyError> {
        self.put(None, name, format!("{content}\n").as_bytes()).await
    }

    async fn remove(&self, name: &str) -> Result<(), PolicyError> {
        self.delete(None, name).await?;
        self.clear_failed_updates(name).await
    }

    async fn failed_updates(&self, name: &str) -> Result<Option<policies::FailedUpdates>, PolicyError> {
        let sub = Some(policies::FAILED_UPDATES_DIR);
        match self.get(sub, name, policies::MAX_FAILED_UPDATES_BYTES).await? {
            Some(bytes) => {
                policies::decode_failed_updates(&bytes, &DsPath::new(&self.datastore, &Self::rel(sub, name))).map(Some)
            }
            None => Ok(None),
        }
    }

    async fn record_failed_updates(&self, name: &str, record: &policies::FailedUpdates) -> Result<(), PolicyError> {
        let sub = Some(policies::FAILED_UPDATES_DIR);
        self.mkdir(sub).await?;
        self.put(sub, name, &policies::encode_failed_updates(record)).await
    }

    async fn clear_failed_updates(&self, name: &str) -> Result<(), PolicyError> {
        self.delete(Some(policies::FAILED_UPDATES_DIR), name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(s: &str) -> PolicyExpr {
        PolicyExpr::parse(s).unwrap()
    }

    #[test]
    fn profile_names_are_ours_stable_and_change_with_the_expression() {
        let (name, description) = profile_identity("SW=2", &expr(r#"(("stripeWidth" i2))"#));
        assert!(
            name.starts_with("vmdk:SW=2:") && name.len() == "vmdk:SW=2:".len() + 12,
            "{name}"
        );
        assert!(
            description.contains("\"SW=2\"") && description.contains("vmdk"),
            "{description}"
        );
        // Spacing does not matter; the expression and the policy's name do.
        assert_eq!(profile_identity("SW=2", &expr(r#"( ("stripeWidth"   i2) )"#)).0, name);
        assert_ne!(profile_identity("SW=2", &expr(r#"(("stripeWidth" i3))"#)).0, name);
        assert_ne!(profile_identity("gold", &expr(r#"(("stripeWidth" i2))"#)).0, name);
        // A long policy name is cut; the digest still tells them apart.
        let long = "p".repeat(100);
        let (a, _) = profile_identity(&long, &expr(r#"(("stripeWidth" i2))"#));
        let (b, _) = profile_identity(&format!("{long}x"), &expr(r#"(("stripeWidth" i2))"#));
        assert!(a.len() < 80 && a != b, "{a} {b}");
    }

    #[test]
    fn vsan_rules_type_booleans_integers_longs_and_strings() {
        let rules = vsan_rules(&expr(
            r#"(("stripeWidth" i2) ("forceProvisioning" i1) ("checksumDisabled" i0) ("iopsLimit" l500) ("replicaPreference" "RAID-1 (Mirroring) - Performance"))"#,
        ));
        let values: Vec<(&str, RuleValue)> = rules.iter().map(|r| (r.capability.as_str(), r.value.clone())).collect();
        assert_eq!(
            values,
            vec![
                ("stripeWidth", RuleValue::Int(2)),
                ("forceProvisioning", RuleValue::Bool(true)),
                ("checksumDisabled", RuleValue::Bool(false)),
                ("iopsLimit", RuleValue::Long(500)),
                (
                    "replicaPreference",
                    RuleValue::String("RAID-1 (Mirroring) - Performance".into())
                ),
            ]
        );
    }

    #[test]
    fn only_a_profile_with_our_description_and_rules_is_ours() {
        let e = expr(r#"(("stripeWidth" i2))"#);
        let (name, description) = profile_identity("SW=2", &e);
        let rules = vsan_rules(&e);
        let rule = |namespace: &str, value: i64| vmdk_vsphere::ProfileRule {
            namespace: namespace.into(),
            capability: "stripeWidth".into(),
            value: Some(RuleValue::Int(value)),
        };
        let profile = |description: Option<&str>, rules: Vec<vmdk_vsphere::ProfileRule>| Profile {
            id: ProfileId("p".into()),
            name: name.clone(),
            description: description.map(str::to_owned),
            rules,
        };
        assert!(is_our_profile(
            &profile(Some(&description), vec![rule("VSAN", 2)]),
            &description,
            &rules
        ));
        for theirs in [
            profile(None, vec![rule("VSAN", 2)]),
            profile(Some("made by someone else"), vec![rule("VSAN", 2)]),
            profile(Some(&description), vec![rule("VSAN", 3)]),
            profile(Some(&description), vec![rule("vSANDirect", 2)]),
            profile(Some(&description), vec![rule("VSAN", 2), rule("VSAN", 2)]),
            profile(Some(&description), vec![]),
        ] {
            assert!(!is_our_profile(&theirs, &description, &rules), "{theirs:?}");
        }
    }

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
