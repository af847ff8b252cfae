use super::strategies::arb_nar_node;
use super::*;
use crate::hash::{Hash, HashAlgo};
use proptest::prelude::*;

/// A NAR built from its string tokens (every NAR token, contents included, is a string).
fn nar_of(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        out.extend_from_slice(&(t.len() as u64).to_le_bytes());
        out.extend_from_slice(t);
        out.resize(out.len() + padding(t.len() as u64), 0);
    }
    out
}

fn file_nar(executable: bool, contents: &[u8]) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"regular"];
    if executable {
        t.extend([b"executable".as_slice(), b""]);
    }
    t.extend([b"contents".as_slice(), contents, b")"]);
    nar_of(&t)
}

/// An event with owned bytes, file contents coalesced, for comparing chunkings.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    Directory,
    Entry(Vec<u8>),
    Symlink(Vec<u8>),
    File(bool, u64),
    Contents(Vec<u8>),
    EndNode,
    End,
}

/// Reads `input` in chunks of the given sizes (cycled; the last chunk takes the rest).
/// Returns the events and how many bytes the reader consumed.
fn read_chunked(input: &[u8], sizes: &[usize]) -> Result<(Vec<Owned>, usize), NarError> {
    let mut reader = NarReader::new();
    let mut events = Vec::new();
    let mut start = 0;
    let mut sizes = sizes.iter().copied().filter(|&s| s > 0).cycle();
    loop {
        let end = sizes
            .next()
            .map_or(input.len(), |s| (start + s).min(input.len()));
        let chunk = &input[start..end];
        let mut pos = 0;
        loop {
            let (n, ev) = reader.feed(&chunk[pos..])?;
            pos += n;
            let Some(ev) = ev else {
                assert_eq!(pos, chunk.len(), "no event means all input consumed");
                break;
            };
            match ev {
                NarEvent::Contents(c) => {
                    assert!(!c.is_empty());
                    match events.last_mut() {
                        Some(Owned::Contents(prev)) => prev.extend_from_slice(c),
                        _ => events.push(Owned::Contents(c.to_vec())),
                    }
                }
                NarEvent::Directory => events.push(Owned::Directory),
                NarEvent::Entry { name } => events.push(Owned::Entry(name.to_vec())),
                NarEvent::Symlink { target } => events.push(Owned::Symlink(target.to_vec())),
                NarEvent::File { executable, size } => events.push(Owned::File(executable, size)),
                NarEvent::EndNode => events.push(Owned::EndNode),
                NarEvent::End => {
                    events.push(Owned::End);
                    assert_eq!(reader.offset(), (start + pos) as u64);
                    return Ok((events, start + pos));
                }
            }
        }
        start = end;
        if end == input.len() {
            return Ok((events, reader.offset() as usize));
        }
    }
}

fn read_all(input: &[u8]) -> Result<(Vec<Owned>, usize), NarError> {
    read_chunked(input, &[input.len().max(1)])
}

fn sha256(bytes: &[u8]) -> Hash {
    Hash::compute(HashAlgo::Sha256, bytes)
}

fn validate(nar: &[u8]) -> NarSummary {
    let mut v = NarValidator::new();
    assert_eq!(v.feed(nar).expect("valid NAR"), nar.len());
    v.finish().expect("complete")
}

fn file(executable: bool, contents: &[u8]) -> NarNode {
    NarNode::File {
        executable,
        contents: contents.to_vec(),
    }
}

fn symlink(target: &[u8]) -> NarNode {
    NarNode::Symlink {
        target: target.to_vec(),
    }
}

fn dir<const N: usize>(entries: [(&[u8], NarNode); N]) -> NarNode {
    NarNode::Directory(entries.into_iter().map(|(k, v)| (k.to_vec(), v)).collect())
}

// ---- docs/serve-protocol.md §13.4 -------------------------------------------------------

