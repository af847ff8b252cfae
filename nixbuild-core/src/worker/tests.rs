//! proptest round trips for every message at every version, whole client sessions fed in
//! any pieces (payloads framed, tunnelled through `STDERR_READ` and raw), and the bounds and
//! errors of the session.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use super::handshake::{CLIENT_MAGIC, SERVER_MAGIC};
use super::strategies::*;
use super::*;
use crate::nar::strategies::arb_nar_node;
use crate::serve::strategies::add_to_store_nar;
use crate::serve::AddToStoreNar;
use crate::store_path::strategies::store_path;
use crate::store_path::StorePath;
use crate::wire::strategies::text;
use crate::wire::{BufMutExt, Reader, Stop};

const DRV: &str = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo.drv";
const FOO: &str = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo";

fn wire_limits() -> wire::Limits {
    wire::Limits::default()
}

fn encode<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> Vec<u8> {
    let mut b = Vec::new();
    f(&mut b);
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn requests_round_trip_at_every_version((v, req) in versioned(|v| request(v).boxed())) {
        let b = encode(|b| req.encode(v, b));
        let mut r = Reader::new(&b);
        prop_assert_eq!(Request::read(&mut r, v, &Limits::default()), Ok(req.clone()));
        prop_assert_eq!(r.remaining(), 0);
        // Every proper prefix is "need more bytes", never an error.
        for cut in [0, b.len() / 2, b.len() - 1] {
            let got = Request::read(&mut Reader::new(&b[..cut]), v, &Limits::default());
            prop_assert_eq!(got, Err(Stop::Incomplete));
        }
    }

    #[test]
    fn responses_round_trip_at_every_version(
        (v, (op, resp)) in versioned(|v| {
            opcode().prop_flat_map(move |op| (Just(op), response(op, v))).boxed()
        })
    ) {
        let b = resp.as_ref().map_or_else(Vec::new, |resp| encode(|b| resp.encode(v, b)));
        let mut r = Reader::new(&b);
        prop_assert_eq!(Response::read(&mut r, op, v, &wire_limits()), Ok(resp.clone()));
        prop_assert_eq!(r.remaining(), 0);
        if !b.is_empty() {
            let got = Response::read(&mut Reader::new(&b[..b.len() - 1]), op, v, &wire_limits());
            prop_assert_eq!(got, Err(Stop::Incomplete));
        }
    }

    #[test]
    fn stderr_messages_round_trip_at_every_version(
        (v, msgs) in versioned(|v| vec(stderr_message(v), 1..4).boxed())
    ) {
        let b = encode(|b| msgs.iter().for_each(|m| m.encode(v, b)));
        let mut r = Reader::new(&b);
        for m in &msgs {
            prop_assert_eq!(&StderrMessage::read(&mut r, v, &wire_limits()).unwrap(), m);
        }
        prop_assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn client_hellos_round_trip(
        (server, hello) in version().prop_flat_map(|s| (Just(s), client_hello(s)))
    ) {
        let b = encode(|b| hello.encode(server, b));
        let mut r = Reader::new(&b);
        ClientHello::read_magic(&mut r).unwrap();
        let version = ClientHello::read_version(&mut r).unwrap();
        let features = match WorkerVersion::negotiate(version, server) >= WorkerVersion::V1_38 {
            true => ClientHello::read_features(&mut r, &wire_limits()).unwrap(),
            false => BTreeSet::new(),
        };
        let (affinity, reserve_space) = ClientHello::read_rest(&mut r).unwrap();
        let read = ClientHello { version, features, affinity, reserve_space };
        prop_assert_eq!(read, hello);
        prop_assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn server_hellos_round_trip(
        (client, hello) in version().prop_flat_map(|c| (Just(c), server_hello(c)))
    ) {
        let v = WorkerVersion::negotiate(client, hello.version);
        let b = encode(|b| {
            hello.encode_start(b);
            if v >= WorkerVersion::V1_38 {
                hello.encode_features(b);
            }
            hello.encode_end(v, b);
        });
        let mut r = Reader::new(&b);
        prop_assert_eq!(ServerHello::read(&mut r, client, &wire_limits()), Ok(hello));
        prop_assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn derived_paths_round_trip((v, p) in versioned(|v| derived_path(v).boxed())) {
        let s = p.to_wire_string(v);
        prop_assert_eq!(DerivedPath::parse(s.as_bytes(), v, 0), Ok(p));
    }

    #[test]
    fn request_decoder_never_panics(
        v in version(),
        op in 0u64..48,
        tail in vec(any::<u8>(), 0..256),
    ) {
        let b = [&op.to_le_bytes()[..], &tail].concat();
        let _ = Request::read(&mut Reader::new(&b), v, &Limits::default());
        if let Ok(op) = Opcode::from_wire(op) {
            let _ = Response::read(&mut Reader::new(&tail), op, v, &wire_limits());
        }
        let _ = StderrMessage::read(&mut Reader::new(&tail), v, &wire_limits());
    }
}

#[test]
fn derived_paths_parse_like_upstream() {
    let drv = StorePath::from_absolute_path(DRV.as_bytes()).unwrap();
    let all = DerivedPath::Built {
        drv: drv.clone(),
        outputs: OutputsSpec::All,
    };
    let parse = |s: &str, v| DerivedPath::parse(s.as_bytes(), v, 0);
    // A bare derivation is all of its outputs before 1.30, the file itself from 1.30 on.
    assert_eq!(parse(DRV, WorkerVersion::V1_21), Ok(all.clone()));
    assert_eq!(
        parse(DRV, WorkerVersion::V1_30),
        Ok(DerivedPath::Opaque(drv.clone()))
    );
    assert_eq!(parse(&format!("{DRV}!*"), WorkerVersion::V1_30), Ok(all));
    let names = parse(&format!("{DRV}!out,,dev"), WorkerVersion::V1_21).unwrap();
    assert_eq!(
        names.to_wire_string(WorkerVersion::V1_21),
        format!("{DRV}!dev,out")
    );
    for bad in [
        format!("{DRV}!"),
        format!("{DRV}!,"),
        format!("{DRV}!a b"),
        format!("{FOO}!out"),
    ] {
        assert!(
            matches!(
                parse(&bad, WorkerVersion::V1_38),
                Err(Stop::Invalid(WorkerError::Malformed {
                    field: "derived path",
                    ..
                }))
            ),
            "{bad}"
        );
    }
}

// Whole sessions.

/// What follows a request on the wire.
#[derive(Debug, Clone)]
enum Payload {
    None,
    /// AddToStoreNar's NAR: framed from 1.23 on, tunnelled before.
    Nar(Vec<u8>),
    /// AddToStore's dump from 1.25 on, AddBuildLog's log: framed.
    Framed(Vec<u8>),
    /// AddToStore's NAR before 1.25: raw.
    RawNar(Vec<u8>),
    /// AddMultipleToStore's paths, in one framed stream.
    Multiple(Vec<(AddToStoreNar, Vec<u8>)>),
}

/// One request of a client session and its payload.
#[derive(Debug, Clone)]
struct Step {
    request: Request,
    payload: Payload,
}

/// A small NAR from the NAR strategies.
fn small_nar() -> impl Strategy<Value = Vec<u8>> {
    arb_nar_node().prop_filter_map("a small NAR", |n| {
        n.to_nar().ok().filter(|nar| nar.len() < 1 << 14)
    })
}

/// An AddToStoreNar header for `nar`.
fn header_for(nar: Vec<u8>) -> impl Strategy<Value = (AddToStoreNar, Vec<u8>)> {
    add_to_store_nar().prop_map(move |mut info| {
        info.nar_size = nar.len() as u64;
        (info, nar.clone())
    })
}

fn has_payload(r: &Request) -> bool {
    matches!(
        r,
        Request::AddToStoreNar { .. }
            | Request::AddToStore { .. }
            | Request::AddBuildLog(_)
            | Request::AddMultipleToStore { .. }
    )
}

/// A request of a session at version `v`, with its payload.
fn step(v: WorkerVersion) -> impl Strategy<Value = Step> {
    let flat = vec(any::<u8>(), 0..300);
    let to_store_payload = match v >= WorkerVersion::V1_25 {
        true => flat.clone().prop_map(Payload::Framed).boxed(),
        false => small_nar().prop_map(Payload::RawNar).boxed(),
    };
    prop_oneof![
        4 => request(v)
            .prop_filter("no payload", |r| !has_payload(r))
            .prop_map(|request| Step { request, payload: Payload::None }),
        1 => (small_nar().prop_flat_map(header_for), any::<bool>(), any::<bool>()).prop_map(
            |((info, nar), repair, dont_check_sigs)| Step {
                request: Request::AddToStoreNar {
                    info: Box::new(info),
                    repair,
                    dont_check_sigs,
                },
                payload: Payload::Nar(nar),
            }
        ),
        1 => (text(), add_to_store_form(v), to_store_payload).prop_map(|(name, form, payload)| {
            Step { request: Request::AddToStore { name, form }, payload }
        }),
        1 => (store_path(), flat).prop_map(|(p, log)| Step {
            request: Request::AddBuildLog(p),
            payload: Payload::Framed(log),
        }),
        1 => (
            any::<bool>(),
            any::<bool>(),
            vec(small_nar().prop_flat_map(header_for), 0..3),
        )
            .prop_map(|(repair, dont_check_sigs, paths)| Step {
                request: Request::AddMultipleToStore { repair, dont_check_sigs },
                payload: Payload::Multiple(paths),
            }),
    ]
}

/// What the client sends: bytes it sends at once, or a NAR it sends only as the server asks
/// for it with `STDERR_READ`.
#[derive(Debug)]
enum Segment {
    Fixed(Vec<u8>),
    Tunnel(Vec<u8>),
}

/// `data` as a framed stream of frames of `frame` bytes, and the empty frame that ends it.
fn framed(data: &[u8], frame: usize) -> Vec<u8> {
    let mut b = Vec::new();
    for chunk in data.chunks(frame) {
        b.put_wire_u64(chunk.len() as u64);
        b.extend_from_slice(chunk);
    }
    b.put_wire_u64(0);
    b
}

/// The client's side of a session, and the events a server should see.
fn client(
    hello: &ClientHello,
    steps: &[Step],
    frame: usize,
    server: &ServerHello,
) -> (Vec<Segment>, Vec<Event>) {
    let v = WorkerVersion::negotiate(hello.version, server.version);
    let mut segments = vec![Segment::Fixed(encode(|b| hello.encode(server.version, b)))];
    let mut events = vec![Event::Hello {
        client: hello.version,
        negotiated: v,
        features: hello.features.clone(),
    }];
    let data = |events: &mut Vec<Event>, d: &[u8]| {
        if !d.is_empty() {
            events.push(Event::Data(Bytes::copy_from_slice(d)));
        }
        events.push(Event::DataEnd);
    };
    for s in steps {
        segments.push(Segment::Fixed(encode(|b| s.request.encode(v, b))));
        events.push(Event::Request(s.request.clone()));
        match &s.payload {
            Payload::None => {}
            Payload::Nar(nar) if v >= WorkerVersion::V1_23 => {
                segments.push(Segment::Fixed(framed(nar, frame)));
                data(&mut events, nar);
            }
            Payload::Nar(nar) => {
                segments.push(Segment::Tunnel(nar.clone()));
                data(&mut events, nar);
            }
            Payload::Framed(d) => {
                segments.push(Segment::Fixed(framed(d, frame)));
                data(&mut events, d);
            }
            Payload::RawNar(nar) => {
                segments.push(Segment::Fixed(nar.clone()));
                data(&mut events, nar);
            }
            Payload::Multiple(paths) => {
                let mut stream = Vec::new();
                stream.put_wire_u64(paths.len() as u64);
                for (info, nar) in paths {
                    info.encode(&mut stream);
                    stream.extend_from_slice(nar);
                    events.push(Event::AddPath(Box::new(info.clone())));
                    data(&mut events, nar);
                }
                segments.push(Segment::Fixed(framed(&stream, frame)));
                events.push(Event::AddEnd);
            }
        }
    }
    (segments, events)
}

fn server_hello_38() -> ServerHello {
    ServerHello {
        version: WorkerVersion::SERVER,
        features: BTreeSet::new(),
        nix_version: "nixbuild-test".to_owned(),
        trust: Trust::Trusted,
    }
}

/// Answers whatever request awaits an answer (payload requests wait for their data); `true`
/// if it did.
fn answer(s: &mut ServerSession) -> bool {
    if s.start_stream().is_ok() {
        s.end_stream().unwrap();
        return true;
    }
    s.respond(&Response::Nothing).is_ok()
}

/// Plays the client of `segments`, of version `client`, against a session, delivering its bytes in pieces of the
/// sizes in `pieces` (cycled) and answering each `STDERR_READ` with at most `tunnel` bytes;
/// returns the session's events, consecutive `Data` merged.
fn drive(
    client: WorkerVersion,
    segments: &[Segment],
    server: &ServerHello,
    pieces: &[usize],
    tunnel: usize,
) -> Result<Vec<Event>, WorkerError> {
    let mut s = ServerSession::new(server.clone(), Limits::default());
    let (mut input, mut events) = (BytesMut::new(), Vec::<Event>::new());
    // Sent by the client and not yet delivered; what the server wrote and the client has not
    // read; the segment the client is at, and how far into a tunnelled NAR.
    let (mut queue, mut out) = (std::collections::VecDeque::new(), BytesMut::new());
    let (mut seg, mut sent, mut greeted) = (0, 0, false);
    let mut piece = pieces.iter().cycle();
    loop {
        while let Some(segment) = segments.get(seg) {
            match segment {
                Segment::Fixed(b) => queue.extend(b),
                // The client reads the server's hello before anything else.
                Segment::Tunnel(_) if !greeted => break,
                Segment::Tunnel(nar) => {
                    // Only STDERR_READs are written while a NAR is tunnelled.
                    let v = s.version();
                    while let Some(m) = wire::decode_buf(&mut out, |r: &mut Reader<'_>| {
                        StderrMessage::read(r, v, &wire_limits())
                    })? {
                        let StderrMessage::Read(n) = m else {
                            panic!("{m:?} while tunnelling")
                        };
                        let n = (n as usize).min(tunnel).min(nar.len() - sent);
                        queue.extend(encode(|b| b.put_wire_bytes(&nar[sent..sent + n])));
                        sent += n;
                    }
                    if sent < nar.len() {
                        break;
                    }
                    sent = 0;
                }
            }
            seg += 1;
        }
        if queue.is_empty() {
            assert_eq!(seg, segments.len(), "the session stalled");
            break;
        }
        let n = (*piece.next().unwrap()).min(queue.len());
        input.extend(queue.drain(..n));
        while let Some(ev) = s.poll(&mut input)? {
            let hello = matches!(ev, Event::Hello { .. });
            match (ev, events.last_mut()) {
                (Event::Data(b), Some(Event::Data(last))) => {
                    assert!(!b.is_empty());
                    *last = [&last[..], &b].concat().into();
                }
                (ev, _) => events.push(ev),
            }
            if hello {
                out.extend_from_slice(&s.take_output());
                let mut r = Reader::new(&out);
                let read = ServerHello::read(&mut r, client, &wire_limits()).unwrap();
                let v = WorkerVersion::negotiate(client, server.version);
                assert_eq!(read.nix_version.is_empty(), v < WorkerVersion::V1_33);
                assert_eq!(r.remaining(), 0);
                out.clear();
                greeted = true;
            }
            if answer(&mut s) {
                // The answer is not for the tunnel.
                s.take_output();
                out.clear();
            }
        }
        out.extend_from_slice(&s.take_output());
    }
    s.end_of_input(&input)?;
    assert!(input.is_empty());
    Ok(events)
}

/// A server version, a client's hello, its requests, the frame size of its framed payloads,
/// the piece sizes its bytes arrive in and the most it answers a `STDERR_READ` with.
type SessionCase = (
    WorkerVersion,
    ClientHello,
    Vec<Step>,
    usize,
    Vec<usize>,
    usize,
);

fn session_case() -> impl Strategy<Value = SessionCase> {
    prop_oneof![Just(WorkerVersion::SERVER), version()]
        .prop_flat_map(|server| (Just(server), client_hello(server)))
        .prop_flat_map(|(server, hello)| {
            let v = WorkerVersion::negotiate(hello.version, server);
            (
                Just(server),
                Just(hello),
                vec(step(v), 0..6),
                1usize..200,
                vec(1usize..100, 1..6),
                1usize..100,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A whole client session, with payloads of every kind, gives the events expected, fed
    /// whole or in any pieces.
    #[test]
    fn client_sessions_give_the_same_events_in_any_pieces(
        (version, hello, steps, frame, pieces, tunnel) in session_case()
    ) {
        let server = ServerHello { version, ..server_hello_38() };
        let (segments, expected) = client(&hello, &steps, frame, &server);
        let whole = drive(hello.version, &segments, &server, &[usize::MAX], usize::MAX).unwrap();
        prop_assert_eq!(&whole, &expected);
        let pieces = drive(hello.version, &segments, &server, &pieces, tunnel).unwrap();
        prop_assert_eq!(&pieces, &expected);
    }
}

// Bounds and errors.

/// A session that has greeted a client of version `client`.
fn greeted(client: WorkerVersion, limits: Limits) -> ServerSession {
    let mut s = ServerSession::new(server_hello_38(), limits);
    let hello = ClientHello {
        version: client,
        features: BTreeSet::new(),
        affinity: None,
        reserve_space: false,
    };
    let mut b = BytesMut::from(&encode(|b| hello.encode(WorkerVersion::SERVER, b))[..]);
    assert!(matches!(s.poll(&mut b), Ok(Some(Event::Hello { .. }))));
    assert!(b.is_empty());
    s.take_output();
    s
}

/// Feeds `bytes` at once, answering every request; the events, or the first error.
fn feed(s: &mut ServerSession, bytes: &[u8]) -> Result<Vec<Event>, WorkerError> {
    let mut input = BytesMut::from(bytes);
    let mut events = Vec::new();
    while let Some(ev) = s.poll(&mut input)? {
        events.push(ev);
        answer(s);
    }
    Ok(events)
}

fn words(ws: &[u64]) -> Vec<u8> {
    encode(|b| ws.iter().for_each(|&w| b.put_wire_u64(w)))
}

fn foo_header(nar_size: u64) -> AddToStoreNar {
    AddToStoreNar {
        path: StorePath::from_absolute_path(FOO.as_bytes()).unwrap(),
        deriver: None,
        nar_hash: crate::hash::Hash::compute(crate::hash::HashAlgo::Sha256, b""),
        references: BTreeSet::new(),
        registration_time: 0,
        nar_size,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: None,
    }
}

fn nar_request(nar_size: u64, v: WorkerVersion) -> Vec<u8> {
    let req = Request::AddToStoreNar {
        info: Box::new(foo_header(nar_size)),
        repair: false,
        dont_check_sigs: false,
    };
    encode(|b| req.encode(v, b))
}

fn is_payload_error(r: Result<Vec<Event>, WorkerError>, what: &str) -> bool {
    matches!(&r, Err(WorkerError::Payload(m)) if m.contains(what))
}

/// A length or count over the limits fails as soon as its 8-byte prefix is in: the session
/// does not wait for the megabytes it announces.
#[test]
fn a_string_or_count_over_the_limits_fails_as_soon_as_its_prefix_is_in() {
    let v = WorkerVersion::V1_38;
    let long = wire::Limits::default().max_string_len as u64 + 1;
    let cases: Vec<Vec<u8>> = vec![
        words(&[1, 4097]),        // IsValidPath: a 4 KiB + 1 path
        words(&[1, 1 << 62]),     // IsValidPath
        words(&[31, u64::MAX]),   // QueryValidPaths: the count
        words(&[31, 1, 1 << 40]), // QueryValidPaths: a path in it
        words(&[9, 1 << 30]),     // BuildPaths: the count
        [words(&[8, 1]), b"x\0\0\0\0\0\0\0".to_vec(), words(&[long])].concat(), // text
        [words(&[19]), vec![0; 96], words(&[u64::MAX])].concat(), // SetOptions' overrides
        words(&[36, 1 << 40]),    // BuildDerivation's drvPath
        words(&[42, long]),       // RegisterDrvOutput's JSON
    ];
    for b in cases {
        let mut s = greeted(v, Limits::default());
        let e = feed(&mut s, &b).unwrap_err();
        assert!(
            matches!(
                e,
                WorkerError::Wire(
                    wire::WireError::StringTooLong { .. } | wire::WireError::TooManyElements { .. }
                )
            ),
            "{b:?}: {e}"
        );
        // The session is dead and says so again.
        assert_eq!(feed(&mut s, &[]), Err(e));
    }
    // The client's feature set at 1.38.
    let mut s = ServerSession::new(server_hello_38(), Limits::default());
    let e = feed(&mut s, &words(&[CLIENT_MAGIC, 0x126, 1 << 40])).unwrap_err();
    assert!(
        matches!(
            e,
            WorkerError::Wire(wire::WireError::TooManyElements { .. })
        ),
        "{e}"
    );
    // Tighter limits are held to just the same.
    let tight = Limits {
        wire: wire::Limits {
            max_string_len: 100,
            max_short_string_len: 64,
            max_list_len: 3,
        },
        max_nar_size: 1000,
    };
    for b in [words(&[1, 65]), words(&[31, 4]), words(&[8, 65])] {
        let e = feed(&mut greeted(v, tight), &b).unwrap_err();
        assert!(matches!(e, WorkerError::Wire(_)), "{b:?}: {e}");
    }
    let e = feed(&mut greeted(v, tight), &nar_request(1001, v)).unwrap_err();
    assert!(matches!(e, WorkerError::Value(_)), "{e}");
}

/// An AddMultipleToStore stream whose path metadata never ends is refused once it passes the
/// bound, not buffered without end.
#[test]
fn oversized_add_multiple_to_store_metadata_fails() {
    let v = WorkerVersion::V1_38;
    // The bound is the larger of max_string_len and 64 KiB.
    let limits = Limits {
        wire: wire::Limits {
            max_string_len: 1000,
            ..wire::Limits::default()
        },
        ..Limits::default()
    };
    let mut s = greeted(v, limits);
    let mut stream = words(&[1]);
    stream.put_wire_bytes(FOO.as_bytes());
    stream.put_wire_bytes(b"");
    stream.put_wire_bytes(&[b'0'; 64]);
    stream.put_wire_u64(3000);
    for _ in 0..3000 {
        stream.put_wire_bytes(FOO.as_bytes());
    }
    let b = [words(&[44, 0, 0]), framed(&stream, 4096)].concat();
    // Fed in pieces, it fails before the end of the references.
    let mut input = BytesMut::new();
    let mut fed = 0;
    let e = loop {
        input.extend_from_slice(&b[fed..fed + 1000]);
        fed += 1000;
        match s.poll(&mut input) {
            Ok(None) => {}
            Ok(Some(ev)) => assert!(matches!(ev, Event::Request(_)), "{ev:?}"),
            Err(e) => break e,
        }
    };
    assert!(fed < 100_000, "{fed}");
    assert!(
        matches!(&e, WorkerError::Payload(m) if m.contains("metadata is longer than 65536")),
        "{e}"
    );
}

/// A framed NAR shorter or longer than the narSize its request announced fails, saying so.
#[test]
fn a_framed_nar_of_the_wrong_size_fails_clearly() {
    let v = WorkerVersion::V1_38;
    let req = nar_request(16, v);
    let ok = feed(
        &mut greeted(v, Limits::default()),
        &[&req[..], &framed(&[1; 16], 5)].concat(),
    );
    let ok = ok.unwrap();
    assert_eq!(ok.last(), Some(&Event::DataEnd));
    let short = feed(
        &mut greeted(v, Limits::default()),
        &[&req[..], &framed(&[1; 8], 5)].concat(),
    );
    assert!(
        is_payload_error(short.clone(), "ended 8 bytes before narSize"),
        "{short:?}"
    );
    let long = feed(
        &mut greeted(v, Limits::default()),
        &[&req[..], &framed(&[1; 24], 5)].concat(),
    );
    assert!(
        is_payload_error(long.clone(), "goes on after narSize"),
        "{long:?}"
    );
    // A path of an AddMultipleToStore stream whose NAR is cut short.
    let mut stream = words(&[1]);
    foo_header(16).encode(&mut stream);
    stream.extend_from_slice(&[1; 8]);
    let b = [words(&[44, 0, 0]), framed(&stream, 7)].concat();
    let cut = feed(&mut greeted(v, Limits::default()), &b);
    assert!(
        is_payload_error(cut.clone(), "ended inside a NAR"),
        "{cut:?}"
    );
}

/// Bytes after the last path of an AddMultipleToStore stream, before its end, are refused.
#[test]
fn trailing_data_after_add_multiple_to_stores_last_path_fails() {
    let v = WorkerVersion::V1_38;
    let mut one = words(&[1]);
    foo_header(16).encode(&mut one);
    one.extend_from_slice(&[1; 16]);
    for stream in [words(&[0, 0]), [&one[..], &[0]].concat(), words(&[0, 7])] {
        for frame in [1, 8, 1000] {
            let b = [words(&[44, 0, 0]), framed(&stream, frame)].concat();
            let r = feed(&mut greeted(v, Limits::default()), &b);
            assert!(
                is_payload_error(r.clone(), "data after the last path"),
                "{r:?}"
            );
        }
    }
    // Without the extra bytes, the stream is fine.
    let b = [words(&[44, 0, 0]), framed(&one, 3)].concat();
    let events = feed(&mut greeted(v, Limits::default()), &b).unwrap();
    assert_eq!(events.last(), Some(&Event::AddEnd));
}

#[test]
fn a_bad_magic_or_an_old_version_fails_the_handshake() {
    let session = || ServerSession::new(server_hello_38(), Limits::default());
    assert_eq!(
        feed(&mut session(), &words(&[SERVER_MAGIC])),
        Err(WorkerError::BadMagic {
            expected: CLIENT_MAGIC,
            found: SERVER_MAGIC
        })
    );
    for version in [0x114, 0x10a, 0x0, 0x215, 0x1_0126] {
        assert_eq!(
            feed(&mut session(), &words(&[CLIENT_MAGIC, version])),
            Err(WorkerError::UnsupportedVersion(version)),
            "{version:#x}"
        );
    }
    // The oldest client served.
    let ok = feed(&mut session(), &words(&[CLIENT_MAGIC, 0x115, 0, 0])).unwrap();
    assert!(matches!(
        ok[..],
        [Event::Hello {
            negotiated: WorkerVersion::V1_21,
            ..
        }]
    ));
}

#[test]
fn end_of_input_mid_request_or_mid_payload_is_unexpected_eof() {
    let v = WorkerVersion::V1_38;
    let request = |b: &[u8]| {
        let mut s = greeted(v, Limits::default());
        let mut input = BytesMut::from(b);
        while let Ok(Some(_)) = s.poll(&mut input) {
            answer(&mut s);
        }
        s.end_of_input(&input)
    };
    let path = encode(|b| {
        Request::IsValidPath(StorePath::from_absolute_path(FOO.as_bytes()).unwrap()).encode(v, b)
    });
    assert_eq!(request(&path), Ok(()));
    assert_eq!(request(&[]), Ok(()));
    for (cut, what) in [
        (1, "in a request"),
        (7, "in a request"),
        (8, "in an IsValidPath request"),
        (9, "in an IsValidPath request"),
        (path.len() - 1, "in an IsValidPath request"),
    ] {
        assert_eq!(
            request(&path[..cut]),
            Err(WorkerError::UnexpectedEof(what.to_owned())),
            "{cut}"
        );
    }
    let nar = nar_request(16, v);
    let payload = Err(WorkerError::UnexpectedEof(
        "in the data that follows an AddToStoreNar request".to_owned(),
    ));
    assert_eq!(request(&nar), payload);
    assert_eq!(
        request(&[&nar[..], &framed(&[1; 16], 4)[..20]].concat()),
        payload
    );
    assert_eq!(request(&[&nar[..], &framed(&[1; 16], 4)].concat()), Ok(()));
    // Mid-handshake.
    let mut s = ServerSession::new(server_hello_38(), Limits::default());
    let mut input = BytesMut::from(&words(&[CLIENT_MAGIC, 0x126])[..]);
    assert_eq!(s.poll(&mut input), Ok(None));
    assert_eq!(
        s.end_of_input(&input),
        Err(WorkerError::UnexpectedEof("in the handshake".to_owned()))
    );
}

/// At 1.21 and 1.22 the server asks for AddToStoreNar's NAR with `STDERR_READ`, at most
/// 64 KiB at a time; an empty or oversized answer is refused.
#[test]
fn a_tunnelled_nar_is_asked_for_and_checked() {
    let v = WorkerVersion::V1_22;
    let mut s = greeted(v, Limits::default());
    let mut input = BytesMut::from(&nar_request(100_000, v)[..]);
    assert!(matches!(s.poll(&mut input), Ok(Some(Event::Request(_)))));
    assert_eq!(s.poll(&mut input), Ok(None));
    let read = |s: &mut ServerSession| {
        let out = s.take_output();
        wire::complete(StderrMessage::read(
            &mut Reader::new(&out),
            v,
            &wire_limits(),
        ))
    };
    assert_eq!(read(&mut s), Ok(Some(StderrMessage::Read(65_536))));
    input.extend_from_slice(&encode(|b| b.put_wire_bytes(&[7; 65_536])));
    assert!(matches!(s.poll(&mut input), Ok(Some(Event::Data(d))) if d.len() == 65_536));
    assert_eq!(s.poll(&mut input), Ok(None));
    assert_eq!(read(&mut s), Ok(Some(StderrMessage::Read(34_464))));
    // More than asked for.
    let mut more = BytesMut::from(&encode(|b| b.put_wire_bytes(&[7; 34_465]))[..]);
    let e = s.poll(&mut more).unwrap_err();
    assert!(
        matches!(e, WorkerError::Wire(wire::WireError::StringTooLong { .. })),
        "{e}"
    );
    // Nothing at all.
    let mut s = greeted(v, Limits::default());
    let mut input = BytesMut::from(&nar_request(10, v)[..]);
    assert!(matches!(s.poll(&mut input), Ok(Some(Event::Request(_)))));
    assert_eq!(s.poll(&mut input), Ok(None));
    input.extend_from_slice(&words(&[0]));
    let r = s.poll(&mut input).map(|e| e.into_iter().collect());
    assert!(
        is_payload_error(r.clone(), "no data for STDERR_READ"),
        "{r:?}"
    );
}

/// The answers to OptimiseStore (`1`), CollectGarbage (paths, bytes freed, an obsolete 0) and
/// AddPermRoot (the root, not a store path) read as Nix's daemon writes them
/// (docs/worker-protocol.md §5.1); they were read as an empty set and an optional store path.
#[test]
fn gc_answers_read_as_nix_writes_them() {
    let v = WorkerVersion::V1_38;
    let read = |op, b: &[u8]| {
        let mut r = Reader::new(b);
        let got = Response::read(&mut r, op, v, &wire_limits())
            .unwrap()
            .unwrap();
        assert_eq!(r.remaining(), 0, "{op:?}");
        assert_eq!(encode(|buf| got.encode(v, buf)), b, "{op:?}");
        got
    };
    assert_eq!(read(Opcode::OptimiseStore, &words(&[1])), Response::Int(1));
    let gc = [encode(|b| b.put_wire_strings([FOO])), words(&[4096, 0])].concat();
    assert_eq!(
        read(Opcode::CollectGarbage, &gc),
        Response::Collected {
            paths: BTreeSet::from([FOO.to_owned()]),
            bytes_freed: 4096
        }
    );
    let root = encode(|b| b.put_wire_bytes(b"/home/alice/result"));
    assert_eq!(
        read(Opcode::AddPermRoot, &root),
        Response::GcRoot("/home/alice/result".to_owned())
    );
}
