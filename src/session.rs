//! The async driver of one `nix-store --serve` session: it feeds the client's bytes to the
//! sans-IO [`ServerSession`], carries out each request against the [`Store`] for one account,
//! and writes the answers to a [`SessionOutput`] (the protocol bytes, flushed after each
//! response, and human-readable messages on a separate stderr sink).
//!
//! Store calls block, so they run in `spawn_blocking`. NAR data never piles up in memory:
//! uploads go to the store's [`Import`] through a bounded channel (a slow disk slows the
//! client down), and downloads come from [`Store::export_nar_to`] through another, in chunks of
//! [`CHUNK`] bytes. When the client's stdout is a pipe, a download is written to it by the
//! blocking task itself instead, with large files' contents moved by `splice`, never copied
//! through this process.
//!
//! Any error ends the session as the real server does (docs/serve-protocol.md §12): `error: <msg>` on stderr,
//! and the caller ends the process (or relay) with a non-zero status. An unfinished import is
//! dropped, which removes its temporary files; nothing is registered half-way.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use nixbuild_core::budget::Reservation;
use nixbuild_core::hash::Hash;
use nixbuild_core::serve::{
    AddToStoreNar, BuildOptions, BuildPathsResult, BuildResult, BuildStatus, BuiltOutput, Event,
    ExportMarker, ExportTrailer, PathWithOutputs, Protocol, Request, Response, ServeError,
    ServerSession, ValidPathInfo,
};
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire::WireError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::buffers::{BufferPool, ChunkWriter, CHANNEL_DEPTH};
use crate::builds::{BuildJob, BuildService, GraphEvent, GraphPlan, Outcome, WaitEvent};
use crate::client_pipe::PipeLoan;
use crate::failpoint::failpoint_async;
use crate::pipes::{write_timed_out, PipeReadError, PipeSink, PipeSource};
use crate::service::{store_error, ServiceError, SessionContext, SessionSettings, Upload};
use crate::store::{Import, PathClaim, Store};

/// Size of the pieces NAR data moves in, from the client and to it (the dumper's, for
/// exports).
pub const CHUNK: usize = crate::nar_fs::CHUNK;

/// A buffer holding an unfinished request grows past a pool buffer in steps of this many
/// bytes, each reserved against the daemon's budget of buffered bytes before it is taken
/// (see `Driver::make_room`).
const BUFFER_STEP: usize = 1 << 20;

/// Least free room in the session's buffer for a read; below it the buffer grows.
const MIN_READ: usize = 64 << 10;

