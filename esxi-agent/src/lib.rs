//! `vmdk-agent`: the host side of vmdk.
//!
//! It creates VMDKs in `<datastore>/dockvols/<vmgroup>/`, attaches and
//! detaches them to the calling VM, and keeps each volume's metadata in a
//! `.vmfd` sidecar next to the disk. The guest daemon `vmdk-plugin` talks to
//! it over the HTTP/JSON API in [`api`] (see `docs/agent-api.md`), or embeds
//! a [`service::VolumeService`] directly when no agent URL is given.
//!
//! Layers, top to bottom:
//! * [`api`]: axum routes; extract, call the service, map the result;
//! * [`service`]: the domain (names, options, locking, idempotency);
//! * [`backend`]: the hypervisor seam ([`backend::DiskBackend`]);
//! * [`meta`], [`vmdk`], [`lock`], [`fsutil`]: on-disk formats and helpers;
//! * [`policy`]: VSAN policy expressions and their files on the datastore;
//! * [`admin`]: what the admin CLI shows (columns, tables, service probe).
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod backend;
pub mod config;
pub mod datastore;
pub mod error;
pub mod fsutil;
pub mod lock;
pub mod meta;
pub mod obs;
pub mod policy;
pub mod progress;
pub mod server;
pub mod service;
pub use vmdk_common::store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod vmdk;

pub use error::AgentError;
pub use service::VolumeService;
