//! The SSH server (russh): accepts TCP connections, authenticates public keys against the
//! `authorized_keys` file, and turns each `nix-store --serve` exec request into a session of
//! the [`SessionService`] for the key's account, with the channel's data as the session's
//! stdin and stdout and its extended data as stderr. Everything else is refused with a
//! message and logged with its reason.
//!
//! Connections are counted in two budgets. From accept until it authenticates (or ends), a
//! connection holds a place among `max_unauthenticated`, at most
//! `max_unauthenticated_per_source` of them per source (see [`crate::unauthenticated`]): a
//! newcomer from a source at its limit is closed at once, and when every place is taken the
//! oldest connection of the source holding the most is evicted to admit the newcomer, so
//! whoever holds connections open cannot lock out a client that authenticates promptly. Once
//! authenticated, a connection counts against `max_connections` instead; one authenticating
//! beyond it is disconnected with a message saying so. Unauthenticated connections never
//! take an authenticated one's place, and the reverse.
//!
//! Each connection is a russh session task plus a watchdog that ends it: before
//! authentication after `auth_timeout`; with no session running after `idle_timeout`; at
//! shutdown once its sessions have ended. A connection carries up to
//! `max_sessions_per_connection` channels at once (ssh ControlMaster). Dead peers are found by
//! keepalives.
//!
//! At shutdown the listener closes, new sessions are refused, running ones get the grace
//! period, then are cut off with `error: ...` and exit status 1 before their connection is
//! closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};
use russh::server::{Auth, Handler, Msg, Session};
use russh::{
    Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf, Disconnect, MethodKind, MethodSet,
    Pty, SshId,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::authorized_keys::{AuthorizedKeys, KeyTypes, MAX_FILE_SIZE};
use crate::ciphers::Ciphers;
use crate::exec::{parse_exec, Exec, ExecRefusal, SERVED};
use crate::host_key::fingerprint;
use crate::unauthenticated::{Admission, Ticket, UnauthenticatedBudget};
use nixbuild_core::account::{AccountCounts, AccountSlot};

/// What a client that asks for a terminal is told.
const PTY_REFUSED: &str = "terminals are not served (run ssh without -t): this server runs only \
                           `nix-store --serve [--write]`, the remote end of Nix's ssh:// stores \
                           and remote builders";

/// How long every refused authentication takes, whatever was refused (unknown key, key type
/// not enabled, bad signature), so timing tells nothing about which keys exist.
pub const AUTH_REJECTION_TIME: Duration = Duration::from_millis(500);
/// How often the `authorized_keys` file is checked for changes.
pub const KEYS_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often a keepalive is sent to a client that sent nothing; after
/// [`KEEPALIVE_MAX`] unanswered ones the connection is dropped.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Unanswered keepalives before a connection is considered dead.
pub const KEEPALIVE_MAX: usize = 4;
/// At shutdown, how long a connection whose last session just ended is left for its client
/// to close.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);
/// After the server closed a connection, how long it waits for the client to go.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// After the grace period, how long cut-off sessions get to send their message and end.
const CUT_OFF_WAIT: Duration = Duration::from_secs(5);
/// How long accepting pauses after a failed `accept` (out of descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds on connections and sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// From TCP connection to successful authentication.
    pub auth_timeout: Duration,
    /// How long an authenticated connection may stay with no session running.
    pub idle_timeout: Duration,
    /// Authenticated connections at once; one authenticating beyond it is disconnected with
    /// a message. Connections not yet authenticated do not count here.
    pub max_connections: usize,
    /// Connections not yet authenticated at once; beyond it the oldest of the source holding
    /// the most is evicted to admit a newcomer.
    pub max_unauthenticated: usize,
    /// Connections not yet authenticated at once from one source (an IPv4 address, an IPv6
    /// /64); more from it are closed at once.
    pub max_unauthenticated_per_source: usize,
    /// Authenticated connections of one account at once; more get an error for each command.
    pub max_connections_per_account: usize,
    /// Channels (sessions) open at once on one connection.
    pub max_sessions_per_connection: usize,
    /// At shutdown, how long running sessions may take before they are cut off.
    pub shutdown_grace: Duration,
}

/// Everything the server needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The address to listen on (port 0 picks a free one; see [`Server::local_addr`]).
    pub listen: SocketAddr,
    /// The host key.
    pub host_key: PrivateKey,
    /// The `authorized_keys` file, re-read when it changes or on [`Server::run`]'s reload
    /// signal.
    pub authorized_keys: PathBuf,
    /// The key types accepted.
    pub key_types: KeyTypes,
    /// The ciphers offered.
    pub ciphers: Ciphers,
    /// Bounds on connections and sessions.
    pub limits: Limits,
}

