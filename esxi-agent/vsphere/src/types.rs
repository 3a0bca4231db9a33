//! The typed values the client takes and returns.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A managed object reference: its type (`VirtualMachine`, `Datastore`...)
/// and its opaque value (`vm-57`, `datastore-12`, `ha-datacenter`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Moref {
    pub kind: String,
    pub value: String,
}

impl Moref {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Moref {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

impl fmt::Display for Moref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A path on a datastore, `[datastore] folder/file.vmdk`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatastorePath {
    datastore: String,
    path: String,
}

impl DatastorePath {
    /// A datastore name may not be empty or contain `[`, `]`, control
    /// characters or a slash; the path is relative (no leading `/`), has no
    /// empty, `.` or `..` component, and no control characters. An empty
    /// path names the datastore's top.
    pub fn new(datastore: impl Into<String>, path: impl Into<String>) -> Result<Self> {
        let datastore = datastore.into();
        let path = path.into();
        let bad_ds = |reason: &str| {
            Error::invalid(
                format!("datastore name {datastore:?}"),
                format!("{reason}; a datastore name is non-empty without '[', ']', '/' or control characters"),
            )
        };
        if datastore.is_empty() {
            return Err(bad_ds("it is empty"));
        }
        if datastore
            .chars()
            .any(|c| c == '[' || c == ']' || c == '/' || c.is_control())
        {
            return Err(bad_ds("it has a forbidden character"));
        }
        if datastore.len() > 255 {
            return Err(bad_ds("it is longer than 255 bytes"));
        }
        let bad_path = |reason: &str| {
            Error::invalid(
                format!("datastore path {path:?}"),
                format!(
                    "{reason}; a path on a datastore is relative, made of '/'-separated names \
                     that are not empty, '.' or '..', without control characters"
                ),
            )
        };
        if path.chars().any(char::is_control) {
            return Err(bad_path("it has a control character"));
        }
        if path.len() > 4096 {
            return Err(bad_path("it is longer than 4096 bytes"));
        }
        if !path.is_empty() {
            if path.starts_with('/') {
                return Err(bad_path("it is absolute"));
            }
            if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return Err(bad_path("it has an empty, '.' or '..' component"));
            }
        }
        Ok(DatastorePath { datastore, path })
    }

    pub fn datastore(&self) -> &str {
        &self.datastore
    }

    /// The path relative to the datastore's top (`dockvols/_DEFAULT/v.vmdk`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A path below this one.
    pub fn join(&self, name: &str) -> Result<Self> {
        let path = if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.path)
        };
        DatastorePath::new(self.datastore.clone(), path)
    }
}

impl fmt::Display for DatastorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "[{}]", self.datastore)
        } else {
            write!(f, "[{}] {}", self.datastore, self.path)
        }
    }
}

impl FromStr for DatastorePath {
    type Err = Error;

    /// Parses `[ds] path` (as vSphere writes backing file names).
    fn from_str(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix('[')
            .ok_or_else(|| Error::invalid(format!("datastore path {s:?}"), "expected \"[datastore] path\""))?;
        let (ds, path) = rest
            .split_once(']')
            .ok_or_else(|| Error::invalid(format!("datastore path {s:?}"), "expected \"[datastore] path\""))?;
        let path = match path.strip_prefix(' ') {
            Some(p) => p,
            None if path.is_empty() => path,
            None => {
                return Err(Error::invalid(
                    format!("datastore path {s:?}"),
                    "expected \"[datastore] path\" (a space after ']')",
                ))
            }
        };
        DatastorePath::new(ds, path)
    }
}

/// A VM's BIOS UUID (`config.uuid`, what Linux shows in
/// `/sys/class/dmi/id/product_uuid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BiosUuid([u8; 16]);

