//! The handshake (docs/worker-protocol.md §3): magic numbers, protocol versions, the 1.38
//! feature exchange, and the hello each side sends before the first request.
//!
//! ```text
//! client: MAGIC_1, version
//! server: MAGIC_2, version
//! ≥ 1.38, both: their feature sets (string lists; the server's first in our output)
//! client: ≥ 1.14 CPU affinity (flag, then the CPU when 1), ≥ 1.11 reserveSpace
//! server: ≥ 1.33 its Nix version string, ≥ 1.35 trust, then STDERR_LAST
//! ```

use std::collections::BTreeSet;

use bytes::BufMut;

use super::stderr::STDERR_LAST;
use super::{ReadResult, WorkerError};
use crate::wire::{self, BufMutExt, Reader};

/// The client's magic, `WORKER_MAGIC_1`.
pub const CLIENT_MAGIC: u64 = 0x6e69_7863;
/// The server's magic, `WORKER_MAGIC_2`.
pub const SERVER_MAGIC: u64 = 0x6478_696f;

/// A worker protocol version, `major << 8 | minor`, with major 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerVersion(u16);

impl WorkerVersion {
    /// 1.21 (Nix 2.3): the oldest client served; AddToStoreNar's NAR is tunnelled.
    pub const V1_21: Self = Self(0x115);
    /// 1.22: QuerySubstitutablePathInfos carries content addresses.
    pub const V1_22: Self = Self(0x116);
    /// 1.23: AddToStoreNar's NAR is a framed stream.
    pub const V1_23: Self = Self(0x117);
    /// 1.25: AddToStore in the content-address form, with a framed dump.
    pub const V1_25: Self = Self(0x119);
    /// 1.26: structured errors.
    pub const V1_26: Self = Self(0x11a);
    /// 1.27: QueryValidPaths' `substitute` flag.
    pub const V1_27: Self = Self(0x11b);
    /// 1.28: BuildResult's `builtOutputs`.
    pub const V1_28: Self = Self(0x11c);
    /// 1.29: BuildResult's times.
    pub const V1_29: Self = Self(0x11d);
    /// 1.30: derived paths in the `drv!out` / `drv!*` form.
    pub const V1_30: Self = Self(0x11e);
    /// 1.31: realisations as JSON.
    pub const V1_31: Self = Self(0x11f);
    /// 1.33: the daemon's version string in the hello.
    pub const V1_33: Self = Self(0x121);
    /// 1.34 (Nix 2.8).
    pub const V1_34: Self = Self(0x122);
    /// 1.35: the trust field in the hello.
    pub const V1_35: Self = Self(0x123);
    /// 1.37: BuildResult's CPU times.
    pub const V1_37: Self = Self(0x125);
    /// 1.38 (Nix 2.34): the feature exchange.
    pub const V1_38: Self = Self(0x126);
    /// What this server advertises.
    pub const SERVER: Self = Self::V1_38;

    /// Validates a version read from the wire: major 1, minor at least 21.
    pub fn from_wire(n: u64) -> Result<Self, WorkerError> {
        match u16::try_from(n) {
            Ok(v) if v >> 8 == 1 && v >= Self::V1_21.0 => Ok(Self(v)),
            _ => Err(WorkerError::UnsupportedVersion(n)),
        }
    }

    /// The version as sent on the wire.
    pub const fn to_wire(self) -> u64 {
        self.0 as u64
    }

    /// The minor version.
    pub const fn minor(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// The version a server of version `server` speaks with a client that sent `client`.
    pub fn negotiate(client: Self, server: Self) -> Self {
        client.min(server)
    }

    /// Every version a client may send, for tests.
    pub fn all() -> impl Iterator<Item = Self> {
        (Self::V1_21.0..=Self::SERVER.0).map(Self)
    }
}

impl std::fmt::Display for WorkerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "1.{}", self.minor())
    }
}

/// Whether the server trusts the client (1.35 on): `0` unknown, `1` trusted, `2` not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The server does not say.
    Unknown,
    /// Trusted: may add unsigned paths and build input-addressed derivations it sends.
    Trusted,
    /// Not trusted.
    NotTrusted,
}

impl Trust {
    fn to_wire(self) -> u64 {
        match self {
            Trust::Unknown => 0,
            Trust::Trusted => 1,
            Trust::NotTrusted => 2,
        }
    }

    fn from_wire(n: u64, offset: usize) -> ReadResult<Self> {
        Ok(match n {
            0 => Trust::Unknown,
            1 => Trust::Trusted,
            2 => Trust::NotTrusted,
            _ => {
                return Err(WorkerError::Malformed {
                    field: "trust",
                    offset,
                    reason: format!("unknown value {n}"),
                }
                .into())
            }
        })
    }
}