/// What can stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The `authorized_keys` file could not be read.
    #[error("cannot read the authorized keys file {path}: {reason}")]
    AuthorizedKeys {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The listening socket could not be bound.
    #[error("cannot listen for SSH on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An SSH protocol or I/O error on one connection (ends that connection only).
    #[error(transparent)]
    Ssh(#[from] russh::Error),
}

/// Bytes read from a connection's socket at a time.
const READ_BUFFER: usize = 64 * 1024;

/// One serve session asked for by an authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRequest {
    /// The account of the key the client authenticated with.
    pub account: String,
    /// `--write` was given.
    pub write: bool,
    /// The protocol the session speaks (for a command, [`Protocol::Serve`], unused).
    ///
    /// [`Protocol::Serve`]: nixbuild_core::serve::Protocol::Serve
    pub protocol: nixbuild_core::serve::Protocol,
    /// For `nixbuild <words>`, the operations interface: the words; `None` for a session of
    /// Nix's protocols.
    pub command: Option<Vec<String>>,
    /// The SHA256 fingerprint of the key the client authenticated with.
    pub key: String,
    /// The connection's number in this server's log.
    pub connection: u64,
    /// The client's address.
    pub peer: SocketAddr,
}

/// Runs serve sessions: the part of the service behind the SSH front door.
pub trait SessionService: Send + Sync + 'static {
    /// Runs one session to its end, reading the client's bytes from `stdin` and writing the
    /// protocol to `stdout` and messages to `stderr` (everything sent before it returns
    /// reaches the client), and returns the exit status the client gets.
    fn serve<R, E>(
        &self,
        request: &SessionRequest,
        stdin: R,
        stdout: ChannelStdout<'_>,
        stderr: &mut E,
    ) -> impl Future<Output = u32> + Send
    where
        R: AsyncRead + Unpin + Send,
        E: AsyncWrite + Unpin + Send + Sync;
}

/// A session channel's data stream to the client. It takes owned buffers and hands them to
/// russh as they are: russh cuts them into packets as the client's window allows, without
/// copying each packet out first as an `AsyncWrite` must, and the packets of one buffer are
/// queued together, so they go out in few socket writes.
pub struct ChannelStdout<'a>(&'a ChannelWriteHalf<Msg>);

impl ChannelStdout<'_> {
    /// Sends `data`, waiting while the client's window is full.
    pub async fn send(&self, data: Bytes) -> std::io::Result<()> {
        self.0.data_bytes(data).await.map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                format!("the SSH channel is closed: {e}"),
            )
        })
    }
}

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving.
    Running,
    /// Shutting down: no new sessions; connections close once their sessions end.
    Draining,
    /// The grace period is over: running sessions are cut off.
    CuttingOff,
}

/// The `authorized_keys` file, parsed, and what is needed to notice that it changed.
struct KeyRing {
    path: PathBuf,
    types: KeyTypes,
    keys: RwLock<Arc<AuthorizedKeys>>,
    /// The file as last read.
    stamp: Mutex<Option<FileStamp>>,
}

impl KeyRing {
    /// Reads the file; an error when it cannot be read (at start a server without keys is a
    /// mistake, not a state to run in).
    fn load(path: &Path, types: KeyTypes) -> Result<KeyRing, ServerError> {
        let (keys, stamp) =
            read_keys(path, &types).map_err(|reason| ServerError::AuthorizedKeys {
                path: path.to_owned(),
                reason,
            })?;
        log_loaded(path, &keys, "loaded");
        Ok(KeyRing {
            path: path.to_owned(),
            types,
            keys: RwLock::new(Arc::new(keys)),
            stamp: Mutex::new(stamp),
        })
    }

    fn current(&self) -> Arc<AuthorizedKeys> {
        match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the file; on failure the keys stay as they were.
    fn reload(&self, why: &str) {
        match read_keys(&self.path, &self.types) {
            Ok((keys, stamp)) => {
                log_loaded(&self.path, &keys, why);
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
            }
            Err(reason) => tracing::error!(
                file = %self.path.display(),
                "cannot re-read the authorized keys ({why}): {reason}; keeping the keys loaded before"
            ),
        }
    }

    /// Re-reads the file when its metadata changed since the last read.
    fn reload_if_changed(&self) {
        let now = file_stamp(&self.path);
        let last = *self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now != last {
            self.reload("the file changed");
        }
    }
}

/// What tells one version of the keys file from another: a rewrite in place changes the
/// times, a new file renamed into place the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn read_keys(path: &Path, types: &KeyTypes) -> Result<(AuthorizedKeys, Option<FileStamp>), String> {
    use std::io::Read;
    let stamp = file_stamp(path);
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(format!("larger than {MAX_FILE_SIZE} bytes"));
    }
    Ok((AuthorizedKeys::parse(&text, types), stamp))
}

fn log_loaded(path: &Path, keys: &AuthorizedKeys, why: &str) {
    for skipped in &keys.skipped {
        tracing::warn!(file = %path.display(), "authorized keys {skipped}");
    }
    tracing::info!(
        file = %path.display(),
        keys = keys.len(),
        skipped = keys.skipped.len(),
        "authorized keys {why}"
    );
}

/// What may change while the server runs: the keys and the limits.
struct Live {
    keys: KeyRing,
    limits: RwLock<Limits>,
}

