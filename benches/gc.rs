//! The collector on a large store: `--expired` paths of one account (in reference chains of
//! ten, each path its own object) expire in a store of `--rows` rows in all (the rest are
//! 1,000 shared paths granted to many accounts, kept). While `Store::collect` runs, one thread
//! asks QueryValidPaths of one path and another uploads small paths, back to back; the
//! longest and 99th-percentile time each request took is what a client waited on the
//! collector. Also the disk space returned: the objects' NAR bytes, their files' apparent
//! sizes, and the change in the file system's free space.
//!
//! `cargo bench --bench gc -- [--rows N] [--expired N] [--dir DIR]` (defaults 1,000,000,
//! 100,000, a temporary directory under /var/tmp).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::arg;
use nixbuild::store::{AccountPolicy, PathClaim, Store, StoreLimits, StorePolicy};
use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::nar::NarNode;
use nixbuild_core::store_path::{make_fixed_output_path, StorePath};

const LIMITS: StoreLimits = StoreLimits {
    max_nar_size: 1 << 30,
    disk_reserve: 0,
};

/// Kept paths shared by every kept account.
const SHARED: usize = 1000;

/// Uploads a source path `name` holding `contents`, referencing `refs`, for `account`.
fn add(store: &Store, account: &str, name: &str, contents: &[u8], refs: &[StorePath]) -> StorePath {
    let nar = NarNode::File {
        executable: false,
        contents: contents.to_vec(),
    }
    .to_nar()
    .expect("a NAR");
    let nar_hash = Hash::compute(HashAlgo::Sha256, &nar);
    let ca = ContentAddress {
        method: ContentAddressMethod::Recursive,
        hash: nar_hash,
    };
    let references: BTreeSet<StorePath> = refs.iter().cloned().collect();
    let path = make_fixed_output_path(name, &ca, &references, false).expect("a path");
    let mut import = store.begin_import(account).expect("begin an import");
    import.write(&nar).expect("write");
    import
        .commit(PathClaim {
            path: path.clone(),
            deriver: None,
            nar_hash: Some(nar_hash),
            nar_size: Some(nar.len() as u64),
            references,
            registration_time: 0,
            ca: Some(ca),
            sigs: BTreeSet::new(),
        })
        .expect("commit");
    path
}

/// Apparent bytes of the files under `dir`.
fn apparent_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("read a directory") {
        let entry = entry.expect("an entry");
        let meta = entry.metadata().expect("stat");
        total += if meta.is_dir() {
            apparent_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn free_bytes(dir: &Path) -> u64 {
    let st = rustix::fs::statvfs(dir).expect("statvfs");
    st.f_bavail * st.f_frsize
}

/// Waits (longest, 99th percentile, count) of a thread repeating `op` until `stop`.
fn waits(mut samples: Vec<Duration>) -> (Duration, Duration, usize) {
    samples.sort_unstable();
    let n = samples.len();
    let p99 = samples.get(n * 99 / 100).copied().unwrap_or_default();
    (samples.last().copied().unwrap_or_default(), p99, n)
}

fn main() {
    let rows = arg("--rows", 1_000_000) as usize;
    let expired = arg("--expired", 100_000) as usize;
    let base = std::env::args()
        .position(|a| a == "--dir")
        .and_then(|i| std::env::args().nth(i + 1))
        .unwrap_or_else(|| "/var/tmp".to_owned());
    let dir = tempfile::tempdir_in(base).expect("a temporary directory");
    let state = dir.path().join("state");
    let store = Store::open(&state, LIMITS).expect("open the store");

    let started = Instant::now();
    let mut previous = Vec::new();
    // The bytes of the expiring objects' files (each a single regular file).
    let mut expiring_bytes = 0;
    for i in 0..expired {
        let refs = if i % 10 == 0 { Vec::new() } else { previous };
        let contents = format!("old {i}");
        expiring_bytes += contents.len() as u64;
        let path = add(
            &store,
            "old",
            &format!("old-{i}"),
            contents.as_bytes(),
            &refs,
        );
        previous = vec![path];
    }
    let shared: BTreeSet<StorePath> = (0..SHARED)
        .map(|i| {
            add(
                &store,
                "base",
                &format!("shared-{i}"),
                format!("shared {i}").as_bytes(),
                &[],
            )
        })
        .collect();
    let kept_accounts = (rows.saturating_sub(expired + SHARED)).div_ceil(SHARED);
    for a in 0..kept_accounts {
        store
            .grant_closure("base", &format!("k{a}"), &shared)
            .expect("grant");
    }
    let filled = started.elapsed();
    let total_rows = expired + SHARED * (kept_accounts + 1);
    println!(
        "store filled in {:.1} s: {total_rows} rows ({expired} expiring for account old, {} kept \
         by {} accounts)",
        filled.as_secs_f64(),
        SHARED * (kept_accounts + 1),
        kept_accounts + 1
    );

    let mut policy = StorePolicy::default();
    policy.accounts.insert(
        "old".into(),
        AccountPolicy {
            retention: Some(0),
            quota: None,
        },
    );
    store.set_policy(policy);
    std::thread::sleep(Duration::from_millis(1100));
    let objects = state.join("objects");
    let (apparent_before, free_before) = (apparent_size(&objects), free_bytes(&state));

    let stop = Arc::new(AtomicBool::new(false));
    let probe = shared.iter().next().cloned().expect("a shared path");
    let query = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let one = BTreeSet::from([probe]);
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let valid = store.query_valid_paths("k0", &one).expect("query");
                samples.push(t.elapsed());
                assert_eq!(valid.len(), 1);
            }
            samples
        })
    };
    let upload = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut samples, mut bytes) = (Vec::new(), 0);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let contents = format!("new {i}");
                add(&store, "new", &format!("new-{i}"), contents.as_bytes(), &[]);
                samples.push(t.elapsed());
                bytes += contents.len() as u64;
                i += 1;
            }
            (samples, bytes)
        })
    };
    let t = Instant::now();
    let stats = store.collect().expect("collect");
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (q_max, q_p99, q_n) = waits(query.join().expect("the query thread"));
    let (upload_samples, uploaded_bytes) = upload.join().expect("the upload thread");
    let (u_max, u_p99, u_n) = waits(upload_samples);
    let (apparent_after, free_after) = (apparent_size(&objects), free_bytes(&state));
    assert_eq!(stats.grants, expired as u64, "{stats:?}");
    println!(
        "collected {} grants, {} objects, {} NAR bytes in {:.2} s ({} steps, {:.0} grants/s)",
        stats.grants,
        stats.objects,
        stats.bytes,
        took.as_secs_f64(),
        stats.steps,
        stats.grants as f64 / took.as_secs_f64()
    );
    println!(
        "QueryValidPaths of 1 path during it: {q_n} requests, longest {:.1} ms, p99 {:.2} ms",
        q_max.as_secs_f64() * 1e3,
        q_p99.as_secs_f64() * 1e3
    );
    println!(
        "uploads of 1 small path during it: {u_n} requests, longest {:.1} ms, p99 {:.2} ms",
        u_max.as_secs_f64() * 1e3,
        u_p99.as_secs_f64() * 1e3
    );
    let returned = (apparent_before + uploaded_bytes).saturating_sub(apparent_after);
    println!(
        "disk returned: {returned} bytes of files (the expiring objects' files hold \
         {expiring_bytes}: {}); their NAR bytes {}; the file system's free space {:+} bytes \
         (beside {u_n} uploads and the database's growth)",
        if returned == expiring_bytes {
            "equal"
        } else {
            "DIFFERENT"
        },
        stats.bytes,
        free_after as i64 - free_before as i64,
    );
}
