//! The build cgroup: one build's directories, joined by its processes, read for out of
//! memory, refused forks and peak memory, and killed (with `cgroup.kill`, or frozen and sent
//! SIGKILL) and removed as a whole.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::discovery::keyed;
use super::{io_err, read, write, CgroupError, Controller, Version};

/// How long [`BuildCgroup::kill_all`] waits for killed processes to go.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long a freeze may take before killing goes ahead regardless.
const FREEZE_WAIT: Duration = Duration::from_secs(2);

/// One directory of a build's cgroup.
#[derive(Debug)]
pub(super) struct Dir {
    /// Its hierarchy's version.
    pub(super) version: Version,
    /// The directory.
    pub(super) path: PathBuf,
    /// The controllers it serves.
    pub(super) controllers: Vec<Controller>,
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

/// Where to read a build's peak memory and CPU time ([`BuildCgroup::usage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageFiles {
    /// `memory.max_usage_in_bytes` (v1) or `memory.peak` (v2).
    peak: Option<PathBuf>,
    /// `cpuacct.usage` (v1, nanoseconds) or `cpu.stat` (v2, `usage_usec`).
    cpu: Option<(PathBuf, Version)>,
}

impl UsageFiles {
    /// The most memory the build has used, in bytes, when the kernel records it (v2
    /// `memory.peak` needs Linux 5.19).
    pub fn peak_memory(&self) -> Result<Option<u64>, CgroupError> {
        let Some(file) = self.peak.as_ref().filter(|f| f.exists()) else {
            return Ok(None);
        };
        let text = read(file)?;
        text.trim()
            .parse()
            .map(Some)
            .map_err(|_| CgroupError::Parse {
                path: file.clone(),
                reason: format!("{:?} is not a number", text.trim()),
            })
    }

    /// The CPU time the build's processes used, in microseconds, when it is accounted.
    pub fn cpu_usage_us(&self) -> Result<Option<u64>, CgroupError> {
        let Some((file, version)) = self.cpu.as_ref().filter(|(f, _)| f.exists()) else {
            return Ok(None);
        };
        let text = read(file)?;
        let value = match version {
            Version::V1 => text.trim().parse::<u64>().ok().map(|ns| ns / 1000),
            Version::V2 => keyed(&text, "usage_usec"),
        };
        value.map(Some).ok_or_else(|| CgroupError::Parse {
            path: file.clone(),
            reason: format!("no CPU usage in {:?}", text.trim()),
        })
    }
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
    /// A build cgroup of no directory yet, with these limits (for the messages and
    /// [`ForkRefusals`]).
    pub(super) fn empty(memory_limit: u64, pids_limit: u64) -> BuildCgroup {
        BuildCgroup {
            dirs: Vec::new(),
            memory_limit,
            pids_limit,
            removed: false,
        }
    }

    /// Adds a directory made for the build: from now on it is removed with the build.
    pub(super) fn add_dir(&mut self, dir: Dir) {
        self.dirs.push(dir);
    }

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

    /// Where the build's peak memory and CPU time are read, for a reader that outlives no
    /// [`BuildCgroup`] borrow (`nixbuild show` of a running build).
    pub fn usage(&self) -> UsageFiles {
        let peak = self
            .dir_with(Controller::Memory)
            .map(|dir| match dir.version {
                Version::V1 => dir.path.join("memory.max_usage_in_bytes"),
                Version::V2 => dir.path.join("memory.peak"),
            });
        let v2 = self.dirs.iter().find(|d| d.version == Version::V2);
        let cpu = match (self.dir_with(Controller::Cpuacct), v2) {
            (Some(dir), _) if dir.version == Version::V1 => {
                Some((dir.path.join("cpuacct.usage"), Version::V1))
            }
            (_, Some(dir)) => Some((dir.path.join("cpu.stat"), Version::V2)),
            _ => None,
        };
        UsageFiles { peak, cpu }
    }

    /// The most memory the build has used, in bytes, when the kernel records it (v2
    /// `memory.peak` needs Linux 5.19).
    pub fn peak_memory(&self) -> Result<Option<u64>, CgroupError> {
        self.usage().peak_memory()
    }

    /// The CPU time the build's processes used, in microseconds, when it is accounted (v1
    /// `cpuacct.usage`, v2 `cpu.stat`).
    pub fn cpu_usage_us(&self) -> Result<Option<u64>, CgroupError> {
        self.usage().cpu_usage_us()
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
pub(super) fn rmdir_waiting(path: &Path) -> Result<(), CgroupError> {
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