impl Live {
    /// The limits in force now (a connection reads them when it needs one).
    fn limits(&self) -> Limits {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A handle that changes a running server's keys and limits (the daemon's SIGHUP).
#[derive(Clone)]
pub struct Reloader(Arc<Live>);

impl Reloader {
    /// Re-reads the `authorized_keys` file (an unreadable one keeps the keys loaded before)
    /// and puts `limits` in force: for connections from now on, and for running ones at their
    /// next check (a new session, an authentication). `max_unauthenticated` and
    /// `max_unauthenticated_per_source` size the budget made at [`Server::bind`] and keep
    /// their values until a restart.
    pub fn reload(&self, limits: Limits, why: &str) {
        self.0.keys.reload(why);
        let mut current = self.0.limits.write().unwrap_or_else(|p| p.into_inner());
        *current = Limits {
            max_unauthenticated: current.max_unauthenticated,
            max_unauthenticated_per_source: current.max_unauthenticated_per_source,
            ..limits
        };
    }
}

/// What the whole server shares with its connections.
struct Shared<S> {
    service: S,
    russh: Arc<russh::server::Config>,
    live: Arc<Live>,
    accounts: Arc<AccountCounts>,
    /// Connections not yet authenticated, each with what evicts it.
    unauthenticated: Mutex<UnauthenticatedBudget<Pending>>,
    /// Authenticated connections holding a place among `max_connections`.
    authenticated: Arc<AtomicUsize>,
    phase: watch::Receiver<Phase>,
}

impl<S> Shared<S> {
    fn unauthenticated(&self) -> std::sync::MutexGuard<'_, UnauthenticatedBudget<Pending>> {
        self.unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Frees a connection's unauthenticated place; false when it had none left (evicted).
    fn leave_unauthenticated(&self, ticket: Ticket) -> bool {
        self.unauthenticated().release(ticket).is_some()
    }
}

/// An unauthenticated connection, as its budget holds it.
struct Pending {
    id: u64,
    peer: SocketAddr,
    /// Tells the connection's task to close it.
    evict: oneshot::Sender<()>,
}

/// A place among `max_connections`, held by an authenticated connection until it closes.
struct AuthenticatedSlot(Arc<AtomicUsize>);

impl AuthenticatedSlot {
    fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<AuthenticatedSlot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| AuthenticatedSlot(count.clone()))
    }
}

impl Drop for AuthenticatedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bound SSH server, ready to [`run`](Server::run).
pub struct Server<S> {
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    phase: watch::Sender<Phase>,
}

impl<S: SessionService> Server<S> {
    /// Reads the `authorized_keys` file and binds the listening socket.
    pub async fn bind(config: ServerConfig, service: S) -> Result<Server<S>, ServerError> {
        let keys = KeyRing::load(&config.authorized_keys, config.key_types)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let russh = russh::server::Config {
            server_id: SshId::Standard(
                concat!("SSH-2.0-nixbuild_", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            auth_rejection_time: AUTH_REJECTION_TIME,
            // Every client starts with "none" to learn the methods: no reason to make it wait.
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![config.host_key],
            // A connection whose peer answers keepalives is never dropped for silence (a
            // build may run for hours); this only bounds a peer that vanished.
            inactivity_timeout: Some(KEEPALIVE_INTERVAL * (KEEPALIVE_MAX as u32 + 2)),
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            nodelay: true,
            preferred: config.ciphers.preferred(),
            ..Default::default()
        };
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let unauthenticated = UnauthenticatedBudget::new(
            config.limits.max_unauthenticated,
            config.limits.max_unauthenticated_per_source,
        );
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                service,
                russh: Arc::new(russh),
                live: Arc::new(Live {
                    keys,
                    limits: RwLock::new(config.limits),
                }),
                accounts: Arc::default(),
                unauthenticated: Mutex::new(unauthenticated),
                authenticated: Arc::default(),
                phase: phase_rx,
            }),
            phase,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle to change the keys and limits while the server runs.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.live.clone())
    }

    /// Serves until `shutdown` resolves, re-reading the `authorized_keys` file when it
    /// changes (and on [`Reloader::reload`]). Then it stops accepting, lets running sessions
    /// finish within the grace period, cuts off the rest and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            shared,
            phase,
        } = self;
        let mut connections = JoinSet::new();
        let mut next_id = 0u64;
        let mut poll = tokio::time::interval(KEYS_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        next_id += 1;
                        match admit(&shared, peer, next_id) {
                            Some((ticket, evicted)) => {
                                connections.spawn(connection(
                                    shared.clone(), tcp, peer, next_id, ticket, evicted,
                                ));
                            }
                            None => refuse_connection(tcp),
                        }
                    }
                    Err(e) => {
                        tracing::error!("accepting an SSH connection: {e}; retrying in {} ms",
                            ACCEPT_BACKOFF.as_millis());
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(ended) = connections.join_next() => {
                    if let Err(e) = ended {
                        tracing::error!("an SSH connection task failed: {e}");
                    }
                }
                _ = poll.tick() => shared.live.keys.reload_if_changed(),
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        let _ = phase.send(Phase::Draining);
        let grace = shared.live.limits().shutdown_grace;
        if !connections.is_empty() {
            tracing::info!(
                connections = connections.len(),
                "SSH: stopped accepting; waiting up to {} s for running sessions",
                grace.as_secs()
            );
        }
        if tokio::time::timeout(grace, join_all(&mut connections))
            .await
            .is_err()
        {
            tracing::warn!(
                connections = connections.len(),
                "SSH: cutting off the sessions still running after the grace period"
            );
            let _ = phase.send(Phase::CuttingOff);
            if tokio::time::timeout(CUT_OFF_WAIT, join_all(&mut connections))
                .await
                .is_err()
            {
                connections.shutdown().await;
            }
        }
        tracing::info!("SSH: stopped");
    }
}

