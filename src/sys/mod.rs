//! The guest's kernel seam: mounts, filesystems and block devices.
//!
//! Everything the plugin does to the kernel goes through [`System`], so the
//! volume logic can be tested with a recording fake, and the real
//! [`LinuxSystem`] is exercised by the root-only tests. This is the only
//! module that calls `mount(2)` or spawns programs.

pub mod mountinfo;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use vmdk_protocol::FsType;

pub use mountinfo::MountEntry;

/// A failed kernel call or program.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A system call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A program exited non-zero.
    #[error("{program} {args} failed with {status}: {stderr}")]
    Command {
        /// The program.
        program: String,
        /// Its arguments, space-joined.
        args: String,
        /// The exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// The attached disk could not be found in this VM.
    #[error(transparent)]
    Locate(#[from] crate::locate::LocateError),
    /// A device did not appear in time.
    #[error("device {device} did not appear within {seconds}s")]
    DeviceTimeout {
        /// The device path.
        device: PathBuf,
        /// How long we waited.
        seconds: u64,
    },
}

/// What [`System::data_dir`] found at `<mount dir>/data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// Nothing of that name (a fresh filesystem).
    Missing,
    /// A real directory (not a symlink) on the filesystem mounted at the
    /// mount dir: safe to hand to Docker.
    Valid,
    /// Something else; the text says what (a symlink and its target, a
    /// file, a directory on another filesystem).
    Invalid(String),
}

/// Mounts, filesystems and devices.
pub trait System: Send + Sync + fmt::Debug {
    /// Mounts `device` at `target`.
    fn mount(&self, device: &Path, target: &Path, fstype: &str, read_only: bool) -> Result<(), SysError>;
    /// Changes a mount between read-only and read-write.
    fn remount(&self, target: &Path, read_only: bool) -> Result<(), SysError>;
    /// Unmounts `target`; an unmounted target is not an error.
    fn unmount(&self, target: &Path) -> Result<(), SysError>;
    /// All current mounts.
    fn mounts(&self) -> Result<Vec<MountEntry>, SysError>;
    /// The filesystem on `device`, or `None` if it holds no known signature.
    fn probe_fs(&self, device: &Path) -> Result<Option<String>, SysError>;
    /// Makes a filesystem.
    fn mkfs(&self, device: &Path, fstype: FsType, label: &str) -> Result<(), SysError>;
    /// Whether `mkfs.<fstype>` is installed.
    fn mkfs_available(&self, fstype: FsType) -> bool;
    /// Finds the block device of an attached disk, waiting (and rescanning
    /// SCSI hosts) up to `timeout` for it to appear: a loop device the agent
    /// bound on this host, or a disk on a SCSI controller of this VM
    /// ([`crate::locate`]).
    fn locate(&self, location: &vmdk_protocol::DiskLocation, timeout: Duration) -> Result<PathBuf, SysError>;
    /// The first `len` bytes of `device` (fewer if it is smaller). Never
    /// reads more than `len`.
    fn read_head(&self, device: &Path, len: usize) -> Result<Vec<u8>, SysError>;
    /// The last `len` bytes of `device` (all of it if it is smaller), and
    /// the offset the first of them sits at.
    fn read_tail(&self, device: &Path, len: usize) -> Result<(u64, Vec<u8>), SysError>;

    /// Looks at `<mount_dir>/<name>` without following it (lstat
    /// semantics, relative to `mount_dir` opened `O_NOFOLLOW`): it must be
    /// a directory on the same filesystem as `mount_dir` itself.
    fn data_dir(&self, mount_dir: &Path, name: &str) -> Result<DataDir, SysError> {
        check_data_dir(mount_dir, name)
    }

    /// Makes `<mount_dir>/<name>` with `mkdirat` on `mount_dir` opened
    /// `O_DIRECTORY | O_NOFOLLOW`, so nothing on the way is followed.
    fn make_data_dir(&self, mount_dir: &Path, name: &str) -> Result<(), SysError> {
        make_data_dir(mount_dir, name)
    }
}

fn open_dir_nofollow(dir: &Path) -> Result<std::os::fd::OwnedFd, SysError> {
    use nix::fcntl::OFlag;
    nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SysError::Io {
        op: "open directory (not following symlinks)",
        path: dir.to_owned(),
        source: e.into(),
    })
}

