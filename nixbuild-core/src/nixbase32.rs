//! Nix's base-32 encoding ("nix32"): alphabet without `e o u t`, little-endian bit order,
//! most significant digit first (spec §8.2).

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nix32 string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nixbase32Error {
    /// A character outside [`ALPHABET`].
    #[error("invalid nix32 character {found:?} at position {pos}")]
    InvalidChar { found: char, pos: usize },
    /// The string has the wrong length for the expected number of bytes.
    #[error("nix32 string has length {found}, expected {expected}")]
    BadLength { found: usize, expected: usize },
    /// Bits set beyond the last byte.
    #[error("nix32 string has bits set beyond the end of the value")]
    TrailingBits,
}

/// Number of nix32 characters that encode `n` bytes: `ceil(8n/5)`.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes `bytes` in nix32.
pub fn encode(bytes: &[u8]) -> String {
    todo!()
}

/// Decodes a nix32 string into exactly `N` bytes.
pub fn decode_fixed<const N: usize>(s: &[u8]) -> Result<[u8; N], Nixbase32Error> {
    todo!()
}

/// Decodes a nix32 string of any valid length.
pub fn decode(s: &[u8]) -> Result<Vec<u8>, Nixbase32Error> {
    todo!()
}
