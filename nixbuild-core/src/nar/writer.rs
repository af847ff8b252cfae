//! The canonical NAR writer.

use super::{check_name, check_target, padding, show, NarEvent, MAX_DEPTH, NAR_MAGIC};
use bytes::BufMut;

/// Why the writer refused a call: the output would not be a canonical NAR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarWriteError {
    /// A call that does not fit where the writer is (say, an entry inside a file).
    #[error("cannot {call} while {state}")]
    OutOfOrder {
        /// The call.
        call: &'static str,
        /// What the writer was expecting.
        state: &'static str,
    },
    /// An entry name that is empty, `.`, `..`, too long, or contains `/` or NUL.
    #[error("invalid entry name `{name}`: {reason}")]
    InvalidName {
        /// The name, escaped.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry name not strictly after the previous one (bytewise).
    #[error("entries out of order: `{name}` after `{previous}`")]
    NotSorted {
        /// The previous entry's name, escaped.
        previous: String,
        /// This entry's name, escaped.
        name: String,
    },
    /// A symlink target that is empty, too long, or contains NUL.
    #[error("invalid symlink target `{target}`: {reason}")]
    InvalidTarget {
        /// The target, escaped.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry whose node would be nested [`MAX_DEPTH`] directories deep.
    #[error("nesting depth reaches the limit of {MAX_DEPTH}")]
    TooDeep,
    /// File contents that do not add up to the declared size.
    #[error("file declared {size} bytes but {written} were written")]
    SizeMismatch {
        /// The size given to [`NarWriter::file`].
        size: u64,
        /// The bytes given to [`NarWriter::contents`] (so far, when too many).
        written: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing written yet; the root node comes next.
    Start,
    /// After an entry: its node comes next.
    Node,
    File {
        size: u64,
        written: u64,
    },
    Symlink,
    Directory,
    Done,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::Start | State::Node => "expecting a node",
            State::File { .. } => "writing a file",
            State::Symlink => "in a symlink (expecting its end)",
            State::Directory => "in a directory (expecting an entry or its end)",
            State::Done => "the NAR is complete",
        }
    }
}

/// Writes a canonical NAR into a [`BufMut`] (sans-IO), one node at a time.
///
/// Calls mirror [`NarEvent`]s: [`NarWriter::start_directory`], [`NarWriter::entry`],
/// [`NarWriter::file`] then [`NarWriter::contents`], [`NarWriter::symlink`], and
/// [`NarWriter::end`] to close every node. Anything that would make the output non-canonical
/// (unsorted or invalid names, wrong sizes, calls out of order) is refused with an error
/// before anything is written for that call.
#[derive(Debug)]
pub struct NarWriter {
    state: State,
    /// The last entry name of each open directory (empty before the first entry).
    dirs: Vec<Vec<u8>>,
}

impl Default for NarWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn put_str(out: &mut impl BufMut, s: &[u8]) {
    out.put_u64_le(s.len() as u64);
    out.put_slice(s);
    out.put_bytes(0, padding(s.len() as u64));
}

impl NarWriter {
    /// A writer for a new NAR; the magic is written with the root node.
    pub fn new() -> NarWriter {
        NarWriter {
            state: State::Start,
            dirs: Vec::new(),
        }
    }

