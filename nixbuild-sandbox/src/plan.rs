//! The plan itself: [`plan`] turns a validated [`BuildRequest`] and [`HostSetup`] into a
//! [`SandboxPlan`], the complete list of what the executor must do. No I/O happens here.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use nixbuild_core::store_path::StorePath;
use serde::{Deserialize, Serialize};

use crate::env::{build_env, BuildDirFile, EnvVars, Rewrites};
use crate::files::{
    ETC_GROUP, ETC_HOSTS, ETC_NSSWITCH_FOD, ETC_PASSWD, SANDBOX_BUILD_DIR, SANDBOX_GID, SANDBOX_UID,
};
use crate::seccomp::SeccompPlan;
use crate::{BuildRequest, HostSetup, InputKind, PlanError, ScratchLayout};

/// `&'static str`, spelled through an alias so that serde does not borrow it from the input
/// (the helper decodes these with `helper_messages::leak_str`).
type FixedStr = &'static str;

/// The namespaces the helper creates with `clone` (docs/sandbox.md C.2). There is no unsandboxed
/// fallback: if any of them cannot be created, the build fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    /// `CLONE_NEWUSER`: always.
    pub user: bool,
    /// `CLONE_NEWNS`: always.
    pub mount: bool,
    /// `CLONE_NEWPID`: always; the builder is PID 1 and everything dies with it.
    pub pid: bool,
    /// `CLONE_NEWIPC`: always.
    pub ipc: bool,
    /// `CLONE_NEWUTS`: always, for the hostname.
    pub uts: bool,
    /// `CLONE_NEWNET`: for every build except fixed-output ones, which share the host network.
    pub net: bool,
}

impl Namespaces {
    /// The `CLONE_NEW*` flags for `clone`, with the kernel's values.
    pub fn clone_flags(self) -> u64 {
        [
            (self.mount, 0x0002_0000),
            (self.uts, 0x0400_0000),
            (self.ipc, 0x0800_0000),
            (self.user, 0x1000_0000),
            (self.pid, 0x2000_0000),
            (self.net, 0x4000_0000),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, flag)| acc | flag)
    }
}

/// One line of `/proc/<pid>/uid_map` or `gid_map`: `count` ids from `inside` map to `outside`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// The first id inside the namespace.
    pub inside: u32,
    /// The first id on the host.
    pub outside: u32,
    /// How many ids.
    pub count: u32,
}

impl IdMap {
    /// The text written to the map file, as Nix writes it (no trailing newline).
    pub fn line(&self) -> String {
        format!("{} {} {}", self.inside, self.outside, self.count)
    }
}

/// What the parent writes for the child's user namespace (docs/sandbox.md C.3), in this order:
/// `uid_map`, then `setgroups`, then `gid_map`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMaps {
    /// `/proc/<pid>/uid_map`: 1000 → the build uid.
    pub uid_map: IdMap,
    /// `/proc/<pid>/setgroups`: `deny`, so the builder cannot drop gid 100 with `setgroups`.
    #[serde(deserialize_with = "crate::helper_messages::leak_str")]
    pub setgroups: FixedStr,
    /// `/proc/<pid>/gid_map`: 100 → the build gid.
    pub gid_map: IdMap,
}

/// A filesystem step the helper performs on the host **before** `clone`, as root in the
/// initial namespaces. Every path is inside the build's scratch directory; none exists yet.
/// The executor must create them in order (parents come first) and without following symlinks.
///
/// They run before `clone` rather than in the child because some belong to the build user
/// (`/build`, `passAsFile` files), and once inside its user namespace the child can no longer
/// `chown` a root-owned file: root is not mapped there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostOp {
    /// `mkdir(path, mode)` then `chown(uid, gid)`.
    CreateDir {
        /// Where.
        #[serde(with = "crate::helper_messages::bytes")]
        path: PathBuf,
        /// Permission bits (including sticky).
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Create a regular file with these contents (empty for a mount point), mode and owner.
    CreateFile {
        /// Where.
        #[serde(with = "crate::helper_messages::bytes")]
        path: PathBuf,
        /// Contents.
        #[serde(with = "crate::helper_messages::bytes")]
        contents: Vec<u8>,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// `symlink(target, path)`, owned by root.
    Symlink {
        /// Where.
        #[serde(with = "crate::helper_messages::bytes")]
        path: PathBuf,
        /// What it points to.
        #[serde(with = "crate::helper_messages::bytes")]
        target: PathBuf,
    },
    /// Mount a new `tmpfs` (`nosuid`, `nodev`, `noexec`) on the directory `path`, made by an
    /// earlier step, in the helper's own mount namespace ([`Step::PrivateMounts`] must come
    /// first, or the executor refuses): what later steps create under it lives in memory,
    /// and the host never sees it.
    Tmpfs {
        /// The mount point.
        #[serde(with = "crate::helper_messages::bytes")]
        path: PathBuf,
        /// The mount data: size and inode limits, and the root directory's mode and owner.
        options: String,
    },
}

impl HostOp {
    /// The path this step creates.
    pub fn path(&self) -> &Path {
        match self {
            HostOp::CreateDir { path, .. }
            | HostOp::CreateFile { path, .. }
            | HostOp::Symlink { path, .. }
            | HostOp::Tmpfs { path, .. } => path,
        }
    }
}

/// A mount step the child performs inside its namespaces, in order (docs/sandbox.md C.4, C.5).
/// Until [`MountOp::PivotRoot`], paths are host paths under the new root; after it, sandbox paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountOp {
    /// `mount(NULL, "/", NULL, MS_PRIVATE | MS_REC)`: nothing propagates back to the host.
    MakeRootPrivate,
    /// `mount(source, target, NULL, MS_BIND [| MS_REC])`.
    Bind {
        /// The host path.
        #[serde(with = "crate::helper_messages::bytes")]
        source: PathBuf,
        /// The mount point.
        #[serde(with = "crate::helper_messages::bytes")]
        target: PathBuf,
        /// `MS_REC`.
        recursive: bool,
    },
    /// Remount a bind mount read-only (`MS_REMOUNT | MS_BIND | MS_RDONLY`), keeping the flags
    /// the kernel locked on it (`nosuid`, `nodev`, `noexec`), which a user namespace may not
    /// clear.
    RemountReadOnly {
        /// The mount point.
        #[serde(with = "crate::helper_messages::bytes")]
        target: PathBuf,
    },
    /// A new `tmpfs`.
    Tmpfs {
        /// The mount point.
        #[serde(with = "crate::helper_messages::bytes")]
        target: PathBuf,
        /// The mount data, e.g. `size=50%`.
        options: String,
    },
    /// A new `devpts` instance; if the kernel refuses `newinstance`, the build fails (no
    /// fallback to the host's `/dev/pts`).
    Devpts {
        /// The mount point.
        #[serde(with = "crate::helper_messages::bytes")]
        target: PathBuf,
        /// The mount data: `newinstance,mode=0620`.
        options: String,
    },
    /// A new `proc`, which shows only the sandbox's PID namespace.
    Proc {
        /// The mount point.
        #[serde(with = "crate::helper_messages::bytes")]
        target: PathBuf,
    },
    /// `chmod(path, mode)` on a file of a freshly mounted filesystem (`/dev/pts/ptmx`).
    Chmod {
        /// The file.
        #[serde(with = "crate::helper_messages::bytes")]
        path: PathBuf,
        /// The new mode.
        mode: u32,
    },
    /// `chdir(new_root)`, `mkdir(put_old, 0500)`, `pivot_root(".", put_old)`, `chroot(".")`.
    PivotRoot {
        /// The new root (a mount point: it was bind-mounted onto itself).
        #[serde(with = "crate::helper_messages::bytes")]
        new_root: PathBuf,
        /// The old root's mount point, relative to the new root.
        #[serde(with = "crate::helper_messages::bytes")]
        put_old: PathBuf,
    },
    /// `umount2(path, MNT_DETACH)` then `rmdir(path)`: the host's tree becomes unreachable.
    DetachOldRoot {
        /// The old root's mount point inside the sandbox.
        #[serde(with = "crate::helper_messages::bytes")]
        path: PathBuf,
    },
}

