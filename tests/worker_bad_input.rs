//! The worker protocol (ssh-ng) through the relay (`nixbuild-serve --stdio`), with scripted
//! client bytes: the twins of the serve protocol's bad-input cases. Each bad session gets a
//! clear error on the log channel, registers nothing, leaves the store consistent (checked
//! when the daemon stops), and the daemon goes on serving; an operation a shared server does
//! not allow is refused and the session goes on; an account never sees another's paths.
// A panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

mod harness;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use harness::ssh::SshServer;
use harness::worker::{info, multiple, run, run_ssh, Answer, Script, V};
use harness::{example_bin, file_nar, salt, sha256, test_path, Daemon};
use nixbuild_core::serve::BuildStatus;
use nixbuild_core::store_path::StorePath;
use nixbuild_core::worker::request::AddToStoreForm;
use nixbuild_core::worker::{Opcode, Request, Response, WorkerVersion};

/// Checks that `path` is not registered for anyone after `script` fails with `needle`, and
/// that the daemon still serves account `a`.
fn check_bad(daemon: &Daemon, script: Script, needle: &str, path: &StorePath) {
    run(daemon, "a", &script).assert_fatal(needle);
    let next = run(
        daemon,
        "a",
        &Script::new(V).request(&Request::IsValidPath(path.clone())),
    );
    assert_eq!(next.status, 0, "{next:?}");
    assert!(
        matches!(next.answers[..], [Answer::Ok(Some(Response::Int(0)))]),
        "{next:?}"
    );
}

#[test]
fn bad_sessions_end_with_a_clear_error_register_nothing_and_leave_others_served() {
    let daemon = Daemon::start(&[]);
    let s = salt();
    let path = test_path(&s, "worker-bad");
    let nar = file_nar(s.as_bytes());

    // (The handshake's bad inputs are in worker_abuse.rs.)
    // An unknown operation.
    check_bad(
        &daemon,
        Script::new(V).raw(&99u64.to_le_bytes()),
        "invalid operation 99",
        &path,
    );

    // A NAR whose hash is not the claimed one; one cut short; one longer than claimed.
    let lie = sha256(b"other bytes");
    check_bad(
        &daemon,
        Script::new(V).add(&path, &nar, lie),
        "NAR hash mismatch",
        &path,
    );
    let mut short = Script::new(V).add(&path, &nar, sha256(&nar));
    short.bytes.truncate(short.bytes.len() - 20);
    check_bad(&daemon, short, "unexpected end of input", &path);
    let mut long = nar.clone();
    long.extend_from_slice(&[0; 8]);
    let script = Script::new(V)
        .request(&Request::AddToStoreNar {
            info: Box::new(info(&path, &nar, sha256(&nar))),
            repair: false,
            dont_check_sigs: false,
        })
        .framed(&long);
    check_bad(&daemon, script, "goes on after narSize", &path);

    // AddMultipleToStore: a lying path, a stream cut in a NAR, data after the last path.
    let stream = multiple(&[(&path, &nar, lie)]);
    let script = Script::new(V)
        .request(&Request::AddMultipleToStore {
            repair: false,
            dont_check_sigs: true,
        })
        .framed(&stream);
    check_bad(&daemon, script, "NAR hash mismatch", &path);
    let stream = multiple(&[(&path, &nar, sha256(&nar))]);
    let mut cut = (stream.len() as u64).to_le_bytes().to_vec();
    cut.extend_from_slice(&stream[..stream.len() - 10]);
    let script = Script::new(V)
        .request(&Request::AddMultipleToStore {
            repair: false,
            dont_check_sigs: true,
        })
        .raw(&cut);
    check_bad(&daemon, script, "unexpected end of input", &path);
    // Data after the last path: each path of the stream is registered whole as it arrives
    // (as Nix's daemon does), so only the error is checked, on a path of its own.
    let whole = test_path(&s, "worker-whole");
    let mut trailing = multiple(&[(&whole, &nar, sha256(&nar))]);
    trailing.extend_from_slice(b"garbage!");
    let script = Script::new(V)
        .request(&Request::AddMultipleToStore {
            repair: false,
            dont_check_sigs: true,
        })
        .framed(&trailing);
    run(&daemon, "a", &script).assert_fatal("data after the last path");

    // A 16 MiB "path": refused at its length prefix, long before its bytes would arrive.
    let mut huge = Opcode::IsValidPath.to_wire().to_le_bytes().to_vec();
    huge.extend_from_slice(&(16u64 << 20).to_le_bytes());
    check_bad(&daemon, Script::new(V).raw(&huge), "path", &path);

    // More paths than a request may name.
    let mut many = Opcode::QueryValidPaths.to_wire().to_le_bytes().to_vec();
    many.extend_from_slice(&(1u64 << 40).to_le_bytes());
    check_bad(
        &daemon,
        Script::new(V).raw(&many),
        "max_paths_per_request",
        &path,
    );

    let stopped = daemon.stop();
    assert!(!stopped.valid("a", &path));
    assert!(!stopped.registered("a", &path), "{}", stopped.log);
}

