//! The JSON error body of the agent API.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable, machine-readable error codes. New codes may be added; existing
/// ones never change meaning. Clients must treat an unknown code like
/// [`ErrorCode::Internal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body or a header is malformed.
    InvalidRequest,
    /// No such route (path or method).
    UnknownRoute,
    /// The volume name breaks the naming rules.
    InvalidName,
    /// A create option is unknown or has a bad value.
    InvalidOption,
    /// The datastore named in `vol@ds` is not configured.
    UnknownDatastore,
    /// The named VSAN policy does not exist or cannot be used here.
    InvalidPolicy,
    /// The volume does not exist.
    NotFound,
    /// A volume with that name already exists.
    AlreadyExists,
    /// The volume is attached, so it cannot be removed or cloned.
    InUse,
    /// The volume is attached to another VM.
    AttachedElsewhere,
    /// The `VM-Id` header is missing or malformed.
    MissingVmId,
    /// Every slot of the VM's disk controllers is taken.
    NoFreeSlot,
    /// The hypervisor did not answer, or a task did not finish, in time.
    Timeout,
    /// The disk backend (loop devices, the hypervisor) failed.
    Backend,
    /// Reading or writing the datastore failed.
    Io,
    /// A bug or an unexpected state; the message says what.
    #[serde(other)]
    Internal,
}

impl ErrorCode {
    /// The snake_case code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::UnknownRoute => "unknown_route",
            Self::InvalidName => "invalid_name",
            Self::InvalidOption => "invalid_option",
            Self::UnknownDatastore => "unknown_datastore",
            Self::InvalidPolicy => "invalid_policy",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::InUse => "in_use",
            Self::AttachedElsewhere => "attached_elsewhere",
            Self::MissingVmId => "missing_vm_id",
            Self::NoFreeSlot => "no_free_slot",
            Self::Timeout => "timeout",
            Self::Backend => "backend",
            Self::Io => "io",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every agent error response: `{"code": "...", "message": "..."}`.
///
/// `message` is a complete, human-readable sentence carrying the whole cause
/// chain; the guest passes it to Docker unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
}

impl ErrorBody {
    /// Builds a body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_is_internal() {
        let b = ErrorBody::new(ErrorCode::AttachedElsewhere, "x");
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, r#"{"code":"attached_elsewhere","message":"x"}"#);
        let back: ErrorBody = serde_json::from_str(r#"{"code":"from_the_future","message":"m"}"#).unwrap();
        assert_eq!(back.code, ErrorCode::Internal);
        for c in [ErrorCode::InvalidName, ErrorCode::NotFound, ErrorCode::Io] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
