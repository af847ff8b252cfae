//! End to end with the real Nix 2.8 client through
//! `ssh://localhost?remote-program=<nixbuild-serve>`: Nix runs the relay itself (no ssh), the
//! relay reaches a daemon started on a temporary state directory. Every path is salted for
//! the run, and the server side is checked from the daemon's log and its store.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::Nix;
use harness::closure::{self, parse_infos, Info};
use harness::{store_uri, Daemon, Script};
use nixbuild_core::nar::NarNode;
use nixbuild_core::serve::{Opcode, Request, Response};
use nixbuild_core::store_path::StorePath;

/// A Nix command whose relay reaches `d` as `account`.
fn remote(nix: &Nix, d: &Daemon, account: &str, program: &str) -> Command {
    d.point(nix.command(program), account)
}

fn nix_conf() -> Nix {
    // Paths copied from the server carry no signatures.
    Nix::with_conf("require-sigs = false\n")
}

use common::run_ok as output;

/// `nix path-info --json [-r] PATHS` locally, or on the server as `account`.
fn infos(
    nix: &Nix,
    server: Option<(&Daemon, &str)>,
    recursive: bool,
    paths: &[&str],
) -> BTreeMap<String, Info> {
    let mut cmd = match server {
        Some((d, account)) => {
            let mut c = remote(nix, d, account, "nix");
            c.args(["path-info", "--store", &store_uri()]);
            c
        }
        None => {
            let mut c = nix.command("nix");
            c.arg("path-info");
            c
        }
    };
    cmd.arg("--json");
    if recursive {
        cmd.arg("-r");
    }
    parse_infos(&output(cmd.args(paths)).stdout)
}

fn copy(nix: &Nix, d: &Daemon, account: &str, dir: &str, paths: &[&str]) {
    output(
        remote(nix, d, account, "nix")
            .args(["copy", dir, &store_uri()])
            .args(paths),
    );
}

fn delete_local(nix: &Nix, paths: &[&str]) {
    output(nix.command("nix-store").arg("--delete").args(paths));
}

fn add_local(nix: &Nix, file: &Path) -> String {
    nix.run_line(
        "nix-store",
        [std::ffi::OsStr::new("--add"), file.as_os_str()],
    )
}

#[test]
fn ping_copy_both_ways_and_path_info() {
    let nix = nix_conf();
    let salt = Nix::salt();
    let src = nix.scratch().join(format!("tree-{salt}"));
    std::fs::create_dir_all(src.join("bin")).expect("mkdir");
    std::fs::write(src.join("README"), format!("salt {salt}\n")).expect("write");
    std::fs::write(src.join("bin/run"), "#!/bin/sh\necho hi\n").expect("write");
    std::os::unix::fs::symlink("bin/run", src.join("link")).expect("symlink");
    let path = add_local(&nix, &src);
    let local = infos(&nix, None, false, &[&path]);

    let daemon = Daemon::start(&[]);
    output(remote(&nix, &daemon, "a", "nix").args(["store", "ping", "--store", &store_uri()]));
    copy(&nix, &daemon, "a", "--to", &[&path]);
    assert_eq!(infos(&nix, Some((&daemon, "a")), false, &[&path]), local);

    delete_local(&nix, &[&path]);
    copy(&nix, &daemon, "a", "--from", &[&path]);
    assert_eq!(infos(&nix, None, false, &[&path]), local);
    output(nix.command("nix-store").args(["--verify-path", &path]));
    let back = Path::new(&path);
    assert_eq!(
        std::fs::read_to_string(back.join("README")).expect("read"),
        format!("salt {salt}\n")
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).expect("link"),
        Path::new("bin/run")
    );

    let stopped = daemon.stop();
    let sp = StorePath::from_absolute_path(path.as_bytes()).expect("store path");
    assert!(stopped.registered("a", &sp), "{}", stopped.log);
    assert!(stopped.valid("a", &sp));
}

/// Imports `n` salted paths into the local store (see [`closure::import_closure`]).
fn import_closure(nix: &Nix, salt: &str, n: usize) -> Vec<StorePath> {
    let mut cmd = nix.command("nix-store");
    cmd.arg("--import");
    closure::import_closure(cmd, "", salt, n)
}

#[test]
fn closure_of_200_paths_round_trips() {
    let nix = nix_conf();
    let salt = Nix::salt();
    let paths = import_closure(&nix, &salt, 200);
    let top = paths[199].to_absolute();
    let local = infos(&nix, None, true, &[&top]);
    assert_eq!(local.len(), 200);

    let daemon = Daemon::start(&[]);
    copy(&nix, &daemon, "a", "--to", &[&top]);
    assert_eq!(infos(&nix, Some((&daemon, "a")), true, &[&top]), local);

    let all: Vec<String> = paths.iter().map(StorePath::to_absolute).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    delete_local(&nix, &all);
    assert!(infos(&nix, None, false, &all).is_empty());
    copy(&nix, &daemon, "a", "--from", &[&top]);
    assert_eq!(infos(&nix, None, true, &[&top]), local);
    output(nix.command("nix-store").arg("--verify-path").args(&all));

    let stopped = daemon.stop();
    for p in &paths {
        assert!(stopped.registered("a", p), "{p} not registered");
    }
}

/// Writes `size` bytes of salted pseudo-random data (xorshift64*) to `file`.
fn write_random(file: &Path, salt: &str, size: usize) {
    let mut state = salt.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    }) | 1;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file).expect("create"));
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(block.len());
        out.write_all(&block[..n]).expect("write");
        left -= n;
    }
    out.flush().expect("flush");
}

