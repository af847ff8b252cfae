//! Sessions with a machine over SSH, the client side of both of Nix's remote protocols:
//! `nix-store --serve --write` for `ssh://` machines ([`ServeConn`]) and `nix-daemon --stdio`
//! for `ssh-ng://` machines ([`super::daemon_conn::DaemonConn`]), behind one [`Session`].
//! Requests are encoded and answers decoded by `nixbuild_core`; NARs stream up
//! (AddToStoreNar) and down (DumpStorePath, NarFromPath); BuildDerivation passes the
//! machine's log on as it comes.
//!
//! Every failure here is the machine's or the network's: the caller treats it as a fault of
//! the machine (the build may go to another), never as the build's own failure. After any
//! error the session is dropped.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nixbuild_core::derivation::BasicDerivation;
use nixbuild_core::serve::handshake::{ClientHello, ServerHello};
use nixbuild_core::serve::{
    AddToStoreNar, BuildOptions, BuildResult, Limits, Opcode, ProtocolVersion, Request, Response,
};
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire::{self, ReadResult, Reader};
use nixbuild_ssh::client::{Connection, RemoteCommand, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::daemon_conn::DaemonConn;
use crate::store::{StoreError, Unpack};

/// The oldest serve protocol a machine may speak: 2.5 (Nix 2.3), the first with
/// AddToStoreNar, as current Nix clients require too.
const OLDEST: ProtocolVersion = ProtocolVersion::V2_5;

/// Bytes read from the machine at a time.
const READ_CHUNK: usize = 256 << 10;

/// What went wrong with a machine: it is unreachable, refused, answered wrongly or went
/// away. The message names the machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Fault(pub String);

/// A session with a machine, of either protocol, ready for the next request.
#[derive(Debug)]
pub enum Session {
    /// `nix-store --serve --write`.
    Serve(ServeConn),
    /// `nix-daemon --stdio`.
    Daemon(DaemonConn),
}

impl Session {
    /// Whether the session can take another request (its SSH connection is open).
    pub fn is_open(&self) -> bool {
        match self {
            Session::Serve(c) => c.link.is_open(),
            Session::Daemon(c) => c.link.is_open(),
        }
    }

    /// The negotiated protocol version, as `2.7` or `1.38`.
    pub fn version(&self) -> String {
        match self {
            Session::Serve(c) => format!("2.{}", c.version.minor()),
            Session::Daemon(c) => c.version().to_string(),
        }
    }

    /// Which of `paths` the machine has; they are held against its collector for the
    /// session.
    pub async fn query_valid(
        &mut self,
        paths: BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, Fault> {
        match self {
            Session::Serve(c) => c.query_valid(paths).await,
            Session::Daemon(c) => c.query_valid(paths).await,
        }
    }

    /// Adds a path: the header, then exactly `header.nar_size` bytes from `nar`.
    pub async fn add(
        &mut self,
        header: AddToStoreNar,
        nar: mpsc::Receiver<Bytes>,
    ) -> Result<(), Fault> {
        match self {
            Session::Serve(c) => c.add(header, nar).await,
            Session::Daemon(c) => c.add(header, nar).await,
        }
    }

    /// Sends BuildDerivation and waits for the machine's result, passing each piece of its
    /// log to `log`. Dropped before it returns, it leaves the session unusable (drop that
    /// too: the machine's side then ends).
    pub async fn build(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: BuildOptions,
        log: impl FnMut(Bytes),
    ) -> Result<Box<BuildResult>, Fault> {
        match self {
            Session::Serve(c) => c.build(drv_path, drv, options, log).await,
            Session::Daemon(c) => c.build(drv_path, drv, options, log).await,
        }
    }

    /// Fetches the NAR of `path` into `unpack` (in a blocking task): its size, or (`Ok(Err)`)
    /// the unpacking's own refusal (the NAR is too large, or a file could not be written).
    pub async fn dump(
        &mut self,
        path: &StorePath,
        unpack: Unpack,
    ) -> Result<Result<u64, StoreError>, Fault> {
        match self {
            Session::Serve(c) => c.dump(path, unpack).await,
            Session::Daemon(c) => c.dump(path, unpack).await,
        }
    }
}

/// What both protocols share: the SSH connection and the remote command's pipes, the bytes
/// read and not used yet, and the bound on every wait outside a build's run.
#[derive(Debug)]
pub(super) struct Link {
    /// Holds the SSH connection open.
    ssh: Connection,
    pub(super) command: RemoteCommand,
    /// Bytes from the machine not used yet.
    pub(super) input: BytesMut,
    /// The machine, for messages.
    name: String,
    /// Longest wait for the machine to take or give bytes outside a build's run.
    io_timeout: Duration,
}

impl Link {
    /// Connects, logs in and starts `command`.
    pub(super) async fn open(
        name: &str,
        target: &Target,
        command: &str,
        io_timeout: Duration,
    ) -> Result<Link, Fault> {
        let fault = |what: String| Fault(format!("{name}: {what}"));
        let ssh = Connection::open(target)
            .await
            .map_err(|e| fault(e.to_string()))?;
        let command = ssh.exec(command).await.map_err(|e| fault(e.to_string()))?;
        Ok(Link {
            ssh,
            command,
            input: BytesMut::new(),
            name: name.to_owned(),
            io_timeout,
        })
    }

    fn is_open(&self) -> bool {
        !self.ssh.is_closed()
    }

    pub(super) fn fault(&self, what: impl Display) -> Fault {
        Fault(format!("{}: {what}", self.name))
    }

    /// Drops what the machine said on stderr between requests.
    pub(super) fn discard_stderr(&mut self) {
        while self.command.stderr.try_recv().is_ok() {}
    }

    /// What the machine said on stderr so far, for the message of a fault.
    fn said(&mut self) -> String {
        let mut said = Vec::new();
        while let Ok(chunk) = self.command.stderr.try_recv() {
            said.extend_from_slice(&chunk);
        }
        let said = String::from_utf8_lossy(&said);
        said.trim().chars().take(300).collect()
    }

    pub(super) async fn send(&mut self, bytes: &[u8]) -> Result<(), Fault> {
        let timeout = self.io_timeout;
        match tokio::time::timeout(timeout, self.command.stdin.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.fault(format!("connection lost while sending: {e}"))),
            Err(_) => Err(self.fault(format!("took nothing for {timeout:?}"))),
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), Fault> {
        let timeout = self.io_timeout;
        match tokio::time::timeout(timeout, self.command.stdin.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.fault(format!("connection lost while sending: {e}"))),
            Err(_) => Err(self.fault(format!("took nothing for {timeout:?}"))),
        }
    }

    /// Sends `bytes` and flushes.
    pub(super) async fn send_all(&mut self, bytes: &[u8]) -> Result<(), Fault> {
        self.send(bytes).await?;
        self.flush().await
    }

    /// Sends the NAR bytes of `nar`, which must be exactly `size`; `frame` writes the
    /// header of each chunk (the daemon protocol frames them), and `end` ends them.
    pub(super) async fn send_nar(
        &mut self,
        size: u64,
        mut nar: mpsc::Receiver<Bytes>,
        frame: Option<fn(usize, &mut Vec<u8>)>,
    ) -> Result<(), Fault> {
        let mut sent = 0u64;
        let mut head = Vec::new();
        while let Some(chunk) = nar.recv().await {
            sent += chunk.len() as u64;
            if sent > size {
                break;
            }
            if let Some(frame) = frame {
                head.clear();
                frame(chunk.len(), &mut head);
                self.send(&head).await?;
            }
            self.send(&chunk).await?;
        }
        if sent != size {
            return Err(self.fault(format!(
                "the upload stopped after {sent} of {size} NAR bytes"
            )));
        }
        Ok(())
    }

    /// Reads more of the machine's stdout into `input`; an end, or nothing for
    /// `io_timeout` when `bounded`, is a fault.
    pub(super) async fn read_more(&mut self, bounded: bool) -> Result<(), Fault> {
        self.input.reserve(READ_CHUNK);
        let read = self.command.stdout.read_buf(&mut self.input);
        let read = if bounded {
            let timeout = self.io_timeout;
            match tokio::time::timeout(timeout, read).await {
                Ok(read) => read,
                Err(_) => return Err(self.fault(format!("answered nothing for {timeout:?}"))),
            }
        } else {
            read.await
        };
        match read {
            Ok(0) => {
                let said = self.said();
                Err(self.fault(if said.is_empty() {
                    "the connection ended".to_owned()
                } else {
                    format!("the connection ended: {said}")
                }))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(self.fault(format!("connection lost: {e}"))),
        }
    }

    /// Waits, for as long as it takes (a build runs), for the machine's next bytes: a piece
    /// of stderr goes to `log` (until stderr ends: `stderr_open` false), stdout's go to
    /// `input`; an end of stdout is a fault.
    pub(super) async fn pump(
        &mut self,
        stderr_open: &mut bool,
        log: &mut impl FnMut(Bytes),
    ) -> Result<(), Fault> {
        self.input.reserve(READ_CHUNK);
        let RemoteCommand { stdout, stderr, .. } = &mut self.command;
        tokio::select! {
            chunk = stderr.recv(), if *stderr_open => {
                match chunk {
                    Some(chunk) => log(Bytes::from(chunk)),
                    None => *stderr_open = false,
                }
                Ok(())
            }
            read = stdout.read_buf(&mut self.input) => match read {
                Ok(0) => {
                    // What it said last may tell why.
                    let said = self.said();
                    if !said.is_empty() {
                        log(Bytes::from(said));
                    }
                    Err(self.fault("the connection ended during the build"))
                }
                Ok(_) => Ok(()),
                Err(e) => Err(self.fault(format!("connection lost during the build: {e}"))),
            },
        }
    }

    /// Decodes the next item with `read`, reading more (within `io_timeout`) until it is
    /// complete.
    pub(super) async fn item<T, E: Display>(
        &mut self,
        read: impl Fn(&mut Reader<'_>) -> ReadResult<T, E>,
    ) -> Result<T, Fault> {
        loop {
            match wire::decode_buf(&mut self.input, &read) {
                Ok(Some(item)) => return Ok(item),
                Ok(None) => self.read_more(true).await?,
                Err(e) => return Err(self.fault(format!("a wrong answer: {e}"))),
            }
        }
    }

    /// Reads a raw NAR from the stream into `unpack` (in a blocking task), leaving what
    /// follows it in `input`.
    pub(super) async fn nar(
        &mut self,
        path: &StorePath,
        mut unpack: Unpack,
    ) -> Result<Result<u64, StoreError>, Fault> {
        let (to_task, mut chunks) = mpsc::channel::<Bytes>(1);
        let (acks, mut ack) = mpsc::channel::<Result<(usize, bool), StoreError>>(1);
        let task = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = chunks.blocking_recv() {
                let done = unpack.write(&chunk).map(|n| (n, unpack.is_complete()));
                let more = matches!(done, Ok((_, false)));
                if acks.blocking_send(done).is_err() || !more {
                    break;
                }
            }
            unpack.received()
        });
        let result = loop {
            if self.input.is_empty() {
                if let Err(e) = self.read_more(true).await {
                    break Err(e);
                }
            }
            let chunk = self.input.split().freeze();
            if to_task.send(chunk.clone()).await.is_err() {
                break Err(self.fault("the unpacking stopped"));
            }
            match ack.recv().await {
                Some(Ok((used, true))) => {
                    // What follows the NAR is the next answer's.
                    let mut rest = BytesMut::from(&chunk[used..]);
                    rest.extend_from_slice(&self.input);
                    self.input = rest;
                    break Ok(Ok(()));
                }
                Some(Ok((_, false))) => {}
                Some(Err(StoreError::NarTooLarge { limit, received })) => {
                    break Ok(Err(StoreError::NarTooLarge { limit, received }))
                }
                Some(Err(e)) => break Err(self.fault(format!("the NAR of {path}: {e}"))),
                None => break Err(self.fault("the unpacking stopped")),
            }
        };
        drop(to_task);
        let received = task
            .await
            .map_err(|e| self.fault(format!("the unpacking failed: {e}")))?;
        Ok(result?.map(|()| received))
    }
}

/// Opens a session of `protocol` within the target's timeout: SSH, login, the command and
/// the protocol's handshake. Afterwards every wait for the machine outside a build's run is
/// bounded by `io_timeout`.
pub async fn open(
    protocol: nixbuild_core::machines::Protocol,
    name: &str,
    target: &Target,
    command: &str,
    io_timeout: Duration,
) -> Result<Session, Fault> {
    use nixbuild_core::machines::Protocol;
    let attempt = async {
        let link = Link::open(name, target, command, io_timeout).await?;
        Ok(match protocol {
            Protocol::Serve => Session::Serve(ServeConn::handshake(link, command).await?),
            Protocol::Daemon => Session::Daemon(DaemonConn::handshake(link, command).await?),
        })
    };
    tokio::time::timeout(target.timeout, attempt)
        .await
        .map_err(|_| Fault(format!("{name}: no handshake within {:?}", target.timeout)))?
}

/// A session with `nix-store --serve --write`.
#[derive(Debug)]
pub struct ServeConn {
    link: Link,
    version: ProtocolVersion,
    limits: Limits,
}

impl ServeConn {
    async fn handshake(mut link: Link, command: &str) -> Result<ServeConn, Fault> {
        let mut hello = Vec::new();
        ClientHello {
            version: ProtocolVersion::SERVER,
        }
        .encode(&mut hello);
        link.send_all(&hello).await?;
        let server = link
            .item(ServerHello::read)
            .await
            .map_err(|e| Fault(format!("{e} (from `{command}`)")))?
            .version;
        if server < OLDEST {
            return Err(link.fault(format!(
                "speaks serve protocol 2.{}; 2.5 (Nix 2.3) or newer is needed",
                server.minor()
            )));
        }
        Ok(ServeConn {
            link,
            version: server.min(ProtocolVersion::SERVER),
            limits: Limits::default(),
        })
    }

    async fn request(&mut self, request: &Request) -> Result<(), Fault> {
        self.link.discard_stderr();
        let mut buf = Vec::new();
        request.encode(self.version, &mut buf);
        self.link.send_all(&buf).await
    }

    /// Reads the response to a request with opcode `op`.
    async fn response(&mut self, op: Opcode) -> Result<Response, Fault> {
        let (v, limits) = (self.version, self.limits);
        self.link.item(|r| Response::read(op, r, v, &limits)).await
    }

    async fn query_valid(
        &mut self,
        paths: BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, Fault> {
        self.request(&Request::QueryValidPaths {
            lock: true,
            substitute: false,
            paths,
        })
        .await?;
        match self.response(Opcode::QueryValidPaths).await? {
            Response::ValidPaths(valid) => Ok(valid),
            other => Err(self.link.fault(format!("answered {:?}", other.opcode()))),
        }
    }

    async fn add(
        &mut self,
        header: AddToStoreNar,
        nar: mpsc::Receiver<Bytes>,
    ) -> Result<(), Fault> {
        let size = header.nar_size;
        self.request(&Request::AddToStoreNar(Box::new(header)))
            .await?;
        self.link.send_nar(size, nar, None).await?;
        self.link.flush().await?;
        match self.response(Opcode::AddToStoreNar).await? {
            Response::Added => Ok(()),
            other => Err(self.link.fault(format!("answered {:?}", other.opcode()))),
        }
    }

    async fn build(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: BuildOptions,
        mut log: impl FnMut(Bytes),
    ) -> Result<Box<BuildResult>, Fault> {
        self.request(&Request::BuildDerivation {
            drv_path: drv_path.clone(),
            drv: Box::new(drv.clone()),
            options,
        })
        .await?;
        let mut stderr_open = true;
        loop {
            let (v, limits) = (self.version, self.limits);
            match wire::decode_buf(&mut self.link.input, |r| {
                Response::read(Opcode::BuildDerivation, r, v, &limits)
            }) {
                Ok(Some(Response::Build(result))) => {
                    // The log's last words may come after the result.
                    while let Ok(Some(chunk)) = tokio::time::timeout(
                        Duration::from_millis(50),
                        self.link.command.stderr.recv(),
                    )
                    .await
                    {
                        log(Bytes::from(chunk));
                    }
                    return Ok(result);
                }
                Ok(Some(other)) => {
                    return Err(self.link.fault(format!("answered {:?}", other.opcode())))
                }
                Ok(None) => {}
                Err(e) => return Err(self.link.fault(format!("a wrong answer: {e}"))),
            }
            // The build's log comes on stderr while stdout waits for the result, which may
            // take as long as the build: no io_timeout here.
            self.link.pump(&mut stderr_open, &mut log).await?;
        }
    }

    async fn dump(
        &mut self,
        path: &StorePath,
        unpack: Unpack,
    ) -> Result<Result<u64, StoreError>, Fault> {
        self.request(&Request::DumpStorePath { path: path.clone() })
            .await?;
        self.link.nar(path, unpack).await
    }
}
