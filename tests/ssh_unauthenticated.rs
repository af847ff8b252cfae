//! Issue 14, hole 5: connections that never authenticate must not lock anyone out. The test
//! holds 1,000 TCP connections to a real `nixbuild-server --listen` that send nothing or
//! only their SSH version line (most from 127.0.0.2, one each from 127.0.0.3 to
//! 127.0.0.102, so both the per-source and the overall budget of unauthenticated connections
//! are exceeded), and while it holds them an authorized client on 127.0.0.1, the real
//! OpenSSH client with the host key pinned, pings, copies and builds with the real Nix 2.8.
//! Only loopback addresses are used.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Nix;
use harness::ssh::{ok, salted_derivation, SshServer};
use nixbuild_core::store_path::StorePath;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::process::{Resource, Rlimit};

const ACCOUNT: &str = "alice@laptop";
const ATTACKS: usize = 1000;
/// The `[ssh] max_unauthenticated` of the test's server: what the attack is sized against.
const MAX_UNAUTHENTICATED: usize = 64;

/// Lets this process hold the attack's sockets and the clients' descriptors besides.
fn raise_nofile(want: u64) {
    let limit = rustix::process::getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c >= want) {
        return;
    }
    let current = match limit.maximum {
        Some(max) => want.min(max),
        None => want,
    };
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(current),
            maximum: limit.maximum,
        },
    )
    .expect("raise RLIMIT_NOFILE");
    assert!(
        current >= want,
        "RLIMIT_NOFILE's hard limit is below {want}"
    );
}

/// A TCP connection from `source` (a loopback address) to the server on 127.0.0.1.
fn connect_from(source: Ipv4Addr, port: u16) -> TcpStream {
    assert!(source.is_loopback(), "{source} is not a loopback address");
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socket");
    rustix::net::bind(&fd, &SocketAddrV4::new(source, 0))
        .unwrap_or_else(|e| panic!("bind to {source}: {e}"));
    rustix::net::connect(&fd, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("connect from {source}: {e}"));
    TcpStream::from(fd)
}

/// The attacker's `i`th source: 127.0.0.2 for nine connections in ten, else one of
/// 127.0.0.3 to 127.0.0.102 (each used once).
fn source(i: usize) -> Ipv4Addr {
    if i % 10 == 0 {
        Ipv4Addr::new(127, 0, 0, 3 + (i / 10 % 100) as u8)
    } else {
        Ipv4Addr::new(127, 0, 0, 2)
    }
}

/// How many of `held` the server still keeps open (a closed one reads end of file, after
/// the refusal line if it got one).
fn still_open(held: &mut [TcpStream]) -> usize {
    let mut open = 0;
    let mut buf = [0u8; 256];
    for tcp in held.iter_mut() {
        tcp.set_nonblocking(true).expect("non-blocking");
        loop {
            match tcp.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    open += 1;
                    break;
                }
                // Reset by the server: closed too.
                Err(_) => break,
            }
        }
    }
    open
}

/// A Nix command that reaches ssh hosts through the ssh config `config`.
fn over_ssh(nix: &Nix, config: &Path, program: &str) -> Command {
    let mut cmd = nix.command(program);
    cmd.env("NIX_SSHOPTS", format!("-F {}", config.display()));
    cmd
}

#[test]
fn held_unauthenticated_connections_never_lock_out_an_authorized_client() {
    raise_nofile(4096);
    let nix = Nix::with_conf("require-sigs = false\n");
    let salt = Nix::salt();
    let client = tempfile::tempdir().expect("temp dir");
    let key = SshServer::key(client.path(), "id_alice", "ed25519", ACCOUNT);
    // The authentication timeout is set far beyond the test, so that only the budget of
    // unauthenticated connections can let the client in, not a timeout freeing places. The
    // budgets are small enough for the attack to exceed both.
    let server = SshServer::start(
        &format!(
            "[timeouts]\nauth = 600\n[ssh]\nmax_unauthenticated = {MAX_UNAUTHENTICATED}\n\
             max_unauthenticated_per_source = 8\n"
        ),
        client,
        &[&key],
    );
    let config = server.ssh_config("nixbuild-test", &key);
    let store = "ssh://nixbuild-test";

    // The attack: 1,000 connections held open, half of them past the version line.
    let mut held = Vec::with_capacity(ATTACKS);
    for i in 0..ATTACKS {
        let mut tcp = connect_from(source(i), server.pins.port);
        if i % 2 == 1 {
            // The server may have closed it already.
            let _ = tcp.write_all(b"SSH-2.0-attacker\r\n");
        }
        held.push(tcp);
    }
    // While the attacker holds them, the authorized client pings, copies and builds. (The
    // server accepts in order: its connections come after all of the attacker's.)
    ok(over_ssh(&nix, &config, "nix").args(["store", "ping", "--store", store]));
    let file = nix.scratch().join(format!("held-{salt}"));
    std::fs::write(&file, format!("held {salt}\n")).expect("write");
    let copied = nix.run_line(
        "nix-store",
        [std::ffi::OsStr::new("--add"), file.as_os_str()],
    );
    ok(over_ssh(&nix, &config, "nix").args(["copy", "--to", store, &copied]));
    let expr = salted_derivation(&nix.scratch(), "held-build", &salt);
    let out = ok(over_ssh(&nix, &config, "nix-build").arg(&expr).args([
        "--no-out-link",
        "--max-jobs",
        "0",
        "--builders",
        "ssh://nixbuild-test x86_64-linux - 100 1 big-parallel,benchmark",
    ]));
    let built = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        std::fs::read_to_string(&built).expect("read the output"),
        format!("{salt}\n")
    );
    // The server built it, for the key's account.
    server.daemon.wait_for_log(&[
        "nixbuild::build: building ",
        &format!("account={ACCOUNT} "),
        &format!("held-build-{salt}.drv "),
    ]);
    // Both limits were hit.
    server.daemon.wait_for_log(&[
        "refused a connection",
        "(ssh.max_unauthenticated_per_source)",
    ]);
    server.daemon.wait_for_log(&[
        "evicted an unauthenticated connection",
        "(ssh.max_unauthenticated)",
    ]);
    // The server keeps at most its budget of them open.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let open = still_open(&mut held);
        if open <= MAX_UNAUTHENTICATED {
            break;
        }
        assert!(
            Instant::now() < until,
            "the server still holds {open} unauthenticated connections:\n{}",
            server.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Held by the attacker all along, whatever the server did with them.
    assert_eq!(held.len(), ATTACKS);
    drop(held);

    let stopped = server.daemon.stop();
    let copied = StorePath::from_absolute_path(copied.as_bytes()).expect("store path");
    assert!(
        stopped.registered(ACCOUNT, &copied),
        "the copy is not in the server's store:\n{}",
        stopped.log
    );
    assert!(stopped.valid(ACCOUNT, &copied));
    // Refusals and evictions each name their setting, and both were many.
    let refused = stopped
        .log
        .matches("(ssh.max_unauthenticated_per_source)")
        .count();
    let evicted = stopped
        .log
        .lines()
        .filter(|l| l.contains("evicted an unauthenticated connection"))
        .filter(|l| l.contains("(ssh.max_unauthenticated)"))
        .count();
    eprintln!("{refused} connections refused for their source, {evicted} evicted");
    assert!(refused >= 100, "{refused} refusals:\n{}", stopped.log);
    assert!(evicted >= 36, "{evicted} evictions:\n{}", stopped.log);
    // No connection of the authorized client was turned away.
    assert!(!stopped.log.contains("(ssh.max_connections)"));
}
