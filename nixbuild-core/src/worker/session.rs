//! [`ServerSession`]: the server side of one worker-protocol connection as a sans-IO state
//! machine.
//!
//! The driver owns the connection and the store. It appends what it reads to a `BytesMut`,
//! calls [`ServerSession::poll`] until that returns `Ok(None)` (read more), acts on each
//! [`Event`], writes log messages with [`ServerSession::log`] while it works, answers with
//! [`ServerSession::respond`] or [`ServerSession::fail`] (NarFromPath:
//! [`ServerSession::start_stream`], [`ServerSession::send_stream`],
//! [`ServerSession::end_stream`]), and writes out and flushes
//! [`ServerSession::take_output`] whenever it is not empty (the session may also queue a
//! `STDERR_READ` of its own, asking the client for the next piece of a tunnelled NAR).
//!
//! ```text
//! start ─ magic ─▶ (MAGIC_2, version queued) ─ version ─▶ [≥ 1.38: features both ways]
//!   ─ affinity, reserveSpace ─▶ (version string, trust, LAST queued) Hello ─▶ idle
//! idle ─ opcode + args ─▶ Request ─▶ awaiting answer ─ respond | fail ─▶ idle
//!   AddToStoreNar:      Request, Data…, DataEnd, answer (the NAR framed from 1.23 on,
//!                       tunnelled through STDERR_READ at 1.21 and 1.22)
//!   AddToStore:         Request, Data…, DataEnd, answer (a framed dump from 1.25 on, a raw
//!                       NAR before)
//!   AddBuildLog:        Request, Data…, DataEnd, answer
//!   AddMultipleToStore: Request, then per path AddPath, Data…, DataEnd; AddEnd, answer
//!   NarFromPath:        Request, start_stream, send_stream…, end_stream
//! ```
//!
//! A request is decoded once, when all of it is in ([`crate::framer`]): until then the
//! session only steps over its length prefixes, so a request arriving in many small pieces
//! costs no more than one arriving whole; a length or count over the limits fails as soon as
//! it is read. The metadata of each path in an AddMultipleToStore stream is framed the same
//! way. After an error the session is dead and `poll` repeats it.

use std::collections::BTreeSet;

use bytes::{Buf, Bytes, BytesMut};

use super::handshake::{ClientHello, ServerHello, WorkerVersion};
use super::request::{AddToStoreForm, Opcode, Request};
use super::response::Response;
use super::stderr::{ErrorInfo, StderrMessage};
use super::{Limits, WorkerError};
use crate::framer::{Field, Framer, Len};
use crate::nar::NarReader;
use crate::serve::AddToStoreNar;
use crate::wire::{self, BufMutExt, Reader};

/// The most bytes one `STDERR_READ` asks for.
const TUNNEL_CHUNK: u64 = 64 * 1024;

/// A path's metadata in an AddMultipleToStore stream, for the framer.
const PATH_INFO: &[Field] = &[
    Field::Str(Len::Short),
    Field::Str(Len::Short),
    Field::Str(Len::Short),
    Field::List(1, Len::Short),
    Field::U64s(3),
    Field::List(1, Len::Short),
    Field::Str(Len::Short),
];

/// What the session read from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake is done; the server's side of it is already in the output.
    Hello {
        /// The version the client sent.
        client: WorkerVersion,
        /// The version the session speaks.
        negotiated: WorkerVersion,
        /// The client's features (1.38 on).
        features: BTreeSet<String>,
    },
    /// A request; for AddToStore, AddToStoreNar, AddBuildLog and AddMultipleToStore the
    /// payload follows as events.
    Request(Request),
    /// The next piece of the payload (of the current path, in AddMultipleToStore).
    Data(Bytes),
    /// The payload (or the current path's NAR) is complete.
    DataEnd,
    /// AddMultipleToStore: the next path; its NAR follows as `Data…`, `DataEnd`.
    AddPath(Box<AddToStoreNar>),
    /// AddMultipleToStore: every path has been delivered; answer the request.
    AddEnd,
}

/// Where the payload's bytes come from.
#[derive(Debug)]
enum Source {
    /// Straight from the input.
    Raw,
    /// A framed stream: this many bytes are left in the current frame.
    Framed { left: u64 },
    /// Through `STDERR_READ`: the bytes asked for and not yet answered, if a request is out.
    Tunnel { asked: Option<u64> },
}

