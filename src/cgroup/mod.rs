//! Per-build cgroups: each build is confined to the cores and the memory the scheduler granted
//! it, with a bound on its processes, and can be killed as a whole.
//!
//! Each controller is found on its own, on cgroup v1 or v2, from `/proc/self/mountinfo`,
//! `/proc/self/cgroup`, `/proc/cgroups` and `cgroup.controllers`: a host may mount `memory`,
//! `cpuset` and `pids` as v1 hierarchies next to a nearly empty unified one, while most
//! current systems have everything on v2. [`Cgroups::detect`] creates a directory
//! `<root_name>` under the daemon's own cgroup in every hierarchy that has a controller it
//! uses, and reports what can be enforced ([`Report`]); [`check_limits`] turns that report
//! into the refusal to start, or the warnings, the daemon prints. [`Cgroups::create_build`]
//! makes `<root_name>/<build>` with the limits set, before any process joins.
//!
//! On v2 the daemon's subtree obeys the unified hierarchy's rules, planned without I/O in
//! [`plan`]: the daemon moves into a leaf of its own cgroup before enabling controllers there,
//! enables them top-down, and never one the parent does not offer. When its cgroup cannot
//! give them (an SSH login's cgroup, a unit without `Delegate=yes`), [`enter_delegated_scope`]
//! asks systemd over D-Bus for a scope with `Delegate=yes` and moves the daemon there.
//!
//! | limit | cgroup v1 | cgroup v2 |
//! |---|---|---|
//! | cores | `cpuset.cpus` (with `cpuset.mems` copied from the parent) | `cpuset.cpus` |
//! | memory | `memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` equal to it (swap counted) or else `memory.swappiness` 0 (no swap) | `memory.max`, `memory.swap.max` 0, `memory.oom.group` 1 |
//! | processes | `pids.max` | `pids.max` |
//! | kill | freeze (`freezer.state`), SIGKILL every process, thaw | `cgroup.kill`, else freeze (`cgroup.freeze`) and SIGKILL |
//! | out of memory | `oom_kill` in `memory.oom_control` (else `under_oom`) | `oom_kill` in `memory.events` |
//! | peak memory | `memory.max_usage_in_bytes` | `memory.peak` |
//!
//! **A build cannot widen its CPU set or lift its limits.** Every directory and file here is
//! created by the daemon as root, owned by root and not writable by others (directories 0755,
//! files as the kernel makes them, 0644 or read-only), while a build runs as its own unprivileged host uid:
//! it can neither write `cpuset.cpus` or `memory.*` nor move itself into another cgroup
//! (that needs write access to the target's `cgroup.procs`). Inside its user namespace its
//! "root" has no rights over files owned by host uids it does not map, and `/sys` is not
//! mounted in the sandbox. `sched_setaffinity` cannot reach beyond the cpuset either: the
//! kernel refuses CPUs outside it.
//!
//! Everything here blocks (file writes, and waiting for killed processes to go): call it
//! from `spawn_blocking` in async code.
//!
//! Rooms: [`discovery`] (pure parsers of the `/proc` files and cgroup file formats), [`plan`]
//! (the v2 steps, pure), [`setup`] (the daemon's subtree, the report, each build's cgroup made
//! with its limits) and [`build_cgroup`] (one build's cgroup: join, out of memory, refused forks, peak memory,
//! kill, freeze, remove).

mod build_cgroup;
mod discovery;
mod plan;
mod setup;

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use build_cgroup::{BuildCgroup, ForkRefusals, UsageFiles};
pub use discovery::{format_cpu_list, parse_cpu_list, CpuListError};
pub use setup::{check_limits, enter_delegated_scope, Cgroups};

