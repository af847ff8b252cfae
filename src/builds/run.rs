//! The run loop of one build: a place from the scheduler, a uid, a scratch directory and a
//! cgroup; the sandbox helper started with its plan; the log forwarded to the waiters while
//! the time, silence and log limits, the watcher and the waiters' interest are watched; the
//! outcome classified ([`super::outcome`]) and, on success, the outputs checked and
//! registered; and what the build leaves removed once the waiters have the outcome.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use nixbuild_core::serve::BuildStatus;
use nixbuild_core::store_path::StorePath;
use nixbuild_sandbox::{BuildRequest, HostSetup, InputKind, InputPath};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::monitor::Watch;
use super::outcome::{classify, Ended, Ending, Verdict};
use super::outputs::{self, ExpectedOutput, OutputLimits, OutputsRequest};
use super::placement::{Grant, Running};
use super::remote::RemoteEnd;
use super::uids::UidLease;
use super::waiters::{Phase, Shared};
use super::{io_err, BuildError, BuildJob, Inner, Outcome, Prepared, LOG_TARGET};
use crate::cgroup::BuildCgroup;
use crate::config::BuildsConfig;
use crate::failpoint::{failpoint, failpoint_async};
use crate::metrics::{Refusal, METRICS};
use crate::store::InputObject;

/// Log lines quoted in the message of a failed build, as Nix's `log-lines` default.
const TAIL_LINES: usize = 10;

/// Bytes of the helper's own stderr kept (its diagnostics and report).
const MAX_HELPER_STDERR: usize = 64 << 10;

/// How long the rest of the log may take to arrive once the helper has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How many machines a build is tried on when machines of the fleet fail it.
const MAX_ATTEMPTS: u32 = 3;

/// Runs a prepared build to its outcome, and returns what it left, for the caller to remove
/// once it has passed the outcome on. A build that a machine of the fleet fails (not the
/// build's own failure: the machine unreachable, refusing, lost mid-build) is placed again,
/// up to [`MAX_ATTEMPTS`] times; the machine is marked down and the clients get one line
/// saying so.
pub(super) async fn run<'a>(
    inner: &'a Arc<Inner>,
    build: &Shared,
    job: &BuildJob,
    prepared: Prepared,
) -> (Outcome, Option<Leftovers<'a>>) {
    let refused = |message: String| Outcome::without_build(BuildStatus::MiscFailure, message);
    // The [builds] settings in force when the build starts hold for its whole run.
    let config = inner.builds_config();
    let spec = match build_spec(&config, job, &prepared) {
        Ok(spec) => spec,
        Err(msg) => {
            return (
                refused(format!("nixbuild cannot build '{}': {msg}", job.drv_path)),
                None,
            )
        }
    };
    let cancelled = || {
        refused(format!(
            "building of '{}' was cancelled while it waited{}",
            job.drv_path,
            build.cancel_reason()
        ))
    };
    let unsupported = |msg: nixbuild_core::scheduler::Refusal| {
        METRICS.refused(Refusal::Unsupported);
        refused(format!(
            "nixbuild cannot build '{}' on this server: {msg}",
            job.drv_path
        ))
    };
    let Some(_running) = inner.running.place(build, &job.account).await else {
        return (cancelled(), None);
    };
    let build_run = BuildRun {
        inner,
        config: &config,
        build,
        job,
        prepared: &prepared,
    };
    let mut attempt = 1;
    loop {
        let ticket = match inner.placement.submit(spec.clone()) {
            Ok(t) => {
                tracing::info!(target: LOG_TARGET, account = %job.account, drv = %job.drv_path, "queued");
                build.set_phase(Phase::Queued(t.id()));
                METRICS.build_queued();
                t
            }
            Err(msg) => return (unsupported(msg), None),
        };
        let mut cancel = build.cancel.subscribe();
        let waited = tokio::select! {
            placed = ticket.wait(|line| build.note(format!("nixbuild: {line}\n"))) => Some(placed),
            _ = cancel.wait_for(|c| *c) => None,
        };
        let (grant, running) = match waited {
            None => return (cancelled(), None),
            Some(Err(refusal)) => return (unsupported(refusal), None),
            Some(Ok(placed)) => placed,
        };
        let granted_at = std::time::Instant::now();
        build.set_phase(Phase::Running {
            started_ms: crate::store::now_ms(),
            cpus: grant.cpus.clone(),
            memory: grant.memory,
            usage: None,
            machine: grant.remote.as_ref().map(|r| r.name()),
        });
        match &grant.remote {
            Some(remote) => build.note(format!(
                "nixbuild: building '{}' on {}\n",
                job.drv_path,
                remote.name()
            )),
            None => build.note(format!(
                "nixbuild: building '{}' on {} cores ({}) with {} MiB of memory\n",
                job.drv_path,
                grant.cpus.len(),
                crate::cgroup::format_cpu_list(&grant.cpus),
                grant.memory >> 20
            )),
        }
        let uid = inner.uids.take().await;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let scratch = inner.builds_dir.join(id.to_string());
        let place = Place {
            uid: uid.uid,
            grant: &grant,
            id,
            scratch: &scratch,
            granted_at,
        };
        let mut made = Made::default();
        let ran = match &grant.remote {
            Some(remote) => build_run.run_remote(remote, place).await,
            None => build_run
                .run_in(place, &mut made)
                .await
                .map(RemoteEnd::Done),
        };
        let leftovers = Leftovers {
            scratch,
            cgroup: made.cgroup,
            granted: (
                u32::try_from(grant.cpus.len()).unwrap_or(u32::MAX),
                grant.memory,
            ),
            _watch: made.watch,
            _running: running,
            _uid: uid,
        };
        let outcome = match ran {
            Ok(RemoteEnd::Done(outcome)) => outcome,
            Err(e) => Outcome::without_build(
                BuildStatus::MiscFailure,
                format!("nixbuild: building '{}': {e}", job.drv_path),
            ),
            Ok(RemoteEnd::Fault(fault)) => {
                if let Some(remote) = &grant.remote {
                    inner.fleet.failed(remote, &fault);
                }
                leftovers.remove().await;
                if attempt >= MAX_ATTEMPTS {
                    return (
                        Outcome::without_build(
                            BuildStatus::TransientFailure,
                            format!(
                                "nixbuild: building '{}' failed on {attempt} machines; the last: {fault}",
                                job.drv_path
                            ),
                        ),
                        None,
                    );
                }
                tracing::warn!(target: LOG_TARGET, account = %job.account, drv = %job.drv_path, "placing the build again: {fault}");
                build.note(format!(
                    "nixbuild: {fault}; building '{}' again on another machine\n",
                    job.drv_path
                ));
                attempt += 1;
                continue;
            }
        };
        return (outcome, Some(leftovers));
    }
}

