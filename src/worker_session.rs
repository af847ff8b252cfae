//! The async driver of one worker-protocol session (`nix-daemon --stdio`, `ssh-ng://`): it
//! feeds the client's bytes to the sans-IO [`ServerSession`], carries out each request
//! against the store and build service for one account through the same [`SessionContext`]
//! as the serve driver ([`crate::session`]), and writes the answers and the log channel to a
//! [`SessionOutput`]'s protocol stream.
//!
//! A request the service refuses or fails (a path the account does not have, a build that
//! cannot start, an operation a shared server does not allow) is answered with
//! `STDERR_ERROR`, and the session goes on, as a Nix daemon's does. Bad bytes, a payload that
//! breaks its limits, a timeout or a lost connection end the session: the client sees the
//! error, and nothing is registered half-way (an unfinished import is dropped, which removes
//! its files).
//!
//! Trust (docs/worker-protocol.md, "Trust and settings in nixbuild"): the hello says
//! "trusted", because what a client adds or builds lands in its own account's view only, so
//! nothing it sends reaches another account; settings are honoured only where they bound
//! this session's own builds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nixbuild_core::budget::Reservation;
use nixbuild_core::derivation::{aterm, DerivationOutput};
use nixbuild_core::serve::build::realisation_json;
use nixbuild_core::serve::{AddToStoreNar, BuildOptions, BuiltOutput};
use nixbuild_core::store_path::StorePath;
use nixbuild_core::worker::dump;
use nixbuild_core::worker::request::AddToStoreForm;
use nixbuild_core::worker::stderr::{ActivityType, ResultType};
use nixbuild_core::worker::{
    ClientOptions, DerivedPath, ErrorInfo, Event, LogField, Missing, PathInfo, Request, Response,
    ServerHello, ServerSession, StderrMessage, Trust, WorkerError, WorkerVersion,
};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use crate::buffers::{BufferPool, ChunkWriter, CHANNEL_DEPTH};
use crate::builds::BuildService;
use crate::builds::{BuildJob, GraphEvent, GraphRun, Outcome, WaitEvent};
use crate::service::{store_error, SessionContext, SessionSettings, Upload};
use crate::session::{
    add_claim, before_build_result, before_upload_ack, build_result, failure_line, last_words,
    make_room, over_limit, registration_time, ClientWatch, ReadDeadline, SessionError,
    SessionOutput, WriteTimeout,
};
use crate::store::{PathClaim, Store};

/// The most bytes of a `.drv` read to answer QueryDerivationOutputMap.
const MAX_DRV_SIZE: u64 = 16 << 20;

/// The version string the hello carries (clients show it in `nix store info`).
fn nix_version() -> String {
    format!("nixbuild {}", env!("CARGO_PKG_VERSION"))
}

/// Runs one worker-protocol session to its end: `Ok` when the client closed its side at a
/// request boundary, otherwise the error, which the client has already been sent.
pub async fn serve_worker<R, O>(
    store: &Store,
    builds: &BuildService,
    settings: &SessionSettings,
    input: R,
    out: &mut O,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    O: SessionOutput,
{
    let mut out = WriteTimeout {
        inner: out,
        limit: settings.write_timeout,
    };
    let hello = ServerHello {
        version: WorkerVersion::SERVER,
        features: BTreeSet::new(),
        nix_version: nix_version(),
        trust: Trust::Trusted,
    };
    let mut driver = Driver {
        ctx: SessionContext::new(store, builds, settings),
        session: ServerSession::new(hello, settings.limits),
        out: &mut out,
        incoming: None,
        pool: BufferPool::default(),
        held: Reservation::new(settings.buffer_budget.clone()),
        options: BuildOptions::default(),
        next_activity: u64::from(std::process::id()) << 32,
        keep_going: None,
    };
    let result = driver.run(input).await;
    if let Err(e) = &result {
        // The error on the log channel ends the client's request; what was queued before it
        // goes out first.
        driver.session.abort(ErrorInfo::new(e.to_string()));
        let pending = driver.session.take_output();
        last_words(driver.out, pending, e).await;
    }
    result
}

/// What a payload being received goes to.
enum Incoming {
    /// A NAR for the store: AddToStoreNar (answered once it is registered), or one path
    /// of AddMultipleToStore (answered after the last path).
    Nar {
        info: Box<AddToStoreNar>,
        upload: Upload,
        answer: bool,
    },
    /// AddToStore's dump, held whole (at most `max_request_bytes`, reserved against the
    /// daemon's budget) until it is complete: the path it makes depends on all of it.
    Dump {
        name: String,
        form: AddToStoreForm,
        data: Vec<u8>,
        held: Reservation,
    },
    /// Data refused once it has all arrived (AddBuildLog), with the reason.
    Refuse(String),
}

struct Driver<'a, O> {
    ctx: SessionContext<'a>,
    session: ServerSession,
    out: &'a mut O,
    incoming: Option<Incoming>,
    pool: BufferPool,
    held: Reservation,
    /// Limits for builds from the client's SetOptions.
    options: BuildOptions,
    /// The id of the next activity this session starts.
    next_activity: u64,
    /// The client's keep-going from SetOptions; `[builds] keep_going` when it sent none.
    keep_going: Option<bool>,
}