/// A resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Which limit.
    pub resource: RlimitResource,
    /// The soft limit.
    pub soft: RlimitValue,
    /// The hard limit.
    pub hard: RlimitValue,
}

/// The limits the plan sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RlimitResource {
    /// `RLIMIT_CORE`.
    Core,
}

/// A limit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RlimitValue {
    /// A number.
    Value(u64),
    /// `RLIM_INFINITY`.
    Infinity,
}

/// `personality(2)` flags (docs/sandbox.md C.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Personality {
    /// `PER_LINUX32`: a 32-bit platform on a 64-bit host (`uname -m` says `i686`).
    pub linux32: bool,
    /// `ADDR_NO_RANDOMIZE`: always, for reproducibility.
    pub addr_no_randomize: bool,
}

/// What `execve` gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// The builder's path inside the sandbox.
    #[serde(with = "crate::helper_messages::bytes")]
    pub path: Vec<u8>,
    /// `argv`: the builder's base name, then the derivation's args.
    #[serde(with = "crate::helper_messages::bytes")]
    pub argv: Vec<Vec<u8>>,
    /// `envp` as `(name, value)` pairs, sorted by name (docs/sandbox.md C.8).
    #[serde(with = "crate::helper_messages::bytes")]
    pub env: EnvVars,
}

/// One step of the executor, in the order [`SandboxPlan::steps`] lists them (docs/sandbox.md C.2,
/// C.7, C.12). The order matters for security: `no_new_privs` before the filter, the filter after
/// the pivot, `setuid` last before the marker and `execve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Helper, before `clone`: `unshare(CLONE_NEWNS)`, then make `/` private recursively,
    /// so that the mounts of [`Step::HostOps`] stay out of the host's namespace. The child's
    /// mount namespace is a copy of this one.
    PrivateMounts,
    /// Helper, before `clone`: perform [`SandboxPlan::host_ops`].
    HostOps,
    /// Helper: `setgroups(0, NULL)`, dropping supplementary groups.
    DropSupplementaryGroups,
    /// Helper: `clone` with [`SandboxPlan::namespaces`] (plus `SIGCHLD`); fail if refused.
    Clone,
    /// Helper: write [`SandboxPlan::id_maps`], then release the child through a pipe.
    WriteIdMaps,
    /// Child: `setsid`; stdin from `/dev/null`, stderr to the log pty's slave in raw mode,
    /// stdout a copy of stderr.
    Stdio,
    /// Child: `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`, a new, empty, anonymous session
    /// keyring. The session keyring is the one keyring inherited across `clone` and `execve`
    /// (user namespaces included): without this the builder would possess the daemon's (a
    /// systemd service has one of its own), read its keys, and leave keys there for every
    /// later build. Owned by the helper's uid (root), so it is charged to root's key quota
    /// and no earlier build's keys can make it fail; the builder possesses it, which gives it
    /// full use. `@u` and `@us` are already per user namespace (Linux 5.3).
    SessionKeyring,
    /// Child: bring up `lo` (only in a new network namespace).
    LoopbackUp,
    /// Child: [`SandboxPlan::hostname`] and [`SandboxPlan::domainname`].
    Hostname,
    /// Child: perform [`SandboxPlan::mounts`].
    Mounts,
    /// Child: `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    NoNewPrivs,
    /// Child: load [`SandboxPlan::seccomp`].
    Seccomp,
    /// Child: the Landlock scope, if the kernel supports it.
    Landlock,
    /// Child: [`SandboxPlan::personality`].
    Personality,
    /// Child: `chdir(`[`SandboxPlan::cwd`]`)`.
    Chdir,
    /// Child: close every fd but 0, 1, 2 (and the set-up error channel, close-on-exec).
    CloseFds,
    /// Child: [`SandboxPlan::rlimits`].
    Rlimits,
    /// Child: [`SandboxPlan::umask`].
    Umask,
    /// Child: `setgid(`[`SandboxPlan::gid`]`)`.
    SetGid,
    /// Child: `setuid(`[`SandboxPlan::uid`]`)`; the capabilities go with the `execve`.
    SetUid,
    /// Child: write [`SETUP_DONE`] to stderr.
    SetupDone,
    /// Child: `execve` [`SandboxPlan::exec`].
    Exec,
}

/// What the child writes to stderr once set-up succeeded, just before `execve`.
pub const SETUP_DONE: &[u8] = b"\x02\n";

/// Everything the executor does for one build; [`Self::steps`] gives the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxPlan {
    /// The executor's steps, in order.
    pub steps: Vec<Step>,
    /// Host directories used by this build.
    pub layout: ScratchLayout,
    /// Filesystem steps before `clone`.
    pub host_ops: Vec<HostOp>,
    /// The namespaces to create.
    pub namespaces: Namespaces,
    /// The user namespace maps.
    pub id_maps: IdMaps,
    /// Bring `lo` up (`IFF_UP | IFF_LOOPBACK | IFF_RUNNING`): only in a new network namespace.
    pub loopback_up: bool,
    /// `sethostname`.
    #[serde(deserialize_with = "crate::helper_messages::leak_str")]
    pub hostname: FixedStr,
    /// `setdomainname`.
    #[serde(deserialize_with = "crate::helper_messages::leak_str")]
    pub domainname: FixedStr,
    /// The mount steps, ending with the pivot and the root made read-only.
    pub mounts: Vec<MountOp>,
    /// `PR_SET_NO_NEW_PRIVS`, set before the seccomp filter is loaded.
    pub no_new_privs: bool,
    /// The seccomp filter.
    pub seccomp: SeccompPlan,
    /// Restrict abstract unix sockets with Landlock when the kernel's ABI is at least 6 (current
    /// Nix); matters for fixed-output builds, which share the host network namespace.
    pub landlock_scope_abstract_unix_sockets: bool,
    /// `personality(2)`.
    pub personality: Personality,
    /// The working directory of the builder.
    #[serde(deserialize_with = "crate::helper_messages::leak_str")]
    pub cwd: FixedStr,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// The umask of the builder.
    pub umask: u32,
    /// `setgid` to this (inside the namespace), before `setuid`.
    pub gid: u32,
    /// `setuid` to this (inside the namespace).
    pub uid: u32,
    /// The builder.
    pub exec: Exec,
    /// Output name → host path where the builder's output appears when it succeeds.
    #[serde(with = "crate::helper_messages::bytes")]
    pub outputs: Vec<(String, PathBuf)>,
}

/// The host device nodes bind-mounted into `/dev` (without `kvm`, which depends on the build).
pub const DEV_NODES: [&str; 6] = ["full", "null", "random", "tty", "urandom", "zero"];

/// The symlinks in `/dev`.
pub const DEV_SYMLINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "/dev/pts/ptmx"),
];

/// The size and inode limits of the sandbox root's `tmpfs` ([`HostOp::Tmpfs`]): it holds only
/// the skeleton (about 30 entries and the small `/etc` files), is read-only once set up, and
/// every build, input and output directory is a bind mount from the host.
pub const ROOT_TMPFS_LIMITS: &str = "size=1m,nr_inodes=256";

