//! A build on a machine of the fleet: the input closure copied to it (only what it lacks,
//! dependencies first), BuildDerivation with its log passed on to the waiters as it comes,
//! the outputs fetched into the build's scratch directory, owned by the build's uid, and
//! from there checked and registered exactly as a local build's
//! ([`super::run::BuildRun::finish_outputs`]): the references are scanned here, not taken
//! from the machine, fixed outputs are hashed, the derivation's output checks apply, and
//! nothing is registered unless all of it passes.
//!
//! A failure of the machine or of the connection (unreachable, refused, an answer that is
//! not the protocol, the connection lost mid-build) is a [`Fault`]: the caller marks the
//! machine down and places the build again. A failure of the build itself (the machine's
//! BuildResult says so) is the build's outcome, as for a local build.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nixbuild_core::serve::{AddToStoreNar, BuildOptions, BuildStatus};
use nixbuild_core::store_path::StorePath;
use tokio::sync::{mpsc, watch};

use super::outcome::Ended;
use super::run::{
    cancelled, limit, sleep_for, sleep_until, unix_now, BuildRun, Deadline, Place, Tail,
};
use super::{io_err, BuildError, Outcome, LOG_TARGET};
use crate::buffers::{BufferPool, ChunkWriter};
use crate::fleet::conn::{Fault, Session};
use crate::fleet::Remote;
use crate::metrics::METRICS;
use crate::store::Unpack;

/// Chunks of a NAR in flight between the store's export and the connection.
const CHANNEL_DEPTH: usize = 4;

/// How a build on a machine ended.
pub(super) enum RemoteEnd {
    /// Its outcome (built, failed there, stopped by a limit or a cancel, refused here).
    Done(Outcome),
    /// The machine failed it: place it again.
    Fault(Fault),
}

