//! The builds in flight as the operations interface sees them: every build from its
//! submission until its record is stored, by id, with where it stands; cancelling one; and
//! reading its log as it grows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nixbuild_core::store_path::StorePath;

use super::waiters::{LogFollow, Phase, Shared};
use super::BuildService;

/// Every build in flight by id, from its submission until its record is stored (a build
/// leaves the sharing map earlier, when its outputs are being registered).
#[derive(Debug, Default)]
pub(super) struct Live(Mutex<BTreeMap<u64, Arc<Shared>>>);

impl Live {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Shared>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `build` until the returned entry is dropped (when its record is stored, or its
    /// task ends any other way, a panic included).
    pub(super) fn enter(self: &Arc<Self>, build: &Arc<Shared>) -> LiveEntry {
        self.lock().insert(build.id, build.clone());
        LiveEntry {
            live: self.clone(),
            id: build.id,
        }
    }

    fn get(&self, id: u64) -> Option<Arc<Shared>> {
        self.lock().get(&id).cloned()
    }
}

/// A build's place in [`Live`], given up when dropped.
pub(super) struct LiveEntry {
    live: Arc<Live>,
    id: u64,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

/// A build in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBuild {
    /// Its id.
    pub id: u64,
    /// The derivation.
    pub drv: StorePath,
    /// The accounts waiting for it (several for a shared build).
    pub accounts: Vec<String>,
    /// When it was submitted (ms since the epoch).
    pub submitted_ms: u64,
    /// Where it stands.
    pub state: LiveState,
}

impl LiveBuild {
    /// Whether it was granted its place and runs.
    pub fn is_running(&self) -> bool {
        matches!(self.state, LiveState::Running { .. })
    }
}

/// Where a build in flight stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveState {
    /// Not started: what it waits for, and where it stands in the queue, in the words its
    /// clients are shown (`waiting for 4 cores (position 3 of 7; 2 builds running)`).
    Waiting {
        /// The reason.
        reason: String,
    },
    /// Running since `started_ms` on the cores and memory granted.
    Running {
        /// When it was granted its place (ms since the epoch).
        started_ms: u64,
        /// The host CPUs granted.
        cpus: Vec<u32>,
        /// The memory granted, in bytes.
        memory: u64,
        /// CPU time used so far, in microseconds, when its cgroup accounts it.
        cpu_us: Option<u64>,
        /// The most memory it held so far, in bytes, when the kernel records it.
        peak_memory: Option<u64>,
        /// The machine of the fleet it runs on (`None`: this host, whose CPUs and memory
        /// the other fields are).
        machine: Option<String>,
    },
    /// Its outcome is known; its record is being stored.
    Ended,
}

/// How loaded the build service is, for the metrics and `nixbuild status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Builds in flight not started yet.
    pub waiting: u64,
    /// Builds running.
    pub running: u64,
    /// Cores granted to running builds.
    pub cores_granted: u64,
    /// Memory granted to running builds, in bytes.
    pub memory_granted: u64,
    /// Cores the scheduler hands out.
    pub cores: u64,
    /// Memory the scheduler hands out, in bytes.
    pub memory: u64,
}

/// Why cancelling a build was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    /// No such build in flight for the caller.
    #[error("no build {0} is queued or running for this account")]
    NotFound(u64),
    /// Other accounts wait for it too.
    #[error(
        "build {0} is shared with another account's request of the same derivation; only an \
         admin may cancel it"
    )]
    Shared(u64),
    /// It has ended already.
    #[error("build {0} has ended already")]
    Ended(u64),
}

/// Whether `account` waits for `build` (every build counts for `None`, an admin's view).
fn waits_for(build: &Shared, account: Option<&str>) -> bool {
    account.is_none_or(|a| build.accounts().contains(a))
}

impl BuildService {
    /// The builds in flight that `account` waits for (every build with `None`), by id.
    pub fn live_builds(&self, account: Option<&str>) -> Vec<LiveBuild> {
        let builds: Vec<Arc<Shared>> = self.inner.live.lock().values().cloned().collect();
        builds
            .iter()
            .filter(|b| waits_for(b, account))
            .map(|b| self.view(b))
            .collect()
    }

