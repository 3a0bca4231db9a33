//! Agent HTTP API v1: paths, headers and bodies.
//!
//! See `docs/agent-api.md` for the full contract of each route.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::options::{AccessMode, AttachAs, DiskFormat};

/// Version of this API; every path starts with `/v1`.
pub const API_VERSION: &str = "v1";
/// Header in which the caller names its VM.
pub const VM_ID_HEADER: &str = "VM-Id";
/// `GET`: agent version.
pub const PATH_VERSION: &str = "/v1/version";
/// Default socket of `vmdk-plugin serve` (Docker's plugin directory; the
/// file name makes the driver name `vmdk`). Its `GET /v1/version` answers
/// for the embedded agent.
pub const DEFAULT_PLUGIN_SOCKET: &str = "/run/docker/plugins/vmdk.sock";
/// `GET` lists, `POST` creates.
pub const PATH_VOLUMES: &str = "/v1/volumes";
/// `GET` [`PATH_VOLUMES`] with this query lists only the volumes attached to
/// the calling VM (`VM-Id`), by the backend's live view and their records:
/// what a restarted guest checks for stray attachments. An agent that
/// predates it ignores the query and lists every volume, so a client
/// filters the answer as well.
pub const QUERY_ATTACHED_HERE: &str = "attached=self";

/// Path of one volume (the name percent-encoded).
pub fn volume_path(name: &str) -> String {
    format!("{PATH_VOLUMES}/{}", percent_encode(name))
}

/// Path of an action (`attach`, `detach`) on one volume.
pub fn volume_action_path(name: &str, action: &str) -> String {
    format!("{}/{action}", volume_path(name))
}

/// Percent-encodes everything but unreserved characters (RFC 3986) and `@`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /v1/version` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Agent release, e.g. `0.1.0`.
    pub version: String,
    /// API version, `v1`.
    pub api: String,
    /// Disk backend, e.g. `local`.
    pub backend: String,
    /// Configured datastores; the first is the default for short names.
    pub datastores: Vec<String>,
    /// The identity of each datastore's directory on the agent's host
    /// (`<device>:<inode>`, in the order of `datastores`), so that the
    /// admin CLI on the same host can tell whether this agent serves the
    /// datastores it is configured with. Empty for datastores the agent
    /// does not reach as directories (`vsphere`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datastore_ids: Vec<String>,
    /// The datastore the calling VM's short volume names go to (the one
    /// holding the VM, for `vsphere`), when the caller named a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_datastore: Option<String>,
    /// The program this agent runs inside when it is embedded
    /// (`vmdk-plugin`, answering on the plugin's socket); absent for
    /// `vmdk-agent serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded_in: Option<String>,
}

/// `POST /v1/volumes` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CreateRequest {
    /// `vol` or `vol@datastore`.
    pub name: String,
    /// The `-o` options as Docker passed them; a key given twice is
    /// refused (see [`crate::options::unique_map`]).
    #[serde(default, deserialize_with = "crate::options::unique_map")]
    pub opts: BTreeMap<String, String>,
}

/// Whether a volume is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachStatus {
    /// Not attached to any VM.
    Detached,
    /// Attached to the VM in [`VolumeInfo::attached_to`].
    Attached,
}

/// Everything the agent knows about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Canonical `vol@datastore`.
    pub name: String,
    /// The volume part of the name.
    pub volume: String,
    /// Datastore holding the disk.
    pub datastore: String,
    /// Vmgroup folder under `dockvols/`.
    pub vmgroup: String,
    /// Virtual size in bytes.
    pub capacity_bytes: u64,
    /// Bytes actually allocated by the extent.
    pub allocated_bytes: u64,
    /// Extent allocation.
    pub disk_format: DiskFormat,
    /// Filesystem made on first use (`ext4`, `xfs`).
    pub fstype: String,
    /// VSAN policy, if one was given.
    pub vsan_policy: Option<String>,
    /// Access mode applied at the next mount.
    pub access: AccessMode,
    /// Disk mode applied at the next attach.
    pub attach_as: AttachAs,
    /// Attach state.
    pub status: AttachStatus,
    /// VM the volume is attached to.
    pub attached_to: Option<String>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// VM that created the volume.
    pub created_by: String,
    /// Source volume, for clones.
    pub clone_from: Option<String>,
    /// Disk UUID in ESXi's `60 00 C2 9...` form.
    pub disk_uuid: String,
    /// The create options as received.
    pub options: BTreeMap<String, String>,
    /// When and with what the guest formatted the disk; `None` until the
    /// first Mount has made (or found) a filesystem on it. A volume
    /// recorded as formatted is never formatted again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatted: Option<FormatRecord>,
    /// Set while the create still runs after it was answered (a long
    /// eagerzeroedthick or clone create), or when it failed after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creating: Option<CreateProgress>,
    /// Whether the storage follows [`VolumeInfo::vsan_policy`] or the
    /// policy is only recorded; absent without a policy (and from agents
    /// that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsan_policy_state: Option<PolicyState>,
}