/// What the client sends after the server's magic and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The client's version.
    pub version: WorkerVersion,
    /// Its features (1.38 on, when the server is 1.38 too).
    pub features: BTreeSet<String>,
    /// The CPU it asked the daemon to pin to (obsolete; 1.14 on).
    pub affinity: Option<u64>,
    /// The obsolete reserveSpace flag (1.11 on).
    pub reserve_space: bool,
}

impl ClientHello {
    /// Reads the client's magic.
    pub fn read_magic(r: &mut Reader<'_>) -> ReadResult<()> {
        let found = r.u64()?;
        if found != CLIENT_MAGIC {
            return Err(WorkerError::BadMagic {
                expected: CLIENT_MAGIC,
                found,
            }
            .into());
        }
        Ok(())
    }

    /// Reads the client's version.
    pub fn read_version(r: &mut Reader<'_>) -> ReadResult<WorkerVersion> {
        Ok(WorkerVersion::from_wire(r.u64()?)?)
    }

    /// Reads the client's feature set (negotiated version 1.38 on).
    pub fn read_features(
        r: &mut Reader<'_>,
        limits: &wire::Limits,
    ) -> ReadResult<BTreeSet<String>> {
        Ok(r.string_set("features", limits, limits.max_short_string_len)?)
    }

    /// Reads the affinity and reserveSpace fields.
    pub fn read_rest(r: &mut Reader<'_>) -> ReadResult<(Option<u64>, bool)> {
        let affinity = match r.bool("affinity flag")? {
            true => Some(r.u64()?),
            false => None,
        };
        Ok((affinity, r.bool("reserveSpace")?))
    }

    /// Writes the whole hello for a server of version `server`.
    pub fn encode(&self, server: WorkerVersion, buf: &mut impl BufMut) {
        buf.put_wire_u64(CLIENT_MAGIC);
        buf.put_wire_u64(self.version.to_wire());
        if WorkerVersion::negotiate(self.version, server) >= WorkerVersion::V1_38 {
            buf.put_wire_strings(&self.features);
        }
        match self.affinity {
            Some(cpu) => {
                buf.put_wire_u64(1);
                buf.put_wire_u64(cpu);
            }
            None => buf.put_wire_u64(0),
        }
        buf.put_wire_bool(self.reserve_space);
    }
}

/// What the server sends: its magic and version at once, then (after the client's version)
/// its features, and after the client's hello its Nix version and trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The server's version.
    pub version: WorkerVersion,
    /// Its features (1.38 on).
    pub features: BTreeSet<String>,
    /// The version string clients show (1.33 on).
    pub nix_version: String,
    /// Whether it trusts the client (1.35 on).
    pub trust: Trust,
}

impl ServerHello {
    /// Writes the magic and version, sent as soon as the client's magic is in.
    pub fn encode_start(&self, buf: &mut impl BufMut) {
        buf.put_wire_u64(SERVER_MAGIC);
        buf.put_wire_u64(self.version.to_wire());
    }

    /// Writes the feature set, for a negotiated version of 1.38 on.
    pub fn encode_features(&self, buf: &mut impl BufMut) {
        buf.put_wire_strings(&self.features);
    }

    /// Writes the end of the hello for negotiated version `v`: the version string, the trust
    /// and `STDERR_LAST`.
    pub fn encode_end(&self, v: WorkerVersion, buf: &mut impl BufMut) {
        if v >= WorkerVersion::V1_33 {
            buf.put_wire_bytes(self.nix_version.as_bytes());
        }
        if v >= WorkerVersion::V1_35 {
            buf.put_wire_u64(self.trust.to_wire());
        }
        buf.put_wire_u64(STDERR_LAST);
    }

    /// Reads a whole server hello as a client of version `client` sees it (for tests).
    pub fn read(
        r: &mut Reader<'_>,
        client: WorkerVersion,
        limits: &wire::Limits,
    ) -> ReadResult<Self> {
        let found = r.u64()?;
        if found != SERVER_MAGIC {
            return Err(WorkerError::BadMagic {
                expected: SERVER_MAGIC,
                found,
            }
            .into());
        }
        let version = WorkerVersion::from_wire(r.u64()?)?;
        let v = WorkerVersion::negotiate(client, version);
        let mut hello = ServerHello {
            version,
            features: BTreeSet::new(),
            nix_version: String::new(),
            trust: Trust::Unknown,
        };
        if v >= WorkerVersion::V1_38 {
            hello.features = r.string_set("features", limits, limits.max_short_string_len)?;
        }
        if v >= WorkerVersion::V1_33 {
            hello.nix_version = r.str("version", limits.max_short_string_len)?.to_owned();
        }
        if v >= WorkerVersion::V1_35 {
            let offset = r.position();
            hello.trust = Trust::from_wire(r.u64()?, offset)?;
        }
        let offset = r.position();
        let last = r.u64()?;
        if last != STDERR_LAST {
            return Err(WorkerError::Malformed {
                field: "end of hello",
                offset,
                reason: format!("expected STDERR_LAST, got {last:#x}"),
            }
            .into());
        }
        Ok(hello)
    }
}
