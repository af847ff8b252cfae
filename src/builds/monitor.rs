//! The watcher of running builds: one task for all of them, which wakes every
//! [`CHECK_EVERY`] while any build runs and stops a build (through its [`Watch`]) when
//!
//! - free space or inodes on the state directory's file system are below the reserve
//!   ([`Store::check_disk_reserve`]): the build whose scratch directory holds the most (bytes
//!   or inodes, whichever ran short) is stopped, the newest on a tie; then nothing else is
//!   stopped for the disk until that build's directory is gone, so that one overrun costs one
//!   build when it alone filled the disk;
//! - its cgroup kept refusing forks at the process limit: the count of refused forks grew at
//!   each of [`FORK_BOMB_CHECKS`] checks in a row (a fork bomb; a build that only touches its
//!   limit once goes on, as under Nix).
//!
//! Without the watcher a build could fill the disk under the store (writes in `/build`,
//! `/tmp` and its outputs land on the state directory's file system) or fork at its limit
//! until its time runs out.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::cgroup::ForkRefusals;
use crate::store::{Store, StoreError};

/// How often the watcher looks, while builds run.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Checks in a row with more refused forks after which a build counts as a fork bomb.
pub const FORK_BOMB_CHECKS: u32 = 4;

/// Why the watcher stopped a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overrun {
    /// The state directory's file system went below its reserve.
    Disk {
        /// The reserve check's message (free space or inodes, and the reserve).
        reason: String,
        /// What the build's scratch directory held when it was chosen.
        held: Usage,
        /// Whether inodes, not bytes, ran short.
        inodes: bool,
    },
    /// The build kept forking at its process limit.
    Processes {
        /// The limit (`pids_per_build`).
        limit: u64,
    },
}

impl std::fmt::Display for Overrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overrun::Disk {
                reason,
                held,
                inodes,
            } => {
                write!(
                    f,
                    "{reason} (disk_reserve in [store] of the server's configuration); "
                )?;
                if *inodes {
                    write!(f, "its build directory held {} files", held.inodes)
                } else {
                    write!(f, "its build directory held {} bytes", held.bytes)
                }
            }
            Overrun::Processes { limit } => write!(
                f,
                "it kept hitting its limit of {limit} processes (pids_per_build in [capacity] \
                 of the server's configuration)"
            ),
        }
    }
}

/// Space used under a directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of the blocks allocated.
    pub bytes: u64,
    /// Files, directories and symlinks.
    pub inodes: u64,
}

/// What is allocated under `dir` on its own file system (never following symlinks or
/// crossing into a mount). Unreadable entries count as nothing.
pub fn usage(dir: &Path) -> Usage {
    let mut total = Usage::default();
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return total;
    };
    let dev = root.dev();
    let mut stack = vec![(dir.to_owned(), root)];
    while let Some((path, meta)) = stack.pop() {
        total.bytes = total
            .bytes
            .saturating_add(meta.blocks().saturating_mul(512));
        total.inodes += 1;
        if !meta.is_dir() {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let child = entry.path();
            match std::fs::symlink_metadata(&child) {
                Ok(m) if m.dev() == dev => stack.push((child, m)),
                _ => {}
            }
        }
    }
    total
}

/// The watcher; cheap to clone.
#[derive(Debug, Clone)]
pub struct Monitor {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Store,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    builds: BTreeMap<u64, Watched>,
    /// Whether the task runs (it ends when no build is left).
    running: bool,
}

#[derive(Debug)]
struct Watched {
    scratch: PathBuf,
    forks: Option<ForkRefusals>,
    refused: u64,
    refusing_checks: u32,
    /// `None` once the build was told to stop.
    stop: Option<oneshot::Sender<Overrun>>,
}

/// One build's registration with the [`Monitor`]; dropping it ends the watch. Keep it until
/// the build's scratch directory is removed: until then a build stopped for the disk still
/// holds its space, and no other build is stopped for it.
#[derive(Debug)]
pub struct Watch {
    shared: Arc<Shared>,
    id: u64,
    stopped: oneshot::Receiver<Overrun>,
}

impl Watch {
    /// Resolves when the watcher stops the build, with the reason; never otherwise.
    pub async fn stopped(&mut self) -> Overrun {
        match (&mut self.stopped).await {
            Ok(overrun) => overrun,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.lock().builds.remove(&self.id);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Monitor {
    /// The watcher of builds of `store`'s state directory, against its disk reserve.
    pub fn new(store: Store) -> Monitor {
        Monitor {
            shared: Arc::new(Shared {
                store,
                state: Mutex::default(),
            }),
        }
    }

    /// Watches build `id` (ids grow with each build), whose scratch directory is `scratch`
    /// and whose forks refused at its limit `forks` counts. Starts the watcher's task when it
    /// is not running; must be called inside the tokio runtime.
    pub fn watch(&self, id: u64, scratch: PathBuf, forks: Option<ForkRefusals>) -> Watch {
        let (tx, rx) = oneshot::channel();
        let mut state = self.shared.lock();
        state.builds.insert(
            id,
            Watched {
                scratch,
                forks,
                refused: 0,
                refusing_checks: 0,
                stop: Some(tx),
            },
        );
        if !state.running {
            state.running = true;
            let shared = self.shared.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(CHECK_EVERY).await;
                    let s = shared.clone();
                    match tokio::task::spawn_blocking(move || s.check()).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            tracing::error!("the build watcher failed: {e}");
                            shared.lock().running = false;
                            return;
                        }
                    }
                }
            });
        }
        Watch {
            shared: self.shared.clone(),
            id,
            stopped: rx,
        }
    }
}

