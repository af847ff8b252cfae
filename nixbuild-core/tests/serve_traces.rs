//! Golden tests over the six real sessions in `tests/data/traces/` (docs/serve-protocol.md §13.7):
//! every message decodes exactly, with nothing left over, and re-encodes to the same bytes; the
//! concrete values of host-1 are checked; and [`ServerSession`] replays each session byte for byte.
// A panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bytes::BytesMut;
use nixbuild_core::derivation::DerivationOutput;
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::nar::NarValidator;
use nixbuild_core::serve::{
    BuildOptions, BuildStatus, ClientHello, Event, Limits, Opcode, ProtocolVersion, Request,
    Response, ServerHello, ServerSession,
};
use nixbuild_core::store_path::StorePath;

/// The captured sessions, with their README.
const TRACES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/traces");
const SESSIONS: [&str; 6] = ["host-1", "host-2", "sid-1", "sid-2", "trixie-1", "trixie-2"];

/// One exchange: the request, the NAR it carried (AddToStoreNar) and the answer (a
/// `Response`, or the raw NAR of DumpStorePath).
struct Exchange {
    request: Request,
    upload: Option<Vec<u8>>,
    response: Answer,
}

enum Answer {
    Fixed(Response),
    Nar(Vec<u8>),
}

struct Trace {
    input: Vec<u8>,
    output: Vec<u8>,
    client: ProtocolVersion,
    exchanges: Vec<Exchange>,
}

