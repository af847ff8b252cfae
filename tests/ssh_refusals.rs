//! What the embedded SSH server refuses, and its limits, with the real OpenSSH client: each
//! refusal gives the client a clear message and is logged with its reason, and the server
//! goes on serving a session opened before.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::ssh::{assert_refused, run, Key, SshServer, SshSession};

const ALIAS: &str = "nixbuild-test";

/// A server with only alice's key allowed, started with `config`, and the OpenSSH client
/// configuration that logs in as alice under `ALIAS`.
fn alice_server(config: &str) -> (SshServer, PathBuf) {
    let client = tempfile::tempdir().expect("temp dir");
    let alice = SshServer::key(client.path(), "id_alice", "ed25519", "alice");
    let server = SshServer::start(config, client, &[&alice]);
    let config = server.ssh_config(ALIAS, &alice);
    (server, config)
}

/// Checks that `session` still answers.
fn still_serves(session: &mut SshSession) {
    let (query, len) = harness::ssh::empty_query();
    assert_eq!(session.exchange(&query, len), vec![0; len]);
}

fn ssh(config: &Path, args: &[&str]) -> std::process::Output {
    run(&mut SshServer::ssh(config, ALIAS, args))
}

/// Waits for the ssh client `child` to exit; `None` if it is still running at `limit`.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().expect("poll ssh") {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn refusals_are_clear_and_the_server_keeps_serving() {
    let client = tempfile::tempdir().expect("temp dir");
    let alice = SshServer::key(client.path(), "id_alice", "ed25519", "alice");
    let rsa = SshServer::key(client.path(), "id_rsa", "rsa", "carol");
    let unknown = SshServer::key(client.path(), "id_unknown", "ed25519", "mallory");
    let server = SshServer::start("", client, &[&alice, &rsa]);
    server
        .daemon
        .wait_for_log(&["line 2 skipped", "key type ssh-rsa is not enabled"]);
    let config = server.ssh_config(ALIAS, &alice);
    let mut open = SshSession::open(&config, ALIAS);

    // Keys: unknown, and listed but of a type not enabled.
    for (key, alias, reason) in [
        (
            &unknown,
            "unknown-host",
            "the key is not in the authorized keys file",
        ),
        (&rsa, "rsa-host", "key type ssh-rsa is not enabled"),
    ] {
        let cfg = server.ssh_config(alias, key);
        let out = run(&mut SshServer::ssh(&cfg, alias, &["nix-store", "--serve"]));
        assert_refused(&out, 255, "Permission denied (publickey)");
        server.daemon.wait_for_log(&["refused a key", reason]);
    }

    // Commands other than nix-store --serve and nix-daemon --stdio.
    for (args, needle) in [
        (&["sh"][..], "error: `sh` is not served"),
        (&["ls", "-la", "/"], "error: `ls` is not served"),
        (
            &["nix-store", "--export", "/nix/store/x"],
            "without --serve is not served",
        ),
        (
            &["nix-daemon", "--daemon"],
            "`nix-daemon` without --stdio is not served",
        ),
        (&["nix-store --serve; sh"], "no shell runs here"),
    ] {
        let out = ssh(&config, args);
        assert_refused(&out, 1, needle);
        assert_refused(&out, 1, "nix-store --serve");
        assert_refused(&out, 1, "nix-daemon --stdio");
    }
    // No command: a shell.
    assert_refused(&ssh(&config, &[]), 1, "error: no shell is served");
    // A terminal: OpenSSH closes the channel itself when -tt's terminal is refused, after
    // printing the server's message.
    let out = run(&mut SshServer::ssh_with(
        &config,
        &["-tt"],
        ALIAS,
        &["nix-store", "--serve"],
    ));
    assert!(!out.status.success());
    assert_refused(
        &out,
        out.status.code().unwrap_or(-1),
        "error: terminals are not served",
    );
    // Forwarding: stdio forwarding opens a direct-tcpip channel.
    let out = run(&mut SshServer::ssh_with(
        &config,
        &["-W", "127.0.0.1:1"],
        ALIAS,
        &[],
    ));
    assert_refused(&out, 255, "administratively prohibited");
    // Random bytes into a serve session end that session with an error only.
    let mut random = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args([ALIAS, "nix-store", "--serve", "--write"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut noise = Vec::with_capacity(1 << 16);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    while noise.len() < 1 << 16 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        noise.extend_from_slice(&state.to_le_bytes());
    }
    // The server may end the session before taking all of it.
    let _ = random.stdin.take().expect("stdin").write_all(&noise);
    let out = random.wait_with_output().expect("wait for ssh");
    assert_refused(&out, 1, "error: ");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));

    // The session opened first never noticed.
    still_serves(&mut open);
    assert_eq!(open.close().0, 0);
    let stopped = server.daemon.stop();
    for reason in [
        "refused: `sh` is not served",
        "refused: `nix-daemon` without --stdio",
        "refused a terminal (pty)",
        "refused: no shell is served",
        "refused port forwarding to 127.0.0.1:1",
        "refused: the command uses shell syntax",
    ] {
        assert!(
            stopped.log.contains(reason),
            "{reason} not logged:\n{}",
            stopped.log
        );
    }
}

