//! The three Nix client generations the end-to-end tests of client-facing features run with
//! (docs/design.md, Tests): the host's Nix 2.8 (Debian bookworm's `nix-bin`), and Nix 2.26
//! and Nix 2.34 in the Debian trixie and sid chroots that `scripts/clients/setup.sh` makes
//! under `$NIXBUILD_CHROOTS` (default `/tmp/chroots`; `scripts/test` runs the script when
//! they are missing). Each chroot has its own `/nix/store`; the script adds the same busybox
//! directory to every client store, at the store path it writes to
//! `$NIXBUILD_CHROOTS/busybox-path`.
//!
//! A chroot client's command runs as
//! `unshare --mount --propagation private -- sh -c SCRIPT` which, in a mount namespace of its
//! own, mounts a fresh tmpfs on the chroot's `/tmp`, bind-mounts each host directory the
//! command must see at the same absolute path inside the chroot (the test's scratch
//! directory with its `nix.conf`, the examples directory with the relay `nixbuild-serve`,
//! a daemon's state directory with its `serve.sock`, ssh configs and keys), mounts `/proc`
//! and `/dev` when the host has not, then `exec chroot ROOT PROGRAM ARGS…`. The namespace
//! ends with the command, so no mount leaks into the host or piles up over a run, and tests
//! running at once never see each other's mounts. The namespace is made by `unshare(1)`
//! rather than by an `unshare(2)` + `mount(2)` pre-exec hook because the workspace denies
//! `unsafe` code (a pre-exec hook is unsafe), and a shell step is easy to read in a failure.
//! The environment set on the returned `Command` passes through `unshare`, `sh` and
//! `chroot` to the program unchanged (`NIX_CONF_DIR`, `NIX_SSHOPTS`, `NIXBUILD_*`).
//!
//! A test fails, never skips, when a client is missing, naming the command that sets it up.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{example_bin, Daemon};

/// One Nix client generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// The host's Nix 2.8 (Debian bookworm).
    Host,
    /// Nix 2.26 in the Debian trixie chroot.
    Trixie,
    /// Nix 2.34 in the Debian sid chroot.
    Sid,
}

/// The directory holding the client chroots: `$NIXBUILD_CHROOTS`, or `/tmp/chroots`.
pub fn chroots() -> PathBuf {
    std::env::var_os("NIXBUILD_CHROOTS")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/tmp/chroots"), PathBuf::from)
}

/// How to set the clients up, for failure messages.
fn how_to_set_up() -> String {
    format!(
        "set the Nix clients up with `CHROOTS={} scripts/clients/setup.sh` as root \
         (scripts/test does when they are missing; NIXBUILD_CHROOTS chooses the directory)",
        chroots().display()
    )
}

/// The busybox store path that every client store holds (`BB=` of the set-up script).
pub fn busybox() -> String {
    let file = chroots().join("busybox-path");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): the Nix clients are not set up; {}",
            file.display(),
            how_to_set_up()
        )
    });
    text.trim().to_owned()
}

/// What the chroot script does; its arguments are `HOW ROOT BIND… -- PROGRAM ARGS…`, where
/// `HOW` is `chroot`, or `pivot` to make `ROOT` the namespace's root with `pivot_root`: Nix
/// refuses to sandbox a build inside a `chroot` (and builds unsandboxed unless told
/// `sandbox-fallback = false`), so a sandboxed reference build needs the real root changed.
const CHROOT_SCRIPT: &str = r#"set -e
how=$1; root=$2; shift 2
[ "$how" = chroot ] || mount --rbind "$root" "$root"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
while [ "$1" != -- ]; do
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1"
  shift
done
shift
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/dev" || mount --rbind /dev "$root/dev"
[ "$how" = chroot ] && exec chroot "$root" "$@"
mkdir -p "$root/.oldroot"
cd "$root"
pivot_root . .oldroot
cd /
umount -l /.oldroot
exec "$@"
"#;

impl Client {
    /// Every client, oldest first.
    pub const ALL: [Client; 3] = [Client::Host, Client::Trixie, Client::Sid];