fn read(name: &str) -> Vec<u8> {
    let path = format!("{TRACES}/{name}");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Checks a complete NAR at the start of `bytes` and returns its sha256 and length.
fn nar_at(bytes: &[u8]) -> (Hash, usize) {
    let mut v = NarValidator::new();
    let n = v.feed(bytes).expect("valid NAR");
    let summary = v.finish().expect("complete NAR");
    assert_eq!(summary.nar_size, n as u64);
    (summary.nar_hash, n)
}

/// Decodes a whole session with the codec, checking exact consumption and re-encoding.
fn decode_trace(name: &str) -> Trace {
    let input = read(&format!("{name}.in"));
    let output = read(&format!("{name}.out"));
    let limits = Limits::default();

    let (hello, mut i) = ClientHello::decode(&input).unwrap().expect("client hello");
    let (server, mut o) = ServerHello::decode(&output).unwrap().expect("server hello");
    assert_eq!(server.version, ProtocolVersion::SERVER);
    let mut enc = Vec::new();
    hello.encode(&mut enc);
    server.encode(&mut enc);
    assert_eq!(enc, [&input[..16], &output[..16]].concat());
    let v = ProtocolVersion::negotiate(hello.version);

    let mut exchanges = Vec::new();
    let mut last_info = None;
    while i < input.len() {
        let (request, n) = Request::decode(&input[i..], v, &limits)
            .unwrap_or_else(|e| panic!("{name}.in at {i}: {e}"))
            .unwrap_or_else(|| panic!("{name}.in at {i}: incomplete"));
        let mut enc = Vec::new();
        request.encode(v, &mut enc);
        assert_eq!(enc, input[i..i + n], "{name}.in: re-encoding at {i}");
        i += n;

        let upload = match &request {
            Request::AddToStoreNar(h) => {
                let size = h.nar_size as usize;
                let nar = input[i..i + size].to_vec();
                let (hash, len) = nar_at(&nar);
                assert_eq!((hash, len), (h.nar_hash, size), "{name}: uploaded NAR");
                i += size;
                Some(nar)
            }
            _ => None,
        };

        let response = match request.opcode() {
            Opcode::DumpStorePath => {
                let (hash, len) = nar_at(&output[o..]);
                let (size, nar_hash) = last_info.expect("QueryPathInfos before DumpStorePath");
                assert_eq!((len as u64, Some(hash)), (size, nar_hash));
                o += len;
                Answer::Nar(output[o - len..o].to_vec())
            }
            op => {
                let (resp, m) = Response::decode(op, &output[o..], v, &limits)
                    .unwrap_or_else(|e| panic!("{name}.out at {o}: {e}"))
                    .unwrap_or_else(|| panic!("{name}.out at {o}: incomplete"));
                let mut enc = Vec::new();
                resp.encode(v, &mut enc);
                assert_eq!(enc, output[o..o + m], "{name}.out: re-encoding at {o}");
                o += m;
                if let Response::PathInfos(m) = &resp {
                    if let Some(info) = m.values().next() {
                        last_info = Some((info.nar_size, info.nar_hash));
                    }
                }
                Answer::Fixed(resp)
            }
        };
        exchanges.push(Exchange {
            request,
            upload,
            response,
        });
    }
    assert_eq!(i, input.len());
    assert_eq!(o, output.len(), "{name}.out has bytes left over");
    Trace {
        input,
        output,
        client: hello.version,
        exchanges,
    }
}

fn sp(s: &str) -> StorePath {
    StorePath::from_absolute_path(s.as_bytes()).unwrap()
}

const TINYDIR: &str = "/nix/store/lw1m8kblcg4wb1mmli5nyvlvsn71hf9y-tinydir";

#[test]
fn every_trace_decodes_exactly_and_re_encodes() {
    for name in SESSIONS {
        let t = decode_trace(name);
        assert_eq!(t.client, ProtocolVersion::V2_7, "{name}");
        let ops: Vec<Opcode> = t.exchanges.iter().map(|e| e.request.opcode()).collect();
        use Opcode::*;
        let expected: &[Opcode] = match name {
            "host-1" => &[
                QueryValidPaths,
                AddToStoreNar,
                BuildDerivation,
                QueryPathInfos,
                DumpStorePath,
            ],
            "sid-1" | "trixie-1" => &[
                QueryValidPaths,
                QueryPathInfos,
                AddToStoreNar,
                BuildDerivation,
                QueryPathInfos,
                DumpStorePath,
            ],
            _ => &[
                QueryValidPaths,
                BuildDerivation,
                QueryPathInfos,
                DumpStorePath,
            ],
        };
        assert_eq!(ops, expected, "{name}");
        // Session 1 finds the input missing and uploads it; session 2 finds it valid.
        let Answer::Fixed(Response::ValidPaths(valid)) = &t.exchanges[0].response else {
            panic!("{name}: QueryValidPaths answer")
        };
        let expected_valid = if name.ends_with('2') {
            BTreeSet::from([sp(TINYDIR)])
        } else {
            BTreeSet::new()
        };
        assert_eq!(*valid, expected_valid, "{name}");

        let client = name.split('-').next().unwrap();
        let number: u32 = name[name.len() - 1..].parse().unwrap();
        let build = t
            .exchanges
            .iter()
            .find(|e| e.request.opcode() == BuildDerivation)
            .unwrap();
        let Request::BuildDerivation {
            drv_path,
            drv,
            options,
        } = &build.request
        else {
            unreachable!()
        };
        let drv_name = format!("trace-{client}-{}", number - 1);
        assert_eq!(drv_path.name(), format!("{drv_name}.drv"));
        assert_eq!(drv.args, [format!("built {}", number - 1).into_bytes()]);
        assert_eq!(drv.input_srcs, BTreeSet::from([sp(TINYDIR)]));
        let expected_options = BuildOptions {
            enforce_determinism: client == "host",
            ..BuildOptions::default()
        };
        assert_eq!(*options, expected_options, "{name}");
        let Answer::Fixed(Response::Build(result)) = &build.response else {
            panic!("{name}: no BuildResult")
        };
        assert_eq!(result.status, BuildStatus::Built);
        assert_eq!(result.times_built, 1);
        let out = &result.built_outputs["out"];
        assert_eq!(out.out_path.name(), drv_name);
        let DerivationOutput::InputAddressed(p) = &drv.outputs["out"] else {
            panic!("{name}: output kind")
        };
        assert_eq!(*p, out.out_path);
    }
}

#[test]
fn host_1_values_match_spec_13_7() {
    let t = decode_trace("host-1");
    let e = &t.exchanges;
    assert_eq!(
        e[0].request,
        Request::QueryValidPaths {
            lock: false,
            substitute: false,
            paths: BTreeSet::from([sp(TINYDIR)]),
        }
    );
    assert!(matches!(&e[0].response, Answer::Fixed(Response::ValidPaths(s)) if s.is_empty()));

    // The upload.
    let Request::AddToStoreNar(h) = &e[1].request else {
        panic!("AddToStoreNar expected")
    };
    assert_eq!(h.path, sp(TINYDIR));
    assert_eq!(h.deriver, None);
    assert!(h.references.is_empty() && h.sigs.is_empty() && !h.ultimate);
    assert_eq!(h.registration_time, 1795624573);
    assert_eq!(h.nar_size, 9280);
    assert_eq!(e[1].upload.as_ref().map(Vec::len), Some(9280));
    assert!(h.nar_hash.to_base16().starts_with("d5ff0093"));
    assert!(h.nar_hash.to_base16().ends_with("cb1bdf"));
    let ca = h.ca.as_ref().expect("ca");
    assert_eq!(
        ca.to_string(),
        "fixed:r:sha256:1pqvrg0q9bkr57zf1iz2a7fgqr1lv4ak9yrfi3s68ryxvy9h1zym"
    );
    assert_eq!(ca.hash, h.nar_hash);
    assert!(matches!(e[1].response, Answer::Fixed(Response::Added)));

    // The build.
    let Request::BuildDerivation {
        drv_path,
        drv,
        options,
    } = &e[2].request
    else {
        panic!("BuildDerivation expected")
    };
    assert_eq!(
        *drv_path,
        sp("/nix/store/ba6c9wqqn8by96q1qk7f43dvmk60krl5-trace-host-0.drv")
    );
    let out = sp("/nix/store/wpwkwrk5jm6181g39iml0ljcqflwccwa-trace-host-0");
    assert_eq!(
        drv.outputs.get("out"),
        Some(&DerivationOutput::InputAddressed(out.clone()))
    );
    assert_eq!(drv.platform, b"x86_64-linux");
    assert_eq!(drv.builder, format!("{TINYDIR}/bin/tiny").into_bytes());
    let keys: Vec<&[u8]> = drv.env.keys().map(Vec::as_slice).collect();
    assert_eq!(keys, [&b"builder"[..], b"name", b"out", b"system"]);
    let o = options;
    assert_eq!(
        (
            o.max_silent_time,
            o.build_timeout,
            o.max_log_size,
            o.nr_repeats,
            o.enforce_determinism,
            o.keep_failed
        ),
        (0, 0, 0, 0, true, false)
    );
    let Answer::Fixed(Response::Build(r)) = &e[2].response else {
        panic!("BuildResult expected")
    };
    assert_eq!(r.status, BuildStatus::Built);
    assert!(r.error_msg.is_empty());
    assert_eq!((r.times_built, r.is_non_deterministic), (1, false));
    assert_eq!((r.start_time, r.stop_time), (1795624589, 1795624589));
    assert_eq!(r.built_outputs.len(), 1);
    let b = &r.built_outputs["out"];
    assert_eq!(b.out_path, out);
    assert!(b.signatures.is_empty());
    let key = "sha256:616de7ebce535373736cd46af3b792b6861ebd03f8b6e15245f59b35934ea58a";
    let drv_hash = b.drv_hash.expect("drv hash");
    assert_eq!(format!("sha256:{}", drv_hash.to_base16()), key);
    // The key is the sha256 of the masked ATerm of the received derivation (docs/serve-protocol.md
    // §5.4).
    let masked = format!(
        r#"Derive([("out","","","")],[],["{TINYDIR}"],"x86_64-linux","{TINYDIR}/bin/tiny",["built 0"],[("builder","{TINYDIR}/bin/tiny"),("name","trace-host-0"),("out",""),("system","x86_64-linux")])"#
    );
    assert_eq!(drv_hash, Hash::compute(HashAlgo::Sha256, masked.as_bytes()));
    // The exact 344 bytes of the BuildResult, including the JSON, re-encode from the value.
    let mut enc = Vec::new();
    r.encode(ProtocolVersion::V2_7, &mut enc);
    assert_eq!(enc.len(), 344);
    let json = format!(
        r#"{{"dependentRealisations":{{}},"id":"{key}!out","outPath":"wpwkwrk5jm6181g39iml0ljcqflwccwa-trace-host-0","signatures":[]}}"#
    );
    assert!(enc.windows(json.len()).any(|w| w == json.as_bytes()));

    // Fetching the output.
    assert_eq!(
        e[3].request,
        Request::QueryPathInfos {
            paths: BTreeSet::from([out.clone()])
        }
    );
    let Answer::Fixed(Response::PathInfos(infos)) = &e[3].response else {
        panic!("PathInfos expected")
    };
    let info = &infos[&out];
    assert_eq!(info.deriver.as_ref(), Some(drv_path));
    assert!(info.references.is_empty() && info.sigs.is_empty() && info.ca.is_none());
    assert_eq!((info.download_size, info.nar_size), (120, 120));
    assert_eq!(
        info.nar_hash.map(|h| h.to_string()).as_deref(),
        Some("sha256:1fym51vlf6yv6rs2haizha1grk78k9jw63i53ln689v4jpf9d6ji")
    );
    assert_eq!(e[4].request, Request::DumpStorePath { path: out });
    let Answer::Nar(nar) = &e[4].response else {
        panic!("NAR expected")
    };
    assert_eq!(nar.len(), 120);
    assert_eq!(&nar[0xd0 - 0x70..0xd8 - 0x70], b"built 0\n");
}

#[test]
fn sid_and_trixie_probe_before_upload_and_get_an_empty_answer() {
    for name in ["sid-1", "trixie-1"] {
        let t = decode_trace(name);
        let e = &t.exchanges[1];
        assert_eq!(
            e.request,
            Request::QueryPathInfos {
                paths: BTreeSet::from([sp(TINYDIR)])
            }
        );
        assert!(matches!(&e.response, Answer::Fixed(Response::PathInfos(m)) if m.is_empty()));
    }
}

/// Replays a session through [`ServerSession`], feeding the client's bytes `chunk` at a time
/// and answering with the recorded responses; the output must equal the recorded one.
fn replay(name: &str, chunk: usize) {
    let t = decode_trace(name);
    let mut session = ServerSession::new(true, Limits::default());
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    let mut answers = t.exchanges.iter();
    let mut current = None;
    let mut nar = Vec::new();
    loop {
        match session.poll(&mut input).unwrap() {
            None if fed == t.input.len() => break,
            None => {
                let end = (fed + chunk).min(t.input.len());
                input.extend_from_slice(&t.input[fed..end]);
                fed = end;
            }
            Some(Event::Hello { client, negotiated }) => {
                assert_eq!((client, negotiated), (t.client, ProtocolVersion::V2_7));
            }
            Some(Event::Request(req)) => {
                let ex = answers.next().expect("more requests than recorded");
                assert_eq!(req, ex.request);
                match &ex.response {
                    Answer::Nar(bytes) => {
                        for piece in bytes.chunks(50) {
                            session.send_stream(piece).unwrap();
                        }
                        session.end_stream().unwrap();
                    }
                    Answer::Fixed(_) if ex.upload.is_some() => current = Some(ex),
                    Answer::Fixed(r) => session.respond(r).unwrap(),
                }
            }
            Some(Event::NarChunk(b)) => nar.extend_from_slice(&b),
            Some(Event::NarEnd) => {
                let ex = current.take().expect("upload in progress");
                assert_eq!(Some(&nar), ex.upload.as_ref());
                nar.clear();
                let Answer::Fixed(r) = &ex.response else {
                    unreachable!()
                };
                session.respond(r).unwrap();
            }
            Some(e) => panic!("{name}: unexpected {e:?}"),
        }
        out.extend_from_slice(&session.take_output());
    }
    assert!(answers.next().is_none());
    session.end_of_input(&input).unwrap();
    assert_eq!(out, t.output, "{name}: replayed output");
}

#[test]
fn server_session_replays_every_trace_byte_for_byte() {
    for name in SESSIONS {
        for chunk in [1, 7, 4096, usize::MAX] {
            replay(name, chunk);
        }
    }
}
