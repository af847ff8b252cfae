//! Scheduler decisions under a large mixed workload (issue 6).
//!
//! - 1,000 machines: 70% `x86_64-linux` + `i686-linux`, 20% `aarch64-linux`, 10% both
//!   `x86_64-linux` and `aarch64-linux`; 4, 8, 16, 32 or 64 cores, 4 GiB per core, a job
//!   limit equal to the cores; every machine offers `big-parallel`, 30% `kvm`, and 5% have
//!   the mandatory feature `benchmark`.
//! - 1,000 accounts of skewed sizes: a build belongs to account `k` with probability
//!   proportional to `1/(k+1)` (Zipf).
//! - 100,000 queued builds: 75% `x86_64-linux`, 20% `aarch64-linux`, 5% `i686-linux`; 10%
//!   require `big-parallel`, 5% `kvm`, 2% `benchmark`; 70% take the default cores, the others
//!   ask for 1 to 8; 80% take the default memory, the others ask for 1 to 16 GiB; 10% have
//!   priority 1.
//! - The machines are filled, then each step completes a random running build, submits a new
//!   one (so about 100,000 stay queued) and decides until nothing more starts. A *decision*
//!   is one `decide_one` call, the last one of a step (which starts nothing) included.
//!
//! Besides criterion's figure, the bench prints the throughput and the latency percentiles
//! of 100,000 steps from a histogram of every decision (`SCHED_STEPS` changes the count), and
//! a digest of every start (build, machine, cores, memory, reserved): a change meant only to
//! make the scheduler faster must leave it as it was for the same step count.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use nixbuild_core::scheduler::{BuildId, BuildSpec, Machine, Scheduler, SchedulerConfig};

const GIB: u64 = 1 << 30;

/// splitmix64: a small deterministic generator, so every run has the same workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self) -> u64 {
        self.below(100)
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn machines(rng: &mut Rng) -> Vec<Machine> {
    (0..1000)
        .map(|_| {
            let systems = match rng.percent() {
                0..70 => strings(&["x86_64-linux", "i686-linux"]),
                70..90 => strings(&["aarch64-linux"]),
                _ => strings(&["x86_64-linux", "aarch64-linux"]),
            };
            let mut supported_features = strings(&["big-parallel"]);
            if rng.percent() < 30 {
                supported_features.push("kvm".to_owned());
            }
            let mandatory_features = if rng.percent() < 5 {
                strings(&["benchmark"])
            } else {
                vec![]
            };
            let cores = 4 << rng.below(5);
            Machine {
                systems,
                supported_features,
                mandatory_features,
                cores,
                memory: u64::from(cores) * 4 * GIB,
                max_jobs: cores,
                speed: Machine::NORMAL_SPEED,
            }
        })
        .collect()
}

/// Cumulative Zipf weights of 1,000 accounts.
fn account_weights() -> Vec<f64> {
    let mut total = 0.0;
    (0..1000)
        .map(|k| {
            total += 1.0 / f64::from(k + 1);
            total
        })
        .collect()
}

fn build(rng: &mut Rng, accounts: &[f64]) -> BuildSpec {
    let total = accounts[accounts.len() - 1];
    let x = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
    let account = accounts.partition_point(|&c| c < x);
    let system = match rng.percent() {
        0..75 => "x86_64-linux",
        75..95 => "aarch64-linux",
        _ => "i686-linux",
    };
    let mut required_features = Vec::new();
    if rng.percent() < 10 {
        required_features.push("big-parallel".to_owned());
    }
    if rng.percent() < 5 {
        required_features.push("kvm".to_owned());
    }
    if rng.percent() < 2 {
        required_features.push("benchmark".to_owned());
    }
    BuildSpec {
        account: format!("account{account}"),
        system: system.to_owned(),
        required_features,
        cores: (rng.percent() >= 70).then(|| 1 + rng.below(8) as u32),
        memory: (rng.percent() >= 80).then(|| (1 + rng.below(16)) * GIB),
        priority: i32::from(rng.percent() < 10),
    }
}

/// The scheduler with the machines filled and 100,000 builds queued.
struct Workload {
    rng: Rng,
    accounts: Vec<f64>,
    sched: Scheduler,
    running: Vec<BuildId>,
    now: Duration,
    /// FNV-1a over the starts since the machines were filled.
    digest: u64,
}

impl Workload {
    fn new() -> Workload {
        let mut rng = Rng(6);
        let accounts = account_weights();
        let machines = machines(&mut rng);
        let mut sched =
            Scheduler::new(SchedulerConfig::default(), machines).expect("valid configuration");
        let now = Duration::ZERO;
        let mut queued = 0;
        while queued < 100_000 {
            let spec = build(&mut rng, &accounts);
            if sched.submit(spec, now).is_ok() {
                queued += 1;
            }
        }
        let running = sched.decide(now).into_iter().map(|s| s.id).collect();
        Workload {
            rng,
            accounts,
            sched,
            running,
            now,
            digest: 0xcbf2_9ce4_8422_2325,
        }
    }

    /// One step; calls `decision` with the duration of each decision.
    fn step(&mut self, mut decision: impl FnMut(Duration)) {
        self.now += Duration::from_millis(10);
        if !self.running.is_empty() {
            let i = self.rng.below(self.running.len() as u64) as usize;
            let id = self.running.swap_remove(i);
            self.sched.complete(id, self.now).expect("a running build");
        }
        loop {
            let spec = build(&mut self.rng, &self.accounts);
            if self.sched.submit(spec, self.now).is_ok() {
                break;
            }
        }
        loop {
            let start = Instant::now();
            let started = self.sched.decide_one(self.now);
            decision(start.elapsed());
            match started {
                Some(s) => {
                    let words = [
                        s.id.get(),
                        u64::from(s.machine.0),
                        s.memory,
                        u64::from(s.reserved),
                    ];
                    for word in words
                        .into_iter()
                        .chain(s.cores.iter().map(|&c| u64::from(c)))
                    {
                        self.digest = (self.digest ^ word).wrapping_mul(0x0100_0000_01b3);
                    }
                    self.running.push(s.id);
                }
                None => break,
            }
        }
    }
}

fn report() {
    let steps: usize = std::env::var("SCHED_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let mut w = Workload::new();
    println!(
        "scheduler workload: {} running, {} queued after filling the machines",
        w.running.len(),
        w.sched.waiting_count()
    );
    let mut latencies: Vec<u64> = Vec::with_capacity(steps * 3);
    for _ in 0..steps {
        w.step(|d| latencies.push(d.as_nanos() as u64));
    }
    let total: u64 = latencies.iter().sum();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "scheduler: {} decisions in {:.3} s: {:.0} decisions/s; latency p50 {:.1} µs, \
         p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs; {} queued, {} running at the end; \
         decision digest {:016x}",
        latencies.len(),
        total as f64 / 1e9,
        latencies.len() as f64 / (total as f64 / 1e9),
        at(0.5) as f64 / 1e3,
        at(0.99) as f64 / 1e3,
        at(0.999) as f64 / 1e3,
        latencies[latencies.len() - 1] as f64 / 1e3,
        w.sched.waiting_count(),
        w.sched.running_count(),
        w.digest,
    );
}

fn decisions(c: &mut Criterion) {
    report();
    let mut w = Workload::new();
    c.bench_function("scheduler: one step (complete, submit, decide)", |b| {
        b.iter(|| w.step(|_| ()))
    });
}

criterion_group!(benches, decisions);
criterion_main!(benches);
