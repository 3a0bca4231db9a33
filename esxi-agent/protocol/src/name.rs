//! Volume names: `vol[@datastore]`.
//!
//! The name is split at the **last** `@`, as the original vDVS did, so
//! `abc@@ds` is volume `abc@` on datastore `ds`. The volume part becomes a
//! file name inside `<datastore>/dockvols/<vmgroup>/`, so the rules below are
//! what keeps a name from ever reaching outside that folder or colliding with
//! the other files of a disk (`-flat.vmdk`, snapshot deltas).

use std::fmt;

/// Longest volume part, in characters (the original's `MAX_VOL_NAME_LEN`).
pub const MAX_VOLUME_CHARS: usize = 100;
/// Longest volume part in UTF-8 bytes, so `<vol>-flat.vmdk` fits in `NAME_MAX`.
pub const MAX_VOLUME_BYTES: usize = 240;
/// Longest datastore part, in characters.
pub const MAX_DATASTORE_CHARS: usize = 100;

/// Suffixes reserved for the other files that make up a VMDK on ESXi.
const RESERVED_SUFFIXES: &[&str] = &["-flat", "-delta", "-ctk", "-digest", "-sesparse"];

/// A validated `vol[@datastore]` reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeRef {
    /// The volume part; safe to use as a file name stem.
    pub volume: String,
    /// The datastore part, if the name had one (not yet checked against the
    /// configured datastores).
    pub datastore: Option<String>,
}

/// Why a volume name was refused. The text is what Docker users see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name (or its volume part) is empty.
    #[error("volume name is empty; a name is vol or vol@datastore")]
    Empty,
    /// The volume part is longer than [`MAX_VOLUME_CHARS`] or [`MAX_VOLUME_BYTES`].
    #[error("Volume name is too long (max len is {MAX_VOLUME_CHARS}): {name:?} has {chars} characters ({bytes} bytes; at most {MAX_VOLUME_BYTES} bytes)")]
    TooLong {
        /// The offending volume part.
        name: String,
        /// Its length in characters.
        chars: usize,
        /// Its length in UTF-8 bytes.
        bytes: usize,
    },
    /// The volume part contains a character that is never allowed.
    #[error("Volume name contains illegal characters: {what} in {name:?}; a name may not contain '/', '\\', '\"', NUL or control characters")]
    IllegalCharacter {
        /// The offending volume part.
        name: String,
        /// A description of the character.
        what: String,
    },
    /// The volume part is `.` or `..`.
    #[error("Volume name {name:?} is not allowed: '.' and '..' are reserved")]
    DotName {
        /// The offending volume part.
        name: String,
    },
    /// The volume part ends in `-NNNNNN`, the pattern of ESXi snapshot deltas.
    #[error("Volume names ending with '-NNNNNN' (where N is a digit) are not supported: {name:?}")]
    SnapshotSuffix {
        /// The offending volume part.
        name: String,
    },
    /// The volume part ends in a suffix ESXi uses for a disk's own files.
    #[error("Volume names ending with '{suffix}' are not supported: {name:?} (reserved suffixes: -flat, -delta, -ctk, -digest, -sesparse)")]
    ReservedSuffix {
        /// The offending volume part.
        name: String,
        /// The reserved suffix it ends with.
        suffix: &'static str,
    },
    /// The datastore part is empty, too long or has illegal characters.
    #[error("Invalid datastore name {datastore:?} in {name:?}: {reason}")]
    BadDatastore {
        /// The whole name as given.
        name: String,
        /// The datastore part.
        datastore: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl VolumeRef {
    /// Parses and validates `vol[@datastore]`.
    pub fn parse(full: &str) -> Result<Self, NameError> {
        let (volume, datastore) = match full.rfind('@') {
            Some(at) => (&full[..at], Some(&full[at + 1..])),
            None => (full, None),
        };
        validate_volume(volume)?;
        if let Some(ds) = datastore {
            validate_datastore(full, ds)?;
        }
        Ok(Self {
            volume: volume.to_owned(),
            datastore: datastore.map(str::to_owned),
        })
    }

    /// The canonical `vol@datastore` form once the datastore is known.
    pub fn full_name(&self, datastore: &str) -> String {
        format!("{}@{}", self.volume, datastore)
    }
}

impl fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.datastore {
            Some(ds) => write!(f, "{}@{}", self.volume, ds),
            None => f.write_str(&self.volume),
        }
    }
}

fn describe_char(c: char) -> String {
    match c {
        '/' => "'/'".into(),
        '\\' => "'\\'".into(),
        '"' => "'\"'".into(),
        '\0' => "NUL".into(),
        c => format!("control character U+{:04X}", c as u32),
    }
}

fn bad_char(c: char) -> bool {
    matches!(c, '/' | '\\' | '"' | '\0') || c.is_control()
}

