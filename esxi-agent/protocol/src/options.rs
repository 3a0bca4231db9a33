//! The `docker volume create -o key=value` options.
//!
//! Keys and error texts follow the original vDVS (`validate_opts` in
//! `vmdk_ops.py`), so scripts and muscle memory keep working. Keys are
//! case-sensitive; unknown keys are refused with the list of valid ones.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::size::{parse_size_mb, MAX_SIZE_MB};

/// Option key: capacity, `<int>mb|gb|tb`.
pub const SIZE: &str = "size";
/// Option key: name of a VSAN policy created with `vmdk-agent policy create`.
pub const VSAN_POLICY_NAME: &str = "vsan-policy-name";
/// Option key: `thin`, `zeroedthick` or `eagerzeroedthick`.
pub const DISKFORMAT: &str = "diskformat";
/// Option key: `independent_persistent` or `persistent`.
pub const ATTACH_AS: &str = "attach-as";
/// Option key: `read-write` or `read-only`.
pub const ACCESS: &str = "access";
/// Option key: `ext4` or `xfs`.
pub const FSTYPE: &str = "fstype";
/// Option key: `vol[@ds]` of a detached volume to copy.
pub const CLONE_FROM: &str = "clone-from";

/// Default size when `size` is not given.
pub const DEFAULT_SIZE_MB: u64 = 100;
/// Smallest volume `mkfs.xfs` accepts.
pub const MIN_XFS_SIZE_MB: u64 = 300;

/// Every valid key with the default shown in error messages, in the
/// original's order.
pub const VALID_OPTIONS: &[(&str, &str)] = &[
    (SIZE, "100mb"),
    (VSAN_POLICY_NAME, "[VSAN default]"),
    (DISKFORMAT, "thin"),
    (ATTACH_AS, "independent_persistent"),
    (ACCESS, "read-write"),
    (FSTYPE, "ext4"),
    (CLONE_FROM, "None"),
];

/// Why a set of options was refused. The text is what Docker users see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// One or more keys are not options.
    #[error("Invalid options: {} \nValid options and defaults: {}", py_list(.keys), valid_options_list())]
    UnknownKeys {
        /// The unknown keys, sorted.
        keys: Vec<String>,
    },
    /// `size` is not `<int>mb|gb|tb`.
    #[error("Invalid format for size {value:?}. \nValid sizes must be of form X[mMgGtT]b where X is an integer. Default = 100mb")]
    BadSize {
        /// The value given.
        value: String,
    },
    /// `size` is zero or larger than the largest VMDK.
    #[error("Invalid volume size specified: {value:?}; sizes go from 1mb to 62tb")]
    SizeOutOfRange {
        /// The value given.
        value: String,
    },
    /// `diskformat` has an unknown value.
    #[error("Disk Allocation Format '{value}' is not supported. Valid options are: ['zeroedthick', 'thin', 'eagerzeroedthick'].")]
    BadDiskFormat {
        /// The value given.
        value: String,
    },
    /// `attach-as` has an unknown value.
    #[error("Attach type '{value}' is not supported. Valid options are: ['independent_persistent', 'persistent']")]
    BadAttachAs {
        /// The value given.
        value: String,
    },
    /// `access` has an unknown value.
    #[error("Access type '{value}' is not supported. Valid options are: ['read-write', 'read-only']")]
    BadAccess {
        /// The value given.
        value: String,
    },
    /// `fstype` has an unsupported value.
    #[error("Filesystem type '{value}' is not supported. Valid options are: ['ext4', 'xfs']")]
    BadFsType {
        /// The value given.
        value: String,
    },
    /// `vsan-policy-name` or `clone-from` is empty.
    #[error("Option '{key}' needs a value")]
    Empty {
        /// The key with the empty value.
        key: &'static str,
    },
    /// `size` was given together with `clone-from`.
    #[error("Cannot define the size for a clone")]
    SizeWithClone,
    /// `fstype` was given together with `clone-from`.
    #[error("Cannot define the filesystem type for a clone")]
    FsTypeWithClone,
    /// An xfs volume smaller than `mkfs.xfs` accepts.
    #[error("Volume size {size_mb}mb is too small for xfs; xfs volumes need at least {MIN_XFS_SIZE_MB}mb")]
    TooSmallForXfs {
        /// The requested size in MB.
        size_mb: u64,
    },
}

fn py_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|k| format!("'{k}'")).collect();
    format!("[{}]", quoted.join(", "))
}

fn valid_options_list() -> String {
    let pairs: Vec<String> = VALID_OPTIONS.iter().map(|(k, d)| format!("('{k}', '{d}')")).collect();
    format!("[{}]", pairs.join(", "))
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $err:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }
        impl $name {
            /// The option value as users write it.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $name {
            type Err = OptionError;
            fn from_str(s: &str) -> Result<Self, OptionError> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(OptionError::$err { value: other.to_owned() }),
                }
            }
        }
    };
}

