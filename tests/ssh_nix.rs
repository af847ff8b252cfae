//! End to end over the embedded SSH server, with the real OpenSSH client and the real Nix 2.8:
//! the daemon listens on a free port of 127.0.0.1, the test writes an ssh config (alias,
//! port, identity, `StrictHostKeyChecking yes`, the printed known_hosts line) and hands it to
//! Nix with `NIX_SSHOPTS=-F <config>`. Paths are salted for the run; the server side is
//! checked from the daemon's log and store.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;
mod lab;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use common::Nix;
use harness::ssh::{ok, run, salted_derivation, Key, SshServer, SshSession};
use lab::{assert_built_once, lines, Lab};
use nixbuild_core::store_path::StorePath;

const ACCOUNT: &str = "alice@laptop";

fn nix_conf() -> Nix {
    // Paths copied from the server carry no signatures.
    Nix::with_conf("require-sigs = false\n")
}

/// A server with one ed25519 key for [`ACCOUNT`].
fn server() -> (SshServer, Key) {
    server_with("")
}

/// Like [`server`], with `config` (TOML) as the configuration.
fn server_with(config: &str) -> (SshServer, Key) {
    let client = tempfile::tempdir().expect("temp dir");
    let key = SshServer::key(client.path(), "id_alice", "ed25519", ACCOUNT);
    let server = SshServer::start(config, client, &[&key]);
    (server, key)
}

/// A Nix command that reaches ssh hosts through the ssh config `config`.
fn over_ssh(nix: &Nix, config: &Path, program: &str) -> Command {
    let mut cmd = nix.command(program);
    cmd.env("NIX_SSHOPTS", format!("-F {}", config.display()));
    cmd
}

fn add_local(nix: &Nix, name: &str, contents: &str) -> String {
    let file = nix.scratch().join(name);
    std::fs::write(&file, contents).expect("write");
    nix.run_line(
        "nix-store",
        [std::ffi::OsStr::new("--add"), file.as_os_str()],
    )
}

fn store_path(path: &str) -> StorePath {
    StorePath::from_absolute_path(path.as_bytes()).expect("store path")
}

/// Asserts that ssh said nothing about host keys (no warning, no prompt, no failure).
fn assert_no_host_key_warning(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    for bad in ["warning", "host key", "known hosts"] {
        assert!(!stderr.contains(bad), "ssh complained ({bad}): {stderr}");
    }
}

#[test]
fn ping_copy_and_copy_closure_over_ssh() {
    let nix = nix_conf();
    let salt = Nix::salt();
    let (server, key) = server();
    let config = server.ssh_config("nixbuild-test", &key);
    let store = "ssh://nixbuild-test";

    let ping = ok(over_ssh(&nix, &config, "nix").args(["store", "ping", "--store", store]));
    assert_no_host_key_warning(&ping);

    // nix copy both ways.
    let a = add_local(&nix, &format!("a-{salt}"), &format!("a {salt}\n"));
    ok(over_ssh(&nix, &config, "nix").args(["copy", "--to", store, &a]));
    let listed = ok(over_ssh(&nix, &config, "nix").args(["path-info", "--store", store, &a]));
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), a);
    ok(nix.command("nix-store").args(["--delete", &a]));
    ok(over_ssh(&nix, &config, "nix").args(["copy", "--from", store, &a]));
    ok(nix.command("nix-store").args(["--verify-path", &a]));
    assert_eq!(
        std::fs::read_to_string(&a).expect("read"),
        format!("a {salt}\n")
    );

    // nix-copy-closure both ways.
    let b = add_local(&nix, &format!("b-{salt}"), &format!("b {salt}\n"));
    ok(over_ssh(&nix, &config, "nix-copy-closure").args(["--to", "nixbuild-test", &b]));
    ok(nix.command("nix-store").args(["--delete", &b]));
    ok(over_ssh(&nix, &config, "nix-copy-closure").args(["--from", "nixbuild-test", &b]));
    ok(nix.command("nix-store").args(["--verify-path", &b]));

    let stopped = server.daemon.stop();
    for p in [&a, &b] {
        let sp = store_path(p);
        assert!(stopped.registered(ACCOUNT, &sp), "{p}:\n{}", stopped.log);
        assert!(stopped.valid(ACCOUNT, &sp));
    }
    assert!(stopped.log.contains(&format!("account={ACCOUNT} user=")));
}

