//! [`ServerSession`]: the server side of one serve connection as a sans-IO state machine.
//!
//! The driver owns the socket and the store. It appends what it reads to a `BytesMut`, calls
//! [`ServerSession::poll`] until that returns `Ok(None)` (read more), acts on each [`Event`],
//! answers requests with [`ServerSession::respond`] (or, for DumpStorePath and ExportPaths,
//! [`ServerSession::send_stream`] and [`ServerSession::end_stream`]), and writes out and
//! flushes [`ServerSession::take_output`] whenever it is not empty. At end of input it calls
//! [`ServerSession::end_of_input`], which says whether the client left at a command boundary.
//!
//! ```text
//! start ─ magic ─▶ (server hello queued) ─ version ─▶ Hello ─▶ idle
//! idle ─ opcode + args ─▶ Request ─▶ awaiting response ─ respond ─▶ idle
//!   AddToStoreNar:  Request, NarChunk…, NarEnd, then respond(Added); or Request, the
//!                   driver reads the NAR itself, nar_body_taken, then respond(Added)
//!   ImportPaths:    Request, then per entry NarChunk…, NarEnd, ImportEntry; ImportEnd,
//!                   then respond(Imported)
//!   DumpStorePath, ExportPaths: Request, then send_stream…, end_stream
//! ```
//!
//! A request (and an ImportPaths trailer) is decoded once, when all of it is in: until then
//! the session only steps over its length prefixes, resuming where it stopped, so a
//! 10,000-path request arriving in many small pieces costs no more than one arriving whole.
//! A length or count over the limits fails as soon as it is read. What the session leaves in
//! the input while it waits is at most one unfinished request or trailer; the driver bounds
//! that with its own byte cap.
//!
//! The session does not read ahead: while a response is due, `poll` returns `Ok(None)`.
//! After an error the session is dead and `poll` repeats the error; the real server prints it
//! and exits, and the client sees EOF (docs/serve-protocol.md §12).

use bytes::{Bytes, BytesMut};

use super::export::{ExportMarker, ExportTrailer};
use super::framing::{self, Framer};
use super::handshake::{ClientHello, ServerHello};
use super::request::{Opcode, Request};
use super::response::Response;
use super::{Limits, ProtocolVersion, ServeError};
use crate::nar::NarReader;
use crate::wire::{self, Reader};

/// What the session read from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake is done; the server hello is already in the output.
    Hello {
        /// The version the client sent.
        client: ProtocolVersion,
        /// The version the session speaks, `min(client, 0x207)`.
        negotiated: ProtocolVersion,
    },
    /// A request. For AddToStoreNar and ImportPaths the NAR data follows as events.
    Request(Request),
    /// The next piece of the NAR of an AddToStoreNar or of an ImportPaths entry.
    NarChunk(Bytes),
    /// The NAR is complete (AddToStoreNar: `narSize` bytes delivered; ImportPaths: the NAR
    /// delimited itself).
    NarEnd,
    /// ImportPaths: the trailer of the entry whose NAR just ended.
    ImportEntry(ExportTrailer),
    /// ImportPaths: the export stream ended; respond with [`Response::Imported`].
    ImportEnd,
}

/// Where the session is.
#[derive(Debug)]
enum State {
    Magic,
    Version,
    Idle,
    /// AddToStoreNar body: this many bytes are still to come.
    NarBody {
        remaining: u64,
    },
    /// ImportPaths: expecting an entry marker.
    ImportMarker,
    /// ImportPaths: inside an entry's NAR.
    ImportNar(Box<NarReader>),
    /// ImportPaths: expecting the entry's trailer.
    ImportTrailer,
    AwaitingResponse(Opcode),
    Streaming,
    Failed(ServeError),
}

/// The server side of one serve session. See the module documentation for the protocol.
#[derive(Debug)]
pub struct ServerSession {
    state: State,
    version: ProtocolVersion,
    write_allowed: bool,
    limits: Limits,
    output: BytesMut,
    /// Where the scan for the end of the next request got to.
    framer: Framer,
}