impl BiosUuid {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        BiosUuid(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The same UUID with its first three fields byte-swapped: how Linux
    /// shows `product_uuid` on older virtual hardware (SMBIOS before 2.6
    /// stores them little-endian), and how the vSphere CSI driver retries.
    pub fn swapped(&self) -> Self {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        BiosUuid(b)
    }
}

impl fmt::Display for BiosUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for BiosUuid {
    type Err = Error;

    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, any case.
    fn from_str(s: &str) -> Result<Self> {
        let invalid = || {
            Error::invalid(
                format!("BIOS UUID {s:?}"),
                "expected 32 hex digits as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
            )
        };
        let s = s.trim();
        let groups: Vec<&str> = s.split('-').collect();
        if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
            return Err(invalid());
        }
        let hex: String = groups.concat();
        if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(invalid)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
        }
        Ok(BiosUuid(out))
    }
}

/// Which kind of server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiType {
    /// vCenter (`VirtualCenter`).
    VirtualCenter,
    /// A standalone ESXi host (`HostAgent`).
    HostAgent,
    Other(String),
}

/// The server's `about` (ServiceContent.about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct About {
    pub name: String,
    pub full_name: String,
    pub api_type: ApiType,
    pub version: String,
    pub build: String,
    pub api_version: String,
    pub instance_uuid: Option<String>,
}

/// A datacenter and its inventory path (what the datastore file API calls
/// `dcPath`: its name, behind any folders).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datacenter {
    pub moref: Moref,
    pub name: String,
    pub path: String,
}

/// A datastore as `summary` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    pub moref: Moref,
    pub name: String,
    /// `ds:///vmfs/volumes/...` on ESXi; a local path on the simulator.
    pub url: String,
    pub capacity: u64,
    pub free_space: u64,
    /// `summary.type`: `VMFS`, `NFS`, `NFS41`, `vsan`, `VVOL`, `PMEM`...
    pub kind: String,
    pub accessible: bool,
}

impl Datastore {
    pub fn is_vsan(&self) -> bool {
        self.kind.eq_ignore_ascii_case("vsan")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    PoweredOn,
    PoweredOff,
    Suspended,
}

/// The SCSI controller models vSphere offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScsiControllerKind {
    ParaVirtual,
    LsiLogic,
    LsiLogicSas,
    BusLogic,
    Other(String),
}

impl ScsiControllerKind {
    pub(crate) fn from_type(ty: &str) -> Option<Self> {
        Some(match ty {
            "ParaVirtualSCSIController" => ScsiControllerKind::ParaVirtual,
            "VirtualLsiLogicController" => ScsiControllerKind::LsiLogic,
            "VirtualLsiLogicSASController" => ScsiControllerKind::LsiLogicSas,
            "VirtualBusLogicController" => ScsiControllerKind::BusLogic,
            other if other.ends_with("SCSIController") => ScsiControllerKind::Other(other.to_owned()),
            _ => return None,
        })
    }
}

/// A SCSI controller in a VM's `config.hardware.device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiController {
    pub key: i32,
    pub bus_number: i32,
    pub kind: ScsiControllerKind,
    /// `slotInfo.pciSlotNumber` when the server reports it (controllers the
    /// simulator adds have none).
    pub pci_slot_number: Option<i32>,
    /// The unit the controller itself occupies (7).
    pub scsi_ctlr_unit_number: Option<i32>,
    /// The keys of the devices on this controller.
    pub devices: Vec<i32>,
}

/// How a disk is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskMode {
    Persistent,
    IndependentPersistent,
    IndependentNonpersistent,
    Nonpersistent,
    Undoable,
    Append,
    Other(String),
}

impl DiskMode {
    pub fn as_str(&self) -> &str {
        match self {
            DiskMode::Persistent => "persistent",
            DiskMode::IndependentPersistent => "independent_persistent",
            DiskMode::IndependentNonpersistent => "independent_nonpersistent",
            DiskMode::Nonpersistent => "nonpersistent",
            DiskMode::Undoable => "undoable",
            DiskMode::Append => "append",
            DiskMode::Other(s) => s,
        }
    }

