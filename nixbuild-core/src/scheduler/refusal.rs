//! Why a build can never run on this server's machines.

use super::status::ByteCount;

/// Why a build was refused at once: no machine could ever run it, whatever else finishes.
/// The message is meant for the client's terminal as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No machine builds for the derivation's system.
    #[error("no machine of this server builds for system '{system}' (systems offered: {offered})")]
    System {
        /// The derivation's system.
        system: String,
        /// Every system some machine builds for.
        offered: String,
    },
    /// Some required features are offered by no machine for the system.
    #[error(
        "no machine for '{system}' supports the required feature(s) {missing} \
         (features offered: {offered})"
    )]
    Features {
        /// The derivation's system.
        system: String,
        /// The required features no machine for the system offers.
        missing: String,
        /// The features machines for the system offer.
        offered: String,
    },
    /// Each required feature is offered somewhere, but no one machine offers them all.
    #[error("no single machine for '{system}' supports all of the required features {required}")]
    FeaturesTogether {
        /// The derivation's system.
        system: String,
        /// The required features.
        required: String,
    },
    /// Every machine with the features also has mandatory features the derivation does not
    /// require.
    #[error(
        "every machine for '{system}' with the required features also requires feature(s) \
         {mandatory}, which the derivation does not require"
    )]
    Mandatory {
        /// The derivation's system.
        system: String,
        /// The mandatory features it lacks.
        mandatory: String,
    },
    /// The build asks for more cores than any suitable machine has.
    #[error(
        "the build asks for {asked} cores but the largest machine for '{system}' it could use \
         has {largest}"
    )]
    Cores {
        /// The derivation's system.
        system: String,
        /// Cores asked.
        asked: u32,
        /// Cores of the largest suitable machine.
        largest: u32,
    },
    /// The build asks for more memory than any suitable machine has.
    #[error(
        "the build asks for {} memory but the largest machine for '{system}' it could use \
         has {}", ByteCount(*asked), ByteCount(*largest)
    )]
    Memory {
        /// The derivation's system.
        system: String,
        /// Bytes asked.
        asked: u64,
        /// Memory of the largest suitable machine.
        largest: u64,
    },
    /// Some suitable machine has the cores and some the memory, but none both.
    #[error(
        "no machine for '{system}' has both the {cores} cores and the {} memory the build \
         asks for", ByteCount(*memory)
    )]
    CoresAndMemory {
        /// The derivation's system.
        system: String,
        /// Cores asked.
        cores: u32,
        /// Bytes asked.
        memory: u64,
    },
    /// Every suitable machine has no cores, no memory or a job limit of 0.
    #[error(
        "every machine for '{system}' the build could use has no capacity (no cores, no \
         memory or a job limit of 0)"
    )]
    NoCapacity {
        /// The derivation's system.
        system: String,
    },
    /// The build asks for 0 cores.
    #[error("the build asks for 0 cores")]
    ZeroCores,
    /// The build asks for 0 bytes of memory.
    #[error("the build asks for 0 bytes of memory")]
    ZeroMemory,
}
