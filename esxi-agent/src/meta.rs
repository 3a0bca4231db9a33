//! Per-volume metadata: the `<vol>.vmfd` sidecar next to each disk.
//!
//! The sidecar is versioned JSON written atomically through the datastore
//! door ([`crate::datastore::VolumeFolder::write_meta`]). Key names follow the original's DiskLib
//! KV (`status`, `volOpts`, `created`, `created-by`, `attachedVMUuid`, ...)
//! so the admin tools read familiar fields. The sidecar is written last when
//! a volume is created and renamed to the remove marker first when it is
//! deleted: a volume exists exactly when its sidecar does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vmdk_protocol::{AttachStatus, FormatRecord, PolicyState};

/// Current sidecar format version.
pub const META_VERSION: u32 = 1;

/// The content of a `.vmfd` sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Format version, [`META_VERSION`].
    pub version: u32,
    /// Attach state as last recorded.
    pub status: AttachStatus,
    /// Create options as received, plus `diskformat`, `fstype`, `access` and
    /// `attach-as` with their effective values.
    #[serde(rename = "volOpts")]
    pub vol_opts: BTreeMap<String, String>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// VM that created the volume.
    #[serde(rename = "created-by")]
    pub created_by: String,
    /// VM the volume is attached to.
    #[serde(rename = "attachedVMUuid", default, skip_serializing_if = "Option::is_none")]
    pub attached_vm: Option<String>,
    /// Device the volume is attached as (backend-specific).
    #[serde(rename = "attachedVMDevice", default, skip_serializing_if = "Option::is_none")]
    pub attached_device: Option<String>,
    /// When the current attachment was made, RFC 3339 UTC.
    #[serde(rename = "attachedAt", default, skip_serializing_if = "Option::is_none")]
    pub attached_at: Option<String>,
    /// That the disk holds a filesystem, recorded by the guest after its
    /// first `mkfs` (or when it first found one) and before the first
    /// Mount succeeded. A volume recorded as formatted is never formatted
    /// again. Absent in sidecars written before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatted: Option<FormatRecord>,
    /// How the `vsan-policy-name` in `volOpts` took effect (applied as a
    /// storage profile, pending the next attach, or only recorded). Absent
    /// without a policy, and in sidecars written before this field existed.
    #[serde(rename = "vsanPolicyState", default, skip_serializing_if = "Option::is_none")]
    pub policy_state: Option<PolicyState>,
}

/// Why a sidecar could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Reading or writing the file failed (or it is not a regular file).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The file is not sidecar JSON of this version.
    #[error("unusable metadata {file}")]
    Corrupt {
        /// The sidecar.
        file: crate::store::DsPath,
        /// What is wrong with it.
        #[source]
        source: MetaDecodeError,
    },
}

/// Largest sidecar accepted: a real one is well under 2 KiB; anything
/// bigger is not ours and is not read further.
pub const MAX_META_BYTES: u64 = 64 * 1024;

/// Why sidecar bytes are not a sidecar this agent reads.
#[derive(Debug, thiserror::Error)]
pub enum MetaDecodeError {
    /// More than [`MAX_META_BYTES`].
    #[error("larger than {MAX_META_BYTES} bytes")]
    TooLarge,
    /// Not sidecar JSON.
    #[error("not vmdk metadata JSON")]
    Json(#[source] serde_json::Error),
    /// Another format version.
    #[error("format version {0}; this agent reads version {META_VERSION}")]
    Version(u32),
}

impl VolumeMeta {
    /// Decodes sidecar bytes: a pure function that never panics, whatever
    /// the bytes (a datastore is shared ground).
    pub fn decode(bytes: &[u8]) -> Result<Self, MetaDecodeError> {
        if bytes.len() as u64 > MAX_META_BYTES {
            return Err(MetaDecodeError::TooLarge);
        }
        let meta: VolumeMeta = serde_json::from_slice(bytes).map_err(MetaDecodeError::Json)?;
        if meta.version != META_VERSION {
            return Err(MetaDecodeError::Version(meta.version));
        }
        Ok(meta)
    }

    /// The bytes [`VolumeMeta::decode`] reads back.
    pub fn encode(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("metadata serializes");
        json.push(b'\n');
        json
    }

    /// An option's effective value.
    pub fn opt(&self, key: &str) -> Option<&str> {
        self.vol_opts.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let m = VolumeMeta {
            version: META_VERSION,
            status: AttachStatus::Detached,
            vol_opts: [("size".to_string(), "1gb".to_string())].into(),
            created: "2026-01-01T00:00:00Z".into(),
            created_by: "vm1".into(),
            attached_vm: None,
            attached_device: None,
            attached_at: None,
            formatted: None,
            policy_state: None,
        };
        let bytes = m.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains("\"volOpts\"") && text.contains("\"created-by\""),
            "{text}"
        );
        assert_eq!(VolumeMeta::decode(&bytes).unwrap(), m);
        let v9 = text.replace("\"version\": 1", "\"version\": 9");
        assert!(matches!(
            VolumeMeta::decode(v9.as_bytes()),
            Err(MetaDecodeError::Version(9))
        ));
        assert!(matches!(VolumeMeta::decode(b"{garbage"), Err(MetaDecodeError::Json(_))));
        let huge = vec![b' '; MAX_META_BYTES as usize + 1];
        assert!(matches!(VolumeMeta::decode(&huge), Err(MetaDecodeError::TooLarge)));
    }
}
