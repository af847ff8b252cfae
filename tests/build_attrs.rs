//! Derivations as nixpkgs writes them, built on the server by each of the three Nix client
//! generations (tests/harness/clients.rs) through the relay (`--max-jobs 0 --builders
//! 'ssh://localhost?remote-program=<nixbuild-serve> …'`), and compared file by file with the
//! reference: the same derivations built in Nix 2.34's own sandbox, with its build users, in
//! the sid chroot (`--check` when the client is that Nix itself).
//!
//! The derivations cover structured attributes (`.attrs.json` and `.attrs.sh` with arrays,
//! maps, numbers, escapes and placeholders, the environment structured mode exports,
//! per-output `outputChecks`), `exportReferencesGraph` in both forms over a closure of 200
//! paths, `passAsFile`, and an output refused by its checks. Each builder writes what it saw
//! (its environment but `NIX_BUILD_CORES`, which is the grant, its identity, and the build
//! directory's files with their modes and owners) into its outputs. The derivations are
//! salted per test, and the daemon's log shows that each was built there.

mod harness;

use std::collections::BTreeMap;

use harness::clients::{busybox, read_client_file, Client, ClientNix};
use harness::{builders, lines, salt, Daemon};
use nixbuild_core::store_path::StorePath;

const ACCOUNT: &str = "alice";

