//! A session with a machine's `nix-daemon --stdio` (`ssh-ng://`), the client side of the
//! daemon (worker) protocol: the handshake, QueryValidPaths, AddToStoreNar with the NAR
//! framed, BuildDerivation with the log channel's lines and build-log results passed on as
//! the build's log, and NarFromPath. Needs protocol 1.23 (Nix 2.4) or newer: the first that
//! frames the NARs it is sent.

use std::collections::BTreeSet;

use bytes::Bytes;
use nixbuild_core::derivation::BasicDerivation;
use nixbuild_core::serve::{AddToStoreNar, BuildOptions, BuildResult};
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire::{self, BufMutExt};
use nixbuild_core::worker::handshake::{CLIENT_MAGIC, SERVER_MAGIC};
use nixbuild_core::worker::{
    BuildMode, ClientHello, Limits, LogField, Opcode, Request, Response, ResultType, ServerHello,
    StderrMessage, WorkerVersion,
};
use tokio::sync::mpsc;

use super::conn::{Fault, Link};
use crate::store::{StoreError, Unpack};

/// The oldest daemon protocol a machine may speak.
const OLDEST: WorkerVersion = WorkerVersion::V1_23;

/// A session with `nix-daemon --stdio`.
#[derive(Debug)]
pub struct DaemonConn {
    pub(super) link: Link,
    version: WorkerVersion,
    limits: Limits,
}

