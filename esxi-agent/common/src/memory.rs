//! How the daemons use the C allocator (glibc's malloc), set in code so
//! that no user has to set `MALLOC_*` variables.
//!
//! By default glibc gives each thread that allocates its own arena (up to
//! eight per CPU), and memory freed inside an arena stays resident until
//! the arena's top is free. A daemon whose requests hop between tokio's
//! workers and its blocking pool thus keeps the high-water mark of every
//! arena: at 10,000 volumes that was most of the plugin's resident memory
//! (docs/performance.md, "Catalog" → Memory). [`tune`] caps the arenas and
//! [`trim`] hands free pages back after a large one-off piece of work (the
//! first scan of a datastore).
//!
//! Elsewhere than glibc both are no-ops.

/// Arenas the daemons' threads share: two, so that a thread rarely waits
/// for another's allocation, while freed memory is reused by every thread.
pub const ARENAS: i32 = 2;

/// Allocations at least this large are mapped on their own and unmapped
/// when freed (the List answers, their vectors), instead of raising an
/// arena's resident high-water mark. glibc's default starts at 128 KiB but
/// grows up to 32 MiB with the sizes freed, which keeps such buffers in
/// the arenas; a fixed value stops it from growing.
pub const MMAP_THRESHOLD: i32 = 256 * 1024;

/// A piece of work over at least this many volumes (a first scan, a full
/// List over the API) frees enough to be worth a [`trim`] afterwards.
pub const TRIM_VOLUMES: usize = 1024;

/// Sets the allocator up (see the module documentation). Call it first
/// thing in `main`, before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // the process starts other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Gives the free pages of every arena back to the system. It walks the
/// free lists of all arenas (about a millisecond for tens of MiB): for
/// after large one-off work, not for every request.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}
