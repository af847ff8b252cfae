//! Scripted in-process sessions against [`ServerSession`], no sockets: a Nix 2.3 client
//! (serve 2.5), Hydra (serve 2.6, ImportPaths with `lock=1`) and a Nix 2.4–2.34 client
//! (serve 2.7). The client bytes and the expected server bytes are written out by hand here,
//! field by field as docs/serve-protocol.md §4–§6 lays them out, independently of the crate's
//! encoders.

// A panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use bytes::BytesMut;
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::serve::{
    BuildPathsResult, BuildResult, BuildStatus, BuiltOutput, Event, ExportTrailer, Limits,
    ProtocolVersion, Request, Response, ServeError, ServerSession, ValidPathInfo,
};
use nixbuild_core::store_path::StorePath;

/// Bytes built field by field.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u(mut self, n: u64) -> Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn s(mut self, b: impl AsRef<[u8]>) -> Self {
        let b = b.as_ref();
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
        self.0.resize(self.0.len().div_ceil(8) * 8, 0);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// The NAR of a single regular file `hello` (docs/serve-protocol.md §13.4).
fn hello_nar() -> Vec<u8> {
    let nar = W::default()
        .s("nix-archive-1")
        .s("(")
        .s("type")
        .s("regular")
        .s("contents")
        .s("hello")
        .s(")")
        .0;
    assert_eq!(nar.len(), 120);
    nar
}

const TINYDIR: &str = "/nix/store/lw1m8kblcg4wb1mmli5nyvlvsn71hf9y-tinydir";
const DRV: &str = "/nix/store/ba6c9wqqn8by96q1qk7f43dvmk60krl5-trace-host-0.drv";
const OUT: &str = "/nix/store/wpwkwrk5jm6181g39iml0ljcqflwccwa-trace-host-0";
const DRV_HASH: &str = "616de7ebce535373736cd46af3b792b6861ebd03f8b6e15245f59b35934ea58a";

fn sp(s: &str) -> StorePath {
    StorePath::from_absolute_path(s.as_bytes()).unwrap()
}

/// The BuildDerivation arguments of the traces' derivation, up to the options.
fn build_derivation_request() -> W {
    W::default()
        .u(8)
        .s(DRV)
        .u(1)
        .s("out")
        .s(OUT)
        .s("")
        .s("")
        .u(1)
        .s(TINYDIR)
        .s("x86_64-linux")
        .s(format!("{TINYDIR}/bin/tiny"))
        .u(1)
        .s("built 0")
        .u(4)
        .s("builder")
        .s(format!("{TINYDIR}/bin/tiny"))
        .s("name")
        .s("trace-host-0")
        .s("out")
        .s(OUT)
        .s("system")
        .s("x86_64-linux")
}

/// A successful BuildResult with builtOutputs for `out`.
fn built() -> BuildResult {
    BuildResult {
        status: BuildStatus::Built,
        error_msg: Vec::new(),
        times_built: 1,
        is_non_deterministic: false,
        start_time: 1795624589,
        stop_time: 1795624590,
        built_outputs: BTreeMap::from([(
            "out".to_owned(),
            BuiltOutput {
                drv_hash: Some(Hash::new(HashAlgo::Sha256, &hex32(DRV_HASH)).unwrap()),
                out_path: sp(OUT),
                signatures: BTreeSet::new(),
            },
        )]),
    }
}

fn hex32(s: &str) -> [u8; 32] {
    let mut a = [0; 32];
    for (i, b) in a.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    a
}

/// The QueryPathInfos answer for `OUT` (a 120-byte NAR).
fn out_info() -> (ValidPathInfo, W) {
    let nar_hash = Hash::compute(HashAlgo::Sha256, &hello_nar());
    let info = ValidPathInfo {
        deriver: Some(sp(DRV)),
        references: BTreeSet::new(),
        download_size: 120,
        nar_size: 120,
        nar_hash: Some(nar_hash),
        ca: None,
        sigs: BTreeSet::new(),
    };
    let bytes = W::default()
        .s(OUT)
        .s(DRV)
        .u(0)
        .u(120)
        .u(120)
        .s(format!("sha256:{}", nar_hash.to_nix32()))
        .s("")
        .u(0)
        .s("");
    (info, bytes)
}

/// One side of a session: feeds client bytes and collects events and server bytes.
struct Harness {
    session: ServerSession,
    input: BytesMut,
}

