//! Datastores: named directories laid out like ESXi's `dockvols`.
//!
//! ```text
//! <datastore>/dockvols/_DEFAULT/<vol>.vmdk       descriptor
//! <datastore>/dockvols/_DEFAULT/<vol>-flat.vmdk  extent
//! <datastore>/dockvols/_DEFAULT/<vol>.vmfd       metadata sidecar
//! <datastore>/dockvols/_DEFAULT/<vol>.lck        lock file
//! ```
//!
//! Every path is built from a validated [`vmdk_protocol::VolumeRef`] volume
//! part (no `/`, not `.`/`..`), so no name can leave its vmgroup folder.

use std::path::{Path, PathBuf};

/// Folder of all volumes on a datastore.
pub const DOCKVOLS: &str = "dockvols";
/// The vmgroup every VM belongs to until vmgroups are configured.
pub const DEFAULT_VMGROUP: &str = "_DEFAULT";

/// A configured datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    /// Name used in `vol@name`.
    pub name: String,
    /// Directory holding `dockvols/`.
    pub root: PathBuf,
    /// Whether VSAN policies may be used here.
    pub vsan: bool,
}

impl Datastore {
    /// `<root>/dockvols`.
    pub fn dockvols(&self) -> PathBuf {
        self.root.join(DOCKVOLS)
    }

    /// `<root>/dockvols/<vmgroup>`.
    pub fn group_dir(&self, vmgroup: &str) -> PathBuf {
        self.dockvols().join(vmgroup)
    }

    /// The files of one volume in one vmgroup.
    pub fn disk(&self, vmgroup: &str, volume: &str) -> DiskPaths {
        DiskPaths::new(&self.group_dir(vmgroup), volume)
    }
}

/// The files that make up one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPaths {
    /// Volume part of the name.
    pub volume: String,
    /// Folder holding the files.
    pub dir: PathBuf,
    /// `<vol>.vmdk`.
    pub descriptor: PathBuf,
    /// `<vol>-flat.vmdk`.
    pub flat: PathBuf,
    /// `<vol>.vmfd`.
    pub meta: PathBuf,
    /// `<vol>.lck`.
    pub lock: PathBuf,
    /// `<vol>.creating`: present while a create is under way. Files of a
    /// name without metadata are the agent's own leftovers only when this
    /// (or [`DiskPaths::removing`]) marks them; anything else in the folder
    /// is never deleted or overwritten.
    pub creating: PathBuf,
    /// `<vol>.removing`: present while a remove is under way.
    pub removing: PathBuf,
}

impl DiskPaths {
    /// Paths of `volume` inside `dir`.
    pub fn new(dir: &Path, volume: &str) -> Self {
        Self {
            volume: volume.to_owned(),
            dir: dir.to_owned(),
            descriptor: dir.join(format!("{volume}.vmdk")),
            flat: dir.join(format!("{volume}-flat.vmdk")),
            meta: dir.join(format!("{volume}.vmfd")),
            lock: dir.join(format!("{volume}.lck")),
            creating: dir.join(format!("{volume}.creating")),
            removing: dir.join(format!("{volume}.removing")),
        }
    }

    /// File name of the extent, as written in the descriptor.
    pub fn flat_file_name(&self) -> String {
        format!("{}-flat.vmdk", self.volume)
    }

    /// The create and remove markers.
    pub fn markers(&self) -> [&Path; 2] {
        [&self.creating, &self.removing]
    }

    /// Whether a create or remove of the agent's is under way here, or was
    /// cut off by a crash: the files of this name are the agent's own.
    pub fn marked(&self) -> bool {
        self.markers().iter().any(|m| m.exists())
    }

    /// The descriptor or the extent, whichever exists.
    pub fn existing_disk_file(&self) -> Option<&Path> {
        [&self.descriptor, &self.flat]
            .into_iter()
            .map(PathBuf::as_path)
            .find(|f| f.exists())
    }

    /// Temp files of atomic writes ([`crate::fsutil::atomic_write`]) of the
    /// descriptor and the sidecar.
    pub fn temp_files(&self) -> [PathBuf; 2] {
        [".vmdk.tmp", ".vmfd.tmp"].map(|suffix| self.dir.join(format!("{}{suffix}", self.volume)))
    }

    /// The volume a file in a vmgroup folder belongs to, with the kind of
    /// file it is, by the names [`DiskPaths::new`] gives.
    pub fn volume_of_file(file: &str) -> Option<(&str, VolumeFile)> {
        use VolumeFile::*;
        [
            (".vmfd.tmp", Temp),
            (".vmdk.tmp", Temp),
            ("-flat.vmdk", Disk),
            (".vmdk", Disk),
            (".vmfd", Meta),
            (".lck", Lock),
            (".creating", Marker),
            (".removing", Marker),
        ]
        .into_iter()
        .find_map(|(suffix, kind)| Some((file.strip_suffix(suffix)?, kind)))
    }
}

/// The kinds of file a volume has in its vmgroup folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeFile {
    /// Descriptor or extent.
    Disk,
    /// The `.vmfd` sidecar.
    Meta,
    /// The lock file.
    Lock,
    /// A create or remove marker.
    Marker,
    /// A temp file of an atomic write.
    Temp,
}
