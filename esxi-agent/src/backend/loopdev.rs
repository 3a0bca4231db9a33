//! Loop devices: the `local` backend's notion of "attached to the VM".
//!
//! [`LoopDevices`] is the kernel seam of the local backend; [`LinuxLoops`]
//! talks to `/dev/loop-control` and `/sys/block/loop*`, and unit tests use a
//! fake. The algorithm is the usual one: ask loop-control for a free device,
//! bind the file with `LOOP_SET_FD`, and retry when another process won the
//! race for that device (`EBUSY`).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::store::FileId;

/// Kernel loop devices, as the local backend needs them.
pub trait LoopDevices: Send + Sync + fmt::Debug {
    /// Binds the open `file` (already checked to be the volume's regular
    /// extent: the device is bound from this descriptor, so there is no
    /// window between the check and the bind) to a free loop device and
    /// returns the device node. `name` is what the kernel shows as its
    /// backing file.
    fn attach(&self, file: &File, name: &Path) -> io::Result<PathBuf>;
    /// The identity of the file bound to `device`; `None` when unbound.
    fn backing(&self, device: &Path) -> io::Result<Option<FileId>>;
    /// Releases `device` if it is bound to the file `backing` (a device
    /// bound to another file is not touched). Succeeds only when the device
    /// really let go of the file: one that is still open (mounted, or held
    /// by a process) fails with `EBUSY` and stays bound, with nothing
    /// changed.
    fn detach(&self, device: &Path, backing: FileId) -> io::Result<()>;
    /// Every bound loop device with its backing file's path as the kernel
    /// shows it.
    fn list(&self) -> io::Result<Vec<(PathBuf, PathBuf)>>;
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// How long a detach waits for the kernel to let go of a device that a
/// short-lived opener (a prober such as `blkid` or udev) still held.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(300);
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_MAJOR: u64 = 7;
const LO_NAME_SIZE: usize = 64;
const ATTACH_RETRIES: usize = 100;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn empty_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

fn loop_info(file: &Path) -> LoopInfo64 {
    let mut info = empty_info();
    let name = file.as_os_str().as_encoded_bytes();
    let tail = &name[name.len().saturating_sub(LO_NAME_SIZE - 1)..];
    info.lo_file_name[..tail.len()].copy_from_slice(tail);
    info
}

/// Binds `backing` to `dev` in one `LOOP_CONFIGURE` call, or with the
/// older `LOOP_SET_FD` + `LOOP_SET_STATUS64` pair on kernels before 5.8.
/// (`LOOP_SET_STATUS64` on a bound device freezes its queue, which costs
/// milliseconds; `LOOP_CONFIGURE` sets everything before the device goes
/// live.)
fn bind(dev: &File, backing: &File, file: &Path) -> io::Result<()> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: loop_info(file),
        reserved: [0; 8],
    };
    // SAFETY: `dev` is open, and `config` is a live, correctly laid out
    // `struct loop_config` that the kernel only reads.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
        return Err(e);
    }
    ioctl_arg(dev, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong)?;
    let info = loop_info(file);
    // SAFETY: as above, for `struct loop_info64`.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64, &info as *const LoopInfo64) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        let _ = ioctl_arg(dev, LOOP_CLR_FD, 0);
        return Err(e);
    }
    Ok(())
}

/// The real kernel interface.
#[derive(Debug, Clone)]
pub struct LinuxLoops {
    dev: PathBuf,
    sys_block: PathBuf,
}

impl Default for LinuxLoops {
    fn default() -> Self {
        Self {
            dev: PathBuf::from("/dev"),
            sys_block: PathBuf::from("/sys/block"),
        }
    }
}