/// A create that runs on after its answer (see [`VolumeInfo::creating`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateProgress {
    /// The long step: `zeroing` (eagerzeroedthick) or `copying` (clone).
    pub step: String,
    /// How much of it is done, 0-100.
    pub percent: u8,
    /// When the create began, RFC 3339 UTC.
    pub started: String,
    /// Why it failed, when it did: the volume then does not exist, and
    /// removing it clears this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// How a volume's VSAN policy took effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PolicyState {
    /// The disk carries the policy as a vCenter (SPBM) storage profile.
    Applied {
        /// The profile's name.
        profile: String,
        /// The profile's id.
        profile_id: String,
    },
    /// The profile exists; the disk gets it when it is next attached (a
    /// clone, or a `policy update` of a detached volume: vSphere sets a
    /// disk's profile only when creating it or through a VM).
    Pending {
        /// The profile's name.
        profile: String,
        /// The profile's id.
        profile_id: String,
    },
    /// Only recorded in the volume's metadata: the storage does not follow
    /// it (no vCenter, or a backend without storage policies).
    Recorded {
        /// Why it was not applied.
        reason: String,
    },
}

impl PolicyState {
    /// `applied`, `pending`, `recorded`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Applied { .. } => "applied",
            Self::Pending { .. } => "pending",
            Self::Recorded { .. } => "recorded",
        }
    }
}

/// The record that a volume's disk holds a filesystem (see
/// [`VolumeInfo::formatted`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatRecord {
    /// Filesystem type (`ext4`, `xfs`).
    pub fstype: String,
    /// When it was recorded, RFC 3339 UTC.
    pub at: String,
    /// The VM that recorded it.
    pub by: String,
}

/// `POST /v1/volumes/{name}/formatted` request: the guest made (or found)
/// a filesystem of `fstype` on the attached disk.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FormattedRequest {
    /// Filesystem type (`ext4`, `xfs`).
    pub fstype: String,
}

/// `GET /v1/volumes` response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VolumeList {
    /// All volumes on all datastores, sorted by name.
    pub volumes: Vec<VolumeInfo>,
}

/// `POST /v1/volumes/{name}/attach` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachInfo {
    /// The volume after attach.
    pub volume: VolumeInfo,
    /// Block device node, when the backend knows it (`local`: `/dev/loopN`).
    pub device: Option<String>,
    /// Disk UUID, to find the disk in the guest (`wwn-0x6000c29...`).
    pub disk_uuid: String,
    /// Where the guest finds the disk. Absent from agents that predate it
    /// (then `device` is the block device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<DiskLocation>,
    /// The agent bound the disk on this host just now (a `Device`
    /// location), and the file behind it held no data when it was bound
    /// (`SEEK_DATA` found none): every byte of the device reads as zero, so
    /// it carries no signature at any offset. The guest may then skip its
    /// own blank check of a never-formatted disk. Absent (false) from
    /// agents that predate it, for disks attached before, and for disks
    /// with any data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blank: bool,
}

/// Where the guest finds an attached disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskLocation {
    /// A block device node the agent bound on this very host (`local`
    /// backend: a loop device).
    Device {
        /// The node, e.g. `/dev/loop3`.
        path: String,
    },
    /// A disk on a SCSI controller of the calling VM (`vsphere` backend).
    /// The guest finds it by the controller's PCI address and the unit,
    /// confirmed by the disk's WWN when it reports one.
    Scsi {
        /// The controller's SCSI bus number in the VM (0-3).
        controller_bus: u32,
        /// The controller's PCI address in the guest
        /// (`0000:03:00.0`), when the hypervisor says where it sits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pci_address: Option<String>,
        /// The unit (SCSI target) on the controller: 0-15, never 7.
        unit: u32,
        /// The disk's UUID (`6000C29...`), which the disk reports as its
        /// WWN (`naa.6000c29...`) when `disk.EnableUUID` is on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_uuid: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_refuses_an_option_given_twice() {
        let e = serde_json::from_str::<CreateRequest>(r#"{"name":"v","opts":{"size":"1gb","size":"2gb"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains(r#"option "size" is given more than once"#), "{e}");
        let r: CreateRequest = serde_json::from_str(r#"{"name":"v"}"#).unwrap();
        assert!(r.opts.is_empty());
        let r: CreateRequest = serde_json::from_str(r#"{"name":"v","opts":{"size":"1gb"}}"#).unwrap();
        assert_eq!(r.opts["size"], "1gb");
    }
}
