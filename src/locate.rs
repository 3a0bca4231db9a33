//! Finding an attached disk in the guest: the device locator seam.
//!
//! The agent says where the guest will find a disk it attached
//! ([`DiskLocation`]): a block device node on this very host (the `local`
//! backend's loop devices, [`LoopLocator`]) or a unit on a SCSI controller
//! of the VM (the `vsphere` backend, [`ScsiLocator`]). A locator turns that
//! into the block device node to format and mount, waiting for the disk to
//! show up, and refuses anything that contradicts what the agent said.
//!
//! Every sysfs and `/dev` path is rooted at a configurable directory, so
//! the lookups run on fixture trees in the unit tests below; the real
//! kernel (Linux's `vmw_pvscsi` under QEMU) is exercised by
//! `tests/guest_kernel.rs`.
//!
//! What the SCSI lookup relies on (verified in Debian 12's kernel with a
//! QEMU `pvscsi` controller, see `docs/testing.md`):
//! - `<sys>/bus/pci/devices/<addr>` is the controller's PCI device and
//!   has one `host<N>` directory, its SCSI host. VMware puts the
//!   controller behind a PCI bridge; given the bridge's address, the
//!   controller is the one PCI device below it with a SCSI host.
//! - The disk at unit `U` is `host<N>/target<N>:0:<U>/<N>:0:<U>:0`; its
//!   `block/` directory holds one entry, the kernel's name (`sdb`), whose
//!   `dev` file is `major:minor`. The node is `<dev>/<name>` (devtmpfs,
//!   no udev needed).
//! - The disk's `wwid` is `naa.<hex>`: 32 hex digits from VMware (the disk
//!   UUID `6000C29...` without dashes, when `disk.EnableUUID` is on), 16
//!   from QEMU (whose `wwn` property is 64 bits), which must then be the
//!   first 16 digits of the disk UUID. A disk without an `naa.` WWN is
//!   taken on its SCSI address alone.
//! - A disk hot-added to a controller that sends no hot-plug messages
//!   appears only after `echo "- - -" > <sys>/class/scsi_host/host<N>/scan`.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use vmdk_protocol::DiskLocation;

/// How often a locator looks again while it waits.
const POLL: Duration = Duration::from_millis(20);
/// How often a waiting [`ScsiLocator`] rescans the SCSI host(s).
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// The Linux driver name of VMware's paravirtual SCSI controller.
const PVSCSI_DRIVER: &str = "vmw_pvscsi";

/// Finds the block device of an attached disk.
pub trait DeviceLocator: Send + Sync + fmt::Debug {
    /// Waits up to `timeout` for the disk `loc` describes and returns its
    /// block device node. Never returns a device that contradicts `loc`.
    fn locate(&self, loc: &DiskLocation, timeout: Duration) -> Result<PathBuf, LocateError>;
}

/// Why a disk was not found, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// This locator does not handle that kind of location.
    #[error("{locator} cannot find a disk given as {location:?}")]
    WrongKind {
        /// The locator asked.
        locator: &'static str,
        /// The location it was given.
        location: DiskLocation,
    },
    /// The device path from the agent is not a node under `/dev`.
    #[error("device path {path:?} is not valid: {reason}; valid is an absolute path under /dev, such as /dev/loop3")]
    InvalidDevicePath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The controller's PCI address from the agent is malformed.
    #[error("PCI address {address:?} is not valid: expected domain:bus:slot.function in hex, such as 0000:03:00.0")]
    InvalidPciAddress {
        /// The address as given.
        address: String,
    },
    /// The SCSI unit from the agent is out of range.
    #[error("SCSI unit {unit} is not valid: valid units are 0-6 and 8-15")]
    InvalidUnit {
        /// The unit as given.
        unit: u32,
    },
    /// The disk UUID from the agent is malformed.
    #[error("disk UUID {uuid:?} is not valid: expected 32 hex digits, such as 6000C29a-bcde-f012-3456-789abcdef012")]
    InvalidDiskUuid {
        /// The UUID as given.
        uuid: String,
    },
    /// Neither a PCI address nor a disk UUID: nothing says which disk.
    #[error("SCSI unit {unit} on bus {controller_bus} without a controller PCI address or a disk UUID: nothing identifies the disk")]
    Unidentifiable {
        /// The controller's bus number in the VM.
        controller_bus: u32,
        /// The unit.
        unit: u32,
    },
    /// The disk found at the SCSI address reports a WWN that is not the
    /// disk's UUID: another disk sits there. It is not used.
    #[error("the disk at {device} ({sysfs}) reports WWN {wwid}, which contradicts {wanted}; it is not used")]
    WwnMismatch {
        /// The block device found.
        device: PathBuf,
        /// Its SCSI device directory in sysfs.
        sysfs: PathBuf,
        /// The WWN it reports (`wwid`).
        wwid: String,
        /// What was looked for.
        wanted: Box<ScsiTarget>,
    },
    /// Several disks match.
    #[error("{wanted} matches several disks: {}", display_paths(.devices))]
    Ambiguous {
        /// What was looked for.
        wanted: Box<ScsiTarget>,
        /// The candidates.
        devices: Vec<PathBuf>,
    },
    /// Below a PCI address there is more than one SCSI host.
    #[error("{} SCSI hosts below PCI device {address}: {}; cannot tell which is the controller", .hosts.len(), display_paths(.hosts))]
    AmbiguousController {
        /// The PCI address.
        address: String,
        /// The SCSI hosts found.
        hosts: Vec<PathBuf>,
    },
    /// The disk did not appear in time. `seen` says how far the search got.
    #[error("timed out after {:.1}s waiting for {wanted}: {seen}", .waited.as_secs_f64())]
    Timeout {
        /// What was waited for.
        wanted: Box<ScsiTarget>,
        /// How long.
        waited: Duration,
        /// The last state seen (what was still missing).
        seen: String,
    },
    /// The device node did not appear (or is not a block device) in time.
    #[error("timed out after {:.1}s waiting for block device {path}: {seen}", .waited.as_secs_f64())]
    DeviceTimeout {
        /// The node waited for.
        path: PathBuf,
        /// How long.
        waited: Duration,
        /// The last state seen.
        seen: String,
    },
    /// Reading sysfs failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The path read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a [`ScsiLocator`] looks for, validated; shown in its errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiTarget {
    /// The controller's bus number in the VM (informational).
    pub controller_bus: u32,
    /// The controller's PCI address, normalised (`0000:03:00.0`).
    pub pci_address: Option<String>,
    /// The SCSI unit (target).
    pub unit: u32,
    /// The disk UUID as 32 lowercase hex digits.
    pub disk_uuid: Option<String>,
}