fn ioctl_arg(file: &File, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: `file` is an open descriptor for the duration of the call, and
    // every request used with this helper takes an integer argument.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl LinuxLoops {
    fn node(&self, n: u32) -> io::Result<PathBuf> {
        let path = self.dev.join(format!("loop{n}"));
        match fs::metadata(&path) {
            Ok(m) if m.file_type().is_block_device() => Ok(path),
            Ok(_) => Err(io::Error::other(format!("{} is not a block device", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // No devtmpfs/udev: make the node ourselves.
                let dev = libc::makedev(LOOP_MAJOR as u32, n);
                match nix::sys::stat::mknod(
                    &path,
                    nix::sys::stat::SFlag::S_IFBLK,
                    nix::sys::stat::Mode::from_bits_truncate(0o660),
                    dev,
                ) {
                    // Another process made it first.
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(path),
                    Err(e) => Err(io::Error::from(e)),
                }
            }
            Err(e) => Err(e),
        }
    }
}

fn open_device(device: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(device)
}

fn get_status(dev: &File) -> io::Result<Option<LoopInfo64>> {
    let mut info = empty_info();
    // SAFETY: `dev` is open and `info` is a live, correctly laid out
    // `struct loop_info64` the kernel writes into.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) };
    if rc == 0 {
        return Ok(Some(info));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

impl LinuxLoops {
    fn sysfs_backing(&self, device: &Path) -> Option<PathBuf> {
        let name = device.file_name()?;
        let text = fs::read_to_string(self.sys_block.join(name).join("loop/backing_file")).ok()?;
        Some(PathBuf::from(text.trim_end_matches('\n')))
    }
}

impl LoopDevices for LinuxLoops {
    fn attach(&self, file: &File, name: &Path) -> io::Result<PathBuf> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.dev.join("loop-control"))?;
        let mut last = None;
        for _ in 0..ATTACH_RETRIES {
            let n = ioctl_arg(&control, LOOP_CTL_GET_FREE, 0)?;
            let node = self.node(n as u32)?;
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&node)?;
            // LOOP_CONFIGURE refuses a bound device (EBUSY): a device is
            // never handed out twice.
            match bind(&dev, file, name) {
                Ok(()) => return Ok(node),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free loop device")))
    }

    fn backing(&self, device: &Path) -> io::Result<Option<FileId>> {
        let dev = match open_device(device) {
            Ok(d) => d,
            Err(e) if vanished(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(get_status(&dev)?.map(|i| FileId {
            dev: i.lo_device,
            ino: i.lo_inode,
        }))
    }

    fn detach(&self, device: &Path, backing: FileId) -> io::Result<()> {
        {
            let dev = match open_device(device) {
                Ok(d) => d,
                Err(e) if vanished(&e) => return Ok(()),
                Err(e) => return Err(e),
            };
            match get_status(&dev)? {
                None => return Ok(()),
                Some(i) if i.lo_device != backing.dev || i.lo_inode != backing.ino => return Ok(()),
                Some(_) => {}
            }
            // The kernel clears a device that nobody else has open at once;
            // one still open (mounted, or held by a process) it only marks
            // for clearing at its last close (LO_FLAGS_AUTOCLEAR) and still
            // answers 0. Success is therefore checked below, not assumed.
            match ioctl_arg(&dev, LOOP_CLR_FD, 0) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // Our own descriptor is closed: a device nobody else holds is now
        // released. A short-lived prober may hold it a moment longer.
        let start = std::time::Instant::now();
        while self.sysfs_backing(device).is_some() {
            if start.elapsed() >= RELEASE_WAIT {
                return self.undo_detach(device, backing);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<(PathBuf, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.sys_block)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with("loop") {
                continue;
            }
            match fs::read_to_string(entry.path().join("loop/backing_file")) {
                Ok(b) => {
                    let b = b.trim_end_matches('\n');
                    out.push((self.dev.join(name), PathBuf::from(b)));
                }
                // The device is unbound, or is being torn down or created
                // by another process while we look: not bound, for us.
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort();
        Ok(out)
    }
}

impl LinuxLoops {
    /// The device is still held open: take back the deferred clear so it
    /// stays exactly as it was, and report it busy.
    fn undo_detach(&self, device: &Path, backing: FileId) -> io::Result<()> {
        let dev = open_device(device)?;
        let Some(mut info) = get_status(&dev)? else {
            // Released after all (its last holder closed it just now).
            return Ok(());
        };
        if info.lo_device != backing.dev || info.lo_inode != backing.ino {
            return Ok(());
        }
        if info.lo_flags & LO_FLAGS_AUTOCLEAR != 0 {
            info.lo_flags &= !LO_FLAGS_AUTOCLEAR;
            // SAFETY: `dev` is open and `info` is the device's own status,
            // which the kernel only reads.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64, &info as *const LoopInfo64) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    return Ok(());
                }
                tracing::warn!(device = %device.display(), error = %e, "cannot cancel the deferred release of a busy loop device; it is released when its holder closes it");
            }
        }
        Err(io::Error::from_raw_os_error(libc::EBUSY))
    }
}

/// Errors sysfs gives for a loop device that is not bound or that
/// another process is binding or releasing while we read it.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO))
}

/// An in-memory stand-in for unit tests: devices are `/dev/fakeloopN`.
/// [`FakeLoops::hold`] makes a device busy, as a mount would.
#[cfg(any(test, feature = "testkit"))]
#[derive(Debug, Default)]
pub struct FakeLoops {
    bound: std::sync::Mutex<Vec<(PathBuf, PathBuf, FileId)>>,
    held: std::sync::Mutex<Vec<PathBuf>>,
    next: std::sync::atomic::AtomicU32,
}

#[cfg(any(test, feature = "testkit"))]
impl FakeLoops {
    /// Marks `device` open by someone (mounted): detach then fails busy.
    pub fn hold(&self, device: &Path, held: bool) {
        let mut h = self.held.lock().unwrap();
        h.retain(|d| d != device);
        if held {
            h.push(device.to_owned());
        }
    }
}

#[cfg(any(test, feature = "testkit"))]
impl LoopDevices for FakeLoops {
    fn attach(&self, file: &File, name: &Path) -> io::Result<PathBuf> {
        let id = FileId::of(file)?;
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dev = PathBuf::from(format!("/dev/fakeloop{n}"));
        self.bound.lock().unwrap().push((dev.clone(), name.to_owned(), id));
        Ok(dev)
    }

    fn backing(&self, device: &Path) -> io::Result<Option<FileId>> {
        Ok(self
            .bound
            .lock()
            .unwrap()
            .iter()
            .find(|(d, _, _)| d == device)
            .map(|(_, _, id)| *id))
    }

    fn detach(&self, device: &Path, backing: FileId) -> io::Result<()> {
        if self.held.lock().unwrap().iter().any(|d| d == device) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.bound
            .lock()
            .unwrap()
            .retain(|(d, _, id)| !(d == device && *id == backing));
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<(PathBuf, PathBuf)>> {
        Ok(self
            .bound
            .lock()
            .unwrap()
            .iter()
            .map(|(d, p, _)| (d.clone(), p.clone()))
            .collect())
    }
}
