//! nixbuild: a self-hostable remote build service for Nix.
//!
//! This root package composes the workspace crates into the service. So far it re-exports the
//! pure core ([`nixbuild_core`]); the store, the daemon and the serve-session driver arrive with
//! the store issue (see ARCHITECTURE.md).
#![forbid(unsafe_code)]

pub use nixbuild_core as core;

pub mod nar_fs;
pub mod store;
