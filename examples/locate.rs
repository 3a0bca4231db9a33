//! Runs the guest's device locator once; a test helper for
//! `tests/guest_kernel.rs`, which runs it inside a QEMU guest.
//!
//! ```text
//! locate '<DiskLocation as JSON>' [TIMEOUT_SECONDS]
//! ```
//!
//! Prints the block device on stdout and exits 0, or prints the error on
//! stderr and exits 1 (2 for bad arguments).
use std::time::Duration;

use vmdk_plugin::locate::{DeviceLocator, GuestLocator};
use vmdk_protocol::DiskLocation;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(json), timeout) = (args.first(), args.get(1)) else {
        eprintln!("usage: locate '<DiskLocation JSON>' [TIMEOUT_SECONDS]");
        std::process::exit(2);
    };
    let loc: DiskLocation = match serde_json::from_str(json) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("locate: bad location {json}: {e}");
            std::process::exit(2);
        }
    };
    let timeout = match timeout.map(|t| t.parse::<f64>()) {
        None => Duration::from_secs(10),
        Some(Ok(s)) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
        Some(_) => {
            eprintln!("locate: bad timeout {:?}", args[1]);
            std::process::exit(2);
        }
    };
    match GuestLocator::default().locate(&loc, timeout) {
        Ok(dev) => println!("{}", dev.display()),
        Err(e) => {
            eprintln!("locate: {}", vmdk_plugin::error_chain(&e));
            std::process::exit(1);
        }
    }
}
