//! The build service: runs the derivations of BuildDerivation and BuildPaths in the sandbox of
//! `nixbuild-sandbox`, streams their logs, enforces the time and log limits, and registers
//! their outputs for the account.
//!
//! A build goes through these steps:
//!
//! 1. **Prepare** ([`prepare`], blocking): check the derivation (name, fixed-output path), find
//!    its outputs already valid for the account (all valid: `AlreadyValid` at once), and look up
//!    the input closure as the account sees it (an input the account cannot see fails the build
//!    with a message saying so).
//! 2. **Share**: identical in-flight builds are shared ([`sharing`]): identical in the whole
//!    derivation as sent and in the paths and NAR hashes of the input closure. Every waiter
//!    gets the log from the moment it joined and the same outcome, and each account the
//!    outputs this build produced; the first requester's limits apply; when the last waiter
//!    goes, the build is killed.
//! 3. **Run** (a task per build): take a host uid from the configured range, make the build's
//!    scratch directory `<state>/builds/<n>`, plan the sandbox, and run the helper process
//!    (`nixbuild_sandbox::helper_command`, a re-execution of this executable) with the plan on
//!    its stdin. Its stdout is the builder's log, forwarded as it comes; the silence and total
//!    time limits and the log size limit kill the helper (and with it the whole sandbox), and
//!    so does the [`monitor`] when the disk falls below its reserve or the build keeps forking
//!    at its process limit. No build starts below the disk reserve.
//! 4. **Finish**: on exit status 0, [`outputs::process_outputs`] checks, canonicalises and
//!    registers the outputs; then the scratch directory is removed and the uid released.

pub mod monitor;
pub mod outputs;
pub mod placement;
pub mod sharing;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use nixbuild_core::derivation::{BasicDerivation, Derivation, DerivationOutput};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::serve::{BuildOptions, BuildStatus};
use nixbuild_core::store_path::StorePath;
use nixbuild_sandbox::{
    BuildRequest, HelperReport, HostSetup, InputKind, InputPath, ResolverFiles,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{BuildsConfig, Config};
use crate::failpoint::{failpoint, failpoint_async};
use crate::store::{InputObject, Store, StoreError};
use monitor::{Monitor, Overrun, Watch};
use outputs::{ExpectedOutput, OutputCheckSpec, OutputLimits, OutputsRequest};
use placement::{Grant, Placement, PlacementError, Running};
use sharing::BuildKey;

/// Largest `.drv` file BuildPaths reads.
const MAX_DRV_SIZE: u64 = 16 << 20;

/// Most log chunks a slow waiter may fall behind before it skips some.
const LOG_BACKLOG: usize = 1024;

/// Log lines quoted in the message of a failed build, as Nix's `log-lines` default.
const TAIL_LINES: usize = 10;

/// Bytes of the helper's own stderr kept (its diagnostics and report).
const MAX_HELPER_STDERR: usize = 64 << 10;

/// How long the rest of the log may take to arrive once the helper has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the build service itself failed (not the build): such failures end the build as
/// `MiscFailure` with this message.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file system step on the host failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sandbox helper could not be started or talked to.
    #[error("sandbox helper: {0}")]
    Helper(io::Error),
    /// The scheduler or the cgroups could not be set up.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A build's cgroup could not be made, joined or removed.
    #[error("cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// A blocking task panicked.
    #[error("internal error in a build task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BuildError + 'a {
    move |source| BuildError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// One derivation to build for one account.
#[derive(Debug, Clone)]
pub struct BuildJob {
    /// The account the build is for: it sees the account's paths and its outputs are
    /// registered for it.
    pub account: String,
    /// The `.drv` path (for BuildDerivation as the client names it; not validated).
    pub drv_path: StorePath,
    /// The derivation, with `inputSrcs` holding its whole input closure.
    pub drv: BasicDerivation,
    /// The client's limits.
    pub options: BuildOptions,
}

/// How a build ended: what a BuildResult (or a BuildPaths answer) is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The BuildResult status.
    pub status: BuildStatus,
    /// `""` on success; otherwise what the client shows.
    pub message: String,
    /// 1 when the builder ran, 0 otherwise.
    pub times_built: u32,
    /// Unix seconds when the builder started (0 if it did not run).
    pub start_time: u64,
    /// Unix seconds when it stopped.
    pub stop_time: u64,
    /// Every output by name, on success.
    pub outputs: BTreeMap<String, StorePath>,
}

impl Outcome {
    /// An outcome without a build: `AlreadyValid`, or a refusal before the builder ran.
    fn without_build(status: BuildStatus, message: String) -> Outcome {
        Outcome {
            status,
            message,
            times_built: 0,
            start_time: 0,
            stop_time: 0,
            outputs: BTreeMap::new(),
        }
    }
}

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
        service: Arc<Inner>,
        build: Arc<Shared>,
        log: broadcast::Receiver<Bytes>,
        done: watch::Receiver<Option<Arc<Outcome>>>,
        /// Messages for this waiter alone, sent before the build's log.
        notes: VecDeque<Bytes>,
    },
}

impl Waiter {
    fn ready(outcome: Outcome) -> Waiter {
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
    WaitEvent::Log(Bytes::from(format!(
        "nixbuild: {n} chunks of log skipped (the client read too slowly)\n"
    )))
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let WaiterState::Shared { service, build, .. } = &self.state {
            let mut inflight = service.lock_inflight();
            let mut waiters = build.lock_waiters();
            *waiters -= 1;
            if *waiters == 0 && build.done.borrow().is_none() {
                tracing::info!(drv = %build.drv_path, "no client waits for the build any more: killing it");
                let _ = build.cancel.send(true);
                Inner::remove_if_mine(&mut inflight, build);
            }
        }
    }
}

