//! The fleet side by side with Nix's own way (issue 23): two stock builders (OpenSSH's sshd
//! running the host's `nix-store --serve` in a private mount namespace with its own /nix,
//! as `benches/compare` starts its reference), and the same Nix 2.8 client sending the same
//! kind of builds either straight to them as a Nix builders line (the stock way) or to a
//! nixbuild front over SSH whose `[fleet]` lists them (`build_locally = false`).
//!
//! Workloads, each run `--reps` times per side, the sides alternating, fresh derivations
//! (a new salt) every run:
//! - `trivial`: `--builds` derivations that write their salt, wall time per side and the
//!   ratio front / stock, and the front's CPU time per build (utime + stime of the
//!   daemon);
//! - `shared`: `--shared` derivations that all read one fresh `--input-mib` MiB input: wall
//!   time per side, and through the front how many times the input crossed to each builder
//!   (the NAR bytes the front sent it, divided by the input's NAR size).
//!
//! ```text
//! cargo build --release --examples
//! cargo bench --bench fleet -- --reps 3
//! ```
//!
//! Needs root, `nix-bin`, `openssh-server`, `busybox-static`, the `nixbld` users and the
//! client chroots' busybox path (the README's test command sets all of these up).

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use harness::clients::{Client, ClientNix};
use harness::ssh::{keygen, Key, SshServer};
use harness::stock::StockBuilder;
use serde_json::Value;

/// Compare a nixbuild front with a Nix builders line over two stock builders.
#[derive(Debug, Parser)]
struct Args {
    /// Runs per side and workload.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Derivations of the trivial workload.
    #[arg(long, default_value_t = 200)]
    builds: usize,
    /// Derivations of the shared-input workload.
    #[arg(long, default_value_t = 50)]
    shared: usize,
    /// Size of the shared input, in MiB.
    #[arg(long, default_value_t = 10)]
    input_mib: usize,
    /// Jobs per builder (its `max-jobs`, and its max jobs in both builders lines).
    #[arg(long, default_value_t = 4)]
    jobs: u32,
    /// Workloads to run: `trivial`, `shared` (comma-separated).
    #[arg(long, default_value = "trivial,shared")]
    workloads: String,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

/// A machines-file line for stock builder `b`.
fn stock_line(b: &StockBuilder, key: &Key, jobs: u32) -> String {
    format!(
        "ssh://root@127.0.0.1:{} x86_64-linux {} {jobs} 1 - - {}",
        b.port,
        key.private.display(),
        b.host_key
    )
}

/// `nixbuild status --json` on the front, as the admin.
fn status(config: &Path) -> Value {
    let out = harness::ssh::ok(&mut SshServer::ssh(
        config,
        "front-ops",
        &["nixbuild", "status", "--json"],
    ));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// NAR bytes the front has sent to each machine.
fn bytes_sent(config: &Path) -> Vec<u64> {
    status(config)["fleet"]["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| m["bytes_sent"].as_u64().unwrap_or(0))
        .collect()
}

/// User plus system CPU time of process `pid`, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: u64 =
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    // Linux reports them in USER_HZ, 100 on every architecture Nix supports.
    Duration::from_millis(ticks * 10)
}

/// Runs `cmd` (a `nix-build`), which must succeed; its wall time.
fn timed(mut cmd: Command, what: &str) -> Duration {
    let started = Instant::now();
    let out = cmd.output().expect("nix-build");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let keys = tempfile::tempdir().expect("temp dir");
    let identity = keygen(keys.path(), "id_front", "ed25519", "front");
    let builders = [
        StockBuilder::start(&identity, args.jobs),
        StockBuilder::start(&identity, args.jobs),
    ];
    let lines: Vec<String> = builders
        .iter()
        .map(|b| stock_line(b, &identity, args.jobs))
        .collect();

    let front_files = tempfile::tempdir().expect("temp dir");
    let client_key = SshServer::key(front_files.path(), "id_bench", "ed25519", "bench");
    let ops = SshServer::key(front_files.path(), "id_ops", "ed25519", "ops");
    let machines = front_files.path().join("machines");
    std::fs::write(&machines, lines.join("\n") + "\n").expect("write machines");
    let config = format!(
        "[admin]\naccounts = [\"ops\"]\n\n[fleet]\nmachines = \"{}\"\nprobe_interval = 5\n\
         build_locally = false\n",
        machines.display()
    );
    let front = SshServer::start(&config, front_files, &[&client_key, &ops]);
    let ops_config = front.ssh_config("front-ops", &ops);
    let client_config = front.ssh_config("front", &client_key);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(0..2).all(|m| status(&ops_config)["fleet"]["machines"][m]["state"] == "up") {
        assert!(Instant::now() < deadline, "the builders never came up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let nix = ClientNix::new(Client::Host, "");
    // Nix 2.8 takes no port in an ssh:// URI: the client reaches the builders by an alias
    // each, in an ssh config whose HostKeyAlias makes the line's pinned key the one checked.
    let stock_config = keys.path().join("ssh_config");
    let hosts: String = builders
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "Host stock{i}\n  HostName 127.0.0.1\n  Port {}\n  User root\n  IdentityFile {}\n  \
                 IdentitiesOnly yes\n  HostKeyAlias stock{i}\n  UserKnownHostsFile /dev/null\n  \
                 GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
                b.port,
                identity.private.display()
            )
        })
        .collect();
    std::fs::write(&stock_config, hosts).expect("write the ssh config");
    let stock_builders = builders
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "ssh://stock{i} x86_64-linux - {} 1 - - {}",
                args.jobs, b.host_key
            )
        })
        .collect::<Vec<_>>()
        .join(";");
    let front_builders = "ssh://front x86_64-linux - 100 1 -";
    let nix_build = |over_front: bool, drvs: &[String]| {
        let builders = if over_front {
            front_builders
        } else {
            stock_builders.as_str()
        };
        let mut cmd = nix.over_ssh(
            if over_front {
                &client_config
            } else {
                &stock_config
            },
            "nix-build",
        );
        cmd.args(["--max-jobs", "0", "--no-out-link", "--builders", builders])
            .args(drvs);
        cmd
    };
    let pid = front.daemon.pid();
    println!(
        "fleet bench: {} reps, {} trivial builds, {} builds sharing {} MiB, 2 stock builders \
         with {} jobs each; client {}",
        args.reps, args.builds, args.shared, args.input_mib, args.jobs, nix.version
    );

    let run = |w: &str| args.workloads.split(',').any(|x| x == w);
    if run("trivial") {
        trivial(&args, &nix, pid, &nix_build);
    }
    if run("shared") {
        shared(&args, &nix, &ops_config, &nix_build);
    }
}

