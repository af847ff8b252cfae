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
//!
//! Rooms: this file holds the service's API ([`BuildService`], [`BuildJob`], [`Outcome`]) and
//! the preparation; [`waiters`] the sharing of builds in flight by their waiters; [`uids`] the
//! pool of host uids; [`drv_walk`] the `.drv` walk of graph builds; [`graph`] graph builds in
//! dependency order; [`run`] the run loop;
//! [`outcome`] the pure classification of how a build ended; [`sharing`] the key of
//! identical builds; [`placement`] the scheduler and cgroups; [`monitor`] the watcher of disk
//! and forks; [`outputs`] the checks and registration of outputs.

mod drv_walk;
mod floating;
mod graph;
mod limits;
mod live;
pub mod monitor;
mod outcome;
pub mod outputs;
pub mod placement;
mod records;
mod remote;
mod run;
pub mod sharing;
mod uids;
mod waiters;

pub use drv_walk::{DrvError, GraphPlan, Resolved};
pub use graph::{GraphEvent, GraphRun, RequestResult};
pub use live::{CancelError, LiveBuild, LiveState, Load};
pub use waiters::{LogFollow, WaitEvent, Waiter};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use nixbuild_core::derivation::options::{
    graph_paths, DerivationOptions, GraphPath, GraphPathInfo,
};
use nixbuild_core::derivation::{
    fallback_output_path, name_from_drv_path, BasicDerivation, DerivationOutput,
};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::serve::build::drv_output_id;
use nixbuild_core::serve::{BuildOptions, BuildStatus};
use nixbuild_core::store_path::StorePath;
use tokio::sync::watch;

use crate::cgroup::Cgroups;
use crate::config::{BuildsConfig, Config};
use crate::host::HostFacts;
use crate::store::{InputObject, Pins, Store, StoreError};
use crate::substitute::Substituter;
pub use limits::BuildLimits;
use monitor::Monitor;
use placement::{Placement, PlacementError};
use sharing::BuildKey;
use uids::UidPool;
use waiters::{InFlight, Shared};

/// The target of the build service's own log lines: the module's name from before it was a
/// folder, which operators' log filters and the tests' log checks know.
const LOG_TARGET: &str = "nixbuild::build";

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
    /// The `[substituters]` configuration cannot be used.
    #[error("[substituters]: {0}")]
    Substituters(String),
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
    /// `[builds]`, replaced on reload (but its uid range, which `uids` holds).
    config: std::sync::RwLock<Arc<BuildsConfig>>,
    /// The host's facts, for every build's sandbox.
    host: HostFacts,
    placement: Arc<Placement>,
    /// Stops running builds that overrun the disk reserve or fork at their process limit.
    monitor: Monitor,
    /// Builds queued or running per account.
    account_builds: Arc<nixbuild_core::account::AccountCounts>,
    /// Builds handed to the scheduler per account, and the limits of both.
    running: limits::Running,
    uids: UidPool,
    inflight: Arc<InFlight>,
    /// Every build from submission until its record is stored, by id.
    live: Arc<live::Live>,
    next_id: AtomicU64,
    /// How many build tasks have not ended yet (outcome given, leftovers removed).
    active: watch::Sender<usize>,
    /// The binary-cache client, when `[substituters]` names caches.
    substituter: Option<Substituter>,
    /// The machines of `[fleet]` and their state.
    fleet: crate::fleet::Fleet,
}

