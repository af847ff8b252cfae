//! The serve protocol (`ssh://` stores and builders) with each of the three Nix client
//! generations (tests/harness/clients.rs): the host's Nix 2.8, Nix 2.26 (trixie chroot) and
//! Nix 2.34 (sid chroot). For each, a salted path goes to the server through the relay
//! (`ssh://localhost?remote-program=<nixbuild-serve>`) and back, and a salted derivation is
//! built on the server (`--max-jobs 0`) through the relay and through the SSH server with
//! the real OpenSSH client and a pinned host key. The server's log and store tell that the
//! path was registered for the account and that the builds ran there.

mod harness;

use harness::clients::{read_client_file, Client, ClientNix};
use harness::ssh::{ok, Key, SshServer};
use harness::{salt, store_uri};
use nixbuild_core::store_path::StorePath;

const ACCOUNT: &str = "alice";

/// A daemon with the SSH server on, with one ed25519 key for [`ACCOUNT`]; the relay reaches
/// the same daemon.
fn server() -> (SshServer, Key) {
    let client = tempfile::tempdir().expect("temp dir");
    let key = SshServer::key(client.path(), "id_alice", "ed25519", ACCOUNT);
    let server = SshServer::start("", client, &[&key]);
    (server, key)
}

/// Asserts that the daemon's log shows the build of `drv` for [`ACCOUNT`].
fn assert_built_on_server(server: &SshServer, drv: &str) {
    server.daemon.wait_for_log(&[
        "nixbuild::build: building ",
        &format!("account={ACCOUNT} "),
        &format!("drv={drv} "),
    ]);
}

/// Builds `<name>-<salt>` on the server through `builders` with `cmd` (a `nix-build` of
/// the client), and checks the output on the client's side and the build on the server's,
/// which came through an SSH session (a `session start` line with the peer) if `via_ssh`,
/// else through the relay.
fn build(
    nix: &ClientNix,
    server: &SshServer,
    mut cmd: std::process::Command,
    builders: &str,
    name: &str,
    via_ssh: bool,
) {
    let log_start = server.daemon.log().len();
    let salt = salt();
    let expr = nix.derivation(name, &salt, &format!("echo built {salt} > $out"));
    let drv = nix.instantiate(&expr);
    let out = ok(cmd
        .arg(&drv)
        .args(["--no-out-link", "--max-jobs", "0", "--builders", builders]));
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(path.ends_with(&format!("-{name}-{salt}")), "{path}");
    assert_eq!(
        read_client_file(nix.client, &path),
        format!("built {salt}\n"),
        "{} client",
        nix.client.name()
    );
    assert_built_on_server(server, &drv);
    let log = server.daemon.log();
    let ssh_sessions = log[log_start..]
        .lines()
        .filter(|l| l.contains(" session start ") && l.contains(" peer="))
        .count();
    assert_eq!(ssh_sessions > 0, via_ssh, "{}", &log[log_start..]);
}

fn copy_and_build(client: Client) {
    let started = std::time::Instant::now();
    let nix = ClientNix::new(client, "");
    let (server, key) = server();
    let d = &server.daemon;
    let salt = salt();

    // A salted path to the server through the relay, and back.
    let a = nix.add_file(&format!("a-{salt}"), &format!("a {salt}\n"));
    let uri = store_uri();
    ok(nix
        .relayed(d, ACCOUNT, "nix")
        .args(["copy", "--to", &uri, &a]));
    let listed = ok(nix
        .relayed(d, ACCOUNT, "nix")
        .args(["path-info", "--store", &uri, &a]));
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), a);
    ok(nix.command("nix-store").args(["--delete", &a]));
    ok(nix
        .relayed(d, ACCOUNT, "nix")
        .args(["copy", "--from", &uri, &a]));
    ok(nix.command("nix-store").args(["--verify-path", &a]));
    assert_eq!(read_client_file(client, &a), format!("a {salt}\n"));

    // Builds through the relay, and through the SSH server with a pinned host key.
    let relay_builders = format!("{uri} x86_64-linux - 100 1 big-parallel,benchmark");
    build(
        &nix,
        &server,
        nix.relayed(d, ACCOUNT, "nix-build"),
        &relay_builders,
        "relay-build",
        false,
    );
    let alias = format!("nixbuild-{}", client.name());
    let config = server.ssh_config(&alias, &key);
    let ssh_builders = format!("ssh://{alias} x86_64-linux - 100 1 big-parallel,benchmark");
    build(
        &nix,
        &server,
        nix.over_ssh(&config, "nix-build"),
        &ssh_builders,
        "ssh-build",
        true,
    );

    let stopped = server.daemon.stop();
    let sp = StorePath::from_absolute_path(a.as_bytes()).expect("store path");
    assert!(stopped.registered(ACCOUNT, &sp), "{a}:\n{}", stopped.log);
    assert!(stopped.valid(ACCOUNT, &sp));
    eprintln!(
        "{} ({}): {:.1} s",
        client.name(),
        nix.version,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn nix_2_8_host_copies_and_builds_over_ssh_stores() {
    copy_and_build(Client::Host);
}

#[test]
fn nix_2_26_trixie_copies_and_builds_over_ssh_stores() {
    copy_and_build(Client::Trixie);
}

#[test]
fn nix_2_34_sid_copies_and_builds_over_ssh_stores() {
    copy_and_build(Client::Sid);
}
