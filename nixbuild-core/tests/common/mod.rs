//! Runs the real Nix (Debian's `nix-bin`, Nix 2.8) for cross-checks, with a private
//! `NIX_CONF_DIR` so that nothing depends on `/etc/nix/nix.conf`.
//!
//! A test that needs Nix fails when Nix is missing; it never skips (docs/design.md, Tests).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A configured Nix installation for one test.
pub struct Nix {
    conf_dir: tempfile::TempDir,
}

impl Nix {
    /// Writes a private `nix.conf`: no substituters, `nix-command` enabled, and explicit
    /// sandbox and build-user settings (the cross-checks build nothing).
    pub fn new() -> Nix {
        Nix::with_conf("")
    }

    /// Like [`Nix::new`], with `extra` lines appended to `nix.conf` (e.g.
    /// `require-sigs = false` for copying unsigned paths from a remote store).
    pub fn with_conf(extra: &str) -> Nix {
        let conf_dir = tempfile::tempdir().expect("create NIX_CONF_DIR");
        std::fs::write(
            conf_dir.path().join("nix.conf"),
            format!(
                "experimental-features = nix-command\nsubstituters =\nsandbox = false\n\
                 build-users-group =\n{extra}"
            ),
        )
        .expect("write nix.conf");
        let nix = Nix { conf_dir };
        let out = nix.command("nix-store").arg("--version").output();
        match out {
            Ok(o) if o.status.success() => nix,
            _ => panic!(
                "the real Nix (`nix-store`) is required for this test: install Debian's \
                 nix-bin (the README's test command does)"
            ),
        }
    }

    /// A command for a Nix program with this test's configuration.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("NIX_CONF_DIR", self.conf_dir.path())
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_PATH")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a Nix program and returns its stdout, panicking with its stderr on failure.
    pub fn run<I, S>(&self, program: &str, args: I) -> Vec<u8>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out: Output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Like [`Nix::run`], with stdout as one trimmed UTF-8 line.
    pub fn run_line<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        String::from_utf8(self.run(program, args))
            .expect("utf-8 output")
            .trim()
            .to_owned()
    }

    /// `nix-store --dump PATH`: the NAR Nix writes for a file tree.
    pub fn dump(&self, path: &Path) -> Vec<u8> {
        self.run("nix-store", [OsStr::new("--dump"), path.as_os_str()])
    }

    /// A salt unique to this run, for names that must not collide with earlier runs.
    pub fn salt() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        format!("{nanos:x}{:x}", std::process::id())
    }

    /// Directory for scratch files of this test.
    pub fn scratch(&self) -> PathBuf {
        self.conf_dir.path().to_path_buf()
    }
}

/// Runs `cmd` and returns its output, panicking with its stderr unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
