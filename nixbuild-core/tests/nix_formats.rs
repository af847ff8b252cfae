//! Cross-checks of store paths, content addresses and derivations against the real Nix 2.8.
//!
//! These tests need `nix-store` and `nix-instantiate`; without them they fail.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use common::Nix;
use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::derivation::Derivation;
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::store_path::{make_fixed_output_path, StorePath};

fn store_path(s: &str) -> StorePath {
    StorePath::from_absolute_path(s.trim().as_bytes())
        .unwrap_or_else(|e| panic!("Nix printed an invalid store path {s:?}: {e}"))
}

/// The `ca` and `narHash` Nix recorded for `path`, from `nix path-info --json`.
fn path_info(nix: &Nix, path: &StorePath) -> (ContentAddress, Hash) {
    let json = String::from_utf8(nix.run("nix", ["path-info", "--json", &path.to_absolute()]))
        .expect("utf-8 json");
    let field = |key: &str| {
        let start = json
            .find(&format!("\"{key}\":\""))
            .unwrap_or_else(|| panic!("no {key} in {json}"))
            + key.len()
            + 4;
        let len = json[start..].find('"').expect("closing quote");
        json[start..start + len].to_owned()
    };
    let ca_text = field("ca");
    let ca = ContentAddress::parse(&ca_text).expect("Nix's ca parses");
    assert_eq!(ca.to_string(), ca_text, "we print ca as Nix does");
    let nar_hash = Hash::parse_any(&field("narHash"), None).expect("Nix's narHash parses");
    (ca, nar_hash)
}

/// A small tree with a regular file, an executable, a symlink and a subdirectory.
fn make_tree(dir: &Path, salt: &str) {
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("file"), format!("hello {salt}\n")).expect("write");
    let exe = dir.join("sub/run");
    std::fs::write(&exe, "#!/bin/sh\necho hi\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink("file", dir.join("link")).expect("symlink");
}

#[test]
fn add_matches_nix_store_add() {
    let nix = Nix::new();
    let salt = Nix::salt();
    let file = nix.scratch().join(format!("file-{salt}"));
    std::fs::write(&file, format!("contents {salt}\n\"\\\n")).expect("write");
    let dir = nix.scratch().join(format!("dir-{salt}"));
    make_tree(&dir, &salt);

    for path in [&file, &dir] {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        let nar_hash = Hash::compute(HashAlgo::Sha256, &nix.dump(path));
        let ca = ContentAddress {
            method: ContentAddressMethod::Recursive,
            hash: nar_hash,
        };
        let ours = make_fixed_output_path(name, &ca, &BTreeSet::new(), false).expect("valid");
        let theirs = store_path(&nix.run_line("nix-store", ["--add".as_ref(), path.as_os_str()]));
        assert_eq!(ours, theirs, "nix-store --add {name}");
        assert_eq!(path_info(&nix, &theirs), (ca, nar_hash));
    }
}

#[test]
fn add_fixed_matches_nix_store_add_fixed() {
    let nix = Nix::new();
    let salt = Nix::salt();
    let file = nix.scratch().join(format!("fixed-{salt}"));
    std::fs::write(&file, format!("fixed contents {salt}\n")).expect("write");
    let dir = nix.scratch().join(format!("fixed-dir-{salt}"));
    make_tree(&dir, &salt);
    let contents = std::fs::read(&file).expect("read");

    let cases = [
        (ContentAddressMethod::Flat, HashAlgo::Sha1, &file),
        (ContentAddressMethod::Flat, HashAlgo::Sha256, &file),
        (ContentAddressMethod::Flat, HashAlgo::Sha512, &file),
        (ContentAddressMethod::Recursive, HashAlgo::Sha256, &dir),
        (ContentAddressMethod::Recursive, HashAlgo::Sha1, &dir),
        (ContentAddressMethod::Recursive, HashAlgo::Sha1, &file),
    ];
    for (method, algo, path) in cases {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        let nar = nix.dump(path);
        let hash = match method {
            ContentAddressMethod::Recursive => Hash::compute(algo, &nar),
            _ => Hash::compute(algo, &contents),
        };
        let ca = ContentAddress { method, hash };
        let ours = make_fixed_output_path(name, &ca, &BTreeSet::new(), false).expect("valid");

        let mut args = vec!["--add-fixed".as_ref()];
        if method == ContentAddressMethod::Recursive {
            args.push("--recursive".as_ref());
        }
        args.push(algo.name().as_ref());
        args.push(path.as_os_str());
        let theirs = store_path(&nix.run_line("nix-store", args));
        assert_eq!(ours, theirs, "nix-store --add-fixed {method:?} {algo}");
        let nar_hash = Hash::compute(HashAlgo::Sha256, &nar);
        assert_eq!(
            path_info(&nix, &theirs),
            (ca, nar_hash),
            "{method:?} {algo}"
        );
    }
}

