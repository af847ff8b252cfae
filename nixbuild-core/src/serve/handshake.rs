//! The handshake (docs/serve-protocol.md §3): magic numbers, protocol versions and their
//! negotiation.

use bytes::BufMut;

use super::{ReadResult, ServeError};
use crate::wire::{BufMutExt, Reader};

/// The client's magic, `SERVE_MAGIC_1`.
pub const CLIENT_MAGIC: u64 = 0x390c_9deb;
/// The server's magic, `SERVE_MAGIC_2`.
pub const SERVER_MAGIC: u64 = 0x5452_eecb;

/// A serve protocol version, `major << 8 | minor`, with major 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion(u16);

impl ProtocolVersion {
    /// serve 2.0: opcodes 1–7.
    pub const V2_0: Self = Self(0x200);
    /// serve 2.1: BuildDerivation.
    pub const V2_1: Self = Self(0x201);
    /// serve 2.2: `maxLogSize`.
    pub const V2_2: Self = Self(0x202);
    /// serve 2.3: `nrRepeats`, `enforceDeterminism`, BuildResult times.
    pub const V2_3: Self = Self(0x203);
    /// serve 2.4: QueryPathInfos `narHash`, `ca`, `sigs`.
    pub const V2_4: Self = Self(0x204);
    /// serve 2.5: AddToStoreNar (Nix 2.3).
    pub const V2_5: Self = Self(0x205);
    /// serve 2.6: `builtOutputs` as realisations (Hydra).
    pub const V2_6: Self = Self(0x206);
    /// serve 2.7: `keepFailed` (Nix 2.4 to 2.34).
    pub const V2_7: Self = Self(0x207);
    /// serve 2.8: `builtOutputs` keyed by output name (Nix ≥ 2.35).
    pub const V2_8: Self = Self(0x208);
    /// What this server advertises (docs/serve-protocol.md §3: every client works with it).
    pub const SERVER: Self = Self::V2_7;

    /// Validates a version read from the wire: the major must be 2.
    pub fn from_wire(n: u64) -> Result<Self, ServeError> {
        match u16::try_from(n) {
            Ok(v) if v >> 8 == 2 => Ok(Self(v)),
            _ => Err(ServeError::UnsupportedVersion(n)),
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

    /// The version the server speaks with a client that sent `client`: `min(client, 0x207)`.
    pub fn negotiate(client: Self) -> Self {
        client.min(Self::SERVER)
    }
}

/// Reads a magic number and checks it.
fn magic(r: &mut Reader<'_>, expected: u64) -> ReadResult<()> {
    let found = r.u64()?;
    if found != expected {
        return Err(ServeError::BadMagic { expected, found }.into());
    }
    Ok(())
}

/// Reads a protocol version.
fn version(r: &mut Reader<'_>) -> ReadResult<ProtocolVersion> {
    Ok(ProtocolVersion::from_wire(r.u64()?)?)
}

/// The client's hello: `u64 0x390c9deb`, `u64 clientVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// The version the client speaks.
    pub version: ProtocolVersion,
}

impl ClientHello {
    /// Decodes the hello from the start of `buf`; `None` when more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ServeError> {
        crate::wire::complete(Self::read(&mut Reader::new(buf)).map(|h| (h, 16)))
    }

    /// Reads the hello.
    pub fn read(r: &mut Reader<'_>) -> ReadResult<Self> {
        magic(r, CLIENT_MAGIC)?;
        Ok(ClientHello {
            version: version(r)?,
        })
    }

    /// Reads only the magic, as the real server does before it answers.
    pub fn read_magic(r: &mut Reader<'_>) -> ReadResult<()> {
        magic(r, CLIENT_MAGIC)
    }

    /// Reads the version that follows the magic.
    pub fn read_version(r: &mut Reader<'_>) -> ReadResult<ProtocolVersion> {
        version(r)
    }

    /// Writes the hello.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_wire_u64(CLIENT_MAGIC);
        buf.put_wire_u64(self.version.to_wire());
    }
}

/// The server's hello: `u64 0x5452eecb`, `u64 serverVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHello {
    /// The version the server advertises.
    pub version: ProtocolVersion,
}

impl ServerHello {
    /// Decodes the hello from the start of `buf`; `None` when more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ServeError> {
        crate::wire::complete(Self::read(&mut Reader::new(buf)).map(|h| (h, 16)))
    }

    /// Reads the hello.
    pub fn read(r: &mut Reader<'_>) -> ReadResult<Self> {
        magic(r, SERVER_MAGIC)?;
        Ok(ServerHello {
            version: version(r)?,
        })
    }

    /// Writes the hello.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_wire_u64(SERVER_MAGIC);
        buf.put_wire_u64(self.version.to_wire());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn spec_13_1_handshake_bytes() {
        let c = hex("eb9d0c3900000000 0702000000000000");
        let s = hex("cbee525400000000 0702000000000000");
        let (hello, n) = ClientHello::decode(&c).unwrap().unwrap();
        assert_eq!((hello.version, n), (ProtocolVersion::V2_7, 16));
        let mut out = Vec::new();
        hello.encode(&mut out);
        assert_eq!(out, c);
        let mut out = Vec::new();
        ServerHello {
            version: ProtocolVersion::SERVER,
        }
        .encode(&mut out);
        assert_eq!(out, s);
        assert_eq!(
            ServerHello::decode(&s).unwrap().unwrap().0.version,
            ProtocolVersion::V2_7
        );
    }

    #[test]
    fn negotiation_is_min_with_0x207() {
        for (client, v) in [(0x200, 0x200), (0x205, 0x205), (0x206, 0x206)] {
            let c = ProtocolVersion::from_wire(client).unwrap();
            assert_eq!(ProtocolVersion::negotiate(c).to_wire(), v);
        }
        for client in [0x207, 0x208, 0x2ff] {
            let c = ProtocolVersion::from_wire(client).unwrap();
            assert_eq!(ProtocolVersion::negotiate(c), ProtocolVersion::V2_7);
        }
    }

    #[test]
    fn bad_magic_and_major_are_errors() {
        let mut b = Vec::new();
        b.put_wire_u64(CLIENT_MAGIC + 1);
        b.put_wire_u64(0x207);
        assert_eq!(
            ClientHello::decode(&b),
            Err(ServeError::BadMagic {
                expected: CLIENT_MAGIC,
                found: CLIENT_MAGIC + 1
            })
        );
        for bad in [0x107u64, 0x307, 0x1_0207, 0] {
            let mut b = Vec::new();
            b.put_wire_u64(CLIENT_MAGIC);
            b.put_wire_u64(bad);
            assert_eq!(
                ClientHello::decode(&b),
                Err(ServeError::UnsupportedVersion(bad))
            );
        }
        assert_eq!(ClientHello::decode(&hex("eb9d0c3900000000 07")), Ok(None));
    }
}