impl BuildRun<'_> {
    /// Runs the build on `remote`.
    pub(super) async fn run_remote(
        &self,
        remote: &Arc<Remote>,
        place: Place<'_>,
    ) -> Result<RemoteEnd, BuildError> {
        let (build, job) = (self.build, self.job);
        if let Some(refusal) = self.below_disk_reserve().await? {
            return Ok(RemoteEnd::Done(refusal));
        }
        {
            let scratch = place.scratch.to_owned();
            tokio::task::spawn_blocking(move || -> Result<(), BuildError> {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&scratch)
                    .map_err(io_err("create", &scratch))?;
                let store = nixbuild_sandbox::ScratchLayout::new(&scratch).store;
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&store)
                    .map_err(io_err("create", &store))
            })
            .await??;
        }
        let _on_machine = remote.hold();
        let options = &job.options;
        let config = self.config;
        let total = limit(options.build_timeout.into(), config.build_timeout);
        let deadline = total.map(|secs| Deadline {
            at: tokio::time::Instant::now() + Duration::from_secs(secs),
            secs,
        });
        let mut cancel = build.cancel.subscribe();
        // The copies stop when the build is cancelled or its time is up.
        let stopped = async {
            tokio::select! {
                () = cancelled(&mut cancel) => Ended::Cancelled(build.cancel_reason()),
                () = sleep_until(deadline) => Ended::TimedOut(total.unwrap_or(0)),
            }
        };
        tokio::pin!(stopped);
        let mut conn = tokio::select! {
            conn = remote.session() => match conn {
                Ok(conn) => conn,
                Err(fault) => return Ok(RemoteEnd::Fault(fault)),
            },
            ended = &mut stopped => return Ok(RemoteEnd::Done(self.stopped(&ended))),
        };
        tracing::info!(target: LOG_TARGET, account = %job.account, drv = %job.drv_path, machine = %remote.name(), "copying inputs");
        let copied = tokio::select! {
            copied = self.copy_inputs(remote, &mut conn) => copied?,
            ended = &mut stopped => return Ok(RemoteEnd::Done(self.stopped(&ended))),
        };
        if let Err(fault) = copied {
            return Ok(RemoteEnd::Fault(fault));
        }
        let start_time = unix_now();
        METRICS.build_started(
            Duration::from_millis(crate::store::now_ms().saturating_sub(build.submitted_ms)),
            place.granted_at.elapsed(),
        );
        tracing::info!(target: LOG_TARGET, account = %job.account, drv = %job.drv_path, machine = %remote.name(), "building");
        let silence = limit(options.max_silent_time.into(), config.max_silent_time);
        let max_log = limit(options.max_log_size, config.max_log_size);
        // The machine gets the same limits; they are enforced here too.
        let machine_options = BuildOptions {
            max_silent_time: silence.map_or(0, |s| u32::try_from(s).unwrap_or(u32::MAX)),
            build_timeout: total.map_or(0, |s| u32::try_from(s).unwrap_or(u32::MAX)),
            max_log_size: max_log.unwrap_or(0),
            ..*options
        };
        let (last_log, mut heard) = watch::channel(());
        let mut tail = Tail::default();
        let mut log_bytes = 0u64;
        let mut over_log = false;
        let too_much_log = tokio::sync::Notify::new();
        // The build stops for what stops the copies, and for its silence and log limits.
        let stop = async {
            loop {
                tokio::select! {
                    ended = &mut stopped => return ended,
                    () = too_much_log.notified() => return Ended::LogLimit(max_log.unwrap_or(0)),
                    () = sleep_for(silence) => return Ended::Silent(silence.unwrap_or(0)),
                    changed = heard.changed() => if changed.is_err() {
                        return std::future::pending().await;
                    },
                }
            }
        };
        let ended = tokio::select! {
            end = conn.build(
                &job.drv_path,
                &job.drv,
                machine_options,
                |chunk: Bytes| {
                    if over_log {
                        return;
                    }
                    log_bytes += chunk.len() as u64;
                    if max_log.is_some_and(|m| log_bytes > m) {
                        // The build stops (the session is dropped, ending it there).
                        over_log = true;
                        too_much_log.notify_one();
                        return;
                    }
                    let _ = last_log.send(());
                    tail.push(&chunk);
                    build.send_log(chunk);
                },
            ) => end,
            ended = stop => {
                // The session carries an unfinished build: it is dropped, which ends it there.
                return Ok(RemoteEnd::Done(self.stopped(&ended)));
            }
        };
        let result = match ended {
            Ok(result) => result,
            Err(fault) => return Ok(RemoteEnd::Fault(fault)),
        };
        if over_log {
            return Ok(RemoteEnd::Done(
                self.stopped(&Ended::LogLimit(max_log.unwrap_or(0))),
            ));
        }
        let stop_time = unix_now();
        let built = |status, message: String, outputs| Outcome {
            status,
            message,
            times_built: 1,
            start_time: if result.start_time > 0 {
                result.start_time
            } else {
                start_time
            },
            stop_time: if result.stop_time > 0 {
                result.stop_time
            } else {
                stop_time
            },
            outputs,
        };
        if !result.status.is_success() {
            remote.give_back(conn);
            let mut message = String::from_utf8_lossy(&result.error_msg).into_owned();
            if message.is_empty() {
                message = format!("building of '{}' failed on {}", job.drv_path, remote.name());
            }
            let tail = tail.render();
            if !message.contains("last ") {
                message.push_str(&tail);
            }
            return Ok(RemoteEnd::Done(built(
                result.status,
                message,
                BTreeMap::new(),
            )));
        }
        let fetched = tokio::select! {
            fetched = self.fetch_outputs(remote, &mut conn, &place) => fetched,
            ended = &mut stopped => return Ok(RemoteEnd::Done(self.stopped(&ended))),
        };
        match fetched {
            Err(fault) => return Ok(RemoteEnd::Fault(fault)),
            Ok(Some(refusal)) => {
                return Ok(RemoteEnd::Done(built(
                    BuildStatus::OutputRejected,
                    refusal,
                    BTreeMap::new(),
                )))
            }
            Ok(None) => remote.give_back(conn),
        }
        let (status, message, outputs) = self
            .finish_outputs(place.scratch, place.uid, deadline)
            .await?;
        Ok(RemoteEnd::Done(built(status, message, outputs)))
    }

    /// The outcome of a build stopped by a limit or a cancel.
    fn stopped(&self, ended: &Ended) -> Outcome {
        let (status, message) = ended
            .limit_failure(&self.job.drv_path)
            .unwrap_or((BuildStatus::MiscFailure, String::new()));
        Outcome::without_build(status, message)
    }

    /// Copies to the machine the input paths it lacks, each after its references. `Ok(Err)`
    /// is the machine's fault; `Err`, the front's own (its store).
    async fn copy_inputs(
        &self,
        remote: &Remote,
        conn: &mut Session,
    ) -> Result<Result<(), Fault>, BuildError> {
        let closure = self.prepared.input_closure();
        let asked = std::time::Instant::now();
        let valid = match conn.query_valid(closure.clone()).await {
            Ok(valid) => valid,
            Err(fault) => return Ok(Err(fault)),
        };
        let missing: Vec<StorePath> = closure.difference(&valid).cloned().collect();
        if missing.is_empty() {
            return Ok(Ok(()));
        }
        let infos = {
            let store = self.inner.store.clone();
            let account = self.job.account.clone();
            tokio::task::spawn_blocking(move || store.query_path_infos(&account, &missing, None))
                .await??
        };
        let pool = BufferPool::default();
        for path in crate::session::dependencies_first(&infos) {
            let info = &infos[&path];
            let Some(nar_hash) = info.nar_hash else {
                continue;
            };
            // Another build copying the same path there goes first; once it did, this one
            // has nothing to copy.
            let slot = remote.upload_slot(&path);
            let mut last = slot.lock().await;
            if last.is_some_and(|at| at >= asked) {
                continue;
            }
            let header = AddToStoreNar {
                path: path.clone(),
                deriver: info.deriver.clone(),
                nar_hash,
                references: info.references.clone(),
                registration_time: 0,
                nar_size: info.nar_size,
                ultimate: false,
                sigs: info.sigs.clone(),
                ca: info.ca,
            };
            let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
            let mut writer = ChunkWriter::new(tx, pool.clone());
            let export = {
                let store = self.inner.store.clone();
                let account = self.job.account.clone();
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    store.export_nar_to(&account, &path, &mut writer)
                })
            };
            let sent = conn.add(header, rx).await;
            let exported = export.await?;
            if let Err(fault) = sent {
                // The front could not read its own NAR: that is the front's error.
                exported?;
                return Ok(Err(fault));
            }
            remote.count(true, exported?);
            *last = Some(std::time::Instant::now());
        }
        Ok(Ok(()))
    }

    /// Fetches every output the machine built into `<scratch>/store`, owned by the build's
    /// uid; `Ok(Some)` is the refusal of outputs larger than the limits allow.
    async fn fetch_outputs(
        &self,
        remote: &Remote,
        conn: &mut Session,
        place: &Place<'_>,
    ) -> Result<Option<String>, Fault> {
        let store_dir = nixbuild_sandbox::ScratchLayout::new(place.scratch).store;
        let max_nar = self.inner.store.limits().max_nar_size;
        let mut left = self.config.max_output_size;
        for path in self.prepared.outputs.values() {
            let unpack = Unpack::new(
                store_dir.join(path.base_name()),
                place.uid,
                max_nar.min(left),
            );
            match conn.dump(path, unpack).await? {
                Ok(size) => {
                    remote.count(false, size);
                    left = left.saturating_sub(size);
                }
                Err(e) => {
                    return Ok(Some(format!(
                        "the outputs of '{}' are larger than this server takes: {e}",
                        self.job.drv_path
                    )))
                }
            }
        }
        Ok(None)
    }
}
