//! The daemon's Unix socket, `<state-dir>/serve.sock` (docs/design.md, Processes): the daemon
//! runs one serve [`session`](crate::session) per connection of the relay `nixbuild-serve`,
//! reading the client's bytes from the stdin the relay handed over and writing the protocol
//! straight to its stdout, and sends messages and the exit status back in frames (the relay's
//! protocol: [`crate::relay_protocol`]). It is also the composition root: [`run`] opens the
//! store, starts the build service and the SSH front door, and serves until shutdown.
//!
//! Only trusted peers may name an account: root, or the uids and primary gids of `[relay]`
//! in the configuration, checked with SO_PEERCRED before the header is read.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::pin::Pin;

use bytes::Bytes;
use rustix::fs::FileType;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, Interest};
use tokio::net::unix::pipe;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;

use crate::builds::{BuildError, BuildService};
use crate::client_pipe::{PipeLoan, SharedPipe};
use crate::config::Config;
use crate::relay_protocol::{
    frame_header, socket_path, RelayFrames, RelayHeader, RelayHeaderError, FRAME_EXIT,
    FRAME_STDERR, MAX_HEADER, RELAY_FDS,
};
use crate::reload::{ConfigSource, LiveConfig};
use crate::service::{SessionLimit, SessionPlaces, SessionSettings};
use crate::session::{self, SessionOutput};
use crate::store::{Store, StoreError, StoreLimits};
use nixbuild_core::account::AccountSlot;
use nixbuild_core::budget::MemoryBudget;
use nixbuild_ssh::server::Reloader;

/// How long the daemon waits after a failed `accept` before accepting again.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// What can stop the daemon (errors of single sessions only end those sessions).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the state directory's lock.
    #[error("another nixbuild-server is already running on the state directory {0}")]
    AlreadyRunning(PathBuf),
    /// The state directory's lock could not be taken.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store in {path}: {source}")]
    Store {
        /// The state directory.
        path: PathBuf,
        /// The store's error (boxed: it is large).
        source: Box<StoreError>,
    },
    /// The socket could not be set up.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Accepting a connection failed (logged; the daemon backs off and accepts again).
    #[error("accepting a connection on {path}: {source}")]
    Accept {
        /// The socket's path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The metrics endpoint could not listen.
    #[error("cannot listen for metrics on {addr} ([metrics] listen): {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The build service could not start.
    #[error("cannot start the build service in {path}: {source}")]
    Builds {
        /// The state directory.
        path: PathBuf,
        /// The build service's error.
        source: Box<BuildError>,
    },
    /// The configuration names something that does not exist.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The SSH front door could not start.
    #[error(transparent)]
    Ssh(#[from] crate::ssh::SshError),
    /// The store's start-up task failed.
    #[error("internal error opening the store: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The failpoint to arm is misnamed (a daemon built with the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    #[error(transparent)]
    Failpoint(#[from] crate::failpoint::FailpointError),
}

/// Installs handlers for SIGTERM and SIGINT (inside a tokio runtime) and returns a future
/// that resolves on the first of them.
pub fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    })
}

