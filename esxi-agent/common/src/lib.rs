//! What both vmdk daemons share, so that the guest's `vmdk-plugin` does not
//! reach into the agent's internals:
//!
//! * [`store`]: the one door to datastore files (never follows a link,
//!   refuses what is not a regular file, bounds every read, creates
//!   privately), and atomic writes of the daemons' own state files;
//! * [`server`]: the bounded HTTP/1.1 server both daemons serve with;
//! * [`logging`], [`metrics`] and [`admin`]: logs, metrics and the admin
//!   listener (`/healthz`, `/readyz`, `/metrics`) of both daemons;
//! * [`systemd`]: socket activation and readiness notification;
//! * [`memory`]: how the daemons use the C allocator;
//! * [`error_chain`] and [`table`]: how errors and tables are shown.
#![warn(missing_docs)]

pub mod admin;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod store;
pub mod systemd;
pub mod table;

use std::error::Error as StdError;

/// `outer: cause: root cause`, skipping causes whose text the outer message
/// already contains. This is the text Docker users and API callers see.
pub fn error_chain(err: &dyn StdError) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cur = e.source();
    }
    msg
}