#[test]
fn machines_file_host_key_with_host_key_alias() {
    let nix = nix_conf();
    let (server, key) = server();
    // No known_hosts file at all: the base64 key Nix is given is the only pin.
    let config = server.ssh_config_for_machines("nixbuild-m", &key);
    let with_key = |b64: &str| format!("ssh://nixbuild-m?base64-ssh-public-host-key={b64}");

    let ping = ok(over_ssh(&nix, &config, "nix").args([
        "store",
        "ping",
        "--store",
        &with_key(&server.pins.machines_key),
    ]));
    assert_no_host_key_warning(&ping);

    // Another key in that place, or none, and ssh refuses the server.
    let other = SshServer::key(server.client.path(), "other", "ed25519", "x");
    let other_b64 = nixbuild_ssh::host_key::machines_host_key(
        &nixbuild_ssh::ssh_key::PublicKey::from_openssh(&other.public).expect("a public key"),
    );
    for store in [with_key(&other_b64), "ssh://nixbuild-m".to_owned()] {
        let out = run(over_ssh(&nix, &config, "nix").args(["store", "ping", "--store", &store]));
        assert!(!out.status.success(), "{store} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Host key verification failed"),
            "{store}: {stderr}"
        );
    }
    server.daemon.stop();
}

#[test]
fn restart_keeps_the_host_key_and_clients_connect_without_a_warning() {
    let nix = nix_conf();
    let (server, key) = server();
    let config = server.ssh_config("nixbuild-test", &key);
    let key_file = server.daemon.state_dir().join("ssh_host_ed25519_key");
    let before = std::fs::read(&key_file).expect("the host key file");
    let pub_before = std::fs::read(key_file.with_extension("pub")).expect("the .pub file");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    ok(over_ssh(&nix, &config, "nix").args(["store", "ping", "--store", "ssh://nixbuild-test"]));
    let pins = server.pins.clone();

    let server = server.restart();
    assert_eq!(server.pins, pins, "the printed pins changed");
    assert_eq!(std::fs::read(&key_file).expect("key"), before);
    assert_eq!(
        std::fs::read(key_file.with_extension("pub")).expect("pub"),
        pub_before
    );
    let ping = ok(over_ssh(&nix, &config, "nix").args([
        "store",
        "ping",
        "--store",
        "ssh://nixbuild-test",
    ]));
    assert_no_host_key_warning(&ping);
    let stopped = server.daemon.stop();
    assert_eq!(
        stopped.log.matches("generated a new SSH host key").count(),
        1,
        "{}",
        stopped.log
    );
}