    /// Whether the root node has been closed.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    fn out_of_order(&self, call: &'static str) -> NarWriteError {
        NarWriteError::OutOfOrder {
            call,
            state: self.state.describe(),
        }
    }

    /// Writes the opening of a node of type `ty` (and the magic, for the root).
    fn open_node(
        &mut self,
        call: &'static str,
        ty: &[u8],
        out: &mut impl BufMut,
    ) -> Result<(), NarWriteError> {
        match self.state {
            State::Start => put_str(out, NAR_MAGIC),
            State::Node => {}
            _ => return Err(self.out_of_order(call)),
        }
        put_str(out, b"(");
        put_str(out, b"type");
        put_str(out, ty);
        Ok(())
    }

    /// Starts a directory node.
    pub fn start_directory(&mut self, out: &mut impl BufMut) -> Result<(), NarWriteError> {
        self.open_node("start a directory", b"directory", out)?;
        self.dirs.push(Vec::new());
        self.state = State::Directory;
        Ok(())
    }

    /// Starts an entry of the current directory; its node must follow.
    pub fn entry(&mut self, name: &[u8], out: &mut impl BufMut) -> Result<(), NarWriteError> {
        if self.state != State::Directory {
            return Err(self.out_of_order("start an entry"));
        }
        if let Err(reason) = check_name(name) {
            return Err(NarWriteError::InvalidName {
                name: show(name),
                reason,
            });
        }
        if self.dirs.len() >= MAX_DEPTH {
            return Err(NarWriteError::TooDeep);
        }
        if let Some(previous) = self.dirs.last_mut() {
            if !previous.is_empty() && name <= previous.as_slice() {
                return Err(NarWriteError::NotSorted {
                    previous: show(previous),
                    name: show(name),
                });
            }
            previous.clear();
            previous.extend_from_slice(name);
        }
        put_str(out, b"entry");
        put_str(out, b"(");
        put_str(out, b"name");
        put_str(out, name);
        put_str(out, b"node");
        self.state = State::Node;
        Ok(())
    }

    /// Starts a regular file of `size` bytes; exactly that many bytes of
    /// [`NarWriter::contents`] must follow before [`NarWriter::end`].
    pub fn file(
        &mut self,
        executable: bool,
        size: u64,
        out: &mut impl BufMut,
    ) -> Result<(), NarWriteError> {
        self.open_node("start a file", b"regular", out)?;
        if executable {
            put_str(out, b"executable");
            put_str(out, b"");
        }
        put_str(out, b"contents");
        out.put_u64_le(size);
        self.state = State::File { size, written: 0 };
        Ok(())
    }

    /// Writes a piece of the current file's contents.
    pub fn contents(&mut self, chunk: &[u8], out: &mut impl BufMut) -> Result<(), NarWriteError> {
        self.contents_written_elsewhere(chunk.len() as u64)?;
        out.put_slice(chunk);
        Ok(())
    }

    /// Accounts for `len` bytes of the current file's contents that the caller wrote to the
    /// output itself, right after what this writer produced (say, moved with `splice`), with
    /// the same checks as [`NarWriter::contents`]; [`NarWriter::end`] then adds the padding.
    pub fn contents_written_elsewhere(&mut self, len: u64) -> Result<(), NarWriteError> {
        let State::File { size, written } = self.state else {
            return Err(self.out_of_order("write file contents"));
        };
        let written = written.saturating_add(len);
        if written > size {
            return Err(NarWriteError::SizeMismatch { size, written });
        }
        self.state = State::File { size, written };
        Ok(())
    }

    /// Writes a symlink node (closed by [`NarWriter::end`]).
    pub fn symlink(&mut self, target: &[u8], out: &mut impl BufMut) -> Result<(), NarWriteError> {
        if let Err(reason) = check_target(target) {
            return Err(NarWriteError::InvalidTarget {
                target: show(target),
                reason,
            });
        }
        self.open_node("write a symlink", b"symlink", out)?;
        put_str(out, b"target");
        put_str(out, target);
        self.state = State::Symlink;
        Ok(())
    }

    /// Closes the current node (and the entry holding it, if any).
    pub fn end(&mut self, out: &mut impl BufMut) -> Result<(), NarWriteError> {
        match self.state {
            State::File { size, written } if written == size => {
                out.put_bytes(0, padding(size));
            }
            State::File { size, written } => {
                return Err(NarWriteError::SizeMismatch { size, written })
            }
            State::Symlink => {}
            State::Directory => {
                self.dirs.pop();
            }
            State::Start | State::Node | State::Done => return Err(self.out_of_order("end a node")),
        }
        put_str(out, b")");
        if self.dirs.is_empty() {
            self.state = State::Done;
        } else {
            put_str(out, b")");
            self.state = State::Directory;
        }
        Ok(())
    }

    /// Writes what a [`NarEvent`] describes, so a reader's events can be re-serialised.
    /// [`NarEvent::End`] writes nothing and checks that the NAR is complete.
    pub fn event(
        &mut self,
        event: &NarEvent<'_>,
        out: &mut impl BufMut,
    ) -> Result<(), NarWriteError> {
        match *event {
            NarEvent::Directory => self.start_directory(out),
            NarEvent::Entry { name } => self.entry(name, out),
            NarEvent::Symlink { target } => self.symlink(target, out),
            NarEvent::File { executable, size } => self.file(executable, size, out),
            NarEvent::Contents(chunk) => self.contents(chunk, out),
            NarEvent::EndNode => self.end(out),
            NarEvent::End if self.is_complete() => Ok(()),
            NarEvent::End => Err(self.out_of_order("finish the NAR")),
        }
    }
}
