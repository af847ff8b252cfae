//! The host's facts, detected once when the build service starts and handed down: the
//! scheduler's capacity defaults ([`crate::config::CapacityConfig::machine`]) and every
//! build's sandbox read them from one [`HostFacts`], so that they cannot disagree.

use std::collections::BTreeMap;
use std::path::Path;

use nixbuild_sandbox::ResolverFiles;

use crate::config::{host_memory, ConfigError};

/// What the host offers: for the values `[capacity]` leaves unset and for every build's
/// sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// CPUs this daemon may give builds (from `nixbuild::cgroup::Report::cpus`).
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory: u64,
    /// The host's systems, its own first.
    pub systems: Vec<String>,
    /// Whether builds may use `/dev/kvm` ([`kvm_usable`]): then the `kvm` and `nixos-test`
    /// features are offered and a build requiring `kvm` gets the device.
    pub kvm: bool,
    /// The host's resolver and certificate files, which fixed-output builds see.
    pub resolver: ResolverFiles,
    /// The daemon's environment, from which `impure-env`-style variables are taken.
    pub impure_env: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl HostFacts {
    /// Reads the host's memory (`/proc/meminfo`), system, `/dev/kvm`, resolver files and
    /// environment; `cpus` comes from the cgroup report.
    pub fn detect(cpus: u32) -> Result<HostFacts, ConfigError> {
        use std::os::unix::ffi::OsStrExt;
        let memory = host_memory("capacity.memory")?;
        let arch = std::env::consts::ARCH;
        let mut systems = vec![format!("{arch}-linux")];
        if arch == "x86_64" {
            // As Nix's default extra-platforms.
            systems.push("i686-linux".to_owned());
        }
        let canonical = |p: &str| std::fs::canonicalize(p).ok();
        Ok(HostFacts {
            cpus,
            memory,
            systems,
            kvm: match kvm_usable(Path::new("/dev/kvm")) {
                Ok(usable) => usable,
                Err(why) => {
                    tracing::warn!("not offering the kvm and nixos-test features: {why}");
                    false
                }
            },
            resolver: ResolverFiles {
                resolv_conf: canonical("/etc/resolv.conf"),
                services: canonical("/etc/services"),
                hosts: canonical("/etc/hosts"),
                ca_bundle: canonical("/etc/ssl/certs/ca-certificates.crt"),
            },
            impure_env: std::env::vars_os()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        })
    }

    /// The host's own system (`x86_64-linux` on x86_64), which the sandbox builds for
    /// natively.
    pub fn system(&self) -> &str {
        self.systems.first().map_or("", String::as_str)
    }
}

/// Whether a build may use the KVM device `dev`: `Ok(false)` if the host has none, an error
/// saying why if it has one that a build cannot open. A build opens it as its own
/// unprivileged uid without supplementary groups (as under Nix, which drops them too), so
/// the device must be a character device that everyone may read and write: mode 0666, as
/// systemd's default udev rule makes `/dev/kvm` (group `kvm`) on Debian 12.
pub fn kvm_usable(dev: &Path) -> Result<bool, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = match std::fs::metadata(dev) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot examine {}: {e}", dev.display())),
    };
    if !meta.file_type().is_char_device() {
        return Err(format!("{} is not a character device", dev.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o006 != 0o006 {
        return Err(format!(
            "{} has mode {mode:04o}, so build users cannot open it; systemd's udev rule \
             (on Debian 12) makes it 0666: `chmod 0666 {}`",
            dev.display(),
            dev.display()
        ));
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kvm_is_usable_only_as_a_character_device_everyone_may_open() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kvm_usable(&dir.path().join("kvm")), Ok(false));
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = kvm_usable(&file).unwrap_err();
        assert!(err.contains("is not a character device"), "{err}");
        // /dev/null is a character device that everyone may open.
        assert_eq!(kvm_usable(Path::new("/dev/null")), Ok(true));
    }

    #[test]
    fn the_host_system_comes_from_the_architecture_first() {
        let real = HostFacts::detect(1).unwrap();
        assert!(real.memory > 0 && real.systems[0].ends_with("-linux"));
        assert_eq!(real.system(), format!("{}-linux", std::env::consts::ARCH));
        assert_eq!(real.kvm, kvm_usable(Path::new("/dev/kvm")) == Ok(true));
    }
}
