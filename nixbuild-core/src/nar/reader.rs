//! The streaming, push-based NAR parser.

use super::{check_name, check_target, padding, show, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};
use std::ops::Range;

/// Why a NAR was rejected. Every variant carries the byte offset in the NAR where the
/// offending token (or byte) starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarError {
    /// A token other than the grammar allows at this point.
    #[error("NAR byte {offset}: expected {expected}, found {found}")]
    Unexpected {
        /// Where the token starts.
        offset: u64,
        /// What the grammar allows here.
        expected: &'static str,
        /// The token found, escaped, or its length when it is too long to be any keyword.
        found: String,
    },
    /// A name or symlink target longer than its limit (checked before buffering it).
    #[error("NAR byte {offset}: {what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Where the token starts.
        offset: u64,
        /// Which field.
        what: &'static str,
        /// Its declared length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A padding byte that is not zero.
    #[error("NAR byte {offset}: non-zero padding byte")]
    NonZeroPadding {
        /// Where the bad byte is.
        offset: u64,
    },
    /// An entry name that is empty, `.`, `..`, or contains `/` or NUL.
    #[error("NAR byte {offset}: invalid entry name `{name}`: {reason}")]
    InvalidName {
        /// Where the name token starts.
        offset: u64,
        /// The name, escaped.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry name not strictly after the previous one (bytewise).
    #[error("NAR byte {offset}: directory is not sorted: `{name}` follows `{previous}`")]
    NotSorted {
        /// Where the name token starts.
        offset: u64,
        /// The previous entry's name, escaped.
        previous: String,
        /// This entry's name, escaped.
        name: String,
    },
    /// A symlink target that is empty or contains NUL.
    #[error("NAR byte {offset}: invalid symlink target `{target}`: {reason}")]
    InvalidTarget {
        /// Where the target token starts.
        offset: u64,
        /// The target, escaped.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A node nested [`MAX_DEPTH`] directories deep.
    #[error("NAR byte {offset}: nesting depth reaches the limit of {MAX_DEPTH}")]
    TooDeep {
        /// Where the too-deep node starts.
        offset: u64,
    },
    /// The input ended before the NAR did.
    #[error("NAR is incomplete: input ends at byte {offset}")]
    Incomplete {
        /// How many bytes were read.
        offset: u64,
    },
    /// Bytes follow a complete NAR where none were expected.
    #[error("NAR ends at byte {offset} but {len} more bytes follow")]
    TrailingData {
        /// Where the NAR ends.
        offset: u64,
        /// How many bytes follow it.
        len: usize,
    },
}

/// One step of a NAR, as [`NarReader::feed`] reports it. Byte slices borrow from the input
/// (or, for a name or target split across chunks, from the reader's small token buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarEvent<'a> {
    /// A directory node starts; its [`NarEvent::Entry`]s follow, then [`NarEvent::EndNode`].
    Directory,
    /// An entry of the current directory; the entry's node follows.
    Entry {
        /// The entry name, already checked.
        name: &'a [u8],
    },
    /// A symlink node; [`NarEvent::EndNode`] follows.
    Symlink {
        /// The target, already checked.
        target: &'a [u8],
    },
    /// A regular file starts: `size` bytes of [`NarEvent::Contents`] follow, then
    /// [`NarEvent::EndNode`].
    File {
        /// Whether the `executable` marker was present.
        executable: bool,
        /// The size of the contents in bytes.
        size: u64,
    },
    /// A piece of the current file's contents, never empty.
    Contents(&'a [u8]),
    /// The current node (file, symlink or directory) ends.
    EndNode,
    /// The NAR is complete. Nothing after its last byte has been consumed, and every further
    /// call reports this again without consuming anything.
    End,
}

/// Where the grammar is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Magic,
    NodeOpen,
    TypeTag,
    TypeValue,
    RegularTag,
    ExecutableValue,
    ContentsTag,
    ContentsSize { executable: bool },
    Contents { remaining: u64, pad: u8 },
    Padding { remaining: u8 },
    TargetTag,
    Target,
    NodeClose,
    DirNext,
    EntryOpen,
    EntryNameTag,
    EntryName,
    EntryNodeTag,
    EntryClose,
    Done,
    Failed(NarError),
}

