//! The soak: many concurrent SSH sessions from many accounts against one `nixbuild-server`
//! on loopback for minutes, mixing queries, uploads, builds and downloads (see `load.rs`),
//! over the serve protocol (`nix-store --serve --write`) and the worker protocol
//! (`nix-daemon --stdio`), a session's connections taking them in turn.
//! Prints operations per second, error counts, p50/p99 latencies and the server's memory,
//! descriptors and threads (baseline, peak, after), and exits 1 on any unexpected error, on
//! descriptors that do not come back to the baseline, or on an ERROR in the server's log.
//!
//! ```text
//! cargo build --release --examples
//! cargo bench --bench soak -- --sessions 200 --duration 300
//! ```
//!
//! The server is `target/release/examples/nixbuild-server` (built by the first command).

#[path = "../../tests/harness/mod.rs"]
mod harness;
mod load;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Soak nixbuild-server with concurrent SSH sessions.
#[derive(Debug, Parser)]
struct Args {
    /// Sessions open at once, each on its own SSH connection.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Accounts the sessions are spread over.
    #[arg(long, default_value_t = 20)]
    accounts: usize,
    /// Keys per account in authorized_keys.
    #[arg(long, default_value_t = 3)]
    keys_per_account: usize,
    /// Mean pause of a session between operations, in milliseconds.
    #[arg(long, default_value_t = 50)]
    think_ms: u64,
    /// Seed of the sessions' random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The protocols the sessions speak, in turn: serve (`nix-store --serve --write`),
    /// daemon (`nix-daemon --stdio`).
    #[arg(long, value_delimiter = ',', default_value = "serve,daemon")]
    protocols: Vec<load::Protocol>,
    /// Run the collector every `--gc-interval` seconds with this `[store] retention` in
    /// seconds (off by default).
    #[arg(long)]
    retention: Option<u64>,
    /// Seconds between collections, with `--retention`.
    #[arg(long, default_value_t = 2)]
    gc_interval: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = load::Options {
        sessions: args.sessions,
        duration: Duration::from_secs(args.duration),
        accounts: args.accounts,
        keys_per_account: args.keys_per_account,
        think: Duration::from_millis(args.think_ms),
        seed: args.seed,
        protocols: args.protocols,
        gc: args.retention.map(|r| (r, args.gc_interval)),
    };
    let (report, state) = load::run(&options);
    println!("{report}");
    drop(state);
    let problems = report.problems();
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("soak failed: {}", problems.join("; "));
        ExitCode::FAILURE
    }
}
