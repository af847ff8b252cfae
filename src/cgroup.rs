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

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

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
}

impl Controller {
    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Freezer => "freezer",
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

/// The cgroups of this daemon's builds.
#[derive(Debug, Clone)]
pub struct Cgroups {
    report: Report,
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

/// How long [`BuildCgroup::kill_all`] waits for killed processes to go.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long a freeze may take before killing goes ahead regardless.
const FREEZE_WAIT: Duration = Duration::from_secs(2);

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

/// One line of `/proc/self/mountinfo` that mounts a cgroup file system.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The directory of the hierarchy shown at the mount point.
    root: String,
    /// Where it is mounted.
    mount_point: PathBuf,
    /// `None` for cgroup2, else the v1 controllers (and `name=` options).
    v1_options: Option<Vec<String>>,
}

/// The cgroup mounts in the text of `/proc/self/mountinfo`.
fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or("");
            let v1_options = match fstype {
                "cgroup2" => None,
                "cgroup" => Some(options.split(',').map(str::to_owned).collect()),
                _ => return None,
            };
            Some(CgroupMount {
                root: unescape(fields.get(3)?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                v1_options,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match escape {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The lines of `/proc/self/cgroup`: hierarchy id, controllers, path.
fn parse_self_cgroup(text: &str) -> Vec<(u32, Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            Some((id, controllers, path.to_owned()))
        })
        .collect()
}

/// Whether `/proc/cgroups` lists the controller as disabled (`None` when it is not listed,
/// or the file is absent as on kernels that dropped it).
fn disabled_in(proc_cgroups: &str, controller: &str) -> Option<bool> {
    proc_cgroups.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == controller).then_some(())?;
        Some(fields.nth(2)? == "0")
    })
}

/// The directory of our own cgroup inside a mount: the mount point plus our path relative to
/// the mount's root; `None` when our cgroup is outside what the mount shows.
fn own_dir(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let rel = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    Some(mount.mount_point.join(rel.trim_start_matches('/')))
}

/// Where a controller lives for this process: its version and our cgroup's directory there,
/// or why it is not found. For v2 the caller still checks `cgroup.controllers`.
fn locate(
    controller: &str,
    mounts: &[CgroupMount],
    self_cgroup: &[(u32, Vec<String>, String)],
    proc_cgroups: &str,
) -> Result<(Version, PathBuf), String> {
    if disabled_in(proc_cgroups, controller) == Some(true) {
        return Err("disabled in the kernel (/proc/cgroups)".to_owned());
    }
    let v1_mounts = mounts.iter().filter(|m| {
        m.v1_options
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == controller))
    });
    let v1_path = self_cgroup
        .iter()
        .find(|(_, c, _)| c.iter().any(|x| x == controller))
        .map(|(_, _, p)| p.as_str());
    if let Some(path) = v1_path {
        if let Some(dir) = v1_mounts.clone().find_map(|m| own_dir(m, path)) {
            return Ok((Version::V1, dir));
        }
        return Err(format!(
            "its cgroup v1 hierarchy holds this process at {path} but is not mounted where \
             this process can see it"
        ));
    }
    let v2_path = self_cgroup
        .iter()
        .find(|(id, c, _)| *id == 0 && c.is_empty())
        .map(|(_, _, p)| p.as_str());
    let v2 = mounts
        .iter()
        .filter(|m| m.v1_options.is_none())
        .find_map(|m| own_dir(m, v2_path?));
    match v2 {
        Some(dir) => Ok((Version::V2, dir)),
        None => Err("mounted neither as a cgroup v1 hierarchy nor in cgroup v2".to_owned()),
    }
}

/// Parses a CPU list such as `0-3,8,10-11` (at most 65,536 CPUs).
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    const MAX_CPUS: u32 = 1 << 16;
    let mut cpus = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.parse::<u32>()
                .ok()
                .filter(|&n| n < MAX_CPUS)
                .ok_or_else(|| format!("{s:?} is not a CPU number below {MAX_CPUS}"))
        };
        let (low, high) = match part.split_once('-') {
            Some((l, h)) => (number(l)?, number(h)?),
            None => (number(part)?, number(part)?),
        };
        if low > high {
            return Err(format!("{part:?} is an empty range"));
        }
        cpus.extend(low..=high);
    }
    Ok(cpus.into_iter().collect())
}