/// Validates the volume part of a name.
pub fn validate_volume(volume: &str) -> Result<(), NameError> {
    if volume.is_empty() {
        return Err(NameError::Empty);
    }
    let chars = volume.chars().count();
    if chars > MAX_VOLUME_CHARS || volume.len() > MAX_VOLUME_BYTES {
        return Err(NameError::TooLong {
            name: volume.to_owned(),
            chars,
            bytes: volume.len(),
        });
    }
    if let Some(c) = volume.chars().find(|&c| bad_char(c)) {
        return Err(NameError::IllegalCharacter {
            name: volume.to_owned(),
            what: describe_char(c),
        });
    }
    if volume == "." || volume == ".." {
        return Err(NameError::DotName {
            name: volume.to_owned(),
        });
    }
    let bytes = volume.as_bytes();
    if bytes.len() >= 7 && bytes[bytes.len() - 7] == b'-' && bytes[bytes.len() - 6..].iter().all(u8::is_ascii_digit) {
        return Err(NameError::SnapshotSuffix {
            name: volume.to_owned(),
        });
    }
    if let Some(suffix) = RESERVED_SUFFIXES.iter().find(|s| volume.ends_with(**s)) {
        return Err(NameError::ReservedSuffix {
            name: volume.to_owned(),
            suffix,
        });
    }
    Ok(())
}

fn validate_datastore(full: &str, ds: &str) -> Result<(), NameError> {
    let reason = if ds.is_empty() {
        Some("it is empty")
    } else if ds.chars().count() > MAX_DATASTORE_CHARS {
        Some("Datastore name is too long (max len is 100)")
    } else if ds.chars().any(bad_char) {
        Some("it contains '/', '\\', '\"', NUL or control characters")
    } else if ds == "." || ds == ".." {
        Some("'.' and '..' are reserved")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NameError::BadDatastore {
            name: full.to_owned(),
            datastore: ds.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_last_at() {
        let r = VolumeRef::parse("abc@@@@ds").unwrap();
        assert_eq!(r.volume, "abc@@@");
        assert_eq!(r.datastore.as_deref(), Some("ds"));
        let r = VolumeRef::parse("vsanvol1").unwrap();
        assert_eq!(r.datastore, None);
        assert_eq!(r.full_name("local"), "vsanvol1@local");
    }

    #[test]
    fn accepts_what_the_original_accepted() {
        for ok in [
            "Volume-0000000-****-###",
            "Volume-00000",
            "Volume-0000000",
            "Volume Space",
            "Volume-你好",
            &"a".repeat(100),
            ".hidden",
            "x.vmdk",
        ] {
            VolumeRef::parse(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }

    #[test]
    fn refuses_bad_names() {
        type Check = fn(&NameError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, NameError::Empty)),
            ("@ds", |e| matches!(e, NameError::Empty)),
            ("vol@", |e| matches!(e, NameError::BadDatastore { .. })),
            ("../x", |e| matches!(e, NameError::IllegalCharacter { .. })),
            ("a/b", |e| matches!(e, NameError::IllegalCharacter { .. })),
            ("a\\b", |e| matches!(e, NameError::IllegalCharacter { .. })),
            ("a\0b", |e| matches!(e, NameError::IllegalCharacter { .. })),
            ("a\nb", |e| matches!(e, NameError::IllegalCharacter { .. })),
            ("a\"b", |e| matches!(e, NameError::IllegalCharacter { .. })),
            ("..", |e| matches!(e, NameError::DotName { .. })),
            (".", |e| matches!(e, NameError::DotName { .. })),
            ("..@ds", |e| matches!(e, NameError::DotName { .. })),
            ("Volume-000000", |e| matches!(e, NameError::SnapshotSuffix { .. })),
            ("x-123456", |e| matches!(e, NameError::SnapshotSuffix { .. })),
            ("x-flat", |e| matches!(e, NameError::ReservedSuffix { .. })),
            ("vol@../etc", |e| matches!(e, NameError::BadDatastore { .. })),
            ("vol@..", |e| matches!(e, NameError::BadDatastore { .. })),
        ];
        for (name, check) in cases {
            let err = VolumeRef::parse(name).expect_err(name);
            assert!(check(&err), "{name:?} gave {err:?}");
        }
        let long = "a".repeat(101);
        assert!(matches!(
            VolumeRef::parse(&long),
            Err(NameError::TooLong { chars: 101, .. })
        ));
        // 100 characters, but 300 bytes: would not fit a file name.
        let wide = "你".repeat(100);
        assert!(matches!(VolumeRef::parse(&wide), Err(NameError::TooLong { .. })));
    }

    #[test]
    fn messages_name_the_problem() {
        let e = VolumeRef::parse("vol-123456").unwrap_err().to_string();
        assert!(e.contains("-NNNNNN"), "{e}");
        let e = VolumeRef::parse(&"b".repeat(101)).unwrap_err().to_string();
        assert!(e.contains("max len is 100"), "{e}");
    }
}
