//! A test's Nix client with an expression of salted derivations whose builder is a static
//! busybox, built on a test daemon with the real Nix 2.8 as a remote builder.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::common::{run_ok, Nix};
pub use crate::harness::{builders, lines};
use crate::harness::{example_bin, store_uri, Daemon};

/// A test's Nix, its salt, and a static busybox added to the local store as the builders'
/// shell (`<bb>/bin/sh`, with every applet built in).
pub struct Lab {
    /// The test's Nix.
    pub nix: Nix,
    /// The salt in every derivation's name.
    pub salt: String,
    expr_file: PathBuf,
}

impl Lab {
    /// `body` is a Nix expression over `mk` (name → script → extra attributes → derivation),
    /// `salt` and `bb`.
    pub fn new(body: &str) -> Lab {
        Lab::with_conf(body, "")
    }

    /// Like [`Lab::new`], with `extra` lines in the client's `nix.conf`.
    pub fn with_conf(body: &str, extra: &str) -> Lab {
        let nix = Nix::with_conf(extra);
        let salt = Nix::salt();
        let bb = nix.scratch().join("bb");
        std::fs::create_dir_all(bb.join("bin")).expect("mkdir bb/bin");
        std::fs::copy("/bin/busybox", bb.join("bin/busybox")).expect(
            "copy /bin/busybox (Debian's busybox-static; the README's test command installs it)",
        );
        std::os::unix::fs::symlink("busybox", bb.join("bin/sh")).expect("symlink sh");
        let expr_file = nix.scratch().join("default.nix");
        std::fs::write(
            &expr_file,
            format!(
                r#"let
  salt = "{salt}";
  bb = builtins.path {{ path = {bb}; name = "busybox-static"; }};
  mk = name: script: extra: derivation ({{
    name = "${{name}}-${{salt}}";
    system = "x86_64-linux";
    builder = "${{bb}}/bin/sh";
    args = [ "-c" script ];
    PATH = "${{bb}}/bin";
  }} // extra);
in
{body}
"#,
                bb = bb.display()
            ),
        )
        .expect("write default.nix");
        Lab {
            nix,
            salt,
            expr_file,
        }
    }

    /// `nix-instantiate`: the `.drv` paths of the expression's derivations (by attribute).
    pub fn instantiate(&self, attrs: &[&str]) -> Vec<String> {
        let mut cmd = self.nix.command("nix-instantiate");
        cmd.arg(&self.expr_file);
        for a in attrs {
            cmd.args(["-A", a]);
        }
        let out = run_ok(&mut cmd);
        lines(&out.stdout)
    }

    /// `nix-build` of `drvs` on the daemon only (`--max-jobs 0`), as `account`.
    pub fn remote_build(
        &self,
        d: &Daemon,
        account: &str,
        drvs: &[String],
        extra: &[&str],
    ) -> Output {
        let mut cmd = self.remote_command(d, account, &builders(), drvs);
        cmd.args(extra);
        cmd.output().expect("run nix-build")
    }

    /// The `nix-build` command of `drvs` on the daemon only (`--max-jobs 0`) with the
    /// machines of `builders`, as `account`.
    pub fn remote_command(
        &self,
        d: &Daemon,
        account: &str,
        builders: &str,
        drvs: &[String],
    ) -> Command {
        let mut cmd = d.point(self.nix.command("nix-build"), account);
        cmd.args(["--max-jobs", "0", "--no-out-link", "--builders", builders])
            .args(drvs);
        cmd
    }

    /// A store URI for the daemon of its own: the relay under another name in this lab's
    /// scratch directory. The client keeps its job slots per URI (lock files in
    /// `/nix/var/nix/current-load`), so clients on different URIs do not share slots.
    pub fn own_store_uri(&self, name: &str) -> String {
        let relay = self.nix.scratch().join(name);
        std::os::unix::fs::symlink(example_bin("nixbuild-serve"), &relay)
            .expect("symlink the relay");
        format!("ssh://localhost?remote-program={}", relay.display())
    }

    /// Like [`Lab::remote_build`], and it must succeed: the output paths.
    pub fn remote_build_ok(&self, d: &Daemon, account: &str, drvs: &[String]) -> Vec<String> {
        let out = self.remote_build(d, account, drvs, &[]);
        assert!(
            out.status.success(),
            "nix-build failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log()
        );
        lines(&out.stdout)
    }

    /// Rebuilds `drv` locally in Nix's own sandbox with `--check`: Nix fails unless every
    /// output's NAR equals the one it has (the one nixbuild built).
    pub fn check_locally(&self, drv: &str) {
        run_ok(&mut self.check_command(drv, false));
    }

    /// `nix-build --check` of `drv` in Nix's own sandbox (as root, with the nixbld build
    /// users); with `keep`, a differing result is kept as `<out>.check` (`-K`).
    pub fn check_command(&self, drv: &str, keep: bool) -> Command {
        let mut cmd = self.nix.command("nix-build");
        if keep {
            cmd.arg("-K");
        }
        cmd.args([
            "--check",
            "--no-out-link",
            "--max-jobs",
            "1",
            "--builders",
            "",
            "--option",
            "sandbox",
            "true",
            "--option",
            "build-users-group",
            "nixbld",
            drv,
        ]);
        cmd
    }

    /// The NAR hash the client recorded for `path`.
    pub fn local_nar_hash(&self, path: &str) -> String {
        let out = run_ok(self.nix.command("nix").args(["path-info", "--json", path]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        v[0]["narHash"].as_str().expect("narHash").to_owned()
    }

    /// The NAR hash the server recorded for `path` for `account`.
    pub fn server_nar_hash(&self, d: &Daemon, account: &str, path: &str) -> String {
        let mut cmd = d.point(self.nix.command("nix"), account);
        cmd.args(["path-info", "--json", "--store", &store_uri(), path]);
        let out = run_ok(&mut cmd);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        v[0]["narHash"].as_str().expect("narHash").to_owned()
    }
}

/// How many times the daemon's log shows a build of `drv` starting in the sandbox.
pub fn builds_of(log: &str, drv: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("nixbuild::build: building ") && l.contains(&format!("drv={drv} ")))
        .count()
}

/// Asserts that each of `drvs` was built exactly once on the daemon.
pub fn assert_built_once(d: &Daemon, drvs: &[String]) {
    let log = d.log();
    for drv in drvs {
        assert_eq!(builds_of(&log, drv), 1, "{drv} in the daemon log:\n{log}");
    }
}
