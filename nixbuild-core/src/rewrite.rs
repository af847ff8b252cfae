//! Replacing store path hash parts in a byte stream, as Nix does with the outputs of a
//! floating content-addressed derivation: the builder wrote a temporary path's hash part
//! wherever the output refers to itself, and the final path is only known once the output
//! has been hashed *modulo* that hash part ([`HashModulo`], Nix's `HashModuloSink`); then
//! every occurrence is rewritten to the final hash part ([`Rewriter`], Nix's
//! `RewritingSink`). Replacements have the length of what they replace, so a NAR or a file
//! keeps its size and layout.

use crate::hash::{Hash, HashAlgo, Hasher};

/// Why a rewrite was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// A replacement of another length than what it replaces, or an empty pattern.
    #[error("cannot rewrite {from:?} to {to:?}: both must have the same, non-zero length")]
    Length {
        /// What would be replaced.
        from: String,
        /// The replacement.
        to: String,
    },
}

/// Rewrites every occurrence of each pattern to its replacement, over a stream fed in any
/// chunks: the output does not depend on where the chunks end. Patterns are applied one
/// after the other over the buffered text, as Nix's `rewriteStrings`.
#[derive(Debug, Clone)]
pub struct Rewriter {
    rewrites: Vec<(Vec<u8>, Vec<u8>)>,
    /// The longest pattern's length.
    longest: usize,
    /// Bytes held back: the tail of what was fed, where a pattern may still begin.
    held: Vec<u8>,
    /// Stream offset of `held`'s first byte: bytes handed out so far.
    pos: u64,
    /// Stream offsets at which a pattern was found, in order.
    matches: Vec<u64>,
}

impl Rewriter {
    /// A rewriter of each `(from, to)`; each `to` must be as long as its `from`.
    pub fn new<'a>(
        rewrites: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Rewriter, RewriteError> {
        let mut list = Vec::new();
        for (from, to) in rewrites {
            if from.is_empty() || from.len() != to.len() {
                return Err(RewriteError::Length {
                    from: String::from_utf8_lossy(from).into_owned(),
                    to: String::from_utf8_lossy(to).into_owned(),
                });
            }
            list.push((from.to_vec(), to.to_vec()));
        }
        let longest = list.iter().map(|(f, _)| f.len()).max().unwrap_or(0);
        Ok(Rewriter {
            rewrites: list,
            longest,
            held: Vec::new(),
            pos: 0,
            matches: Vec::new(),
        })
    }

    /// Feeds `data`; appends the rewritten bytes that are final to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.held.extend_from_slice(data);
        for (from, to) in &self.rewrites {
            let mut at = 0;
            while let Some(i) = memchr::memmem::find(&self.held[at..], from) {
                let start = at + i;
                self.matches.push(self.pos + start as u64);
                self.held[start..start + from.len()].copy_from_slice(to);
                at = start + from.len();
            }
        }
        // A pattern that begins in the last `longest - 1` bytes may continue in the next
        // chunk; everything before is final.
        let keep = self.longest.saturating_sub(1).min(self.held.len());
        let ready = self.held.len() - keep;
        out.extend_from_slice(&self.held[..ready]);
        self.held.drain(..ready);
        self.pos += ready as u64;
    }

    /// Appends what is held back to `out`: the stream has ended.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.pos += self.held.len() as u64;
        out.append(&mut self.held);
    }

    /// The stream offsets at which a pattern was found so far.
    pub fn matches(&self) -> &[u64] {
        &self.matches
    }
}

/// The hash of a stream *modulo* a hash part (Nix's `HashModuloSink`): every occurrence of
/// `modulus` is hashed as NUL bytes, so that the hash does not depend on which hash part the
/// data referred to itself with.
///
/// This is current Nix's hash (since 2.17). Nix 2.4 to 2.16 also hashed the offset of each
/// occurrence (`|<offset>`) after the data; Nix 2.17 made its rewriting sink take several
/// rewrites and stopped recording the offsets, so the same self-referring output has
/// another content address under those versions, and they refuse such a path built by any
/// current Nix ("ca hash mismatch").
#[derive(Debug, Clone)]
pub struct HashModulo {
    rewriter: Rewriter,
    hasher: Hasher,
    buf: Vec<u8>,
}