/// The real [`System::data_dir`], shared by every implementation.
pub fn check_data_dir(mount_dir: &Path, name: &str) -> Result<DataDir, SysError> {
    use nix::sys::stat::{fstat, fstatat, SFlag};
    let dir = open_dir_nofollow(mount_dir)?;
    let io = |op: &'static str, e: nix::Error| SysError::Io {
        op,
        path: mount_dir.join(name),
        source: e.into(),
    };
    let root = fstat(&dir).map_err(|e| io("stat", e))?;
    let st = match fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(DataDir::Missing),
        Err(e) => return Err(io("stat", e)),
    };
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    Ok(if kind == SFlag::S_IFLNK {
        let target = nix::fcntl::readlinkat(&dir, name)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        DataDir::Invalid(format!("it is a symbolic link (to {target:?})"))
    } else if kind != SFlag::S_IFDIR {
        let what = match kind {
            SFlag::S_IFREG => "a regular file",
            SFlag::S_IFBLK => "a block device",
            SFlag::S_IFCHR => "a character device",
            SFlag::S_IFIFO => "a FIFO",
            SFlag::S_IFSOCK => "a socket",
            _ => "not a directory",
        };
        DataDir::Invalid(format!("it is {what}, not a directory"))
    } else if st.st_dev != root.st_dev {
        DataDir::Invalid(format!(
            "it is on another filesystem (device {:#x}) than the volume's (device {:#x})",
            st.st_dev, root.st_dev
        ))
    } else {
        DataDir::Valid
    })
}

/// The real [`System::make_data_dir`], shared by every implementation.
pub fn make_data_dir(mount_dir: &Path, name: &str) -> Result<(), SysError> {
    let dir = open_dir_nofollow(mount_dir)?;
    nix::sys::stat::mkdirat(&dir, name, nix::sys::stat::Mode::from_bits_truncate(0o755)).map_err(|e| SysError::Io {
        op: "mkdir",
        path: mount_dir.join(name),
        source: e.into(),
    })
}

/// Flags of every volume mount. A disk comes from a datastore other hosts
/// and their admins write to: setuid binaries and device nodes on it must
/// not work on this host (Docker's bind mounts of `data` inherit both).
pub const VOLUME_MOUNT_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// The real thing.
#[derive(Debug, Clone, Default)]
pub struct LinuxSystem;

/// Where the plugin looks for mkfs and blkid (not `$PATH`).
pub const SEARCH_PATH: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];
/// How many times an unmount that found its mount busy is tried again
/// (waiting 2, 4, ..., 128 ms: about 0.25 s in all).
const UNMOUNT_BUSY_RETRIES: u32 = 7;

fn find_program(name: &str) -> Option<PathBuf> {
    SEARCH_PATH.iter().map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

fn run(program: &str, args: &[&str]) -> Result<std::process::Output, SysError> {
    let path = find_program(program).ok_or_else(|| SysError::Io {
        op: "find program",
        path: PathBuf::from(program),
        source: io::Error::new(
            io::ErrorKind::NotFound,
            format!("{program} is not installed in {}", SEARCH_PATH.join(":")),
        ),
    })?;
    std::process::Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", SEARCH_PATH.join(":"))
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| SysError::Io {
            op: "run",
            path: path.clone(),
            source,
        })
}

