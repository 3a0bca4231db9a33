//! How far a long disk operation has got, and a request to stop it.
//!
//! An eagerzeroedthick create writes every byte of the disk and a clone
//! copies one: minutes for large volumes, longer than Docker waits for a
//! Create (2 min for a socket plugin, 30 s managed). The backend doing the
//! work reports into a [`Progress`]; the service reads it to answer early,
//! to show `creating 42%` in Get, List and `vmdk-agent ls`, and to log; a
//! Remove of the volume cancels through it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Shared progress of one long operation. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    done: AtomicU64,
    total: AtomicU64,
    started: AtomicBool,
    cancelled: AtomicBool,
    started_note: tokio::sync::Notify,
}

/// The error a cancelled operation stops with.
pub fn cancelled_error() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "cancelled: the volume is being removed")
}

impl Progress {
    /// A new, not started, not cancelled progress.
    pub fn new() -> Self {
        Self::default()
    }

    /// The long part begins: `total` units (bytes) are to be done. The
    /// operation has passed its checks; from here it may answer early.
    pub fn start(&self, total: u64) {
        self.0.total.store(total, Ordering::Relaxed);
        self.0.done.store(0, Ordering::Relaxed);
        self.0.started.store(true, Ordering::Release);
        self.0.started_note.notify_waiters();
    }

    /// `done` of the total units are done. Fails once the operation was
    /// cancelled, so a loop that reports also stops.
    pub fn set_done(&self, done: u64) -> io::Result<()> {
        self.0.done.store(done, Ordering::Relaxed);
        if self.is_cancelled() {
            return Err(cancelled_error());
        }
        Ok(())
    }

    /// Percent done, 0 to 100 (0 before the start; a zero total is done).
    pub fn percent(&self) -> u8 {
        let total = self.0.total.load(Ordering::Relaxed);
        let done = self.0.done.load(Ordering::Relaxed);
        if !self.started() {
            return 0;
        }
        if total == 0 {
            return 100;
        }
        u8::try_from((u128::from(done.min(total)) * 100 / u128::from(total)).min(100)).unwrap_or(100)
    }

    /// Whether [`Progress::start`] was called.
    pub fn started(&self) -> bool {
        self.0.started.load(Ordering::Acquire)
    }

    /// Resolves once [`Progress::start`] was called.
    pub async fn wait_started(&self) {
        loop {
            let note = self.0.started_note.notified();
            if self.started() {
                return;
            }
            note.await;
        }
    }

    /// Asks the operation to stop at its next report.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::Release);
    }

    /// Whether [`Progress::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_cancel() {
        let p = Progress::new();
        assert_eq!(p.percent(), 0);
        p.start(200);
        assert_eq!(p.percent(), 0);
        p.set_done(50).unwrap();
        assert_eq!(p.percent(), 25);
        p.set_done(500).unwrap();
        assert_eq!(p.percent(), 100);
        let q = p.clone();
        q.cancel();
        assert_eq!(p.set_done(10).unwrap_err().kind(), io::ErrorKind::Interrupted);
        let z = Progress::new();
        z.start(0);
        assert_eq!(z.percent(), 100);
        let big = Progress::new();
        big.start(u64::MAX);
        big.set_done(u64::MAX / 2).unwrap();
        assert_eq!(big.percent(), 49);
    }

    #[tokio::test]
    async fn waiting_for_the_start() {
        let p = Progress::new();
        let q = p.clone();
        let waiter = tokio::spawn(async move { q.wait_started().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        p.start(1);
        waiter.await.unwrap();
        // Already started: returns at once.
        p.wait_started().await;
    }
}