    /// A short name, for messages and file names.
    pub fn name(self) -> &'static str {
        match self {
            Client::Host => "host",
            Client::Trixie => "trixie",
            Client::Sid => "sid",
        }
    }

    /// The Nix version this client runs (`major.minor`; sid's is at least this).
    pub fn version(self) -> (u32, u32) {
        match self {
            Client::Host => (2, 8),
            Client::Trixie => (2, 26),
            Client::Sid => (2, 34),
        }
    }

    /// The chroot's root, for the chroot clients.
    pub fn root(self) -> Option<PathBuf> {
        match self {
            Client::Host => None,
            Client::Trixie | Client::Sid => Some(chroots().join(self.name())),
        }
    }

    /// A command running `program` as this client, seeing each of `shared` (absolute
    /// directories of the host) at the same path. Arguments added to the returned command
    /// go to `program`; its environment reaches `program`.
    pub fn command(self, program: impl AsRef<OsStr>, shared: &[&Path]) -> Command {
        self.enter("chroot", program, shared)
    }

    /// As [`Client::command`], with the chroot made the root by `pivot_root`, where Nix's
    /// sandbox works.
    pub fn root_command(self, program: impl AsRef<OsStr>, shared: &[&Path]) -> Command {
        self.enter("pivot", program, shared)
    }

    fn enter(self, how: &str, program: impl AsRef<OsStr>, shared: &[&Path]) -> Command {
        let Some(root) = self.root() else {
            return Command::new(program);
        };
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(CHROOT_SCRIPT)
            .arg("sh")
            .arg(how)
            .arg(&root);
        for dir in shared {
            assert!(dir.is_absolute(), "{} is not absolute", dir.display());
            cmd.arg(dir);
        }
        cmd.arg("--").arg(program);
        cmd
    }

    /// Fails with how to set the client up unless its chroot is there.
    fn check_present(self) {
        if let Some(root) = self.root() {
            assert!(
                root.join("usr/bin/nix-store").is_file(),
                "the Nix {}.{} client ({}) is missing: no {}/usr/bin/nix-store; {}",
                self.version().0,
                self.version().1,
                self.name(),
                root.display(),
                how_to_set_up()
            );
        }
    }
}

/// One client's Nix for one test: a private `NIX_CONF_DIR` (no substituters, `nix-command`,
/// no sandbox, no build users, `require-sigs = false` for paths copied from the server) in
/// a scratch directory that the client sees at the same path, and the directories its
/// commands must see.
pub struct ClientNix {
    /// The client.
    pub client: Client,
    dir: tempfile::TempDir,
    shared: RefCell<Vec<PathBuf>>,
    /// The client's Nix version, as `nix-store --version` prints it.
    pub version: String,
}