/// Formats CPUs as a list with ranges, like the kernel (`0-3,8`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// Whether `name` may be a cgroup directory name.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The value of `key` in a flat keyed file (`key value` lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

impl Cgroups {
    /// Finds each controller, creates `<root_name>` under this process's own cgroup in each
    /// hierarchy used (v1 cpuset: with the parent's CPUs and memory nodes; v2: with the
    /// controllers enabled for it), and reports what can be enforced. Needs root to create
    /// anything; without it every controller is reported unavailable, with the reason.
    ///
    /// On v2, when this process's cgroup also holds processes (a systemd service with
    /// `Delegate=yes`), controllers cannot be enabled for its children; this process then
    /// moves itself into a leaf `<root_name>.daemon` next to `<root_name>` first.
    pub fn detect(root_name: &str) -> Result<Cgroups, CgroupError> {
        if !valid_name(root_name) {
            return Err(CgroupError::Name(root_name.to_owned()));
        }
        let mounts = parse_mountinfo(&read(Path::new("/proc/self/mountinfo"))?);
        let self_cgroup = parse_self_cgroup(&read(Path::new("/proc/self/cgroup"))?);
        let proc_cgroups = fs::read_to_string("/proc/cgroups").unwrap_or_default();
        let setup = |controller: Controller| -> Support {
            let name = controller.name();
            let found =
                locate(name, &mounts, &self_cgroup, &proc_cgroups).and_then(|(version, own)| {
                    let base = own.join(root_name);
                    match version {
                        Version::V1 => setup_v1(controller, &own, &base),
                        Version::V2 if controller == Controller::Freezer => setup_v2_freezer(&base),
                        Version::V2 => setup_v2(name, &own, &base, root_name),
                    }
                    .map(|()| Support::Available { version, base })
                });
            found.unwrap_or_else(Support::Unavailable)
        };
        let cpuset = setup(Controller::Cpuset);
        let memory = setup(Controller::Memory);
        let pids = setup(Controller::Pids);
        let freezer = setup(Controller::Freezer);
        let kill_file = [&cpuset, &memory, &pids]
            .iter()
            .filter_map(|s| s.place())
            .any(|(v, base)| v == Version::V2 && base.join("cgroup.kill").exists());
        let swap = match memory.place() {
            Some((Version::V1, base)) if base.join("memory.memsw.limit_in_bytes").exists() => {
                Swap::Counted
            }
            Some((Version::V1, base)) if base.join("memory.swappiness").exists() => Swap::Off,
            Some((Version::V2, base)) if base.join("memory.swap.max").exists() => Swap::Off,
            _ if host_has_no_swap() => Swap::NoSwap,
            _ => Swap::Unlimited,
        };
        let cpus = match cpuset.place() {
            Some((Version::V1, base)) => read_cpus(&base.join("cpuset.cpus"))?,
            Some((Version::V2, base)) => read_cpus(&base.join("cpuset.cpus.effective"))?,
            None => allowed_cpus()?,
        };
        Ok(Cgroups {
            report: Report {
                cpuset,
                memory,
                pids,
                freezer,
                kill_file,
                swap,
                cpus,
            },
        })
    }

    /// What can be enforced.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// The distinct directories build cgroups go under, with the controllers each serves.
    fn bases(&self) -> Vec<(Version, PathBuf, Vec<Controller>)> {
        let mut bases: Vec<(Version, PathBuf, Vec<Controller>)> = Vec::new();
        for (controller, support) in [
            (Controller::Cpuset, &self.report.cpuset),
            (Controller::Memory, &self.report.memory),
            (Controller::Pids, &self.report.pids),
            (Controller::Freezer, &self.report.freezer),
        ] {
            let Some((version, base)) = support.place() else {
                continue;
            };
            match bases.iter_mut().find(|(_, b, _)| b == base) {
                Some((_, _, controllers)) => controllers.push(controller),
                None => bases.push((version, base.to_owned(), vec![controller])),
            }
        }
        bases
    }

