//! The server's host key: an ed25519 key generated once, at first start, into the state
//! directory (`ssh_host_ed25519_key`, mode 0600, in OpenSSH's format, and
//! `ssh_host_ed25519_key.pub`), and kept across restarts so clients that pinned it connect
//! without a warning. Also the strings a user pins it with: the `known_hosts` line, the
//! base64 host key of a Nix machines file, and the ssh config that makes the latter work on a
//! non-default port.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

/// The private key's file name in the state directory (the public key adds `.pub`).
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// The file in the state directory that holds, from the last start, the lines users pin the
/// host key with (what the server prints at start), for whoever did not see the output.
pub const PINS_FILE: &str = "ssh_host_pins";

/// Why the host key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The private key file is not an unencrypted OpenSSH ed25519 key.
    #[error("{path}: {reason}; move it away to have a new host key generated")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Group or others may read the private key (sshd refuses such keys too).
    #[error("{path}: permissions {mode:04o} are too open for a private key; chmod 600 it")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The system's random source failed.
    #[error("cannot get random bytes for a new host key: {0}")]
    Random(String),
}

/// The host key of the server on `state_dir`: loaded from [`HOST_KEY_FILE`], or generated and
/// written there when the file does not exist (then `true` comes back with it). The `.pub` file
/// is rewritten when it is missing or does not match.
pub fn load_or_create(state_dir: &Path) -> Result<(PrivateKey, bool), HostKeyError> {
    let path = state_dir.join(HOST_KEY_FILE);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| HostKeyError::Io { path, source }
    };
    let (key, created) = match std::fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(HostKeyError::TooOpen { path, mode });
            }
            let text = std::fs::read(&path).map_err(io(&path))?;
            let invalid = |reason: String| HostKeyError::Invalid {
                path: path.clone(),
                reason,
            };
            let key = PrivateKey::from_openssh(&text)
                .map_err(|e| invalid(format!("not an OpenSSH private key: {e}")))?;
            if key.is_encrypted() {
                return Err(invalid("the key is encrypted".into()));
            }
            if key.algorithm() != Algorithm::Ed25519 {
                return Err(invalid(format!(
                    "an {} key, expected ssh-ed25519",
                    key.algorithm()
                )));
            }
            (key, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| HostKeyError::Random(e.to_string()))?;
            let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
            key.set_comment("nixbuild host key");
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| HostKeyError::Random(format!("encoding the new key: {e}")))?;
            write_atomically(&path, text.as_bytes(), 0o600).map_err(io(&path))?;
            (key, true)
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let pub_path = state_dir.join(format!("{HOST_KEY_FILE}.pub"));
    let public = public_line(key.public_key()) + " nixbuild host key\n";
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(public.as_str()) {
        write_atomically(&pub_path, public.as_bytes(), 0o644).map_err(io(&pub_path))?;
    }
    Ok((key, created))
}

/// Writes `text`, the pins printed at this start, to [`PINS_FILE`] in `state_dir` (mode 0644,
/// replaced atomically) and returns the file's path.
pub fn write_pins(state_dir: &Path, text: &str) -> Result<PathBuf, HostKeyError> {
    let path = state_dir.join(PINS_FILE);
    write_atomically(&path, text.as_bytes(), 0o644).map_err(|source| HostKeyError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Writes `bytes` to `path` through a fresh temporary file with mode `mode`, synced and
/// renamed into place, so a crash never leaves a half-written key.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    // The mode asked for, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `<type> <base64>`: the key without a comment.
pub fn public_line(key: &PublicKey) -> String {
    let bare = PublicKey::new(key.key_data().clone(), "");
    bare.to_openssh()
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// The key's `SHA256:…` fingerprint, as `ssh-keygen -l` shows it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The `known_hosts` host field for `host` and `port`: the host itself on port 22,
/// `[host]:port` on any other.
pub fn known_hosts_host(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// A `known_hosts` line pinning `key` for `host` and `port`.
pub fn known_hosts_line(host: &str, port: u16, key: &PublicKey) -> String {
    format!("{} {}", known_hosts_host(host, port), public_line(key))
}

/// The host key field of a Nix machines file (its 8th) or of `base64-ssh-public-host-key`:
/// the base64 of `<type> <base64>`. Nix writes it, after the store URI's host, to a temporary
/// known_hosts file it hands to ssh, so on a non-default port ssh must look the key up under
/// that host name, not `[host]:port`: hence `HostKeyAlias` in [`ssh_config`].
pub fn machines_host_key(key: &PublicKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(public_line(key))
}

/// The ssh config entry a user writes to reach the server as `alias` on `host`:`port` with
/// `identity`, pinning the host key under the alias (so the same known_hosts entry,
/// `alias <type> <base64>`, serves `nix copy` and the machines-file host key serves builds).
pub fn ssh_config(alias: &str, host: &str, port: u16, identity: &str) -> String {
    format!(
        "Host {alias}\n  HostName {host}\n  Port {port}\n  HostKeyAlias {alias}\n  \
         IdentityFile {identity}\n  IdentitiesOnly yes\n  StrictHostKeyChecking yes\n"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (key, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let path = dir.path().join(HOST_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pub_text = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        assert!(pub_text.starts_with("ssh-ed25519 AAAA"), "{pub_text}");
        assert!(pub_text.starts_with(&public_line(key.public_key())));

        let (again, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(again.public_key().key_data(), key.public_key().key_data());

        std::fs::remove_file(path.with_extension("pub")).unwrap();
        load_or_create(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(path.with_extension("pub")).unwrap(),
            pub_text
        );
    }

    #[test]
    fn the_pins_file_is_replaced_whole_and_readable_by_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_pins(dir.path(), "first start\nlong text\n").unwrap();
        assert_eq!(path, dir.path().join(PINS_FILE));
        write_pins(dir.path(), "second\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn unusable_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HOST_KEY_FILE);
        load_or_create(dir.path()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(e, HostKeyError::TooOpen { mode: 0o644, .. }),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key").unwrap();
        let e = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, HostKeyError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains(HOST_KEY_FILE), "{e}");
    }

    #[test]
    fn pinning_strings() {
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]));
        let public = key.public_key();
        let line = public_line(public);
        assert!(line.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"));
        assert!(!line.contains(' ') || line.matches(' ').count() == 1);
        assert_eq!(
            known_hosts_line("127.0.0.1", 2222, public),
            format!("[127.0.0.1]:2222 {line}")
        );
        assert_eq!(
            known_hosts_line("build", 22, public),
            format!("build {line}")
        );
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(machines_host_key(public))
            .unwrap();
        assert_eq!(decoded, line.as_bytes());
        assert!(fingerprint(public).starts_with("SHA256:"));
        let config = ssh_config("nixbuild", "127.0.0.1", 2222, "~/.ssh/id_ed25519");
        assert!(config.contains("HostKeyAlias nixbuild\n") && config.contains("Port 2222\n"));
    }
}
