//! A small in-memory NAR tree, for tests, fuzzing and proptest strategies.

use super::{NarError, NarEvent, NarReader, NarWriteError, NarWriter};
use std::collections::BTreeMap;

/// A file system object as a NAR records it. `BTreeMap` keeps entries in the bytewise order
/// the NAR requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarNode {
    /// A regular file.
    File {
        /// Whether the owner-execute bit is set.
        executable: bool,
        /// The file's bytes.
        contents: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points (not resolved).
        target: Vec<u8>,
    },
    /// A directory, by entry name.
    Directory(BTreeMap<Vec<u8>, NarNode>),
}

impl NarNode {
    /// The canonical NAR of this tree. Fails only for names or targets the NAR forbids (or a
    /// tree nested too deep).
    pub fn to_nar(&self) -> Result<Vec<u8>, NarWriteError> {
        let mut out = Vec::new();
        self.write(&mut NarWriter::new(), &mut out)?;
        Ok(out)
    }

    /// Writes this node through `writer`.
    pub fn write(&self, writer: &mut NarWriter, out: &mut Vec<u8>) -> Result<(), NarWriteError> {
        match self {
            NarNode::File {
                executable,
                contents,
            } => {
                writer.file(*executable, contents.len() as u64, out)?;
                writer.contents(contents, out)?;
            }
            NarNode::Symlink { target } => writer.symlink(target, out)?,
            NarNode::Directory(entries) => {
                writer.start_directory(out)?;
                for (name, node) in entries {
                    writer.entry(name, out)?;
                    node.write(writer, out)?;
                }
            }
        }
        writer.end(out)
    }

    /// Parses a complete NAR, which must fill `nar` exactly.
    pub fn from_nar(nar: &[u8]) -> Result<NarNode, NarError> {
        let mut builder = TreeBuilder::default();
        let mut reader = NarReader::new();
        let mut pos = 0;
        loop {
            let offset = reader.offset();
            match reader.feed(&nar[pos..])? {
                (n, Some(NarEvent::End)) => {
                    pos += n;
                    if pos < nar.len() {
                        return Err(NarError::TrailingData {
                            offset: reader.offset(),
                            len: nar.len() - pos,
                        });
                    }
                    // `End` comes only after the root closed, which set `root`.
                    return builder.root.ok_or(NarError::Incomplete { offset });
                }
                (n, Some(event)) => {
                    pos += n;
                    builder.event(event);
                }
                (_, None) => {
                    return Err(NarError::Incomplete {
                        offset: reader.offset(),
                    })
                }
            }
        }
    }
}

/// A node whose events are still arriving.
enum Open {
    Directory(BTreeMap<Vec<u8>, NarNode>),
    File(bool, Vec<u8>),
    Symlink(Vec<u8>),
}

/// Assembles a tree from an event sequence the reader has checked.
#[derive(Default)]
struct TreeBuilder {
    /// Open nodes, each with the name it will have in its parent.
    stack: Vec<(Vec<u8>, Open)>,
    /// The name of the entry whose node comes next.
    name: Vec<u8>,
    /// The completed root.
    root: Option<NarNode>,
}

impl TreeBuilder {
    fn event(&mut self, event: NarEvent<'_>) {
        let open = match event {
            NarEvent::Entry { name } => {
                self.name = name.to_vec();
                return;
            }
            NarEvent::Contents(chunk) => {
                if let Some((_, Open::File(_, contents))) = self.stack.last_mut() {
                    contents.extend_from_slice(chunk);
                }
                return;
            }
            NarEvent::EndNode => {
                self.close();
                return;
            }
            NarEvent::End => return,
            NarEvent::Directory => Open::Directory(BTreeMap::new()),
            NarEvent::File { executable, .. } => Open::File(executable, Vec::new()),
            NarEvent::Symlink { target } => Open::Symlink(target.to_vec()),
        };
        self.stack.push((std::mem::take(&mut self.name), open));
    }

    fn close(&mut self) {
        let Some((name, open)) = self.stack.pop() else {
            return;
        };
        let node = match open {
            Open::Directory(entries) => NarNode::Directory(entries),
            Open::File(executable, contents) => NarNode::File {
                executable,
                contents,
            },
            Open::Symlink(target) => NarNode::Symlink { target },
        };
        match self.stack.last_mut() {
            Some((_, Open::Directory(entries))) => {
                entries.insert(name, node);
            }
            _ => self.root = Some(node),
        }
    }
}