const HELLO_NAR_HEX: &str = "0d000000000000006e69782d617263686976652d310000000100000000000000\
    2800000000000000040000000000000074797065000000000700000000000000\
    726567756c6172000800000000000000636f6e74656e74730500000000000000\
    68656c6c6f00000001000000000000002900000000000000";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn golden_hello_file() {
    let nar = unhex(HELLO_NAR_HEX);
    assert_eq!(nar.len(), 120);
    let (events, used) = read_all(&nar).expect("parses");
    assert_eq!(used, 120);
    assert_eq!(
        events,
        [
            Owned::File(false, 5),
            Owned::Contents(b"hello".to_vec()),
            Owned::EndNode,
            Owned::End
        ]
    );
    assert_eq!(file(false, b"hello").to_nar().expect("writes"), nar);
    let summary = validate(&nar);
    assert_eq!(summary.nar_size, 120);
    assert_eq!(
        summary.nar_hash.to_base16(),
        "0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405171e969"
    );
    assert_eq!(
        summary.nar_hash.to_string(),
        "sha256:0sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa"
    );
}

#[test]
fn golden_hello_executable_and_empty_directory() {
    let exe = file(true, b"hello").to_nar().expect("writes");
    assert_eq!(exe, file_nar(true, b"hello"));
    assert_eq!(exe.len(), 152);
    assert_eq!(
        validate(&exe).nar_hash.to_nix32(),
        "1pm3sl0kwg6q94zcndf65j7zh0j368wjfw27v9kx96pb2bwi9y4w"
    );
    assert_eq!(NarNode::from_nar(&exe), Ok(file(true, b"hello")));

    let empty = dir([]).to_nar().expect("writes");
    assert_eq!(
        empty,
        nar_of(&[b"nix-archive-1", b"(", b"type", b"directory", b")"])
    );
    assert_eq!(empty.len(), 96);
    assert_eq!(
        sha256(&empty).to_nix32(),
        "0sjjj9z1dhilhpc8pq4154czrb79z9cm044jvn75kxcjv6v5l2m5"
    );
    assert_eq!(NarNode::from_nar(&empty), Ok(dir([])));
}

// ---- docs/serve-protocol.md §13.6 -------------------------------------------------------

#[test]
fn golden_hash_path_vectors() {
    let sha = |node: &NarNode| {
        let nar = node.to_nar().expect("writes");
        assert_eq!(NarNode::from_nar(&nar).as_ref(), Ok(node));
        let summary = validate(&nar);
        assert_eq!(summary.nar_hash, sha256(&nar));
        summary.nar_hash.to_nix32()
    };
    let md5 = |node: &NarNode| {
        let nar = node.to_nar().expect("writes");
        assert_eq!(NarNode::from_nar(&nar).as_ref(), Ok(node));
        Hash::compute(HashAlgo::Md5, &nar).to_base16()
    };
    assert_eq!(
        sha(&file(false, b"hi\n")),
        "1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
    );
    assert_eq!(
        md5(&dir([(b"hello", file(false, b"Hello World\n"))])),
        "ea9b55537dd4c7e104515b2ccfaf4100"
    );
    assert_eq!(
        md5(&dir([(b"hello", file(true, b"Hello World\n"))])),
        "20f3ffe011d4cfa7d72bfabef7882836"
    );
    assert_eq!(
        md5(&dir([(b"hello", symlink(b"x"))])),
        "f78b733a68f5edbdf9413899339eaa4a"
    );
    assert_eq!(
        sha(&symlink(b"/non-existent-48cujwe8ndf4as0bne")),
        "1bl5ry3x1fcbwgr5c2x50bn572iixh4j1p6ax5isxly2ddgn8pbp"
    );
    assert_eq!(
        sha(&symlink(b"/bin")),
        "0z2mdmkd43l0ijdxfbj1y8vzli15yh9b09n3a3rrygmjshbyypsw"
    );
}

// ---- reader behaviour -------------------------------------------------------------------

#[test]
fn every_chunking_of_a_tree_gives_the_same_events() {
    let tree = dir([
        (b"a", file(true, &[7u8; 300])),
        (
            b"b",
            dir([(b"c", symlink(b"../a")), (b"d", file(false, b""))]),
        ),
        (b"e", dir([])),
    ]);
    let nar = tree.to_nar().expect("writes");
    let (whole, used) = read_all(&nar).expect("parses");
    assert_eq!(used, nar.len());
    for size in 1..=80 {
        assert_eq!(
            read_chunked(&nar, &[size]).expect("parses").0,
            whole,
            "chunk {size}"
        );
    }
}

