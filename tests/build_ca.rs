//! Floating content-addressed derivations (`__contentAddressed = true`, the experimental
//! `ca-derivations` feature) built on the server by each of the three Nix client generations
//! (tests/harness/clients.rs) as a remote builder, through the relay (`--max-jobs 0
//! --builders 'ssh://localhost?remote-program=<nixbuild-serve> …'`), over the serve protocol
//! and over the daemon protocol (`ssh-ng://`).
//!
//! The derivations refer to themselves (in a file, a symlink target and a directory name),
//! have two outputs where one refers to the other, depend on another content-addressed
//! derivation (so the client resolves them before it sends them), and one is a `flat` file.
//! The client must learn each output's path from the BuildResult, copy it back and register
//! its realisation; the paths must be the ones Nix 2.34 computes when it builds the same
//! derivations in its own sandbox in the sid chroot, into a store of their own. The daemon's
//! log shows each build there.

mod harness;

use harness::clients::{busybox, chroots, read_client_file, Client, ClientNix};
use harness::{lines, salt, store_uri, Daemon};
use nixbuild_core::store_path::StorePath;

const ACCOUNT: &str = "alice";

/// The derivations; `@BB@` and `@SALT@` stand for the busybox path and the salt.
const EXPRESSION: &str = r#"
let
  bb = builtins.storePath "@BB@";
  salt = "@SALT@";
  ca = name: attrs: derivation ({
    name = "${name}-${salt}";
    system = "x86_64-linux";
    builder = "${bb}/bin/sh";
    PATH = "${bb}/bin";
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  } // attrs);
  base = ca "ca-base" { args = [ "-c" ''
    mkdir -p $out/bin
    echo "I am $out" > $out/self
    echo ${bb} > $out/tools
    ln -s $out/self $out/link
    mkdir "$out/sub"
    echo nested > "$out/sub/$(basename $out)"
  '' ]; };
  multi = ca "ca-multi" {
    outputs = [ "out" "lib" ];
    args = [ "-c" ''
      mkdir -p $lib $out
      echo "lib of $lib" > $lib/data
      echo "$lib/data" > $out/uses-lib
      echo "base at ${base}" > $out/base
    '' ];
  };
  plain = ca "ca-plain" { args = [ "-c" "mkdir $out; echo ${bb} > $out/tools; ln -s ${bb}/bin/sh $out/sh" ]; };
  flat = ca "ca-flat" {
    outputHashMode = "flat";
    args = [ "-c" "echo flat ${salt} > $out" ];
  };
in { inherit base multi plain flat; }
"#;

/// The attributes a client builds: Nix 2.8 only those without self-references. Nix 2.4 to
/// 2.16 hash a content-addressed output modulo its own hash part *and the offsets where it
/// occurs*; Nix 2.17 stopped hashing the offsets, and nixbuild computes what current Nix
/// does, so Nix 2.8 refuses a self-referring output built by either ("ca hash mismatch",
/// [`nix_2_8_refuses_self_references_as_from_any_current_nix`]).
fn attrs(client: Client) -> &'static [&'static str] {
    match client {
        Client::Host => &["plain", "flat"],
        _ => &["base", "multi", "plain", "flat"],
    }
}

/// `nix.conf` lines that turn the feature on.
const CA_CONF: &str = "extra-experimental-features = ca-derivations\n";

/// A client's Nix with the expression, salted with `salt`, in its scratch directory.
fn client_with_expression(client: Client, salt: &str) -> (ClientNix, std::path::PathBuf) {
    let nix = ClientNix::new(client, CA_CONF);
    let file = nix.scratch().join("ca.nix");
    let text = EXPRESSION
        .replace("@BB@", &busybox())
        .replace("@SALT@", salt);
    std::fs::write(&file, text).expect("write the expression");
    (nix, file)
}

/// `cmd` (a `nix-build`) of `attrs`: the output paths it prints, sorted.
fn build(
    mut cmd: std::process::Command,
    nix: &ClientNix,
    file: &std::path::Path,
    attrs: &[&str],
) -> Vec<String> {
    cmd.arg(file).arg("--no-out-link");
    for a in attrs {
        cmd.args(["-A", a]);
    }
    let mut paths = lines(&nix.ok(&mut cmd).stdout);
    paths.sort();
    paths
}

/// The output paths of `attrs` of the expression salted with `salt` built by Nix 2.34 in its
/// own sandbox in the sid chroot, into a store of their own: a chroot store under the
/// chroot's `/var/lib` (a store root may not be below a world-writable directory such as
/// `/tmp`), removed afterwards. A store of their own, because Nix's `--check` of a
/// content-addressed derivation compares nothing (a builder writing random bytes passes it),
/// and the sid client's own store already holds what nixbuild built.
fn reference(salt: &str, attrs: &[&str]) -> Vec<String> {
    let (sid, file) = client_with_expression(Client::Sid, salt);
    let root = format!("/var/lib/nixbuild-reference-{salt}");
    let store = format!("local?root={root}");
    sid.ok(sid
        .command("nix")
        .args(["copy", "--no-check-sigs", "--to", &store, &busybox()]));
    let mut cmd = sid.sandboxed("nix-build");
    cmd.args(["--store", &store]);
    let paths = build(cmd, &sid, &file, attrs);
    let on_host = chroots().join("sid").join(root.trim_start_matches('/'));
    std::fs::remove_dir_all(&on_host)
        .unwrap_or_else(|e| panic!("remove {}: {e}", on_host.display()));
    paths
}