impl Harness {
    fn new(write: bool) -> Self {
        Harness {
            session: ServerSession::new(write, Limits::default()),
            input: BytesMut::new(),
        }
    }

    /// Sends client bytes; returns every event up to "need more".
    fn send(&mut self, bytes: W) -> Vec<Event> {
        self.input.extend_from_slice(&bytes.0);
        let mut events = Vec::new();
        while let Some(e) = self.session.poll(&mut self.input).unwrap() {
            events.push(e);
        }
        events
    }

    /// What the server wrote since the last call.
    fn output(&mut self) -> Vec<u8> {
        self.session.take_output().to_vec()
    }

    fn respond(&mut self, r: Response) -> Vec<u8> {
        self.session.respond(&r).unwrap();
        self.output()
    }

    fn handshake(&mut self, client: u64) {
        let events = self.send(W::default().u(0x390c9deb).u(client));
        let client = ProtocolVersion::from_wire(client).unwrap();
        assert_eq!(
            events,
            [Event::Hello {
                client,
                negotiated: ProtocolVersion::negotiate(client)
            }]
        );
        // The server advertises 0x207 whatever the client sent.
        assert_eq!(self.output(), W::default().u(0x5452eecb).u(0x207).0);
    }

    fn one_request(&mut self, bytes: W) -> Request {
        match &self.send(bytes)[..] {
            [Event::Request(r)] => r.clone(),
            other => panic!("expected one request, got {other:?}"),
        }
    }
}

#[test]
fn nix_2_3_at_serve_2_5() {
    let mut h = Harness::new(true);
    h.handshake(0x205);

    let r = h.one_request(W::default().u(1).u(0).u(0).u(1).s(TINYDIR));
    assert!(
        matches!(r, Request::QueryValidPaths { lock: false, substitute: false, ref paths } if paths.len() == 1)
    );
    assert_eq!(
        h.respond(Response::ValidPaths(BTreeSet::new())),
        W::default().u(0).0
    );

    // Nix 2.3 probes with QueryPathInfos before uploading; the answer is just "".
    h.one_request(W::default().u(2).u(1).s(TINYDIR));
    assert_eq!(
        h.respond(Response::PathInfos(BTreeMap::new())),
        W::default().s("").0
    );

    let nar = hello_nar();
    let nar_hash = Hash::compute(HashAlgo::Sha256, &nar);
    let events = h.send(
        W::default()
            .u(9)
            .s(TINYDIR)
            .s("")
            .s(nar_hash.to_base16())
            .u(0)
            .u(1795624573)
            .u(120)
            .u(0)
            .u(0)
            .s("")
            .raw(&nar),
    );
    let [Event::Request(Request::AddToStoreNar(hdr)), Event::NarChunk(body), Event::NarEnd] =
        &events[..]
    else {
        panic!("{events:?}")
    };
    assert_eq!(
        (hdr.nar_size, hdr.nar_hash, hdr.ca.as_ref()),
        (120, nar_hash, None)
    );
    assert_eq!(&body[..], &nar[..]);
    assert_eq!(h.respond(Response::Added), W::default().u(1).0);

    // Five option fields at serve 2.5: no keepFailed.
    let r = h.one_request(build_derivation_request().u(0).u(0).u(0).u(0).u(0));
    let Request::BuildDerivation { options, .. } = r else {
        panic!()
    };
    assert!(!options.enforce_determinism && !options.keep_failed);
    // No builtOutputs below serve 2.6, even though the result has them.
    assert_eq!(
        h.respond(Response::Build(Box::new(built()))),
        W::default()
            .u(0)
            .s("")
            .u(1)
            .u(0)
            .u(1795624589)
            .u(1795624590)
            .0
    );

    h.one_request(W::default().u(2).u(1).s(OUT));
    let (info, bytes) = out_info();
    assert_eq!(
        h.respond(Response::PathInfos(BTreeMap::from([(sp(OUT), info)]))),
        bytes.0
    );

    assert_eq!(
        h.one_request(W::default().u(3).s(OUT)),
        Request::DumpStorePath { path: sp(OUT) }
    );
    h.session.send_stream(&nar).unwrap();
    h.session.end_stream().unwrap();
    assert_eq!(h.output(), nar);

    h.session.end_of_input(&h.input).unwrap();
}

