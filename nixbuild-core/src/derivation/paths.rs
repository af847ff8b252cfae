//! `hashDerivationModulo`, output paths and `.drv` paths (docs/serve-protocol.md §8.4–8.7).

use std::collections::{BTreeMap, BTreeSet};

use super::{aterm, BasicDerivation, Derivation, DerivationError, DerivationOutput};
use crate::content_address::ContentAddress;
use crate::hash::{Hash, HashAlgo};
use crate::store_path::{make_fixed_output_path, make_store_path, make_text_path, StorePath};

/// `outputPathName`: the store path name of output `output` of derivation `drv_name`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// The name of the derivation at `drv_path` (Nix's `nameFromPath`): the path's name without
/// `.drv`. It is what the output paths are computed from; with structured attributes the
/// environment has no `name` at all.
pub fn name_from_drv_path(drv_path: &StorePath) -> &str {
    let name = drv_path.name();
    name.strip_suffix(".drv").unwrap_or(name)
}

/// `makeFallbackPath`: where the builder writes output `output` of the derivation at
/// `drv_path` when its path is only known after the build (a floating content-addressed
/// output): the path of type `rewrite:<drv base name>:name:<output>` with an all-zero sha256
/// and the output's name. Its hash part is what the output's self-references are rewritten
/// from.
pub fn fallback_output_path(
    drv_path: &StorePath,
    output: &str,
) -> Result<StorePath, crate::store_path::StorePathError> {
    let zero = Hash::new(HashAlgo::Sha256, &[0; 32])
        .unwrap_or_else(|e| unreachable!("32 bytes are a sha256 digest: {e}"));
    make_store_path(
        &format!("rewrite:{}:name:{output}", drv_path.base_name()),
        &zero,
        &output_path_name(name_from_drv_path(drv_path), output),
    )
}

/// `hashPlaceholder`: `/` followed by the nix32 of `sha256("nix-output:" + output)`.
pub fn hash_placeholder(output: &str) -> String {
    let h = Hash::compute(HashAlgo::Sha256, format!("nix-output:{output}").as_bytes());
    format!("/{}", h.to_nix32())
}

/// The path of fixed output `output` of derivation `drv_name`, with content address `ca`.
fn fixed_output_path(
    drv_name: &str,
    output: &str,
    ca: &ContentAddress,
) -> Result<StorePath, DerivationError> {
    make_fixed_output_path(
        &output_path_name(drv_name, output),
        ca,
        &BTreeSet::new(),
        false,
    )
    .map_err(|source| DerivationError::PathComputation {
        output: output.to_owned(),
        source,
    })
}

impl BasicDerivation {
    /// The single fixed output `out`, if this is a fixed-output derivation.
    pub fn fixed_output(&self) -> Option<(&StorePath, &ContentAddress)> {
        match (self.outputs.len(), self.outputs.get("out")) {
            (1, Some(DerivationOutput::Fixed { path, ca })) => Some((path, ca)),
            _ => None,
        }
    }

    /// hashDerivationModulo of a derivation with no inputDrvs, as the real server computes it
    /// for builtOutputs keys (docs/serve-protocol.md §5.4, §8.6). For a fixed-output derivation
    /// this uses the declared `out` path (Nix recomputes it; the two agree whenever
    /// [`BasicDerivation::verify_fixed_output`] passes).
    pub fn hash_modulo(&self) -> Hash {
        modulo(self, BTreeMap::<String, BTreeSet<String>>::new(), true)
    }

    /// The ATerm of this derivation with no input derivations and nothing masked
    /// ([`aterm::print_basic`]): unlike [`BasicDerivation::hash_modulo`], which blanks the
    /// output variables and, for a fixed output, keeps only its hash and path, it holds every
    /// field that determines what a build of the derivation produces.
    pub fn to_aterm(&self) -> Vec<u8> {
        aterm::print_basic(self)
    }

    /// Checks that the path of a fixed-output derivation's `out` is the one its content address
    /// gives (docs/serve-protocol.md §8.4). Derivations without fixed outputs pass; a fixed output
    /// that is not the only output, named `out`, is an error.
    pub fn verify_fixed_output(&self, drv_name: &str) -> Result<(), DerivationError> {
        for (name, output) in &self.outputs {
            if let DerivationOutput::Fixed { path, ca } = output {
                if self.fixed_output().is_none() {
                    return Err(DerivationError::FixedOutputNotAlone(name.clone()));
                }
                check_path(name, path, fixed_output_path(drv_name, name, ca)?)?;
            }
        }
        Ok(())
    }
}

fn check_path(
    output: &str,
    declared: &StorePath,
    computed: StorePath,
) -> Result<(), DerivationError> {
    if *declared == computed {
        Ok(())
    } else {
        Err(DerivationError::OutputPathMismatch {
            output: output.to_owned(),
            declared: declared.to_absolute(),
            computed: computed.to_absolute(),
        })
    }
}