impl Inner {
    /// The `[builds]` settings in force.
    fn builds_config(&self) -> Arc<BuildsConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
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
        let cgroups = Cgroups::detect(&cgroup_name(state_dir)).map_err(PlacementError::from)?;
        let cpus = u32::try_from(cgroups.report().cpus.len()).unwrap_or(u32::MAX);
        let host = HostFacts::detect(cpus).map_err(PlacementError::from)?;
        let placement = Arc::new(Placement::new(config, cgroups, &host)?);
        placement.sync_fleet(&[], config.fleet.build_locally);
        let dir = builds_dir(state_dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(io_err("remove leftovers of earlier builds in", &dir))?;
        }
        std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
        let substituter = Substituter::new(store.clone(), &config.substituters)
            .map_err(BuildError::Substituters)?;
        Ok(BuildService {
            inner: Arc::new(Inner {
                monitor: Monitor::new(store.clone()),
                store,
                builds_dir: dir,
                helper_exe,
                config: std::sync::RwLock::new(Arc::new(config.builds.clone())),
                host,
                fleet: crate::fleet::Fleet::new(placement.clone()),
                placement,
                account_builds: Arc::default(),
                running: limits::Running::new(BuildLimits::new(config)),
                uids: UidPool::new(config.builds.uid_base, config.builds.uid_count),
                inflight: Arc::default(),
                live: Arc::default(),
                next_id: AtomicU64::new(1),
                active: watch::channel(0).0,
                substituter,
            }),
        })
    }

    /// The machines of `[fleet]` (kept current by [`crate::fleet::run`]).
    pub fn fleet(&self) -> &crate::fleet::Fleet {
        &self.inner.fleet
    }

    /// Puts the per-account build limits and the `[builds]` settings of `config` in force
    /// (on reload; for builds that start from now on; the uid range stays).
    pub fn set_limits(&self, config: &Config) {
        self.inner.running.set_limits(BuildLimits::new(config));
        *self.inner.config.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(config.builds.clone());
    }

    /// The binary-cache client, when caches are configured.
    pub fn substituter(&self) -> Option<&Substituter> {
        self.inner.substituter.as_ref()
    }

    /// Starts `job` (or joins the identical build in flight) and returns the caller's
    /// [`Waiter`]. Problems found before the builder runs (a bad derivation, an input the
    /// account cannot see) come back as the waiter's outcome.
    pub async fn submit(&self, job: BuildJob) -> Waiter {
        let submitted_ms = crate::store::now_ms();
        let store = self.inner.store.clone();
        let substituter = self.inner.substituter.clone();
        let prepared = {
            let job = job.clone();
            tokio::task::spawn_blocking(move || {
                // Inputs the account lacks come from the caches when they have them.
                let lines = substituter
                    .map(|s| s.substitute_collecting(&job.account, &job.drv.input_srcs))
                    .unwrap_or_default();
                let lines: Vec<Bytes> = lines
                    .into_iter()
                    .map(|line| Bytes::from(format!("{line}\n")))
                    .collect();
                (prepare(&store, &job), lines)
            })
            .await
        };
        let mut notes = VecDeque::new();
        let prepared = match prepared {
            Ok((prepared, lines)) => {
                notes.extend(lines);
                prepared
            }
            Err(e) => Err(Outcome::without_build(
                BuildStatus::MiscFailure,
                format!("nixbuild: {}", BuildError::Task(e)),
            )),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(outcome) => return Waiter::ready(outcome),
        };
        if job.options.keep_failed {
            notes.push_back(Bytes::from_static(
                b"nixbuild: keep-failed is not honoured on a shared server: a failed build's \
                  directory is always removed\n",
            ));
        }
        let mut inflight = self.inner.inflight.lock();
        if let Some(build) = inflight.get(&prepared.key) {
            tracing::info!(target: LOG_TARGET, account = %job.account, drv = %job.drv_path, "joining the same build in flight");
            notes.push_back(Bytes::from(format!(
                "nixbuild: joining the build of '{}' already in progress\n",
                job.drv_path
            )));
            return build.subscribe(&self.inner.inflight, &job.account, notes);
        }
        let (max, setting) = self.inner.running.limits().builds_of(&job.account);
        let Some(slot) = self.inner.account_builds.acquire(&job.account, max) else {
            crate::metrics::METRICS.refused(crate::metrics::Refusal::Builds);
            return Waiter::ready(Outcome::without_build(
                BuildStatus::MiscFailure,
                format!(
                    "account {} already has {max} builds queued or running, the most this \
                     server allows ({setting} of the server's configuration)",
                    job.account
                ),
            ));
        };
        let stored_log = match self.inner.store.begin_log() {
            Ok(log) => Some(log),
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, drv = %job.drv_path, "the build's log will not be stored: {e}");
                None
            }
        };
        let build = Arc::new(Shared::new(
            prepared.key,
            self.inner.store.next_build_id(),
            job.drv_path.clone(),
            submitted_ms,
            stored_log,
        ));
        inflight.insert(prepared.key, build.clone());
        let live = self.inner.live.enter(&build);
        let waiter = build.subscribe(&self.inner.inflight, &job.account, notes);
        drop(inflight);
        let inner = self.inner.clone();
        let active = ActiveBuild::new(&inner);
        // Every line of the build carries its id.
        let span = tracing::info_span!("build", id = build.id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The account's build slot, held until the build is over.
                let _slot = slot;
                let _active = active;
                let (outcome, leftovers) = run::run(&inner, &build, &job, prepared).await;
                tracing::info!(
                    target: LOG_TARGET,
                    account = %job.account,
                    drv = %job.drv_path,
                    status = ?outcome.status,
                    "build finished: {}",
                    if outcome.message.is_empty() { "ok" } else { &outcome.message }
                );
                crate::metrics::METRICS.build_finished(
                    outcome.status,
                    (outcome.times_built > 0).then(|| {
                        std::time::Duration::from_secs(
                            outcome.stop_time.saturating_sub(outcome.start_time),
                        )
                    }),
                );
                inner.inflight.leave(&build);
                let usage = leftovers
                    .as_ref()
                    .map(run::Leftovers::usage)
                    .unwrap_or_default();
                let outcome = Arc::new(outcome);
                build.done.send_replace(Some(outcome.clone()));
                // The waiters have the outcome; the record and what the build leaves go now, off
                // their path.
                let record = records::BuildFacts {
                    drv_path: &job.drv_path,
                    submitted_ms,
                    outcome: &outcome,
                    usage,
                };
                records::record(&inner.store, &build, &job.account, record).await;
                // Listed until its record is stored (or until the task is dropped, even in a
                // panic).
                drop(live);
                if let Some(leftovers) = leftovers {
                    leftovers.remove().await;
                }
            },
            span,
        ));
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
}