#[test]
fn refused_operations_are_errors_the_session_survives() {
    let daemon = Daemon::start(&[]);
    let s = salt();
    let path = test_path(&s, "worker-refused");
    let nar = file_nar(s.as_bytes());
    let refused = [
        (
            Request::CollectGarbage {
                action: 2,
                paths: BTreeSet::new(),
                ignore_liveness: 1,
                max_freed: u64::MAX,
            },
            "garbage collection",
        ),
        (Request::OptimiseStore, "optimising"),
        (
            Request::VerifyStore {
                check_contents: true,
                repair: true,
            },
            "repair",
        ),
        (
            Request::RegisterDrvOutput(vec!["{}".into()]),
            "content-addressed",
        ),
        (
            Request::AddSignatures {
                path: path.clone(),
                sigs: BTreeSet::from(["k:c2ln".into()]),
            },
            "not valid",
        ),
        (Request::EnsurePath(path.clone()), "not valid"),
        (Request::NarFromPath(path.clone()), "not valid"),
    ];
    let mut script = Script::new(V);
    for (req, _) in &refused {
        script = script.request(req);
    }
    // An AddBuildLog whose data is taken, then refused.
    script = script
        .request(&Request::AddBuildLog(test_path(&s, "x.drv")))
        .framed(b"a log\n");
    // The session goes on: an upload and a query after all of them are answered.
    script = script
        .add(&path, &nar, sha256(&nar))
        .request(&Request::IsValidPath(path.clone()));
    let t = run(&daemon, "a", &script);
    assert_eq!(t.status, 0, "{t:?}");
    let needles: Vec<&str> = refused
        .iter()
        .map(|(_, n)| *n)
        .chain(["build logs"])
        .collect();
    assert_eq!(t.answers.len(), needles.len() + 2, "{t:?}");
    for (answer, needle) in t.answers.iter().zip(&needles) {
        match answer {
            Answer::Error(msg) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
            Answer::Ok(r) => panic!("{needle}: answered {r:?}"),
        }
    }
    assert!(
        Answer::added_then_valid(&t.answers[needles.len()..]),
        "{t:?}"
    );
}

