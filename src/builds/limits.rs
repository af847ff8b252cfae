//! How many builds each account may have at once: queued or running
//! (`[limits] max_builds_per_account`), and handed to the scheduler, that is running or
//! waiting for cores (`[limits] max_running_builds_per_account`); `[accounts.NAME]
//! max_builds` and `max_running_builds` override them for one account. Replaced on reload.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use nixbuild_core::account::{AccountCounts, AccountSlot};
use tokio::sync::Notify;

use super::waiters::Shared;
use crate::config::Config;

/// The limits in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildLimits {
    max_builds: usize,
    max_running: Option<usize>,
    /// Per account: its own `max_builds` and `max_running_builds`.
    accounts: BTreeMap<String, (Option<usize>, Option<usize>)>,
}

impl BuildLimits {
    /// The limits `config` sets.
    pub fn new(config: &Config) -> BuildLimits {
        BuildLimits {
            max_builds: config.limits.max_builds_per_account,
            max_running: config.limits.max_running_builds_per_account,
            accounts: config
                .accounts
                .iter()
                .map(|(name, a)| (name.clone(), (a.max_builds, a.max_running_builds)))
                .collect(),
        }
    }

    /// `account`'s most builds queued or running, and the setting it comes from.
    pub fn builds_of(&self, account: &str) -> (usize, String) {
        match self.accounts.get(account).and_then(|a| a.0) {
            Some(max) => (max, format!("max_builds in [accounts.\"{account}\"]")),
            None => (self.max_builds, "max_builds_per_account in [limits]".into()),
        }
    }

    /// `account`'s most builds handed to the scheduler at once, and the setting; `None`: no
    /// limit but the scheduler's fair share.
    pub fn running_of(&self, account: &str) -> Option<(usize, String)> {
        match self.accounts.get(account).and_then(|a| a.1) {
            // Named without the account: the line goes to every waiter of a shared build.
            Some(max) => Some((max, "max_running_builds in its [accounts] entry".to_owned())),
            None => self
                .max_running
                .map(|max| (max, "max_running_builds_per_account in [limits]".to_owned())),
        }
    }
}

/// The builds each account has handed to the scheduler, and the wake-up of those waiting for
/// a place among them.
#[derive(Debug, Default)]
pub(super) struct Running {
    counts: Arc<AccountCounts>,
    freed: Arc<Notify>,
    limits: RwLock<Arc<BuildLimits>>,
}

/// A place among an account's running builds, given back (waking the waiting) when dropped.
pub(super) struct RunningPlace {
    slot: Option<AccountSlot>,
    freed: Arc<Notify>,
}

impl Drop for RunningPlace {
    fn drop(&mut self) {
        if self.slot.take().is_some() {
            self.freed.notify_waiters();
        }
    }
}

impl Running {
    /// With `limits` in force.
    pub(super) fn new(limits: BuildLimits) -> Running {
        Running {
            limits: RwLock::new(Arc::new(limits)),
            ..Running::default()
        }
    }

    /// The limits in force.
    pub(super) fn limits(&self) -> Arc<BuildLimits> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `limits` in force (for builds submitted from now on, and waiting ones).
    pub(super) fn set_limits(&self, limits: BuildLimits) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(limits);
        self.freed.notify_waiters();
    }

    /// Waits for a place among `account`'s running builds, telling `build`'s waiters once
    /// why it waits; `None` when the build is cancelled meanwhile.
    pub(super) async fn place(&self, build: &Shared, account: &str) -> Option<RunningPlace> {
        let mut cancel = build.cancel.subscribe();
        let mut told = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let Some((max, setting)) = self.limits().running_of(account) else {
                return Some(RunningPlace {
                    slot: None,
                    freed: self.freed.clone(),
                });
            };
            if let Some(slot) = self.counts.acquire(account, max) {
                return Some(RunningPlace {
                    slot: Some(slot),
                    freed: self.freed.clone(),
                });
            }
            if !told {
                let line = format!(
                    "waiting: the account that asked first has {max} builds running or waiting \
                     for cores, its most ({setting} of the server's configuration)"
                );
                build.note(format!("nixbuild: {line}\n"));
                build.set_phase(super::waiters::Phase::Waiting(Some(line)));
                told = true;
            }
            tokio::select! {
                () = freed => {}
                _ = cancel.wait_for(|c| *c) => return None,
            }
        }
    }
}