/// A build in flight, shared by its waiters.
#[derive(Debug)]
struct Shared {
    key: BuildKey,
    drv_path: StorePath,
    /// How many [`Waiter`]s hold it; changed with the in-flight map locked.
    waiters: Mutex<usize>,
    /// The accounts of every waiter that joined: the outputs are registered for each.
    accounts: Mutex<BTreeSet<String>>,
    log: broadcast::Sender<Bytes>,
    done: watch::Sender<Option<Arc<Outcome>>>,
    /// Set to `true` when the last waiter went.
    cancel: watch::Sender<bool>,
}

impl Shared {
    /// A `nixbuild:` line for every waiter's log.
    fn note(&self, line: String) {
        let _ = self.log.send(Bytes::from(line));
    }

    fn lock_waiters(&self) -> MutexGuard<'_, usize> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn subscribe(
        self: &Arc<Self>,
        service: &Arc<Inner>,
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
                service: service.clone(),
                build: self.clone(),
                log: self.log.subscribe(),
                done: self.done.subscribe(),
                notes,
            },
        }
    }
}

/// What the host offers every build, found once at start.
#[derive(Debug, Clone)]
struct SandboxHost {
    has_dev_kvm: bool,
    resolver: ResolverFiles,
    impure_env: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl SandboxHost {
    fn detect() -> SandboxHost {
        use std::os::unix::ffi::OsStrExt;
        let canonical = |p: &str| std::fs::canonicalize(p).ok();
        SandboxHost {
            has_dev_kvm: Path::new("/dev/kvm").exists(),
            resolver: ResolverFiles {
                resolv_conf: canonical("/etc/resolv.conf"),
                services: canonical("/etc/services"),
                hosts: canonical("/etc/hosts"),
                ca_bundle: canonical("/etc/ssl/certs/ca-certificates.crt"),
            },
            impure_env: std::env::vars_os()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }
}

/// The host uids of the configured range not used by a running build.
#[derive(Debug)]
struct UidPool {
    free: Mutex<Vec<u32>>,
    available: Arc<Semaphore>,
}

/// A uid taken from the pool, returned when dropped.
struct UidLease<'a> {
    uid: u32,
    pool: &'a UidPool,
    _permit: OwnedSemaphorePermit,
}

impl UidPool {
    fn new(base: u32, count: u32) -> UidPool {
        UidPool {
            free: Mutex::new((base..base + count).rev().collect()),
            available: Arc::new(Semaphore::new(count as usize)),
        }
    }

    async fn take(&self) -> UidLease<'_> {
        // The semaphore is never closed.
        #[allow(clippy::expect_used)]
        let permit = self
            .available
            .clone()
            .acquire_owned()
            .await
            .expect("the uid semaphore is never closed");
        let uid = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            // A permit guarantees a free uid.
            #[allow(clippy::expect_used)]
            free.pop().expect("a permit guarantees a free uid")
        };
        UidLease {
            uid,
            pool: self,
            _permit: permit,
        }
    }
}

impl Drop for UidLease<'_> {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.uid);
    }
}

/// The build service of one daemon. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BuildService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    builds_dir: PathBuf,
    helper_exe: PathBuf,
    config: BuildsConfig,
    host: SandboxHost,
    placement: Arc<Placement>,
    /// Stops running builds that overrun the disk reserve or fork at their process limit.
    monitor: Monitor,
    /// Builds queued or running per account, and the most each may have.
    account_builds: Arc<nixbuild_core::account::AccountCounts>,
    max_builds_per_account: usize,
    uids: UidPool,
    inflight: Mutex<HashMap<BuildKey, Arc<Shared>>>,
    next_id: AtomicU64,
    /// How many build tasks have not ended yet (outcome given, leftovers removed).
    active: watch::Sender<usize>,
}

/// Counts a build task as active until dropped (at its end, or when it is aborted).
struct ActiveBuild(Arc<Inner>);

impl ActiveBuild {
    fn new(inner: &Arc<Inner>) -> ActiveBuild {
        inner.active.send_modify(|n| *n += 1);
        ActiveBuild(inner.clone())
    }
}

impl Drop for ActiveBuild {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n -= 1);
    }
}

impl Inner {
    fn lock_inflight(&self) -> MutexGuard<'_, HashMap<BuildKey, Arc<Shared>>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `build` out of the in-flight map, if it is still the build there under its key:
    /// no one joins it from now on.
    fn leave_inflight(&self, build: &Shared) {
        Self::remove_if_mine(&mut self.lock_inflight(), build);
    }

    fn remove_if_mine(inflight: &mut HashMap<BuildKey, Arc<Shared>>, build: &Shared) {
        if inflight
            .get(&build.key)
            .is_some_and(|b| std::ptr::eq(Arc::as_ptr(b), build))
        {
            inflight.remove(&build.key);
        }
    }
}

/// The name of the daemon's cgroup (under its own): one per state directory, so that the
/// daemons of different state directories never touch each other's builds.
pub fn cgroup_name(state_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let digest = Hash::compute(HashAlgo::Sha256, dir.as_os_str().as_bytes());
    format!("nixbuild-{}", &digest.to_base16()[..12])
}

/// The directory of the builds' scratch directories.
pub fn builds_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("builds")
}