#[test]
fn hydra_at_serve_2_6_with_lock_and_import_paths() {
    let mut h = Harness::new(true);
    h.handshake(0x206);

    let r = h.one_request(W::default().u(1).u(1).u(1).u(1).s(TINYDIR));
    assert!(matches!(
        r,
        Request::QueryValidPaths {
            lock: true,
            substitute: true,
            ..
        }
    ));
    assert_eq!(
        h.respond(Response::ValidPaths(BTreeSet::new())),
        W::default().u(0).0
    );

    // ImportPaths: two entries of the export stream, then its end.
    let nar = hello_nar();
    let trailer = |path: &str, refs: &[&str], deriver: &str| {
        let mut w = W::default().u(0x4558494e).s(path).u(refs.len() as u64);
        for r in refs {
            w = w.s(r);
        }
        w.s(deriver).u(0)
    };
    let events = h.send(
        W::default()
            .u(4)
            .u(1)
            .raw(&nar)
            .raw(&trailer(TINYDIR, &[], "").0)
            .u(1)
            .raw(&nar)
            .raw(&trailer(OUT, &[TINYDIR], DRV).0)
            .u(0),
    );
    let expected = [
        Event::Request(Request::ImportPaths),
        Event::NarChunk(nar.clone().into()),
        Event::NarEnd,
        Event::ImportEntry(ExportTrailer {
            path: sp(TINYDIR),
            references: BTreeSet::new(),
            deriver: None,
            legacy_signature: None,
        }),
        Event::NarChunk(nar.clone().into()),
        Event::NarEnd,
        Event::ImportEntry(ExportTrailer {
            path: sp(OUT),
            references: BTreeSet::from([sp(TINYDIR)]),
            deriver: Some(sp(DRV)),
            legacy_signature: None,
        }),
        Event::ImportEnd,
    ];
    assert_eq!(events, expected);
    assert_eq!(h.respond(Response::Imported), W::default().u(1).0);

    // Hydra's options: five fields at serve 2.6 (no keepFailed).
    let r = h.one_request(
        build_derivation_request()
            .u(3600)
            .u(7200)
            .u(1 << 20)
            .u(0)
            .u(0),
    );
    let Request::BuildDerivation { options, .. } = r else {
        panic!()
    };
    assert_eq!(
        (
            options.max_silent_time,
            options.build_timeout,
            options.max_log_size
        ),
        (3600, 7200, 1 << 20)
    );
    let key = format!("sha256:{DRV_HASH}!out");
    let json = format!(
        r#"{{"dependentRealisations":{{}},"id":"{key}","outPath":"wpwkwrk5jm6181g39iml0ljcqflwccwa-trace-host-0","signatures":[]}}"#
    );
    let expected = W::default()
        .u(0)
        .s("")
        .u(1)
        .u(0)
        .u(1795624589)
        .u(1795624590)
        .u(1)
        .s(&key)
        .s(&json);
    assert_eq!(h.respond(Response::Build(Box::new(built()))), expected.0);

    // Hydra asks for all outputs in one QueryPathInfos.
    let r = h.one_request(W::default().u(2).u(2).s(TINYDIR).s(OUT));
    assert!(matches!(r, Request::QueryPathInfos { ref paths } if paths.len() == 2));
    let (info, bytes) = out_info();
    assert_eq!(
        h.respond(Response::PathInfos(BTreeMap::from([(sp(OUT), info)]))),
        bytes.0
    );
    h.session.end_of_input(&h.input).unwrap();
}

