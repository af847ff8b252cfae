//! Faults: the daemon killed with `kill -9` at every named failpoint (`nixbuild::failpoint`),
//! clients that disappear mid-upload and mid-download, and SIGTERM while uploads and builds
//! are in flight. After each, the state directory must be consistent ([`assert_consistent`])
//! and everything acknowledged to a client must still be there with its hash.
//!
//! Needs the daemon built with the `failpoints` feature (`cargo build --examples --features
//! failpoints`; scripts/test does). The clients are the real Nix 2.8 (`nix copy`,
//! `nix-build` through the relay), except where the test must control exactly how far a
//! client gets (scripted uploads and downloads from the harness).

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;
mod lab;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::run_ok;
use harness::{store_uri, Daemon, Reply, Script};
use lab::Lab;
use nixbuild::failpoint::{ALL, ENV};
use nixbuild_core::hash::{Hash, HashAlgo, Hasher};
use nixbuild_core::serve::{Opcode, Request, Response};
use nixbuild_core::store_path::StorePath;

/// The account every client here uses.
const ACCOUNT: &str = "a";

/// The protocol a case's client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `ssh://` (the serve protocol).
    Serve,
    /// `ssh-ng://` (the worker protocol).
    Ng,
}

impl Via {
    fn store_uri(self) -> String {
        match self {
            Via::Serve => store_uri(),
            Via::Ng => store_uri().replacen("ssh://", "ssh-ng://", 1),
        }
    }

    fn builders(self) -> String {
        lab::builders().replacen(&store_uri(), &self.store_uri(), 1)
    }
}

/// The operation that reaches a failpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `nix copy --to` (AddToStoreNar).
    Upload,
    /// `nix-build` with the daemon as its only builder (BuildDerivation).
    Build,
    /// `nix copy --from` (DumpStorePath).
    Download,
    /// A collection of expired paths (SIGUSR1).
    Collect,
}

/// The operations that reach `point`. Every point of `ALL` must have one: a new point
/// without a scenario fails here.
fn ops_for(point: &str) -> &'static [Op] {
    match point.split('-').next() {
        Some("import") => &[Op::Upload],
        Some("publish") => &[Op::Upload, Op::Build],
        Some("build") => &[Op::Build],
        Some("export") => &[Op::Download],
        Some("gc") => &[Op::Collect],
        _ => panic!("failpoint {point} has no scenario in tests/faults.rs"),
    }
}

/// Whether the path whose operation stopped at `point` is registered once the daemon is
/// back: only when the kill came after the SQLite commit.
fn registered_after_kill(point: &str, op: Op) -> bool {
    match op {
        // The path was already there before the download.
        Op::Download => true,
        Op::Collect => false,
        Op::Upload | Op::Build => matches!(
            point,
            "publish-after-commit"
                | "import-before-ack"
                | "build-after-register"
                | "build-before-result"
        ),
    }
}

/// A Nix client with salted derivations, and the state directory of a stopped daemon on
/// which it has already built one (so its busybox is uploaded): each case starts a daemon
/// on a copy of it.
struct Fixture {
    lab: Lab,
    seed: harness::Stopped,
    /// `.drv` paths by attribute name.
    drvs: BTreeMap<String, String>,
}

impl Fixture {
    /// A pair of derivations per entry of `pauses`: `ok-<i>` (quick) and `hang-<i>` (the
    /// one a failpoint stops), which sleeps `pauses[i]` seconds after its first line.
    fn new(pauses: &[u32]) -> Fixture {
        let mut body = String::from("{\n  seed = mk \"seed\" \"echo seed > $out\" {};\n");
        for (i, pause) in pauses.iter().enumerate() {
            let pause = format!("sleep {pause}; ");
            body.push_str(&format!(
                "  ok-{i} = mk \"ok-{i}\" \"echo started; echo ok > $out\" {{}};\n  \
                 hang-{i} = mk \"hang-{i}\" \"echo started; {pause}echo hang > $out\" {{}};\n"
            ));
        }
        body.push_str("  endless = mk \"endless\" \"echo started; sleep 600\" {};\n}");
        let lab = Lab::with_conf(&body, "require-sigs = false\n");
        let mut attrs = vec!["seed".to_owned(), "endless".to_owned()];
        for i in 0..pauses.len() {
            attrs.push(format!("ok-{i}"));
            attrs.push(format!("hang-{i}"));
        }
        let refs: Vec<&str> = attrs.iter().map(String::as_str).collect();
        let drvs: BTreeMap<String, String> =
            attrs.iter().cloned().zip(lab.instantiate(&refs)).collect();
        let d = Daemon::start(&[]);
        lab.remote_build_ok(&d, ACCOUNT, &[drvs["seed"].clone()]);
        let seed = d.stop();
        Fixture { lab, seed, drvs }
    }