/// Why a session ended with an error. The message is what the client sees after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's bytes broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ServeError),
    /// The client's bytes broke the worker protocol (ssh-ng).
    #[error(transparent)]
    Worker(#[from] nixbuild_core::worker::WorkerError),
    /// ExportPaths names a path the account cannot see (the real server's message).
    #[error("path '{0}' is not valid")]
    NotValid(StorePath),
    /// A list in a request is longer than the configuration allows (the codec stops at the
    /// count, before the elements arrive).
    #[error("{0} (max_paths_per_request in [store] of the server's configuration)")]
    ListTooLong(ServeError),
    /// A string in a request is longer than the configuration allows (refused at its
    /// length, before its bytes arrive).
    #[error("{0} (max_request_bytes in [store] of the server's configuration)")]
    StringTooLong(ServeError),
    /// An unfinished request grew past the configured cap.
    #[error(
        "a request of more than {max} bytes (max_request_bytes in [store] of the server's \
         configuration)"
    )]
    RequestTooLarge {
        /// The cap.
        max: usize,
    },
    /// Holding more of an unfinished request would pass the daemon-wide budget of bytes
    /// held by all sessions.
    #[error(
        "this server already holds its maximum of {limit} bytes of unfinished requests \
         across all sessions, and this request needs {wanted} more; try again later \
         (max_buffered_bytes in [limits] of the server's configuration)"
    )]
    BufferBudget {
        /// The budget.
        limit: u64,
        /// The bytes the session asked for.
        wanted: u64,
    },
    /// The client sent nothing for too long.
    #[error("timed out after {secs} s waiting for the client {phase}")]
    Timeout {
        /// What the session was waiting for.
        phase: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// Reading from or writing to the client failed.
    #[error("connection to the client: {0}")]
    Io(#[from] io::Error),
    /// The client went away while a build it asked for was running.
    #[error("the client disconnected during the build of '{0}'")]
    GoneDuringBuild(StorePath),
    /// The client went away during a graph build it asked for.
    #[error("the client disconnected during a graph build of {0} derivations")]
    GoneDuringGraph(usize),
    /// The store, the build service or a limit of the account refused.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// Where a session's answers go: the protocol stream (stdout of `nix-store --serve`) and
/// human-readable messages (its stderr).
pub trait SessionOutput: Send {
    /// Writes protocol bytes.
    fn stdout(&mut self, bytes: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes a message for the user.
    fn stderr(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Pushes everything written so far to the client.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether the client's stdout is a pipe that [`SessionOutput::lend_stdout`] lends.
    fn stdout_is_pipe(&self) -> bool {
        false
    }
    /// Lends the client's stdout pipe to a blocking task that writes NAR data to it
    /// directly (after a flush; nothing else is written until the loan is dropped). `None`
    /// when it is not a pipe (the default).
    fn lend_stdout(&mut self) -> Option<io::Result<PipeLoan>> {
        None
    }
    /// Lends the client's stdin pipe to a blocking task that reads an upload's NAR from it
    /// directly (the session reads nothing until the loan is dropped). `None` when it is not
    /// a pipe (the default).
    fn lend_stdin(&mut self) -> Option<io::Result<PipeLoan>> {
        None
    }
}

/// Runs one session to its end: `Ok` when the client closed its side at a command boundary,
/// otherwise the error, which has already been written to `out`'s stderr as `error: <msg>`.
pub async fn serve<R, O>(
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
    let mut driver = Driver {
        ctx: SessionContext::new(store, builds, settings),
        session: ServerSession::new(settings.write_allowed, settings.limits),
        out: &mut out,
        incoming: Incoming::Idle,
        pipe_upload: None,
        pool: BufferPool::default(),
        pending_build: None,
        held: Reservation::new(settings.buffer_budget.clone()),
    };
    let result = driver.run(input).await;
    if let Err(e) = &result {
        let pending = driver.session.take_output();
        last_words(driver.out, pending, e).await;
    }
    result
}

/// When a session's next bytes are due: the whole handshake within `handshake_timeout` of
/// the start, then each read within `idle_timeout`.
pub(crate) struct ReadDeadline {
    handshake_by: tokio::time::Instant,
    handshake: Duration,
    idle: Duration,
    /// The handshake is done.
    pub(crate) greeted: bool,
}

impl ReadDeadline {
    /// The deadlines of a session with `settings`, starting now.
    pub(crate) fn new(settings: &SessionSettings) -> Self {
        ReadDeadline {
            handshake_by: tokio::time::Instant::now() + settings.handshake_timeout,
            handshake: settings.handshake_timeout,
            idle: settings.idle_timeout,
            greeted: false,
        }
    }

    /// Reads the client's next bytes into `buf` (0 at the end of its input), or fails with
    /// the timeout that passed.
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        &self,
        input: &mut R,
        buf: &mut BytesMut,
    ) -> Result<usize, SessionError> {
        let (deadline, phase, secs) = if self.greeted {
            let idle = tokio::time::Instant::now() + self.idle;
            (idle, "to send more", self.idle.as_secs())
        } else {
            let t = self.handshake;
            (self.handshake_by, "to complete the handshake", t.as_secs())
        };
        Ok(tokio::time::timeout_at(deadline, input.read_buf(buf))
            .await
            .map_err(|_| SessionError::Timeout { phase, secs })??)
    }
}

/// Sends what a session that ends with `e` still has for the client: `pending` protocol
/// bytes (what was answered before the error, or the error itself on a log channel), then
/// `error: <e>` on stderr. The client may already be gone; the caller logs the error either
/// way.
pub(crate) async fn last_words<O: SessionOutput>(out: &mut O, pending: Bytes, e: &SessionError) {
    if !pending.is_empty() && out.stdout(pending).await.is_ok() {
        let _ = out.flush().await;
    }
    let _ = out.stderr(format!("error: {e}\n").as_bytes()).await;
}

/// Runs one session of `protocol` to its end: [`serve`] for the serve protocol,
/// [`crate::worker_session::serve_worker`] for the worker protocol (the relay and the SSH
/// front door both pick the driver this way).
pub async fn serve_protocol<R, O>(
    protocol: Protocol,
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
    match protocol {
        Protocol::Serve => serve(store, builds, settings, input, out).await,
        Protocol::Daemon => {
            crate::worker_session::serve_worker(store, builds, settings, input, out).await
        }
    }
}

/// A [`SessionOutput`] over two byte streams: the protocol to `stdout` (buffered, flushed
/// after each response), messages to `stderr`; for embedding a session behind any other
/// transport (the SSH front door has its own, which hands NAR chunks to russh without
/// copying them).
pub struct StreamOutput<W, E> {
    stdout: BufWriter<W>,
    stderr: E,
}

impl<W: AsyncWrite + Unpin + Send, E: AsyncWrite + Unpin + Send> StreamOutput<W, E> {
    /// Protocol bytes to `stdout`, messages to `stderr`.
    pub fn new(stdout: W, stderr: E) -> Self {
        StreamOutput {
            stdout: BufWriter::with_capacity(64 * 1024, stdout),
            stderr,
        }
    }
}

impl<W: AsyncWrite + Unpin + Send, E: AsyncWrite + Unpin + Send> SessionOutput
    for StreamOutput<W, E>
{
    async fn stdout(&mut self, bytes: Bytes) -> io::Result<()> {
        self.stdout.write_all(&bytes).await
    }

    async fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stderr.write_all(bytes).await?;
        self.stderr.flush().await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.stdout.flush().await
    }
}

/// Runs one session for `settings.account` over plain streams (see [`serve`] and
/// [`StreamOutput`]), flushing `stdout` at the end.
/// (The streams are `Sync` because the session's future holds references to its output
/// across awaits and must be `Send`.)
pub async fn serve_streams<R, W, E>(
    store: &Store,
    builds: &BuildService,
    settings: &SessionSettings,
    input: R,
    stdout: W,
    stderr: E,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + Sync,
    E: AsyncWrite + Unpin + Send + Sync,
{
    let mut out = StreamOutput::new(stdout, stderr);
    let result = serve(store, builds, settings, input, &mut out).await;
    let flushed = out.flush().await;
    result.and(flushed.map_err(SessionError::Io))
}

/// A [`SessionOutput`] whose every write and flush fails with `TimedOut` after `limit`: a
/// client that stops reading cannot hold its session (and an export task feeding it)
/// forever.
pub(crate) struct WriteTimeout<'a, O> {
    pub(crate) inner: &'a mut O,
    pub(crate) limit: Duration,
}

impl<O: SessionOutput> WriteTimeout<'_, O> {
    async fn within<T>(
        limit: Duration,
        f: impl Future<Output = io::Result<T>> + Send,
    ) -> io::Result<T> {
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| Err(write_timed_out(limit)))
    }
}

impl<O: SessionOutput> SessionOutput for WriteTimeout<'_, O> {
    async fn stdout(&mut self, bytes: Bytes) -> io::Result<()> {
        Self::within(self.limit, self.inner.stdout(bytes)).await
    }

    async fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        Self::within(self.limit, self.inner.stderr(bytes)).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        Self::within(self.limit, self.inner.flush()).await
    }

    fn stdout_is_pipe(&self) -> bool {
        self.inner.stdout_is_pipe()
    }

    fn lend_stdout(&mut self) -> Option<io::Result<PipeLoan>> {
        self.inner.lend_stdout()
    }

    fn lend_stdin(&mut self) -> Option<io::Result<PipeLoan>> {
        self.inner.lend_stdin()
    }
}

/// The NAR data the session is receiving, if any: what the sans-IO session's events mean
/// depends on it.
enum Incoming {
    /// No upload in progress.
    Idle,
    /// AddToStoreNar: the header, and the NAR arriving as chunk events.
    Add {
        header: Box<AddToStoreNar>,
        upload: Upload,
    },
    /// ImportPaths: the entries begun so far in this stream, and the current one.
    Import { entries: usize, entry: ImportEntry },
}

/// What an ImportPaths entry's NAR is, in errors.
const IMPORT_NAR: &str = "receiving a NAR in ImportPaths";

/// Where the current entry of an ImportPaths stream is.
enum ImportEntry {
    /// Between entries: the next chunk begins one.
    Between,
    /// Its NAR is arriving.
    Receiving(Upload),
    /// Its NAR is complete; the trailer that names the path comes next.
    Received(Box<Import>),
}

/// A build request whose answer waits for builds to finish.
enum PendingBuild {
    /// BuildDerivation: answered with a BuildResult.
    Derivation(Box<BuildJob>),
    /// BuildPaths: the graph build of the paths asked for, with the client's limits,
    /// answered with 0 or a failure code.
    Paths(Box<GraphPlan>, BuildOptions),
}

