//! What a build asks for, and what that comes to on each machine.

use super::machine::Machine;
use super::refusal::Refusal;
use super::SchedulerConfig;

/// The feature that gives a build the larger default share of cores.
pub(super) const BIG_PARALLEL: &str = "big-parallel";

/// Cores a build asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum CoreReq {
    /// An explicit count.
    Exact(u32),
    /// The configured default, at most the machine's cores.
    Default,
    /// The configured big-parallel share of the machine's cores.
    BigParallel,
}

/// Memory a build asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum MemReq {
    /// An explicit number of bytes.
    Exact(u64),
    /// The configured default, or the machine's memory in proportion to the cores granted.
    Default,
}

/// Everything that decides where a build can run and what it takes there. Builds with equal
/// keys are interchangeable for placement, so the scheduler groups them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ShapeKey {
    /// The derivation's system.
    pub(super) system: String,
    /// Its required features, sorted, without duplicates.
    pub(super) features: Vec<String>,
    /// Cores asked.
    pub(super) cores: CoreReq,
    /// Memory asked.
    pub(super) memory: MemReq,
}

/// What a build of some shape takes on one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Need {
    /// The machine's index.
    pub(super) machine: u32,
    /// Cores.
    pub(super) cores: u32,
    /// Bytes of memory.
    pub(super) memory: u64,
}

impl ShapeKey {
    /// The key of a build asking for `cores` and `memory` (`None`: the defaults).
    pub(super) fn new(
        system: &str,
        features: &[String],
        cores: Option<u32>,
        memory: Option<u64>,
    ) -> Result<ShapeKey, Refusal> {
        let mut features = features.to_vec();
        features.sort_unstable();
        features.dedup();
        let cores = match cores {
            Some(0) => return Err(Refusal::ZeroCores),
            Some(n) => CoreReq::Exact(n),
            None if features.iter().any(|f| f == BIG_PARALLEL) => CoreReq::BigParallel,
            None => CoreReq::Default,
        };
        let memory = match memory {
            Some(0) => return Err(Refusal::ZeroMemory),
            Some(b) => MemReq::Exact(b),
            None => MemReq::Default,
        };
        Ok(ShapeKey {
            system: system.to_owned(),
            features,
            cores,
            memory,
        })
    }

    /// What it takes on `machine`, or `None` when it can never run there.
    pub(super) fn need_on(
        &self,
        index: u32,
        machine: &Machine,
        config: &SchedulerConfig,
    ) -> Option<Need> {
        if !usable(machine) || !machine.accepts(&self.system, &self.features) {
            return None;
        }
        let cores = match self.cores {
            CoreReq::Exact(n) if n <= machine.cores => n,
            CoreReq::Exact(_) => return None,
            CoreReq::Default => config.default_cores.min(machine.cores),
            CoreReq::BigParallel => {
                let share = u64::from(machine.cores) * u64::from(config.big_parallel_percent);
                // Round up, so that any share gives at least one core.
                u32::try_from(share.div_ceil(100))
                    .unwrap_or(machine.cores)
                    .clamp(1, machine.cores)
            }
        };
        let memory = match (self.memory, config.default_memory) {
            (MemReq::Exact(b), _) if b <= machine.memory => b,
            (MemReq::Exact(_), _) => return None,
            (MemReq::Default, Some(b)) => b.min(machine.memory),
            (MemReq::Default, None) => {
                let share =
                    u128::from(machine.memory) * u128::from(cores) / u128::from(machine.cores);
                u64::try_from(share).unwrap_or(machine.memory).max(1)
            }
        };
        Some(Need {
            machine: index,
            cores,
            memory,
        })
    }

    /// Where it can ever run, with what it takes there (by machine index), or why nowhere.
    pub(super) fn placements(
        &self,
        machines: &[Machine],
        config: &SchedulerConfig,
    ) -> Result<Vec<Need>, Refusal> {
        let needs: Vec<Need> = (0u32..)
            .zip(machines)
            .filter_map(|(i, m)| self.need_on(i, m, config))
            .collect();
        if needs.is_empty() {
            Err(self.diagnose(machines))
        } else {
            Ok(needs)
        }
    }

    /// Why no machine can ever run a build of this shape: the first of system, features,
    /// mandatory features, capacity, cores, memory that rules out every machine.
    fn diagnose(&self, machines: &[Machine]) -> Refusal {
        let system = self.system.clone();
        let with_system: Vec<&Machine> = machines
            .iter()
            .filter(|m| m.builds_system(&self.system))
            .collect();
        if with_system.is_empty() {
            return Refusal::System {
                system,
                offered: list(machines.iter().flat_map(|m| &m.systems)),
            };
        }
        let with_features: Vec<&Machine> = with_system
            .iter()
            .copied()
            .filter(|m| m.supports_all(&self.features))
            .collect();
        if with_features.is_empty() {
            let offered = |f: &String| {
                with_system
                    .iter()
                    .any(|m| m.supported_features.contains(f) || m.mandatory_features.contains(f))
            };
            let missing: Vec<&String> = self.features.iter().filter(|f| !offered(f)).collect();
            if missing.is_empty() {
                return Refusal::FeaturesTogether {
                    system,
                    required: list(&self.features),
                };
            }
            return Refusal::Features {
                system,
                missing: list(missing),
                offered: list(
                    with_system
                        .iter()
                        .flat_map(|m| m.supported_features.iter().chain(&m.mandatory_features)),
                ),
            };
        }
        let accepting: Vec<&Machine> = with_features
            .iter()
            .copied()
            .filter(|m| m.mandatory_met(&self.features))
            .collect();
        if accepting.is_empty() {
            return Refusal::Mandatory {
                system,
                mandatory: list(
                    with_features
                        .iter()
                        .flat_map(|m| &m.mandatory_features)
                        .filter(|f| !self.features.contains(f)),
                ),
            };
        }
        let usable: Vec<&Machine> = accepting.into_iter().filter(|m| usable(m)).collect();
        let Some(most_cores) = usable.iter().map(|m| m.cores).max() else {
            return Refusal::NoCapacity { system };
        };
        if let CoreReq::Exact(n) = self.cores {
            if n > most_cores {
                return Refusal::Cores {
                    system,
                    asked: n,
                    largest: most_cores,
                };
            }
        }
        // Machines with the cores all lack the memory: was it there on others?
        match (self.memory, self.cores) {
            (MemReq::Exact(asked), CoreReq::Exact(cores))
                if usable.iter().any(|m| m.memory >= asked) =>
            {
                Refusal::CoresAndMemory {
                    system,
                    cores,
                    memory: asked,
                }
            }
            (MemReq::Exact(asked), _) => Refusal::Memory {
                system,
                asked,
                largest: usable.iter().map(|m| m.memory).max().unwrap_or(0),
            },
            // Every other shape fits some usable machine, so `placements` found one.
            (MemReq::Default, _) => Refusal::NoCapacity { system },
        }
    }
}

/// Whether a machine can run anything at all.
fn usable(machine: &Machine) -> bool {
    machine.cores > 0 && machine.memory > 0 && machine.max_jobs > 0
}

/// A sorted, comma-separated list without duplicates, or `none`.
fn list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let mut items: Vec<&str> = items.into_iter().map(String::as_str).collect();
    items.sort_unstable();
    items.dedup();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}
