//! Builds end to end with the real Nix 2.8 client as a remote builder:
//! `nix-build --max-jobs 0 --builders 'ssh://localhost?remote-program=<nixbuild-serve> …'`.
//! Nix runs the relay itself (no ssh); the relay reaches a daemon on a temporary state
//! directory. Every derivation is salted for the run, so no output is valid anywhere before,
//! and the daemon's log shows that each build ran there. Where an output's bytes matter, a
//! local `nix-build --check` in Nix's own sandbox must reproduce them exactly.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;
mod lab;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::run_ok;
use common::Nix;
use harness::{store_uri, Daemon};
use lab::{assert_built_once, lines, Lab};

#[test]
fn trivial_build_matches_nix_sandbox_and_registers_on_the_server() {
    let lab = Lab::new(r#"{ t = mk "trivial" "echo hello $SALT > $out" { SALT = salt; }; }"#);
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["t"]);
    let outs = lab.remote_build_ok(&d, "alice", &drvs);
    assert_built_once(&d, &drvs);
    assert_eq!(
        std::fs::read_to_string(&outs[0]).expect("read the output"),
        format!("hello {}\n", lab.salt)
    );
    assert_eq!(
        lab.local_nar_hash(&outs[0]),
        lab.server_nar_hash(&d, "alice", &outs[0])
    );
    lab.check_locally(&drvs[0]);
    // Another account does not see alice's output.
    let mut cmd = d.point(lab.nix.command("nix"), "bob");
    cmd.args(["path-info", "--store", &store_uri(), &outs[0]]);
    assert!(!cmd.output().expect("nix path-info").status.success());
}

#[test]
fn fifty_independent_builds_in_one_invocation() {
    let lab = Lab::new(
        r#"builtins.listToAttrs (map (i: { name = "d${toString i}"; value = mk "indep-${toString i}" "echo ${toString i} > $out" {}; }) (builtins.genList (i: i) 50))"#,
    );
    let d = Daemon::start(&[]);
    let attrs: Vec<String> = (0..50).map(|i| format!("d{i}")).collect();
    let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let drvs = lab.instantiate(&attrs);
    assert_eq!(drvs.len(), 50);
    let outs = lab.remote_build_ok(&d, "a", &drvs);
    assert_eq!(outs.len(), 50);
    assert_built_once(&d, &drvs);
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(out).expect("read"),
            format!("{i}\n")
        );
    }
}

#[test]
fn chain_of_twenty_dependent_builds() {
    let lab = Lab::new(
        r#"let step = n: if n == 0 then mk "chain-0" "echo 0 > $out" {} else let prev = step (n - 1); in mk "chain-${toString n}" "cat ${prev} > $out; echo ${toString n} >> $out" {}; in { top = step 19; }"#,
    );
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["top"]);
    let outs = lab.remote_build_ok(&d, "a", &drvs);
    let expected: String = (0..20).map(|i| format!("{i}\n")).collect();
    assert_eq!(std::fs::read_to_string(&outs[0]).expect("read"), expected);
    // Every link of the chain ran on the server.
    let log = d.log();
    let built = log
        .lines()
        .filter(|l| {
            l.contains("nixbuild::build: building ") && l.contains(&format!("-{}.drv ", lab.salt))
        })
        .count();
    assert_eq!(built, 20, "{log}");
    lab.check_locally(&drvs[0]);
}

#[test]
fn outputs_referencing_each_other_symlinks_and_executables() {
    let lab = Lab::new(
        r#"{
  multi = mk "multi" ''
    mkdir -p $lib/lib $dev $out/bin
    echo "lib of $SALT" > $lib/lib/data
    echo "$lib/lib/data" > $out/bin/where
    printf '#!/bin/sh\necho run\n' > $out/bin/run
    chmod +x $out/bin/run
    ln -s run $out/bin/link
    ln -s /nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-dangling $out/dangling
    echo "$out" > $dev/out-path
  '' { outputs = [ "out" "dev" "lib" ]; SALT = salt; };
}"#,
    );
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["multi"]);
    let drv_outputs = lines(
        &run_ok(
            lab.nix
                .command("nix-store")
                .args(["--query", "--outputs", &drvs[0]]),
        )
        .stdout,
    );
    lab.remote_build_ok(&d, "a", &drvs);
    assert_built_once(&d, &drvs);
    let out = drv_outputs
        .iter()
        .find(|p| !p.ends_with("-dev") && !p.ends_with("-lib"))
        .expect("out");
    let dev = drv_outputs
        .iter()
        .find(|p| p.ends_with("-dev"))
        .expect("dev");
    let lib = drv_outputs
        .iter()
        .find(|p| p.ends_with("-lib"))
        .expect("lib");
    let refs = |p: &str| {
        lines(
            &run_ok(
                lab.nix
                    .command("nix-store")
                    .args(["--query", "--references", p]),
            )
            .stdout,
        )
    };
    assert_eq!(refs(out), vec![lib.clone()]);
    assert_eq!(refs(dev), vec![out.clone()]);
    assert!(refs(lib).is_empty());
    let out = Path::new(out);
    assert_eq!(
        std::fs::read_link(out.join("bin/link")).expect("link"),
        Path::new("run")
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("bin/run"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555);
    }
    for p in &drv_outputs {
        assert_eq!(
            lab.local_nar_hash(p),
            lab.server_nar_hash(&d, "a", p),
            "{p}"
        );
    }
    lab.check_locally(&drvs[0]);
}