impl ScsiTarget {
    /// Validates a [`DiskLocation::Scsi`]'s fields (they come from the
    /// agent: treated as hostile).
    pub fn new(
        controller_bus: u32,
        pci_address: Option<&str>,
        unit: u32,
        disk_uuid: Option<&str>,
    ) -> Result<Self, LocateError> {
        let pci_address = pci_address.map(normalize_pci_address).transpose()?;
        if unit > 15 || unit == 7 {
            return Err(LocateError::InvalidUnit { unit });
        }
        let disk_uuid = disk_uuid.map(normalize_disk_uuid).transpose()?;
        if pci_address.is_none() && disk_uuid.is_none() {
            return Err(LocateError::Unidentifiable { controller_bus, unit });
        }
        Ok(Self {
            controller_bus,
            pci_address,
            unit,
            disk_uuid,
        })
    }

    /// What a disk reporting `wwid` (the sysfs `wwid` text) says about
    /// this target: `Some(true)` it is this disk, `Some(false)` it is
    /// another disk, `None` it reports no WWN to compare (or no disk UUID
    /// is known).
    pub fn wwn_matches(&self, wwid: &str) -> Option<bool> {
        let uuid = self.disk_uuid.as_deref()?;
        let wwid = wwid.trim().to_ascii_lowercase();
        let hex = wwid.strip_prefix("naa.")?;
        Some(match hex.len() {
            // VMware: the whole 128-bit disk UUID.
            32 => hex == uuid,
            // QEMU: a 64-bit WWN, the first half of the UUID.
            16 => hex == &uuid[..16],
            _ => false,
        })
    }
}

impl fmt::Display for ScsiTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the SCSI disk at unit {}", self.unit)?;
        match &self.pci_address {
            Some(a) => write!(f, " of the controller at PCI address {a} (bus {})", self.controller_bus)?,
            None => write!(
                f,
                " of the controller on bus {} (PCI address unknown)",
                self.controller_bus
            )?,
        }
        if let Some(u) = &self.disk_uuid {
            write!(f, " with WWN naa.{u} (or its first 64 bits, naa.{})", &u[..16])?;
        }
        Ok(())
    }
}

/// `0000:03:00.0` (or `03:00.0`, domain 0) in lowercase; anything else is
/// refused, so the address is safe to use as a path component.
fn normalize_pci_address(address: &str) -> Result<String, LocateError> {
    let bad = || LocateError::InvalidPciAddress {
        address: address.to_owned(),
    };
    let lower = address.to_ascii_lowercase();
    let full = if lower.len() == 7 {
        format!("0000:{lower}")
    } else {
        lower
    };
    let b = full.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    let ok = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
        // Slots are 5 bits.
        && u8::from_str_radix(&full[8..10], 16).is_ok_and(|s| s < 32);
    if ok {
        Ok(full)
    } else {
        Err(bad())
    }
}

/// The 32 hex digits of a VMware disk UUID (`6000C29a-bcde-...`, the
/// descriptor's `60 00 c2 9a ...-...` or bare hex), in lowercase.
fn normalize_disk_uuid(uuid: &str) -> Result<String, LocateError> {
    let hex: String = uuid
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit()) && uuid.len() <= 48 {
        Ok(hex)
    } else {
        Err(LocateError::InvalidDiskUuid { uuid: uuid.to_owned() })
    }
}

/// How a candidate node is checked. The real check is the only one
/// outside the unit tests, whose fixture trees cannot hold device nodes
/// without root (`mknod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeCheck {
    /// A block device (following symlinks) whose number, when sysfs
    /// gives one, is the disk's.
    BlockDevice,
    /// Fixtures: a regular file standing for the node, whose content is
    /// the `major:minor` the node would have.
    #[cfg(test)]
    FixtureFile,
}

