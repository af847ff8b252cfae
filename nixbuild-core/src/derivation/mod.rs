//! Derivations: the ATerm `.drv` format (spec §9), the BasicDerivation sent over the wire,
//! `hashDerivationModulo` and output paths (spec §8.4–8.7).

use std::collections::{BTreeMap, BTreeSet};

use crate::store_path::StorePath;

/// What a derivation declares for one output (spec §5.1 table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivationOutput {
    // variants: InputAddressed(StorePath), Fixed { path, ca }, Floating { method, algo },
    // Deferred, Impure { method, algo }
}

/// A derivation without `inputDrvs`: what BuildDerivation sends (spec §5.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    /// Outputs by name, ascending.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input sources (for BuildDerivation: the whole input closure).
    pub input_srcs: BTreeSet<StorePath>,
    /// The system, e.g. `x86_64-linux`.
    pub platform: Vec<u8>,
    /// The builder program.
    pub builder: Vec<u8>,
    /// The builder's arguments, in order.
    pub args: Vec<Vec<u8>>,
    /// The environment, ascending by key (bytewise).
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A full derivation as in a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Input derivations and the outputs wanted from each.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Everything else.
    pub basic: BasicDerivation,
}
