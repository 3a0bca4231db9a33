//! The one error type of this crate. Every variant names what failed (the
//! method, the object, the URL, the path); none ever carries a password.

use std::time::Duration;

/// What went wrong with the server's TLS certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The end-entity certificate's fingerprint is not the configured one.
    #[error("the server's certificate has {algorithm} fingerprint {presented}, not the configured {expected}")]
    ThumbprintMismatch {
        algorithm: &'static str,
        expected: String,
        presented: String,
    },
    /// Anything else rustls refused: an unknown issuer, a bad signature,
    /// an expired certificate, a name mismatch, a weak key...
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered a call with a fault: a SOAP fault, or a task that
    /// ended in `error` (then `method` is the task's method and the type and
    /// message come from `info.error`).
    #[error("{method} on {object}: {fault_type}: {message}")]
    Fault {
        method: String,
        object: String,
        fault_type: String,
        message: String,
    },
    /// The TLS handshake with the server failed.
    #[error("TLS with {url}: {failure}")]
    Tls { url: String, failure: TlsFailure },
    /// The server refused the user name or password.
    #[error("login to {url} as {user:?} refused: {message}")]
    Auth { url: String, user: String, message: String },
    /// A VM, datastore, datacenter, file or profile that does not exist.
    #[error("not found: {what}")]
    NotFound { what: String },
    /// A call or a task did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    /// The connection failed (refused, reset, closed mid-call) or the server
    /// answered with an unexpected HTTP status.
    #[error("{what}: {message}")]
    Http { what: String, message: String },
    /// A response that is not the XML we asked for.
    #[error("{what}: malformed response: {message}")]
    Xml { what: String, message: String },
    /// The server does not offer this (PBM on a standalone ESXi host).
    #[error("not supported by {server}: {what}")]
    NotSupported { what: String, server: String },
    /// A file bigger than the caller allowed.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// Bad configuration or a bad argument: what it was and what is valid.
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl Error {
    /// The fault type when this is a fault (`FileNotFound`, `InvalidDeviceSpec`...).
    pub fn fault_type(&self) -> Option<&str> {
        match self {
            Error::Fault { fault_type, .. } => Some(fault_type),
            _ => None,
        }
    }

    pub(crate) fn is_not_authenticated(&self) -> bool {
        self.fault_type() == Some("NotAuthenticated")
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn xml(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Xml {
            what: what.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
