//! Finding where a request ends without decoding it, resumably, so that [`super::ServerSession`]
//! decodes each request once, when all of it is there, however many pieces it arrives in.
//!
//! A request's layout is a short list of [`Field`]s: enough to step over it by its length
//! prefixes. [`Framer::advance`] remembers how far it got, so each input byte is looked at
//! once. Anything it cannot step over (an unknown opcode, a command refused without `--write`,
//! a length or count over the limits) ends the scan early and leaves the error to the decoder,
//! as soon as the offending length or count is in: strings that are short by nature (store
//! paths, output names, hashes, content addresses, signatures) are held to
//! `max_short_string_len`, so a bogus multi-MiB "path" is refused after its 8-byte prefix.
//! The trailer of an ImportPaths entry is framed the same way ([`Framer::trailer`]).

use super::request::Opcode;
use super::{Limits, ProtocolVersion};
use crate::wire::padding;

/// The shape of one part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// `n` plain u64s.
    U64s(usize),
    /// The BuildOptions, whose length depends on the version.
    Options,
    /// One string.
    Str(Len),
    /// A count, then `count × n` strings (a list, a set, or a map with `n - 1` values).
    List(u64, Len),
    /// The legacy signature of an export trailer: a flag, and a string when it is 1.
    Signature,
}

/// Which limit a string is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Len {
    /// `max_short_string_len`: store paths, names, hashes, content addresses, signatures.
    Short,
    /// `max_string_len`: builder, arguments, environment.
    Long,
}

use Field::{List, Options, Signature, Str, U64s};
use Len::{Long, Short};

/// An ImportPaths entry's trailer after its NAR: magic, path, references, deriver, signature.
const TRAILER: &[Field] = &[U64s(1), Str(Short), List(1, Short), Str(Short), Signature];

/// The fields after the opcode, in wire order (docs/serve-protocol.md §4, §5.1).
fn layout(op: Opcode) -> &'static [Field] {
    match op {
        Opcode::QueryValidPaths => &[U64s(2), List(1, Short)],
        Opcode::QueryPathInfos => &[List(1, Short)],
        Opcode::DumpStorePath => &[Str(Short)],
        Opcode::ImportPaths => &[],
        Opcode::ExportPaths | Opcode::QueryClosure => &[U64s(1), List(1, Short)],
        Opcode::BuildPaths => &[List(1, Short), Options],
        // drvPath, outputs, inputSrcs, platform, builder, args, env, options
        Opcode::BuildDerivation => &[
            Str(Short),
            List(4, Short),
            List(1, Short),
            Str(Short),
            Str(Long),
            List(1, Long),
            List(2, Long),
            Options,
        ],
        // path, deriver, narHash, references, registrationTime, narSize, ultimate, sigs, ca
        Opcode::AddToStoreNar => &[
            Str(Short),
            Str(Short),
            Str(Short),
            List(1, Short),
            U64s(3),
            List(1, Short),
            Str(Short),
        ],
    }
}

/// Number of u64s in the BuildOptions of version `v` (docs/serve-protocol.md §5.2).
fn options_len(v: ProtocolVersion) -> usize {
    2 + usize::from(v >= ProtocolVersion::V2_2)
        + 2 * usize::from(v >= ProtocolVersion::V2_3)
        + usize::from(v >= ProtocolVersion::V2_7)
}

/// A resumable scan for the end of the request at the start of the input.
#[derive(Debug, Clone, Default)]
pub(crate) struct Framer {
    /// Bytes of the request stepped over so far.
    pos: usize,
    /// The layout, once the opcode is in.
    fields: Option<&'static [Field]>,
    /// The field being stepped over.
    field: usize,
    /// Strings left in the current list, once its count is in.
    left: Option<u64>,
}

impl Framer {
    /// A scan for the end of an export trailer (ImportPaths), from its first byte.
    pub(crate) fn trailer() -> Self {
        Framer {
            fields: Some(TRAILER),
            ..Framer::default()
        }
    }