#[test]
fn several_sessions_share_one_connection_up_to_the_limit() {
    let (server, key) = server_with("[ssh]\nmax_sessions_per_connection = 2\n");
    let config = server.ssh_config("nixbuild-test", &key);
    let control = server.client.path().join("control");
    let control_opt = format!("ControlPath={}", control.display());
    let mut master = start_master(&config, "nixbuild-test", &control);
    let through_master = ["-o", "ControlMaster=no", "-o", &control_opt];
    let mut first = SshSession::open_with(&config, "nixbuild-test", &through_master);
    let mut second = SshSession::open_with(&config, "nixbuild-test", &through_master);
    let (query, len) = harness::ssh::empty_query();
    // Both sessions are open at once and each answers (an empty set: count 0).
    assert_eq!(first.exchange(&query, len), vec![0; len]);
    assert_eq!(second.exchange(&query, len), vec![0; len]);
    // A third at once is over the limit: the master's channel is refused (ssh then falls
    // back to a connection of its own, where its empty stdin ends the session).
    let third = run(&mut SshServer::ssh_with(
        &config,
        &through_master,
        "nixbuild-test",
        &["nix-store", "--serve"],
    ));
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(stderr.contains("Session open refused by peer"), "{stderr}");
    assert_eq!(first.close().0, 0);
    assert_eq!(second.close().0, 0);
    let _ = master.kill();
    let _ = master.wait();

    let stopped = server.daemon.stop();
    let conns: Vec<&str> = stopped
        .log
        .lines()
        .filter(|l| l.contains("session start"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("conn=")))
        .collect();
    assert_eq!(conns.len(), 3, "{}", stopped.log);
    assert_eq!(
        conns[0], conns[1],
        "the sessions came on different connections"
    );
    assert_ne!(conns[1], conns[2], "the fallback came through the master");
    assert!(stopped
        .log
        .contains("refused a session channel: 2 are open on this connection"));
}

/// The two builder forms the README documents: the known_hosts pin with the ssh config, and
/// the machines file with the base64 host key (with HostKeyAlias).
fn builders(server: &SshServer, key: &Key) -> Vec<(std::path::PathBuf, String)> {
    let pinned = server.ssh_config("nixbuild-test", key);
    let machines = server.ssh_config_for_machines("nixbuild-m", key);
    vec![
        (
            pinned,
            "ssh://nixbuild-test x86_64-linux - 100 1 big-parallel,benchmark".to_owned(),
        ),
        (
            machines,
            format!(
                "ssh://nixbuild-m x86_64-linux {} 1 1 - - {}",
                key.private.display(),
                server.pins.machines_key
            ),
        ),
    ]
}

/// The build criterion, over both builder forms (host key pinned in known_hosts, and
/// the machines-file form with the base64 host key). It asserts the output from the client's
/// side and that the server ran the build.
#[test]
fn builds_through_both_builder_forms() {
    let nix = nix_conf();
    let (server, key) = server();
    for (config, builders) in builders(&server, &key) {
        // A fresh salt per form, so the second build is not already valid locally.
        let salt = Nix::salt();
        let expr = salted_derivation(&nix.scratch(), "ssh-build", &salt);
        let out = ok(over_ssh(&nix, &config, "nix-build").arg(&expr).args([
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
            &builders,
        ]));
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            std::fs::read_to_string(&path).expect("read the output"),
            format!("{salt}\n")
        );
        // The server built it, in its sandbox, for the key's account.
        server.daemon.wait_for_log(&[
            "nixbuild::build: building ",
            &format!("account={ACCOUNT} "),
            &format!("ssh-build-{salt}.drv "),
        ]);
    }
    server.daemon.stop();
}

/// The peak number of sessions open at once in `log` (the daemon's "session start" and
/// "session end" lines).
fn peak_sessions(log: &str) -> usize {
    let (mut open, mut peak) = (0usize, 0usize);
    for line in log.lines() {
        if line.contains(" session start ") {
            open += 1;
            peak = peak.max(open);
        } else if line.contains(" session end ") {
            open = open.saturating_sub(1);
        }
    }
    peak
}

