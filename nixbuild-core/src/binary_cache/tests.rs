#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::strategies::narinfo;
use super::*;
use crate::hash::{Hash, HashAlgo};
use crate::store_path::StorePath;

const XZ_TEXT: &[u8] =
    include_bytes!("../../tests/data/binary-cache/xz/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq.narinfo");
const XZ_REFS: &[u8] =
    include_bytes!("../../tests/data/binary-cache/xz/q1phm7nwklpk0f8ivsxjd29d3g3bdxzz.narinfo");
const XZ_BUSYBOX: &[u8] =
    include_bytes!("../../tests/data/binary-cache/xz/ikfa7wfzsy90l6n35ic32mpi3y8756wy.narinfo");
const ZSTD_TEXT: &[u8] =
    include_bytes!("../../tests/data/binary-cache/zstd/irsm51bnpf5hqfr2mdcajms2s0awrdh4.narinfo");
const FIXTURES: [&[u8]; 4] = [XZ_TEXT, XZ_REFS, XZ_BUSYBOX, ZSTD_TEXT];
const PUBLIC: &str = include_str!("../../tests/data/binary-cache/test-cache-1.public");
const IMPOSTOR: &str = include_str!("../../tests/data/binary-cache/impostor.secret");
const SECRET: &str = include_str!("../../tests/data/binary-cache/test-cache-1.secret");

fn path(base: &str) -> StorePath {
    StorePath::from_base_name(base.as_bytes()).unwrap()
}

#[test]
fn narinfos_written_by_nix_parse_and_print_back_byte_for_byte() {
    for text in FIXTURES {
        let info = NarInfo::parse(text).unwrap();
        assert_eq!(info.to_text().as_bytes(), text);
    }
    let info = NarInfo::parse(XZ_REFS).unwrap();
    assert_eq!(
        info.store_path,
        path("q1phm7nwklpk0f8ivsxjd29d3g3bdxzz-golden-ref")
    );
    assert_eq!(
        info.url,
        "nar/08hi4czklhnynbli84q282524p3g8bbbn4m8w4015l2lrsvhbmfy.nar.xz"
    );
    assert_eq!(info.compression, Compression::Xz);
    assert_eq!(info.file_size, Some(176));
    assert_eq!(info.nar_size, 168);
    assert_eq!(
        info.nar_hash,
        Hash::parse_any(
            "sha256:1h5fyjcwjlia4rjfs1x5jwx2zlyfr0jbq9rngl71amlf3wjg260s",
            None
        )
        .unwrap()
    );
    assert_eq!(
        info.references,
        [path("ikfa7wfzsy90l6n35ic32mpi3y8756wy-bbdir")].into()
    );
    assert_eq!(
        info.deriver,
        Some(path("a9c7vd4j4addfv90b804agaxp0z0lf68-golden-ref.drv"))
    );
    assert_eq!(info.ca, None);
    assert_eq!(
        NarInfo::parse(ZSTD_TEXT).unwrap().compression,
        Compression::Zstd
    );
}

#[test]
fn signatures_written_by_nix_verify_and_signing_reproduces_them() {
    let public = PublicKey::parse(PUBLIC).unwrap();
    assert_eq!(public.to_string(), PUBLIC.trim());
    let secret = SecretKey::parse(SECRET).unwrap();
    assert_eq!(secret.public_key(), public);
    let trusted = TrustedKeys::new([public.clone()]);
    for text in FIXTURES {
        let info = NarInfo::parse(text).unwrap();
        let fingerprint = info.fingerprint();
        assert_eq!(
            trusted.signer(fingerprint.as_bytes(), &info.sigs),
            Some("test-cache-1"),
            "{fingerprint}"
        );
        // ed25519 is deterministic: our signature is the one Nix wrote.
        let sig = secret.sign(fingerprint.as_bytes());
        assert!(info.sigs.contains(&sig), "{sig}");
    }
}

#[test]
fn the_fingerprint_is_nix_s() {
    let info = NarInfo::parse(XZ_REFS).unwrap();
    assert_eq!(
        info.fingerprint(),
        "1;/nix/store/q1phm7nwklpk0f8ivsxjd29d3g3bdxzz-golden-ref;\
         sha256:1h5fyjcwjlia4rjfs1x5jwx2zlyfr0jbq9rngl71amlf3wjg260s;168;\
         /nix/store/ikfa7wfzsy90l6n35ic32mpi3y8756wy-bbdir"
    );
}

#[test]
fn a_changed_field_or_another_key_does_not_verify() {
    let public = PublicKey::parse(PUBLIC).unwrap();
    let trusted = TrustedKeys::new([public]);
    let info = NarInfo::parse(XZ_REFS).unwrap();
    let mut bigger = info.clone();
    bigger.nar_size += 1;
    assert_eq!(
        trusted.signer(bigger.fingerprint().as_bytes(), &info.sigs),
        None
    );
    let mut fewer = info.clone();
    fewer.references.clear();
    assert_eq!(
        trusted.signer(fewer.fingerprint().as_bytes(), &info.sigs),
        None
    );
    // The same key under another name is not trusted for the signature's name.
    let renamed = PublicKey::parse(&PUBLIC.replace("test-cache-1", "other")).unwrap();
    let other = TrustedKeys::new([renamed]);
    assert_eq!(
        other.signer(info.fingerprint().as_bytes(), &info.sigs),
        None
    );
    // A signature under the trusted name that another key made.
    let impostor = SecretKey::parse(IMPOSTOR).unwrap();
    let forged: BTreeSet<String> = [impostor.sign(info.fingerprint().as_bytes())].into();
    assert_eq!(trusted.signer(info.fingerprint().as_bytes(), &forged), None);
    assert_eq!(
        TrustedKeys::default().signer(info.fingerprint().as_bytes(), &info.sigs),
        None
    );
}

