//! The Nix daemon ("worker") protocol, as `nix-daemon --stdio` and `ssh-ng://` speak it
//! (docs/worker-protocol.md), sans-IO.
//!
//! - [`handshake`]: the magic numbers, [`WorkerVersion`] negotiation, the 1.38 feature
//!   exchange and the server's hello (version string, trust).
//! - [`stderr`]: the log channel a server writes before each answer: log lines, activities,
//!   results, errors and the `LAST` that precedes an answer.
//! - [`request`]: [`Opcode`] and [`Request`], one variant per opcode a client of Nix 2.3 to
//!   2.34 sends, with [`DerivedPath`] and the client's [`ClientOptions`].
//! - [`response`]: [`Response`], the answers with a fixed shape, and [`PathInfo`].
//! - [`session`]: [`ServerSession`], the server's state machine a driver feeds with bytes,
//!   including the payloads that follow a request (raw, framed or tunnelled NARs, the
//!   AddMultipleToStore stream, text and flat data).
//!
//! Every message is encodable and decodable in both directions at every version from 1.21
//! (Nix 2.3) to 1.38 (Nix 2.34), so that tests and benchmarks can play the client. The value
//! types the serve protocol shares (store paths, hashes, content addresses, the
//! BasicDerivation, BuildResult's realisations) are read and written by the serve module's
//! code; their errors are [`ServeError`]s wrapped in [`WorkerError::Value`].

pub mod dump;
pub mod handshake;
pub mod request;
pub mod response;
pub mod session;
pub mod stderr;

pub use handshake::{ClientHello, ServerHello, Trust, WorkerVersion};
pub use request::{BuildMode, ClientOptions, DerivedPath, Opcode, OutputsSpec, Request};
pub use response::{Missing, PathInfo, Response};
pub use session::{Event, ServerSession};
pub use stderr::{ActivityType, ErrorInfo, LogField, ResultType, StderrMessage};

pub use crate::serve::Limits;
use crate::serve::ServeError;
use crate::wire::{self, Stop, WireError};

/// Everything that can go wrong in the worker protocol. Offsets count from the start of the
/// message being decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// A malformed primitive.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A malformed value of a type the serve protocol shares (store path, hash, content
    /// address, derivation, build result).
    #[error(transparent)]
    Value(ServeError),
    /// The handshake did not start with the expected magic number.
    #[error("protocol mismatch: expected magic {expected:#x}, got {found:#x}")]
    BadMagic {
        /// The magic this side expects.
        expected: u64,
        /// What arrived.
        found: u64,
    },
    /// A client older than Nix 2.3 (protocol 1.21), or a major other than 1.
    #[error(
        "unsupported Nix daemon protocol version {0:#x}: nixbuild serves clients from Nix 2.3 \
         (protocol 1.21) on"
    )]
    UnsupportedVersion(u64),
    /// An opcode this server does not know.
    #[error("invalid operation {0}")]
    UnknownOpcode(u64),
    /// A malformed value whose syntax is specific to the worker protocol.
    #[error("{field} at offset {offset}: {reason}")]
    Malformed {
        /// The field being read.
        field: &'static str,
        /// Offset of the value.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A payload (NAR, framed stream, tunnelled data) that breaks the protocol.
    #[error("{0}")]
    Payload(String),
    /// The input ended in the middle of a message or of a payload.
    #[error("unexpected end of input {0}")]
    UnexpectedEof(&'static str),
    /// The driver called the session out of turn (a bug in the driver, not in the input).
    #[error("session misuse: {0}")]
    Misuse(&'static str),
}

impl From<ServeError> for WorkerError {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Wire(w) => WorkerError::Wire(w),
            other => WorkerError::Value(other),
        }
    }
}

impl From<Stop<ServeError>> for Stop<WorkerError> {
    fn from(s: Stop<ServeError>) -> Self {
        s.map_invalid(WorkerError::from)
    }
}

impl From<Stop<WireError>> for Stop<WorkerError> {
    fn from(s: Stop<WireError>) -> Self {
        s.map_invalid(WorkerError::Wire)
    }
}

impl From<WireError> for Stop<WorkerError> {
    fn from(e: WireError) -> Self {
        Stop::Invalid(WorkerError::Wire(e))
    }
}

impl From<ServeError> for Stop<WorkerError> {
    fn from(e: ServeError) -> Self {
        Stop::Invalid(e.into())
    }
}

/// The result of reading part of a worker message.
pub type ReadResult<T> = wire::ReadResult<T, WorkerError>;

#[cfg(any(test, feature = "test"))]
pub mod strategies;

#[cfg(test)]
mod tests;
