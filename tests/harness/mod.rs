//! Runs `nixbuild-server` on a temporary state directory for one test, and talks to it
//! through `nixbuild-serve` (the relay): with the real Nix client, or with scripted bytes
//! from the serve codec of `nixbuild_core`.
//!
//! The binaries are the examples next to this test binary (`target/<profile>/examples/`),
//! built by `cargo build --examples` before the tests (scripts/test does).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BufMut;
use nixbuild::store::{Store, StoreLimits};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::serve::handshake::ServerHello;
use nixbuild_core::serve::{
    AddToStoreNar, ClientHello, ExportMarker, ExportTrailer, Limits, Opcode, ProtocolVersion,
    Request, Response,
};
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire::BufMutExt;

/// The path of an example binary built for this profile.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build the examples before the tests (`cargo build --examples`; \
         scripts/test does)",
        bin.display()
    );
    bin
}

/// The store URI that makes Nix run our relay as its remote program.
pub fn store_uri() -> String {
    format!(
        "ssh://localhost?remote-program={}",
        example_bin("nixbuild-serve").display()
    )
}

/// The builders line for a daemon through the relay, as the README recommends it.
pub fn builders() -> String {
    format!(
        "{} x86_64-linux - 100 1 big-parallel,benchmark",
        store_uri()
    )
}

/// The non-empty lines of a command's output.
pub fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

pub mod build_log;
pub mod cache;
pub mod clients;
pub mod closure;
pub mod hostile;
pub mod ssh;
pub mod ssh_ng;
pub mod stock;
pub mod worker;

/// How many build uids each test daemon has.
pub const BUILD_UIDS: u32 = 64;

/// The first build uid of this test process's daemons: distinct for test processes running
/// at once (nextest runs each test in its own process).
pub fn build_uid_base() -> u32 {
    2_000_000_000 + (std::process::id() % 100_000) * BUILD_UIDS
}

/// What the daemon logs once it accepts connections on its socket.
const LISTENING: &str = "nixbuild::daemon: listening socket=";
/// The same line with `--log-format json`.
const LISTENING_JSON: &str = r#""fields":{"message":"listening","socket":"#;

/// A running daemon with its own state directory and log file.
pub struct Daemon {
    child: Option<Process>,
    /// The state directory's own small file system, if any (unmounted after the daemon ended).
    tmpfs: Option<Tmpfs>,
    dir: tempfile::TempDir,
}

