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
    /// Whether `/dev/kvm` exists.
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
            kvm: Path::new("/dev/kvm").exists(),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_host_system_comes_from_the_architecture_first() {
        let real = HostFacts::detect(1).unwrap();
        assert!(real.memory > 0 && real.systems[0].ends_with("-linux"));
        assert_eq!(real.system(), format!("{}-linux", std::env::consts::ARCH));
        assert_eq!(real.kvm, Path::new("/dev/kvm").exists());
    }
}