fn check(program: &str, args: &[&str], out: std::process::Output) -> Result<std::process::Output, SysError> {
    if out.status.success() {
        return Ok(out);
    }
    Err(SysError::Command {
        program: program.to_owned(),
        args: args.join(" "),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Recognizes ext4 (magic 0xEF53 at byte 1080, with the extents feature)
/// and xfs (`XFSB` at byte 0) from the first 2 KiB of a device. Anything
/// else, including an unreadable device, is left to `blkid`.
fn read_magic(device: &Path) -> Option<&'static str> {
    use std::io::Read;
    let mut buf = [0u8; 2048];
    let mut f = std::fs::File::open(device).ok()?;
    f.read_exact(&mut buf).ok()?;
    classify_superblock(&buf)
}

/// The pure part of [`read_magic`].
pub fn classify_superblock(buf: &[u8; 2048]) -> Option<&'static str> {
    if &buf[0..4] == b"XFSB" {
        return Some("xfs");
    }
    let sb = &buf[1024..];
    if sb[56] == 0x53 && sb[57] == 0xEF {
        // s_feature_incompat at 0x60: INCOMPAT_EXTENTS (0x40) means ext4.
        let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
        if incompat & 0x40 != 0 {
            return Some("ext4");
        }
    }
    None
}

/// Truncates a label to `max` bytes on a character boundary.
pub fn fs_label(name: &str, max: usize) -> String {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

impl System for LinuxSystem {
    fn mount(&self, device: &Path, target: &Path, fstype: &str, read_only: bool) -> Result<(), SysError> {
        let mut flags = VOLUME_MOUNT_FLAGS;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        nix::mount::mount(Some(device), target, Some(fstype), flags, None::<&str>).map_err(|e| SysError::Io {
            op: "mount",
            path: target.to_owned(),
            source: io::Error::other(format!(
                "mount {} ({fstype}) at {}: {e}",
                device.display(),
                target.display()
            )),
        })
    }

    fn remount(&self, target: &Path, read_only: bool) -> Result<(), SysError> {
        // A remount sets all flags anew: keep nosuid and nodev.
        let mut flags = MsFlags::MS_REMOUNT | VOLUME_MOUNT_FLAGS;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| SysError::Io {
            op: "remount",
            path: target.to_owned(),
            source: e.into(),
        })
    }

    fn unmount(&self, target: &Path) -> Result<(), SysError> {
        // EBUSY can be transient: a child this daemon forks for another
        // volume (mkfs, blkid, losetup) holds a copy of every descriptor
        // between fork and exec, including one we opened inside this mount
        // to prepare its data directory. Docker sends Unmount only after
        // the container is gone, so a few short retries (about 0.25 s in
        // all) outlast that window; a mount really in use still fails.
        let mut wait = std::time::Duration::from_millis(2);
        let mut tries = 0;
        loop {
            match nix::mount::umount2(target, MntFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
                Err(nix::errno::Errno::EBUSY) if tries < UNMOUNT_BUSY_RETRIES => {
                    tries += 1;
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(e) => {
                    return Err(SysError::Io {
                        op: "unmount",
                        path: target.to_owned(),
                        source: e.into(),
                    })
                }
            }
        }
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, SysError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| SysError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
        Ok(mountinfo::parse(&text))
    }

    fn probe_fs(&self, device: &Path) -> Result<Option<String>, SysError> {
        // Fast path: the two filesystems we make, recognized by their
        // superblock magic without spawning blkid.
        if let Some(t) = read_magic(device) {
            return Ok(Some(t.to_owned()));
        }
        let dev = device.to_string_lossy();
        let args = ["-p", "-o", "value", "-s", "TYPE", dev.as_ref()];
        let out = run("blkid", &args)?;
        // blkid -p exits 2 when it finds no signature.
        if out.status.code() == Some(2) {
            return Ok(None);
        }
        let out = check("blkid", &args, out)?;
        let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(if t.is_empty() { None } else { Some(t) })
    }

    fn mkfs(&self, device: &Path, fstype: FsType, label: &str) -> Result<(), SysError> {
        let dev = device.to_string_lossy();
        match fstype {
            FsType::Ext4 => {
                // nodiscard: a discard on a loop device punches holes and
                // would turn a thick disk thin. No -F: never force. (mke2fs
                // asks before overwriting a filesystem only on a terminal,
                // so the volume logic checks the device is blank first.)
                let label = fs_label(label, 16);
                let args = ["-q", "-E", "nodiscard", "-L", &label, dev.as_ref()];
                check("mkfs.ext4", &args, run("mkfs.ext4", &args)?)?;
            }
            FsType::Xfs => {
                let label = fs_label(label, 12);
                // No -f: mkfs.xfs refuses a device with any signature.
                let args = ["-q", "-K", "-L", &label, dev.as_ref()];
                check("mkfs.xfs", &args, run("mkfs.xfs", &args)?)?;
            }
        }
        Ok(())
    }

    fn mkfs_available(&self, fstype: FsType) -> bool {
        find_program(&format!("mkfs.{fstype}")).is_some()
    }

    fn locate(&self, location: &vmdk_protocol::DiskLocation, timeout: Duration) -> Result<PathBuf, SysError> {
        use crate::locate::DeviceLocator;
        crate::locate::GuestLocator::new("/")
            .locate(location, timeout)
            .map_err(SysError::Locate)
    }

    fn read_head(&self, device: &Path, len: usize) -> Result<Vec<u8>, SysError> {
        read_head(device, len)
    }

    fn read_tail(&self, device: &Path, len: usize) -> Result<(u64, Vec<u8>), SysError> {
        read_tail(device, len)
    }
}

/// Reads at most `len` bytes from the start of `path`.
pub fn read_head(path: &Path, len: usize) -> Result<Vec<u8>, SysError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| SysError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut buf).map_err(io)?;
    Ok(buf)
}