    /// A daemon on a copy of the seed, with `env`.
    fn daemon(&self, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_seeded("", &self.seed.state_dir(), args, env)
    }

    /// A new local path of `size` bytes of salted contents (`nix-store --add`).
    fn local_path(&self, name: &str, size: usize) -> String {
        let line = format!("{}-{name}\n", self.lab.salt);
        let mut contents = line.repeat(size / line.len() + 1).into_bytes();
        contents.truncate(size);
        let file = self.lab.nix.scratch().join(name);
        std::fs::write(&file, contents).expect("write a file to add");
        self.lab.nix.run_line(
            "nix-store",
            [std::ffi::OsStr::new("--add"), file.as_os_str()],
        )
    }

    /// `nix copy` to (`"--to"`) or from (`"--from"`) the daemon, `via` a protocol.
    fn copy(&self, d: &Daemon, via: Via, direction: &str, path: &str) -> Command {
        let mut cmd = d.point(self.lab.nix.command("nix"), ACCOUNT);
        cmd.args(["copy", direction, &via.store_uri(), path]);
        cmd
    }

    /// The output path of the derivation `attr`.
    fn output(&self, attr: &str) -> String {
        self.lab.nix.run_line(
            "nix-store",
            ["--query", "--outputs", self.drvs[attr].as_str()],
        )
    }

    /// The NAR hash the client has for `path`.
    fn local_hash(&self, path: &str) -> Hash {
        parse_hash(&self.lab.local_nar_hash(path))
    }
}

fn parse_hash(s: &str) -> Hash {
    Hash::parse_any(s, None).unwrap_or_else(|e| panic!("hash {s:?}: {e}"))
}

/// Runs `cmd` in the background, its output kept for the message of a failure.
fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a client")
}

/// Waits for a background client and returns whether it succeeded, and its stderr.
fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("wait for a client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a case prepares: the path acknowledged to a client, the path of the operation that
/// will stop, its hash on the client (when it has it), and the command of that operation.
type Case<'a> = (
    String,
    String,
    Option<Hash>,
    Box<dyn Fn(&Daemon) -> Command + 'a>,
);

