//! Store paths: syntax (spec §8.1) and computation from fingerprints (spec §8.3).

/// The only store directory nixbuild serves.
pub const STORE_DIR: &str = "/nix/store";

/// A valid store path: a 20-byte digest and a name. Ordered like its absolute path string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    digest: [u8; 20],
    name: String,
}