/// Reads the last `len` bytes of `path` (a block device or a file): the
/// offset they start at, and the bytes.
pub fn read_tail(path: &Path, len: usize) -> Result<(u64, Vec<u8>), SysError> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| SysError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    // A block device's size is where its end is.
    let size = f.seek(SeekFrom::End(0)).map_err(io)?;
    let start = size.saturating_sub(len as u64);
    f.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut buf).map_err(io)?;
    Ok((start, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblocks_are_classified() {
        let mut b = [0u8; 2048];
        assert_eq!(classify_superblock(&b), None);
        b[1024 + 56] = 0x53;
        b[1024 + 57] = 0xEF;
        assert_eq!(classify_superblock(&b), None, "ext2/3 without extents is left to blkid");
        b[1024 + 0x60] = 0x40;
        assert_eq!(classify_superblock(&b), Some("ext4"));
        let mut x = [0u8; 2048];
        x[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify_superblock(&x), Some("xfs"));
    }

    #[test]
    fn data_dir_is_checked_without_following_anything() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        assert_eq!(check_data_dir(m, "data").unwrap(), DataDir::Missing);
        make_data_dir(m, "data").unwrap();
        assert_eq!(check_data_dir(m, "data").unwrap(), DataDir::Valid);
        std::os::unix::fs::symlink("/etc", m.join("link")).unwrap();
        let DataDir::Invalid(why) = check_data_dir(m, "link").unwrap() else {
            panic!("a symlink passed")
        };
        assert_eq!(why, "it is a symbolic link (to \"/etc\")");
        // mkdirat does not follow a planted symlink either (EEXIST).
        let e = make_data_dir(m, "link").unwrap_err().to_string();
        assert!(e.contains("mkdir"), "{e}");
        std::fs::write(m.join("file"), "x").unwrap();
        assert_eq!(
            check_data_dir(m, "file").unwrap(),
            DataDir::Invalid("it is a regular file, not a directory".into())
        );
        // A directory that is another mount (here: /proc below /).
        let DataDir::Invalid(why) = check_data_dir(Path::new("/"), "proc").unwrap() else {
            panic!("another filesystem passed")
        };
        assert!(why.starts_with("it is on another filesystem"), "{why}");
        // The mount dir itself must not be a symlink.
        std::os::unix::fs::symlink(m.join("data"), m.join("dirlink")).unwrap();
        assert!(check_data_dir(&m.join("dirlink"), "x").is_err());
    }

    #[test]
    fn read_head_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, vec![7u8; 5000]).unwrap();
        assert_eq!(read_head(&f, 100).unwrap(), vec![7u8; 100]);
        assert_eq!(read_head(&f, 1 << 20).unwrap().len(), 5000);
        let mut bytes = vec![0u8; 5000];
        bytes[4999] = 9;
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(read_tail(&f, 100).unwrap(), (4900, bytes[4900..].to_vec()));
        assert_eq!(read_tail(&f, 1 << 20).unwrap(), (0, bytes));
    }

    #[test]
    fn labels_truncate_on_char_boundaries() {
        assert_eq!(fs_label("vsanvol1", 16), "vsanvol1");
        assert_eq!(fs_label("a-very-long-volume-name", 12), "a-very-long-");
        assert_eq!(fs_label("ééééééé", 5), "éé");
    }
}