struct Driver<'a, O> {
    /// The store, build service and limits, as the session's account.
    ctx: SessionContext<'a>,
    session: ServerSession,
    out: &'a mut O,
    /// The NAR being received, if any.
    incoming: Incoming,
    /// AddToStoreNar just decoded, whose NAR is read straight from the client's stdin pipe
    /// (lent for it) before the next event.
    pipe_upload: Option<(Box<AddToStoreNar>, PipeLoan)>,
    /// Chunk buffers shared with the blocking tasks, reused for the whole session.
    pool: BufferPool,
    /// The build request just decoded, run before the next event.
    pending_build: Option<PendingBuild>,
    /// The budget reserved for the session's buffer: its whole allocation once it has grown
    /// past a pool buffer, nothing while it is one.
    held: Reservation,
}

impl<O: SessionOutput> Driver<'_, O> {
    async fn run<R: AsyncRead + Unpin>(&mut self, mut input: R) -> Result<(), SessionError> {
        let mut buf = BytesMut::new();
        let mut due = ReadDeadline::new(self.ctx.settings());
        loop {
            while let Some(event) = self.session.poll(&mut buf).map_err(|e| self.protocol(e))? {
                due.greeted |= matches!(event, Event::Hello { .. });
                self.handle(event).await?;
                if let Some(pending) = self.pending_build.take() {
                    self.run_build(pending, &mut input, &mut buf).await?;
                }
                if let Some((header, stdin)) = self.pipe_upload.take() {
                    self.upload_from_pipe(*header, stdin, &mut buf).await?;
                }
            }
            // What is left is the start of one request or trailer the session waits to
            // complete (NAR data never stays in `buf`): at `max` bytes, it can only end
            // past the cap.
            let max = self.ctx.settings().max_request_bytes;
            if buf.len() >= max {
                return Err(SessionError::RequestTooLarge { max });
            }
            let output = self.session.take_output();
            if !output.is_empty() {
                self.out.stdout(output).await?;
                self.out.flush().await?;
            }
            self.make_room(&mut buf)?;
            if due.read(&mut input, &mut buf).await? == 0 {
                return Ok(self.session.end_of_input(&buf)?);
            }
        }
    }

    /// A protocol error, with the configuration key to raise when a list hit its limit.
    fn protocol(&self, e: ServeError) -> SessionError {
        match e {
            ServeError::Wire(w) => over_limit(w, self.ctx.settings()),
            e => SessionError::Protocol(e),
        }
    }

    async fn handle(&mut self, event: Event) -> Result<(), SessionError> {
        match event {
            Event::Hello { client, negotiated } => {
                tracing::debug!(
                    account = %self.ctx.settings().account,
                    client = format_args!("{:#x}", client.to_wire()),
                    negotiated = format_args!("{:#x}", negotiated.to_wire()),
                    "handshake"
                );
                Ok(())
            }
            Event::Request(req) => self.request(req).await,
            Event::NarChunk(chunk) => self.nar_chunk(chunk).await,
            Event::NarEnd => self.nar_end().await,
            Event::ImportEntry(trailer) => self.commit_import_entry(trailer).await,
            Event::ImportEnd => {
                self.incoming = Incoming::Idle;
                Ok(self.session.respond(&Response::Imported)?)
            }
        }
    }

    async fn request(&mut self, req: Request) -> Result<(), SessionError> {
        let account = &self.ctx.settings().account;
        match req {
            Request::QueryValidPaths {
                paths, substitute, ..
            } => {
                // `lock` needs GC roots, which this server does not have: nothing it stores
                // is collected. Substitution adds to the store, so like `nix-store --serve`
                // it needs `--write`.
                self.ctx.check_count("QueryValidPaths", paths.len())?;
                if substitute && self.ctx.settings().write_allowed {
                    if let Some(mut fetch) = self.ctx.substitute(&paths) {
                        // The serve protocol has no log messages: progress goes to stderr.
                        while let Some(line) = fetch.next_line().await {
                            self.out.stderr(format!("{line}\n").as_bytes()).await?;
                        }
                        fetch.finish().await?;
                    }
                }
                let valid = self.ctx.query_valid_paths(paths).await?;
                Ok(self.session.respond(&Response::ValidPaths(valid))?)
            }
            Request::QueryPathInfos { paths } => {
                self.ctx.check_count("QueryPathInfos", paths.len())?;
                let infos = self.ctx.query_path_infos(paths).await?;
                Ok(self.session.respond(&Response::PathInfos(infos))?)
            }
            Request::QueryClosure {
                include_outputs,
                paths,
            } => {
                self.ctx.check_count("QueryClosure", paths.len())?;
                let closure = self.ctx.query_closure(paths, include_outputs).await?;
                Ok(self.session.respond(&Response::Closure(closure))?)
            }
            Request::DumpStorePath { path } => {
                self.stream_nar(path).await?;
                self.session.end_stream()?;
                Ok(self.out.flush().await?)
            }
            Request::ExportPaths { paths, .. } => self.export_paths(paths).await,
            Request::AddToStoreNar(header) => {
                match self.out.lend_stdin() {
                    Some(stdin) => self.pipe_upload = Some((header, stdin?)),
                    None => {
                        let upload = self.ctx.start_upload(header.ca, &self.pool);
                        self.incoming = Incoming::Add { header, upload };
                    }
                }
                Ok(())
            }
            Request::ImportPaths => {
                self.incoming = Incoming::Import {
                    entries: 0,
                    entry: ImportEntry::Between,
                };
                Ok(())
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                options,
            } => {
                self.pending_build = Some(PendingBuild::Derivation(Box::new(BuildJob {
                    account: account.clone(),
                    drv_path,
                    drv: *drv,
                    options,
                })));
                Ok(())
            }
            Request::BuildPaths { paths, options } => {
                self.ctx.check_count("BuildPaths", paths.len())?;
                // The whole graph of the derivations asked for is built here; paths that
                // are not derivations must be valid already (newer clients send BuildPaths
                // for `nix copy --from`).
                let requests = paths
                    .into_iter()
                    .map(PathWithOutputs::into_derived)
                    .collect();
                match self.ctx.plan_graph(requests, true).await {
                    Ok(plan) => {
                        for line in &plan.notes {
                            self.out.stderr(format!("{line}\n").as_bytes()).await?;
                        }
                        self.pending_build = Some(PendingBuild::Paths(Box::new(plan), options));
                        Ok(())
                    }
                    Err(e) => self.build_paths_failed(100, e.to_string()),
                }
            }
        }
    }

    /// Answers BuildPaths with a failure: an exit code, not a status (100 is the real
    /// server's "build failure", 101 its timeout; codes below 3 desynchronise old clients,
    /// docs/serve-protocol.md §4.6).
    fn build_paths_failed(&mut self, code: u64, msg: String) -> Result<(), SessionError> {
        tracing::info!(account = %self.ctx.settings().account, "BuildPaths failed: {msg}");
        let response = BuildPathsResult::Failure {
            code,
            msg: msg.into_bytes(),
        };
        Ok(self.session.respond(&Response::BuildPaths(response))?)
    }

    /// Runs the builds of a BuildDerivation or BuildPaths request and answers it. Meanwhile
    /// the builds' logs go to the client's stderr, and the client's input is watched: if it
    /// ends, the client is gone, and so is this session's interest in the build.
    async fn run_build<R: AsyncRead + Unpin>(
        &mut self,
        pending: PendingBuild,
        input: &mut R,
        buf: &mut BytesMut,
    ) -> Result<(), SessionError> {
        match pending {
            PendingBuild::Derivation(job) => {
                let received = std::time::Instant::now();
                let drv_hash = job.drv.hash_modulo();
                let drv_path = job.drv_path.clone();
                let version = self.session.version();
                let refused = (version < nixbuild_core::serve::ProtocolVersion::V2_6)
                    .then(|| {
                        let protocol = format!("serve protocol 2.{}", version.minor());
                        crate::builds::refuse_unreportable(&job, &protocol)
                    })
                    .flatten();
                let outcome = match refused {
                    Some(refused) => Arc::new(refused),
                    None => self.wait_for(*job, input, buf).await?,
                };
                let result = build_result(&outcome, Some(&drv_hash));
                before_build_result().await;
                self.session.respond(&Response::Build(Box::new(result)))?;
                // What benches/compare reads: BuildDerivation received → BuildResult ready.
                tracing::info!(
                    account = %self.ctx.settings().account,
                    drv = %drv_path,
                    status = ?outcome.status,
                    micros = received.elapsed().as_micros() as u64,
                    "answered BuildDerivation"
                );
                Ok(())
            }
            PendingBuild::Paths(plan, options) => {
                let mut run = self.ctx.run_graph(*plan, options, None);
                let n = run.derivations();
                loop {
                    let max = self.ctx.settings().max_request_bytes;
                    let mut watch =
                        ClientWatch::new(&mut *input, &mut *buf, &mut self.held, &self.pool, max);
                    let gone = || SessionError::GoneDuringGraph(n);
                    let Some(event) = watch.wait(run.next(), gone).await? else {
                        break;
                    };
                    // The serve protocol has no activities: the builds' lines go to stderr
                    // as they come, whole lines at a time, and so does each failure.
                    match event {
                        GraphEvent::Log(_, lines) => self.out.stderr(&lines).await?,
                        GraphEvent::Finished(_, outcome) => {
                            if let Some(line) = failure_line(&outcome) {
                                self.out.stderr(line.as_bytes()).await?;
                            }
                        }
                        GraphEvent::Started(_) => {}
                    }
                }
                match run.failure() {
                    Some(outcome) => {
                        let code = if outcome.status == BuildStatus::TimedOut {
                            101
                        } else {
                            100
                        };
                        self.build_paths_failed(code, outcome.message)
                    }
                    None => Ok(self
                        .session
                        .respond(&Response::BuildPaths(BuildPathsResult::Success))?),
                }
            }
        }
    }

    /// Submits `job` and waits for its outcome, forwarding its log.
    async fn wait_for<R: AsyncRead + Unpin>(
        &mut self,
        job: BuildJob,
        input: &mut R,
        buf: &mut BytesMut,
    ) -> Result<Arc<Outcome>, SessionError> {
        let drv_path = job.drv_path.clone();
        let mut waiter = self.ctx.submit(job).await;
        loop {
            let max = self.ctx.settings().max_request_bytes;
            let mut watch =
                ClientWatch::new(&mut *input, &mut *buf, &mut self.held, &self.pool, max);
            let gone = || SessionError::GoneDuringBuild(drv_path.clone());
            match watch.wait(waiter.next(), gone).await? {
                WaitEvent::Log(chunk) => self.out.stderr(&chunk).await?,
                WaitEvent::Done(outcome) => return Ok(outcome),
            }
        }
    }

    /// Gets `buf` ready for the next read (see [`make_room`]).
    fn make_room(&mut self, buf: &mut BytesMut) -> Result<(), SessionError> {
        let max = self.ctx.settings().max_request_bytes;
        make_room(buf, &mut self.held, &self.pool, max)
    }

    async fn nar_chunk(&mut self, chunk: Bytes) -> Result<(), SessionError> {
        self.ctx.charge_upload(chunk.len() as u64)?;
        let upload = match &mut self.incoming {
            Incoming::Add { upload, .. } => upload,
            Incoming::Import { entries, entry } => {
                if matches!(entry, ImportEntry::Between) {
                    // The first chunk of an entry's NAR.
                    *entries += 1;
                    self.ctx.check_count("ImportPaths", *entries)?;
                    *entry = ImportEntry::Receiving(self.ctx.start_upload(None, &self.pool));
                }
                match entry {
                    ImportEntry::Receiving(upload) => upload,
                    _ => return Err(ServeError::Misuse("NAR data after an entry's NAR").into()),
                }
            }
            Incoming::Idle => return Err(ServeError::Misuse("NAR data without an upload").into()),
        };
        if !upload.send(chunk).await {
            // The task stopped early, which it does only on an error: its result says why.
            let (upload, what) = match std::mem::replace(&mut self.incoming, Incoming::Idle) {
                Incoming::Add { header, upload } => (upload, format!("receiving {}", header.path)),
                Incoming::Import {
                    entry: ImportEntry::Receiving(upload),
                    ..
                } => (upload, IMPORT_NAR.to_owned()),
                _ => return Err(ServeError::Misuse("NAR data without an upload").into()),
            };
            upload.finish(what).await?;
            return Err(ServeError::Misuse("the import task stopped without an error").into());
        }
        Ok(())
    }

    /// The NAR is complete: closes the channel and waits for the import task, then commits
    /// an AddToStoreNar, or keeps an ImportPaths entry for its trailer. Errors with the
    /// store's error if the import failed.
    async fn nar_end(&mut self) -> Result<(), SessionError> {
        match std::mem::replace(&mut self.incoming, Incoming::Idle) {
            Incoming::Add { header, upload } => {
                let import = upload.finish(format!("receiving {}", header.path)).await?;
                self.commit_add(*header, import).await
            }
            Incoming::Import {
                entries,
                entry: ImportEntry::Receiving(upload),
            } => {
                let import = upload.finish(IMPORT_NAR.to_owned()).await?;
                self.incoming = Incoming::Import {
                    entries,
                    entry: ImportEntry::Received(Box::new(import)),
                };
                Ok(())
            }
            _ => Err(ServeError::Misuse("end of a NAR without an upload").into()),
        }
    }

    async fn commit_add(&mut self, h: AddToStoreNar, import: Import) -> Result<(), SessionError> {
        self.ctx.commit(import, add_claim(h)).await?;
        self.acknowledge_add().await
    }

    /// Tells the client its AddToStoreNar path is registered.
    async fn acknowledge_add(&mut self) -> Result<(), SessionError> {
        before_upload_ack().await;
        Ok(self.session.respond(&Response::Added)?)
    }

    /// AddToStoreNar when the client's stdin is a pipe: one blocking task takes the NAR's
    /// start from `buf`, reads the rest (exactly what remains, never a byte more) straight
    /// from the pipe into a new [`Import`], and commits it. The NAR's bytes then cross no
    /// channel, and the path costs one hand-over to a blocking thread and back instead of
    /// one per chunk and another for the commit. The import itself is unchanged: verified
    /// before it is published, and published before the client hears `Added`.
    async fn upload_from_pipe(
        &mut self,
        h: AddToStoreNar,
        stdin: PipeLoan,
        buf: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let size = h.nar_size;
        self.ctx.charge_upload(size)?;
        // The loan itself goes to the blocking task (no second descriptor to make and
        // close) and comes back with it, to rejoin tokio's poller here.
        let mut source = PipeSource::new(stdin, self.ctx.settings().idle_timeout);
        let head_len = usize::try_from(size).map_or(buf.len(), |s| s.min(buf.len()));
        let head = buf.split_to(head_len).freeze();
        let store = self.ctx.store().clone();
        let account = self.ctx.settings().account.clone();
        let pool = self.pool.clone();
        let path = h.path.clone();
        let claim = add_claim(h);
        let task = tokio::task::spawn_blocking(move || {
            let received = receive_from_pipe(&store, &account, claim, head, &mut source, &pool);
            (received, source)
        });
        let (received, source) = task.await?;
        // The session reads the client through tokio again.
        drop(source);
        received?;
        self.session.nar_body_taken(size)?;
        tracing::info!(account = %self.ctx.settings().account, path = %path, "registered import");
        self.acknowledge_add().await
    }

    async fn commit_import_entry(&mut self, t: ExportTrailer) -> Result<(), SessionError> {
        let Incoming::Import { entry, .. } = &mut self.incoming else {
            return Err(ServeError::Misuse("export trailer outside ImportPaths").into());
        };
        let ImportEntry::Received(import) = std::mem::replace(entry, ImportEntry::Between) else {
            return Err(ServeError::Misuse("export trailer without a NAR").into());
        };
        // ImportPaths claims no hash or size (the NAR is its own) and, as upstream, records
        // no ca and no signatures (docs/serve-protocol.md §4.5).
        let claim = PathClaim {
            path: t.path,
            deriver: t.deriver,
            nar_hash: None,
            nar_size: None,
            references: t.references,
            registration_time: registration_time(0),
            ca: None,
            sigs: BTreeSet::new(),
        };
        Ok(self.ctx.commit(*import, claim).await?)
    }

    /// Sends the NAR of `path` as it comes off the disk.
    async fn stream_nar(&mut self, path: StorePath) -> Result<(), SessionError> {
        let store = self.ctx.store().clone();
        let account = self.ctx.settings().account.clone();
        let what = format!("sending {path}");
        if self.out.stdout_is_pipe() {
            self.send_before_stream().await?;
            self.out.flush().await?;
            let stdout = match self.out.lend_stdout() {
                Some(loan) => loan?,
                None => return Err(ServeError::Misuse("a pipe that cannot be lent").into()),
            };
            // The loan goes to the blocking task and comes back with it, as for uploads.
            let mut sink = PipeSink::new(stdout, self.ctx.settings().write_timeout);
            let task = tokio::task::spawn_blocking(move || {
                let sent = store.export_nar_to(&account, &path, &mut sink);
                (sent, sink)
            });
            let (sent, sink) = task.await?;
            // The session writes to the client through tokio again.
            drop(sink);
            let sent = sent.map_err(store_error(&what))?;
            self.ctx.count_download(sent);
            return Ok(());
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let mut writer = ChunkWriter::new(tx, self.pool.clone());
        let task =
            tokio::task::spawn_blocking(move || store.export_nar_to(&account, &path, &mut writer));
        while let Some(chunk) = rx.recv().await {
            // The chunk goes out as it is rather than copied into the session's output
            // first, and comes back to the pool once sent.
            self.send_before_stream().await?;
            self.out.stdout(chunk).await?;
        }
        let sent = task.await?.map_err(store_error(&what))?;
        self.ctx.count_download(sent);
        Ok(())
    }

    /// Before NAR bytes that bypass the sans-IO session: checks that a stream is in
    /// progress (the empty send) and sends what the session still holds ahead of them
    /// (ExportPaths' entry header).
    async fn send_before_stream(&mut self) -> Result<(), SessionError> {
        self.session.send_stream(&[])?;
        let queued = self.session.take_output();
        if !queued.is_empty() {
            self.out.stdout(queued).await?;
        }
        Ok(())
    }

    /// ExportPaths (legacy): an export stream of `paths`, dependencies first.
    async fn export_paths(&mut self, paths: BTreeSet<StorePath>) -> Result<(), SessionError> {
        self.ctx.check_count("ExportPaths", paths.len())?;
        let infos = self.ctx.query_path_infos(paths.clone()).await?;
        if let Some(p) = paths.iter().find(|p| !infos.contains_key(p)) {
            return Err(SessionError::NotValid(p.clone()));
        }
        let mut header = Vec::new();
        for path in dependencies_first(&infos) {
            let info = &infos[&path];
            header.clear();
            ExportMarker::Entry.encode(&mut header);
            self.session.send_stream(&header)?;
            self.stream_nar(path.clone()).await?;
            let mut trailer = Vec::new();
            ExportTrailer {
                path: path.clone(),
                references: info.references.clone(),
                deriver: info.deriver.clone(),
                legacy_signature: None,
            }
            .encode(&mut trailer);
            self.session.send_stream(&trailer)?;
        }
        header.clear();
        ExportMarker::End.encode(&mut header);
        self.session.send_stream(&header)?;
        self.out.stdout(self.session.take_output()).await?;
        self.session.end_stream()?;
        Ok(self.out.flush().await?)
    }
}