impl ClientNix {
    /// Checks that `client` is there and runs the expected Nix, and that its store holds the
    /// busybox path; `extra` lines go to `nix.conf`.
    pub fn new(client: Client, extra: &str) -> ClientNix {
        client.check_present();
        let dir = tempfile::tempdir().expect("create a scratch directory");
        std::fs::write(
            dir.path().join("nix.conf"),
            format!(
                "experimental-features = nix-command\nsubstituters =\nsandbox = false\n\
                 build-users-group =\nrequire-sigs = false\n{extra}"
            ),
        )
        .expect("write nix.conf");
        let examples = example_bin("nixbuild-serve")
            .parent()
            .expect("the examples directory")
            .to_owned();
        let mut nix = ClientNix {
            client,
            shared: RefCell::new(vec![dir.path().to_owned(), examples]),
            dir,
            version: String::new(),
        };
        let out = nix.command("nix-store").arg("--version").output();
        let version = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            Ok(o) => panic!(
                "nix-store --version failed on the {} client: {}; {}",
                client.name(),
                String::from_utf8_lossy(&o.stderr),
                how_to_set_up()
            ),
            Err(e) => panic!(
                "cannot run Nix on the {} client ({e}): install Debian's nix-bin (the README's \
                 test command does); {}",
                client.name(),
                how_to_set_up()
            ),
        };
        let (major, minor) = parse_version(&version)
            .unwrap_or_else(|| panic!("no version in {version:?} of the {} client", client.name()));
        let want = client.version();
        let fits = match client {
            Client::Sid => (major, minor) >= want,
            _ => (major, minor) == want,
        };
        assert!(
            fits,
            "the {} client runs {version:?}, not Nix {}.{}",
            client.name(),
            want.0,
            want.1
        );
        nix.version = version;
        let bb = busybox();
        let valid = nix
            .command("nix-store")
            .args(["--check-validity", &bb])
            .output()
            .expect("run nix-store --check-validity");
        assert!(
            valid.status.success(),
            "the busybox path {bb} is not valid in the {} client's store: {}; {}",
            client.name(),
            String::from_utf8_lossy(&valid.stderr),
            how_to_set_up()
        );
        nix
    }

    /// Makes `dir` (absolute, on the host) visible to this client's later commands.
    pub fn share(&self, dir: &Path) {
        let mut shared = self.shared.borrow_mut();
        if !shared.iter().any(|d| d == dir) {
            shared.push(dir.to_owned());
        }
    }

    /// The scratch directory (seen by the client at the same path).
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// A Nix program run as this client with this test's configuration.
    pub fn command(&self, program: &str) -> Command {
        let shared = self.shared.borrow();
        let shared: Vec<&Path> = shared.iter().map(PathBuf::as_path).collect();
        let mut cmd = self.client.command(program, &shared);
        self.configure(&mut cmd);
        cmd
    }

    /// This test's configuration for a command of this client.
    fn configure(&self, cmd: &mut Command) {
        cmd.env("NIX_CONF_DIR", self.dir.path())
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_PATH")
            .stdin(Stdio::null());
    }

    /// A Nix program run as this client in Nix's own sandbox, with its build users (the
    /// reference for what a build sees; the chroot clients only, whose root is changed by
    /// `pivot_root` so that the sandbox really runs).
    pub fn sandboxed(&self, program: &str) -> Command {
        assert!(
            self.client.root().is_some(),
            "the sandboxed reference runs in a chroot"
        );
        let shared = self.shared.borrow();
        let shared: Vec<&Path> = shared.iter().map(PathBuf::as_path).collect();
        let mut cmd = self.client.root_command(program, &shared);
        self.configure(&mut cmd);
        cmd.args([
            "--option",
            "sandbox",
            "true",
            "--option",
            "sandbox-fallback",
            "false",
            "--option",
            "build-users-group",
            "nixbld",
        ]);
        cmd
    }

    /// A Nix program whose relay (`ssh://localhost?remote-program=<relay>`) reaches `d` as
    /// `account`: the daemon's state directory is shared with the client.
    pub fn relayed(&self, d: &Daemon, account: &str, program: &str) -> Command {
        self.share(&d.state_dir());
        d.point(self.command(program), account)
    }

    /// A Nix program that reaches ssh hosts through the ssh config `config` (its directory,
    /// with the keys and known_hosts it names, is shared with the client).
    pub fn over_ssh(&self, config: &Path, program: &str) -> Command {
        self.share(config.parent().expect("the ssh config's directory"));
        let mut cmd = self.command(program);
        cmd.env("NIX_SSHOPTS", format!("-F {}", config.display()));
        cmd
    }

    /// Runs a command that must succeed, and returns its output.
    pub fn ok(&self, cmd: &mut Command) -> Output {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{} client: {cmd:?} failed: {}",
            self.client.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `nix-store --add` of a file named `name` holding `contents`, written in the scratch
    /// directory: the new store path in this client's store.
    pub fn add_file(&self, name: &str, contents: &str) -> String {
        let file = self.scratch().join(name);
        std::fs::write(&file, contents).expect("write a file to add");
        self.add(&file)
    }

    /// `nix-store --add PATH` (under the scratch directory): the new store path.
    pub fn add(&self, path: &Path) -> String {
        let out = self.ok(self.command("nix-store").arg("--add").arg(path));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Writes, in the scratch directory, a Nix expression of one derivation named
    /// `<name>-<salt>` whose builder is the busybox store path's `sh`, running `script`
    /// (with the busybox applets on `PATH`); returns the expression's path.
    pub fn derivation(&self, name: &str, salt: &str, script: &str) -> PathBuf {
        let expr = self.scratch().join(format!("{name}-{salt}.nix"));
        std::fs::write(
            &expr,
            format!(
                "let bb = builtins.storePath \"{bb}\"; in\n\
                 derivation {{\n  name = \"{name}-{salt}\";\n  system = \"x86_64-linux\";\n  \
                 builder = \"${{bb}}/bin/sh\";\n  args = [ \"-c\" {script:?} ];\n  \
                 PATH = \"${{bb}}/bin\";\n}}\n",
                bb = busybox(),
            ),
        )
        .expect("write the expression");
        expr
    }

    /// Writes, in the scratch directory, an expression of the derivations `kinds` (each
    /// its required features, as Nix list items, and a script run by busybox's `sh`) named
    /// `fleet-<i>-<salt>`, and instantiates it: the `.drv` paths, in order.
    pub fn derivations(&self, salt: &str, kinds: &[(&str, String)]) -> Vec<String> {
        self.derivations_with(salt, "", kinds)
    }

    /// Like [`ClientNix::derivations`], with `lets` (Nix bindings such as
    /// `input = builtins.storePath "…";`) in scope of the scripts (`${input}`).
    pub fn derivations_with(
        &self,
        salt: &str,
        lets: &str,
        kinds: &[(&str, String)],
    ) -> Vec<String> {
        let items: String = kinds
            .iter()
            .enumerate()
            .map(|(i, (features, script))| format!("  (mk {i} [ {features} ] {script:?})\n"))
            .collect();
        let expr = self.scratch().join(format!("fleet-{salt}.nix"));
        std::fs::write(
            &expr,
            format!(
                "let bb = builtins.storePath \"{bb}\";\n  {lets}\n  mk = i: features: script: derivation {{\n    \
                 name = \"fleet-${{toString i}}-{salt}\";\n    system = \"x86_64-linux\";\n    \
                 builder = \"${{bb}}/bin/sh\";\n    args = [ \"-c\" script ];\n    \
                 PATH = \"${{bb}}/bin\";\n    requiredSystemFeatures = features;\n  }};\nin [\n{items}]\n",
                bb = busybox()
            ),
        )
        .expect("write the expression");
        let out = self.ok(self.command("nix-instantiate").arg(&expr));
        super::lines(&out.stdout)
    }

    /// `nix-instantiate` of an expression file: the `.drv` path.
    pub fn instantiate(&self, expr: &Path) -> String {
        let out = self.ok(self.command("nix-instantiate").arg(expr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// `(major, minor)` of `nix-store (Nix) 2.26.3`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().last()?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Reads a file the client wrote into its store (a chroot's store is under its root).
pub fn read_client_file(client: Client, path: &str) -> String {
    let on_host = match client.root() {
        Some(root) => root.join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    };
    std::fs::read_to_string(&on_host)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", on_host.display()))
}
