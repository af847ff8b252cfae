//! A stock Nix builder for the fleet's tests, as `benches/compare` starts its reference:
//! OpenSSH's sshd running `nix-store --serve --write` (the host's Nix 2.8) in a private mount
//! namespace (`unshare -m`) where a store of its own is bind-mounted over `/nix`, building
//! in Nix's sandbox as root, without build users: a Nix kills every process of a build user
//! before it starts a build there, and stores that do not share `/nix/var/nix/userpool` (two
//! builders, the host's Nix, the chroot clients' references) would kill each other's builds.
//! Root logs in with the one key given; its host key is pinned by the machines-file line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::free_port;
use super::ssh::{ok, Key};

/// A running stock builder.
pub struct StockBuilder {
    /// Its files: host key, configuration, store, log.
    dir: tempfile::TempDir,
    /// The port its sshd listens on at 127.0.0.1.
    pub port: u16,
    /// The base64 of its public host key line (the machines file's 8th field).
    pub host_key: String,
    sshd: Option<Child>,
}

impl StockBuilder {
    /// Starts sshd in its own mount namespace, letting `key` in as root; Nix builds at most
    /// `max_jobs` derivations at once there.
    pub fn start(key: &Key, max_jobs: u32) -> StockBuilder {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let host_key_file = root.join("host_key");
        ok(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "stock", "-f"])
            .arg(&host_key_file));
        let public = std::fs::read_to_string(root.join("host_key.pub")).expect("host key");
        let public = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let host_key = base64::engine::general_purpose::STANDARD.encode(&public);
        std::fs::create_dir_all(root.join("store/nix")).expect("mkdir store");
        ok(Command::new("nix-store")
            .arg("--store")
            .arg(root.join("store"))
            .arg("--init"));
        std::fs::create_dir(root.join("conf")).expect("mkdir conf");
        std::fs::write(
            root.join("conf/nix.conf"),
            format!(
                "sandbox = true\nsandbox-fallback = false\nbuild-users-group =\n\
                 max-jobs = {max_jobs}\ncores = 1\nbuilders =\nsubstituters =\n\
                 require-sigs = false\n"
            ),
        )
        .expect("write nix.conf");
        std::fs::write(root.join("empty"), "").expect("write");
        std::fs::write(root.join("authorized_keys"), format!("{}\n", key.public))
            .expect("write authorized_keys");
        std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
        let port = free_port();
        let conf = root.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 AuthenticationMethods publickey\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n\
                 UseDNS no\nPrintMotd no\nX11Forwarding no\nAllowTcpForwarding no\n\
                 PermitTTY no\nLogLevel ERROR\n\
                 SetEnv NIX_CONF_DIR={conf_dir} NIX_USER_CONF_FILES={empty}\n",
                hk = host_key_file.display(),
                ak = root.join("authorized_keys").display(),
                conf_dir = root.join("conf").display(),
                empty = root.join("empty").display(),
            ),
        )
        .expect("write sshd_config");
        let mut builder = StockBuilder {
            dir,
            port,
            host_key,
            sshd: None,
        };
        builder.spawn();
        builder
    }

    fn spawn(&mut self) {
        let root = self.dir.path();
        let mut inner = vec![format!(
            "mount --bind {} /nix",
            root.join("store/nix").display()
        )];
        if Path::new("/root/.bashrc").exists() {
            inner.push(format!(
                "mount --bind {} /root/.bashrc",
                root.join("empty").display()
            ));
        }
        inner.push(format!(
            "exec /usr/sbin/sshd -D -e -f {}",
            root.join("sshd_config").display()
        ));
        let log = std::fs::File::create(root.join("sshd.log")).expect("sshd.log");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(inner.join(" && "))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start sshd (Debian's openssh-server; the README's test command installs it)");
        self.sshd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.sshd.as_mut().map(Child::try_wait) {
                panic!("sshd exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What sshd and the sessions' `nix-store` wrote on stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The chroot store its `/nix` is, for `nix-store --store` from outside.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Whether its store holds `path` (`/nix/store/…`): an output there was built there,
    /// since only inputs are ever copied to a builder.
    pub fn has(&self, path: &str) -> bool {
        let base = path.trim_start_matches("/nix/store/");
        self.store().join("nix/store").join(base).exists()
    }
}

impl Drop for StockBuilder {
    fn drop(&mut self) {
        if let Some(mut child) = self.sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
