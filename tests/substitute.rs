//! Substitution from binary caches (`[substituters]`): the server fetches what a cache has
//! instead of having the client upload it.
//!
//! Each test writes a cache with the real Nix 2.8 (`nix copy --to file://…`, signed with the
//! test key) of a salted 100-path input closure (text files referring to each other, built
//! by `builtins.toFile`) plus the busybox path, serves it with Python's `http.server` on
//! 127.0.0.1 (or reads it as `file://`), and has a client build a derivation needing that
//! closure on the server with `builders-use-substitutes`. The server's log must show every
//! input fetched from the cache and none uploaded by the client; the cache's access log
//! counts the downloads.

mod harness;

use harness::cache::{public_key, BinaryCache, HttpServer};
use harness::clients::{read_client_file, Client, ClientNix};
use harness::{lines, salt, store_uri, Daemon};

const ACCOUNT: &str = "alice";
/// Paths in the input closure (besides busybox).
const INPUTS: usize = 100;

/// The expression: 100 text files, each naming the one before and the one at half its
/// index (so the closure is a graph, not a chain), and a derivation that copies the last.
fn expression(salt: &str) -> String {
    format!(
        r#"
let
  bb = builtins.storePath "{bb}";
  salt = "{salt}";
  file = acc: i: acc ++ [ (builtins.toFile "in-${{toString i}}-${{salt}}"
    "input ${{toString i}} ${{salt}} after ${{builtins.elemAt acc (i - 1)}} and ${{builtins.elemAt acc (i / 2)}}\n") ];
  files = builtins.foldl' file [ (builtins.toFile "in-0-${{salt}}" "leaf ${{salt}}\n") ]
    (builtins.genList (i: i + 1) {last});
  top = builtins.elemAt files {last};
in derivation {{
  name = "subst-${{salt}}";
  system = "x86_64-linux";
  builder = "${{bb}}/bin/sh";
  PATH = "${{bb}}/bin";
  args = [ "-c" "cat ${{top}} > $out" ];
}}
"#,
        bb = harness::clients::busybox(),
        last = INPUTS - 1,
    )
}

/// Which of Nix's remote protocols the client builds with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// `ssh://`: the serve protocol.
    Serve,
    /// `ssh-ng://`: the daemon protocol.
    Daemon,
}

/// A client with `builders-use-substitutes` and the expression salted with `salt` in its
/// scratch directory.
fn client(client: Client, salt: &str) -> (ClientNix, std::path::PathBuf) {
    let nix = ClientNix::new(client, "builders-use-substitutes = true\n");
    let file = nix.scratch().join("subst.nix");
    std::fs::write(&file, expression(salt)).expect("write the expression");
    (nix, file)
}

/// The inputs of the derivation of `file`, instantiated by `nix`: (the top file, busybox).
fn inputs(nix: &ClientNix, file: &std::path::Path) -> String {
    let drv = nix.instantiate(file);
    let refs = lines(
        &nix.ok(nix
            .command("nix-store")
            .args(["--query", "--references", &drv]))
            .stdout,
    );
    refs.into_iter()
        .find(|p| p.contains("-in-"))
        .expect("the top input file")
}

/// A cache of the expression's input closure and busybox, written by the host's Nix.
fn cache_of_inputs(salt: &str, compression: &str) -> (BinaryCache, String) {
    let (host, file) = client(Client::Host, salt);
    let top = inputs(&host, &file);
    let cache = BinaryCache::new();
    cache.copy(
        &host,
        &[top.clone(), harness::clients::busybox()],
        compression,
        "test-cache-1.secret",
    );
    (cache, top)
}

/// The daemon's configuration with `url` as its only cache.
fn config(url: &str) -> String {
    format!(
        "[substituters]\nurls = [\"{url}\"]\ntrusted_public_keys = [\"{}\"]\n",
        public_key()
    )
}

/// `nix-build` of `file` on the daemon only (`--max-jobs 0`) through the relay.
fn remote_build(
    nix: &ClientNix,
    d: &Daemon,
    file: &std::path::Path,
    protocol: Protocol,
) -> std::process::Output {
    let uri = match protocol {
        Protocol::Serve => store_uri(),
        Protocol::Daemon => store_uri().replacen("ssh://", "ssh-ng://", 1),
    };
    let builders = format!("{uri} x86_64-linux - 100 1 big-parallel,benchmark");
    let mut cmd = nix.relayed(d, ACCOUNT, "nix-build");
    cmd.args(["--max-jobs", "0", "--builders", &builders, "--no-out-link"])
        .arg(file);
    nix.ok(&mut cmd)
}

/// Log lines of `log` that contain both `a` and `b`.
fn count(log: &str, a: &str, b: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(a) && l.contains(b))
        .count()
}

fn input_closure_substituted(which: Client, protocol: Protocol) {
    let salt = salt();
    let (cache, top) = cache_of_inputs(&salt, "xz");
    let http = HttpServer::serve(cache.dir());
    let d = Daemon::start_with_config(&config(&http.url()), &[]);
    let (nix, file) = client(which, &salt);
    let out = remote_build(&nix, &d, &file, protocol);
    let output = lines(&out.stdout).pop().expect("an output path");
    assert_eq!(
        read_client_file(which, &output),
        read_client_file(which, &top),
        "the output copies the top input"
    );

    let log = d.log();
    // Built there, with every input fetched from the cache and none uploaded.
    assert_eq!(count(&log, "nixbuild::build: building ", &salt), 1, "{log}");
    assert_eq!(count(&log, "substituted path=", &salt), INPUTS, "{log}");
    assert_eq!(count(&log, "substituted path=", "-bbdir"), 1, "{log}");
    assert_eq!(count(&log, "registered import", &salt), 0, "{log}");
    // Each NAR downloaded once.
    let nars: Vec<(String, u16)> = http
        .requests()
        .into_iter()
        .filter(|(p, _)| p.starts_with("/nar/"))
        .collect();
    assert_eq!(nars.len(), INPUTS + 1, "{nars:?}");
    assert!(nars.iter().all(|(_, status)| *status == 200), "{nars:?}");
    // The client was told.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("copying path '{top}' from '{}'", http.url())),
        "{stderr}"
    );
    let stopped = d.stop();
    assert!(
        stopped.log.contains("granted substituted paths"),
        "{}",
        stopped.log
    );
}

#[test]
fn nix_2_8_host_substitutes_inputs_over_ssh() {
    input_closure_substituted(Client::Host, Protocol::Serve);
}

#[test]
fn nix_2_8_host_substitutes_inputs_over_ssh_ng() {
    input_closure_substituted(Client::Host, Protocol::Daemon);
}

#[test]
fn nix_2_26_trixie_substitutes_inputs_over_ssh() {
    input_closure_substituted(Client::Trixie, Protocol::Serve);
}

#[test]
fn nix_2_26_trixie_substitutes_inputs_over_ssh_ng() {
    input_closure_substituted(Client::Trixie, Protocol::Daemon);
}

#[test]
fn nix_2_34_sid_substitutes_inputs_over_ssh() {
    input_closure_substituted(Client::Sid, Protocol::Serve);
}

#[test]
fn nix_2_34_sid_substitutes_inputs_over_ssh_ng() {
    input_closure_substituted(Client::Sid, Protocol::Daemon);
}