/// Replaces the authorized_keys file's contents (a new file renamed into place, as editors
/// and config management do).
fn rewrite(server: &SshServer, keys: &[&Key]) {
    let lines: String = keys.iter().map(|k| format!("{}\n", k.public)).collect();
    let tmp = server.authorized_keys.with_extension("new");
    std::fs::write(&tmp, lines).expect("write");
    std::fs::rename(&tmp, &server.authorized_keys).expect("rename");
}

#[test]
fn authorized_keys_are_reread_on_change_and_sighup_without_dropping_sessions() {
    let client = tempfile::tempdir().expect("temp dir");
    let alice = SshServer::key(client.path(), "id_alice", "ed25519", "alice");
    let bob = SshServer::key(client.path(), "id_bob", "ed25519", "bob");
    let server = SshServer::start("", client, &[&alice]);
    let as_alice = server.ssh_config("alice-host", &alice);
    let as_bob = server.ssh_config("bob-host", &bob);
    let serve = |config: &Path, alias: &str| {
        let mut s = SshSession::open(config, alias);
        still_serves(&mut s);
        s.close().0
    };
    let refused = |config: &Path, alias: &str| {
        let out = run(&mut SshServer::ssh(
            config,
            alias,
            &["nix-store", "--serve"],
        ));
        assert_refused(&out, 255, "Permission denied (publickey)");
    };
    let mut open = SshSession::open(&as_alice, "alice-host");
    refused(&as_bob, "bob-host");

    // A change to the file is noticed.
    rewrite(&server, &[&alice, &bob]);
    server
        .daemon
        .wait_for_log(&["authorized keys the file changed", "keys=2"]);
    assert_eq!(serve(&as_bob, "bob-host"), 0);

    // SIGHUP re-reads it too (and does not stop the daemon).
    server.daemon.hangup();
    server
        .daemon
        .wait_for_log(&["authorized keys on SIGHUP", "keys=2"]);

    // Alice's key goes: new connections are refused, hers stays.
    rewrite(&server, &[&bob]);
    server
        .daemon
        .wait_for_log(&["authorized keys the file changed", "keys=1"]);
    refused(&as_alice, "alice-host");
    still_serves(&mut open);
    assert_eq!(open.close().0, 0);
    let stopped = server.daemon.stop();
    assert!(stopped
        .log
        .contains("refused a key: the key is not in the authorized keys file"));
}

/// Waits until the connection named (`conn=N`) by the log line with `needles` has closed:
/// until then it holds a place among its account's connections.
fn wait_closed(server: &SshServer, needles: &[&str]) {
    let line = server.daemon.wait_for_log(needles);
    let conn = line
        .split_whitespace()
        .find(|w| w.starts_with("conn="))
        .expect("a conn= field")
        .to_owned();
    server
        .daemon
        .wait_for_log(&["SSH connection closed", &format!("{conn} ")]);
}