/// Where a completed token's payload is.
#[derive(Debug, Clone)]
enum Loc {
    Input(Range<usize>),
    Buf(Range<usize>),
}

/// An event whose byte slices are still positions, so the parsing loop needs no borrow.
enum Ev {
    Directory,
    Entry(Loc),
    Symlink(Loc),
    File { executable: bool, size: u64 },
    Contents(Range<usize>),
    EndNode,
    End,
}

/// A token that could not be read.
enum TokErr {
    TooLong(u64),
    Padding(u64),
}

/// Accumulates one token that arrives split across chunks. Its size is bounded by the
/// largest token the grammar allows (a symlink target), checked before copying.
#[derive(Debug, Default)]
struct TokenBuf {
    buf: Vec<u8>,
    /// Offset in the NAR where the token being read starts.
    start: u64,
    /// The previous token was returned from `buf`, which must be cleared before reuse.
    stale: bool,
}

impl TokenBuf {
    /// Reads one string token of at most `max` bytes from `input[*pos..]`. Returns `None`
    /// (having consumed all of the input) when the token is not complete yet.
    fn read(
        &mut self,
        input: &[u8],
        pos: &mut usize,
        base: u64,
        max: usize,
    ) -> Result<Option<Loc>, TokErr> {
        if self.stale {
            self.buf.clear();
            self.stale = false;
        }
        let rest = &input[*pos..];
        if self.buf.is_empty() {
            self.start = base + *pos as u64;
            // Fast path: the whole token is in this chunk.
            if let Some(len_bytes) = rest.get(..8) {
                let len = le_u64(len_bytes);
                if len > max as u64 {
                    return Err(TokErr::TooLong(len));
                }
                let len = len as usize;
                let total = 8 + len + padding(len as u64);
                if let Some(token) = rest.get(..total) {
                    check_zero(&token[8 + len..], self.start + 8 + len as u64)?;
                    let payload = *pos + 8..*pos + 8 + len;
                    *pos += total;
                    return Ok(Some(Loc::Input(payload)));
                }
            }
        }
        // Slow path: accumulate the length, then the payload and padding.
        let mut rest = rest;
        if self.buf.len() < 8 {
            let n = (8 - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            *pos += n;
            rest = &rest[n..];
            if self.buf.len() < 8 {
                return Ok(None);
            }
        }
        let len = le_u64(&self.buf[..8]);
        if len > max as u64 {
            return Err(TokErr::TooLong(len));
        }
        let len = len as usize;
        let total = 8 + len + padding(len as u64);
        let n = (total - self.buf.len()).min(rest.len());
        self.buf.extend_from_slice(&rest[..n]);
        *pos += n;
        if self.buf.len() < total {
            return Ok(None);
        }
        check_zero(&self.buf[8 + len..], self.start + 8 + len as u64)?;
        self.stale = true;
        Ok(Some(Loc::Buf(8..8 + len)))
    }

    /// Reads a bare little-endian u64 (the size before file contents).
    fn read_u64(&mut self, input: &[u8], pos: &mut usize, base: u64) -> Option<u64> {
        if self.stale {
            self.buf.clear();
            self.stale = false;
        }
        let rest = &input[*pos..];
        if self.buf.is_empty() {
            self.start = base + *pos as u64;
            if let Some(bytes) = rest.get(..8) {
                *pos += 8;
                return Some(le_u64(bytes));
            }
        }
        let n = (8 - self.buf.len()).min(rest.len());
        self.buf.extend_from_slice(&rest[..n]);
        *pos += n;
        if self.buf.len() < 8 {
            return None;
        }
        self.stale = true;
        Some(le_u64(&self.buf))
    }
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(a)
}

/// Checks that padding bytes are zero; `offset` is where the first of them is in the NAR.
fn check_zero(pad: &[u8], offset: u64) -> Result<(), TokErr> {
    match pad.iter().position(|&b| b != 0) {
        Some(i) => Err(TokErr::Padding(offset + i as u64)),
        None => Ok(()),
    }
}

/// A push-based streaming NAR parser (sans-IO).
///
/// Feed it bytes with [`NarReader::feed`]; each call reports how many bytes it consumed and at
/// most one [`NarEvent`]. When it reports no event it has consumed the whole input and needs
/// more. It never consumes a byte after the NAR's last one, so the caller can find where a NAR
/// ends inside a larger stream. After an error, every further call returns the same error.
#[derive(Debug)]
pub struct NarReader {
    state: State,
    /// Bytes consumed before the current call.
    offset: u64,
    tok: TokenBuf,
    /// One entry per open directory: the last entry name seen in it (empty before the first).
    dirs: Vec<Vec<u8>>,
}

impl Default for NarReader {
    fn default() -> Self {
        Self::new()
    }
}

impl NarReader {
    /// A reader expecting the start of a NAR.
    pub fn new() -> NarReader {
        NarReader {
            state: State::Magic,
            offset: 0,
            tok: TokenBuf::default(),
            dirs: Vec::new(),
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the whole NAR has been read.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes from `input` up to the next event. Returns the number of bytes consumed
    /// and the event, or `None` after consuming all of `input` without completing one.
    pub fn feed<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<NarEvent<'a>>), NarError> {
        let mut pos = 0;
        let step = self.step(input, &mut pos);
        self.offset += pos as u64;
        let ev = match step {
            Ok(ev) => ev,
            Err(e) => {
                self.state = State::Failed(e.clone());
                return Err(e);
            }
        };
        let buf = &self.tok.buf;
        let bytes = |loc: Loc| match loc {
            Loc::Input(r) => &input[r],
            Loc::Buf(r) => &buf[r],
        };
        let ev = ev.map(|ev| match ev {
            Ev::Directory => NarEvent::Directory,
            Ev::Entry(loc) => NarEvent::Entry { name: bytes(loc) },
            Ev::Symlink(loc) => NarEvent::Symlink { target: bytes(loc) },
            Ev::File { executable, size } => NarEvent::File { executable, size },
            Ev::Contents(r) => NarEvent::Contents(&input[r]),
            Ev::EndNode => NarEvent::EndNode,
            Ev::End => NarEvent::End,
        });
        Ok((pos, ev))
    }

    /// Reads a keyword token; `Ok(None)` when more input is needed, `Ok(Some(i))` when it is
    /// `choices[i]`.
    fn keyword(
        &mut self,
        input: &[u8],
        pos: &mut usize,
        choices: &[&[u8]],
        expected: &'static str,
    ) -> Result<Option<usize>, NarError> {
        let max = choices.iter().map(|c| c.len()).max().unwrap_or(0);
        let base = self.offset;
        let loc = match self.tok.read(input, pos, base, max) {
            Ok(Some(loc)) => loc,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.tok_err(e, expected, None)),
        };
        let found = self.bytes(input, &loc);
        match choices.iter().position(|c| *c == found) {
            Some(i) => Ok(Some(i)),
            None => Err(NarError::Unexpected {
                offset: self.tok.start,
                expected,
                found: format!("`{}`", show(found)),
            }),
        }
    }

