//! The `local` backend: datastores are directories, attach is a loop device.
//!
//! Disks are written exactly as ESXi keeps them on VMFS: a `vmfs`
//! descriptor and a raw `-flat.vmdk` extent (mode 0600), sparse for `thin`,
//! allocated with `fallocate` for `zeroedthick`, allocated and zero-written
//! for `eagerzeroedthick`.
//!
//! Every file is reached through the datastore door ([`crate::store`]):
//! nothing is followed through a link, only regular files are opened or
//! deleted, and a loop device is bound from the extent's already opened
//! and checked descriptor. A device counts as this volume's only when the
//! kernel says it is bound to the very inode of the volume's extent
//! (`LOOP_GET_STATUS64`), never by a path match alone.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use vmdk_protocol::{AttachAs, DiskFormat, DiskLocation, PolicyState};

use super::loopdev::LoopDevices;
use super::{Attachment, BackendError, DiskBackend, DiskInfo, DiskRef, PolicySpec};
use crate::datastore::{Datastore, LocalFolder, VolumeFiles, VolumeFolder};
use crate::fsutil::{holds_no_data, sparse_copy_reporting};
use crate::progress::Progress;
use crate::store::{tighten_file_mode, Access, FileId, FileKind, StoreError, FILE_MODE};
use crate::vmdk::{new_disk_uuid, Descriptor, MAX_DESCRIPTOR_BYTES};

/// Directory datastores plus loop devices.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    loops: Arc<dyn LoopDevices>,
}

/// The path the kernel shows for an open file (`/proc/self/fd/N`).
fn real_path(file: &File) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

impl LocalBackend {
    /// A backend using `loops` for attach and detach.
    pub fn new(loops: Arc<dyn LoopDevices>) -> Self {
        Self { loops }
    }

    fn folder(disk: &DiskRef<'_>, create: bool) -> Result<Option<LocalFolder>, BackendError> {
        Ok(disk.datastore.folder(disk.vmgroup, create)?)
    }

    fn existing_folder(disk: &DiskRef<'_>) -> Result<LocalFolder, BackendError> {
        Self::folder(disk, false)?.ok_or_else(|| BackendError::Missing {
            file: disk.shown(&disk.files().descriptor),
        })
    }

    fn read_descriptor(
        folder: &LocalFolder,
        disk: &DiskRef<'_>,
        files: &VolumeFiles,
    ) -> Result<Descriptor, BackendError> {
        let bytes = folder
            .dir()
            .read_bounded(&files.descriptor, MAX_DESCRIPTOR_BYTES)?
            .ok_or_else(|| BackendError::Missing {
                file: disk.shown(&files.descriptor),
            })?;
        Descriptor::parse_bytes(&bytes).map_err(|source| BackendError::Descriptor {
            file: disk.shown(&files.descriptor),
            source,
        })
    }

    /// The descriptor, checked to describe the one extent this backend
    /// uses (`<vol>-flat.vmdk`), before anything is bound or copied.
    fn own_descriptor(
        folder: &LocalFolder,
        disk: &DiskRef<'_>,
        files: &VolumeFiles,
    ) -> Result<Descriptor, BackendError> {
        let d = Self::read_descriptor(folder, disk, files)?;
        match d.extents.as_slice() {
            [e] if e.file == files.flat => Ok(d),
            _ => Err(BackendError::Inconsistent {
                file: disk.shown(&files.descriptor),
                what: format!(
                    "it does not describe exactly one extent named {}; vmdk uses only such disks",
                    files.flat
                ),
            }),
        }
    }

    /// Opens the extent, checking it is a regular file of the descriptor's
    /// capacity.
    fn open_extent(
        folder: &LocalFolder,
        disk: &DiskRef<'_>,
        files: &VolumeFiles,
        desc: &Descriptor,
        access: Access,
    ) -> Result<File, BackendError> {
        let file = folder.open(&files.flat, access)?.ok_or_else(|| BackendError::Missing {
            file: disk.shown(&files.flat),
        })?;
        let len = file
            .metadata()
            .map_err(|source| BackendError::Io {
                op: "look at",
                file: disk.shown(&files.flat),
                source,
            })?
            .len();
        if len != desc.capacity_bytes() {
            return Err(BackendError::Inconsistent {
                file: disk.shown(&files.flat),
                what: format!(
                    "the extent holds {len} bytes but the descriptor declares {}",
                    desc.capacity_bytes()
                ),
            });
        }
        Ok(file)
    }

