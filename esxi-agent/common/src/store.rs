//! The one door to the datastore: every file the agent reads, writes,
//! locks or deletes on a datastore goes through [`Dir`].
//!
//! A datastore is shared ground. Other hosts, administrators' tools and
//! crafted or damaged disks can put anything into `dockvols/`, and both
//! daemons run as root, so following a planted link or opening a planted
//! FIFO would be a root action on the attacker's behalf. A [`Dir`] is an
//! open directory (a file descriptor), and every operation on it
//!
//! * names one entry directly inside it (no `/`, never `.` or `..`) and
//!   resolves it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` or
//!   `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, so no link is ever followed;
//! * opens files in two steps: an `O_PATH` descriptor that cannot have side
//!   effects (a FIFO does not block, a device is not opened), checked to
//!   be a regular file with `fstat`, then reopened through
//!   `/proc/self/fd`, so there is no window between the check and the use;
//! * bounds every read ([`Dir::read_bounded`]);
//! * creates files `O_CREAT | O_EXCL | O_NOFOLLOW` with mode 0600, and
//!   temp files under unpredictable names ([`TEMP_PREFIX`]);
//! * deletes only regular files ([`Dir::remove`]).
//!
//! Errors name files in ESXi's datastore form ([`DsPath`],
//! `[local] dockvols/_DEFAULT/v.vmdk`), never by host path, so their text
//! may go to any caller.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{self, Flock, FlockArg, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

/// Mode of every directory the agent creates on a datastore.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the agent creates on a datastore.
pub const FILE_MODE: u32 = 0o600;
/// Prefix of temp files of atomic writes: `.vmdk-tmp.<16 random hex>`.
/// While one is being written its writer holds an `flock` on it, so a
/// leftover (no lock) is told from a write under way.
pub const TEMP_PREFIX: &str = ".vmdk-tmp.";

/// How a datastore file is named in messages: `[datastore] dockvols/...`,
/// the form ESXi uses. Never a host path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DsPath {
    datastore: String,
    rel: String,
}

impl DsPath {
    /// `[datastore] rel`; `rel` may be empty (the datastore itself).
    pub fn new(datastore: &str, rel: &str) -> Self {
        Self {
            datastore: datastore.to_owned(),
            rel: rel.to_owned(),
        }
    }

    /// This path with `name` appended.
    pub fn join(&self, name: &str) -> Self {
        let rel = if self.rel.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.rel)
        };
        Self {
            datastore: self.datastore.clone(),
            rel,
        }
    }

    /// The datastore name.
    pub fn datastore(&self) -> &str {
        &self.datastore
    }

    /// The path inside the datastore.
    pub fn rel(&self) -> &str {
        &self.rel
    }
}

impl fmt::Display for DsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rel.is_empty() {
            write!(f, "[{}]", self.datastore)
        } else {
            write!(f, "[{}] {}", self.datastore, self.rel)
        }
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
    /// A block device node.
    BlockDevice,
    /// A character device node.
    CharDevice,
}

impl FileKind {
    fn from_mode(mode: u32) -> Self {
        match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => Self::Regular,
            SFlag::S_IFDIR => Self::Directory,
            SFlag::S_IFLNK => Self::Symlink,
            SFlag::S_IFIFO => Self::Fifo,
            SFlag::S_IFSOCK => Self::Socket,
            SFlag::S_IFBLK => Self::BlockDevice,
            _ => Self::CharDevice,
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Regular => "regular file",
            Self::Directory => "directory",
            Self::Symlink => "symbolic link",
            Self::Fifo => "FIFO",
            Self::Socket => "socket",
            Self::BlockDevice => "block device",
            Self::CharDevice => "character device",
        })
    }
}

/// What `fstatat` says about an entry (without following it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Its kind.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Bytes allocated (`st_blocks * 512`).
    pub allocated: u64,
    /// Identity: device and inode.
    pub id: FileId,
    /// Last status change, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// Last modification (of a directory: an entry was added, removed or
    /// renamed), nanoseconds since the epoch.
    pub mtime_ns: i128,
}