/// With `max_connections_per_account = 1`: opens a session, checks that a second connection's
/// commands are refused, waits until the server has closed that one, and returns the first.
fn open_then_refuse_a_second(server: &SshServer, config: &Path) -> SshSession {
    let first = SshSession::open(config, ALIAS);
    let out = ssh(config, &["nix-store", "--serve", "--write"]);
    assert_refused(&out, 1, "maximum of 1 connections");
    wait_closed(
        server,
        &[
            "maximum of 1 connections",
            "its commands on this one are refused",
        ],
    );
    first
}

/// `systemctl reload`: on SIGHUP the daemon reads its configuration file again. A changed
/// limit takes effect for new connections, a changed setting that needs a restart is named
/// in the log, and a broken file changes nothing while the server goes on serving.
#[test]
fn sighup_rereads_the_configuration_and_a_broken_file_changes_nothing() {
    let (server, config) = alice_server("[ssh]\nmax_connections_per_account = 1\n");
    let mut first = open_then_refuse_a_second(&server, &config);

    // The limit raised, and a setting changed that only a restart puts in force.
    server
        .daemon
        .write_config("[ssh]\nmax_connections_per_account = 2\n[limits]\nmax_sessions = 4096\n");
    server.daemon.hangup();
    server
        .daemon
        .wait_for_log(&["configuration re-read on SIGHUP", "needs_restart=1"]);
    server.daemon.wait_for_log(&[
        "limits.max_sessions changed, which takes effect only at a restart; the running \
         value stays",
    ]);
    let mut second = SshSession::open(&config, ALIAS);
    still_serves(&mut second);

    // A broken file: the error is logged, the limit of 2 stays, and both sessions go on.
    server
        .daemon
        .write_config("[ssh]\nmax_connections_per_account = \"many\"\n");
    server.daemon.hangup();
    let refused = server
        .daemon
        .wait_for_log(&["cannot re-read the configuration on SIGHUP"]);
    assert!(
        refused.contains("nixbuild.toml") && refused.contains("TOML parse error"),
        "{refused}"
    );
    still_serves(&mut first);
    still_serves(&mut second);
    let out = ssh(&config, &["nix-store", "--serve", "--write"]);
    assert_refused(&out, 1, "maximum of 2 connections");
    assert_eq!(first.close().0, 0);
    assert_eq!(second.close().0, 0);
    let stopped = server.daemon.stop();
    assert_eq!(
        stopped
            .log
            .matches("configuration re-read on SIGHUP")
            .count(),
        2,
        "one notice for [builds], one summary:\n{}",
        stopped.log
    );
}

