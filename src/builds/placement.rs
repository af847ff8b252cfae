//! Where and when builds run: the scheduler of `nixbuild_core` over this host (machine 0)
//! and the machines of the fleet ([`Placement::sync_fleet`]), and the per-build cgroups that
//! hold each local build to the cores and memory it was granted.
//!
//! A build asks with [`Placement::submit`] and gets a [`Ticket`]; the scheduler decides after
//! every event (arrival, completion, cancellation, a machine's change) and hands each started
//! build its [`Grant`] through the ticket, or the refusal of a build that no machine can run
//! any more. Dropping a ticket that has not started withdraws the build; dropping a
//! [`Running`] slot (after the build's processes are gone) frees its cores.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nixbuild_core::scheduler::{BuildId, BuildSpec, Machine, MachineId, Refusal, Scheduler, Start};
use tokio::sync::oneshot;

use crate::cgroup::{check_limits, BuildCgroup, BuildLimits, CgroupError, Cgroups};
use crate::config::Config;
use crate::fleet::Remote;
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

/// The feature only this host offers, required by builds that must run here (those with
/// floating content-addressed outputs, whose final paths this host's checks compute).
pub const THIS_HOST: &str = "nixbuild-this-host";

/// What a started build was given.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Host CPU numbers (none for a build on another machine).
    pub cpus: Vec<u32>,
    /// Memory in bytes.
    pub memory: u64,
    /// The machine of the fleet it runs on; `None`: this host.
    pub remote: Option<Arc<Remote>>,
}

/// A machine of the fleet as the scheduler should see it now ([`Placement::sync_fleet`]).
#[derive(Debug, Clone)]
pub struct FleetMachine {
    /// Whether builds may start there (it is not down).
    pub available: bool,
    /// The machine: what it builds (`spec`) and how to reach it. The fleet keeps the same
    /// one while its line stays, so it is the machine's identity across re-reads.
    pub remote: Arc<Remote>,
}

/// The scheduler and the cgroups of one daemon.
#[derive(Debug)]
pub struct Placement {
    state: Mutex<State>,
    epoch: Instant,
    cgroups: Cgroups,
    pids_per_build: u64,
    /// This host as a machine (machine 0), with its job limit when it builds.
    local: Machine,
}

/// A started build, or the refusal of one that no machine can run any more.
type Decision = Result<Start, Refusal>;

#[derive(Debug)]
struct State {
    scheduler: Scheduler,
    /// Waiting builds: where to send their start.
    waiting: HashMap<BuildId, oneshot::Sender<Decision>>,
    /// The fleet's machines by scheduler index (index 0, this host, is `None`); a machine
    /// removed from the fleet stays, drained (no jobs), so that indices stay put.
    machines: Vec<Option<Arc<Remote>>>,
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
        let mut machine = config.capacity.machine(host);
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
        machine.supported_features.push(THIS_HOST.to_owned());
        let scheduler = Scheduler::new(config.scheduler.scheduler_config(), vec![machine.clone()])?;
        Ok(Placement {
            state: Mutex::new(State {
                scheduler,
                waiting: HashMap::new(),
                machines: vec![None],
            }),
            epoch: Instant::now(),
            cgroups,
            pids_per_build: config.capacity.pids_per_build,
            local: machine,
        })
    }

    /// Gives the scheduler the fleet as it is now: machines new to it are added (a changed
    /// line is a new machine), ones down made unavailable (what waits for them keeps
    /// waiting), ones no longer listed drained (their running builds finish, nothing new
    /// starts there); this host builds only with `build_locally`. Waiting builds that no
    /// machine can run any more are refused. Cheap when nothing changed.
    pub fn sync_fleet(&self, fleet: &[FleetMachine], build_locally: bool) {
        let mut state = self.lock();
        let now = self.now();
        let mut refused = Vec::new();
        let local_jobs = if build_locally {
            self.local.max_jobs
        } else {
            0
        };
        if state.scheduler.machines()[0].max_jobs != local_jobs {
            let spec = Machine {
                max_jobs: local_jobs,
                ..self.local.clone()
            };
            refused.extend(
                state
                    .scheduler
                    .set_capacity(MachineId(0), spec, now)
                    .unwrap_or_default(),
            );
        }
        let State {
            scheduler,
            machines,
            ..
        } = &mut *state;
        let mut listed = vec![false; machines.len()];
        for m in fleet {
            let known = machines
                .iter()
                .position(|k| k.as_ref().is_some_and(|k| Arc::ptr_eq(k, &m.remote)));
            let index = match known {
                Some(i) => i,
                None => match scheduler.add_machine(m.remote.spec.clone(), now) {
                    Ok(id) => {
                        machines.push(Some(m.remote.clone()));
                        listed.push(false);
                        id.0 as usize
                    }
                    Err(e) => {
                        tracing::error!(machine = %m.remote.name(), "cannot schedule on: {e}");
                        continue;
                    }
                },
            };
            listed[index] = true;
            let _ = scheduler.set_available(MachineId(index as u32), m.available, now);
        }
        // Machines no longer listed: drained.
        for (index, known) in machines.iter().enumerate() {
            let id = MachineId(index as u32);
            let Some(remote) = known.as_ref().filter(|_| !listed[index]) else {
                continue;
            };
            if scheduler.machines()[index].max_jobs != 0 {
                tracing::info!(machine = %remote.name(), "drained: no new builds go there");
                let drained = Machine {
                    max_jobs: 0,
                    ..remote.spec.clone()
                };
                refused.extend(scheduler.set_capacity(id, drained, now).unwrap_or_default());
            }
        }
        for (id, refusal) in refused {
            if let Some(tx) = state.waiting.remove(&id) {
                let _ = tx.send(Err(refusal));
            }
        }
        self.dispatch(&mut state, now);
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
                .is_some_and(|tx| tx.send(Ok(start)).is_ok());
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

    /// The cores and memory (bytes) this host's builds are given.
    pub fn capacity(&self) -> (u64, u64) {
        (u64::from(self.local.cores), self.local.memory)
    }

    /// The fleet's machine a running build was placed on (for its status line).
    fn remote_of(&self, machine: MachineId) -> Option<Arc<Remote>> {
        self.lock()
            .machines
            .get(machine.0 as usize)
            .cloned()
            .flatten()
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
    start: oneshot::Receiver<Decision>,
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
    /// build's processes are gone, or the refusal of a build that no machine can run any
    /// more (the fleet changed while it waited).
    pub async fn wait(
        mut self,
        mut status: impl FnMut(String),
    ) -> Result<(Grant, Running), Refusal> {
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
        // Started, refused or gone: the scheduler no longer has it waiting.
        self.started = true;
        let grant = match start {
            Ok(Ok(start)) => match self.placement.remote_of(start.machine) {
                Some(remote) => Grant {
                    cpus: Vec::new(),
                    memory: start.memory,
                    remote: Some(remote),
                },
                None => Grant {
                    cpus: host_cpus(&start.cores, &self.placement.cgroups.report().cpus),
                    memory: start.memory,
                    remote: None,
                },
            },
            Ok(Err(refusal)) => return Err(refusal),
            // The placement drops a waiting build's sender only when it delivered the start
            // or the ticket is gone; nothing granted, should it ever happen.
            Err(_) => Grant {
                cpus: Vec::new(),
                memory: 0,
                remote: None,
            },
        };
        let running = Running {
            placement: self.placement.clone(),
            id: self.id,
        };
        Ok((grant, running))
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
