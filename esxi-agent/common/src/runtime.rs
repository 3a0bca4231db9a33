//! Heavy work below the cheap calls.
//!
//! Both daemons answer Docker's cheap calls (Get, Path, List,
//! Capabilities) on tokio's worker threads, and do the heavy work (loop
//! devices, `mount`, `mkfs`, reading volume files, `fsync`s) on its
//! blocking pool. On a small VM whose CPUs that work keeps busy, a cheap
//! call waited for the scheduler behind it: with 8 mount/unmount cycles on
//! 2 CPUs, the p99 of Capabilities, which does nothing, was 0.9–1.2 ms
//! (docs/performance.md). So blocking work runs at nice
//! [`BACKGROUND_NICE`], and so do the processes and threads it starts
//! (`mkfs`, a scan's readers inherit it): among the daemon's threads the
//! workers come first, while the heavy work still has the CPU whenever the
//! workers are idle, which is nearly always. Nothing is raised above normal
//! priority: no privilege is needed, and other programs lose nothing.
//!
//! Every blocking task of the daemons goes through [`spawn_blocking`]
//! (`clippy.toml` forbids tokio's own); workers never run one, so they
//! stay at normal priority.

use std::cell::Cell;

/// The nice value of blocking work (normal is 0).
pub const BACKGROUND_NICE: i32 = 5;

/// `tokio::task::spawn_blocking`, with `f` run at nice
/// [`BACKGROUND_NICE`] (see the module documentation).
#[allow(clippy::disallowed_methods)]
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        thread_local!(static LOWERED: Cell<bool> = const { Cell::new(false) });
        // A blocking thread only ever runs blocking tasks: lowered once.
        if !LOWERED.get() {
            LOWERED.set(true);
            set_this_thread(BACKGROUND_NICE);
        }
        f()
    })
}

/// Sets the calling thread's nice value (on Linux, `setpriority` with
/// `PRIO_PROCESS` and id 0 acts on the calling thread only). A failure
/// (a seccomp filter, say) leaves the priority as it was: it only costs
/// latency.
fn set_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority takes plain integers and touches no memory.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn this_thread_nice() -> i32 {
        // SAFETY: getpriority takes plain integers and touches no memory.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// Blocking work, and a process it starts, run below normal priority;
    /// tasks on the workers at normal priority.
    #[test]
    fn blocking_work_runs_below_the_workers() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let (worker, blocking, child, worker_after) = rt.block_on(async {
            let worker = tokio::spawn(async { this_thread_nice() }).await.unwrap();
            let blocking = spawn_blocking(this_thread_nice).await.unwrap();
            let child = spawn_blocking(|| {
                // Field 19 of /proc/PID/stat is the nice value.
                let out = std::process::Command::new("sh")
                    .args(["-c", "cut -d' ' -f19 /proc/self/stat"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim().parse::<i32>().unwrap()
            })
            .await
            .unwrap();
            let worker_after = tokio::spawn(async { this_thread_nice() }).await.unwrap();
            (worker, blocking, child, worker_after)
        });
        assert_eq!((worker, worker_after), (0, 0));
        assert_eq!(blocking, BACKGROUND_NICE);
        assert_eq!(child, BACKGROUND_NICE);
    }
}