/// A set of derivations covering the cases of docs/serve-protocol.md §9 and §8.4–8.7. Nothing is
/// built.
const EXPRESSION: &str = r#"
{ salt }:
let
  mk = attrs: builtins.derivation ({ system = "x86_64-linux"; builder = "/bin/sh"; } // attrs);
  h = algo: builtins.hashString algo "content-${salt}";
  fixed = mode: algo: extra: mk ({
    name = "fixed-${mode}-${algo}-${salt}";
    outputHashMode = mode;
    outputHashAlgo = algo;
    outputHash = h algo;
  } // extra);
in rec {
  flat1 = fixed "flat" "sha1" { };
  flat256 = fixed "flat" "sha256" { };
  flat512 = fixed "flat" "sha512" { };
  rec1 = fixed "recursive" "sha1" { };
  rec256 = fixed "recursive" "sha256" { };
  rec512 = fixed "recursive" "sha512" { };
  # the same output as rec256 from another .drv: both modulo hashes merge in dependents
  rec256b = fixed "recursive" "sha256" { args = [ "-c" "other" ]; };
  multi = mk { name = "multi-${salt}"; outputs = [ "out" "lib" "dev" ]; };
  script = builtins.toFile "script-${salt}" "echo \"hi\"\n";
  weird = mk {
    name = "weird-${salt}";
    args = [ "-c" script "a \"quoted\" \\ back\tslash\nnew\rline" ];
    env1 = "tab\there";
    "key\"with\\odd" = "v\\";
    empty = "";
  };
  dependent = mk {
    name = "dependent-${salt}";
    deps = [ flat1 flat512 rec1 rec512 rec256 rec256b multi.lib multi.dev weird ];
    outputs = [ "out" "doc" ];
  };
  # two regular derivations with the same modulo hash (their inputs are rec256 and rec256b),
  # used with different outputs: their output sets merge under the one hash
  twin1 = mk { name = "twin-${salt}"; dep = rec256; outputs = [ "out" "lib" ]; };
  twin2 = mk { name = "twin-${salt}"; dep = rec256b; outputs = [ "out" "lib" ]; };
  twins = mk { name = "twins-${salt}"; a = twin1.out; b = twin2.lib; };
  chained = mk { name = "chained-${salt}"; dep = dependent.doc; inherit script; };
  structured = mk {
    name = "structured-${salt}";
    __structuredAttrs = true;
    nested = { a = [ 1 "two\n\"" { three = dependent; } ]; };
    outputs = [ "out" "bin" ];
  };
}
"#;

/// Parses `.drv` files from the store and computes their modulo hashes, memoised.
#[derive(Default)]
struct Resolver {
    hashes: HashMap<StorePath, Hash>,
}

impl Resolver {
    fn read(path: &StorePath) -> Derivation {
        let text = std::fs::read(path.to_absolute()).expect("read .drv");
        let drv = Derivation::from_aterm(&text)
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", String::from_utf8_lossy(&text)));
        assert_eq!(
            String::from_utf8_lossy(&drv.to_aterm()),
            String::from_utf8_lossy(&text),
            "{path}: print(parse(x)) == x"
        );
        drv
    }

    fn hash_modulo(&mut self, path: &StorePath) -> Hash {
        if let Some(h) = self.hashes.get(path) {
            return *h;
        }
        let drv = Resolver::read(path);
        let inputs: BTreeMap<StorePath, Hash> = drv
            .input_drvs
            .keys()
            .map(|p| (p.clone(), self.hash_modulo(p)))
            .collect();
        let h = drv
            .hash_modulo(false, |p| inputs.get(p).copied())
            .expect("inputs resolved");
        self.hashes.insert(path.clone(), h);
        h
    }
}

#[test]
fn derivations_match_nix_instantiate() {
    let nix = Nix::new();
    let salt = Nix::salt();
    let expr = nix.scratch().join("drvs.nix");
    std::fs::write(&expr, EXPRESSION).expect("write expression");
    let out = String::from_utf8(nix.run(
        "nix-instantiate",
        [
            expr.as_os_str(),
            "--argstr".as_ref(),
            "salt".as_ref(),
            salt.as_ref(),
        ],
    ))
    .expect("utf-8");
    let drv_paths: Vec<StorePath> = out.lines().map(store_path).collect();
    assert_eq!(drv_paths.len(), 15, "one .drv per derivation: {out}");

    let mut resolver = Resolver::default();
    let mut kinds = BTreeSet::new();
    for drv_path in &drv_paths {
        let drv = Resolver::read(drv_path);
        let name = drv_path.name().strip_suffix(".drv").expect(".drv suffix");
        assert_eq!(drv.drv_path(name).expect("valid"), *drv_path);

        let inputs: BTreeMap<StorePath, Hash> = drv
            .input_drvs
            .keys()
            .map(|p| (p.clone(), resolver.hash_modulo(p)))
            .collect();
        let resolve = |p: &StorePath| inputs.get(p).copied();
        drv.verify_output_paths(name, resolve)
            .unwrap_or_else(|e| panic!("{drv_path}: {e}"));
        let computed = drv.compute_output_paths(name, resolve).expect("computes");
        let listed: BTreeSet<StorePath> =
            String::from_utf8(nix.run("nix-store", ["-q", "--outputs", &drv_path.to_absolute()]))
                .expect("utf-8")
                .lines()
                .map(store_path)
                .collect();
        assert_eq!(
            computed.values().cloned().collect::<BTreeSet<_>>(),
            listed,
            "{drv_path}: nix-store -q --outputs"
        );

        if let Some((_, ca)) = drv.basic.fixed_output() {
            kinds.insert(format!("{:?} {}", ca.method, ca.hash.algo()));
        }
        if !drv.input_drvs.is_empty() {
            kinds.insert("input drvs".into());
        }
        let mut by_hash: HashMap<Hash, BTreeSet<&String>> = HashMap::new();
        for (path, outputs) in &drv.input_drvs {
            let set = by_hash.entry(inputs[path]).or_default();
            if !set.is_empty() && !outputs.iter().all(|o| set.contains(o)) {
                kinds.insert("inputs sharing a hash, with different outputs".into());
            }
            set.extend(outputs);
        }
        if !drv.basic.input_srcs.is_empty() {
            kinds.insert("input srcs".into());
        }
        if drv.basic.outputs.len() > 1 {
            kinds.insert("several outputs".into());
        }
        if drv.basic.env.contains_key(&b"__json"[..]) {
            kinds.insert("structured attrs".into());
        }
    }
    // the expression covers what it is meant to
    assert_eq!(
        kinds,
        [
            "Flat sha1",
            "Flat sha256",
            "Flat sha512",
            "Recursive sha1",
            "Recursive sha256",
            "Recursive sha512",
            "input drvs",
            "input srcs",
            "inputs sharing a hash, with different outputs",
            "several outputs",
            "structured attrs"
        ]
        .map(String::from)
        .into(),
    );
}