/// The line a client is shown when a derivation of its graph build failed (`error: ` and the
/// build's message, with its log's tail), as Nix's daemon logs a failed build; `None` for a
/// success, or a derivation that did not run because another failed (its dependents' final
/// answers say so).
pub(crate) fn failure_line(outcome: &Outcome) -> Option<String> {
    match outcome.status {
        s if s.is_success() => None,
        BuildStatus::DependencyFailed => None,
        _ => Some(format!("error: {}\n", outcome.message)),
    }
}

/// Where the client's input goes while a session waits for a build: `buf`, growing up to
/// the request cap `max` within the session's reservation `held` (pipelined requests are kept
/// for after the build).
pub(crate) struct ClientWatch<'a, R> {
    input: &'a mut R,
    buf: &'a mut BytesMut,
    held: &'a mut Reservation,
    pool: &'a BufferPool,
    max: usize,
}

impl<'a, R: AsyncRead + Unpin> ClientWatch<'a, R> {
    /// Reads `input` into `buf`, as [`ClientWatch`] says.
    pub fn new(
        input: &'a mut R,
        buf: &'a mut BytesMut,
        held: &'a mut Reservation,
        pool: &'a BufferPool,
        max: usize,
    ) -> Self {
        ClientWatch {
            input,
            buf,
            held,
            pool,
            max,
        }
    }