/// Where the input ended, for a request cut short: named after its opcode when that much
/// arrived, so that the client's error says which request was incomplete.
fn cut_request(leftover: &[u8]) -> &'static str {
    let op = leftover
        .first_chunk::<8>()
        .and_then(|b| Opcode::from_wire(u64::from_le_bytes(*b)).ok());
    match op {
        None => "in a request",
        Some(Opcode::QueryValidPaths) => "in a QueryValidPaths request",
        Some(Opcode::QueryPathInfos) => "in a QueryPathInfos request",
        Some(Opcode::DumpStorePath) => "in a DumpStorePath request",
        Some(Opcode::ImportPaths) => "in an ImportPaths request",
        Some(Opcode::ExportPaths) => "in an ExportPaths request",
        Some(Opcode::BuildPaths) => "in a BuildPaths request",
        Some(Opcode::QueryClosure) => "in a QueryClosure request",
        Some(Opcode::BuildDerivation) => "in a BuildDerivation request",
        Some(Opcode::AddToStoreNar) => "in an AddToStoreNar request",
    }
}

impl ServerSession {
    /// A session before the handshake. `write_allowed` is `--write`.
    pub fn new(write_allowed: bool, limits: Limits) -> Self {
        ServerSession {
            state: State::Magic,
            version: ProtocolVersion::SERVER,
            write_allowed,
            limits,
            output: BytesMut::new(),
            framer: Framer::default(),
        }
    }

    /// The negotiated version (the server's own before the handshake completes).
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Bytes to send to the client; the driver writes and flushes them.
    pub fn take_output(&mut self) -> Bytes {
        self.output.split().freeze()
    }

    /// Consumes what it can from the front of `input` and reports the next event, or
    /// `Ok(None)` when it needs more input (or a response is due).
    pub fn poll(&mut self, input: &mut BytesMut) -> Result<Option<Event>, ServeError> {
        let r = self.step(input);
        if let Err(e) = &r {
            self.state = State::Failed(e.clone());
        }
        r
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Option<Event>, ServeError> {
        match &mut self.state {
            State::Failed(e) => Err(e.clone()),
            State::Magic => {
                if wire::decode_buf(input, ClientHello::read_magic)?.is_none() {
                    return Ok(None);
                }
                // The real server answers as soon as it has the magic.
                ServerHello {
                    version: ProtocolVersion::SERVER,
                }
                .encode(&mut self.output);
                self.state = State::Version;
                self.step(input)
            }
            State::Version => {
                let Some(client) = wire::decode_buf(input, ClientHello::read_version)? else {
                    return Ok(None);
                };
                self.version = ProtocolVersion::negotiate(client);
                self.state = State::Idle;
                Ok(Some(Event::Hello {
                    client,
                    negotiated: self.version,
                }))
            }
            State::Idle => {
                let (v, limits, write) = (self.version, self.limits, self.write_allowed);
                if !framing::advance(&mut self.framer, input, v, &limits, write) {
                    return Ok(None);
                }
                let req = wire::decode_buf(input, |r: &mut Reader<'_>| {
                    let op = Opcode::read(r)?;
                    op.check_write(write)?;
                    Request::read_args(op, r, v, &limits)
                })?;
                let Some(req) = req else { return Ok(None) };
                self.framer = Framer::default();
                self.state = match &req {
                    Request::AddToStoreNar(h) => State::NarBody {
                        remaining: h.nar_size,
                    },
                    Request::ImportPaths => State::ImportMarker,
                    Request::DumpStorePath { .. } | Request::ExportPaths { .. } => State::Streaming,
                    _ => State::AwaitingResponse(req.opcode()),
                };
                Ok(Some(Event::Request(req)))
            }
            State::NarBody { remaining } => {
                if *remaining == 0 {
                    self.state = State::AwaitingResponse(Opcode::AddToStoreNar);
                    return Ok(Some(Event::NarEnd));
                }
                if input.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
                *remaining -= n as u64;
                Ok(Some(Event::NarChunk(input.split_to(n).freeze())))
            }
            State::ImportMarker => match wire::decode_buf(input, ExportMarker::read)? {
                None => Ok(None),
                Some(ExportMarker::Entry) => {
                    self.state = State::ImportNar(Box::default());
                    self.step(input)
                }
                Some(ExportMarker::End) => {
                    self.state = State::AwaitingResponse(Opcode::ImportPaths);
                    Ok(Some(Event::ImportEnd))
                }
            },
            State::ImportNar(reader) => {
                if reader.is_complete() {
                    self.state = State::ImportTrailer;
                    self.framer = framing::trailer();
                    return Ok(Some(Event::NarEnd));
                }
                // Run the reader only to find where the NAR ends; the store validates and
                // unpacks the chunks with its own reader, as for AddToStoreNar.
                let mut used = 0;
                while used < input.len() && !reader.is_complete() {
                    let (n, _) = reader.feed(&input[used..]).map_err(ServeError::ImportNar)?;
                    used += n;
                }
                if used == 0 {
                    return Ok(None);
                }
                Ok(Some(Event::NarChunk(input.split_to(used).freeze())))
            }
            State::ImportTrailer => {
                // Framed like a request: a trailer with many references arriving in small
                // pieces is decoded once, not once per piece.
                let (v, limits, write) = (self.version, self.limits, self.write_allowed);
                if !framing::advance(&mut self.framer, input, v, &limits, write) {
                    return Ok(None);
                }
                let Some(t) = wire::decode_buf(input, |r| ExportTrailer::read(r, &limits.wire))?
                else {
                    return Ok(None);
                };
                self.framer = Framer::default();
                self.state = State::ImportMarker;
                Ok(Some(Event::ImportEntry(t)))
            }
            State::AwaitingResponse(_) | State::Streaming => Ok(None),
        }
    }