/// For a client whose protocol cannot carry the paths of a build's outputs back (the
/// BuildResult's `builtOutputs` came with serve protocol 2.6 and worker protocol 1.28, Nix
/// 2.4): the refusal of a derivation with floating content-addressed outputs, whose paths
/// only the build decides. `protocol` names the client's protocol and version.
pub fn refuse_unreportable(job: &BuildJob, protocol: &str) -> Option<Outcome> {
    let floating = job.drv.outputs.values().any(DerivationOutput::is_floating);
    floating.then(|| {
        Outcome::without_build(
            BuildStatus::InputRejected,
            format!(
                "cannot build '{}': it is a content-addressed derivation whose output paths \
                 are only known after the build, and this client's {protocol} cannot carry \
                 them back (Nix 2.4 or newer can)",
                job.drv_path
            ),
        )
    })
}

/// What [`prepare`] found out.
#[derive(Debug)]
struct Prepared {
    key: BuildKey,
    outputs: BTreeMap<String, StorePath>,
    inputs: Vec<InputObject>,
    /// The input rows, pinned against the collector until the build is over (held for its
    /// drop).
    _pins: Pins,
    /// The derivation's `requiredSystemFeatures`, for the scheduler and the sandbox.
    required_features: Vec<String>,
    /// The derivation's options (structured attributes, output checks, ...).
    options: Arc<DerivationOptions>,
    /// The closure of each `exportReferencesGraph` entry, in the account's view.
    graphs: BTreeMap<String, Vec<GraphPath>>,
}

impl Prepared {
    /// The paths of the input closure.
    fn input_closure(&self) -> BTreeSet<StorePath> {
        self.inputs.iter().map(|i| i.path.clone()).collect()
    }
}

/// Checks `job` and looks up what it needs; `Err` is the outcome when no build is needed or
/// possible.
fn prepare(store: &Store, job: &BuildJob) -> Result<Prepared, Outcome> {
    let refuse = |status, message: String| Outcome::without_build(status, message);
    if let Err(e) = store.check_build_quota(&job.account) {
        crate::metrics::METRICS.refused(crate::metrics::Refusal::Quota);
        return Err(refuse(
            BuildStatus::MiscFailure,
            format!("nixbuild: cannot build '{}': {e}", job.drv_path),
        ));
    }
    let drv = &job.drv;
    let invalid = |e: &dyn std::fmt::Display| {
        refuse(
            BuildStatus::InputRejected,
            format!("invalid derivation '{}': {e}", job.drv_path),
        )
    };
    if drv.outputs.is_empty() {
        return Err(invalid(&"it has no outputs"));
    }
    if job.options.nr_repeats != 0 {
        // Current Nix refuses them too ("client requested repeating builds, but this is
        // not currently implemented"): a build reported as checked that was not would be
        // worse.
        return Err(refuse(
            BuildStatus::MiscFailure,
            format!(
                "nixbuild cannot build '{}': the client asked for {} more builds of it to \
                 check that it is deterministic (--repeat, nrRepeats), which nixbuild does not \
                 do, like current Nix as a remote builder; build without --repeat, or check \
                 a build locally with nix-build --check",
                job.drv_path, job.options.nr_repeats
            ),
        ));
    }
    let options = DerivationOptions::from_env(&drv.env).map_err(|e| invalid(&e))?;
    drv.verify_fixed_output(name_from_drv_path(&job.drv_path))
        .map_err(|e| invalid(&e))?;
    let mut outputs = BTreeMap::new();
    for (output, out) in &drv.outputs {
        let path = match out {
            DerivationOutput::InputAddressed(path) | DerivationOutput::Fixed { path, .. } => {
                path.clone()
            }
            // Built at a temporary path; the final one is known afterwards.
            DerivationOutput::Floating { .. } => {
                fallback_output_path(&job.drv_path, output).map_err(|e| invalid(&e))?
            }
            DerivationOutput::Deferred => {
                return Err(invalid(&format_args!(
                    "output '{output}' is deferred: the client must resolve the derivation's \
                     content-addressed inputs before it sends it"
                )))
            }
            DerivationOutput::Impure { .. } => {
                return Err(invalid(&format_args!(
                    "output '{output}' is impure; impure derivations (the experimental \
                     impure-derivations feature) are not supported by this server"
                )))
            }
        };
        outputs.insert(output.clone(), path);
    }
    let internal = |e: StoreError| {
        refuse(
            BuildStatus::MiscFailure,
            format!("nixbuild: building '{}': {e}", job.drv_path),
        )
    };
    if let Some(realised) = realised_outputs(store, job).map_err(internal)? {
        let mut o = refuse(BuildStatus::AlreadyValid, String::new());
        o.outputs = realised;
        return Err(o);
    }
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
    let graphs = export_graphs(store, &job.account, &options, &closure).map_err(|e| match e {
        GraphError::NotInput(path) => refuse(
            BuildStatus::InputRejected,
            format!(
                "cannot build '{}': cannot export references of path '{path}' because it is not \
                 in the input closure of the derivation",
                job.drv_path
            ),
        ),
        GraphError::Store(e) => internal(e),
    })?;
    let pins = store.pins();
    let inputs = store
        .input_objects(&job.account, &closure, &pins)
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
        _pins: pins,
        required_features: required_features(&options, drv),
        options: Arc::new(options),
        graphs,
    })
}

