//! The soak load generator: many concurrent SSH sessions from many accounts against one
//! `nixbuild-server` on loopback, mixing queries, uploads of random closures, trivial and
//! failing builds, and downloads checked against what was uploaded, while the server's
//! memory, descriptors and threads are sampled from `/proc`. Each connection speaks one of
//! the two protocols of the SSH front door, in turn: the serve protocol
//! (`nix-store --serve --write`, `ssh://`) or the worker protocol (`nix-daemon --stdio`,
//! `ssh-ng://`). The operations are the same kinds in both (their requests differ), checked
//! against the same known paths with the same checks.
//!
//! Shared by the `soak` bench (`benches/soak/main.rs`, the long run) and `tests/soak.rs` (a
//! short run in the normal test suite), which both declare `mod harness` at their root: the
//! server is the end-to-end fixture's `SshServer` (its printed host key pinned, keys made by
//! `ssh-keygen`), the client is russh with the serve and worker codecs of `nixbuild_core`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nixbuild_core::derivation::{BasicDerivation, DerivationOutput};
use nixbuild_core::hash::Hash;
use nixbuild_core::nar::{NarError, NarEvent, NarNode, NarReader};
use nixbuild_core::serve::handshake::ServerHello;
use nixbuild_core::serve::{
    AddToStoreNar, BuildOptions, BuildStatus, ClientHello, ExportMarker, ExportTrailer, Limits,
    Opcode, Request, Response, ServeError, ValidPathInfo,
};
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire::{self, Reader};
use nixbuild_core::worker::{self as ng, WorkerError, WorkerVersion};
use nixbuild_ssh::client::Pinned;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::ChannelMsg;

use crate::harness::ssh::{keygen, SshServer};
use crate::harness::{export_stream, sha256, VERSION};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sessions open at once (one SSH connection each).
    pub sessions: usize,
    /// How long the sessions keep sending requests.
    pub duration: Duration,
    /// Accounts the sessions are spread over (at most `sessions`).
    pub accounts: usize,
    /// Keys per account in `authorized_keys`; the sessions of an account use them in turn.
    pub keys_per_account: usize,
    /// Mean pause of a session between two operations (uniform on 0 to twice this).
    pub think: Duration,
    /// Seed of the sessions' random choices.
    pub seed: u64,
    /// The protocols the sessions speak: a session's connections take them in turn.
    pub protocols: Vec<Protocol>,
    /// With a collector: `[store] retention` and `gc_interval` in seconds. Sessions then use
    /// only paths they used (uploaded, saw valid, downloaded, built) recently enough that the
    /// server must still hold them, upload busybox again before a build when it may be gone,
    /// and the end checks those paths (others may be gone; if not, they have their hash).
    pub gc: Option<(u64, u64)>,
}

/// Margin, in milliseconds, between a path's last use and its retention within which the
/// sessions count on it still being there: the server's clock counts whole seconds, and an
/// operation takes a moment between the server's use and the client's.
const GC_SLACK_MS: u64 = 2500;

/// When paths were last used, in milliseconds since the run started, and how recent a use
/// must be for a path to be certainly held.
#[derive(Debug)]
struct Clock {
    start: Instant,
    /// `None`: no collector, every path is held.
    keep_ms: Option<u64>,
}

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Whether a path last used at `used` is certainly still held.
    fn held(&self, used: &AtomicU64) -> bool {
        self.keep_ms
            .is_none_or(|keep| self.now() < used.load(Ordering::Relaxed).saturating_add(keep))
    }

    fn touch(&self, k: &Known) {
        k.used.store(self.now(), Ordering::Relaxed);
    }
}

/// The protocols of the SSH front door.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// `nix-store --serve --write` (`ssh://`).
    Serve,
    /// `nix-daemon --stdio` (`ssh-ng://`): the worker protocol.
    Daemon,
}

impl Protocol {
    /// Both.
    pub const ALL: [Protocol; 2] = [Protocol::Serve, Protocol::Daemon];

    fn command(self) -> &'static str {
        match self {
            Protocol::Serve => "nix-store --serve --write",
            Protocol::Daemon => "nix-daemon --stdio",
        }
    }

    /// The kinds of operation a session of this protocol runs, in report order.
    fn ops(self) -> &'static [Op] {
        match self {
            Protocol::Serve => &[
                Op::Connect,
                Op::QueryValidPaths,
                Op::QueryPathInfos,
                Op::AddToStoreNar,
                Op::ImportPaths,
                Op::DumpStorePath,
                Op::ExportPaths,
                Op::Build,
                Op::FailingBuild,
                Op::BadUpload,
                Op::Abandon,
                Op::Close,
            ],
            Protocol::Daemon => &[
                Op::Connect,
                Op::QueryValidPaths,
                Op::QueryPathInfo,
                Op::AddToStoreNar,
                Op::AddMultipleToStore,
                Op::NarFromPath,
                Op::Build,
                Op::FailingBuild,
                Op::BadUpload,
                Op::Abandon,
                Op::Close,
            ],
        }
    }

    /// Relative weights of the operations a session picks between connect and close. The
    /// worker protocol has no ExportPaths: its weight goes to NarFromPath.
    fn mix(self) -> &'static [(Op, u32)] {
        match self {
            Protocol::Serve => &[
                (Op::QueryValidPaths, 28),
                (Op::QueryPathInfos, 20),
                (Op::AddToStoreNar, 14),
                (Op::ImportPaths, 10),
                (Op::DumpStorePath, 10),
                (Op::ExportPaths, 6),
                (Op::Build, 6),
                (Op::FailingBuild, 3),
                (Op::BadUpload, 1),
                (Op::Abandon, 1),
            ],
            Protocol::Daemon => &[
                (Op::QueryValidPaths, 28),
                (Op::QueryPathInfo, 20),
                (Op::AddToStoreNar, 14),
                (Op::AddMultipleToStore, 10),
                (Op::NarFromPath, 16),
                (Op::Build, 6),
                (Op::FailingBuild, 3),
                (Op::BadUpload, 1),
                (Op::Abandon, 1),
            ],
        }
    }

    fn pick(self, rng: &mut fastrand::Rng) -> Op {
        let total: u32 = self.mix().iter().map(|(_, w)| w).sum();
        let mut x = rng.u32(0..total);
        for &(op, w) in self.mix() {
            if x < w {
                return op;
            }
            x -= w;
        }
        unreachable!("x < total")
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "serve" | "ssh" => Ok(Protocol::Serve),
            "daemon" | "ng" | "ssh-ng" => Ok(Protocol::Daemon),
            _ => Err(format!("unknown protocol {s:?}: serve or daemon")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Serve => "serve",
            Protocol::Daemon => "daemon",
        })
    }
}

/// The version the worker sessions speak (the server's, Nix 2.34's).
const NG: WorkerVersion = WorkerVersion::SERVER;

/// A kind of operation in one protocol: the key of the figures. Shown as the operation's
/// name, with `ng:` in front for the worker protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Kind(pub Protocol, pub Op);

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Protocol::Serve => write!(f, "{}", self.1),
            Protocol::Daemon => write!(f, "ng:{}", self.1),
        }
    }
}