/// One case: the daemon on a seed copy with `point` armed for its second hit; the first
/// operation completes (acknowledged to the client), the second stops at the point; `kill
/// -9`; restart without the point; the checks; the stopped operation again.
fn kill_at(f: &Fixture, point: &str, op: Op, via: Via, case: usize) {
    let armed = format!("{point}:2");
    let mut d = f.daemon(&[], &[(ENV, &armed)]);
    assert!(
        d.log()
            .contains(&format!("failpoint {point} armed for hit 2")),
        "the daemon does not arm failpoints: build the examples with `--features failpoints`\n{}",
        d.log()
    );
    let (acked, stopped, stopped_hash, again): Case = match op {
        Op::Upload => {
            let first = f.local_path(&format!("up-{case}-a"), 1 << 20);
            let second = f.local_path(&format!("up-{case}-b"), 1 << 20);
            run_ok(&mut f.copy(&d, via, "--to", &first));
            let hash = f.local_hash(&second);
            let path = second.clone();
            (
                first,
                second,
                Some(hash),
                Box::new(move |d| f.copy(d, via, "--to", &path)),
            )
        }
        Op::Build => {
            let (ok, hang) = (format!("ok-{case}"), format!("hang-{case}"));
            let out = f.lab.remote_build_ok(&d, ACCOUNT, &[f.drvs[&ok].clone()]);
            let drv = f.drvs[&hang].clone();
            let again = move |d: &Daemon| {
                f.lab
                    .remote_command(d, ACCOUNT, &via.builders(), std::slice::from_ref(&drv))
            };
            (out[0].clone(), f.output(&hang), None, Box::new(again))
        }
        Op::Download => {
            let first = f.local_path(&format!("down-{case}-a"), 1 << 20);
            let second = f.local_path(&format!("down-{case}-b"), 1 << 20);
            let hash = f.local_hash(&second);
            let mut copy = f.copy(&d, via, "--to", &first);
            run_ok(copy.arg(&second));
            run_ok(
                f.lab
                    .nix
                    .command("nix-store")
                    .args(["--delete", &first, &second]),
            );
            run_ok(&mut f.copy(&d, via, "--from", &first));
            let path = second.clone();
            (
                first,
                second,
                Some(hash),
                Box::new(move |d| f.copy(d, via, "--from", &path)),
            )
        }
        Op::Collect => panic!("collection points have their own test"),
    };
    let acked_hash = f.local_hash(&acked);
    // The command that will succeed after the restart; now it stops at the point.
    let client = spawn(again(&d));
    d.wait_for_log(&[&format!("failpoint {point} reached")]);
    assert_in_progress(&d, point, op);
    d.kill();
    let (ok, stderr) = finish(client);
    assert!(
        !ok,
        "{op:?} at {point}: the client succeeded without an answer"
    );
    assert!(!stderr.is_empty());

    d.start_again(&[]);
    let rows = assert_consistent(&d);
    let hash_of = |path: &str| rows.get(&(ACCOUNT.to_owned(), base_name(path)));
    assert_eq!(
        hash_of(&acked),
        Some(&acked_hash),
        "{op:?} at {point}: {acked}, acknowledged before the kill, is gone or changed"
    );
    let registered = hash_of(&stopped);
    assert_eq!(
        registered.is_some(),
        registered_after_kill(point, op),
        "{op:?} at {point}: {stopped} registered: {registered:?}"
    );
    if let (Some(registered), Some(local)) = (registered, stopped_hash) {
        assert_eq!(
            *registered, local,
            "{op:?} at {point}: {stopped} has another hash"
        );
    }

    // The daemon serves again: the stopped operation succeeds.
    let out = again(&d).output().expect("run the client again");
    assert!(
        out.status.success(),
        "{op:?} at {point}, after the restart: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let rows = assert_consistent(&d);
    assert!(rows.contains_key(&(ACCOUNT.to_owned(), base_name(&stopped))));
    if let Some(hash) = stopped_hash {
        assert_eq!(
            rows.get(&(ACCOUNT.to_owned(), base_name(&stopped))),
            Some(&hash)
        );
        // Uploaded, or downloaded again: the client has it with the same hash.
        assert_eq!(f.local_hash(&stopped), hash);
    }
    drop(again);
    d.stop();
}

/// Checks that what the operation stopped at `point` has made is there at the kill, so that
/// the checks after the restart find its cleanup: an import's files in `tmp/` until they
/// are renamed, a build's scratch directory until its outputs are registered, the builder's
/// processes while it runs.
fn assert_in_progress(d: &Daemon, point: &str, op: Op) {
    let entries = |dir: &str| {
        std::fs::read_dir(d.state_dir().join(dir))
            .expect("read a state subdirectory")
            .count()
    };
    let before_rename = matches!(
        point,
        "import-stream-started"
            | "import-nar-written"
            | "import-hash-verified"
            | "publish-before-rename"
    );
    if op == Op::Upload && before_rename {
        assert_ne!(entries("tmp"), 0, "{point}: no import in tmp/");
    }
    let scratch = point.starts_with("publish-")
        || matches!(
            point,
            "build-scratch-created"
                | "build-builder-running"
                | "build-outputs-canonicalised"
                | "build-before-register"
                | "build-after-register"
        );
    if op == Op::Build && scratch {
        assert_ne!(entries("builds"), 0, "{point}: no scratch directory");
    }
    if point == "build-builder-running" {
        assert!(
            !harness::build_processes().is_empty(),
            "{point}: the builder is not running"
        );
    }
}

fn base_name(path: &str) -> String {
    path.strip_prefix("/nix/store/").unwrap_or(path).to_owned()
}

/// Runs [`kill_at`] for every failpoint reached by `op` `via` a protocol.
fn kill_at_every_point(op: Op, via: Via) {
    let points: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|p| ops_for(p).contains(&op))
        .collect();
    assert!(!points.is_empty());
    // The builder stopped while it runs must still run when the test looks at it.
    let pauses: Vec<u32> = points
        .iter()
        .map(|p| if *p == "build-builder-running" { 3 } else { 0 })
        .collect();
    let f = Fixture::new(if op == Op::Build { &pauses } else { &[] });
    for (case, point) in points.iter().enumerate() {
        kill_at(&f, point, op, via, case);
    }
}