/// Waits for every connection task to end.
async fn join_all(connections: &mut JoinSet<()>) {
    while connections.join_next().await.is_some() {}
}

/// Gives a new connection a place in the unauthenticated budget, evicting another when they
/// are all taken (its task is told to close it); `None` when its source has its maximum
/// already. Logs what it decided and why.
fn admit<S>(
    shared: &Shared<S>,
    peer: SocketAddr,
    id: u64,
) -> Option<(Ticket, oneshot::Receiver<()>)> {
    let (evict, evicted) = oneshot::channel();
    let admission = shared
        .unauthenticated()
        .admit(peer.ip(), Pending { id, peer, evict });
    match admission {
        Admission::Admitted(ticket) => Some((ticket, evicted)),
        Admission::AdmittedEvicting {
            ticket,
            evicted: old,
        } => {
            tracing::warn!(
                conn = old.payload.id,
                peer = %old.payload.peer,
                "evicted an unauthenticated connection to admit conn={id} from {peer}: the \
                 server has its maximum of {} unauthenticated connections \
                 (ssh.max_unauthenticated); this was the oldest from {}, which had the most ({})",
                shared.live.limits().max_unauthenticated,
                old.source,
                old.source_held,
            );
            // A connection whose task already ended has nothing left to close.
            let _ = old.payload.evict.send(());
            Some((ticket, evicted))
        }
        Admission::RefusedPerSource { source, held } => {
            tracing::warn!(
                conn = id,
                %peer,
                "refused a connection: {held} unauthenticated connections from {source} \
                 already, its maximum (ssh.max_unauthenticated_per_source)"
            );
            None
        }
    }
}

/// Closes a refused connection at once, with a line a person using `nc` can read (ssh
/// clients only say the connection was closed); the log says why.
fn refuse_connection(tcp: TcpStream) {
    let _ = tcp.try_write(b"nixbuild: too many connections, try again later\r\n");
}

/// The state of one connection, watched by its watchdog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ConnStatus {
    authenticated: bool,
    /// Authenticated while the server had its maximum of authenticated connections.
    full: bool,
    sessions: usize,
}

/// Why the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    AuthTimeout,
    Full,
    Idle,
    Shutdown,
}

impl Closing {
    fn message(self, limits: &Limits) -> String {
        match self {
            Closing::AuthTimeout => format!(
                "not authenticated within {} s (timeouts.auth)",
                limits.auth_timeout.as_secs()
            ),
            Closing::Full => full_message(limits.max_connections),
            Closing::Idle => format!(
                "no session for {} s (timeouts.idle)",
                limits.idle_timeout.as_secs()
            ),
            Closing::Shutdown => "the nixbuild server is shutting down".to_owned(),
        }
    }

    fn code(self) -> Disconnect {
        match self {
            Closing::AuthTimeout => Disconnect::NoMoreAuthMethodsAvailable,
            Closing::Full => Disconnect::TooManyConnections,
            Closing::Idle | Closing::Shutdown => Disconnect::ByApplication,
        }
    }
}

/// What a client authenticating beyond `max_connections` is told.
fn full_message(max: usize) -> String {
    format!(
        "the nixbuild server has its maximum of {max} authenticated connections \
         (ssh.max_connections); try again later"
    )
}

/// Serves one TCP connection until the client leaves, the watchdog closes it, or it is
/// evicted from the unauthenticated budget (`evicted` delivers) before it authenticates.
async fn connection<S: SessionService>(
    shared: Arc<Shared<S>>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    ticket: Ticket,
    evicted: oneshot::Receiver<()>,
) {
    let _ = tcp.set_nodelay(true);
    // A second descriptor of the socket, to cut it off from here: russh's session task
    // cannot be aborted, and a client stuck in the key exchange never gets the disconnect
    // message (russh sends nothing else until the exchange completes).
    let (tcp, cut) = match tcp.into_std().and_then(|std| {
        let cut = std.try_clone()?;
        Ok((TcpStream::from_std(std)?, cut))
    }) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!(conn = id, %peer, "cannot set up the connection: {e}");
            shared.leave_unauthenticated(ticket);
            return;
        }
    };
    // Its authenticated place, once it has one: given up here, when the socket is shut down,
    // rather than whenever russh drops the handler.
    let slot = Arc::new(Mutex::new(None));
    let evicted = async {
        // The sender goes without a word when the connection authenticates.
        if evicted.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = serve_connection(shared.clone(), tcp, peer, id, ticket, slot.clone()) => {}
        () = evicted => tracing::info!(
            conn = id,
            %peer,
            "closed an unauthenticated connection: evicted to admit a newer one \
             (ssh.max_unauthenticated)"
        ),
    }
    // Whatever happened, the connection is over for the client too.
    let _ = cut.shutdown(std::net::Shutdown::Both);
    shared.leave_unauthenticated(ticket);
    drop(slot.lock().unwrap_or_else(|p| p.into_inner()).take());
    tracing::info!(conn = id, %peer, "SSH connection closed");
}