#[test]
fn fixed_output_derivations_flat_and_recursive() {
    // The expected hashes are computed here from the salted contents.
    let nix = Nix::new();
    let salt = Nix::salt();
    let flat = format!("flat {salt}\n");
    let flat_sha256 = sha256_hex(flat.as_bytes());
    let tree = nix.scratch().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("sub/file"), format!("rec {salt}\n")).expect("write");
    let rec_sha256 = nix.run_line(
        "nix-hash",
        [
            std::ffi::OsStr::new("--type"),
            "sha256".as_ref(),
            "--base32".as_ref(),
            tree.as_os_str(),
        ],
    );
    let rec_sha1 = nix.run_line(
        "nix-hash",
        [
            std::ffi::OsStr::new("--type"),
            "sha1".as_ref(),
            "--base32".as_ref(),
            tree.as_os_str(),
        ],
    );
    let flat_sha512 = nix.run_line(
        "nix-hash",
        [
            std::ffi::OsStr::new("--type"),
            "sha512".as_ref(),
            "--flat".as_ref(),
            "--base32".as_ref(),
            write_tmp(&nix, "flat512", &flat).as_os_str(),
        ],
    );
    let body = format!(
        r#"{{
  flat = mk "fod-flat" "printf 'flat {salt}\n' > $out" {{ outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{flat_sha256}"; }};
  flat512 = mk "fod-flat512" "printf 'flat {salt}\n' > $out" {{ outputHashMode = "flat"; outputHashAlgo = "sha512"; outputHash = "{flat_sha512}"; }};
  recur = mk "fod-rec" "mkdir -p $out/sub; printf 'rec {salt}\n' > $out/sub/file" {{ outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "{rec_sha256}"; }};
  recur1 = mk "fod-rec1" "mkdir -p $out/sub; printf 'rec {salt}\n' > $out/sub/file" {{ outputHashMode = "recursive"; outputHashAlgo = "sha1"; outputHash = "{rec_sha1}"; }};
  wrong = mk "fod-wrong" "printf 'not it {salt}\n' > $out" {{ outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{flat_sha256}"; }};
}}"#
    );
    let lab = Lab::new(&body);
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["flat", "flat512", "recur", "recur1"]);
    let outs = lab.remote_build_ok(&d, "a", &drvs);
    assert_built_once(&d, &drvs);
    assert_eq!(std::fs::read_to_string(&outs[0]).expect("read"), flat);
    for out in &outs {
        assert_eq!(
            lab.local_nar_hash(out),
            lab.server_nar_hash(&d, "a", out),
            "{out}"
        );
    }
    // The server records the content address of each fixed output.
    let mut cmd = d.point(lab.nix.command("nix"), "a");
    cmd.args(["path-info", "--json", "--store", &store_uri()])
        .args(&outs);
    let v: serde_json::Value = serde_json::from_slice(&run_ok(&mut cmd).stdout).expect("JSON");
    let cas: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["ca"].as_str().unwrap_or(""))
        .collect();
    assert!(cas.iter().all(|ca| ca.starts_with("fixed:")), "{cas:?}");
    for drv in &drvs {
        lab.check_locally(drv);
    }
    // A wrong hash is the client's OutputRejected, with both hashes.
    let wrong = lab.instantiate(&["wrong"]);
    let out = lab.remote_build(&d, "a", &wrong, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("hash mismatch in fixed-output derivation"),
        "{stderr}"
    );
    assert_built_once(&d, &wrong);
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_tmp(nix: &Nix, name: &str, contents: &str) -> PathBuf {
    let p = nix.scratch().join(name);
    std::fs::write(&p, contents).expect("write");
    p
}

#[test]
fn pass_as_file() {
    let lab = Lab::new(
        r#"{ p = mk "pass-as-file" "cp $contentsPath $out; echo $contentsPath >> $out" { passAsFile = [ "contents" ]; contents = "passed ${salt}"; }; }"#,
    );
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["p"]);
    let outs = lab.remote_build_ok(&d, "a", &drvs);
    assert_built_once(&d, &drvs);
    let text = std::fs::read_to_string(&outs[0]).expect("read");
    assert!(
        text.starts_with(&format!("passed {}/build/.attr-", lab.salt)),
        "{text}"
    );
    lab.check_locally(&drvs[0]);
}

