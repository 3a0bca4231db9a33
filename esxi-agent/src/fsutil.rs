//! Crash-safe file helpers: atomic writes and sparse-aware copies.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `data` to `path` atomically: write a temp file beside it, fsync it,
/// rename it over `path`, then fsync the directory. After a crash the file
/// holds either the old or the new content, never a mix.
pub fn atomic_write(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Creates a small marker file (`what` and a newline) whose existence is
/// durable before this returns: only the directory is synced, because the
/// marker's presence, not its text, is what counts.
pub fn write_marker(path: &Path, what: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)?
        .write_all(format!("{what}\n").as_bytes())?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Fsyncs a directory so a rename or unlink in it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a file; a file that is already gone is not an error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Copies `src` to `dst` (which must exist, empty or preallocated), copying
/// only the data regions of `src`, so holes stay holes in a thin copy.
pub fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
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
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX).min(1 << 30);
            // SAFETY: both descriptors are valid for the call and the offset
            // pointers point at live locals.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dst.as_raw_fd(), &mut off_out, want, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    dst.sync_all()
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
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
}