impl NodeCheck {
    /// `Ok(())` when `node` is the block device numbered `dev`
    /// (`major:minor`, or any number when `None`); otherwise why not.
    fn check(self, node: &Path, dev: Option<&str>) -> Result<(), String> {
        let meta = fs::metadata(node).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!("{} does not exist yet", node.display()),
            _ => format!("{}: {e}", node.display()),
        })?;
        let actual = match self {
            NodeCheck::BlockDevice => {
                if !meta.file_type().is_block_device() {
                    return Err(format!("{} is not a block device", node.display()));
                }
                let rdev = meta.rdev();
                format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
            }
            #[cfg(test)]
            NodeCheck::FixtureFile => {
                if !meta.is_file() {
                    return Err(format!("{} is not a block device", node.display()));
                }
                fs::read_to_string(node).unwrap_or_default().trim().to_owned()
            }
        };
        match dev {
            Some(want) if want != actual => {
                Err(format!("{} is device {actual}, but the disk is {want}", node.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Finds [`DiskLocation::Device`] disks: the agent runs on this host and
/// names the node itself (a loop device).
#[derive(Debug, Clone)]
pub struct LoopLocator {
    root: PathBuf,
    check: NodeCheck,
}

impl Default for LoopLocator {
    fn default() -> Self {
        Self::new("/")
    }
}

impl LoopLocator {
    /// A locator whose `/dev` is `<root>/dev`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            check: NodeCheck::BlockDevice,
        }
    }

    /// Validates `path` (from the agent) and roots it: an absolute path
    /// below `/dev` of plain components.
    fn node(&self, path: &str) -> Result<PathBuf, LocateError> {
        let bad = |reason| LocateError::InvalidDevicePath {
            path: path.to_owned(),
            reason,
        };
        let rest = path.strip_prefix("/dev/").ok_or_else(|| bad("it is not below /dev"))?;
        let rel = Path::new(rest);
        if rest.is_empty() || path.len() > 4096 || path.contains('\0') {
            return Err(bad("it names no node below /dev"));
        }
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) || rest.contains("//") {
            return Err(bad("it has a '.', '..' or empty component"));
        }
        Ok(self.root.join("dev").join(rel))
    }
}

impl DeviceLocator for LoopLocator {
    fn locate(&self, loc: &DiskLocation, timeout: Duration) -> Result<PathBuf, LocateError> {
        let DiskLocation::Device { path } = loc else {
            return Err(LocateError::WrongKind {
                locator: "the loop device locator",
                location: loc.clone(),
            });
        };
        let node = self.node(path)?;
        let start = Instant::now();
        loop {
            let seen = match self.check.check(&node, None) {
                Ok(()) => return Ok(node),
                Err(seen) => seen,
            };
            if start.elapsed() >= timeout {
                return Err(LocateError::DeviceTimeout {
                    path: node,
                    waited: start.elapsed(),
                    seen,
                });
            }
            std::thread::sleep(POLL.min(timeout.saturating_sub(start.elapsed())));
        }
    }
}

/// Finds [`DiskLocation::Scsi`] disks in sysfs: by the controller's PCI
/// address and the unit, confirmed by the WWN when the disk reports one;
/// by WWN among all SCSI disks when the PCI address is unknown. Rescans
/// the SCSI host(s) while the disk is missing. See the module docs.
#[derive(Debug, Clone)]
pub struct ScsiLocator {
    root: PathBuf,
    check: NodeCheck,
}

impl Default for ScsiLocator {
    fn default() -> Self {
        Self::new("/")
    }
}

/// One look at sysfs: the node, or what is still missing.
enum Look {
    Found(PathBuf),
    Missing(String),
}

impl ScsiLocator {
    /// A locator whose sysfs is `<root>/sys` and `/dev` is `<root>/dev`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            check: NodeCheck::BlockDevice,
        }
    }

    fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }

    /// The SCSI host directory of the controller at `address` (or of the
    /// one controller behind the bridge at `address`).
    fn controller_host(&self, address: &str) -> Result<Result<PathBuf, String>, LocateError> {
        let dev = self.sys().join("bus/pci/devices").join(address);
        if !dev.exists() {
            return Ok(Err(format!("no PCI device {address} ({} is absent)", dev.display())));
        }
        let mut hosts = scsi_hosts_in(&dev)?;
        if hosts.is_empty() {
            // Behind a bridge: the devices on its secondary bus are its
            // subdirectories named by PCI address.
            for e in read_dir(&dev)? {
                let name = e.file_name();
                if normalize_pci_address(&name.to_string_lossy()).is_ok() && e.path().is_dir() {
                    hosts.extend(scsi_hosts_in(&e.path())?);
                }
            }
        }
        match hosts.len() {
            0 => Ok(Err(format!(
                "PCI device {address} has no SCSI host ({} has no host<N> directory, nor has a PCI device below it)",
                dev.display()
            ))),
            1 => Ok(Ok(hosts.remove(0))),
            _ => Err(LocateError::AmbiguousController {
                address: address.to_owned(),
                hosts,
            }),
        }
    }

    /// Looks once for `t` by PCI address and unit.
    fn look_by_address(&self, t: &ScsiTarget, address: &str, rescan: &mut Rescan) -> Result<Look, LocateError> {
        let host_dir = match self.controller_host(address)? {
            Ok(h) => h,
            Err(seen) => return Ok(Look::Missing(seen)),
        };
        let host = host_dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let n = &host["host".len()..];
        rescan.hosts = vec![host.clone()];
        let sdev = host_dir.join(format!("target{n}:0:{}/{n}:0:{}:0", t.unit, t.unit));
        let Some(name) = block_name(&sdev)? else {
            return Ok(Look::Missing(format!(
                "no disk at unit {} of {host} ({} has no block device){}",
                t.unit,
                sdev.display(),
                rescan.describe()
            )));
        };
        let wwid = read_wwid(&sdev)?;
        if let Some(wwid) = &wwid {
            if t.wwn_matches(wwid) == Some(false) {
                return Err(LocateError::WwnMismatch {
                    device: self.root.join("dev").join(&name),
                    sysfs: sdev,
                    wwid: wwid.trim().to_owned(),
                    wanted: Box::new(t.clone()),
                });
            }
        }
        self.node(&sdev, &name)
    }

    /// Looks once for `t` by WWN among all SCSI disks.
    fn look_by_wwn(&self, t: &ScsiTarget, rescan: &mut Rescan) -> Result<Look, LocateError> {
        rescan.hosts = self.pvscsi_hosts()?;
        let block = self.sys().join("block");
        let mut found = Vec::new();
        if block.exists() {
            for e in read_dir(&block)? {
                let sdev = e.path().join("device");
                if let Some(wwid) = read_wwid(&sdev)? {
                    if t.wwn_matches(&wwid) == Some(true) {
                        found.push((sdev, e.file_name().to_string_lossy().into_owned()));
                    }
                }
            }
        }
        match found.len() {
            0 => Ok(Look::Missing(format!(
                "no disk in {} reports that WWN{}",
                block.display(),
                rescan.describe()
            ))),
            1 => {
                let (sdev, name) = found.remove(0);
                self.node(&sdev, &name)
            }
            _ => Err(LocateError::Ambiguous {
                wanted: Box::new(t.clone()),
                devices: found.iter().map(|(_, n)| self.root.join("dev").join(n)).collect(),
            }),
        }
    }

    /// The node for the block device `name` of the SCSI device `sdev`,
    /// once it exists with the number sysfs gives.
    fn node(&self, sdev: &Path, name: &str) -> Result<Look, LocateError> {
        let node = self.root.join("dev").join(name);
        let dev = read_optional(&sdev.join("block").join(name).join("dev"))?;
        Ok(match self.check.check(&node, dev.as_deref().map(str::trim)) {
            Ok(()) => Look::Found(node),
            Err(seen) => Look::Missing(seen),
        })
    }

    /// The names of the SCSI hosts driven by `vmw_pvscsi`.
    fn pvscsi_hosts(&self) -> Result<Vec<String>, LocateError> {
        let dir = self.sys().join("class/scsi_host");
        let mut hosts = Vec::new();
        if dir.exists() {
            for e in read_dir(&dir)? {
                let proc_name = read_optional(&e.path().join("proc_name"))?;
                if proc_name.as_deref().map(str::trim) == Some(PVSCSI_DRIVER) {
                    hosts.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        hosts.sort();
        Ok(hosts)
    }

    /// Asks the kernel to scan every target of `hosts` for new disks.
    fn rescan(&self, rescan: &mut Rescan) {
        rescan.count += 1;
        rescan.errors.clear();
        for host in &rescan.hosts {
            let scan = self.sys().join("class/scsi_host").join(host).join("scan");
            if let Err(e) = fs::OpenOptions::new()
                .write(true)
                .open(&scan)
                .and_then(|mut f| io::Write::write_all(&mut f, b"- - -"))
            {
                tracing::warn!(path = %scan.display(), error = %e, "SCSI rescan failed");
                rescan.errors.push(format!("rescan through {}: {e}", scan.display()));
            }
        }
    }
}

/// The rescans done while waiting, for the wait's error text.
#[derive(Default)]
struct Rescan {
    hosts: Vec<String>,
    count: u32,
    errors: Vec<String>,
}

impl Rescan {
    fn describe(&self) -> String {
        let mut s = match (self.count, self.hosts.is_empty()) {
            (0, _) => String::new(),
            (_, true) => "; no vmw_pvscsi SCSI host to rescan".to_owned(),
            (n, false) => format!("; rescanned {} {n} time(s)", self.hosts.join(", ")),
        };
        for e in &self.errors {
            s.push_str("; ");
            s.push_str(e);
        }
        s
    }
}

impl DeviceLocator for ScsiLocator {
    fn locate(&self, loc: &DiskLocation, timeout: Duration) -> Result<PathBuf, LocateError> {
        let DiskLocation::Scsi {
            controller_bus,
            pci_address,
            unit,
            disk_uuid,
        } = loc
        else {
            return Err(LocateError::WrongKind {
                locator: "the SCSI disk locator",
                location: loc.clone(),
            });
        };
        let t = ScsiTarget::new(*controller_bus, pci_address.as_deref(), *unit, disk_uuid.as_deref())?;
        let start = Instant::now();
        let mut rescan = Rescan::default();
        let mut last_rescan: Option<Instant> = None;
        loop {
            let look = match &t.pci_address {
                Some(address) => self.look_by_address(&t, address, &mut rescan)?,
                None => self.look_by_wwn(&t, &mut rescan)?,
            };
            let seen = match look {
                Look::Found(node) => return Ok(node),
                Look::Missing(seen) => seen,
            };
            if start.elapsed() >= timeout {
                return Err(LocateError::Timeout {
                    wanted: Box::new(t),
                    waited: start.elapsed(),
                    seen,
                });
            }
            // The disk may be on a controller that sends no hot-plug
            // messages: rescan at once, then now and then.
            if !rescan.hosts.is_empty() && last_rescan.is_none_or(|at| at.elapsed() >= RESCAN_EVERY) {
                self.rescan(&mut rescan);
                last_rescan = Some(Instant::now());
                continue;
            }
            std::thread::sleep(POLL.min(timeout.saturating_sub(start.elapsed())));
        }
    }
}

/// Finds any [`DiskLocation`]: loop devices and SCSI disks, under one root.
#[derive(Debug, Clone, Default)]
pub struct GuestLocator {
    /// For [`DiskLocation::Device`].
    pub devices: LoopLocator,
    /// For [`DiskLocation::Scsi`].
    pub scsi: ScsiLocator,
}

impl GuestLocator {
    /// Both locators rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            devices: LoopLocator::new(root.clone()),
            scsi: ScsiLocator::new(root),
        }
    }
}