    /// Steps over what `input` (the request's bytes so far, from its first byte) allows.
    /// Returns true when the whole request is present, or when the decoder should run anyway
    /// because it will fail; false when more bytes are needed.
    pub(crate) fn advance(
        &mut self,
        input: &[u8],
        v: ProtocolVersion,
        limits: &Limits,
        write_allowed: bool,
    ) -> bool {
        let fields = match self.fields {
            Some(f) => f,
            None => {
                let Some(n) = u64_at(input, 0) else {
                    return false;
                };
                let op = match Opcode::from_wire(n) {
                    Ok(op) if op.check_write(write_allowed).is_ok() => op,
                    _ => return true,
                };
                self.pos = 8;
                *self.fields.insert(layout(op))
            }
        };
        while let Some(&field) = fields.get(self.field) {
            let step = match field {
                U64s(n) => Step::Skip(8 * n),
                Options => Step::Skip(8 * options_len(v)),
                Str(len) => string_len(input, self.pos, len, limits),
                Signature => match u64_at(input, self.pos) {
                    None => Step::Wait,
                    Some(1) => match string_len(input, self.pos + 8, Long, limits) {
                        Step::Skip(n) => Step::Skip(8 + n),
                        other => other,
                    },
                    Some(_) => Step::Skip(8),
                },
                List(per_item, len) => match self.left {
                    Some(0) => {
                        self.left = None;
                        Step::Skip(0)
                    }
                    Some(left) => match string_len(input, self.pos, len, limits) {
                        Step::Skip(n) if self.pos + n <= input.len() => {
                            self.pos += n;
                            self.left = Some(left - 1);
                            continue;
                        }
                        other => other,
                    },
                    None => match u64_at(input, self.pos) {
                        None => Step::Wait,
                        Some(count) if count > limits.wire.max_list_len as u64 => Step::Fail,
                        Some(count) => {
                            self.pos += 8;
                            self.left = Some(count.saturating_mul(per_item));
                            continue;
                        }
                    },
                },
            };
            match step {
                Step::Fail => return true,
                Step::Skip(n) if self.pos + n <= input.len() => {
                    self.pos += n;
                    self.field += 1;
                }
                Step::Skip(_) | Step::Wait => return false,
            }
        }
        true
    }
}

/// What the next item needs.
enum Step {
    /// It is this many bytes long.
    Skip(usize),
    /// Its length is not in yet.
    Wait,
    /// It breaks a limit; the decoder will report it.
    Fail,
}

