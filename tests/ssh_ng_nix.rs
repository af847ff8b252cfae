//! The worker protocol (`ssh-ng://` stores and builders) with each of the three Nix client
//! generations (tests/harness/clients.rs: the host's Nix 2.8, Nix 2.26 in the trixie chroot,
//! Nix 2.34 in the sid chroot), over both ways in:
//!
//! - the relay: `ssh-ng://localhost?remote-program=<nixbuild-serve>`, which Nix runs as
//!   `nixbuild-serve --stdio` (like `nix-daemon --stdio`), the account in `NIXBUILD_ACCOUNT`;
//! - the SSH server, with the real OpenSSH client and a pinned host key:
//!   `ssh-ng://<alias>` through an ssh config (`NIX_SSHOPTS=-F <config>`), which runs the
//!   exec command `nix-daemon --stdio`, the account from the key.
//!
//! Each operation is a test of its own, per client and way in (`<client>_<way>::<operation>`),
//! so that a failure names exactly what does not work: the store's ping (`nix store ping` on
//! 2.8, `nix store info` after), a closure of 200 salted paths copied there and back, `nix
//! path-info --json` of an uploaded path, a remote build whose log line reaches the client,
//! and account isolation. Paths are salted for the run; the server's side is checked from
//! its store (paths valid for the account) and its log (the build ran there).

mod harness;

use std::collections::BTreeMap;

use harness::clients::{read_client_file, Client, ClientNix};
use harness::closure::{self, parse_infos, Info};
use harness::salt;
use harness::ssh::{ok, run};
use harness::ssh_ng::{must, Setup, Way, ALICE, BOB};
use nixbuild_core::store_path::StorePath;

fn store_path(path: &str) -> StorePath {
    StorePath::from_absolute_path(path.as_bytes()).expect("store path")
}

/// `nix path-info --json [-r] PATHS` in the client's own store.
fn local_infos(nix: &ClientNix, recursive: bool, paths: &[&str]) -> BTreeMap<String, Info> {
    let mut cmd = nix.command("nix");
    cmd.args(["path-info", "--json"]);
    if recursive {
        cmd.arg("-r");
    }
    parse_infos(&ok(cmd.args(paths)).stdout)
}

/// Imports `n` salted paths into the client's store (see [`closure::import_closure`]).
fn import_closure(nix: &ClientNix, salt: &str, n: usize) -> Vec<StorePath> {
    let mut cmd = nix.command("nix-store");
    cmd.arg("--import");
    closure::import_closure(cmd, "ng-", salt, n)
}