impl DeviceLocator for GuestLocator {
    fn locate(&self, loc: &DiskLocation, timeout: Duration) -> Result<PathBuf, LocateError> {
        match loc {
            DiskLocation::Device { .. } => self.devices.locate(loc, timeout),
            DiskLocation::Scsi { .. } => self.scsi.locate(loc, timeout),
        }
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, LocateError> {
    let io = |source| LocateError::Io {
        path: dir.to_owned(),
        source,
    };
    // A directory that went away (a disk or controller being removed) is
    // as good as empty.
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut v = rd.collect::<Result<Vec<_>, _>>().map_err(io)?;
    v.sort_by_key(|e| e.file_name());
    Ok(v)
}

/// A small sysfs attribute, or `None` when absent.
fn read_optional(path: &Path) -> Result<Option<String>, LocateError> {
    read_attr(path, |e| e.kind() == io::ErrorKind::NotFound)
}

/// A SCSI device's `wwid`, or `None` when it reports none: the kernel
/// fails the read with ENXIO when the disk has no identification VPD
/// page (QEMU's `scsi-hd` without `wwn`), EINVAL when it has no usable
/// designator, and ENODEV while the device goes away.
fn read_wwid(sdev: &Path) -> Result<Option<String>, LocateError> {
    read_attr(&sdev.join("wwid"), wwid_absent)
}

fn wwid_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || matches!(e.raw_os_error(), Some(libc::ENXIO | libc::EINVAL | libc::ENODEV))
}

fn read_attr(path: &Path, absent: impl Fn(&io::Error) -> bool) -> Result<Option<String>, LocateError> {
    use std::io::Read;
    let io = |source| LocateError::Io {
        path: path.to_owned(),
        source,
    };
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if absent(&e) => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut s = String::new();
    match f.take(4096).read_to_string(&mut s) {
        Ok(_) => Ok(Some(s)),
        Err(e) if absent(&e) => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// The `host<N>` directories in `dir`.
fn scsi_hosts_in(dir: &Path) -> Result<Vec<PathBuf>, LocateError> {
    Ok(read_dir(dir)?
        .into_iter()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("host")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect())
}

/// The one block device name in `<sdev>/block/`, if the disk is there.
fn block_name(sdev: &Path) -> Result<Option<String>, LocateError> {
    let dir = sdev.join("block");
    if !dir.exists() {
        return Ok(None);
    }
    let names: Vec<String> = read_dir(&dir)?
        .into_iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.contains('/') && n != "." && n != "..")
        .collect();
    Ok(names.into_iter().next())
}

#[cfg(test)]
mod tests {
    //! Fixture trees: a temporary directory laid out like sysfs and `/dev`
    //! as Debian 12's kernel shows a QEMU `pvscsi` controller (see the
    //! module docs). Device nodes are regular files holding the
    //! `major:minor` they stand for ([`NodeCheck::FixtureFile`]), so the
    //! tests need no root; the real check is exercised on them too (it
    //! refuses them) and, positively, in `tests/guest_kernel.rs`.
    use super::*;
    use std::os::unix::fs::symlink;

    const VMW_UUID: &str = "6000C29a-bcde-f012-3456-789abcdef012";
    const VMW_WWN: &str = "naa.6000c29abcdef0123456789abcdef012";
    const QEMU_WWN: &str = "naa.6000c29abcdef012";
    const SHORT: Duration = Duration::from_millis(300);
    const LONG: Duration = Duration::from_secs(20);

    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Self {
            let t = Tree {
                dir: tempfile::tempdir().unwrap(),
            };
            for d in [
                "sys/bus/pci/devices",
                "sys/class/scsi_host",
                "sys/block",
                "sys/devices/pci0000:00",
                "dev",
            ] {
                fs::create_dir_all(t.root().join(d)).unwrap();
            }
            t
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn scsi(&self) -> ScsiLocator {
            ScsiLocator {
                root: self.root().to_owned(),
                check: NodeCheck::FixtureFile,
            }
        }

        /// A PCI device on the root bus (`/sys/bus/pci/devices/<addr>`
        /// links to it).
        fn pci(&self, addr: &str) -> PathBuf {
            let d = self.root().join("sys/devices/pci0000:00").join(addr);
            fs::create_dir_all(&d).unwrap();
            symlink(&d, self.root().join("sys/bus/pci/devices").join(addr)).unwrap();
            d
        }

        /// A PCI device below the bridge directory `bridge`.
        fn pci_below(&self, bridge: &Path, addr: &str) -> PathBuf {
            let d = bridge.join(addr);
            fs::create_dir_all(&d).unwrap();
            symlink(&d, self.root().join("sys/bus/pci/devices").join(addr)).unwrap();
            d
        }

        /// A SCSI host `host<n>` of `driver` on the PCI device `pci_dir`.
        fn host(&self, pci_dir: &Path, n: u32, driver: &str) -> PathBuf {
            let h = pci_dir.join(format!("host{n}"));
            let class = h.join(format!("scsi_host/host{n}"));
            fs::create_dir_all(&class).unwrap();
            fs::write(class.join("proc_name"), format!("{driver}\n")).unwrap();
            fs::write(class.join("scan"), "").unwrap();
            symlink(&class, self.root().join(format!("sys/class/scsi_host/host{n}"))).unwrap();
            h
        }

        /// A disk at `unit` of `host` named `name` (`major:minor` `dev`),
        /// reporting `wwid` when given, with its `/dev` node.
        fn disk(&self, host: &Path, unit: u32, name: &str, dev: &str, wwid: Option<&str>) -> PathBuf {
            let n = host
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .strip_prefix("host")
                .unwrap();
            let sdev = host.join(format!("target{n}:0:{unit}/{n}:0:{unit}:0"));
            let block = sdev.join("block").join(name);
            fs::create_dir_all(&block).unwrap();
            fs::write(block.join("dev"), format!("{dev}\n")).unwrap();
            symlink(&sdev, block.join("device")).unwrap();
            symlink(&block, self.root().join("sys/block").join(name)).unwrap();
            if let Some(w) = wwid {
                fs::write(sdev.join("wwid"), format!("{w}\n")).unwrap();
            }
            fs::write(self.root().join("dev").join(name), dev).unwrap();
            sdev
        }

        fn scan_file(&self, n: u32) -> PathBuf {
            self.root().join(format!("sys/class/scsi_host/host{n}/scan"))
        }

        fn dev(&self, name: &str) -> PathBuf {
            self.root().join("dev").join(name)
        }
    }

    fn scsi(pci: Option<&str>, unit: u32, uuid: Option<&str>) -> DiskLocation {
        DiskLocation::Scsi {
            controller_bus: 0,
            pci_address: pci.map(str::to_owned),
            unit,
            disk_uuid: uuid.map(str::to_owned),
        }
    }

    /// A tree with a pvscsi controller at 0000:00:10.0 (host0) holding
    /// `sdb` at unit 3 reporting `wwid`.
    fn one_disk(wwid: Option<&str>) -> Tree {
        let t = Tree::new();
        let h = t.host(&t.pci("0000:00:10.0"), 0, "vmw_pvscsi");
        t.disk(&h, 3, "sdb", "8:16", wwid);
        t
    }

    #[test]
    fn finds_the_disk_by_controller_address_and_unit_confirmed_by_vmware_wwn() {
        let t = one_disk(Some(VMW_WWN));
        let got = t
            .scsi()
            .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
            .unwrap();
        assert_eq!(got, t.dev("sdb"));
        // The short PCI form and any case of the UUID work too.
        let got = t
            .scsi()
            .locate(&scsi(Some("00:10.0"), 3, Some(&VMW_UUID.to_uppercase())), SHORT)
            .unwrap();
        assert_eq!(got, t.dev("sdb"));
    }

    #[test]
    fn accepts_qemus_64_bit_wwn_when_it_is_the_first_half_of_the_disk_uuid() {
        let t = one_disk(Some(QEMU_WWN));
        let got = t
            .scsi()
            .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
            .unwrap();
        assert_eq!(got, t.dev("sdb"));
    }

    #[test]
    fn a_disk_reporting_no_naa_wwn_is_taken_on_its_address() {
        for wwid in [
            None,
            Some("t10.VMware  Virtual disk    6000c29abcdef0123456789abcdef012"),
        ] {
            let t = one_disk(wwid);
            let got = t
                .scsi()
                .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
                .unwrap();
            assert_eq!(got, t.dev("sdb"), "{wwid:?}");
        }
        // Nor is a WWN needed when the agent knows no disk UUID.
        let t = one_disk(Some(VMW_WWN));
        assert_eq!(
            t.scsi().locate(&scsi(Some("0000:00:10.0"), 3, None), SHORT).unwrap(),
            t.dev("sdb")
        );
    }

    #[test]
    fn a_wwid_the_kernel_cannot_read_means_no_wwn() {
        // ENXIO is what Linux 6.1 gives for a QEMU disk without a WWN
        // (tests/guest_kernel.rs meets it).
        for errno in [libc::ENXIO, libc::EINVAL, libc::ENODEV, libc::ENOENT] {
            assert!(wwid_absent(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EACCES, libc::EIO, libc::EISDIR] {
            assert!(!wwid_absent(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        // An unreadable wwid (here a directory: EISDIR) is an error, not
        // "no WWN": the disk is not taken unconfirmed.
        let t = one_disk(None);
        let sdev = t
            .root()
            .join("sys/devices/pci0000:00/0000:00:10.0/host0/target0:0:3/0:0:3:0");
        fs::create_dir(sdev.join("wwid")).unwrap();
        let e = t
            .scsi()
            .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
            .unwrap_err();
        assert!(
            matches!(&e, LocateError::Io { path, .. } if path.ends_with("wwid")),
            "{e:?}"
        );
    }

    #[test]
    fn a_disk_whose_wwn_contradicts_the_uuid_is_refused_at_once() {
        for other in [
            "naa.6000c29abcdef0123456789abcdef013", // another VMware disk
            "naa.6000c29abcdef013",                 // another QEMU disk
            "naa.6000c29abcdef0123456",             // neither form
        ] {
            let t = one_disk(Some(other));
            let start = Instant::now();
            let e = t
                .scsi()
                .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), LONG)
                .unwrap_err();
            assert!(start.elapsed() < LONG / 2, "refused without waiting out the timeout");
            assert!(
                matches!(&e, LocateError::WwnMismatch { wwid, device, .. }
                if wwid == other && *device == t.dev("sdb")),
                "{e:?}"
            );
            let text = e.to_string();
            assert!(
                text.contains(other) && text.contains("naa.6000c29abcdef0123456789abcdef012"),
                "{text}"
            );
            assert!(text.contains("is not used"), "{text}");
        }
    }

    #[test]
    fn finds_the_controller_behind_a_pci_bridge_as_vmware_places_it() {
        let t = Tree::new();
        let bridge = t.pci("0000:00:16.0");
        let h = t.host(&t.pci_below(&bridge, "0000:0b:00.0"), 2, "vmw_pvscsi");
        t.disk(&h, 0, "sdc", "8:32", Some(VMW_WWN));
        for addr in ["0000:00:16.0", "0000:0b:00.0"] {
            let got = t.scsi().locate(&scsi(Some(addr), 0, Some(VMW_UUID)), SHORT).unwrap();
            assert_eq!(got, t.dev("sdc"), "{addr}");
        }
    }

    #[test]
    fn two_scsi_hosts_below_one_address_are_refused() {
        let t = Tree::new();
        let bridge = t.pci("0000:00:16.0");
        t.host(&t.pci_below(&bridge, "0000:0b:00.0"), 2, "vmw_pvscsi");
        t.host(&t.pci_below(&bridge, "0000:0b:01.0"), 3, "vmw_pvscsi");
        let e = t
            .scsi()
            .locate(&scsi(Some("0000:00:16.0"), 0, None), SHORT)
            .unwrap_err();
        assert!(
            matches!(&e, LocateError::AmbiguousController { hosts, .. } if hosts.len() == 2),
            "{e:?}"
        );
        assert!(e.to_string().contains("0000:00:16.0"), "{e}");
    }

    #[test]
    fn without_a_pci_address_the_disk_is_found_by_wwn_among_all_scsi_disks() {
        let t = Tree::new();
        let h0 = t.host(&t.pci("0000:00:10.0"), 0, "vmw_pvscsi");
        let h1 = t.host(&t.pci("0000:00:11.0"), 1, "vmw_pvscsi");
        t.disk(&h0, 0, "sda", "8:0", Some("naa.6000c29000000000000000000000000a"));
        t.disk(&h0, 1, "sdb", "8:16", None);
        t.disk(&h1, 4, "sdc", "8:32", Some(QEMU_WWN));
        let got = t.scsi().locate(&scsi(None, 4, Some(VMW_UUID)), SHORT).unwrap();
        assert_eq!(got, t.dev("sdc"));

        // A second disk with the same WWN: which one is unknowable.
        t.disk(&h1, 5, "sdd", "8:48", Some(VMW_WWN));
        let e = t.scsi().locate(&scsi(None, 4, Some(VMW_UUID)), SHORT).unwrap_err();
        assert!(
            matches!(&e, LocateError::Ambiguous { devices, .. }
            if *devices == vec![t.dev("sdc"), t.dev("sdd")]),
            "{e:?}"
        );
    }

    #[test]
    fn neither_address_nor_uuid_identifies_nothing() {
        let t = one_disk(Some(VMW_WWN));
        let e = t.scsi().locate(&scsi(None, 3, None), LONG).unwrap_err();
        assert!(matches!(e, LocateError::Unidentifiable { unit: 3, .. }), "{e:?}");
        assert!(e.to_string().contains("nothing identifies the disk"), "{e}");
    }

    #[test]
    fn a_missing_disk_rescans_its_controller_and_the_timeout_names_what_it_waited_for() {
        let t = Tree::new();
        let h0 = t.host(&t.pci("0000:00:10.0"), 0, "vmw_pvscsi");
        t.host(&t.pci("0000:00:11.0"), 1, "vmw_pvscsi");
        t.disk(&h0, 2, "sdb", "8:16", Some(VMW_WWN));
        let e = t
            .scsi()
            .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
            .unwrap_err();
        assert!(matches!(e, LocateError::Timeout { .. }), "{e:?}");
        let text = e.to_string();
        for part in [
            "unit 3",
            "PCI address 0000:00:10.0",
            "WWN naa.6000c29abcdef0123456789abcdef012",
            "naa.6000c29abcdef012)",
            "target0:0:3",
            "rescanned host0",
        ] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
        assert_eq!(fs::read_to_string(t.scan_file(0)).unwrap(), "- - -");
        assert_eq!(
            fs::read_to_string(t.scan_file(1)).unwrap(),
            "",
            "only the controller's own host"
        );
    }

    #[test]
    fn a_missing_controller_is_waited_for_and_named() {
        let t = Tree::new();
        let e = t
            .scsi()
            .locate(&scsi(Some("0000:00:12.0"), 1, None), SHORT)
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, LocateError::Timeout { .. }), "{e:?}");
        assert!(text.contains("no PCI device 0000:00:12.0"), "{text}");
        // A PCI device that has no SCSI host (yet).
        t.pci("0000:00:12.0");
        let text = t
            .scsi()
            .locate(&scsi(Some("0000:00:12.0"), 1, None), SHORT)
            .unwrap_err()
            .to_string();
        assert!(text.contains("PCI device 0000:00:12.0 has no SCSI host"), "{text}");
    }

    #[test]
    fn without_a_pci_address_every_pvscsi_host_is_rescanned_and_no_other() {
        let t = Tree::new();
        t.host(&t.pci("0000:00:10.0"), 0, "vmw_pvscsi");
        t.host(&t.pci("0000:00:01.1"), 1, "ata_piix");
        t.host(&t.pci("0000:00:11.0"), 2, "vmw_pvscsi");
        let text = t
            .scsi()
            .locate(&scsi(None, 0, Some(VMW_UUID)), SHORT)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("PCI address unknown") && text.contains("rescanned host0, host2"),
            "{text}"
        );
        assert_eq!(fs::read_to_string(t.scan_file(0)).unwrap(), "- - -");
        assert_eq!(fs::read_to_string(t.scan_file(1)).unwrap(), "");
        assert_eq!(fs::read_to_string(t.scan_file(2)).unwrap(), "- - -");
    }

    #[test]
    fn a_disk_that_appears_only_after_a_rescan_is_found() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let t = Tree::new();
        let h = t.host(&t.pci("0000:00:10.0"), 0, "vmw_pvscsi");
        // The "kernel": adds the disk when the host is rescanned.
        let ino = Inotify::init(InitFlags::IN_CLOEXEC).unwrap();
        ino.add_watch(&t.scan_file(0), AddWatchFlags::IN_CLOSE_WRITE).unwrap();
        let kernel = std::thread::spawn({
            let (root, h) = (t.root().to_owned(), h.clone());
            move || {
                ino.read_events().unwrap();
                let sdev = h.join("target0:0:9/0:0:9:0");
                let block = sdev.join("block/sde");
                fs::create_dir_all(&block).unwrap();
                fs::write(block.join("dev"), "8:64\n").unwrap();
                fs::write(sdev.join("wwid"), format!("{QEMU_WWN}\n")).unwrap();
                fs::write(root.join("dev/sde"), "8:64").unwrap();
            }
        });
        let got = t
            .scsi()
            .locate(&scsi(Some("0000:00:10.0"), 9, Some(VMW_UUID)), LONG)
            .unwrap();
        assert_eq!(got, t.dev("sde"));
        kernel.join().unwrap();
    }

    #[test]
    fn the_node_must_be_the_disks_own_block_device() {
        // /dev/sdb stands for another device than the disk sysfs shows.
        let t = one_disk(Some(VMW_WWN));
        fs::write(t.dev("sdb"), "8:32").unwrap();
        let text = t
            .scsi()
            .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
            .unwrap_err()
            .to_string();
        assert!(text.contains("is device 8:32, but the disk is 8:16"), "{text}");
        // No node yet.
        fs::remove_file(t.dev("sdb")).unwrap();
        let text = t
            .scsi()
            .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
            .unwrap_err()
            .to_string();
        assert!(text.contains("sdb does not exist yet"), "{text}");
        // The real check refuses what is not a block device.
        let t = one_disk(Some(VMW_WWN));
        let text = ScsiLocator::new(t.root())
            .locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT)
            .unwrap_err()
            .to_string();
        assert!(text.contains("sdb is not a block device"), "{text}");
    }

