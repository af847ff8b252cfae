//! Setup: the daemon's subtree `<root_name>` in every hierarchy with a controller it uses
//! ([`Cgroups::detect`]), what it can enforce ([`super::Report`], [`check_limits`]), and the
//! creation of each build's cgroup with its limits set ([`Cgroups::create_build`]).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::build_cgroup::{rmdir_waiting, Dir};
use super::discovery::{
    locate, parse_cpu_list, parse_mountinfo, parse_self_cgroup, valid_name, CgroupMount,
    LocateError,
};
use super::plan::{explain_errno, plan_v2, usable_v2, Delegation, OwnCgroup, Step, V2_CONTROLLERS};
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
    /// v2: the own cgroup cannot give it to build cgroups, and what was tried.
    #[error("{0}")]
    V2(String),
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
    /// On v2 it follows the [`super::plan`]: this process first moves itself into a leaf
    /// `<root_name>.daemon` of its own cgroup, then enables the controllers top-down. A
    /// controller its cgroup cannot give is reported with why, and with what
    /// [`enter_delegated_scope`] tried.
    pub fn detect(root_name: &str) -> Result<Cgroups, CgroupError> {
        if !valid_name(root_name) {
            return Err(CgroupError::Name(root_name.to_owned()));
        }
        let found = Found::read()?;
        let mut v2 = found.v2_support(root_name);
        let mut setup = |controller: Controller| -> Support {
            let name = controller.name();
            let found = found.locate(name).and_then(|(version, own)| {
                let base = own.join(root_name);
                match version {
                    Version::V1 => setup_v1(controller, &own, &base),
                    Version::V2 if controller == Controller::Freezer => setup_v2_freezer(&base),
                    Version::V2 if controller == Controller::Cpuacct => setup_v2_accounting(&base),
                    Version::V2 => v2
                        .iter()
                        .position(|(c, _)| *c == controller)
                        .map_or(Ok(()), |i| v2.remove(i).1),
                }
                .map(|()| Support::Available { version, base })
            });
            found.unwrap_or_else(|e| Support::Unavailable(e.to_string()))
        };
        let [cpuset, memory, pids, freezer, cpuacct] = [
            Controller::Cpuset,
            Controller::Memory,
            Controller::Pids,
            Controller::Freezer,
            Controller::Cpuacct,
        ]
        .map(&mut setup);
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
                cpuacct,
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
            (Controller::Cpuacct, &self.report.cpuacct),
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

/// Whether this process moved itself into the scope it asked systemd for.
static IN_DELEGATED_SCOPE: AtomicBool = AtomicBool::new(false);

/// How long systemd may take to move this process into its new scope.
const SCOPE_WAIT: Duration = Duration::from_secs(10);

/// On cgroup v2 under systemd, when this process's cgroup cannot give build cgroups the
/// controllers they need (an SSH login's session scope, a service without `Delegate=yes`),
/// asks systemd over D-Bus (`busctl call … StartTransientUnit`, as container runtimes do) for
/// a transient scope `nixbuild-<pid>.scope` with `Delegate=yes` holding this process, and
/// waits until systemd has moved it there. The process goes on as it was (same pid, streams
/// and arguments). For `main`, before the cgroups are set up. Returns when there is nothing
/// to do or nothing to ask (no systemd, not root, already moved), or with the error when
/// systemd could not be asked or refused; [`Cgroups::detect`] then says what was tried.
pub fn enter_delegated_scope() -> Result<(), CgroupError> {
    let found = Found::read()?;
    let Some((own, wanted)) = found.v2_own() else {
        return Ok(());
    };
    let Ok(files) = OwnFiles::read(&own) else {
        return Ok(());
    };
    let (_, missing) = usable_v2(&files.view(&own), &wanted);
    let delegation = Delegation::decide(
        !missing.is_empty(),
        systemd_can_delegate(),
        IN_DELEGATED_SCOPE.load(Ordering::Relaxed),
    );
    if delegation != Delegation::AskSystemd {
        return Ok(());
    }
    let pid = std::process::id();
    let unit = format!("nixbuild-{pid}.scope");
    let why: Vec<String> = missing
        .iter()
        .map(|(c, why)| format!("{}: {why}", c.name()))
        .collect();
    tracing::info!(
        "{}; asking systemd for a scope with Delegate=yes: {unit}",
        why.join("; ")
    );
    let command = scope_request(&unit, pid);
    let refused = |reason: String| CgroupError::Systemd {
        unit: unit.clone(),
        reason,
    };
    let output = std::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io_err("execute", Path::new(&command[0])))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(refused(format!(
            "{} {}",
            output.status,
            stderr.trim().chars().take(500).collect::<String>()
        )));
    }
    // systemd moves the process when it starts the scope's job, just after answering.
    let deadline = Instant::now() + SCOPE_WAIT;
    loop {
        if let Some((dir, _)) = Found::read()?
            .v2_own()
            .filter(|(dir, _)| dir.ends_with(&unit))
        {
            IN_DELEGATED_SCOPE.store(true, Ordering::Relaxed);
            tracing::info!("moved into {}", dir.display());
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(refused(format!(
                "systemd accepted the scope but did not move this process into it within {:?}",
                SCOPE_WAIT
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The D-Bus call that asks systemd for the transient scope `unit` holding process `pid`,
/// with delegated controllers, removed when its processes are gone (even after a failure).
fn scope_request(unit: &str, pid: u32) -> Vec<String> {
    [
        "busctl",
        "call",
        "--system",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        unit,
        "fail",
        "4",
        "PIDs",
        "au",
        "1",
        &pid.to_string(),
        "Delegate",
        "b",
        "true",
        "CollectMode",
        "s",
        "inactive-or-failed",
        "Description",
        "s",
        "nixbuild-server with delegated cgroup controllers",
        "0",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Whether systemd manages this host and this process may ask it for a scope.
fn systemd_can_delegate() -> bool {
    Path::new("/run/systemd/system").is_dir() && rustix::process::geteuid().is_root()
}

/// What discovery reads: the cgroup mounts, this process's cgroups and `/proc/cgroups`.
struct Found {
    mounts: Vec<CgroupMount>,
    self_cgroup: Vec<(u32, Vec<String>, String)>,
    proc_cgroups: String,
}

impl Found {
    fn read() -> Result<Found, CgroupError> {
        Ok(Found::parse(
            &read(Path::new("/proc/self/mountinfo"))?,
            &read(Path::new("/proc/self/cgroup"))?,
            fs::read_to_string("/proc/cgroups").unwrap_or_default(),
        ))
    }

    fn parse(mountinfo: &str, self_cgroup: &str, proc_cgroups: String) -> Found {
        Found {
            mounts: parse_mountinfo(mountinfo),
            self_cgroup: parse_self_cgroup(self_cgroup),
            proc_cgroups,
        }
    }

    fn locate(&self, controller: &str) -> Result<(Version, PathBuf), Unavailable> {
        Ok(locate(
            controller,
            &self.mounts,
            &self.self_cgroup,
            &self.proc_cgroups,
        )?)
    }

    /// The own cgroup on v2 and the build controllers found there (none on v1).
    fn v2_own(&self) -> Option<(PathBuf, Vec<Controller>)> {
        let mut own = None;
        let mut wanted = Vec::new();
        for controller in V2_CONTROLLERS {
            if let Ok((Version::V2, dir)) = self.locate(controller.name()) {
                own = Some(dir);
                wanted.push(controller);
            }
        }
        own.map(|dir| (dir, wanted))
    }

    /// Plans the v2 subtree and carries the plan out: for each build controller on v2,
    /// whether build cgroups have it, or why not.
    fn v2_support(&self, root_name: &str) -> Vec<(Controller, Result<(), Unavailable>)> {
        let Some((own, wanted)) = self.v2_own() else {
            return Vec::new();
        };
        let files = match OwnFiles::read(&own) {
            Ok(files) => files,
            Err(e) => {
                return wanted
                    .into_iter()
                    .map(|c| (c, Err(Unavailable::V2(e.to_string()))))
                    .collect()
            }
        };
        let plan = plan_v2(&files.view(&own), root_name, &wanted);
        let delegation = Delegation::decide(
            !plan.missing.is_empty(),
            systemd_can_delegate(),
            IN_DELEGATED_SCOPE.load(Ordering::Relaxed),
        );
        let failed = execute(&plan.steps);
        wanted
            .into_iter()
            .map(|c| {
                let missing = plan.missing.iter().find(|(m, _)| *m == c);
                let failure = failed.iter().find(|(f, _)| *f == c);
                let result = match (missing, failure) {
                    (Some((_, why)), _) => Err(Unavailable::V2(format!("{why}{delegation}"))),
                    (None, Some((_, why))) => Err(Unavailable::V2(why.clone())),
                    (None, None) => Ok(()),
                };
                (c, result)
            })
            .collect()
    }
}

/// The own v2 cgroup's files the plan is made from.
struct OwnFiles {
    controllers: String,
    subtree_control: String,
    cgroup_type: Option<String>,
    procs: String,
}

impl OwnFiles {
    fn read(own: &Path) -> Result<OwnFiles, CgroupError> {
        let type_file = own.join("cgroup.type");
        Ok(OwnFiles {
            controllers: read(&own.join("cgroup.controllers"))?,
            subtree_control: read(&own.join("cgroup.subtree_control"))?,
            cgroup_type: type_file.exists().then(|| read(&type_file)).transpose()?,
            procs: read(&own.join("cgroup.procs"))?,
        })
    }

    fn view<'a>(&'a self, dir: &'a Path) -> OwnCgroup<'a> {
        OwnCgroup {
            dir,
            controllers: &self.controllers,
            subtree_control: &self.subtree_control,
            cgroup_type: self.cgroup_type.as_deref(),
            procs: &self.procs,
            pid: std::process::id(),
        }
    }
}

/// Carries out the steps of a v2 plan in order; returns the controllers that could not be
/// enabled, each with why. A failed move or directory fails every controller.
fn execute(steps: &[Step]) -> Vec<(Controller, String)> {
    let all: Vec<Controller> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Enable(_, c) => Some(*c),
            _ => None,
        })
        .collect();
    let mut failed: Vec<(Controller, String)> = Vec::new();
    for step in steps {
        let (result, controllers) = match step {
            Step::MoveToLeaf(leaf) => (
                mkdir(leaf).and_then(|()| {
                    write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                }),
                all.clone(),
            ),
            Step::CreateDir(dir) => (mkdir(dir), all.clone()),
            Step::Enable(_, c) if failed.iter().any(|(f, _)| f == c) => continue,
            Step::Enable(dir, c) => (
                write(
                    &dir.join("cgroup.subtree_control"),
                    &format!("+{}", c.name()),
                ),
                vec![*c],
            ),
        };
        if let Err(e) = result {
            let why = match &e {
                CgroupError::Io { source, .. } => source.raw_os_error().and_then(explain_errno),
                _ => None,
            };
            let why = why.map_or_else(|| e.to_string(), |why| format!("{e}: {why}"));
            for c in controllers {
                if !failed.iter().any(|(f, _)| *f == c) {
                    failed.push((c, why.clone()));
                }
            }
        }
    }
    failed
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

/// On v2, freezing is `cgroup.freeze` of any non-root cgroup (Linux 5.2).
fn setup_v2_freezer(base: &Path) -> Result<(), Unavailable> {
    mkdir(base)?;
    if base.join("cgroup.freeze").exists() {
        Ok(())
    } else {
        Err(Unavailable::NoFreeze)
    }
}

/// On v2, CPU time is `cpu.stat` of any non-root cgroup, controller or not.
fn setup_v2_accounting(base: &Path) -> Result<(), Unavailable> {
    mkdir(base)?;
    Ok(())
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
        (Controller::Freezer | Controller::Cpuacct, _) => Ok(()),
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
            cpuacct: here("/a"),
            kill_file: false,
            swap: Swap::Counted,
            cpus,
        }
    }

    #[test]
    fn only_controllers_on_v2_are_planned() {
        // This machine: cpuset, memory and pids on v1 next to a nearly empty unified mount.
        let hybrid = Found::parse(
            "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n\
             39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
            "8:pids:/\n4:memory:/process_api/f589\n3:cpuset:/\n0::/\n",
            String::new(),
        );
        assert_eq!(hybrid.v2_own(), None);
        let unified = Found::parse(
            "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
            "0::/system.slice/ssh.service\n",
            String::new(),
        );
        assert_eq!(
            unified.v2_own(),
            Some((
                PathBuf::from("/sys/fs/cgroup/system.slice/ssh.service"),
                V2_CONTROLLERS.to_vec()
            ))
        );
    }

    #[test]
    fn the_scope_request_moves_this_process_into_a_delegated_scope() {
        let request = scope_request("nixbuild-4242.scope", 4242);
        // busctl's signature, then the values in its order: name, mode, 4 properties, no
        // auxiliary units.
        assert_eq!(
            request[..8],
            [
                "busctl",
                "call",
                "--system",
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "StartTransientUnit",
                "ssa(sv)a(sa(sv))",
            ]
        );
        assert_eq!(request[8..11], ["nixbuild-4242.scope", "fail", "4"]);
        let properties = &request[11..request.len() - 1];
        assert_eq!(properties[..4], ["PIDs", "au", "1", "4242"]);
        assert_eq!(properties[4..7], ["Delegate", "b", "true"]);
        assert_eq!(
            properties[7..10],
            ["CollectMode", "s", "inactive-or-failed"]
        );
        assert_eq!(properties[10..12], ["Description", "s"]);
        assert_eq!(properties.len(), 13);
        assert_eq!(request.last().map(String::as_str), Some("0"));
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