/// The body of [`connection`], which closes the socket when it returns.
async fn serve_connection<S: SessionService>(
    shared: Arc<Shared<S>>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    ticket: Ticket,
    slot: Arc<Mutex<Option<AuthenticatedSlot>>>,
) {
    let (status, status_rx) = watch::channel(ConnStatus::default());
    let handler = Connection {
        shared: shared.clone(),
        id,
        peer,
        ticket,
        slot,
        status: Arc::new(status),
        account: None,
        channels: HashMap::new(),
    };
    // The timeouts in force when the connection came stay its own.
    let limits = shared.live.limits();
    let auth_deadline = Instant::now() + limits.auth_timeout;
    tracing::debug!(conn = id, %peer, "SSH connection");
    let started = tokio::time::timeout_at(
        auth_deadline,
        // russh reads each packet with two or three exact reads (length, then the rest):
        // through a buffer, the small packets a client sends while it downloads (window
        // adjustments, several per 100 KiB) cost one receive call between them, not one each.
        russh::server::run_stream(
            shared.russh.clone(),
            BufReader::with_capacity(READ_BUFFER, tcp),
            handler,
        ),
    )
    .await;
    let running = match started {
        Ok(Ok(running)) => running,
        Ok(Err(e)) => {
            tracing::info!(conn = id, %peer, "SSH connection ended before the handshake: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(
                conn = id,
                %peer,
                "closed a connection: {}",
                Closing::AuthTimeout.message(&limits)
            );
            return;
        }
    };
    let handle = running.handle();
    tokio::pin!(running);
    let closing = tokio::select! {
        ended = &mut running => {
            match ended {
                Ok(()) => tracing::debug!(conn = id, %peer, "the client closed the connection"),
                Err(e) => tracing::info!(conn = id, %peer, "SSH connection ended: {e}"),
            }
            return;
        }
        closing = watchdog(status_rx, shared.phase.clone(), auth_deadline, limits.idle_timeout) => closing,
    };
    let message = closing.message(&limits);
    tracing::info!(conn = id, %peer, "closing the connection: {message}");
    let _ = handle
        .disconnect(closing.code(), message, String::new())
        .await;
    if tokio::time::timeout(CLOSE_WAIT, &mut running)
        .await
        .is_err()
    {
        tracing::debug!(conn = id, %peer, "the client stays after being disconnected");
    }
}

/// Resolves with the reason to close the connection: no authentication by `auth_deadline`,
/// no session for `idle`, or shutdown once no session runs.
async fn watchdog(
    mut status: watch::Receiver<ConnStatus>,
    mut phase: watch::Receiver<Phase>,
    auth_deadline: Instant,
    idle: Duration,
) -> Closing {
    let mut idle_since = Instant::now();
    let mut last = ConnStatus::default();
    loop {
        let now = *status.borrow_and_update();
        let p = *phase.borrow_and_update();
        if now.full {
            return Closing::Full;
        }
        if (now.authenticated && !last.authenticated) || (now.sessions == 0 && last.sessions > 0) {
            idle_since = Instant::now();
        }
        last = now;
        let deadline = if p != Phase::Running && now.sessions == 0 {
            // A client whose last session just ended closes the connection itself, having
            // read the exit status; closing it first would make ssh exit with 255.
            Some((idle_since + SHUTDOWN_LINGER, Closing::Shutdown))
        } else if !now.authenticated {
            Some((auth_deadline, Closing::AuthTimeout))
        } else if now.sessions == 0 {
            Some((idle_since + idle, Closing::Idle))
        } else {
            None
        };
        let sleep = async {
            match deadline {
                Some((at, why)) => {
                    tokio::time::sleep_until(at).await;
                    why
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            why = sleep => return why,
            changed = status.changed() => {
                if changed.is_err() {
                    // The connection is ending by itself.
                    std::future::pending::<()>().await;
                }
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return Closing::Shutdown;
                }
            }
        }
    }
}

/// The authenticated account of a connection.
struct Account {
    name: String,
    /// The fingerprint of the key it authenticated with.
    key: String,
    /// `None` when the account had its maximum of connections already: every command on
    /// this connection is then refused.
    slot: Option<AccountSlot>,
}

/// A session channel that runs nothing yet.
struct PendingChannel {
    channel: Channel<Msg>,
    /// The client asked for a terminal (refused; the channel's command will be too).
    pty: bool,
}

/// russh's per-connection handler.
struct Connection<S> {
    shared: Arc<Shared<S>>,
    id: u64,
    peer: SocketAddr,
    /// Its place in the unauthenticated budget, until it authenticates.
    ticket: Ticket,
    /// Its place among `max_connections`, once authenticated.
    slot: Arc<Mutex<Option<AuthenticatedSlot>>>,
    status: Arc<watch::Sender<ConnStatus>>,
    account: Option<Account>,
    channels: HashMap<ChannelId, PendingChannel>,
}

/// Decrements a connection's session count when a session task ends, however it ends.
struct SessionGuard(Arc<watch::Sender<ConnStatus>>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0
            .send_modify(|s| s.sessions = s.sessions.saturating_sub(1));
    }
}