/// Runs the daemon on `source.state_dir` with `config` (as `source` gave it at start) until
/// `shutdown` resolves: opens the store (which cleans leftovers of earlier runs), listens on
/// `serve.sock` (and for SSH when `ssh.listen` is set, see [`crate::ssh`]) and serves each
/// connection in its own task. On SIGHUP it reads `source` again and re-reads the authorized
/// keys (see [`crate::reload`]). At shutdown it stops accepting, gives running sessions
/// `timeouts.shutdown` to end, then cuts off the rest (their unfinished imports are
/// discarded) and removes the socket.
pub async fn run(
    source: &ConfigSource,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let state_dir = source.state_dir.as_path();
    let sock = socket_path(state_dir);
    match raise_open_files_limit() {
        Ok(limit) => tracing::info!(limit, "open files limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!("cannot raise the open files limit (RLIMIT_NOFILE): {e}"),
    }
    // A live daemon must not have its imports in progress cleaned away under it: held until
    // the daemon returns.
    let _lock = lock_state_dir(state_dir)?;
    // Watched from the start: SIGHUP's default action would end the daemon.
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(
                "cannot watch for SIGHUP ({e}): the configuration is read only at start; the \
                 authorized keys are still re-read when their file changes"
            );
            None
        }
    };
    let gc_requests = crate::collector::watch_requests();
    #[cfg(feature = "failpoints")]
    if let Some((name, hit)) = crate::failpoint::arm_from_env()? {
        tracing::warn!("failpoint {name} armed for hit {hit}");
    }
    let store = {
        let dir = state_dir.to_owned();
        let limits = StoreLimits {
            max_nar_size: config.store.max_nar_size,
            disk_reserve: config.store.disk_reserve,
        };
        tokio::task::spawn_blocking(move || Store::open(&dir, limits))
            .await?
            .map_err(|source| DaemonError::Store {
                path: state_dir.to_owned(),
                source: Box::new(source),
            })?
    };
    store.set_policy(config.store.policy(&config.accounts));
    let builds = {
        let (dir, store, config) = (state_dir.to_owned(), store.clone(), config.clone());
        tokio::task::spawn_blocking(move || {
            BuildService::new(store, &dir, &config, PathBuf::from("/proc/self/exe"))
        })
        .await?
        .map_err(|source| DaemonError::Builds {
            path: state_dir.to_owned(),
            source: Box::new(source),
        })?
    };
    let socket_gid = match &config.relay.socket_group {
        Some(group) => Some(group.resolve()?),
        None => None,
    };
    // One budget for the unfinished requests of every session, relayed and over SSH.
    let budget = Arc::new(MemoryBudget::new(config.buffered_budget()?));
    tracing::info!(
        max_buffered_bytes = budget.limit(),
        "budget for unfinished requests"
    );
    // Counts open sessions apart from the JoinSet, which only shrinks when a finished task is
    // reaped: a session gives its place back before the relay learns that it ended, so a
    // client may start the next one at once.
    let places = Arc::new(SessionPlaces::new(config.limits.max_sessions));
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let live = Arc::new(LiveConfig::new(config));
    let (collector_handle, collector_requests) = crate::collector::channel();
    let front_door = crate::ssh::bind(
        state_dir,
        live.clone(),
        store.clone(),
        builds.clone(),
        budget.clone(),
        places.clone(),
        collector_handle.clone(),
    )
    .await?;
    let listener = listen(&sock, socket_gid).map_err(|source| DaemonError::Listen {
        path: sock.clone(),
        source,
    })?;
    tracing::info!(socket = %sock.display(), "listening");
    // The SSH side drains on its own, at the same time as the relayed sessions below.
    let (stop_ssh, ssh_stop) = tokio::sync::watch::channel(false);
    let ssh_reloader = front_door.as_ref().map(crate::ssh::FrontDoor::reloader);
    let collector = tokio::spawn(crate::collector::run(
        store.clone(),
        live.clone(),
        gc_requests,
        collector_requests,
        ssh_stop.clone(),
    ));
    tokio::spawn(crate::fleet::run(
        builds.fleet().clone(),
        live.clone(),
        ssh_stop.clone(),
    ));
    if let Some(listener) = metrics_listener {
        let snapshot = metrics_snapshot(store.clone(), builds.clone());
        tokio::spawn(crate::metrics::serve(listener, snapshot, ssh_stop.clone()));
    }
    let ssh = front_door.map(|door| {
        let mut stop = ssh_stop;
        tokio::spawn(door.run(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }))
    });
    let shared = Shared {
        store: store.clone(),
        builds: builds.clone(),
        places: places.clone(),
        budget: budget.clone(),
        collector: collector_handle.clone(),
    };
    let mut sessions = JoinSet::new();
    let mut relayed = 0u64;
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match places.daemon_place() {
                    Err(refusal) => refuse_busy(&stream, &refusal),
                    Ok(permit) => {
                        relayed += 1;
                        // Every line of the session carries its number.
                        let span = tracing::info_span!("relay", session = relayed);
                        sessions.spawn(tracing::Instrument::instrument(
                            connection(stream, permit, live.get(), shared.clone()),
                            span,
                        ));
                    }
                },
                Err(source) => {
                    // Out of file descriptors or memory, or a connection that went away
                    // before it was accepted: other sessions go on, and so does accepting.
                    let e = DaemonError::Accept { path: sock.clone(), source };
                    tracing::error!("{e}; retrying in {} ms", ACCEPT_BACKOFF.as_millis());
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(ended) = sessions.join_next() => {
                if let Err(e) = ended {
                    tracing::error!("a session task failed: {e}");
                }
            }
            () = next_signal(&mut hangup) => {
                reload(source, &live, ssh_reloader.as_ref());
                let config = live.get();
                store.set_policy(config.store.policy(&config.accounts));
                builds.set_limits(&config);
            }
            () = &mut shutdown => break Ok(()),
        }
    };
    let config = live.get();
    drop(listener);
    let _ = stop_ssh.send(true);
    if let Err(e) = std::fs::remove_file(&sock) {
        tracing::warn!(socket = %sock.display(), "cannot remove the socket: {e}");
    }
    let running = sessions.len();
    if running > 0 {
        tracing::info!(running, "waiting for running sessions to end");
        let all_done = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(config.timeouts.shutdown(), all_done)
            .await
            .is_err()
        {
            tracing::warn!(
                cut_off = sessions.len(),
                "sessions still running at the shutdown timeout are cut off"
            );
            sessions.shutdown().await;
        }
    }
    // A collection under way stops between two steps or with the process: each step is one
    // transaction, and what a cut step leaves is cleaned at the next start.
    collector.abort();
    if let Some(ssh) = ssh {
        if let Err(e) = ssh.await {
            tracing::error!("the SSH server task failed: {e}");
        }
    }
    // No session is left, so no build has a waiter: the running ones are being killed.
    // Their sandboxes, cgroups and scratch directories go before the daemon does.
    if tokio::time::timeout(config.timeouts.shutdown(), builds.drain())
        .await
        .is_err()
    {
        tracing::warn!("builds still being cleaned up at the shutdown timeout are left");
    }
    tracing::info!("stopped");
    result
}