/// A file's identity: `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Why a datastore file operation failed. Files are named as [`DsPath`]s.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call failed.
    #[error("cannot {op} {file}")]
    Io {
        /// What was being done, e.g. `read`.
        op: &'static str,
        /// The file.
        file: DsPath,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The entry is not of the kind this name must be.
    #[error("{file} is a {found}, not a {expected}; vmdk never follows, opens or deletes it (move it away to use this name)")]
    WrongKind {
        /// The entry.
        file: DsPath,
        /// What it is.
        found: FileKind,
        /// What it must be.
        expected: FileKind,
    },
    /// A file is larger than anything vmdk writes under that name.
    #[error("{file} is larger than {limit} bytes, which no vmdk file of its kind is; it is not read")]
    TooLarge {
        /// The file.
        file: DsPath,
        /// The bound.
        limit: u64,
    },
    /// A create found the name taken.
    #[error("{file} already exists")]
    Exists {
        /// The file.
        file: DsPath,
    },
    /// A vmgroup folder is a symbolic link that does not point at a folder
    /// directly inside the same `dockvols`.
    #[error("{file} is a symbolic link that does not point at a folder directly inside the same dockvols; vmdk does not follow it")]
    ForeignLink {
        /// The link.
        file: DsPath,
    },
    /// A name that cannot be one entry of a directory (a bug in the caller).
    #[error("{name:?} is not a single file name")]
    BadName {
        /// The name.
        name: String,
    },
}

impl StoreError {
    /// Whether the cause is a full file system or quota.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }

    fn io(op: &'static str, file: DsPath) -> impl FnOnce(Errno) -> StoreError {
        move |e| StoreError::Io {
            op,
            file,
            source: io::Error::from(e),
        }
    }
}

/// Refuses anything that is not one entry directly inside a directory.
fn check_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') || name.len() > 255 {
        return Err(StoreError::BadName { name: name.to_owned() });
    }
    Ok(())
}

/// How [`Dir::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// One directory entry, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name (entries whose name is not UTF-8 are skipped: no vmdk
    /// file has one).
    pub name: String,
    /// Its kind, when the directory listing says it (it nearly always does).
    pub kind: Option<FileKind>,
}

/// An open directory on a datastore; see the module docs.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    shown: DsPath,
}

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH.union(ResolveFlag::RESOLVE_NO_SYMLINKS);