#[test]
fn one_gib_path_round_trips_in_small_memory() {
    const SIZE: usize = 1 << 30;
    let nix = nix_conf();
    let salt = Nix::salt();
    let file = nix.scratch().join(format!("big-{salt}"));
    write_random(&file, &salt, SIZE);
    let path = add_local(&nix, &file);
    std::fs::remove_file(&file).expect("remove the source file");
    let local = infos(&nix, None, false, &[&path]);
    assert!(local[&path].nar_size > SIZE as u64);

    let daemon = Daemon::start(&[]);
    copy(&nix, &daemon, "a", "--to", &[&path]);
    assert_eq!(infos(&nix, Some((&daemon, "a")), false, &[&path]), local);
    delete_local(&nix, &[&path]);
    copy(&nix, &daemon, "a", "--from", &[&path]);
    assert_eq!(infos(&nix, None, false, &[&path]), local);
    // Re-hashes the file Nix received against the hash recorded before the round trip.
    output(nix.command("nix-store").args(["--verify-path", &path]));

    // Neither direction held the path in memory (the target is far lower, see BENCHMARKS.md;
    // this only catches whole-path buffering).
    let peak_kib = daemon.peak_rss_kib();
    assert!(peak_kib < 512 * 1024, "daemon peak RSS {peak_kib} KiB");
    eprintln!("daemon peak RSS after the 1 GiB round trip: {peak_kib} KiB");

    let stopped = daemon.stop();
    let sp = StorePath::from_absolute_path(path.as_bytes()).expect("store path");
    assert!(stopped.registered("a", &sp), "{}", stopped.log);
    delete_local(&nix, &[&path]);
}

#[test]
fn accounts_are_isolated() {
    let nix = nix_conf();
    let salt = Nix::salt();
    let src = nix.scratch().join(format!("mine-{salt}"));
    std::fs::write(&src, format!("account a's bytes {salt}\n")).expect("write");
    let path = add_local(&nix, &src);
    let sp = StorePath::from_absolute_path(path.as_bytes()).expect("store path");
    let local = infos(&nix, None, false, &[&path]);

    let daemon = Daemon::start(&[]);
    copy(&nix, &daemon, "a", "--to", &[&path]);
    delete_local(&nix, &[&path]);

    // QueryPathInfos, through Nix: b does not see it.
    assert!(infos(&nix, Some((&daemon, "b")), false, &[&path]).is_empty());
    // Fetching through Nix: b cannot. Nix first asks which of the paths the remote has and
    // stops at the empty answer, so DumpStorePath is not reached here; the scripted
    // requests below send it.
    let fetch = remote(&nix, &daemon, "b", "nix")
        .args(["copy", "--from", &store_uri(), &path])
        .output()
        .expect("nix copy");
    let stderr = String::from_utf8_lossy(&fetch.stderr);
    assert!(!fetch.status.success(), "b fetched a's path");
    assert!(
        stderr.contains(&format!(
            "path '{path}' is required, but there is no substituter that can build it"
        )),
        "{stderr}"
    );
    // The same three requests, scripted.
    let one = BTreeSet::from([sp.clone()]);
    let script = Script::new()
        .request(&Request::QueryValidPaths {
            lock: false,
            substitute: false,
            paths: one.clone(),
        })
        .request(&Request::QueryPathInfos { paths: one.clone() });
    let reply = daemon.relay("b", false, &script.bytes);
    assert_eq!(
        reply.responses(&script.ops),
        vec![
            Response::ValidPaths(BTreeSet::new()),
            Response::PathInfos(BTreeMap::new())
        ]
    );
    let dump = Script::new().request(&Request::DumpStorePath { path: sp.clone() });
    daemon
        .relay("b", false, &dump.bytes)
        .assert_error("is not valid for account \"b\"");

    // c claims the path with a's NAR hash and size but sends other bytes of that size.
    let honest = format!("account a's bytes {salt}\n");
    let other: String = honest.chars().rev().collect();
    assert_eq!(other.len(), honest.len());
    let nar = NarNode::File {
        executable: false,
        contents: other.into_bytes(),
    }
    .to_nar()
    .expect("nar");
    let claimed = &local[&path];
    assert_eq!(nar.len() as u64, claimed.nar_size);
    let hash = nixbuild_core::hash::Hash::parse_any(&claimed.nar_hash, None).expect("narHash");
    let lie = Script::new().add(&sp, &nar, hash, claimed.nar_size);
    daemon
        .relay("c", true, &lie.bytes)
        .assert_error("NAR hash mismatch");
    let check = Script::new().request(&Request::QueryValidPaths {
        lock: false,
        substitute: false,
        paths: one,
    });
    let reply = daemon.relay("c", false, &check.bytes);
    assert_eq!(
        reply.responses(&[Opcode::QueryValidPaths]),
        vec![Response::ValidPaths(BTreeSet::new())]
    );

    // a still has it, with its own bytes.
    copy(&nix, &daemon, "a", "--from", &[&path]);
    assert_eq!(infos(&nix, None, false, &[&path]), local);

    let stopped = daemon.stop();
    assert!(stopped.valid("a", &sp));
    assert!(!stopped.valid("b", &sp));
    assert!(!stopped.valid("c", &sp));
    assert!(stopped.registered("a", &sp));
    assert!(!stopped.registered("c", &sp));
}