#[test]
fn stops_at_the_end_of_the_nar() {
    let mut stream = file_nar(false, b"hello");
    let len = stream.len();
    stream.extend_from_slice(b"NIXE and more");
    for size in [1, 3, 8, 100, 1000] {
        let (events, used) = read_chunked(&stream, &[size]).expect("parses");
        assert_eq!(used, len, "chunk {size}");
        assert_eq!(events.last(), Some(&Owned::End));
    }
    let mut v = NarValidator::new();
    assert_eq!(v.feed(&stream), Ok(len));
    assert_eq!(v.feed(b"more"), Ok(0));
    assert_eq!(v.finish().expect("complete").nar_size, len as u64);
    assert_eq!(
        NarNode::from_nar(&stream),
        Err(NarError::TrailingData {
            offset: len as u64,
            len: 13
        })
    );
}

#[test]
fn incomplete_input_is_not_an_error_until_finish() {
    let nar = file_nar(true, b"hello");
    for cut in 0..nar.len() {
        let mut v = NarValidator::new();
        assert_eq!(v.feed(&nar[..cut]), Ok(cut));
        assert!(!v.is_complete());
        assert_eq!(v.finish(), Err(NarError::Incomplete { offset: cut as u64 }));
        assert_eq!(
            NarNode::from_nar(&nar[..cut]),
            Err(NarError::Incomplete { offset: cut as u64 })
        );
    }
}

#[test]
fn validator_hands_events_to_the_callback_and_stops_on_its_error() {
    #[derive(Debug, PartialEq)]
    enum E {
        Nar(NarError),
        Stop,
    }
    impl From<NarError> for E {
        fn from(e: NarError) -> E {
            E::Nar(e)
        }
    }
    let nar = dir([(b"x", file(false, b"abc"))]).to_nar().expect("writes");
    let mut v = NarValidator::new();
    let mut seen = 0;
    let r = v.feed_with(&nar, |ev| {
        seen += 1;
        if matches!(ev, NarEvent::Contents(b"abc")) {
            Err(E::Stop)
        } else {
            Ok(())
        }
    });
    assert_eq!(r, Err(E::Stop));
    assert_eq!(seen, 4);
    let mut v = NarValidator::new();
    assert_eq!(
        v.feed_with(b"\x05\0\0\0\0\0\0\0", |_| Ok::<(), E>(())),
        Ok(8)
    );
    assert!(matches!(
        v.feed_with(b"wrong\0\0\0", |_| Ok::<(), E>(())),
        Err(E::Nar(NarError::Unexpected { offset: 0, .. }))
    ));
}

/// The error for `nar`, which must be rejected at `offset` however it is chunked.
fn rejected(nar: &[u8]) -> NarError {
    let err = read_all(nar).expect_err("must be rejected");
    for size in [1, 5, 8, 13] {
        assert_eq!(
            read_chunked(nar, &[size]).expect_err("rejected"),
            err,
            "chunk {size}"
        );
    }
    err
}

/// A directory NAR with a symlink entry of each of these names, in the order given.
fn entry_nar(names: &[&[u8]]) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for name in names {
        t.extend([
            b"entry".as_slice(),
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"x",
            b")",
            b")",
        ]);
    }
    t.push(b")");
    nar_of(&t)
}

#[test]
fn rejects_bad_tokens_with_their_offset() {
    let e = rejected(&nar_of(&[b"nix-archive-2"]));
    assert_eq!(
        e,
        NarError::Unexpected {
            offset: 0,
            expected: "`nix-archive-1`",
            found: "`nix-archive-2`".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "NAR byte 0: expected `nix-archive-1`, found `nix-archive-2`"
    );
    // `type` must come first.
    let e = rejected(&nar_of(&[b"nix-archive-1", b"(", b"contents"]));
    assert!(
        matches!(
            e,
            NarError::Unexpected {
                offset: 40,
                expected: "`type`",
                ..
            }
        ),
        "{e}"
    );
    // Unknown node type, unknown tag in a file, in a directory, in a symlink.
    let e = rejected(&nar_of(&[b"nix-archive-1", b"(", b"type", b"fifo"]));
    assert!(matches!(e, NarError::Unexpected { offset: 56, .. }), "{e}");
    let e = rejected(&nar_of(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"mode",
    ]));
    assert!(matches!(e, NarError::Unexpected { offset: 72, .. }), "{e}");
    let e = rejected(&nar_of(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"name",
    ]));
    assert!(matches!(e, NarError::Unexpected { offset: 80, .. }), "{e}");
    let e = rejected(&nar_of(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"contents",
    ]));
    assert!(matches!(e, NarError::Unexpected { offset: 72, .. }), "{e}");
    // A huge length where a keyword belongs is reported without reading it.
    let mut huge = nar_of(&[b"nix-archive-1"]);
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    let e = rejected(&huge);
    assert_eq!(
        e,
        NarError::Unexpected {
            offset: 24,
            expected: "`(`",
            found: format!("a string of {} bytes", u64::MAX)
        }
    );
    // Trailing garbage inside a file node instead of `)`.
    let mut t = file_nar(false, b"hi");
    t.truncate(t.len() - 16);
    t.extend(nar_of(&[b"contents"]));
    assert!(matches!(
        rejected(&t),
        NarError::Unexpected {
            expected: "`)`",
            ..
        }
    ));
}

