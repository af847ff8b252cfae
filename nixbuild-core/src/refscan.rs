//! Streaming reference scanning (docs/serve-protocol.md §10): which candidate store-path hash parts
//! occur in a byte stream (an output's NAR), with matches allowed to span chunk boundaries.

use crate::nixbase32::ALPHABET;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Length of a store path's hash part.
pub const HASH_PART_LEN: usize = 32;

/// Why a candidate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefScanError {
    /// A candidate that is not 32 nix32 characters.
    #[error("reference candidate `{candidate}` is not a 32-character nix32 hash part")]
    BadCandidate {
        /// The candidate, escaped.
        candidate: String,
    },
}

/// `IS_NIX32[b]` is true for the bytes of the nix32 alphabet.
const IS_NIX32: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = true;
        i += 1;
    }
    table
};

/// Hashes a candidate by its first eight characters, mixed: hash parts are digests, so those
/// carry 40 random bits, and the lookup runs at every position of a long nix32 run (a file
/// listing store paths has many), where SipHash over 32 bytes would dominate.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        // The murmur3 64-bit finaliser: every input bit reaches the low bits (the bucket
        // index) and the high bits (the tag).
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        // The map hashes `[u8; 32]` keys, which arrive here in one call; the length prefix
        // arrives through `write_usize` and is ignored.
        let mut prefix = [0u8; 8];
        let n = bytes.len().min(8);
        prefix[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(prefix);
    }

    fn write_usize(&mut self, _len: usize) {}
}

type CandidateMap = HashMap<[u8; HASH_PART_LEN], usize, BuildHasherDefault<PrefixHasher>>;

/// Finds which of a set of hash parts occur in a stream fed in chunks of any size.
#[derive(Debug, Clone)]
pub struct RefScanner {
    /// Candidate → its index in `found`.
    candidates: CandidateMap,
    found: Vec<bool>,
    remaining: usize,
    /// The last `HASH_PART_LEN - 1` bytes seen (fewer at the start), for matches that span
    /// chunks.
    tail: Vec<u8>,
}

