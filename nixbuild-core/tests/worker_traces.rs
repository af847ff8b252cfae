//! Golden tests over the 36 recorded `nix-daemon --stdio` sessions in
//! `tests/data/traces/worker/` (docs/worker-protocol.md §11): the client's side decodes
//! exactly through [`ServerSession`], fed in pieces of 1, 7 and 4096 bytes, with the same
//! events each time and every request re-encoding to its bytes; every NAR uploaded matches
//! the hash and size its metadata claims; and the server's side decodes exactly as a client
//! reads it, every answer re-encoding to its bytes.
// A panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bytes::BytesMut;
use nixbuild_core::nar::NarValidator;
use nixbuild_core::wire::{self, Reader};
use nixbuild_core::worker::{
    Event, Limits, Opcode, Response, ServerHello, ServerSession, StderrMessage, Trust,
    WorkerVersion,
};

const TRACES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/traces/worker");

fn sessions() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(TRACES)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".in").map(str::to_owned)
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 36, "{names:?}");
    names
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{TRACES}/{name}")).unwrap()
}

/// The version a real server of the recording advertised (its hello's second u64).
fn server_version(out: &[u8]) -> WorkerVersion {
    WorkerVersion::from_wire(u64::from_le_bytes(out[8..16].try_into().unwrap())).unwrap()
}

/// A session like the recorded server: same version, trusted.
fn session(server: WorkerVersion) -> ServerSession {
    let hello = ServerHello {
        version: server,
        features: BTreeSet::new(),
        nix_version: "nixbuild-test".to_owned(),
        trust: Trust::Trusted,
    };
    ServerSession::new(hello, Limits::default())
}

/// Feeds `input` to a session in pieces of `piece` bytes, answering every request with a
/// placeholder, and returns the events (Data merged per payload) with the requests' opcodes
/// and the bytes each request was read from.
fn replay(input: &[u8], server: WorkerVersion, piece: usize) -> (Vec<Event>, Vec<Opcode>) {
    let (events, ops, _) = replay_with_bytes(input, server, piece);
    (events, ops)
}

fn replay_with_bytes(
    input: &[u8],
    server: WorkerVersion,
    piece: usize,
) -> (Vec<Event>, Vec<Opcode>, Vec<Vec<u8>>) {
    let mut s = session(server);
    let mut buf = BytesMut::new();
    let (mut events, mut ops, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let mut data: Vec<u8> = Vec::new();
    let mut fed = 0;
    for chunk in input.chunks(piece) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            let before = fed - buf.len();
            let Some(ev) = s.poll(&mut buf).unwrap() else {
                break;
            };
            if matches!(ev, Event::Request(_)) {
                bytes.push(input[before..fed - buf.len()].to_vec());
            }
            match ev {
                Event::Data(b) => {
                    data.extend_from_slice(&b);
                    continue;
                }
                Event::DataEnd => {
                    events.push(Event::Data(std::mem::take(&mut data).into()));
                    events.push(Event::DataEnd);
                }
                Event::Request(ref r) => {
                    ops.push(r.opcode());
                    events.push(ev);
                }
                ev => events.push(ev),
            }
            answer(&mut s);
        }
        s.take_output();
    }
    s.end_of_input(&buf).unwrap();
    assert!(buf.is_empty());
    (events, ops, bytes)
}

/// Answers whatever request awaits an answer (payload requests wait for their data).
fn answer(s: &mut ServerSession) {
    if s.start_stream().is_ok() {
        s.end_stream().unwrap();
        return;
    }
    let _ = s.respond(&Response::Nothing);
}