/// A tmpfs mounted for one test (we are root in tests), lazily unmounted when dropped.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs with `options` (such as `size=96m`; mode 0711, as a state directory)
    /// on `path`, creating it.
    pub fn mount(path: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create the mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("{options},mode=0711"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount (the tests run as root)");
        assert!(status.success(), "mount -t tmpfs on {}", path.display());
        Tmpfs {
            path: path.to_owned(),
        }
    }

    /// Bytes available on it now.
    pub fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.path).expect("statvfs");
        st.f_bavail * st.f_frsize
    }

    /// Inodes available on it now.
    pub fn free_inodes(&self) -> u64 {
        rustix::fs::statvfs(&self.path).expect("statvfs").f_favail
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A child process killed when dropped (a failing test must not leave a daemon behind).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a relayed session gave back.
#[derive(Debug)]
pub struct Reply {
    /// The relay's exit status.
    pub status: i32,
    /// Its stdout: the serve protocol.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: String,
}

impl Daemon {
    /// Starts `nixbuild-server` with extra arguments and waits until it accepts connections.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_with_config("", args)
    }

    /// Starts `nixbuild-server` with `config` (TOML) as its configuration file and extra
    /// arguments, and waits until it accepts connections.
    pub fn start_with_config(config: &str, args: &[&str]) -> Daemon {
        let mut d = Daemon {
            child: None,
            tmpfs: None,
            dir: config_dir(config),
        };
        d.spawn(args);
        d
    }

    /// Like [`Daemon::start_with_config`], with the state directory on a tmpfs of its own
    /// mounted with `options` (such as `size=96m`), for tests of the disk reserve.
    pub fn start_on_tmpfs(options: &str, config: &str, args: &[&str]) -> Daemon {
        let dir = config_dir(config);
        let tmpfs = Tmpfs::mount(&dir.path().join("state"), options);
        let mut d = Daemon {
            child: None,
            tmpfs: Some(tmpfs),
            dir,
        };
        d.spawn(args);
        d
    }

    /// The state directory's tmpfs, when started with [`Daemon::start_on_tmpfs`].
    pub fn tmpfs(&self) -> &Tmpfs {
        self.tmpfs.as_ref().expect("a daemon started on a tmpfs")
    }

    /// Starts `nixbuild-server` as [`Daemon::start_with_config`] does, on a copy of the
    /// state directory `seed` (of a stopped daemon), with `env` added to its environment.
    pub fn start_seeded(config: &str, seed: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon {
            child: None,
            tmpfs: None,
            dir: config_dir(config),
        };
        let copied = Command::new("cp")
            .arg("-a")
            .arg(seed)
            .arg(d.state_dir())
            .status()
            .expect("run cp");
        assert!(copied.success(), "cp -a {} failed", seed.display());
        d.spawn_with(args, env);
        d
    }

    /// Starts the daemon process on this state directory (its log and stdout are appended
    /// to the files of earlier runs) and waits until it accepts connections.
    fn spawn(&mut self, args: &[&str]) {
        self.spawn_with(args, &[]);
    }

    /// [`Daemon::spawn`] with `env` added to the daemon's environment.
    fn spawn_with(&mut self, args: &[&str], env: &[(&str, &str)]) {
        let started = self.log().matches(LISTENING).count();
        let append = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(name))
                .expect("open a daemon output file")
        };
        let child = Command::new(example_bin("nixbuild-server"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--config")
            .arg(self.dir.path().join("nixbuild.toml"))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(append("daemon.out"))
            .stderr(append("daemon.log"))
            .spawn()
            .expect("spawn nixbuild-server");
        self.child = Some(Process(child));
        self.wait_ready(started);
    }

    /// Stops the daemon with SIGTERM (checking that it exits cleanly) and starts it again on
    /// the same state directory with `args`.
    pub fn restart(mut self, args: &[&str]) -> Daemon {
        self.terminate();
        self.wait_exit();
        self.spawn(args);
        self
    }

    /// Kills the daemon with SIGKILL (`kill -9`) and reaps it.
    pub fn kill(&mut self) {
        let mut process = self.child.take().expect("running");
        process.0.kill().expect("kill -9 the daemon");
        process.0.wait().expect("reap the daemon");
    }

    /// Starts the daemon again on its state directory after [`Daemon::kill`] or
    /// [`Daemon::wait_exit`], with `args`
    /// and the environment of the test (no `env` of an earlier start).
    pub fn start_again(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn(args);
    }

    /// Waits until the daemon just started says it listens: its log has more than
    /// `started` lines saying so.
    fn wait_ready(&mut self, started: usize) {
        // Start-up is quick; the bound only turns a hang into a failure with the log.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            // The daemon logs this once the socket is in place (after the SSH listener,
            // when there is one). Neither probed with a connection, which would leave a
            // short-lived session behind in the daemon, nor told by the socket's existence:
            // a daemon killed with SIGKILL leaves its socket behind.
            let log = self.log();
            if log.matches(LISTENING).count() + log.matches(LISTENING_JSON).count() > started {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!("nixbuild-server exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < until, "daemon not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// What the daemon printed on stdout so far (the SSH host key's pins).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.out")).unwrap_or_default()
    }

    /// Waits until the log has a line containing every one of `needles`, and returns it.
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        // The events looked for come within a second or two; the bound only turns a hang
        // into a failure with the log.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < until,
                "no log line with {needles:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM to the daemon (without waiting for it).
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGHUP to the daemon: it re-reads its configuration and authorized keys.
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    /// Asks the daemon for a collection (SIGUSR1) and waits for the log line of the one
    /// after the `done` earlier ones; returns that line.
    pub fn collect(&self) -> String {
        const DONE: &str = "collection done";
        let before = self.log().matches(DONE).count();
        self.signal("-USR1");
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().filter(|l| l.contains(DONE)).nth(before) {
                return line.to_owned();
            }
            assert!(Instant::now() < until, "no collection:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGUSR1 (a collection) without waiting for it.
    pub fn request_collection(&self) {
        self.signal("-USR1");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").0.id();
        let sent = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// Replaces the daemon's configuration file with `config` (and this test process's build
    /// uids, as at start); it is read at the next start or SIGHUP.
    pub fn write_config(&self, config: &str) {
        std::fs::write(self.dir.path().join("nixbuild.toml"), config_text(config))
            .expect("write the configuration");
    }

    /// Waits for the daemon to exit and checks that it exited successfully; it may then be
    /// started again with [`Daemon::start_again`].
    pub fn wait_exit(&mut self) {
        let mut process = self.child.take().expect("running");
        let status = process.0.wait().expect("wait for the daemon");
        assert!(
            status.success(),
            "daemon exited with {status}:\n{}",
            self.log()
        );
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").0.id()
    }

    /// Peak resident memory of the daemon so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// Points a Nix command's relay at this daemon, as `account` (Nix runs the relay with
    /// its own environment).
    pub fn point(&self, mut cmd: Command, account: &str) -> Command {
        cmd.env("NIXBUILD_STATE_DIR", self.state_dir())
            .env("NIXBUILD_ACCOUNT", account);
        cmd
    }

    /// Starts the relay as `account` with its stdio piped.
    pub fn spawn_relay(&self, account: &str, write: bool) -> Child {
        let mut cmd = Command::new(example_bin("nixbuild-serve"));
        cmd.arg("--serve");
        if write {
            cmd.arg("--write");
        }
        cmd.env("NIXBUILD_STATE_DIR", self.state_dir())
            .env("NIXBUILD_ACCOUNT", account)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nixbuild-serve")
    }

    /// Runs the relay as `account` with `input` on its stdin.
    pub fn relay(&self, account: &str, write: bool, input: &[u8]) -> Reply {
        let mut child = self.spawn_relay(account, write);
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        // The daemon may end the session before reading everything: ignore a broken pipe.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait for nixbuild-serve");
        writer.join().expect("stdin writer");
        Reply {
            status: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs the relay as `account` (with `--write`), sends `input`, and keeps its stdin open
    /// until stdout holds the server hello and complete responses to `ops`: a client that
    /// waits for its answers, as Nix does (the end of its input means it is gone).
    pub fn relay_waiting(&self, account: &str, input: &[u8], ops: &[Opcode]) -> Reply {
        use std::io::Read;
        let mut child = self.spawn_relay(account, true);
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write the requests");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut received = Vec::new();
        let mut buf = [0u8; 65536];
        while !complete(&received, ops) {
            match stdout.read(&mut buf).expect("read the relay's stdout") {
                0 => break,
                n => received.extend_from_slice(&buf[..n]),
            }
        }
        drop(stdin);
        stdout.read_to_end(&mut received).expect("read the rest");
        let out = child.wait_with_output().expect("wait for nixbuild-serve");
        Reply {
            status: out.status.code().unwrap_or(-1),
            stdout: received,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts the relay as `account` for a session the test drives step by step.
    pub fn open(&self, account: &str, write: bool) -> RelaySession {
        let mut child = self.spawn_relay(account, write);
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        RelaySession {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    /// What the store holds now: every row of the database and every file of `objects/`,
    /// with `tmp/` (imports in progress). Read while the daemon runs (WAL allows it).
    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot::of(&self.state_dir())
    }

    /// Waits until no import is left in `tmp/`, then checks that the store equals `before`
    /// (a failed session's temporary files go when its task ends, just after its client
    /// saw the error).
    pub fn assert_unchanged(&self, before: &StoreSnapshot, case: &str) {
        // Removal takes milliseconds; the bound only turns a leak into a failure.
        let until = Instant::now() + Duration::from_secs(30);
        let mut now = self.snapshot();
        while !now.tmp.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
            now = self.snapshot();
        }
        assert!(
            now.tmp.is_empty(),
            "{case}: imports left in tmp/: {:?}",
            now.tmp
        );
        let diff = |a: &[String], b: &[String]| -> (Vec<String>, Vec<String>) {
            let gone = a.iter().filter(|x| !b.contains(x)).cloned().collect();
            let new = b.iter().filter(|x| !a.contains(x)).cloned().collect();
            (gone, new)
        };
        let (gone, new) = diff(&before.rows, &now.rows);
        assert!(
            gone.is_empty() && new.is_empty(),
            "{case}: database rows changed; gone: {gone:#?}, new: {new:#?}"
        );
        let (gone, new) = diff(&before.objects, &now.objects);
        assert!(
            gone.is_empty() && new.is_empty(),
            "{case}: objects/ changed; gone: {gone:#?}, new: {new:#?}"
        );
    }

    /// Stops the daemon with SIGTERM and checks that it exited cleanly, left no import in
    /// progress behind, and that re-hashing every object matches the recorded hashes.
    /// Returns the store (opened read-only in spirit: the tests only query it) and the log.
    pub fn stop(self) -> Stopped {
        self.terminate();
        self.stopped()
    }

    /// Like [`Daemon::stop`], for a daemon already sent SIGTERM.
    pub fn stopped(mut self) -> Stopped {
        self.wait_exit();
        let log = self.log();
        let state = self.state_dir();
        assert!(!state.join("serve.sock").exists(), "socket left behind");
        let leftovers: Vec<_> = std::fs::read_dir(state.join("tmp"))
            .expect("read tmp/")
            .collect();
        assert!(leftovers.is_empty(), "imports left in tmp/: {leftovers:?}");
        // Store::open removes orphan objects, so look for them before it runs.
        let orphans = orphan_objects(&state);
        assert!(orphans.is_empty(), "objects without a row: {orphans:?}");
        let store = Store::open(
            &state,
            StoreLimits {
                max_nar_size: 1 << 40,
                disk_reserve: 0,
            },
        )
        .expect("open the store after the daemon stopped");
        let problems = store.verify().expect("verify");
        assert!(problems.is_empty(), "store problems: {problems:?}");
        Stopped {
            store,
            log,
            _tmpfs: self.tmpfs.take(),
            _dir: self.dir,
        }
    }
}

/// A temporary directory holding `nixbuild.toml` made of `config` and this test process's
/// build uids.
fn config_dir(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("nixbuild.toml"), config_text(config))
        .expect("write the configuration");
    dir
}

/// `config` with this test process's build uids.
fn config_text(config: &str) -> String {
    // Daemons of tests running at once get distinct build uids (tests check that no
    // process of their builds is left).
    let uids = format!(
        "[builds]\nuid_base = {}\nuid_count = {BUILD_UIDS}\n",
        build_uid_base()
    );
    if config.contains("[builds]\n") {
        config.replacen("[builds]\n", &uids, 1)
    } else {
        format!("{config}\n{uids}")
    }
}

/// The number after `key=` in a daemon log line (such as `grants=` of `collection done`).
pub fn log_number(line: &str, key: &str) -> u64 {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len()
        + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number for {key} in {line}"))
}

/// The entries of `<state>/objects` that no row of the database names, read without
/// changing anything.
pub fn orphan_objects(state: &Path) -> Vec<String> {
    let db = rusqlite::Connection::open_with_flags(
        state.join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database read-only");
    let keys: BTreeSet<String> = db
        .prepare("SELECT key FROM objects")
        .and_then(|mut st| st.query_map([], |row| row.get(0))?.collect())
        .expect("list the objects' keys");
    std::fs::read_dir(state.join("objects"))
        .expect("read objects/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| !keys.contains(name))
        .collect()
}

/// The contents of a state directory's store, for before/after comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSnapshot {
    /// Every row of every table, as `table: values`, sorted; without `paths.last_used`,
    /// which every query of a path moves, and without `builds` and `build_ids`, the records
    /// every build leaves, failed ones included, nor `traffic`, the bytes every session
    /// moves, refused ones included.
    pub rows: Vec<String>,
    /// Every file, directory and symlink under `objects/`: relative path, kind, size or
    /// target; sorted.
    pub objects: Vec<String>,
    /// The entries of `tmp/`.
    pub tmp: Vec<String>,
}

impl StoreSnapshot {
    /// Reads the snapshot of the state directory `state` without changing anything.
    pub fn of(state: &Path) -> StoreSnapshot {
        let db = rusqlite::Connection::open_with_flags(
            state.join("db.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the database read-only");
        let tables: Vec<String> = db
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT IN ('builds', 'build_ids', 'traffic') ORDER BY name",
            )
            .and_then(|mut st| st.query_map([], |row| row.get(0))?.collect())
            .expect("list the tables");
        let mut rows = Vec::new();
        for table in tables {
            let mut st = db
                .prepare(&format!("SELECT * FROM \"{table}\""))
                .expect("select a table");
            let columns: Vec<usize> = st
                .column_names()
                .iter()
                .enumerate()
                .filter(|(_, name)| **name != "last_used")
                .map(|(i, _)| i)
                .collect();
            let mut q = st.query([]).expect("query a table");
            while let Some(row) = q.next().expect("read a row") {
                let values: Vec<String> = columns
                    .iter()
                    .map(|&i| match row.get_ref(i).expect("column") {
                        rusqlite::types::ValueRef::Text(t) => {
                            format!("{:?}", String::from_utf8_lossy(t))
                        }
                        other => format!("{other:?}"),
                    })
                    .collect();
                rows.push(format!("{table}: {}", values.join(", ")));
            }
        }
        rows.sort();
        let mut objects = Vec::new();
        list_tree(&state.join("objects"), Path::new(""), &mut objects);
        objects.sort();
        let mut tmp: Vec<String> = std::fs::read_dir(state.join("tmp"))
            .expect("read tmp/")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        tmp.sort();
        StoreSnapshot { rows, objects, tmp }
    }
}

/// Appends one line per node under `dir` (named relative to it as `rel`), depth first.
fn list_tree(dir: &Path, rel: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read a directory of objects/") {
        let entry = entry.expect("entry");
        let name = rel.join(entry.file_name());
        let meta = std::fs::symlink_metadata(entry.path()).expect("lstat");
        if meta.is_dir() {
            out.push(format!("{} dir", name.display()));
            list_tree(&entry.path(), &name, out);
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(entry.path()).expect("readlink");
            out.push(format!("{} -> {}", name.display(), target.display()));
        } else {
            out.push(format!("{} file {}", name.display(), meta.len()));
        }
    }
}

/// A relayed session driven step by step (see [`Daemon::open`]).
pub struct RelaySession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::process::ChildStdout,
}

impl RelaySession {
    /// Sends `bytes` (a write error means the daemon ended the session: ignored, the
    /// reads and the final status tell).
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stdin.as_mut().expect("open").write_all(bytes);
    }

    /// Waits until the daemon has read everything sent so far (the relay hands it the pipe
    /// the test writes to, so the pipe's unread bytes are the daemon's).
    pub fn wait_until_read(&self) {
        let stdin = self.stdin.as_ref().expect("open");
        let until = Instant::now() + Duration::from_secs(30);
        while rustix::io::ioctl_fionread(stdin).expect("FIONREAD") > 0 {
            assert!(
                Instant::now() < until,
                "the daemon stopped reading the session"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads exactly `n` bytes of the session's stdout.
    pub fn read(&mut self, n: usize) -> Vec<u8> {
        use std::io::Read;
        let mut buf = vec![0u8; n];
        self.stdout
            .read_exact(&mut buf)
            .expect("read the session's answer");
        buf
    }

    /// Reads one NAR from stdout (as the client of DumpStorePath does, by parsing it).
    pub fn read_nar(&mut self) -> Vec<u8> {
        use std::io::Read;
        let mut reader = nixbuild_core::nar::NarReader::new();
        let mut nar = Vec::new();
        let mut byte = [0u8; 1];
        while !reader.is_complete() {
            self.stdout.read_exact(&mut byte).expect("read a NAR byte");
            nar.push(byte[0]);
            let mut pos = 0;
            // Feed until the reader has taken the byte and given every event it completes.
            loop {
                match reader.feed(&byte[pos..]).expect("a valid NAR") {
                    (_, None) => break,
                    (n, Some(_)) => pos += n,
                }
            }
        }
        nar
    }

    /// Closes stdin and waits: the relay's exit status, the rest of stdout, and stderr.
    pub fn finish(mut self) -> Reply {
        use std::io::Read;
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let _ = self.stdout.read_to_end(&mut rest);
        let out = self
            .child
            .wait_with_output()
            .expect("wait for nixbuild-serve");
        Reply {
            status: out.status.code().unwrap_or(-1),
            stdout: rest,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A stopped daemon's store and log.
pub struct Stopped {
    /// The store, re-opened and verified.
    pub store: Store,
    /// The daemon's whole log.
    pub log: String,
    _tmpfs: Option<Tmpfs>,
    _dir: tempfile::TempDir,
}

impl Stopped {
    /// The state directory the daemon left.
    pub fn state_dir(&self) -> PathBuf {
        self._dir.path().join("state")
    }

    /// Whether `path` is valid for `account`.
    pub fn valid(&self, account: &str, path: &StorePath) -> bool {
        let set = BTreeSet::from([path.clone()]);
        !self
            .store
            .query_valid_paths(account, &set)
            .expect("query")
            .is_empty()
    }

    /// Whether the log shows an import of `path` registered for `account`.
    pub fn registered(&self, account: &str, path: &StorePath) -> bool {
        registered_in(&self.log, account, path)
    }
}

/// Whether `log` shows an import of `path` registered for `account`.
pub fn registered_in(log: &str, account: &str, path: &StorePath) -> bool {
    log.lines().any(|l| {
        l.contains("registered import")
            && l.contains(&format!("account={account} "))
            && l.contains(&format!("path={path}"))
    })
}

/// Client bytes for a scripted session: the hello, then requests and raw bytes.
pub struct Script {
    /// Everything to send.
    pub bytes: Vec<u8>,
    /// The opcodes whose fixed-shape responses to expect, in order.
    pub ops: Vec<Opcode>,
}

/// The version scripted clients speak.
pub const VERSION: ProtocolVersion = ProtocolVersion::V2_7;

impl Script {
    /// A session that has sent its hello.
    pub fn new() -> Script {
        let mut bytes = Vec::new();
        ClientHello { version: VERSION }.encode(&mut bytes);
        Script {
            bytes,
            ops: Vec::new(),
        }
    }

    /// Appends a request.
    pub fn request(mut self, req: &Request) -> Script {
        req.encode(VERSION, &mut self.bytes);
        self.ops.push(req.opcode());
        self
    }

    /// Appends raw bytes.
    pub fn raw(mut self, bytes: &[u8]) -> Script {
        self.bytes.extend_from_slice(bytes);
        self
    }

    /// Appends an AddToStoreNar of `nar` claiming `hash` and `size` for `path`.
    pub fn add(self, path: &StorePath, nar: &[u8], hash: Hash, size: u64) -> Script {
        let header = AddToStoreNar {
            path: path.clone(),
            deriver: None,
            nar_hash: hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        };
        self.request(&Request::AddToStoreNar(Box::new(header)))
            .raw(nar)
    }

    /// Appends an honest AddToStoreNar of `nar` for `path`.
    pub fn add_honest(self, path: &StorePath, nar: &[u8]) -> Script {
        self.add(path, nar, sha256(nar), nar.len() as u64)
    }
}

impl Reply {
    /// Decodes the server hello and the fixed-shape responses to `ops` from stdout, checking
    /// that nothing is left over.
    pub fn responses(&self, ops: &[Opcode]) -> Vec<Response> {
        let (hello, mut pos) = ServerHello::decode(&self.stdout)
            .expect("server hello")
            .expect("complete server hello");
        assert_eq!(hello.version, ProtocolVersion::SERVER);
        let mut out = Vec::new();
        for &op in ops {
            let (r, n) = Response::decode(op, &self.stdout[pos..], VERSION, &Limits::default())
                .expect("valid response")
                .unwrap_or_else(|| panic!("incomplete response to {op:?}: {self:?}"));
            out.push(r);
            pos += n;
        }
        assert_eq!(
            pos,
            self.stdout.len(),
            "unexpected bytes after the responses"
        );
        out
    }

    /// Asserts that the session failed with `error: ` and `needle` on stderr.
    pub fn assert_error(&self, needle: &str) {
        assert_ne!(self.status, 0, "session succeeded: {self:?}");
        assert!(
            self.stderr.starts_with("error: ") && self.stderr.contains(needle),
            "expected 'error: ...{needle}...' on stderr, got {:?}",
            self.stderr
        );
    }
}

/// Whether `stdout` holds the server hello and complete responses to `ops`.
pub fn complete(stdout: &[u8], ops: &[Opcode]) -> bool {
    let Ok(Some((_, mut pos))) = ServerHello::decode(stdout) else {
        return false;
    };
    for &op in ops {
        match Response::decode(op, &stdout[pos..], VERSION, &Limits::default()) {
            Ok(Some((_, n))) => pos += n,
            _ => return false,
        }
    }
    true
}

/// A wire string: length, bytes, zero padding to 8.
pub fn wire_str(bytes: &[u8]) -> Vec<u8> {
    let mut out = wire_u64(bytes.len() as u64);
    out.extend_from_slice(bytes);
    out.resize(out.len() + (8 - bytes.len() % 8) % 8, 0);
    out
}

/// The start of a BuildDerivation of `drv_path` (after the hello) up to its environment,
/// which has `env_count` pairs.
pub fn build_derivation_prefix(drv_path: &StorePath, env_count: u64) -> Vec<u8> {
    let mut out = wire_u64(Opcode::BuildDerivation.to_wire());
    out.extend(wire_str(drv_path.to_absolute().as_bytes()));
    out.extend(wire_u64(0)); // outputs
    out.extend(wire_u64(0)); // inputSrcs
    out.extend(wire_str(b"x86_64-linux"));
    out.extend(wire_str(b"/bin/sh"));
    out.extend(wire_u64(0)); // args
    out.extend(wire_u64(env_count));
    out
}

/// A salt unique to this run, for paths that must not collide with earlier runs'.
pub fn salt() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{nanos:x}-{:x}", std::process::id())
}

/// The NAR of a regular, non-executable file with `contents`.
pub fn file_nar(contents: &[u8]) -> Vec<u8> {
    nixbuild_core::nar::NarNode::File {
        executable: false,
        contents: contents.to_vec(),
    }
    .to_nar()
    .expect("a file NAR")
}

/// The sha256 of `data`.
pub fn sha256(data: &[u8]) -> Hash {
    Hash::compute(HashAlgo::Sha256, data)
}

/// A store path named `name` whose hash part comes from `seed` (unique per run with a salt).
pub fn test_path(seed: &str, name: &str) -> StorePath {
    let digest = sha256(seed.as_bytes());
    let mut d = [0u8; 20];
    d.copy_from_slice(&digest.digest()[..20]);
    StorePath::from_digest(d, name).expect("valid store path")
}

/// NAR bytes from raw tokens, each written as a wire string: for NARs the writer refuses.
pub fn raw_nar(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        out.put_wire_bytes(t);
    }
    out
}

/// An export ("NIXE") stream of `(path, NAR, references)` entries, in the given order, as
/// ImportPaths and `nix-store --import` take it.
pub fn export_stream(entries: &[(StorePath, Vec<u8>, BTreeSet<StorePath>)]) -> Vec<u8> {
    let mut stream = Vec::new();
    for (path, nar, references) in entries {
        ExportMarker::Entry.encode(&mut stream);
        stream.extend_from_slice(nar);
        ExportTrailer {
            path: path.clone(),
            references: references.clone(),
            deriver: None,
            legacy_signature: None,
        }
        .encode(&mut stream);
    }
    ExportMarker::End.encode(&mut stream);
    stream
}

/// A wire `u64`, for hand-made requests.
pub fn wire_u64(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u64_le(n);
    out
}

/// Waits (at most 30 s) until nothing of the daemon's builds is left: no process runs as one
/// of its build uids, `<state>/builds/` is empty, and no build cgroup is left under the
/// daemon's cgroups (`nixbuild-<hash of the state directory>` in every hierarchy).
pub fn assert_no_build_left(d: &Daemon) {
    let state = d.state_dir();
    let cgroup = nixbuild::builds::cgroup_name(&state);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let processes = build_processes();
        let builds: Vec<_> = std::fs::read_dir(state.join("builds"))
            .expect("read builds/")
            .map(|e| e.expect("entry").path())
            .collect();
        let cgroups = build_cgroups(&cgroup);
        if processes.is_empty() && builds.is_empty() && cgroups.is_empty() {
            return;
        }
        assert!(
            Instant::now() < until,
            "left by builds: processes {processes:?}, directories {builds:?}, cgroups \
             {cgroups:?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `/proc/<pid>/status` of every process running as one of this test process's build
/// uids.
pub fn build_processes() -> Vec<String> {
    let uids = build_uid_base()..build_uid_base() + BUILD_UIDS;
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let uid: u32 = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            uids.contains(&uid).then_some(status)
        })
        .collect()
}

/// The cgroup directories below any directory named `name` in every cgroup hierarchy
/// mounted here (a daemon's build cgroups live below its `nixbuild-<hash>`).
fn build_cgroups(name: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let roots: BTreeSet<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount_point = left.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    let mut found = Vec::new();
    for root in roots {
        // Depth-first, bounded: the daemon's cgroup sits a few levels down (its own cgroup).
        let mut stack = vec![(root, 0)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                if entry.file_name().to_string_lossy() == name {
                    found.extend(
                        std::fs::read_dir(&path)
                            .into_iter()
                            .flatten()
                            .filter_map(Result::ok)
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                } else if depth < 8 {
                    stack.push((path, depth + 1));
                }
            }
        }
    }
    found
}

/// `GET path` on `addr` over HTTP/1.0: the status line's code and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u32, String)> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// A free port on 127.0.0.1 (free when this returns; take it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
