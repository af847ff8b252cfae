//! The SSH side of the harness: a daemon listening on a free port of 127.0.0.1 with an
//! `authorized_keys` file written by the test, keys made with `ssh-keygen`, and ssh config
//! files that pin the host key the daemon printed (`StrictHostKeyChecking yes`, never off).
//! Nix gets the config through `NIX_SSHOPTS=-F <config>`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use nixbuild_core::serve::handshake::ServerHello;
use nixbuild_core::serve::{ClientHello, Request};

use super::{Daemon, VERSION};

/// A key pair made by `ssh-keygen` for a test.
#[derive(Debug, Clone)]
pub struct Key {
    /// The private key file (the public one is next to it, `.pub`).
    pub private: PathBuf,
    /// The public key line, comment included.
    pub public: String,
}

/// Makes a key of `kind` (`ed25519`, `rsa`, `ecdsa`) with comment `comment` in `dir`.
pub fn keygen(dir: &Path, name: &str, kind: &str, comment: &str) -> Key {
    let private = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", comment, "-f"])
        .arg(&private)
        .output()
        .expect("run ssh-keygen (openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(private.with_extension("pub"))
        .expect("read the public key")
        .trim()
        .to_owned();
    Key { private, public }
}

/// The host key pins a daemon printed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    /// The port it listens on.
    pub port: u16,
    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA…`.
    pub known_hosts_line: String,
    /// The base64 host key of a machines file.
    pub machines_key: String,
}

impl Pins {
    /// Reads the pins from the last start's lines in the daemon's stdout, checking that
    /// `<state-dir>/ssh_host_pins` holds exactly those lines.
    pub fn of(daemon: &Daemon) -> Pins {
        let out = daemon.stdout();
        let start = out.rfind("nixbuild-server: SSH on ").unwrap_or_else(|| {
            panic!(
                "no SSH pins on the daemon's stdout:\n{out}\n{}",
                daemon.log()
            )
        });
        let text = &out[start..];
        let file = daemon.state_dir().join("ssh_host_pins");
        let kept = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        assert_eq!(
            kept,
            text,
            "{} differs from the printed pins",
            file.display()
        );
        let value = |label: &str| {
            text.lines()
                .find_map(|l| l.trim_start().strip_prefix(label))
                .unwrap_or_else(|| panic!("no {label:?} in\n{text}"))
                .trim()
                .to_owned()
        };
        let addr = value("nixbuild-server: SSH on ");
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"));
        Pins {
            port,
            known_hosts_line: value("known_hosts line:"),
            machines_key: value("machines file host key (8th field):"),
        }
    }
}

/// A daemon listening for SSH, and a directory for the test's client files.
pub struct SshServer {
    /// The daemon.
    pub daemon: Daemon,
    /// Its pins, as printed at the last start.
    pub pins: Pins,
    /// The `authorized_keys` file it reads.
    pub authorized_keys: PathBuf,
    /// Client-side files: keys, ssh configs, known_hosts.
    pub client: tempfile::TempDir,
}

impl SshServer {
    /// Starts a daemon with `config` (TOML) listening on a free port of 127.0.0.1, with an
    /// `authorized_keys` file listing `keys` (made with [`SshServer::key`] in `client`).
    pub fn start(config: &str, client: tempfile::TempDir, keys: &[&Key]) -> SshServer {
        let authorized_keys = client.path().join("authorized_keys");
        let lines: String = keys.iter().map(|k| format!("{}\n", k.public)).collect();
        std::fs::write(&authorized_keys, lines).expect("write authorized_keys");
        let daemon = Daemon::start_with_config(
            config,
            &[
                "--listen",
                "127.0.0.1:0",
                "--authorized-keys",
                authorized_keys.to_str().expect("UTF-8 temp path"),
            ],
        );
        let pins = Pins::of(&daemon);
        SshServer {
            daemon,
            pins,
            authorized_keys,
            client,
        }
    }

    /// Restarts the daemon on the same state directory and port.
    pub fn restart(self) -> SshServer {
        let listen = format!("127.0.0.1:{}", self.pins.port);
        let daemon = self.daemon.restart(&[
            "--listen",
            &listen,
            "--authorized-keys",
            self.authorized_keys.to_str().expect("UTF-8 temp path"),
        ]);
        let pins = Pins::of(&daemon);
        SshServer {
            daemon,
            pins,
            ..self
        }
    }

    /// Writes an ssh config for host `alias` with `key` that pins the host key through a
    /// known_hosts file holding the printed line; returns the config's path.
    pub fn ssh_config(&self, alias: &str, key: &Key) -> PathBuf {
        let known_hosts = self.client.path().join(format!("known_hosts-{alias}"));
        std::fs::write(&known_hosts, format!("{}\n", self.pins.known_hosts_line))
            .expect("write known_hosts");
        self.write_config(
            alias,
            &format!(
                "  IdentityFile {}\n  UserKnownHostsFile {}\n",
                key.private.display(),
                known_hosts.display()
            ),
        )
    }

    /// Writes an ssh config for the machines-file form: `HostKeyAlias alias` and no
    /// known_hosts file of its own, so the only pin is the base64 host key Nix is given.
    pub fn ssh_config_for_machines(&self, alias: &str, key: &Key) -> PathBuf {
        self.write_config(
            alias,
            &format!(
                "  IdentityFile {}\n  HostKeyAlias {alias}\n  UserKnownHostsFile /dev/null\n",
                key.private.display()
            ),
        )
    }

    fn write_config(&self, alias: &str, extra: &str) -> PathBuf {
        let path = self.client.path().join(format!("ssh_config-{alias}"));
        let text = format!(
            "Host {alias}\n  HostName 127.0.0.1\n  Port {}\n  User nix\n{extra}  \
             IdentitiesOnly yes\n  StrictHostKeyChecking yes\n  GlobalKnownHostsFile /dev/null\n  \
             BatchMode yes\n  ControlMaster no\n  ControlPath none\n",
            self.pins.port
        );
        std::fs::write(&path, text).expect("write the ssh config");
        path
    }

    /// `ssh -F config alias COMMAND…`, stdin empty.
    pub fn ssh(config: &Path, alias: &str, command: &[&str]) -> Command {
        SshServer::ssh_with(config, &[], alias, command)
    }

    /// `ssh -F config OPTIONS… alias COMMAND…`, stdin empty.
    pub fn ssh_with(config: &Path, options: &[&str], alias: &str, command: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(config)
            .args(options)
            .arg(alias)
            .args(command);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Makes a key in the client directory.
    pub fn key(client: &Path, name: &str, kind: &str, account: &str) -> Key {
        keygen(client, name, kind, account)
    }
}

/// Runs a command and returns its output, whatever its status.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed and returns its output.
pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes, under `dir`, a Nix expression of a derivation named `<name>-<salt>` built by
/// busybox's `sh` (a copy named `sh`, so it runs as the shell) that writes the salt to
/// `$out`: returns the expression's path.
pub fn salted_derivation(dir: &Path, name: &str, salt: &str) -> PathBuf {
    let dir = dir.join(format!("drv-{salt}"));
    std::fs::create_dir_all(dir.join("bb/bin")).expect("mkdir");
    std::fs::copy("/bin/busybox", dir.join("bb/bin/sh")).expect("copy /bin/busybox");
    let expr = dir.join("default.nix");
    std::fs::write(
        &expr,
        format!(
            "let bb = builtins.path {{ path = ./bb; name = \"bb-{salt}\"; }}; in\n\
             derivation {{\n  name = \"{name}-{salt}\";\n  system = \"x86_64-linux\";\n  \
             builder = \"${{bb}}/bin/sh\";\n  args = [ \"-c\" \"echo {salt} > $out\" ];\n}}\n"
        ),
    )
    .expect("write the expression");
    expr
}

/// Asserts that `out` failed with exit status `status` and `needle` on stderr.
pub fn assert_refused(out: &Output, status: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(status),
        "expected exit status {status}; stderr: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "expected {needle:?} in stderr: {stderr}"
    );
}

/// A `nix-store --serve` session over ssh, driven by the test: the hello is exchanged at
/// start.
pub struct SshSession {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

impl SshSession {
    /// Starts `ssh -F config alias nix-store --serve --write` and exchanges hellos.
    pub fn open(config: &Path, alias: &str) -> SshSession {
        SshSession::open_with(config, alias, &[])
    }

    /// Like [`SshSession::open`], with extra ssh options before the host.
    pub fn open_with(config: &Path, alias: &str, options: &[&str]) -> SshSession {
        let mut child = Command::new("ssh")
            .arg("-F")
            .arg(config)
            .args(options)
            .args([alias, "nix-store", "--serve", "--write"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut hello = Vec::new();
        ClientHello { version: VERSION }.encode(&mut hello);
        stdin.write_all(&hello).expect("send the hello");
        let mut got = [0u8; 16];
        stdout
            .read_exact(&mut got)
            .expect("read the server's hello over ssh");
        let (hello, _) = ServerHello::decode(&got)
            .expect("a server hello")
            .expect("complete");
        assert_eq!(hello.version, nixbuild_core::serve::ProtocolVersion::SERVER);
        SshSession {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    /// Sends `bytes` and reads exactly `answer_len` bytes back.
    pub fn exchange(&mut self, bytes: &[u8], answer_len: usize) -> Vec<u8> {
        self.stdin
            .as_mut()
            .expect("open")
            .write_all(bytes)
            .expect("send to the session");
        let mut answer = vec![0u8; answer_len];
        self.stdout
            .read_exact(&mut answer)
            .expect("read the session's answer");
        answer
    }

    /// Sends `bytes` without waiting for an answer (a write error means the session ended:
    /// ignored, [`SshSession::wait`] tells).
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stdin.as_mut().expect("open").write_all(bytes);
    }

    /// Closes stdin (the client is done) and returns ssh's exit status and stderr.
    pub fn close(mut self) -> (i32, String) {
        drop(self.stdin.take());
        self.wait()
    }

    /// Waits, stdin still open, for the server to end the session; returns ssh's exit status
    /// and stderr.
    pub fn wait(mut self) -> (i32, String) {
        let mut rest = Vec::new();
        let _ = self.stdout.read_to_end(&mut rest);
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = self.child.wait().expect("wait for ssh");
        (status.code().unwrap_or(-1), stderr)
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QueryValidPaths of no paths, and the length of its answer (an empty set).
pub fn empty_query() -> (Vec<u8>, usize) {
    let mut query = Vec::new();
    Request::QueryValidPaths {
        lock: false,
        substitute: false,
        paths: BTreeSet::new(),
    }
    .encode(VERSION, &mut query);
    (query, 8)
}