#[test]
fn every_client_session_decodes_exactly_in_any_pieces() {
    for name in sessions() {
        let input = read(&format!("{name}.in"));
        let server = server_version(&read(&format!("{name}.out")));
        let (whole, ops) = replay(&input, server, input.len());
        assert!(matches!(whole[0], Event::Hello { .. }), "{name}");
        assert!(!ops.is_empty() || name.contains("ping"), "{name}: {ops:?}");
        for piece in [1, 7, 4096] {
            let (events, _) = replay(&input, server, piece);
            assert_eq!(events, whole, "{name} in pieces of {piece}");
        }
        // Each request re-encodes to the bytes it was read from.
        let (_, _, bytes) = replay_with_bytes(&input, server, input.len());
        let Event::Hello { negotiated, .. } = whole[0] else {
            unreachable!()
        };
        let requests = whole.iter().filter_map(|ev| match ev {
            Event::Request(r) => Some(r),
            _ => None,
        });
        for (r, original) in requests.zip(&bytes) {
            let mut b = Vec::new();
            r.encode(negotiated, &mut b);
            assert_eq!(&b, original, "{name}: {r:?}");
        }
        // The NAR of every uploaded path is what its metadata claims.
        let mut claimed = None;
        for ev in &whole {
            match ev {
                Event::AddPath(info) => claimed = Some((info.nar_hash, info.nar_size)),
                Event::Data(nar) if claimed.is_some() => {
                    let (hash, size) = claimed.take().unwrap();
                    let mut v = NarValidator::new();
                    assert_eq!(v.feed(nar).unwrap(), nar.len(), "{name}");
                    let summary = v.finish().unwrap();
                    assert_eq!((summary.nar_hash, summary.nar_size), (hash, size), "{name}");
                }
                _ => {}
            }
        }
    }
}

#[test]
fn every_server_answer_decodes_exactly_and_re_encodes() {
    let limits = Limits::default().wire;
    for name in sessions() {
        let input = read(&format!("{name}.in"));
        let output = read(&format!("{name}.out"));
        let server = server_version(&output);
        let (events, ops) = replay(&input, server, input.len());
        let Event::Hello {
            client, negotiated, ..
        } = events[0]
        else {
            unreachable!()
        };
        let mut r = Reader::new(&output);
        let hello = wire::complete(ServerHello::read(&mut r, client, &limits))
            .unwrap()
            .unwrap();
        assert_eq!(hello.version, server, "{name}");
        assert!(!hello.nix_version.is_empty(), "{name}");
        for op in ops {
            // The log channel up to LAST.
            loop {
                let msg = wire::complete(StderrMessage::read(&mut r, negotiated, &limits));
                match msg
                    .unwrap_or_else(|e| panic!("{name}: {op:?}: {e}"))
                    .unwrap()
                {
                    StderrMessage::Last => break,
                    StderrMessage::Error(e) => panic!("{name}: {op:?} failed: {e:?}"),
                    _ => {}
                }
            }
            let start = r.position();
            let answer = wire::complete(Response::read(&mut r, op, negotiated, &limits))
                .unwrap_or_else(|e| panic!("{name}: {op:?}: {e}"))
                .unwrap();
            match answer {
                None => {
                    let mut v = NarValidator::new();
                    let n = v.feed(&output[start..]).unwrap();
                    v.finish().unwrap();
                    r.take(n).unwrap();
                }
                Some(answer) => {
                    let mut b = Vec::new();
                    answer.encode(negotiated, &mut b);
                    assert_eq!(b, output[start..r.position()], "{name}: {op:?}");
                }
            }
        }
        assert_eq!(
            r.remaining(),
            0,
            "{name}: the server said more than was read"
        );
    }
}

#[test]
fn our_handshake_is_the_recorded_servers_but_for_its_version_string() {
    for name in sessions().iter().filter(|n| n.contains("ping")) {
        let input = read(&format!("{name}.in"));
        let output = read(&format!("{name}.out"));
        let server = server_version(&output);
        let mut s = session(server);
        let mut buf = BytesMut::from(&input[..]);
        assert!(matches!(
            s.poll(&mut buf).unwrap(),
            Some(Event::Hello { .. })
        ));
        let ours = s.take_output();
        let limits = Limits::default().wire;
        let Some(Event::Hello { client, .. }) = session(server)
            .poll(&mut BytesMut::from(&input[..]))
            .unwrap()
        else {
            unreachable!()
        };
        let theirs = wire::complete(ServerHello::read(
            &mut Reader::new(&output),
            client,
            &limits,
        ))
        .unwrap()
        .unwrap();
        let mine = wire::complete(ServerHello::read(&mut Reader::new(&ours), client, &limits))
            .unwrap()
            .unwrap();
        assert_eq!(mine.features, theirs.features, "{name}");
        assert_eq!(mine.version, theirs.version, "{name}");
        let mut expected = BytesMut::new();
        ServerHello {
            nix_version: "nixbuild-test".into(),
            trust: Trust::Trusted,
            ..theirs.clone()
        }
        .encode_start(&mut expected);
        assert_eq!(ours[..16], expected[..16], "{name}");
        if theirs.trust != Trust::Unknown {
            assert_eq!(
                theirs.trust,
                Trust::Trusted,
                "{name}: the recording's user was trusted"
            );
        }
    }
}
