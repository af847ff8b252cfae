//! nixbuild's embedded SSH front door (russh): public keys mapped to accounts, `nix-store
//! --serve` exec requests mapped to serve sessions.
//!
//! Not implemented yet: this crate is a placeholder in the workspace until the SSH issue.
#![forbid(unsafe_code)]
