//! The `nix-store --serve` protocol (docs/serve-protocol.md §2–§6, §11–§13) as typed messages,
//! sans-IO.
//!
//! - [`handshake`]: the magic numbers and [`ProtocolVersion`] negotiation.
//! - [`request`]: [`Request`], one variant per opcode 1–9, with the `--write` check.
//! - [`response`]: [`Response`] and [`ValidPathInfo`].
//! - [`build`]: [`BuildOptions`], [`BuildResult`], [`BuildStatus`] and `builtOutputs`.
//! - [`export`]: the trailer and markers of the NIXE export stream (ImportPaths, ExportPaths).
//! - [`command`]: [`ServeArgs`], what a `nix-store` command line asks for.
//! - [`session`]: [`ServerSession`], the server's state machine a driver feeds with bytes.
//!
//! Every message is encodable and decodable in both directions, gated on the negotiated
//! version `v = min(client, 0x207)`, so tests and benchmarks can play the client. Decoders
//! take a byte slice (or a contiguous `Buf`) and answer a value with the bytes it used, `None`
//! for "need more bytes", or a [`ServeError`] naming the field and offset.

pub mod build;
pub mod command;
pub mod derivation;
pub mod export;
pub(crate) mod fields;
mod framing;
pub mod handshake;
pub mod request;
pub mod response;
pub mod session;

pub use build::{BuildOptions, BuildResult, BuildStatus, BuiltOutput};
pub use command::{Protocol, ServeArgs};
pub use export::{ExportMarker, ExportTrailer};
pub use handshake::{ClientHello, ProtocolVersion, ServerHello};
pub use request::{AddToStoreNar, Opcode, PathWithOutputs, Request};
pub use response::{BuildPathsResult, Response, ValidPathInfo};
pub use session::{Event, ServerSession};

use crate::content_address::ContentAddressError;
use crate::derivation::DerivationError;
use crate::hash::HashError;
use crate::nar::NarError;
use crate::store_path::StorePathError;
use crate::wire::{self, Stop, WireError};

/// What the server-side decoders accept. The defaults accept real workloads: over 10,000
/// paths per request (up to 2^20), 64 MiB strings (structured-attrs `__json`), NARs of up to
/// 1 TiB; the daemon overrides them from its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bounds on strings and element counts.
    pub wire: wire::Limits,
    /// Largest `narSize` an AddToStoreNar may announce.
    pub max_nar_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wire: wire::Limits::default(),
            max_nar_size: 1 << 40,
        }
    }
}

/// Everything that can go wrong in the serve protocol. Offsets count from the start of the
/// message being decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// A malformed primitive.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The handshake did not start with the expected magic number.
    #[error("protocol mismatch: expected magic {expected:#x}, got {found:#x}")]
    BadMagic {
        /// The magic this side expects.
        expected: u64,
        /// What arrived.
        found: u64,
    },
    /// A protocol version whose major is not 2.
    #[error("unsupported 'nix-store --serve' protocol version {0:#x}")]
    UnsupportedVersion(u64),
    /// An opcode outside 1–9 (the message is upstream's).
    #[error("unknown serve command {0}")]
    UnknownOpcode(u64),
    /// A command that needs `--write` arrived on a read-only session (upstream's messages).
    #[error("{0}")]
    NotAllowed(&'static str),
    /// A string that is not a valid store path.
    #[error("{field} at offset {offset}: {source}")]
    StorePath {
        /// The field being read.
        field: &'static str,
        /// Offset of the string.
        offset: usize,
        /// Why it is not a store path.
        source: StorePathError,
    },
    /// A string that is not a valid hash.
    #[error("{field} at offset {offset}: {source}")]
    Hash {
        /// The field being read.
        field: &'static str,
        /// Offset of the string.
        offset: usize,
        /// Why it is not a hash.
        source: HashError,
    },
    /// A string that is not a valid content address.
    #[error("{field} at offset {offset}: {source}")]
    ContentAddress {
        /// The field being read.
        field: &'static str,
        /// Offset of the string.
        offset: usize,
        /// Why it is not a content address.
        source: ContentAddressError,
    },
    /// A derivation output whose (path, hashAlgo, hash) triple is inconsistent.
    #[error("derivation output {output:?} at offset {offset}: {source}")]
    DerivationOutput {
        /// The output name.
        output: String,
        /// Offset of the output's path string.
        offset: usize,
        /// Why it was rejected.
        source: DerivationError,
    },
    /// A malformed value whose syntax is specific to the serve protocol (a BuildPaths entry,
    /// a builtOutputs key or realisation, ...).
    #[error("{field} at offset {offset}: {reason}")]
    Malformed {
        /// The field being read.
        field: &'static str,
        /// Offset of the value.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A BuildResult status outside 0–14.
    #[error("BuildResult status at offset {offset}: unknown status {value}")]
    UnknownStatus {
        /// Offset of the status.
        offset: usize,
        /// The value found.
        value: u64,
    },
    /// An AddToStoreNar whose `narSize` is 0 (upstream: "narInfo is too old and missing the
    /// narSize field") or above [`Limits::max_nar_size`].
    #[error("narSize at offset {offset}: {size} is not in 1..={max}")]
    BadNarSize {
        /// Offset of the size.
        offset: usize,
        /// The size announced.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A value other than 0 or 1 where the export stream expects an entry marker.
    #[error(
        "export marker at offset {offset}: input doesn't look like something created by \
         'nix-store --export' (got {value})"
    )]
    BadExportMarker {
        /// Offset of the marker.
        offset: usize,
        /// The value found.
        value: u64,
    },
    /// The NAR of an ImportPaths entry is malformed.
    #[error("NAR in ImportPaths: {0}")]
    ImportNar(NarError),
    /// An acknowledgement (`u64 1`) expected, something else found.
    #[error("acknowledgement at offset {offset}: expected 1, got {value}")]
    BadAck {
        /// Offset of the value.
        offset: usize,
        /// The value found.
        value: u64,
    },
    /// The input ended in the middle of a message or of a NAR.
    #[error("unexpected end of input {0}")]
    UnexpectedEof(&'static str),
    /// The driver called the session out of turn (a bug in the driver, not in the input).
    #[error("session misuse: {0}")]
    Misuse(&'static str),
}

impl From<Stop<WireError>> for Stop<ServeError> {
    fn from(s: Stop<WireError>) -> Self {
        s.map_invalid(ServeError::Wire)
    }
}

impl From<WireError> for Stop<ServeError> {
    fn from(e: WireError) -> Self {
        Stop::Invalid(ServeError::Wire(e))
    }
}

/// The result of reading part of a serve message.
pub type ReadResult<T> = wire::ReadResult<T, ServeError>;

#[cfg(any(test, feature = "test"))]
pub mod strategies;

#[cfg(test)]
mod tests;
