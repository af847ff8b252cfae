//! The plan itself: [`plan`] turns a validated [`BuildRequest`] and [`HostSetup`] into a
//! [`SandboxPlan`], the complete list of what the executor must do. No I/O happens here.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use nixbuild_core::store_path::StorePath;

use crate::env::{build_env, BuildDirFile};
use crate::files::{
    ETC_GROUP, ETC_HOSTS, ETC_NSSWITCH_FOD, ETC_PASSWD, SANDBOX_BUILD_DIR, SANDBOX_GID, SANDBOX_UID,
};
use crate::seccomp::SeccompPlan;
use crate::{BuildRequest, HostSetup, InputKind, PlanError, ScratchLayout};

/// The namespaces the helper creates with `clone` (spec C.2). There is no unsandboxed fallback:
/// if any of them cannot be created, the build fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What the parent writes for the child's user namespace (spec C.3), in this order:
/// `uid_map`, then `setgroups`, then `gid_map`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    /// `/proc/<pid>/uid_map`: 1000 → the build uid.
    pub uid_map: IdMap,
    /// `/proc/<pid>/setgroups`: `deny`, so the builder cannot drop gid 100 with `setgroups`.
    pub setgroups: &'static str,
    /// `/proc/<pid>/gid_map`: 100 → the build gid.
    pub gid_map: IdMap,
}

/// A filesystem step the helper performs on the host **before** `clone`, as root in the
/// initial namespaces. Every path is inside the build's scratch directory; none exists yet.
/// The executor must create them without following symlinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    /// `mkdir(path, mode)` then `chown(uid, gid)`.
    CreateDir {
        /// Where.
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
        path: PathBuf,
        /// Contents.
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
        path: PathBuf,
        /// What it points to.
        target: PathBuf,
    },
}

impl HostOp {
    /// The path this step creates.
    pub fn path(&self) -> &Path {
        match self {
            HostOp::CreateDir { path, .. }
            | HostOp::CreateFile { path, .. }
            | HostOp::Symlink { path, .. } => path,
        }
    }
}

/// A mount step the child performs inside its namespaces, in order (spec C.4, C.5). Until
/// [`MountOp::PivotRoot`], paths are host paths under the new root; after it, sandbox paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOp {
    /// `mount(NULL, "/", NULL, MS_PRIVATE | MS_REC)`: nothing propagates back to the host.
    MakeRootPrivate,
    /// `mount(source, target, NULL, MS_BIND [| MS_REC])`.
    Bind {
        /// The host path.
        source: PathBuf,
        /// The mount point.
        target: PathBuf,
        /// `MS_REC`.
        recursive: bool,
    },
    /// Remount a bind mount read-only (`MS_REMOUNT | MS_BIND | MS_RDONLY`), keeping the flags
    /// the kernel locked on it (`nosuid`, `nodev`, `noexec`), which a user namespace may not
    /// clear.
    RemountReadOnly {
        /// The mount point.
        target: PathBuf,
    },
    /// A new `tmpfs`.
    Tmpfs {
        /// The mount point.
        target: PathBuf,
        /// The mount data, e.g. `size=50%`.
        options: String,
    },
    /// A new `devpts` instance; if the kernel refuses `newinstance`, the build fails (no
    /// fallback to the host's `/dev/pts`).
    Devpts {
        /// The mount point.
        target: PathBuf,
        /// The mount data: `newinstance,mode=0620`.
        options: String,
    },
    /// A new `proc`, which shows only the sandbox's PID namespace.
    Proc {
        /// The mount point.
        target: PathBuf,
    },
    /// `chmod(path, mode)` on a file of a freshly mounted filesystem (`/dev/pts/ptmx`).
    Chmod {
        /// The file.
        path: PathBuf,
        /// The new mode.
        mode: u32,
    },
    /// `chdir(new_root)`, `mkdir(put_old, 0500)`, `pivot_root(".", put_old)`, `chroot(".")`.
    PivotRoot {
        /// The new root (a mount point: it was bind-mounted onto itself).
        new_root: PathBuf,
        /// The old root's mount point, relative to the new root.
        put_old: PathBuf,
    },
    /// `umount2(path, MNT_DETACH)` then `rmdir(path)`: the host's tree becomes unreachable.
    DetachOldRoot {
        /// The old root's mount point inside the sandbox.
        path: PathBuf,
    },
}

/// A resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Which limit.
    pub resource: RlimitResource,
    /// The soft limit.
    pub soft: RlimitValue,
    /// The hard limit.
    pub hard: RlimitValue,
}

/// The limits the plan sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlimitResource {
    /// `RLIMIT_CORE`.
    Core,
}

/// A limit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlimitValue {
    /// A number.
    Value(u64),
    /// `RLIM_INFINITY`.
    Infinity,
}

/// `personality(2)` flags (spec C.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Personality {
    /// `PER_LINUX32`: a 32-bit platform on a 64-bit host (`uname -m` says `i686`).
    pub linux32: bool,
    /// `ADDR_NO_RANDOMIZE`: always, for reproducibility.
    pub addr_no_randomize: bool,
}

/// What `execve` gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    /// The builder's path inside the sandbox.
    pub path: Vec<u8>,
    /// `argv`: the builder's base name, then the derivation's args.
    pub argv: Vec<Vec<u8>>,
    /// `envp` as `(name, value)` pairs, sorted by name (spec C.8).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Everything the executor does for one build, in the order of spec C.12: host set-up, clone
/// with [`Self::namespaces`], id maps by the parent; then in the child loopback and hostname,
/// [`Self::mounts`], no_new_privs, seccomp, Landlock, personality, `chdir`, rlimits, umask,
/// `setgid`/`setuid`, and `execve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPlan {
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
    pub hostname: &'static str,
    /// `setdomainname`.
    pub domainname: &'static str,
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
    pub cwd: &'static str,
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

/// The Nix system a build for `system` runs as on `host`, and whether it needs `PER_LINUX32`.
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
        output_names.insert(base);
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
    argv.extend(req.args.iter().cloned());

    let namespaces = Namespaces {
        user: true,
        mount: true,
        pid: true,
        ipc: true,
        uts: true,
        net: !req.fixed_output,
    };
    Ok(SandboxPlan {
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
