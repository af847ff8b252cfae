//! Serve request decoding, as the server does it: QueryValidPaths of 10,000 paths (a NixOS
//! closure check), the BuildDerivation of `nixbuild-core/tests/data/traces/host-1`, and its
//! AddToStoreNar header. Each is measured twice, in bytes/s and in requests/s. Also the whole
//! server path for the 10,000-path request: handshake and request through [`ServerSession`], in
//! 32 KiB pieces (an SSH channel's packet size).

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nixbuild_core::serve::{Event, Limits, Opcode, ProtocolVersion, Request, ServerSession};
use nixbuild_core::store_path::StorePath;
use std::collections::BTreeSet;
use std::hint::black_box;

const TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/nixbuild-core/tests/data/traces/host-1.in"
);
const V: ProtocolVersion = ProtocolVersion::V2_7;

/// The encoded requests of the benchmark, by name.
fn requests() -> Vec<(&'static str, Vec<u8>)> {
    let paths: BTreeSet<StorePath> = (0..10_000u32)
        .map(|i| {
            let mut digest = [0u8; 20];
            digest[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
            StorePath::from_digest(digest, &format!("package-{i}-1.0")).expect("valid path")
        })
        .collect();
    let mut qvp = Vec::new();
    Request::QueryValidPaths {
        lock: false,
        substitute: false,
        paths,
    }
    .encode(V, &mut qvp);

    // Find the trace's requests by decoding it (skipping the handshake and the NAR).
    let trace = std::fs::read(TRACE).expect("read nixbuild-core/tests/data/traces/host-1.in");
    let (mut build, mut add) = (None, None);
    let mut rest = &trace[16..];
    let limits = Limits::default();
    while let Ok(Some((req, n))) = Request::decode(rest, V, &limits) {
        match &req {
            Request::BuildDerivation { .. } => build = Some(rest[..n].to_vec()),
            Request::AddToStoreNar(h) => {
                add = Some(rest[..n].to_vec());
                rest = &rest[h.nar_size as usize..];
            }
            _ => {}
        }
        rest = &rest[n..];
    }
    vec![
        ("query_valid_paths_10000", qvp),
        (
            "build_derivation_host_1",
            build.expect("BuildDerivation in trace"),
        ),
        (
            "add_to_store_nar_header",
            add.expect("AddToStoreNar in trace"),
        ),
    ]
}

fn decode(c: &mut Criterion) {
    let limits = Limits::default();
    let reqs = requests();
    for (unit, bytes_unit) in [
        ("serve_decode_bytes", true),
        ("serve_decode_requests", false),
    ] {
        let mut g = c.benchmark_group(unit);
        for (name, bytes) in &reqs {
            g.throughput(if bytes_unit {
                Throughput::Bytes(bytes.len() as u64)
            } else {
                Throughput::Elements(1)
            });
            g.bench_function(*name, |b| {
                b.iter(|| {
                    let (req, n) = Request::decode(black_box(bytes), V, &limits)
                        .expect("valid")
                        .expect("complete");
                    assert_ne!(req.opcode(), Opcode::ImportPaths);
                    black_box((req, n))
                })
            });
        }
        g.finish();
    }
}

fn session(c: &mut Criterion) {
    let reqs = requests();
    let (_, qvp) = &reqs[0];
    let mut hello = Vec::new();
    nixbuild_core::serve::ClientHello { version: V }.encode(&mut hello);
    let mut g = c.benchmark_group("serve_session");
    g.throughput(Throughput::Bytes(qvp.len() as u64));
    g.bench_function("query_valid_paths_10000_in_32k_pieces", |b| {
        b.iter(|| {
            let mut s = ServerSession::new(true, Limits::default());
            let mut input = BytesMut::from(&hello[..]);
            assert!(matches!(s.poll(&mut input), Ok(Some(Event::Hello { .. }))));
            let mut got = None;
            for piece in qvp.chunks(32 << 10) {
                input.extend_from_slice(piece);
                if let Some(e) = s.poll(&mut input).expect("valid") {
                    got = Some(e);
                }
            }
            black_box(got.expect("request"))
        })
    });
    g.finish();
}

criterion_group!(benches, decode, session);
criterion_main!(benches);
