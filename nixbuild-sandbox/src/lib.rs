//! nixbuild's Linux namespace build sandbox.
//!
//! A derivation built by nixbuild must not be able to tell that it was not built by Nix's own
//! sandbox (`docs/sandbox.md`, current-Nix behaviour), and must not be able to reach anything
//! outside its input closure, its outputs and its scratch space.
//!
//! # Plan and executor
//!
//! The crate is split the way youki splits its container set-up:
//!
//! - **The plan**: [`plan()`] takes what a build needs ([`BuildRequest`]) and what the host
//!   allocated for it ([`HostSetup`]) and returns a [`SandboxPlan`]: namespaces, uid/gid maps,
//!   the host-side files to create ([`HostOp`]), the ordered mount sequence ([`MountOp`]),
//!   hostname, environment, working directory, rlimits, no_new_privs, personality and the
//!   seccomp table as data, and the order of the executor's [`Step`]s. It performs no system
//!   call, so every piece is unit-tested against the spec without root.
//! - **The executor**: runs in the helper mode of the daemon's own executable
//!   ([`maybe_run_helper()`], called first in `main`; the daemon spawns [`helper_command()`],
//!   normally on `/proc/self/exe`, and writes [`encode_plan()`] to its stdin). The helper is a
//!   small single-threaded process, like bubblewrap: it performs the plan's [`HostOp`]s as
//!   root, `clone`s the child with the plan's namespaces and writes the id maps; the child arms
//!   `PR_SET_PDEATHSIG` (SIGKILL), performs the [`MountOp`]s, loads the seccomp filter (the
//!   table compiled to BPF by [`seccomp::SeccompPlan::to_bpf`]), drops to uid 1000/gid 100 and
//!   `execve`s the builder as PID 1 of its PID namespace. The helper's stdout carries only the
//!   builder's output (stdout and stderr through a raw-mode pty, the [`SETUP_DONE`] marker
//!   removed); its stderr ends with a report line that [`parse_report()`] reads as a
//!   [`HelperReport`]. Nothing forks inside the tokio process. The executor's system calls
//!   are the only `unsafe` code of the workspace: the crate denies `unsafe_code` and allows it
//!   on `exec/sys.rs` alone, whose `clone` refuses to run in a process with more than one
//!   thread.
//!
//! # Threat model
//!
//! Builders are untrusted code from untrusted accounts. What the sandbox enforces against them
//! (the executor's tests probe each point from inside a real sandbox, with a positive control):
//!
//! - **Isolation by namespaces**: user, mount, pid, ipc, uts and (except fixed-output
//!   derivations) network. If any cannot be created, or any later set-up step fails, the build
//!   fails with [`HelperReport::SetupFailed`] naming the step and the errno; there is no
//!   unsandboxed fallback. The builder is PID 1 of its namespace, so nothing outlives it: when
//!   it exits the kernel kills the rest, and when the helper is killed the parent-death signal
//!   kills the builder (armed again after each uid/gid change, which clears it). The mounts
//!   exist only in the helper's and the child's private mount namespaces.
//! - **Identity**: a per-build host uid/gid, never 0, mapped to 1000/100 with `setgroups`
//!   denied and supplementary groups dropped; after `execve` the builder holds no capability.
//!   Device nodes cannot be created and nothing can be mounted.
//! - **Filesystem**: the new root is a tmpfs (at most 1 MiB and 256 inodes; nosuid, nodev,
//!   noexec) mounted on a directory of the build's own scratch directory, made read-only
//!   after set-up. Only three host directories are writable inside, all of them the
//!   build's own: `/build`, `/tmp` and `/nix/store` (where the outputs are created). Every
//!   input path, device node and resolver file is a bind mount remounted read-only (keeping
//!   the flags the kernel locked), and inputs come only from the store's objects directory.
//!   The host root is detached after `pivot_root`. Every descriptor but stdin (`/dev/null`),
//!   stdout and stderr (the log pty) is closed on `execve`, and every signal is reset.
//! - **Kernel surface**: `no_new_privs`; seccomp refuses setuid/setgid bits (`EPERM`) and
//!   extended attributes (`ENOTSUP`) on the x86_64, i386 and x32 ABIs and kills any other ABI;
//!   Landlock scopes abstract unix sockets where the kernel's ABI has it (6 and later: the
//!   helper logs when it does not), since fixed-output builds share the host network
//!   namespace; no core dumps.
//!
//! Fixed-output derivations are trusted with the network because their output is checked
//! against a hash the client declared; they still get every other restriction.
//!
//! Out of scope here: CPU and memory limits (cgroups), timeouts and log limits, which the
//! build service enforces around the helper; output checks and canonicalisation, which the
//! build service does on `<scratch>/store` after the builder exits.

#![deny(unsafe_code)]

pub mod env;
mod error;
mod exec;
pub mod files;
mod helper_messages;
mod plan;
mod request;
pub mod seccomp;

pub use error::PlanError;
pub use exec::{helper_command, maybe_run_helper, ExecError, HELPER_ARG};
pub use helper_messages::{decode_plan, encode_plan, parse_report, HelperReport, PlanDecodeError};
pub use plan::{
    plan, Exec, HostOp, IdMap, IdMaps, MountOp, Namespaces, Personality, Rlimit, RlimitResource,
    RlimitValue, SandboxPlan, Step, DEV_NODES, DEV_SYMLINKS, PUT_OLD, SETUP_DONE,
};
pub use request::{BuildRequest, HostSetup, InputKind, InputPath, ResolverFiles, ScratchLayout};

#[cfg(test)]
pub(crate) mod tests {
    //! Sample inputs shared by the unit tests.

    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The spec's environment-recording derivation, roughly: bash as builder, one output.
    pub(crate) fn sample_request() -> BuildRequest {
        let out = "/nix/store/7fgb0vvbd7ymwx8rwmgc5vhw1yfw3yhm-env-dump";
        let bash = "/nix/store/0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1/bin/bash";
        let env: BTreeMap<Vec<u8>, Vec<u8>> = [
            ("builder", bash),
            ("name", "env-dump"),
            ("out", out),
            ("system", "x86_64-linux"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        BuildRequest {
            builder: bash.into(),
            args: vec![b"-c".to_vec(), b"env | sort > $out".to_vec()],
            env,
            system: "x86_64-linux".into(),
            inputs: vec![InputPath {
                base_name: "0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1".into(),
                host_path: "/var/lib/nixbuild/objects/k1".into(),
                kind: InputKind::Directory,
            }],
            outputs: [("out".to_string(), out.to_string())].into(),
            fixed_output: false,
            required_features: BTreeSet::new(),
            cores: 2,
            graphs: BTreeMap::new(),
        }
    }

    /// A host with a build uid/gid allocated and nothing unusual.
    pub(crate) fn sample_host() -> HostSetup {
        HostSetup {
            host_system: "x86_64-linux".into(),
            build_uid: 30001,
            build_gid: 30001,
            scratch_dir: "/var/lib/nixbuild/builds/b1".into(),
            objects_dir: "/var/lib/nixbuild/objects".into(),
            has_dev_kvm: false,
            resolver: ResolverFiles::default(),
            impure_env: BTreeMap::new(),
            dev_shm_size: "50%".into(),
        }
    }
}