impl<S: SessionService> Connection<S> {
    /// The account `key` logs in as, or why it does not.
    fn check_key(&self, key: &PublicKey) -> Result<String, String> {
        let types = &self.shared.live.keys.types;
        if !types.allows(key) {
            return Err(format!(
                "key type {} is not enabled (ssh.key_types enables {})",
                key.algorithm().as_str(),
                types.names().join(", ")
            ));
        }
        match self.shared.live.keys.current().lookup(key) {
            Some(entry) => Ok(entry.account.clone()),
            None => Err("the key is not in the authorized keys file".to_owned()),
        }
    }

    fn refuse_auth(&self, user: &str, key: &PublicKey, reason: &str) -> Auth {
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            user,
            key = %fingerprint(key),
            "refused a key: {reason}"
        );
        Auth::reject()
    }

    /// Refuses a channel's request with `error: <message>` on its stderr, exit status 1, and
    /// closes the channel, the way a shell reports a command it cannot run. On a channel
    /// that already runs a session, the request alone fails.
    fn refuse_channel(
        &mut self,
        id: ChannelId,
        session: &mut Session,
        message: &str,
    ) -> Result<(), ServerError> {
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            account = self.account.as_ref().map_or("", |a| a.name.as_str()),
            "refused: {message}"
        );
        if self.channels.remove(&id).is_none() {
            session.channel_failure(id)?;
            return Ok(());
        }
        session.channel_success(id)?;
        session.extended_data(id, 1, format!("error: {message}\n"))?;
        session.exit_status_request(id, 1)?;
        session.eof(id)?;
        session.close(id)?;
        Ok(())
    }

    /// Starts the serve session for `exec` on channel `id`.
    fn start_session(
        &mut self,
        id: ChannelId,
        channel: Channel<Msg>,
        exec: Exec,
        session: &mut Session,
    ) -> Result<(), ServerError> {
        let Some(account) = &self.account else {
            return self.refuse_channel(id, session, "not authenticated");
        };
        session.channel_success(id)?;
        let (write, protocol, command) = match exec {
            Exec::Session(s) => (s.write, s.protocol, None),
            Exec::Command(words) => (false, nixbuild_core::serve::Protocol::Serve, Some(words)),
        };
        let request = SessionRequest {
            account: account.name.clone(),
            write,
            protocol,
            command,
            key: account.key.clone(),
            connection: self.id,
            peer: self.peer,
        };
        self.status.send_modify(|s| s.sessions += 1);
        let guard = SessionGuard(self.status.clone());
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            run_session(shared, request, channel).await;
        });
        Ok(())
    }
}

/// Runs one serve session on a channel, then sends its exit status and closes the channel.
async fn run_session<S: SessionService>(
    shared: Arc<Shared<S>>,
    request: SessionRequest,
    channel: Channel<Msg>,
) {
    let (mut read, write) = channel.split();
    let mut stderr = write.make_writer_ext(Some(1));
    let mut phase = shared.phase.clone();
    let finished = {
        let serve = shared.service.serve(
            &request,
            read.make_reader(),
            ChannelStdout(&write),
            &mut stderr,
        );
        tokio::select! {
            status = serve => Some(status),
            _ = phase.wait_for(|p| *p == Phase::CuttingOff) => None,
        }
    };
    let status = match finished {
        Some(status) => status,
        None => {
            tracing::warn!(
                conn = request.connection,
                account = %request.account,
                "cut off a session at shutdown"
            );
            let msg = "error: the nixbuild server is shutting down; this session was cut off \
                       at the end of the grace period (timeouts.shutdown)\n";
            let _ = stderr.write_all(msg.as_bytes()).await;
            1
        }
    };
    // Data already written is queued ahead of these, so the client has it all first.
    let _ = write.exit_status(status).await;
    let _ = write.eof().await;
    let _ = write.close().await;
}

