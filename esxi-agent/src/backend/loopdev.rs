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
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Kernel loop devices, as the local backend needs them.
pub trait LoopDevices: Send + Sync + fmt::Debug {
    /// Binds `file` to a free loop device and returns the device node.
    fn attach(&self, file: &Path) -> io::Result<PathBuf>;
    /// Unbinds a loop device. The kernel defers the unbind until the device
    /// is closed if it is still open (e.g. mounted).
    fn detach(&self, device: &Path) -> io::Result<()>;
    /// Every bound loop device with its backing file.
    fn list(&self) -> io::Result<Vec<(PathBuf, PathBuf)>>;
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
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

fn loop_info(file: &Path) -> LoopInfo64 {
    let mut info = LoopInfo64 {
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
    };
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

impl LoopDevices for LinuxLoops {
    fn attach(&self, file: &Path) -> io::Result<PathBuf> {
        let backing = OpenOptions::new().read(true).write(true).open(file)?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dev.join("loop-control"))?;
        let mut last = None;
        for _ in 0..ATTACH_RETRIES {
            let n = ioctl_arg(&control, LOOP_CTL_GET_FREE, 0)?;
            let node = self.node(n as u32)?;
            let dev = OpenOptions::new().read(true).write(true).open(&node)?;
            match bind(&dev, &backing, file) {
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

    fn detach(&self, device: &Path) -> io::Result<()> {
        let dev = OpenOptions::new().read(true).open(device)?;
        match ioctl_arg(&dev, LOOP_CLR_FD, 0) {
            Ok(_) => Ok(()),
            // ENXIO: not bound (already detached).
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(e) => Err(e),
        }
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

/// Errors sysfs gives for a loop device that is not bound or that
/// another process is binding or releasing while we read it.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO))
}

/// An in-memory stand-in for unit tests: devices are `/dev/fakeloopN`.
#[cfg(any(test, feature = "testkit"))]
#[derive(Debug, Default)]
pub struct FakeLoops {
    bound: std::sync::Mutex<Vec<(PathBuf, PathBuf)>>,
    next: std::sync::atomic::AtomicU32,
}

#[cfg(any(test, feature = "testkit"))]
impl LoopDevices for FakeLoops {
    fn attach(&self, file: &Path) -> io::Result<PathBuf> {
        fs::metadata(file)?;
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dev = PathBuf::from(format!("/dev/fakeloop{n}"));
        self.bound.lock().unwrap().push((dev.clone(), file.to_owned()));
        Ok(dev)
    }

    fn detach(&self, device: &Path) -> io::Result<()> {
        self.bound.lock().unwrap().retain(|(d, _)| d != device);
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<(PathBuf, PathBuf)>> {
        Ok(self.bound.lock().unwrap().clone())
    }
}