impl BuildService {
    /// The build service for `store` in `state_dir`. Removes what builds of an earlier daemon
    /// left in `<state>/builds` and in its cgroups (call it only from the daemon, at start),
    /// and refuses to start when a `[capacity]` limit cannot be enforced (unless allowed).
    /// `helper_exe` is the executable re-executed in helper mode, normally `/proc/self/exe`.
    pub fn new(
        store: Store,
        state_dir: &Path,
        config: &Config,
        helper_exe: PathBuf,
    ) -> Result<BuildService, BuildError> {
        use std::os::unix::fs::PermissionsExt;
        let placement = Placement::new(config, &cgroup_name(state_dir))?;
        let dir = builds_dir(state_dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(io_err("remove leftovers of earlier builds in", &dir))?;
        }
        std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
        Ok(BuildService {
            inner: Arc::new(Inner {
                monitor: Monitor::new(store.clone()),
                store,
                builds_dir: dir,
                helper_exe,
                config: config.builds.clone(),
                host: SandboxHost::detect(),
                placement: Arc::new(placement),
                account_builds: Arc::default(),
                max_builds_per_account: config.limits.max_builds_per_account,
                uids: UidPool::new(config.builds.uid_base, config.builds.uid_count),
                inflight: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                active: watch::channel(0).0,
            }),
        })
    }

    /// Starts `job` (or joins the identical build in flight) and returns the caller's
    /// [`Waiter`]. Problems found before the builder runs (a bad derivation, an input the
    /// account cannot see) come back as the waiter's outcome.
    pub async fn submit(&self, job: BuildJob) -> Waiter {
        let store = self.inner.store.clone();
        let prepared = {
            let job = job.clone();
            tokio::task::spawn_blocking(move || prepare(&store, &job)).await
        };
        let prepared = match prepared {
            Ok(Ok(p)) => p,
            Ok(Err(outcome)) => return Waiter::ready(outcome),
            Err(e) => {
                return Waiter::ready(Outcome::without_build(
                    BuildStatus::MiscFailure,
                    format!("nixbuild: {}", BuildError::Task(e)),
                ))
            }
        };
        let mut notes = VecDeque::new();
        if job.options.keep_failed {
            notes.push_back(Bytes::from_static(
                b"nixbuild: keep-failed is not honoured on a shared server: a failed build's \
                  directory is always removed\n",
            ));
        }
        let mut inflight = self.inner.lock_inflight();
        if let Some(build) = inflight.get(&prepared.key) {
            tracing::info!(account = %job.account, drv = %job.drv_path, "joining the same build in flight");
            notes.push_back(Bytes::from(format!(
                "nixbuild: joining the build of '{}' already in progress\n",
                job.drv_path
            )));
            return build.subscribe(&self.inner, &job.account, notes);
        }
        let max = self.inner.max_builds_per_account;
        let Some(slot) = self.inner.account_builds.acquire(&job.account, max) else {
            return Waiter::ready(Outcome::without_build(
                BuildStatus::MiscFailure,
                format!(
                    "account {} already has {max} builds queued or running, the most this \
                     server allows (max_builds_per_account in [limits] of the server's \
                     configuration)",
                    job.account
                ),
            ));
        };
        let (log, _) = broadcast::channel(LOG_BACKLOG);
        let build = Arc::new(Shared {
            key: prepared.key,
            drv_path: job.drv_path.clone(),
            waiters: Mutex::new(0),
            accounts: Mutex::new(BTreeSet::new()),
            log,
            done: watch::channel(None).0,
            cancel: watch::channel(false).0,
        });
        inflight.insert(prepared.key, build.clone());
        let waiter = build.subscribe(&self.inner, &job.account, notes);
        drop(inflight);
        let inner = self.inner.clone();
        let active = ActiveBuild::new(&inner);
        tokio::spawn(async move {
            // The account's build slot, held until the build is over.
            let _slot = slot;
            let _active = active;
            let (outcome, leftovers) = run(&inner, &build, &job, prepared).await;
            tracing::info!(
                account = %job.account,
                drv = %job.drv_path,
                status = ?outcome.status,
                "build finished: {}",
                if outcome.message.is_empty() { "ok" } else { &outcome.message }
            );
            inner.leave_inflight(&build);
            build.done.send_replace(Some(Arc::new(outcome)));
            // The waiters have the outcome; what the build leaves goes now, off their path.
            if let Some(leftovers) = leftovers {
                leftovers.remove().await;
            }
        });
        waiter
    }

    /// Waits until every build task has ended, its outcome given and what it left (sandbox,
    /// cgroup, scratch directory) removed. For the daemon's shutdown: once no session is
    /// left, every build still running has lost its last waiter and is being killed.
    pub async fn drain(&self) {
        let mut active = self.inner.active.subscribe();
        // The sender lives in `inner`, which this holds: it cannot close.
        let _ = active.wait_for(|n| *n == 0).await;
    }

    /// The job that builds the `.drv` at `drv_path` (valid for `account`), as BuildPaths
    /// asks: its output paths are verified, and every input derivation's outputs must already
    /// be valid for the account (this server builds one derivation, not a graph).
    pub async fn job_for_drv(
        &self,
        account: &str,
        drv_path: &StorePath,
        options: BuildOptions,
    ) -> Result<BuildJob, String> {
        let store = self.inner.store.clone();
        let (account, drv_path) = (account.to_owned(), drv_path.clone());
        tokio::task::spawn_blocking(move || drv_job(&store, &account, &drv_path, options))
            .await
            .map_err(|e| BuildError::Task(e).to_string())?
    }
}

/// What [`prepare`] found out.
#[derive(Debug)]
struct Prepared {
    key: BuildKey,
    outputs: BTreeMap<String, StorePath>,
    inputs: Vec<InputObject>,
}