/// One build being run: the service, the shared build its waiters hold, the job and what
/// [`super::prepare`] found.
pub(super) struct BuildRun<'a> {
    pub(super) inner: &'a Arc<Inner>,
    pub(super) config: &'a BuildsConfig,
    pub(super) build: &'a Shared,
    pub(super) job: &'a BuildJob,
    pub(super) prepared: &'a Prepared,
}

/// Where a build runs: its host uid, the scheduler's grant (and when it came), its number
/// and its scratch directory.
pub(super) struct Place<'a> {
    pub(super) uid: u32,
    pub(super) grant: &'a Grant,
    pub(super) id: u64,
    pub(super) scratch: &'a Path,
    pub(super) granted_at: std::time::Instant,
}

/// What [`BuildRun::run_in`] made that outlives it: the caller removes it, whatever happens.
#[derive(Default)]
struct Made {
    cgroup: Option<BuildCgroup>,
    watch: Option<Watch>,
}

/// The build's time limit: when it is up, and the limit in seconds for the message.
#[derive(Clone, Copy)]
pub(super) struct Deadline {
    pub(super) at: tokio::time::Instant,
    pub(super) secs: u64,
}

impl BuildRun<'_> {
    /// The refusal to start a build below the disk reserve (it would only be stopped).
    pub(super) async fn below_disk_reserve(&self) -> Result<Option<Outcome>, BuildError> {
        let store = self.inner.store.clone();
        Ok(
            match tokio::task::spawn_blocking(move || store.check_disk_reserve()).await? {
                Ok(()) => None,
                Err(e) => {
                    METRICS.refused(Refusal::DiskReserve);
                    Some(Outcome::without_build(
                        BuildStatus::MiscFailure,
                        format!(
                            "nixbuild: not starting the build of '{}': {e} (disk_reserve in \
                             [store] of the server's configuration)",
                            self.job.drv_path
                        ),
                    ))
                }
            },
        )
    }

    async fn run_in(&self, place: Place<'_>, made: &mut Made) -> Result<Outcome, BuildError> {
        let BuildRun {
            inner,
            config,
            build,
            job,
            prepared,
        } = *self;
        let Place {
            uid,
            grant,
            id,
            scratch,
            granted_at,
        } = place;
        let drv = &job.drv;
        if let Some(refusal) = self.below_disk_reserve().await? {
            return Ok(refusal);
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
        let cgroup: &BuildCgroup = made.cgroup.insert(cgroup);
        build.set_usage(cgroup.usage());
        let watch = made.watch.insert(inner.monitor.watch(
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
            required_features: prepared.required_features.iter().cloned().collect(),
            cores: u32::try_from(grant.cpus.len()).unwrap_or(u32::MAX),
            graphs: prepared.graphs.clone(),
        };
        let host = HostSetup {
            host_system: inner.host.system().to_owned(),
            build_uid: uid,
            build_gid: uid,
            scratch_dir: scratch.to_owned(),
            objects_dir: inner.store.objects_dir().to_owned(),
            has_dev_kvm: inner.host.kvm,
            resolver: inner.host.resolver.clone(),
            impure_env: inner.host.impure_env.clone(),
            dev_shm_size: config.dev_shm_size.clone(),
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
        METRICS.build_started(
            Duration::from_millis(crate::store::now_ms().saturating_sub(build.submitted_ms)),
            granted_at.elapsed(),
        );
        tracing::info!(target: LOG_TARGET, account = %job.account, drv = %job.drv_path, uid, cores = request.cores, dir = %scratch.display(), "building");
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
        let silence = limit(options.max_silent_time.into(), config.max_silent_time);
        let total = limit(options.build_timeout.into(), config.build_timeout);
        let max_log = limit(options.max_log_size, config.max_log_size);
        let deadline = total.map(|secs| Deadline {
            at: tokio::time::Instant::now() + Duration::from_secs(secs),
            secs,
        });
        let mut cancel = build.cancel.subscribe();
        let mut tail = Tail::default();
        let mut log_bytes = 0u64;
        let mut buf = BytesMut::new();
        let mut log_open = true;
        let ended = loop {
            buf.reserve(64 << 10);
            tokio::select! {
                read = stdout.read_buf(&mut buf), if log_open => match read {
                    Ok(0) | Err(_) => log_open = false,
                    Ok(n) => {
                        log_bytes += n as u64;
                        if let Some(max) = max_log.filter(|&m| log_bytes > m) {
                            break Ended::LogLimit(max);
                        }
                        let chunk = buf.split().freeze();
                        tail.push(&chunk);
                        build.send_log(chunk);
                        failpoint_async!("build-builder-running", log_bytes == n as u64);
                    }
                },
                status = child.wait() => match status {
                    Ok(status) => break Ended::Exited(status),
                    Err(e) => return Err(BuildError::Helper(e)),
                },
                () = sleep_for(silence) => break Ended::Silent(silence.unwrap_or(0)),
                () = sleep_until(deadline) => break Ended::TimedOut(total.unwrap_or(0)),
                // Also a cancel that came before the loop (during the set-up).
                () = cancelled(&mut cancel) => break Ended::Cancelled(build.cancel_reason()),
                overrun = watch.stopped() => break Ended::Overrun(overrun),
            }
        };
        let status = match ended {
            Ended::Exited(status) => status,
            _ => {
                let _ = cgroup.kill_all();
                // SIGKILL to the helper; the sandbox's init dies with it (PR_SET_PDEATHSIG),
                // and every other process of the build with the init.
                let _ = child.kill().await;
                child.wait().await.map_err(BuildError::Helper)?
            }
        };
        // The builder's last words may still be in the pipe.
        if matches!(ended, Ended::Exited(_)) && log_open {
            let drain = async {
                loop {
                    buf.reserve(64 << 10);
                    match stdout.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let chunk = buf.split().freeze();
                            log_bytes += chunk.len() as u64;
                            tail.push(&chunk);
                            build.send_log(chunk);
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        }
        let diagnostics = diagnostics.await?;
        let stop_time = unix_now();
        let tail = tail.render();
        let verdict = classify(Ending {
            drv_path: &job.drv_path,
            ended: &ended,
            report: nixbuild_sandbox::parse_report(&diagnostics, status),
            oom_limit: cgroup
                .oom_killed()
                .unwrap_or(false)
                .then(|| cgroup.memory_limit()),
            refused_forks: cgroup
                .fork_refusals()
                .and_then(|f| Some((f.limit, f.count().ok()?)))
                .filter(|&(_, refused)| refused > 0),
            fixed_output: drv.fixed_output().is_some(),
            tail: &tail,
        });
        let built = |status, message, outputs| Outcome {
            status,
            message,
            times_built: 1,
            start_time,
            stop_time,
            outputs,
        };
        Ok(match verdict {
            Verdict::Failed(status, message) => built(status, message, BTreeMap::new()),
            Verdict::NotBuilt(status, message) => Outcome::without_build(status, message),
            Verdict::CheckOutputs => {
                let (status, message, outputs) =
                    self.finish_outputs(scratch, uid, deadline).await?;
                built(status, message, outputs)
            }
        })
    }

    /// Checks and registers the outputs of a builder that exited 0, for the build's account
    /// and every account that joined it ([`outputs::process_outputs`]), as the build's
    /// status, message and outputs. The build leaves the in-flight map first: whoever asks
    /// from now on starts afresh (and finds the outputs valid once they are registered). The
    /// work counts against the build's time limit and stops when no client waits any more (as
    /// at shutdown): both set the abort flag that the blocking task checks for every node and
    /// buffer.
    pub(super) async fn finish_outputs(
        &self,
        scratch: &Path,
        uid: u32,
        deadline: Option<Deadline>,
    ) -> Result<(BuildStatus, String, BTreeMap<String, StorePath>), BuildError> {
        let (inner, build, job) = (self.inner, self.build, self.job);
        inner.inflight.leave(build);
        let sharers = build.sharers(&job.account);
        let limits = OutputLimits {
            max_nar_size: inner.store.limits().max_nar_size,
            max_output_size: self.config.max_output_size,
        };
        let abort = Arc::new(AtomicBool::new(false));
        let mut task = {
            let store = inner.store.clone();
            let job = job.clone();
            let abort = abort.clone();
            let scratch_store = nixbuild_sandbox::ScratchLayout::new(scratch).store;
            let options = self.prepared.options.clone();
            let closure = self.prepared.input_closure();
            tokio::task::spawn_blocking(move || {
                let expected: Vec<ExpectedOutput> = job
                    .drv
                    .outputs
                    .iter()
                    .filter_map(|(name, output)| {
                        ExpectedOutput::from_derivation(&job.drv_path, name, output)
                    })
                    .collect();
                let done = outputs::process_outputs(
                    &store,
                    &OutputsRequest {
                        account: &job.account,
                        sharers: &sharers,
                        drv_path: &job.drv_path,
                        scratch_store: &scratch_store,
                        build_uid: uid,
                        outputs: &expected,
                        input_closure: &closure,
                        options: &options,
                        limits,
                        abort: &abort,
                    },
                )?;
                // Where content-addressed outputs were built, for each account that has
                // them now: a later request of the same derivation finds them.
                let paths: BTreeMap<String, StorePath> = done
                    .iter()
                    .map(|o| (o.name.clone(), o.path.clone()))
                    .collect();
                super::record_realisations(&store, &job.account, &job.drv, &paths)?;
                for sharer in &sharers {
                    if let Err(e) = super::record_realisations(&store, sharer, &job.drv, &paths) {
                        tracing::error!(
                            account = %sharer,
                            drv = %job.drv_path,
                            "cannot record the realisations of a shared build: {e}"
                        );
                    }
                }
                Ok::<_, outputs::OutputError>(done)
            })
        };
        let mut cancel = build.cancel.subscribe();
        let stopped = tokio::select! {
            done = &mut task => Ok(done?),
            () = sleep_until(deadline) => Err(Ended::TimedOut(deadline.map_or(0, |d| d.secs))),
            _ = cancel.wait_for(|c| *c) => Err(Ended::Cancelled(build.cancel_reason())),
        };
        let done = match stopped {
            Ok(done) => done,
            Err(ended) => {
                // The task stops at its next node or buffer, before it registers anything.
                abort.store(true, Ordering::Relaxed);
                match task.await? {
                    // It had registered the outputs already: the build succeeded.
                    Ok(done) => Ok(done),
                    Err(_) => {
                        let (status, message) = ended
                            .limit_failure(&job.drv_path)
                            .unwrap_or_else(|| unreachable!("a timeout or a cancel"));
                        return Ok((status, message, BTreeMap::new()));
                    }
                }
            }
        };
        Ok(match done {
            Ok(done) => (
                BuildStatus::Built,
                String::new(),
                done.into_iter().map(|o| (o.name, o.path)).collect(),
            ),
            Err(e) => (e.build_status(), e.to_string(), BTreeMap::new()),
        })
    }
}

/// The smaller of two limits where 0 means none; `None` for no limit.
pub(super) fn limit(client: u64, server: u64) -> Option<u64> {
    match (client, server) {
        (0, 0) => None,
        (0, s) => Some(s),
        (c, 0) => Some(c),
        (c, s) => Some(c.min(s)),
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Resolves once `cancel` is (or was already) set, or its sender is gone; holds no borrow
/// of the value across the caller's awaits.
pub(super) async fn cancelled(cancel: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = cancel.wait_for(|c| *c).await;
}

pub(super) async fn sleep_for(d: Option<u64>) {
    match d {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until(deadline: Option<Deadline>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.at).await,
        None => std::future::pending().await,
    }
}

/// The last lines of a log, for the message of a failed build.
#[derive(Default)]
pub(super) struct Tail {
    lines: VecDeque<Vec<u8>>,
    partial: Vec<u8>,
}

impl Tail {
    /// Longest line kept.
    const MAX_LINE: usize = 1024;

    pub(super) fn push(&mut self, mut bytes: &[u8]) {
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
    pub(super) fn render(mut self) -> String {
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
pub(super) struct Leftovers<'a> {
    scratch: PathBuf,
    cgroup: Option<BuildCgroup>,
    /// Cores and memory granted.
    granted: (u32, u64),
    /// Watched until the directory is gone (the watcher waits for a stopped build's space).
    _watch: Option<Watch>,
    _running: Running,
    _uid: UidLease<'a>,
}

/// What a build was granted and used, for its record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Usage {
    /// Cores granted.
    pub cores: u32,
    /// Memory granted, in bytes.
    pub memory: u64,
    /// CPU time used, in microseconds, from the cgroup.
    pub cpu_us: Option<u64>,
    /// Peak memory, in bytes, from the cgroup.
    pub peak_memory: Option<u64>,
}

impl Leftovers<'_> {
    /// What the build was granted and, from its cgroup, what it used.
    pub(super) fn usage(&self) -> Usage {
        let cgroup = self.cgroup.as_ref();
        Usage {
            cores: self.granted.0,
            memory: self.granted.1,
            cpu_us: cgroup.and_then(|c| c.cpu_usage_us().ok().flatten()),
            peak_memory: cgroup.and_then(|c| c.peak_memory().ok().flatten()),
        }
    }

    /// Kills what is left in the cgroup, removes it and the scratch directory (one blocking
    /// task), then frees the slot and the uid.
    pub(super) async fn remove(self) {
        let Leftovers {
            scratch,
            cgroup,
            granted: _,
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

/// Why a derivation's requests cannot be read.
#[derive(Debug, thiserror::Error)]
enum SpecError {
    /// `NIXBUILD_CORES` is not a number.
    #[error("NIXBUILD_CORES = {0:?} is not a number of cores")]
    Cores(String),
    /// `NIXBUILD_MEMORY` is not a size.
    #[error("NIXBUILD_MEMORY: {0}")]
    Memory(crate::config::SizeError),
}

/// The scheduler's view of `job`: account, system, features, and the cores and memory the
/// derivation asks for when `[builds] derivation_requests` allows it.
fn build_spec(
    config: &BuildsConfig,
    job: &BuildJob,
    prepared: &Prepared,
) -> Result<nixbuild_core::scheduler::BuildSpec, SpecError> {
    let env = &job.drv.env;
    let attr = |name: &str| {
        env.get(name.as_bytes())
            .map(|v| String::from_utf8_lossy(v).trim().to_owned())
    };
    let (mut cores, mut memory) = (None, None);
    if config.derivation_requests {
        if let Some(v) = attr("NIXBUILD_CORES") {
            cores = Some(v.parse::<u32>().map_err(|_| SpecError::Cores(v))?);
        }
        if let Some(v) = attr("NIXBUILD_MEMORY") {
            memory = Some(crate::config::parse_size(&v).map_err(SpecError::Memory)?);
        }
    }
    Ok(nixbuild_core::scheduler::BuildSpec {
        account: job.account.clone(),
        system: String::from_utf8_lossy(&job.drv.platform).into_owned(),
        required_features: {
            let mut features = prepared.required_features.clone();
            // Floating content-addressed outputs get their paths from what this host's
            // checks compute: such builds run here only.
            if job.drv.outputs.values().any(|o| {
                matches!(
                    o,
                    nixbuild_core::derivation::DerivationOutput::Floating { .. }
                )
            }) {
                features.push(super::placement::THIS_HOST.to_owned());
            }
            features
        },
        cores,
        memory,
        priority: 0,
    })
}

#[cfg(test)]
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
}
