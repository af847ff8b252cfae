//! Where and when builds run: the scheduler of `nixbuild_core` (one machine: this host) and
//! the per-build cgroups that hold each build to the cores and memory it was granted.
//!
//! A build asks with [`Placement::submit`] and gets a [`Ticket`]; the scheduler decides after
//! every event (arrival, completion, cancellation) and hands each started build its
//! [`Grant`] through the ticket. Dropping a ticket that has not started withdraws the build;
//! dropping a [`Running`] slot (after the build's processes are gone) frees its cores.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nixbuild_core::scheduler::{BuildId, BuildSpec, Refusal, Scheduler, Start};
use tokio::sync::oneshot;

use crate::cgroup::{check_limits, BuildCgroup, BuildLimits, CgroupError, Cgroups};
use crate::config::Config;
use crate::host::HostFacts;

/// Why the placement of builds could not be set up: the daemon does not start.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The cgroups could not be found or prepared, or a limit cannot be enforced.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The host could not be examined ([`HostFacts::detect`]).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The scheduler refused the configuration.
    #[error("scheduler: {0}")]
    Scheduler(#[from] nixbuild_core::scheduler::SchedError),
}

/// What a started build was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Host CPU numbers.
    pub cpus: Vec<u32>,
    /// Memory in bytes.
    pub memory: u64,
}

/// The scheduler and the cgroups of one daemon.
#[derive(Debug)]
pub struct Placement {
    state: Mutex<State>,
    epoch: Instant,
    cgroups: Cgroups,
    pids_per_build: u64,
}

#[derive(Debug)]
struct State {
    scheduler: Scheduler,
    /// Waiting builds: where to send their start.
    waiting: HashMap<BuildId, oneshot::Sender<Start>>,
}

