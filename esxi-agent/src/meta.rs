//! Per-volume metadata: the `<vol>.vmfd` sidecar next to each disk.
//!
//! The sidecar is versioned JSON written atomically (see
//! [`crate::fsutil::atomic_write`]). Key names follow the original's DiskLib
//! KV (`status`, `volOpts`, `created`, `created-by`, `attachedVMUuid`, ...)
//! so the admin tools read familiar fields. The sidecar is written last when
//! a volume is created and removed first when it is deleted: a volume exists
//! exactly when its sidecar does.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vmdk_protocol::{AttachStatus, FormatRecord};

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
}

/// Why a sidecar could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Reading or writing the file failed.
    #[error("cannot access metadata {path}")]
    Io {
        /// The sidecar path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not valid sidecar JSON.
    #[error("corrupt metadata {path}")]
    Corrupt {
        /// The sidecar path.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file has a version this agent does not know.
    #[error("metadata {path} has version {version}; this agent reads version {META_VERSION}")]
    Version {
        /// The sidecar path.
        path: String,
        /// The version found.
        version: u32,
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

    /// Reads a sidecar; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, MetaError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(MetaError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        match Self::decode(&bytes) {
            Ok(m) => Ok(Some(m)),
            Err(MetaDecodeError::Version(version)) => Err(MetaError::Version {
                path: path.display().to_string(),
                version,
            }),
            Err(MetaDecodeError::Json(source)) => Err(MetaError::Corrupt {
                path: path.display().to_string(),
                source,
            }),
            Err(MetaDecodeError::TooLarge) => Err(MetaError::Io {
                path: path.display().to_string(),
                source: io::Error::other("larger than 64 KiB"),
            }),
        }
    }

    /// Writes the sidecar atomically.
    pub fn store(&self, path: &Path) -> Result<(), MetaError> {
        crate::fsutil::atomic_write(path, &self.encode()).map_err(|source| MetaError::Io {
            path: path.display().to_string(),
            source,
        })
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
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.vmfd");
        assert!(VolumeMeta::load(&p).unwrap().is_none());
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
        };
        m.store(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.contains("\"volOpts\"") && text.contains("\"created-by\""),
            "{text}"
        );
        assert_eq!(VolumeMeta::load(&p).unwrap().unwrap(), m);
        std::fs::write(&p, text.replace("\"version\": 1", "\"version\": 9")).unwrap();
        assert!(matches!(
            VolumeMeta::load(&p),
            Err(MetaError::Version { version: 9, .. })
        ));
        std::fs::write(&p, "{garbage").unwrap();
        assert!(matches!(VolumeMeta::load(&p), Err(MetaError::Corrupt { .. })));
    }
}
