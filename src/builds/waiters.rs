//! Waiter sharing: the builds in flight, keyed by what makes two builds the same
//! ([`BuildKey`]), and the clients' [`Waiter`]s on them. Every waiter gets the log from the
//! moment it joined and the same outcome; when the last waiter goes, the build is killed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use nixbuild_core::serve::BuildStatus;
use nixbuild_core::store_path::StorePath;
use tokio::sync::{broadcast, watch};

use nixbuild_core::scheduler::BuildId;

use super::sharing::BuildKey;
use super::{Outcome, LOG_TARGET};
use crate::store::{LogCheckpoint, LogWriter};

/// Why a build was cancelled when its last waiter went (the words after "cancelled").
pub(super) const NO_WAITER: &str = ": no client waits for it";

/// Most log chunks a slow waiter may fall behind before it skips some.
const LOG_BACKLOG: usize = 1024;

/// What a [`Waiter`] sees next.
#[derive(Debug)]
pub enum WaitEvent {
    /// Builder output (or a `nixbuild:` line from the service), for the client's stderr.
    Log(Bytes),
    /// The end; nothing follows.
    Done(Arc<Outcome>),
}

/// A client's interest in a build. Dropping it withdraws the interest; when the last waiter
/// of a running build is dropped, the build is killed.
#[derive(Debug)]
pub struct Waiter {
    state: WaiterState,
}

#[derive(Debug)]
enum WaiterState {
    /// Decided without a build; `None` once taken.
    Ready(Option<Arc<Outcome>>),
    /// Waiting for a build (possibly shared).
    Shared {
        inflight: Arc<InFlight>,
        build: Arc<Shared>,
        log: broadcast::Receiver<Bytes>,
        done: watch::Receiver<Option<Arc<Outcome>>>,
        /// Messages for this waiter alone, sent before the build's log.
        notes: VecDeque<Bytes>,
    },
}

impl Waiter {
    /// A waiter whose outcome is decided without a build.
    pub(super) fn ready(outcome: Outcome) -> Waiter {
        Waiter {
            state: WaiterState::Ready(Some(Arc::new(outcome))),
        }
    }

    /// The next log chunk, or the outcome. After [`WaitEvent::Done`] it must not be called
    /// again (it would wait forever).
    pub async fn next(&mut self) -> WaitEvent {
        match &mut self.state {
            WaiterState::Ready(outcome) => match outcome.take() {
                Some(o) => WaitEvent::Done(o),
                None => std::future::pending().await,
            },
            WaiterState::Shared {
                log, done, notes, ..
            } => {
                if let Some(note) = notes.pop_front() {
                    return WaitEvent::Log(note);
                }
                loop {
                    // The log is complete once the outcome is out: drain what is left of it.
                    let outcome = done.borrow_and_update().clone();
                    if let Some(outcome) = outcome {
                        return match log.try_recv() {
                            Ok(chunk) => WaitEvent::Log(chunk),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => skipped(n),
                            Err(_) => WaitEvent::Done(outcome),
                        };
                    }
                    tokio::select! {
                        biased;
                        received = log.recv() => match received {
                            Ok(chunk) => return WaitEvent::Log(chunk),
                            Err(broadcast::error::RecvError::Lagged(n)) => return skipped(n),
                            // Only when the build is gone; its outcome decides.
                            Err(broadcast::error::RecvError::Closed) => {
                                if done.changed().await.is_err() && done.borrow().is_none() {
                                    return WaitEvent::Done(Arc::new(Outcome::without_build(
                                        BuildStatus::MiscFailure,
                                        "nixbuild: the build ended without an outcome".into(),
                                    )));
                                }
                            }
                        },
                        // Either way the next round looks at the outcome.
                        _ = done.changed() => {}
                    }
                }
            }
        }
    }
}

/// The log line of a waiter that fell `n` chunks behind.
fn skipped(n: u64) -> WaitEvent {
    WaitEvent::Log(skipped_line(n))
}

/// The log line of a reader that fell `n` chunks behind.
fn skipped_line(n: u64) -> Bytes {
    Bytes::from(format!(
        "nixbuild: {n} chunks of log skipped (the client read too slowly)\n"
    ))
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let WaiterState::Shared {
            inflight, build, ..
        } = &self.state
        {
            let mut inflight = inflight.lock();
            let mut waiters = build.lock_waiters();
            *waiters -= 1;
            if *waiters == 0 && build.done.borrow().is_none() {
                tracing::info!(target: LOG_TARGET, drv = %build.drv_path, "no client waits for the build any more: killing it");
                let _ = build.cancel.send(true);
                InFlight::remove_if_mine(&mut inflight, build);
            }
        }
    }
}

