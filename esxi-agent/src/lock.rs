//! Per-volume locks that hold across processes.
//!
//! Each volume has a lock file `<vol>.lck` beside its descriptor. A
//! [`VolumeLock`] is an exclusive `flock(2)` on it. `flock` locks belong to
//! the open file description, so two locks taken in one process exclude each
//! other just as two processes do: the agent's request threads, the admin
//! CLI and a second agent on a shared datastore all serialize on the same
//! file, while different volumes never wait on each other.
//!
//! Removing a volume unlinks its lock file while holding the lock. A waiter
//! that then wins the lock on the unlinked inode notices that the path now
//! names another file (or none) and retries, so the lock can never be held
//! twice.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Opens (creating it, mode 0600) the lock file at `path` and blocks until
/// `arg` (shared or exclusive) is held on it. The lock is released when the
/// returned file drops.
pub fn lock_file(path: &Path, arg: FlockArg) -> io::Result<Flock<File>> {
    Flock::lock(open_lock_file(path)?, arg).map_err(|(_, e)| io::Error::from(e))
}

/// Opens the lock file at `path`, creating it with mode 0600.
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// An exclusive lock on one volume, released on drop.
#[derive(Debug)]
pub struct VolumeLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl VolumeLock {
    /// Blocks until the lock at `path` is held. The directory must exist.
    pub fn acquire(path: &Path) -> io::Result<Self> {
        loop {
            let locked = lock_file(path, FlockArg::LockExclusive)?;
            let held = locked.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Self {
                        _file: locked,
                        path: path.to_owned(),
                    })
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Like [`VolumeLock::acquire`], but gives up at once (`Ok(None)`)
    /// when another holder has the lock.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        let locked = match Flock::lock(open_lock_file(path)?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(io::Error::from(e)),
        };
        let held = locked.metadata()?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => Ok(Some(Self {
                _file: locked,
                path: path.to_owned(),
            })),
            // Unlinked or replaced while we opened it: someone else's.
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Unlinks the lock file (the volume is gone); the lock is released when
    /// `self` drops.
    pub fn unlink(&self) -> io::Result<()> {
        crate::fsutil::remove_if_exists(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn serializes_holders_and_survives_unlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.lck");
        let inside = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for i in 0..8 {
            let (path, inside) = (path.clone(), inside.clone());
            threads.push(std::thread::spawn(move || {
                let l = VolumeLock::acquire(&path).unwrap();
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders at once");
                std::thread::sleep(Duration::from_millis(5));
                inside.fetch_sub(1, Ordering::SeqCst);
                if i % 3 == 0 {
                    l.unlink().unwrap();
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn try_acquire_gives_up_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.lck");
        drop(VolumeLock::try_acquire(&path).unwrap().expect("free lock"));
        let held = VolumeLock::acquire(&path).unwrap();
        assert!(VolumeLock::try_acquire(&path).unwrap().is_none());
        drop(held);
        let again = VolumeLock::try_acquire(&path).unwrap();
        assert!(again.is_some());
        assert!(VolumeLock::try_acquire(&path).unwrap().is_none());
    }

    #[test]
    fn different_volumes_do_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        let _a = VolumeLock::acquire(&dir.path().join("a.lck")).unwrap();
        let _b = VolumeLock::acquire(&dir.path().join("b.lck")).unwrap();
    }
}