    fn bytes<'a>(&'a self, input: &'a [u8], loc: &Loc) -> &'a [u8] {
        match loc {
            Loc::Input(r) => &input[r.clone()],
            Loc::Buf(r) => &self.tok.buf[r.clone()],
        }
    }

    /// Turns a token error into a [`NarError`]: an over-long token is `TooLong` for a named
    /// field (`field` is its name and limit) and `Unexpected` for a keyword.
    fn tok_err(
        &self,
        e: TokErr,
        expected: &'static str,
        field: Option<(&'static str, usize)>,
    ) -> NarError {
        let offset = self.tok.start;
        match (e, field) {
            (TokErr::Padding(offset), _) => NarError::NonZeroPadding { offset },
            (TokErr::TooLong(len), None) => NarError::Unexpected {
                offset,
                expected,
                found: format!("a string of {len} bytes"),
            },
            (TokErr::TooLong(len), Some((what, max))) => NarError::TooLong {
                offset,
                what,
                len,
                max,
            },
        }
    }

    /// Reads a name or target token of at most `max` bytes.
    fn field(
        &mut self,
        input: &[u8],
        pos: &mut usize,
        max: usize,
        what: &'static str,
    ) -> Result<Option<Loc>, NarError> {
        let base = self.offset;
        self.tok
            .read(input, pos, base, max)
            .map_err(|e| self.tok_err(e, "", Some((what, max))))
    }

    /// The state after a node's closing `)`.
    fn after_node(&mut self) -> Ev {
        self.state = if self.dirs.is_empty() {
            State::Done
        } else {
            State::EntryClose
        };
        Ev::EndNode
    }

    fn step(&mut self, input: &[u8], pos: &mut usize) -> Result<Option<Ev>, NarError> {
        macro_rules! kw {
            ($choices:expr, $expected:expr) => {
                match self.keyword(input, pos, $choices, $expected)? {
                    Some(i) => i,
                    None => return Ok(None),
                }
            };
        }
        loop {
            match &self.state {
                State::Failed(e) => return Err(e.clone()),
                State::Done => return Ok(Some(Ev::End)),
                State::Magic => {
                    kw!(&[super::NAR_MAGIC], "`nix-archive-1`");
                    self.state = State::NodeOpen;
                }
                State::NodeOpen => {
                    kw!(&[b"("], "`(`");
                    if self.dirs.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep {
                            offset: self.tok.start,
                        });
                    }
                    self.state = State::TypeTag;
                }
                State::TypeTag => {
                    kw!(&[b"type"], "`type`");
                    self.state = State::TypeValue;
                }
                State::TypeValue => {
                    let choices: &[&[u8]] = &[b"regular", b"symlink", b"directory"];
                    match kw!(choices, "`regular`, `symlink` or `directory`") {
                        0 => self.state = State::RegularTag,
                        1 => self.state = State::TargetTag,
                        _ => {
                            self.dirs.push(Vec::new());
                            self.state = State::DirNext;
                            return Ok(Some(Ev::Directory));
                        }
                    }
                }
                State::RegularTag => {
                    let choices: &[&[u8]] = &[b"executable", b"contents"];
                    self.state = match kw!(choices, "`executable` or `contents`") {
                        0 => State::ExecutableValue,
                        _ => State::ContentsSize { executable: false },
                    };
                }
                State::ExecutableValue => {
                    kw!(&[b""], "an empty string after `executable`");
                    self.state = State::ContentsTag;
                }
                State::ContentsTag => {
                    kw!(&[b"contents"], "`contents`");
                    self.state = State::ContentsSize { executable: true };
                }
                State::ContentsSize { executable } => {
                    let executable = *executable;
                    let base = self.offset;
                    let Some(size) = self.tok.read_u64(input, pos, base) else {
                        return Ok(None);
                    };
                    // The padding is below 8, so the cast cannot truncate.
                    let pad = padding(size) as u8;
                    self.state = State::Contents {
                        remaining: size,
                        pad,
                    };
                    return Ok(Some(Ev::File { executable, size }));
                }
                State::Contents { remaining, pad } => {
                    let (remaining, pad) = (*remaining, *pad);
                    if remaining == 0 {
                        self.state = State::Padding { remaining: pad };
                        continue;
                    }
                    let avail = input.len() - *pos;
                    if avail == 0 {
                        return Ok(None);
                    }
                    // `n` is at most `avail`, so it fits in usize.
                    let n = remaining.min(avail as u64) as usize;
                    let chunk = *pos..*pos + n;
                    *pos += n;
                    self.state = State::Contents {
                        remaining: remaining - n as u64,
                        pad,
                    };
                    return Ok(Some(Ev::Contents(chunk)));
                }
                State::Padding { remaining } => {
                    let remaining = *remaining as usize;
                    let n = remaining.min(input.len() - *pos);
                    if let Some(i) = input[*pos..*pos + n].iter().position(|&b| b != 0) {
                        return Err(NarError::NonZeroPadding {
                            offset: self.offset + (*pos + i) as u64,
                        });
                    }
                    *pos += n;
                    if n < remaining {
                        // n < remaining < 8
                        self.state = State::Padding {
                            remaining: (remaining - n) as u8,
                        };
                        return Ok(None);
                    }
                    self.state = State::NodeClose;
                }
                State::TargetTag => {
                    kw!(&[b"target"], "`target`");
                    self.state = State::Target;
                }
                State::Target => {
                    let Some(loc) = self.field(input, pos, MAX_TARGET_LEN, "symlink target")?
                    else {
                        return Ok(None);
                    };
                    let target = self.bytes(input, &loc);
                    if let Err(reason) = check_target(target) {
                        return Err(NarError::InvalidTarget {
                            offset: self.tok.start,
                            target: show(target),
                            reason,
                        });
                    }
                    self.state = State::NodeClose;
                    return Ok(Some(Ev::Symlink(loc)));
                }
                State::NodeClose => {
                    kw!(&[b")"], "`)`");
                    return Ok(Some(self.after_node()));
                }
                State::DirNext => {
                    let choices: &[&[u8]] = &[b"entry", b")"];
                    if kw!(choices, "`entry` or `)`") == 0 {
                        self.state = State::EntryOpen;
                    } else {
                        self.dirs.pop();
                        return Ok(Some(self.after_node()));
                    }
                }
                State::EntryOpen => {
                    kw!(&[b"("], "`(`");
                    self.state = State::EntryNameTag;
                }
                State::EntryNameTag => {
                    kw!(&[b"name"], "`name`");
                    self.state = State::EntryName;
                }
                State::EntryName => {
                    let Some(loc) = self.field(input, pos, MAX_NAME_LEN, "entry name")? else {
                        return Ok(None);
                    };
                    self.check_entry(input, &loc)?;
                    self.state = State::EntryNodeTag;
                    return Ok(Some(Ev::Entry(loc)));
                }
                State::EntryNodeTag => {
                    kw!(&[b"node"], "`node`");
                    self.state = State::NodeOpen;
                }
                State::EntryClose => {
                    kw!(&[b")"], "`)`");
                    self.state = State::DirNext;
                }
            }
        }
    }

    /// Checks an entry name and its order, and records it as the directory's last name.
    fn check_entry(&mut self, input: &[u8], loc: &Loc) -> Result<(), NarError> {
        let offset = self.tok.start;
        let name = match loc {
            Loc::Input(r) => &input[r.clone()],
            Loc::Buf(r) => &self.tok.buf[r.clone()],
        };
        if let Err(reason) = check_name(name) {
            return Err(NarError::InvalidName {
                offset,
                name: show(name),
                reason,
            });
        }
        // `dirs` is non-empty in this state: an entry is only read inside a directory.
        if let Some(previous) = self.dirs.last_mut() {
            if !previous.is_empty() && name <= previous.as_slice() {
                return Err(NarError::NotSorted {
                    offset,
                    previous: show(previous),
                    name: show(name),
                });
            }
            previous.clear();
            previous.extend_from_slice(name);
        }
        Ok(())
    }
}
