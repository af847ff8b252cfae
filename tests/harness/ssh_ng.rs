//! The two ways a Nix client reaches the server over the worker protocol (`ssh-ng://`), for
//! the end-to-end tests of each client generation (tests/ssh_ng_nix.rs, tests/remote_store.rs):
//!
//! - the relay: `ssh-ng://localhost?remote-program=<nixbuild-serve>`, which Nix runs as
//!   `nixbuild-serve --stdio` (like `nix-daemon --stdio`), the account in `NIXBUILD_ACCOUNT`;
//! - the SSH server, with the real OpenSSH client and a pinned host key: `ssh-ng://<alias>`
//!   through an ssh config (`NIX_SSHOPTS=-F <config>`), which runs the exec command
//!   `nix-daemon --stdio`, the account from the key.

use std::process::{Command, Output};

use super::clients::{Client, ClientNix};
use super::example_bin;
use super::ssh::{run, Key, SshServer};

/// The first account of a [`Setup`].
pub const ALICE: &str = "alice";
/// The second account of a [`Setup`].
pub const BOB: &str = "bob";

/// How the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// The relay as the remote program of `ssh-ng://localhost`.
    Relay,
    /// The SSH server, through an ssh config alias.
    Ssh,
}

/// A client, a server (SSH on, the relay's socket too) with keys for alice and bob, and the
/// way in.
pub struct Setup {
    /// The client.
    pub nix: ClientNix,
    /// The server.
    pub server: SshServer,
    /// How the client reaches it.
    pub way: Way,
    alice: Key,
    bob: Key,
}

impl Setup {
    pub fn new(client: Client, way: Way) -> Setup {
        Setup::with_config(client, way, "")
    }

    /// Like [`Setup::new`], the server with `config` (TOML).
    pub fn with_config(client: Client, way: Way, config: &str) -> Setup {
        let nix = ClientNix::new(client, "");
        let dir = tempfile::tempdir().expect("temp dir");
        let alice = SshServer::key(dir.path(), "id_alice", "ed25519", ALICE);
        let bob = SshServer::key(dir.path(), "id_bob", "ed25519", BOB);
        let server = SshServer::start(config, dir, &[&alice, &bob]);
        Setup {
            nix,
            server,
            way,
            alice,
            bob,
        }
    }

    /// The ssh config alias of `account`'s key (one per client, so that tests running at
    /// once do not share Nix's builder slots).
    pub fn alias(&self, account: &str) -> String {
        format!("ng-{}-{account}", self.nix.client.name())
    }

    /// The store URI for `account`.
    pub fn uri(&self, account: &str) -> String {
        match self.way {
            Way::Relay => format!(
                "ssh-ng://localhost?remote-program={}",
                example_bin("nixbuild-serve").display()
            ),
            Way::Ssh => format!("ssh-ng://{}", self.alias(account)),
        }
    }

    /// A Nix program of the client that reaches the server as `account`.
    pub fn cmd(&self, account: &str, program: &str) -> Command {
        match self.way {
            Way::Relay => self.nix.relayed(&self.server.daemon, account, program),
            Way::Ssh => {
                let key = match account {
                    ALICE => &self.alice,
                    BOB => &self.bob,
                    _ => panic!("no key for {account}"),
                };
                let config = self.server.ssh_config(&self.alias(account), key);
                self.nix.over_ssh(&config, program)
            }
        }
    }

    /// A `nix` command of the client (with `nix-command` enabled by its nix.conf) reaching
    /// the server as `account`, the subcommand's words first, then `--store <uri>`.
    pub fn nix(&self, account: &str, words: &[&str]) -> Command {
        let mut cmd = self.cmd(account, "nix");
        cmd.args(words).arg("--store").arg(self.uri(account));
        cmd
    }

    /// Checks, after the test, that the daemon stops cleanly; returns its store and log.
    pub fn stop(self) -> super::Stopped {
        self.server.daemon.stop()
    }
}

/// Runs `cmd`, which must succeed, naming the client and way in a failure.
pub fn must(setup: &Setup, what: &str, cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{} client ({}), {:?}: {what} failed (status {:?}):\n{}",
        setup.nix.client.name(),
        setup.nix.version,
        setup.way,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
