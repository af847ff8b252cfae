//! The layouts of the serve requests (docs/serve-protocol.md §4, §5.1) and of an ImportPaths
//! entry's trailer, for the [`Framer`] that finds where each ends without decoding it.

use std::borrow::Cow;

pub(crate) use crate::framer::Framer;
use crate::framer::{Field, Layout, Len};

use super::request::Opcode;
use super::ProtocolVersion;

use Field::{List, Signature, Str, U64s};
use Len::{Long, Short};

/// A path and its metadata as AddToStoreNar sends them (also the worker protocol's
/// AddToStoreNar and each path of its AddMultipleToStore): path, deriver, narHash,
/// references, registrationTime, narSize, ultimate, sigs, ca.
pub(crate) const PATH_INFO: &[Field] = &[
    Str(Short),
    Str(Short),
    Str(Short),
    List(1, Short),
    U64s(3),
    List(1, Short),
    Str(Short),
];

/// BuildDerivation's path and BasicDerivation, as both protocols send them: drvPath, outputs,
/// inputSrcs, platform, builder, args, env (the build settings that follow differ).
pub(crate) const BUILD_DERIVATION: &[Field] = &[
    Str(Short),
    List(4, Short),
    List(1, Short),
    Str(Short),
    Str(Long),
    List(1, Long),
    List(2, Long),
];

/// An ImportPaths entry's trailer after its NAR: magic, path, references, deriver, signature.
const TRAILER: &[Field] = &[U64s(1), Str(Short), List(1, Short), Str(Short), Signature];

/// The fields after the opcode, in wire order (docs/serve-protocol.md §4, §5.1).
fn fields(op: Opcode, v: ProtocolVersion) -> Layout {
    let options = U64s(options_len(v));
    Cow::Borrowed(match op {
        Opcode::QueryValidPaths => &[U64s(2), List(1, Short)],
        Opcode::QueryPathInfos => &[List(1, Short)],
        Opcode::DumpStorePath => &[Str(Short)],
        Opcode::ImportPaths => &[],
        Opcode::ExportPaths | Opcode::QueryClosure => &[U64s(1), List(1, Short)],
        Opcode::BuildPaths => return Cow::Owned(vec![List(1, Short), options]),
        // drvPath, the BasicDerivation, options
        Opcode::BuildDerivation => return Cow::Owned([BUILD_DERIVATION, &[options]].concat()),
        Opcode::AddToStoreNar => PATH_INFO,
    })
}

/// Number of u64s in the BuildOptions of version `v` (docs/serve-protocol.md §5.2).
fn options_len(v: ProtocolVersion) -> usize {
    2 + usize::from(v >= ProtocolVersion::V2_2)
        + 2 * usize::from(v >= ProtocolVersion::V2_3)
        + usize::from(v >= ProtocolVersion::V2_7)
}

/// The layout of the request whose opcode is `n`, or `None` when the decoder will refuse it
/// (an unknown opcode, or a command that needs `--write` on a read-only session).
pub(crate) fn layout(n: u64, v: ProtocolVersion, write_allowed: bool) -> Option<Layout> {
    match Opcode::from_wire(n) {
        Ok(op) if op.check_write(write_allowed).is_ok() => Some(fields(op, v)),
        _ => None,
    }
}

/// Steps `framer` over what `input` allows of a serve request of version `v` (see
/// [`Framer::advance`]).
pub(crate) fn advance(
    framer: &mut Framer,
    input: &[u8],
    v: ProtocolVersion,
    limits: &super::Limits,
    write_allowed: bool,
) -> bool {
    framer.advance(input, &limits.wire, |n| layout(n, v, write_allowed))
}

/// A scan for the end of an export trailer (ImportPaths), from its first byte.
pub(crate) fn trailer() -> Framer {
    Framer::with_layout(TRAILER)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::serve::strategies::{export_trailer, request, version};
    use crate::serve::{Limits, Request};
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
            while !advance(&mut f, &b[..end], v, &limits, true) {
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
            let mut f = trailer();
            let mut end = 0;
            while !advance(&mut f, &b[..end], v, &limits, false) {
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
        assert!(advance(&mut Framer::default(), &b, v, &limits, false));
        let err = Request::decode(&b, v, &limits).unwrap_err().to_string();
        assert!(err.contains("path"), "{err}");
        // AddToStoreNar (9): the path, then a deriver over the short limit.
        let mut b = 9u64.to_le_bytes().to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(limits.wire.max_short_string_len as u64 + 1).to_le_bytes());
        assert!(advance(&mut Framer::default(), &b, v, &limits, true));
        assert!(Request::decode(&b, v, &limits).is_err());
        // A string at exactly the short limit is waited for, not refused.
        let b = claim(3, limits.wire.max_short_string_len as u64);
        assert!(!advance(&mut Framer::default(), &b, v, &limits, false));
        // BuildDerivation (8): the builder may be long, and is waited for.
        let mut b = claim(8, 0);
        for _ in 0..2 {
            b.extend_from_slice(&0u64.to_le_bytes()); // no outputs, no inputSrcs
        }
        b.extend_from_slice(&0u64.to_le_bytes()); // platform ""
        b.extend_from_slice(&(16u64 << 20).to_le_bytes()); // builder: 16 MiB to come
        assert!(!advance(&mut Framer::default(), &b, v, &limits, true));
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
        assert!(advance(&mut Framer::default(), &b, v, &limits, false));
        assert!(Request::decode(&b, v, &limits).is_err());
        let mut b = b[..24].to_vec();
        b.extend_from_slice(&10u64.to_le_bytes());
        assert!(!advance(&mut Framer::default(), &b, v, &limits, false));
    }

    #[test]
    fn an_oversized_trailer_path_fails_after_its_length_prefix() {
        let limits = Limits::default();
        let mut b = crate::serve::export::EXPORT_MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&(16u64 << 20).to_le_bytes());
        let v = ProtocolVersion::V2_7;
        assert!(advance(&mut trailer(), &b, v, &limits, false));
        assert!(crate::serve::ExportTrailer::decode(&b, &limits.wire).is_err());
    }

    #[test]
    fn limits_and_refusals_end_the_scan_early() {
        let limits = Limits::default();
        let v = ProtocolVersion::V2_7;
        let mut b = 3u64.to_le_bytes().to_vec();
        b.extend_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(advance(&mut Framer::default(), &b, v, &limits, true));
        assert!(Request::decode(&b, v, &limits).is_err());
        assert!(advance(
            &mut Framer::default(),
            &13u64.to_le_bytes(),
            v,
            &limits,
            true
        ));
        assert!(advance(
            &mut Framer::default(),
            &9u64.to_le_bytes(),
            v,
            &limits,
            false
        ));
        assert!(!advance(
            &mut Framer::default(),
            &9u64.to_le_bytes(),
            v,
            &limits,
            true
        ));
        let mut b = 2u64.to_le_bytes().to_vec();
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(advance(&mut Framer::default(), &b, v, &limits, true));
    }
}