    /// The loop devices bound to exactly this open extent.
    fn bound_devices(&self, extent: &File, disk: &DiskRef<'_>) -> Result<Vec<PathBuf>, BackendError> {
        let id = FileId::of(extent).map_err(|source| BackendError::Io {
            op: "look at",
            file: disk.shown(&disk.files().flat),
            source,
        })?;
        let Some(path) = real_path(extent) else {
            return Ok(Vec::new());
        };
        let list = self.loops.list().map_err(|source| BackendError::Device {
            op: "list loop devices for",
            device: disk.shown(&disk.files().flat).to_string(),
            source,
        })?;
        let mut out = Vec::new();
        for (dev, backing) in list {
            if backing != path {
                continue;
            }
            // The path the kernel shows is a hint; the inode decides.
            match self.loops.backing(&dev) {
                Ok(Some(b)) if b == id => out.push(dev),
                Ok(_) => {}
                Err(source) => {
                    return Err(BackendError::Device {
                        op: "read the status of",
                        device: dev.display().to_string(),
                        source,
                    })
                }
            }
        }
        Ok(out)
    }

    /// The extent as it is, for attachment lookups: `None` when the volume
    /// or its extent is gone.
    fn current_extent(disk: &DiskRef<'_>) -> Result<Option<File>, BackendError> {
        let Some(folder) = Self::folder(disk, false)? else {
            return Ok(None);
        };
        Ok(folder.open(&disk.files().flat, Access::Read)?)
    }