string_enum!(
    /// How the extent is allocated.
    DiskFormat, BadDiskFormat {
        /// Sparse extent, allocated on write.
        Thin = "thin",
        /// Allocated at create, zeroed on first write.
        ZeroedThick = "zeroedthick",
        /// Allocated and zero-written at create.
        EagerZeroedThick = "eagerzeroedthick",
    }
);

string_enum!(
    /// How the disk is attached to the VM (its ESXi disk mode).
    AttachAs, BadAttachAs {
        /// Left out of VM snapshots (the default).
        IndependentPersistent = "independent_persistent",
        /// Included in VM snapshots.
        Persistent = "persistent",
    }
);

string_enum!(
    /// Whether containers may write the volume.
    AccessMode, BadAccess {
        /// Mounted read-write.
        ReadWrite = "read-write",
        /// Mounted read-only.
        ReadOnly = "read-only",
    }
);

string_enum!(
    /// Filesystem made on first use.
    FsType, BadFsType {
        /// ext4 (the default).
        Ext4 = "ext4",
        /// xfs.
        Xfs = "xfs",
    }
);

/// Deserializes a JSON object of string options into a map, refusing a
/// key given twice. Plain maps keep the last value silently, so
/// `{"size":"1gb","size":"1tb"}` would create a 1 TB volume from a request
/// that also said 1 GB. Use with `#[serde(deserialize_with = ...)]`.
pub fn unique_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(UniqueMap)
}

/// [`unique_map`] for a field where `null` means no options (Docker sends
/// `"Opts": null`).
pub fn unique_map_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_option(OrNull)
}

struct UniqueMap;

impl<'de> Visitor<'de> for UniqueMap {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of option names to string values, each name once")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = access.next_entry::<String, String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "option {k:?} is given more than once; give each option once"
                )));
            }
            out.insert(k, v);
        }
        Ok(out)
    }
}

struct OrNull;

impl<'de> Visitor<'de> for OrNull {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or an object of option names to string values, each name once")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        unique_map(d).map(Some)
    }
}

/// Validated create options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Capacity in MiB; `None` for a clone (inherited).
    pub size_mb: Option<u64>,
    /// Extent allocation.
    pub disk_format: DiskFormat,
    /// VSAN policy name, if any.
    pub vsan_policy: Option<String>,
    /// Filesystem; `None` for a clone (inherited).
    pub fstype: Option<FsType>,
    /// Access mode.
    pub access: AccessMode,
    /// Disk mode at attach.
    pub attach_as: AttachAs,
    /// Source volume of a clone.
    pub clone_from: Option<String>,
}