    #[test]
    fn hostile_locations_are_refused_before_any_lookup() {
        let t = one_disk(Some(VMW_WWN));
        for addr in [
            "../../../etc",
            "0000:00:10.0/..",
            "0000:00:10.8",
            "0000:00:20.0",
            "00:10",
            "",
            "0000:00:10.0 ",
        ] {
            let e = t.scsi().locate(&scsi(Some(addr), 3, None), LONG).unwrap_err();
            assert!(matches!(e, LocateError::InvalidPciAddress { .. }), "{addr:?}: {e:?}");
            assert!(e.to_string().contains("such as 0000:03:00.0"), "{e}");
        }
        for unit in [7, 16, u32::MAX] {
            let e = t
                .scsi()
                .locate(&scsi(Some("0000:00:10.0"), unit, None), LONG)
                .unwrap_err();
            assert!(matches!(e, LocateError::InvalidUnit { .. }), "{unit}: {e:?}");
            assert!(e.to_string().contains("valid units are 0-6 and 8-15"), "{e}");
        }
        for uuid in [
            "6000C29a",
            "6000C29a-bcde-f012-3456-789abcdef01g",
            "../6000c29abcdef0123456789abcdef012",
        ] {
            let e = t
                .scsi()
                .locate(&scsi(Some("0000:00:10.0"), 3, Some(uuid)), LONG)
                .unwrap_err();
            assert!(matches!(e, LocateError::InvalidDiskUuid { .. }), "{uuid:?}: {e:?}");
        }
        // The descriptor's own spelling of the UUID is accepted.
        let got = t
            .scsi()
            .locate(
                &scsi(
                    Some("0000:00:10.0"),
                    3,
                    Some("60 00 c2 9a bc de f0 12-34 56 78 9a bc de f0 12"),
                ),
                SHORT,
            )
            .unwrap();
        assert_eq!(got, t.dev("sdb"));
        let e = t
            .scsi()
            .locate(
                &DiskLocation::Device {
                    path: "/dev/sdb".into(),
                },
                LONG,
            )
            .unwrap_err();
        assert!(matches!(e, LocateError::WrongKind { .. }), "{e:?}");
    }