/// A `nix-build` of `nix` on the daemon only (`--max-jobs 0`) through the relay, over the
/// serve protocol (`ssh://`) or the daemon protocol (`ssh-ng://`), with a machine that
/// offers `ca-derivations` (Nix requires it of machines for such derivations).
fn remote_build(nix: &ClientNix, d: &Daemon, protocol: Protocol) -> std::process::Command {
    let mut remote = nix.relayed(d, ACCOUNT, "nix-build");
    let uri = match protocol {
        Protocol::Serve => store_uri(),
        Protocol::Daemon => store_uri().replacen("ssh://", "ssh-ng://", 1),
    };
    let builders = format!("{uri} x86_64-linux - 100 1 big-parallel,benchmark,ca-derivations");
    remote.args(["--max-jobs", "0", "--builders", &builders]);
    remote
}

/// Which of Nix's remote protocols the client builds with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// `ssh://`: the serve protocol.
    Serve,
    /// `ssh-ng://`: the daemon protocol.
    Daemon,
}

fn content_addressed_builds(client: Client, protocol: Protocol) {
    let salt = salt();
    let (nix, file) = client_with_expression(client, &salt);
    let d = Daemon::start(&[]);
    let attrs = attrs(client);
    let ours = build(remote_build(&nix, &d, protocol), &nix, &file, attrs);
    // The `out` output of each (nix-build prints that one of multi's two).
    assert_eq!(ours.len(), attrs.len(), "{ours:?}");

    // Each derivation (as the client resolved it) was built on the server.
    let log = d.log();
    let built: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("nixbuild::build: building ") && l.contains(&salt))
        .collect();
    assert_eq!(built.len(), attrs.len(), "{log}");
    let flat = ours
        .iter()
        .find(|p| p.ends_with(&format!("-ca-flat-{salt}")))
        .expect("flat");
    assert_eq!(read_client_file(client, flat), format!("flat {salt}\n"));

    if client != Client::Host {
        self_references_are_final(client, &salt, &ours);
    }

    // The paths Nix 2.34 computes in its own sandbox.
    assert_eq!(ours, reference(&salt, attrs), "{} client", client.name());

    // The server has the outputs at their final paths for the account.
    let stopped = d.stop();
    for p in &ours {
        let sp = StorePath::from_absolute_path(p.as_bytes()).expect("a store path");
        assert!(stopped.valid(ACCOUNT, &sp), "{p}\n{}", stopped.log);
    }
}

/// What the client has of the self-referring outputs: their own final paths named, links
/// and file names rewritten.
fn self_references_are_final(client: Client, salt: &str, ours: &[String]) {
    let base = ours
        .iter()
        .find(|p| p.ends_with(&format!("-ca-base-{salt}")))
        .expect("base");
    assert_eq!(
        read_client_file(client, &format!("{base}/self")),
        format!("I am {base}\n")
    );
    let name = base.trim_start_matches("/nix/store/");
    assert_eq!(
        read_client_file(client, &format!("{base}/sub/{name}")),
        "nested\n"
    );
    let multi = ours
        .iter()
        .find(|p| p.ends_with(&format!("-ca-multi-{salt}")))
        .expect("multi");
    // multi's out names its lib output, which names itself.
    let uses_lib = read_client_file(client, &format!("{multi}/uses-lib"));
    let lib = uses_lib.trim_end().trim_end_matches("/data");
    assert!(
        lib.ends_with(&format!("-ca-multi-{salt}-lib")),
        "{uses_lib}"
    );
    assert_eq!(
        read_client_file(client, &format!("{multi}/base")),
        format!("base at {base}\n")
    );
}

#[test]
fn nix_2_8_host_builds_content_addressed_derivations_over_ssh() {
    content_addressed_builds(Client::Host, Protocol::Serve);
}

#[test]
fn nix_2_8_host_builds_content_addressed_derivations_over_ssh_ng() {
    content_addressed_builds(Client::Host, Protocol::Daemon);
}

#[test]
fn nix_2_26_trixie_builds_content_addressed_derivations_over_ssh() {
    content_addressed_builds(Client::Trixie, Protocol::Serve);
}

#[test]
fn nix_2_26_trixie_builds_content_addressed_derivations_over_ssh_ng() {
    content_addressed_builds(Client::Trixie, Protocol::Daemon);
}

#[test]
fn nix_2_34_sid_builds_content_addressed_derivations_over_ssh() {
    content_addressed_builds(Client::Sid, Protocol::Serve);
}

#[test]
fn nix_2_34_sid_builds_content_addressed_derivations_over_ssh_ng() {
    content_addressed_builds(Client::Sid, Protocol::Daemon);
}

#[test]
fn nix_2_8_refuses_self_references_as_from_any_current_nix() {
    let salt = salt();
    let (nix, file) = client_with_expression(Client::Host, &salt);
    let d = Daemon::start(&[]);
    let mut cmd = remote_build(&nix, &d, Protocol::Serve);
    cmd.arg(&file).args(["--no-out-link", "-A", "base"]);
    let out = cmd.output().expect("run nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ca hash mismatch importing path"),
        "{stderr}"
    );
    // Built and registered on the server all the same: only the old client's check differs.
    assert!(d.log().contains(&format!("-ca-base-{salt}.drv")));
}