/// Checks `job` and looks up what it needs; `Err` is the outcome when no build is needed or
/// possible.
fn prepare(store: &Store, job: &BuildJob) -> Result<Prepared, Outcome> {
    let refuse = |status, message: String| Outcome::without_build(status, message);
    let drv = &job.drv;
    let name = drv.name().map_err(|e| {
        refuse(
            BuildStatus::InputRejected,
            format!("invalid derivation '{}': {e}", job.drv_path),
        )
    })?;
    drv.verify_fixed_output(name).map_err(|e| {
        refuse(
            BuildStatus::InputRejected,
            format!("invalid derivation '{}': {e}", job.drv_path),
        )
    })?;
    let mut outputs = BTreeMap::new();
    for (output, out) in &drv.outputs {
        match out {
            DerivationOutput::InputAddressed(path) | DerivationOutput::Fixed { path, .. } => {
                outputs.insert(output.clone(), path.clone());
            }
            _ => {
                return Err(refuse(
                    BuildStatus::InputRejected,
                    format!(
                        "derivation '{}': output '{output}' has no path in advance; \
                         content-addressed derivations are not supported by this server",
                        job.drv_path
                    ),
                ))
            }
        }
    }
    let internal = |e: StoreError| {
        refuse(
            BuildStatus::MiscFailure,
            format!("nixbuild: building '{}': {e}", job.drv_path),
        )
    };
    let wanted: BTreeSet<StorePath> = outputs.values().cloned().collect();
    let valid = store
        .query_valid_paths(&job.account, &wanted)
        .map_err(internal)?;
    if valid.len() == wanted.len() {
        let mut o = refuse(BuildStatus::AlreadyValid, String::new());
        o.outputs = outputs;
        return Err(o);
    }
    let closure = store
        .query_closure(&job.account, &drv.input_srcs, false)
        .map_err(|e| match e {
            StoreError::NotValid { path, .. } => refuse(
                BuildStatus::MiscFailure,
                format!(
                    "cannot build '{}': its input '{path}' is not valid on this server for \
                     this account (copy the inputs first)",
                    job.drv_path
                ),
            ),
            e => internal(e),
        })?;
    let inputs = store
        .input_objects(&job.account, &closure)
        .map_err(internal)?;
    let key = BuildKey::new(
        &job.drv_path,
        drv,
        inputs.iter().map(|i| (&i.path, &i.nar_hash)),
    );
    Ok(Prepared {
        key,
        outputs,
        inputs,
    })
}

/// Reads, checks and resolves the `.drv` at `drv_path` for BuildPaths.
fn drv_job(
    store: &Store,
    account: &str,
    drv_path: &StorePath,
    options: BuildOptions,
) -> Result<BuildJob, String> {
    let mut memo = HashMap::new();
    let drv = read_drv(store, account, drv_path)?;
    let name = drv.basic.name().map_err(|e| format!("'{drv_path}': {e}"))?;
    for input in drv.input_drvs.keys() {
        modulo_of(store, account, input, &mut memo, 0)?;
    }
    drv.verify_output_paths(name, |p| memo.get(p).copied())
        .map_err(|e| format!("derivation '{drv_path}' is not valid: {e}"))?;
    let mut input_srcs = drv.basic.input_srcs.clone();
    for (input, wanted) in &drv.input_drvs {
        let input_drv = read_drv(store, account, input)?;
        for output in wanted {
            let path = input_drv
                .basic
                .outputs
                .get(output)
                .and_then(DerivationOutput::path)
                .ok_or_else(|| format!("'{input}' has no output '{output}' with a known path"))?;
            input_srcs.insert(path.clone());
        }
    }
    let missing = {
        let valid = store
            .query_valid_paths(account, &input_srcs)
            .map_err(|e| e.to_string())?;
        input_srcs.difference(&valid).next().cloned()
    };
    if let Some(path) = missing {
        return Err(format!(
            "cannot build '{drv_path}': its input '{path}' is not valid on this server; nixbuild \
             builds a derivation only when its inputs are present (build or copy them first)"
        ));
    }
    let closure = store
        .query_closure(account, &input_srcs, false)
        .map_err(|e| e.to_string())?;
    let mut basic = drv.basic;
    basic.input_srcs = closure;
    Ok(BuildJob {
        account: account.to_owned(),
        drv_path: drv_path.clone(),
        drv: basic,
        options,
    })
}

fn read_drv(store: &Store, account: &str, path: &StorePath) -> Result<Derivation, String> {
    if !path.is_derivation() {
        return Err(format!("'{path}' is not a derivation"));
    }
    let text = store
        .read_small_file(account, path, MAX_DRV_SIZE)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("'{path}' is not a derivation file"))?;
    Derivation::from_aterm(&text).map_err(|e| format!("'{path}' is not a valid derivation: {e}"))
}

/// The unmasked `hashDerivationModulo` of the `.drv` at `path`, recursively, memoised.
fn modulo_of(
    store: &Store,
    account: &str,
    path: &StorePath,
    memo: &mut HashMap<StorePath, Hash>,
    depth: usize,
) -> Result<Hash, String> {
    /// Deeper derivation graphs than any real one; stops a crafted cycle of `.drv` files
    /// that the store would never hold anyway (a cycle cannot be content-addressed).
    const MAX_DEPTH: usize = 4096;
    if let Some(h) = memo.get(path) {
        return Ok(*h);
    }
    if depth > MAX_DEPTH {
        return Err(format!(
            "derivation graph deeper than {MAX_DEPTH} at '{path}'"
        ));
    }
    let drv = read_drv(store, account, path)?;
    for input in drv.input_drvs.keys() {
        modulo_of(store, account, input, memo, depth + 1)?;
    }
    let h = drv
        .hash_modulo(false, |p| memo.get(p).copied())
        .map_err(|e| format!("'{path}': {e}"))?;
    memo.insert(path.clone(), h);
    Ok(h)
}