impl VolumeOptions {
    /// Validates raw `-o` options. Nothing is defaulted silently except what
    /// the original defaulted: size 100mb, thin, ext4, read-write,
    /// independent_persistent.
    pub fn parse(opts: &BTreeMap<String, String>) -> Result<Self, OptionError> {
        let unknown: Vec<String> = opts
            .keys()
            .filter(|k| !VALID_OPTIONS.iter().any(|(v, _)| v == k))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(OptionError::UnknownKeys { keys: unknown });
        }
        let get = |k: &str| opts.get(k).map(String::as_str);
        let clone_from = match get(CLONE_FROM) {
            Some("") => return Err(OptionError::Empty { key: CLONE_FROM }),
            other => other.map(str::to_owned),
        };
        let size_mb = match get(SIZE) {
            Some(_) if clone_from.is_some() => return Err(OptionError::SizeWithClone),
            Some(v) => {
                let mb = parse_size_mb(v).ok_or_else(|| OptionError::BadSize { value: v.into() })?;
                if mb == 0 || mb > MAX_SIZE_MB {
                    return Err(OptionError::SizeOutOfRange { value: v.into() });
                }
                Some(mb)
            }
            None if clone_from.is_some() => None,
            None => Some(DEFAULT_SIZE_MB),
        };
        let fstype = match get(FSTYPE) {
            Some(_) if clone_from.is_some() => return Err(OptionError::FsTypeWithClone),
            Some(v) => Some(v.parse()?),
            None if clone_from.is_some() => None,
            None => Some(FsType::Ext4),
        };
        if let (Some(FsType::Xfs), Some(mb)) = (fstype, size_mb) {
            if mb < MIN_XFS_SIZE_MB {
                return Err(OptionError::TooSmallForXfs { size_mb: mb });
            }
        }
        let vsan_policy = match get(VSAN_POLICY_NAME) {
            Some("") => return Err(OptionError::Empty { key: VSAN_POLICY_NAME }),
            other => other.map(str::to_owned),
        };
        Ok(Self {
            size_mb,
            disk_format: get(DISKFORMAT).map(str::parse).transpose()?.unwrap_or(DiskFormat::Thin),
            vsan_policy,
            fstype,
            access: get(ACCESS)
                .map(str::parse)
                .transpose()?
                .unwrap_or(AccessMode::ReadWrite),
            attach_as: get(ATTACH_AS)
                .map(str::parse)
                .transpose()?
                .unwrap_or(AttachAs::IndependentPersistent),
            clone_from,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults() {
        let o = VolumeOptions::parse(&BTreeMap::new()).unwrap();
        assert_eq!(o.size_mb, Some(100));
        assert_eq!(o.disk_format, DiskFormat::Thin);
        assert_eq!(o.fstype, Some(FsType::Ext4));
        assert_eq!(o.access, AccessMode::ReadWrite);
        assert_eq!(o.attach_as, AttachAs::IndependentPersistent);
    }

    #[test]
    fn the_originals_valid_options() {
        for pairs in [
            vec![("size", "10gb")],
            vec![("diskformat", "zeroedthick")],
            vec![("diskformat", "eagerzeroedthick")],
            vec![("attach-as", "persistent")],
            vec![("fstype", "xfs"), ("size", "1gb")],
            vec![("access", "read-only")],
            vec![("clone-from", "src"), ("access", "read-only")],
        ] {
            VolumeOptions::parse(&opts(&pairs)).unwrap();
        }
    }

    #[test]
    fn a_key_given_twice_is_refused_by_name() {
        #[derive(Debug, Deserialize)]
        struct Req {
            #[serde(default, deserialize_with = "unique_map")]
            opts: BTreeMap<String, String>,
            #[serde(default, deserialize_with = "unique_map_or_null")]
            maybe: Option<BTreeMap<String, String>>,
        }
        let e = serde_json::from_str::<Req>(r#"{"opts":{"size":"1gb","fstype":"xfs","size":"1tb"}}"#).unwrap_err();
        assert!(
            e.to_string().contains(r#"option "size" is given more than once"#),
            "{e}"
        );
        let e = serde_json::from_str::<Req>(r#"{"maybe":{"access":"read-only","access":"read-write"}}"#).unwrap_err();
        assert!(
            e.to_string().contains(r#"option "access" is given more than once"#),
            "{e}"
        );
        let r = serde_json::from_str::<Req>(r#"{"opts":{"size":"1gb"},"maybe":null}"#).unwrap();
        assert_eq!(r.opts, opts(&[("size", "1gb")]));
        assert_eq!(r.maybe, None);
        let r = serde_json::from_str::<Req>(r#"{"maybe":{"a":"b"}}"#).unwrap();
        assert_eq!(r.maybe, Some(opts(&[("a", "b")])));
        assert!(r.opts.is_empty());
        assert!(serde_json::from_str::<Req>(r#"{"opts":{"size":5}}"#).is_err());
    }

    #[test]
    fn the_originals_invalid_options() {
        let cases = [
            (
                vec![("diskformat", "zeroedthickk")],
                "Disk Allocation Format 'zeroedthickk'",
            ),
            (
                vec![("diskformat", "zeroedthick,thin")],
                "Valid options are: ['zeroedthick', 'thin', 'eagerzeroedthick']",
            ),
            (vec![("size", "100mbb")], "Invalid format for size"),
            (vec![("size", "100gbEE")], "X[mMgGtT]b"),
            (
                vec![("sizes", "100mb")],
                "Invalid options: ['sizes'] \nValid options and defaults: [('size', '100mb')",
            ),
            (
                vec![("fstype", "xfs_ext")],
                "Filesystem type 'xfs_ext' is not supported",
            ),
            (vec![("access", "read-write-both")], "Access type 'read-write-both'"),
            (vec![("access", "write-only")], "['read-write', 'read-only']"),
            (vec![("attach-as", "x")], "Attach type 'x'"),
            (vec![("size", "0mb")], "Invalid volume size"),
            (vec![("size", "63tb")], "Invalid volume size"),
            (
                vec![("clone-from", "a"), ("size", "1gb")],
                "Cannot define the size for a clone",
            ),
            (
                vec![("clone-from", "a"), ("fstype", "ext4")],
                "Cannot define the filesystem type for a clone",
            ),
            (vec![("fstype", "xfs")], "too small for xfs"),
            (vec![("vsan-policy-name", "")], "needs a value"),
        ];
        for (pairs, want) in cases {
            let err = VolumeOptions::parse(&opts(&pairs)).expect_err(want).to_string();
            assert!(err.contains(want), "{pairs:?}: {err:?} lacks {want:?}");
        }
    }
}