/// What the payload is.
#[derive(Debug)]
enum Body {
    /// Exactly this many more bytes (AddToStoreNar).
    Sized { remaining: u64 },
    /// A NAR that delimits itself (AddToStore before 1.25).
    Nar(Box<NarReader>),
    /// Everything up to the end of the framed stream (AddToStore from 1.25, AddBuildLog).
    UntilEnd,
    /// AddMultipleToStore.
    Multiple(Multi),
}

/// Where an AddMultipleToStore stream is.
#[derive(Debug)]
enum Multi {
    /// Expecting the number of paths.
    Count,
    /// Expecting the next path's metadata; `left` paths to come, this one included.
    Info { left: u64, framer: Framer },
    /// Inside a path's NAR.
    Nar { remaining: u64, left: u64 },
    /// Every path is in: expecting the end of the stream.
    End,
}

/// A payload in progress.
#[derive(Debug)]
struct Payload {
    op: Opcode,
    source: Source,
    body: Body,
    /// De-framed bytes not yet used (AddMultipleToStore's counts and metadata).
    inner: BytesMut,
}

/// What [`ServerSession::pull`] got.
enum Pull {
    Bytes(Bytes),
    Wait,
    End,
}

/// Where the session is.
#[derive(Debug)]
enum State {
    Magic,
    Version,
    Features,
    Rest,
    Idle,
    Payload(Box<Payload>),
    AwaitingResponse(Opcode),
    Streaming,
    Failed(WorkerError),
}

/// The server side of one worker-protocol session. See the module documentation.
#[derive(Debug)]
pub struct ServerSession {
    state: State,
    hello: ServerHello,
    client: WorkerVersion,
    version: WorkerVersion,
    features: BTreeSet<String>,
    limits: Limits,
    output: BytesMut,
    framer: Framer,
}

impl ServerSession {
    /// A session before the handshake that will greet clients with `hello`.
    pub fn new(hello: ServerHello, limits: Limits) -> Self {
        ServerSession {
            state: State::Magic,
            version: hello.version,
            client: hello.version,
            hello,
            features: BTreeSet::new(),
            limits,
            output: BytesMut::new(),
            framer: Framer::default(),
        }
    }

    /// The negotiated version (the server's own before the handshake completes).
    pub fn version(&self) -> WorkerVersion {
        self.version
    }

    /// Bytes to send to the client; the driver writes and flushes them.
    pub fn take_output(&mut self) -> Bytes {
        self.output.split().freeze()
    }

