//! `nixbuild-server`: the daemon. It owns the state directory and serves `nix-store --serve`
//! sessions over SSH (`--listen`, keys from `--authorized-keys`) and relayed by
//! `nixbuild-serve` over `<state-dir>/serve.sock`.
//!
//! ```text
//! cargo run --release --example nixbuild-server -- --listen 127.0.0.1:2222 \
//!     --state-dir /var/lib/nixbuild --authorized-keys /var/lib/nixbuild/authorized_keys
//! ```
//!
//! On cgroup v2 under systemd, when its own cgroup cannot hand cpuset, memory and pids to
//! builds (a root shell from an SSH login), it first asks systemd over D-Bus for a scope with
//! delegated controllers (`StartTransientUnit`, `Delegate=yes`) and moves there, same pid.
//!
//! Logs go to stderr (`RUST_LOG` filters them; default `info`; `--log-format json` for one JSON
//! object per line). At start, with `--listen`, the
//! lines users pin the SSH host key with go to stdout (and to `<state-dir>/ssh_host_pins`).
//! SIGHUP re-reads the configuration and the authorized keys; SIGTERM or SIGINT stops it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nixbuild::config::{parse_size, Overrides};
use nixbuild::reload::ConfigSource;

/// The nixbuild daemon.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The state directory: store, database, socket (created if missing).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Listen for SSH on this address, e.g. 127.0.0.1:2222 (overrides ssh.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// The keys allowed in over SSH, OpenSSH authorized_keys format; the first word of each
    /// key's comment is its account (overrides ssh.authorized_keys).
    #[arg(long, value_name = "FILE")]
    authorized_keys: Option<PathBuf>,
    /// The configuration file (default: <state-dir>/nixbuild.toml when it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Overrides store.max_nar_size (bytes).
    #[arg(long, value_name = "BYTES")]
    max_nar_size: Option<u64>,
    /// Overrides store.max_paths_per_request.
    #[arg(long, value_name = "N")]
    max_paths_per_request: Option<usize>,
    /// Overrides store.disk_reserve (bytes).
    #[arg(long, value_name = "BYTES")]
    disk_reserve: Option<u64>,
    /// Overrides timeouts.handshake (seconds).
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Overrides timeouts.idle (seconds).
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Overrides timeouts.shutdown (seconds).
    #[arg(long, value_name = "SECS")]
    shutdown_timeout: Option<u64>,
    /// Overrides relay.trusted_uids (repeat for several).
    #[arg(long = "trusted-uid", value_name = "UID")]
    trusted_uids: Option<Vec<u32>>,
    /// Overrides relay.trusted_gids (repeat for several).
    #[arg(long = "trusted-gid", value_name = "GID")]
    trusted_gids: Option<Vec<u32>>,
    /// Overrides capacity.cores: cores builds may use.
    #[arg(long, value_name = "N")]
    cores: Option<u32>,
    /// Overrides capacity.memory: memory builds may use, such as 16G or 512M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// How log lines are written: `text` for people, `json` (one object per line, with the
    /// session's and build's ids in its spans) for log shippers.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// The format of the log on stderr.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // Builds re-execute this binary as their sandbox helper: that mode must start before
    // anything else (no threads, no runtime).
    nixbuild_sandbox::maybe_run_helper();
    let mut args = Args::parse();
    let log = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    match args.log_format {
        LogFormat::Text => log.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => log
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    // Absolute, so that builds do not depend on the working directory.
    args.state_dir = match std::path::absolute(&args.state_dir) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("nixbuild-server: {}: {e}", args.state_dir.display());
            return ExitCode::FAILURE;
        }
    };
    let overrides = Overrides {
        max_nar_size: args.max_nar_size,
        max_paths_per_request: args.max_paths_per_request,
        disk_reserve: args.disk_reserve,
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        shutdown_timeout: args.shutdown_timeout,
        trusted_uids: args.trusted_uids,
        trusted_gids: args.trusted_gids,
        listen: args.listen,
        authorized_keys: args.authorized_keys,
        cores: args.cores,
        memory: args.memory,
    };
    let source = ConfigSource {
        state_dir: args.state_dir,
        file: args.config,
        overrides,
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nixbuild-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On cgroup v2 under systemd without delegated controllers, this process continues (same
    // pid) in a systemd scope that has them; if that cannot be done, the cgroup report says so.
    if let Err(e) = nixbuild::cgroup::enter_delegated_scope() {
        tracing::warn!("cannot ask systemd for a delegated cgroup: {e}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixbuild-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = nixbuild::daemon::shutdown_signal()
            .map_err(|e| format!("cannot watch for SIGTERM and SIGINT: {e}"))?;
        nixbuild::daemon::run(&source, config, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    // Blocking tasks of sessions that were cut off (an upload read straight from a client's
    // pipe that is still open) would hold the exit until their idle timeout; everything
    // acknowledged is registered by now, and what such a task leaves in tmp/ is removed at
    // the next start, as after a crash.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
