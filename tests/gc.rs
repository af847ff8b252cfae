//! Storage over time, end to end with the real Nix 2.8 client through the relay: expired
//! uploads and outputs collected (rows and objects) and sent again by the client, the
//! collector running every second beside builds that use what it would take, and the record
//! and stored log of a failing build and of one that allocates 100 MiB.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;
mod lab;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{log_number as field, orphan_objects, Daemon};
use lab::{assert_built_once, builds_of, Lab};

/// Rows of `account` in the state directory's database.
fn rows(state: &Path, account: &str) -> i64 {
    db(state)
        .query_row(
            "SELECT count(*) FROM paths WHERE account = ?1",
            [account],
            |r| r.get(0),
        )
        .expect("count rows")
}

fn db(state: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        state.join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database read-only")
}

#[test]
fn expired_uploads_and_outputs_are_collected_and_sent_again() {
    let lab = Lab::new(
        r#"rec {
  first = mk "gc-first" "echo $SALT > $out" { SALT = salt; };
  second = mk "gc-second" "cat ${first} ${first} > $out" {};
}"#,
    );
    let d = Daemon::start_with_config("[store]\nretention = 1\ngc_interval = 3600\n", &[]);
    let state = d.state_dir();
    let drvs = lab.instantiate(&["first", "second"]);
    let first = lab.remote_build_ok(&d, "alice", &drvs[..1]);
    let held = rows(&state, "alice");
    assert!(held >= 2, "busybox and the output: {held}");
    std::thread::sleep(Duration::from_millis(2100));
    let line = d.collect();
    assert_eq!(field(&line, "grants"), held as u64, "{line}");
    assert!(field(&line, "bytes") > 0, "{line}");
    assert_eq!(rows(&state, "alice"), 0);
    let objects = std::fs::read_dir(state.join("objects"))
        .expect("objects/")
        .count();
    assert_eq!(objects, 0, "every object was alice's alone");
    // The client still holds first's output and sends it (and busybox) again for second.
    let second = lab.remote_build_ok(&d, "alice", &drvs[1..]);
    assert_built_once(&d, &drvs);
    assert_eq!(
        std::fs::read_to_string(&second[0]).expect("read"),
        format!("{0}\n{0}\n", lab.salt)
    );
    assert_eq!(
        lab.server_nar_hash(&d, "alice", &first[0]),
        lab.local_nar_hash(&first[0])
    );
    assert!(orphan_objects(&state).is_empty());
    d.stop();
}