#[test]
fn keys_and_signatures_that_are_not_name_base64_are_refused() {
    assert!(matches!(
        PublicKey::parse("nocolon"),
        Err(SignatureError::Form { .. })
    ));
    assert!(matches!(
        PublicKey::parse(":AAAA"),
        Err(SignatureError::Form { .. })
    ));
    assert!(matches!(
        PublicKey::parse("k:!!!"),
        Err(SignatureError::Base64 { .. })
    ));
    assert_eq!(
        PublicKey::parse("k:AAAA"),
        Err(SignatureError::Length {
            what: "public key",
            name: "k".into(),
            expected: 32,
            found: 3
        })
    );
    assert!(matches!(
        SecretKey::parse(PUBLIC),
        Err(SignatureError::Length { .. })
    ));
    let public = PublicKey::parse(PUBLIC).unwrap();
    assert!(!public.verifies(b"x", "test-cache-1:AAAA"));
    assert!(!public.verifies(b"x", "garbage"));
}

#[test]
fn narinfo_errors_name_the_line_and_field() {
    let good = std::str::from_utf8(XZ_REFS).unwrap();
    let cases: [(String, NarInfoError); 7] = [
        (
            good.replace("StorePath: ", "StorePath:: "),
            NarInfoError::StorePath {
                line: 1,
                key: "StorePath",
                source: StorePath::from_absolute_path(
                    b": /nix/store/q1phm7nwklpk0f8ivsxjd29d3g3bdxzz-golden-ref",
                )
                .unwrap_err(),
            },
        ),
        (
            good.replace("NarSize: 168", "NarSize: 0"),
            NarInfoError::Number {
                line: 7,
                key: "NarSize",
                value: "0".into(),
            },
        ),
        (
            good.replace("NarSize: 168", "NarSize: +168"),
            NarInfoError::Number {
                line: 7,
                key: "NarSize",
                value: "+168".into(),
            },
        ),
        (
            good.replace("NarSize: 168\n", ""),
            NarInfoError::Missing("NarSize"),
        ),
        (
            format!("{good}NarSize: 168\n"),
            NarInfoError::Duplicate {
                line: 11,
                key: "NarSize",
            },
        ),
        (
            good.replace("URL: nar/", "URL: http://evil/nar/"),
            NarInfoError::Url {
                line: 2,
                url: "http://evil/nar/08hi4czklhnynbli84q282524p3g8bbbn4m8w4015l2lrsvhbmfy.nar.xz"
                    .into(),
            },
        ),
        (
            good.replace("Compression: xz", "junk"),
            NarInfoError::Syntax { line: 3 },
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(NarInfo::parse(text.as_bytes()), Err(expected), "{text}");
    }
    for url in [
        "/etc/shadow",
        "nar/../../x",
        "nar//x",
        "",
        "file:///x",
        "nar/x y",
    ] {
        let text = good.replace(
            "nar/08hi4czklhnynbli84q282524p3g8bbbn4m8w4015l2lrsvhbmfy.nar.xz",
            url,
        );
        assert!(NarInfo::parse(text.as_bytes()).is_err(), "{url:?}");
    }
    let md5 = good.replace(
        "NarHash: sha256:1h5fyjcwjlia4rjfs1x5jwx2zlyfr0jbq9rngl71amlf3wjg260s",
        &format!("NarHash: {}", Hash::compute(HashAlgo::Md5, b"x")),
    );
    assert!(matches!(
        NarInfo::parse(md5.as_bytes()),
        Err(NarInfoError::NarHashAlgo { line: 6, .. })
    ));
    assert_eq!(NarInfo::parse(b"\xff"), Err(NarInfoError::NotText));
    // Without Compression it is bzip2; unknown fields and `unknown-deriver` are ignored.
    let old = good.replace("Compression: xz\n", "Foo: bar\n").replace(
        "Deriver: a9c7vd4j4addfv90b804agaxp0z0lf68-golden-ref.drv",
        "Deriver: unknown-deriver",
    );
    let info = NarInfo::parse(old.as_bytes()).unwrap();
    assert_eq!(info.compression, Compression::Bzip2);
    assert_eq!(info.deriver, None);
}

#[test]
fn cache_info_written_by_nix_parses() {
    let info = CacheInfo::parse(include_bytes!(
        "../../tests/data/binary-cache/xz/nix-cache-info"
    ))
    .unwrap();
    assert_eq!(
        info,
        CacheInfo {
            store_dir: "/nix/store".into(),
            want_mass_query: false,
            priority: None
        }
    );
    assert!(info.same_store());
    let info = CacheInfo::parse(b"StoreDir: /gnu/store\nWantMassQuery: 1\nPriority: 40\n").unwrap();
    assert!(!info.same_store());
    assert!(info.want_mass_query);
    assert_eq!(info.priority, Some(40));
    assert_eq!(
        CacheInfo::parse(b"Priority: 1\n"),
        Err(NarInfoError::Missing("StoreDir"))
    );
}

proptest! {
    #[test]
    fn narinfo_round_trips(info in narinfo()) {
        let text = info.to_text();
        prop_assert_eq!(NarInfo::parse(text.as_bytes()).unwrap(), info);
    }

    #[test]
    fn narinfo_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = NarInfo::parse(&bytes);
        let _ = CacheInfo::parse(&bytes);
    }
}