    /// Build `id` if it is in flight and `account` waits for it (any account with `None`).
    pub fn live_build(&self, account: Option<&str>, id: u64) -> Option<LiveBuild> {
        self.visible(account, id).map(|b| self.view(&b))
    }

    /// Build `id` in flight, if `account` waits for it (any build with `None`).
    fn visible(&self, account: Option<&str>, id: u64) -> Option<Arc<Shared>> {
        self.inner.live.get(id).filter(|b| waits_for(b, account))
    }

    fn view(&self, build: &Shared) -> LiveBuild {
        let state = if build.done.borrow().is_some() {
            LiveState::Ended
        } else {
            match build.phase() {
                Phase::Waiting(line) => LiveState::Waiting {
                    reason: line.unwrap_or_else(|| "being prepared".to_owned()),
                },
                Phase::Queued(id) => LiveState::Waiting {
                    reason: self
                        .inner
                        .placement
                        .status(id)
                        .unwrap_or_else(|| "starting".to_owned()),
                },
                Phase::Running {
                    started_ms,
                    cpus,
                    memory,
                    usage,
                    machine,
                } => LiveState::Running {
                    started_ms,
                    cpus,
                    memory,
                    cpu_us: usage.as_ref().and_then(|u| u.cpu_usage_us().ok().flatten()),
                    peak_memory: usage.as_ref().and_then(|u| u.peak_memory().ok().flatten()),
                    machine,
                },
            }
        };
        LiveBuild {
            id: build.id,
            drv: build.drv_path.clone(),
            accounts: build.accounts().into_iter().collect(),
            submitted_ms: build.submitted_ms,
            state,
        }
    }

    /// Cancels build `id` for `account` (an admin with `None`, who may cancel any):
    /// `by` says who, for the message its clients get. An account may not cancel a build
    /// that another account's request shares.
    pub fn cancel(&self, account: Option<&str>, id: u64, by: &str) -> Result<(), CancelError> {
        let build = self.inner.live.get(id).ok_or(CancelError::NotFound(id))?;
        // Under the in-flight lock, which joining takes: no account joins between the check
        // and the cancel, and none joins the cancelled build afterwards.
        let mut inflight = self.inner.inflight.lock();
        let accounts = build.accounts();
        if let Some(account) = account {
            if !accounts.contains(account) {
                return Err(CancelError::NotFound(id));
            }
            if accounts.len() > 1 {
                return Err(CancelError::Shared(id));
            }
        }
        if build.done.borrow().is_some() {
            return Err(CancelError::Ended(id));
        }
        super::waiters::InFlight::remove_if_mine(&mut inflight, &build);
        tracing::info!(target: super::LOG_TARGET, drv = %build.drv_path, by, "cancelling on request");
        build.cancel_because(format!(" by {by} (nixbuild cancel {id})"));
        Ok(())
    }

    /// Follows the log of build `id` if it is in flight and `account` waits for it (any
    /// build with `None`).
    pub fn follow(&self, account: Option<&str>, id: u64) -> Option<LogFollow> {
        self.visible(account, id).map(|b| b.follow())
    }

    /// `account`'s most builds queued or running, and most running (`None`: no limit but
    /// the fair share).
    pub fn limits_of(&self, account: &str) -> (usize, Option<usize>) {
        let limits = self.inner.running.limits();
        (
            limits.builds_of(account).0,
            limits.running_of(account).map(|(max, _)| max),
        )
    }

    /// How loaded the service is now.
    pub fn load(&self) -> Load {
        let (cores, memory) = self.inner.placement.capacity();
        let mut load = Load {
            cores,
            memory,
            ..Load::default()
        };
        for build in self.inner.live.lock().values() {
            if build.done.borrow().is_some() {
                continue;
            }
            match build.phase() {
                Phase::Running {
                    cpus,
                    memory,
                    machine,
                    ..
                } => {
                    load.running += 1;
                    // What this host granted: a machine's build holds none of it.
                    if machine.is_none() {
                        load.cores_granted += cpus.len() as u64;
                        load.memory_granted += memory;
                    }
                }
                Phase::Waiting(_) | Phase::Queued(_) => load.waiting += 1,
            }
        }
        load
    }
}