#[test]
fn nix_2_8_at_serve_2_7_failure_and_build_paths() {
    let mut h = Harness::new(true);
    h.handshake(0x208);
    assert_eq!(h.session.version(), ProtocolVersion::V2_7);

    // Six option fields at serve 2.7; keepFailed last.
    let r = h.one_request(build_derivation_request().u(0).u(0).u(0).u(0).u(1).u(1));
    let Request::BuildDerivation { options, drv, .. } = r else {
        panic!()
    };
    assert!(options.enforce_determinism && options.keep_failed);
    assert_eq!(drv.args, [b"built 0".to_vec()]);
    let msg = format!("builder for '{DRV}' failed with exit code 1");
    let failed = BuildResult {
        status: BuildStatus::PermanentFailure,
        error_msg: msg.clone().into_bytes(),
        times_built: 1,
        is_non_deterministic: false,
        start_time: 10,
        stop_time: 11,
        built_outputs: BTreeMap::new(),
    };
    // On failure builtOutputs is sent with n = 0.
    assert_eq!(
        h.respond(Response::Build(Box::new(failed))),
        W::default().u(3).s(&msg).u(1).u(0).u(10).u(11).u(0).0
    );

    let r = h.one_request(
        W::default()
            .u(6)
            .u(2)
            .s(format!("{DRV}!out"))
            .s(TINYDIR)
            .u(0)
            .u(0)
            .u(0)
            .u(0)
            .u(1)
            .u(0),
    );
    let Request::BuildPaths { paths, .. } = r else {
        panic!()
    };
    assert_eq!(paths[0].to_wire_string(), format!("{DRV}!out"));
    assert!(paths[1].outputs.is_empty());
    let fail = BuildPathsResult::Failure {
        code: 100,
        msg: b"build failed".to_vec(),
    };
    assert_eq!(
        h.respond(Response::BuildPaths(fail)),
        W::default().u(100).s("build failed").0
    );

    h.one_request(W::default().u(7).u(0).u(1).s(OUT));
    assert_eq!(
        h.respond(Response::Closure(BTreeSet::from([sp(OUT)]))),
        W::default().u(1).s(OUT).0
    );
    h.session.end_of_input(&h.input).unwrap();
}

#[test]
fn read_only_sessions_refuse_writes_as_soon_as_the_opcode_arrives() {
    for (op, msg) in [
        (4, "importing paths is not allowed"),
        (9, "importing paths is not allowed"),
        (6, "building paths is not allowed"),
        (8, "building paths is not allowed"),
    ] {
        let mut h = Harness::new(false);
        h.handshake(0x207);
        h.input.extend_from_slice(&W::default().u(op).0);
        let e = h.session.poll(&mut h.input).unwrap_err();
        assert_eq!(e.to_string(), msg);
        // The session stays dead.
        assert_eq!(h.session.poll(&mut h.input), Err(e));
    }
}

#[test]
fn unknown_commands_and_cut_off_input_are_errors() {
    let mut h = Harness::new(true);
    h.handshake(0x207);
    h.input.extend_from_slice(&W::default().u(13).0);
    assert_eq!(
        h.session.poll(&mut h.input),
        Err(ServeError::UnknownOpcode(13))
    );

    let mut h = Harness::new(true);
    h.handshake(0x207);
    assert!(h.send(W::default().u(1).u(0)).is_empty());
    assert_eq!(
        h.session.end_of_input(&h.input),
        Err(ServeError::UnexpectedEof("in a QueryValidPaths request"))
    );

    let mut h = Harness::new(true);
    assert!(h.send(W::default().u(0x390c9deb)).is_empty());
    // The server answers as soon as the magic is in, like the real one.
    assert_eq!(h.output(), W::default().u(0x5452eecb).u(0x207).0);
    assert_eq!(
        h.session.end_of_input(&h.input),
        Err(ServeError::UnexpectedEof("in the handshake"))
    );

    let mut h = Harness::new(true);
    h.input.extend_from_slice(&W::default().u(0x12345678).0);
    assert!(matches!(
        h.session.poll(&mut h.input),
        Err(ServeError::BadMagic {
            found: 0x12345678,
            ..
        })
    ));
}

#[test]
fn responses_out_of_turn_are_refused() {
    let mut h = Harness::new(true);
    h.handshake(0x207);
    assert!(h.session.respond(&Response::Added).is_err());
    h.one_request(W::default().u(7).u(0).u(0));
    assert!(h.session.respond(&Response::Added).is_err());
    assert!(h.session.send_stream(b"x").is_err());
    // While a response is due the session does not read ahead.
    assert!(h.send(W::default().u(7).u(0).u(0)).is_empty());
    h.session
        .respond(&Response::Closure(BTreeSet::new()))
        .unwrap();
    assert_eq!(h.send(W::default()).len(), 1);
}

