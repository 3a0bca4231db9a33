//! `vmdk-plugin`: the Docker volume plugin (driver `vmdk`) in the guest VM.
//!
//! Docker talks to it over the volume plugin protocol ([`plugin`]). It asks
//! the host agent to create, attach and detach disks ([`agent_client`]),
//! then finds, formats and mounts them and counts Docker's mounts
//! ([`volume`]), keeping that state durable ([`state`]) and reconciling it
//! with the live system after a restart. Kernel calls live in [`sys`].
#![warn(missing_docs)]

pub mod admin_http;
pub mod agent_client;
pub mod config;
pub mod docker_api;
pub mod doctor;
pub mod http1;
pub mod locate;
pub mod obs;
pub mod plugin;
pub mod serve;
pub mod state;
pub mod status;
pub mod sys;
pub mod volume;

/// `outer: cause: root cause`, the text Docker users see.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    vmdk_common::error_chain(err)
}