impl<S: SessionService> Handler for Connection<S> {
    type Error = ServerError;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        key: &PublicKey,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.check_key(key) {
            Ok(_) => Auth::Accept,
            Err(reason) => self.refuse_auth(user, key, &reason),
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        // The signature checked out; the file may have changed since the offer.
        let name = match self.check_key(key) {
            Ok(name) => name,
            Err(reason) => return Ok(self.refuse_auth(user, key, &reason)),
        };
        // Out of the unauthenticated budget. A connection evicted meanwhile is being cut off.
        if !self.shared.leave_unauthenticated(self.ticket) {
            return Ok(self.refuse_auth(
                user,
                key,
                "the connection was evicted before it authenticated (ssh.max_unauthenticated)",
            ));
        }
        let max = self.shared.live.limits().max_connections;
        match AuthenticatedSlot::acquire(&self.shared.authenticated, max) {
            Some(slot) => *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot),
            None => {
                tracing::warn!(
                    conn = self.id,
                    peer = %self.peer,
                    account = %name,
                    key = %fingerprint(key),
                    "refused an authenticated connection: the server has its maximum of {max} \
                     authenticated connections (ssh.max_connections)"
                );
                // Accepted, so that the client reads the reason in the disconnect message
                // the watchdog sends at once; a rejection would only say "permission denied".
                self.status.send_modify(|s| s.full = true);
                return Ok(Auth::Accept);
            }
        }
        let max = self.shared.live.limits().max_connections_per_account;
        let slot = self.shared.accounts.acquire(&name, max);
        if slot.is_none() {
            tracing::warn!(
                conn = self.id,
                peer = %self.peer,
                account = %name,
                "the account has its maximum of {max} connections \
                 (ssh.max_connections_per_account); its commands on this one are refused"
            );
        }
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            account = %name,
            user,
            key = %fingerprint(key),
            "authenticated"
        );
        self.account = Some(Account {
            name,
            key: fingerprint(key).to_string(),
            slot,
        });
        self.status.send_modify(|s| s.authenticated = true);
        Ok(Auth::Accept)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            user,
            key_id = certificate.key_id(),
            "refused a certificate: certificates are not accepted, only keys in the \
             authorized keys file"
        );
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            user,
            "refused password authentication: only public keys are accepted"
        );
        Ok(Auth::reject())
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            user,
            "refused keyboard-interactive authentication: only public keys are accepted"
        );
        Ok(Auth::reject())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let open = self.channels.len() + self.status.borrow().sessions;
        let max = self.shared.live.limits().max_sessions_per_connection;
        if open >= max {
            tracing::info!(
                conn = self.id,
                peer = %self.peer,
                "refused a session channel: {max} are open on this connection \
                 (ssh.max_sessions_per_connection)"
            );
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.channels.insert(
            channel.id(),
            PendingChannel {
                channel,
                pty: false,
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forwarding("an X11 channel");
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forwarding(&format!(
            "port forwarding to {host_to_connect}:{port_to_connect}"
        ));
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forwarding("a forwarded-tcpip channel");
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forwarding(&format!("forwarding to the socket {socket_path}"));
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse_forwarding(&format!("remote port forwarding from {address}:{port}"));
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse_forwarding(&format!("remote forwarding from the socket {socket_path}"));
        Ok(false)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse_forwarding("agent forwarding");
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forwarding("X11 forwarding");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Clients send LANG and LC_* by default; nothing here reads the environment.
        tracing::debug!(
            conn = self.id,
            variable_name,
            "ignored an environment variable"
        );
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            "refused a terminal (pty): the channel's command is refused"
        );
        // No terminal is allocated, ever. The request is answered with success all the same:
        // `ssh -t` closes the channel on a failure before it prints anything the server sent,
        // so the user would only see "PTY allocation request failed". This way the command
        // that follows is refused with PTY_REFUSED on its stderr.
        match self.channels.get_mut(&channel) {
            Some(pending) => {
                pending.pty = true;
                session.channel_success(channel)?;
            }
            // A channel already running its command gets no terminal either.
            None => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let message = if self.channels.get(&channel).is_some_and(|c| c.pty) {
            format!("terminals are not served, and neither are shells; {SERVED}")
        } else {
            format!("no shell is served; {SERVED}")
        };
        self.refuse_channel(channel, session, &message)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let message = format!("the subsystem {name:?} is not served; {SERVED}");
        self.refuse_channel(channel, session, &message)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(&data[..data.len().min(200)]).into_owned();
        let Some(pending) = self.channels.get(&channel) else {
            tracing::info!(
                conn = self.id,
                peer = %self.peer,
                command,
                "refused a second command on a channel that runs one"
            );
            session.channel_failure(channel)?;
            return Ok(());
        };
        if pending.pty {
            return self.refuse_channel(channel, session, PTY_REFUSED);
        }
        let exec = match parse_exec(data) {
            Ok(exec) => exec,
            Err(refusal) => {
                let message = match refusal {
                    ExecRefusal::Other(_) => format!("{refusal} (command: {command:?})"),
                    _ => refusal.to_string(),
                };
                return self.refuse_channel(channel, session, &message);
            }
        };
        if self.status.borrow().full {
            let message = full_message(self.shared.live.limits().max_connections);
            return self.refuse_channel(channel, session, &message);
        }
        if *self.shared.phase.borrow() != Phase::Running {
            return self.refuse_channel(
                channel,
                session,
                "the nixbuild server is shutting down; try again in a moment",
            );
        }
        if self.account.as_ref().is_some_and(|a| a.slot.is_none()) {
            let max = self.shared.live.limits().max_connections_per_account;
            return self.refuse_channel(
                channel,
                session,
                &format!(
                    "this account already has its maximum of {max} connections to this server \
                     (ssh.max_connections_per_account); close some and try again"
                ),
            );
        }
        tracing::debug!(conn = self.id, command, "exec");
        match self.channels.remove(&channel) {
            Some(pending) => self.start_session(channel, pending.channel, exec, session),
            None => Ok(()),
        }
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }
}

impl<S> Connection<S> {
    fn refuse_forwarding(&self, what: &str) {
        tracing::info!(
            conn = self.id,
            peer = %self.peer,
            account = self.account.as_ref().map_or("", |a| a.name.as_str()),
            "refused {what}: no forwarding is served"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    const AUTH: Duration = Duration::from_secs(60);
    const IDLE: Duration = Duration::from_secs(1800);

    struct Watched {
        status: watch::Sender<ConnStatus>,
        phase: watch::Sender<Phase>,
        task: tokio::task::JoinHandle<(Closing, Instant)>,
        start: Instant,
    }

    /// Starts a watchdog on a fresh connection, with the clock paused.
    fn watch_connection() -> Watched {
        let start = Instant::now();
        let (status, status_rx) = watch::channel(ConnStatus::default());
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let task = tokio::spawn(async move {
            let why = watchdog(status_rx, phase_rx, start + AUTH, IDLE).await;
            (why, Instant::now())
        });
        Watched {
            status,
            phase,
            task,
            start,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unauthenticated_connection_ends_at_the_auth_timeout() {
        let w = watch_connection();
        let (why, at) = w.task.await.unwrap();
        assert_eq!(why, Closing::AuthTimeout);
        assert_eq!(at - w.start, AUTH);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_authenticated_beyond_max_connections_is_closed_at_once() {
        let w = watch_connection();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at_auth = Instant::now();
        w.status.send_modify(|s| s.full = true);
        let (why, at) = w.task.await.unwrap();
        assert_eq!(why, Closing::Full);
        assert_eq!(at, at_auth);
        let limits = Limits {
            auth_timeout: AUTH,
            idle_timeout: IDLE,
            max_connections: 3,
            max_unauthenticated: 64,
            max_unauthenticated_per_source: 8,
            max_connections_per_account: 1,
            max_sessions_per_connection: 1,
            shutdown_grace: AUTH,
        };
        assert!(why
            .message(&limits)
            .contains("maximum of 3 authenticated connections (ssh.max_connections)"));
    }

    #[test]
    fn authenticated_slots_are_bounded_and_given_back_when_dropped() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = AuthenticatedSlot::acquire(&count, 2).unwrap();
        let b = AuthenticatedSlot::acquire(&count, 2).unwrap();
        assert!(AuthenticatedSlot::acquire(&count, 2).is_none());
        drop(a);
        let c = AuthenticatedSlot::acquire(&count, 2).unwrap();
        drop((b, c));
        assert_eq!(count.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_last_session() {
        let w = watch_connection();
        tokio::time::sleep(Duration::from_secs(10)).await;
        w.status.send_modify(|s| s.authenticated = true);
        tokio::time::sleep(Duration::from_secs(100)).await;
        w.status.send_modify(|s| s.sessions = 1);
        // A session running far longer than the idle timeout keeps the connection.
        tokio::time::sleep(IDLE * 3).await;
        assert!(!w.task.is_finished());
        let ended = Instant::now();
        w.status.send_modify(|s| s.sessions = 0);
        let (why, at) = w.task.await.unwrap();
        assert_eq!(why, Closing::Idle);
        assert_eq!(at - ended, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_sessions_then_lets_the_client_leave_first() {
        let w = watch_connection();
        w.status.send_modify(|s| {
            s.authenticated = true;
            s.sessions = 2;
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        w.phase.send_replace(Phase::Draining);
        tokio::time::sleep(Duration::from_secs(100)).await;
        w.status.send_modify(|s| s.sessions = 1);
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!w.task.is_finished());
        let ended = Instant::now();
        w.status.send_modify(|s| s.sessions = 0);
        let (why, at) = w.task.await.unwrap();
        assert_eq!(why, Closing::Shutdown);
        assert_eq!(at - ended, SHUTDOWN_LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_soon_after_shutdown_starts() {
        let w = watch_connection();
        w.status.send_modify(|s| s.authenticated = true);
        tokio::time::sleep(Duration::from_secs(600)).await;
        let draining = Instant::now();
        w.phase.send_replace(Phase::Draining);
        let (why, at) = w.task.await.unwrap();
        assert_eq!(why, Closing::Shutdown);
        assert_eq!(at, draining, "idle for long: closed at once");
    }

    #[test]
    fn the_key_ring_keeps_its_keys_when_the_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        let key = russh::keys::ssh_key::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]),
        );
        let line = format!("{} alice\n", key.public_key().to_openssh().unwrap());
        std::fs::write(&path, &line).unwrap();
        let ring = KeyRing::load(&path, KeyTypes::default()).unwrap();
        assert_eq!(ring.current().len(), 1);
        std::fs::remove_file(&path).unwrap();
        ring.reload_if_changed();
        assert_eq!(ring.current().len(), 1, "a missing file keeps the old keys");
        std::fs::write(&path, "").unwrap();
        ring.reload_if_changed();
        assert_eq!(ring.current().len(), 0);
        assert!(matches!(
            KeyRing::load(&dir.path().join("nope"), KeyTypes::default()),
            Err(ServerError::AuthorizedKeys { .. })
        ));
    }
}
