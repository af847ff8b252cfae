//! The operations interface's reads on a store with many build records, and how long a
//! session's lookup waits while an admin's `usage --all` scans (the reads run on the store's
//! own reader connection, so: not at all). `--records N` (default 1,000,000) records of 100 accounts,
//! ending over the last 90 days, each build's derivation its own.
//!
//! `cargo bench --bench records -- [--records N] [--runs N]`

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::arg;
use nixbuild::store::{now_ms, BuildRecord, Store, StoreLimits};

const ACCOUNTS: u64 = 100;
const DAY_MS: u64 = 86_400_000;

fn drv(n: u64) -> String {
    format!("/nix/store/{n:032}-bench.drv")
}

/// A store in a temporary directory under /var/tmp with `n` records.
fn store(n: u64) -> (tempfile::TempDir, Store) {
    let dir = tempfile::Builder::new()
        .prefix("nixbuild-records-bench")
        .tempdir_in("/var/tmp")
        .expect("a temporary directory");
    let limits = StoreLimits {
        max_nar_size: 1 << 30,
        disk_reserve: 0,
    };
    let store = Store::open(&dir.path().join("state"), limits).expect("open the store");
    let now = now_ms();
    let span = 90 * DAY_MS;
    let batch = 10_000;
    for start in (0..n).step_by(batch as usize) {
        let records: Vec<BuildRecord> = (start..(start + batch).min(n))
            .map(|i| {
                let ended_ms = now - span + span * i / n.max(1);
                BuildRecord {
                    id: 0,
                    build: store.next_build_id(),
                    account: format!("account-{}", i % ACCOUNTS),
                    drv: drv(i),
                    outputs: format!("out /nix/store/{i:032}-bench\n"),
                    submitted_ms: ended_ms - 3000,
                    started_ms: Some(ended_ms - 2000),
                    ended_ms,
                    status: if i % 10 == 0 {
                        "PermanentFailure"
                    } else {
                        "Built"
                    }
                    .into(),
                    error: String::new(),
                    cores: 2,
                    memory: 1 << 30,
                    cpu_us: Some(1_500_000),
                    peak_memory: Some(64 << 20),
                    output_bytes: 4096,
                    shared: false,
                    log_bytes: 0,
                }
            })
            .collect();
        store
            .insert_records(&records, None)
            .expect("insert records");
    }
    (dir, store)
}

/// Runs `query` `runs` times; prints its median, 99th percentile and longest time.
fn time<T>(what: &str, runs: usize, mut query: impl FnMut() -> T) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(query());
            started.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<32} median {:>8.3} ms   p99 {:>8.3} ms   max {:>8.3} ms",
        ms(times[runs / 2]),
        ms(times[runs * 99 / 100]),
        ms(times[runs - 1])
    );
}

fn main() {
    let n = arg("--records", 1_000_000);
    let runs = arg("--runs", 200) as usize;
    let started = Instant::now();
    let (_dir, store) = store(n);
    println!(
        "{n} records of {ACCOUNTS} accounts written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let account = Some("account-7");
    let recent = store.records(account, 1).expect("records")[0].clone();
    let month = now_ms() - 30 * DAY_MS;
    time("builds (one account, 50)", runs, || {
        store.records(account, 50)
    });
    time("builds --all (200)", runs, || store.records(None, 200));
    time("show ID", runs, || {
        store.build_records(account, recent.build)
    });
    time("show DRV", runs, || {
        store.drv_records(account, &recent.drv, 1)
    });
    time("usage (one account, 30 days)", runs, || {
        store.daily_usage(account, month)
    });
    time("usage --all (30 days)", runs.min(20), || {
        store.daily_usage(None, month)
    });
    // The reads above run on the store's reader connection: a session's lookups on the main
    // one do not wait for them.
    let busy = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while busy.load(Ordering::Relaxed) {
                let _ = store.daily_usage(None, month);
            }
        });
        time("account usage beside usage --all", runs * 10, || {
            store.usage("account-7")
        });
        busy.store(false, Ordering::Relaxed);
    });
}
