//! nixbuild's embedded SSH front door (russh): public keys mapped to accounts, `nix-store
//! --serve` exec requests mapped to serve sessions, everything else refused.
//!
//! - [`authorized_keys`]: the `--authorized-keys` file, parsed (pure).
//! - [`ciphers`]: the ciphers offered (pure).
//! - [`client`]: the client a front reaches its builders with (pinned host keys).
//! - [`exec`]: which exec requests are served (pure).
//! - [`host_key`]: the host key kept in the state directory, and the strings users pin it with.
//! - [`server`]: the server itself, generic over the [`SessionService`] that runs sessions.
//! - [`unauthenticated`]: the budget of connections not yet authenticated, per source and
//!   overall, and whom to evict when it is full (pure).
//!
//! Keys are `ssh-key` types as russh re-exports them ([`russh::keys::ssh_key`]).
#![forbid(unsafe_code)]

pub mod authorized_keys;
pub mod ciphers;
pub mod client;
pub mod exec;
pub mod host_key;
pub mod server;
pub mod unauthenticated;

pub use authorized_keys::{AuthorizedKeys, KeyTypes};
pub use ciphers::Ciphers;
pub use russh::keys::ssh_key;
pub use server::{
    ChannelStdout, Limits, Server, ServerConfig, ServerError, SessionRequest, SessionService,
};