#[test]
fn the_collector_never_takes_what_a_build_upload_or_download_uses() {
    // Retention 4 s, a collection every second, builds of 5 s: each build's inputs expire
    // while it runs, its outputs soon after.
    let rounds = 3;
    let mut body = String::from("{\n");
    for i in 0..rounds {
        body.push_str(&format!(
            "  r{i} = mk \"race-{i}\" \"sleep 5; cat ${{builtins.toFile \"in-{i}-${{salt}}\" \
             (salt + \"-{i}\")}} > $out\" {{}};\n"
        ));
    }
    body.push('}');
    let lab = Lab::with_conf(&body, "require-sigs = false\n");
    let d = Daemon::start_with_config("[store]\nretention = 4\ngc_interval = 1\n", &[]);
    for i in 0..rounds {
        let drvs = lab.instantiate(&[&format!("r{i}")]);
        let out = lab.remote_build_ok(&d, "alice", &drvs);
        assert_eq!(builds_of(&d.log(), &drvs[0]), 1);
        assert_eq!(
            std::fs::read_to_string(&out[0]).expect("read"),
            format!("{}-{i}", lab.salt)
        );
        // Downloaded again at once: the session holds what it was told is valid.
        common::run_ok(lab.nix.command("nix-store").args(["--delete", &out[0]]));
        let mut copy = d.point(lab.nix.command("nix"), "alice");
        copy.args(["copy", "--from", &harness::store_uri(), &out[0]]);
        common::run_ok(&mut copy);
        assert_eq!(
            std::fs::read_to_string(&out[0]).expect("read"),
            format!("{}-{i}", lab.salt)
        );
    }
    // The collector was at work all along: once nothing is in use, everything goes.
    let until = Instant::now() + Duration::from_secs(30);
    while rows(&d.state_dir(), "alice") > 0 {
        assert!(Instant::now() < until, "not collected:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let collected: u64 = d
        .log()
        .lines()
        .filter(|l| l.contains("collection done"))
        .map(|l| field(l, "grants"))
        .sum();
    // Each round's input and output, and busybox at least once.
    assert!(collected > 2 * rounds, "{collected}");
    assert!(!d.log().contains("collection failed"));
    let stopped = d.stop();
    assert!(stopped.store.verify().expect("verify").is_empty());
}

/// The stored log of record `name`, decompressed.
fn stored_log(state: &Path, name: &str) -> String {
    let compressed = std::fs::read(state.join("logs").join(name)).expect("read a stored log");
    String::from_utf8(zstd::decode_all(&compressed[..]).expect("zstd")).expect("utf-8")
}

/// One build's record: status, error, cores, CPU µs, peak memory, log name.
type Record = (
    String,
    String,
    u32,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

fn record(state: &Path, account: &str, drv: &str) -> Record {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let found = db(state)
            .query_row(
                "SELECT status, error, cores, cpu_us, peak_memory, log FROM builds
                 WHERE account = ?1 AND drv = ?2",
                [account, drv],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .ok();
        if let Some(record) = found {
            return record;
        }
        assert!(Instant::now() < until, "no record of {drv}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that the lines of `log` appear in `printed` in the same order.
fn assert_printed(log: &str, printed: &str) {
    let mut rest = printed.lines();
    for line in log.lines() {
        assert!(
            rest.any(|p| p.ends_with(line)),
            "{line:?} of the stored log is not in what the client printed:\n{printed}"
        );
    }
}

#[test]
fn failing_and_memory_hungry_builds_leave_records_and_logs() {
    let lab = Lab::new(
        r#"{
  fail = mk "rec-fail" "echo about to fail $SALT; echo on stderr >&2; exit 3" { SALT = salt; };
  big = mk "rec-big" "echo cores=$NIX_BUILD_CORES; x=$(head -c 110000000 /dev/zero | tr '\\0' a); echo held \${#x} bytes; echo $SALT > $out" { SALT = salt; };
}"#,
    );
    let d = Daemon::start_with_config("[scheduler]\ndefault_memory = \"1G\"\n", &[]);
    let state = d.state_dir();
    let drvs = lab.instantiate(&["fail", "big"]);
    let failed = lab.remote_build(&d, "alice", &drvs[..1], &[]);
    assert!(!failed.status.success());
    let printed = String::from_utf8_lossy(&failed.stderr).into_owned();
    let (status, error, cores, _, _, log) = record(&state, "alice", &drvs[0]);
    assert_eq!(status, "PermanentFailure");
    assert!(
        error.contains("exit code 3") || error.contains("status 3"),
        "{error}"
    );
    assert!(cores >= 1);
    let log = stored_log(&state, &log.expect("a stored log"));
    assert!(
        log.contains(&format!("about to fail {}", lab.salt)),
        "{log}"
    );
    assert!(log.contains("on stderr"), "{log}");
    assert_printed(&log, &printed);

    let big = lab.remote_build(&d, "alice", &drvs[1..], &[]);
    let printed = String::from_utf8_lossy(&big.stderr).into_owned();
    assert!(big.status.success(), "{printed}\n{}", d.log());
    let (status, error, cores, cpu_us, peak, log) = record(&state, "alice", &drvs[1]);
    assert_eq!((status.as_str(), error.as_str()), ("Built", ""));
    let log = stored_log(&state, &log.expect("a stored log"));
    assert!(log.contains(&format!("cores={cores}\n")), "{cores}: {log}");
    assert!(log.contains("held 110000000 bytes"), "{log}");
    assert_printed(&log, &printed);
    let peak = peak.expect("peak memory");
    assert!(peak >= 100 << 20, "peak {peak}");
    let cpu_us = cpu_us.expect("CPU time");
    assert!(cpu_us > 10_000, "cpu {cpu_us} µs");
    // Another account has no record of alice's builds.
    let theirs: i64 = db(&state)
        .query_row(
            "SELECT count(*) FROM builds WHERE account = 'bob'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(theirs, 0);
    d.stop();
}

#[test]
fn an_account_over_its_quota_is_refused_and_others_are_not() {
    let lab = Lab::new("{}");
    let add = |name: &str| {
        let file = lab.nix.scratch().join(name);
        let line = format!("{}-{name}\n", lab.salt);
        std::fs::write(&file, line.repeat((1 << 20) / line.len())).expect("write");
        lab.nix.run_line(
            "nix-store",
            [std::ffi::OsStr::new("--add"), file.as_os_str()],
        )
    };
    let (one, two) = (add("one"), add("two"));
    let d = Daemon::start_with_config(
        "[store]\nquota = \"1500K\"\n[accounts.alice]\nretention = 2\n",
        &[],
    );
    let copy = |account: &str, path: &str| {
        let mut cmd = d.point(lab.nix.command("nix"), account);
        cmd.args(["copy", "--to", &harness::store_uri(), path]);
        cmd.output().expect("run nix copy")
    };
    let first = copy("alice", &one);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let refused = copy("alice", &two);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    for part in [
        "quota of 1536000 bytes",
        "quota in [store]",
        "more would pass",
    ] {
        assert!(stderr.contains(part), "{part:?} not in: {stderr}");
    }
    assert_eq!(rows(&d.state_dir(), "alice"), 1);
    // Another account is held to its own usage only.
    let bob = copy("bob", &two);
    assert!(
        bob.status.success(),
        "{}",
        String::from_utf8_lossy(&bob.stderr)
    );
    // Once alice's first path has expired, the upload collects it and goes through.
    std::thread::sleep(Duration::from_millis(3100));
    let again = copy("alice", &two);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(rows(&d.state_dir(), "alice"), 1);
    assert_eq!(
        lab.server_nar_hash(&d, "alice", &two),
        lab.local_nar_hash(&two)
    );
    assert_eq!(
        lab.server_nar_hash(&d, "bob", &two),
        lab.local_nar_hash(&two)
    );
    d.stop();
}

#[test]
fn free_space_falling_toward_the_reserve_starts_a_collection() {
    let lab = Lab::new("{}");
    let file = lab.nix.scratch().join("big");
    let line = format!("{}-big\n", lab.salt);
    std::fs::write(&file, line.repeat((24 << 20) / line.len())).expect("write");
    let big = lab.nix.run_line(
        "nix-store",
        [std::ffi::OsStr::new("--add"), file.as_os_str()],
    );
    // 64 MiB in all; uploads are refused below 8 MiB free, collections start below 48 MiB.
    let d = Daemon::start_on_tmpfs(
        "size=64m",
        "[store]\ndisk_reserve = 8388608\ngc_free_space = \"48M\"\nretention = 1\n\
         gc_interval = 3600\n",
        &[],
    );
    let mut copy = d.point(lab.nix.command("nix"), "alice");
    copy.args(["copy", "--to", &harness::store_uri(), &big]);
    common::run_ok(&mut copy);
    assert!(d.tmpfs().free() < 48 << 20);
    // Free space is checked every 10 s; a check in the second after the upload finds
    // nothing expired yet, the next one collects the path.
    let until = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let log = d.log();
        let collected = log
            .lines()
            .filter(|l| l.contains("collection done"))
            .find(|l| l.contains("free space below store.gc_free_space") && field(l, "grants") > 0);
        if let Some(line) = collected {
            break line.to_owned();
        }
        assert!(Instant::now() < until, "nothing collected:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(field(&line, "bytes") >= 24 << 20, "{line}");
    assert!(d.tmpfs().free() > 48 << 20);
    assert_eq!(rows(&d.state_dir(), "alice"), 0);
    d.stop();
}
