//! Hashes as Nix uses them: algorithms, digests and their string forms (base16, nix32,
//! base64, SRI; spec §6.5), and a streaming hasher.

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    /// MD5, 16 bytes.
    Md5,
    /// SHA-1, 20 bytes.
    Sha1,
    /// SHA-256, 32 bytes.
    Sha256,
    /// SHA-512, 64 bytes.
    Sha512,
}

/// A digest together with its algorithm. Stored inline, no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; 64],
}

/// Why a hash string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    // variants chosen by the implementer, each naming what was wrong
}
