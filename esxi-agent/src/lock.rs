//! Per-volume locks that hold across processes.
//!
//! Each volume has a lock file `<vol>.lck` beside its descriptor. A
//! [`VolumeLock`] is an exclusive `flock(2)` on it, taken through the
//! datastore door ([`crate::store::Dir::lock_file`]: the file is created
//! 0600 with `O_EXCL`, and a symbolic link or any other non-file under that
//! name is refused, never followed). `flock` locks belong to the open file
//! description, so two locks taken in one process exclude each other just
//! as two processes do: the agent's request threads, the admin CLI and a
//! second agent on a shared datastore all serialize on the same file, while
//! different volumes never wait on each other.
//!
//! Removing a volume unlinks its lock file while holding the lock. A waiter
//! that then wins the lock on the unlinked inode notices that the name now
//! names another file (or none) and retries, so the lock can never be held
//! twice.

use std::io;
use std::path::Path;

use crate::store::{Dir, DsPath, FileLock, StoreError};

/// An exclusive lock on one volume, released on drop.
///
/// On a datastore this host reaches as a directory it is an `flock` on the
/// volume's lock file, which excludes other processes and hosts sharing the
/// datastore; a lock taken through a vmgroup folder
/// ([`crate::datastore::VolumeFolder::lock`]) also unlinks its lock file
/// when it is released while the volume has no sidecar (a lookup or create
/// of a name that is no volume leaves nothing behind). On a datastore
/// reached over HTTP (`vsphere`) it is a lock within this agent process:
/// one agent serves a datastore until shared-datastore leases come.
#[derive(Debug)]
pub struct VolumeLock {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    File {
        lock: FileLock,
        /// The sidecar whose absence at release means "no volume".
        meta: Option<String>,
    },
    Process(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>),
}

impl From<FileLock> for VolumeLock {
    fn from(lock: FileLock) -> Self {
        Self {
            kind: Kind::File { lock, meta: None },
        }
    }
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        if let Kind::File { lock, meta: Some(meta) } = &self.kind {
            if matches!(lock.dir().stat(meta), Ok(None)) {
                let _ = lock.unlink();
            }
        }
    }
}

impl VolumeLock {
    /// A volume's lock that cleans up after a name that is no volume.
    pub fn for_volume(lock: FileLock, meta: String) -> Self {
        Self {
            kind: Kind::File { lock, meta: Some(meta) },
        }
    }

    /// A lock held within this process.
    pub fn in_process(guard: tokio::sync::OwnedMutexGuard<()>) -> Self {
        Self {
            kind: Kind::Process(guard),
        }
    }

    /// Blocks until the lock file at `path` is locked: for tools and tests
    /// that hold a volume's lock from outside the agent (the file's folder
    /// is trusted; the file itself is not followed if it is a link).
    pub fn acquire(path: &Path) -> io::Result<Self> {
        let (dir, name) = split(path)?;
        match dir.lock_file(&name, true, true) {
            Ok(l) => Ok(Self::from(l.expect("a blocking lock is always taken"))),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Unlinks the lock file (the volume is gone); the lock is released
    /// when `self` drops.
    pub fn unlink(&self) -> Result<(), StoreError> {
        match &self.kind {
            Kind::File { lock, .. } => lock.unlink(),
            Kind::Process(_) => Ok(()),
        }
    }
}

fn split(path: &Path) -> io::Result<(Dir, String)> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "lock path has no UTF-8 file name"))?;
    let dir =
        Dir::open_trusted(parent, DsPath::new("local", &parent.display().to_string())).map_err(io::Error::other)?;
    Ok((dir, name.to_owned()))
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
    fn a_linked_lock_file_is_refused_and_nothing_is_created_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("nologin");
        std::os::unix::fs::symlink(&target, dir.path().join("v.lck")).unwrap();
        assert!(VolumeLock::acquire(&dir.path().join("v.lck")).is_err());
        assert!(!target.exists(), "root created a file through a dangling link");
    }
}