    pub(crate) fn parse(s: &str) -> Self {
        match s {
            "persistent" => DiskMode::Persistent,
            "independent_persistent" => DiskMode::IndependentPersistent,
            "independent_nonpersistent" => DiskMode::IndependentNonpersistent,
            "nonpersistent" => DiskMode::Nonpersistent,
            "undoable" => DiskMode::Undoable,
            "append" => DiskMode::Append,
            other => DiskMode::Other(other.to_owned()),
        }
    }
}

/// A virtual disk in a VM's `config.hardware.device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualDisk {
    pub key: i32,
    /// `deviceInfo.label` and `deviceInfo.summary` as the server wrote them
    /// (an edit sends them back unchanged).
    pub label: Option<String>,
    pub summary: Option<String>,
    pub controller_key: Option<i32>,
    pub unit_number: Option<i32>,
    /// The backing's `fileName` (`[ds] dockvols/_DEFAULT/v.vmdk`), as the
    /// server wrote it.
    pub file_name: Option<String>,
    /// The backing's type (`VirtualDiskFlatVer2BackingInfo`, `...RawDiskMappingVer1BackingInfo`...).
    pub backing_type: Option<String>,
    pub disk_mode: Option<DiskMode>,
    /// The backing's `uuid` (ESXi: `6000C29...`; the simulator sets none).
    pub uuid: Option<String>,
    pub capacity_kb: Option<i64>,
}

/// Any other device, with the controller and unit it occupies (a CD-ROM
/// can sit on a SCSI controller, and then its unit is taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherDevice {
    pub key: i32,
    /// Its type (`VirtualCdrom`, `VirtualVmxnet3`...).
    pub type_name: String,
    pub controller_key: Option<i32>,
    pub unit_number: Option<i32>,
}

/// What the client reads of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub moref: Moref,
    pub name: String,
    pub bios_uuid: Option<String>,
    pub power_state: PowerState,
    pub controllers: Vec<ScsiController>,
    pub disks: Vec<VirtualDisk>,
    /// Every device that is neither a SCSI controller nor a disk.
    pub other_devices: Vec<OtherDevice>,
    /// The datastores the VM's files are on (`datastore`).
    pub datastores: Vec<Moref>,
    /// `config.extraConfig` keys and string values.
    pub extra_config: Vec<(String, String)>,
}

/// `FileBackedVirtualDiskSpec.diskType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Thin,
    /// Zeroed thick (lazy).
    Preallocated,
    EagerZeroedThick,
}

impl DiskType {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Thin => "thin",
            DiskType::Preallocated => "preallocated",
            DiskType::EagerZeroedThick => "eagerZeroedThick",
        }
    }
}

/// `VirtualDiskSpec.adapterType`. The adapter named here only goes into the
/// descriptor; the disk can be attached to any controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    LsiLogic,
    BusLogic,
    Ide,
}

impl AdapterType {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterType::LsiLogic => "lsiLogic",
            AdapterType::BusLogic => "busLogic",
            AdapterType::Ide => "ide",
        }
    }
}

/// What `CreateVirtualDisk_Task` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub disk_type: DiskType,
    pub adapter_type: AdapterType,
    pub capacity_kb: u64,
    /// An SPBM profile (vCenter only).
    pub profile: Option<ProfileId>,
}

/// One change of a `ReconfigVM_Task`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    /// Adds a ParaVirtual SCSI controller (`sharedBus` noSharing) with a
    /// negative temporary key that disks in the same reconfiguration may use
    /// as their `controller_key`.
    AddPvscsiController { temp_key: i32, bus_number: i32 },
    /// Attaches an existing disk file (no `fileOperation`: nothing is created).
    AttachDisk {
        temp_key: i32,
        controller_key: i32,
        unit_number: i32,
        file: DatastorePath,
        disk_mode: DiskMode,
        /// The SPBM profile the disk gets (`VirtualDeviceConfigSpec.profile`,
        /// vCenter only); `None` leaves the disk's own.
        profile: Option<ProfileId>,
    },
    /// Gives a disk of the VM an SPBM profile (`operation` edit with a
    /// `profile`; vCenter only). The disk stays where it is.
    SetDiskProfile { disk: VirtualDisk, profile: ProfileId },
    /// Removes a disk from the VM (no `fileOperation`: the file stays).
    RemoveDisk(VirtualDisk),
}