/// The collector killed at each of its points, mid-collection of two uploaded paths that
/// expire after a second: after the restart the store is consistent, a collection completes
/// and takes what was left, and the client uploads the paths again.
#[test]
fn killed_at_every_collection_point() {
    let f = Fixture::new(&[]);
    let config = "[store]\nretention = 1\ngc_interval = 3600\n";
    let points: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|p| p.starts_with("gc-"))
        .collect();
    assert_eq!(points.len(), 3);
    for (case, point) in points.iter().enumerate() {
        let armed = format!("{point}:1");
        let mut d = Daemon::start_seeded(config, &f.seed.state_dir(), &[], &[(ENV, &armed)]);
        let paths: Vec<String> = ["a", "b"]
            .iter()
            .map(|n| f.local_path(&format!("gc-{case}-{n}"), 1 << 20))
            .collect();
        let mut copy = f.copy(&d, Via::Serve, "--to", &paths[0]);
        run_ok(copy.arg(&paths[1]));
        std::thread::sleep(Duration::from_millis(2100));
        d.request_collection();
        d.wait_for_log(&[&format!("failpoint {point} reached")]);
        d.kill();
        d.start_again(&[]);
        assert_consistent(&d);
        let line = d.collect();
        let rows = assert_consistent(&d);
        for path in &paths {
            assert!(
                !rows.contains_key(&(ACCOUNT.to_owned(), base_name(path))),
                "{point}: {path} not collected ({line})"
            );
        }
        assert!(
            harness::orphan_objects(&d.state_dir()).is_empty(),
            "{point}: objects left"
        );
        let mut copy = f.copy(&d, Via::Serve, "--to", &paths[0]);
        run_ok(copy.arg(&paths[1]));
        let rows = assert_consistent(&d);
        for path in &paths {
            assert_eq!(
                rows.get(&(ACCOUNT.to_owned(), base_name(path))),
                Some(&f.local_hash(path)),
                "{point}: {path} uploaded again"
            );
        }
        d.stop();
    }
}

#[test]
fn every_failpoint_has_a_scenario() {
    for point in ALL {
        assert!(!ops_for(point).is_empty(), "{point}");
    }
}

#[test]
fn killed_at_every_upload_point() {
    kill_at_every_point(Op::Upload, Via::Serve);
}

#[test]
fn killed_at_every_build_point() {
    kill_at_every_point(Op::Build, Via::Serve);
}

#[test]
fn killed_at_every_download_point() {
    kill_at_every_point(Op::Download, Via::Serve);
}

#[test]
fn killed_at_every_upload_point_over_ssh_ng() {
    kill_at_every_point(Op::Upload, Via::Ng);
}

#[test]
fn killed_at_every_build_point_over_ssh_ng() {
    kill_at_every_point(Op::Build, Via::Ng);
}

#[test]
fn killed_at_every_download_point_over_ssh_ng() {
    kill_at_every_point(Op::Download, Via::Ng);
}

