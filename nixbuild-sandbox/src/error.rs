//! Why a [`BuildRequest`](crate::BuildRequest) could not be turned into a plan.

use std::path::PathBuf;

use nixbuild_core::store_path::StorePathError;

/// An input to [`plan`](crate::plan()) that the sandbox refuses. Each variant names the field
/// and the offending value, so the daemon can report it as the build's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// An input of the closure has a base name that is not `<32 nix32 chars>-<name>` (this
    /// includes any `/`, so it can never escape `/nix/store`).
    #[error("input store path base name {base_name:?} is invalid: {source}")]
    BadInputName {
        /// The base name as given.
        base_name: String,
        /// What is wrong with it.
        source: StorePathError,
    },
    /// An output path is not `/nix/store/<valid base name>`.
    #[error("output {output:?} has an invalid store path {path:?}: {source}")]
    BadOutputPath {
        /// The output name.
        output: String,
        /// The path as given.
        path: String,
        /// What is wrong with it.
        source: StorePathError,
    },
    /// An output name is empty or contains a byte that cannot be part of an environment name.
    #[error("output name {0:?} is invalid")]
    BadOutputName(String),
    /// Two outputs have the same store path.
    #[error("store path {0:?} is given for two outputs")]
    DuplicateOutputPath(String),
    /// The derivation has no outputs.
    #[error("the derivation has no outputs")]
    NoOutputs,
    /// The same input base name appears twice in the closure.
    #[error("input {0:?} is listed twice in the closure")]
    DuplicateInput(String),
    /// An input's host path is not a direct child of the store's objects directory.
    #[error("input {base_name:?} maps to {path:?}, which is not an entry of {objects_dir:?}")]
    InputOutsideObjects {
        /// The input's base name.
        base_name: String,
        /// The host path given for it.
        path: PathBuf,
        /// The objects directory every input must come from.
        objects_dir: PathBuf,
    },
    /// A host path that must be absolute and normal (no `.`, `..`) is not.
    #[error("{what} {path:?} must be an absolute path without '.' or '..' components")]
    BadHostPath {
        /// Which field.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// The scratch directory and the objects directory overlap (one contains the other), so a
    /// build's writable directories could reach store objects or the reverse.
    #[error("scratch directory {scratch_dir:?} and objects directory {objects_dir:?} overlap")]
    OverlappingDirs {
        /// The build's scratch directory.
        scratch_dir: PathBuf,
        /// The store's objects directory.
        objects_dir: PathBuf,
    },
    /// A resolver file lies in the build's scratch directory, which the build can write: a
    /// fixed-output build would see (and could have planted) its own resolver configuration.
    #[error("resolver file {path:?} lies in the build's scratch directory {scratch_dir:?}")]
    ResolverInScratch {
        /// The resolver file as given.
        path: PathBuf,
        /// The build's scratch directory.
        scratch_dir: PathBuf,
    },
    /// A symlink input has an empty target or a target containing a NUL byte.
    #[error("symlink input {0:?} has an empty or NUL-containing target")]
    BadSymlinkTarget(String),
    /// The build would run as host uid 0.
    #[error("the build uid must not be 0 (root)")]
    RootBuildUid,
    /// The build would run as host gid 0.
    #[error("the build gid must not be 0 (root)")]
    RootBuildGid,
    /// No cores were granted.
    #[error("a build needs at least one core; 0 were granted")]
    NoCores,
    /// The builder is not an absolute path (this includes Nix's `builtin:` builders, which do not
    /// run in the sandbox).
    #[error("builder {0:?} is not an absolute path")]
    BuilderNotAbsolute(String),
    /// The builder, an argument, or an environment name or value contains a NUL byte, which
    /// `execve` cannot carry.
    #[error("{what} contains a NUL byte: {value:?}")]
    NulByte {
        /// Which field (`builder`, `argument`, `environment name`, `environment value`).
        what: &'static str,
        /// The value, lossily decoded.
        value: String,
    },
    /// The host is not one the plan has a seccomp table and personality rules for.
    #[error("host system {0:?} is not supported by the sandbox (only x86_64-linux)")]
    UnsupportedHost(String),
    /// The derivation's platform cannot run on this host.
    #[error("derivation system {system:?} cannot be built on host {host:?}")]
    UnsupportedPlatform {
        /// The derivation's `system`.
        system: String,
        /// The host's system.
        host: String,
    },
    /// The derivation requires a system feature the host cannot provide.
    #[error("the derivation requires feature {0:?}, which this host does not provide")]
    MissingFeature(String),
    /// The derivation's options (structured attributes, `exportReferencesGraph`, ...) are
    /// malformed.
    #[error("{0}")]
    Options(#[from] nixbuild_core::derivation::options::OptionsError),
    /// The derivation exports a references graph that the request does not carry (the caller
    /// computes each closure from its store, [`crate::BuildRequest::graphs`]).
    #[error("the closure of exportReferencesGraph entry {0:?} was not provided")]
    GraphMissing(String),
    /// A tmpfs size would inject extra mount options.
    #[error("tmpfs size {0:?} must be a non-empty size such as 50% or 64m (no ',' or '=')")]
    BadTmpfsSize(String),
}