/// The smaller of two limits where 0 means none; `None` for no limit.
fn limit(client: u64, server: u64) -> Option<u64> {
    match (client, server) {
        (0, 0) => None,
        (0, s) => Some(s),
        (c, 0) => Some(c),
        (c, s) => Some(c.min(s)),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why the log loop (or the outputs' processing after it) stopped.
enum Stop {
    Exited(std::process::ExitStatus),
    Silent(u64),
    TimedOut(u64),
    LogLimit(u64),
    Cancelled,
    /// The watcher stopped it (disk reserve, fork bomb).
    Overrun(Overrun),
}

impl Stop {
    /// The status and message of a build stopped by one of its limits or because no client
    /// waits for it; `None` for the other stops.
    fn limit_failure(&self, drv_path: &StorePath) -> Option<(BuildStatus, String)> {
        Some(match self {
            Stop::Silent(secs) => (
                BuildStatus::TimedOut,
                format!("building of '{drv_path}' timed out after {secs} seconds of silence"),
            ),
            Stop::TimedOut(secs) => (
                BuildStatus::TimedOut,
                format!("building of '{drv_path}' timed out after {secs} seconds"),
            ),
            Stop::LogLimit(max) => (
                BuildStatus::LogLimitExceeded,
                format!(
                    "building of '{drv_path}' killed after writing more than {max} bytes of \
                     log output"
                ),
            ),
            Stop::Cancelled => (
                BuildStatus::MiscFailure,
                format!("building of '{drv_path}' was cancelled: no client waits for it"),
            ),
            Stop::Exited(_) | Stop::Overrun(_) => return None,
        })
    }
}

/// The last lines of a log, for the message of a failed build.
#[derive(Default)]
struct Tail {
    lines: VecDeque<Vec<u8>>,
    partial: Vec<u8>,
}

impl Tail {
    /// Longest line kept.
    const MAX_LINE: usize = 1024;

    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(i) = memchr::memchr(b'\n', bytes) {
            self.add(&bytes[..i]);
            let line = std::mem::take(&mut self.partial);
            self.lines.push_back(line);
            if self.lines.len() > TAIL_LINES {
                self.lines.pop_front();
            }
            bytes = &bytes[i + 1..];
        }
        self.add(bytes);
    }

    fn add(&mut self, bytes: &[u8]) {
        let room = Self::MAX_LINE.saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// `;\nlast N log lines:\n> ...` as Nix appends it, or nothing for an empty log.
    fn render(mut self) -> String {
        if !self.partial.is_empty() {
            self.lines.push_back(std::mem::take(&mut self.partial));
            if self.lines.len() > TAIL_LINES {
                self.lines.pop_front();
            }
        }
        if self.lines.is_empty() {
            return String::new();
        }
        let mut s = format!(";\nlast {} log lines:", self.lines.len());
        for line in &self.lines {
            s.push_str("\n> ");
            s.push_str(&String::from_utf8_lossy(line));
        }
        s
    }
}

/// What a build leaves once its outcome is known: its cgroup, its scratch directory, and
/// the scheduler's slot and the uid, held until both are gone.
struct Leftovers<'a> {
    scratch: PathBuf,
    cgroup: Option<crate::cgroup::BuildCgroup>,
    /// Watched until the directory is gone (the watcher waits for a stopped build's space).
    _watch: Option<Watch>,
    _running: Running,
    _uid: UidLease<'a>,
}

impl Leftovers<'_> {
    /// Kills what is left in the cgroup, removes it and the scratch directory (one blocking
    /// task), then frees the slot and the uid.
    async fn remove(self) {
        let Leftovers {
            scratch,
            cgroup,
            _watch,
            _running,
            _uid,
        } = self;
        let dir = scratch.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let cgroup = cgroup.map(|c| c.remove());
            let dir = match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
            (cgroup, dir)
        })
        .await;
        match removed {
            Ok((cgroup, dir)) => {
                if let Some(Err(e)) = cgroup {
                    tracing::error!("cannot remove a build's cgroup: {e}");
                }
                if let Err(e) = dir {
                    tracing::error!(dir = %scratch.display(), "cannot remove a build's directory: {e}");
                }
            }
            Err(e) => {
                tracing::error!(dir = %scratch.display(), "cannot remove a build's cgroup and directory: {e}")
            }
        }
    }
}

/// Runs a prepared build to its outcome, and returns what it left, for the caller to remove
/// once it has passed the outcome on.
async fn run<'a>(
    inner: &'a Arc<Inner>,
    build: &Shared,
    job: &BuildJob,
    prepared: Prepared,
) -> (Outcome, Option<Leftovers<'a>>) {
    let refused = |message: String| Outcome::without_build(BuildStatus::MiscFailure, message);
    let spec = match build_spec(&inner.config, job) {
        Ok(spec) => spec,
        Err(msg) => {
            return (
                refused(format!("nixbuild cannot build '{}': {msg}", job.drv_path)),
                None,
            )
        }
    };
    let ticket = match inner.placement.submit(spec) {
        Ok(t) => {
            tracing::info!(account = %job.account, drv = %job.drv_path, "queued");
            t
        }
        Err(msg) => {
            return (
                refused(format!(
                    "nixbuild cannot build '{}' on this server: {msg}",
                    job.drv_path
                )),
                None,
            )
        }
    };
    let mut cancel = build.cancel.subscribe();
    let waited = tokio::select! {
        placed = ticket.wait(|line| build.note(format!("nixbuild: {line}\n"))) => Some(placed),
        _ = cancel.wait_for(|c| *c) => None,
    };
    let Some((grant, running)) = waited else {
        return (
            refused(format!(
                "building of '{}' was cancelled while it waited: no client waits for it",
                job.drv_path
            )),
            None,
        );
    };
    build.note(format!(
        "nixbuild: building '{}' on {} cores ({}) with {} MiB of memory\n",
        job.drv_path,
        grant.cpus.len(),
        crate::cgroup::format_cpu_list(&grant.cpus),
        grant.memory >> 20
    ));
    let uid = inner.uids.take().await;
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let scratch = inner.builds_dir.join(id.to_string());
    let (mut cgroup, mut watch) = (None, None);
    let outcome = match run_in(
        inner,
        build,
        job,
        &prepared,
        (uid.uid, &grant, id),
        (&scratch, &mut cgroup, &mut watch),
    )
    .await
    {
        Ok(o) => o,
        Err(e) => Outcome::without_build(
            BuildStatus::MiscFailure,
            format!("nixbuild: building '{}': {e}", job.drv_path),
        ),
    };
    let leftovers = Leftovers {
        scratch,
        cgroup,
        _watch: watch,
        _running: running,
        _uid: uid,
    };
    (outcome, Some(leftovers))
}

