//! The whole worker-protocol server session on arbitrary client bytes: handshake at every
//! version, request framing and decoding, and the payloads that follow requests (framed,
//! tunnelled and raw NARs, the AddMultipleToStore stream, flat data, build logs). The first
//! byte picks the size of the pieces the input arrives in (bits 0–5), whether requests are
//! failed rather than answered (bit 6), and whether the server logs while it reads a payload
//! (bit 7). The session must never panic; a failed session must keep failing with the same
//! error; every request must re-encode and decode to itself; payload events must come only
//! after a request that has a payload, and a NAR whose size is announced must come to exactly
//! that many bytes.
#![no_main]

use std::collections::BTreeSet;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nixbuild_core::wire::{self, Reader};
use nixbuild_core::worker::{
    ErrorInfo, Event, Limits, Request, Response, ServerHello, ServerSession, StderrMessage,
    Trust, WorkerVersion,
};

/// Where the payload of the current request is.
#[derive(Default)]
struct Payload {
    /// The request whose payload is being read, if any.
    request: Option<Request>,
    /// Bytes the current NAR must still have, when its size is announced.
    remaining: Option<u64>,
    /// In an AddMultipleToStore stream, between an `AddPath` and its `DataEnd`.
    in_path: bool,
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(flags & 0x3f) + 1;
    let fail = flags & 0x40 != 0;
    let log = flags & 0x80 != 0;
    let limits = Limits {
        max_nar_size: 1 << 16,
        ..Limits::default()
    };
    let hello = ServerHello {
        version: WorkerVersion::SERVER,
        features: BTreeSet::new(),
        nix_version: "nixbuild-fuzz".to_owned(),
        trust: Trust::Trusted,
    };
    let mut session = ServerSession::new(hello, limits);
    let mut input = BytesMut::new();
    let mut version = None;
    let mut p = Payload::default();
    for chunk in rest.chunks(piece) {
        input.extend_from_slice(chunk);
        loop {
            let event = match session.poll(&mut input) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(session.poll(&mut input), Err(e.clone()));
                    assert_eq!(session.end_of_input(&input), Err(e));
                    return;
                }
            };
            match event {
                Event::Hello { negotiated, .. } => {
                    assert!(version.is_none());
                    version = Some(negotiated);
                }
                Event::Request(req) => {
                    let v = version.expect("a request after the hello");
                    assert!(p.request.is_none());
                    let mut enc = Vec::new();
                    req.encode(v, &mut enc);
                    let again = wire::complete(Request::read(&mut Reader::new(&enc), v, &limits));
                    assert_eq!(again, Ok(Some(req.clone())));
                    match &req {
                        Request::AddToStoreNar { info, .. } => {
                            p.remaining = Some(info.nar_size);
                            p.request = Some(req);
                        }
                        Request::AddToStore { .. }
                        | Request::AddBuildLog(_)
                        | Request::AddMultipleToStore { .. } => p.request = Some(req),
                        Request::NarFromPath(_) => {
                            session.start_stream().expect("a stream is due");
                            session.send_stream(b"nix-archive-1").expect("streaming");
                            session.end_stream().expect("streaming");
                        }
                        _ => answer(&mut session, fail),
                    }
                }
                Event::AddPath(info) => {
                    let multiple = matches!(p.request, Some(Request::AddMultipleToStore { .. }));
                    assert!(multiple && !p.in_path);
                    p.in_path = true;
                    p.remaining = Some(info.nar_size);
                }
                Event::Data(bytes) => {
                    assert!(p.request.is_some() && !bytes.is_empty());
                    if let Some(n) = &mut p.remaining {
                        *n = n.checked_sub(bytes.len() as u64).expect("within narSize");
                    }
                    if log {
                        let msg = StderrMessage::Next(b"reading".to_vec());
                        session.log(&msg).expect("a request is being worked on");
                    }
                }
                Event::DataEnd => {
                    assert!(matches!(p.remaining.take(), Some(0) | None));
                    match p.request {
                        Some(Request::AddMultipleToStore { .. }) => {
                            assert!(p.in_path);
                            p.in_path = false;
                        }
                        Some(_) => {
                            p.request = None;
                            answer(&mut session, fail);
                        }
                        None => panic!("DataEnd without a payload"),
                    }
                }
                Event::AddEnd => {
                    let multiple = matches!(p.request, Some(Request::AddMultipleToStore { .. }));
                    assert!(multiple && !p.in_path);
                    p.request = None;
                    answer(&mut session, fail);
                }
            }
        }
        let _ = session.take_output();
    }
    let _ = session.end_of_input(&input);
});

/// Answers the request awaiting an answer, or fails it.
fn answer(session: &mut ServerSession, fail: bool) {
    let r = match fail {
        true => session.fail(ErrorInfo::new("no")),
        false => session.respond(&Response::Int(1)),
    };
    r.expect("an answer is due");
}