    /// Consumes what it can from the front of `input` and reports the next event, or
    /// `Ok(None)` when it needs more input (or an answer is due).
    pub fn poll(&mut self, input: &mut BytesMut) -> Result<Option<Event>, WorkerError> {
        let r = self.step(input);
        if let Err(e) = &r {
            self.state = State::Failed(e.clone());
        }
        r
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Option<Event>, WorkerError> {
        let limits = self.limits;
        match &mut self.state {
            State::Failed(e) => Err(e.clone()),
            State::Magic => {
                if wire::decode_buf(input, ClientHello::read_magic)?.is_none() {
                    return Ok(None);
                }
                self.hello.encode_start(&mut self.output);
                self.state = State::Version;
                self.step(input)
            }
            State::Version => {
                let Some(client) = wire::decode_buf(input, ClientHello::read_version)? else {
                    return Ok(None);
                };
                self.client = client;
                self.version = WorkerVersion::negotiate(client, self.hello.version);
                self.state = if self.version >= WorkerVersion::V1_38 {
                    self.hello.encode_features(&mut self.output);
                    State::Features
                } else {
                    State::Rest
                };
                self.step(input)
            }
            State::Features => {
                let Some(features) =
                    wire::decode_buf(input, |r| ClientHello::read_features(r, &limits.wire))?
                else {
                    return Ok(None);
                };
                self.features = features;
                self.state = State::Rest;
                self.step(input)
            }
            State::Rest => {
                if wire::decode_buf(input, ClientHello::read_rest)?.is_none() {
                    return Ok(None);
                }
                self.hello.encode_end(self.version, &mut self.output);
                self.state = State::Idle;
                Ok(Some(Event::Hello {
                    client: self.client,
                    negotiated: self.version,
                    features: self.features.clone(),
                }))
            }
            State::Idle => {
                let v = self.version;
                let layout = |n| Opcode::from_wire(n).ok().map(|op| op.layout(v));
                if !self.framer.advance(input, &limits.wire, layout) {
                    return Ok(None);
                }
                let Some(req) = wire::decode_buf(input, |r| Request::read(r, v, &limits))? else {
                    return Ok(None);
                };
                self.framer = Framer::default();
                self.state = self.after(&req);
                Ok(Some(Event::Request(req)))
            }
            State::Payload(_) => self.payload(input),
            State::AwaitingResponse(_) | State::Streaming => Ok(None),
        }
    }

    /// The state after request `req` has been read.
    fn after(&self, req: &Request) -> State {
        let op = req.opcode();
        let framed = Source::Framed { left: 0 };
        let (source, body) = match req {
            Request::AddToStoreNar { info, .. } => {
                let body = Body::Sized {
                    remaining: info.nar_size,
                };
                match self.version >= WorkerVersion::V1_23 {
                    true => (framed, body),
                    false => (Source::Tunnel { asked: None }, body),
                }
            }
            Request::AddToStore {
                form: AddToStoreForm::Addressed { .. },
                ..
            } => (framed, Body::UntilEnd),
            Request::AddToStore { .. } => (Source::Raw, Body::Nar(Box::default())),
            Request::AddBuildLog(_) => (framed, Body::UntilEnd),
            Request::AddMultipleToStore { .. } => (framed, Body::Multiple(Multi::Count)),
            _ => return State::AwaitingResponse(op),
        };
        State::Payload(Box::new(Payload {
            op,
            source,
            body,
            inner: BytesMut::new(),
        }))
    }

    /// The next bytes of the payload, at most `max`.
    fn pull(
        source: &mut Source,
        input: &mut BytesMut,
        output: &mut BytesMut,
        max: u64,
        v: WorkerVersion,
    ) -> Result<Pull, WorkerError> {
        let take = |input: &mut BytesMut, n: u64| {
            let n = usize::try_from(n).map_or(input.len(), |n| n.min(input.len()));
            input.split_to(n).freeze()
        };
        match source {
            Source::Raw if input.is_empty() => Ok(Pull::Wait),
            Source::Raw => Ok(Pull::Bytes(take(input, max))),
            Source::Framed { left: 0 } => {
                let Some(len) = input.first_chunk::<8>().map(|b| u64::from_le_bytes(*b)) else {
                    return Ok(Pull::Wait);
                };
                input.advance(8);
                if len == 0 {
                    return Ok(Pull::End);
                }
                *source = Source::Framed { left: len };
                Self::pull(source, input, output, max, v)
            }
            Source::Framed { .. } if input.is_empty() => Ok(Pull::Wait),
            Source::Framed { left } => {
                let b = take(input, max.min(*left));
                *left -= b.len() as u64;
                Ok(Pull::Bytes(b))
            }
            Source::Tunnel { asked: None } => {
                let n = max.min(TUNNEL_CHUNK);
                StderrMessage::Read(n).encode(v, output);
                *source = Source::Tunnel { asked: Some(n) };
                // The answer may be in already (a client that sends ahead).
                Self::pull(source, input, output, max, v)
            }
            Source::Tunnel { asked: Some(n) } => {
                let max_len = usize::try_from(*n).unwrap_or(usize::MAX);
                let got = wire::decode_buf(input, |r: &mut Reader<'_>| {
                    r.bytes("tunnelled data", max_len)
                        .map(Bytes::copy_from_slice)
                })?;
                match got {
                    None => Ok(Pull::Wait),
                    Some(b) if b.is_empty() => Err(WorkerError::Payload(
                        "the client sent no data for STDERR_READ".to_owned(),
                    )),
                    Some(b) => {
                        *source = Source::Tunnel { asked: None };
                        Ok(Pull::Bytes(b))
                    }
                }
            }
        }
    }

