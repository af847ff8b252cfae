//! What no Nix 2.8 client sends to a serve 2.7 server, scripted through the relay:
//! ImportPaths and ExportPaths (Hydra and old clients), and connections from peers the
//! daemon does not trust.

mod harness;

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use harness::{example_bin, test_path, Daemon, Script};
use nixbuild_core::nar::NarNode;
use nixbuild_core::serve::{ExportMarker, ExportTrailer, Opcode, Request, Response};

fn salt() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{nanos:x}-{:x}", std::process::id())
}

#[test]
fn import_paths_then_export_paths_give_back_the_same_stream() {
    let s = salt();
    let dep = test_path(&format!("{s}-dep"), "dep");
    let top = test_path(&format!("{s}-top"), "top");
    let mut stream = Vec::new();
    for (path, refs, contents) in [
        (&dep, BTreeSet::new(), format!("dep {s}")),
        (
            &top,
            BTreeSet::from([dep.clone(), top.clone()]),
            format!("top {s} {dep}"),
        ),
    ] {
        ExportMarker::Entry.encode(&mut stream);
        let nar = NarNode::Directory(
            [(
                b"file".to_vec(),
                NarNode::File {
                    executable: true,
                    contents: contents.into_bytes(),
                },
            )]
            .into(),
        )
        .to_nar()
        .expect("nar");
        stream.extend_from_slice(&nar);
        ExportTrailer {
            path: path.clone(),
            references: refs,
            deriver: None,
            legacy_signature: None,
        }
        .encode(&mut stream);
    }
    ExportMarker::End.encode(&mut stream);

    let daemon = Daemon::start(&[]);
    let import = Script::new().request(&Request::ImportPaths).raw(&stream);
    let reply = daemon.relay("hydra", true, &import.bytes);
    assert_eq!(reply.status, 0, "{reply:?}");
    assert_eq!(
        reply.responses(&[Opcode::ImportPaths]),
        vec![Response::Imported]
    );

    let export = Script::new().request(&Request::ExportPaths {
        sign: 0,
        paths: BTreeSet::from([top.clone(), dep.clone()]),
    });
    let reply = daemon.relay("hydra", false, &export.bytes);
    assert_eq!(reply.status, 0, "{reply:?}");
    // After the 16-byte server hello: the stream as sent, dependencies first.
    assert_eq!(&reply.stdout[16..], &stream[..]);

    let other = daemon.relay("other", false, &export.bytes);
    other.assert_error("is not valid");

    let stopped = daemon.stop();
    assert!(stopped.registered("hydra", &dep) && stopped.registered("hydra", &top));
    assert!(stopped.valid("hydra", &top) && !stopped.valid("other", &top));
}

/// Runs the relay as uid and gid 65534 (nobody) against `daemon`, whose socket is opened
/// up for the test so that the daemon's own check is what decides.
fn relay_as_nobody(daemon: &Daemon, input: &[u8]) -> std::process::Output {
    let mut stdin = tempfile::tempfile().expect("temp file");
    stdin.write_all(input).expect("write stdin");
    stdin.seek(SeekFrom::Start(0)).expect("rewind");
    let state = daemon.state_dir();
    for (p, mode) in [
        (state.parent().expect("parent").to_owned(), 0o755),
        (state.clone(), 0o755),
        (state.join("serve.sock"), 0o666),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(example_bin("nixbuild-serve"))
        .args(["--serve", "--account", "mallory", "--state-dir"])
        .arg(&state)
        .stdin(stdin)
        .output()
        .expect("run setpriv (util-linux)")
}

#[test]
fn untrusted_peer_is_refused_and_trusted_uid_is_admitted() {
    let daemon = Daemon::start(&[]);
    let out = relay_as_nobody(&daemon, &Script::new().bytes);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: uid 65534 (gid 65534) may not relay"),
        "{stderr}"
    );
    let stopped = daemon.stop();
    assert!(!stopped.log.contains("account=mallory"), "{}", stopped.log);

    let daemon = Daemon::start(&["--trusted-uid", "65534"]);
    let out = relay_as_nobody(&daemon, &Script::new().bytes);
    // Admitted: the handshake is answered, and the session ends cleanly at EOF.
    assert_eq!(out.stdout.len(), 16, "no server hello");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped = daemon.stop();
    assert!(
        stopped.log.contains("session start account=mallory"),
        "{}",
        stopped.log
    );
}
