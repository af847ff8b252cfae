//! Machines and what they can build, with Nix's meaning of systems and features.

/// One machine the scheduler places builds on: what it builds and how much it has.
///
/// Systems and features mean what they mean in Nix's `builders` lines: a machine can build a
/// derivation when it offers the derivation's system (or the system is `builtin`), every
/// feature the derivation requires is among its supported or mandatory features, and every
/// mandatory feature is among the features the derivation requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The systems it builds for, such as `x86_64-linux`.
    pub systems: Vec<String>,
    /// The features it offers to derivations that require them.
    pub supported_features: Vec<String>,
    /// The features it offers only to derivations that require them: a derivation that does
    /// not require all of them does not run here. They count as supported too.
    pub mandatory_features: Vec<String>,
    /// Cores, numbered `0..cores`; each build gets its own.
    pub cores: u32,
    /// Memory in bytes; each build gets its own share.
    pub memory: u64,
    /// Most builds running at once.
    pub max_jobs: u32,
    /// How fast it is, relative to the others, in thousandths of Nix's speed factor (1000:
    /// a factor of 1). Among machines where a build fits now, it starts on the fastest
    /// (the lowest index among equals).
    pub speed: u32,
}

impl Machine {
    /// The speed of a speed factor of 1.
    pub const NORMAL_SPEED: u32 = 1000;
}

impl Machine {
    /// Whether it builds for `system` (`builtin` builds everywhere, as in Nix).
    pub fn builds_system(&self, system: &str) -> bool {
        system == "builtin" || self.systems.iter().any(|s| s == system)
    }

    /// Whether every one of `required` is a supported or mandatory feature here.
    pub fn supports_all(&self, required: &[String]) -> bool {
        required
            .iter()
            .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
    }

    /// Whether `required` includes every mandatory feature of this machine.
    pub fn mandatory_met(&self, required: &[String]) -> bool {
        self.mandatory_features.iter().all(|f| required.contains(f))
    }

    /// Whether a derivation for `system` requiring `required` may run here, resources aside.
    pub fn accepts(&self, system: &str, required: &[String]) -> bool {
        self.builds_system(system) && self.supports_all(required) && self.mandatory_met(required)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn nix_meaning_of_supported_and_mandatory_features() {
        let m = Machine {
            systems: strings(&["x86_64-linux", "i686-linux"]),
            supported_features: strings(&["big-parallel", "kvm"]),
            mandatory_features: strings(&["benchmark"]),
            cores: 4,
            memory: 1 << 30,
            max_jobs: 4,
            speed: Machine::NORMAL_SPEED,
        };
        assert!(m.accepts("x86_64-linux", &strings(&["benchmark"])));
        assert!(m.accepts("i686-linux", &strings(&["benchmark", "kvm"])));
        assert!(m.accepts("builtin", &strings(&["benchmark"])));
        // A mandatory feature the derivation does not ask for keeps it away.
        assert!(!m.accepts("x86_64-linux", &[]));
        assert!(!m.accepts("x86_64-linux", &strings(&["kvm"])));
        // A feature the machine lacks.
        assert!(!m.accepts("x86_64-linux", &strings(&["benchmark", "cuda"])));
        assert!(!m.accepts("aarch64-linux", &strings(&["benchmark"])));
    }
}
