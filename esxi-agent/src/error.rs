//! The agent's error type and its one mapping to wire codes.

use vmdk_protocol::{ErrorBody, ErrorCode, NameError, OptionError};

use crate::backend::BackendError;
use crate::meta::MetaError;
use crate::policy::PolicyError;

/// Everything a volume operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request itself is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The `VM-Id` header is missing or malformed.
    #[error("missing or invalid VM-Id header: {0}")]
    MissingVmId(String),
    /// The volume name breaks the rules.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A create option is bad.
    #[error(transparent)]
    InvalidOption(#[from] OptionError),
    /// `vol@ds` names a datastore that is not configured.
    #[error("Invalid datastore '{datastore}'.\nKnown datastores: {}.\nDefault datastore: {default}", known.join(", "))]
    UnknownDatastore {
        /// The datastore asked for.
        datastore: String,
        /// The configured datastores.
        known: Vec<String>,
        /// The default datastore.
        default: String,
    },
    /// A VSAN policy cannot be used.
    #[error("{0}")]
    InvalidPolicy(String),
    /// The volume does not exist.
    #[error("Volume {name} not found (file: {path})")]
    NotFound {
        /// Canonical name.
        name: String,
        /// Descriptor path.
        path: String,
    },
    /// The clone source does not exist.
    #[error("Could not find volume for cloning {source_name}")]
    CloneSourceNotFound {
        /// The `clone-from` value.
        source_name: String,
    },
    /// The volume already exists.
    #[error("Volume {name} already exists (file: {path})")]
    AlreadyExists {
        /// Canonical name.
        name: String,
        /// Descriptor path.
        path: String,
    },
    /// The volume's file names are taken by files that are not a vmdk
    /// volume (no metadata, and no create of ours left them).
    #[error("Cannot create volume {name}: {path} exists but is not a vmdk volume (it has no metadata); move it away or choose another name")]
    ForeignFiles {
        /// Canonical name.
        name: String,
        /// The file in the way.
        path: String,
    },
    /// Remove of an attached volume.
    #[error("Failed to remove volume {name}, in use by VM = {vm}.")]
    InUse {
        /// Canonical name.
        name: String,
        /// The VM it is attached to.
        vm: String,
    },
    /// Clone of an attached volume.
    #[error("Cannot clone volume {name}: it is attached to VM {vm}; only detached volumes can be cloned")]
    CloneSourceAttached {
        /// Canonical name of the source.
        name: String,
        /// The VM it is attached to.
        vm: String,
    },
    /// Attach of a volume attached to another VM.
    #[error("Volume {name} is attached to VM {vm}; it must be detached there before VM {requester} can use it")]
    AttachedElsewhere {
        /// Canonical name.
        name: String,
        /// The VM holding it.
        vm: String,
        /// The VM asking.
        requester: String,
    },
    /// The volume's create still runs (after its answer, see
    /// `service::pending`).
    #[error("Volume {name} is still being created ({step}, {percent}% done); use it once `docker volume inspect {name}` no longer shows it creating")]
    Creating {
        /// Canonical name.
        name: String,
        /// The long step.
        step: &'static str,
        /// Percent done.
        percent: u8,
    },
    /// The volume's create failed after it was answered.
    #[error("Volume {name} could not be created: {cause}; remove it and create it again")]
    CreateFailed {
        /// Canonical name.
        name: String,
        /// Why.
        cause: String,
    },
    /// Metadata could not be read or written.
    #[error("volume {name}")]
    Meta {
        /// Canonical name.
        name: String,
        /// The cause.
        #[source]
        source: MetaError,
    },
    /// The backend failed.
    #[error("volume {name}")]
    Backend {
        /// Canonical name.
        name: String,
        /// The cause.
        #[source]
        source: BackendError,
    },
    /// A datastore file could not be used: missing folder, a file of the
    /// wrong kind (a planted link or FIFO), too large, a full datastore.
    #[error("volume {name}")]
    Store {
        /// Canonical name.
        name: String,
        /// The cause, naming the file in datastore form.
        #[source]
        source: crate::store::StoreError,
    },
    /// A datastore folder could not be created or read.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
    /// A VSAN policy operation failed (see [`PolicyError::code`]).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// `vmdk-agent set` was given options that cannot be changed.
    #[error("Invalid options: [{}] \nOptions that can be edited: ['access', 'attach-as']", keys.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", "))]
    NotEditable {
        /// The keys that cannot be edited, sorted.
        keys: Vec<String>,
    },
}

impl AgentError {
    /// The stable wire code. One exhaustive match: a new variant does not
    /// compile until someone decides its code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Self::MissingVmId(_) => ErrorCode::MissingVmId,
            Self::InvalidName(_) => ErrorCode::InvalidName,
            Self::InvalidOption(_) => ErrorCode::InvalidOption,
            Self::UnknownDatastore { .. } => ErrorCode::UnknownDatastore,
            Self::InvalidPolicy(_) => ErrorCode::InvalidPolicy,
            Self::NotFound { .. } => ErrorCode::NotFound,
            Self::CloneSourceNotFound { .. } => ErrorCode::InvalidOption,
            Self::AlreadyExists { .. } | Self::ForeignFiles { .. } => ErrorCode::AlreadyExists,
            Self::InUse { .. } | Self::CloneSourceAttached { .. } | Self::Creating { .. } => ErrorCode::InUse,
            Self::CreateFailed { .. } => ErrorCode::Backend,
            Self::AttachedElsewhere { .. } => ErrorCode::AttachedElsewhere,
            Self::Backend { source, .. } => source.code(),
            Self::Meta { .. } | Self::Io { .. } | Self::Store { .. } => ErrorCode::Io,
            Self::Internal(_) => ErrorCode::Internal,
            Self::Policy(e) => e.code(),
            Self::NotEditable { .. } => ErrorCode::InvalidOption,
        }
    }

    /// The wire body, with the whole cause chain in `message`.
    pub fn to_body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), error_chain(self))
    }
}

pub use vmdk_common::error_chain;