    #[test]
    fn wwn_forms() {
        let t = ScsiTarget::new(0, None, 0, Some(VMW_UUID)).unwrap();
        for (wwid, want) in [
            (VMW_WWN, Some(true)),
            ("NAA.6000C29ABCDEF0123456789ABCDEF012\n", Some(true)),
            (QEMU_WWN, Some(true)),
            ("naa.6000c29abcdef013", Some(false)),
            ("naa.3456789abcdef012", Some(false)),
            ("naa.", Some(false)),
            ("eui.6000c29abcdef012", None),
            ("t10.ATA     QEMU HARDDISK", None),
            ("", None),
        ] {
            assert_eq!(t.wwn_matches(wwid), want, "{wwid:?}");
        }
        let no_uuid = ScsiTarget::new(0, Some("0000:00:10.0"), 0, None).unwrap();
        assert_eq!(no_uuid.wwn_matches(VMW_WWN), None);
    }

    fn loops(t: &Tree) -> LoopLocator {
        LoopLocator {
            root: t.root().to_owned(),
            check: NodeCheck::FixtureFile,
        }
    }

    #[test]
    fn loop_locator_roots_the_agents_device_and_waits_for_it() {
        let t = Tree::new();
        fs::write(t.dev("loop3"), "7:3").unwrap();
        let loc = DiskLocation::Device {
            path: "/dev/loop3".into(),
        };
        assert_eq!(loops(&t).locate(&loc, SHORT).unwrap(), t.dev("loop3"));
        let e = loops(&t)
            .locate(
                &DiskLocation::Device {
                    path: "/dev/loop4".into(),
                },
                SHORT,
            )
            .unwrap_err();
        assert!(matches!(e, LocateError::DeviceTimeout { .. }), "{e:?}");
        assert!(e.to_string().contains("loop4 does not exist yet"), "{e}");
        // The real check: a regular file is no block device.
        let e = LoopLocator::new(t.root()).locate(&loc, SHORT).unwrap_err();
        assert!(e.to_string().contains("loop3 is not a block device"), "{e}");
        let e = loops(&t)
            .locate(&scsi(Some("0000:00:10.0"), 0, None), SHORT)
            .unwrap_err();
        assert!(matches!(e, LocateError::WrongKind { .. }), "{e:?}");
    }