fn random_hex() -> String {
    let mut buf = [0u8; 8];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            // No entropy source at all: fall back to the clock and pid,
            // still unique enough for O_EXCL to catch a collision.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            buf = ((t as u64) ^ ((std::process::id() as u64) << 32)).to_le_bytes();
            break;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Dir {
    /// Opens a directory the administrator configured (a datastore root, a
    /// state directory). Its path is trusted: links in it are the
    /// administrator's choice. Everything below it is not.
    pub fn open_trusted(path: &Path, shown: DsPath) -> Result<Self, StoreError> {
        let fd = fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(StoreError::io("open", shown.clone()))?;
        Ok(Self { fd, shown })
    }

    /// How this directory is named in messages.
    pub fn shown(&self) -> &DsPath {
        &self.shown
    }

    /// How `name` in this directory is named in messages.
    pub fn file(&self, name: &str) -> DsPath {
        self.shown.join(name)
    }

    /// The same directory, named `shown` in messages (a vmgroup reached
    /// through its link keeps the link's name).
    pub fn named(self, shown: DsPath) -> Self {
        Self { fd: self.fd, shown }
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A second handle on the same directory.
    pub fn try_clone(&self) -> Result<Self, StoreError> {
        let fd = self.fd.try_clone().map_err(|source| StoreError::Io {
            op: "duplicate handle of",
            file: self.shown.clone(),
            source,
        })?;
        Ok(Self {
            fd,
            shown: self.shown.clone(),
        })
    }

    fn openat2(&self, name: &str, flags: OFlag, mode: u32) -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(RESOLVE);
        loop {
            match fcntl::openat2(self.fd.as_fd(), name, how) {
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// The entry `name`, not followed; `None` when there is none.
    pub fn stat(&self, name: &str) -> Result<Option<Stat>, StoreError> {
        check_name(name)?;
        match nix::sys::stat::fstatat(self.fd.as_fd(), name, fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(stat_of(&st))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(StoreError::io("look at", self.file(name))(e)),
        }
    }

    /// This directory's own status.
    pub fn stat_self(&self) -> Result<Stat, StoreError> {
        nix::sys::stat::fstat(self.fd.as_fd())
            .map(|st| stat_of(&st))
            .map_err(StoreError::io("look at", self.shown.clone()))
    }

    /// Opens the subdirectory `name` (creating it with `mode` first when
    /// `create` is given). `None` when it does not exist. A symbolic link
    /// or any other kind of entry is refused.
    pub fn subdir(&self, name: &str, create: Option<u32>) -> Result<Option<Dir>, StoreError> {
        check_name(name)?;
        if let Some(mode) = create {
            match nix::sys::stat::mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(mode)) {
                Ok(()) => self.sync()?,
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(StoreError::io("create folder", self.file(name))(e)),
            }
        }
        match self.openat2(name, OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0) {
            Ok(fd) => Ok(Some(Dir {
                fd,
                shown: self.file(name),
            })),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) | Err(Errno::EXDEV) => {
                let found = self.stat(name)?.map_or(FileKind::Symlink, |s| s.kind);
                Err(StoreError::WrongKind {
                    file: self.file(name),
                    found,
                    expected: FileKind::Directory,
                })
            }
            Err(e) => Err(StoreError::io("open folder", self.file(name))(e)),
        }
    }

    /// The text of the symbolic link `name` (bounded by the kernel to
    /// `PATH_MAX`).
    pub fn read_link(&self, name: &str) -> Result<String, StoreError> {
        check_name(name)?;
        let target = fcntl::readlinkat(self.fd.as_fd(), name).map_err(StoreError::io("read link", self.file(name)))?;
        Ok(target.to_string_lossy().into_owned())
    }

    /// Opens the regular file `name`; `None` when there is no entry of that
    /// name. Anything but a regular file is refused without being opened
    /// (see the module docs for how).
    pub fn open(&self, name: &str, access: Access) -> Result<Option<File>, StoreError> {
        check_name(name)?;
        let path_fd = match self.openat2(name, OFlag::O_PATH, 0) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) | Err(Errno::EXDEV) => {
                return Err(StoreError::WrongKind {
                    file: self.file(name),
                    found: FileKind::Symlink,
                    expected: FileKind::Regular,
                })
            }
            Err(e) => return Err(StoreError::io("open", self.file(name))(e)),
        };
        let st = nix::sys::stat::fstat(path_fd.as_fd()).map_err(StoreError::io("look at", self.file(name)))?;
        let st = stat_of(&st);
        if st.kind != FileKind::Regular {
            return Err(StoreError::WrongKind {
                file: self.file(name),
                found: st.kind,
                expected: FileKind::Regular,
            });
        }
        let flags = match access {
            Access::Read => OFlag::O_RDONLY,
            Access::ReadWrite => OFlag::O_RDWR,
        } | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY;
        let proc_path = format!("/proc/self/fd/{}", path_fd.as_raw_fd());
        let fd =
            fcntl::open(proc_path.as_str(), flags, Mode::empty()).map_err(StoreError::io("open", self.file(name)))?;
        let file = File::from(fd);
        let id = FileId::of(&file).map_err(|source| StoreError::Io {
            op: "look at",
            file: self.file(name),
            source,
        })?;
        if id != st.id {
            // Cannot happen through the magic link; checked all the same.
            return Err(StoreError::Io {
                op: "open",
                file: self.file(name),
                source: io::Error::other("the file changed while it was opened"),
            });
        }
        Ok(Some(file))
    }

    /// Reads the regular file `name`, refusing it when it is larger than
    /// `limit` bytes; `None` when there is no entry of that name.
    pub fn read_bounded(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(file) = self.open(name, Access::Read)? else {
            return Ok(None);
        };
        read_bounded_file(file, limit).map(Some).map_err(|e| match e {
            None => StoreError::TooLarge {
                file: self.file(name),
                limit,
            },
            Some(source) => StoreError::Io {
                op: "read",
                file: self.file(name),
                source,
            },
        })
    }

    /// Creates the regular file `name` with `mode`; refused when any entry
    /// of that name exists (a planted link included).
    pub fn create_new(&self, name: &str, mode: u32) -> Result<File, StoreError> {
        check_name(name)?;
        match self.openat2(name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR, mode) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::EEXIST) => Err(StoreError::Exists { file: self.file(name) }),
            Err(e) => Err(StoreError::io("create", self.file(name))(e)),
        }
    }

    /// Replaces the content of `name` atomically: a temp file with an
    /// unpredictable name is written and fsynced (so the new content is on
    /// disk before any name points at it), renamed over `name`, and the
    /// directory fsynced (so the rename survives a crash). After a crash
    /// `name` holds the old or the new content, never a mix. An existing
    /// `name` that is not a regular file is refused, not replaced. On
    /// failure the temp file is removed.
    pub fn write_atomic(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.replace(name, data)?;
        self.sync()
    }

    /// [`Dir::write_atomic`] without the directory's fsync: the content is
    /// on disk before the name points at it (never torn), but the rename
    /// itself becomes durable with the file system's next commit (a few
    /// seconds), so a crash before then leaves the old content. Only for a
    /// change whose loss a later check repairs (see the callers).
    pub fn write_atomic_deferred(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.replace(name, data)
    }

    /// Writes `data` to a temp file, fsyncs it and renames it over `name`.
    fn replace(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        check_name(name)?;
        if let Some(st) = self.stat(name)? {
            if st.kind != FileKind::Regular {
                return Err(StoreError::WrongKind {
                    file: self.file(name),
                    found: st.kind,
                    expected: FileKind::Regular,
                });
            }
        }
        let (tmp, file) = self.create_temp()?;
        let res = (|| {
            let mut w = &file;
            w.write_all(data)
                .and_then(|()| file.sync_all())
                .map_err(|source| StoreError::Io {
                    op: "write",
                    file: self.file(name),
                    source,
                })?;
            fcntl::renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name)
                .map_err(StoreError::io("replace", self.file(name)))?;
            Ok(())
        })();
        if res.is_err() {
            let _ = nix::unistd::unlinkat(self.fd.as_fd(), tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
        res
    }

    /// A new temp file, locked (see [`TEMP_PREFIX`]).
    fn create_temp(&self) -> Result<(String, File), StoreError> {
        loop {
            let name = format!("{TEMP_PREFIX}{}", random_hex());
            match self.create_new(&name, FILE_MODE) {
                Ok(file) => {
                    // Marks the write as under way (see TEMP_PREFIX). Nobody
                    // else can hold the lock of a file just made; should
                    // flock fail anyway, a leftover check could remove the
                    // file and the rename would fail cleanly.
                    // SAFETY: `file` is an open descriptor for the call.
                    let _ = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                    return Ok((name, file));
                }
                Err(StoreError::Exists { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes the regular file `name`; `false` when there was none. Any
    /// other kind of entry is refused: vmdk deletes only files it could
    /// have made.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        match self.stat(name)? {
            None => return Ok(false),
            Some(st) if st.kind != FileKind::Regular => {
                return Err(StoreError::WrongKind {
                    file: self.file(name),
                    found: st.kind,
                    expected: FileKind::Regular,
                })
            }
            Some(_) => {}
        }
        match nix::unistd::unlinkat(self.fd.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(StoreError::io("delete", self.file(name))(e)),
        }
    }

    /// Renames `from` to `to` in this directory, refusing to replace an
    /// existing `to`. Not synced.
    pub fn rename_noreplace(&self, from: &str, to: &str) -> Result<(), StoreError> {
        check_name(from)?;
        check_name(to)?;
        match fcntl::renameat2(
            self.fd.as_fd(),
            from,
            self.fd.as_fd(),
            to,
            fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => Err(StoreError::Exists { file: self.file(to) }),
            Err(e) => Err(StoreError::io("rename", self.file(from))(e)),
        }
    }

    /// Deletes a leftover temp file of an atomic write: only when it is a
    /// regular file whose writer is gone (its lock is free). `true` when
    /// deleted.
    pub fn remove_stale_temp(&self, name: &str) -> Result<bool, StoreError> {
        if !name.starts_with(TEMP_PREFIX) {
            return Ok(false);
        }
        let Some(file) = self.open(name, Access::Read)? else {
            return Ok(false);
        };
        let id = FileId::of(&file).map_err(|source| StoreError::Io {
            op: "look at",
            file: self.file(name),
            source,
        })?;
        let Ok(locked) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            return Ok(false);
        };
        // Still the same file under that name: delete it while locked.
        if self.stat(name)?.is_some_and(|s| s.id == id) {
            self.remove(name)?;
            drop(locked);
            return Ok(true);
        }
        Ok(false)
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        // A new open file description (not a dup, which would share the
        // directory offset with concurrent listings).
        let fd = self
            .openat2(".", OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0)
            .map_err(StoreError::io("list", self.shown.clone()))?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(StoreError::io("list", self.shown.clone()))?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(StoreError::io("list", self.shown.clone()))?;
            let Ok(name) = e.file_name().to_str() else { continue };
            if name == "." || name == ".." {
                continue;
            }
            let kind = e.file_type().map(|t| match t {
                nix::dir::Type::File => FileKind::Regular,
                nix::dir::Type::Directory => FileKind::Directory,
                nix::dir::Type::Symlink => FileKind::Symlink,
                nix::dir::Type::Fifo => FileKind::Fifo,
                nix::dir::Type::Socket => FileKind::Socket,
                nix::dir::Type::BlockDevice => FileKind::BlockDevice,
                nix::dir::Type::CharacterDevice => FileKind::CharDevice,
            });
            out.push(Entry {
                name: name.to_owned(),
                kind,
            });
        }
        Ok(out)
    }

    /// Fsyncs the directory, making creates, renames and deletes in it
    /// durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(StoreError::io("sync", self.shown.clone()))
    }

    /// Tightens this directory's mode to `mode` if it is looser (never
    /// loosens it). Returns whether it changed.
    pub fn tighten_mode(&self, mode: u32) -> Result<bool, StoreError> {
        let st = self.stat_self()?;
        if st.mode & !mode & 0o7777 == 0 {
            return Ok(false);
        }
        nix::sys::stat::fchmod(self.fd.as_fd(), Mode::from_bits_truncate(st.mode & mode))
            .map_err(StoreError::io("set permissions of", self.shown.clone()))?;
        Ok(true)
    }

    /// Takes an `flock` on the lock file `name` (created 0600 when
    /// missing). `wait: false` gives up at once (`Ok(None)`) when another
    /// holder has it. A lock file unlinked or replaced while this waited is
    /// not the lock any more: the lock is taken again on the new one.
    pub fn lock_file(&self, name: &str, exclusive: bool, wait: bool) -> Result<Option<FileLock>, StoreError> {
        let arg = match (exclusive, wait) {
            (true, true) => FlockArg::LockExclusive,
            (true, false) => FlockArg::LockExclusiveNonblock,
            (false, true) => FlockArg::LockShared,
            (false, false) => FlockArg::LockSharedNonblock,
        };
        loop {
            let file = match self.create_new(name, FILE_MODE) {
                Ok(f) => f,
                Err(StoreError::Exists { .. }) => match self.open(name, Access::ReadWrite)? {
                    Some(f) => f,
                    None => continue,
                },
                Err(e) => return Err(e),
            };
            let id = FileId::of(&file).map_err(|source| StoreError::Io {
                op: "look at",
                file: self.file(name),
                source,
            })?;
            let locked = match Flock::lock(file, arg) {
                Ok(l) => l,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, e)) => return Err(StoreError::io("lock", self.file(name))(e)),
            };
            match self.stat(name)? {
                Some(now) if now.id == id => {
                    return Ok(Some(FileLock {
                        _file: locked,
                        dir: self.try_clone()?,
                        name: name.to_owned(),
                        id,
                    }))
                }
                // Unlinked or replaced while we waited.
                _ if wait => continue,
                _ => return Ok(None),
            }
        }
    }

    /// Bytes free to this process on the file system, and its size.
    pub fn space(&self) -> Result<(u64, u64), StoreError> {
        let s = nix::sys::statvfs::fstatvfs(self.fd.as_fd()).map_err(StoreError::io("look at", self.shown.clone()))?;
        Ok((
            s.blocks_available() as u64 * s.fragment_size() as u64,
            s.blocks() as u64 * s.fragment_size() as u64,
        ))
    }
}