    /// Creates the cgroup `<root_name>/<name>` of a build with its limits set; a process
    /// joins it with [`BuildCgroup::add_pid`] (or by writing its pid to every file of
    /// [`BuildCgroup::procs_files`]). Limits whose controller is unavailable are not set.
    pub fn create_build(
        &self,
        name: &str,
        limits: &BuildLimits,
    ) -> Result<BuildCgroup, CgroupError> {
        if !valid_name(name) {
            return Err(CgroupError::Name(name.to_owned()));
        }
        if limits.cores.is_empty()
            || (self.report.cpuset.place().is_some()
                && !limits.cores.iter().all(|c| self.report.cpus.contains(c)))
        {
            return Err(CgroupError::Cores {
                cores: limits.cores.clone(),
                available: format_cpu_list(&self.report.cpus),
            });
        }
        let mut build = BuildCgroup {
            dirs: Vec::new(),
            memory_limit: limits.memory,
            pids_limit: limits.pids,
            removed: false,
        };
        // Each directory is recorded as soon as it exists, so that a failure below removes
        // what was made (through Drop).
        for (version, base, controllers) in self.bases() {
            let dir = base.join(name);
            fs::create_dir(&dir).map_err(io_err("create", &dir))?;
            build.dirs.push(Dir {
                version,
                path: dir.clone(),
                controllers: controllers.clone(),
            });
            for controller in controllers {
                set_limit(version, controller, &base, &dir, limits)?;
            }
        }
        Ok(build)
    }

    /// Kills and removes every build cgroup under `<root_name>` (left by a daemon that
    /// stopped without cleaning up). For the daemon's start, before any build runs.
    pub fn remove_leftovers(&self) -> Result<usize, CgroupError> {
        let mut names = BTreeSet::new();
        for (_, base, _) in self.bases() {
            let entries = fs::read_dir(&base).map_err(io_err("list", &base))?;
            for entry in entries {
                let entry = entry.map_err(io_err("list", &base))?;
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        let count = names.len();
        for name in names {
            let dirs = self
                .bases()
                .into_iter()
                .map(|(version, base, controllers)| Dir {
                    version,
                    path: base.join(&name),
                    controllers,
                })
                .filter(|d| d.path.is_dir())
                .collect();
            BuildCgroup {
                dirs,
                memory_limit: 0,
                pids_limit: 0,
                removed: false,
            }
            .remove()?;
        }
        Ok(count)
    }

    /// Removes the `<root_name>` directories (after [`Cgroups::remove_leftovers`] or the last
    /// build): for a daemon's shutdown, and tests.
    pub fn remove_bases(&self) -> Result<(), CgroupError> {
        self.remove_leftovers()?;
        for (_, base, _) in self.bases() {
            rmdir_waiting(&base)?;
        }
        Ok(())
    }
}

fn read_cpus(path: &Path) -> Result<Vec<u32>, CgroupError> {
    parse_cpu_list(&read(path)?).map_err(|reason| CgroupError::Parse {
        path: path.to_owned(),
        reason,
    })
}

/// The CPUs this process may run on, from `Cpus_allowed_list` in `/proc/self/status`.
fn allowed_cpus() -> Result<Vec<u32>, CgroupError> {
    let path = Path::new("/proc/self/status");
    let status = read(path)?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| CgroupError::Parse {
            path: path.to_owned(),
            reason: "no Cpus_allowed_list".to_owned(),
        })?;
    parse_cpu_list(list).map_err(|reason| CgroupError::Parse {
        path: path.to_owned(),
        reason,
    })
}

fn host_has_no_swap() -> bool {
    fs::read_to_string("/proc/meminfo").is_ok_and(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("SwapTotal:"))
            .is_some_and(|v| v.split_whitespace().next() == Some("0"))
    })
}

