//! Per-build cgroups on this machine (run as root): limits set, enforced and cleaned up.
//!
//! Each test uses its own `<root_name>` and removes it when done, even when it fails
//! (the fixture's and the build cgroup's Drop).
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nixbuild::cgroup::{check_limits, BuildCgroup, BuildLimits, Cgroups, Support};

const MIB: u64 = 1 << 20;

/// A `Cgroups` under a root name of its own, removed on drop.
struct Fixture {
    cgroups: Cgroups,
}

impl Fixture {
    fn new() -> Fixture {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nixbuild-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cgroups = Cgroups::detect(&name).unwrap();
        Fixture { cgroups }
    }

    fn build(&self, name: &str, cores: Vec<u32>, memory: u64) -> BuildCgroup {
        let limits = BuildLimits {
            cores,
            memory,
            pids: 64,
        };
        self.cgroups.create_build(name, &limits).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = self.cgroups.remove_bases() {
            eprintln!("cannot clean up the test cgroups: {e}");
        }
    }
}

/// Starts `script` in busybox sh, stopped on its first line of input until it is in `cg`.
fn spawn_in(cg: &BuildCgroup, script: &str, uid: Option<u32>) -> Child {
    let mut command = Command::new("/bin/busybox");
    command
        .args(["sh", "-c", &format!("read go; {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let mut child = command.spawn().unwrap();
    cg.add_pid(child.id()).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    child
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
}

#[test]
fn every_limit_is_enforceable_here() {
    let f = Fixture::new();
    let report = f.cgroups.report();
    for (name, support) in [
        ("cpuset", &report.cpuset),
        ("memory", &report.memory),
        ("pids", &report.pids),
    ] {
        match support {
            Support::Available { base, .. } => assert!(base.is_dir(), "{name}: {base:?}"),
            Support::Unavailable(why) => panic!("{name} unavailable: {why}"),
        }
    }
    assert!(!report.cpus.is_empty());
    assert_eq!(
        check_limits(report, report.cpus.len() as u32, false).unwrap(),
        Vec::<String>::new()
    );
    // One core more than the daemon may use is refused unless allowed.
    assert!(check_limits(report, report.cpus.len() as u32 + 1, false).is_err());
}

#[test]
fn out_of_memory_is_detected() {
    let f = Fixture::new();
    let cg = f.build("oom", vec![f.cgroups.report().cpus[0]], 32 * MIB);
    assert_eq!(cg.memory_limit(), 32 * MIB);
    // tail keeps the whole line: 200 MiB without a newline.
    let child = spawn_in(&cg, "head -c 209715200 /dev/zero | tail > /dev/null", None);
    let status = child.wait_with_output().unwrap().status;
    // The shell reports tail's death by SIGKILL.
    assert_eq!(status.code(), Some(128 + 9), "{status:?}");
    assert!(cg.oom_killed().unwrap());
    let peak = cg.peak_memory().unwrap().unwrap();
    assert!(peak > 16 * MIB && peak <= 32 * MIB, "peak {peak}");
    // Moving 200 MiB through a pipe takes CPU time, accounted to the build.
    let cpu = cg.cpu_usage_us().unwrap().expect("CPU time accounted");
    assert!(cpu > 1000, "cpu {cpu} µs");
    cg.remove().unwrap();
}

#[test]
fn a_build_runs_on_its_core_and_cannot_widen_its_cpu_set() {
    let f = Fixture::new();
    let cpus = f.cgroups.report().cpus.clone();
    assert!(
        cpus.len() >= 2,
        "this test needs two CPUs, the daemon may use {cpus:?}"
    );
    let core = cpus[cpus.len() - 1];
    let cg = f.build("pinned", vec![core], 64 * MIB);
    let cpuset_dir = cg
        .paths()
        .into_iter()
        .find(|p| p.join("cpuset.cpus").exists())
        .unwrap()
        .to_owned();
    let parent_procs = cpuset_dir.parent().unwrap().join("cgroup.procs");
    // As an unprivileged uid, as builds run: write a wider cpuset, move to the parent
    // cgroup, ask the scheduler for every CPU; then show where it may run.
    let script = format!(
        "echo 0-{last} > {cpus} 2>/dev/null && echo widened; \
         echo $$ > {procs} 2>/dev/null && echo moved; \
         taskset -p {mask:x} $$ > /dev/null 2>&1; \
         grep Cpus_allowed_list /proc/self/status",
        last = cpus[cpus.len() - 1],
        cpus = cpuset_dir.join("cpuset.cpus").display(),
        procs = parent_procs.display(),
        mask = (1u64 << (cpus[cpus.len() - 1] + 1)) - 1,
    );
    let child = spawn_in(&cg, &script, Some(65534));
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert_eq!(stdout.trim(), format!("Cpus_allowed_list:\t{core}"));
    assert_eq!(
        std::fs::read_to_string(cpuset_dir.join("cpuset.cpus"))
            .unwrap()
            .trim(),
        core.to_string()
    );
    assert!(!cg.oom_killed().unwrap());

    // And from outside, a process of the build shows the same.
    let mut child = spawn_in(&cg, "echo ready; sleep 1000", None);
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        status_field(child.id(), "Cpus_allowed_list:"),
        Some(core.to_string())
    );
    assert_eq!(cg.pids().unwrap(), vec![child.id()]);
    cg.kill_all().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    cg.remove().unwrap();
}

#[test]
fn kill_all_kills_a_forking_tree_and_remove_leaves_nothing() {
    let f = Fixture::new();
    let cg = f.build("tree", vec![f.cgroups.report().cpus[0]], 64 * MIB);
    let paths: Vec<_> = cg.paths().into_iter().map(Path::to_owned).collect();
    assert!(!paths.is_empty());
    // Children that double-fork away from the shell, and a shell that keeps forking.
    let script = "for i in 1 2 3; do (sleep 1000 &); done; echo started; \
                  while true; do sleep 1000 & wait; done";
    let mut child = spawn_in(&cg, script, None);
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let start = Instant::now();
    let pids = loop {
        let pids = cg.pids().unwrap();
        if pids.len() >= 5 {
            break pids;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{pids:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    cg.kill_all().unwrap();
    assert_eq!(cg.pids().unwrap(), Vec::<u32>::new());
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    for pid in pids {
        // Gone, or a zombie waiting for its reaper.
        let state = status_field(pid, "State:");
        assert!(
            state.as_deref().is_none_or(|s| s.starts_with('Z')),
            "{pid}: {state:?}"
        );
    }
    cg.remove().unwrap();
    for path in &paths {
        assert!(!path.exists(), "{path:?}");
    }
}

#[test]
fn a_dropped_build_cgroup_is_killed_and_removed() {
    let f = Fixture::new();
    let cg = f.build("dropped", vec![f.cgroups.report().cpus[0]], 64 * MIB);
    let paths: Vec<_> = cg.paths().into_iter().map(Path::to_owned).collect();
    let mut child = spawn_in(&cg, "sleep 1000", None);
    drop(cg);
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    for path in &paths {
        assert!(!path.exists(), "{path:?}");
    }
    // Leftovers of a daemon that died are found and removed.
    let left = f.build("left", vec![f.cgroups.report().cpus[0]], 64 * MIB);
    let paths: Vec<_> = left.paths().into_iter().map(Path::to_owned).collect();
    std::mem::forget(left);
    assert_eq!(f.cgroups.remove_leftovers().unwrap(), 1);
    for path in &paths {
        assert!(!path.exists(), "{path:?}");
    }
}

#[test]
fn bad_requests_are_refused_and_leave_nothing() {
    let f = Fixture::new();
    let limits = |cores| BuildLimits {
        cores,
        memory: 64 * MIB,
        pids: 64,
    };
    let err = f.cgroups.create_build("a/b", &limits(vec![0])).unwrap_err();
    assert!(err.to_string().contains("invalid cgroup name"), "{err}");
    let err = f
        .cgroups
        .create_build("x", &limits(vec![4096]))
        .unwrap_err();
    assert!(err.to_string().contains("4096"), "{err}");
    let err = f.cgroups.create_build("x", &limits(vec![])).unwrap_err();
    assert!(err.to_string().contains("[]"), "{err}");
    // A name in use is refused, and the cgroup that has it stays.
    let cg = f.build("dup", vec![f.cgroups.report().cpus[0]], 64 * MIB);
    let err = f
        .cgroups
        .create_build("dup", &limits(vec![f.cgroups.report().cpus[0]]));
    assert!(err.is_err());
    assert!(cg.paths().iter().all(|p| p.is_dir()));
    cg.remove().unwrap();
    assert_eq!(f.cgroups.remove_leftovers().unwrap(), 0);
}