/// What the metrics read from the daemon's state at each scrape (on a blocking thread).
fn metrics_snapshot(
    store: Store,
    builds: BuildService,
) -> Arc<dyn Fn() -> crate::metrics::Snapshot + Send + Sync> {
    Arc::new(move || {
        let load = builds.load();
        let all = store.total_holding().unwrap_or_default();
        crate::metrics::Snapshot {
            builds_waiting: load.waiting,
            builds_running: load.running,
            cores_granted: load.cores_granted,
            memory_granted_bytes: load.memory_granted,
            cores_total: load.cores,
            memory_total_bytes: load.memory,
            store_nar_bytes: all.nar_bytes,
            store_paths: all.paths,
            free_bytes: store.free_space().unwrap_or(0),
            machines: builds.fleet().counts(),
            fleet_running: builds.fleet().running(),
        }
    })
}

/// Raises the soft limit on open files to the hard one and returns it: every SSH
/// connection, session and build holds descriptors, and the soft default (1024) would refuse
/// clients long before the other limits do. Builds inherit it, as they inherit
/// `LimitNOFILE=1048576` from Nix's own `nix-daemon.service`.
pub fn raise_open_files_limit() -> io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(hard) = limit.maximum else {
        // No hard limit: the soft one is whatever the system gave; leave it.
        return Ok(limit.current.unwrap_or(u64::MAX));
    };
    if limit.current != Some(hard) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        )?;
    }
    Ok(hard)
}

/// The next delivery of a watched signal (SIGHUP, SIGUSR1); never, when it could not be
/// watched.
pub(crate) async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(signal) = signal {
        if signal.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}

/// Reloads on SIGHUP: reads the configuration from `source` again and puts in force what can
/// change while the daemon runs (a file that does not load changes nothing), then re-reads
/// the authorized keys and gives the SSH server the limits in force.
fn reload(source: &ConfigSource, live: &LiveConfig, ssh: Option<&Reloader>) {
    match source.load() {
        Ok(new) => {
            let restart = live.update(&new);
            for setting in &restart {
                tracing::warn!(
                    "configuration re-read on SIGHUP: {setting} changed, which takes effect \
                     only at a restart; the running value stays"
                );
            }
            tracing::info!(
                needs_restart = restart.len(),
                "configuration re-read on SIGHUP"
            );
        }
        Err(e) => tracing::error!(
            "cannot re-read the configuration on SIGHUP: {e}; the configuration in force stays"
        ),
    }
    if let Some(ssh) = ssh {
        ssh.reload(crate::ssh::limits(&live.get()), "on SIGHUP");
    }
}