/// `nix store ping` (Nix 2.8) or `nix store info` (its name since Nix 2.19) succeeds.
fn ping(client: Client, way: Way) {
    let s = Setup::new(client, way);
    let word = if client == Client::Host {
        "ping"
    } else {
        "info"
    };
    let out = must(
        &s,
        &format!("nix store {word}"),
        &mut s.nix(ALICE, &["store", word]),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ssh-ng://"), "nix store {word} said:\n{text}");
    let stopped = s.stop();
    assert!(
        stopped.log.contains(&format!("account={ALICE}")),
        "no session of {ALICE} in the log:\n{}",
        stopped.log
    );
}

/// A closure of 200 salted paths goes there with `nix copy --to`, is valid for the account
/// on the server, and comes back with `nix copy --from` after being deleted locally.
fn copy_closure(client: Client, way: Way) {
    let s = Setup::new(client, way);
    let salt = salt();
    let paths = import_closure(&s.nix, &salt, 200);
    let top = paths[199].to_absolute();
    let local = local_infos(&s.nix, true, &[&top]);
    assert_eq!(local.len(), 200);

    let uri = s.uri(ALICE);
    let started = std::time::Instant::now();
    must(
        &s,
        "nix copy --to",
        s.cmd(ALICE, "nix").args(["copy", "--to", &uri, &top]),
    );
    let to = started.elapsed();
    let remote = parse_infos(
        &must(
            &s,
            "nix path-info -r --json of the copied closure",
            &mut s.nix(ALICE, &["path-info", "--json", "-r", &top]),
        )
        .stdout,
    );
    assert_eq!(
        remote, local,
        "the server's path infos differ from the client's"
    );

    let all: Vec<String> = paths.iter().map(StorePath::to_absolute).collect();
    ok(s.nix.command("nix-store").arg("--delete").args(&all));
    let started = std::time::Instant::now();
    must(
        &s,
        "nix copy --from",
        s.cmd(ALICE, "nix").args(["copy", "--from", &uri, &top]),
    );
    eprintln!(
        "{} ({:?}): 200 paths copied there in {:.1} s, back in {:.1} s",
        s.nix.version,
        s.way,
        to.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(local_infos(&s.nix, true, &[&top]), local);
    ok(s.nix.command("nix-store").arg("--verify-path").args(&all));

    let stopped = s.stop();
    // Nix 2.26 opens a connection for each path it copies from an ssh-ng store (it does so
    // with its own nix-daemon too): about 200 sessions here, against 3 for Nix 2.8 and 2.34,
    // and some 10 s over SSH, where each connection pays a key exchange.
    eprintln!(
        "{} sessions in all",
        stopped.log.matches(" session start ").count()
    );
    for p in &paths {
        assert!(stopped.valid(ALICE, p), "{p} is not valid for {ALICE}");
    }
}

/// `nix path-info --json --store <uri>` of an uploaded path shows what the client's own
/// store shows.
fn path_info(client: Client, way: Way) {
    let s = Setup::new(client, way);
    let salt = salt();
    let p = s
        .nix
        .add_file(&format!("info-{salt}"), &format!("info {salt}\n"));
    let uri = s.uri(ALICE);
    must(
        &s,
        "nix copy --to",
        s.cmd(ALICE, "nix").args(["copy", "--to", &uri, &p]),
    );
    let out = must(
        &s,
        "nix path-info --json",
        &mut s.nix(ALICE, &["path-info", "--json", &p]),
    );
    let remote = parse_infos(&out.stdout);
    assert_eq!(remote, local_infos(&s.nix, false, &[&p]));
    assert_eq!(remote.len(), 1);
    let stopped = s.stop();
    assert!(stopped.valid(ALICE, &store_path(&p)));
}

/// `nix-build --max-jobs 0` with the server as the only builder: the build prints a salted
/// log line, which the client shows, and the server's log shows the build for the account.
fn build(client: Client, way: Way) {
    let s = Setup::new(client, way);
    let salt = salt();
    let line = format!("remote log line {salt}");
    let expr = s.nix.derivation(
        "ng-build",
        &salt,
        &format!("echo '{line}'; echo built {salt} > $out"),
    );
    let drv = s.nix.instantiate(&expr);
    let builders = format!(
        "{} x86_64-linux - 100 1 big-parallel,benchmark",
        s.uri(ALICE)
    );
    let out = must(
        &s,
        "nix-build through the ssh-ng builder",
        s.cmd(ALICE, "nix-build").arg(&drv).args([
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
            &builders,
        ]),
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(path.ends_with(&format!("-ng-build-{salt}")), "{path}");
    assert_eq!(read_client_file(client, &path), format!("built {salt}\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&line),
        "the client did not show the build's log line {line:?}:\n{stderr}"
    );
    s.server.daemon.wait_for_log(&[
        "nixbuild::build: building ",
        &format!("account={ALICE} "),
        &format!("drv={drv} "),
    ]);
    s.stop();
}

/// The scheduler's waiting line reaches a client whose build waits for a running one, on
/// the ssh-ng log channel (a server with room for one build at a time).
#[test]
fn the_waiting_line_reaches_an_ssh_ng_client() {
    let s = Setup::with_config(Client::Host, Way::Relay, "[capacity]\nmax_jobs = 1\n");
    let salt = salt();
    let builders = format!(
        "{} x86_64-linux - 100 1 big-parallel,benchmark",
        s.uri(ALICE)
    );
    let nix_build = |name: &str, script: &str| {
        let expr = s.nix.derivation(name, &salt, script);
        let drv = s.nix.instantiate(&expr);
        let mut cmd = s.cmd(ALICE, "nix-build");
        cmd.arg(&drv)
            .args(["--no-out-link", "--max-jobs", "0", "--builders", &builders])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    // The first build holds the only job slot until its client is killed, once the second
    // client has been told that it waits: no timing to guess on a loaded machine.
    let mut first = nix_build("ng-first", "sleep 600; echo first > $out")
        .spawn()
        .expect("spawn the first nix-build");
    s.server
        .daemon
        .wait_for_log(&["nixbuild::build: building ", &format!("account={ALICE} ")]);
    let mut second = nix_build("ng-second", "echo second > $out")
        .spawn()
        .expect("spawn the second nix-build");
    let mut stderr = second.stderr.take().expect("stderr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                seen.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        })
    };
    let line = "nixbuild: waiting for a job slot (position 1 of 1; 1 build running)";
    let text = || String::from_utf8_lossy(&seen.lock().expect("lock")).into_owned();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !text().contains(line) {
        assert!(
            std::time::Instant::now() < until,
            "the client was not told its build waited:\n{}",
            text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    first.kill().expect("kill the first nix-build");
    let _ = first.wait();
    let status = second.wait().expect("wait for the second nix-build");
    reader.join().expect("the stderr reader");
    assert!(status.success(), "{}", text());
    s.stop();
}

/// A path alice uploaded is invisible to bob through ssh-ng: `nix path-info` and `nix copy
/// --from` fail for him, and the server's store holds it for alice only.
fn isolation(client: Client, way: Way) {
    let s = Setup::new(client, way);
    let salt = salt();
    let p = s
        .nix
        .add_file(&format!("alice-{salt}"), &format!("alice {salt}\n"));
    must(
        &s,
        "nix copy --to as alice",
        s.cmd(ALICE, "nix")
            .args(["copy", "--to", &s.uri(ALICE), &p]),
    );
    must(
        &s,
        "nix path-info as alice",
        &mut s.nix(ALICE, &["path-info", &p]),
    );
    // Bob, through his own key (SSH) or account (relay).
    let info = run(&mut s.nix(BOB, &["path-info", &p]));
    assert!(
        !info.status.success(),
        "bob sees alice's path: {}",
        String::from_utf8_lossy(&info.stdout)
    );
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert!(stderr.contains("is not valid"), "{stderr}");
    ok(s.nix.command("nix-store").args(["--delete", &p]));
    let copy = run(s.cmd(BOB, "nix").args(["copy", "--from", &s.uri(BOB), &p]));
    assert!(
        !copy.status.success(),
        "bob copied alice's path from the server"
    );
    let stopped = s.stop();
    let sp = store_path(&p);
    assert!(stopped.valid(ALICE, &sp));
    assert!(!stopped.valid(BOB, &sp));
}

/// The operations, as tests of one client and way in.
macro_rules! suite {
    ($module:ident, $client:ident, $way:ident) => {
        mod $module {
            use super::*;

            #[test]
            fn store_ping() {
                ping(Client::$client, Way::$way);
            }

            #[test]
            fn copy_a_closure_of_200_paths_both_ways() {
                copy_closure(Client::$client, Way::$way);
            }

            #[test]
            fn path_info_json_of_an_uploaded_path() {
                path_info(Client::$client, Way::$way);
            }

            #[test]
            fn build_shows_the_remote_log() {
                build(Client::$client, Way::$way);
            }

            #[test]
            fn accounts_are_isolated() {
                isolation(Client::$client, Way::$way);
            }
        }
    };
}

suite!(nix_2_8_host_relay, Host, Relay);
suite!(nix_2_8_host_ssh, Host, Ssh);
suite!(nix_2_26_trixie_relay, Trixie, Relay);
suite!(nix_2_26_trixie_ssh, Trixie, Ssh);
suite!(nix_2_34_sid_relay, Sid, Relay);
suite!(nix_2_34_sid_ssh, Sid, Ssh);