    fn payload(&mut self, input: &mut BytesMut) -> Result<Option<Event>, WorkerError> {
        let v = self.version;
        let limits = self.limits;
        let State::Payload(p) = &mut self.state else {
            return Ok(None);
        };
        let out = &mut self.output;
        let framed = matches!(p.source, Source::Framed { .. });
        let done = |op| (State::AwaitingResponse(op), Some(Event::DataEnd));
        let (next, event) = match &mut p.body {
            Body::Sized { remaining: 0 } if !framed => done(p.op),
            Body::Sized { remaining: 0 } => match Self::pull(&mut p.source, input, out, 1, v)? {
                Pull::End => done(p.op),
                Pull::Wait => return Ok(None),
                Pull::Bytes(_) => {
                    return Err(WorkerError::Payload(format!(
                        "{}: the framed stream goes on after narSize bytes",
                        p.op.name()
                    )))
                }
            },
            Body::Sized { remaining } => {
                match Self::pull(&mut p.source, input, out, *remaining, v)? {
                    Pull::Bytes(b) => {
                        *remaining -= b.len() as u64;
                        return Ok(Some(Event::Data(b)));
                    }
                    Pull::Wait => return Ok(None),
                    Pull::End => {
                        return Err(WorkerError::Payload(format!(
                            "{}: the framed stream ended {remaining} bytes before narSize",
                            p.op.name()
                        )))
                    }
                }
            }
            Body::Nar(reader) if reader.is_complete() => done(p.op),
            Body::Nar(reader) => {
                // Run the reader only to find where the NAR ends; the store validates it.
                let mut used = 0;
                while used < input.len() && !reader.is_complete() {
                    let (n, _) = reader
                        .feed(&input[used..])
                        .map_err(|e| WorkerError::Payload(format!("NAR in AddToStore: {e}")))?;
                    used += n;
                }
                if used == 0 {
                    return Ok(None);
                }
                return Ok(Some(Event::Data(input.split_to(used).freeze())));
            }
            Body::UntilEnd => match Self::pull(&mut p.source, input, out, u64::MAX, v)? {
                Pull::Bytes(b) => return Ok(Some(Event::Data(b))),
                Pull::Wait => return Ok(None),
                Pull::End => done(p.op),
            },
            Body::Multiple(m) => {
                return Self::multiple(m, &mut p.source, &mut p.inner, input, out, v, &limits).map(
                    |(ev, finished)| {
                        if finished {
                            self.state = State::AwaitingResponse(Opcode::AddMultipleToStore);
                        }
                        ev
                    },
                );
            }
        };
        self.state = next;
        Ok(event)
    }