    /// AddToStoreNar: how many bytes of the NAR are still to come, while its body is being
    /// received; `None` otherwise.
    pub fn nar_body_remaining(&self) -> Option<u64> {
        match self.state {
            State::NarBody { remaining } => Some(remaining),
            _ => None,
        }
    }

    /// AddToStoreNar: the driver took the rest of the NAR itself, `n` bytes (all that
    /// remained: those in its input buffer, then the rest straight from the client), and
    /// the session now awaits the response as after [`Event::NarEnd`].
    pub fn nar_body_taken(&mut self, n: u64) -> Result<(), ServeError> {
        match self.state {
            State::NarBody { remaining } if remaining == n => {
                self.state = State::AwaitingResponse(Opcode::AddToStoreNar);
                Ok(())
            }
            _ => Err(ServeError::Misuse(
                "the NAR taken is not what remains of an AddToStoreNar body",
            )),
        }
    }

    /// Sends the response to the current request.
    pub fn respond(&mut self, response: &Response) -> Result<(), ServeError> {
        match self.state {
            State::AwaitingResponse(op) if op == response.opcode() => {
                response.encode(self.version, &mut self.output);
                self.state = State::Idle;
                Ok(())
            }
            _ => Err(ServeError::Misuse(
                "response does not answer the current request",
            )),
        }
    }

    /// Appends raw bytes of the DumpStorePath NAR or the ExportPaths stream.
    pub fn send_stream(&mut self, bytes: &[u8]) -> Result<(), ServeError> {
        match self.state {
            State::Streaming => {
                self.output.extend_from_slice(bytes);
                Ok(())
            }
            _ => Err(ServeError::Misuse(
                "no DumpStorePath or ExportPaths in progress",
            )),
        }
    }

    /// Ends the DumpStorePath or ExportPaths response.
    pub fn end_stream(&mut self) -> Result<(), ServeError> {
        match self.state {
            State::Streaming => {
                self.state = State::Idle;
                Ok(())
            }
            _ => Err(ServeError::Misuse(
                "no DumpStorePath or ExportPaths in progress",
            )),
        }
    }

    /// The client closed its side with `leftover` bytes unread. `Ok` means a clean end (EOF
    /// at a command boundary, exit 0); otherwise the error says what was cut short.
    pub fn end_of_input(&self, leftover: &[u8]) -> Result<(), ServeError> {
        let what = match &self.state {
            State::Idle | State::AwaitingResponse(_) | State::Streaming if leftover.is_empty() => {
                return Ok(())
            }
            State::Failed(e) => return Err(e.clone()),
            State::Magic | State::Version => "in the handshake",
            State::Idle | State::AwaitingResponse(_) | State::Streaming => cut_request(leftover),
            State::NarBody { .. } | State::ImportNar(_) => "in a NAR",
            State::ImportMarker | State::ImportTrailer => "in an export stream",
        };
        Err(ServeError::UnexpectedEof(what))
    }
}