impl Placement {
    /// Takes the cgroups detected for the daemon, refuses a configuration whose limits
    /// cannot be enforced unless `[capacity] allow_unenforced_limits` (the warnings are
    /// logged), removes build cgroups a previous daemon left, and sets up the scheduler with
    /// this host as its machine.
    pub fn new(
        config: &Config,
        cgroups: Cgroups,
        host: &HostFacts,
    ) -> Result<Placement, PlacementError> {
        let report = cgroups.report();
        let machine = config.capacity.machine(host);
        for warning in check_limits(
            report,
            machine.cores,
            config.capacity.allow_unenforced_limits,
        )? {
            tracing::warn!("{warning}");
        }
        let left = cgroups.remove_leftovers()?;
        if left > 0 {
            tracing::info!(left, "removed build cgroups of an earlier daemon");
        }
        tracing::info!(
            cores = machine.cores,
            memory_mib = machine.memory >> 20,
            max_jobs = machine.max_jobs,
            systems = ?machine.systems,
            features = ?machine.supported_features,
            "build capacity"
        );
        let scheduler = Scheduler::new(config.scheduler.scheduler_config(), vec![machine])?;
        Ok(Placement {
            state: Mutex::new(State {
                scheduler,
                waiting: HashMap::new(),
            }),
            epoch: Instant::now(),
            cgroups,
            pids_per_build: config.capacity.pids_per_build,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Queues a build; `Err` is the refusal of a build that can never run here.
    pub fn submit(self: &Arc<Self>, spec: BuildSpec) -> Result<Ticket, Refusal> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        let now = self.now();
        let id = state.scheduler.submit(spec, now)?;
        state.waiting.insert(id, tx);
        self.dispatch(&mut state, now);
        Ok(Ticket {
            placement: self.clone(),
            id,
            start: rx,
            started: false,
        })
    }

    /// Hands out what the scheduler starts now.
    fn dispatch(&self, state: &mut State, now: Duration) {
        for start in state.scheduler.decide(now) {
            let id = start.id;
            let delivered = state
                .waiting
                .remove(&id)
                .is_some_and(|tx| tx.send(start).is_ok());
            if !delivered {
                // Its waiter is gone: it frees the cores again at once.
                let _ = state.scheduler.complete(id, now);
            }
        }
    }

    /// A line for the client while `id` waits, e.g. `waiting for 4 cores (position 3 of 7;
    /// 2 builds running)`.
    pub fn status(&self, id: BuildId) -> Option<String> {
        self.lock()
            .scheduler
            .waiting_status(id)
            .map(|s| s.to_string())
    }

    /// The cores and memory (bytes) the scheduler hands out, over all machines.
    pub fn capacity(&self) -> (u64, u64) {
        let state = self.lock();
        state
            .scheduler
            .machines()
            .iter()
            .fold((0, 0), |(c, m), machine| {
                (c + u64::from(machine.cores), m + machine.memory)
            })
    }

    fn finish(&self, id: BuildId, started: bool) {
        let mut state = self.lock();
        let now = self.now();
        if started {
            let _ = state.scheduler.complete(id, now);
        } else {
            state.waiting.remove(&id);
            let _ = state.scheduler.cancel(id, now);
        }
        self.dispatch(&mut state, now);
    }

    /// The cgroup of a build granted `grant`, named `name`.
    pub fn cgroup(&self, name: &str, grant: &Grant) -> Result<BuildCgroup, CgroupError> {
        self.cgroups.create_build(
            name,
            &BuildLimits {
                cores: grant.cpus.clone(),
                memory: grant.memory,
                pids: self.pids_per_build,
            },
        )
    }
}

impl Drop for Placement {
    /// The daemon is ending (every build's task, which holds the placement, is gone): its
    /// cgroups go with it, so that daemons of many state directories leave none behind.
    fn drop(&mut self) {
        if let Err(e) = self.cgroups.remove_bases() {
            tracing::warn!("leaving the daemon's cgroups behind: {e}");
        }
    }
}

/// A queued build. Dropped before it starts, the build leaves the queue.
#[derive(Debug)]
pub struct Ticket {
    placement: Arc<Placement>,
    id: BuildId,
    start: oneshot::Receiver<Start>,
    started: bool,
}

/// How often a waiting build's client hears where it stands.
const STATUS_EVERY: Duration = Duration::from_secs(30);

impl Ticket {
    /// The scheduler's id of the build.
    pub fn id(&self) -> BuildId {
        self.id
    }

    /// Waits for the build's turn, calling `status` with a line for the client when it has
    /// to wait (at once, then every 30 s). Returns the grant and the slot to drop when the
    /// build's processes are gone.
    pub async fn wait(mut self, mut status: impl FnMut(String)) -> (Grant, Running) {
        let mut first = true;
        let start = loop {
            tokio::select! {
                biased;
                start = &mut self.start => break start,
                () = tokio::time::sleep(if first { Duration::ZERO } else { STATUS_EVERY }) => {
                    if let Some(line) = self.placement.status(self.id) {
                        status(line);
                    }
                }
            }
            first = false;
        };
        self.started = true;
        let cpus = &self.placement.cgroups.report().cpus;
        let grant = match start {
            Ok(start) => Grant {
                cpus: host_cpus(&start.cores, cpus),
                memory: start.memory,
            },
            // The placement drops a waiting build's sender only when it delivered the start
            // or the ticket is gone; nothing granted, should it ever happen.
            Err(_) => Grant {
                cpus: Vec::new(),
                memory: 0,
            },
        };
        let running = Running {
            placement: self.placement.clone(),
            id: self.id,
        };
        (grant, running)
    }
}

/// The host CPUs of the scheduler's core indices `cores`: core `i` is `cpus[i]`. With
/// `[capacity] cores` above the CPUs this daemon may use (allowed only with
/// `allow_unenforced_limits`, which warns that builds then share cores), core `i` is
/// `cpus[i % cpus.len()]`, each CPU once.
fn host_cpus(cores: &[u32], cpus: &[u32]) -> Vec<u32> {
    if cpus.is_empty() {
        return Vec::new();
    }
    let mut host: Vec<u32> = cores
        .iter()
        .map(|&i| cpus[i as usize % cpus.len()])
        .collect();
    host.sort_unstable();
    host.dedup();
    host
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.started {
            self.placement.finish(self.id, false);
        }
    }
}

/// A started build's hold on its cores and memory, released when dropped.
#[derive(Debug)]
pub struct Running {
    placement: Arc<Placement>,
    id: BuildId,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.placement.finish(self.id, true);
    }
}

#[cfg(test)]
mod tests {
    use super::host_cpus;

    #[test]
    fn cores_beyond_the_daemons_cpus_share_them_rather_than_vanish() {
        assert_eq!(host_cpus(&[0, 1], &[4, 5, 6]), vec![4, 5]);
        assert_eq!(host_cpus(&[2], &[4, 5]), vec![4]);
        assert_eq!(host_cpus(&[1, 3, 5], &[4, 5]), vec![5]);
        assert_eq!(host_cpus(&[0, 1, 2, 3], &[4, 5]), vec![4, 5]);
        assert_eq!(host_cpus(&[7], &[]), Vec::<u32>::new());
    }
}