/// Reads at most `limit` bytes of `file`; `Err(None)` when it holds more.
pub fn read_bounded_file(file: File, limit: u64) -> Result<Vec<u8>, Option<io::Error>> {
    let len = file.metadata().map_err(Some)?.len();
    if len > limit {
        return Err(None);
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut buf).map_err(Some)?;
    if buf.len() as u64 > limit {
        return Err(None);
    }
    Ok(buf)
}

fn stat_of(st: &libc::stat) -> Stat {
    Stat {
        kind: FileKind::from_mode(st.st_mode),
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        allocated: st.st_blocks as u64 * 512,
        id: FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        },
        ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
        mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
    }
}

/// A held `flock` on a lock file in a [`Dir`], released on drop.
#[derive(Debug)]
pub struct FileLock {
    _file: Flock<File>,
    dir: Dir,
    name: String,
    id: FileId,
}

impl FileLock {
    /// The directory holding the lock file.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Unlinks the lock file (what it guards is gone); the lock itself is
    /// released on drop. A file that is no longer ours under that name is
    /// left alone.
    pub fn unlink(&self) -> Result<(), StoreError> {
        match self.dir.stat(&self.name)? {
            Some(st) if st.id == self.id => self.dir.remove(&self.name).map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// Sets the permission bits of an open file to `mode` when they are
/// looser. Returns whether they changed.
pub fn tighten_file_mode(file: &File, mode: u32) -> io::Result<bool> {
    let m = file.metadata()?.permissions().mode() & 0o7777;
    if m & !mode == 0 {
        return Ok(false);
    }
    file.set_permissions(std::fs::Permissions::from_mode(m & mode))?;
    Ok(true)
}

/// Writes `data` to `path` atomically, mode 0600, through
/// [`Dir::write_atomic`]: a temp file with an unpredictable name is
/// created `O_EXCL`, written and fsynced, renamed over `path`, and the
/// directory fsynced. After a crash the file holds either the old or the
/// new content, never a mix; on failure nothing is left behind. The
/// directory of `path` is trusted (it is the caller's own, e.g. the
/// plugin's state directory); `path` itself is never followed if it is a
/// link.
pub fn atomic_write(path: &Path, data: &[u8]) -> io::Result<()> {
    atomic_write_with(path, data, true)
}

/// [`atomic_write`], the rename made durable now (`durable`) or with the
/// file system's next commit (see [`Dir::write_atomic_deferred`]).
pub fn atomic_write_with(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no UTF-8 file name"))?;
    let shown = DsPath::new("local", &dir.display().to_string());
    Dir::open_trusted(dir, shown)
        .and_then(|d| {
            if durable {
                d.write_atomic(name, data)
            } else {
                d.write_atomic_deferred(name, data)
            }
        })
        .map_err(|e| match e {
            StoreError::Io { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn dir() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open_trusted(t.path(), DsPath::new("ds", "dockvols")).unwrap();
        (t, d)
    }

    #[test]
    fn never_follows_links_and_names_files_in_datastore_form() {
        let (t, d) = dir();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "top secret\n").unwrap();
        symlink(&secret, t.path().join("link")).unwrap();
        symlink(outside.path(), t.path().join("sub")).unwrap();
        symlink(outside.path().join("missing"), t.path().join("dangling")).unwrap();
        let e = d.read_bounded("link", 100).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::WrongKind {
                    found: FileKind::Symlink,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "[ds] dockvols/link is a symbolic link, not a regular file; vmdk never follows, opens or deletes it (move it away to use this name)"
        );
        assert!(matches!(d.subdir("sub", None), Err(StoreError::WrongKind { .. })));
        assert!(matches!(
            d.subdir("sub", Some(0o700)),
            Err(StoreError::WrongKind { .. })
        ));
        assert!(matches!(
            d.create_new("dangling", 0o600),
            Err(StoreError::Exists { .. })
        ));
        assert!(
            !outside.path().join("missing").exists(),
            "created through a dangling link"
        );
        assert!(matches!(
            d.write_atomic("link", b"x"),
            Err(StoreError::WrongKind { .. })
        ));
        assert!(matches!(d.remove("link"), Err(StoreError::WrongKind { .. })));
        assert!(matches!(
            d.lock_file("dangling", true, true),
            Err(StoreError::WrongKind { .. })
        ));
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top secret\n");
        assert!(!outside.path().join("missing").exists());
        for bad in ["", ".", "..", "a/b", "/etc/passwd"] {
            assert!(matches!(d.stat(bad), Err(StoreError::BadName { .. })), "{bad}");
        }
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let (t, d) = dir();
        nix::unistd::mkfifo(&t.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let e = d.read_bounded("fifo", 100).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::WrongKind {
                    found: FileKind::Fifo,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            d.lock_file("fifo", true, true),
            Err(StoreError::WrongKind { .. })
        ));
        assert!(matches!(d.remove("fifo"), Err(StoreError::WrongKind { .. })));
        assert!(t.path().join("fifo").exists());
    }

    #[test]
    fn reads_are_bounded() {
        let (t, d) = dir();
        std::fs::write(t.path().join("big"), vec![b'x'; 1000]).unwrap();
        assert!(matches!(
            d.read_bounded("big", 999),
            Err(StoreError::TooLarge { limit: 999, .. })
        ));
        assert_eq!(d.read_bounded("big", 1000).unwrap().unwrap().len(), 1000);
        assert!(d.read_bounded("none", 10).unwrap().is_none());
    }

    #[test]
    fn atomic_writes_are_private_and_leave_no_temp() {
        let (t, d) = dir();
        d.write_atomic("a.json", b"one").unwrap();
        d.write_atomic("a.json", b"two").unwrap();
        assert_eq!(std::fs::read(t.path().join("a.json")).unwrap(), b"two");
        let names: Vec<String> = d.entries().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a.json"]);
        let mode = std::fs::metadata(t.path().join("a.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn stale_temp_files_go_but_live_ones_stay() {
        let (t, d) = dir();
        let (live, _file) = d.create_temp().unwrap();
        std::fs::write(t.path().join(".vmdk-tmp.0123456789abcdef"), b"x").unwrap();
        assert!(d.remove_stale_temp(".vmdk-tmp.0123456789abcdef").unwrap());
        assert!(!d.remove_stale_temp(&live).unwrap());
        assert!(t.path().join(&live).exists());
    }

    #[test]
    fn locks_exclude_and_survive_unlink() {
        let (_t, d) = dir();
        let a = d.lock_file("v.lck", true, true).unwrap().unwrap();
        assert!(d.lock_file("v.lck", true, false).unwrap().is_none());
        a.unlink().unwrap();
        // A new file under the name is a new lock.
        let b = d.lock_file("v.lck", true, false).unwrap();
        assert!(b.is_some());
        drop(a);
    }
}