async fn run_in(
    inner: &Arc<Inner>,
    build: &Shared,
    job: &BuildJob,
    prepared: &Prepared,
    (uid, grant, id): (u32, &Grant, u64),
    (scratch, cgroup_slot, watch_slot): (
        &Path,
        &mut Option<crate::cgroup::BuildCgroup>,
        &mut Option<Watch>,
    ),
) -> Result<Outcome, BuildError> {
    let drv = &job.drv;
    // No new build below the disk reserve: it would only be stopped.
    let store = inner.store.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || store.check_disk_reserve()).await? {
        return Ok(Outcome::without_build(
            BuildStatus::MiscFailure,
            format!(
                "nixbuild: not starting the build of '{}': {e} (disk_reserve in [store] of the \
                 server's configuration)",
                job.drv_path
            ),
        ));
    }
    // One blocking task for the file-system set-up: the inputs' kinds, the scratch
    // directory and the cgroup (the caller removes the last two, whatever happens here).
    let (inputs, cgroup) = {
        let objects = prepared.inputs.clone();
        let placement = inner.placement.clone();
        let grant = grant.clone();
        let scratch = scratch.to_owned();
        tokio::task::spawn_blocking(move || -> Result<_, BuildError> {
            use std::os::unix::fs::DirBuilderExt;
            let inputs = input_paths(&objects)?;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&scratch)
                .map_err(io_err("create", &scratch))?;
            let cgroup = placement.cgroup(&format!("build-{id}"), &grant)?;
            failpoint!("build-scratch-created");
            Ok((inputs, cgroup))
        })
        .await??
    };
    let cgroup: &crate::cgroup::BuildCgroup = cgroup_slot.insert(cgroup);
    let watch = watch_slot.insert(inner.monitor.watch(
        id,
        scratch.to_owned(),
        cgroup.fork_refusals(),
    ));
    let request = BuildRequest {
        builder: drv.builder.clone(),
        args: drv.args.clone(),
        env: drv.env.clone(),
        system: String::from_utf8_lossy(&drv.platform).into_owned(),
        inputs,
        outputs: prepared
            .outputs
            .iter()
            .map(|(name, path)| (name.clone(), path.to_absolute()))
            .collect(),
        fixed_output: drv.fixed_output().is_some(),
        required_features: drv
            .env
            .get(&b"requiredSystemFeatures"[..])
            .map(|v| {
                String::from_utf8_lossy(v)
                    .split_ascii_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        cores: u32::try_from(grant.cpus.len()).unwrap_or(u32::MAX),
    };
    let host = HostSetup {
        host_system: "x86_64-linux".into(),
        build_uid: uid,
        build_gid: uid,
        scratch_dir: scratch.to_owned(),
        objects_dir: inner.store.objects_dir().to_owned(),
        has_dev_kvm: inner.host.has_dev_kvm,
        resolver: inner.host.resolver.clone(),
        impure_env: inner.host.impure_env.clone(),
        dev_shm_size: inner.config.dev_shm_size.clone(),
    };
    let plan = match nixbuild_sandbox::plan(&request, &host) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Outcome::without_build(
                BuildStatus::InputRejected,
                format!("nixbuild cannot build '{}': {e}", job.drv_path),
            ))
        }
    };
    let mut cmd =
        tokio::process::Command::from(nixbuild_sandbox::helper_command(&inner.helper_exe));
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(BuildError::Helper)?;
    // Into the cgroup before the helper reads its plan: the sandbox inherits it.
    if let Some(pid) = child.id() {
        cgroup.add_pid(pid)?;
    }
    let start_time = unix_now();
    tracing::info!(account = %job.account, drv = %job.drv_path, uid, dir = %scratch.display(), "building");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&nixbuild_sandbox::encode_plan(&plan))
            .await
            .map_err(BuildError::Helper)?;
    }
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| BuildError::Helper(io::Error::other("no stdout pipe")))?;
    let stderr = child.stderr.take();
    let diagnostics = tokio::spawn(async move {
        let mut kept = Vec::new();
        if let Some(mut stderr) = stderr {
            let mut buf = vec![0; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > MAX_HELPER_STDERR {
                    kept.drain(..kept.len() - MAX_HELPER_STDERR);
                }
            }
        }
        kept
    });

    let options = &job.options;
    let config = &inner.config;
    let silence = limit(options.max_silent_time.into(), config.max_silent_time);
    let total = limit(options.build_timeout.into(), config.build_timeout);
    let max_log = limit(options.max_log_size, config.max_log_size);
    let deadline = total.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let mut cancel = build.cancel.subscribe();
    let mut tail = Tail::default();
    let mut log_bytes = 0u64;
    let mut buf = BytesMut::new();
    let mut log_open = true;
    let stop = loop {
        buf.reserve(64 << 10);
        tokio::select! {
            read = stdout.read_buf(&mut buf), if log_open => match read {
                Ok(0) | Err(_) => log_open = false,
                Ok(n) => {
                    log_bytes += n as u64;
                    if let Some(max) = max_log.filter(|&m| log_bytes > m) {
                        break Stop::LogLimit(max);
                    }
                    let chunk = buf.split().freeze();
                    tail.push(&chunk);
                    let _ = build.log.send(chunk);
                    failpoint_async!("build-builder-running", log_bytes == n as u64);
                }
            },
            status = child.wait() => match status {
                Ok(status) => break Stop::Exited(status),
                Err(e) => return Err(BuildError::Helper(e)),
            },
            () = sleep_for(silence) => break Stop::Silent(silence.unwrap_or(0)),
            () = sleep_until(deadline) => break Stop::TimedOut(total.unwrap_or(0)),
            changed = cancel.changed() => if changed.is_err() || *cancel.borrow() {
                break Stop::Cancelled;
            },
            overrun = watch.stopped() => break Stop::Overrun(overrun),
        }
    };
    let status = match stop {
        Stop::Exited(status) => status,
        _ => {
            let _ = cgroup.kill_all();
            // SIGKILL to the helper; the sandbox's init dies with it (PR_SET_PDEATHSIG), and
            // every other process of the build with the init.
            let _ = child.kill().await;
            child.wait().await.map_err(BuildError::Helper)?
        }
    };
    // The builder's last words may still be in the pipe.
    if matches!(stop, Stop::Exited(_)) && log_open {
        let drain = async {
            loop {
                buf.reserve(64 << 10);
                match stdout.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let chunk = buf.split().freeze();
                        log_bytes += chunk.len() as u64;
                        tail.push(&chunk);
                        let _ = build.log.send(chunk);
                    }
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    }
    let diagnostics = diagnostics.await?;
    let stop_time = unix_now();
    let drv_path = &job.drv_path;
    let failed = |status, message: String| Outcome {
        status,
        message,
        times_built: 1,
        start_time,
        stop_time,
        outputs: BTreeMap::new(),
    };
    let report = nixbuild_sandbox::parse_report(&diagnostics, status);
    let oom = cgroup.oom_killed().unwrap_or(false);
    // A builder that failed after forks were refused (a fork bomb whose shell gave up) says so.
    let pids_note = cgroup
        .fork_refusals()
        .and_then(|f| Some((f.limit, f.count().ok()?)))
        .filter(|&(_, refused)| refused > 0)
        .map_or(String::new(), |(limit, refused)| {
            format!(
                " after hitting its limit of {limit} processes ({refused} forks refused; \
                 pids_per_build in [capacity] of the server's configuration)"
            )
        });
    let memory_limit = cgroup.memory_limit();
    let fixed = drv.fixed_output().is_some();
    let builder_failed = if fixed {
        BuildStatus::TransientFailure
    } else {
        BuildStatus::PermanentFailure
    };
    if let Some((status, message)) = stop.limit_failure(drv_path) {
        return Ok(failed(status, message));
    }
    Ok(match stop {
        // Like out of memory: the same build would overrun again.
        Stop::Overrun(overrun) => failed(
            BuildStatus::PermanentFailure,
            format!(
                "builder for '{drv_path}' was stopped: {overrun}{}",
                tail.render()
            ),
        ),
        // As docs/design.md says: a permanent failure, which clients do not retry.
        _ if oom => failed(
            BuildStatus::PermanentFailure,
            format!(
                "builder for '{drv_path}' failed: out of memory (limit {} MiB){}",
                memory_limit >> 20,
                tail.render()
            ),
        ),
        Stop::Exited(_) => match report {
            HelperReport::SetupFailed(msg) => Outcome::without_build(
                BuildStatus::MiscFailure,
                format!("nixbuild: cannot set up the sandbox for '{drv_path}': {msg}"),
            ),
            HelperReport::Signaled(sig) => failed(
                builder_failed,
                format!(
                    "builder for '{drv_path}' failed due to signal {sig}{pids_note}{}",
                    tail.render()
                ),
            ),
            HelperReport::Exited(code) if code != 0 => failed(
                builder_failed,
                format!(
                    "builder for '{drv_path}' failed with exit code {code}{pids_note}{}",
                    tail.render()
                ),
            ),
            HelperReport::Exited(_) => {
                let finish = Finish {
                    scratch,
                    uid,
                    times: (start_time, stop_time),
                    deadline: deadline.map(|d| (d, total.unwrap_or(0))),
                };
                finish_outputs(inner, build, job, prepared, finish).await?
            }
        },
        Stop::Silent(_) | Stop::TimedOut(_) | Stop::LogLimit(_) | Stop::Cancelled => {
            unreachable!("limit failures are answered above")
        }
    })
}