/// 200 builds that write their salt, through the front and straight.
fn trivial(args: &Args, nix: &ClientNix, pid: u32, nix_build: &dyn Fn(bool, &[String]) -> Command) {
    let (mut stock_s, mut front_s, mut cpu_ms) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.reps {
        for side in [rep % 2 == 0, rep % 2 == 1] {
            let salt = format!("{}-{rep}-{side}", std::process::id());
            let kinds: Vec<(&str, String)> = (0..args.builds)
                .map(|i| ("", format!("echo {salt} {i} > $out")))
                .collect();
            let drvs = nix.derivations(&salt, &kinds);
            if side {
                let before = cpu_time(pid);
                let took = timed(nix_build(true, &drvs), "through the front");
                let cpu = cpu_time(pid).saturating_sub(before);
                front_s.push(took.as_secs_f64());
                cpu_ms.push(cpu.as_secs_f64() * 1000.0 / args.builds as f64);
                println!(
                    "  trivial rep {rep}: front {:.2} s, front CPU {:.1} ms per build",
                    took.as_secs_f64(),
                    cpu_ms[cpu_ms.len() - 1]
                );
            } else {
                let took = timed(nix_build(false, &drvs), "straight");
                stock_s.push(took.as_secs_f64());
                println!("  trivial rep {rep}: stock {:.2} s", took.as_secs_f64());
            }
        }
    }
    let (stock_t, front_t) = (median(&mut stock_s), median(&mut front_s));
    println!(
        "trivial: stock {stock_t:.2} s, front {front_t:.2} s, front/stock {:.2}; front CPU {:.1} \
         ms per build (medians)",
        front_t / stock_t,
        median(&mut cpu_ms)
    );
}

/// Builds sharing one fresh input, through the front and straight; how often the input
/// crossed to each builder through the front.
fn shared(
    args: &Args,
    nix: &ClientNix,
    ops_config: &Path,
    nix_build: &dyn Fn(bool, &[String]) -> Command,
) {
    let (mut stock_s, mut front_s, mut crossings) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.reps {
        for side in [rep % 2 == 0, rep % 2 == 1] {
            let salt = format!("{}-shared-{rep}-{side}", std::process::id());
            let file = nix.scratch().join(format!("input-{salt}"));
            let mut data = vec![0u8; args.input_mib << 20];
            fastrand::fill(&mut data);
            std::fs::write(&file, &data).expect("write the input");
            let input = nix.add(&file);
            let info = nix.ok(nix.command("nix").args(["path-info", "--json", &input]));
            let info: Value = serde_json::from_slice(&info.stdout).expect("JSON");
            let nar = info[0]["narSize"].as_u64().expect("narSize");
            let kinds: Vec<(&str, String)> = (0..args.shared)
                .map(|i| ("", format!("wc -c < ${{input}} > $out; echo {i} >> $out")))
                .collect();
            let lets = format!("input = builtins.storePath \"{input}\";");
            let drvs = nix.derivations_with(&salt, &lets, &kinds);
            if side {
                let before = bytes_sent(ops_config);
                let took = timed(nix_build(true, &drvs), "through the front");
                let after = bytes_sent(ops_config);
                let crossed: Vec<f64> = after
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| (a - b) as f64 / nar as f64)
                    .collect();
                println!(
                    "  shared rep {rep}: front {:.2} s; the input crossed {crossed:.2?} times to \
                     the builders",
                    took.as_secs_f64()
                );
                front_s.push(took.as_secs_f64());
                crossings.extend(crossed);
            } else {
                let took = timed(nix_build(false, &drvs), "straight");
                stock_s.push(took.as_secs_f64());
                println!("  shared rep {rep}: stock {:.2} s", took.as_secs_f64());
            }
            let _ = nix.command("nix-store").args(["--delete", &input]).output();
        }
    }
    let (stock_t, front_t) = (median(&mut stock_s), median(&mut front_s));
    println!(
        "shared: stock {stock_t:.2} s, front {front_t:.2} s, front/stock {:.2}; the input \
         crossed to a builder at most {:.2} times (of {} builders × {} runs)",
        front_t / stock_t,
        crossings.iter().copied().fold(0.0, f64::max),
        2,
        args.reps
    );
}
