//! The `local` backend: datastores are directories, attach is a loop device.
//!
//! Disks are written exactly as ESXi keeps them on VMFS: a `vmfs`
//! descriptor and a raw `-flat.vmdk` extent, sparse for `thin`, allocated
//! with `fallocate` for `zeroedthick`, allocated and zero-written for
//! `eagerzeroedthick`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmdk_protocol::DiskFormat;

use super::loopdev::LoopDevices;
use super::{Attachment, BackendError, DiskBackend};
use crate::datastore::DiskPaths;
use crate::fsutil::{atomic_write, fsync_dir, remove_if_exists, sparse_copy};
use crate::vmdk::{new_disk_uuid, Descriptor, MAX_DESCRIPTOR_BYTES};

/// Directory datastores plus loop devices.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    loops: Arc<dyn LoopDevices>,
}

impl LocalBackend {
    /// A backend using `loops` for attach and detach.
    pub fn new(loops: Arc<dyn LoopDevices>) -> Self {
        Self { loops }
    }

    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackendError + 'a {
        move |source| BackendError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    fn bound_devices(&self, disk: &DiskPaths) -> Result<Vec<PathBuf>, BackendError> {
        let flat = match std::fs::canonicalize(&disk.flat) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io("resolve", &disk.flat)(e)),
        };
        let list = self.loops.list().map_err(|source| BackendError::Device {
            op: "list loop devices for",
            path: disk.flat.clone(),
            source,
        })?;
        Ok(list
            .into_iter()
            .filter(|(_, backing)| *backing == flat || *backing == disk.flat)
            .map(|(dev, _)| dev)
            .collect())
    }

    fn write_new_extent(path: &Path, capacity: u64, format: DiskFormat) -> io::Result<File> {
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        match format {
            DiskFormat::Thin => f.set_len(capacity)?,
            DiskFormat::ZeroedThick | DiskFormat::EagerZeroedThick => {
                let len = i64::try_from(capacity).map_err(|_| io::Error::other("size too large"))?;
                // SAFETY: `f` is an open descriptor for the duration of the call.
                let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                if format == DiskFormat::EagerZeroedThick {
                    let zeros = vec![0u8; 1 << 20];
                    let mut w = &f;
                    let mut left = capacity;
                    while left > 0 {
                        let n = left.min(zeros.len() as u64) as usize;
                        w.write_all(&zeros[..n])?;
                        left -= n as u64;
                    }
                }
            }
        }
        f.sync_all()?;
        Ok(f)
    }

    fn write_descriptor(disk: &DiskPaths, capacity: u64, thin: bool) -> Result<Descriptor, BackendError> {
        let mut rnd = [0u8; 16];
        File::open("/dev/urandom")
            .and_then(|mut f| io::Read::read_exact(&mut f, &mut rnd))
            .map_err(Self::io("read random bytes for", &disk.descriptor))?;
        let uuid = new_disk_uuid(rnd);
        let cid = u32::from_be_bytes([rnd[12], rnd[13], rnd[14], rnd[15]]);
        let d = Descriptor::new_vmfs(&disk.flat_file_name(), capacity, thin, &uuid, cid);
        atomic_write(&disk.descriptor, d.render().as_bytes())
            .map_err(Self::io("write descriptor", &disk.descriptor))?;
        Ok(d)
    }
}

