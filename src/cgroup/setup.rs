//! Setup: the daemon's subtree `<root_name>` in every hierarchy with a controller it uses
//! ([`Cgroups::detect`]), what it can enforce ([`super::Report`], [`check_limits`]), and the
//! creation of each build's cgroup with its limits set ([`Cgroups::create_build`]).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::build_cgroup::{rmdir_waiting, Dir};
use super::discovery::{
    locate, parse_cpu_list, parse_mountinfo, parse_self_cgroup, valid_name, LocateError,
};
use super::{
    format_cpu_list, io_err, mkdir, read, write, BuildCgroup, BuildLimits, CgroupError, Controller,
    Report, Support, Swap, Version,
};

/// Why a controller cannot be used (the reason [`Support::Unavailable`] gives).
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    /// It is not found for this process.
    #[error(transparent)]
    Locate(#[from] LocateError),
    /// Its directory could not be made or set up.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// v2: the parent has not delegated it to this process's cgroup.
    #[error(
        "not enabled for this process's cgroup {}: the parent's cgroup.subtree_control lacks \
         it (systemd: Delegate=yes)",
        .0.display()
    )]
    NotDelegated(PathBuf),
    /// v2: this process's cgroup holds other processes, so it cannot distribute resources.
    #[error(
        "{source} (other processes share this process's cgroup {}; run the daemon in a cgroup \
         of its own, systemd: Delegate=yes)",
        own.display()
    )]
    Shared {
        /// This process's cgroup.
        own: PathBuf,
        /// The refused write to its `cgroup.subtree_control`.
        source: CgroupError,
    },
    /// v2 without `cgroup.freeze` (Linux < 5.2).
    #[error("this kernel has no cgroup.freeze")]
    NoFreeze,
}

/// The cgroups of this daemon's builds.
#[derive(Debug, Clone)]
pub struct Cgroups {
    report: Report,
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
            let found = locate(name, &mounts, &self_cgroup, &proc_cgroups)
                .map_err(Unavailable::from)
                .and_then(|(version, own)| {
                    let base = own.join(root_name);
                    match version {
                        Version::V1 => setup_v1(controller, &own, &base),
                        Version::V2 if controller == Controller::Freezer => setup_v2_freezer(&base),
                        Version::V2 => setup_v2(name, &own, &base, root_name),
                    }
                    .map(|()| Support::Available { version, base })
                });
            found.unwrap_or_else(|e| Support::Unavailable(e.to_string()))
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
        let mut build = BuildCgroup::empty(limits.memory, limits.pids);
        // Each directory is recorded as soon as it exists, so that a failure below removes
        // what was made (through Drop).
        for (version, base, controllers) in self.bases() {
            let dir = base.join(name);
            fs::create_dir(&dir).map_err(io_err("create", &dir))?;
            build.add_dir(Dir {
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
            let mut left = BuildCgroup::empty(0, 0);
            self.bases()
                .into_iter()
                .map(|(version, base, controllers)| Dir {
                    version,
                    path: base.join(&name),
                    controllers,
                })
                .filter(|d| d.path.is_dir())
                .for_each(|d| left.add_dir(d));
            left.remove()?;
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
    parse_cpu_list(&read(path)?).map_err(|e| CgroupError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
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
    parse_cpu_list(list).map_err(|e| CgroupError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
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
fn setup_v1(controller: Controller, own: &Path, base: &Path) -> Result<(), Unavailable> {
    mkdir(base)?;
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
            let value = read(&from)?;
            write(&base.join(file), value.trim())?;
        }
    }
    Ok(())
}

/// Creates the v2 base directory with `controller` enabled for it and for its children.
fn setup_v2(controller: &str, own: &Path, base: &Path, root_name: &str) -> Result<(), Unavailable> {
    let offered = read(&own.join("cgroup.controllers"))?;
    if !offered.split_whitespace().any(|c| c == controller) {
        return Err(Unavailable::NotDelegated(own.to_owned()));
    }
    let enable = format!("+{controller}");
    let own_control = own.join("cgroup.subtree_control");
    if let Err(e) = write(&own_control, &enable) {
        // EBUSY: our cgroup holds processes, which v2 forbids for a cgroup that distributes
        // resources to children. Move this process into a leaf and try again.
        let busy = matches!(&e, CgroupError::Io { source, .. }
            if source.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()));
        if !busy {
            return Err(e.into());
        }
        let leaf = own.join(format!("{root_name}.daemon"));
        mkdir(&leaf)?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        write(&own_control, &enable).map_err(|source| Unavailable::Shared {
            own: own.to_owned(),
            source,
        })?;
    }
    mkdir(base)?;
    Ok(write(&base.join("cgroup.subtree_control"), &enable)?)
}

/// On v2, freezing is `cgroup.freeze` of any non-root cgroup (Linux 5.2).
fn setup_v2_freezer(base: &Path) -> Result<(), Unavailable> {
    mkdir(base)?;
    if base.join("cgroup.freeze").exists() {
        Ok(())
    } else {
        Err(Unavailable::NoFreeze)
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