/// For a floating content-addressed derivation whose every output the account has had built
/// (its realisations, [`Store::query_realisation`]) and still holds: those outputs.
fn realised_outputs(
    store: &Store,
    job: &BuildJob,
) -> Result<Option<BTreeMap<String, StorePath>>, StoreError> {
    if !job.drv.outputs.values().all(DerivationOutput::is_floating) {
        return Ok(None);
    }
    let hash = job.drv.hash_modulo();
    let mut realised = BTreeMap::new();
    for name in job.drv.outputs.keys() {
        let id = drv_output_id(Some(&hash), name);
        match store.query_realisation(&job.account, &id)? {
            Some(path) => realised.insert(name.clone(), path),
            None => return Ok(None),
        };
    }
    Ok(Some(realised))
}

/// Records, for `account`, where each floating content-addressed output of `drv` was built
/// (`outputs`, by name).
pub(super) fn record_realisations(
    store: &Store,
    account: &str,
    drv: &BasicDerivation,
    outputs: &BTreeMap<String, StorePath>,
) -> Result<(), StoreError> {
    if !drv.outputs.values().any(DerivationOutput::is_floating) {
        return Ok(());
    }
    let hash = drv.hash_modulo();
    let realisations: Vec<(String, StorePath)> = outputs
        .iter()
        .filter(|(name, _)| {
            drv.outputs
                .get(*name)
                .is_some_and(DerivationOutput::is_floating)
        })
        .map(|(name, path)| (drv_output_id(Some(&hash), name), path.clone()))
        .collect();
    store.register_realisations(account, &realisations)
}

/// The system features a build of `drv` requires: its `requiredSystemFeatures`, and
/// `ca-derivations` for a floating content-addressed derivation, as Nix adds it.
fn required_features(options: &DerivationOptions, drv: &BasicDerivation) -> Vec<String> {
    let mut features = options.required_system_features.clone();
    if drv.outputs.values().any(DerivationOutput::is_floating) {
        features.insert("ca-derivations".to_owned());
    }
    features.into_iter().collect()
}

/// Why an `exportReferencesGraph` closure could not be computed.
enum GraphError {
    /// A path that is not in the derivation's input closure (Nix refuses it too: the builder
    /// could otherwise learn what else the store holds).
    NotInput(StorePath),
    /// The store failed.
    Store(StoreError),
}

/// The closure of each `exportReferencesGraph` entry of `options` in `account`'s view, with
/// the outputs of the derivations in it (Nix's `exportReferences`). Each entry's paths must
/// be in `input_closure`.
fn export_graphs(
    store: &Store,
    account: &str,
    options: &DerivationOptions,
    input_closure: &BTreeSet<StorePath>,
) -> Result<BTreeMap<String, Vec<GraphPath>>, GraphError> {
    let mut graphs = BTreeMap::new();
    for (name, paths) in &options.export_references_graph {
        if let Some(p) = paths.iter().find(|p| !input_closure.contains(*p)) {
            return Err(GraphError::NotInput(p.clone()));
        }
        let closure = store
            .query_closure(account, paths, true)
            .map_err(GraphError::Store)?;
        let infos = store
            .query_path_infos(account, &closure, None)
            .map_err(GraphError::Store)?
            .into_iter()
            .filter_map(|(path, info)| {
                Some((
                    path,
                    GraphPathInfo {
                        nar_hash: info.nar_hash?,
                        nar_size: info.nar_size,
                        references: info.references,
                        ca: info.ca,
                    },
                ))
            })
            .collect();
        graphs.insert(name.clone(), graph_paths(&infos));
    }
    Ok(graphs)
}
