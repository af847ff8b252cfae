//! A session with a machine's `nix-store --serve --write` over SSH, the client side of the
//! serve protocol: the handshake, requests encoded and responses decoded by
//! `nixbuild_core::serve`, NARs streamed up (AddToStoreNar) and down (DumpStorePath), and
//! BuildDerivation with the machine's stderr (the build's log) passed on as it comes.
//!
//! Every failure here is the machine's or the network's: the caller treats it as a fault of
//! the machine (the build may go to another), never as the build's own failure.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nixbuild_core::derivation::BasicDerivation;
use nixbuild_core::serve::handshake::{ClientHello, ServerHello};
use nixbuild_core::serve::{
    AddToStoreNar, BuildOptions, BuildResult, Limits, Opcode, ProtocolVersion, Request, Response,
};
use nixbuild_core::store_path::StorePath;
use nixbuild_ssh::client::{Connection, RemoteCommand, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

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

/// One session with a machine, ready for the next request.
#[derive(Debug)]
pub struct ServeConn {
    /// Holds the SSH connection open.
    _ssh: Connection,
    command: RemoteCommand,
    version: ProtocolVersion,
    /// Bytes from the machine not used yet.
    input: BytesMut,
    limits: Limits,
    /// The machine, for messages.
    name: String,
    /// Longest wait for the machine to take or give bytes outside a build's run.
    io_timeout: Duration,
}

impl ServeConn {
    /// Connects, logs in, starts `command` and runs the handshake, all within the target's
    /// timeout; afterwards every wait for the machine outside a build's run is bounded by
    /// `io_timeout`.
    pub async fn open(
        name: &str,
        target: &Target,
        command: &str,
        io_timeout: Duration,
    ) -> Result<ServeConn, Fault> {
        let fault = |what: String| Fault(format!("{name}: {what}"));
        let attempt = async {
            let ssh = Connection::open(target)
                .await
                .map_err(|e| fault(e.to_string()))?;
            let mut command_io = ssh.exec(command).await.map_err(|e| fault(e.to_string()))?;
            let mut hello = Vec::new();
            ClientHello {
                version: ProtocolVersion::SERVER,
            }
            .encode(&mut hello);
            command_io
                .stdin
                .write_all(&hello)
                .await
                .map_err(|e| fault(format!("cannot send the handshake: {e}")))?;
            command_io
                .stdin
                .flush()
                .await
                .map_err(|e| fault(format!("cannot send the handshake: {e}")))?;
            let mut answer = [0u8; 16];
            command_io
                .stdout
                .read_exact(&mut answer)
                .await
                .map_err(|e| fault(format!("`{command}` gave no handshake ({e})")))?;
            let server = match ServerHello::decode(&answer) {
                Ok(Some((hello, _))) => hello.version,
                Ok(None) => return Err(fault("a short hello".into())),
                Err(e) => return Err(fault(format!("`{command}` answered: {e}"))),
            };
            if server < OLDEST {
                return Err(fault(format!(
                    "speaks serve protocol 2.{}; 2.5 (Nix 2.3) or newer is needed",
                    server.minor()
                )));
            }
            Ok(ServeConn {
                _ssh: ssh,
                command: command_io,
                version: server.min(ProtocolVersion::SERVER),
                input: BytesMut::new(),
                limits: Limits::default(),
                name: name.to_owned(),
                io_timeout,
            })
        };
        tokio::time::timeout(target.timeout, attempt)
            .await
            .map_err(|_| fault(format!("no handshake within {:?}", target.timeout)))?
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Whether the session can take another request (its SSH connection is open).
    pub fn is_open(&self) -> bool {
        !self._ssh.is_closed()
    }

    fn fault(&self, what: impl std::fmt::Display) -> Fault {
        Fault(format!("{}: {what}", self.name))
    }

    /// Drops what the machine said on stderr between requests.
    fn discard_stderr(&mut self) {
        while self.command.stderr.try_recv().is_ok() {}
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Fault> {
        let timeout = self.io_timeout;
        match tokio::time::timeout(timeout, self.command.stdin.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.fault(format!("connection lost while sending: {e}"))),
            Err(_) => Err(self.fault(format!("took nothing for {timeout:?}"))),
        }
    }

    async fn flush(&mut self) -> Result<(), Fault> {
        let timeout = self.io_timeout;
        match tokio::time::timeout(timeout, self.command.stdin.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.fault(format!("connection lost while sending: {e}"))),
            Err(_) => Err(self.fault(format!("took nothing for {timeout:?}"))),
        }
    }

    async fn request(&mut self, request: &Request) -> Result<(), Fault> {
        self.discard_stderr();
        let mut buf = Vec::new();
        request.encode(self.version, &mut buf);
        self.send(&buf).await?;
        self.flush().await
    }

    /// Reads more of the machine's stdout into `input`; an end, or nothing for
    /// `io_timeout`, is a fault.
    async fn read_more(&mut self) -> Result<(), Fault> {
        self.input.reserve(READ_CHUNK);
        let timeout = self.io_timeout;
        let read = tokio::time::timeout(timeout, self.command.stdout.read_buf(&mut self.input));
        let Ok(read) = read.await else {
            return Err(self.fault(format!("answered nothing for {timeout:?}")));
        };
        match read {
            Ok(0) => {
                let mut said = Vec::new();
                while let Ok(chunk) = self.command.stderr.try_recv() {
                    said.extend_from_slice(&chunk);
                }
                let said = String::from_utf8_lossy(&said);
                let said = said.trim();
                Err(self.fault(if said.is_empty() {
                    "the connection ended".to_owned()
                } else {
                    format!(
                        "the connection ended: {}",
                        said.chars().take(300).collect::<String>()
                    )
                }))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(self.fault(format!("connection lost: {e}"))),
        }
    }

    /// Reads the response to a request with opcode `op`.
    async fn response(&mut self, op: Opcode) -> Result<Response, Fault> {
        loop {
            match Response::decode(op, &self.input, self.version, &self.limits) {
                Ok(Some((response, used))) => {
                    let _ = self.input.split_to(used);
                    return Ok(response);
                }
                Ok(None) => self.read_more().await?,
                Err(e) => return Err(self.fault(format!("a wrong answer: {e}"))),
            }
        }
    }

    /// Which of `paths` the machine has; they are held against its collector for the
    /// session (`lock`, as Hydra asks).
    pub async fn query_valid(
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
            other => Err(self.fault(format!("answered {:?}", other.opcode()))),
        }
    }

    /// Adds a path: the header, then exactly `header.nar_size` bytes from `nar`. `Ok(Err)`
    /// when the front could not read its own NAR (the session is then unusable).
    pub async fn add(
        &mut self,
        header: AddToStoreNar,
        mut nar: mpsc::Receiver<Bytes>,
    ) -> Result<(), Fault> {
        let size = header.nar_size;
        self.request(&Request::AddToStoreNar(Box::new(header)))
            .await?;
        let mut sent = 0u64;
        while let Some(chunk) = nar.recv().await {
            sent += chunk.len() as u64;
            if sent > size {
                break;
            }
            self.send(&chunk).await?;
        }
        if sent != size {
            return Err(self.fault(format!(
                "the upload stopped after {sent} of {size} NAR bytes"
            )));
        }
        self.flush().await?;
        match self.response(Opcode::AddToStoreNar).await? {
            Response::Added => Ok(()),
            other => Err(self.fault(format!("answered {:?}", other.opcode()))),
        }
    }

    /// Sends BuildDerivation and waits for the machine's result, passing each piece of its
    /// stderr (the build's log) to `log`. Dropped before it returns, it leaves the session
    /// unusable (drop that too: the machine's side then ends).
    pub async fn build(
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
            match Response::decode(
                Opcode::BuildDerivation,
                &self.input,
                self.version,
                &self.limits,
            ) {
                Ok(Some((Response::Build(result), used))) => {
                    let _ = self.input.split_to(used);
                    // The log's last words may come after the result.
                    while let Ok(Some(chunk)) =
                        tokio::time::timeout(Duration::from_millis(50), self.command.stderr.recv())
                            .await
                    {
                        log(Bytes::from(chunk));
                    }
                    return Ok(result);
                }
                Ok(Some((other, _))) => {
                    return Err(self.fault(format!("answered {:?}", other.opcode())))
                }
                Ok(None) => {}
                Err(e) => return Err(self.fault(format!("a wrong answer: {e}"))),
            }
            self.input.reserve(READ_CHUNK);
            tokio::select! {
                chunk = self.command.stderr.recv(), if stderr_open => match chunk {
                    Some(chunk) => log(Bytes::from(chunk)),
                    None => stderr_open = false,
                },
                read = self.command.stdout.read_buf(&mut self.input) => match read {
                    Ok(0) => {
                        // What it said last may tell why.
                        let mut said = Vec::new();
                        while let Ok(chunk) = self.command.stderr.try_recv() {
                            said.extend_from_slice(&chunk);
                        }
                        if !said.is_empty() {
                            log(Bytes::from(said));
                        }
                        return Err(self.fault("the connection ended during the build"));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(self.fault(format!("connection lost during the build: {e}"))),
                },
            }
        }
    }

    /// Fetches the NAR of `path` into `unpack` (in a blocking task). `Ok(Err)` is the
    /// unpacking's own refusal (the NAR is too large, or a file could not be written).
    pub async fn dump(
        &mut self,
        path: &StorePath,
        mut unpack: Unpack,
    ) -> Result<Result<u64, StoreError>, Fault> {
        self.request(&Request::DumpStorePath { path: path.clone() })
            .await?;
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
                if let Err(e) = self.read_more().await {
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
