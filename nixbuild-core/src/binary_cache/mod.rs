//! Binary caches as Nix writes them (`nix copy --to file://…`, cache.nixos.org): the
//! narinfo of each path, the cache's `nix-cache-info`, and the ed25519 signatures that say
//! who vouches for a path. Pure: the server's substituter fetches the files and feeds them
//! here.

mod narinfo;
mod signature;
#[cfg(test)]
mod tests;

pub use narinfo::{CacheInfo, Compression, NarInfo, NarInfoError};
pub use signature::{PublicKey, SecretKey, SignatureError, TrustedKeys};

/// Proptest strategies for narinfos.
#[cfg(any(test, feature = "test"))]
pub mod strategies {
    use proptest::prelude::*;

    use super::{Compression, NarInfo};
    use crate::content_address::strategies::content_address;
    use crate::hash::strategies::hash_of;
    use crate::hash::HashAlgo;
    use crate::store_path::strategies::store_path;

    /// Any compression method, with a few unknown ones.
    pub fn compression() -> impl Strategy<Value = Compression> {
        prop_oneof![
            Just(Compression::None),
            Just(Compression::Xz),
            Just(Compression::Zstd),
            Just(Compression::Bzip2),
            "[a-z0-9]{1,6}".prop_map(|s| Compression::parse(&s)),
        ]
    }

    /// Any narinfo this module writes.
    pub fn narinfo() -> impl Strategy<Value = NarInfo> {
        (
            (
                store_path(),
                "nar/[a-z0-9]{1,52}\\.nar(\\.xz|\\.zst)?",
                compression(),
            ),
            (
                proptest::option::of(hash_of(HashAlgo::Sha256)),
                proptest::option::of(any::<u64>()),
                hash_of(HashAlgo::Sha256),
                1..u64::MAX,
            ),
            (
                proptest::collection::btree_set(store_path(), 0..4),
                proptest::option::of(store_path()),
                proptest::option::of("[a-z0-9_-]{1,20}"),
                proptest::collection::btree_set("[a-z0-9.-]{1,10}:[A-Za-z0-9+/]{1,20}={0,2}", 0..3),
                proptest::option::of(content_address()),
            ),
        )
            .prop_map(
                |(
                    (store_path, url, compression),
                    (file_hash, file_size, nar_hash, nar_size),
                    (references, deriver, system, sigs, ca),
                )| NarInfo {
                    store_path,
                    url,
                    compression,
                    file_hash,
                    file_size,
                    nar_hash,
                    nar_size,
                    references,
                    deriver,
                    system,
                    sigs,
                    ca,
                },
            )
    }
}