impl Shared {
    /// One round of checks; `false` when no build is left (the task then ends).
    fn check(&self) -> bool {
        let (forks, stopping, scratches) = {
            let mut state = self.lock();
            if state.builds.is_empty() {
                state.running = false;
                return false;
            }
            let forks: Vec<(u64, ForkRefusals)> = state
                .builds
                .iter()
                .filter(|(_, b)| b.stop.is_some())
                .filter_map(|(id, b)| Some((*id, b.forks.clone()?)))
                .collect();
            let stopping = state.builds.values().any(|b| b.stop.is_none());
            let scratches: Vec<(u64, PathBuf)> = state
                .builds
                .iter()
                .filter(|(_, b)| b.stop.is_some())
                .map(|(id, b)| (*id, b.scratch.clone()))
                .collect();
            (forks, stopping, scratches)
        };
        for (id, probe) in forks {
            let Ok(count) = probe.count() else { continue };
            let mut state = self.lock();
            let Some(build) = state.builds.get_mut(&id) else {
                continue;
            };
            if count > build.refused {
                build.refusing_checks += 1;
            } else {
                build.refusing_checks = 0;
            }
            build.refused = count;
            if build.refusing_checks >= FORK_BOMB_CHECKS {
                tracing::warn!(
                    build = id,
                    limit = probe.limit,
                    "stopping a build that keeps forking at its process limit"
                );
                stop(build, Overrun::Processes { limit: probe.limit });
            }
        }
        if !stopping && self.store.limits().disk_reserve > 0 {
            self.check_disk(scratches);
        }
        true
    }

    /// Stops the build holding the most when the disk is below its reserve.
    fn check_disk(&self, scratches: Vec<(u64, PathBuf)>) {
        let (reason, inodes) = match self.store.check_disk_reserve() {
            Ok(()) => return,
            Err(e @ StoreError::DiskReserve { .. }) => (e.to_string(), false),
            Err(e @ StoreError::InodeReserve { .. }) => (e.to_string(), true),
            Err(e) => {
                tracing::warn!("the build watcher cannot check the free disk space: {e}");
                return;
            }
        };
        let victim = scratches
            .into_iter()
            .map(|(id, dir)| (usage(&dir), id))
            .max_by_key(|(held, id)| (if inodes { held.inodes } else { held.bytes }, *id));
        let Some((held, id)) = victim else { return };
        let mut state = self.lock();
        if let Some(build) = state.builds.get_mut(&id) {
            tracing::warn!(
                build = id,
                bytes = held.bytes,
                files = held.inodes,
                "{reason}: stopping the build holding the most"
            );
            stop(
                build,
                Overrun::Disk {
                    reason,
                    held,
                    inodes,
                },
            );
        }
    }
}

fn stop(build: &mut Watched, overrun: Overrun) {
    if let Some(tx) = build.stop.take() {
        let _ = tx.send(overrun);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_blocks_and_entries_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let empty = usage(dir.path());
        assert_eq!(empty.inodes, 1);
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("l")).unwrap();
        let u = usage(dir.path());
        assert_eq!(u.inodes, 4);
        assert!(u.bytes >= 1 << 20, "{u:?}");
        // /usr behind the symlink is far larger than what was written.
        assert!(u.bytes < 4 << 20, "{u:?}");
        assert_eq!(usage(&dir.path().join("missing")), Usage::default());
    }

    #[tokio::test]
    async fn below_the_reserve_the_largest_build_is_stopped_and_then_the_next_once_it_is_gone() {
        let state = tempfile::tempdir().unwrap();
        // A reserve no disk has: always below it.
        let store = Store::open(
            state.path(),
            crate::store::StoreLimits {
                max_nar_size: 1 << 20,
                disk_reserve: u64::MAX,
            },
        )
        .unwrap();
        let monitor = Monitor::new(store);
        let (small, big) = (state.path().join("small"), state.path().join("big"));
        std::fs::create_dir(&small).unwrap();
        std::fs::create_dir(&big).unwrap();
        std::fs::write(big.join("f"), vec![1u8; 1 << 20]).unwrap();
        // The small one is newer: size decides before age.
        let mut big_watch = monitor.watch(1, big, None);
        let mut small_watch = monitor.watch(2, small, None);
        let bound = Duration::from_secs(30);
        match tokio::time::timeout(bound, big_watch.stopped())
            .await
            .unwrap()
        {
            Overrun::Disk { held, inodes, .. } => {
                assert!(held.bytes >= 1 << 20 && !inodes, "{held:?}");
            }
            other => panic!("{other:?}"),
        }
        // While the stopped build still holds its directory, no other is stopped.
        let early = tokio::time::timeout(CHECK_EVERY * 4, small_watch.stopped()).await;
        assert!(early.is_err(), "{early:?}");
        drop(big_watch);
        let next = tokio::time::timeout(bound, small_watch.stopped())
            .await
            .unwrap();
        assert!(matches!(next, Overrun::Disk { .. }), "{next:?}");
    }

    #[test]
    fn messages_name_the_setting() {
        let disk = Overrun::Disk {
            reason: "not enough disk space in /s: 5 bytes free, the reserve is 9 bytes".into(),
            held: Usage {
                bytes: 7,
                inodes: 2,
            },
            inodes: false,
        };
        let text = disk.to_string();
        assert!(text.contains("disk_reserve in [store]"), "{text}");
        assert!(text.ends_with("held 7 bytes"), "{text}");
        let text = Overrun::Processes { limit: 64 }.to_string();
        assert!(
            text.contains("limit of 64 processes (pids_per_build"),
            "{text}"
        );
    }
}
