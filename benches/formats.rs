//! Throughput of the format primitives: nix32 of a sha256, and parsing a realistic `.drv`.

use std::collections::BTreeSet;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nixbuild_core::derivation::{aterm, BasicDerivation, Derivation, DerivationOutput};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::nixbase32;
use nixbuild_core::store_path::StorePath;

fn nix32(c: &mut Criterion) {
    let digest = Hash::compute(HashAlgo::Sha256, b"benchmark")
        .digest()
        .to_vec();
    let text = nixbase32::encode(&digest);
    let mut group = c.benchmark_group("nixbase32");
    group.throughput(Throughput::Bytes(digest.len() as u64));
    group.bench_function("encode sha256", |b| b.iter(|| nixbase32::encode(&digest)));
    group.bench_function("decode sha256", |b| {
        b.iter(|| nixbase32::decode_fixed::<32>(text.as_bytes()))
    });
    group.finish();
}

fn path(i: usize, name: &str) -> StorePath {
    let digest = Hash::compute(HashAlgo::Sha1, format!("{name}{i}").as_bytes());
    let mut d = [0u8; 20];
    d.copy_from_slice(digest.digest());
    StorePath::from_digest(d, name).expect("valid name")
}

/// A derivation shaped like a typical nixpkgs one: 2 outputs, 10 input derivations, 30 input
/// sources, 50 environment variables (some with quotes, newlines and long values).
fn realistic() -> Derivation {
    let mut basic = BasicDerivation {
        platform: b"x86_64-linux".to_vec(),
        builder: path(0, "bash-5.2").to_absolute().into_bytes(),
        args: vec![
            b"-e".to_vec(),
            path(1, "default-builder.sh").to_absolute().into_bytes(),
        ],
        ..BasicDerivation::default()
    };
    for out in ["dev", "out"] {
        let p = path(2, &format!("hello-2.12-{out}"));
        basic.env.insert(out.into(), p.to_absolute().into_bytes());
        basic
            .outputs
            .insert(out.into(), DerivationOutput::InputAddressed(p));
    }
    basic.input_srcs = (0..30).map(|i| path(i, "source-file.patch")).collect();
    for i in 0..48 {
        let value = match i % 4 {
            0 => format!("value {i} with \"quotes\" and \\ backslashes"),
            1 => format!("line one\nline two\tcolumn {i}\n").repeat(3),
            2 => path(i, "dependency").to_absolute(),
            _ => "x".repeat(60),
        };
        basic
            .env
            .insert(format!("VAR_{i:02}").into_bytes(), value.into_bytes());
    }
    let input_drvs = (0..10)
        .map(|i| (path(i, "input.drv"), BTreeSet::from(["out".to_owned()])))
        .collect();
    Derivation { input_drvs, basic }
}

fn parse(c: &mut Criterion) {
    let text = aterm::print(&realistic());
    let mut group = c.benchmark_group("aterm");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function(format!("parse {} bytes", text.len()), |b| {
        b.iter(|| aterm::parse(&text).expect("parses"))
    });
    let drv = aterm::parse(&text).expect("parses");
    group.bench_function(format!("print {} bytes", text.len()), |b| {
        b.iter(|| aterm::print(&drv))
    });
    group.finish();
}

criterion_group!(benches, nix32, parse);
criterion_main!(benches);