/// Creates the state directory if needed and takes an exclusive lock on `<state>/lock`,
/// held as long as the returned file is open. Err([`DaemonError::AlreadyRunning`]) at once
/// when another process holds it.
pub fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    let store_err = |source| DaemonError::Store {
        path: state_dir.to_owned(),
        source: Box::new(source),
    };
    crate::store::create_state_dir(state_dir).map_err(store_err)?;
    let path = state_dir.join("lock");
    let lock_err = |source: io::Error| DaemonError::Lock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(lock_err)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(DaemonError::AlreadyRunning(state_dir.into())),
        Err(e) => Err(lock_err(e.into())),
    }
}

/// Binds the socket with mode 0660 and group `gid` (root's when `None`): bound under a
/// temporary name, restricted, then renamed into place, so it is never reachable with the
/// wider mode the umask may give. A stale socket of a dead daemon is replaced by the rename.
fn listen(sock: &Path, gid: Option<u32>) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = sock.with_extension("sock.new");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = gid {
        rustix::fs::chown(&tmp, None, Some(rustix::fs::Gid::from_raw(gid)))?;
    }
    std::fs::rename(&tmp, sock)?;
    Ok(listener)
}

/// Tells a connection beyond `limits.max_sessions` why it is refused, without waiting: the
/// two frames fit in an empty socket buffer, and a peer that does not read loses them.
fn refuse_busy(stream: &UnixStream, refusal: &SessionLimit) {
    tracing::warn!("refused a connection: {refusal}");
    crate::metrics::METRICS.refused(crate::metrics::Refusal::Sessions);
    let msg = format!("error: {refusal}\n");
    let mut frames = Vec::new();
    for (tag, payload) in [
        (FRAME_STDERR, msg.as_bytes()),
        (FRAME_EXIT, &1u32.to_le_bytes()),
    ] {
        frames.extend_from_slice(&frame_header(tag, payload.len() as u32));
        frames.extend_from_slice(payload);
    }
    if let Err(e) = stream.try_write(&frames) {
        tracing::debug!("cannot tell a refused connection why: {e}");
    }
}

/// What every relayed session shares: the daemon's store and build service, the session
/// places and buffer budget, and the collector (for `nixbuild gc`).
#[derive(Clone)]
struct Shared {
    store: Store,
    builds: BuildService,
    places: Arc<SessionPlaces>,
    budget: Arc<MemoryBudget>,
    collector: crate::collector::Collector,
}

/// Serves one connection: checks the peer, reads the header and the client's descriptors,
/// runs the session (or the `nixbuild` command), sends the exit status.
async fn connection(
    stream: UnixStream,
    permit: OwnedSemaphorePermit,
    config: Arc<Config>,
    shared: Shared,
) {
    let status = match admit(&stream, &config, &shared.places).await {
        Err(refusal) => {
            tracing::warn!("refused a connection: {refusal}");
            if matches!(refusal, AdmitError::TooManySessions(_)) {
                crate::metrics::METRICS.refused(crate::metrics::Refusal::Sessions);
            }
            let mut frames = RelayFrames::new(stream);
            let _ = frames
                .stderr(format!("error: {refusal}\n").as_bytes())
                .await;
            drop(permit);
            frames.exit(1).await
        }
        Ok(Admitted {
            header,
            input: (input, stdin_pipe),
            output: (stdout, pipe),
            slot,
        }) => {
            let account = header.account.as_str();
            let mut out = RelayOutput::new(stdout, stream);
            if let Some(pipe) = pipe {
                out = out.with_pipe(pipe);
            }
            if let Some(pipe) = stdin_pipe {
                out = out.with_stdin_pipe(pipe);
            }
            let status = match &header.command {
                Some(command) => {
                    relayed_command(command, account, &shared, &config, &mut out).await
                }
                None => {
                    tracing::info!(%account, write = header.write, protocol = header.protocol.name(), "session start");
                    let _counted = crate::metrics::METRICS.session_started(header.protocol.into());
                    let settings =
                        SessionSettings::new(&config, account, header.write, &shared.budget);
                    let served = session::serve_protocol(
                        header.protocol,
                        &shared.store,
                        &shared.builds,
                        &settings,
                        input,
                        &mut out,
                    )
                    .await;
                    match served {
                        Ok(()) => {
                            tracing::info!(%account, status = 0, "session end");
                            0
                        }
                        Err(e) => {
                            tracing::info!(%account, status = 1, error = %e, "session end");
                            1
                        }
                    }
                }
            };
            // Both slots are free before the relay exits, so the client's next session is
            // not refused for this one.
            drop(slot);
            drop(permit);
            out.exit(status).await
        }
    };
    log_exit(status);
}