/// The name of the old root's mount point during the pivot.
pub const PUT_OLD: &str = "real-root";

/// An absolute path without `.`/`..` components.
fn is_normal_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn check_host_path(what: &'static str, path: &Path) -> Result<(), PlanError> {
    if is_normal_absolute(path) {
        Ok(())
    } else {
        Err(PlanError::BadHostPath {
            what,
            path: path.to_owned(),
        })
    }
}

/// Whether a build for `system` can run on `host`: `Ok(true)` if it needs `PER_LINUX32`.
fn platform(system: &str, host: &str) -> Result<bool, PlanError> {
    if host != "x86_64-linux" {
        return Err(PlanError::UnsupportedHost(host.to_owned()));
    }
    match system {
        "x86_64-linux" => Ok(false),
        "i686-linux" => Ok(true),
        _ => Err(PlanError::UnsupportedPlatform {
            system: system.to_owned(),
            host: host.to_owned(),
        }),
    }
}

fn check_size(size: &str) -> Result<(), PlanError> {
    if size.is_empty() || size.contains([',', '=', '\0']) {
        return Err(PlanError::BadTmpfsSize(size.to_owned()));
    }
    Ok(())
}

/// Builds the plan for one build, validating every input.
pub fn plan(req: &BuildRequest, host: &HostSetup) -> Result<SandboxPlan, PlanError> {
    // Host side.
    if host.build_uid == 0 {
        return Err(PlanError::RootBuildUid);
    }
    if host.build_gid == 0 {
        return Err(PlanError::RootBuildGid);
    }
    check_host_path("scratch directory", &host.scratch_dir)?;
    check_host_path("objects directory", &host.objects_dir)?;
    if host.scratch_dir.starts_with(&host.objects_dir)
        || host.objects_dir.starts_with(&host.scratch_dir)
    {
        return Err(PlanError::OverlappingDirs {
            scratch_dir: host.scratch_dir.clone(),
            objects_dir: host.objects_dir.clone(),
        });
    }
    check_size(&host.dev_shm_size)?;
    let linux32 = platform(&req.system, &host.host_system)?;

    // Builder and arguments.
    if req.builder.contains(&0) {
        return Err(PlanError::NulByte {
            what: "builder",
            value: String::from_utf8_lossy(&req.builder).into_owned(),
        });
    }
    if !req.builder.starts_with(b"/") {
        return Err(PlanError::BuilderNotAbsolute(
            String::from_utf8_lossy(&req.builder).into_owned(),
        ));
    }
    if let Some(arg) = req.args.iter().find(|a| a.contains(&0)) {
        return Err(PlanError::NulByte {
            what: "argument",
            value: String::from_utf8_lossy(arg).into_owned(),
        });
    }

    // Features: kvm is the only one the sandbox itself provides.
    let want_kvm = req.required_features.contains("kvm");
    if want_kvm && !host.has_dev_kvm {
        return Err(PlanError::MissingFeature("kvm".into()));
    }

    // Outputs.
    if req.outputs.is_empty() {
        return Err(PlanError::NoOutputs);
    }
    let layout = ScratchLayout::new(&host.scratch_dir);
    let mut output_names = BTreeSet::new();
    let mut outputs = Vec::new();
    for (name, path) in &req.outputs {
        if name.is_empty() || name.contains(['\0', '=', '/']) {
            return Err(PlanError::BadOutputName(name.clone()));
        }
        let sp = StorePath::from_absolute_path(path.as_bytes()).map_err(|source| {
            PlanError::BadOutputPath {
                output: name.clone(),
                path: path.clone(),
                source,
            }
        })?;
        let base = sp.base_name();
        outputs.push((name.clone(), layout.store.join(&base)));
        if !output_names.insert(base) {
            return Err(PlanError::DuplicateOutputPath(path.clone()));
        }
    }

    // Inputs.
    let mut inputs = Vec::new();
    let mut seen = BTreeSet::new();
    for input in &req.inputs {
        StorePath::from_base_name(input.base_name.as_bytes()).map_err(|source| {
            PlanError::BadInputName {
                base_name: input.base_name.clone(),
                source,
            }
        })?;
        if !seen.insert(input.base_name.as_str()) {
            return Err(PlanError::DuplicateInput(input.base_name.clone()));
        }
        let inside_objects = is_normal_absolute(&input.host_path)
            && input.host_path.parent() == Some(host.objects_dir.as_path());
        if !inside_objects {
            return Err(PlanError::InputOutsideObjects {
                base_name: input.base_name.clone(),
                path: input.host_path.clone(),
                objects_dir: host.objects_dir.clone(),
            });
        }
        if let InputKind::Symlink { target } = &input.kind {
            if target.as_os_str().is_empty() || target.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(PlanError::BadSymlinkTarget(input.base_name.clone()));
            }
        }
        // Like Nix, never mount the derivation's own outputs, even if they are in the closure.
        if !output_names.contains(&input.base_name) {
            inputs.push(input);
        }
    }
    inputs.sort_by(|a, b| a.base_name.cmp(&b.base_name));

    let resolver: Vec<(&str, &PathBuf)> = if req.fixed_output {
        [
            ("etc/resolv.conf", &host.resolver.resolv_conf),
            ("etc/services", &host.resolver.services),
            ("etc/hosts", &host.resolver.hosts),
            (
                "etc/ssl/certs/ca-certificates.crt",
                &host.resolver.ca_bundle,
            ),
        ]
        .into_iter()
        .filter_map(|(at, p)| p.as_ref().map(|p| (at, p)))
        .collect()
    } else {
        Vec::new()
    };
    for (_, p) in &resolver {
        check_host_path("resolver file", p)?;
        if p.starts_with(&host.scratch_dir) {
            return Err(PlanError::ResolverInScratch {
                path: p.to_path_buf(),
                scratch_dir: host.scratch_dir.clone(),
            });
        }
    }

    let (env, build_files) = build_env(req, host)?;

    // Host-side steps. Root-owned unless the builder must own it.
    let (uid, gid) = (host.build_uid, host.build_gid);
    let root = &layout.root;
    let mut host_ops = Vec::new();
    let dir = |path: PathBuf, mode: u32, uid: u32, gid: u32| HostOp::CreateDir {
        path,
        mode,
        uid,
        gid,
    };
    let file = |path: PathBuf, contents: &[u8], mode: u32, uid: u32, gid: u32| HostOp::CreateFile {
        path,
        contents: contents.to_vec(),
        mode,
        uid,
        gid,
    };
    host_ops.push(dir(layout.build.clone(), 0o700, uid, gid));
    host_ops.push(dir(layout.store.clone(), 0o1775, 0, gid));
    host_ops.push(dir(layout.tmp.clone(), 0o1777, 0, 0));
    host_ops.push(dir(root.clone(), 0o750, 0, gid));
    // The skeleton below the root lives in memory: creating it on the state directory's
    // file system cost most of the helper's time (inode allocation).
    host_ops.push(HostOp::Tmpfs {
        path: root.clone(),
        options: format!("{ROOT_TMPFS_LIMITS},mode=0750,uid=0,gid={gid}"),
    });
    for (sub, mode) in [
        ("nix", 0o755),
        ("nix/store", 0o755),
        ("build", 0o755),
        ("tmp", 0o755),
        ("proc", 0o555),
        ("dev", 0o755),
        ("dev/shm", 0o755),
        ("dev/pts", 0o755),
        ("etc", 0o555),
    ] {
        host_ops.push(dir(root.join(sub), mode, 0, 0));
    }
    let mut dev_nodes: Vec<&str> = DEV_NODES.to_vec();
    if want_kvm {
        dev_nodes.push("kvm");
        dev_nodes.sort_unstable();
    }
    for node in &dev_nodes {
        host_ops.push(file(root.join("dev").join(node), b"", 0o644, 0, 0));
    }
    for (name, target) in DEV_SYMLINKS {
        host_ops.push(HostOp::Symlink {
            path: root.join("dev").join(name),
            target: target.into(),
        });
    }
    host_ops.push(file(root.join("etc/passwd"), ETC_PASSWD, 0o644, 0, 0));
    host_ops.push(file(root.join("etc/group"), ETC_GROUP, 0o644, 0, 0));
    if req.fixed_output {
        host_ops.push(file(
            root.join("etc/nsswitch.conf"),
            ETC_NSSWITCH_FOD,
            0o644,
            0,
            0,
        ));
        if host.resolver.ca_bundle.is_some() {
            host_ops.push(dir(root.join("etc/ssl"), 0o755, 0, 0));
            host_ops.push(dir(root.join("etc/ssl/certs"), 0o755, 0, 0));
        }
        for (at, _) in &resolver {
            host_ops.push(file(root.join(at), b"", 0o644, 0, 0));
        }
    } else {
        host_ops.push(file(root.join("etc/hosts"), ETC_HOSTS, 0o644, 0, 0));
    }
    for BuildDirFile { name, contents } in &build_files {
        host_ops.push(file(layout.build.join(name), contents, 0o644, uid, gid));
    }
    // Input mount points live in the store directory, root-owned, so the builder cannot
    // remove them from the sticky /nix/store.
    for input in &inputs {
        let at = layout.store.join(&input.base_name);
        host_ops.push(match &input.kind {
            InputKind::Directory => dir(at, 0o555, 0, 0),
            InputKind::File => file(at, b"", 0o444, 0, 0),
            InputKind::Symlink { target } => HostOp::Symlink {
                path: at,
                target: target.clone(),
            },
        });
    }

    // Mount steps, in the child.
    let bind = |source: &Path, target: PathBuf, recursive: bool| MountOp::Bind {
        source: source.to_owned(),
        target,
        recursive,
    };
    let mut mounts = vec![
        MountOp::MakeRootPrivate,
        bind(root, root.clone(), false),
        bind(&layout.store, root.join("nix/store"), false),
        bind(&layout.build, root.join("build"), false),
        bind(&layout.tmp, root.join("tmp"), false),
    ];
    for node in &dev_nodes {
        let target = root.join("dev").join(node);
        mounts.push(bind(&Path::new("/dev").join(node), target.clone(), false));
        mounts.push(MountOp::RemountReadOnly { target });
    }
    mounts.push(MountOp::Tmpfs {
        target: root.join("dev/shm"),
        options: format!("size={}", host.dev_shm_size),
    });
    mounts.push(MountOp::Devpts {
        target: root.join("dev/pts"),
        options: "newinstance,mode=0620".into(),
    });
    mounts.push(MountOp::Chmod {
        path: root.join("dev/pts/ptmx"),
        mode: 0o666,
    });
    for (at, source) in &resolver {
        let target = root.join(at);
        mounts.push(bind(source, target.clone(), false));
        mounts.push(MountOp::RemountReadOnly { target });
    }
    for input in &inputs {
        if matches!(input.kind, InputKind::Symlink { .. }) {
            continue;
        }
        let target = root.join("nix/store").join(&input.base_name);
        mounts.push(bind(&input.host_path, target.clone(), true));
        mounts.push(MountOp::RemountReadOnly { target });
    }
    mounts.push(MountOp::Proc {
        target: root.join("proc"),
    });
    mounts.push(MountOp::PivotRoot {
        new_root: root.clone(),
        put_old: PUT_OLD.into(),
    });
    mounts.push(MountOp::DetachOldRoot {
        path: Path::new("/").join(PUT_OLD),
    });
    // /etc, /dev and the mount points become read-only; /build, /tmp and /nix/store are their
    // own mounts and stay writable.
    mounts.push(MountOp::RemountReadOnly { target: "/".into() });

    let argv0 = req
        .builder
        .rsplit(|&b| b == b'/')
        .next()
        .unwrap_or_default()
        .to_vec();
    let mut argv = vec![argv0];
    let rewrites = Rewrites::of(req);
    argv.extend(req.args.iter().map(|a| rewrites.apply(a)));

    let namespaces = Namespaces {
        user: true,
        mount: true,
        pid: true,
        ipc: true,
        uts: true,
        net: !req.fixed_output,
    };
    let steps = [
        Step::PrivateMounts,
        Step::HostOps,
        Step::DropSupplementaryGroups,
        Step::Clone,
        Step::WriteIdMaps,
        Step::Stdio,
        Step::SessionKeyring,
        Step::LoopbackUp,
        Step::Hostname,
        Step::Mounts,
        Step::NoNewPrivs,
        Step::Seccomp,
        Step::Landlock,
        Step::Personality,
        Step::Chdir,
        Step::CloseFds,
        Step::Rlimits,
        Step::Umask,
        Step::SetGid,
        Step::SetUid,
        Step::SetupDone,
        Step::Exec,
    ]
    .into_iter()
    .filter(|s| *s != Step::LoopbackUp || namespaces.net)
    .collect();
    Ok(SandboxPlan {
        steps,
        layout,
        host_ops,
        namespaces,
        id_maps: IdMaps {
            uid_map: IdMap {
                inside: SANDBOX_UID,
                outside: uid,
                count: 1,
            },
            setgroups: "deny",
            gid_map: IdMap {
                inside: SANDBOX_GID,
                outside: gid,
                count: 1,
            },
        },
        loopback_up: namespaces.net,
        hostname: "localhost",
        domainname: "(none)",
        mounts,
        no_new_privs: true,
        seccomp: SeccompPlan::x86_64_host(),
        landlock_scope_abstract_unix_sockets: true,
        personality: Personality {
            linux32,
            addr_no_randomize: true,
        },
        cwd: SANDBOX_BUILD_DIR,
        rlimits: vec![Rlimit {
            resource: RlimitResource::Core,
            soft: RlimitValue::Value(0),
            hard: RlimitValue::Infinity,
        }],
        umask: 0o022,
        gid: SANDBOX_GID,
        uid: SANDBOX_UID,
        exec: Exec {
            path: req.builder.clone(),
            argv,
            env,
        },
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{sample_host, sample_request};
    use crate::{InputPath, ResolverFiles};

    const BASH: &str = "0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1";

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn bind(source: &str, target: &str, recursive: bool) -> MountOp {
        MountOp::Bind {
            source: p(source),
            target: p(target),
            recursive,
        }
    }

    fn ro(target: &str) -> MountOp {
        MountOp::RemountReadOnly { target: p(target) }
    }

    #[test]
    fn sample_mount_sequence_is_exactly_the_spec_layout() {
        let plan = plan(&sample_request(), &sample_host()).expect("plan");
        let s = "/var/lib/nixbuild/builds/b1";
        let r = "/var/lib/nixbuild/builds/b1/root";
        let mut expected = vec![
            MountOp::MakeRootPrivate,
            bind(r, r, false),
            bind(&format!("{s}/store"), &format!("{r}/nix/store"), false),
            bind(&format!("{s}/build"), &format!("{r}/build"), false),
            bind(&format!("{s}/tmp"), &format!("{r}/tmp"), false),
        ];
        for node in ["full", "null", "random", "tty", "urandom", "zero"] {
            expected.push(bind(
                &format!("/dev/{node}"),
                &format!("{r}/dev/{node}"),
                false,
            ));
            expected.push(ro(&format!("{r}/dev/{node}")));
        }
        expected.extend([
            MountOp::Tmpfs {
                target: p(&format!("{r}/dev/shm")),
                options: "size=50%".into(),
            },
            MountOp::Devpts {
                target: p(&format!("{r}/dev/pts")),
                options: "newinstance,mode=0620".into(),
            },
            MountOp::Chmod {
                path: p(&format!("{r}/dev/pts/ptmx")),
                mode: 0o666,
            },
            bind(
                "/var/lib/nixbuild/objects/k1",
                &format!("{r}/nix/store/{BASH}"),
                true,
            ),
            ro(&format!("{r}/nix/store/{BASH}")),
            MountOp::Proc {
                target: p(&format!("{r}/proc")),
            },
            MountOp::PivotRoot {
                new_root: p(r),
                put_old: p("real-root"),
            },
            MountOp::DetachOldRoot {
                path: p("/real-root"),
            },
            ro("/"),
        ]);
        assert_eq!(plan.mounts, expected);
    }

    #[test]
    fn sample_host_ops_build_the_spec_tree() {
        let plan = plan(&sample_request(), &sample_host()).expect("plan");
        let r = p("/var/lib/nixbuild/builds/b1/root");
        let created: Vec<String> = plan
            .host_ops
            .iter()
            .filter_map(|op| op.path().strip_prefix(&r).ok())
            .map(|rel| rel.display().to_string())
            .collect();
        let mut top: Vec<&str> = created
            .iter()
            .filter(|c| !c.is_empty() && !c.contains('/'))
            .map(String::as_str)
            .collect();
        top.sort_unstable();
        // `ls /` under Nix: build dev etc nix proc tmp.
        assert_eq!(top, ["build", "dev", "etc", "nix", "proc", "tmp"]);
        let mut dev: Vec<&str> = created
            .iter()
            .filter_map(|c| c.strip_prefix("dev/"))
            .collect();
        dev.sort_unstable();
        // `ls /dev` under Nix, without kvm.
        assert_eq!(
            dev,
            [
                "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
                "tty", "urandom", "zero"
            ]
        );
        let mut etc: Vec<&str> = created
            .iter()
            .filter_map(|c| c.strip_prefix("etc/"))
            .collect();
        etc.sort_unstable();
        assert_eq!(etc, ["group", "hosts", "passwd"]);
        let contents = |name: &str| {
            plan.host_ops.iter().find_map(|op| match op {
                HostOp::CreateFile { path, contents, .. } if *path == r.join(name) => {
                    Some(contents.clone())
                }
                _ => None,
            })
        };
        assert_eq!(contents("etc/passwd").as_deref(), Some(ETC_PASSWD));
        assert_eq!(contents("etc/group").as_deref(), Some(ETC_GROUP));
        assert_eq!(
            contents("etc/hosts").as_deref(),
            Some(&b"127.0.0.1 localhost\n::1 localhost\n"[..])
        );
        // The store directory: sticky, group-writable by the build group, like Nix's.
        assert!(plan.host_ops.contains(&HostOp::CreateDir {
            path: p("/var/lib/nixbuild/builds/b1/store"),
            mode: 0o1775,
            uid: 0,
            gid: 30001,
        }));
        assert!(plan.host_ops.contains(&HostOp::CreateDir {
            path: p("/var/lib/nixbuild/builds/b1/tmp"),
            mode: 0o1777,
            uid: 0,
            gid: 0,
        }));
        assert!(plan.host_ops.contains(&HostOp::CreateDir {
            path: p("/var/lib/nixbuild/builds/b1/build"),
            mode: 0o700,
            uid: 30001,
            gid: 30001,
        }));
        assert!(plan.host_ops.contains(&HostOp::Symlink {
            path: r.join("dev/ptmx"),
            target: p("/dev/pts/ptmx"),
        }));
        // The root is a size-limited tmpfs mounted on its directory before anything is made
        // in it; the build's own directories stay on the state directory's file system.
        let at = |path: &Path| plan.host_ops.iter().position(|op| op.path() == path);
        let tmpfs = plan
            .host_ops
            .iter()
            .position(|op| matches!(op, HostOp::Tmpfs { .. }))
            .expect("a tmpfs");
        assert_eq!(
            plan.host_ops[tmpfs],
            HostOp::Tmpfs {
                path: r.clone(),
                options: "size=1m,nr_inodes=256,mode=0750,uid=0,gid=30001".into(),
            }
        );
        assert_eq!(
            plan.host_ops
                .iter()
                .filter(|op| matches!(op, HostOp::Tmpfs { .. }))
                .count(),
            1
        );
        assert!(
            matches!(plan.host_ops[tmpfs - 1], HostOp::CreateDir { ref path, .. } if *path == r)
        );
        for (i, op) in plan.host_ops.iter().enumerate() {
            if op.path().starts_with(&r) && op.path() != r {
                assert!(i > tmpfs, "{op:?} before the tmpfs");
            }
        }
        for dir in ["build", "store", "tmp"] {
            let path = p("/var/lib/nixbuild/builds/b1").join(dir);
            assert!(at(&path).expect("made") < tmpfs, "{dir}");
        }
    }

    #[test]
    fn namespaces_have_net_unless_fixed_output() {
        let plan_s = plan(&sample_request(), &sample_host()).expect("plan");
        let all = Namespaces {
            user: true,
            mount: true,
            pid: true,
            ipc: true,
            uts: true,
            net: true,
        };
        assert_eq!(plan_s.namespaces, all);
        assert!(plan_s.loopback_up);
        assert_eq!(plan_s.namespaces.clone_flags(), 0x7c02_0000);

        let mut fod = sample_request();
        fod.fixed_output = true;
        let plan_f = plan(&fod, &sample_host()).expect("plan");
        assert_eq!(plan_f.namespaces, Namespaces { net: false, ..all });
        assert!(!plan_f.loopback_up);
        assert_eq!(plan_f.namespaces.clone_flags(), 0x3c02_0000);
        for plan in [plan_s, plan_f] {
            assert_eq!(plan.hostname, "localhost");
            assert_eq!(plan.domainname, "(none)");
        }
    }

    #[test]
    fn steps_follow_the_spec_order() {
        let plan_s = plan(&sample_request(), &sample_host()).expect("plan");
        let pos = |plan: &SandboxPlan, s: Step| plan.steps.iter().position(|x| *x == s);
        let before = |plan: &SandboxPlan, a: Step, b: Step| {
            assert!(
                pos(plan, a).expect("a") < pos(plan, b).expect("b"),
                "{a:?} {b:?}"
            )
        };
        for (a, b) in [
            (Step::PrivateMounts, Step::HostOps),
            (Step::HostOps, Step::Clone),
            (Step::DropSupplementaryGroups, Step::Clone),
            (Step::Clone, Step::WriteIdMaps),
            (Step::WriteIdMaps, Step::SessionKeyring),
            (Step::Stdio, Step::SessionKeyring),
            (Step::SessionKeyring, Step::SetUid),
            (Step::WriteIdMaps, Step::Mounts),
            (Step::LoopbackUp, Step::Mounts),
            (Step::Mounts, Step::NoNewPrivs),
            (Step::NoNewPrivs, Step::Seccomp),
            (Step::Seccomp, Step::Landlock),
            (Step::Landlock, Step::Personality),
            (Step::Chdir, Step::SetGid),
            (Step::Rlimits, Step::SetGid),
            (Step::Umask, Step::SetGid),
            (Step::SetGid, Step::SetUid),
            (Step::SetUid, Step::SetupDone),
        ] {
            before(&plan_s, a, b);
        }
        assert_eq!(plan_s.steps.last(), Some(&Step::Exec));
        assert_eq!(plan_s.steps.len(), 22);
        assert_eq!(SETUP_DONE, b"\x02\n");
        let mut fod = sample_request();
        fod.fixed_output = true;
        let plan_f = plan(&fod, &sample_host()).expect("plan");
        assert_eq!(pos(&plan_f, Step::LoopbackUp), None);
        assert_eq!(plan_f.steps.len(), 21);
        assert!(plan_f.steps.contains(&Step::SessionKeyring));
    }

    #[test]
    fn id_maps_map_1000_and_100_to_the_build_ids() {
        let mut host = sample_host();
        host.build_uid = 30007;
        host.build_gid = 30100;
        let plan = plan(&sample_request(), &host).expect("plan");
        assert_eq!(plan.id_maps.uid_map.line(), "1000 30007 1");
        assert_eq!(plan.id_maps.setgroups, "deny");
        assert_eq!(plan.id_maps.gid_map.line(), "100 30100 1");
        assert_eq!((plan.uid, plan.gid), (1000, 100));
    }

    #[test]
    fn process_settings() {
        let plan = plan(&sample_request(), &sample_host()).expect("plan");
        assert_eq!(plan.cwd, "/build");
        assert!(plan.no_new_privs);
        assert_eq!(plan.umask, 0o022);
        assert_eq!(
            plan.rlimits,
            [Rlimit {
                resource: RlimitResource::Core,
                soft: RlimitValue::Value(0),
                hard: RlimitValue::Infinity,
            }]
        );
        assert_eq!(
            plan.personality,
            Personality {
                linux32: false,
                addr_no_randomize: true
            }
        );
        assert_eq!(plan.seccomp, SeccompPlan::x86_64_host());
        assert_eq!(plan.exec.argv[0], b"bash");
        assert_eq!(&plan.exec.argv[1..], sample_request().args.as_slice());
        assert_eq!(
            plan.outputs,
            [(
                "out".to_string(),
                p("/var/lib/nixbuild/builds/b1/store/7fgb0vvbd7ymwx8rwmgc5vhw1yfw3yhm-env-dump")
            )]
        );
    }

    #[test]
    fn i686_on_x86_64_runs_as_linux32() {
        let mut req = sample_request();
        req.system = "i686-linux".into();
        let plan = plan(&req, &sample_host()).expect("plan");
        assert!(plan.personality.linux32);
    }

    fn binds(plan: &SandboxPlan) -> Vec<(PathBuf, PathBuf)> {
        plan.mounts
            .iter()
            .filter_map(|m| match m {
                MountOp::Bind { source, target, .. } => Some((source.clone(), target.clone())),
                _ => None,
            })
            .collect()
    }

    fn resolver_host() -> HostSetup {
        let mut host = sample_host();
        host.resolver = ResolverFiles {
            resolv_conf: Some(p("/run/systemd/resolve/stub-resolv.conf")),
            services: Some(p("/etc/services")),
            hosts: Some(p("/etc/hosts")),
            ca_bundle: Some(p("/etc/ssl/certs/ca-certificates.crt")),
        };
        host
    }

    #[test]
    fn resolver_files_only_for_fixed_output() {
        let r = p("/var/lib/nixbuild/builds/b1/root");
        let plan_s = plan(&sample_request(), &resolver_host()).expect("plan");
        assert!(binds(&plan_s)
            .iter()
            .all(|(s, _)| !s.starts_with("/etc") && !s.starts_with("/run")));
        assert!(!plan_s
            .host_ops
            .iter()
            .any(|op| op.path() == r.join("etc/nsswitch.conf")));

        let mut fod = sample_request();
        fod.fixed_output = true;
        let plan_f = plan(&fod, &resolver_host()).expect("plan");
        for (source, at) in [
            ("/run/systemd/resolve/stub-resolv.conf", "etc/resolv.conf"),
            ("/etc/services", "etc/services"),
            ("/etc/hosts", "etc/hosts"),
            (
                "/etc/ssl/certs/ca-certificates.crt",
                "etc/ssl/certs/ca-certificates.crt",
            ),
        ] {
            let target = r.join(at);
            let i = plan_f
                .mounts
                .iter()
                .position(|m| {
                    *m == MountOp::Bind {
                        source: p(source),
                        target: target.clone(),
                        recursive: false,
                    }
                })
                .expect("resolver bind");
            assert_eq!(plan_f.mounts[i + 1], MountOp::RemountReadOnly { target });
        }
        // The FOD's /etc/hosts is the host's (a mount point), not the sandbox's contents.
        assert!(plan_f.host_ops.contains(&HostOp::CreateFile {
            path: r.join("etc/hosts"),
            contents: Vec::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }));
        assert!(plan_f.host_ops.contains(&HostOp::CreateFile {
            path: r.join("etc/nsswitch.conf"),
            contents: b"hosts: files dns\nservices: files\n".to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }));

        // A host without the files: nothing mounted, nothing to mount onto.
        let plan_none = plan(&fod, &sample_host()).expect("plan");
        assert!(binds(&plan_none)
            .iter()
            .all(|(s, _)| !s.starts_with("/etc")));
        assert!(!plan_none
            .host_ops
            .iter()
            .any(|op| op.path() == r.join("etc/hosts")));
    }

    #[test]
    fn dev_kvm_only_when_required_and_present() {
        let kvm = (p("/dev/kvm"), p("/var/lib/nixbuild/builds/b1/root/dev/kvm"));
        let mut host = sample_host();
        host.has_dev_kvm = true;
        // Present, not required.
        let plan_p = plan(&sample_request(), &host).expect("plan");
        assert!(!binds(&plan_p).contains(&kvm));
        // Present and required.
        let mut req = sample_request();
        req.required_features.insert("kvm".into());
        let plan_k = plan(&req, &host).expect("plan");
        assert!(binds(&plan_k).contains(&kvm));
        assert!(plan_k
            .mounts
            .contains(&MountOp::RemountReadOnly { target: kvm.1 }));
        // Required, absent: refused rather than built without it.
        assert_eq!(
            plan(&req, &sample_host()),
            Err(PlanError::MissingFeature("kvm".into()))
        );
    }

    #[test]
    fn outputs_in_the_closure_are_not_mounted() {
        let mut req = sample_request();
        req.inputs.push(InputPath {
            base_name: "7fgb0vvbd7ymwx8rwmgc5vhw1yfw3yhm-env-dump".into(),
            host_path: p("/var/lib/nixbuild/objects/k2"),
            kind: InputKind::Directory,
        });
        let plan = plan(&req, &sample_host()).expect("plan");
        assert!(binds(&plan)
            .iter()
            .all(|(s, _)| s != Path::new("/var/lib/nixbuild/objects/k2")));
    }

    #[test]
    fn file_and_symlink_inputs() {
        let mut req = sample_request();
        req.inputs.push(InputPath {
            base_name: "1b9p07z77phvv2hf6gm9f28syp39f1ag-link".into(),
            host_path: p("/var/lib/nixbuild/objects/k3"),
            kind: InputKind::Symlink {
                target: p("/nix/store/0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1"),
            },
        });
        req.inputs.push(InputPath {
            base_name: "2b9p07z77phvv2hf6gm9f28syp39f1ag-file".into(),
            host_path: p("/var/lib/nixbuild/objects/k4"),
            kind: InputKind::File,
        });
        let plan = plan(&req, &sample_host()).expect("plan");
        let store = p("/var/lib/nixbuild/builds/b1/store");
        assert!(plan.host_ops.contains(&HostOp::Symlink {
            path: store.join("1b9p07z77phvv2hf6gm9f28syp39f1ag-link"),
            target: p("/nix/store/0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1"),
        }));
        assert!(binds(&plan)
            .iter()
            .all(|(s, _)| s != Path::new("/var/lib/nixbuild/objects/k3")));
        assert!(plan.host_ops.contains(&HostOp::CreateFile {
            path: store.join("2b9p07z77phvv2hf6gm9f28syp39f1ag-file"),
            contents: Vec::new(),
            mode: 0o444,
            uid: 0,
            gid: 0,
        }));
        assert!(binds(&plan).contains(&(
            p("/var/lib/nixbuild/objects/k4"),
            p("/var/lib/nixbuild/builds/b1/root/nix/store/2b9p07z77phvv2hf6gm9f28syp39f1ag-file")
        )));
    }

    #[test]
    fn pass_as_file_is_written_into_the_build_dir_as_the_build_user() {
        let mut req = sample_request();
        req.env.insert(b"passAsFile".to_vec(), b"text".to_vec());
        req.env.insert(b"text".to_vec(), b"hi".to_vec());
        let plan = plan(&req, &sample_host()).expect("plan");
        assert!(plan.host_ops.contains(&HostOp::CreateFile {
            path: p("/var/lib/nixbuild/builds/b1/build")
                .join(crate::env::pass_as_file_name(b"text")),
            contents: b"hi".to_vec(),
            mode: 0o644,
            uid: 30001,
            gid: 30001,
        }));
    }

    #[test]
    fn invalid_inputs_are_refused_with_context() {
        let host = sample_host();
        let mut h = host.clone();
        h.build_uid = 0;
        assert_eq!(plan(&sample_request(), &h), Err(PlanError::RootBuildUid));
        let mut h = host.clone();
        h.build_gid = 0;
        assert_eq!(plan(&sample_request(), &h), Err(PlanError::RootBuildGid));
        let mut h = host.clone();
        h.host_system = "aarch64-linux".into();
        assert!(matches!(
            plan(&sample_request(), &h),
            Err(PlanError::UnsupportedHost(_))
        ));
        let mut h = host.clone();
        h.scratch_dir = p("/var/lib/nixbuild/objects/b1");
        assert!(matches!(
            plan(&sample_request(), &h),
            Err(PlanError::OverlappingDirs { .. })
        ));
        let mut h = host.clone();
        h.scratch_dir = p("/");
        assert!(matches!(
            plan(&sample_request(), &h),
            Err(PlanError::OverlappingDirs { .. })
        ));
        let mut fod = sample_request();
        fod.fixed_output = true;
        let mut h = host.clone();
        h.resolver.ca_bundle = Some(h.scratch_dir.join("build/ca.crt"));
        assert!(matches!(
            plan(&fod, &h),
            Err(PlanError::ResolverInScratch { .. })
        ));
        let mut h = host.clone();
        h.dev_shm_size = "50%,exec".into();
        assert!(matches!(
            plan(&sample_request(), &h),
            Err(PlanError::BadTmpfsSize(_))
        ));
        let mut h = host.clone();
        h.scratch_dir = p("/var/lib/nixbuild/builds/../b1");
        assert!(matches!(
            plan(&sample_request(), &h),
            Err(PlanError::BadHostPath { .. })
        ));

        let with_input = |base_name: &str, host_path: &str| {
            let mut req = sample_request();
            req.inputs.push(InputPath {
                base_name: base_name.into(),
                host_path: p(host_path),
                kind: InputKind::Directory,
            });
            plan(&req, &host)
        };
        assert!(matches!(
            with_input(
                "0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-a/b",
                "/var/lib/nixbuild/objects/x"
            ),
            Err(PlanError::BadInputName { .. })
        ));
        assert!(matches!(
            with_input("..", "/var/lib/nixbuild/objects/x"),
            Err(PlanError::BadInputName { .. })
        ));
        assert_eq!(
            with_input(BASH, "/var/lib/nixbuild/objects/x"),
            Err(PlanError::DuplicateInput(BASH.into()))
        );
        for outside in [
            "/etc",
            "/var/lib/nixbuild/objects",
            "/var/lib/nixbuild/objects/a/b",
            "/var/lib/nixbuild/objects/..",
            "objects/x",
        ] {
            assert!(
                matches!(
                    with_input("1b9p07z77phvv2hf6gm9f28syp39f1ag-x", outside),
                    Err(PlanError::InputOutsideObjects { .. })
                ),
                "{outside}"
            );
        }

        let mut req = sample_request();
        req.builder = b"builtin:fetchurl".to_vec();
        assert!(matches!(
            plan(&req, &host),
            Err(PlanError::BuilderNotAbsolute(_))
        ));
        let mut req = sample_request();
        req.system = "aarch64-linux".into();
        assert!(matches!(
            plan(&req, &host),
            Err(PlanError::UnsupportedPlatform { .. })
        ));
        let mut req = sample_request();
        req.outputs.insert("dev".into(), "/tmp/x".into());
        assert!(matches!(
            plan(&req, &host),
            Err(PlanError::BadOutputPath { .. })
        ));
        let mut req = sample_request();
        let out = req.outputs["out"].clone();
        req.outputs.insert("dev".into(), out.clone());
        assert_eq!(plan(&req, &host), Err(PlanError::DuplicateOutputPath(out)));
        let mut req = sample_request();
        req.outputs.insert(
            "a=b".into(),
            "/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-x".into(),
        );
        assert_eq!(
            plan(&req, &host),
            Err(PlanError::BadOutputName("a=b".into()))
        );
        let mut req = sample_request();
        req.outputs.clear();
        assert_eq!(plan(&req, &host), Err(PlanError::NoOutputs));
        let mut req = sample_request();
        req.args.push(b"a\0b".to_vec());
        assert!(matches!(plan(&req, &host), Err(PlanError::NulByte { .. })));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = PlanError::InputOutsideObjects {
            base_name: BASH.into(),
            path: p("/etc"),
            objects_dir: p("/var/lib/nixbuild/objects"),
        };
        let text = e.to_string();
        assert!(text.contains(BASH) && text.contains("/etc") && text.contains("objects"));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::{InputPath, ResolverFiles};
    use nixbuild_core::store_path::strategies::store_path;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn host_dir() -> impl Strategy<Value = PathBuf> {
        "(/[a-z0-9_]{1,8}){1,4}".prop_map(PathBuf::from)
    }

    fn kind() -> impl Strategy<Value = InputKind> {
        prop_oneof![
            Just(InputKind::Directory),
            Just(InputKind::File),
            "(/nix/store/)?[a-z0-9./-]{1,30}".prop_map(|t| InputKind::Symlink {
                target: PathBuf::from(t)
            }),
        ]
    }

    prop_compose! {
        fn valid_inputs()(
            scratch in host_dir(),
            objects in host_dir(),
            inputs in proptest::collection::vec((store_path(), kind()), 0..12),
            out in store_path(),
            dev in proptest::option::of(store_path()),
            fixed_output: bool,
            need_kvm: bool,
            has_kvm: bool,
            i686: bool,
            uid in 1..=u32::MAX,
            gid in 1..=u32::MAX,
            cores in 1..=512u32,
            resolver in proptest::collection::vec(proptest::option::of(host_dir()), 4),
        ) -> (BuildRequest, HostSetup) {
            let mut seen = BTreeSet::new();
            let inputs = inputs
                .into_iter()
                .filter(|(sp, _)| seen.insert(sp.base_name()))
                .enumerate()
                .map(|(i, (sp, kind))| InputPath {
                    base_name: sp.base_name(),
                    host_path: objects.join(format!("key{i}")),
                    kind,
                })
                .collect();
            let mut outputs = BTreeMap::from([("out".to_string(), out.to_absolute())]);
            if let Some(dev) = dev {
                outputs.insert("dev".into(), dev.to_absolute());
            }
            let req = BuildRequest {
                builder: b"/nix/store/0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1/bin/bash".to_vec(),
                args: vec![b"-e".to_vec()],
                env: BTreeMap::new(),
                system: if i686 { "i686-linux" } else { "x86_64-linux" }.into(),
                inputs,
                outputs,
                fixed_output,
                required_features: if need_kvm { BTreeSet::from(["kvm".to_string()]) } else { BTreeSet::new() },
                cores,
                graphs: BTreeMap::new(),
            };
            let host = HostSetup {
                host_system: "x86_64-linux".into(),
                build_uid: uid,
                build_gid: gid,
                scratch_dir: scratch,
                objects_dir: objects,
                has_dev_kvm: has_kvm || need_kvm,
                resolver: ResolverFiles {
                    resolv_conf: resolver[0].clone(),
                    services: resolver[1].clone(),
                    hosts: resolver[2].clone(),
                    ca_bundle: resolver[3].clone(),
                },
                impure_env: BTreeMap::new(),
                dev_shm_size: "50%".into(),
            };
            (req, host)
        }
    }

    fn target(op: &MountOp) -> Option<&Path> {
        match op {
            MountOp::MakeRootPrivate | MountOp::PivotRoot { .. } => None,
            MountOp::Bind { target, .. }
            | MountOp::RemountReadOnly { target }
            | MountOp::Tmpfs { target, .. }
            | MountOp::Devpts { target, .. }
            | MountOp::Proc { target } => Some(target),
            MountOp::Chmod { path, .. } | MountOp::DetachOldRoot { path } => Some(path),
        }
    }

    proptest! {
        #[test]
        fn mounts_stay_in_the_new_root_and_only_scratch_dirs_are_writable(
            (req, host) in valid_inputs()
        ) {
            prop_assume!(
                !host.scratch_dir.starts_with(&host.objects_dir)
                    && !host.objects_dir.starts_with(&host.scratch_dir)
            );
            // Resolver files inside the scratch directory are refused (ResolverInScratch).
            let r = &host.resolver;
            prop_assume!([&r.resolv_conf, &r.services, &r.hosts, &r.ca_bundle]
                .into_iter()
                .flatten()
                .all(|f| !f.starts_with(&host.scratch_dir)));
            let plan = plan(&req, &host).expect("valid inputs give a plan");
            let layout = &plan.layout;
            let pivot = plan
                .mounts
                .iter()
                .position(|m| matches!(m, MountOp::PivotRoot { .. }))
                .expect("a pivot");
            prop_assert_eq!(&plan.mounts[0], &MountOp::MakeRootPrivate);
            prop_assert_eq!(
                &plan.mounts[pivot],
                &MountOp::PivotRoot { new_root: layout.root.clone(), put_old: PUT_OLD.into() }
            );
            for op in &plan.mounts[..pivot] {
                if let Some(t) = target(op) {
                    prop_assert!(t.starts_with(&layout.root), "{:?} outside the new root", op);
                }
            }
            // After the pivot: the old root goes, then the new root becomes read-only.
            prop_assert_eq!(
                &plan.mounts[pivot + 1..],
                &[
                    MountOp::DetachOldRoot { path: "/real-root".into() },
                    MountOp::RemountReadOnly { target: "/".into() },
                ][..]
            );

            let writable = [&layout.build, &layout.store, &layout.tmp];
            for (i, op) in plan.mounts.iter().enumerate() {
                if let MountOp::Bind { source, target, .. } = op {
                    if writable.contains(&source) || *source == layout.root {
                        // The build's own directories; the root is made read-only above.
                        continue;
                    }
                    prop_assert!(!source.starts_with(&host.scratch_dir));
                    prop_assert_eq!(
                        plan.mounts.get(i + 1),
                        Some(&MountOp::RemountReadOnly { target: target.clone() }),
                        "bind of {:?} left writable", source
                    );
                }
            }
            let mut created: BTreeSet<PathBuf> = BTreeSet::from([host.scratch_dir.clone()]);
            let mut tmpfs_on = Vec::new();
            for op in &plan.host_ops {
                prop_assert!(op.path().starts_with(&host.scratch_dir));
                if let HostOp::Tmpfs { path, options } = op {
                    // On a directory made before, and bounded.
                    prop_assert!(created.contains(path), "{:?} on nothing", op);
                    prop_assert!(options.starts_with(ROOT_TMPFS_LIMITS), "{:?}", op);
                    tmpfs_on.push(path.clone());
                    continue;
                }
                let parent = op.path().parent().expect("a parent").to_owned();
                prop_assert!(created.contains(&parent), "{:?} before its parent", op);
                prop_assert!(created.insert(op.path().to_owned()), "{:?} twice", op);
            }
            // Every mount point before the pivot exists: made by a host op (through the
            // /nix/store bind for inputs), or the root itself, or made by the devpts mount.
            let store_in_root = layout.root.join("nix/store");
            for op in &plan.mounts[..pivot] {
                let at = match op {
                    MountOp::Chmod { .. } => continue,
                    _ => match target(op) { Some(t) => t, None => continue },
                };
                let on_host = match at.strip_prefix(&store_in_root) {
                    Ok(rest) if !rest.as_os_str().is_empty() => layout.store.join(rest),
                    _ => at.to_owned(),
                };
                prop_assert!(created.contains(&on_host), "no mount point for {:?}", op);
            }
            for (_, out) in &plan.outputs {
                prop_assert_eq!(out.parent(), Some(layout.store.as_path()));
            }
            // Only the root is in memory: what the builder writes (outputs, /build, /tmp) is
            // on the state directory's file system, where the outputs are renamed from.
            prop_assert_eq!(tmpfs_on, vec![layout.root.clone()]);
            prop_assert_eq!(plan.steps.first(), Some(&Step::PrivateMounts));

            // Every input that is not an output is present exactly once, from the objects dir.
            let outputs: BTreeSet<String> = req
                .outputs
                .values()
                .map(|p| p.trim_start_matches("/nix/store/").to_string())
                .collect();
            for input in &req.inputs {
                let at = layout.root.join("nix/store").join(&input.base_name);
                let mounted = plan
                    .mounts
                    .iter()
                    .filter(|m| matches!(m, MountOp::Bind { source, target, .. }
                        if *source == input.host_path && *target == at))
                    .count();
                let expected = match input.kind {
                    _ if outputs.contains(&input.base_name) => 0,
                    InputKind::Symlink { .. } => 0,
                    _ => 1,
                };
                prop_assert_eq!(mounted, expected, "input {}", &input.base_name);
            }

            let kvm = plan.mounts.iter().any(|m| matches!(m, MountOp::Bind { source, .. }
                if source == Path::new("/dev/kvm")));
            prop_assert_eq!(kvm, req.required_features.contains("kvm"));
            prop_assert_eq!(plan.namespaces.net, !req.fixed_output);
            let etc_binds = plan.mounts.iter().any(|m| matches!(m, MountOp::Bind { target, .. }
                if target.starts_with(layout.root.join("etc"))));
            let has_resolver = host.resolver != ResolverFiles::default();
            prop_assert_eq!(etc_binds, req.fixed_output && has_resolver);
        }
    }
}