#[test]
fn import_paths_fed_byte_by_byte_delimits_each_nar_exactly() {
    let nar = hello_nar();
    let stream = W::default()
        .u(4)
        .u(1)
        .raw(&nar)
        .u(0x4558494e)
        .s(TINYDIR)
        .u(0)
        .s("")
        .u(1)
        .s("legacy")
        .u(0)
        .0;
    let mut h = Harness::new(true);
    h.handshake(0x206);
    let mut events: Vec<Event> = Vec::new();
    for b in stream {
        for e in h.send(W::default().raw(&[b])) {
            // Merge consecutive NAR chunks: how the NAR is split is the driver's business.
            match (events.last_mut(), e) {
                (Some(Event::NarChunk(prev)), Event::NarChunk(next)) => {
                    *prev = [&prev[..], &next[..]].concat().into();
                }
                (_, e) => events.push(e),
            }
        }
    }
    assert_eq!(
        events,
        [
            Event::Request(Request::ImportPaths),
            Event::NarChunk(nar.into()),
            Event::NarEnd,
            Event::ImportEntry(ExportTrailer {
                path: sp(TINYDIR),
                references: BTreeSet::new(),
                deriver: None,
                legacy_signature: Some(b"legacy".to_vec()),
            }),
            Event::ImportEnd,
        ]
    );
    assert_eq!(h.respond(Response::Imported), W::default().u(1).0);
}

#[test]
fn import_paths_with_a_broken_nar_is_an_error() {
    let mut h = Harness::new(true);
    h.handshake(0x206);
    h.input
        .extend_from_slice(&W::default().u(4).u(1).s("nix-archive-2").0);
    assert!(matches!(
        h.session.poll(&mut h.input),
        Ok(Some(Event::Request(Request::ImportPaths)))
    ));
    assert!(matches!(
        h.session.poll(&mut h.input),
        Err(ServeError::ImportNar(_))
    ));
}

#[test]
fn a_12_000_path_request_in_100_byte_pieces_decodes_once_complete() {
    let paths: BTreeSet<StorePath> = (0..12_000u32)
        .map(|i| {
            let mut d = [0u8; 20];
            d[..4].copy_from_slice(&i.to_le_bytes());
            StorePath::from_digest(d, &format!("p-{i}")).unwrap()
        })
        .collect();
    let mut w = W::default().u(1).u(0).u(0).u(paths.len() as u64);
    for p in &paths {
        w = w.s(p.to_absolute());
    }
    let mut h = Harness::new(true);
    h.handshake(0x207);
    let mut events = Vec::new();
    for piece in w.0.chunks(100) {
        events.extend(h.send(W::default().raw(piece)));
    }
    assert_eq!(
        events,
        [Event::Request(Request::QueryValidPaths {
            lock: false,
            substitute: false,
            paths
        })]
    );
}

#[test]
fn a_nar_body_the_driver_reads_itself_ends_the_upload() {
    let mut h = Harness::new(true);
    h.handshake(0x207);
    let nar = hello_nar();
    let nar_hash = Hash::compute(HashAlgo::Sha256, &nar);
    let header = W::default()
        .u(9)
        .s(TINYDIR)
        .s("")
        .s(nar_hash.to_base16())
        .u(0)
        .u(1795624573)
        .u(nar.len() as u64)
        .u(0)
        .u(0)
        .s("");
    // The request and the first 10 bytes of the NAR arrive; the session hands those 10
    // out as a chunk, as usual, and says what remains.
    let mut first = header.0;
    first.extend_from_slice(&nar[..10]);
    h.input.extend_from_slice(&first);
    let Some(Event::Request(Request::AddToStoreNar(_))) = h.session.poll(&mut h.input).unwrap()
    else {
        panic!("expected the request")
    };
    assert_eq!(h.session.nar_body_remaining(), Some(nar.len() as u64));
    assert_eq!(
        &h.input[..],
        &nar[..10],
        "the NAR's start is left in the input"
    );
    // The driver takes it, and reads the rest from the client itself.
    h.input.clear();
    // Taking more or less than what remains is refused, leaving the state as it was.
    assert!(h.session.nar_body_taken(nar.len() as u64 + 1).is_err());
    assert!(h.session.nar_body_taken(nar.len() as u64 - 1).is_err());
    h.session.nar_body_taken(nar.len() as u64).unwrap();
    assert_eq!(h.session.nar_body_remaining(), None);
    // No NarEnd: the session awaits the response at once, and nothing is read meanwhile.
    h.input
        .extend_from_slice(&W::default().u(1).u(0).u(0).u(0).0);
    assert_eq!(h.session.poll(&mut h.input).unwrap(), None);
    assert_eq!(h.respond(Response::Added), W::default().u(1).0);
    // Then the next request.
    assert!(matches!(
        h.session.poll(&mut h.input).unwrap(),
        Some(Event::Request(Request::QueryValidPaths { .. }))
    ));
    // Outside a NAR body there is nothing to take.
    assert_eq!(h.session.nar_body_remaining(), None);
    assert!(h.session.nar_body_taken(0).is_err());
}