fn log_exit(sent: io::Result<()>) {
    if let Err(e) = sent {
        tracing::debug!("cannot send the exit status to the relay: {e}");
    }
}

/// Runs `nixbuild <subcommand>` relayed by `nixbuild-serve` behind an OpenSSH forced command
/// (`command` is the client's `SSH_ORIGINAL_COMMAND`) as `account`; the exit status.
async fn relayed_command<O: crate::session::SessionOutput>(
    command: &str,
    account: &str,
    shared: &Shared,
    config: &Config,
    out: &mut O,
) -> u32 {
    let words = match nixbuild_ssh::exec::parse_exec(command.as_bytes()) {
        Ok(nixbuild_ssh::exec::Exec::Command(words)) => words,
        Ok(nixbuild_ssh::exec::Exec::Session(_)) => {
            let _ = out
                .stderr(b"error: a relayed command must be `nixbuild <subcommand>`\n")
                .await;
            return crate::ops::EXIT_USAGE;
        }
        Err(refusal) => {
            let _ = out.stderr(format!("error: {refusal}\n").as_bytes()).await;
            return crate::ops::EXIT_USAGE;
        }
    };
    let ops = crate::ops::Ops {
        store: &shared.store,
        builds: &shared.builds,
        config,
        collector: Some(&shared.collector),
        account,
        key: crate::ops::RELAYED_KEY,
    };
    crate::ops::run(&ops, &words, out).await
}

/// A boxed reader of the client's bytes (a pipe or a socket).
pub type ClientReader = Pin<Box<dyn AsyncRead + Send + Sync>>;
/// A boxed writer to the client (a pipe or a socket).
pub type ClientWriter = Pin<Box<dyn AsyncWrite + Send + Sync>>;

/// A relayed session let in: its header, the client's streams, and the account's session slot
/// (held for the session's life).
struct Admitted {
    header: RelayHeader,
    input: (ClientReader, Option<SharedPipe<pipe::Receiver>>),
    output: (ClientWriter, Option<SharedPipe<pipe::Sender>>),
    slot: AccountSlot,
}

/// Why a relay connection was refused before its session began; the relay prints it.
#[derive(Debug, thiserror::Error)]
enum AdmitError {
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(io::Error),
    #[error(
        "uid {uid} (gid {gid}) may not relay sessions to the nixbuild daemon; \
         allow it with relay.trusted_uids or relay.trusted_gids"
    )]
    Untrusted { uid: u32, gid: u32 },
    #[error("no relay header within {0} s")]
    HeaderTimeout(u64),
    #[error("reading the relay header: {0}")]
    HeaderRead(io::Error),
    #[error("the relay header is missing or longer than {MAX_HEADER} bytes")]
    HeaderTooLong,
    #[error(transparent)]
    Header(#[from] RelayHeaderError),
    #[error(transparent)]
    TooManySessions(#[from] SessionLimit),
    #[error(
        "the relay sent {0} descriptors with its header, expected {RELAY_FDS} (stdin, stdout)"
    )]
    Descriptors(usize),
    #[error("the relay's {which}: {source}")]
    Stream {
        which: &'static str,
        source: io::Error,
    },
}