    /// Waits for `next` (a cancel-safe future: a build's or a graph build's next event),
    /// reading what the client sends meanwhile. The end of the client's input means it went
    /// away: the error is `gone()`, and the caller drops what it waited on, which ends the
    /// builds no other client waits for.
    pub async fn wait<T>(
        &mut self,
        next: impl Future<Output = T>,
        gone: impl FnOnce() -> SessionError,
    ) -> Result<T, SessionError> {
        tokio::pin!(next);
        loop {
            if self.buf.len() < self.max {
                make_room(self.buf, self.held, self.pool, self.max)?;
            }
            tokio::select! {
                // An event already there wins over the end of the client's input.
                biased;
                event = &mut next => return Ok(event),
                read = self.input.read_buf(self.buf), if self.buf.len() < self.max => {
                    if read? == 0 {
                        return Err(gone());
                    }
                }
            }
        }
    }
}

/// Gets `buf` ready for the next read, keeping `held` equal to its allocation
/// beyond a pool buffer. An empty buffer becomes a pool buffer (so that an upload's
/// chunks, views of it, come back to the pool once imported), with nothing reserved.
/// Otherwise it holds the start of an unfinished request (or, during a build, pipelined
/// ones), less than `max_request_bytes`. When it has less than [`MIN_READ`] free, it
/// grows to `len + CHUNK` rounded up to [`BUFFER_STEP`] (at most `max_request_bytes`),
/// reserved against the daemon's budget first, together with the allocation it leaves
/// (the allocator may copy it to a new block, and both are resident until the copy is
/// done): a reservation that does not fit ends the session, having taken nothing. When a
/// large buffer now holds much less (a large request was answered, the start of the next
/// one is left), it shrinks the same way, back to a pool buffer when the rest fits one.
pub(crate) fn make_room(
    buf: &mut BytesMut,
    held: &mut Reservation,
    pool: &BufferPool,
    max: usize,
) -> Result<(), SessionError> {
    if buf.is_empty() {
        *buf = pool.take();
        held.clear();
        return Ok(());
    }
    let len = buf.len();
    let target = (len + CHUNK).next_multiple_of(BUFFER_STEP).min(max);
    // `capacity` counts from the start of the data: room already used for earlier
    // requests is not counted, but it is part of the allocation `held` covers.
    let short = buf.capacity() - len < MIN_READ && buf.capacity() < target;
    let oversized = held.held() > target as u64;
    if !short && !oversized {
        return Ok(());
    }
    if len + MIN_READ <= CHUNK {
        let mut fresh = pool.take();
        fresh.extend_from_slice(buf);
        *buf = fresh;
        held.clear();
        return Ok(());
    }
    let leaving = held.held();
    held.resize(leaving + target as u64)
        .map_err(|e| SessionError::BufferBudget {
            limit: e.limit,
            wanted: e.wanted,
        })?;
    // In place when the buffer is the only view of its allocation (realloc, which moves
    // large blocks without copying); a copy otherwise.
    let mut bytes = Vec::from(std::mem::take(buf));
    if bytes.capacity() < target {
        bytes.reserve_exact(target - bytes.len());
    } else {
        bytes.shrink_to(target);
    }
    // (`Bytes` keeps the vector and its capacity; the conversion back takes it over.)
    *buf = BytesMut::from(Bytes::from(bytes));
    // A shrink, which cannot fail: the old allocation is gone.
    let _ = held.resize(target as u64);
    Ok(())
}