/// What a request handler decides: answered (or waiting for its payload), or failed.
type Handled = Result<(), Failure>;

/// Either a refusal with its message (answered with STDERR_ERROR, the session goes on) or a
/// session error.
enum Failure {
    Refused(String),
    Fatal(SessionError),
}

impl<E: Into<SessionError>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Fatal(e.into())
    }
}

fn refuse<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Refused(msg.into()))
}

/// An error answered as a refusal.
fn refused(e: impl std::fmt::Display) -> Failure {
    Failure::Refused(e.to_string())
}

impl<O: SessionOutput> Driver<'_, O> {
    async fn run<R: AsyncRead + Unpin>(&mut self, mut input: R) -> Result<(), SessionError> {
        let mut buf = BytesMut::new();
        let settings = self.ctx.settings();
        let mut due = ReadDeadline::new(settings);
        loop {
            while let Some(event) = self.session.poll(&mut buf).map_err(|e| match e {
                WorkerError::Wire(w) => over_limit(w, settings),
                e => SessionError::Worker(e),
            })? {
                due.greeted |= matches!(event, Event::Hello { .. });
                self.handle(event, &mut input, &mut buf).await?;
            }
            let max = settings.max_request_bytes;
            if buf.len() >= max {
                return Err(SessionError::RequestTooLarge { max });
            }
            self.flush().await?;
            make_room(&mut buf, &mut self.held, &self.pool, max)?;
            if due.read(&mut input, &mut buf).await? == 0 {
                return Ok(self.session.end_of_input(&buf)?);
            }
        }
    }

    /// Writes out and flushes what the session has queued.
    async fn flush(&mut self) -> Result<(), SessionError> {
        let output = self.session.take_output();
        if !output.is_empty() {
            self.out.stdout(output).await?;
            self.out.flush().await?;
        }
        Ok(())
    }

    async fn handle<R: AsyncRead + Unpin>(
        &mut self,
        event: Event,
        input: &mut R,
        buf: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let handled = match event {
            Event::Hello {
                client, negotiated, ..
            } => {
                tracing::debug!(
                    account = %self.ctx.settings().account,
                    client = %client,
                    negotiated = %negotiated,
                    "worker handshake"
                );
                Ok(())
            }
            Event::Request(req) => {
                tracing::debug!(account = %self.ctx.settings().account, op = req.opcode().name(), "request");
                self.request(req, input, buf).await
            }
            Event::AddPath(info) => self.begin_nar(info, false),
            Event::Data(chunk) => self.data(chunk).await,
            Event::DataEnd => self.data_end().await,
            Event::AddEnd => {
                self.incoming = None;
                Ok(self.session.respond(&Response::Nothing)?)
            }
        };
        match handled {
            Ok(()) => Ok(()),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Refused(msg)) => {
                tracing::info!(account = %self.ctx.settings().account, "refused: {msg}");
                Ok(self.session.fail(ErrorInfo::new(msg))?)
            }
        }
    }

    async fn request<R: AsyncRead + Unpin>(
        &mut self,
        req: Request,
        input: &mut R,
        buf: &mut BytesMut,
    ) -> Handled {
        let response = match req {
            Request::SetOptions(options) => {
                self.set_options(&options)?;
                Response::Nothing
            }
            Request::IsValidPath(p) => Response::Int(u64::from(self.valid(&p).await?)),
            Request::QueryValidPaths { paths, substitute } => {
                self.ctx.check_count("QueryValidPaths", paths.len()).map_err(refused)?;
                if substitute {
                    self.substitute(&paths).await?;
                }
                Response::Paths(self.ctx.query_valid_paths(paths).await.map_err(refused)?)
            }
            Request::QueryPathInfo(p) => Response::PathInfo(self.path_info(&p).await?.map(Box::new)),
            Request::QueryValidDerivers(p) => {
                let deriver = self.path_info(&p).await?.and_then(|i| i.deriver);
                Response::Paths(deriver.into_iter().collect())
            }
            Request::EnsurePath(p) => {
                if !self.valid(&p).await? {
                    self.substitute(&BTreeSet::from([p.clone()])).await?;
                }
                if !self.valid(&p).await? {
                    return refuse(format!(
                        "path '{p}' is not valid on this server and no binary cache of the \
                         server has it; upload it first"
                    ));
                }
                Response::Int(1)
            }
            // Nothing this server stores is collected: every root holds already.
            Request::AddTempRoot(_) | Request::AddIndirectRoot(_) | Request::SyncWithGC => {
                Response::Int(1)
            }
            Request::HasSubstitutes(p) => {
                let found = self.ctx.substitutable(BTreeSet::from([p])).await.map_err(refused)?;
                Response::Int(u64::from(!found.is_empty()))
            }
            // No roots; no substitutable path infos (QueryMissing says what would be
            // fetched).
            Request::FindRoots
            | Request::QuerySubstitutablePathInfo(_)
            | Request::QuerySubstitutablePathInfos(_) => Response::Int(0),
            // Where the account had a content-addressed output built: its path before 1.31,
            // the realisation's JSON from then on.
            Request::QueryRealisation(id) => {
                let found = self
                    .ctx
                    .query_realisation(id.clone())
                    .await
                    .map_err(refused)?;
                if self.session.version() < WorkerVersion::V1_31 {
                    Response::Paths(found.into_iter().collect())
                } else {
                    Response::Strings(
                        found
                            .map(|out_path| {
                                let built = BuiltOutput {
                                    out_path,
                                    signatures: BTreeSet::new(),
                                    drv_hash: None,
                                };
                                realisation_json(&id, &built)
                            })
                            .into_iter()
                            .collect(),
                    )
                }
            }
            Request::QuerySubstitutablePaths(paths) => {
                self.ctx
                    .check_count("QuerySubstitutablePaths", paths.len())
                    .map_err(refused)?;
                Response::Paths(self.ctx.substitutable(paths).await.map_err(refused)?)
            }
            Request::QueryDerivationOutputMap(drv) => {
                let outputs = self.drv_outputs(&drv).await?;
                Response::OutputMap(outputs.into_iter().map(|(k, v)| (k, Some(v))).collect())
            }
            Request::QueryDerivationOutputs(drv) => {
                Response::Paths(self.drv_outputs(&drv).await?.into_values().collect())
            }
            Request::QueryDerivationOutputNames(drv) => {
                Response::Strings(self.drv_outputs(&drv).await?.into_keys().collect())
            }
            Request::QueryMissing(paths) => Response::Missing(Box::new(self.missing(paths).await?)),
            Request::NarFromPath(p) => return self.nar_from_path(p).await,
            Request::AddToStoreNar { info, .. } => {
                return self.begin_nar(info, true);
            }
            Request::AddMultipleToStore { .. } => return Ok(()),
            Request::AddBuildLog(drv) => {
                self.incoming = Some(Incoming::Refuse(format!(
                    "nixbuild does not store build logs that clients upload (for '{drv}')"
                )));
                return Ok(());
            }
            Request::AddToStore { name, form } => {
                let held = Reservation::new(self.ctx.settings().buffer_budget.clone());
                self.incoming = Some(Incoming::Dump {
                    name,
                    form,
                    data: Vec::new(),
                    held,
                });
                return Ok(());
            }
            Request::AddTextToStore {
                name,
                text,
                references,
            } => {
                let added = dump::add_text_to_store(&name, text, references)
                    .map_err(refused)?;
                let path = self.add_whole(added).await?;
                Response::Added { path, info: None }
            }
            Request::BuildDerivation { drv_path, drv, .. } => {
                let job = BuildJob {
                    account: self.ctx.settings().account.clone(),
                    drv_path,
                    drv: *drv,
                    options: self.options,
                };
                let drv_hash = job.drv.hash_modulo();
                let version = self.session.version();
                let refused = (version < WorkerVersion::V1_28)
                    .then(|| {
                        let protocol = format!("daemon protocol {version}");
                        crate::builds::refuse_unreportable(&job, &protocol)
                    })
                    .flatten();
                let outcome = match refused {
                    Some(refused) => Arc::new(refused),
                    None => self.wait_for(job, input, buf).await?,
                };
                before_build_result().await;
                Response::Build(Box::new(build_result(&outcome, Some(&drv_hash))))
            }
            Request::BuildPaths { paths, .. } => {
                let run = self.build_paths(&paths, input, buf).await?;
                if let Some(failure) = run.failure() {
                    return refuse(failure.message);
                }
                Response::Int(1)
            }
            Request::BuildPathsWithResults { paths, .. } => {
                let run = self.build_paths(&paths, input, buf).await?;
                let results = paths
                    .into_iter()
                    .zip(run.results())
                    .map(|(p, r)| (p, build_result(&r.outcome, r.drv_hash.as_ref())))
                    .collect();
                Response::BuildResults(results)
            }
            Request::CollectGarbage { .. } => {
                return refuse("garbage collection is the server's business on nixbuild; clients may not run it")
            }
            Request::OptimiseStore => {
                return refuse("optimising the store is the server's business on nixbuild")
            }
            Request::VerifyStore { .. } => {
                return refuse("nixbuild verifies every path when it is added; clients may not verify or repair the store")
            }
            Request::RegisterDrvOutput(_) => {
                return refuse("content-addressed derivations are not supported by nixbuild: realisations cannot be registered")
            }
            Request::AddPermRoot { .. } => {
                return refuse("nixbuild does not keep garbage collector roots on the server's file system")
            }
            Request::AddSignatures { path, sigs } => {
                // Signatures are part of the account's own view of the path: another
                // account's row of the same path keeps its own.
                let p = path.clone();
                let added = self
                    .ctx
                    .blocking("adding signatures", move |s, a| s.add_signatures(a, &p, &sigs))
                    .await
                    .map_err(refused)?;
                if !added {
                    return refuse(format!("path '{path}' is not valid"));
                }
                Response::Int(1)
            }
            Request::QueryReferrers(p) => {
                // Within the account's own view, as long as they fit in one answer.
                let max = self.ctx.settings().max_paths_per_request;
                let found = self
                    .ctx
                    .blocking("querying referrers", move |s, a| {
                        s.query_referrers(a, &p, max + 1)
                    })
                    .await
                    .map_err(refused)?;
                self.ctx
                    .check_count("QueryReferrers", found.len())
                    .map_err(refused)?;
                Response::Paths(found.into_iter().collect())
            }
            Request::QueryAllValidPaths => {
                // The account's own view, as long as it fits in one answer.
                let max = self.ctx.settings().max_paths_per_request;
                let paths = self
                    .ctx
                    .blocking("listing paths", move |s, a| s.account_paths(a, max + 1))
                    .await
                    .map_err(refused)?;
                self.ctx
                    .check_count("QueryAllValidPaths", paths.len())
                    .map_err(refused)?;
                Response::Paths(paths.into_iter().collect())
            }
            Request::QueryPathFromHashPart(h) => {
                let found = self
                    .ctx
                    .query("looking up a hash part", true, move |s, a| {
                        s.query_path_from_hash_part(a, &h)
                    })
                    .await
                    .map_err(refused)?;
                Response::OptPath(found)
            }
        };
        Ok(self.session.respond(&response)?)
    }

    /// SetOptions: the settings that bound this session's own builds are taken; any other is
    /// ignored with a warning naming it.
    fn set_options(&mut self, o: &ClientOptions) -> Handled {
        self.keep_going = Some(o.keep_going != 0);
        let mut options = BuildOptions {
            max_silent_time: u32::try_from(o.max_silent_time).unwrap_or(u32::MAX),
            ..self.options
        };
        for (name, value) in &o.overrides {
            let number = || value.parse::<u64>().ok();
            match (name.as_str(), number()) {
                ("max-silent-time", Some(n)) => {
                    options.max_silent_time = n.try_into().unwrap_or(u32::MAX)
                }
                ("timeout" | "build-timeout", Some(n)) => {
                    options.build_timeout = n.try_into().unwrap_or(u32::MAX)
                }
                ("max-build-log-size", Some(n)) => options.max_log_size = n,
                // Builds then refuse, as they do over the serve protocol.
                ("repeat" | "build-repeat", Some(n)) => {
                    options.nr_repeats = n.try_into().unwrap_or(u32::MAX)
                }
                _ => {
                    let msg = format!(
                        "warning: nixbuild ignores the client's setting '{name}': settings are \
                         the server's, except max-silent-time, timeout, max-build-log-size \
                         and repeat"
                    );
                    self.session.log(&StderrMessage::Next(msg.into_bytes()))?;
                }
            }
        }
        self.options = options;
        Ok(())
    }

    async fn valid(&self, p: &StorePath) -> Result<bool, Failure> {
        let paths = BTreeSet::from([p.clone()]);
        Ok(!self
            .ctx
            .query_valid_paths(paths)
            .await
            .map_err(refused)?
            .is_empty())
    }

    async fn path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, Failure> {
        let path = p.clone();
        let found = self
            .ctx
            .query("querying path info", true, move |s, a| {
                s.query_path_info_with_time(a, &path)
            })
            .await
            .map_err(refused)?;
        let Some((info, registration_time)) = found else {
            return Ok(None);
        };
        let Some(nar_hash) = info.nar_hash else {
            return refuse(format!("path '{p}' has no NAR hash on this server"));
        };
        Ok(Some(PathInfo {
            deriver: info.deriver,
            nar_hash,
            references: info.references,
            registration_time,
            nar_size: info.nar_size,
            ultimate: false,
            sigs: info.sigs,
            ca: info.ca,
        }))
    }

    /// The outputs of the derivation `drv` (valid for the account), by name; outputs without
    /// a path in advance are left out.
    async fn drv_outputs(&self, drv: &StorePath) -> Result<BTreeMap<String, StorePath>, Failure> {
        let path = drv.clone();
        let text = self
            .ctx
            .blocking(&format!("reading {drv}"), move |s, a| {
                s.read_small_file(a, &path, MAX_DRV_SIZE)
            })
            .await
            .map_err(refused)?;
        let Some(text) = text else {
            return refuse(format!("'{drv}' is not a derivation file"));
        };
        let parsed = match aterm::parse(&text) {
            Ok(d) => d,
            Err(e) => return refuse(format!("'{drv}' is not a valid derivation: {e}")),
        };
        Ok(parsed
            .basic
            .outputs
            .into_iter()
            .filter_map(|(name, out)| match out {
                DerivationOutput::InputAddressed(p) | DerivationOutput::Fixed { path: p, .. } => {
                    Some((name, p))
                }
                _ => None,
            })
            .collect())
    }

    /// QueryMissing: the derivations the graph build of `paths` would build, the paths it
    /// would fetch from binary caches with the bytes that takes, and the paths that are
    /// neither valid, substitutable nor buildable.
    async fn missing(&self, paths: Vec<DerivedPath>) -> Result<Missing, Failure> {
        self.ctx
            .check_count("QueryMissing", paths.len())
            .map_err(refused)?;
        let plan = self.ctx.plan_graph(paths, false).await.map_err(refused)?;
        let will_substitute: BTreeSet<StorePath> = plan.will_substitute().cloned().collect();
        let (download_size, nar_size) = self
            .ctx
            .substitution_sizes(will_substitute.clone())
            .await
            .map_err(refused)?;
        Ok(Missing {
            will_build: plan.will_build().cloned().collect(),
            will_substitute,
            unknown: plan.unknown().cloned().collect(),
            download_size,
            nar_size,
        })
    }

    /// BuildPaths and BuildPathsWithResults: the graph build of `paths`, each derivation a
    /// build activity of its own; the run, done, holds the results.
    async fn build_paths<R: AsyncRead + Unpin>(
        &mut self,
        paths: &[DerivedPath],
        input: &mut R,
        buf: &mut BytesMut,
    ) -> Result<GraphRun, Failure> {
        self.ctx
            .check_count("BuildPaths", paths.len())
            .map_err(refused)?;
        let plan = self
            .ctx
            .plan_graph(paths.to_vec(), true)
            .await
            .map_err(refused)?;
        for line in &plan.notes {
            self.session
                .log(&StderrMessage::Next(format!("{line}\n").into_bytes()))?;
        }
        let mut run = self.ctx.run_graph(plan, self.options, self.keep_going);
        let mut activities: HashMap<usize, u64> = HashMap::new();
        let max = self.ctx.settings().max_request_bytes;
        let n = run.derivations();
        loop {
            let mut watch =
                ClientWatch::new(&mut *input, &mut *buf, &mut self.held, &self.pool, max);
            let gone = || SessionError::GoneDuringGraph(n);
            let Some(event) = watch.wait(run.next(), gone).await? else {
                break;
            };
            match event {
                GraphEvent::Started(node) => {
                    let id = self.start_build_activity(run.drv_path(node))?;
                    activities.insert(node, id);
                }
                GraphEvent::Log(node, lines) => match activities.get(&node) {
                    Some(&id) => self.log_lines(id, &mut Vec::new(), &lines)?,
                    None => self.session.log(&StderrMessage::Next(lines.to_vec()))?,
                },
                GraphEvent::Finished(node, outcome) => {
                    if let Some(id) = activities.remove(&node) {
                        self.session.log(&StderrMessage::StopActivity { id })?;
                    }
                    // As Nix's daemon logs a failed goal: the client shows it as it happens,
                    // whatever the request's answer says about its own paths.
                    if let Some(line) = failure_line(&outcome) {
                        self.session.log(&StderrMessage::Next(line.into_bytes()))?;
                    }
                    tracing::info!(
                        account = %self.ctx.settings().account,
                        drv = %run.drv_path(node),
                        status = ?outcome.status,
                        "worker build done"
                    );
                }
            }
            self.flush().await?;
        }
        Ok(run)
    }

    /// Fetches from the binary caches those of `paths` the account lacks, each fetched
    /// path a log line to the client (as Nix's daemon says "copying path … from …").
    async fn substitute(&mut self, paths: &BTreeSet<StorePath>) -> Result<(), Failure> {
        let Some(mut fetch) = self.ctx.substitute(paths) else {
            return Ok(());
        };
        while let Some(line) = fetch.next_line().await {
            self.session
                .log(&StderrMessage::Next(format!("{line}\n").into_bytes()))?;
            self.flush().await?;
        }
        fetch.finish().await.map_err(refused)
    }

    /// Starts the build activity of `drv_path` (what `nix build -L` prefixes its lines
    /// with) and returns its id.
    fn start_build_activity(&mut self, drv_path: &StorePath) -> Result<u64, SessionError> {
        let id = self.next_activity;
        self.next_activity += 1;
        self.session.log(&StderrMessage::StartActivity {
            id,
            level: 3, // lvlInfo
            kind: ActivityType::Build as u64,
            text: format!("building '{drv_path}'").into_bytes(),
            fields: vec![
                LogField::String(drv_path.to_absolute().into_bytes()),
                LogField::String(Vec::new()),
                LogField::Int(1),
                LogField::Int(1),
            ],
            parent: 0,
        })?;
        Ok(id)
    }

    /// Submits `job` and waits for its outcome, its log going to the client as a build
    /// activity's lines. The client's input is watched meanwhile: if it ends, the client is
    /// gone, and so is this session's interest in the build.
    async fn wait_for<R: AsyncRead + Unpin>(
        &mut self,
        job: BuildJob,
        input: &mut R,
        buf: &mut BytesMut,
    ) -> Result<Arc<Outcome>, SessionError> {
        let drv_path = job.drv_path.clone();
        let id = self.start_build_activity(&drv_path)?;
        self.flush().await?;
        let mut waiter = self.ctx.submit(job).await;
        let mut partial: Vec<u8> = Vec::new();
        let max = self.ctx.settings().max_request_bytes;
        let outcome = loop {
            let mut watch =
                ClientWatch::new(&mut *input, &mut *buf, &mut self.held, &self.pool, max);
            let gone = || SessionError::GoneDuringBuild(drv_path.clone());
            match watch.wait(waiter.next(), gone).await? {
                WaitEvent::Log(chunk) => {
                    self.log_lines(id, &mut partial, &chunk)?;
                    self.flush().await?;
                }
                WaitEvent::Done(outcome) => break outcome,
            }
        };
        if !partial.is_empty() {
            let line = std::mem::take(&mut partial);
            self.log_line(id, line)?;
        }
        self.session.log(&StderrMessage::StopActivity { id })?;
        tracing::info!(
            account = %self.ctx.settings().account,
            drv = %drv_path,
            status = ?outcome.status,
            "worker build done"
        );
        Ok(outcome)
    }

    /// Sends the complete lines of `chunk` (after what `partial` holds of the last line) as
    /// log lines of activity `id`, keeping an unfinished last line in `partial`.
    fn log_lines(
        &mut self,
        id: u64,
        partial: &mut Vec<u8>,
        chunk: &Bytes,
    ) -> Result<(), SessionError> {
        let mut rest = &chunk[..];
        while let Some(i) = rest.iter().position(|&c| c == b'\n') {
            partial.extend_from_slice(&rest[..i]);
            let line = std::mem::take(partial);
            self.log_line(id, line)?;
            rest = &rest[i + 1..];
        }
        partial.extend_from_slice(rest);
        Ok(())
    }

    fn log_line(&mut self, id: u64, line: Vec<u8>) -> Result<(), SessionError> {
        Ok(self.session.log(&StderrMessage::Result {
            id,
            kind: ResultType::BuildLogLine as u64,
            fields: vec![LogField::String(line)],
        })?)
    }

    /// NarFromPath: the path must be valid for the account before `STDERR_LAST`, after which
    /// the NAR follows raw.
    async fn nar_from_path(&mut self, path: StorePath) -> Handled {
        if !self.valid(&path).await? {
            return refuse(format!("path '{path}' is not valid"));
        }
        self.session.start_stream()?;
        let queued = self.session.take_output();
        self.out.stdout(queued).await?;
        let store = self.ctx.store().clone();
        let account = self.ctx.settings().account.clone();
        let what = format!("sending {path}");
        let sent = path.clone();
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let mut writer = ChunkWriter::new(tx, self.pool.clone());
        let task =
            tokio::task::spawn_blocking(move || store.export_nar_to(&account, &path, &mut writer));
        while let Some(chunk) = rx.recv().await {
            self.out.stdout(chunk).await?;
        }
        // After STDERR_LAST the answer cannot turn into an error: a failure here ends the
        // session.
        let bytes = task
            .await
            .map_err(SessionError::from)?
            .map_err(|e| SessionError::Service(store_error(&what)(e)))?;
        self.ctx.count_download(bytes);
        self.session.end_stream()?;
        self.out.flush().await?;
        tracing::info!(account = %self.ctx.settings().account, path = %sent, "sent NAR");
        Ok(())
    }

    /// Starts receiving the NAR of `info`; `answer` for AddToStoreNar.
    fn begin_nar(&mut self, info: Box<AddToStoreNar>, answer: bool) -> Handled {
        let upload = self.ctx.start_upload(info.ca, &self.pool);
        self.incoming = Some(Incoming::Nar {
            info,
            upload,
            answer,
        });
        Ok(())
    }

    async fn data(&mut self, chunk: Bytes) -> Handled {
        match &mut self.incoming {
            Some(Incoming::Nar { upload, info, .. }) => {
                self.ctx.charge_upload(chunk.len() as u64)?;
                if !upload.send(chunk).await {
                    // The task stopped early, which it does only on an error.
                    let what = format!("receiving {}", info.path);
                    if let Some(Incoming::Nar { upload, .. }) = self.incoming.take() {
                        upload.finish(what).await?;
                    }
                    return Err(
                        WorkerError::Misuse("the import task stopped without an error").into(),
                    );
                }
                Ok(())
            }
            Some(Incoming::Dump { data, held, .. }) => {
                let max = self.ctx.settings().max_request_bytes;
                let len = data.len() + chunk.len();
                if len > max {
                    return Err(SessionError::RequestTooLarge { max }.into());
                }
                held.resize(len as u64)
                    .map_err(|e| SessionError::BufferBudget {
                        limit: e.limit,
                        wanted: e.wanted,
                    })?;
                data.extend_from_slice(&chunk);
                Ok(())
            }
            Some(Incoming::Refuse(_)) => Ok(()),
            None => Err(WorkerError::Misuse("data without a request that takes it").into()),
        }
    }

    /// The payload (or a path's NAR) is complete: register it, or answer as its request
    /// asks.
    async fn data_end(&mut self) -> Handled {
        match self.incoming.take() {
            Some(Incoming::Nar {
                info,
                upload,
                answer,
            }) => {
                let import = upload.finish(format!("receiving {}", info.path)).await?;
                self.ctx.commit(import, add_claim(*info)).await?;
                before_upload_ack().await;
                if answer {
                    self.session.respond(&Response::Nothing)?;
                }
                Ok(())
            }
            Some(Incoming::Dump {
                name, form, data, ..
            }) => {
                let added = dump::add_to_store(&name, &form, data).map_err(refused)?;
                let path = self.add_whole(added).await?;
                let info = match self.session.version() >= WorkerVersion::V1_25 {
                    true => self.path_info(&path).await?.map(Box::new),
                    false => None,
                };
                Ok(self.session.respond(&Response::Added { path, info })?)
            }
            Some(Incoming::Refuse(msg)) => refuse(msg),
            None => Err(WorkerError::Misuse("end of data without a request that takes it").into()),
        }
    }

    /// Adds a path of AddToStore or AddTextToStore for the account: its NAR is written,
    /// verified against its content address and registered in one blocking task.
    async fn add_whole(&self, added: dump::Added) -> Result<StorePath, Failure> {
        let dump::Added {
            path,
            ca,
            references,
            nar,
        } = added;
        let claim = PathClaim {
            path: path.clone(),
            deriver: None,
            nar_hash: None,
            nar_size: None,
            references,
            registration_time: registration_time(0),
            ca: Some(ca),
            sigs: BTreeSet::new(),
        };
        let what = format!("adding {path}");
        self.ctx
            .blocking(&what, move |s, a| {
                let mut import = s.begin_import(a)?;
                import.expect_ca(&ca);
                import.write(&nar)?;
                import.commit(claim)
            })
            .await
            .map_err(refused)?;
        tracing::info!(account = %self.ctx.settings().account, path = %path, "registered added path");
        Ok(path)
    }
}