/// Checks the peer's credentials, reads its header and takes the client's stdin and stdout.
async fn admit(
    stream: &UnixStream,
    config: &Config,
    places: &SessionPlaces,
) -> Result<Admitted, AdmitError> {
    let cred = stream.peer_cred().map_err(AdmitError::Credentials)?;
    let (uid, gid) = (cred.uid(), cred.gid());
    if !config.relay.trusts(uid, gid) {
        return Err(AdmitError::Untrusted { uid, gid });
    }
    let (line, fds) = tokio::time::timeout(config.timeouts.handshake(), read_header(stream))
        .await
        .map_err(|_| AdmitError::HeaderTimeout(config.timeouts.handshake))?
        .map_err(AdmitError::HeaderRead)?;
    let line = line.strip_suffix(b"\n").ok_or(AdmitError::HeaderTooLong)?;
    let header = RelayHeader::parse(line)?;
    let slot = places.account_place(&header.account, config.limits.max_sessions_per_account)?;
    let [stdin, stdout]: [OwnedFd; RELAY_FDS] = fds
        .try_into()
        .map_err(|fds: Vec<OwnedFd>| AdmitError::Descriptors(fds.len()))?;
    let stream_err = |which| move |source| AdmitError::Stream { which, source };
    let input = client_reader(stdin).map_err(stream_err("stdin"))?;
    let output = client_writer(stdout).map_err(stream_err("stdout"))?;
    Ok(Admitted {
        header,
        input,
        output,
        slot,
    })
}

/// Reads the header line (up to [`MAX_HEADER`] bytes, stopping at a newline) and the
/// descriptors that come with it. The relay sends nothing after its header, so reading in
/// pieces never takes bytes that belong to something else.
async fn read_header(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; MAX_HEADER];
    while line.len() < MAX_HEADER && !line.ends_with(b"\n") {
        let want = MAX_HEADER - line.len();
        let n = stream
            .async_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(RELAY_FDS))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let got = rustix::net::recvmsg(
                    stream,
                    &mut [io::IoSliceMut::new(&mut buf[..want])],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        fds.extend(received);
                    }
                }
                if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
                    // The kernel dropped descriptors it could not install here.
                    return Err(io::Error::other(
                        "the relay's descriptors were dropped: the daemon is out of file \
                         descriptors (RLIMIT_NOFILE)",
                    ));
                }
                Ok(got.bytes)
            })
            .await?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    Ok((line, fds))
}

/// What kind of descriptor the relay handed over.
fn kind(fd: &OwnedFd) -> io::Result<FileType> {
    Ok(FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode))
}

fn not_a_pipe(ty: FileType) -> io::Error {
    io::Error::other(format!("is a {ty:?}, not a pipe or a socket"))
}

/// A socket handed over by the relay, as a non-blocking tokio stream.
fn socket(fd: OwnedFd) -> io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

/// What the daemon asks the kernel for as the size of the client's pipes: fewer, larger
/// reads and writes, and fewer wake-ups on both sides, than the default 64 KiB.
const PIPE_SIZE: usize = 1 << 20;

/// Enlarges a pipe to [`PIPE_SIZE`] when allowed; the default size works too.
fn enlarge_pipe(fd: &OwnedFd) {
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(fd, PIPE_SIZE) {
        tracing::debug!("cannot enlarge the client's pipe: {e}");
    }
}

/// The client's stdin (a pipe or a socket), and for a pipe another handle to it, to lend it
/// to blocking tasks that read uploads.
fn client_reader(fd: OwnedFd) -> io::Result<(ClientReader, Option<SharedPipe<pipe::Receiver>>)> {
    match kind(&fd)? {
        FileType::Fifo => {
            enlarge_pipe(&fd);
            let shared = SharedPipe::new(pipe::Receiver::from_owned_fd(fd)?);
            Ok((Box::pin(shared.handle()), Some(shared)))
        }
        FileType::Socket => Ok((Box::pin(socket(fd)?), None)),
        other => Err(not_a_pipe(other)),
    }
}

/// The client's stdout (a pipe or a socket), and for a pipe another handle to it, to lend
/// it to blocking tasks that move file contents into it with `splice`.
fn client_writer(fd: OwnedFd) -> io::Result<(ClientWriter, Option<SharedPipe<pipe::Sender>>)> {
    match kind(&fd)? {
        FileType::Fifo => {
            enlarge_pipe(&fd);
            let shared = SharedPipe::new(pipe::Sender::from_owned_fd(fd)?);
            Ok((Box::pin(shared.handle()), Some(shared)))
        }
        FileType::Socket => Ok((Box::pin(socket(fd)?), None)),
        other => Err(not_a_pipe(other)),
    }
}