/// The load criterion: 120 derivations at once from one `nix-build` (Nix 2.8,
/// `--max-jobs 0`, the README's builders line with its 100 slots), each sleeping a second
/// on the server, against the server's default limits. First every build hook connects on
/// its own, then all of them go through one OpenSSH ControlMaster connection. Every output
/// arrives, the server ran each build once, and nothing was refused.
#[test]
fn a_hundred_and_twenty_builds_at_once_over_separate_connections_and_one_master() {
    const BUILDS: usize = 120;
    // An alias of its own: Nix keeps its builder slots per machine (lock files in
    // /nix/var/nix/current-load), which other tests running at once must not share.
    const ALIAS: &str = "nixbuild-many";
    let (server, key) = server();
    let config = server.ssh_config(ALIAS, &key);
    let control = server.client.path().join("control");
    let master_opts = format!("-oControlMaster=no -oControlPath={}", control.display());
    let builders = format!("ssh://{ALIAS} x86_64-linux - 100 1 big-parallel,benchmark");
    for through_master in [false, true] {
        let lab = Lab::with_conf(
            &format!(
                "builtins.genList (i: mk \"many-${{toString i}}\" \
                 \"sleep 1; echo ${{toString i}} > $out\" {{}}) {BUILDS}"
            ),
            "require-sigs = false\n",
        );
        let drvs = lab.instantiate(&[]);
        assert_eq!(drvs.len(), BUILDS);
        let mut master = through_master.then(|| start_master(&config, ALIAS, &control));
        let mut cmd = lab.nix.command("nix-build");
        let mut sshopts = format!("-F {}", config.display());
        if through_master {
            sshopts = format!("{sshopts} {master_opts}");
        }
        cmd.env("NIX_SSHOPTS", sshopts)
            .args(["--max-jobs", "0", "--no-out-link", "--builders", &builders])
            .args(&drvs);
        let log_start = server.daemon.log().len();
        let started = std::time::Instant::now();
        let out = ok(&mut cmd);
        let elapsed = started.elapsed();
        let outputs = lines(&out.stdout);
        assert_eq!(outputs.len(), BUILDS, "{outputs:?}");
        let mut contents: Vec<String> = outputs
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("read an output"))
            .collect();
        contents.sort_by_key(|c| c.trim().parse::<usize>().expect("a number"));
        let expected: Vec<String> = (0..BUILDS).map(|i| format!("{i}\n")).collect();
        assert_eq!(contents, expected);

        // The server ran every build, once, and refused nothing.
        assert_built_once(&server.daemon, &drvs);
        let log = server.daemon.log();
        let phase = &log[log_start..];
        let refusals: Vec<&str> = phase.lines().filter(|l| l.contains("refused")).collect();
        assert!(refusals.is_empty(), "refusals:\n{}", refusals.join("\n"));
        let conns: BTreeSet<&str> = phase
            .lines()
            .filter(|l| l.contains(" session start "))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("conn=")))
            .collect();
        let peak = peak_sessions(phase);
        eprintln!(
            "{BUILDS} builds {}: {:.1} s, {} sessions on {} connections, at most {peak} at once",
            if through_master {
                "through one ControlMaster connection"
            } else {
                "over separate connections"
            },
            elapsed.as_secs_f64(),
            phase.matches(" session start ").count(),
            conns.len(),
        );
        // Nix runs as many build hooks at once as the line has slots.
        assert!(peak > 64, "at most {peak} sessions at once:\n{phase}");
        if let Some(master) = master.as_mut() {
            assert_eq!(conns.len(), 1, "not all through the master: {conns:?}");
            assert!(
                master.try_wait().expect("poll").is_none(),
                "the master exited"
            );
            let _ = master.kill();
            let _ = master.wait();
        } else {
            assert!(conns.len() > 64, "{} connections", conns.len());
        }
    }
    server.daemon.stop();
}

/// Starts an OpenSSH ControlMaster connection to `alias` with its socket at `control`, and
/// waits until it is connected and authenticated (it then creates the socket).
fn start_master(config: &Path, alias: &str, control: &Path) -> std::process::Child {
    let mut master = Command::new("ssh")
        .arg("-F")
        .arg(config)
        .args(["-N", "-o", "ControlMaster=yes", "-o"])
        .arg(format!("ControlPath={}", control.display()))
        .arg(alias)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn the ssh master");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !control.exists() {
        assert!(std::time::Instant::now() < until, "no control socket");
        assert!(
            master.try_wait().expect("poll").is_none(),
            "the master exited"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    master
}
