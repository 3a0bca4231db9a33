//! Wire types shared by `vmdk-plugin` (guest) and `vmdk-agent` (host).
//!
//! This crate is deliberately small: plain serde types and pure validation
//! functions, no async runtime and no HTTP stack. Both programs validate
//! volume names and `-o` options with the same code, so the guest can refuse
//! bad input before it reaches the host, and the host never trusts the guest.
//!
//! * [`name`]: `vol[@datastore]` parsing and the rules a volume name obeys.
//! * [`options`]: the `docker volume create -o` options and their validation.
//! * [`agent`]: request and response bodies of the agent HTTP API v1.
//! * [`error`]: the JSON error body and its stable machine-readable codes.
//! * [`unique`]: option objects decoded with each key at most once.
#![deny(missing_docs)]

pub mod agent;
pub mod error;
pub mod name;
pub mod options;
pub mod size;
pub mod unique;

pub use agent::*;
pub use error::{ErrorBody, ErrorCode};
pub use name::{NameError, VolumeRef};
pub use options::{AccessMode, AttachAs, DiskFormat, FsType, OptionError, VolumeOptions};