/// The last step before a client of either protocol is told that its upload is registered
/// (the failpoint `import-before-ack`).
pub(crate) async fn before_upload_ack() {
    failpoint_async!("import-before-ack");
}

/// The last step before a BuildResult goes to a client of either protocol (the failpoint
/// `build-before-result`).
pub(crate) async fn before_build_result() {
    failpoint_async!("build-before-result");
}

/// The BuildResult of a build of the derivation whose hash modulo is `drv_hash`: its
/// outcome, with the realisations of its outputs on success.
pub(crate) fn build_result(outcome: &Outcome, drv_hash: Option<&Hash>) -> BuildResult {
    let built_outputs = if outcome.status.is_success() {
        outcome
            .outputs
            .iter()
            .map(|(name, path)| {
                let out = BuiltOutput {
                    drv_hash: drv_hash.copied(),
                    out_path: path.clone(),
                    signatures: BTreeSet::new(),
                };
                (name.clone(), out)
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    BuildResult {
        status: outcome.status,
        error_msg: outcome.message.clone().into_bytes(),
        times_built: outcome.times_built,
        is_non_deterministic: false,
        start_time: outcome.start_time,
        stop_time: outcome.stop_time,
        built_outputs,
    }
}

/// A malformed primitive as a session error, naming the configuration key to raise when a
/// list or a string hit the limit the configuration sets.
pub(crate) fn over_limit(e: WireError, settings: &SessionSettings) -> SessionError {
    match e {
        WireError::TooManyElements { max, .. } if max == settings.max_paths_per_request => {
            SessionError::ListTooLong(ServeError::Wire(e))
        }
        WireError::StringTooLong { max, .. } if max == settings.max_request_bytes => {
            SessionError::StringTooLong(ServeError::Wire(e))
        }
        e => SessionError::Protocol(ServeError::Wire(e)),
    }
}

impl From<tokio::task::JoinError> for SessionError {
    /// A blocking task of the session panicked or was cancelled.
    fn from(e: tokio::task::JoinError) -> Self {
        SessionError::Service(ServiceError::Task(e))
    }
}

impl From<PipeReadError> for SessionError {
    /// The client's stdin pipe failing an upload, as the same failure through tokio reads.
    fn from(e: PipeReadError) -> Self {
        match e {
            PipeReadError::Eof => SessionError::Protocol(ServeError::UnexpectedEof("in a NAR")),
            PipeReadError::Timeout { secs } => SessionError::Timeout {
                phase: "to send more",
                secs,
            },
            PipeReadError::Io(e) => SessionError::Io(e),
        }
    }
}

/// What an AddToStoreNar request claims about its path.
pub(crate) fn add_claim(h: AddToStoreNar) -> PathClaim {
    PathClaim {
        path: h.path,
        deriver: h.deriver,
        nar_hash: Some(h.nar_hash),
        nar_size: Some(h.nar_size),
        references: h.references,
        registration_time: registration_time(h.registration_time),
        ca: h.ca,
        sigs: h.sigs,
    }
}

/// The blocking half of [`Driver::upload_from_pipe`]: imports `head` and then the rest of
/// the claimed NAR size from `source`, and commits.
fn receive_from_pipe(
    store: &Store,
    account: &str,
    claim: PathClaim,
    head: Bytes,
    source: &mut PipeSource<impl AsFd>,
    pool: &BufferPool,
) -> Result<(), SessionError> {
    let size = claim.nar_size.unwrap_or(0);
    let receiving = format!("receiving {}", claim.path);
    let adding = format!("adding {}", claim.path);
    let mut import = store
        .begin_import(account)
        .map_err(store_error(&receiving))?;
    if let Some(ca) = &claim.ca {
        import.expect_ca(ca);
    }
    let rest = size.saturating_sub(head.len() as u64);
    import.write(&head).map_err(store_error(&receiving))?;
    pool.give(head);
    source.read_exact(rest, |chunk| {
        import
            .write(chunk)
            .map_err(|e| SessionError::from(store_error(&receiving)(e)))
    })?;
    Ok(import.commit(claim).map_err(store_error(&adding))?)
}

/// The keys of `infos` ordered so that each comes after those of its references that are
/// among them (references outside the set are the client's business, as upstream).
pub(crate) fn dependencies_first(infos: &BTreeMap<StorePath, ValidPathInfo>) -> Vec<StorePath> {
    let mut order = Vec::with_capacity(infos.len());
    let mut visited = BTreeSet::new();
    for root in infos.keys() {
        // Iterative depth-first post-order: a long reference chain cannot overflow the stack.
        let mut stack = vec![(root, false)];
        while let Some((path, children_done)) = stack.pop() {
            if children_done {
                order.push(path.clone());
                continue;
            }
            if !visited.insert(path) {
                continue;
            }
            stack.push((path, true));
            for r in &infos[path].references {
                if r != path && infos.contains_key(r) && !visited.contains(r) {
                    stack.push((r, false));
                }
            }
        }
    }
    order
}

/// The registration time to record: the client's, or now when it sent 0 (docs/serve-protocol.md §4.4).
pub(crate) fn registration_time(claimed: u64) -> u64 {
    if claimed != 0 {
        return claimed;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::StoreLimits;
    use nixbuild_core::budget::MemoryBudget;
    use nixbuild_core::serve;
    use std::fs::File;
    use std::os::fd::OwnedFd;

    /// A client that never reads: every write waits forever.
    struct Stuck;

    impl SessionOutput for Stuck {
        async fn stdout(&mut self, _: Bytes) -> io::Result<()> {
            std::future::pending().await
        }
        async fn stderr(&mut self, _: &[u8]) -> io::Result<()> {
            std::future::pending().await
        }
        async fn flush(&mut self) -> io::Result<()> {
            std::future::pending().await
        }
    }

    /// A NAR holding a directory with two files, and the offset where the first file's
    /// contents end (they are 1000 bytes of 0xab, found by their pattern).
    fn two_file_nar() -> (Vec<u8>, usize) {
        use nixbuild_core::nar::NarNode;
        let file = |byte: u8, len: usize| NarNode::File {
            executable: false,
            contents: vec![byte; len],
        };
        let tree = NarNode::Directory(BTreeMap::from([
            (b"a".to_vec(), file(0xab, 1000)),
            (b"b".to_vec(), file(0xcd, 300)),
        ]));
        let nar = tree.to_nar().unwrap();
        let start = nar.windows(1000).position(|w| w == [0xab; 1000]).unwrap();
        (nar, start + 1000)
    }

    fn claim_for(nar: &[u8]) -> PathClaim {
        PathClaim {
            path: StorePath::from_base_name(b"7rjj86a15146cq1d3qy068lml7n8ykzm-upload").unwrap(),
            deriver: None,
            nar_hash: Some(nixbuild_core::hash::Hash::compute(
                nixbuild_core::hash::HashAlgo::Sha256,
                nar,
            )),
            nar_size: Some(nar.len() as u64),
            references: BTreeSet::new(),
            registration_time: 1,
            ca: None,
            sigs: BTreeSet::new(),
        }
    }

    /// Imports `nar` through [`receive_from_pipe`]: its first `head` bytes as the session's
    /// buffer, the rest (followed by `after`) written to a pipe by `write`, read `read_size`
    /// bytes at a time. Returns the result and what was left in the pipe.
    fn upload_through_pipe(
        store: &Store,
        nar: &[u8],
        head: usize,
        read_size: usize,
        after: &[u8],
        write: impl FnOnce(OwnedFd, Vec<u8>) + Send + 'static,
    ) -> (Result<(), SessionError>, Vec<u8>) {
        let (read, write_end) = rustix::pipe::pipe().unwrap();
        rustix::fs::fcntl_setfl(&read, rustix::fs::OFlags::NONBLOCK).unwrap();
        let mut rest = nar[head..].to_vec();
        rest.extend_from_slice(after);
        let writer = std::thread::spawn(move || write(write_end, rest));
        let mut source = PipeSource::new(read.try_clone().unwrap(), Duration::from_secs(60));
        source.read_size = read_size;
        let head = Bytes::copy_from_slice(&nar[..head]);
        let pool = BufferPool::default();
        let result = receive_from_pipe(store, "a", claim_for(nar), head, &mut source, &pool);
        writer.join().unwrap();
        let mut left = Vec::new();
        rustix::fs::fcntl_setfl(&read, rustix::fs::OFlags::empty()).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match rustix::io::read(&read, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => left.extend_from_slice(&buf[..n]),
            }
        }
        (result, left)
    }

    /// Writes all of `data` at once, then closes the pipe.
    fn write_all_then_close(fd: OwnedFd, data: Vec<u8>) {
        io::Write::write_all(&mut File::from(fd), &data).unwrap();
    }

    #[test]
    fn a_pipe_upload_ending_a_file_on_a_read_boundary_is_registered_and_reads_no_further() {
        let (nar, contents_end) = two_file_nar();
        for head in [0, 1, 100, contents_end] {
            let (_dir, store, _builds) = store_and_builds();
            // The first read ends exactly where the first file's contents end (when the
            // head does not already hold them); the padding and the rest come in the next.
            let read_size = if head < contents_end {
                contents_end - head
            } else {
                64
            };
            let (result, left) = upload_through_pipe(
                &store,
                &nar,
                head,
                read_size,
                b"NEXT REQUEST",
                write_all_then_close,
            );
            result.unwrap();
            assert_eq!(left, b"NEXT REQUEST", "head {head}: read past the NAR");
            let claim = claim_for(&nar);
            let info = store.query_path_info("a", &claim.path).unwrap().unwrap();
            assert_eq!(info.nar_hash, claim.nar_hash, "head {head}");
            let problems = store.verify().unwrap();
            assert!(problems.is_empty(), "head {head}: {problems:?}");
        }
    }

    #[test]
    fn a_pipe_upload_in_small_late_pieces_pauses_and_arrives_whole() {
        use nixbuild_core::nar::NarNode;
        // More than half of a default 64 KiB pipe remains, so the reader pauses on an empty
        // pipe, and the writer's 4 KiB pieces arrive between and during the pauses.
        let contents: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let nar = NarNode::File {
            executable: true,
            contents,
        }
        .to_nar()
        .unwrap();
        let (_dir, store, _builds) = store_and_builds();
        let (result, left) = upload_through_pipe(&store, &nar, 10, CHUNK, b"", |fd, data| {
            let mut out = File::from(fd);
            for piece in data.chunks(4096) {
                io::Write::write_all(&mut out, piece).unwrap();
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        result.unwrap();
        assert!(left.is_empty());
        let claim = claim_for(&nar);
        let info = store.query_path_info("a", &claim.path).unwrap().unwrap();
        assert_eq!(
            (info.nar_hash, info.nar_size),
            (claim.nar_hash, nar.len() as u64)
        );
        let problems = store.verify().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_pipe_upload_cut_off_mid_file_registers_nothing_and_leaves_no_files() {
        let (nar, contents_end) = two_file_nar();
        let (dir, store, _builds) = store_and_builds();
        let (result, _) = upload_through_pipe(&store, &nar, 50, 256, b"", move |fd, data| {
            // The client goes away inside the first file's contents.
            write_all_then_close(fd, data[..contents_end - 60].to_vec())
        });
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                SessionError::Protocol(ServeError::UnexpectedEof("in a NAR"))
            ),
            "{err}"
        );
        let claim = claim_for(&nar);
        assert_eq!(store.query_path_info("a", &claim.path).unwrap(), None);
        let tmp: Vec<_> = std::fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
        let objects: Vec<_> = std::fs::read_dir(dir.path().join("objects"))
            .unwrap()
            .collect();
        assert!(objects.is_empty(), "objects left: {objects:?}");
    }

    #[test]
    fn a_pipe_upload_with_other_bytes_than_claimed_is_refused() {
        let (mut nar, contents_end) = two_file_nar();
        let claimed = claim_for(&nar);
        // Same size, one content byte changed: valid NAR, wrong hash.
        nar[contents_end - 1] = 0;
        let (_dir, store, _builds) = store_and_builds();
        let (read, write) = rustix::pipe::pipe().unwrap();
        rustix::fs::fcntl_setfl(&read, rustix::fs::OFlags::NONBLOCK).unwrap();
        write_all_then_close(write, nar.clone());
        let mut source = PipeSource::new(read, Duration::from_secs(60));
        let result = receive_from_pipe(
            &store,
            "a",
            claimed.clone(),
            Bytes::new(),
            &mut source,
            &BufferPool::default(),
        );
        let err = result.unwrap_err();
        assert!(err.to_string().starts_with("adding "), "{err}");
        assert!(err.to_string().contains("hash"), "{err}");
        assert_eq!(store.query_path_info("a", &claimed.path).unwrap(), None);
    }

    #[test]
    fn a_pipe_upload_whose_client_stalls_times_out() {
        let (nar, _) = two_file_nar();
        let (_dir, store, _builds) = store_and_builds();
        let (read, _write) = rustix::pipe::pipe().unwrap();
        rustix::fs::fcntl_setfl(&read, rustix::fs::OFlags::NONBLOCK).unwrap();
        let mut source = PipeSource::new(read, Duration::from_millis(20));
        let result = receive_from_pipe(
            &store,
            "a",
            claim_for(&nar),
            Bytes::new(),
            &mut source,
            &BufferPool::default(),
        );
        let err = result.unwrap_err();
        assert!(matches!(err, SessionError::Timeout { .. }), "{err}");
    }

    /// A store and build service on a temporary state directory (no build runs in these
    /// tests, so the helper executable is never started).
    fn store_and_builds() -> (tempfile::TempDir, Store, BuildService) {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            max_nar_size: 1 << 20,
            disk_reserve: 0,
        };
        let store = Store::open(dir.path(), limits).unwrap();
        let builds = BuildService::new(
            store.clone(),
            dir.path(),
            &Config::default(),
            "/proc/self/exe".into(),
        )
        .unwrap();
        (dir, store, builds)
    }

    fn unlimited() -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget::new(u64::MAX))
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_times_out() {
        let (_dir, store, builds) = store_and_builds();
        let mut settings = SessionSettings::new(&Config::default(), "a", false, &unlimited());
        settings.write_timeout = Duration::from_millis(20);
        let mut hello = Vec::new();
        serve::ClientHello {
            version: serve::ProtocolVersion::V2_7,
        }
        .encode(&mut hello);
        // The server hello cannot be written: the session ends instead of hanging.
        let err = serve(&store, &builds, &settings, &hello[..], &mut Stuck)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SessionError::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(err.to_string().contains("timeouts.write"), "{err}");
    }

    #[tokio::test]
    async fn streams_carry_the_protocol_and_the_error_message() {
        let (_dir, store, builds) = store_and_builds();
        let settings = SessionSettings::new(&Config::default(), "a", false, &unlimited());
        let run = |input: Vec<u8>| {
            let (store, builds, settings) = (&store, &builds, &settings);
            async move {
                let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
                let result = serve_streams(
                    store,
                    builds,
                    settings,
                    &input[..],
                    &mut stdout,
                    &mut stderr,
                )
                .await;
                (result, stdout, stderr)
            }
        };
        let mut input = Vec::new();
        serve::ClientHello {
            version: serve::ProtocolVersion::V2_7,
        }
        .encode(&mut input);
        let (result, stdout, stderr) = run(input.clone()).await;
        result.unwrap();
        let (hello, used) = serve::ServerHello::decode(&stdout).unwrap().unwrap();
        assert_eq!(hello.version, serve::ProtocolVersion::SERVER);
        assert_eq!(used, stdout.len());
        assert!(stderr.is_empty());

        input.extend_from_slice(&[0xff; 8]);
        let (result, stdout, stderr) = run(input).await;
        let err = result.unwrap_err();
        assert!(matches!(err, SessionError::Protocol(_)), "{err}");
        assert!(!stdout.is_empty(), "the hello went out before the error");
        let stderr = String::from_utf8(stderr).unwrap();
        assert_eq!(stderr, format!("error: {err}\n"));
    }
}