/// What went wrong in one operation, from the client's point of view.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// The SSH layer failed (connection, key exchange, channel).
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
    /// The server refused the key.
    #[error("public key authentication refused")]
    AuthRefused,
    /// The server refused `nix-store --serve --write` or `nix-daemon --stdio`.
    #[error("exec request refused")]
    ExecRefused,
    /// The server's bytes are not the serve protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ServeError),
    /// The server's bytes are not the worker protocol.
    #[error("worker protocol: {0}")]
    Worker(#[from] WorkerError),
    /// The server answered a worker request with an error (`STDERR_ERROR`).
    #[error("the server answered with an error: {0}")]
    Refused(String),
    /// A downloaded NAR is not a NAR.
    #[error("downloaded NAR: {0}")]
    Nar(#[from] NarError),
    /// The session ended before the answer came.
    #[error("the session ended (exit status {status:?}): {stderr}")]
    Ended {
        /// The exit status, if one came.
        status: Option<u32>,
        /// The end of the session's stderr.
        stderr: String,
    },
    /// No answer within the operation's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer is not what the server must say.
    #[error("wrong answer: {0}")]
    Wrong(String),
}

/// The kinds of operation, each with its own latency figures per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// TCP connect, key exchange, authentication, exec, protocol hello.
    Connect,
    /// QueryValidPaths of known, unknown and other accounts' paths.
    QueryValidPaths,
    /// QueryPathInfos (serve) of known and unknown paths.
    QueryPathInfos,
    /// QueryPathInfo (worker) of known and unknown paths, pipelined.
    QueryPathInfo,
    /// A random closure uploaded path by path with AddToStoreNar (the worker's NAR framed).
    AddToStoreNar,
    /// A random closure uploaded as one ImportPaths export stream (serve).
    ImportPaths,
    /// A random closure uploaded as one framed AddMultipleToStore stream (worker).
    AddMultipleToStore,
    /// DumpStorePath (serve) of a known path, compared with its NAR.
    DumpStorePath,
    /// NarFromPath (worker) of a known path, compared with its NAR.
    NarFromPath,
    /// ExportPaths (serve) of known paths, compared with their NARs and references.
    ExportPaths,
    /// A BuildDerivation that succeeds; its output joins the known paths.
    Build,
    /// A BuildDerivation whose builder exits 3 (expected: PermanentFailure).
    FailingBuild,
    /// An AddToStoreNar claiming a wrong hash (expected: the session ends with an error).
    BadUpload,
    /// Half an upload, then the connection is dropped (expected: nothing is registered).
    Abandon,
    /// The end of a session: EOF, exit status 0, disconnect.
    Close,
}