/// Where a build in flight stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Phase {
    /// Not yet in the scheduler's queue: being prepared, or waiting for a place among its
    /// account's running builds (the line its clients were shown, once they were).
    Waiting(Option<String>),
    /// In the scheduler's queue.
    Queued(BuildId),
    /// Granted cores and memory at `started_ms`: its builder runs, or its outputs are
    /// being checked. `usage`: where its CPU time and peak memory are read, once its cgroup
    /// is made.
    Running {
        started_ms: u64,
        cpus: Vec<u32>,
        memory: u64,
        usage: Option<crate::cgroup::UsageFiles>,
        /// The machine of the fleet it runs on; `None`: this host.
        machine: Option<String>,
    },
}

/// A build in flight, shared by its waiters.
#[derive(Debug)]
pub(super) struct Shared {
    key: BuildKey,
    /// The id users know it by ([`crate::store::Store::next_build_id`]).
    pub(super) id: u64,
    pub(super) drv_path: StorePath,
    /// When it was submitted (ms since the epoch).
    pub(super) submitted_ms: u64,
    phase: Mutex<Phase>,
    /// Why it was cancelled, when `nixbuild cancel` did it.
    cancelled_by: Mutex<Option<String>>,
    /// How many [`Waiter`]s hold it; changed with the in-flight map locked.
    waiters: Mutex<usize>,
    /// The accounts of every waiter that joined: the outputs are registered for each.
    accounts: Mutex<BTreeSet<String>>,
    /// The build's log, for every waiter.
    pub(super) log: broadcast::Sender<Bytes>,
    /// The same log, on its way to the store with the build's record.
    stored_log: Mutex<Option<LogWriter>>,
    /// The outcome, once known.
    pub(super) done: watch::Sender<Option<Arc<Outcome>>>,
    /// Set to `true` when the last waiter went.
    pub(super) cancel: watch::Sender<bool>,
}

impl Shared {
    /// Build `id` of `drv_path`, submitted at `submitted_ms`, with no waiter yet, its log
    /// also written to `stored_log`.
    pub(super) fn new(
        key: BuildKey,
        id: u64,
        drv_path: StorePath,
        submitted_ms: u64,
        stored_log: Option<LogWriter>,
    ) -> Shared {
        Shared {
            key,
            id,
            drv_path,
            submitted_ms,
            phase: Mutex::new(Phase::Waiting(None)),
            cancelled_by: Mutex::new(None),
            waiters: Mutex::new(0),
            accounts: Mutex::new(BTreeSet::new()),
            log: broadcast::channel(LOG_BACKLOG).0,
            stored_log: Mutex::new(stored_log),
            done: watch::channel(None).0,
            cancel: watch::channel(false).0,
        }
    }

    /// A `nixbuild:` line for every waiter's log.
    pub(super) fn note(&self, line: String) {
        self.send_log(Bytes::from(line));
    }

    /// A piece of the log, for every waiter and the stored log. A stored log that fails to
    /// write is dropped (with a warning): the build goes on. Both under the stored log's
    /// lock, so that a reader following the log ([`Shared::follow`]) misses nothing and
    /// sees nothing twice.
    pub(super) fn send_log(&self, chunk: Bytes) {
        let mut stored = self.lock_stored_log();
        if let Some(log) = stored.as_mut() {
            if let Err(e) = log.write(&chunk) {
                tracing::warn!(target: LOG_TARGET, drv = %self.drv_path, "the build's log is not stored: {e}");
                *stored = None;
            }
        }
        let _ = self.log.send(chunk);
    }

    fn lock_stored_log(&self) -> MutexGuard<'_, Option<LogWriter>> {
        self.stored_log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log so far (where the stored log stands, if it is stored) and the rest as it
    /// comes, with the outcome at the end.
    pub(super) fn follow(&self) -> LogFollow {
        let mut stored = self.lock_stored_log();
        let so_far = stored.as_mut().and_then(|log| log.checkpoint().ok());
        LogFollow {
            so_far,
            log: self.log.subscribe(),
            done: self.done.subscribe(),
        }
    }