    #[test]
    fn loop_locator_refuses_paths_outside_dev() {
        let t = Tree::new();
        fs::write(t.root().join("shadow"), "8:0").unwrap();
        for bad in [
            "/etc/shadow",
            "/dev",
            "/dev/",
            "/dev/../shadow",
            "dev/loop0",
            "",
            "/dev//loop0",
            "/dev/./loop0",
        ] {
            let e = loops(&t)
                .locate(&DiskLocation::Device { path: bad.into() }, LONG)
                .unwrap_err();
            assert!(matches!(e, LocateError::InvalidDevicePath { .. }), "{bad:?}: {e:?}");
            assert!(e.to_string().contains("valid is an absolute path under /dev"), "{e}");
        }
    }

    #[test]
    fn guest_locator_dispatches_on_the_kind_of_location() {
        let t = one_disk(Some(VMW_WWN));
        fs::write(t.dev("loop0"), "7:0").unwrap();
        let g = GuestLocator {
            devices: loops(&t),
            scsi: t.scsi(),
        };
        assert_eq!(
            g.locate(
                &DiskLocation::Device {
                    path: "/dev/loop0".into()
                },
                SHORT
            )
            .unwrap(),
            t.dev("loop0")
        );
        assert_eq!(
            g.locate(&scsi(Some("0000:00:10.0"), 3, Some(VMW_UUID)), SHORT).unwrap(),
            t.dev("sdb")
        );
    }
}