/// hashDerivationModulo given the input derivations already replaced by their hashes.
fn modulo(
    basic: &BasicDerivation,
    inputs: BTreeMap<String, BTreeSet<String>>,
    mask_outputs: bool,
) -> Hash {
    if let Some((path, ca)) = basic.fixed_output() {
        let s = format!(
            "fixed:out:{}:{}:{}",
            ca.method.render_with_algo(ca.hash.algo()),
            ca.hash.to_base16(),
            path
        );
        return Hash::compute(HashAlgo::Sha256, s.as_bytes());
    }
    let mut text = Vec::new();
    aterm::write(&mut text, basic, &inputs, mask_outputs);
    Hash::compute(HashAlgo::Sha256, &text)
}

impl Derivation {
    /// Parses the ATerm text of a `.drv` file (see [`aterm::parse`]).
    pub fn from_aterm(input: &[u8]) -> Result<Derivation, aterm::AtermError> {
        aterm::parse(input)
    }

    /// The ATerm text, exactly as Nix writes the `.drv` file.
    pub fn to_aterm(&self) -> Vec<u8> {
        aterm::print(self)
    }

    /// `hashDerivationModulo` (docs/serve-protocol.md §8.6).
    ///
    /// With `mask_outputs`, output paths and the env variables named after outputs are
    /// blanked: that is the hash output paths are computed from. Without, it is the hash a
    /// dependent uses for this derivation: `resolve` must give, for each input derivation,
    /// `hash_modulo(false, ..)` of that input (Nix's `pathDerivationModulo`; for a
    /// fixed-output input both are its `fixed:out:` hash), typically by parsing the input
    /// `.drv` and recursing, memoised.
    pub fn hash_modulo(
        &self,
        mask_outputs: bool,
        mut resolve: impl FnMut(&StorePath) -> Option<Hash>,
    ) -> Result<Hash, DerivationError> {
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, outputs) in &self.input_drvs {
            let h = resolve(path).ok_or_else(|| DerivationError::UnresolvedInput(path.clone()))?;
            // Two inputs with the same modulo hash (e.g. equal fixed outputs) merge, as in Nix.
            inputs
                .entry(h.to_base16())
                .or_default()
                .extend(outputs.iter().cloned());
        }
        Ok(modulo(&self.basic, inputs, mask_outputs))
    }

    /// The output paths Nix computes for the outputs whose paths are known in advance
    /// (input-addressed and fixed), by output name. `resolve` gives the unmasked modulo hash
    /// of each input derivation, as for [`Derivation::hash_modulo`].
    pub fn compute_output_paths(
        &self,
        drv_name: &str,
        resolve: impl FnMut(&StorePath) -> Option<Hash>,
    ) -> Result<BTreeMap<String, StorePath>, DerivationError> {
        let needs_modulo = self
            .basic
            .outputs
            .values()
            .any(|o| matches!(o, DerivationOutput::InputAddressed(_)));
        let modulo = if needs_modulo {
            Some(self.hash_modulo(true, resolve)?)
        } else {
            None
        };
        let mut paths = BTreeMap::new();
        for (name, output) in &self.basic.outputs {
            let path = match (output, modulo) {
                (DerivationOutput::Fixed { ca, .. }, _) => fixed_output_path(drv_name, name, ca)?,
                (DerivationOutput::InputAddressed(_), Some(h)) => make_store_path(
                    &format!("output:{name}"),
                    &h,
                    &output_path_name(drv_name, name),
                )
                .map_err(|source| DerivationError::PathComputation {
                    output: name.clone(),
                    source,
                })?,
                _ => continue,
            };
            paths.insert(name.clone(), path);
        }
        Ok(paths)
    }

    /// Checks that every output path declared in this `.drv` is the one Nix computes.
    pub fn verify_output_paths(
        &self,
        drv_name: &str,
        resolve: impl FnMut(&StorePath) -> Option<Hash>,
    ) -> Result<(), DerivationError> {
        self.basic.verify_fixed_output(drv_name)?;
        let computed = self.compute_output_paths(drv_name, resolve)?;
        for (name, output) in &self.basic.outputs {
            if let (Some(declared), Some(computed)) = (output.path(), computed.get(name)) {
                check_path(name, declared, computed.clone())?;
            }
        }
        Ok(())
    }

    /// The store path of this derivation's `.drv` file (docs/serve-protocol.md §8.7).
    pub fn drv_path(&self, drv_name: &str) -> Result<StorePath, DerivationError> {
        let references: BTreeSet<StorePath> = self
            .basic
            .input_srcs
            .iter()
            .chain(self.input_drvs.keys())
            .cloned()
            .collect();
        let h = Hash::compute(HashAlgo::Sha256, &self.to_aterm());
        make_text_path(&format!("{drv_name}.drv"), &h, &references)
            .map_err(DerivationError::DrvPath)
    }
}
