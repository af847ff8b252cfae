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
use harness::ssh_ng::{must, Setup, Way, ALICE};
use harness::{lines, salt, store_uri, Daemon};
use nixbuild::store::PUBLIC_ACCOUNT;
use nixbuild_core::binary_cache::{NarInfo, SecretKey};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::serve::{Request, Response};
use nixbuild_core::store_path::StorePath;
use std::collections::BTreeSet;

const ACCOUNT: &str = "alice";
/// Paths in the input closure (besides busybox).
const INPUTS: usize = 100;
/// Paths in the input closure of the tests of failures.
const SMALL: usize = 4;

/// The expression: `n` text files, each naming the one before and the one at half its
/// index (so the closure is a graph, not a chain), and a derivation that copies the last.
fn expression(salt: &str, n: usize) -> String {
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
        last = n - 1,
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
fn client(client: Client, salt: &str, n: usize) -> (ClientNix, std::path::PathBuf) {
    let nix = ClientNix::new(client, "builders-use-substitutes = true\n");
    let file = nix.scratch().join("subst.nix");
    std::fs::write(&file, expression(salt, n)).expect("write the expression");
    (nix, file)
}

/// The input files of the derivation of `file`, instantiated by `nix`, by index: the last
/// is the one the derivation names.
fn inputs(nix: &ClientNix, file: &std::path::Path) -> Vec<String> {
    let drv = nix.instantiate(file);
    let query = |args: &[&str]| lines(&nix.ok(nix.command("nix-store").args(args)).stdout);
    let refs = query(&["--query", "--references", &drv]);
    let top = refs
        .iter()
        .find(|p| p.contains("-in-"))
        .expect("the top input file");
    let mut files: Vec<(usize, String)> = query(&["--query", "--requisites", top])
        .into_iter()
        .filter_map(|p| {
            let i = p.split("-in-").nth(1)?.split('-').next()?.parse().ok()?;
            Some((i, p))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// A cache of the input closure of the expression with `n` inputs, and busybox, written by
/// the host's Nix; and the input files by index.
fn cache_of_inputs(salt: &str, compression: &str, n: usize) -> (BinaryCache, Vec<String>) {
    let (host, file) = client(Client::Host, salt, n);
    let files = inputs(&host, &file);
    assert_eq!(files.len(), n, "{files:?}");
    let cache = BinaryCache::new();
    let top = files.last().expect("a top input").clone();
    cache.copy(
        &host,
        &[top, harness::clients::busybox()],
        compression,
        "test-cache-1.secret",
    );
    (cache, files)
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

/// Asserts that the daemon's `log` shows `n` paths of the run salted `salt` fetched from the
/// cache and none uploaded.
fn all_fetched_none_uploaded(log: &str, salt: &str, n: usize) {
    assert_eq!(
        count(log, "nixbuild::substitute: substituted path=", salt),
        n,
        "{log}"
    );
    assert_eq!(count(log, "registered import", salt), 0, "{log}");
}

/// Log lines of `log` that contain both `a` and `b`.
fn count(log: &str, a: &str, b: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(a) && l.contains(b))
        .count()
}

fn input_closure_substituted(which: Client, protocol: Protocol) {
    let salt = salt();
    let (cache, files) = cache_of_inputs(&salt, "xz", INPUTS);
    let top = files.last().expect("a top input");
    let http = HttpServer::serve(cache.dir());
    let d = Daemon::start_with_config(&config(&http.url()), &[]);
    let (nix, file) = client(which, &salt, INPUTS);
    let out = remote_build(&nix, &d, &file, protocol);
    let output = lines(&out.stdout).pop().expect("an output path");
    assert_eq!(
        read_client_file(which, &output),
        read_client_file(which, top),
        "the output copies the top input"
    );

    let log = d.log();
    // Built there, with every input fetched from the cache and none uploaded.
    assert_eq!(count(&log, "nixbuild::build: building ", &salt), 1, "{log}");
    all_fetched_none_uploaded(&log, &salt, INPUTS);
    assert_eq!(
        count(&log, "nixbuild::substitute: substituted path=", "-bbdir"),
        1,
        "{log}"
    );
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

#[test]
fn nix_2_34_sid_substitutes_from_a_zstd_cache_read_as_file_url() {
    let salt = salt();
    let (cache, files) = cache_of_inputs(&salt, "zstd", SMALL);
    assert!(
        cache.nar(&files[0]).to_string_lossy().ends_with(".nar.zst"),
        "Nix wrote zstd"
    );
    let d = Daemon::start_with_config(&config(&cache.file_url()), &[]);
    let (nix, file) = client(Client::Sid, &salt, SMALL);
    remote_build(&nix, &d, &file, Protocol::Daemon);
    all_fetched_none_uploaded(&d.stop().log, &salt, SMALL);
}

/// Rewrites the narinfo of `path` in `cache` with `edit`, then signs it anew with `key`
/// (a secret key file of the test data) unless `None`, which leaves it unsigned.
fn rewrite_narinfo(
    cache: &BinaryCache,
    path: &str,
    key: Option<&str>,
    edit: impl FnOnce(&mut NarInfo),
) {
    let file = cache.narinfo(path);
    let mut info =
        NarInfo::parse(&std::fs::read(&file).expect("read the narinfo")).expect("parse it");
    edit(&mut info);
    info.sigs.clear();
    if let Some(key) = key {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("nixbuild-core/tests/data/binary-cache");
        let secret = std::fs::read_to_string(dir.join(key)).expect("read the key");
        let secret = SecretKey::parse(&secret).expect("a secret key");
        info.sigs.insert(secret.sign(info.fingerprint().as_bytes()));
    }
    std::fs::write(&file, info.to_text()).expect("write the narinfo");
}

/// How the cache of a failure test is reached.
enum Serve {
    /// Python's http.server.
    Http,
    /// A server that dies in the middle of the victim's NAR.
    CutsVictim,
}

/// The input closure is in the cache, but `break_it` spoils the entry of the second input
/// file (the victim, which the other two refer to): the server logs `cause` for it,
/// registers nothing of it, fetches only the first input (and busybox), and the build
/// still succeeds with the client uploading the rest.
fn spoiled_entry_is_uploaded(serve: Serve, break_it: impl FnOnce(&BinaryCache, &str), cause: &str) {
    let salt = salt();
    let (cache, files) = cache_of_inputs(&salt, "xz", SMALL);
    let victim = files[1].clone();
    break_it(&cache, &victim);
    let http;
    let url = match serve {
        Serve::Http => {
            http = HttpServer::serve(cache.dir());
            http.url()
        }
        Serve::CutsVictim => {
            let nar = cache.nar(&victim);
            let rel = nar.strip_prefix(cache.dir()).expect("under the cache");
            harness::cache::CuttingServer::serve(cache.dir(), &format!("/{}", rel.display())).url()
        }
    };
    let d = Daemon::start_with_config(&config(&url), &[]);
    let (nix, file) = client(Client::Host, &salt, SMALL);
    let out = remote_build(&nix, &d, &file, Protocol::Serve);
    let output = lines(&out.stdout).pop().expect("an output path");
    assert_eq!(
        read_client_file(Client::Host, &output),
        read_client_file(Client::Host, &files[SMALL - 1])
    );
    let stopped = d.stop();
    let log = &stopped.log;
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("path={victim}")) && l.contains(cause)),
        "no {cause:?} for {victim}:\n{log}"
    );
    // Only the first input came from the cache; the victim and what refers to it were
    // uploaded.
    assert_eq!(
        count(log, "nixbuild::substitute: substituted path=", &salt),
        1,
        "{log}"
    );
    let victim = StorePath::from_absolute_path(victim.as_bytes()).expect("a store path");
    assert!(!stopped.valid(PUBLIC_ACCOUNT, &victim), "{log}");
    assert!(stopped.registered(ACCOUNT, &victim), "{log}");
    // (The store was verified clean when the daemon stopped.)
}

#[test]
fn an_unsigned_narinfo_is_not_used() {
    spoiled_entry_is_uploaded(
        Serve::Http,
        |cache, victim| rewrite_narinfo(cache, victim, None, |_| {}),
        "no valid signature by a trusted key (signatures: none;",
    );
}

#[test]
fn a_narinfo_signed_by_an_untrusted_key_is_not_used() {
    spoiled_entry_is_uploaded(
        Serve::Http,
        |cache, victim| rewrite_narinfo(cache, victim, Some("impostor.secret"), |_| {}),
        "no valid signature by a trusted key (signatures: test-cache-1;",
    );
}

#[test]
fn a_signed_narinfo_with_a_wrong_nar_hash_registers_nothing() {
    spoiled_entry_is_uploaded(
        Serve::Http,
        |cache, victim| {
            rewrite_narinfo(cache, victim, Some("test-cache-1.secret"), |info| {
                info.nar_hash = Hash::compute(HashAlgo::Sha256, b"not the NAR");
            })
        },
        "NAR hash mismatch",
    );
}

#[test]
fn a_truncated_nar_registers_nothing() {
    spoiled_entry_is_uploaded(
        Serve::Http,
        |cache, victim| {
            let nar = cache.nar(victim);
            let bytes = std::fs::read(&nar).expect("read the NAR");
            std::fs::write(&nar, &bytes[..bytes.len() / 2]).expect("truncate it");
        },
        "reading http://",
    );
}

#[test]
fn a_missing_nar_registers_nothing() {
    spoiled_entry_is_uploaded(
        Serve::Http,
        |cache, victim| std::fs::remove_file(cache.nar(victim)).expect("remove the NAR"),
        ": not found",
    );
}

#[test]
fn a_cache_that_dies_mid_transfer_registers_nothing() {
    spoiled_entry_is_uploaded(Serve::CutsVictim, |_, _| {}, "reading http://");
}

#[test]
fn two_accounts_asking_at_once_share_one_download() {
    let salt = salt();
    let (cache, files) = cache_of_inputs(&salt, "xz", SMALL);
    let http = HttpServer::serve(cache.dir());
    let d = Daemon::start_with_config(&config(&http.url()), &[]);
    // Two clients (two client stores: one store would build the derivation once and let
    // the second nix-build find it there).
    let clients = [
        (client(Client::Host, &salt, SMALL), "alice"),
        (client(Client::Trixie, &salt, SMALL), "bob"),
    ];
    let builders = format!(
        "{} x86_64-linux - 100 1 big-parallel,benchmark",
        store_uri()
    );
    let children: Vec<_> = clients
        .iter()
        .map(|((nix, file), account)| {
            let mut cmd = nix.relayed(&d, account, "nix-build");
            cmd.args(["--max-jobs", "0", "--builders", &builders, "--no-out-link"])
                .arg(file)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            cmd.spawn().expect("run nix-build")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait for nix-build");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for f in &files {
        let nar = cache.nar(f);
        let name = format!(
            "/{}",
            nar.strip_prefix(cache.dir())
                .expect("in the cache")
                .display()
        );
        assert_eq!(http.count(&name), 1, "{name}: {:?}", http.requests());
    }
    let stopped = d.stop();
    for f in &files {
        let p = StorePath::from_absolute_path(f.as_bytes()).expect("a store path");
        for account in ["alice", "bob", PUBLIC_ACCOUNT] {
            assert!(
                stopped.valid(account, &p),
                "{account} lacks {p}\n{}",
                stopped.log
            );
        }
        assert!(
            !stopped.registered("alice", &p) && !stopped.registered("bob", &p),
            "uploaded"
        );
    }
}

/// The paths Nix lists under the heading of a dry run that contains `heading` (`this
/// derivation will be built:`, `these 2 paths will be fetched (…):`).
fn listed(dry_run: &str, heading: &str) -> Vec<String> {
    dry_run
        .lines()
        .skip_while(|l| !l.contains(heading))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// A remote-store build (`nix build --store ssh-ng://…`, through the relay or the SSH
/// server with the real OpenSSH client) of a derivation whose dependency's output is in the
/// cache: the server fetches that output instead of building the dependency, and builds
/// only the top.
fn remote_store_build_fetches_a_dependency(which: Client, way: Way) {
    let salt = salt();
    let expr = format!(
        r#"let
  bb = builtins.storePath "{bb}";
  drv = name: script: derivation {{
    name = "${{name}}-{salt}";
    system = "x86_64-linux";
    builder = "${{bb}}/bin/sh";
    PATH = "${{bb}}/bin";
    args = [ "-c" script ];
  }};
in rec {{
  dep = drv "dep" "echo dep {salt} > $out";
  top = drv "top" "cat ${{dep}} > $out; echo top >> $out";
}}
"#,
        bb = harness::clients::busybox()
    );
    // The dependency built by the host's Nix and copied to the cache.
    let host = ClientNix::new(Client::Host, "");
    let host_file = host.scratch().join("graph.nix");
    std::fs::write(&host_file, &expr).expect("write the expression");
    let dep = lines(
        &host
            .ok(host
                .command("nix-build")
                .arg(&host_file)
                .args(["-A", "dep", "--no-out-link"]))
            .stdout,
    )
    .pop()
    .expect("the dependency's output");
    let cache = BinaryCache::new();
    cache.copy(
        &host,
        std::slice::from_ref(&dep),
        "xz",
        "test-cache-1.secret",
    );
    let http = HttpServer::serve(cache.dir());

    let setup = Setup::with_config(which, way, &config(&http.url()));
    let file = setup.nix.scratch().join("graph.nix");
    std::fs::write(&file, &expr).expect("write the expression");
    let file = file.to_str().expect("a UTF-8 path");
    // With the `.drv` files on the server, a dry run (QueryMissing) says what the build
    // will fetch and what it will build. (Nix 2.8's `nix copy` takes a `.drv` for its
    // outputs, so it cannot copy the derivations alone.)
    if which != Client::Host {
        let drv = lines(
            &setup
                .nix
                .ok(setup
                    .nix
                    .command("nix-instantiate")
                    .arg(file)
                    .args(["-A", "top"]))
                .stdout,
        )
        .pop()
        .expect("the top's .drv");
        must(
            &setup,
            "copying the derivations",
            setup
                .cmd(ALICE, "nix")
                .args(["copy", "--to", &setup.uri(ALICE), &drv]),
        );
        let dry = must(
            &setup,
            "the dry run",
            &mut setup.nix(
                ALICE,
                &[
                    "build",
                    "--dry-run",
                    "--eval-store",
                    "auto",
                    "-f",
                    file,
                    "top",
                ],
            ),
        );
        let dry = String::from_utf8_lossy(&dry.stderr);
        assert_eq!(listed(&dry, "will be fetched"), vec![dep.clone()], "{dry}");
        let built = listed(&dry, "will be built");
        assert_eq!(built.len(), 1, "{dry}");
        assert!(built[0].ends_with(&format!("top-{salt}.drv")), "{dry}");
    }
    let words = [
        "build",
        "--eval-store",
        "auto",
        "--no-link",
        "-f",
        file,
        "top",
    ];
    let out = must(
        &setup,
        "the remote-store build",
        &mut setup.nix(ALICE, &words),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("copying path '{dep}' from '{}'", http.url())),
        "{stderr}"
    );
    let log = setup.stop().log;
    assert_eq!(
        count(&log, "nixbuild::substitute: substituted path=", &dep),
        1,
        "{log}"
    );
    assert_eq!(
        count(&log, "nixbuild::build: building ", &format!("dep-{salt}")),
        0,
        "{log}"
    );
    assert_eq!(
        count(&log, "nixbuild::build: building ", &format!("top-{salt}")),
        1,
        "{log}"
    );
}

#[test]
fn nix_2_8_host_remote_store_build_fetches_a_dependency_instead_of_building_it() {
    remote_store_build_fetches_a_dependency(Client::Host, Way::Relay);
}

#[test]
fn nix_2_26_trixie_remote_store_build_fetches_a_dependency_instead_of_building_it() {
    remote_store_build_fetches_a_dependency(Client::Trixie, Way::Relay);
}

#[test]
fn nix_2_34_sid_remote_store_build_fetches_a_dependency_instead_of_building_it() {
    remote_store_build_fetches_a_dependency(Client::Sid, Way::Ssh);
}

// The abuse cases of substitution, over scripted sessions (QueryValidPaths with
// `substitute`) against a cache made here: NARs stored uncompressed, narinfos signed with
// the trusted test key unless a case says otherwise.

/// A synthetic cache entry: `path` holding a file with `contents`, referring to `refs`,
/// its narinfo edited by `edit` before it is signed with the trusted key.
fn fake_entry(
    dir: &std::path::Path,
    path: &StorePath,
    contents: &[u8],
    refs: &[&StorePath],
    edit: impl FnOnce(&mut NarInfo),
) {
    use nixbuild_core::binary_cache::Compression;
    let nar = harness::file_nar(contents);
    let name = format!("nar/{}.nar", path.hash_part());
    std::fs::create_dir_all(dir.join("nar")).expect("mkdir nar");
    std::fs::write(dir.join(&name), &nar).expect("write the NAR");
    let mut info = NarInfo {
        store_path: path.clone(),
        url: name,
        compression: Compression::None,
        file_hash: None,
        file_size: Some(nar.len() as u64),
        nar_hash: harness::sha256(&nar),
        nar_size: nar.len() as u64,
        references: refs.iter().map(|r| (*r).clone()).collect(),
        deriver: None,
        system: None,
        sigs: Default::default(),
        ca: None,
    };
    edit(&mut info);
    let key = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("nixbuild-core/tests/data/binary-cache/test-cache-1.secret");
    let key =
        SecretKey::parse(&std::fs::read_to_string(key).expect("read the key")).expect("a key");
    info.sigs.insert(key.sign(info.fingerprint().as_bytes()));
    std::fs::write(
        dir.join(format!("{}.narinfo", path.hash_part())),
        info.to_text(),
    )
    .expect("write the narinfo");
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").expect("nix-cache-info");
}

/// A path named `name` whose hash part is unique to `salt` and `name`.
fn fresh(salt: &str, name: &str) -> StorePath {
    harness::test_path(&format!("{salt}-{name}"), name)
}

/// QueryValidPaths of `paths` with `substitute` as `account` (with `--write` when `write`):
/// the paths the server answers valid.
fn query_substituting(
    d: &Daemon,
    account: &str,
    write: bool,
    paths: &[&StorePath],
) -> BTreeSet<StorePath> {
    let query = Request::QueryValidPaths {
        lock: false,
        substitute: true,
        paths: paths.iter().map(|p| (*p).clone()).collect(),
    };
    let script = harness::Script::new().request(&query);
    let reply = d.relay(account, write, &script.bytes);
    match reply.responses(&script.ops).pop() {
        Some(Response::ValidPaths(valid)) => valid,
        other => panic!("not a ValidPaths answer: {other:?}"),
    }
}

#[test]
fn an_upload_never_poisons_what_other_accounts_substitute() {
    let cache = BinaryCache::new();
    let path = harness::test_path(&salt(), "tool");
    fake_entry(cache.dir(), &path, b"the real tool\n", &[], |_| {});
    let d = Daemon::start_with_config(&config(&cache.file_url()), &[]);
    // Mallory uploads her own contents under the path first (it is input-addressed: the
    // server cannot tell), then asks for it to be substituted.
    let fake = harness::file_nar(b"a trojan\n");
    let reply = d.relay(
        "mallory",
        true,
        &harness::Script::new().add_honest(&path, &fake).bytes,
    );
    assert_eq!(reply.status, 0, "{reply:?}");
    assert_eq!(
        query_substituting(&d, "mallory", true, &[&path]),
        BTreeSet::from([path.clone()])
    );
    // Alice gets the cache's, which is what the server holds publicly.
    assert_eq!(
        query_substituting(&d, "alice", true, &[&path]),
        BTreeSet::from([path.clone()])
    );
    let stopped = d.stop();
    let hash = |account| {
        stopped
            .store
            .query_path_info(account, &path)
            .expect("query")
            .and_then(|i| i.nar_hash)
            .expect("valid")
    };
    let real = harness::sha256(&harness::file_nar(b"the real tool\n"));
    assert_eq!(hash("alice"), real);
    assert_eq!(hash(PUBLIC_ACCOUNT), real);
    assert_eq!(
        hash("mallory"),
        harness::sha256(&fake),
        "her own view keeps her upload"
    );
}

#[test]
fn a_read_only_session_fetches_nothing() {
    let cache = BinaryCache::new();
    let path = harness::test_path(&salt(), "tool");
    fake_entry(cache.dir(), &path, b"tool\n", &[], |_| {});
    let http = HttpServer::serve(cache.dir());
    let d = Daemon::start_with_config(&config(&http.url()), &[]);
    assert!(query_substituting(&d, "alice", false, &[&path]).is_empty());
    assert_eq!(http.requests(), vec![], "nothing asked of the cache");
    assert_eq!(
        query_substituting(&d, "alice", true, &[&path]),
        BTreeSet::from([path])
    );
}

#[test]
fn hostile_narinfos_register_nothing_and_the_server_goes_on() {
    let cache = BinaryCache::new();
    let dir = cache.dir();
    let s = salt();
    // A URL that leaves the cache (for file://, a file anywhere on the server).
    let escape = fresh(&s, "escape");
    fake_entry(dir, &escape, b"x\n", &[], |i| {
        i.url = "../../../../etc/passwd".into()
    });
    // A narinfo of 2 MiB.
    let huge = fresh(&s, "huge");
    fake_entry(dir, &huge, b"x\n", &[], |i| {
        i.system = Some("x".repeat(2 << 20))
    });
    // Two paths each claiming to refer to the other (real store paths cannot).
    let (a, b) = (fresh(&s, "cycle-a"), fresh(&s, "cycle-b"));
    fake_entry(dir, &a, b"a\n", &[&b], |_| {});
    fake_entry(dir, &b, b"b\n", &[&a], |_| {});
    // A narinfo for another path than its name says.
    let (asked, other) = (fresh(&s, "asked"), fresh(&s, "other"));
    fake_entry(dir, &other, b"o\n", &[], |_| {});
    std::fs::copy(
        dir.join(format!("{}.narinfo", other.hash_part())),
        dir.join(format!("{}.narinfo", asked.hash_part())),
    )
    .expect("copy a narinfo");
    // A NAR longer than its NarSize says (and signed so).
    let long = fresh(&s, "long");
    fake_entry(dir, &long, b"long contents\n", &[], |i| i.nar_size -= 8);
    // An unsupported compression.
    let brotli = fresh(&s, "brotli");
    fake_entry(dir, &brotli, b"br\n", &[], |i| {
        i.compression = nixbuild_core::binary_cache::Compression::parse("br")
    });
    // And one good entry, which must still come through.
    let good = fresh(&s, "good");
    fake_entry(dir, &good, b"good\n", &[], |_| {});

    let d = Daemon::start_with_config(&config(&cache.file_url()), &[]);
    let all = [&escape, &huge, &a, &b, &asked, &long, &brotli, &good];
    assert_eq!(
        query_substituting(&d, "alice", true, &all),
        BTreeSet::from([good.clone()])
    );
    let stopped = d.stop();
    let log = &stopped.log;
    for (path, cause) in [
        (&escape, "is not a relative path inside the cache"),
        (&huge, "is larger than 1048576 bytes"),
        (&a, "references form a cycle"),
        (&asked, &format!("describes {other}, not {asked}") as &str),
        (&long, "the NAR is longer than the narinfo's NarSize"),
        (&brotli, "compression br is not supported"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("path={path}")) && l.contains(cause)),
            "no {cause:?} for {path}:\n{log}"
        );
    }
    for p in [&escape, &huge, &a, &b, &asked, &long, &brotli] {
        assert!(
            !stopped.valid(PUBLIC_ACCOUNT, p) && !stopped.valid("alice", p),
            "{p}"
        );
    }
    assert!(stopped.valid("alice", &good));
}

#[test]
fn nix_2_34_sid_copy_substitute_on_destination_fetches_on_the_server() {
    let salt = salt();
    let (cache, files) = cache_of_inputs(&salt, "xz", SMALL);
    let http = HttpServer::serve(cache.dir());
    let d = Daemon::start_with_config(&config(&http.url()), &[]);
    // Without `builders-use-substitutes`: the command's flag alone asks for substitution
    // (Nix 2.26 on; Nix 2.8's ssh-ng store sends `builders-use-substitutes` instead).
    let nix = ClientNix::new(Client::Sid, "");
    let file = nix.scratch().join("subst.nix");
    std::fs::write(&file, expression(&salt, SMALL)).expect("write the expression");
    inputs(&nix, &file);
    let uri = store_uri().replacen("ssh://", "ssh-ng://", 1);
    let top = files.last().expect("a top input");
    nix.ok(nix.relayed(&d, ACCOUNT, "nix").args([
        "copy",
        "--substitute-on-destination",
        "--to",
        &uri,
        top,
    ]));
    all_fetched_none_uploaded(&d.stop().log, &salt, SMALL);
}
