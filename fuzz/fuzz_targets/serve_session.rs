//! The whole server session state machine on arbitrary client bytes: handshake, request
//! framing, AddToStoreNar and ImportPaths NAR streams, export trailers. The first byte picks
//! `--write` (bit 0) and the size of the pieces the input arrives in (the other bits); every
//! request is answered with a well-formed response, as a driver would. The session must never
//! panic, a failed session must keep failing with the same error, and the events must add up:
//! NAR chunks come only between a request that streams and its end.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nixbuild_core::serve::{
    BuildPathsResult, BuildResult, BuildStatus, Event, Limits, Request, Response, ServerSession,
};
use std::collections::BTreeMap;

/// Answers `req` with a fixed-shape response; `false` for the requests that stream
/// (DumpStorePath, ExportPaths: ended at once) or wait for their NAR.
fn answer(session: &mut ServerSession, req: &Request) -> bool {
    let response = match req {
        Request::QueryValidPaths { paths, .. } => Response::ValidPaths(paths.clone()),
        Request::QueryPathInfos { .. } => Response::PathInfos(BTreeMap::new()),
        Request::QueryClosure { paths, .. } => Response::Closure(paths.clone()),
        Request::BuildPaths { .. } => Response::BuildPaths(BuildPathsResult::Failure {
            code: 100,
            msg: b"no".to_vec(),
        }),
        Request::BuildDerivation { .. } => Response::Build(Box::new(BuildResult {
            status: BuildStatus::MiscFailure,
            error_msg: b"no".to_vec(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: BTreeMap::new(),
        })),
        Request::DumpStorePath { .. } | Request::ExportPaths { .. } => {
            session.end_stream().expect("a stream is due");
            return true;
        }
        Request::AddToStoreNar(_) | Request::ImportPaths => return false,
    };
    session.respond(&response).expect("the response is due");
    true
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_nar_size: 1 << 16,
        ..Limits::default()
    };
    let mut session = ServerSession::new(flags & 1 == 1, limits);
    let piece = usize::from(flags >> 1) + 1;
    let mut input = BytesMut::new();
    // The request whose NAR is streaming, if any.
    let mut streaming: Option<Request> = None;
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
                Event::Hello { .. } => assert!(streaming.is_none()),
                Event::Request(req) => {
                    assert!(streaming.is_none());
                    if !answer(&mut session, &req) {
                        streaming = Some(req);
                    }
                }
                Event::NarChunk(bytes) => {
                    assert!(streaming.is_some() && !bytes.is_empty());
                }
                Event::NarEnd | Event::ImportEntry(_) => {
                    assert!(streaming.is_some());
                    if let Some(Request::AddToStoreNar(_)) = streaming.take() {
                        session.respond(&Response::Added).expect("Added is due");
                    } else {
                        streaming = Some(Request::ImportPaths);
                    }
                }
                Event::ImportEnd => {
                    assert_eq!(streaming.take(), Some(Request::ImportPaths));
                    session.respond(&Response::Imported).expect("Imported is due");
                }
            }
        }
        let _ = session.take_output();
    }
    let _ = session.end_of_input(&input);
});