/// A [`SessionOutput`] that writes the protocol straight to the client's stdout and frames
/// messages onto the relay connection.
pub struct RelayOutput<S, W> {
    stdout: BufWriter<S>,
    /// The client's stdout again, when it is a pipe.
    pipe: Option<SharedPipe<pipe::Sender>>,
    /// The client's stdin again, when it is a pipe.
    stdin_pipe: Option<SharedPipe<pipe::Receiver>>,
    frames: RelayFrames<W>,
}

impl<S: AsyncWrite + Unpin + Send, W: AsyncWrite + Unpin + Send> RelayOutput<S, W> {
    /// Protocol bytes to `stdout`, frames onto `relay`.
    pub fn new(stdout: S, relay: W) -> Self {
        RelayOutput {
            stdout: BufWriter::with_capacity(64 * 1024, stdout),
            pipe: None,
            stdin_pipe: None,
            frames: RelayFrames::new(relay),
        }
    }

    /// Tells the session that `stdout` is the pipe `pipe` (another handle to it), which NAR
    /// exports may then write to directly from their blocking task.
    pub fn with_pipe(mut self, pipe: SharedPipe<pipe::Sender>) -> Self {
        self.pipe = Some(pipe);
        self
    }

    /// Tells the session that the client's stdin is the pipe `pipe` (another handle to it),
    /// which uploads may then read directly from their blocking task.
    pub fn with_stdin_pipe(mut self, pipe: SharedPipe<pipe::Receiver>) -> Self {
        self.stdin_pipe = Some(pipe);
        self
    }

    /// Flushes and closes the client's stdout (so the client has everything before the relay
    /// exits), then sends the exit status.
    pub async fn exit(mut self, status: u32) -> io::Result<()> {
        let flushed = self.stdout.flush().await;
        drop(self.stdout);
        let sent = self.frames.exit(status).await;
        flushed.and(sent)
    }
}

impl<S: AsyncWrite + Unpin + Send, W: AsyncWrite + Unpin + Send> SessionOutput
    for RelayOutput<S, W>
{
    async fn stdout(&mut self, bytes: Bytes) -> io::Result<()> {
        self.stdout.write_all(&bytes).await
    }

    async fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.frames.stderr(bytes).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.stdout.flush().await
    }

    fn stdout_is_pipe(&self) -> bool {
        self.pipe.is_some()
    }

    fn lend_stdout(&mut self) -> Option<io::Result<PipeLoan>> {
        self.pipe.as_ref().map(SharedPipe::lend)
    }

    fn lend_stdin(&mut self) -> Option<io::Result<PipeLoan>> {
        self.stdin_pipe.as_ref().map(SharedPipe::lend)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::relay_protocol::MAX_FRAME;

    #[test]
    fn a_second_lock_on_the_state_dir_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = lock_state_dir(&state).unwrap();
        let second = lock_state_dir(&state).unwrap_err();
        assert!(
            matches!(&second, DaemonError::AlreadyRunning(p) if *p == state),
            "{second}"
        );
        assert!(second.to_string().contains("already running"), "{second}");
        drop(first);
        lock_state_dir(&state).unwrap();
    }

    #[tokio::test]
    async fn stdout_goes_straight_and_frames_are_tagged_and_split() {
        let (mut stdout, mut buf) = (Vec::new(), Vec::new());
        let mut out = RelayOutput::new(&mut stdout, &mut buf);
        out.stdout(Bytes::from(vec![7u8; MAX_FRAME + 3]))
            .await
            .unwrap();
        out.stderr(&vec![8u8; MAX_FRAME + 2]).await.unwrap();
        out.exit(1).await.unwrap();
        assert_eq!(stdout, vec![7u8; MAX_FRAME + 3]);
        let mut frames = Vec::new();
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
            frames.push((rest[0], rest[5..5 + len].to_vec()));
            rest = &rest[5 + len..];
        }
        let shape: Vec<(u8, usize)> = frames.iter().map(|(t, p)| (*t, p.len())).collect();
        assert_eq!(shape, vec![(2, MAX_FRAME), (2, 2), (3, 4)]);
        assert_eq!(frames[2].1, 1u32.to_le_bytes());
    }
}
