//! Spec vectors (§13.2, §13.3), error cases, and proptest round trips for every message at
//! every version.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::strategies::*;
use super::*;
use crate::content_address::ContentAddress;
use crate::hash::Hash;
use crate::store_path::StorePath;
use crate::wire::{BufMutExt, Reader};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s
        .lines()
        .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest))
        .collect::<Vec<_>>()
        .join("")
        .split_whitespace()
        .collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

const FOO: &str = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";

fn foo() -> StorePath {
    StorePath::from_absolute_path(FOO.as_bytes()).unwrap()
}

const V: ProtocolVersion = ProtocolVersion::V2_7;

fn encode_request(r: &Request, v: ProtocolVersion) -> Vec<u8> {
    let mut b = Vec::new();
    r.encode(v, &mut b);
    b
}

fn encode_response(r: &Response, v: ProtocolVersion) -> Vec<u8> {
    let mut b = Vec::new();
    r.encode(v, &mut b);
    b
}

const QVP_13_2: &str = "
0000: 0100000000000000 0000000000000000
0010: 0000000000000000 0100000000000000
0020: 2f00000000000000 2f6e69782f73746f
0030: 72652f76786a6977 6b6a6b6e37783430
0040: 3739717668316a6b 6c35706e30356a32
0050: 6177302d666f6f00";

