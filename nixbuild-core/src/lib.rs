//! Pure logic of nixbuild: the Nix formats and the serve protocol, with no I/O.
//!
//! Everything here works over bytes handed in by the caller (sans-IO), so the store, the
//! network layer, the fuzzers and the benchmarks all drive the same code:
//!
//! - [`account`]: the grammar of account names.
//! - [`budget`]: a byte budget shared by many holders (the daemon's buffered requests).
//! - [`binary_cache`]: narinfo files, `nix-cache-info` and ed25519 path signatures.
//! - [`wire`]: the primitives of the Nix wire format (u64, padded strings, lists), bounded.
//! - [`nixbase32`] and [`hash`]: Nix's base-32 and the hash types with their string forms.
//! - [`store_path`] and [`content_address`]: store path syntax and computation.
//! - [`nar`]: the streaming NAR reader and the canonical NAR writer.
//! - [`derivation`]: ATerm `.drv` files, `hashDerivationModulo`, output paths.
//! - [`refscan`]: the streaming reference scanner.
//! - [`serve`]: the `nix-store --serve` protocol, typed requests and responses.
//! - [`scheduler`]: which build starts next, where, with which cores and memory.
//! - [`graph`]: the order of a graph build: which derivation may start, what a failure fails.
//! - [`machines`]: Nix's machines format, the builders a front sends builds to.
#![forbid(unsafe_code)]

pub mod account;
pub mod binary_cache;
pub mod budget;
pub mod content_address;
pub mod derivation;
mod framer;
pub mod graph;
pub mod hash;
pub mod machines;
pub mod nar;
pub mod nixbase32;
pub mod refscan;
pub mod rewrite;
pub mod scheduler;
pub mod serve;
pub mod store_path;
pub mod wire;
pub mod worker;