fn u64_at(input: &[u8], pos: usize) -> Option<u64> {
    let b = input.get(pos..pos + 8)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// The wire length of the string at `pos`, held to the limit of its kind.
fn string_len(input: &[u8], pos: usize, kind: Len, limits: &Limits) -> Step {
    let max = match kind {
        Short => limits.wire.max_short_string_len,
        Long => limits.wire.max_string_len,
    };
    match u64_at(input, pos) {
        None => Step::Wait,
        Some(len) => match usize::try_from(len) {
            Ok(n) if n <= max => Step::Skip(8 + n + padding(n)),
            _ => Step::Fail,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::serve::strategies::{export_trailer, request, version};
    use crate::serve::Request;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn framer_finds_the_end_of_every_request_fed_in_any_pieces(
            (v, req) in version().prop_flat_map(|v| (Just(v), request(v))),
            piece in 1usize..64,
        ) {
            let mut b = Vec::new();
            req.encode(v, &mut b);
            let limits = Limits::default();
            let mut f = Framer::default();
            let mut end = 0;
            while !f.advance(&b[..end], v, &limits, true) {
                prop_assert!(end < b.len(), "not done at the end of the request");
                end = (end + piece).min(b.len());
            }
            prop_assert_eq!(end, b.len());
            prop_assert_eq!(f.pos, b.len());
        }
    }

    proptest! {
        #[test]
        fn framer_finds_the_end_of_every_trailer_fed_in_any_pieces(
            t in export_trailer(),
            piece in 1usize..64,
        ) {
            let mut b = Vec::new();
            t.encode(&mut b);
            let (v, limits) = (ProtocolVersion::V2_7, Limits::default());
            let mut f = Framer::trailer();
            let mut end = 0;
            while !f.advance(&b[..end], v, &limits, false) {
                prop_assert!(end < b.len(), "not done at the end of the trailer");
                end = (end + piece).min(b.len());
            }
            prop_assert_eq!(end, b.len());
            prop_assert_eq!(f.pos, b.len());
        }
    }

    /// `op`, then a string prefix claiming `len` bytes, and nothing of the string itself.
    fn claim(op: u64, len: u64) -> Vec<u8> {
        let mut b = op.to_le_bytes().to_vec();
        b.extend_from_slice(&len.to_le_bytes());
        b
    }

    #[test]
    fn an_oversized_path_fails_after_its_length_prefix() {
        let limits = Limits::default();
        let v = ProtocolVersion::V2_7;
        // DumpStorePath (3) with a 16 MiB "path": refused with 16 bytes in, not 16 MiB.
        let b = claim(3, 16 << 20);
        assert!(Framer::default().advance(&b, v, &limits, false));
        let err = Request::decode(&b, v, &limits).unwrap_err().to_string();
        assert!(err.contains("path"), "{err}");
        // AddToStoreNar (9): the path, then a deriver over the short limit.
        let mut b = 9u64.to_le_bytes().to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(limits.wire.max_short_string_len as u64 + 1).to_le_bytes());
        assert!(Framer::default().advance(&b, v, &limits, true));
        assert!(Request::decode(&b, v, &limits).is_err());
        // A string at exactly the short limit is waited for, not refused.
        let b = claim(3, limits.wire.max_short_string_len as u64);
        assert!(!Framer::default().advance(&b, v, &limits, false));
        // BuildDerivation (8): the builder may be long, and is waited for.
        let mut b = claim(8, 0);
        for _ in 0..2 {
            b.extend_from_slice(&0u64.to_le_bytes()); // no outputs, no inputSrcs
        }
        b.extend_from_slice(&0u64.to_le_bytes()); // platform ""
        b.extend_from_slice(&(16u64 << 20).to_le_bytes()); // builder: 16 MiB to come
        assert!(!Framer::default().advance(&b, v, &limits, true));
    }

    #[test]
    fn a_count_over_the_list_limit_fails_as_soon_as_it_is_read() {
        let mut limits = Limits::default();
        limits.wire.max_list_len = 10;
        let v = ProtocolVersion::V2_7;
        // QueryValidPaths (1): lock, substitute, then a count of 11 and no paths.
        let mut b = 1u64.to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&11u64.to_le_bytes());
        assert!(Framer::default().advance(&b, v, &limits, false));
        assert!(Request::decode(&b, v, &limits).is_err());
        let mut b = b[..24].to_vec();
        b.extend_from_slice(&10u64.to_le_bytes());
        assert!(!Framer::default().advance(&b, v, &limits, false));
    }

    #[test]
    fn an_oversized_trailer_path_fails_after_its_length_prefix() {
        let limits = Limits::default();
        let mut b = crate::serve::export::EXPORT_MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&(16u64 << 20).to_le_bytes());
        let v = ProtocolVersion::V2_7;
        assert!(Framer::trailer().advance(&b, v, &limits, false));
        assert!(crate::serve::ExportTrailer::decode(&b, &limits.wire).is_err());
    }

    #[test]
    fn limits_and_refusals_end_the_scan_early() {
        let limits = Limits::default();
        let v = ProtocolVersion::V2_7;
        let mut b = 3u64.to_le_bytes().to_vec();
        b.extend_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(Framer::default().advance(&b, v, &limits, true));
        assert!(Request::decode(&b, v, &limits).is_err());
        assert!(Framer::default().advance(&13u64.to_le_bytes(), v, &limits, true));
        assert!(Framer::default().advance(&9u64.to_le_bytes(), v, &limits, false));
        assert!(!Framer::default().advance(&9u64.to_le_bytes(), v, &limits, true));
        let mut b = 2u64.to_le_bytes().to_vec();
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Framer::default().advance(&b, v, &limits, true));
    }
}