#[test]
fn limits_auth_timeout_idle_timeout_and_connections_per_account() {
    let client = tempfile::tempdir().expect("temp dir");
    let alice = SshServer::key(client.path(), "id_alice", "ed25519", "alice");
    let bob = SshServer::key(client.path(), "id_bob", "ed25519", "bob");
    let carol = SshServer::key(client.path(), "id_carol", "ed25519", "carol");
    let server = SshServer::start(
        "[timeouts]\nauth = 2\nidle = 3\n\
         [ssh]\nmax_connections_per_account = 1\nmax_connections = 2\n\
         max_unauthenticated_per_source = 1\n",
        client,
        &[&alice, &bob, &carol],
    );
    let config = server.ssh_config(ALIAS, &alice);
    let as_bob = server.ssh_config("bob-host", &bob);
    let as_carol = server.ssh_config("carol-host", &carol);

    // A client that sends nothing, and one that says hello and stops: both are closed after
    // the authentication timeout (bounds ten times looser than the timeout).
    for hello in [&b""[..], b"SSH-2.0-silent\r\n"] {
        let mut tcp = TcpStream::connect(("127.0.0.1", server.pins.port)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        tcp.write_all(hello).expect("send");
        let mut got = Vec::new();
        tcp.read_to_end(&mut got)
            .expect("the server closes the connection");
        assert!(got.starts_with(b"SSH-2.0-nixbuild"), "{got:?}");
    }
    server
        .daemon
        .wait_for_log(&["closed a connection: not authenticated within 2 s"]);
    server
        .daemon
        .wait_for_log(&["closing the connection: not authenticated within 2 s"]);

    // A connection with no session is closed after the idle timeout.
    let mut idle = SshServer::ssh_with(&config, &["-N"], ALIAS, &[])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh -N");
    let status = wait_bounded(&mut idle, Duration::from_secs(30));
    assert!(status.is_some(), "the idle connection stayed open");
    server
        .daemon
        .wait_for_log(&["closing the connection: no session for 3 s (timeouts.idle)"]);

    // One connection per account: a second one's commands are refused, until the first goes.
    let mut first = open_then_refuse_a_second(&server, &config);
    // Two authenticated connections in all (once the refused one is closed): a third
    // authenticates and is disconnected at once, saying why. Connections not yet
    // authenticated do not count: they have their own budget, here one per source.
    let mut second = SshSession::open(&as_bob, "bob-host");
    let mut waiting = TcpStream::connect(("127.0.0.1", server.pins.port)).expect("connect");
    waiting
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut banner = [0u8; 16];
    waiting
        .read_exact(&mut banner)
        .expect("an unauthenticated connection is served beside two authenticated ones");
    assert_eq!(&banner, b"SSH-2.0-nixbuild");
    // A second one from the same source while the first has not authenticated: closed at
    // once with a line.
    let mut tcp = TcpStream::connect(("127.0.0.1", server.pins.port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut got = Vec::new();
    tcp.read_to_end(&mut got)
        .expect("the server closes the connection");
    assert_eq!(got, b"nixbuild: too many connections, try again later\r\n");
    let refused = server
        .daemon
        .wait_for_log(&["(ssh.max_unauthenticated_per_source)"]);
    let refused_id: u64 = refused
        .split_whitespace()
        .find_map(|w| w.strip_prefix("conn="))
        .and_then(|n| n.parse().ok())
        .expect("a conn= field");
    // The waiting one goes (it was accepted just before), and its place with it.
    drop(waiting);
    server.daemon.wait_for_log(&[
        "SSH connection closed",
        &format!("conn={} ", refused_id - 1),
    ]);
    let out = run(&mut SshServer::ssh(
        &as_carol,
        "carol-host",
        &["nix-store", "--serve"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("maximum of 2 authenticated connections (ssh.max_connections)"),
        "{stderr}"
    );
    still_serves(&mut second);
    assert_eq!(second.close().0, 0);
    still_serves(&mut first);
    assert_eq!(first.close().0, 0);
    let mut again = SshSession::open(&config, ALIAS);
    still_serves(&mut again);
    assert_eq!(again.close().0, 0);
    let stopped = server.daemon.stop();
    assert!(stopped.log.contains("ssh.max_connections_per_account"));
    assert!(stopped.log.contains(
        "refused an authenticated connection: the server has its maximum of 2 authenticated \
         connections (ssh.max_connections)"
    ));
    assert!(stopped.log.contains(
        "refused a connection: 1 unauthenticated connections from 127.0.0.1 already, its \
         maximum (ssh.max_unauthenticated_per_source)"
    ));
}

#[test]
fn sigterm_lets_sessions_finish_then_cuts_off_the_rest() {
    let (server, config) = alice_server("[timeouts]\nshutdown = 3\n");
    let mut finishing = SshSession::open(&config, ALIAS);
    let lingering = SshSession::open(&config, ALIAS);
    server.daemon.terminate();

    // The listener closes at once...
    let until = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", server.pins.port)).is_ok() {
        assert!(Instant::now() < until, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... a running session goes on and ends normally ...
    still_serves(&mut finishing);
    assert_eq!(finishing.close().0, 0);
    // ... and one still open at the end of the grace period is cut off with a message.
    let (status, stderr) = lingering.wait();
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("error: the nixbuild server is shutting down; this session was cut off"),
        "{stderr}"
    );
    let stopped = server.daemon.stopped();
    assert!(stopped.log.contains("cut off a session at shutdown"));
}

/// The cipher the client says it negotiated (OpenSSH's `-v` line for server to client).
fn negotiated_cipher(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .find_map(|l| l.split("kex: server->client cipher: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
}

#[test]
fn ciphers_aes_gcm_by_default_and_as_configured() {
    // The default offers AES-256-GCM alone: OpenSSH's client, which lists ChaCha20-Poly1305
    // first, gets AES-256-GCM, and a client that wants ChaCha20 only finds no cipher.
    let (_server, config) = alice_server("");
    let mut session = SshSession::open_with(&config, ALIAS, &["-v"]);
    still_serves(&mut session);
    let (status, stderr) = session.close();
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        negotiated_cipher(&stderr),
        Some("aes256-gcm@openssh.com"),
        "{stderr}"
    );
    let out = run(&mut SshServer::ssh_with(
        &config,
        &["-o", "Ciphers=chacha20-poly1305@openssh.com"],
        ALIAS,
        &["nix-store", "--serve"],
    ));
    assert_refused(&out, 255, "no matching cipher found");

    // Configured, the server's list is what the client chooses from.
    let (_server, config) = alice_server(
        "[ssh]\nciphers = [\"aes256-gcm@openssh.com\", \"chacha20-poly1305@openssh.com\"]\n",
    );
    let mut session = SshSession::open_with(&config, ALIAS, &["-v"]);
    still_serves(&mut session);
    let (status, stderr) = session.close();
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(
        negotiated_cipher(&stderr),
        Some("chacha20-poly1305@openssh.com"),
        "{stderr}"
    );
}

/// SSH sessions hold unfinished requests against the same budget as relayed ones: with a
/// relayed session holding half of it, an SSH session growing a request is refused, naming
/// the setting, and the relayed session is untouched.
#[test]
fn ssh_and_relayed_sessions_share_the_buffer_budget() {
    const MIB: usize = 1 << 20;
    let (server, config) = alice_server(&format!(
        "[store]\nmax_request_bytes = {}\n[limits]\nmax_buffered_bytes = {}\n",
        2 * MIB,
        4 * MIB
    ));
    let s = harness::salt();
    let start = |name: &str, value_len: usize| {
        let mut bytes = harness::build_derivation_prefix(&harness::test_path(&s, name), 1);
        bytes.extend(harness::wire_str(b"k"));
        bytes.extend(harness::wire_u64(value_len as u64));
        bytes
    };
    // The relayed session holds 1.75 MiB of a 1.9 MiB value: a 2 MiB buffer, reserved.
    let mut relayed = server.daemon.open("alice", true);
    relayed.send(&harness::Script::new().bytes);
    relayed.send(&start("relayed.drv", 1900 << 10));
    relayed.send(&vec![b'v'; 1792 << 10]);
    relayed.wait_until_read();

    // The SSH session's buffer gets 1 MiB; growing to 2 MiB needs 3 MiB while it moves.
    let mut session = SshSession::open(&config, ALIAS);
    session.send(&start("ssh.drv", 1900 << 10));
    session.send(&vec![b'v'; 1792 << 10]);
    // Leaving at once: without the budget the session would end at the end of its input.
    let (status, stderr) = session.close();
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: this server already holds its maximum of {} bytes of unfinished requests",
            4 * MIB
        )) && stderr.contains("(max_buffered_bytes in [limits] of the server's configuration)"),
        "{stderr}"
    );
    // The relayed session still holds its request: it ends only when its client leaves.
    let reply = relayed.finish();
    assert!(!reply.stderr.contains("max_buffered_bytes"), "{reply:?}");
    assert!(
        reply.stderr.contains("unexpected end of input"),
        "{reply:?}"
    );
}