/// Why a cgroup operation failed, or why limits cannot be enforced.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A file or directory operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file had unexpected contents.
    #[error("unexpected contents in {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A cgroup name that is not a single path component of safe characters.
    #[error("invalid cgroup name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not . or ..)")]
    Name(String),
    /// A build was given cores this daemon may not use, or none.
    #[error("cores {cores:?} are not among the CPUs this daemon may use ({available})")]
    Cores {
        /// The cores asked for.
        cores: Vec<u32>,
        /// The CPUs available, as a list.
        available: String,
    },
    /// Processes were still in the cgroup after being killed.
    #[error("processes {pids:?} of {path} were still alive {waited:?} after SIGKILL")]
    Survivors {
        /// The cgroup directory.
        path: PathBuf,
        /// The processes left.
        pids: Vec<u32>,
        /// How long they were waited for.
        waited: Duration,
    },
    /// systemd could not be asked for a delegated scope, or refused it.
    #[error("systemd did not give this process the delegated scope {unit}: {reason}")]
    Systemd {
        /// The transient scope asked for.
        unit: String,
        /// What busctl or systemd said.
        reason: String,
    },
    /// Some per-build limit cannot be enforced and the operator did not allow that.
    #[error(
        "cannot enforce per-build limits:\n{}\nset allow_unenforced_limits = true in \
         [capacity] to start anyway", problems.iter().map(|p| format!("  - {p}"))
             .collect::<Vec<_>>().join("\n")
    )]
    Unenforced {
        /// One line per limit that cannot be enforced.
        problems: Vec<String>,
    },
}

/// A cgroup version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// A v1 hierarchy with this controller attached.
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "cgroup v1",
            Version::V2 => "cgroup v2",
        })
    }
}

/// The controllers builds are confined with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// Cores (and memory nodes).
    Cpuset,
    /// Memory.
    Memory,
    /// Number of processes.
    Pids,
    /// Freezing, to kill a build without it forking meanwhile.
    Freezer,
    /// CPU time accounting, for the build's record (v1 `cpuacct`; on v2 every cgroup has
    /// `cpu.stat`). Never a limit.
    Cpuacct,
}

impl Controller {
    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Freezer => "freezer",
            Controller::Cpuacct => "cpuacct",
        }
    }
}

/// Whether a controller can be used, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// Build cgroups go under `base`.
    Available {
        /// Which hierarchy.
        version: Version,
        /// `<own cgroup>/<root_name>` in that hierarchy.
        base: PathBuf,
    },
    /// Not usable, and why.
    Unavailable(String),
}

impl Support {
    fn place(&self) -> Option<(Version, &Path)> {
        match self {
            Support::Available { version, base } => Some((*version, base)),
            Support::Unavailable(_) => None,
        }
    }
}

/// What happens to swap beyond a build's memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// Memory plus swap is limited to the build's memory (v1 `memory.memsw`).
    Counted,
    /// A build does not swap (v2 `memory.swap.max` 0, v1 `memory.swappiness` 0).
    Off,
    /// The host has no swap.
    NoSwap,
    /// A build may swap beyond its limit.
    Unlimited,
}

/// What [`Cgroups::detect`] found: which limits can be enforced, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Cores.
    pub cpuset: Support,
    /// Memory.
    pub memory: Support,
    /// Processes.
    pub pids: Support,
    /// Freezing (v1 `freezer`, v2 `cgroup.freeze`).
    pub freezer: Support,
    /// CPU time accounting (v1 `cpuacct`, v2 `cpu.stat`).
    pub cpuacct: Support,
    /// Whether v2 `cgroup.kill` kills a build in one write.
    pub kill_file: bool,
    /// Swap beyond the memory limit.
    pub swap: Swap,
    /// The CPUs builds may be given, ascending: the scheduler's core index `i` of this host is
    /// CPU `cpus[i]`.
    pub cpus: Vec<u32>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, support) in [
            ("cpuset", &self.cpuset),
            ("memory", &self.memory),
            ("pids", &self.pids),
            ("freezer", &self.freezer),
            ("cpuacct", &self.cpuacct),
        ] {
            match support {
                Support::Available { version, base } => {
                    writeln!(f, "{name}: {version} at {}", base.display())?
                }
                Support::Unavailable(why) => writeln!(f, "{name}: unavailable ({why})")?,
            }
        }
        writeln!(
            f,
            "cgroup.kill: {}",
            if self.kill_file { "yes" } else { "no" }
        )?;
        writeln!(f, "swap: {:?}", self.swap)?;
        write!(f, "cpus: {}", format_cpu_list(&self.cpus))
    }
}

/// What a build is confined to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLimits {
    /// CPU numbers (from [`Report::cpus`]).
    pub cores: Vec<u32>,
    /// Memory in bytes.
    pub memory: u64,
    /// Most processes (and threads) at once.
    pub pids: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err("read", path))
}

/// Writes `value` to a cgroup file in one `write`, as the kernel expects.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io_err("write", path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err("create", path)(e)),
        _ => Ok(()),
    }
}
