//! What a build needs from the sandbox: the derivation side ([`BuildRequest`]) and the host side
//! ([`HostSetup`]). Both are plain data; [`plan`](crate::plan()) validates them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use nixbuild_core::derivation::options::GraphPath;
use serde::{Deserialize, Serialize};

/// The derivation side of a build: what the client asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// The builder's absolute path inside the sandbox (usually a store path).
    pub builder: Vec<u8>,
    /// The builder's arguments (`argv[1..]`).
    pub args: Vec<Vec<u8>>,
    /// The derivation's `env`, as in the `.drv` (it already holds `out` and the other output
    /// paths, `name`, `system`, `builder`, `passAsFile`, `impureEnvVars`, ..., or `__json`
    /// with the structured attributes).
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The derivation's `system`, e.g. `x86_64-linux`.
    pub system: String,
    /// The input closure: every store path the builder may see, with where its contents are on
    /// the host.
    pub inputs: Vec<InputPath>,
    /// Output name → absolute store path (`/nix/store/<hash>-<name>`).
    pub outputs: BTreeMap<String, String>,
    /// Whether the derivation is fixed-output. This one bit gives the build the host network,
    /// the host resolver files and the impure environment variables (docs/sandbox.md C.1).
    pub fixed_output: bool,
    /// The derivation's `requiredSystemFeatures`, e.g. `kvm`, `big-parallel`.
    pub required_features: BTreeSet<String>,
    /// Cores granted by the scheduler; becomes `NIX_BUILD_CORES` (never 0).
    pub cores: u32,
    /// The closure of each `exportReferencesGraph` entry, by name, as the caller's store holds
    /// it (every entry the derivation names must be here).
    pub graphs: BTreeMap<String, Vec<GraphPath>>,
}

/// One store path of the input closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPath {
    /// `<hash>-<name>`, the entry under `/nix/store`.
    pub base_name: String,
    /// The host path holding the path's contents: `<state>/objects/<key>`. It is the root of the
    /// store path itself (a directory, a file or a symlink), not a directory containing it.
    pub host_path: PathBuf,
    /// What the root of the store path is, so the plan knows which mount point to make.
    pub kind: InputKind,
}

/// The file type at the root of a store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputKind {
    /// A directory: bind-mounted onto an empty directory.
    Directory,
    /// A regular file: bind-mounted onto an empty file.
    File,
    /// A symlink: recreated with the same target (a bind mount would follow it).
    Symlink {
        /// The link's target, as stored.
        target: PathBuf,
    },
}

/// The host side of a build: what the daemon allocated for it and what the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSetup {
    /// The host's own system, e.g. `x86_64-linux`. Decides the seccomp architectures and the
    /// personality (`i686-linux` on `x86_64-linux` runs as `PER_LINUX32`).
    pub host_system: String,
    /// The host uid this build runs as (mapped to 1000 inside). Never 0, never shared by two
    /// running builds (`docs/design.md`, Builds).
    pub build_uid: u32,
    /// The host gid this build runs as (mapped to 100 inside). Never 0.
    pub build_gid: u32,
    /// An empty directory, owned by root with mode 0700, that belongs to this build alone. Every
    /// host-side file of the sandbox is created under it (see [`ScratchLayout`]); removing it
    /// after the build removes everything the build left.
    pub scratch_dir: PathBuf,
    /// The store's `<state>/objects` directory. Every input must be one of its entries.
    pub objects_dir: PathBuf,
    /// Whether the host has `/dev/kvm`.
    pub has_dev_kvm: bool,
    /// The host's resolver files, bind-mounted only into fixed-output builds. Each is the
    /// already-canonicalised (symlink-free) host path, or `None` if the host lacks it.
    pub resolver: ResolverFiles,
    /// Values for a fixed-output derivation's `impureEnvVars` (the daemon's environment or its
    /// configured impure env). A listed name missing here is passed as `""`.
    pub impure_env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `size=` of the `/dev/shm` tmpfs (Nix's `sandbox-dev-shm-size`, default `50%`).
    pub dev_shm_size: String,
}

/// Host files that a fixed-output build sees (docs/sandbox.md C.6). Paths are absolute host paths
/// with symlinks already resolved by the caller (the plan does no I/O).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolverFiles {
    /// The host's `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
    /// The host's `/etc/services`.
    pub services: Option<PathBuf>,
    /// The host's `/etc/hosts`.
    pub hosts: Option<PathBuf>,
    /// The CA bundle (Nix's `ssl-cert-file`), mounted at `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_bundle: Option<PathBuf>,
}

/// The fixed names of the directories the plan creates under [`HostSetup::scratch_dir`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchLayout {
    /// `<scratch>/root`: the new root; bind-mounted onto itself, read-only once set up.
    #[serde(with = "crate::helper_messages::bytes")]
    pub root: PathBuf,
    /// `<scratch>/build`: the build directory, `/build` inside, owned by the build uid.
    #[serde(with = "crate::helper_messages::bytes")]
    pub build: PathBuf,
    /// `<scratch>/store`: `/nix/store` inside, where outputs are created (mode 01775).
    #[serde(with = "crate::helper_messages::bytes")]
    pub store: PathBuf,
    /// `<scratch>/tmp`: `/tmp` inside (mode 01777), on disk like Nix's.
    #[serde(with = "crate::helper_messages::bytes")]
    pub tmp: PathBuf,
}

impl ScratchLayout {
    /// The layout under `scratch_dir`.
    pub fn new(scratch_dir: &std::path::Path) -> ScratchLayout {
        ScratchLayout {
            root: scratch_dir.join("root"),
            build: scratch_dir.join("build"),
            store: scratch_dir.join("store"),
            tmp: scratch_dir.join("tmp"),
        }
    }
}