impl RefScanner {
    /// A scanner for these hash parts (duplicates are merged).
    pub fn new<I, S>(hash_parts: I) -> Result<RefScanner, RefScanError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut candidates = CandidateMap::default();
        for part in hash_parts {
            let part = part.as_ref();
            let key: [u8; HASH_PART_LEN] = match part.try_into() {
                Ok(key) if part.iter().all(|&b| IS_NIX32[usize::from(b)]) => key,
                _ => {
                    return Err(RefScanError::BadCandidate {
                        candidate: part.escape_ascii().to_string(),
                    })
                }
            };
            let next = candidates.len();
            candidates.entry(key).or_insert(next);
        }
        let n = candidates.len();
        Ok(RefScanner {
            candidates,
            found: vec![false; n],
            remaining: n,
            tail: Vec::with_capacity(2 * HASH_PART_LEN),
        })
    }

    /// Scans the next chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.remaining == 0 || chunk.is_empty() {
            return;
        }
        // Windows that start in the tail and end in this chunk.
        let joined = self.tail.len();
        self.tail
            .extend_from_slice(&chunk[..chunk.len().min(HASH_PART_LEN - 1)]);
        let boundary = std::mem::take(&mut self.tail);
        if joined > 0 {
            self.scan(&boundary);
        }
        self.scan(chunk);
        // Keep the last HASH_PART_LEN - 1 bytes of everything seen so far.
        let keep = HASH_PART_LEN - 1;
        self.tail = boundary;
        if chunk.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }

    /// Records every candidate that occurs entirely inside `buf`.
    ///
    /// Checks each window from its last byte backwards: a byte outside the nix32 alphabet at
    /// offset `j` rules out every window containing it, so the scan jumps past it. In binary
    /// data this visits about one byte in 32.
    fn scan(&mut self, buf: &[u8]) {
        let mut i = 0;
        while i + HASH_PART_LEN <= buf.len() {
            let window = &buf[i..i + HASH_PART_LEN];
            match window.iter().rposition(|&b| !IS_NIX32[usize::from(b)]) {
                Some(j) => i += j + 1,
                None => {
                    self.check(window);
                    i += 1;
                }
            }
        }
    }

    fn check(&mut self, window: &[u8]) {
        let Ok(key) = <[u8; HASH_PART_LEN]>::try_from(window) else {
            return;
        };
        if let Some(&index) = self.candidates.get(&key) {
            if !self.found[index] {
                self.found[index] = true;
                self.remaining -= 1;
            }
        }
    }

    /// The candidates seen so far, in bytewise order.
    pub fn found(&self) -> Vec<&[u8]> {
        let mut out: Vec<&[u8]> = self
            .candidates
            .iter()
            .filter(|(_, &i)| self.found[i])
            .map(|(k, _)| k.as_slice())
            .collect();
        out.sort_unstable();
        out
    }

    /// Whether every candidate has been seen (more input cannot change the result).
    pub fn all_found(&self) -> bool {
        self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
    const B: &[u8; 32] = b"vxjiwkjkn7x4079qvh1jkl5pn05j2aw0";

    fn scan_chunked(cands: &[&[u8]], data: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut s = RefScanner::new(cands).expect("valid candidates");
        let mut start = 0;
        let mut sizes = sizes.iter().copied().filter(|&n| n > 0).cycle();
        while start < data.len() {
            let end = sizes
                .next()
                .map_or(data.len(), |n| (start + n).min(data.len()));
            s.feed(&data[start..end]);
            start = end;
        }
        s.found().into_iter().map(<[u8]>::to_vec).collect()
    }

    /// The obvious definition: every 32-byte window of the whole input.
    fn naive(cands: &[&[u8]], data: &[u8]) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = cands
            .iter()
            .filter(|c| data.windows(HASH_PART_LEN).any(|w| w == **c))
            .map(|c| c.to_vec())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn finds_references_in_a_nar_like_stream() {
        let mut data = b"\x00\x01/nix/store/".to_vec();
        data.extend_from_slice(B);
        data.extend_from_slice(b"-foo/bin\nxx");
        data.extend_from_slice(&A[..31]); // almost A
        for size in 1..=data.len() {
            assert_eq!(
                scan_chunked(&[A, B], &data, &[size]),
                vec![B.to_vec()],
                "{size}"
            );
        }
    }

    #[test]
    fn match_after_a_longer_nix32_run_and_overlapping_candidates() {
        // The candidate is the suffix of a 40-character nix32 run: the backward check must
        // still try every start position inside the run.
        let mut data = b"abcdfghi".to_vec();
        data.extend_from_slice(A);
        assert_eq!(scan_chunked(&[A], &data, &[7]), vec![A.to_vec()]);
        let shifted: Vec<u8> = A[1..].iter().chain(b"0").copied().collect();
        let mut data = A.to_vec();
        data.push(b'0');
        let mut want = vec![A.to_vec(), shifted.clone()];
        want.sort();
        assert_eq!(scan_chunked(&[A, &shifted], &data, &[3, 5]), want);
    }

    #[test]
    fn rejects_bad_candidates() {
        assert!(RefScanner::new([b"short".as_slice()]).is_err());
        let mut bad = *A;
        bad[5] = b'e'; // not in the nix32 alphabet
        assert_eq!(
            RefScanner::new([bad]).map(|_| ()),
            Err(RefScanError::BadCandidate {
                candidate: String::from_utf8(bad.to_vec()).expect("ascii")
            })
        );
    }

    #[test]
    fn all_found_stops_early() {
        let mut s = RefScanner::new([A]).expect("valid");
        assert!(!s.all_found());
        s.feed(A);
        assert!(s.all_found());
        s.feed(B);
        assert_eq!(s.found(), vec![A.as_slice()]);
    }

    fn arb_data() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>)> {
        // Candidates drawn from a tiny alphabet so they overlap and nearly match often.
        let cand = proptest::collection::vec(prop::sample::select(b"01a".to_vec()), 32);
        proptest::collection::vec(cand, 1..4).prop_flat_map(|cands| {
            let pieces = prop_oneof![
                prop::sample::select(cands.clone()),
                proptest::collection::vec(prop::sample::select(b"01a/\x00e".to_vec()), 0..40),
            ];
            (
                Just(cands),
                proptest::collection::vec(pieces, 0..8).prop_map(|p| p.concat()),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn chunked_scan_equals_whole_buffer_scan(
            (cands, data) in arb_data(),
            sizes in proptest::collection::vec(1usize..70, 1..6),
        ) {
            let cands: Vec<&[u8]> = cands.iter().map(Vec::as_slice).collect();
            let want = naive(&cands, &data);
            prop_assert_eq!(scan_chunked(&cands, &data, &[data.len().max(1)]), want.clone());
            prop_assert_eq!(scan_chunked(&cands, &data, &sizes), want);
        }
    }
}
