//! Finding where a request ends without decoding it, resumably, so that [`super::ServerSession`]
//! decodes each request once, when all of it is there, however many pieces it arrives in.
//!
//! A request's layout is a short list of [`Field`]s: enough to step over it by its length
//! prefixes. [`Framer::advance`] remembers how far it got, so each input byte is looked at
//! once. Anything it cannot step over (an unknown opcode, a command refused without `--write`,
//! a length or count over the limits) ends the scan early and leaves the error to the decoder.

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
    Str,
    /// A count, then `count × n` strings (a list, a set, or a map with `n - 1` values).
    List(u64),
}

use Field::{List, Options, Str, U64s};

/// The fields after the opcode, in wire order (spec §4, §5.1).
fn layout(op: Opcode) -> &'static [Field] {
    match op {
        Opcode::QueryValidPaths => &[U64s(2), List(1)],
        Opcode::QueryPathInfos => &[List(1)],
        Opcode::DumpStorePath => &[Str],
        Opcode::ImportPaths => &[],
        Opcode::ExportPaths | Opcode::QueryClosure => &[U64s(1), List(1)],
        Opcode::BuildPaths => &[List(1), Options],
        // drvPath, outputs, inputSrcs, platform, builder, args, env, options
        Opcode::BuildDerivation => &[Str, List(4), List(1), Str, Str, List(1), List(2), Options],
        // path, deriver, narHash, references, registrationTime, narSize, ultimate, sigs, ca
        Opcode::AddToStoreNar => &[Str, Str, Str, List(1), U64s(3), List(1), Str],
    }
}

/// Number of u64s in the BuildOptions of version `v` (spec §5.2).
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
                Str => string_len(input, self.pos, limits),
                List(per_item) => match self.left {
                    Some(0) => {
                        self.left = None;
                        Step::Skip(0)
                    }
                    Some(left) => match string_len(input, self.pos, limits) {
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

/// The wire length of the string at `pos`.
fn string_len(input: &[u8], pos: usize, limits: &Limits) -> Step {
    match u64_at(input, pos) {
        None => Step::Wait,
        Some(len) => match usize::try_from(len) {
            Ok(n) if n <= limits.wire.max_string_len => Step::Skip(8 + n + padding(n)),
            _ => Step::Fail,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::serve::strategies::{request, version};
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
