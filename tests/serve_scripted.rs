//! What no Nix 2.8 client sends to a serve 2.7 server, scripted through the relay:
//! ImportPaths and ExportPaths (Hydra and old clients), and connections from peers the
//! daemon does not trust.

mod harness;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};

use harness::{example_bin, export_stream, test_path, Daemon, Script};
use nixbuild_core::nar::NarNode;
use nixbuild_core::serve::{Opcode, Request, Response};

#[test]
fn import_paths_then_export_paths_give_back_the_same_stream() {
    let s = harness::salt();
    let dep = test_path(&format!("{s}-dep"), "dep");
    let top = test_path(&format!("{s}-top"), "top");
    let entries: Vec<_> = [
        (&dep, BTreeSet::new(), format!("dep {s}")),
        (
            &top,
            BTreeSet::from([dep.clone(), top.clone()]),
            format!("top {s} {dep}"),
        ),
    ]
    .into_iter()
    .map(|(path, refs, contents)| {
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
        (path.clone(), nar, refs)
    })
    .collect();
    let stream = export_stream(&entries);

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

/// The configuration that gives the socket to group `nogroup` (gid 65534, nobody's), so
/// that the relay run by [`relay_as_nobody`] can connect and the daemon's own check decides.
const NOGROUP_SOCKET: &str = "[relay]\nsocket_group = \"nogroup\"\n";

/// Runs the relay as uid and gid 65534 (nobody) against `daemon`. Only the test's own
/// temporary directory above the state directory is opened up: the state directory and the
/// socket keep the modes and group the daemon gave them.
fn relay_as_nobody(daemon: &Daemon, input: &[u8]) -> std::process::Output {
    let mut stdin = tempfile::tempfile().expect("temp file");
    stdin.write_all(input).expect("write stdin");
    stdin.seek(SeekFrom::Start(0)).expect("rewind");
    let state = daemon.state_dir();
    let parent = state.parent().expect("parent");
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711)).expect("chmod");
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
fn socket_is_root_only_without_socket_group() {
    let daemon = Daemon::start(&[]);
    let out = relay_as_nobody(&daemon, &Script::new().bytes);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    let sock = std::fs::metadata(daemon.state_dir().join("serve.sock")).expect("stat socket");
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, 0));
    daemon.stop();
}

#[test]
fn untrusted_peer_is_refused_and_trusted_uid_is_admitted() {
    let daemon = Daemon::start_with_config(NOGROUP_SOCKET, &[]);
    let sock = std::fs::metadata(daemon.state_dir().join("serve.sock")).expect("stat socket");
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, 65534));
    let out = relay_as_nobody(&daemon, &Script::new().bytes);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: uid 65534 (gid 65534) may not relay"),
        "{stderr}"
    );
    let stopped = daemon.stop();
    assert!(!stopped.log.contains("account=mallory"), "{}", stopped.log);

    let daemon = Daemon::start_with_config(NOGROUP_SOCKET, &["--trusted-uid", "65534"]);
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

/// A relayed session kept open: its hello is answered, and it ends when dropped.
struct HeldSession {
    child: std::process::Child,
}

impl HeldSession {
    fn open(daemon: &Daemon) -> HeldSession {
        let mut child = Command::new(example_bin("nixbuild-serve"))
            .arg("--serve")
            .env("NIXBUILD_STATE_DIR", daemon.state_dir())
            .env("NIXBUILD_ACCOUNT", "held")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn nixbuild-serve");
        let stdin = child.stdin.as_mut().expect("stdin");
        stdin.write_all(&Script::new().bytes).expect("send hello");
        let mut hello = [0u8; 16];
        child
            .stdout
            .as_mut()
            .expect("stdout")
            .read_exact(&mut hello)
            .expect("server hello");
        HeldSession { child }
    }

    /// Ends the session at a command boundary and checks that it ended cleanly.
    fn close(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("wait for nixbuild-serve");
        assert!(status.success(), "{status}");
    }
}

#[test]
fn sessions_beyond_max_sessions_are_refused() {
    let daemon = Daemon::start_with_config("[limits]\nmax_sessions = 1\n", &[]);
    let held = HeldSession::open(&daemon);
    let refused = daemon.relay("b", false, &Script::new().bytes);
    refused.assert_error("serving its maximum of 1 sessions");
    assert!(refused.stderr.contains("max_sessions"), "{refused:?}");
    held.close();
    let ok = daemon.relay("b", false, &Script::new().bytes);
    assert_eq!(ok.status, 0, "{ok:?}");
    daemon.stop();
}

#[test]
fn failed_accept_does_not_stop_the_daemon() {
    let daemon = Daemon::start(&[]);
    let held_before = HeldSession::open(&daemon);
    // A soft limit of 0 descriptors: the daemon keeps those it has, and every new one (the
    // next accept) fails with EMFILE until the limit is raised again.
    let status = Command::new("prlimit")
        .arg(format!("--pid={}", daemon.pid()))
        .arg("--nofile=0:")
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success());
    let waiting = std::thread::spawn({
        let input = Script::new().bytes;
        let state = daemon.state_dir();
        move || {
            Command::new(example_bin("nixbuild-serve"))
                .arg("--serve")
                .env("NIXBUILD_STATE_DIR", state)
                .env("NIXBUILD_ACCOUNT", "waiting")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().expect("stdin").write_all(&input)?;
                    c.wait_with_output()
                })
                .expect("run nixbuild-serve")
        }
    });
    // Bounded only to turn a hang into a failure with the log.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !daemon.log().contains("accepting a connection") {
        assert!(std::time::Instant::now() < until, "{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Raising the limit again lets the waiting connection in: it needs a descriptor for the
    // connection and two for the client's stdin and stdout that the relay passes.
    let status = Command::new("prlimit")
        .arg(format!("--pid={}", daemon.pid()))
        .arg("--nofile=1024:")
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success());
    held_before.close();
    let out = waiting.join().expect("relay thread");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.len(), 16, "no server hello");
    let stopped = daemon.stop();
    assert!(
        stopped.log.contains("retrying in 100 ms"),
        "{}",
        stopped.log
    );
}

#[test]
fn a_second_daemon_on_the_same_state_dir_fails_at_once() {
    let daemon = Daemon::start(&[]);
    let second = Command::new(example_bin("nixbuild-server"))
        .arg("--state-dir")
        .arg(daemon.state_dir())
        .output()
        .expect("run nixbuild-server");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains("already running"), "{stderr}");
    // The first daemon still serves.
    let ok = daemon.relay("a", false, &Script::new().bytes);
    assert_eq!(ok.status, 0, "{ok:?}");
    daemon.stop();
}