/// Creates a v1 base directory; a cpuset one gets the CPUs and memory nodes of its parent,
/// without which no process could join its children.
fn setup_v1(controller: Controller, own: &Path, base: &Path) -> Result<(), String> {
    mkdir(base).map_err(|e| e.to_string())?;
    if controller == Controller::Cpuset {
        for (file, effective) in [
            ("cpuset.cpus", "cpuset.effective_cpus"),
            ("cpuset.mems", "cpuset.effective_mems"),
        ] {
            let from = if own.join(effective).exists() {
                own.join(effective)
            } else {
                own.join(file)
            };
            let value = read(&from).map_err(|e| e.to_string())?;
            write(&base.join(file), value.trim()).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Creates the v2 base directory with `controller` enabled for it and for its children.
fn setup_v2(controller: &str, own: &Path, base: &Path, root_name: &str) -> Result<(), String> {
    let offered = read(&own.join("cgroup.controllers")).map_err(|e| e.to_string())?;
    if !offered.split_whitespace().any(|c| c == controller) {
        return Err(format!(
            "not enabled for this process's cgroup {}: the parent's cgroup.subtree_control \
             lacks it (systemd: Delegate=yes)",
            own.display()
        ));
    }
    let enable = format!("+{controller}");
    let own_control = own.join("cgroup.subtree_control");
    if let Err(e) = write(&own_control, &enable) {
        // EBUSY: our cgroup holds processes, which v2 forbids for a cgroup that distributes
        // resources to children. Move this process into a leaf and try again.
        let busy = matches!(&e, CgroupError::Io { source, .. }
            if source.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()));
        if !busy {
            return Err(e.to_string());
        }
        let leaf = own.join(format!("{root_name}.daemon"));
        mkdir(&leaf).map_err(|e| e.to_string())?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
            .map_err(|e| e.to_string())?;
        write(&own_control, &enable).map_err(|e| {
            format!(
                "{e} (other processes share this process's cgroup {}; run the daemon in a \
                 cgroup of its own, systemd: Delegate=yes)",
                own.display()
            )
        })?;
    }
    mkdir(base).map_err(|e| e.to_string())?;
    write(&base.join("cgroup.subtree_control"), &enable).map_err(|e| e.to_string())
}

/// On v2, freezing is `cgroup.freeze` of any non-root cgroup (Linux 5.2).
fn setup_v2_freezer(base: &Path) -> Result<(), String> {
    mkdir(base).map_err(|e| e.to_string())?;
    if base.join("cgroup.freeze").exists() {
        Ok(())
    } else {
        Err("this kernel has no cgroup.freeze".to_owned())
    }
}

/// Sets one controller's limit in a new build directory.
fn set_limit(
    version: Version,
    controller: Controller,
    base: &Path,
    dir: &Path,
    limits: &BuildLimits,
) -> Result<(), CgroupError> {
    let exists = |file: &str| dir.join(file).exists();
    match (controller, version) {
        (Controller::Cpuset, Version::V1) => {
            let mems = read(&base.join("cpuset.mems"))?;
            write(&dir.join("cpuset.mems"), mems.trim())?;
            write(&dir.join("cpuset.cpus"), &format_cpu_list(&limits.cores))
        }
        (Controller::Cpuset, Version::V2) => {
            write(&dir.join("cpuset.cpus"), &format_cpu_list(&limits.cores))
        }
        (Controller::Memory, Version::V1) => {
            write(
                &dir.join("memory.limit_in_bytes"),
                &limits.memory.to_string(),
            )?;
            if exists("memory.memsw.limit_in_bytes") {
                // Memory plus swap: the same limit, so swap adds nothing.
                write(
                    &dir.join("memory.memsw.limit_in_bytes"),
                    &limits.memory.to_string(),
                )
            } else if exists("memory.swappiness") {
                write(&dir.join("memory.swappiness"), "0")
            } else {
                Ok(())
            }
        }
        (Controller::Memory, Version::V2) => {
            write(&dir.join("memory.max"), &limits.memory.to_string())?;
            if exists("memory.swap.max") {
                write(&dir.join("memory.swap.max"), "0")?;
            }
            if exists("memory.oom.group") {
                // Out of memory ends the whole build, not one random process of it.
                write(&dir.join("memory.oom.group"), "1")?;
            }
            Ok(())
        }
        (Controller::Pids, _) => write(&dir.join("pids.max"), &limits.pids.to_string()),
        (Controller::Freezer, _) => Ok(()),
    }
}

/// One directory of a build's cgroup.
#[derive(Debug)]
struct Dir {
    version: Version,
    path: PathBuf,
    controllers: Vec<Controller>,
}

/// One build's cgroup (a directory in each hierarchy used). Dropping it without
/// [`BuildCgroup::remove`] kills its processes and removes it, as well as that can be done.
#[derive(Debug)]
pub struct BuildCgroup {
    dirs: Vec<Dir>,
    memory_limit: u64,
    pids_limit: u64,
    removed: bool,
}

/// Where to read how many forks a build's cgroup refused at its process limit (`max` in
/// `pids.events`, v1 and v2), for a watcher that outlives no [`BuildCgroup`] borrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkRefusals {
    file: PathBuf,
    /// The build's process limit (`pids.max`).
    pub limit: u64,
}

impl ForkRefusals {
    /// Forks and clones refused so far because the build was at its limit.
    pub fn count(&self) -> Result<u64, CgroupError> {
        let text = read(&self.file)?;
        keyed(&text, "max").ok_or_else(|| CgroupError::Parse {
            path: self.file.clone(),
            reason: format!("no 'max' count in {text:?}"),
        })
    }
}

impl BuildCgroup {
    fn dir_with(&self, controller: Controller) -> Option<&Dir> {
        self.dirs
            .iter()
            .find(|d| d.controllers.contains(&controller))
    }

    /// The directories, one per hierarchy.
    pub fn paths(&self) -> Vec<&Path> {
        self.dirs.iter().map(|d| d.path.as_path()).collect()
    }

    /// The `cgroup.procs` files a process must be written to (its pid, or `0` for the
    /// writer itself) to join the build.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.path.join("cgroup.procs"))
            .collect()
    }

    /// Moves a process (all its threads) into the build's cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = BTreeSet::new();
        for dir in &self.dirs {
            let path = dir.path.join("cgroup.procs");
            for line in read(&path)?.lines() {
                let pid = line.trim().parse().map_err(|_| CgroupError::Parse {
                    path: path.clone(),
                    reason: format!("{line:?} is not a pid"),
                })?;
                pids.insert(pid);
            }
        }
        Ok(pids.into_iter().collect())
    }

    /// The memory limit set, in bytes (for `out of memory (limit N MiB)`).
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// How to count the forks refused at the process limit; `None` without the pids
    /// controller or its `pids.events` (Linux < 4.7 on v1).
    pub fn fork_refusals(&self) -> Option<ForkRefusals> {
        let file = self.dir_with(Controller::Pids)?.path.join("pids.events");
        file.exists().then_some(ForkRefusals {
            file,
            limit: self.pids_limit,
        })
    }

    /// Whether the kernel killed a process of the build for going over its memory limit.
    /// `false` when the memory controller is unavailable.
    pub fn oom_killed(&self) -> Result<bool, CgroupError> {
        let Some(dir) = self.dir_with(Controller::Memory) else {
            return Ok(false);
        };
        Ok(match dir.version {
            Version::V2 => {
                keyed(&read(&dir.path.join("memory.events"))?, "oom_kill").is_some_and(|n| n > 0)
            }
            Version::V1 => {
                let control = read(&dir.path.join("memory.oom_control"))?;
                // `oom_kill` since Linux 4.13; before, only a build stuck in OOM shows. The
                // failure count is no sign: it also counts pages reclaimed at the limit.
                match keyed(&control, "oom_kill") {
                    Some(n) => n > 0,
                    None => keyed(&control, "under_oom") == Some(1),
                }
            }
        })
    }

    /// The most memory the build has used, in bytes, when the kernel records it (v2
    /// `memory.peak` needs Linux 5.19).
    pub fn peak_memory(&self) -> Result<Option<u64>, CgroupError> {
        let Some(dir) = self.dir_with(Controller::Memory) else {
            return Ok(None);
        };
        let file = match dir.version {
            Version::V1 => dir.path.join("memory.max_usage_in_bytes"),
            Version::V2 => dir.path.join("memory.peak"),
        };
        if !file.exists() {
            return Ok(None);
        }
        let text = read(&file)?;
        text.trim()
            .parse()
            .map(Some)
            .map_err(|_| CgroupError::Parse {
                path: file,
                reason: format!("{:?} is not a number", text.trim()),
            })
    }

    /// Kills every process of the build and waits until they are gone (at most 10 s).
    /// With v2 `cgroup.kill` one write does it; otherwise the cgroup is frozen first so that
    /// nothing forks or exits meanwhile (a pid read is then still that process), every
    /// process gets SIGKILL, and it is thawed. Without a freezer, `pids.max` drops to 0 so
    /// that nothing new can start, and the kill repeats until the cgroup is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.dirs.iter().find(|d| d.version == Version::V2) {
            let kill = dir.path.join("cgroup.kill");
            if kill.exists() {
                write(&kill, "1")?;
                return self.wait_empty();
            }
        }
        let frozen = self.freeze(true)?;
        if !frozen {
            if let Some(dir) = self.dir_with(Controller::Pids) {
                write(&dir.path.join("pids.max"), "0")?;
            }
        }
        let result = self.signal_all();
        if frozen {
            self.freeze(false)?;
        }
        result?;
        let start = Instant::now();
        while start.elapsed() < KILL_WAIT {
            if self.pids()?.is_empty() {
                return Ok(());
            }
            if !frozen {
                self.signal_all()?;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.wait_empty()
    }

    fn signal_all(&self) -> Result<(), CgroupError> {
        for pid in self.pids()? {
            let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            match rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => {
                    return Err(CgroupError::Io {
                        op: "send SIGKILL to a process of",
                        path: self
                            .dirs
                            .first()
                            .map(|d| d.path.clone())
                            .unwrap_or_default(),
                        source: e.into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Freezes (or thaws) the build; `Ok(false)` when there is no freezer.
    fn freeze(&self, on: bool) -> Result<bool, CgroupError> {
        let Some(dir) = self.dir_with(Controller::Freezer) else {
            return Ok(false);
        };
        let (file, value, done) = match (dir.version, on) {
            (Version::V1, true) => ("freezer.state", "FROZEN", "FROZEN"),
            (Version::V1, false) => ("freezer.state", "THAWED", "THAWED"),
            (Version::V2, true) => ("cgroup.freeze", "1", "frozen 1"),
            (Version::V2, false) => ("cgroup.freeze", "0", "frozen 0"),
        };
        let path = dir.path.join(file);
        write(&path, value)?;
        if !on {
            return Ok(true);
        }
        // Freezing completes asynchronously; a process in an uninterruptible sleep delays it.
        let state = match dir.version {
            Version::V1 => path,
            Version::V2 => dir.path.join("cgroup.events"),
        };
        let start = Instant::now();
        while start.elapsed() < FREEZE_WAIT {
            if read(&state)?.lines().any(|l| l.trim() == done) {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(true)
    }

    fn wait_empty(&self) -> Result<(), CgroupError> {
        let start = Instant::now();
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= KILL_WAIT {
                return Err(CgroupError::Survivors {
                    path: self
                        .dirs
                        .first()
                        .map(|d| d.path.clone())
                        .unwrap_or_default(),
                    pids,
                    waited: start.elapsed(),
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills whatever still runs in the build and removes its directories.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.removed = true;
        self.remove_dirs()
    }

    fn remove_dirs(&mut self) -> Result<(), CgroupError> {
        if !self.pids()?.is_empty() {
            self.kill_all()?;
        }
        for dir in std::mem::take(&mut self.dirs) {
            rmdir_waiting(&dir.path)?;
        }
        Ok(())
    }
}

/// Removes an empty cgroup directory; a cgroup whose last processes are still exiting is
/// busy for a moment.
fn rmdir_waiting(path: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                    && start.elapsed() < KILL_WAIT =>
            {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("remove", path)(e)),
        }
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        if !self.removed && !self.dirs.is_empty() {
            if let Err(e) = self.remove_dirs() {
                tracing::warn!("leaving a build cgroup behind: {e}");
            }
        }
    }
}

/// Whether the daemon may start with this cgroup report and `cores` of capacity: `Ok` with
/// warnings to log (limits not enforced, allowed by `allow_unenforced`, and notes), or the
/// refusal naming every limit that cannot be enforced.
pub fn check_limits(
    report: &Report,
    cores: u32,
    allow_unenforced: bool,
) -> Result<Vec<String>, CgroupError> {
    let mut problems = Vec::new();
    let missing = |support: &Support, what: &str| match support {
        Support::Unavailable(why) => Some(format!("{what}: {why}")),
        Support::Available { .. } => None,
    };
    problems.extend(missing(
        &report.cpuset,
        "cores (cpuset controller); builds could run on every core",
    ));
    problems.extend(missing(
        &report.memory,
        "memory (memory controller); builds could use all memory",
    ));
    problems.extend(missing(
        &report.pids,
        "processes (pids controller); a build could fork without bound",
    ));
    if report.memory.place().is_some() && report.swap == Swap::Unlimited {
        problems.push("swap: builds could swap beyond their memory limit".to_owned());
    }
    if cores as usize > report.cpus.len() {
        problems.push(format!(
            "cores: capacity.cores is {cores} but this daemon may use only {} CPUs ({}); \
             builds would share cores",
            report.cpus.len(),
            format_cpu_list(&report.cpus)
        ));
    }
    if !problems.is_empty() && !allow_unenforced {
        return Err(CgroupError::Unenforced { problems });
    }
    let mut warnings: Vec<String> = problems
        .into_iter()
        .map(|p| format!("limit not enforced: {p}"))
        .collect();
    if report.freezer.place().is_none() && !report.kill_file {
        warnings.push(
            "no freezer and no cgroup.kill: builds are killed by repeated SIGKILL".to_owned(),
        );
    }
    Ok(warnings)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    /// This machine's layout: v1 hierarchies plus a nearly empty unified one.
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/f589
3:cpuset:/
1:cpu:/
0::/
";
    const PROC_CGROUPS: &str = "\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
memory\t4\t138\t1
pids\t8\t1\t1
hugetlb\t0\t1\t1
rdma\t0\t1\t0
";

    #[test]
    fn each_controller_is_found_on_its_own_hierarchy() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 7);
        let own = parse_self_cgroup(HYBRID_SELF);
        let at = |c| locate(c, &mounts, &own, PROC_CGROUPS);
        assert_eq!(
            at("memory"),
            Ok((
                Version::V1,
                PathBuf::from("/sys/fs/cgroup/memory/process_api/f589")
            ))
        );
        assert_eq!(
            at("cpuset"),
            Ok((Version::V1, PathBuf::from("/sys/fs/cgroup/cpuset/")))
        );
        assert_eq!(
            at("pids"),
            Ok((Version::V1, PathBuf::from("/sys/fs/cgroup/pids/")))
        );
        // Not on a v1 hierarchy: the unified one, where cgroup.controllers decides.
        assert_eq!(
            at("hugetlb"),
            Ok((Version::V2, PathBuf::from("/sys/fs/cgroup/unified/")))
        );
        assert!(at("rdma").unwrap_err().contains("disabled"));
    }

    #[test]
    fn pure_v2_and_a_namespaced_mount() {
        let mountinfo = "\
25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_self_cgroup("0::/system.slice/nixbuild.service\n");
        assert_eq!(
            locate("memory", &mounts, &own, ""),
            Ok((
                Version::V2,
                PathBuf::from("/sys/fs/cgroup/system.slice/nixbuild.service")
            ))
        );
        // A container that sees only its own subtree: the mount's root is its cgroup.
        let mountinfo = "\
30 20 0:26 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory
";
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_self_cgroup("5:memory:/docker/abc/inner\n");
        assert_eq!(
            locate("memory", &mounts, &own, ""),
            Ok((Version::V1, PathBuf::from("/sys/fs/cgroup/memory/inner")))
        );
        let own = parse_self_cgroup("5:memory:/docker/abcdef\n");
        assert!(locate("memory", &mounts, &own, "").is_err());
        assert!(locate("pids", &[], &own, "").is_err());
    }

    #[test]
    fn mountinfo_escapes() {
        let line = "1 2 0:1 / /mnt/a\\040b rw - cgroup2 none rw\n";
        assert_eq!(
            parse_mountinfo(line)[0].mount_point,
            PathBuf::from("/mnt/a b")
        );
        assert_eq!(unescape("x\\134y\\0"), "x\\y\\0");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<u32>::new());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("0-4294967295").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[5]), "5");
    }

    #[test]
    fn names_are_single_safe_components() {
        assert!(valid_name("build-12.a_b"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn keyed_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(1));
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"), None);
    }

    fn report(memory: Support, cpus: Vec<u32>) -> Report {
        let here = |b: &str| Support::Available {
            version: Version::V1,
            base: PathBuf::from(b),
        };
        Report {
            cpuset: here("/c"),
            memory,
            pids: here("/p"),
            freezer: here("/f"),
            kill_file: false,
            swap: Swap::Counted,
            cpus,
        }
    }

    #[test]
    fn starting_without_a_limit_needs_the_operators_consent() {
        let ok = report(
            Support::Available {
                version: Version::V2,
                base: "/m".into(),
            },
            vec![0, 1],
        );
        assert_eq!(check_limits(&ok, 2, false).unwrap(), Vec::<String>::new());
        let msg = check_limits(&ok, 4, false).unwrap_err().to_string();
        assert!(
            msg.contains("capacity.cores is 4") && msg.contains("(0-1)"),
            "{msg}"
        );
        let no_memory = report(Support::Unavailable("not mounted".into()), vec![0]);
        let msg = check_limits(&no_memory, 1, false).unwrap_err().to_string();
        assert!(
            msg.starts_with("cannot enforce per-build limits:\n  - memory (memory controller)")
                && msg.contains("not mounted")
                && msg
                    .ends_with("set allow_unenforced_limits = true in [capacity] to start anyway"),
            "{msg}"
        );
        let warnings = check_limits(&no_memory, 1, true).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("limit not enforced: memory"));
    }
}