/// A writer that only hashes.
struct HashWriter(Hasher, u64);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks the state directory of a running daemon (after its start-up cleanup, with no
/// operation in progress) and returns the NAR hash of every registered path by (account,
/// base name):
/// - no temporary import in `tmp/`, no mount referring to the state directory, nothing
///   left of builds (processes, directories, cgroups);
/// - every row points at an object row and every object row at files in `objects/`, which
///   re-hash to its NAR hash and size; every `objects/` entry has a row; every reference
///   and signature points at a row.
fn assert_consistent(d: &Daemon) -> BTreeMap<(String, String), Hash> {
    let state = d.state_dir();
    let tmp: Vec<_> = std::fs::read_dir(state.join("tmp"))
        .expect("read tmp/")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(
        tmp.is_empty(),
        "temporary imports left: {tmp:?}\n{}",
        d.log()
    );
    let state_text = state.display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(&state_text))
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    harness::assert_no_build_left(d);

    let db = rusqlite::Connection::open_with_flags(
        state.join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database");
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).expect(sql) };
    assert_eq!(
        count("SELECT count(*) FROM paths WHERE object NOT IN (SELECT key FROM objects)"),
        0,
        "rows without an object"
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM refs WHERE referrer NOT IN (SELECT id FROM paths) \
             OR reference NOT IN (SELECT id FROM paths)"
        ),
        0,
        "references to no row"
    );
    assert_eq!(
        count("SELECT count(*) FROM sigs WHERE path NOT IN (SELECT id FROM paths)"),
        0,
        "signatures of no row"
    );
    let orphans = harness::orphan_objects(&state);
    assert!(orphans.is_empty(), "objects without a row: {orphans:?}");
    let objects: Vec<(String, String, i64)> = db
        .prepare("SELECT key, nar_hash, nar_size FROM objects")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .expect("list objects");
    for (key, hash, size) in &objects {
        let mut w = HashWriter(Hasher::new(HashAlgo::Sha256), 0);
        nixbuild::nar_fs::dump_path(&state.join("objects").join(key), &mut w)
            .unwrap_or_else(|e| panic!("object {key} unreadable: {e}"));
        assert_eq!(
            (w.0.finish(), w.1 as i64),
            (parse_hash(hash), *size),
            "object {key} does not match its record"
        );
    }
    let rows: Vec<(String, String, String)> = db
        .prepare("SELECT account, path, nar_hash FROM paths JOIN objects ON object = key")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .expect("list paths");
    rows.into_iter()
        .map(|(account, path, hash)| ((account, path), parse_hash(&hash)))
        .collect()
}

/// The size of the largest file under `dir` (the import in progress in `tmp/`).
fn largest_file(dir: &Path) -> u64 {
    let mut largest = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => largest = largest.max(m.len()),
                Err(_) => {}
            }
        }
    }
    largest
}

/// Sends `sig` to `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// Waits (at most 30 s) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_client_killed_mid_upload_leaves_nothing() {
    let f = Fixture::new(&[]);
    let d = f.daemon(&[], &[]);
    let size = 128 << 20;
    let big = f.local_path("big-upload", size);
    let mut client = spawn(f.copy(&d, Via::Serve, "--to", &big));
    let tmp = d.state_dir().join("tmp");
    // Stopped as soon as part of the file is on the server's disk, then killed.
    wait_until("the upload is under way", || largest_file(&tmp) > 0);
    signal(client.id(), "-STOP");
    let partial = largest_file(&tmp);
    assert!(
        partial > 0 && partial < size as u64,
        "the upload ended before the client stopped ({partial} bytes in tmp/)"
    );
    client.kill().expect("kill the client");
    assert!(!finish(client).0);
    wait_until("the session ended", || d.log().contains("status=1"));
    let rows = assert_consistent(&d);
    assert!(!rows.contains_key(&(ACCOUNT.to_owned(), base_name(&big))));
    // Others are served: a small upload goes through.
    let small = f.local_path("small-upload", 1000);
    run_ok(&mut f.copy(&d, Via::Serve, "--to", &small));
    let stopped = d.stop();
    // The big file goes from the client's store again (the store is the machine's).
    run_ok(f.lab.nix.command("nix-store").args(["--delete", &big]));
    let big = StorePath::from_absolute_path(big.as_bytes()).expect("store path");
    assert!(!stopped.valid(ACCOUNT, &big));
    assert!(!stopped.registered(ACCOUNT, &big));
}