impl Op {
    /// How long an answer may take: builds queue behind each other on a loaded server.
    fn timeout(self) -> Duration {
        match self {
            Op::Build | Op::FailingBuild => Duration::from_secs(600),
            _ => Duration::from_secs(120),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A path an account has (acknowledged by the server), with what the server must say of it.
#[derive(Debug)]
struct Known {
    path: StorePath,
    nar: Bytes,
    hash: Hash,
    references: BTreeSet<StorePath>,
    deriver: Option<StorePath>,
    /// When this account last used it (see [`Clock`]).
    used: Arc<AtomicU64>,
}

/// Most known paths a session draws from per account (newer ones replace random older ones).
const KNOWN_SAMPLE: usize = 512;

/// One account: its name, its busybox, and the paths the server acknowledged to it.
struct Account {
    name: String,
    busybox: Arc<Known>,
    /// A bounded sample, for queries and downloads.
    sample: Mutex<Vec<Arc<Known>>>,
    /// Every acknowledged path with its hash and last use, checked in the store after the
    /// run.
    all: Mutex<Vec<(StorePath, Hash, Arc<AtomicU64>)>>,
    clock: Arc<Clock>,
}

impl Account {
    fn add(&self, known: Arc<Known>, rng: &mut fastrand::Rng) {
        self.clock.touch(&known);
        lock(&self.all).push((known.path.clone(), known.hash, known.used.clone()));
        let mut sample = lock(&self.sample);
        if sample.len() < KNOWN_SAMPLE {
            sample.push(known);
        } else {
            let i = rng.usize(..sample.len());
            sample[i] = known;
        }
    }

    /// Up to a random number in `n` of the account's known paths (fewer on repeats).
    fn pick(&self, rng: &mut fastrand::Rng, n: std::ops::Range<usize>) -> Vec<Arc<Known>> {
        let n = rng.usize(n);
        let sample = lock(&self.sample);
        let mut picked: Vec<Arc<Known>> = Vec::new();
        for _ in 0..n.min(sample.len()) {
            let k = &sample[rng.usize(..sample.len())];
            if self.clock.held(&k.used) && !picked.iter().any(|p| p.path == k.path) {
                picked.push(k.clone());
            }
        }
        picked
    }

    /// Marks `paths` used now (the server said they are valid, or sent them).
    fn used<'a>(&self, paths: impl IntoIterator<Item = &'a Arc<Known>>) {
        for k in paths {
            self.clock.touch(k);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A session that panicked fails the run anyway; its data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Latencies and outcomes gathered by the sessions.
#[derive(Debug, Default)]
struct Stats {
    /// Microseconds per successful (or expectedly failing) operation.
    latencies: BTreeMap<Kind, Vec<u32>>,
    /// Expected failures by kind (failing builds, bad uploads, abandoned uploads).
    expected: BTreeMap<Kind, u64>,
    /// Unexpected errors by kind.
    unexpected: BTreeMap<Kind, u64>,
    /// Distinct unexpected error messages, with their counts.
    messages: BTreeMap<String, u64>,
    /// Sessions the server ran (exec requests that were accepted).
    sessions_opened: u64,
}

impl Stats {
    fn ok(&mut self, op: Kind, started: Instant) {
        let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        self.latencies.entry(op).or_default().push(us);
    }

    fn expected(&mut self, op: Kind, started: Instant) {
        *self.expected.entry(op).or_default() += 1;
        self.ok(op, started);
    }

    fn unexpected(&mut self, op: Kind, e: &SoakError) {
        *self.unexpected.entry(op).or_default() += 1;
        let msg = format!("{op}: {e}");
        if self.messages.len() < 64 || self.messages.contains_key(&msg) {
            *self.messages.entry(msg).or_default() += 1;
        }
    }

    fn merge(&mut self, other: Stats) {
        for (op, mut v) in other.latencies {
            self.latencies.entry(op).or_default().append(&mut v);
        }
        for (op, n) in other.expected {
            *self.expected.entry(op).or_default() += n;
        }
        for (op, n) in other.unexpected {
            *self.unexpected.entry(op).or_default() += n;
        }
        for (m, n) in other.messages {
            *self.messages.entry(m).or_default() += n;
        }
        self.sessions_opened += other.sessions_opened;
    }
}

/// Where and how sessions connect.
struct Target {
    addr: SocketAddr,
    host_key: PublicKey,
    config: Arc<client::Config>,
}

/// One session (`nix-store --serve --write` or `nix-daemon --stdio`) over its own SSH
/// connection.
struct Conn {
    protocol: Protocol,
    handle: client::Handle<Pinned>,
    channel: russh::Channel<client::Msg>,
    /// Protocol bytes received and not yet consumed.
    buf: Vec<u8>,
    /// The end of the session's stderr (build logs, error messages).
    stderr: Vec<u8>,
    status: Option<u32>,
    ended: bool,
}

/// How much of a session's stderr is kept for messages.
const STDERR_KEPT: usize = 4096;

impl Conn {
    async fn open(
        target: &Target,
        key: &Arc<PrivateKey>,
        protocol: Protocol,
    ) -> Result<Conn, SoakError> {
        let mut handle = client::connect(
            target.config.clone(),
            target.addr,
            Pinned::new(target.host_key.clone()),
        )
        .await?;
        let auth = handle
            .authenticate_publickey("nix", PrivateKeyWithHashAlg::new(key.clone(), None))
            .await?;
        if !auth.success() {
            return Err(SoakError::AuthRefused);
        }
        let channel = handle.channel_open_session().await?;
        channel.exec(true, protocol.command()).await?;
        let mut conn = Conn {
            protocol,
            handle,
            channel,
            buf: Vec::new(),
            stderr: Vec::new(),
            status: None,
            ended: false,
        };
        loop {
            match conn.channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) | None => return Err(SoakError::ExecRefused),
                Some(msg) => conn.absorb(msg),
            }
        }
        let mut hello = Vec::new();
        match protocol {
            Protocol::Serve => ClientHello { version: VERSION }.encode(&mut hello),
            Protocol::Daemon => ng::ClientHello {
                version: NG,
                features: BTreeSet::new(),
                affinity: None,
                reserve_space: false,
            }
            .encode(WorkerVersion::SERVER, &mut hello),
        }
        conn.send(&hello).await?;
        match protocol {
            Protocol::Serve => loop {
                if let Some((hello, n)) = ServerHello::decode(&conn.buf)? {
                    if hello.version != nixbuild_core::serve::ProtocolVersion::SERVER {
                        return Err(SoakError::Wrong(format!("server hello {hello:?}")));
                    }
                    conn.buf.drain(..n);
                    break;
                }
                conn.fill().await?;
            },
            Protocol::Daemon => {
                let limits = ng::Limits::default().wire;
                let hello = conn
                    .read_item(|r| ng::ServerHello::read(r, NG, &limits))
                    .await?;
                if hello.version != WorkerVersion::SERVER || hello.trust != ng::Trust::Trusted {
                    return Err(SoakError::Wrong(format!("server hello {hello:?}")));
                }
            }
        }
        Ok(conn)
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), SoakError> {
        Ok(self.channel.data(bytes).await?)
    }

    fn absorb(&mut self, msg: ChannelMsg) {
        match msg {
            ChannelMsg::Data { data } => self.buf.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, .. } => {
                self.stderr.extend_from_slice(&data);
                if self.stderr.len() > 2 * STDERR_KEPT {
                    self.stderr.drain(..self.stderr.len() - STDERR_KEPT);
                }
            }
            ChannelMsg::ExitStatus { exit_status } => self.status = Some(exit_status),
            ChannelMsg::Eof | ChannelMsg::Close => self.ended = true,
            _ => {}
        }
    }

    fn stderr_text(&self) -> String {
        let tail = &self.stderr[self.stderr.len().saturating_sub(STDERR_KEPT)..];
        String::from_utf8_lossy(tail).trim().to_owned()
    }

    /// Waits for the next message from the server.
    async fn fill(&mut self) -> Result<(), SoakError> {
        if self.ended {
            return Err(SoakError::Ended {
                status: self.status,
                stderr: self.stderr_text(),
            });
        }
        match self.channel.wait().await {
            Some(msg) => {
                self.absorb(msg);
                Ok(())
            }
            None => {
                self.ended = true;
                Ok(())
            }
        }
    }

    /// Sends `request` (and `then`, raw bytes such as a NAR) and reads its fixed-shape answer.
    async fn call(&mut self, request: &Request, then: &[u8]) -> Result<Response, SoakError> {
        let mut bytes = Vec::new();
        request.encode(VERSION, &mut bytes);
        bytes.extend_from_slice(then);
        self.send(&bytes).await?;
        self.response(request.opcode()).await
    }

    async fn response(&mut self, op: Opcode) -> Result<Response, SoakError> {
        loop {
            if let Some((r, n)) = Response::decode(op, &self.buf, VERSION, &Limits::default())? {
                self.buf.drain(..n);
                return Ok(r);
            }
            self.fill().await?;
        }
    }

    /// Sends a worker `request`, then `payload` (if any) framed, and reads the log channel up
    /// to its answer: `None` for NarFromPath, whose NAR follows; an error on the log channel
    /// is [`SoakError::Refused`].
    async fn ng_call(
        &mut self,
        request: &ng::Request,
        payload: Option<&[u8]>,
    ) -> Result<Option<ng::Response>, SoakError> {
        let mut bytes = Vec::new();
        request.encode(NG, &mut bytes);
        if let Some(data) = payload {
            framed(data, &mut bytes);
        }
        self.send(&bytes).await?;
        self.ng_answer(request.opcode()).await
    }

    /// Reads the log channel (log lines, build activities) up to the answer to `op`.
    async fn ng_answer(&mut self, op: ng::Opcode) -> Result<Option<ng::Response>, SoakError> {
        let limits = ng::Limits::default().wire;
        loop {
            match self
                .read_item(|r| ng::StderrMessage::read(r, NG, &limits))
                .await?
            {
                ng::StderrMessage::Last => {
                    return self
                        .read_item(|r| ng::Response::read(r, op, NG, &limits))
                        .await
                }
                ng::StderrMessage::Error(e) => {
                    return Err(SoakError::Refused(
                        String::from_utf8_lossy(&e.msg).into_owned(),
                    ))
                }
                ng::StderrMessage::Read(n) => {
                    return Err(SoakError::Wrong(format!(
                        "STDERR_READ {n} at version {NG}, whose payloads are framed"
                    )))
                }
                _ => {}
            }
        }
    }

    /// Reads one NAR from the stream (it delimits itself).
    async fn nar(&mut self) -> Result<Vec<u8>, SoakError> {
        let mut reader = NarReader::new();
        let mut pos = 0;
        loop {
            let (n, event) = reader.feed(&self.buf[pos..])?;
            pos += n;
            match event {
                Some(NarEvent::End) => return Ok(self.buf.drain(..pos).collect()),
                Some(_) => {}
                None => self.fill().await?,
            }
        }
    }

    /// Reads one fixed-shape item (of an export stream, of the log channel).
    async fn read_item<T, E>(
        &mut self,
        read: impl Fn(&mut Reader<'_>) -> wire::ReadResult<T, E>,
    ) -> Result<T, SoakError>
    where
        SoakError: From<E>,
    {
        loop {
            let mut r = Reader::new(&self.buf);
            if let Some((item, n)) = wire::complete(read(&mut r).map(|x| (x, r.position())))? {
                self.buf.drain(..n);
                return Ok(item);
            }
            self.fill().await?;
        }
    }

    /// Waits for the end of the session and returns its exit status.
    async fn finish(&mut self) -> Result<Option<u32>, SoakError> {
        while !self.ended || self.status.is_none() {
            if self.ended {
                // EOF came first; the exit status may still follow before the close.
                match self.channel.wait().await {
                    Some(msg) => self.absorb(msg),
                    None => break,
                }
            } else {
                self.fill().await?;
            }
        }
        Ok(self.status)
    }

    /// Ends the session cleanly: EOF, exit status 0 expected, then disconnect.
    async fn close(mut self) -> Result<(), SoakError> {
        self.channel.eof().await?;
        let status = self.finish().await?;
        if !self.buf.is_empty() {
            return Err(SoakError::Wrong(format!(
                "{} unexpected bytes at the end",
                self.buf.len()
            )));
        }
        if status != Some(0) {
            return Err(SoakError::Ended {
                status,
                stderr: self.stderr_text(),
            });
        }
        self.disconnect().await;
        Ok(())
    }

    async fn disconnect(self) {
        // The connection is over either way; the server side is checked after the run.
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// Appends `data` to `out` as a framed stream (`u64 len, bytes`, …, `u64 0`), in frames of
/// 32 KiB as Nix sends them.
fn framed(data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(32 << 10) {
        out.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&0u64.to_le_bytes());
}

/// A random store path named `name`.
fn random_path(rng: &mut fastrand::Rng, name: &str) -> StorePath {
    let mut digest = [0u8; 20];
    rng.fill(&mut digest);
    StorePath::from_digest(digest, name).expect("soak path names are valid")
}

/// Random bytes: mostly small, sometimes up to 1 MiB.
fn random_contents(rng: &mut fastrand::Rng, refs: &[&StorePath]) -> Vec<u8> {
    let len = match rng.u32(0..20) {
        0 => rng.usize(64 << 10..1 << 20),
        1..=4 => rng.usize(4096..64 << 10),
        _ => rng.usize(0..4096),
    };
    let mut out = Vec::with_capacity(len + refs.len() * 80);
    // References appear in the contents, as in real store paths.
    for r in refs {
        out.extend_from_slice(r.to_absolute().as_bytes());
        out.push(b'\n');
    }
    let start = out.len();
    out.resize(start + len, 0);
    rng.fill(&mut out[start..]);
    out
}

/// A random file tree that mentions `refs`.
fn random_tree(rng: &mut fastrand::Rng, refs: &[&StorePath]) -> NarNode {
    match rng.u32(0..3) {
        0 => NarNode::File {
            executable: rng.bool(),
            contents: random_contents(rng, refs),
        },
        _ => {
            let mut entries = BTreeMap::new();
            entries.insert(
                b"data".to_vec(),
                NarNode::File {
                    executable: false,
                    contents: random_contents(rng, refs),
                },
            );
            for i in 0..rng.usize(0..4) {
                let node = match rng.u32(0..3) {
                    0 => NarNode::Symlink {
                        target: b"data".to_vec(),
                    },
                    1 => NarNode::Directory(BTreeMap::from([(
                        b"inner".to_vec(),
                        NarNode::File {
                            executable: true,
                            contents: random_contents(rng, &[]),
                        },
                    )])),
                    _ => NarNode::File {
                        executable: rng.bool(),
                        contents: random_contents(rng, &[]),
                    },
                };
                entries.insert(format!("entry-{i}").into_bytes(), node);
            }
            NarNode::Directory(entries)
        }
    }
}

fn known(path: StorePath, tree: &NarNode, refs: BTreeSet<StorePath>) -> Arc<Known> {
    let nar = tree.to_nar().expect("soak trees are valid NARs");
    Arc::new(Known {
        path,
        hash: sha256(&nar),
        nar: nar.into(),
        references: refs,
        deriver: None,
        used: Arc::default(),
    })
}

/// A random closure of 1 to 4 new paths, dependencies first, referring to each other and to
/// paths the account has.
fn random_closure(rng: &mut fastrand::Rng, account: &Account) -> Vec<Arc<Known>> {
    let existing = account.pick(rng, 0..3);
    let mut closure: Vec<Arc<Known>> = Vec::new();
    for i in 0..rng.usize(1..5) {
        let path = random_path(rng, &format!("soak-{i}"));
        let mut refs: BTreeSet<StorePath> = BTreeSet::new();
        for k in closure.iter().chain(&existing) {
            if rng.bool() {
                refs.insert(k.path.clone());
            }
        }
        let mentioned: Vec<&StorePath> = refs.iter().collect();
        let tree = random_tree(rng, &mentioned);
        closure.push(known(path, &tree, refs));
    }
    closure
}

/// The busybox every account uploads first, as `<bb>/bin/sh` for its builds.
fn busybox() -> Arc<Known> {
    let contents = std::fs::read("/bin/busybox").expect("read /bin/busybox (busybox-static)");
    let tree = NarNode::Directory(BTreeMap::from([(
        b"bin".to_vec(),
        NarNode::Directory(BTreeMap::from([
            (
                b"busybox".to_vec(),
                NarNode::File {
                    executable: true,
                    contents,
                },
            ),
            (
                b"sh".to_vec(),
                NarNode::Symlink {
                    target: b"busybox".to_vec(),
                },
            ),
        ])),
    )]));
    let digest = sha256(b"nixbuild soak busybox");
    let mut d = [0u8; 20];
    d.copy_from_slice(&digest.digest()[..20]);
    let path = StorePath::from_digest(d, "busybox-static").expect("valid name");
    known(path, &tree, BTreeSet::new())
}

/// What an upload of `k` claims: the serve protocol's AddToStoreNar header, and the worker
/// protocol's AddToStoreNar and each path's metadata in AddMultipleToStore.
fn claim(k: &Known, nar_hash: Hash) -> AddToStoreNar {
    AddToStoreNar {
        path: k.path.clone(),
        deriver: None,
        nar_hash,
        references: k.references.clone(),
        registration_time: 0,
        nar_size: k.nar.len() as u64,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: None,
    }
}

/// An AddToStoreNar of `k` claiming `nar_hash`, with the first `len` bytes of its NAR: raw
/// after the serve protocol's header; framed after the worker's request (a cut NAR is cut in
/// its one frame, which announces all of it).
fn add_bytes(protocol: Protocol, k: &Known, nar_hash: Hash, len: usize) -> Vec<u8> {
    let info = Box::new(claim(k, nar_hash));
    let mut bytes = Vec::new();
    match protocol {
        Protocol::Serve => {
            Request::AddToStoreNar(info).encode(VERSION, &mut bytes);
            bytes.extend_from_slice(&k.nar[..len]);
        }
        Protocol::Daemon => {
            ng::Request::AddToStoreNar {
                info,
                repair: false,
                dont_check_sigs: false,
            }
            .encode(NG, &mut bytes);
            if len == k.nar.len() {
                framed(&k.nar, &mut bytes);
            } else {
                bytes.extend_from_slice(&(k.nar.len() as u64).to_le_bytes());
                bytes.extend_from_slice(&k.nar[..len]);
            }
        }
    }
    bytes
}

/// Uploads `closure` path by path with AddToStoreNar, each acknowledged before the next.
async fn upload_add(conn: &mut Conn, closure: &[Arc<Known>]) -> Result<(), SoakError> {
    for k in closure {
        conn.send(&add_bytes(conn.protocol, k, k.hash, k.nar.len()))
            .await?;
        let answer = match conn.protocol {
            Protocol::Serve => match conn.response(Opcode::AddToStoreNar).await? {
                Response::Added => continue,
                other => format!("{other:?}"),
            },
            Protocol::Daemon => match conn.ng_answer(ng::Opcode::AddToStoreNar).await? {
                Some(ng::Response::Nothing) => continue,
                other => format!("{other:?}"),
            },
        };
        return Err(SoakError::Wrong(format!("AddToStoreNar answered {answer}")));
    }
    Ok(())
}

/// Uploads `closure` as one stream: ImportPaths' export stream (serve), AddMultipleToStore's
/// framed stream (worker).
async fn upload_stream(conn: &mut Conn, closure: &[Arc<Known>]) -> Result<(), SoakError> {
    let answer = match conn.protocol {
        Protocol::Serve => {
            let entries: Vec<(StorePath, Vec<u8>, BTreeSet<StorePath>)> = closure
                .iter()
                .map(|k| (k.path.clone(), k.nar.to_vec(), k.references.clone()))
                .collect();
            match conn
                .call(&Request::ImportPaths, &export_stream(&entries))
                .await?
            {
                Response::Imported => return Ok(()),
                other => format!("ImportPaths answered {other:?}"),
            }
        }
        Protocol::Daemon => {
            let mut stream = (closure.len() as u64).to_le_bytes().to_vec();
            for k in closure {
                claim(k, k.hash).encode(&mut stream);
                stream.extend_from_slice(&k.nar);
            }
            let request = ng::Request::AddMultipleToStore {
                repair: false,
                dont_check_sigs: false,
            };
            match conn.ng_call(&request, Some(&stream)).await? {
                Some(ng::Response::Nothing) => return Ok(()),
                other => format!("AddMultipleToStore answered {other:?}"),
            }
        }
    };
    Err(SoakError::Wrong(answer))
}

/// The account-independent context of every session.
struct Shared {
    target: Arc<Target>,
    accounts: Vec<Arc<Account>>,
    /// Each account's keys.
    keys: Vec<Vec<Arc<PrivateKey>>>,
    deadline: Instant,
    think: Duration,
    protocols: Vec<Protocol>,
}

/// One session's loop: connect, run a random number of operations, close, again, until the
/// deadline.
async fn session(shared: Arc<Shared>, index: usize, seed: u64) -> Stats {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut stats = Stats::default();
    let a = index % shared.accounts.len();
    let account = shared.accounts[a].clone();
    let keys = &shared.keys[a];
    let key = keys[(index / shared.accounts.len()) % keys.len()].clone();
    // Sessions start spread over a second, as clients arrive.
    tokio::time::sleep(Duration::from_millis(rng.u64(0..1000))).await;
    // The session's connections take the protocols in turn, from a different one in each
    // session.
    let mut turn = index;
    while Instant::now() < shared.deadline {
        let protocol = shared.protocols[turn % shared.protocols.len()];
        turn += 1;
        let kind = |op| Kind(protocol, op);
        let started = Instant::now();
        let limit = Op::Connect.timeout();
        let opened = tokio::time::timeout(limit, Conn::open(&shared.target, &key, protocol));
        let mut conn = match opened.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                stats.unexpected(kind(Op::Connect), &e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                stats.unexpected(kind(Op::Connect), &SoakError::Timeout(limit));
                continue;
            }
        };
        stats.sessions_opened += 1;
        stats.ok(kind(Op::Connect), started);
        let mut quota = rng.u32(10..60);
        let mut alive = true;
        while quota > 0 && Instant::now() < shared.deadline {
            quota -= 1;
            if !shared.think.is_zero() {
                let pause = rng.u64(0..2 * shared.think.as_micros() as u64 + 1);
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
            let op = protocol.pick(&mut rng);
            let started = Instant::now();
            let result = tokio::time::timeout(
                op.timeout(),
                run_op(op, &mut conn, &shared, &account, &mut rng),
            )
            .await
            .unwrap_or(Err(SoakError::Timeout(op.timeout())));
            match result {
                Ok(Outcome::Done) => stats.ok(kind(op), started),
                Ok(Outcome::Failed) => stats.expected(kind(op), started),
                Ok(Outcome::SessionOver) => {
                    stats.expected(kind(op), started);
                    alive = false;
                    break;
                }
                Err(e) => {
                    stats.unexpected(kind(op), &e);
                    alive = false;
                    break;
                }
            }
        }
        if alive {
            let started = Instant::now();
            let limit = Op::Close.timeout();
            match tokio::time::timeout(limit, conn.close()).await {
                Ok(Ok(())) => stats.ok(kind(Op::Close), started),
                Ok(Err(e)) => stats.unexpected(kind(Op::Close), &e),
                Err(_) => stats.unexpected(kind(Op::Close), &SoakError::Timeout(limit)),
            }
        } else {
            conn.disconnect().await;
        }
    }
    stats
}

/// How an operation ended, when it went as the server must behave.
enum Outcome {
    /// It succeeded.
    Done,
    /// It failed as it must (a failing build); the session goes on.
    Failed,
    /// It ended the session as it must (a bad upload, an abandoned upload).
    SessionOver,
}

async fn run_op(
    op: Op,
    conn: &mut Conn,
    shared: &Shared,
    account: &Account,
    rng: &mut fastrand::Rng,
) -> Result<Outcome, SoakError> {
    match op {
        Op::QueryValidPaths => {
            let known = account.pick(rng, 1..9);
            let mut invisible: BTreeSet<StorePath> = (0..rng.usize(1..3))
                .map(|_| random_path(rng, "soak-missing"))
                .collect();
            // A path of another account: never visible to this one.
            if shared.accounts.len() > 1 {
                let other = &shared.accounts[rng.usize(..shared.accounts.len())];
                if other.name != account.name {
                    if let Some(k) = other.pick(rng, 1..2).pop() {
                        if k.path != account.busybox.path {
                            invisible.insert(k.path.clone());
                        }
                    }
                }
            }
            let expected: BTreeSet<StorePath> = known.iter().map(|k| k.path.clone()).collect();
            let paths = expected.iter().chain(&invisible).cloned().collect();
            let valid = query_valid(conn, paths).await?;
            if valid != expected {
                return Err(SoakError::Wrong(format!(
                    "QueryValidPaths answered {valid:?}, expected {expected:?}"
                )));
            }
            account.used(&known);
            Ok(Outcome::Done)
        }
        Op::QueryPathInfos | Op::QueryPathInfo => {
            let known = account.pick(rng, 1..7);
            let missing = random_path(rng, "soak-missing");
            let expected: BTreeMap<StorePath, ValidPathInfo> = known
                .iter()
                .map(|k| {
                    let info = ValidPathInfo {
                        deriver: k.deriver.clone(),
                        references: k.references.clone(),
                        download_size: k.nar.len() as u64,
                        nar_size: k.nar.len() as u64,
                        nar_hash: Some(k.hash),
                        ca: None,
                        sigs: BTreeSet::new(),
                    };
                    (k.path.clone(), info)
                })
                .collect();
            let paths: Vec<StorePath> = expected.keys().cloned().chain([missing]).collect();
            let infos = match conn.protocol {
                Protocol::Serve => {
                    let paths = paths.into_iter().collect();
                    match conn.call(&Request::QueryPathInfos { paths }, &[]).await? {
                        Response::PathInfos(infos) => infos,
                        other => return Err(SoakError::Wrong(format!("{op} answered {other:?}"))),
                    }
                }
                Protocol::Daemon => {
                    // One request per path, all sent at once, answered in order.
                    let mut bytes = Vec::new();
                    for p in &paths {
                        ng::Request::QueryPathInfo(p.clone()).encode(NG, &mut bytes);
                    }
                    conn.send(&bytes).await?;
                    let mut infos = BTreeMap::new();
                    for p in paths {
                        match conn.ng_answer(ng::Opcode::QueryPathInfo).await? {
                            Some(ng::Response::PathInfo(None)) => {}
                            Some(ng::Response::PathInfo(Some(i))) => {
                                let info = ValidPathInfo {
                                    deriver: i.deriver,
                                    references: i.references,
                                    download_size: i.nar_size,
                                    nar_size: i.nar_size,
                                    nar_hash: Some(i.nar_hash),
                                    ca: i.ca,
                                    sigs: i.sigs,
                                };
                                infos.insert(p, info);
                            }
                            other => {
                                return Err(SoakError::Wrong(format!("{op} answered {other:?}")))
                            }
                        }
                    }
                    infos
                }
            };
            if infos == expected {
                account.used(&known);
                Ok(Outcome::Done)
            } else {
                Err(SoakError::Wrong(format!(
                    "{op} answered {infos:?}, expected {expected:?}"
                )))
            }
        }
        Op::AddToStoreNar | Op::ImportPaths | Op::AddMultipleToStore => {
            let closure = random_closure(rng, account);
            if op == Op::AddToStoreNar {
                upload_add(conn, &closure).await?;
            } else {
                upload_stream(conn, &closure).await?;
            }
            for k in closure {
                account.add(k, rng);
            }
            Ok(Outcome::Done)
        }
        Op::DumpStorePath | Op::NarFromPath => {
            let Some(k) = account.pick(rng, 1..2).pop() else {
                return Ok(Outcome::Done);
            };
            match conn.protocol {
                Protocol::Serve => {
                    let mut bytes = Vec::new();
                    Request::DumpStorePath {
                        path: k.path.clone(),
                    }
                    .encode(VERSION, &mut bytes);
                    conn.send(&bytes).await?;
                }
                Protocol::Daemon => {
                    let request = ng::Request::NarFromPath(k.path.clone());
                    if let Some(other) = conn.ng_call(&request, None).await? {
                        return Err(SoakError::Wrong(format!("{op} answered {other:?}")));
                    }
                }
            }
            let nar = conn.nar().await?;
            if nar != k.nar {
                return Err(SoakError::Wrong(format!(
                    "{op} {}: {} bytes differ from the {} uploaded",
                    k.path,
                    nar.len(),
                    k.nar.len()
                )));
            }
            account.used([&k]);
            Ok(Outcome::Done)
        }
        Op::ExportPaths => {
            let known = account.pick(rng, 1..5);
            let by_path: BTreeMap<&StorePath, &Known> =
                known.iter().map(|k| (&k.path, k.as_ref())).collect();
            let mut bytes = Vec::new();
            Request::ExportPaths {
                sign: 0,
                paths: by_path.keys().map(|p| (*p).clone()).collect(),
            }
            .encode(VERSION, &mut bytes);
            conn.send(&bytes).await?;
            let mut seen: BTreeSet<StorePath> = BTreeSet::new();
            loop {
                match conn.read_item(ExportMarker::read).await? {
                    ExportMarker::End => break,
                    ExportMarker::Entry => {}
                }
                let nar = conn.nar().await?;
                let limits = Limits::default().wire;
                let trailer = conn.read_item(|r| ExportTrailer::read(r, &limits)).await?;
                let Some(k) = by_path.get(&trailer.path) else {
                    return Err(SoakError::Wrong(format!(
                        "ExportPaths sent {}, not asked for",
                        trailer.path
                    )));
                };
                let wrong = nar != k.nar
                    || trailer.references != k.references
                    || trailer.deriver != k.deriver
                    || !seen.insert(trailer.path.clone())
                    || k.references
                        .iter()
                        .any(|r| by_path.contains_key(r) && !seen.contains(r));
                if wrong {
                    return Err(SoakError::Wrong(format!(
                        "ExportPaths entry {} (NAR of {} bytes, trailer {trailer:?}) is not \
                         what was uploaded, or comes before its references",
                        trailer.path,
                        nar.len()
                    )));
                }
            }
            if seen.len() != by_path.len() {
                return Err(SoakError::Wrong(format!(
                    "ExportPaths sent {} of {} paths",
                    seen.len(),
                    by_path.len()
                )));
            }
            account.used(&known);
            Ok(Outcome::Done)
        }
        Op::Build | Op::FailingBuild => build(op, conn, account, rng).await,
        Op::BadUpload => {
            let k = random_closure(rng, account).swap_remove(0);
            let wrong = sha256(b"not this NAR");
            conn.send(&add_bytes(conn.protocol, &k, wrong, k.nar.len()))
                .await?;
            // The worker protocol says why on the log channel before the session ends.
            let answer = match conn.protocol {
                Protocol::Serve => None,
                Protocol::Daemon => Some(conn.ng_answer(ng::Opcode::AddToStoreNar).await),
            };
            let on_log = match &answer {
                None => true,
                Some(Err(SoakError::Refused(msg))) => msg.contains("NAR hash mismatch"),
                Some(_) => false,
            };
            let status = conn.finish().await?;
            let stderr = conn.stderr_text();
            if on_log
                && status == Some(1)
                && stderr.contains("error: ")
                && stderr.contains("NAR hash mismatch")
            {
                Ok(Outcome::SessionOver)
            } else {
                Err(SoakError::Wrong(format!(
                    "a wrong NAR hash gave exit status {status:?}, stderr {stderr:?} and \
                     answer {answer:?}"
                )))
            }
        }
        Op::Abandon => {
            let k = random_closure(rng, account).swap_remove(0);
            conn.send(&add_bytes(conn.protocol, &k, k.hash, k.nar.len() / 2))
                .await?;
            Ok(Outcome::SessionOver)
        }
        Op::Connect | Op::Close => unreachable!("not in a protocol's mix"),
    }
}

/// QueryValidPaths of `paths`, in the connection's protocol: the valid ones.
async fn query_valid(
    conn: &mut Conn,
    paths: BTreeSet<StorePath>,
) -> Result<BTreeSet<StorePath>, SoakError> {
    let answer = match conn.protocol {
        Protocol::Serve => {
            let request = Request::QueryValidPaths {
                lock: false,
                substitute: false,
                paths,
            };
            match conn.call(&request, &[]).await? {
                Response::ValidPaths(valid) => return Ok(valid),
                other => format!("{other:?}"),
            }
        }
        Protocol::Daemon => {
            let request = ng::Request::QueryValidPaths {
                paths,
                substitute: false,
            };
            match conn.ng_call(&request, None).await? {
                Some(ng::Response::Paths(valid)) => return Ok(valid),
                other => format!("{other:?}"),
            }
        }
    };
    Err(SoakError::Wrong(format!(
        "QueryValidPaths answered {answer}"
    )))
}

/// With a collector, a build's input may have been collected: like Nix before a remote
/// build, ask whether busybox is valid (which holds it for this session) and upload it when
/// it is not. Without one, busybox stays from the start.
async fn ensure_busybox(conn: &mut Conn, account: &Account) -> Result<(), SoakError> {
    if account.clock.keep_ms.is_none() || account.clock.held(&account.busybox.used) {
        return Ok(());
    }
    let bb = account.busybox.path.clone();
    let valid = query_valid(conn, [bb.clone()].into()).await?;
    if !valid.contains(&bb) {
        upload_add(conn, std::slice::from_ref(&account.busybox)).await?;
    }
    account.used([&account.busybox]);
    Ok(())
}

/// A BuildDerivation with the account's busybox: `echo <salt> > $out`, or `exit 3`.
async fn build(
    op: Op,
    conn: &mut Conn,
    account: &Account,
    rng: &mut fastrand::Rng,
) -> Result<Outcome, SoakError> {
    ensure_busybox(conn, account).await?;
    let bb = &account.busybox.path;
    let salt = format!("{:016x}", rng.u64(..));
    let out = random_path(rng, "soak-build");
    let drv_path = random_path(rng, "soak-build.drv");
    let script = if op == Op::Build {
        format!("echo {salt} > $out")
    } else {
        "echo soak: failing on purpose; exit 3".to_owned()
    };
    let sh = format!("{bb}/bin/sh");
    let env: BTreeMap<Vec<u8>, Vec<u8>> = [
        ("builder", sh.as_str()),
        ("name", "soak-build"),
        ("out", &out.to_absolute()),
        ("system", "x86_64-linux"),
        ("PATH", &format!("{bb}/bin")),
    ]
    .into_iter()
    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect();
    let drv = BasicDerivation {
        outputs: [(
            "out".to_owned(),
            DerivationOutput::InputAddressed(out.clone()),
        )]
        .into(),
        input_srcs: [bb.clone()].into(),
        platform: b"x86_64-linux".to_vec(),
        builder: sh.into_bytes(),
        args: vec![b"-c".to_vec(), script.into_bytes()],
        env,
    };
    let answer = match conn.protocol {
        Protocol::Serve => {
            let request = Request::BuildDerivation {
                drv_path: drv_path.clone(),
                drv: Box::new(drv),
                options: BuildOptions::default(),
            };
            match conn.call(&request, &[]).await? {
                Response::Build(r) => Ok(r),
                other => Err(format!("{other:?}")),
            }
        }
        Protocol::Daemon => {
            let request = ng::Request::BuildDerivation {
                drv_path: drv_path.clone(),
                drv: Box::new(drv),
                mode: ng::BuildMode::Normal,
            };
            match conn.ng_call(&request, None).await? {
                Some(ng::Response::Build(r)) => Ok(r),
                other => Err(format!("{other:?}")),
            }
        }
    };
    let result =
        answer.map_err(|other| SoakError::Wrong(format!("BuildDerivation answered {other}")))?;
    let message = String::from_utf8_lossy(&result.error_msg).into_owned();
    match (op, result.status) {
        (Op::Build, BuildStatus::Built)
            if result.built_outputs.get("out").map(|o| &o.out_path) == Some(&out) =>
        {
            let tree = NarNode::File {
                executable: false,
                contents: format!("{salt}\n").into_bytes(),
            };
            let nar = tree.to_nar().expect("a file is a valid NAR");
            let k = Known {
                path: out,
                hash: sha256(&nar),
                nar: nar.into(),
                references: BTreeSet::new(),
                deriver: Some(drv_path),
                used: Arc::default(),
            };
            account.add(Arc::new(k), rng);
            account.used([&account.busybox]);
            Ok(Outcome::Done)
        }
        (Op::FailingBuild, BuildStatus::PermanentFailure)
            if message.contains("failed with exit code 3") =>
        {
            Ok(Outcome::Failed)
        }
        (_, status) => Err(SoakError::Wrong(format!(
            "{op} ended {status:?}: {message} (outputs {:?})",
            result.built_outputs
        ))),
    }
}

/// One reading of the server process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Resident memory, KiB (VmRSS).
    pub rss_kib: u64,
    /// Open file descriptors (entries of `/proc/<pid>/fd`).
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

impl Sample {
    /// Reads `/proc/<pid>`.
    pub fn read(pid: u32) -> Sample {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        Sample {
            rss_kib: field("VmRSS:"),
            fds,
            threads: field("Threads:"),
        }
    }

    fn max(self, other: Sample) -> Sample {
        Sample {
            rss_kib: self.rss_kib.max(other.rss_kib),
            fds: self.fds.max(other.fds),
            threads: self.threads.max(other.threads),
        }
    }
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; the
    // kernel counts in USER_HZ, 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Latency figures of one kind of operation.
#[derive(Debug, Clone)]
pub struct OpFigures {
    /// The kind, in its protocol.
    pub kind: Kind,
    /// Operations that ended as the server must behave.
    pub count: u64,
    /// Of which expected failures.
    pub expected_failures: u64,
    /// Unexpected errors.
    pub unexpected: u64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The options it ran with.
    pub options: Options,
    /// From the first session's start to the last one's end.
    pub elapsed: Duration,
    /// Per kind of operation.
    pub ops: Vec<OpFigures>,
    /// Distinct unexpected error messages with their counts.
    pub messages: BTreeMap<String, u64>,
    /// The server before the load (after the accounts' busybox uploads).
    pub baseline: Sample,
    /// The highest values sampled during the load (every 250 ms).
    pub peak: Sample,
    /// The server's VmHWM at the end, KiB.
    pub hwm_kib: u64,
    /// The server once the sessions had ended and its descriptors settled.
    pub after: Sample,
    /// How long the descriptors and threads took to come back to the baseline (None: they
    /// did not within a minute).
    pub settled_in: Option<Duration>,
    /// The server at ten points of the load (time since its start).
    pub timeline: Vec<(Duration, Sample)>,
    /// Server CPU seconds during the load.
    pub server_cpu: f64,
    /// The load generator's CPU seconds during the load.
    pub client_cpu: f64,
    /// `/proc/loadavg` before and after.
    pub loadavg: (String, String),
    /// Sessions (channels) the server accepted.
    pub sessions_opened: u64,
    /// Paths acknowledged to clients and still held, all found with their hash in the store
    /// afterwards.
    pub paths_acknowledged: u64,
    /// Paths acknowledged, then unused for longer than the retention and collected.
    pub paths_collected: u64,
    /// Collections the server logged, and the grants they removed.
    pub collections: (u64, u64),
    /// Server log lines at WARN and ERROR level.
    pub log_warnings: u64,
    /// ... at ERROR level.
    pub log_errors: u64,
    /// Sessions the server logged as ended with status 1.
    pub log_failed_sessions: u64,
}

impl Report {
    /// All unexpected errors.
    pub fn unexpected(&self) -> u64 {
        self.ops.iter().map(|o| o.unexpected).sum()
    }

    /// What makes the run a failure: unexpected errors, descriptors that did not come back,
    /// server errors in the log.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.unexpected() > 0 {
            p.push(format!("{} unexpected errors", self.unexpected()));
        }
        if self.settled_in.is_none() {
            p.push(format!(
                "the server's descriptors and threads did not come back to {} and {} (now {} \
                 and {})",
                self.baseline.fds, self.baseline.threads, self.after.fds, self.after.threads
            ));
        }
        if self.log_errors > 0 {
            p.push(format!(
                "{} ERROR lines in the server's log",
                self.log_errors
            ));
        }
        p
    }

    /// The figures of one kind in one protocol.
    #[allow(dead_code)] // tests/soak.rs uses it, the bench does not
    pub fn op(&self, protocol: Protocol, op: Op) -> &OpFigures {
        self.ops
            .iter()
            .find(|o| o.kind == Kind(protocol, op))
            .expect("every kind of the protocols run is reported")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "{} sessions, {} accounts x {} keys, {:.0} s of load (elapsed {secs:.1} s), think {} ms, \
             protocols {} (a session's connections take them in turn; ng: is the worker protocol)",
            o.sessions,
            o.accounts,
            o.keys_per_account,
            o.duration.as_secs_f64(),
            o.think.as_millis(),
            o.protocols
                .iter()
                .map(Protocol::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| operation | count | per s | expected failures | unexpected errors | p50 ms | p99 ms | max ms |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
        let mut total = 0;
        for op in &self.ops {
            total += op.count;
            writeln!(
                f,
                "| {} | {} | {:.1} | {} | {} | {} | {} | {} |",
                op.kind,
                op.count,
                op.count as f64 / secs,
                op.expected_failures,
                op.unexpected,
                ms(op.p50),
                ms(op.p99),
                ms(op.max)
            )?;
        }
        writeln!(
            f,
            "| all | {total} | {:.1} | | {} | | | |",
            total as f64 / secs,
            self.unexpected()
        )?;
        writeln!(f)?;
        writeln!(f, "| server | baseline | peak | after |")?;
        writeln!(f, "|---|---:|---:|---:|")?;
        writeln!(
            f,
            "| RSS (MiB) | {:.1} | {:.1} (VmHWM {:.1}) | {:.1} |",
            self.baseline.rss_kib as f64 / 1024.0,
            self.peak.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0,
            self.after.rss_kib as f64 / 1024.0
        )?;
        writeln!(
            f,
            "| open fds | {} | {} | {} |",
            self.baseline.fds, self.peak.fds, self.after.fds
        )?;
        writeln!(
            f,
            "| threads | {} | {} | {} |",
            self.baseline.threads, self.peak.threads, self.after.threads
        )?;
        writeln!(f)?;
        match self.settled_in {
            Some(d) => writeln!(
                f,
                "descriptors and threads back to the baseline {:.1} s after the load",
                d.as_secs_f64()
            )?,
            None => writeln!(
                f,
                "descriptors or threads NOT back to the baseline a minute after the load"
            )?,
        }
        let points: Vec<String> = self
            .timeline
            .iter()
            .map(|(t, s)| {
                format!(
                    "{:.0} s: {:.0} MiB, {} fds, {} threads",
                    t.as_secs_f64(),
                    s.rss_kib as f64 / 1024.0,
                    s.fds,
                    s.threads
                )
            })
            .collect();
        writeln!(f, "during the load: {}", points.join("; "))?;
        writeln!(
            f,
            "CPU seconds: server {:.1}, load generator {:.1}; load average before {}, after {}",
            self.server_cpu, self.client_cpu, self.loadavg.0, self.loadavg.1
        )?;
        writeln!(
            f,
            "sessions opened {}; paths acknowledged {} (all valid with their hash in the store \
             afterwards), {} more collected after their retention; {} collections removed {} \
             grants; server log: {} WARN/ERROR lines ({} ERROR), {} sessions ended with status 1",
            self.sessions_opened,
            self.paths_acknowledged,
            self.paths_collected,
            self.collections.0,
            self.collections.1,
            self.log_warnings,
            self.log_errors,
            self.log_failed_sessions
        )?;
        for (m, n) in &self.messages {
            writeln!(f, "unexpected ({n}x): {m}")?;
        }
        Ok(())
    }
}

fn figures(kind: Kind, stats: &mut Stats) -> OpFigures {
    let mut v = stats.latencies.remove(&kind).unwrap_or_default();
    v.sort_unstable();
    let at = |q: usize| -> Duration {
        if v.is_empty() {
            return Duration::ZERO;
        }
        // The smallest value with at least q % of the values at or below it.
        let i = (v.len() * q).div_ceil(100).max(1) - 1;
        Duration::from_micros(u64::from(v[i]))
    };
    OpFigures {
        kind,
        count: v.len() as u64,
        expected_failures: stats.expected.get(&kind).copied().unwrap_or(0),
        unexpected: stats.unexpected.get(&kind).copied().unwrap_or(0),
        p50: at(50),
        p99: at(99),
        max: v
            .last()
            .map_or(Duration::ZERO, |&us| Duration::from_micros(u64::from(us))),
    }
}

/// The server configuration: room for every session, with per-account connection limits
/// tight enough that a leaked count would show up as refusals. Every session connects from
/// 127.0.0.1, all at once at the start: the unauthenticated budget has room for them all.
fn server_config(o: &Options) -> String {
    let per_account = o.sessions.div_ceil(o.accounts);
    format!(
        "[ssh]\nmax_connections = {}\nmax_connections_per_account = {}\n\
         max_unauthenticated = {}\nmax_unauthenticated_per_source = {}\n\
         [limits]\nmax_sessions = {}\nmax_sessions_per_account = {}\n",
        2 * o.sessions + 16,
        2 * per_account + 4,
        2 * o.sessions + 16,
        2 * o.sessions + 16,
        2 * o.sessions + 16,
        2 * per_account + 4,
    ) + &o.gc.map_or(String::new(), |(retention, interval)| {
        format!("[store]\nretention = {retention}\ngc_interval = {interval}\n")
    })
}

/// Checks every path acknowledged to the accounts in the running server's database (read
/// only: nothing marked used): each path still held (see [`Clock`]) must be there with its
/// hash; one no longer held may be gone, or else has its hash. Returns how many were found,
/// and how many were gone.
fn check_acknowledged(
    accounts: &[Arc<Account>],
    clock: &Clock,
    state: &std::path::Path,
) -> (u64, u64) {
    let db = rusqlite::Connection::open_with_flags(
        state.join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the server's database read-only");
    let mut lookup = db
        .prepare(
            "SELECT o.nar_hash FROM paths p JOIN objects o ON o.key = p.object
             WHERE p.account = ?1 AND p.path = ?2",
        )
        .expect("prepare a lookup");
    let (mut found, mut gone) = (0, 0);
    for a in accounts {
        for (path, hash, used) in lock(&a.all).iter() {
            let held = clock.held(used);
            let stored: Option<String> = lookup
                .query_row([a.name.as_str(), &path.base_name()], |r| r.get(0))
                .ok();
            let Some(stored) = stored else {
                assert!(
                    !held,
                    "{path}, acknowledged to {} and used within the retention, is gone",
                    a.name
                );
                gone += 1;
                continue;
            };
            assert_eq!(
                Hash::parse_any(&stored, None).ok(),
                Some(*hash),
                "{path}, acknowledged to {}, is in the store with another hash",
                a.name
            );
            found += 1;
        }
    }
    (found, gone)
}

/// The stopped server's state directory, removed when dropped: that takes a while after a
/// long run (every object is a file), so drop it after printing the report.
pub struct StateDir(#[allow(dead_code)] crate::harness::Stopped);

/// Runs the soak: starts the server, uploads each account's busybox, runs the sessions,
/// samples the server, waits for it to settle, stops it (the harness verifies the store) and
/// checks that every acknowledged path is there with its hash.
pub fn run(o: &Options) -> (Report, StateDir) {
    let accounts_n = o.accounts.clamp(1, o.sessions.max(1));
    let mut protocols = o.protocols.clone();
    protocols.sort_unstable();
    protocols.dedup();
    if protocols.is_empty() {
        protocols = Protocol::ALL.to_vec();
    }
    let o = Options {
        accounts: accounts_n,
        protocols,
        ..o.clone()
    };
    let client_dir = tempfile::tempdir().expect("temp dir");
    let mut key_files = Vec::new();
    for a in 0..accounts_n {
        let keys: Vec<_> = (0..o.keys_per_account.max(1))
            .map(|k| {
                keygen(
                    client_dir.path(),
                    &format!("soak{a}-{k}"),
                    "ed25519",
                    &format!("soak{a} key {k}"),
                )
            })
            .collect();
        key_files.push(keys);
    }
    let all_keys: Vec<&crate::harness::ssh::Key> = key_files.iter().flatten().collect();
    let server = SshServer::start(&server_config(&o), client_dir, &all_keys);
    let pid = server.daemon.pid();
    let host_key = server
        .pins
        .known_hosts_line
        .split_once(' ')
        .and_then(|(_, k)| PublicKey::from_openssh(k).ok())
        .expect("the printed known_hosts line holds a public key");
    let keys: Vec<Vec<Arc<PrivateKey>>> = key_files
        .iter()
        .map(|ks| {
            ks.iter()
                .map(|k| {
                    Arc::new(russh::keys::load_secret_key(&k.private, None).expect("load key"))
                })
                .collect()
        })
        .collect();
    let clock = Arc::new(Clock {
        start: Instant::now(),
        keep_ms: o
            .gc
            .map(|(retention, _)| (retention * 1000).saturating_sub(GC_SLACK_MS)),
    });
    let accounts: Vec<Arc<Account>> = (0..accounts_n)
        .map(|a| {
            // Each account's own: its last use is its own.
            let busybox = busybox();
            Arc::new(Account {
                name: format!("soak{a}"),
                busybox: busybox.clone(),
                sample: Mutex::new(vec![busybox.clone()]),
                all: Mutex::new(vec![(
                    busybox.path.clone(),
                    busybox.hash,
                    busybox.used.clone(),
                )]),
                clock: clock.clone(),
            })
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let target = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], server.pins.port)),
        host_key,
        config: Arc::new(client::Config {
            nodelay: true,
            ..Default::default()
        }),
    };
    let target = Arc::new(target);
    // Each account uploads its busybox first: accounts see only their own uploads.
    runtime.block_on(async {
        let uploads: Vec<_> = accounts
            .iter()
            .zip(&keys)
            .map(|(a, ks)| {
                let (target, key, bb) = (target.clone(), ks[0].clone(), a.busybox.clone());
                tokio::spawn(async move {
                    let upload = async {
                        let mut conn = Conn::open(&target, &key, Protocol::Serve).await?;
                        upload_stream(&mut conn, &[bb]).await?;
                        conn.close().await
                    };
                    let limit = Op::ImportPaths.timeout();
                    tokio::time::timeout(limit, upload)
                        .await
                        .unwrap_or(Err(SoakError::Timeout(limit)))
                })
            })
            .collect();
        for u in uploads {
            let r = u.await.expect("a busybox upload task panicked");
            r.unwrap_or_else(|e| panic!("uploading busybox: {e}"));
        }
    });
    let baseline = settle(pid, None, Duration::from_secs(10)).1;
    let load_before = loadavg();
    let cpu_before = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    let started = Instant::now();
    let shared = Arc::new(Shared {
        target,
        accounts,
        keys,
        deadline: started + o.duration,
        think: o.think,
        protocols: o.protocols.clone(),
    });
    let (mut stats, peak, timeline) = runtime.block_on(async {
        let tasks: Vec<_> = (0..o.sessions)
            .map(|i| {
                let seed = o
                    .seed
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .wrapping_add(i as u64);
                tokio::spawn(session(shared.clone(), i, seed))
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = std::thread::spawn({
            let stop = stop.clone();
            // Ten points of the run, to show whether memory grows or levels off.
            let every = (o.duration / 10).max(Duration::from_secs(1));
            move || {
                let mut peak = Sample::read(pid);
                let mut timeline = Vec::new();
                let mut next = started + every;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let now = Sample::read(pid);
                    peak = peak.max(now);
                    if Instant::now() >= next {
                        timeline.push((started.elapsed(), now));
                        next += every;
                    }
                }
                (peak, timeline)
            }
        });
        let mut stats = Stats::default();
        for t in tasks {
            stats.merge(t.await.expect("a session task panicked"));
        }
        stop.store(true, Ordering::Relaxed);
        let (peak, timeline) = sampler.join().expect("the sampler panicked");
        (stats, peak, timeline)
    });
    let elapsed = started.elapsed();
    // At once, before a collector running on while the server settles takes what the
    // sessions stopped using.
    let (paths_acknowledged, paths_collected) =
        check_acknowledged(&shared.accounts, &clock, &server.daemon.state_dir());
    let cpu = (
        cpu_seconds(&pid.to_string()) - cpu_before.0,
        cpu_seconds("self") - cpu_before.1,
    );
    let load_after = loadavg();
    let hwm_kib = server.daemon.peak_rss_kib();
    let (settled_in, after) = settle(pid, Some(baseline), Duration::from_secs(60));
    let builds_left: Vec<_> = std::fs::read_dir(server.daemon.state_dir().join("builds"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        builds_left.is_empty(),
        "build directories left: {builds_left:?}"
    );
    // Stopping checks the store: no import left in tmp/, no object without a row, every
    // object re-hashed to its recorded hash.
    let stopped = server.daemon.stop();
    let log = &stopped.log;
    let ops = o
        .protocols
        .iter()
        .flat_map(|&p| p.ops().iter().map(move |&op| Kind(p, op)))
        .map(|kind| figures(kind, &mut stats))
        .collect();
    let report = Report {
        options: o,
        elapsed,
        ops,
        messages: std::mem::take(&mut stats.messages),
        baseline,
        peak: peak.max(baseline),
        hwm_kib,
        after,
        settled_in,
        timeline,
        server_cpu: cpu.0,
        client_cpu: cpu.1,
        loadavg: (load_before, load_after),
        sessions_opened: stats.sessions_opened,
        paths_acknowledged,
        paths_collected,
        collections: log
            .lines()
            .filter(|l| l.contains("collection done"))
            .fold((0, 0), |(n, grants), l| {
                (n + 1, grants + crate::harness::log_number(l, "grants"))
            }),
        log_warnings: log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count() as u64,
        log_errors: log.lines().filter(|l| l.contains(" ERROR ")).count() as u64,
        log_failed_sessions: log
            .lines()
            .filter(|l| l.contains("session end") && l.contains("status=1"))
            .count() as u64,
    };
    (report, StateDir(stopped))
}

/// Waits until the server's descriptors and threads are at most those of `baseline` (or,
/// with `None`, for a quiet second), at most `limit`; returns how long that took and the last
/// sample.
fn settle(pid: u32, baseline: Option<Sample>, limit: Duration) -> (Option<Duration>, Sample) {
    let start = Instant::now();
    let mut last = Sample::read(pid);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = Sample::read(pid);
        let settled = match baseline {
            // Idle blocking threads of the runtime exit after 10 s.
            Some(b) => now.fds <= b.fds && now.threads <= b.threads,
            None => {
                (now.fds, now.threads) == (last.fds, last.threads)
                    && start.elapsed() >= Duration::from_secs(1)
            }
        };
        if settled {
            return (Some(start.elapsed()), now);
        }
        if start.elapsed() >= limit {
            return (None, now);
        }
        last = now;
    }
}