impl DaemonConn {
    /// Runs the handshake on `link`: magic, the server's version, the client's hello, and the
    /// rest of the server's up to `STDERR_LAST`.
    pub(super) async fn handshake(mut link: Link, command: &str) -> Result<DaemonConn, Fault> {
        let mut magic = Vec::new();
        magic.put_wire_u64(CLIENT_MAGIC);
        link.send_all(&magic).await?;
        // The server's magic and version come first; they stay in the input for the whole
        // hello's decoding below.
        while link.input.len() < 16 {
            link.read_more(true).await?;
        }
        let word =
            |i: usize| u64::from_le_bytes(link.input[i..i + 8].try_into().unwrap_or_default());
        if word(0) != SERVER_MAGIC {
            return Err(link.fault(format!(
                "`{command}` did not answer the daemon protocol's handshake"
            )));
        }
        let server = WorkerVersion::from_wire(word(8)).map_err(|e| link.fault(e))?;
        let version = WorkerVersion::negotiate(WorkerVersion::SERVER, server);
        if version < OLDEST {
            return Err(link.fault(format!(
                "speaks daemon protocol {version}; 1.23 (Nix 2.4) or newer is needed"
            )));
        }
        let mut hello = Vec::new();
        ClientHello {
            version: WorkerVersion::SERVER,
            features: BTreeSet::new(),
            affinity: None,
            reserve_space: false,
        }
        .encode(server, &mut hello);
        // Its magic went first.
        link.send_all(&hello[8..]).await?;
        let limits = Limits::default();
        link.item(|r| ServerHello::read(r, WorkerVersion::SERVER, &limits.wire))
            .await?;
        Ok(DaemonConn {
            link,
            version,
            limits,
        })
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> WorkerVersion {
        self.version
    }

    async fn request(&mut self, request: &Request, then: &[u8]) -> Result<(), Fault> {
        self.link.discard_stderr();
        let mut buf = Vec::new();
        request.encode(self.version, &mut buf);
        buf.extend_from_slice(then);
        self.link.send_all(&buf).await
    }

    /// Reads the log channel up to the answer to `op`, passing log lines to `log`; an
    /// error on the channel is the machine's refusal. `wait` bounds no read (a build runs).
    async fn answer(
        &mut self,
        op: Opcode,
        log: &mut impl FnMut(Bytes),
        wait: bool,
    ) -> Result<Option<Response>, Fault> {
        let (v, limits) = (self.version, self.limits.wire);
        let mut stderr_open = true;
        loop {
            let message = loop {
                match wire::decode_buf(&mut self.link.input, |r| StderrMessage::read(r, v, &limits))
                {
                    Ok(Some(m)) => break m,
                    Ok(None) if wait => self.link.pump(&mut stderr_open, log).await?,
                    Ok(None) => self.link.read_more(true).await?,
                    Err(e) => return Err(self.link.fault(format!("a wrong answer: {e}"))),
                }
            };
            match message {
                StderrMessage::Last => break,
                StderrMessage::Error(e) => {
                    return Err(self
                        .link
                        .fault(format!("refused: {}", String::from_utf8_lossy(&e.msg))))
                }
                StderrMessage::Next(line) => log(Bytes::from(line)),
                StderrMessage::Result { kind, fields, .. }
                    if kind == ResultType::BuildLogLine as u64 =>
                {
                    if let Some(LogField::String(line)) = fields.first() {
                        let mut line = line.clone();
                        line.push(b'\n');
                        log(Bytes::from(line));
                    }
                }
                StderrMessage::Read(_) => {
                    return Err(self.link.fault("asked for data it was not to ask for"))
                }
                StderrMessage::Write(_)
                | StderrMessage::StartActivity { .. }
                | StderrMessage::StopActivity { .. }
                | StderrMessage::Result { .. } => {}
            }
        }
        self.link.item(|r| Response::read(r, op, v, &limits)).await
    }

    pub(super) async fn query_valid(
        &mut self,
        paths: BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, Fault> {
        self.request(
            &Request::QueryValidPaths {
                paths,
                substitute: false,
            },
            &[],
        )
        .await?;
        match self
            .answer(Opcode::QueryValidPaths, &mut |_| {}, false)
            .await?
        {
            Some(Response::Paths(valid)) => Ok(valid),
            other => Err(self.link.fault(format!("answered {other:?}"))),
        }
    }

    pub(super) async fn add(
        &mut self,
        header: AddToStoreNar,
        nar: mpsc::Receiver<Bytes>,
    ) -> Result<(), Fault> {
        let size = header.nar_size;
        self.request(
            &Request::AddToStoreNar {
                info: Box::new(header),
                repair: false,
                dont_check_sigs: true,
            },
            &[],
        )
        .await?;
        // Framed: each chunk after its length, then an empty frame.
        self.link
            .send_nar(size, nar, Some(|len, head| head.put_wire_u64(len as u64)))
            .await?;
        let mut end = Vec::new();
        end.put_wire_u64(0);
        self.link.send_all(&end).await?;
        match self
            .answer(Opcode::AddToStoreNar, &mut |_| {}, false)
            .await?
        {
            Some(Response::Nothing) => Ok(()),
            other => Err(self.link.fault(format!("answered {other:?}"))),
        }
    }

    /// BuildDerivation. The daemon protocol carries no build settings with it: the
    /// machine's own limits hold there, the front's are enforced by the caller.
    pub(super) async fn build(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        _options: BuildOptions,
        mut log: impl FnMut(Bytes),
    ) -> Result<Box<BuildResult>, Fault> {
        self.request(
            &Request::BuildDerivation {
                drv_path: drv_path.clone(),
                drv: Box::new(drv.clone()),
                mode: BuildMode::Normal,
            },
            &[],
        )
        .await?;
        match self.answer(Opcode::BuildDerivation, &mut log, true).await? {
            Some(Response::Build(result)) => Ok(result),
            other => Err(self.link.fault(format!("answered {other:?}"))),
        }
    }

    pub(super) async fn dump(
        &mut self,
        path: &StorePath,
        unpack: Unpack,
    ) -> Result<Result<u64, StoreError>, Fault> {
        self.request(&Request::NarFromPath(path.clone()), &[])
            .await?;
        match self.answer(Opcode::NarFromPath, &mut |_| {}, false).await? {
            None => self.link.nar(path, unpack).await,
            Some(other) => Err(self.link.fault(format!("answered {other:?}"))),
        }
    }
}
