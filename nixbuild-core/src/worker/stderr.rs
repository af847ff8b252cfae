//! The log channel (docs/worker-protocol.md §4): what a server writes while it works on a
//! request, before `STDERR_LAST` and the answer, or `STDERR_ERROR` instead of both.

use bytes::BufMut;

use super::{ReadResult, WorkerError, WorkerVersion};
use crate::wire::{self, BufMutExt, Reader};

/// A log line.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// The server asks for `n` bytes of the payload (AddToStoreNar at 1.21 and 1.22).
pub const STDERR_READ: u64 = 0x6461_7461;
/// Data for the client's sink (obsolete).
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// The work is done; the answer follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// The work failed; no answer follows.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// An activity starts.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// An activity stops.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// A result of an activity (a build's log line, its phase, progress).
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Activity types that a build service reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ActivityType {
    /// Something else.
    Unknown = 0,
    /// Copying a path.
    CopyPath = 100,
    /// Realising paths.
    Realise = 102,
    /// Copying paths.
    CopyPaths = 103,
    /// Building several derivations.
    Builds = 104,
    /// Building one derivation; fields: drvPath, machine, round, rounds.
    Build = 105,
}

/// Result types that a build service reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ResultType {
    /// A line of a build's log; field: the line.
    BuildLogLine = 101,
    /// The phase a build is in; field: its name.
    SetPhase = 104,
}

/// A field of an activity or a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogField {
    /// Type 0: a number.
    Int(u64),
    /// Type 1: a string.
    String(Vec<u8>),
}

/// An error as the client shows it: the message after `error: `, and the traces under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// The verbosity level (0 is lvlError).
    pub level: u64,
    /// The message.
    pub msg: Vec<u8>,
    /// Its traces ("while …"), innermost first (1.26 on).
    pub traces: Vec<Vec<u8>>,
    /// The exit status (before 1.26).
    pub status: u64,
}

impl ErrorInfo {
    /// An error with message `msg`, level lvlError, exit status 1.
    pub fn new(msg: impl Into<Vec<u8>>) -> Self {
        ErrorInfo {
            level: 0,
            msg: msg.into(),
            traces: Vec::new(),
            status: 1,
        }
    }
}

/// One message on the log channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMessage {
    /// A log line the client prints.
    Next(Vec<u8>),
    /// A request for up to this many payload bytes (the client answers with a string).
    Read(u64),
    /// Obsolete: data for the client's sink.
    Write(Vec<u8>),
    /// The work is done.
    Last,
    /// The work failed.
    Error(ErrorInfo),
    /// An activity starts.
    StartActivity {
        /// Its id, chosen by the server.
        id: u64,
        /// Its verbosity level.
        level: u64,
        /// Its type (see [`ActivityType`]).
        kind: u64,
        /// Its text.
        text: Vec<u8>,
        /// Its fields.
        fields: Vec<LogField>,
        /// The id of the activity it belongs to, 0 for none.
        parent: u64,
    },
    /// An activity stops.
    StopActivity {
        /// Its id.
        id: u64,
    },
    /// A result of an activity.
    Result {
        /// The activity's id.
        id: u64,
        /// Its type (see [`ResultType`]).
        kind: u64,
        /// Its fields.
        fields: Vec<LogField>,
    },
}

fn put_fields(buf: &mut impl BufMut, fields: &[LogField]) {
    buf.put_wire_u64(fields.len() as u64);
    for f in fields {
        match f {
            LogField::Int(n) => {
                buf.put_wire_u64(0);
                buf.put_wire_u64(*n);
            }
            LogField::String(s) => {
                buf.put_wire_u64(1);
                buf.put_wire_bytes(s);
            }
        }
    }
}

fn read_fields(r: &mut Reader<'_>, limits: &wire::Limits) -> ReadResult<Vec<LogField>> {
    let n = r.count("fields", limits.max_list_len)?;
    let mut v = Vec::with_capacity(r.prealloc(n));
    for _ in 0..n {
        let offset = r.position();
        v.push(match r.u64()? {
            0 => LogField::Int(r.u64()?),
            1 => LogField::String(r.bytes("field", limits.max_string_len)?.to_vec()),
            t => {
                return Err(WorkerError::Malformed {
                    field: "field type",
                    offset,
                    reason: format!("unknown type {t}"),
                }
                .into())
            }
        });
    }
    Ok(v)
}