/// What [`finish_outputs`] needs of the build that ran.
struct Finish<'a> {
    scratch: &'a Path,
    /// The build's host uid.
    uid: u32,
    /// Unix seconds when the builder started and stopped.
    times: (u64, u64),
    /// When the build's time is up, and its limit in seconds for the message.
    deadline: Option<(tokio::time::Instant, u64)>,
}

/// Checks and registers the outputs of a builder that exited 0, for the build's account and
/// every account that joined it ([`outputs::process_outputs`]). The build leaves the
/// in-flight map first: whoever asks from now on starts afresh (and finds the outputs valid
/// once they are registered). The work counts against the build's time limit and stops
/// when no client waits any more (as at shutdown): both set the abort flag that the
/// blocking task checks for every node and buffer.
async fn finish_outputs(
    inner: &Arc<Inner>,
    build: &Shared,
    job: &BuildJob,
    prepared: &Prepared,
    finish: Finish<'_>,
) -> Result<Outcome, BuildError> {
    inner.leave_inflight(build);
    let sharers: Vec<String> = build
        .accounts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|a| **a != job.account)
        .cloned()
        .collect();
    let limits = OutputLimits {
        max_nar_size: inner.store.limits().max_nar_size,
        max_output_size: inner.config.max_output_size,
    };
    let abort = Arc::new(AtomicBool::new(false));
    let mut task = {
        let store = inner.store.clone();
        let job = job.clone();
        let abort = abort.clone();
        let scratch_store = nixbuild_sandbox::ScratchLayout::new(finish.scratch).store;
        let closure: BTreeSet<StorePath> = prepared.inputs.iter().map(|i| i.path.clone()).collect();
        let uid = finish.uid;
        tokio::task::spawn_blocking(move || {
            let expected: Vec<ExpectedOutput> = job
                .drv
                .outputs
                .iter()
                .filter_map(|(name, output)| ExpectedOutput::from_derivation(name, output))
                .collect();
            let checks = OutputCheckSpec::from_env(&job.drv.env);
            outputs::process_outputs(
                &store,
                &OutputsRequest {
                    account: &job.account,
                    sharers: &sharers,
                    drv_path: &job.drv_path,
                    scratch_store: &scratch_store,
                    build_uid: uid,
                    outputs: &expected,
                    input_closure: &closure,
                    checks: &checks,
                    limits,
                    abort: &abort,
                },
            )
        })
    };
    let mut cancel = build.cancel.subscribe();
    let (deadline, total) = finish.deadline.unzip();
    let stopped = tokio::select! {
        done = &mut task => Ok(done?),
        () = sleep_until(deadline) => Err(Stop::TimedOut(total.unwrap_or(0))),
        _ = cancel.wait_for(|c| *c) => Err(Stop::Cancelled),
    };
    let (start_time, stop_time) = finish.times;
    let outcome = |status, message, outputs| Outcome {
        status,
        message,
        times_built: 1,
        start_time,
        stop_time,
        outputs,
    };
    let done = match stopped {
        Ok(done) => done,
        Err(stop) => {
            // The task stops at its next node or buffer, before it registers anything.
            abort.store(true, Ordering::Relaxed);
            match task.await? {
                // It had registered the outputs already: the build succeeded.
                Ok(done) => Ok(done),
                Err(_) => {
                    let (status, message) = stop
                        .limit_failure(&job.drv_path)
                        .unwrap_or_else(|| unreachable!("a timeout or a cancel"));
                    return Ok(outcome(status, message, BTreeMap::new()));
                }
            }
        }
    };
    Ok(match done {
        Ok(done) => outcome(
            BuildStatus::Built,
            String::new(),
            done.into_iter().map(|o| (o.name, o.path)).collect(),
        ),
        Err(e) => outcome(e.build_status(), e.to_string(), BTreeMap::new()),
    })
}

