//! NAR throughput: read + sha256 through [`NarValidator`] (the store's import path), write
//! through [`NarWriter`], sha256 alone over the same bytes as the baseline, and the reference
//! scan of the NAR for 1000 absent candidates (the worst case: nothing stops it early).
//!
//! Two in-memory NARs of 1 GiB each (set `NAR_BENCH_MIB` for a smaller quick run): one of
//! 1 MiB files and one of 4 KiB files, 1024 files per directory. Input is fed in 64 KiB chunks,
//! as a socket driver would.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use nixbuild_core::nar::{NarValidator, NarWriter};
use nixbuild_core::nixbase32;
use nixbuild_core::refscan::RefScanner;
use sha2::{Digest, Sha256};
use std::hint::black_box;
use std::time::Duration;

const FEED_CHUNK: usize = 64 * 1024;
const FILES_PER_DIR: usize = 1024;

fn total_bytes() -> usize {
    let mib = std::env::var("NAR_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024usize);
    mib << 20
}

/// Writes a NAR of `total / file_size` files of `file_size` bytes into `out`.
fn write_tree(contents: &[u8], total: usize, out: &mut Vec<u8>) {
    let files = total / contents.len();
    let mut w = NarWriter::new();
    w.start_directory(out).expect("root");
    for d in 0..files.div_ceil(FILES_PER_DIR) {
        w.entry(format!("d{d:06}").as_bytes(), out)
            .expect("dir entry");
        w.start_directory(out).expect("dir");
        for f in 0..FILES_PER_DIR.min(files - d * FILES_PER_DIR) {
            w.entry(format!("f{f:06}").as_bytes(), out)
                .expect("file entry");
            w.file(f % 7 == 0, contents.len() as u64, out)
                .expect("file");
            w.contents(contents, out).expect("contents");
            w.end(out).expect("end file");
        }
        w.end(out).expect("end dir");
    }
    w.end(out).expect("end root");
}

fn bench_tree(c: &mut Criterion, label: &str, file_size: usize) {
    let total = total_bytes();
    let contents: Vec<u8> = (0..file_size).map(|i| (i * 31 + i / 7) as u8).collect();
    let mut nar = Vec::with_capacity(total + total / 16);
    write_tree(&contents, total, &mut nar);

    let mut group = c.benchmark_group(format!("nar_{label}"));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(nar.len() as u64));

    group.bench_function("read_sha256", |b| {
        b.iter(|| {
            let mut v = NarValidator::new();
            for chunk in nar.chunks(FEED_CHUNK) {
                let used = v.feed(chunk).expect("valid NAR");
                debug_assert_eq!(used, chunk.len());
            }
            black_box(v.finish().expect("complete"))
        })
    });
    group.bench_function("sha256_only", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            for chunk in nar.chunks(FEED_CHUNK) {
                h.update(chunk);
            }
            black_box(h.finalize())
        })
    });
    let candidates: Vec<String> = hash_parts(0..1000).collect();
    group.bench_function("refscan", |b| {
        b.iter(|| {
            let mut scanner = RefScanner::new(&candidates).expect("valid hash parts");
            for chunk in nar.chunks(FEED_CHUNK) {
                scanner.feed(chunk);
            }
            black_box(scanner.found().len())
        })
    });
    let mut out = Vec::with_capacity(nar.len());
    group.bench_function("write", |b| {
        b.iter(|| {
            out.clear();
            write_tree(&contents, total, &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

/// Hash parts made from the digests of these numbers.
fn hash_parts(range: std::ops::Range<u32>) -> impl Iterator<Item = String> {
    range.map(|i| nixbase32::encode(&Sha256::digest(i.to_le_bytes())[..20]))
}

/// The scanner's worst realistic input: 64 MiB of store-path lines (like a closure listing),
/// none of them a candidate, so every hash part in it is looked up.
fn bench_refscan_text(c: &mut Criterion) {
    let candidates: Vec<String> = hash_parts(0..1000).collect();
    let mut text = Vec::with_capacity(64 << 20);
    for part in hash_parts(1000..u32::MAX) {
        if text.len() >= 64 << 20 {
            break;
        }
        text.extend_from_slice(format!("/nix/store/{part}-some-package-1.0\n").as_bytes());
    }
    let mut group = c.benchmark_group("refscan_store_path_text");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("scan", |b| {
        b.iter(|| {
            let mut scanner = RefScanner::new(&candidates).expect("valid hash parts");
            for chunk in text.chunks(FEED_CHUNK) {
                scanner.feed(chunk);
            }
            black_box(scanner.found().len())
        })
    });
    group.finish();
}

fn nar_benches(c: &mut Criterion) {
    bench_tree(c, "1MiB_files", 1 << 20);
    bench_tree(c, "4KiB_files", 4 << 10);
    bench_refscan_text(c);
}

criterion_group!(benches, nar_benches);
criterion_main!(benches);