#[test]
fn spec_13_2_query_valid_paths() {
    let bytes = hex(QVP_13_2);
    assert_eq!(bytes.len(), 88);
    let req = Request::QueryValidPaths {
        lock: false,
        substitute: false,
        paths: BTreeSet::from([foo()]),
    };
    assert_eq!(
        Request::decode(&bytes, V, &Limits::default()),
        Ok(Some((req.clone(), 88)))
    );
    assert_eq!(encode_request(&req, V), bytes);

    let valid = hex("
0000: 0100000000000000 2f00000000000000
0010: 2f6e69782f73746f 72652f76786a6977
0020: 6b6a6b6e37783430 3739717668316a6b
0030: 6c35706e30356a32 6177302d666f6f00");
    let resp = Response::ValidPaths(BTreeSet::from([foo()]));
    assert_eq!(encode_response(&resp, V), valid);
    assert_eq!(
        Response::decode(Opcode::QueryValidPaths, &valid, V, &Limits::default()),
        Ok(Some((resp, 64)))
    );
    let empty = Response::ValidPaths(BTreeSet::new());
    assert_eq!(encode_response(&empty, V), [0; 8]);
}

#[test]
fn spec_13_3_query_path_infos() {
    let mut req_bytes = hex("0200000000000000");
    req_bytes.extend_from_slice(&hex(QVP_13_2)[0x18..]);
    let req = Request::QueryPathInfos {
        paths: BTreeSet::from([foo()]),
    };
    assert_eq!(encode_request(&req, V), req_bytes);

    let bytes = hex("
0000: 2f00000000000000 2f6e69782f73746f
0010: 72652f76786a6977 6b6a6b6e37783430
0020: 3739717668316a6b 6c35706e30356a32
0030: 6177302d666f6f00 0000000000000000
0040: 0000000000000000 7800000000000000
0050: 7800000000000000 3b00000000000000
0060: 7368613235363a31 786e67636d73646b
0070: 647661796361716a 667a767134677233
0080: 676962353670326c 38696c6c676c6e73
0090: 717a687073733437 70787a0000000000
00a0: 4000000000000000 746578743a736861
00b0: 3235363a31666367 707937766334616d
00c0: 6d72377331376a32 7871383873637377
00d0: 6b677a323364717a 6330346738737835
00e0: 7663703270707077 0000000000000000
00f0: 0000000000000000");
    assert_eq!(bytes.len(), 248);
    let info = ValidPathInfo {
        deriver: None,
        references: BTreeSet::new(),
        download_size: 120,
        nar_size: 120,
        nar_hash: Some(
            Hash::parse_any(
                "sha256:1xngcmsdkdvaycaqjfzvq4gr3gib56p2l8illglnsqzhpss47pxz",
                None,
            )
            .unwrap(),
        ),
        ca: Some(
            ContentAddress::parse(
                "text:sha256:1fcgpy7vc4ammr7s17j2xq88scswkgz23dqzc04g8sx5vcp2pppw",
            )
            .unwrap(),
        ),
        sigs: BTreeSet::new(),
    };
    let resp = Response::PathInfos(BTreeMap::from([(foo(), info)]));
    assert_eq!(encode_response(&resp, V), bytes);
    assert_eq!(
        Response::decode(Opcode::QueryPathInfos, &bytes, V, &Limits::default()),
        Ok(Some((resp, 248)))
    );
    // Before serve 2.4 the entry stops after narSize.
    let Response::PathInfos(m) = Response::decode(
        Opcode::QueryPathInfos,
        &[&bytes[..0x58], &[0; 8][..]].concat(),
        ProtocolVersion::V2_3,
        &Limits::default(),
    )
    .unwrap()
    .unwrap()
    .0
    else {
        panic!()
    };
    assert_eq!(m[&foo()].nar_hash, None);
}

#[test]
fn unknown_opcode_is_upstreams_message() {
    for op in [0u64, 10, 13, u64::MAX] {
        let e = Request::decode(&op.to_le_bytes(), V, &Limits::default()).unwrap_err();
        assert_eq!(e, ServeError::UnknownOpcode(op));
        assert_eq!(e.to_string(), format!("unknown serve command {op}"));
    }
}

#[test]
fn write_check_uses_upstreams_messages() {
    let import = "importing paths is not allowed";
    let build = "building paths is not allowed";
    for (n, msg) in [
        (4, Some(import)),
        (9, Some(import)),
        (6, Some(build)),
        (8, Some(build)),
    ]
    .into_iter()
    .chain([1, 2, 3, 5, 7].map(|n| (n, None)))
    {
        let op = Opcode::from_wire(n).unwrap();
        assert_eq!(op.check_write(true), Ok(()));
        match msg {
            Some(m) => {
                let e = op.check_write(false).unwrap_err();
                assert_eq!(e.to_string(), m);
            }
            None => assert_eq!(op.check_write(false), Ok(())),
        }
    }
}

#[test]
fn a_2_pow_63_byte_path_claim_is_an_error_without_allocating() {
    let mut b = Vec::new();
    b.put_wire_u64(3);
    b.put_wire_u64(1 << 63);
    let e = Request::decode(&b, V, &Limits::default()).unwrap_err();
    assert!(
        matches!(
            e,
            ServeError::Wire(crate::wire::WireError::StringTooLong {
                field: "path",
                offset: 8,
                len,
                ..
            }) if len == 1 << 63
        ),
        "{e}"
    );
    // Also for the element count of a path set and for env values under generous limits.
    let mut b = Vec::new();
    b.put_wire_u64(1);
    b.put_wire_u64(0);
    b.put_wire_u64(0);
    b.put_wire_u64(u64::MAX);
    assert!(matches!(
        Request::decode(&b, V, &Limits::default()),
        Err(ServeError::Wire(
            crate::wire::WireError::TooManyElements { .. }
        ))
    ));
}

#[test]
fn more_than_10_000_paths_are_accepted_by_default() {
    let paths: BTreeSet<StorePath> = (0..12_000u32)
        .map(|i| {
            let mut d = [0u8; 20];
            d[..4].copy_from_slice(&i.to_le_bytes());
            StorePath::from_digest(d, "p").unwrap()
        })
        .collect();
    let req = Request::QueryValidPaths {
        lock: true,
        substitute: false,
        paths,
    };
    let b = encode_request(&req, V);
    assert_eq!(
        Request::decode(&b, V, &Limits::default()),
        Ok(Some((req, b.len())))
    );
}

#[test]
fn add_to_store_nar_rejects_zero_and_oversized_nar_size() {
    let h = crate::serve::AddToStoreNar {
        path: foo(),
        deriver: None,
        nar_hash: Hash::compute(crate::hash::HashAlgo::Sha256, b""),
        references: BTreeSet::new(),
        registration_time: 0,
        nar_size: 0,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: None,
    };
    let limits = Limits {
        max_nar_size: 100,
        ..Limits::default()
    };
    for size in [0, 101] {
        let req = Request::AddToStoreNar(Box::new(crate::serve::AddToStoreNar {
            nar_size: size,
            ..h.clone()
        }));
        let e = Request::decode(&encode_request(&req, V), V, &limits).unwrap_err();
        assert!(matches!(e, ServeError::BadNarSize { size: s, max: 100, .. } if s == size));
    }
}

#[test]
fn build_paths_entries_parse_outputs_like_upstream() {
    let drv = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo.drv";
    let mut b = Vec::new();
    b.put_wire_u64(6);
    b.put_wire_strings([
        FOO.to_owned(),
        format!("{drv}!out,dev"),
        format!("{drv}!,out,"),
    ]);
    BuildOptions::default().encode(V, &mut b);
    let (req, _) = Request::decode(&b, V, &Limits::default()).unwrap().unwrap();
    let Request::BuildPaths { paths, .. } = req else {
        panic!()
    };
    let names = |p: &PathWithOutputs| p.outputs.iter().cloned().collect::<Vec<_>>();
    assert!(paths[0].outputs.is_empty());
    assert_eq!(names(&paths[1]), ["dev", "out"]);
    assert_eq!(paths[1].to_wire_string(), format!("{drv}!dev,out"));
    assert_eq!(names(&paths[2]), ["out"]);
    let mut b = Vec::new();
    b.put_wire_u64(6);
    b.put_wire_strings(["/nix/store/bad!out"]);
    assert!(matches!(
        Request::decode(&b, V, &Limits::default()),
        Err(ServeError::StorePath {
            field: "BuildPaths entry",
            offset: 16,
            ..
        })
    ));
}

#[test]
fn bool_fields_reject_2() {
    let mut b = Vec::new();
    b.put_wire_u64(0);
    b.put_wire_bytes(b"");
    b.put_wire_u64(1);
    b.put_wire_u64(2);
    let e = Response::decode(
        Opcode::BuildDerivation,
        &[&b[..], &[0; 16]].concat(),
        V,
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(
        e,
        ServeError::Wire(crate::wire::WireError::BadBool {
            field: "isNonDeterministic",
            offset: 24,
            value: 2
        })
    ));
}

/// A request's boolean fields refuse anything but 0 and 1, naming the field and offset (the
/// abuse suite, tests/abuse.rs, sends each of them over real connections).
#[test]
fn request_bool_fields_reject_2() {
    let opts = |at: usize| {
        let mut o = vec![0u64; 6];
        o[at] = 2;
        o
    };
    let cases: Vec<(Vec<u64>, Vec<u8>, &str, usize)> = vec![
        (vec![1, 2, 0, 0], vec![], "lock", 8),
        (vec![1, 0, 2, 0], vec![], "substitute", 16),
        (vec![7, 2, 0], vec![], "includeOutputs", 8),
        (
            [vec![6, 0], opts(4)].concat(),
            vec![],
            "enforceDeterminism",
            48,
        ),
        ([vec![6, 0], opts(5)].concat(), vec![], "keepFailed", 56),
    ];
    for (words, rest, field, offset) in cases {
        let mut b = Vec::new();
        for w in words {
            b.put_wire_u64(w);
        }
        b.extend_from_slice(&rest);
        let e = Request::decode(&b, V, &Limits::default()).unwrap_err();
        assert_eq!(
            e,
            ServeError::Wire(crate::wire::WireError::BadBool {
                field,
                offset,
                value: 2
            }),
            "{field}"
        );
    }
}

/// BuildDerivation output names must be store path name characters: they end up in output
/// path names and in `drv!out` strings.
#[test]
fn build_derivation_output_names_are_checked() {
    for (name, ok) in [
        (&b"out"[..], true),
        (b"dev-2_x.y+z?=", true),
        (b"", false),
        (b"a b", false),
        (b"out!x", false),
        (b"a,b", false),
        (b"..", false),
        (b"\xff", false),
    ] {
        let mut b = Vec::new();
        b.put_wire_u64(8);
        b.put_wire_bytes(b"/nix/store/ffffffffffffffffffffffffffffffff-x.drv");
        b.put_wire_u64(1);
        b.put_wire_bytes(name);
        b.put_wire_bytes(foo().to_absolute().as_bytes());
        b.put_wire_bytes(b"");
        b.put_wire_bytes(b"");
        b.put_wire_u64(0);
        b.put_wire_bytes(b"x86_64-linux");
        b.put_wire_bytes(b"/bin/sh");
        b.put_wire_u64(0);
        b.put_wire_u64(0);
        b.extend_from_slice(&[0; 48]);
        match Request::decode(&b, V, &Limits::default()) {
            Ok(Some(_)) => assert!(ok, "{name:?} accepted"),
            Err(ServeError::DerivationOutput { offset, source, .. }) => {
                assert!(!ok, "{name:?} refused: {source}");
                assert_eq!(offset, 80);
                assert!(matches!(
                    source,
                    crate::derivation::DerivationError::OutputName { .. }
                ));
            }
            other => panic!("{name:?}: {other:?}"),
        }
    }
}

#[test]
fn built_outputs_2_8_form_has_full_paths_and_no_hash() {
    let r = BuildResult {
        status: BuildStatus::Built,
        error_msg: Vec::new(),
        times_built: 1,
        is_non_deterministic: false,
        start_time: 5,
        stop_time: 6,
        built_outputs: BTreeMap::from([(
            "out".to_owned(),
            BuiltOutput {
                drv_hash: None,
                out_path: foo(),
                signatures: BTreeSet::from(["k:s".to_owned()]),
            },
        )]),
    };
    let mut b = Vec::new();
    r.encode(ProtocolVersion::V2_8, &mut b);
    let mut expected = Vec::new();
    expected.put_wire_u64(0);
    expected.put_wire_bytes(b"");
    for n in [1u64, 0, 5, 6, 1] {
        expected.put_wire_u64(n);
    }
    expected.put_wire_bytes(b"out");
    expected.put_wire_bytes(FOO.as_bytes());
    expected.put_wire_strings(["k:s"]);
    assert_eq!(b, expected);
    // In the 2.6 form an unknown hash is 64 zeros, as Nix 2.35 writes it.
    let mut b = Vec::new();
    r.encode(ProtocolVersion::V2_6, &mut b);
    let key = format!("sha256:{}!out", "0".repeat(64));
    assert!(b.windows(key.len()).any(|w| w == key.as_bytes()));
}

#[test]
fn realisation_id_must_match_its_key() {
    let mut b = Vec::new();
    b.put_wire_u64(0);
    b.put_wire_bytes(b"");
    for n in [1u64, 0, 0, 0, 1] {
        b.put_wire_u64(n);
    }
    let key = format!("sha256:{}!out", "1".repeat(64));
    b.put_wire_bytes(key.as_bytes());
    let json = format!(
        r#"{{"id":"sha256:{}!dev","outPath":"vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"}}"#,
        "1".repeat(64)
    );
    b.put_wire_bytes(json.as_bytes());
    let e = Response::decode(Opcode::BuildDerivation, &b, V, &Limits::default()).unwrap_err();
    assert!(
        matches!(
            e,
            ServeError::Malformed {
                field: "realisation",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn export_trailer_and_markers() {
    let t = ExportTrailer {
        path: foo(),
        references: BTreeSet::from([foo()]),
        deriver: None,
        legacy_signature: None,
    };
    let mut b = Vec::new();
    t.encode(&mut b);
    assert_eq!(&b[..8], b"NIXE\0\0\0\0");
    assert_eq!(
        ExportTrailer::decode(&b, &crate::wire::Limits::default()),
        Ok(Some((t, b.len())))
    );
    b[0] = b'X';
    assert!(matches!(
        ExportTrailer::decode(&b, &crate::wire::Limits::default()),
        Err(ServeError::Malformed {
            field: "export magic",
            offset: 0,
            ..
        })
    ));
    // The legacy signature flag is a boolean too.
    let mut flagged = b.clone();
    flagged[0] = b'N';
    let at = flagged.len() - 8;
    flagged[at] = 2;
    assert!(matches!(
        ExportTrailer::decode(&flagged, &crate::wire::Limits::default()),
        Err(ServeError::Wire(crate::wire::WireError::BadBool {
            field: "export signature flag",
            value: 2,
            ..
        }))
    ));
    assert_eq!(
        ExportMarker::read(&mut Reader::new(&2u64.to_le_bytes())),
        Err(crate::wire::Stop::Invalid(ServeError::BadExportMarker {
            offset: 0,
            value: 2
        }))
    );
}

fn versioned<T: std::fmt::Debug>(
    f: impl Fn(ProtocolVersion) -> BoxedStrategy<T>,
) -> impl Strategy<Value = (ProtocolVersion, T)> {
    version().prop_flat_map(move |v| (Just(v), f(v)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn requests_round_trip_at_every_version(
        (v, req) in versioned(|v| request(v).boxed())
    ) {
        let b = encode_request(&req, v);
        prop_assert_eq!(Request::decode(&b, v, &Limits::default()), Ok(Some((req.clone(), b.len()))));
        // Every proper prefix is "need more bytes", never an error.
        for cut in [0, b.len() / 2, b.len() - 1] {
            prop_assert_eq!(Request::decode(&b[..cut], v, &Limits::default()), Ok(None));
        }
        let mut buf = bytes::Bytes::from(b);
        prop_assert_eq!(Request::decode_buf(&mut buf, v, &Limits::default()), Ok(Some(req)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn responses_round_trip_at_every_version(
        (v, resp) in versioned(|v| response(v).boxed())
    ) {
        let b = encode_response(&resp, v);
        prop_assert_eq!(
            Response::decode(resp.opcode(), &b, v, &Limits::default()),
            Ok(Some((resp.clone(), b.len())))
        );
        prop_assert_eq!(
            Response::decode(resp.opcode(), &b[..b.len() - 1], v, &Limits::default()),
            Ok(None)
        );
    }

    #[test]
    fn build_options_round_trip((v, o) in versioned(|v| build_options(v).boxed())) {
        let mut b = Vec::new();
        o.encode(v, &mut b);
        let mut r = Reader::new(&b);
        prop_assert_eq!(BuildOptions::read(&mut r, v), Ok(o));
        prop_assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn build_result_round_trips((v, res) in versioned(|v| build_result(v).boxed())) {
        let mut b = Vec::new();
        res.encode(v, &mut b);
        let mut r = Reader::new(&b);
        prop_assert_eq!(BuildResult::read(&mut r, v, &crate::wire::Limits::default()), Ok(res));
        prop_assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn valid_path_info_round_trips((v, info) in versioned(|v| valid_path_info(v).boxed())) {
        let mut b = Vec::new();
        info.encode(v, &mut b);
        let mut r = Reader::new(&b);
        prop_assert_eq!(ValidPathInfo::read(&mut r, v, &crate::wire::Limits::default()), Ok(info));
        prop_assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn handshakes_round_trip(v in version()) {
        let mut b = Vec::new();
        ClientHello { version: v }.encode(&mut b);
        ServerHello { version: v }.encode(&mut b);
        prop_assert_eq!(ClientHello::decode(&b), Ok(Some((ClientHello { version: v }, 16))));
        prop_assert_eq!(ServerHello::decode(&b[16..]), Ok(Some((ServerHello { version: v }, 16))));
    }

    #[test]
    fn export_trailer_round_trips(t in export_trailer()) {
        let mut b = Vec::new();
        t.encode(&mut b);
        prop_assert_eq!(
            ExportTrailer::decode(&b, &crate::wire::Limits::default()),
            Ok(Some((t, b.len())))
        );
    }

    #[test]
    fn request_decoder_never_panics(
        v in version(),
        op in 0u64..11,
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut b = op.to_le_bytes().to_vec();
        b.extend_from_slice(&tail);
        let limits = Limits {
            wire: crate::wire::Limits { max_string_len: 64, max_short_string_len: 64, max_list_len: 8 },
            max_nar_size: 1 << 20,
        };
        let _ = Request::decode(&b, v, &limits);
        let _ = Request::decode(&tail, v, &Limits::default());
    }

    #[test]
    fn response_decoder_never_panics(
        v in version(),
        op in 1u64..10,
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let op = Opcode::from_wire(op).unwrap();
        let _ = Response::decode(op, &tail, v, &Limits::default());
        let _ = ExportTrailer::decode(&tail, &crate::wire::Limits::default());
        let _ = ClientHello::decode(&tail);
    }

    #[test]
    fn session_never_panics(
        write in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut b = Vec::new();
        ClientHello { version: ProtocolVersion::V2_7 }.encode(&mut b);
        b.extend_from_slice(&tail);
        let mut s = ServerSession::new(write, Limits::default());
        let mut input = bytes::BytesMut::from(&b[..]);
        while let Ok(Some(_)) = s.poll(&mut input) {}
        let _ = s.end_of_input(&input);
    }
}