impl HashModulo {
    /// Hashes with `algo`, modulo `modulus` (a store path's hash part).
    pub fn new(algo: HashAlgo, modulus: &[u8]) -> Result<HashModulo, RewriteError> {
        let zeros = vec![0u8; modulus.len()];
        Ok(HashModulo {
            rewriter: Rewriter::new([(modulus, &zeros[..])])?,
            hasher: Hasher::new(algo),
            buf: Vec::new(),
        })
    }

    /// Hashes `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.buf.clear();
        self.rewriter.feed(data, &mut self.buf);
        self.hasher.update(&self.buf);
    }

    /// The hash; and whether the modulus occurred at all (a self-reference).
    pub fn finish(mut self) -> (Hash, bool) {
        self.buf.clear();
        self.rewriter.finish(&mut self.buf);
        self.hasher.update(&self.buf);
        (self.hasher.finish(), !self.rewriter.matches().is_empty())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rewrite_chunks(rw: &mut Rewriter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            rw.feed(c, &mut out);
        }
        rw.finish(&mut out);
        out
    }

    #[test]
    fn rewrites_across_chunk_boundaries_and_records_offsets() {
        let mut rw = Rewriter::new([(&b"abcd"[..], &b"WXYZ"[..])]).unwrap();
        let out = rewrite_chunks(&mut rw, &[b"xxab", b"cdyyabc", b"d", b"ab"]);
        assert_eq!(out, b"xxWXYZyyWXYZab");
        assert_eq!(rw.matches(), [2, 8]);
    }

    #[test]
    fn unequal_lengths_are_refused() {
        assert!(matches!(
            Rewriter::new([(&b"ab"[..], &b"abc"[..])]),
            Err(RewriteError::Length { .. })
        ));
        assert!(Rewriter::new([(&b""[..], &b""[..])]).is_err());
    }

    #[test]
    fn hash_modulo_is_the_hash_of_the_zeroed_stream() {
        let (h, found) = {
            let mut m = HashModulo::new(HashAlgo::Sha256, b"abcd").unwrap();
            m.update(b"xxab");
            m.update(b"cdyy");
            m.finish()
        };
        assert!(found);
        assert_eq!(h, Hash::compute(HashAlgo::Sha256, b"xx\0\0\0\0yy"));
        // Another hash part in the same place hashes the same.
        let mut m = HashModulo::new(HashAlgo::Sha256, b"efgh").unwrap();
        m.update(b"xxefghyy");
        assert_eq!(m.finish(), (h, true));
        // Without the modulus: the plain hash.
        let mut m = HashModulo::new(HashAlgo::Sha256, b"abcd").unwrap();
        m.update(b"xx");
        assert_eq!(m.finish(), (Hash::compute(HashAlgo::Sha256, b"xx"), false));
    }

    proptest! {
        #[test]
        fn chunking_does_not_change_the_result(
            text in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c')], 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let mut whole = Rewriter::new([(&b"abca"[..], &b"zzzz"[..]), (&b"cc"[..], &b"yy"[..])]).unwrap();
            let expected = rewrite_chunks(&mut whole, &[&text]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts {
                chunks.push(&text[last..c]);
                last = c;
            }
            chunks.push(&text[last..]);
            let mut parts = Rewriter::new([(&b"abca"[..], &b"zzzz"[..]), (&b"cc"[..], &b"yy"[..])]).unwrap();
            prop_assert_eq!(rewrite_chunks(&mut parts, &chunks), expected);
            // Each chunk lists its matches pattern by pattern: the same offsets, in another
            // order than the whole text's.
            let sorted = |r: &Rewriter| {
                let mut m = r.matches().to_vec();
                m.sort_unstable();
                m
            };
            prop_assert_eq!(sorted(&parts), sorted(&whole));
        }
    }
}