    /// One step of an AddMultipleToStore stream: the event, and whether the stream is over.
    fn multiple(
        m: &mut Multi,
        source: &mut Source,
        inner: &mut BytesMut,
        input: &mut BytesMut,
        out: &mut BytesMut,
        v: WorkerVersion,
        limits: &Limits,
    ) -> Result<(Option<Event>, bool), WorkerError> {
        let trailing =
            || WorkerError::Payload("AddMultipleToStore: data after the last path".to_owned());
        let cut = |what: &str| {
            WorkerError::Payload(format!("AddMultipleToStore: the stream ended {what}"))
        };
        loop {
            match m {
                Multi::Nar { remaining: 0, left } => {
                    *m = match *left {
                        0 => Multi::End,
                        left => Multi::Info {
                            left,
                            framer: Framer::with_layout(PATH_INFO),
                        },
                    };
                    return Ok((Some(Event::DataEnd), false));
                }
                Multi::Nar { remaining, .. } => {
                    let b = if inner.is_empty() {
                        match Self::pull(source, input, out, *remaining, v)? {
                            Pull::Bytes(b) => b,
                            Pull::Wait => return Ok((None, false)),
                            Pull::End => return Err(cut("inside a NAR")),
                        }
                    } else {
                        let n =
                            usize::try_from(*remaining).map_or(inner.len(), |r| r.min(inner.len()));
                        inner.split_to(n).freeze()
                    };
                    *remaining -= b.len() as u64;
                    return Ok((Some(Event::Data(b)), false));
                }
                Multi::End => {
                    if !inner.is_empty() {
                        return Err(trailing());
                    }
                    return match Self::pull(source, input, out, u64::MAX, v)? {
                        Pull::End => Ok((Some(Event::AddEnd), true)),
                        Pull::Wait => Ok((None, false)),
                        Pull::Bytes(_) => Err(trailing()),
                    };
                }
                Multi::Count => {
                    if let Some(n) = wire::decode_buf(inner, |r: &mut Reader<'_>| {
                        r.count("paths", limits.wire.max_list_len)
                    })? {
                        *m = match n {
                            0 => Multi::End,
                            n => Multi::Info {
                                left: n as u64,
                                framer: Framer::with_layout(PATH_INFO),
                            },
                        };
                        continue;
                    }
                }
                Multi::Info { left, framer } => {
                    if framer.advance(inner, &limits.wire, |_| None) {
                        let info = wire::decode_buf(inner, |r| AddToStoreNar::read(r, limits))?;
                        if let Some(info) = info {
                            *m = Multi::Nar {
                                remaining: info.nar_size,
                                left: *left - 1,
                            };
                            return Ok((Some(Event::AddPath(Box::new(info))), false));
                        }
                    }
                }
            }
            // More metadata is needed: move the next de-framed bytes to `inner`.
            let max = limits.wire.max_string_len.max(1 << 16);
            if inner.len() > max {
                return Err(WorkerError::Payload(format!(
                    "AddMultipleToStore: a path's metadata is longer than {max} bytes"
                )));
            }
            match Self::pull(source, input, out, u64::MAX, v)? {
                Pull::Bytes(b) => inner.extend_from_slice(&b),
                Pull::Wait => return Ok((None, false)),
                Pull::End => return Err(cut("inside a path's metadata")),
            }
        }
    }

    /// Writes a log message (while a request is being worked on).
    pub fn log(&mut self, msg: &StderrMessage) -> Result<(), WorkerError> {
        match self.state {
            State::AwaitingResponse(_) | State::Payload(_) => {
                msg.encode(self.version, &mut self.output);
                Ok(())
            }
            _ => Err(WorkerError::Misuse("no request is being worked on")),
        }
    }

    /// Answers the current request: `STDERR_LAST`, then the answer.
    pub fn respond(&mut self, response: &Response) -> Result<(), WorkerError> {
        match self.state {
            State::AwaitingResponse(op) if op != Opcode::NarFromPath => {
                self.output.put_wire_u64(super::stderr::STDERR_LAST);
                response.encode(self.version, &mut self.output);
                self.state = State::Idle;
                Ok(())
            }
            _ => Err(WorkerError::Misuse("no request awaits an answer")),
        }
    }

    /// Fails the current request with `error`; the session goes on with the next request.
    pub fn fail(&mut self, error: ErrorInfo) -> Result<(), WorkerError> {
        match self.state {
            State::AwaitingResponse(_) => {
                StderrMessage::Error(error).encode(self.version, &mut self.output);
                self.state = State::Idle;
                Ok(())
            }
            _ => Err(WorkerError::Misuse("no request awaits an answer")),
        }
    }

    /// Ends the session with `error`, wherever it is (in the middle of a payload, too): the
    /// client sees the error, and the driver closes the connection after writing it.
    pub fn abort(&mut self, error: ErrorInfo) {
        let msg = String::from_utf8_lossy(&error.msg).into_owned();
        StderrMessage::Error(error).encode(self.version, &mut self.output);
        self.state = State::Failed(WorkerError::Payload(msg));
    }

    /// NarFromPath: `STDERR_LAST`; the NAR follows with [`ServerSession::send_stream`].
    pub fn start_stream(&mut self) -> Result<(), WorkerError> {
        match self.state {
            State::AwaitingResponse(Opcode::NarFromPath) => {
                self.output.put_wire_u64(super::stderr::STDERR_LAST);
                self.state = State::Streaming;
                Ok(())
            }
            _ => Err(WorkerError::Misuse("no NarFromPath awaits an answer")),
        }
    }

    /// Appends bytes of the NAR being sent.
    pub fn send_stream(&mut self, bytes: &[u8]) -> Result<(), WorkerError> {
        match self.state {
            State::Streaming => {
                self.output.extend_from_slice(bytes);
                Ok(())
            }
            _ => Err(WorkerError::Misuse("no NarFromPath in progress")),
        }
    }

    /// Ends the NAR being sent.
    pub fn end_stream(&mut self) -> Result<(), WorkerError> {
        match self.state {
            State::Streaming => {
                self.state = State::Idle;
                Ok(())
            }
            _ => Err(WorkerError::Misuse("no NarFromPath in progress")),
        }
    }

    /// The client closed its side with `leftover` bytes unread. `Ok` means a clean end (at a
    /// request boundary); otherwise the error says what was cut short.
    pub fn end_of_input(&self, leftover: &[u8]) -> Result<(), WorkerError> {
        let what = match &self.state {
            State::Idle | State::AwaitingResponse(_) | State::Streaming if leftover.is_empty() => {
                return Ok(())
            }
            State::Failed(e) => return Err(e.clone()),
            State::Magic | State::Version | State::Features | State::Rest => "in the handshake",
            State::Idle | State::AwaitingResponse(_) | State::Streaming => "in a request",
            State::Payload(_) => "in the data that follows a request",
        };
        Err(WorkerError::UnexpectedEof(what))
    }
}
