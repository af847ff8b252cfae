//! nixbuild: a self-hostable remote build service for Nix.
//!
//! This root package composes the workspace crates into the service: it re-exports the pure
//! core ([`nixbuild_core`]), dumps file trees as NARs ([`nar_fs`]) and keeps the store
//! ([`store`]: objects on disk, metadata in SQLite, one view per account). See ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub use nixbuild_core as core;

pub mod nar_fs;
pub mod store;
