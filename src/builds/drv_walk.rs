//! The BuildPaths `.drv` walk: reads the `.drv` files a client names, verifies their output
//! paths (which needs `hashDerivationModulo` of every input derivation, recursively), and
//! turns one into a [`BuildJob`] whose inputs are the outputs of its input derivations.

use std::collections::HashMap;

use nixbuild_core::derivation::{AtermError, Derivation, DerivationError, DerivationOutput};
use nixbuild_core::hash::Hash;
use nixbuild_core::serve::BuildOptions;
use nixbuild_core::store_path::StorePath;

use super::BuildJob;
use crate::store::{Store, StoreError, MAX_DERIVATION_SIZE};

/// Deeper derivation graphs than any real one; stops a crafted cycle of `.drv` files that the
/// store would never hold anyway (a cycle cannot be content-addressed).
const MAX_DEPTH: usize = 4096;

/// Why a `.drv` named by BuildPaths cannot be built: the message of the BuildPaths failure.
#[derive(Debug, thiserror::Error)]
pub enum DrvError {
    /// The path is not a `.drv` path.
    #[error("'{0}' is not a derivation")]
    NotDerivationPath(StorePath),
    /// The object is not a regular file of at most [`MAX_DERIVATION_SIZE`] bytes.
    #[error("'{0}' is not a derivation file")]
    NotDerivationFile(StorePath),
    /// The file does not parse.
    #[error("'{path}' is not a valid derivation: {source}")]
    Parse {
        /// The `.drv`.
        path: StorePath,
        /// The parser's error.
        source: AtermError,
    },
    /// The derivation's name or the hash modulo of one in the graph is wrong.
    #[error("'{path}': {source}")]
    Derivation {
        /// The `.drv`.
        path: StorePath,
        /// What is wrong.
        source: Box<DerivationError>,
    },
    /// The output paths do not follow from the derivation.
    #[error("derivation '{path}' is not valid: {source}")]
    OutputPaths {
        /// The `.drv`.
        path: StorePath,
        /// What is wrong.
        source: Box<DerivationError>,
    },
    /// An input derivation lacks an output the derivation uses.
    #[error("'{input}' has no output '{output}' with a known path")]
    NoOutput {
        /// The input `.drv`.
        input: StorePath,
        /// The output's name.
        output: String,
    },
    /// The graph is deeper than [`MAX_DEPTH`].
    #[error("derivation graph deeper than {MAX_DEPTH} at '{0}'")]
    TooDeep(StorePath),
    /// An input is not valid for the account.
    #[error(
        "cannot build '{drv}': its input '{input}' is not valid on this server; nixbuild \
         builds a derivation only when its inputs are present (build or copy them first)"
    )]
    MissingInput {
        /// The `.drv` to build.
        drv: StorePath,
        /// The first input missing.
        input: StorePath,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking task of the walk panicked.
    #[error("internal error in a build task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Reads, checks and resolves the `.drv` at `drv_path` for BuildPaths.
pub(super) fn drv_job(
    store: &Store,
    account: &str,
    drv_path: &StorePath,
    options: BuildOptions,
) -> Result<BuildJob, DrvError> {
    let mut memo = HashMap::new();
    let drv = read_drv(store, account, drv_path)?;
    let name = drv.basic.name().map_err(|source| DrvError::Derivation {
        path: drv_path.clone(),
        source: Box::new(source),
    })?;
    for input in drv.input_drvs.keys() {
        modulo_of(store, account, input, &mut memo, 0)?;
    }
    drv.verify_output_paths(name, |p| memo.get(p).copied())
        .map_err(|source| DrvError::OutputPaths {
            path: drv_path.clone(),
            source: Box::new(source),
        })?;
    let mut input_srcs = drv.basic.input_srcs.clone();
    for (input, wanted) in &drv.input_drvs {
        let input_drv = read_drv(store, account, input)?;
        for output in wanted {
            let path = input_drv
                .basic
                .outputs
                .get(output)
                .and_then(DerivationOutput::path)
                .ok_or_else(|| DrvError::NoOutput {
                    input: input.clone(),
                    output: output.clone(),
                })?;
            input_srcs.insert(path.clone());
        }
    }
    let missing = {
        let valid = store.query_valid_paths(account, &input_srcs)?;
        input_srcs.difference(&valid).next().cloned()
    };
    if let Some(input) = missing {
        return Err(DrvError::MissingInput {
            drv: drv_path.clone(),
            input,
        });
    }
    let closure = store.query_closure(account, &input_srcs, false)?;
    let mut basic = drv.basic;
    basic.input_srcs = closure;
    Ok(BuildJob {
        account: account.to_owned(),
        drv_path: drv_path.clone(),
        drv: basic,
        options,
    })
}

fn read_drv(store: &Store, account: &str, path: &StorePath) -> Result<Derivation, DrvError> {
    if !path.is_derivation() {
        return Err(DrvError::NotDerivationPath(path.clone()));
    }
    let text = store
        .read_small_file(account, path, MAX_DERIVATION_SIZE)?
        .ok_or_else(|| DrvError::NotDerivationFile(path.clone()))?;
    Derivation::from_aterm(&text).map_err(|source| DrvError::Parse {
        path: path.clone(),
        source,
    })
}

/// The unmasked `hashDerivationModulo` of the `.drv` at `path`, recursively, memoised.
fn modulo_of(
    store: &Store,
    account: &str,
    path: &StorePath,
    memo: &mut HashMap<StorePath, Hash>,
    depth: usize,
) -> Result<Hash, DrvError> {
    if let Some(h) = memo.get(path) {
        return Ok(*h);
    }
    if depth > MAX_DEPTH {
        return Err(DrvError::TooDeep(path.clone()));
    }
    let drv = read_drv(store, account, path)?;
    for input in drv.input_drvs.keys() {
        modulo_of(store, account, input, memo, depth + 1)?;
    }
    let h = drv
        .hash_modulo(false, |p| memo.get(p).copied())
        .map_err(|source| DrvError::Derivation {
            path: path.clone(),
            source: Box::new(source),
        })?;
    memo.insert(path.clone(), h);
    Ok(h)
}
