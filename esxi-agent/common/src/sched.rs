//! Scheduling hints for the daemons' own threads.
//!
//! The daemons answer Docker's control calls (Get, Path, List,
//! Capabilities) in well under a millisecond of CPU, but on a busy host
//! (two CPUs, containers starting, `mkfs` running for a fresh volume) a
//! woken thread may wait a whole scheduler slice (about 3 ms by default)
//! before it runs. Since Linux 6.12 the fair scheduler (EEVDF) lets a
//! thread ask for a shorter slice: it then gets an earlier deadline when it
//! wakes and preempts a long-running thread sooner, without any privilege
//! and without taking more than its fair share of CPU (its nice value is
//! unchanged). Older kernels ignore the request; nothing else changes.

/// The slice the daemons' runtime threads ask for: 0.1 ms, the least the
/// kernel grants.
pub const SHORT_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` (include/uapi/linux/sched/types.h, version 1).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Asks for a short scheduler slice ([`SHORT_SLICE_NS`]) for the calling
/// thread, keeping its policy (`SCHED_OTHER`) and nice value. Returns
/// whether the kernel took it (a kernel before 6.12 accepts the call and
/// ignores the slice; one without `sched_setattr` refuses it).
pub fn prefer_short_slice() -> bool {
    // SAFETY: getpriority has no memory effects; errno is reset first
    // because -1 is a valid nice value.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        if n == -1 && *libc::__errno_location() != 0 {
            return false;
        }
        n
    };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: SHORT_SLICE_NS,
        ..Default::default()
    };
    // SAFETY: sched_setattr(2) reads `size` bytes of a valid, initialised
    // struct for the calling thread (pid 0); flags 0.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_has_the_kernels_layout() {
        // SCHED_ATTR_SIZE_VER1
        assert_eq!(std::mem::size_of::<SchedAttr>(), 56);
    }

    fn nice() -> i32 {
        // SAFETY: getpriority has no memory effects.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn asking_for_a_short_slice_keeps_policy_and_nice() {
        let before = nice();
        std::thread::spawn(move || {
            assert!(
                prefer_short_slice(),
                "sched_setattr refused: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: sched_getscheduler has no memory effects.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_OTHER);
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }
}
