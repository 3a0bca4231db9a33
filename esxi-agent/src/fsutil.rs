//! Crash-safe file helpers: atomic writes of local state files and
//! sparse-aware copies of open files.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

pub use vmdk_common::store::atomic_write;

/// Copies `src` to `dst` (which must exist, empty or preallocated), copying
/// only the data regions of `src`, so holes stay holes in a thin copy.
pub fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    sparse_copy_reporting(src, dst, len, &mut |_| Ok(()))
}

/// Largest piece [`sparse_copy_reporting`] copies between two reports.
const COPY_STEP: usize = 64 << 20;

/// [`sparse_copy`] that calls `report(offset)` after each piece of at most
/// 64 MiB, with how far the copy got; an error from `report` stops it.
pub fn sparse_copy_reporting(
    src: &File,
    dst: &File,
    len: u64,
    report: &mut dyn FnMut(u64) -> io::Result<()>,
) -> io::Result<()> {
    let sfd = src.as_raw_fd();
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    while pos < end {
        // SAFETY: sfd is a valid open descriptor owned by `src` for the whole call.
        let data = unsafe { libc::lseek(sfd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX).min(COPY_STEP);
            // SAFETY: both descriptors are valid for the call and the offset
            // pointers point at live locals.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dst.as_raw_fd(), &mut off_out, want, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            report(u64::try_from(off_in).unwrap_or(0))?;
        }
        pos = hole;
        report(u64::try_from(pos).unwrap_or(0))?;
    }
    report(len)?;
    dst.sync_all()
}

/// Whether `file` holds no data at all: `SEEK_DATA` from offset 0 finds
/// none (`ENXIO`), so every byte reads as zero (holes, and unwritten
/// extents of a `zeroedthick` disk, read as zeros; delayed writes count as
/// data). Any other answer, including a filesystem that cannot tell (it
/// then reports the whole file as data), is "maybe data".
pub fn holds_no_data(file: &File) -> bool {
    // SAFETY: lseek on an open descriptor; it only moves the file offset,
    // which the loop driver does not use (it reads and writes by position).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    let none = rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    // SAFETY: as above.
    unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_SET) };
    none && file.metadata().is_ok_and(|m| m.len() > 0)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let len = 64 << 20;
        let mut src = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("s"))
            .unwrap();
        src.set_len(len).unwrap();
        src.seek(SeekFrom::Start(10 << 20)).unwrap();
        src.write_all(&[7u8; 8192]).unwrap();
        src.sync_all().unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        dst.set_len(len).unwrap();
        sparse_copy(&src, &dst, len).unwrap();
        let got = fs::read(dir.path().join("d")).unwrap();
        assert_eq!(got.len() as u64, len);
        assert!(got[(10 << 20)..(10 << 20) + 8192].iter().all(|&b| b == 7));
        assert!(got[..(10 << 20)].iter().all(|&b| b == 0));
        let blocks = fs::metadata(dir.path().join("d")).unwrap().blocks();
        assert!(blocks * 512 < 4 << 20, "copy is not sparse: {blocks} blocks");
    }

    #[test]
    fn a_file_of_holes_holds_no_data_and_one_written_byte_is_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("e"))
            .unwrap();
        assert!(!holds_no_data(&f), "an empty file is no disk");
        f.set_len(64 << 20).unwrap();
        assert!(holds_no_data(&f));
        // Not synced: a write still in the page cache counts.
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"x").unwrap();
        assert!(!holds_no_data(&f));
    }
}