async fn sleep_for(d: Option<u64>) {
    match d {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The sandbox's view of the input objects: what each root is.
fn input_paths(objects: &[InputObject]) -> Result<Vec<InputPath>, BuildError> {
    objects
        .iter()
        .map(|o| {
            let meta = std::fs::symlink_metadata(&o.object).map_err(io_err("stat", &o.object))?;
            let kind = if meta.is_dir() {
                InputKind::Directory
            } else if meta.file_type().is_symlink() {
                InputKind::Symlink {
                    target: std::fs::read_link(&o.object).map_err(io_err("readlink", &o.object))?,
                }
            } else {
                InputKind::File
            };
            Ok(InputPath {
                base_name: o.path.base_name(),
                host_path: o.object.clone(),
                kind,
            })
        })
        .collect()
}

/// The scheduler's view of `job`: account, system, features, and the cores and memory the
/// derivation asks for when `[builds] derivation_requests` allows it.
fn build_spec(
    config: &BuildsConfig,
    job: &BuildJob,
) -> Result<nixbuild_core::scheduler::BuildSpec, String> {
    let env = &job.drv.env;
    let attr = |name: &str| {
        env.get(name.as_bytes())
            .map(|v| String::from_utf8_lossy(v).trim().to_owned())
    };
    let (mut cores, mut memory) = (None, None);
    if config.derivation_requests {
        if let Some(v) = attr("NIXBUILD_CORES") {
            cores = Some(
                v.parse::<u32>()
                    .map_err(|_| format!("NIXBUILD_CORES = {v:?} is not a number of cores"))?,
            );
        }
        if let Some(v) = attr("NIXBUILD_MEMORY") {
            memory =
                Some(crate::config::parse_size(&v).map_err(|e| format!("NIXBUILD_MEMORY: {e}"))?);
        }
    }
    Ok(nixbuild_core::scheduler::BuildSpec {
        account: job.account.clone(),
        system: String::from_utf8_lossy(&job.drv.platform).into_owned(),
        required_features: attr("requiredSystemFeatures")
            .map(|v| v.split_ascii_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        cores,
        memory,
        priority: 0,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_the_smaller_non_zero() {
        assert_eq!(limit(0, 0), None);
        assert_eq!(limit(5, 0), Some(5));
        assert_eq!(limit(0, 7), Some(7));
        assert_eq!(limit(9, 7), Some(7));
        assert_eq!(limit(3, 7), Some(3));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut t = Tail::default();
        assert_eq!(Tail::default().render(), "");
        for i in 0..15 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"partial");
        let s = t.render();
        assert!(s.starts_with(";\nlast 10 log lines:\n> line 6\n"), "{s}");
        assert!(s.ends_with("> line 14\n> partial"), "{s}");
        let mut t = Tail::default();
        t.push(b"a\nb");
        t.push(b"c\n");
        assert_eq!(t.render(), ";\nlast 2 log lines:\n> a\n> bc");
    }

    #[tokio::test]
    async fn uid_pool_hands_out_distinct_uids_and_takes_them_back() {
        let pool = UidPool::new(100, 2);
        let a = pool.take().await;
        let b = pool.take().await;
        assert_ne!(a.uid, b.uid);
        assert!((100..102).contains(&a.uid) && (100..102).contains(&b.uid));
        let third = tokio::time::timeout(Duration::from_millis(50), pool.take()).await;
        assert!(third.is_err(), "a third build must wait for a uid");
        let freed = a.uid;
        drop(a);
        assert_eq!(pool.take().await.uid, freed);
    }
}