#[test]
fn an_account_sees_none_of_anothers_paths_over_ssh_ng() {
    let daemon = Daemon::start(&[]);
    let s = salt();
    let path = test_path(&s, "worker-private");
    let nar = file_nar(s.as_bytes());
    let t = run(
        &daemon,
        "alice",
        &Script::new(V).add(&path, &nar, sha256(&nar)),
    );
    assert_eq!(t.status, 0, "{t:?}");
    let probes = Script::new(V)
        .request(&Request::IsValidPath(path.clone()))
        .request(&Request::QueryValidPaths {
            paths: BTreeSet::from([path.clone()]),
            substitute: true,
        })
        .request(&Request::QueryPathInfo(path.clone()))
        .request(&Request::NarFromPath(path.clone()))
        .request(&Request::QueryMissing(vec![
            nixbuild_core::worker::DerivedPath::Opaque(path.clone()),
        ]))
        .request(&Request::BuildPathsWithResults {
            paths: vec![nixbuild_core::worker::DerivedPath::Opaque(path.clone())],
            mode: nixbuild_core::worker::BuildMode::Normal,
        })
        .request(&Request::QueryPathFromHashPart(path.hash_part().to_owned()))
        .request(&Request::QueryAllValidPaths)
        .request(&Request::AddSignatures {
            path: path.clone(),
            sigs: BTreeSet::from(["bob:c2ln".to_owned()]),
        });
    let t = run(&daemon, "bob", &probes);
    assert_eq!(t.status, 0, "{t:?}");
    match &t.answers[..] {
        [Answer::Ok(Some(Response::Int(0))), Answer::Ok(Some(Response::Paths(valid))), Answer::Ok(Some(Response::PathInfo(None))), Answer::Error(nar), Answer::Ok(Some(Response::Missing(missing))), Answer::Ok(Some(Response::BuildResults(results))), Answer::Ok(Some(Response::OptPath(None))), Answer::Ok(Some(Response::Paths(all))), Answer::Error(sigs)] =>
        {
            assert!(valid.is_empty());
            assert!(nar.contains("is not valid"), "{nar}");
            assert!(missing.unknown.contains(&path));
            assert_ne!(results[0].1.status, BuildStatus::AlreadyValid);
            assert!(all.is_empty(), "{all:?}");
            assert!(sigs.contains("is not valid"), "{sigs}");
        }
        other => panic!("{other:?}"),
    }
    // Alice sees it, registered just now, finds it by its hash part and in her list, signs
    // it, and gets her bytes back.
    let alice_sig = BTreeSet::from(["alice:c2ln".to_owned()]);
    let t = run(
        &daemon,
        "alice",
        &Script::new(V)
            .request(&Request::QueryPathFromHashPart(path.hash_part().to_owned()))
            .request(&Request::QueryAllValidPaths)
            .request(&Request::AddSignatures {
                path: path.clone(),
                sigs: alice_sig.clone(),
            })
            .request(&Request::QueryPathInfo(path.clone()))
            .request(&Request::NarFromPath(path.clone())),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    match &t.answers[..] {
        [Answer::Ok(Some(Response::OptPath(Some(found)))), Answer::Ok(Some(Response::Paths(all))), Answer::Ok(Some(Response::Int(1))), Answer::Ok(Some(Response::PathInfo(Some(info)))), Answer::Ok(None)] =>
        {
            assert_eq!(found, &path);
            assert_eq!(all, &BTreeSet::from([path.clone()]));
            assert_eq!(info.nar_hash, sha256(&nar));
            assert_eq!(info.sigs, alice_sig);
            assert!(now - info.registration_time < 600, "{info:?}");
        }
        other => panic!("{other:?}"),
    }
    // Bob uploads the same bytes: his view of the path has none of alice's signatures.
    let t = run(
        &daemon,
        "bob",
        &Script::new(V)
            .add(&path, &nar, sha256(&nar))
            .request(&Request::QueryPathInfo(path.clone())),
    );
    match &t.answers[..] {
        [Answer::Ok(Some(Response::Nothing)), Answer::Ok(Some(Response::PathInfo(Some(info))))] => {
            assert!(info.sigs.is_empty(), "{info:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn nix_2_3_uploads_through_stderr_read() {
    // Protocol 1.21 tunnels AddToStoreNar's NAR: the server asks with STDERR_READ for up to
    // 64 KiB at a time and the client answers each with a string. The NAR is smaller than
    // one request, so the client can send its one answer ahead.
    let daemon = Daemon::start(&[]);
    let s = salt();
    let path = test_path(&s, "worker-tunnel");
    let nar = file_nar(s.as_bytes());
    let mut answer = (nar.len() as u64).to_le_bytes().to_vec();
    answer.extend_from_slice(&nar);
    answer.resize(8 + nar.len().next_multiple_of(8), 0);
    let script = Script::new(WorkerVersion::V1_21)
        .request(&Request::AddToStoreNar {
            info: Box::new(info(&path, &nar, sha256(&nar))),
            repair: false,
            dont_check_sigs: false,
        })
        .raw(&answer)
        .request(&Request::IsValidPath(path.clone()));
    let t = run(&daemon, "a", &script);
    assert_eq!(t.status, 0, "{t:?}");
    assert!(Answer::added_then_valid(&t.answers[..]), "{t:?}");
    let stopped = daemon.stop();
    assert!(stopped.valid("a", &path));
}

#[test]
fn add_to_store_and_add_text_to_store_add_what_nix_would() {
    // The paths Nix 2.8 gives the same contents: `builtins.toFile "hello" "hello\n"`, and
    // `nix-store --add-fixed sha256` of a file holding "data".
    let text = "/nix/store/nmrmdcw1bfnl35a893n7nyhw4xa5vy08-hello";
    let flat = "/nix/store/n3mpf1s5i35d5g4dc4blhcbs5x1d9cfd-data";
    let daemon = Daemon::start(&[]);
    let addressed = |method, name: &str| Request::AddToStore {
        name: name.into(),
        form: AddToStoreForm::Addressed {
            method,
            algo: nixbuild_core::hash::HashAlgo::Sha256,
            references: BTreeSet::new(),
            repair: false,
        },
    };
    use nixbuild_core::content_address::ContentAddressMethod::{Flat, Text};
    // 1.34 (Nix 2.8): AddToStore with a framed dump, answered with the path and its info.
    let script = Script::new(V)
        .request(&addressed(Text, "hello"))
        .framed(b"hello\n")
        .request(&addressed(Flat, "data"))
        .framed(b"data");
    let t = run(&daemon, "a", &script);
    assert_eq!(t.status, 0, "{t:?}");
    let paths: Vec<String> = t
        .answers
        .iter()
        .map(|a| match a {
            Answer::Ok(Some(Response::Added {
                path,
                info: Some(info),
            })) => {
                assert!(info.ca.is_some());
                path.to_absolute()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(paths, [text, flat]);
    // 1.21 (Nix 2.3): AddTextToStore, and the legacy AddToStore with a raw NAR.
    let script = Script::new(WorkerVersion::V1_21)
        .request(&Request::AddTextToStore {
            name: "hello".into(),
            text: b"hello\n".to_vec(),
            references: BTreeSet::new(),
        })
        .request(&Request::AddToStore {
            name: "data".into(),
            form: AddToStoreForm::Legacy {
                fixed: 1,
                recursive: false,
                algo: nixbuild_core::hash::HashAlgo::Sha256,
            },
        })
        .raw(&file_nar(b"data"));
    let t = run(&daemon, "b", &script);
    assert_eq!(t.status, 0, "{t:?}");
    let paths: Vec<String> = t
        .answers
        .iter()
        .map(|a| match a {
            Answer::Ok(Some(Response::Added { path, info: None })) => path.to_absolute(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(paths, [text, flat]);
    let stopped = daemon.stop();
    for account in ["a", "b"] {
        for p in [text, flat] {
            let p = StorePath::from_absolute_path(p.as_bytes()).unwrap();
            assert!(stopped.valid(account, &p), "{account} {p}");
        }
    }
}

/// Hostile sessions over SSH (the real OpenSSH client running `nix-daemon --stdio`) while
/// another account uploads and queries: each hostile session ends with its error and
/// registers nothing, and the other account's sessions all succeed meanwhile.
#[test]
fn bad_sessions_over_ssh_leave_a_bystander_served() {
    let client = tempfile::tempdir().unwrap();
    let key_a = SshServer::key(client.path(), "id_a", "ed25519", "a");
    let key_good = SshServer::key(client.path(), "id_good", "ed25519", "good");
    let server = SshServer::start("", client, &[&key_a, &key_good]);
    let config_a = server.ssh_config("ng-bad", &key_a);
    let config_good = server.ssh_config("ng-good", &key_good);
    let s = salt();
    let bad = test_path(&s, "worker-ssh-bad");
    let nar = file_nar(s.as_bytes());
    let lie = sha256(b"other bytes");
    let cases: Vec<(Script, &str)> = vec![
        (
            Script::new(V).raw(&99u64.to_le_bytes()),
            "invalid operation 99",
        ),
        (Script::new(V).add(&bad, &nar, lie), "NAR hash mismatch"),
        (
            Script::new(V)
                .request(&Request::AddMultipleToStore {
                    repair: false,
                    dont_check_sigs: true,
                })
                .framed(&multiple(&[(&bad, &nar, lie)])),
            "NAR hash mismatch",
        ),
        (
            Script::new(WorkerVersion::V1_38)
                .raw(&Opcode::QueryValidPaths.to_wire().to_le_bytes())
                .raw(&(1u64 << 40).to_le_bytes()),
            "max_paths_per_request",
        ),
    ];
    std::thread::scope(|scope| {
        let hostile = scope.spawn(|| {
            for (script, needle) in &cases {
                run_ssh(&config_a, "ng-bad", script).assert_fatal(needle);
            }
        });
        for i in 0..10 {
            let path = test_path(&format!("{s}-{i}"), "worker-ssh-good");
            let nar = file_nar(format!("{s} {i}").as_bytes());
            let script = Script::new(V)
                .add(&path, &nar, sha256(&nar))
                .request(&Request::IsValidPath(path.clone()));
            let t = run_ssh(&config_good, "ng-good", &script);
            assert_eq!(t.status, 0, "{t:?}");
            assert!(Answer::added_then_valid(&t.answers[..]), "{t:?}");
        }
        hostile.join().unwrap();
    });
    let stopped = server.daemon.stop();
    assert!(!stopped.registered("a", &bad), "{}", stopped.log);
}

/// Unfinished requests of ssh-ng sessions are held against the same budget as the serve
/// protocol's (`[limits] max_buffered_bytes`), and AddToStore's dump against the request cap:
/// sessions past either end with an error naming the setting, and the daemon's memory stays
/// near the budget.
#[test]
fn unfinished_ssh_ng_requests_share_the_memory_budget() {
    const MIB: usize = 1 << 20;
    const BUDGET: usize = 32 * MIB;
    const REQUEST: usize = 8 * MIB;
    const SESSIONS: usize = 16;
    // Not the budget's: the sessions' pool buffers and what the allocator keeps.
    const SLACK: usize = 48 * MIB;
    let daemon = Daemon::start_with_config(
        &format!(
            "[store]\nmax_request_bytes = {REQUEST}\n[limits]\nmax_buffered_bytes = {BUDGET}\n"
        ),
        &[],
    );
    let s = salt();
    let pid = daemon.pid();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap();
        line.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<usize>()
            .unwrap()
    };
    let baseline_kib = rss();
    // A BuildDerivation whose environment has 16 values of 1 MiB: twice the request cap,
    // sent in two halves by every session at once.
    let mut prefix = Script::new(V).bytes;
    prefix.extend(Opcode::BuildDerivation.to_wire().to_le_bytes());
    let drv = test_path(&s, "big.drv");
    let wire = |b: &[u8]| {
        let mut v = (b.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(b);
        v.resize(8 + b.len().next_multiple_of(8), 0);
        v
    };
    prefix.extend(wire(drv.to_absolute().as_bytes()));
    for n in [0u64, 0] {
        prefix.extend(n.to_le_bytes()); // no outputs, no inputSrcs
    }
    prefix.extend(wire(b"x86_64-linux"));
    prefix.extend(wire(b"/bin/sh"));
    prefix.extend(0u64.to_le_bytes()); // no args
    prefix.extend(16u64.to_le_bytes()); // 16 environment pairs
    let value = wire(&vec![b'v'; MIB]);
    let pair = |i: usize| [wire(format!("k{i:02}").as_bytes()), value.clone()].concat();
    let spawn = || {
        Command::new(example_bin("nixbuild-serve"))
            .arg("--stdio")
            .env("NIXBUILD_STATE_DIR", daemon.state_dir())
            .env("NIXBUILD_ACCOUNT", "a")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut children: Vec<_> = (0..SESSIONS).map(|_| spawn()).collect();
    let stderrs: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = children
            .iter_mut()
            .map(|child| {
                let mut stdin = child.stdin.take().unwrap();
                let (prefix, pair) = (&prefix, &pair);
                scope.spawn(move || {
                    let _ = stdin.write_all(prefix);
                    for i in 0..16 {
                        if stdin.write_all(&pair(i)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        children
            .drain(..)
            .map(|c| String::from_utf8_lossy(&c.wait_with_output().unwrap().stderr).into_owned())
            .collect()
    });
    let over_budget = stderrs
        .iter()
        .filter(|e| e.contains("max_buffered_bytes in [limits]"))
        .count();
    for e in &stderrs {
        assert!(
            e.contains("max_buffered_bytes in [limits]")
                || e.contains("max_request_bytes in [store]"),
            "{e}"
        );
    }
    assert!(over_budget > 0, "no session met the budget: {stderrs:?}");
    let grown_mib = daemon.peak_rss_kib().saturating_sub(baseline_kib as u64) / 1024;
    eprintln!("{over_budget} of {SESSIONS} sessions over the budget; peak RSS {grown_mib} MiB above the baseline");
    assert!(
        grown_mib as usize <= (BUDGET + SLACK) / MIB,
        "grew by {grown_mib} MiB"
    );

    // An AddToStore dump larger than the request cap ends its session, naming the cap.
    let big = vec![b'd'; REQUEST + 1];
    let script = Script::new(V)
        .request(&Request::AddToStore {
            name: "big".into(),
            form: AddToStoreForm::Addressed {
                method: nixbuild_core::content_address::ContentAddressMethod::Flat,
                algo: nixbuild_core::hash::HashAlgo::Sha256,
                references: BTreeSet::new(),
                repair: false,
            },
        })
        .framed(&big);
    run(&daemon, "a", &script).assert_fatal("max_request_bytes in [store]");
    daemon.stop();
}

/// The timeouts and the per-account session limit hold ssh-ng sessions as they hold serve
/// sessions: a client that stops in the handshake or between requests is cut off with an
/// error naming the timeout, and a session past the account's limit is refused while the
/// account's other sessions and other accounts go on.
#[test]
fn timeouts_and_session_limits_hold_ssh_ng_sessions() {
    let daemon = Daemon::start_with_config(
        "[timeouts]\nhandshake = 1\nidle = 1\n[limits]\nmax_sessions_per_account = 2\n",
        &[],
    );
    let open = |account: &str| {
        Command::new(example_bin("nixbuild-serve"))
            .arg("--stdio")
            .env("NIXBUILD_STATE_DIR", daemon.state_dir())
            .env("NIXBUILD_ACCOUNT", account)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let stderr_of = |mut child: std::process::Child| {
        // The client stays, silent: its stdin is closed only after the session ended.
        let stdin = child.stdin.take();
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        assert_ne!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Half a handshake, then silence.
    let mut half = open("a");
    half.stdin
        .as_mut()
        .unwrap()
        .write_all(&0x6e69_7863u64.to_le_bytes())
        .unwrap();
    // A whole handshake, then silence.
    let mut idle = open("a");
    idle.stdin
        .as_mut()
        .unwrap()
        .write_all(&Script::new(V).bytes)
        .unwrap();
    // Both places of account a are taken (once the daemon has admitted both)...
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while daemon
        .log()
        .matches("session start account=a write=true protocol=\"daemon\"")
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < until, "{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // ...so a third session is refused at once...
    let third = run(&daemon, "a", &Script::new(V));
    assert!(
        third.stderr.contains("account a already has 2 sessions"),
        "{third:?}"
    );
    // ...while account b is served.
    let b = run(&daemon, "b", &Script::new(V).request(&Request::SyncWithGC));
    assert!(
        matches!(b.answers[..], [Answer::Ok(Some(Response::Int(1)))]),
        "{b:?}"
    );
    let half = stderr_of(half);
    assert!(
        half.contains("timed out after 1 s waiting for the client to complete the handshake"),
        "{half}"
    );
    let idle = stderr_of(idle);
    assert!(
        idle.contains("timed out after 1 s waiting for the client to send more"),
        "{idle}"
    );
    // The places are free again.
    let again = run(&daemon, "a", &Script::new(V).request(&Request::SyncWithGC));
    assert_eq!(again.status, 0, "{again:?}");
    daemon.stop();
}

/// QueryReferrers answers from the account's own view: alice's path that refers to a path
/// bob also has is not among bob's referrers.
#[test]
fn referrers_come_from_the_accounts_own_view() {
    let daemon = Daemon::start(&[]);
    let s = salt();
    let dep = test_path(&s, "worker-dep");
    let dep_nar = file_nar(s.as_bytes());
    let user = test_path(&s, "worker-user");
    let user_nar = file_nar(format!("{s} {dep}").as_bytes());
    let mut user_info = info(&user, &user_nar, sha256(&user_nar));
    user_info.references = BTreeSet::from([dep.clone()]);
    let script = Script::new(V)
        .add(&dep, &dep_nar, sha256(&dep_nar))
        .request(&Request::AddToStoreNar {
            info: Box::new(user_info),
            repair: false,
            dont_check_sigs: false,
        })
        .framed(&user_nar)
        .request(&Request::QueryReferrers(dep.clone()))
        .request(&Request::QueryReferrers(user.clone()));
    let t = run(&daemon, "alice", &script);
    match &t.answers[..] {
        [Answer::Ok(Some(Response::Nothing)), Answer::Ok(Some(Response::Nothing)), Answer::Ok(Some(Response::Paths(of_dep))), Answer::Ok(Some(Response::Paths(of_user)))] =>
        {
            assert_eq!(of_dep, &BTreeSet::from([user.clone()]));
            assert!(of_user.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let script = Script::new(V)
        .add(&dep, &dep_nar, sha256(&dep_nar))
        .request(&Request::QueryReferrers(dep.clone()));
    let t = run(&daemon, "bob", &script);
    match &t.answers[..] {
        [Answer::Ok(Some(Response::Nothing)), Answer::Ok(Some(Response::Paths(of_dep)))] => {
            assert!(of_dep.is_empty(), "{of_dep:?}")
        }
        other => panic!("{other:?}"),
    }
    daemon.stop();
}