#[test]
fn failing_builder_shows_its_log() {
    let lab = Lab::new(
        r#"{ f = mk "failing" "echo the builder of $SALT says goodbye; exit 3" { SALT = salt; }; }"#,
    );
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["f"]);
    let out = lab.remote_build(&d, "a", &drvs, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("the builder of {} says goodbye", lab.salt)),
        "{stderr}"
    );
    assert!(stderr.contains("failed with exit code 3"), "{stderr}");
    assert_built_once(&d, &drvs);
}

#[test]
fn server_side_time_limits_are_reported_to_the_client() {
    // The server's own limits (the client sets none, so nothing races them on its side).
    let lab = Lab::new(
        r#"{ ticking = mk "ticking" "while true; do echo tick; sleep 1; done" { SALT = salt; }; quiet = mk "quiet" "echo started; sleep 600" { SALT = salt; }; again = mk "ticking-again" "while true; do echo tick; sleep 1; done" { SALT = salt; }; }"#,
    );
    let d = Daemon::start_with_config("[builds]\nbuild_timeout = 5\nmax_silent_time = 3\n", &[]);
    let ticking = lab.instantiate(&["ticking"]);
    let out = lab.remote_build(&d, "a", &ticking, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("tick"), "{stderr}");
    assert!(stderr.contains("timed out after 5 seconds"), "{stderr}");
    let quiet = lab.instantiate(&["quiet"]);
    let out = lab.remote_build(&d, "a", &quiet, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("timed out after 3 seconds of silence"),
        "{stderr}"
    );
    assert_built_once(&d, &ticking);
    assert_built_once(&d, &quiet);
    let log = d.log();
    let answered = log
        .lines()
        .filter(|l| l.contains("answered BuildDerivation") && l.contains("status=TimedOut"))
        .count();
    assert_eq!(answered, 2, "{log}");
    // `systemctl reload` puts a new limit in force for the builds that start after it.
    d.write_config("[builds]\nbuild_timeout = 2\nmax_silent_time = 3\n");
    d.hangup();
    d.wait_for_log(&["configuration re-read on SIGHUP", "needs_restart=0"]);
    let again = lab.instantiate(&["again"]);
    let out = lab.remote_build(&d, "a", &again, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timed out after 2 seconds"), "{stderr}");
}

/// What a builder can see of its sandbox (docs/sandbox.md's environment-recording derivation).
const RECORD_SCRIPT: &str = r#"
{
echo "== id"; id
echo "== hostname"; hostname
echo "== ls /"; ls /
echo "== ls /dev"; ls /dev
echo "== ls /dev/pts /dev/shm"; ls /dev/pts /dev/shm
echo "== passwd"; cat /etc/passwd
echo "== group"; cat /etc/group
echo "== hosts"; cat /etc/hosts
echo "== uid_map"; cat /proc/self/uid_map
echo "== gid_map"; cat /proc/self/gid_map
echo "== net"; cut -d: -f1 /proc/net/dev
echo "== pid"; echo $$
echo "== umask"; umask
echo "== cwd"; pwd
echo "== chmod u+s"; touch f; chmod u+s f; echo "rc=$?"
echo "== stdin"; cat; echo "rc=$?"
echo "== env"; env | sort
} > $out 2>&1
"#;

/// Replaces what the sandbox parity test allows to differ (each with its reason) by a fixed
/// marker.
fn normalise_record(record: &str) -> String {
    let mut out = Vec::new();
    let mut section = "";
    for line in record.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            section = name;
            out.push(line.to_owned());
            continue;
        }
        match section {
            // The host side of the id maps: each build has its own host uid and gid
            // (docs/design.md, Builds), Nix uses its build users.
            "uid_map" | "gid_map" => {
                let fields: Vec<&str> = line.split_whitespace().collect();
                out.push(format!("{} <host> {}", fields[0], fields[2]));
            }
            // /dev/kvm: Nix 2.8 adds it whenever the host has it; nixbuild only for builds
            // that require the kvm feature.
            "ls /dev" if line == "kvm" => {}
            "env" if line.starts_with("NIX_BUILD_CORES=") => {
                // The cores the scheduler granted, where Nix gives its `cores` setting.
                out.push("NIX_BUILD_CORES=<cores>".to_owned());
            }
            _ => out.push(line.to_owned()),
        }
    }
    out.join("\n")
}