    fn allocate(file: &File, capacity: u64, format: DiskFormat, progress: &Progress) -> io::Result<()> {
        match format {
            DiskFormat::Thin => file.set_len(capacity)?,
            DiskFormat::ZeroedThick | DiskFormat::EagerZeroedThick => {
                let len = i64::try_from(capacity).map_err(|_| io::Error::other("size too large"))?;
                // SAFETY: `file` is an open descriptor for the duration of the call.
                let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                if format == DiskFormat::EagerZeroedThick {
                    progress.start(capacity);
                    let zeros = vec![0u8; 1 << 20];
                    let mut w = file;
                    let mut done = 0u64;
                    while done < capacity {
                        let n = (capacity - done).min(zeros.len() as u64) as usize;
                        w.write_all(&zeros[..n])?;
                        done += n as u64;
                        progress.set_done(done)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn write_descriptor(
        folder: &LocalFolder,
        files: &VolumeFiles,
        capacity: u64,
        thin: bool,
    ) -> Result<Descriptor, BackendError> {
        let mut rnd = [0u8; 16];
        File::open("/dev/urandom")
            .and_then(|mut f| io::Read::read_exact(&mut f, &mut rnd))
            .map_err(|source| BackendError::Io {
                op: "read random bytes for",
                file: folder.dir().file(&files.descriptor),
                source,
            })?;
        let uuid = new_disk_uuid(rnd);
        let cid = u32::from_be_bytes([rnd[12], rnd[13], rnd[14], rnd[15]]);
        let d = Descriptor::new_vmfs(&files.flat, capacity, thin, &uuid, cid);
        folder.dir().write_atomic(&files.descriptor, d.render().as_bytes())?;
        Ok(d)
    }

    /// Writes a new disk: extent (0600, `O_EXCL`), filled by `fill`, synced,
    /// then the descriptor. On failure both files are removed.
    fn write_new_disk(
        disk: &DiskRef<'_>,
        capacity: u64,
        format: DiskFormat,
        progress: &Progress,
        fill: impl FnOnce(&File) -> io::Result<()>,
    ) -> Result<DiskInfo, BackendError> {
        let folder = Self::folder(disk, true)?.expect("created");
        let files = disk.files();
        // A leftover of a create that crashed before its metadata was
        // written (the service lets only its own marked leftovers reach
        // here); only a regular file is ever deleted.
        folder.dir().remove(&files.flat)?;
        let result = (|| {
            let out = folder.dir().create_new(&files.flat, FILE_MODE)?;
            let io = |op| {
                let file = disk.shown(&files.flat);
                move |source| BackendError::Io { op, file, source }
            };
            Self::allocate(&out, capacity, format, progress).map_err(io("allocate"))?;
            fill(&out).map_err(io("write"))?;
            out.sync_all().map_err(io("sync"))?;
            let d = Self::write_descriptor(&folder, &files, capacity, format == DiskFormat::Thin)?;
            let allocated = out
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            Ok(DiskInfo {
                capacity_bytes: capacity,
                allocated_bytes: allocated,
                thin: d.is_thin(),
                uuid: d.uuid().map(str::to_owned),
            })
        })();
        if result.is_err() {
            let _ = folder.dir().remove(&files.flat);
            let _ = folder.dir().remove(&files.descriptor);
        }
        result
    }
}

impl LocalBackend {
    fn create_disk_blocking(
        &self,
        disk: &DiskRef<'_>,
        capacity_bytes: u64,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        Self::write_new_disk(disk, capacity_bytes, format, progress, |_| Ok(()))
    }

    fn clone_disk_blocking(
        &self,
        src: &DiskRef<'_>,
        dst: &DiskRef<'_>,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        let folder = Self::existing_folder(src)?;
        let files = src.files();
        let desc = Self::own_descriptor(&folder, src, &files)?;
        let capacity = desc.capacity_bytes();
        // Regular, of the declared size, opened once: what is copied is
        // exactly what was checked.
        let input = Self::open_extent(&folder, src, &files, &desc, Access::Read)?;
        // An eagerzeroedthick copy reports its zeroing first, then the
        // copy restarts the count: the copy is the long part of a clone.
        Self::write_new_disk(dst, capacity, format, progress, |out| {
            progress.start(capacity);
            sparse_copy_reporting(&input, out, capacity, &mut |at| progress.set_done(at))
        })
    }

    fn delete_disk_blocking(&self, disk: &DiskRef<'_>) -> Result<(), BackendError> {
        let Some(folder) = Self::folder(disk, false)? else {
            return Ok(());
        };
        let files = disk.files();
        folder.dir().remove(&files.descriptor)?;
        folder.dir().remove(&files.flat)?;
        // The deletes must survive a crash before the remove is reported.
        folder.dir().sync()?;
        Ok(())
    }

    fn disk_info_blocking(&self, disk: &DiskRef<'_>) -> Result<DiskInfo, BackendError> {
        Self::disk_info_of(&Self::existing_folder(disk)?, disk)
    }

    /// [`DiskBackend::disk_info`] of a disk in `folder` (its vmgroup
    /// folder, already opened through the datastore door).
    fn disk_info_of(folder: &LocalFolder, disk: &DiskRef<'_>) -> Result<DiskInfo, BackendError> {
        let files = disk.files();
        let desc = Self::read_descriptor(folder, disk, &files)?;
        let extent = match folder.dir().stat(&files.flat)? {
            None => {
                return Err(BackendError::Missing {
                    file: disk.shown(&files.flat),
                })
            }
            Some(st) if st.kind != FileKind::Regular => {
                return Err(StoreError::WrongKind {
                    file: disk.shown(&files.flat),
                    found: st.kind,
                    expected: FileKind::Regular,
                }
                .into())
            }
            Some(st) => st,
        };
        if desc.extents.len() == 1 && extent.size != desc.capacity_bytes() {
            return Err(BackendError::Inconsistent {
                file: disk.shown(&files.flat),
                what: format!(
                    "the extent holds {} bytes but the descriptor declares {}",
                    extent.size,
                    desc.capacity_bytes()
                ),
            });
        }
        Ok(DiskInfo {
            capacity_bytes: desc.capacity_bytes(),
            allocated_bytes: extent.allocated,
            thin: desc.is_thin(),
            uuid: desc.uuid().map(str::to_owned),
        })
    }

    fn attach_blocking(&self, disk: &DiskRef<'_>) -> Result<Attachment, BackendError> {
        let folder = Self::existing_folder(disk)?;
        let files = disk.files();
        let desc = Self::own_descriptor(&folder, disk, &files)?;
        let extent = Self::open_extent(&folder, disk, &files, &desc, Access::ReadWrite)?;
        // Extents written by older versions were 0644.
        let _ = tighten_file_mode(&extent, FILE_MODE);
        if let Some(dev) = self.bound_devices(&extent, disk)?.into_iter().next() {
            // Bound before: what was written through it is not known here.
            return Ok(device_attachment(&dev));
        }
        // Asked of the very descriptor that is bound, before the device
        // exists: nothing but this extent's own file can have written it.
        let blank = holds_no_data(&extent);
        let name = real_path(&extent).unwrap_or_else(|| PathBuf::from(&files.flat));
        let dev = self
            .loops
            .attach(&extent, &name)
            .map_err(|source| BackendError::Device {
                op: "attach a loop device to",
                device: disk.shown(&files.flat).to_string(),
                source,
            })?;
        Ok(Attachment {
            blank,
            ..device_attachment(&dev)
        })
    }

    fn detach_blocking(&self, disk: &DiskRef<'_>) -> Result<(), BackendError> {
        let Some(extent) = Self::current_extent(disk)? else {
            return Ok(());
        };
        let id = FileId::of(&extent).map_err(|source| BackendError::Io {
            op: "look at",
            file: disk.shown(&disk.files().flat),
            source,
        })?;
        for dev in self.bound_devices(&extent, disk)? {
            self.loops.detach(&dev, id).map_err(|source| {
                if source.raw_os_error() == Some(libc::EBUSY) {
                    BackendError::Busy {
                        device: dev.display().to_string(),
                    }
                } else {
                    BackendError::Device {
                        op: "detach loop device",
                        device: dev.display().to_string(),
                        source,
                    }
                }
            })?;
        }
        Ok(())
    }

    fn apply_policy_blocking(&self, disk: &DiskRef<'_>, name: &str) -> Result<Option<PolicyState>, BackendError> {
        // A directory datastore has no storage policy to set: the policy is
        // recorded in the volume's metadata by the service. The disk must
        // still be there, as it must be for a real backend.
        let folder = Self::existing_folder(disk)?;
        let files = disk.files();
        match folder.dir().stat(&files.descriptor)? {
            Some(st) if st.kind == FileKind::Regular => {}
            _ => {
                return Err(BackendError::Missing {
                    file: disk.shown(&files.descriptor),
                })
            }
        }
        tracing::debug!(disk = %disk.shown(&files.descriptor), policy = name, "policy recorded (local backend)");
        Ok(None)
    }

    fn attached_extents_blocking(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError> {
        let list = self.loops.list().map_err(|source| BackendError::Device {
            op: "list loop devices",
            device: "/sys/block".into(),
            source,
        })?;
        Ok(list
            .into_iter()
            .map(|(dev, backing)| (backing, device_attachment(&dev)))
            .collect())
    }

    fn attachment_blocking(&self, disk: &DiskRef<'_>) -> Result<Option<Attachment>, BackendError> {
        let Some(extent) = Self::current_extent(disk)? else {
            return Ok(None);
        };
        Ok(self
            .bound_devices(&extent, disk)?
            .into_iter()
            .next()
            .map(|d| device_attachment(&d)))
    }
}

/// A loop device as an attachment: the guest is this host, and the VM is
/// what the service's records say.
fn device_attachment(dev: &std::path::Path) -> Attachment {
    Attachment {
        vm: None,
        location: DiskLocation::Device {
            path: dev.display().to_string(),
        },
        blank: false,
    }
}

/// A [`DiskRef`] that can move to a blocking thread.
#[derive(Debug, Clone)]
struct OwnedDisk {
    datastore: Datastore,
    vmgroup: String,
    volume: String,
}

impl OwnedDisk {
    fn of(d: &DiskRef<'_>) -> Self {
        Self {
            datastore: d.datastore.clone(),
            vmgroup: d.vmgroup.to_owned(),
            volume: d.volume.to_owned(),
        }
    }

    fn r(&self) -> DiskRef<'_> {
        DiskRef {
            datastore: &self.datastore,
            vmgroup: &self.vmgroup,
            volume: &self.volume,
        }
    }
}

impl LocalBackend {
    /// Runs a blocking file or device call on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LocalBackend) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let me = self.clone();
        vmdk_common::runtime::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| BackendError::Device {
                op: "run a blocking call for",
                device: "the local backend".into(),
                source: io::Error::other(e.to_string()),
            })?
    }
}

#[async_trait::async_trait]
impl DiskBackend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn create_disk(
        &self,
        disk: &DiskRef<'_>,
        capacity_bytes: u64,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        let d = OwnedDisk::of(disk);
        let p = progress.clone();
        self.blocking(move |b| b.create_disk_blocking(&d.r(), capacity_bytes, format, &p))
            .await
    }

    async fn clone_disk(
        &self,
        src: &DiskRef<'_>,
        dst: &DiskRef<'_>,
        format: DiskFormat,
        progress: &Progress,
    ) -> Result<DiskInfo, BackendError> {
        let (s, d) = (OwnedDisk::of(src), OwnedDisk::of(dst));
        let p = progress.clone();
        self.blocking(move |b| b.clone_disk_blocking(&s.r(), &d.r(), format, &p))
            .await
    }

    async fn delete_disk(&self, disk: &DiskRef<'_>) -> Result<(), BackendError> {
        let d = OwnedDisk::of(disk);
        self.blocking(move |b| b.delete_disk_blocking(&d.r())).await
    }

    async fn disk_info(&self, disk: &DiskRef<'_>) -> Result<DiskInfo, BackendError> {
        let d = OwnedDisk::of(disk);
        self.blocking(move |b| b.disk_info_blocking(&d.r())).await
    }

    fn disk_info_in(&self, folder: &LocalFolder, disk: &DiskRef<'_>) -> Option<Result<DiskInfo, BackendError>> {
        Some(Self::disk_info_of(folder, disk))
    }

    async fn attach(
        &self,
        _vm: &str,
        disk: &DiskRef<'_>,
        _attach_as: AttachAs,
        _policy: Option<PolicySpec<'_>>,
    ) -> Result<Attachment, BackendError> {
        // A loop device has no disk mode: independent or not, writes go to
        // the extent.
        let d = OwnedDisk::of(disk);
        self.blocking(move |b| b.attach_blocking(&d.r())).await
    }

    async fn detach(&self, _vm: &str, disk: &DiskRef<'_>) -> Result<(), BackendError> {
        let d = OwnedDisk::of(disk);
        self.blocking(move |b| b.detach_blocking(&d.r())).await
    }

    async fn attachment(&self, disk: &DiskRef<'_>, _vm_hint: Option<&str>) -> Result<Option<Attachment>, BackendError> {
        let d = OwnedDisk::of(disk);
        self.blocking(move |b| b.attachment_blocking(&d.r())).await
    }

    async fn folder(
        &self,
        datastore: &Datastore,
        vmgroup: &str,
        create: bool,
    ) -> Result<Option<Box<dyn VolumeFolder>>, StoreError> {
        let (ds, group) = (datastore.clone(), vmgroup.to_owned());
        let shown = datastore.shown();
        vmdk_common::runtime::spawn_blocking(move || ds.folder(&group, create))
            .await
            .map_err(|e| StoreError::Io {
                op: "open a folder of",
                file: shown,
                source: io::Error::other(e.to_string()),
            })?
            .map(|f| f.map(|f| Box::new(f) as Box<dyn VolumeFolder>))
    }

    async fn apply_policy(
        &self,
        disk: &DiskRef<'_>,
        policy: PolicySpec<'_>,
        _holder: Option<&str>,
    ) -> Result<Option<PolicyState>, BackendError> {
        let d = OwnedDisk::of(disk);
        let name = policy.name.to_owned();
        self.blocking(move |b| b.apply_policy_blocking(&d.r(), &name)).await
    }

    async fn attached_extents(&self) -> Result<Vec<(PathBuf, Attachment)>, BackendError> {
        self.blocking(|b| b.attached_extents_blocking()).await
    }
}