impl StderrMessage {
    /// Writes the message for negotiated version `v`.
    pub fn encode(&self, v: WorkerVersion, buf: &mut impl BufMut) {
        match self {
            StderrMessage::Next(s) => {
                buf.put_wire_u64(STDERR_NEXT);
                buf.put_wire_bytes(s);
            }
            StderrMessage::Read(n) => {
                buf.put_wire_u64(STDERR_READ);
                buf.put_wire_u64(*n);
            }
            StderrMessage::Write(s) => {
                buf.put_wire_u64(STDERR_WRITE);
                buf.put_wire_bytes(s);
            }
            StderrMessage::Last => buf.put_wire_u64(STDERR_LAST),
            StderrMessage::Error(e) => {
                buf.put_wire_u64(STDERR_ERROR);
                if v >= WorkerVersion::V1_26 {
                    buf.put_wire_bytes(b"Error");
                    buf.put_wire_u64(e.level);
                    buf.put_wire_bytes(b"Error");
                    buf.put_wire_bytes(&e.msg);
                    buf.put_wire_u64(0); // no position
                    buf.put_wire_u64(e.traces.len() as u64);
                    for t in &e.traces {
                        buf.put_wire_u64(0); // no position
                        buf.put_wire_bytes(t);
                    }
                } else {
                    buf.put_wire_bytes(&e.msg);
                    buf.put_wire_u64(e.status);
                }
            }
            StderrMessage::StartActivity {
                id,
                level,
                kind,
                text,
                fields,
                parent,
            } => {
                buf.put_wire_u64(STDERR_START_ACTIVITY);
                buf.put_wire_u64(*id);
                buf.put_wire_u64(*level);
                buf.put_wire_u64(*kind);
                buf.put_wire_bytes(text);
                put_fields(buf, fields);
                buf.put_wire_u64(*parent);
            }
            StderrMessage::StopActivity { id } => {
                buf.put_wire_u64(STDERR_STOP_ACTIVITY);
                buf.put_wire_u64(*id);
            }
            StderrMessage::Result { id, kind, fields } => {
                buf.put_wire_u64(STDERR_RESULT);
                buf.put_wire_u64(*id);
                buf.put_wire_u64(*kind);
                put_fields(buf, fields);
            }
        }
    }

    /// Reads one message as a client of negotiated version `v` does.
    pub fn read(r: &mut Reader<'_>, v: WorkerVersion, limits: &wire::Limits) -> ReadResult<Self> {
        let offset = r.position();
        let long = limits.max_string_len;
        Ok(match r.u64()? {
            STDERR_NEXT => StderrMessage::Next(r.bytes("log line", long)?.to_vec()),
            STDERR_READ => StderrMessage::Read(r.u64()?),
            STDERR_WRITE => StderrMessage::Write(r.bytes("data", long)?.to_vec()),
            STDERR_LAST => StderrMessage::Last,
            STDERR_ERROR if v >= WorkerVersion::V1_26 => {
                let short = limits.max_short_string_len;
                r.bytes("error type", short)?;
                let level = r.u64()?;
                r.bytes("error name", short)?;
                let msg = r.bytes("error message", long)?.to_vec();
                let have_pos = r.u64()?;
                if have_pos != 0 {
                    return Err(WorkerError::Malformed {
                        field: "error position",
                        offset: r.position() - 8,
                        reason: "positions are not supported".to_owned(),
                    }
                    .into());
                }
                let n = r.count("error traces", limits.max_list_len)?;
                let mut traces = Vec::with_capacity(r.prealloc(n));
                for _ in 0..n {
                    r.u64()?;
                    traces.push(r.bytes("error trace", long)?.to_vec());
                }
                StderrMessage::Error(ErrorInfo {
                    level,
                    msg,
                    traces,
                    status: 1,
                })
            }
            STDERR_ERROR => {
                let msg = r.bytes("error message", long)?.to_vec();
                let status = r.u64()?;
                StderrMessage::Error(ErrorInfo {
                    level: 0,
                    msg,
                    traces: Vec::new(),
                    status,
                })
            }
            STDERR_START_ACTIVITY => StderrMessage::StartActivity {
                id: r.u64()?,
                level: r.u64()?,
                kind: r.u64()?,
                text: r.bytes("activity text", long)?.to_vec(),
                fields: read_fields(r, limits)?,
                parent: r.u64()?,
            },
            STDERR_STOP_ACTIVITY => StderrMessage::StopActivity { id: r.u64()? },
            STDERR_RESULT => StderrMessage::Result {
                id: r.u64()?,
                kind: r.u64()?,
                fields: read_fields(r, limits)?,
            },
            other => {
                return Err(WorkerError::Malformed {
                    field: "stderr message",
                    offset,
                    reason: format!("unknown message type {other:#x}"),
                }
                .into())
            }
        })
    }
}