#[test]
fn executable_marker_must_be_canonical() {
    // Non-empty value.
    let e = rejected(&nar_of(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"1",
    ]));
    assert!(matches!(e, NarError::Unexpected { offset: 96, .. }), "{e}");
    // After `contents` (Nix 2.8 accepted this; the strict parser does not).
    let e = rejected(&nar_of(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"hi",
        b"executable",
        b"",
        b")",
    ]));
    assert!(
        matches!(
            e,
            NarError::Unexpected {
                offset: 104,
                expected: "`)`",
                ..
            }
        ),
        "{e}"
    );
    // Twice.
    let e = rejected(&nar_of(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"executable",
        b"",
    ]));
    assert!(
        matches!(
            e,
            NarError::Unexpected {
                offset: 104,
                expected: "`contents`",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn rejects_non_zero_padding_at_the_bad_byte() {
    let mut nar = file_nar(false, b"hello");
    nar[8 + 13] = 1; // padding of the magic
    assert_eq!(rejected(&nar), NarError::NonZeroPadding { offset: 21 });
    let mut nar = file_nar(false, b"hello");
    nar[96 + 7] = 9; // padding after the contents
    assert_eq!(rejected(&nar), NarError::NonZeroPadding { offset: 103 });
}

#[test]
fn rejects_invalid_names() {
    for (name, reason) in [
        (&b""[..], "empty name"),
        (b".", "name is `.` or `..`"),
        (b"..", "name is `.` or `..`"),
        (b"a/b", "name contains `/`"),
        (b"a\0b", "name contains NUL"),
    ] {
        let e = rejected(&entry_nar(&[name]));
        assert_eq!(
            e,
            NarError::InvalidName {
                offset: 128,
                name: show(name),
                reason
            }
        );
    }
    assert!(read_all(&entry_nar(&[&[b'n'; 255]])).is_ok());
    assert_eq!(
        rejected(&entry_nar(&[&[b'n'; 256]])),
        NarError::TooLong {
            offset: 128,
            what: "entry name",
            len: 256,
            max: 255
        }
    );
}

#[test]
fn rejects_unsorted_and_duplicate_names_bytewise() {
    assert!(read_all(&entry_nar(&[b"B", b"a", b"\x80"])).is_ok());
    // The second entry starts where the one-entry NAR has its closing `)`; its name
    // follows `entry`, `(` and `name`.
    let name2 = entry_nar(&[b"a"]).len() as u64 - 16 + 48;
    assert_eq!(
        rejected(&entry_nar(&[b"b", b"a"])),
        NarError::NotSorted {
            offset: name2,
            previous: "b".into(),
            name: "a".into()
        }
    );
    assert!(matches!(
        rejected(&entry_nar(&[b"a", b"a"])),
        NarError::NotSorted { .. }
    ));
    assert!(matches!(
        rejected(&entry_nar(&[b"a", b"B"])),
        NarError::NotSorted { .. }
    ));
    assert!(matches!(
        rejected(&entry_nar(&[b"\x80", b"z"])),
        NarError::NotSorted { .. }
    ));
}

#[test]
fn rejects_invalid_symlink_targets() {
    let link = |target: &[u8]| {
        nar_of(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            target,
            b")",
        ])
    };
    for (target, reason) in [
        (&b""[..], "empty symlink target"),
        (b"a\0", "symlink target contains NUL"),
    ] {
        assert_eq!(
            rejected(&link(target)),
            NarError::InvalidTarget {
                offset: 88,
                target: show(target),
                reason
            }
        );
    }
    assert!(read_all(&link(&[b'x'; 4095])).is_ok());
    assert_eq!(
        rejected(&link(&[b'x'; 4096])),
        NarError::TooLong {
            offset: 88,
            what: "symlink target",
            len: 4096,
            max: 4095
        }
    );
}

fn nested(depth: usize) -> NarNode {
    (0..depth).fold(dir([]), |inner, _| dir([(b"d", inner)]))
}

#[test]
fn depth_limit() {
    // 63 directories inside the root: the innermost is at depth 63, allowed.
    let ok = nested(63).to_nar().expect("writes");
    assert_eq!(NarNode::from_nar(&ok), Ok(nested(63)));
    // One more level puts a node at depth 64. Build it by hand, the writer refuses it.
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1"];
    for _ in 0..64 {
        t.extend([
            b"(".as_slice(),
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    let prefix_len = nar_of(&t).len() as u64;
    t.extend([b"(".as_slice(), b"type", b"directory", b")"]);
    assert_eq!(
        rejected(&nar_of(&t)),
        NarError::TooDeep { offset: prefix_len }
    );
    assert_eq!(nested(64).to_nar(), Err(NarWriteError::TooDeep));
}

#[test]
fn errors_are_sticky() {
    let mut r = NarReader::new();
    let e = r.feed(&nar_of(&[b"nope"])).expect_err("bad magic");
    assert_eq!(r.feed(&file_nar(false, b"")).expect_err("still failed"), e);
}

// ---- writer -----------------------------------------------------------------------------

#[test]
fn contents_written_elsewhere_are_checked_and_padded() {
    let mut w = NarWriter::new();
    let mut out = Vec::new();
    assert!(matches!(
        w.contents_written_elsewhere(1),
        Err(NarWriteError::OutOfOrder { .. })
    ));
    w.file(true, 5, &mut out).expect("ok");
    w.contents(b"he", &mut out).expect("ok");
    // The caller puts the rest of the contents in the output itself.
    w.contents_written_elsewhere(2).expect("ok");
    out.extend_from_slice(b"ll");
    assert_eq!(
        w.contents_written_elsewhere(2),
        Err(NarWriteError::SizeMismatch {
            size: 5,
            written: 6
        })
    );
    assert_eq!(
        w.end(&mut out),
        Err(NarWriteError::SizeMismatch {
            size: 5,
            written: 4
        })
    );
    w.contents_written_elsewhere(1).expect("ok");
    out.push(b'o');
    w.end(&mut out).expect("ok");
    assert!(w.is_complete());
    assert_eq!(out, file_nar(true, b"hello"));
}

#[test]
fn writer_refuses_non_canonical_output() {
    let mut out = Vec::new();
    let mut w = NarWriter::new();
    assert!(matches!(
        w.entry(b"a", &mut out),
        Err(NarWriteError::OutOfOrder { .. })
    ));
    assert!(out.is_empty());
    w.start_directory(&mut out).expect("ok");
    w.entry(b"b", &mut out).expect("ok");
    assert!(matches!(
        w.end(&mut out),
        Err(NarWriteError::OutOfOrder { .. })
    ));
    w.file(false, 3, &mut out).expect("ok");
    w.contents(b"ab", &mut out).expect("ok");
    assert_eq!(
        w.contents(b"cd", &mut out),
        Err(NarWriteError::SizeMismatch {
            size: 3,
            written: 4
        })
    );
    assert_eq!(
        w.end(&mut out),
        Err(NarWriteError::SizeMismatch {
            size: 3,
            written: 2
        })
    );
    w.contents(b"c", &mut out).expect("ok");
    w.end(&mut out).expect("ok");
    assert!(matches!(
        w.entry(b"a", &mut out),
        Err(NarWriteError::NotSorted { .. })
    ));
    assert!(matches!(
        w.entry(b"b", &mut out),
        Err(NarWriteError::NotSorted { .. })
    ));
    assert!(matches!(
        w.entry(b"..", &mut out),
        Err(NarWriteError::InvalidName { .. })
    ));
    w.entry(b"c", &mut out).expect("ok");
    assert!(matches!(
        w.symlink(b"", &mut out),
        Err(NarWriteError::InvalidTarget { .. })
    ));
    w.symlink(b"b", &mut out).expect("ok");
    w.end(&mut out).expect("ok");
    assert!(!w.is_complete());
    w.end(&mut out).expect("ok");
    assert!(w.is_complete());
    assert!(matches!(
        w.file(false, 0, &mut out),
        Err(NarWriteError::OutOfOrder { .. })
    ));
    assert_eq!(
        NarNode::from_nar(&out),
        Ok(dir([(b"b", file(false, b"abc")), (b"c", symlink(b"b"))]))
    );
}

// ---- properties -------------------------------------------------------------------------

/// Writes `tree` with the writer driven by the events of its own NAR, read in `sizes`
/// chunks: the same bytes must come out.
fn rewrite(nar: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut reader = NarReader::new();
    let mut writer = NarWriter::new();
    let mut out = Vec::new();
    let mut start = 0;
    let mut sizes = sizes.iter().copied().filter(|&s| s > 0).cycle();
    while start < nar.len() {
        let end = sizes
            .next()
            .map_or(nar.len(), |s| (start + s).min(nar.len()));
        let mut pos = start;
        while let (n, Some(ev)) = reader.feed(&nar[pos..end]).expect("valid") {
            pos += n;
            writer.event(&ev, &mut out).expect("canonical");
            if ev == NarEvent::End {
                break;
            }
        }
        start = end;
    }
    assert!(writer.is_complete());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn tree_round_trips(tree in arb_nar_node()) {
        let nar = tree.to_nar().expect("strategy trees are valid");
        prop_assert_eq!(NarNode::from_nar(&nar), Ok(tree));
    }

    #[test]
    fn chunked_reads_agree_and_rewrite_identically(
        tree in arb_nar_node(),
        sizes in proptest::collection::vec(1usize..200, 1..8),
    ) {
        let nar = tree.to_nar().expect("valid");
        let whole = read_all(&nar).expect("parses");
        prop_assert_eq!(read_chunked(&nar, &sizes).expect("parses"), whole);
        prop_assert_eq!(rewrite(&nar, &sizes), nar.clone());
        let summary = validate(&nar);
        prop_assert_eq!(summary.nar_size, nar.len() as u64);
        prop_assert_eq!(summary.nar_hash, sha256(&nar));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        sizes in proptest::collection::vec(1usize..64, 1..4),
    ) {
        let whole = read_all(&bytes);
        prop_assert_eq!(read_chunked(&bytes, &sizes), whole);
    }

    /// A mutated NAR is either rejected, or accepted and then (the format being canonical)
    /// re-encodes to exactly the accepted bytes.
    #[test]
    fn mutated_nars_are_rejected_or_canonical(
        tree in arb_nar_node(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        sizes in proptest::collection::vec(1usize..64, 1..4),
    ) {
        let mut nar = tree.to_nar().expect("valid");
        for (at, byte) in edits {
            let i = at.index(nar.len());
            nar[i] = byte;
        }
        let whole = read_all(&nar);
        prop_assert_eq!(read_chunked(&nar, &sizes), whole.clone());
        let complete = matches!(&whole, Ok((events, _)) if events.last() == Some(&Owned::End));
        if let (true, Ok((_, used))) = (complete, whole) {
            let node = NarNode::from_nar(&nar[..used]).expect("accepted");
            prop_assert_eq!(node.to_nar().expect("valid"), nar[..used].to_vec());
        }
    }
}

#[test]
fn strategy_produces_varied_trees() {
    // Guards the strategies: they must reach the cases the cross-checks rely on.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut dirs, mut links, mut exes, mut big, mut high) = (0, 0, 0, 0, 0);
    fn walk(n: &NarNode, f: &mut dyn FnMut(&[u8], &NarNode)) {
        if let NarNode::Directory(m) = n {
            for (k, v) in m {
                f(k, v);
                walk(v, f);
            }
        }
    }
    for _ in 0..200 {
        let tree = arb_nar_node()
            .new_tree(&mut runner)
            .expect("tree")
            .current();
        walk(&tree, &mut |name, node| {
            high += usize::from(name.iter().any(|&b| b >= 0x80));
            match node {
                NarNode::Directory(_) => dirs += 1,
                NarNode::Symlink { .. } => links += 1,
                NarNode::File {
                    executable,
                    contents,
                } => {
                    exes += usize::from(*executable);
                    big += usize::from(contents.len() > 65536);
                }
            }
        });
    }
    assert!(dirs > 0 && links > 0 && exes > 0 && big > 0 && high > 0);
}
