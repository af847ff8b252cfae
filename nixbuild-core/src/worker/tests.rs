//! proptest round trips for every message at every version, whole client sessions fed in
//! any pieces (payloads framed, tunnelled through `STDERR_READ` and raw), and the bounds and
//! errors of the session.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::BTreeSet;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

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

fn session_case() -> impl Strategy<Value = (ClientHello, Vec<Step>, usize, Vec<usize>, usize)> {
    client_hello(WorkerVersion::SERVER).prop_flat_map(|hello| {
        let v = hello.version;
        (
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
        (hello, steps, frame, pieces, tunnel) in session_case()
    ) {
        let server = server_hello_38();
        let (segments, expected) = client(&hello, &steps, frame, &server);
        let whole = drive(hello.version, &segments, &server, &[usize::MAX], usize::MAX).unwrap();
        prop_assert_eq!(&whole, &expected);
        let pieces = drive(hello.version, &segments, &server, &pieces, tunnel).unwrap();
        prop_assert_eq!(&pieces, &expected);
    }
}