    /// Where the build stands.
    pub(super) fn phase(&self) -> Phase {
        self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Moves the build on to `phase`.
    pub(super) fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// Where the running build's CPU time and peak memory are read, once its cgroup is made.
    pub(super) fn set_usage(&self, files: crate::cgroup::UsageFiles) {
        if let Phase::Running { usage, .. } =
            &mut *self.phase.lock().unwrap_or_else(|e| e.into_inner())
        {
            *usage = Some(files);
        }
    }

    /// Cancels the build, for the reason given (the words after "cancelled" in its
    /// message).
    pub(super) fn cancel_because(&self, why: String) {
        *self.cancelled_by.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        let _ = self.cancel.send(true);
    }

    /// Why the build was cancelled: [`Shared::cancel_because`]'s reason, or its last waiter
    /// leaving.
    pub(super) fn cancel_reason(&self) -> String {
        self.cancelled_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| NO_WAITER.to_owned())
    }

    /// The stored log, for the build's record.
    pub(super) fn take_stored_log(&self) -> Option<LogWriter> {
        self.lock_stored_log().take()
    }

    /// The accounts of every waiter that joined.
    pub(super) fn accounts(&self) -> BTreeSet<String> {
        self.accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The accounts of every waiter that joined other than `account`.
    pub(super) fn sharers(&self, account: &str) -> Vec<String> {
        self.accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|a| *a != account)
            .cloned()
            .collect()
    }

    fn lock_waiters(&self) -> MutexGuard<'_, usize> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new waiter for `account`, which gets `notes` before the build's log.
    pub(super) fn subscribe(
        self: &Arc<Self>,
        inflight: &Arc<InFlight>,
        account: &str,
        notes: VecDeque<Bytes>,
    ) -> Waiter {
        *self.lock_waiters() += 1;
        self.accounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(account.to_owned());
        Waiter {
            state: WaiterState::Shared {
                inflight: inflight.clone(),
                build: self.clone(),
                log: self.log.subscribe(),
                done: self.done.subscribe(),
                notes,
            },
        }
    }
}

/// A reader of a build's log: what was logged before it came, then the rest as it comes.
#[derive(Debug)]
pub struct LogFollow {
    /// The stored log up to the moment the reader came (`None` when the log is not stored).
    pub so_far: Option<LogCheckpoint>,
    log: broadcast::Receiver<Bytes>,
    done: watch::Receiver<Option<Arc<Outcome>>>,
}

impl LogFollow {
    /// The next piece of the log, or `None` at the end of the build (its outcome in
    /// [`LogFollow::outcome`]).
    pub async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.done.borrow_and_update().is_some() {
                return match self.log.try_recv() {
                    Ok(chunk) => Some(chunk),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => Some(skipped_line(n)),
                    Err(_) => None,
                };
            }
            tokio::select! {
                biased;
                received = self.log.recv() => match received {
                    Ok(chunk) => return Some(chunk),
                    Err(broadcast::error::RecvError::Lagged(n)) => return Some(skipped_line(n)),
                    Err(broadcast::error::RecvError::Closed) => {
                        if self.done.changed().await.is_err() {
                            return None;
                        }
                    }
                },
                changed = self.done.changed() => if changed.is_err() {
                    return None;
                },
            }
        }
    }

    /// The build's outcome, once [`LogFollow::next`] returned `None`.
    pub fn outcome(&self) -> Option<Arc<Outcome>> {
        self.done.borrow().clone()
    }
}

/// The builds in flight by key: whoever asks for the same build joins it.
#[derive(Debug, Default)]
pub(super) struct InFlight(Mutex<HashMap<BuildKey, Arc<Shared>>>);

impl InFlight {
    /// The map, locked.
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<BuildKey, Arc<Shared>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `build` out of the in-flight map, if it is still the build there under its key:
    /// no one joins it from now on.
    pub(super) fn leave(&self, build: &Shared) {
        Self::remove_if_mine(&mut self.lock(), build);
    }

    pub(super) fn remove_if_mine(inflight: &mut HashMap<BuildKey, Arc<Shared>>, build: &Shared) {
        if inflight
            .get(&build.key)
            .is_some_and(|b| std::ptr::eq(Arc::as_ptr(b), build))
        {
            inflight.remove(&build.key);
        }
    }
}