impl DiskBackend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn create_disk(
        &self,
        disk: &DiskPaths,
        capacity_bytes: u64,
        format: DiskFormat,
    ) -> Result<Descriptor, BackendError> {
        // A leftover from a create that crashed before its metadata was
        // written is not a volume; start from scratch.
        remove_if_exists(&disk.flat).map_err(Self::io("remove stale extent", &disk.flat))?;
        let result = Self::write_new_extent(&disk.flat, capacity_bytes, format)
            .map_err(Self::io("create extent", &disk.flat))
            .and_then(|_| Self::write_descriptor(disk, capacity_bytes, format == DiskFormat::Thin));
        if result.is_err() {
            let _ = remove_if_exists(&disk.flat);
            let _ = remove_if_exists(&disk.descriptor);
        }
        result
    }

    fn clone_disk(&self, src: &DiskPaths, dst: &DiskPaths, format: DiskFormat) -> Result<Descriptor, BackendError> {
        let capacity = self.descriptor(src)?.capacity_bytes();
        remove_if_exists(&dst.flat).map_err(Self::io("remove stale extent", &dst.flat))?;
        let result = (|| {
            let out =
                Self::write_new_extent(&dst.flat, capacity, format).map_err(Self::io("create extent", &dst.flat))?;
            let input = File::open(&src.flat).map_err(Self::io("open source extent", &src.flat))?;
            sparse_copy(&input, &out, capacity).map_err(Self::io("copy extent to", &dst.flat))?;
            Self::write_descriptor(dst, capacity, format == DiskFormat::Thin)
        })();
        if result.is_err() {
            let _ = remove_if_exists(&dst.flat);
            let _ = remove_if_exists(&dst.descriptor);
        }
        result
    }

    fn delete_disk(&self, disk: &DiskPaths) -> Result<(), BackendError> {
        remove_if_exists(&disk.descriptor).map_err(Self::io("delete descriptor", &disk.descriptor))?;
        remove_if_exists(&disk.flat).map_err(Self::io("delete extent", &disk.flat))?;
        fsync_dir(&disk.dir).map_err(Self::io("sync", &disk.dir))
    }

    fn descriptor(&self, disk: &DiskPaths) -> Result<Descriptor, BackendError> {
        let f = File::open(&disk.descriptor).map_err(Self::io("open descriptor", &disk.descriptor))?;
        let len = f
            .metadata()
            .map_err(Self::io("stat descriptor", &disk.descriptor))?
            .len();
        if len > MAX_DESCRIPTOR_BYTES {
            return Err(BackendError::Descriptor {
                path: disk.descriptor.clone(),
                source: crate::vmdk::DescriptorError::NotADescriptor("larger than 5000 bytes"),
            });
        }
        let text = io::read_to_string(f).map_err(Self::io("read descriptor", &disk.descriptor))?;
        Descriptor::parse(&text).map_err(|source| BackendError::Descriptor {
            path: disk.descriptor.clone(),
            source,
        })
    }

    fn allocated_bytes(&self, disk: &DiskPaths) -> Result<u64, BackendError> {
        let m = std::fs::metadata(&disk.flat).map_err(Self::io("stat extent", &disk.flat))?;
        Ok(m.blocks() * 512)
    }

    fn attach(&self, _vm: &str, disk: &DiskPaths) -> Result<Attachment, BackendError> {
        if let Some(dev) = self.bound_devices(disk)?.into_iter().next() {
            return Ok(Attachment {
                device: Some(dev.display().to_string()),
            });
        }
        let dev = self.loops.attach(&disk.flat).map_err(|source| BackendError::Device {
            op: "attach loop device for",
            path: disk.flat.clone(),
            source,
        })?;
        Ok(Attachment {
            device: Some(dev.display().to_string()),
        })
    }

    fn detach(&self, disk: &DiskPaths) -> Result<(), BackendError> {
        for dev in self.bound_devices(disk)? {
            self.loops.detach(&dev).map_err(|source| BackendError::Device {
                op: "detach loop device",
                path: dev.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn apply_policy(&self, disk: &DiskPaths, name: &str, _content: &str) -> Result<(), BackendError> {
        // A directory datastore has no storage policy to set: the policy is
        // recorded in the volume's metadata by the service. The disk must
        // still be there, as it must be for a real backend.
        std::fs::metadata(&disk.descriptor).map_err(Self::io("apply policy to", &disk.descriptor))?;
        tracing::debug!(disk = %disk.descriptor.display(), policy = name, "policy recorded (local backend)");
        Ok(())
    }

    fn attached_extents(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError> {
        let list = self.loops.list().map_err(|source| BackendError::Device {
            op: "list loop devices",
            path: PathBuf::from("/sys/block"),
            source,
        })?;
        Ok(list
            .into_iter()
            .map(|(dev, backing)| {
                (
                    backing,
                    Attachment {
                        device: Some(dev.display().to_string()),
                    },
                )
            })
            .collect())
    }

    fn attachment(&self, disk: &DiskPaths) -> Result<Option<Attachment>, BackendError> {
        Ok(self.bound_devices(disk)?.into_iter().next().map(|d| Attachment {
            device: Some(d.display().to_string()),
        }))
    }
}
