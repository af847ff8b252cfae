//! Reading a NAR while hashing it: the path every import takes.

use super::{NarError, NarEvent, NarReader};
use crate::hash::{Hash, HashAlgo, Hasher};

/// What a complete, valid NAR hashed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarSummary {
    /// sha256 of the NAR bytes (the `narHash`).
    pub nar_hash: Hash,
    /// Length of the NAR in bytes (the `narSize`).
    pub nar_size: u64,
}

/// Validates a NAR fed in chunks while computing its sha256 and size.
///
/// Each chunk is hashed once, in one piece, after the reader has walked it, so large file
/// contents cost the reader nothing but a bounds check.
#[derive(Debug)]
pub struct NarValidator {
    reader: NarReader,
    hasher: Hasher,
}

impl Default for NarValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl NarValidator {
    /// A validator expecting the start of a NAR.
    pub fn new() -> NarValidator {
        NarValidator {
            reader: NarReader::new(),
            hasher: Hasher::new(HashAlgo::Sha256),
        }
    }

    /// Feeds a chunk. Returns how many bytes belong to the NAR: all of `input` unless the NAR
    /// ended inside it, in which case the rest belongs to whatever follows the NAR.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, NarError> {
        self.feed_with(input, |_| Ok(()))
    }

    /// Like [`NarValidator::feed`], also handing every event to `on_event` (for example to
    /// unpack the NAR while it is checked). An error from `on_event` stops the feed.
    pub fn feed_with<E: From<NarError>>(
        &mut self,
        input: &[u8],
        mut on_event: impl FnMut(NarEvent<'_>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut pos = 0;
        let result = loop {
            match self.reader.feed(&input[pos..]) {
                Err(e) => break Err(E::from(e)),
                Ok((n, event)) => {
                    pos += n;
                    match event {
                        None | Some(NarEvent::End) => break Ok(()),
                        Some(event) => {
                            if let Err(e) = on_event(event) {
                                break Err(e);
                            }
                        }
                    }
                }
            }
        };
        // Hash what was consumed even on error, so `size` stays the reader's offset.
        self.hasher.update(&input[..pos]);
        result.map(|()| pos)
    }

    /// Whether the NAR is complete.
    pub fn is_complete(&self) -> bool {
        self.reader.is_complete()
    }

    /// The hash and size of the complete NAR, or [`NarError::Incomplete`].
    pub fn finish(self) -> Result<NarSummary, NarError> {
        if !self.reader.is_complete() {
            return Err(NarError::Incomplete {
                offset: self.reader.offset(),
            });
        }
        Ok(NarSummary {
            nar_size: self.reader.offset(),
            nar_hash: self.hasher.finish(),
        })
    }
}
