//! nixbuild: a self-hostable remote build service for Nix.
//!
//! This root package composes the workspace crates into the service: [`config`] (the TOML
//! configuration), [`cgroup`] (per-build cgroups), [`host`] (the host's facts, detected once),
//! [`store`] (store objects on disk and metadata in SQLite), [`session`] (the async driver of
//! one `nix-store --serve` session over the sans-IO codec of [`nixbuild_core::serve`]),
//! [`service`] (what a protocol driver asks of the store and build service, as one account
//! within its limits), [`daemon`] (the composition root and the Unix socket server),
//! [`reload`] (what SIGHUP re-reads and puts in force), [`collector`] (when the store's
//! garbage collector runs), [`metrics`] (Prometheus metrics),
//! [`relay_protocol`] (the header and frames spoken between the relay and the daemon),
//! [`builds`] (the build service: what happens around a sandboxed build), [`client_pipe`] (the
//! client's pipes, lent to blocking tasks that move NAR data through them: `pipes` reads and
//! splices, in chunks from `buffers`) and [`ssh`] (its SSH front door, on `nixbuild_ssh`). It
//! also dumps file trees as NARs ([`nar_fs`]), and has the crash tests' named failpoints
//! ([`failpoint`], with the `failpoints` feature). The binaries in `examples/` are thin
//! wrappers around them; see ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub use nixbuild_core as core;

mod buffers;
pub mod builds;
pub mod cgroup;
pub mod client_pipe;
pub mod collector;
pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod fleet;
pub mod host;
pub mod metrics;
pub mod nar_fs;
pub mod ops;
mod pipes;
pub mod relay_protocol;
pub mod reload;
pub mod service;
pub mod session;
pub mod ssh;
pub mod store;
pub mod substitute;
pub mod worker_session;