/// How many descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the daemon's descriptors")
        .count()
}

#[test]
fn a_client_killed_mid_download_ends_its_session() {
    let f = Fixture::new(&[]);
    let d = f.daemon(&[], &[]);
    let nar = nixbuild_core::nar::NarNode::File {
        executable: false,
        contents: vec![b'x'; 64 << 20],
    }
    .to_nar()
    .expect("nar");
    let path = harness::test_path(&format!("{}-big", f.lab.salt), "big-download");
    let upload = d.relay(ACCOUNT, true, &Script::new().add_honest(&path, &nar).bytes);
    assert_eq!(upload.status, 0, "{}", upload.stderr);
    let dump = Script::new().request(&Request::DumpStorePath { path: path.clone() });
    // One complete download first, so that the session machinery has warmed up.
    let whole = d.relay(ACCOUNT, false, &dump.bytes);
    assert_eq!(whole.status, 0, "{}", whole.stderr);
    let fds = open_fds(d.pid());
    let ended = d.log().matches("session end").count();

    let mut relay = d.spawn_relay(ACCOUNT, false);
    relay
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(&dump.bytes)
        .expect("send the request");
    let mut stdout = relay.stdout.take().expect("stdout");
    let mut got = vec![0u8; 1 << 20];
    stdout
        .read_exact(&mut got)
        .expect("the first MiB of the NAR");
    relay.kill().expect("kill the client");
    drop(stdout);
    let _ = relay.wait();
    wait_until("the session ended", || {
        d.log().matches("session end").count() > ended
    });
    let log = d.log();
    let last = log.lines().rev().find(|l| l.contains("session end"));
    assert!(
        last.is_some_and(|l| l.contains("status=1")),
        "the cut-off download's session: {last:?}"
    );
    // Nothing of it stays: the daemon's descriptors are back to their count.
    wait_until("the daemon's descriptors are back to their count", || {
        open_fds(d.pid()) <= fds
    });
    let again = d.relay(ACCOUNT, false, &dump.bytes);
    assert_eq!(again.status, 0, "{}", again.stderr);
    assert_eq!(again.stdout.len(), whole.stdout.len());
    assert_consistent(&d);
    d.stop();
}

#[test]
fn builds_die_with_a_killed_daemon() {
    let f = Fixture::new(&[]);
    let mut d = f.daemon(&[], &[]);
    let endless = f.drvs["endless"].clone();
    let client = spawn(f.lab.remote_command(
        &d,
        ACCOUNT,
        &lab::builders(),
        std::slice::from_ref(&endless),
    ));
    d.wait_for_log(&["nixbuild::build: building ", &format!("drv={endless} ")]);
    wait_until("the builder runs", || {
        !harness::build_processes().is_empty()
    });
    d.kill();
    assert!(!finish(client).0);
    // Before any restart: the sandbox helper finds the log's reader gone and kills the build,
    // silent as it is.
    wait_until("the build died with the daemon", || {
        harness::build_processes().is_empty()
    });
    d.start_again(&[]);
    assert_consistent(&d);
    d.stop();
}

/// An AddToStoreNar through a relay that has sent only the first half of its NAR: the rest
/// is sent by [`finish_upload`], or never.
struct HalfUpload {
    relay: Child,
    rest: Vec<u8>,
    ops: Vec<Opcode>,
}

fn start_half_upload(d: &Daemon, path: &StorePath, nar: &[u8]) -> HalfUpload {
    let script = Script::new().add_honest(path, nar);
    let half = script.bytes.len() - nar.len() / 2;
    let mut relay = d.spawn_relay(ACCOUNT, true);
    relay
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(&script.bytes[..half])
        .expect("send half the upload");
    HalfUpload {
        relay,
        rest: script.bytes[half..].to_vec(),
        ops: script.ops,
    }
}