/// A file or folder directly in a datastore folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderEntry {
    /// Its name in the folder.
    pub name: String,
    /// Size in bytes (0 for a folder).
    pub size: u64,
    /// Whether it is a folder.
    pub is_folder: bool,
}

/// An SPBM profile id (`uniqueId`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProfileId(pub String);

impl fmt::Display for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An SPBM storage profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub id: ProfileId,
    pub name: String,
    pub description: Option<String>,
    /// Every capability of every sub-profile, in document order. Empty for
    /// a profile whose constraints are not capability sub-profiles.
    pub rules: Vec<ProfileRule>,
}

/// One capability of a profile as the server holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRule {
    /// `VSAN`, `vSANDirect`, `com.vmware.storage.tag`...
    pub namespace: String,
    /// `stripeWidth`...
    pub capability: String,
    /// The value of its (first) property, when it is one of the scalar
    /// types below; `None` for anything else (ranges, lists...).
    pub value: Option<RuleValue>,
}

/// A typed capability value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleValue {
    /// `xsd:int`.
    Int(i64),
    /// `xsd:long`.
    Long(i64),
    Bool(bool),
    String(String),
}

/// One rule of a VSAN policy: a capability id (`stripeWidth`,
/// `hostFailuresToTolerate`, `forceProvisioning`, `proportionalCapacity`,
/// `cacheReservation`...) and its value, in namespace `VSAN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsanRule {
    pub capability: String,
    pub value: RuleValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths_parse_display_and_refuse_escapes() {
        let p: DatastorePath = "[LocalDS_0] dockvols/_DEFAULT/v.vmdk".parse().unwrap();
        assert_eq!(p.datastore(), "LocalDS_0");
        assert_eq!(p.path(), "dockvols/_DEFAULT/v.vmdk");
        assert_eq!(p.to_string(), "[LocalDS_0] dockvols/_DEFAULT/v.vmdk");
        let top: DatastorePath = "[vsan ds]".parse().unwrap();
        assert_eq!(top.to_string(), "[vsan ds]");
        assert_eq!(top.join("dockvols").unwrap().to_string(), "[vsan ds] dockvols");
        for bad in [
            "LocalDS_0 x",
            "[LocalDS_0 x",
            "[] x",
            "[a]b] x",
            "[ds] /etc/passwd",
            "[ds] a/../b",
            "[ds] a//b",
            "[ds] a/./b",
            "[ds] a\nb",
            "[d/s] x",
        ] {
            assert!(bad.parse::<DatastorePath>().is_err(), "{bad}");
        }
        assert!(p.join("..").is_err());
    }

    #[test]
    fn bios_uuids_parse_and_swap_the_first_three_fields() {
        let u: BiosUuid = "265104DE-1472-547C-B873-6DC7883FB6CB".parse().unwrap();
        assert_eq!(u.to_string(), "265104de-1472-547c-b873-6dc7883fb6cb");
        assert_eq!(u.swapped().to_string(), "de045126-7214-7c54-b873-6dc7883fb6cb");
        assert_eq!(u.swapped().swapped(), u);
        for bad in [
            "",
            "265104de1472547cb8736dc7883fb6cb",
            "265104de-1472-547c-b873-6dc7883fb6c",
            "265104de-1472-547c-b873-6dc7883fb6cbx",
            "g65104de-1472-547c-b873-6dc7883fb6cb",
            "+65104de-1472-547c-b873-6dc7883fb6cb",
        ] {
            assert!(bad.parse::<BiosUuid>().is_err(), "{bad}");
        }
    }
}