#[test]
fn sandbox_parity_with_nix() {
    let lab = Lab::new(&format!(
        "{{ record = mk \"env-record\" ''{RECORD_SCRIPT}'' {{ SALT = salt; }}; }}"
    ));
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["record"]);
    let outs = lab.remote_build_ok(&d, "a", &drvs);
    assert_built_once(&d, &drvs);
    let ours = std::fs::read_to_string(&outs[0]).expect("read the record");
    // Nix's own sandbox: `--check -K` keeps a differing result next to ours as `<out>.check`.
    let check = format!("{}.check", outs[0]);
    let _ = std::fs::remove_file(&check);
    let out = lab
        .check_command(&drvs[0], true)
        .output()
        .expect("nix-build --check");
    let theirs = if out.status.success() {
        ours.clone()
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("may not be deterministic"), "{stderr}");
        std::fs::read_to_string(&check).expect("read Nix's record")
    };
    let _ = Command::new("rm").args(["-rf", &check]).status();
    assert_eq!(
        normalise_record(&ours),
        normalise_record(&theirs),
        "\nours:\n{ours}\nNix's:\n{theirs}"
    );
    // Both records come from a sandbox (not a build run as root).
    assert!(ours.contains("uid=1000(nixbld) gid=100(nixbld)"), "{ours}");
    assert!(
        theirs.contains("uid=1000(nixbld) gid=100(nixbld)"),
        "{theirs}"
    );
    assert!(
        ours.contains("== chmod u+s\nchmod: f: Operation not permitted\nrc=1"),
        "{ours}"
    );
}

/// Compiles `tests/data/kvm-api.c` statically into `<dir>/bin/kvm-api`.
fn kvm_helper(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir bin");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kvm-api.c");
    run_ok(
        Command::new("gcc")
            .args(["-static", "-Os", "-o"])
            .arg(dir.join("bin/kvm-api"))
            .arg(&src),
    );
}

#[test]
fn a_build_requiring_kvm_gets_dev_kvm_and_runs_the_kvm_api_ioctl() {
    let helper = tempfile::tempdir().expect("temp dir");
    kvm_helper(helper.path());
    let lab = Lab::new(&format!(
        r#"let helper = builtins.path {{ path = {}; name = "kvm-api"; }}; in {{
  kvm = mk "kvm" "${{helper}}/bin/kvm-api > $out" {{ requiredSystemFeatures = [ "kvm" ]; }};
  plain = mk "no-kvm" "${{helper}}/bin/kvm-api > $out" {{ }};
}}"#,
        helper.path().display()
    ));
    let d = Daemon::start(&[]);
    let usable = nixbuild::host::kvm_usable(Path::new("/dev/kvm"));
    let capacity = d.wait_for_log(&["build capacity"]);
    let capacity = capacity
        .lines()
        .find(|l| l.contains("build capacity"))
        .expect("the capacity line");
    let drvs = lab.instantiate(&["kvm", "plain"]);
    let builders = format!(
        "{} x86_64-linux - 100 1 big-parallel,benchmark,kvm,nixos-test",
        store_uri()
    );
    let out = lab
        .remote_command(&d, "a", &builders, &drvs[..1])
        .output()
        .expect("run nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if usable == Ok(true) {
        // Offered, and the build really talks to KVM.
        assert!(capacity.contains(r#""kvm", "nixos-test"]"#), "{capacity}");
        assert!(out.status.success(), "{stderr}\n{}", d.log());
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let text = std::fs::read_to_string(&path).expect("read the output");
        assert!(text.starts_with("KVM API version "), "{text}");
        assert_built_once(&d, &drvs[..1]);
        // A build that does not require kvm has no /dev/kvm.
        let out = lab
            .remote_command(&d, "a", &builders, &drvs[1..])
            .output()
            .expect("run nix-build");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("open /dev/kvm: No such file or directory"),
            "{stderr}"
        );
    } else {
        // Without a usable /dev/kvm, neither kvm nor nixos-test is offered, and the build is
        // refused rather than run without it.
        eprintln!("this host has no /dev/kvm that builds can use: {usable:?}");
        assert!(
            !capacity.contains("kvm") && !capacity.contains("nixos-test"),
            "{capacity}"
        );
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("kvm"), "{stderr}");
    }
}

#[test]
fn repeated_builds_are_refused_rather_than_reported_as_checked() {
    let lab = Lab::new(r#"{ t = mk "repeat" "echo $SALT > $out" { SALT = salt; }; }"#);
    let d = Daemon::start(&[]);
    let drvs = lab.instantiate(&["t"]);
    let out = lab.remote_build(&d, "a", &drvs, &["--repeat", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("asked for 1 more builds of it to check that it is deterministic"),
        "{stderr}"
    );
    assert_eq!(lab::builds_of(&d.log(), &drvs[0]), 0, "{}", d.log());
    // Without --repeat it builds.
    lab.remote_build_ok(&d, "a", &drvs);
    assert_built_once(&d, &drvs);
}