/// Sends the rest and returns the relay's answer.
fn finish_upload(mut up: HalfUpload) -> Reply {
    let mut stdin = up.relay.stdin.take().expect("stdin");
    stdin.write_all(&up.rest).expect("send the rest");
    let mut stdout = up.relay.stdout.take().expect("stdout");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !harness::complete(&received, &up.ops) {
        match stdout.read(&mut buf).expect("read the answer") {
            0 => break,
            n => received.extend_from_slice(&buf[..n]),
        }
    }
    drop(stdin);
    let out = up.relay.wait_with_output().expect("wait for the relay");
    Reply {
        status: out.status.code().unwrap_or(-1),
        stdout: received,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn sigterm_under_load_finishes_what_it_can_and_loses_nothing() {
    let f = Fixture::new(&[1, 0]);
    let mut d = f.daemon(&["--shutdown-timeout", "5"], &[]);
    let nar_of = |byte: u8| {
        nixbuild_core::nar::NarNode::File {
            executable: false,
            contents: vec![byte; 8 << 20],
        }
        .to_nar()
        .expect("nar")
    };
    let (nar_done, nar_cut) = (nar_of(b'd'), nar_of(b'c'));
    let done_path = harness::test_path(&format!("{}-done", f.lab.salt), "done");
    let cut_path = harness::test_path(&format!("{}-cut", f.lab.salt), "cut");
    // Two uploads half-way, one build whose builder runs a second, one that never ends.
    let finishing = start_half_upload(&d, &done_path, &nar_done);
    let abandoned = start_half_upload(&d, &cut_path, &nar_cut);
    let quick =
        spawn(
            f.lab
                .remote_command(&d, ACCOUNT, &lab::builders(), &[f.drvs["hang-0"].clone()]),
        );
    let endless_drv = f.drvs["endless"].clone();
    let endless = spawn(f.lab.remote_command(
        &d,
        ACCOUNT,
        &lab::builders(),
        std::slice::from_ref(&endless_drv),
    ));
    for drv in [&f.drvs["hang-0"], &endless_drv] {
        d.wait_for_log(&["nixbuild::build: building ", &format!("drv={drv} ")]);
    }
    let tmp = d.state_dir().join("tmp");
    wait_until("both uploads are under way", || {
        std::fs::read_dir(&tmp).map_or(0, |e| e.count()) == 2
    });

    d.terminate();
    d.wait_for_log(&["shutting down"]);
    // The session in progress finishes its upload during the drain and is acknowledged.
    let reply = finish_upload(finishing);
    let answers = reply.responses(&[Opcode::AddToStoreNar]);
    assert!(matches!(answers[..], [Response::Added]), "{answers:?}");
    let (quick_ok, quick_err) = finish(quick);
    assert!(quick_ok, "the running build was not finished: {quick_err}");
    let (endless_ok, _) = finish(endless);
    assert!(!endless_ok, "the endless build cannot succeed");
    d.wait_exit();
    let log = d.log();
    assert!(log.contains("cut off"), "{log}");
    drop(abandoned);
    // Nothing of the builds outlives the daemon.
    harness::assert_no_build_left(&d);

    d.start_again(&[]);
    let rows = assert_consistent(&d);
    let has = |path: &str| rows.contains_key(&(ACCOUNT.to_owned(), base_name(path)));
    assert_eq!(
        rows.get(&(ACCOUNT.to_owned(), done_path.base_name())),
        Some(&harness::sha256(&nar_done))
    );
    assert!(
        !has(&cut_path.base_name()),
        "the cut-off upload is registered"
    );
    let quick_out = f.output("hang-0");
    assert!(has(&quick_out), "the finished build's output is gone");
    assert_eq!(
        rows[&(ACCOUNT.to_owned(), base_name(&quick_out))],
        f.local_hash(&quick_out)
    );
    let endless_out = f.output("endless");
    assert!(
        !has(&endless_out),
        "the cut-off build's output is registered"
    );
    // It serves again.
    f.lab
        .remote_build_ok(&d, ACCOUNT, &[f.drvs["hang-1"].clone()]);
    d.stop();
}