/// The derivations; `@BB@` and `@SALT@` stand for the busybox path and the salt.
const EXPRESSION: &str = r#"
let
  bb = builtins.storePath "@BB@";
  salt = "@SALT@";
  mk = name: attrs: derivation ({
    name = "${name}-${salt}";
    system = "x86_64-linux";
    builder = "${bb}/bin/sh";
    PATH = "${bb}/bin";
  } // attrs);
  # What every builder records of its sandbox.
  seen = dir: ''
    env | grep -v '^NIX_BUILD_CORES=' | sort > ${dir}/env
    id > ${dir}/id
    for f in "$NIX_BUILD_TOP"/.* "$NIX_BUILD_TOP"/*; do
      if [ -f "$f" ]; then stat -c '%n %a %u %g %s' "$f"; else stat -c '%n %a %u %g %F' "$f"; fi
    done > ${dir}/build-dir
  '';
  dep = mk "dep" { args = [ "-c" "mkdir $out; echo ${bb} > $out/ref; echo dep > $out/own" ]; };
  # A closure of 200 paths, each referring to the one before.
  chain = builtins.foldl'
    (prev: i: builtins.toFile "link-${toString i}-${salt}" "${prev}\n")
    (builtins.toFile "link-0-${salt}" "first\n")
    (builtins.genList (i: i + 1) 199);
in {
  inherit dep;
  structured = mk "structured" {
    __structuredAttrs = true;
    outputs = [ "out" "dev" ];
    args = [ "-c" ''
      mkdir -p ${placeholder "out"} ${placeholder "dev"}
      cd ${placeholder "out"}
      cp "$NIX_ATTRS_JSON_FILE" attrs.json
      cp "$NIX_ATTRS_SH_FILE" attrs.sh
      ${seen "."}
      echo "the dev output" > ${placeholder "dev"}/file
    '' ];
    exportReferencesGraph = { closure = [ dep chain ]; };
    env = { FOO = "bar"; };
    outputChecks = {
      out = { maxSize = 10000000; maxClosureSize = 100000000; disallowedRequisites = [ ]; };
      dev = { allowedReferences = [ ]; maxSize = 10000; };
    };
    arr = [ 1 "two" true null 1.5 [ 1 ] "it's" "$(x) \"q\" \\ \n\t" ];
    arr2 = [ 1 "two" true false null "it's" "${placeholder "out"}/bin" (-3) ];
    emptyA = [ ]; emptyO = { }; Upper = "U"; _u = "_";
    map = { a = 1; "b c" = "x'y"; nested = { z = 1; }; };
    m2 = { a = 1; b = "s"; c = false; d = null; "k'ey" = "v"; };
    num = 42; neg = -7; big = 3000000000; huge = 123456789012345678;
    @NEWER@
    uni = "héllo ☃";
    "bad-name" = "x";
    nul = null; t = true; f = false;
  };
  legacy = mk "legacy" {
    exportReferencesGraph = [ "closure" dep "chain" chain ];
    passAsFile = [ "text" ];
    text = "passed as a file ${salt}\n";
    args = [ "-c" ''
      mkdir $out
      cp "$NIX_BUILD_TOP/closure" "$NIX_BUILD_TOP/chain" $out/
      cp "$textPath" $out/text
      ${seen "$out"}
    '' ];
  };
  refused = mk "refused" {
    __structuredAttrs = true;
    outputChecks.out.disallowedReferences = [ dep ];
    args = [ "-c" "echo ${dep} > ${placeholder "out"}" ];
  };
}
"#;

/// The files each built derivation's outputs hold, by attribute and output.
const FILES: &[(&str, &str, &[&str])] = &[
    ("dep", "out", &["ref", "own"]),
    (
        "structured",
        "out",
        &["attrs.json", "attrs.sh", "env", "id", "build-dir"],
    ),
    ("structured", "dev", &["file"]),
    (
        "legacy",
        "out",
        &["closure", "chain", "text", "env", "id", "build-dir"],
    ),
];

/// The attributes built successfully.
const BUILT: [&str; 3] = ["dep", "structured", "legacy"];

/// Attributes with floating-point numbers and control characters, in place of `@NEWER@`.
/// Nix 2.8 writes some floats and escapes (`\u0008` for `\b`) into a derivation's `__json`
/// differently from later Nix (which, reading such a `.drv`, rewrites the JSON and refuses
/// its output paths as incorrect), so there is no Nix 2.34 reference for them: the Nix 2.8
/// client's derivations go without them; the later clients' carry them.
const NEWER: &str = r#"flt = 2.5; fint = 3.0; sci = 1.0e30; small = 1.0e-7; sum = 0.1 + 0.2;
    tiny = 0.0001; mid = 1234567890123456.0; m3 = { "é" = 2.0; };
    ctl = builtins.fromJSON "\"\\u0001\\u001f\\u007f\\b\\f\\r/\"";"#;

/// A client's Nix with the expression, salted with `salt`, in its scratch directory.
struct Expr {
    nix: ClientNix,
    file: std::path::PathBuf,
}

impl Expr {
    /// The expression for `client`; `like` is the client whose expression it is the same
    /// as (for the reference, `client` is sid and `like` the client being tested).
    fn new(client: Client, like: Client, salt: &str) -> Expr {
        let nix = ClientNix::new(client, "");
        let file = nix.scratch().join("attrs.nix");
        let newer = if like == Client::Host { "" } else { NEWER };
        let text = EXPRESSION
            .replace("@BB@", &busybox())
            .replace("@SALT@", salt)
            .replace("@NEWER@", newer);
        std::fs::write(&file, text).expect("write the expression");
        Expr { nix, file }
    }

    /// The `.drv` path of each attribute.
    fn instantiate(&self, attrs: &[&str]) -> Vec<String> {
        let mut cmd = self.nix.command("nix-instantiate");
        cmd.arg(&self.file);
        for a in attrs {
            cmd.args(["-A", a]);
        }
        lines(&self.nix.ok(&mut cmd).stdout)
    }
}

/// Each output of `drv` in `nix`'s store, by name.
fn outputs(nix: &ClientNix, drv: &str) -> BTreeMap<String, String> {
    let out = nix.ok(nix.command("nix-store").args(["--query", "--outputs", drv]));
    let base = |p: &str| {
        let file = p.rsplit('/').next().unwrap_or(p);
        file.split_once('-').map_or("", |(_, n)| n).to_owned()
    };
    let name = base(drv.trim_end_matches(".drv"));
    lines(&out.stdout)
        .into_iter()
        .map(|p| {
            let b = base(&p);
            let output = match b.strip_prefix(&format!("{name}-")) {
                Some(o) => o.to_owned(),
                None => "out".to_owned(),
            };
            (output, p)
        })
        .collect()
}

/// What a file of Nix's `--check` holds when Nix kept no `.check` copy: the same bytes.
const AS_OURS: &str = "(the same as on nixbuild)";

/// Every file of [`FILES`] under `drvs`' outputs (in the order of [`BUILT`]) in `nix`'s
/// store, `suffix` added to each output's path: `(path, contents)`.
fn contents(nix: &ClientNix, drvs: &[String], suffix: &str) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for (attr, output, files) in FILES {
        let i = BUILT
            .iter()
            .position(|a| a == attr)
            .expect("a built attribute");
        let dir = format!("{}{suffix}", outputs(nix, &drvs[i])[*output]);
        for f in *files {
            let path = format!("{dir}/{f}");
            let text = if suffix.is_empty() {
                read_client_file(nix.client, &path)
            } else {
                let root = nix.client.root().unwrap_or_default();
                std::fs::read_to_string(root.join(path.trim_start_matches('/')))
                    .unwrap_or_else(|_| AS_OURS.to_owned())
            };
            all.push((path, text));
        }
    }
    all
}

/// The files that differ between ours and the reference's, with both texts.
fn differences(ours: &[(String, String)], theirs: &[(String, String)]) -> String {
    let mut out = String::new();
    for ((path, a), (_, b)) in ours.iter().zip(theirs) {
        if a != b && b != AS_OURS {
            out.push_str(&format!(
                "--- {path} on nixbuild:\n{a}\n--- in Nix's sandbox:\n{b}\n"
            ));
        }
    }
    out
}

/// Builds `drvs` (of [`BUILT`]) in Nix 2.34's sandbox in the sid chroot and returns how its
/// files differ from `ours`. A sid client's own outputs are checked in place (`--check`);
/// another client's are instantiated from the same expression in sid.
fn reference_differences(
    e: &Expr,
    salt: &str,
    drvs: &[String],
    ours: &[(String, String)],
) -> String {
    if e.nix.client == Client::Sid {
        let mut check = e.nix.sandboxed("nix-build");
        check
            .args(["--check", "--keep-failed", "--no-out-link"])
            .args(drvs);
        let out = check.output().expect("run nix-build --check");
        if out.status.success() {
            return String::new();
        }
        let theirs = contents(&e.nix, drvs, ".check");
        return format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            differences(ours, &theirs)
        );
    }
    let sid = Expr::new(Client::Sid, e.nix.client, salt);
    assert_eq!(sid.instantiate(&BUILT), drvs, "the same derivations in sid");
    let mut build = sid.nix.sandboxed("nix-build");
    build.arg("--no-out-link").args(drvs);
    sid.nix.ok(&mut build);
    differences(ours, &contents(&sid.nix, drvs, ""))
}

/// `nix-build` of `drvs` on `d` only (`--max-jobs 0`), through the relay.
fn remote_build(e: &Expr, d: &Daemon, drvs: &[String]) -> std::process::Command {
    let mut build = e.nix.relayed(d, ACCOUNT, "nix-build");
    build.args(drvs).args([
        "--no-out-link",
        "--max-jobs",
        "0",
        "--builders",
        &builders(),
    ]);
    build
}

fn structured_attrs_and_reference_graphs(client: Client) {
    let salt = salt();
    let e = Expr::new(client, client, &salt);
    let d = Daemon::start(&[]);
    let drvs = e.instantiate(&BUILT);
    e.nix.ok(&mut remote_build(&e, &d, &drvs));
    let log = d.log();
    for drv in &drvs {
        let built = log
            .lines()
            .filter(|l| {
                l.contains("nixbuild::build: building ") && l.contains(&format!("drv={drv} "))
            })
            .count();
        assert_eq!(built, 1, "{drv} in the daemon log:\n{log}");
    }
    let ours = contents(&e.nix, &drvs, "");
    // The structured form of the graph reached the builder: 200 links, dep and busybox.
    let json = &ours
        .iter()
        .find(|(p, _)| p.ends_with("/attrs.json"))
        .expect("attrs.json")
        .1;
    let attrs: serde_json::Value = serde_json::from_str(json).expect("attrs.json is JSON");
    assert_eq!(
        attrs["closure"].as_array().map(Vec::len),
        Some(202),
        "{json}"
    );
    let diff = reference_differences(&e, &salt, &drvs, &ours);
    assert!(
        diff.is_empty(),
        "{} client: not as in Nix 2.34's sandbox:\n{diff}",
        client.name()
    );

    // An output that its checks refuse: the client sees Nix's message, nothing registered.
    let refused = e.instantiate(&["refused"]).remove(0);
    let out_path = outputs(&e.nix, &refused)["out"].clone();
    let dep_out = outputs(&e.nix, &drvs[0])["out"].clone();
    let out = remote_build(&e, &d, std::slice::from_ref(&refused))
        .output()
        .expect("run nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let want = format!("output '{out_path}' is not allowed to refer to the following paths:");
    assert!(stderr.contains(&want), "{stderr}");
    assert!(stderr.contains(&dep_out), "{stderr}");
    let stopped = d.stop();
    let sp = StorePath::from_absolute_path(out_path.as_bytes()).expect("a store path");
    assert!(!stopped.valid(ACCOUNT, &sp), "{}", stopped.log);
}

#[test]
fn nix_2_8_host_structured_attrs_and_reference_graphs_as_nix_2_34() {
    structured_attrs_and_reference_graphs(Client::Host);
}

#[test]
fn nix_2_26_trixie_structured_attrs_and_reference_graphs_as_nix_2_34() {
    structured_attrs_and_reference_graphs(Client::Trixie);
}

#[test]
fn nix_2_34_sid_structured_attrs_and_reference_graphs_in_its_own_sandbox() {
    structured_attrs_and_reference_graphs(Client::Sid);
}
