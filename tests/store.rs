//! The store through its public API: imports checked against their claims, account
//! isolation, deduplication, crash cleanup, canonical files, exports byte-identical.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use nixbuild::store::{Import, PathClaim, Store, StoreError, StoreLimits, StoreProblem};
use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::derivation::{Derivation, DerivationOutput};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::nar::{NarError, NarNode};
use nixbuild_core::store_path::{
    make_fixed_output_path, make_store_path, make_text_path, StorePath,
};

const LIMITS: StoreLimits = StoreLimits {
    max_nar_size: 1 << 30,
    disk_reserve: 0,
};

fn file(contents: &[u8]) -> NarNode {
    NarNode::File {
        executable: false,
        contents: contents.to_vec(),
    }
}

fn exe(contents: &[u8]) -> NarNode {
    NarNode::File {
        executable: true,
        contents: contents.to_vec(),
    }
}

fn dir<const N: usize>(entries: [(&str, NarNode); N]) -> NarNode {
    NarNode::Directory(
        entries
            .into_iter()
            .map(|(name, node)| (name.as_bytes().to_vec(), node))
            .collect(),
    )
}

fn sha256(data: &[u8]) -> Hash {
    Hash::compute(HashAlgo::Sha256, data)
}

/// One path ready to upload: its NAR and a claim with the right hash and size.
#[derive(Clone)]
struct Upload {
    nar: Vec<u8>,
    claim: PathClaim,
}

impl Upload {
    fn path(&self) -> StorePath {
        self.claim.path.clone()
    }
}

fn upload_at(path: StorePath, node: &NarNode, references: &[&StorePath]) -> Upload {
    let nar = node.to_nar().expect("valid tree");
    Upload {
        claim: PathClaim {
            path,
            deriver: None,
            nar_hash: Some(sha256(&nar)),
            nar_size: Some(nar.len() as u64),
            references: references.iter().map(|r| (*r).clone()).collect(),
            registration_time: 1_700_000_000,
            ca: None,
            sigs: BTreeSet::new(),
        },
        nar,
    }
}

/// An input-addressed path (no ca) named `name`, its hash part derived from `seed`.
fn input_addressed(name: &str, seed: &str, node: &NarNode, references: &[&StorePath]) -> Upload {
    let path = make_store_path("output:out", &sha256(seed.as_bytes()), name).expect("path");
    upload_at(path, node, references)
}

/// A `fixed:r:sha256` (source) path, as `nix-store --add` makes it.
fn source(name: &str, node: &NarNode, references: &[&StorePath]) -> Upload {
    let nar = node.to_nar().expect("valid tree");
    let ca = ContentAddress {
        method: ContentAddressMethod::Recursive,
        hash: sha256(&nar),
    };
    let refs: BTreeSet<StorePath> = references.iter().map(|r| (*r).clone()).collect();
    let path = make_fixed_output_path(name, &ca, &refs, false).expect("path");
    let mut upload = upload_at(path, node, references);
    upload.claim.ca = Some(ca);
    upload
}

/// A path whose content address uses `method` and `algo` over `node`.
fn fixed(name: &str, method: ContentAddressMethod, algo: HashAlgo, node: &NarNode) -> Upload {
    let hash = match (method, node) {
        (ContentAddressMethod::Recursive, _) => Hash::compute(algo, &node.to_nar().expect("nar")),
        (_, NarNode::File { contents, .. }) => Hash::compute(algo, contents),
        _ => panic!("flat and text need a file"),
    };
    let ca = ContentAddress { method, hash };
    let path = make_fixed_output_path(name, &ca, &BTreeSet::new(), false).expect("path");
    let mut upload = upload_at(path, node, &[]);
    upload.claim.ca = Some(ca);
    upload
}

fn feed(import: &mut Import, nar: &[u8]) -> Result<(), StoreError> {
    // Odd-sized chunks, so tokens and contents are split across writes.
    for chunk in nar.chunks(7) {
        import.write(chunk)?;
    }
    Ok(())
}

fn import(store: &Store, account: &str, upload: &Upload) -> Result<(), StoreError> {
    let mut import = store.begin_import(account)?;
    feed(&mut import, &upload.nar)?;
    import.commit(upload.claim.clone())
}

fn export(store: &Store, account: &str, path: &StorePath) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    let n = store.export_nar(account, path, &mut out)?;
    assert_eq!(n, out.len() as u64);
    Ok(out)
}

fn set(paths: &[&StorePath]) -> BTreeSet<StorePath> {
    paths.iter().map(|p| (*p).clone()).collect()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

fn object_count(state: &Path) -> usize {
    entries(&state.join("objects")).len()
}

fn open(state: &Path) -> Store {
    Store::open(state, LIMITS).expect("open store")
}

/// No leftovers in tmp/, and every object re-hashes to its record.
fn assert_consistent(state: &Path, store: &Store) {
    assert_eq!(entries(&state.join("tmp")), Vec::<PathBuf>::new());
    let problems = store.verify().expect("verify");
    assert!(problems.is_empty(), "{problems:?}");
}

fn tree() -> NarNode {
    dir([
        ("bin", dir([("hello", exe(b"#!/bin/sh\necho hello\n"))])),
        ("empty", file(b"")),
        (
            "link",
            NarNode::Symlink {
                target: b"bin/hello".to_vec(),
            },
        ),
        (
            "share",
            dir([("doc", dir([("README", file(&[7u8; 200_000]))]))]),
        ),
    ])
}

#[test]
fn import_query_export_round_trip() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let dep = source("dep", &file(b"dependency"), &[]);
    import(&store, "alice", &dep).expect("import dep");

    let mut main = input_addressed("main", "main", &tree(), &[&dep.path()]);
    // A self reference is allowed without being valid beforehand.
    main.claim.references.insert(main.path());
    main.claim.deriver = Some(make_store_path("text", &sha256(b"d"), "main.drv").expect("drv"));
    main.claim.sigs = BTreeSet::from(["cache.example-1:c2ln".to_owned()]);
    import(&store, "alice", &main).expect("import main");

    let both = set(&[&dep.path(), &main.path()]);
    assert_eq!(
        store.query_valid_paths("alice", &both).expect("query"),
        both
    );

    let info = store
        .query_path_info("alice", &main.path())
        .expect("query")
        .expect("valid");
    assert_eq!(info.references, main.claim.references);
    assert_eq!(info.deriver, main.claim.deriver);
    assert_eq!(info.sigs, main.claim.sigs);
    assert_eq!(info.nar_hash, main.claim.nar_hash);
    assert_eq!(info.nar_size, main.nar.len() as u64);
    assert_eq!(info.download_size, main.nar.len() as u64);
    assert_eq!(info.ca, None);
    let dep_info = store.query_path_info("alice", &dep.path()).expect("query");
    assert_eq!(dep_info.expect("valid").ca, dep.claim.ca);

    assert_eq!(
        export(&store, "alice", &main.path()).expect("export"),
        main.nar
    );
    assert_eq!(
        export(&store, "alice", &dep.path()).expect("export"),
        dep.nar
    );

    assert_eq!(
        store
            .query_closure("alice", &set(&[&main.path()]), false)
            .expect("closure"),
        both
    );
    assert_eq!(
        store
            .query_closure("alice", &set(&[&dep.path()]), false)
            .expect("closure"),
        set(&[&dep.path()])
    );
    assert_eq!(object_count(state.path()), 2);
    assert_consistent(state.path(), &store);

    // Reopening keeps everything.
    drop(store);
    let store = open(state.path());
    assert_eq!(
        store.query_valid_paths("alice", &both).expect("query"),
        both
    );
    assert_eq!(
        export(&store, "alice", &main.path()).expect("export"),
        main.nar
    );
    assert_consistent(state.path(), &store);
}

#[test]
fn objects_are_canonical_on_disk() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let up = input_addressed("tree", "tree", &tree(), &[]);
    import(&store, "alice", &up).expect("import");
    let objects = entries(&state.path().join("objects"));
    let [root] = objects.as_slice() else {
        panic!("one object expected, got {objects:?}")
    };
    let want = [
        ("", 0o555, true),
        ("bin", 0o555, true),
        ("bin/hello", 0o555, true),
        ("empty", 0o444, true),
        ("share", 0o555, true),
        ("share/doc", 0o555, true),
        ("share/doc/README", 0o444, true),
        ("link", 0o777, false),
    ];
    for (rel, mode, canonical_time) in want {
        let path = if rel.is_empty() {
            root.clone()
        } else {
            root.join(rel)
        };
        let meta = fs::symlink_metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o7777, mode, "{rel}");
        if canonical_time {
            assert_eq!((meta.mtime(), meta.mtime_nsec()), (1, 0), "{rel}");
        }
    }
    assert_eq!(
        fs::read_link(root.join("link")).expect("readlink"),
        Path::new("bin/hello")
    );
}

#[test]
fn single_file_and_symlink_roots() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let f = source("script", &exe(b"#!/bin/sh\n"), &[]);
    let l = source(
        "link",
        &NarNode::Symlink {
            target: b"/nix/store/x".to_vec(),
        },
        &[],
    );
    for up in [&f, &l] {
        import(&store, "alice", up).expect("import");
        assert_eq!(export(&store, "alice", &up.path()).expect("export"), up.nar);
    }
    let meta = fs::symlink_metadata(&entries(&state.path().join("objects"))[0]);
    assert!(meta.is_ok());
    assert_consistent(state.path(), &store);
}

/// What a rejected import must look like: the expected error, no row, no object, no tmp
/// leftovers.
fn assert_rejected(
    store: &Store,
    state: &Path,
    result: Result<(), StoreError>,
    path: &StorePath,
    check: impl FnOnce(&StoreError) -> bool,
) {
    let err = result.expect_err("import must fail");
    assert!(check(&err), "unexpected error: {err}");
    assert_eq!(
        store
            .query_valid_paths("alice", &set(&[path]))
            .expect("query"),
        BTreeSet::new()
    );
    assert_eq!(store.query_path_info("alice", path).expect("query"), None);
    assert!(matches!(
        export(store, "alice", path),
        Err(StoreError::NotValid { .. })
    ));
    assert_eq!(object_count(state), 0);
    assert_consistent(state, store);
}

#[test]
fn bad_claims_register_nothing() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let good = input_addressed("p", "p", &tree(), &[]);
    let path = good.path();

    let mut bad = good.clone();
    bad.claim.nar_hash = Some(sha256(b"something else"));
    assert_rejected(
        &store,
        state.path(),
        import(&store, "alice", &bad),
        &path,
        |e| {
            matches!(e, StoreError::HashMismatch { claimed, actual, .. }
            if **claimed == sha256(b"something else") && Some(**actual) == good.claim.nar_hash)
        },
    );

    let mut bad = good.clone();
    bad.claim.nar_size = Some(good.nar.len() as u64 + 8);
    assert_rejected(
        &store,
        state.path(),
        import(&store, "alice", &bad),
        &path,
        |e| {
            matches!(e, StoreError::SizeMismatch { claimed, actual, .. }
            if *claimed == good.nar.len() as u64 + 8 && *actual == good.nar.len() as u64)
        },
    );

    let mut bad = good.clone();
    bad.nar.truncate(good.nar.len() - 8);
    assert_rejected(
        &store,
        state.path(),
        import(&store, "alice", &bad),
        &path,
        |e| matches!(e, StoreError::Nar(NarError::Incomplete { .. })),
    );

    let mut bad = good.clone();
    bad.nar.extend_from_slice(b"trailing");
    assert_rejected(
        &store,
        state.path(),
        import(&store, "alice", &bad),
        &path,
        |e| {
            matches!(e, StoreError::Nar(NarError::TrailingData { offset, .. })
            if *offset == good.nar.len() as u64)
        },
    );

    // A claim about another path that is valid for nobody: its reference is missing.
    let other = input_addressed("other", "other", &file(b"x"), &[]);
    let mut bad = input_addressed("q", "q", &file(b"q"), &[&other.path()]);
    bad.claim.references.insert(bad.path());
    assert_rejected(
        &store,
        state.path(),
        import(&store, "alice", &bad),
        &bad.path(),
        |e| {
            matches!(e, StoreError::MissingReference { reference, account, .. }
            if **reference == other.path() && account == "alice")
        },
    );
}

#[test]
fn oversized_nar_is_refused_as_it_arrives() {
    let state = tempfile::tempdir().expect("tempdir");
    let up = input_addressed("big", "big", &file(&[1u8; 10_000]), &[]);
    let store = Store::open(
        state.path(),
        StoreLimits {
            max_nar_size: 5_000,
            disk_reserve: 0,
        },
    )
    .expect("open");
    let mut import = store.begin_import("alice").expect("begin");
    let mut fed = 0;
    let err = loop {
        match import.write(&up.nar[fed..fed + 1000]) {
            Ok(()) => fed += 1000,
            Err(e) => break e,
        }
    };
    assert_eq!(fed, 5000, "refused as soon as the limit was crossed");
    assert!(matches!(
        err,
        StoreError::NarTooLarge {
            limit: 5000,
            received: 6000
        }
    ));
    // The import is dead, and its files are already gone.
    assert_eq!(entries(&state.path().join("tmp")), Vec::<PathBuf>::new());
    assert!(matches!(import.write(b"x"), Err(StoreError::ImportFailed)));
    assert!(matches!(
        import.commit(up.claim.clone()),
        Err(StoreError::ImportFailed)
    ));
    assert_rejected(&store, state.path(), Err(err), &up.path(), |_| true);
}

/// Replaces the first occurrence of `from` in `nar` by `to` (same length).
fn patch(nar: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let pos = nar
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in NAR");
    let mut out = nar.to_vec();
    out[pos..pos + to.len()].copy_from_slice(to);
    out
}

#[test]
fn invalid_entry_names_are_refused() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let node = dir([("aa", file(b"x")), ("zzz", file(b"y"))]);
    for (from, to) in [(&b"aa"[..], &b".."[..]), (b"zzz", b"z/z"), (b"aa", b"a\0")] {
        let mut up = input_addressed("names", "names", &node, &[]);
        up.nar = patch(&up.nar, from, to);
        up.claim.nar_hash = Some(sha256(&up.nar));
        assert_rejected(
            &store,
            state.path(),
            import(&store, "alice", &up),
            &up.path(),
            |e| matches!(e, StoreError::Nar(NarError::InvalidName { .. })),
        );
    }
}

#[test]
fn content_addresses_are_checked_against_contents_and_path() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let contents = b"fixed output contents";

    // Each kind of content address, imported with and without announcing it first.
    let good = [
        fixed(
            "flat",
            ContentAddressMethod::Flat,
            HashAlgo::Sha256,
            &file(contents),
        ),
        fixed(
            "flat1",
            ContentAddressMethod::Flat,
            HashAlgo::Sha1,
            &file(contents),
        ),
        fixed(
            "rec1",
            ContentAddressMethod::Recursive,
            HashAlgo::Sha1,
            &tree(),
        ),
        fixed(
            "rec512",
            ContentAddressMethod::Recursive,
            HashAlgo::Sha512,
            &tree(),
        ),
        fixed(
            "text",
            ContentAddressMethod::Text,
            HashAlgo::Sha256,
            &file(contents),
        ),
        source("src", &tree(), &[]),
    ];
    for (i, up) in good.iter().enumerate() {
        let account = format!("acct{i}");
        for announce in [true, false] {
            let account = format!("{account}-{announce}");
            let mut import = store.begin_import(&account).expect("begin");
            if announce {
                import.expect_ca(&up.claim.ca.expect("ca"));
            }
            feed(&mut import, &up.nar).expect("feed");
            import
                .commit(up.claim.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", up.path()));
            assert_eq!(
                export(&store, &account, &up.path()).expect("export"),
                up.nar
            );
        }
    }
    let objects = object_count(state.path());

    // Contents that do not match the ca (the path is the one the claimed ca gives).
    for up in &good {
        let mut bad = up.clone();
        let ca = bad.claim.ca.as_mut().expect("ca");
        ca.hash = Hash::compute(ca.hash.algo(), b"other");
        bad.claim.path =
            make_fixed_output_path(up.path().name(), ca, &BTreeSet::new(), false).expect("path");
        let err = import(&store, "mallory", &bad).expect_err("ca mismatch");
        assert!(matches!(err, StoreError::CaMismatch { .. }), "{err}");
    }
    // A ca that matches the contents on a path it does not give.
    for up in &good {
        let mut bad = up.clone();
        bad.claim.path =
            make_store_path("output:out", &sha256(b"elsewhere"), up.path().name()).expect("path");
        let err = import(&store, "mallory", &bad).expect_err("path mismatch");
        assert!(
            matches!(&err, StoreError::PathMismatch { expected, .. } if *expected == up.path()),
            "{err}"
        );
    }
    // Flat and text need a single non-executable file.
    for node in [exe(contents), dir([("f", file(contents))])] {
        let mut bad = fixed(
            "flat",
            ContentAddressMethod::Flat,
            HashAlgo::Sha256,
            &file(contents),
        );
        bad.nar = node.to_nar().expect("nar");
        bad.claim.nar_hash = Some(sha256(&bad.nar));
        bad.claim.nar_size = Some(bad.nar.len() as u64);
        let err = import(&store, "mallory", &bad).expect_err("not a file");
        assert!(matches!(err, StoreError::CaNotAFile { .. }), "{err}");
    }
    // A flat ca admits no references.
    let dep = input_addressed("dep", "dep", &file(b"d"), &[]);
    import(&store, "mallory", &dep).expect("import dep");
    let mut bad = fixed(
        "flat",
        ContentAddressMethod::Flat,
        HashAlgo::Sha256,
        &file(contents),
    );
    bad.claim.references.insert(dep.path());
    let err = import(&store, "mallory", &bad).expect_err("references");
    assert!(matches!(err, StoreError::CaPath { .. }), "{err}");

    let mallory: BTreeSet<StorePath> = good.iter().map(Upload::path).collect();
    assert_eq!(
        store.query_valid_paths("mallory", &mallory).expect("query"),
        BTreeSet::new()
    );
    assert_eq!(object_count(state.path()), objects + 1);
    assert_consistent(state.path(), &store);
}

#[test]
fn text_paths_with_references() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let dep = source("dep", &file(b"dep"), &[]);
    import(&store, "alice", &dep).expect("dep");
    let contents = b"refers to the dep";
    let refs = set(&[&dep.path()]);
    let path = make_text_path("t.txt", &sha256(contents), &refs).expect("path");
    let mut up = upload_at(path, &file(contents), &[&dep.path()]);
    up.claim.ca = Some(ContentAddress {
        method: ContentAddressMethod::Text,
        hash: sha256(contents),
    });
    import(&store, "alice", &up).expect("text path");
    // The same text path claimed without its reference is a different path.
    let mut bad = up.clone();
    bad.claim.references.clear();
    let err = import(&store, "bob", &bad).expect_err("path mismatch");
    assert!(matches!(err, StoreError::PathMismatch { .. }), "{err}");
}

#[test]
fn accounts_are_isolated() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let up = source("secret", &file(b"alice's"), &[]);
    import(&store, "a", &up).expect("import");
    let path = up.path();
    assert_eq!(
        store.query_valid_paths("b", &set(&[&path])).expect("query"),
        BTreeSet::new()
    );
    assert_eq!(store.query_path_info("b", &path).expect("query"), None);
    assert!(matches!(
        export(&store, "b", &path),
        Err(StoreError::NotValid { account, .. }) if account == "b"
    ));
    assert!(matches!(
        store.query_closure("b", &set(&[&path]), true),
        Err(StoreError::NotValid { .. })
    ));
    // b cannot reference a's path either.
    let child = input_addressed("child", "child", &file(b"c"), &[&path]);
    let err = import(&store, "b", &child).expect_err("missing reference");
    assert!(matches!(&err, StoreError::MissingReference { account, .. } if account == "b"));
    // Claiming a's NAR hash and size with different bytes gets nothing.
    let mut forged = up.clone();
    forged.nar = patch(&up.nar, b"alice's", b"mallory");
    let err = import(&store, "b", &forged).expect_err("forged");
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
    assert_eq!(store.query_path_info("b", &path).expect("query"), None);
    // Once b uploads the bytes itself, it sees the path, sharing a's object.
    import(&store, "b", &up).expect("b's own upload");
    assert_eq!(export(&store, "b", &path).expect("export"), up.nar);
    assert_eq!(object_count(state.path()), 1);
    assert_consistent(state.path(), &store);
}

#[test]
fn same_name_different_contents_coexist_and_identical_contents_are_shared() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let a = input_addressed("same", "same", &file(b"built by a"), &[]);
    let b = input_addressed("same", "same", &file(b"built by b"), &[]);
    assert_eq!(a.path(), b.path());
    import(&store, "a", &a).expect("a");
    import(&store, "b", &b).expect("b");
    assert_eq!(object_count(state.path()), 2);
    assert_eq!(export(&store, "a", &a.path()).expect("export"), a.nar);
    assert_eq!(export(&store, "b", &b.path()).expect("export"), b.nar);
    import(&store, "c", &a).expect("c");
    assert_eq!(object_count(state.path()), 2);
    assert_eq!(export(&store, "c", &a.path()).expect("export"), a.nar);

    // Re-committing a valid path is a no-op success, even with other contents: the first
    // registration stays and no object is added.
    import(&store, "a", &a).expect("again");
    import(&store, "a", &b).expect("other contents");
    assert_eq!(export(&store, "a", &a.path()).expect("export"), a.nar);
    assert_eq!(object_count(state.path()), 2);
    assert_consistent(state.path(), &store);
}

#[test]
fn concurrent_imports_of_one_path_both_succeed_with_one_object() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let up = input_addressed("shared", "shared", &tree(), &[]);
    for accounts in [["x", "x"], ["y", "z"]] {
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = accounts
            .into_iter()
            .map(|account| {
                let (store, up, barrier) = (store.clone(), up.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut import = store.begin_import(account).expect("begin");
                    feed(&mut import, &up.nar).expect("feed");
                    // Both imports are complete before either commits.
                    barrier.wait();
                    import.commit(up.claim.clone())
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("commit");
        }
    }
    for account in ["x", "y", "z"] {
        assert_eq!(export(&store, account, &up.path()).expect("export"), up.nar);
    }
    assert_eq!(object_count(state.path()), 1);
    assert_consistent(state.path(), &store);
}

#[test]
fn open_removes_leftovers_of_a_crash() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let kept = source("kept", &tree(), &[]);
    import(&store, "alice", &kept).expect("import");
    // An import in progress when the process died.
    let mut import = store.begin_import("alice").expect("begin");
    feed(&mut import, &tree().to_nar().expect("nar")[..1000]).expect("feed");
    std::mem::forget(import);
    drop(store);
    // A crash between publishing an object and inserting its row: a read-only tree.
    let orphan = state
        .path()
        .join("objects/0000000000000000000000000000000000000000000000000000");
    fs::create_dir_all(orphan.join("sub")).expect("mkdir");
    fs::write(orphan.join("sub/f"), b"x").expect("write");
    for d in [orphan.join("sub"), orphan.clone()] {
        fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o555))
            .expect("chmod");
    }
    fs::write(state.path().join("tmp/stray-file"), b"x").expect("write");
    assert_eq!(entries(&state.path().join("tmp")).len(), 2);
    assert_eq!(object_count(state.path()), 2);

    let store = open(state.path());
    assert_eq!(entries(&state.path().join("tmp")), Vec::<PathBuf>::new());
    assert_eq!(object_count(state.path()), 1);
    assert!(!orphan.exists());
    assert_eq!(
        export(&store, "alice", &kept.path()).expect("export"),
        kept.nar
    );
    assert_consistent(state.path(), &store);
}

#[test]
fn disk_reserve_refuses_imports() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = Store::open(
        state.path(),
        StoreLimits {
            max_nar_size: 1 << 30,
            disk_reserve: u64::MAX,
        },
    )
    .expect("open");
    match store.begin_import("alice") {
        Err(StoreError::DiskReserve { free, reserve, .. }) => {
            assert!(free < reserve);
            assert_eq!(reserve, u64::MAX);
        }
        other => panic!("expected DiskReserve, got {other:?}"),
    }
    assert_eq!(entries(&state.path().join("tmp")), Vec::<PathBuf>::new());
}

#[test]
fn verify_reports_damaged_objects() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let up = input_addressed("f", "f", &file(b"original"), &[]);
    import(&store, "alice", &up).expect("import");
    assert!(store.verify().expect("verify").is_empty());
    let object = entries(&state.path().join("objects")).remove(0);
    fs::set_permissions(&object, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    fs::write(&object, b"damaged!").expect("write");
    let problems = store.verify().expect("verify");
    match problems.as_slice() {
        [StoreProblem::Mismatch {
            recorded_hash,
            actual_hash,
            recorded_size,
            actual_size,
            ..
        }] => {
            assert_eq!(Some(*recorded_hash), up.claim.nar_hash);
            assert_eq!(
                *actual_hash,
                sha256(&file(b"damaged!").to_nar().expect("nar"))
            );
            assert_eq!(
                (*recorded_size, *actual_size),
                (up.nar.len() as u64, up.nar.len() as u64)
            );
        }
        other => panic!("expected one mismatch, got {other:?}"),
    }
    // The export notices the changed size too.
    fs::write(&object, b"damaged, longer").expect("write");
    assert!(matches!(
        export(&store, "alice", &up.path()),
        Err(StoreError::ExportSize { .. })
    ));
}

#[test]
fn closure_includes_valid_outputs_of_derivations() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let lib = source("lib", &file(b"lib"), &[]);
    let out_path = make_store_path("output:out", &sha256(b"out"), "pkg").expect("path");
    let dev_path = make_store_path("output:out", &sha256(b"dev"), "pkg-dev").expect("path");
    let mut drv = Derivation::default();
    drv.basic.outputs = BTreeMap::from([
        (
            "out".to_owned(),
            DerivationOutput::InputAddressed(out_path.clone()),
        ),
        (
            "dev".to_owned(),
            DerivationOutput::InputAddressed(dev_path.clone()),
        ),
    ]);
    drv.basic.input_srcs = set(&[&lib.path()]);
    drv.basic.platform = b"x86_64-linux".to_vec();
    drv.basic.builder = b"/bin/sh".to_vec();
    let text = drv.to_aterm();
    let drv_path = make_text_path("pkg.drv", &sha256(&text), &set(&[&lib.path()])).expect("path");
    let mut drv_up = upload_at(drv_path.clone(), &file(&text), &[&lib.path()]);
    drv_up.claim.ca = Some(ContentAddress {
        method: ContentAddressMethod::Text,
        hash: sha256(&text),
    });
    let runtime = source("runtime", &file(b"rt"), &[]);
    let out = upload_at(out_path.clone(), &file(b"built"), &[&runtime.path()]);
    for up in [&lib, &drv_up, &runtime, &out] {
        import(&store, "alice", up).expect("import");
    }
    let start = set(&[&drv_path]);
    assert_eq!(
        store
            .query_closure("alice", &start, false)
            .expect("closure"),
        set(&[&drv_path, &lib.path()])
    );
    // `dev` is not valid, so only `out` (and its closure) joins.
    assert_eq!(
        store.query_closure("alice", &start, true).expect("closure"),
        set(&[&drv_path, &lib.path(), &out_path, &runtime.path()])
    );
    // Another account with only the .drv sees no outputs.
    for up in [&lib, &drv_up] {
        import(&store, "bob", up).expect("import");
    }
    assert_eq!(
        store.query_closure("bob", &start, true).expect("closure"),
        set(&[&drv_path, &lib.path()])
    );
    // A `.drv` that is not a derivation has no outputs, and does not fail the request.
    let bogus = fixed(
        "bogus.drv",
        ContentAddressMethod::Text,
        HashAlgo::Sha256,
        &file(b"nope"),
    );
    import(&store, "alice", &bogus).expect("import");
    let start = set(&[&bogus.path()]);
    assert_eq!(
        store
            .query_closure("alice", &start, false)
            .expect("closure"),
        start
    );
    assert_eq!(
        store.query_closure("alice", &start, true).expect("closure"),
        start
    );
    // Next to a real derivation, whose outputs are still found.
    let both = set(&[&bogus.path(), &drv_path]);
    assert_eq!(
        store.query_closure("alice", &both, true).expect("closure"),
        set(&[
            &bogus.path(),
            &drv_path,
            &lib.path(),
            &out_path,
            &runtime.path()
        ])
    );
    // A `.drv` that is a directory is no derivation either.
    let dir_drv = input_addressed("dir.drv", "dir-drv", &dir([("x", file(b"x"))]), &[]);
    import(&store, "alice", &dir_drv).expect("import");
    let start = set(&[&dir_drv.path()]);
    assert_eq!(
        store.query_closure("alice", &start, true).expect("closure"),
        start
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Any tree, fed in any chunk size, is stored and exported byte-identically.
    #[test]
    fn any_tree_round_trips(
        node in nixbuild_core::nar::strategies::arb_nar_node(),
        chunk in 1usize..5000,
    ) {
        let state = tempfile::tempdir().expect("tempdir");
        let store = open(state.path());
        let up = source("tree", &node, &[]);
        let mut import = store.begin_import("alice").expect("begin");
        for piece in up.nar.chunks(chunk) {
            import.write(piece).expect("write");
        }
        import.commit(up.claim.clone()).expect("commit");
        proptest::prop_assert_eq!(export(&store, "alice", &up.path()).expect("export"), up.nar);
        assert_consistent(state.path(), &store);
    }
}

#[test]
fn an_abandoned_import_leaves_nothing() {
    let state = tempfile::tempdir().expect("tempdir");
    let store = open(state.path());
    let up = input_addressed("abandoned", "abandoned", &tree(), &[]);
    let mut import = store.begin_import("alice").expect("begin");
    feed(&mut import, &up.nar[..up.nar.len() / 2]).expect("feed");
    assert_eq!(entries(&state.path().join("tmp")).len(), 1);
    drop(import);
    assert_eq!(object_count(state.path()), 0);
    assert_eq!(
        store.query_path_info("alice", &up.path()).expect("query"),
        None
    );
    assert_consistent(state.path(), &store);
}

/// The daemon shares the store between tasks and moves imports into blocking threads.
#[test]
fn store_and_import_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Store>();
    send::<Import>();
    send_sync::<StoreError>();
}

#[test]
fn state_directory_modes_do_not_follow_the_umask() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = tempfile::tempdir().expect("tempdir");
    let state = parent.path().join("state");
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    {
        let store = open(&state);
        import(&store, "alice", &source("m", &file(b"modes"), &[])).expect("import");
        // The store is open, so the WAL and its index exist.
        for (name, want) in [
            ("", 0o711),
            ("objects", 0o700),
            ("tmp", 0o700),
            ("db.sqlite", 0o600),
            ("db.sqlite-wal", 0o600),
            ("db.sqlite-shm", 0o600),
        ] {
            assert_eq!(mode(&state.join(name)), want, "{name}");
        }
    }
    // An existing layout made with a wide mode is restricted when the store opens.
    let wide = parent.path().join("wide");
    fs::DirBuilder::new()
        .mode(0o777)
        .create(&wide)
        .expect("mkdir");
    fs::set_permissions(&wide, fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::create_dir(wide.join("objects")).expect("mkdir objects");
    fs::set_permissions(wide.join("objects"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(wide.join("db.sqlite"), b"").expect("db file");
    fs::set_permissions(wide.join("db.sqlite"), fs::Permissions::from_mode(0o644)).expect("chmod");
    drop(open(&wide));
    assert_eq!(mode(&wide), 0o711);
    assert_eq!(mode(&wide.join("objects")), 0o700);
    assert_eq!(mode(&wide.join("db.sqlite")), 0o600);
}

#[test]
fn many_small_files_hit_the_inode_reserve_within_one_import() {
    // Room for the layout and the start of the import, but not for 10,001 more inodes
    // above the reserve: the NAR is far below 64 MiB, so only the node count can trigger
    // the check.
    let nr_inodes = nixbuild::store::INODE_RESERVE + 8_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let _fs = harness::Tmpfs::mount(dir.path(), &format!("size=256m,nr_inodes={nr_inodes}"));
    let state = dir.path().join("state");
    let limits = StoreLimits {
        max_nar_size: 1 << 30,
        disk_reserve: 1,
    };
    let store = Store::open(&state, limits).expect("open");
    let files: BTreeMap<Vec<u8>, NarNode> = (0..10_001)
        .map(|i| (format!("f{i:05}").into_bytes(), file(b"")))
        .collect();
    let nar = NarNode::Directory(files).to_nar().expect("nar");
    let mut import = store
        .begin_import("alice")
        .expect("begin: inodes are free yet");
    match feed(&mut import, &nar) {
        Err(StoreError::InodeReserve { free, reserve, .. }) => {
            assert!(free < reserve, "{free} {reserve}");
        }
        other => panic!("expected InodeReserve, got {other:?}"),
    }
    drop(import);
    assert_eq!(entries(&state.join("tmp")), Vec::<PathBuf>::new());
}

#[test]
fn realisations_are_per_account_and_count_only_while_the_path_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let store = open(&state);
    let up = source("ca-out", &file(b"built"), &[]);
    import(&store, "alice", &up).expect("import");
    let id = format!("sha256:{}!out", "ab".repeat(32));
    store
        .register_realisations("alice", &[(id.clone(), up.path())])
        .expect("register");
    assert_eq!(
        store.query_realisation("alice", &id).expect("query"),
        Some(up.path())
    );
    // Another account sees none of it, even once it holds the path itself.
    assert_eq!(store.query_realisation("bob", &id).expect("query"), None);
    import(&store, "bob", &up).expect("import");
    assert_eq!(store.query_realisation("bob", &id).expect("query"), None);
    // A realisation whose path the account does not hold is not one.
    let missing = input_addressed("gone", "gone", &file(b"x"), &[]).path();
    store
        .register_realisations("bob", &[(id.clone(), missing)])
        .expect("register");
    assert_eq!(store.query_realisation("bob", &id).expect("query"), None);
    // Kept across a restart.
    drop(store);
    let store = open(&state);
    assert_eq!(
        store.query_realisation("alice", &id).expect("query"),
        Some(up.path())
    );
}

/// The collector, quotas and build records, on the store alone.
mod collection {
    use super::*;
    use nixbuild::store::{AccountPolicy, BuildRecord, StorePolicy, STEP_ROWS};
    use std::time::Duration;

    /// A policy in which `expired` accounts keep nothing unused for a second (and the others
    /// keep everything for a day).
    fn expiring(expired: &[&str]) -> StorePolicy {
        let mut policy = StorePolicy {
            retention: 24 * 60 * 60,
            ..StorePolicy::default()
        };
        for account in expired {
            policy.accounts.insert(
                (*account).to_owned(),
                AccountPolicy {
                    retention: Some(0),
                    quota: None,
                },
            );
        }
        policy
    }

    /// Past the second in which everything so far was last used.
    fn next_second() {
        std::thread::sleep(Duration::from_millis(1100));
    }

    fn valid(store: &Store, account: &str, paths: &[&StorePath]) -> BTreeSet<StorePath> {
        store
            .query_valid_paths(account, &set(paths))
            .expect("query")
    }

    #[test]
    fn expired_grants_go_and_shared_objects_stay_while_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let store = open(&state);
        store.set_policy(expiring(&["alice"]));
        let lib = source("lib", &file(&[1u8; 5000]), &[]);
        let app = source("app", &tree(), &[&lib.path()]);
        for up in [&lib, &app] {
            import(&store, "alice", up).expect("import");
        }
        import(&store, "bob", &lib).expect("import");
        assert_eq!(object_count(&state), 2);
        next_second();
        let stats = store.collect().expect("collect");
        assert_eq!(stats.grants, 2, "{stats:?}");
        assert_eq!(stats.objects, 1, "only app's object is held by nobody");
        assert_eq!(stats.bytes, app.claim.nar_size.expect("size"));
        assert!(valid(&store, "alice", &[&lib.path(), &app.path()]).is_empty());
        assert_eq!(valid(&store, "bob", &[&lib.path()]), set(&[&lib.path()]));
        assert_eq!(object_count(&state), 1);
        assert_eq!(export(&store, "bob", &lib.path()).expect("export"), lib.nar);
        assert_eq!(store.usage("alice").expect("usage"), (0, 0));
        assert_consistent(&state, &store);
        // What was collected is uploaded again without trouble.
        import(&store, "alice", &lib).expect("re-import");
        import(&store, "alice", &app).expect("re-import");
        assert_eq!(
            export(&store, "alice", &app.path()).expect("export"),
            app.nar
        );
        assert_consistent(&state, &store);
    }

    #[test]
    fn a_path_in_use_keeps_its_closure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let store = open(&state);
        let lib = source("lib", &file(b"lib"), &[]);
        let app = source("app", &file(b"app"), &[&lib.path()]);
        let other = source("other", &file(b"other"), &[]);
        for up in [&lib, &app, &other] {
            import(&store, "alice", up).expect("import");
        }
        next_second();
        next_second();
        // Queried as valid now: app is used, lib is not, but app needs it.
        valid(&store, "alice", &[&app.path()]);
        store.set_policy(StorePolicy {
            retention: 1,
            ..StorePolicy::default()
        });
        let stats = store.collect_account("alice").expect("collect");
        assert_eq!(stats.grants, 1, "only other: {stats:?}");
        assert_eq!(
            valid(&store, "alice", &[&lib.path(), &app.path(), &other.path()]),
            set(&[&lib.path(), &app.path()])
        );
        assert_consistent(&state, &store);
    }

    #[test]
    fn pinned_rows_and_their_references_stay_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let store = open(&state);
        store.set_policy(expiring(&["alice"]));
        let lib = source("lib", &file(b"lib"), &[]);
        let app = source("app", &file(b"app"), &[&lib.path()]);
        for up in [&lib, &app] {
            import(&store, "alice", up).expect("import");
        }
        let pins = store.pins();
        store
            .hold_valid_paths("alice", &set(&[&app.path()]), Some(&pins))
            .expect("hold");
        next_second();
        assert_eq!(store.collect().expect("collect").grants, 0);
        assert_eq!(valid(&store, "alice", &[&lib.path(), &app.path()]).len(), 2);
        drop(pins);
        assert_eq!(store.pinned_rows(), 0);
        next_second();
        assert_eq!(store.collect().expect("collect").grants, 2);
        assert_consistent(&state, &store);
    }

    #[test]
    fn long_chains_are_collected_in_bounded_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let store = open(&state);
        // Each path references the one before, registered oldest first: the scan meets
        // references before referrers, so the steps must follow references back.
        let n = 3 * STEP_ROWS + 7;
        let mut previous: Option<StorePath> = None;
        for i in 0..n {
            let refs: Vec<&StorePath> = previous.iter().collect();
            let up = source(&format!("p{i}"), &file(format!("{i}").as_bytes()), &refs);
            import(&store, "alice", &up).expect("import");
            previous = Some(up.path());
        }
        store.set_policy(expiring(&["alice"]));
        next_second();
        let stats = store.collect().expect("collect");
        assert_eq!(stats.grants, n as u64);
        assert_eq!(stats.objects, n as u64);
        assert!(stats.steps >= 3, "{stats:?}");
        assert_eq!(object_count(&state), 0);
        assert_consistent(&state, &store);
    }

    #[test]
    fn quotas_refuse_with_the_numbers_after_collecting_expired_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let store = open(&state);
        let big = source("big", &file(&[3u8; 6000]), &[]);
        let small = source("small", &file(&[4u8; 3000]), &[]);
        let size = |u: &Upload| u.claim.nar_size.expect("size");
        let mut policy = StorePolicy::default();
        policy.accounts.insert(
            "alice".into(),
            AccountPolicy {
                retention: None,
                quota: Some(size(&big) + 100),
            },
        );
        store.set_policy(policy.clone());
        import(&store, "alice", &big).expect("fits");
        let refused = import(&store, "alice", &small).expect_err("over quota");
        let message = refused.to_string();
        assert!(matches!(refused, StoreError::Quota { .. }), "{message}");
        for part in [
            format!("holds {} bytes", size(&big)),
            format!("{} more", size(&small)),
            format!("quota of {} bytes", size(&big) + 100),
            "[accounts.\"alice\"]".to_owned(),
        ] {
            assert!(message.contains(&part), "{part:?} not in {message}");
        }
        store
            .check_build_quota("alice")
            .expect("below its quota, builds go on");
        let mut full = policy.clone();
        full.accounts.get_mut("alice").expect("alice").quota = Some(size(&big));
        store.set_policy(full);
        assert!(matches!(
            store.check_build_quota("alice"),
            Err(StoreError::Quota { adding: 0, .. })
        ));
        store.set_policy(policy.clone());
        // Another account is not held to alice's quota.
        import(&store, "bob", &small).expect("bob");
        // Once alice's paths may expire, the upload collects them and goes through.
        policy.accounts.get_mut("alice").expect("alice").retention = Some(0);
        store.set_policy(policy);
        next_second();
        import(&store, "alice", &small).expect("after collection");
        assert!(valid(&store, "alice", &[&big.path()]).is_empty());
        assert_eq!(store.usage("alice").expect("usage"), (size(&small), 1));
        store.check_build_quota("alice").expect("room for builds");
        assert_consistent(&state, &store);
    }

    #[test]
    fn a_version_1_store_is_migrated_with_usage_and_a_whole_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let lib = source("lib", &file(&[1u8; 3000]), &[]);
        let app = source("app", &file(b"app"), &[&lib.path()]);
        {
            let store = open(&state);
            for up in [&lib, &app] {
                import(&store, "alice", up).expect("import");
            }
            import(&store, "bob", &lib).expect("import");
        }
        // What version 1 wrote: no last use, no usage, no records.
        let db = rusqlite::Connection::open(state.join("db.sqlite")).expect("open");
        db.execute_batch(
            "DROP TABLE usage; DROP TABLE builds; DROP INDEX paths_expiry;
             ALTER TABLE paths DROP COLUMN last_used; UPDATE schema_version SET version = 1;",
        )
        .expect("make a version-1 database");
        drop(db);
        let store = open(&state);
        let size = |u: &Upload| u.claim.nar_size.expect("size");
        assert_eq!(
            store.usage("alice").expect("usage"),
            (size(&lib) + size(&app), 2)
        );
        assert_eq!(store.usage("bob").expect("usage"), (size(&lib), 1));
        // Registered "in 2023" by the client's claim, but used as of the upgrade: a day's
        // retention keeps everything.
        store.set_policy(StorePolicy {
            retention: 24 * 60 * 60,
            ..StorePolicy::default()
        });
        assert_eq!(store.collect().expect("collect").grants, 0);
        assert_eq!(valid(&store, "alice", &[&lib.path(), &app.path()]).len(), 2);
        assert_consistent(&state, &store);
        drop(store);
        let version: i64 = rusqlite::Connection::open(state.join("db.sqlite"))
            .expect("open")
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 2);
    }

    fn record(account: &str, ended_ms: u64, build: u64) -> BuildRecord {
        BuildRecord {
            id: 0,
            build,
            account: account.into(),
            drv: "/nix/store/00000000000000000000000000000000-x.drv".into(),
            outputs: "out /nix/store/00000000000000000000000000000000-x".into(),
            submitted_ms: ended_ms - 10,
            started_ms: Some(ended_ms - 5),
            ended_ms,
            status: "Built".into(),
            error: String::new(),
            cores: 2,
            memory: 1 << 30,
            cpu_us: Some(1234),
            peak_memory: Some(5 << 20),
            output_bytes: 100,
            shared: false,
            log_bytes: 0,
        }
    }

    #[test]
    fn records_keep_their_logs_until_their_retentions_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let store = open(&state);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        let log_text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut log = store.begin_log().expect("log");
        for chunk in log_text.chunks(999) {
            log.write(chunk).expect("write");
        }
        let old = store
            .insert_records(
                &[record("alice", now_ms - 3_000_000, store.next_build_id())],
                Some(log),
            )
            .expect("insert")[0];
        let recent = store
            .insert_records(&[record("alice", now_ms, store.next_build_id())], None)
            .expect("insert")[0];
        store
            .insert_records(&[record("bob", now_ms, store.next_build_id())], None)
            .expect("insert");
        let records = store.records(Some("alice"), 10).expect("records");
        assert_eq!(
            records.iter().map(|r| r.id).collect::<Vec<_>>(),
            [recent, old]
        );
        assert_eq!(records[1].build, 1);
        assert_eq!(store.records(None, 10).expect("records").len(), 3);
        assert_eq!(store.build_records(Some("bob"), 1).expect("records"), []);
        // Ids go on, also once the store is reopened (below).
        assert_eq!(store.next_build_id(), 4);
        let read_log = |account, build| {
            store
                .open_record_log(account, build)
                .expect("log")
                .map(|mut r| {
                    let mut text = Vec::new();
                    std::io::Read::read_to_end(&mut r, &mut text).expect("read");
                    text
                })
        };
        assert_eq!(records[1].log_bytes, log_text.len() as u64);
        assert_eq!(records[1].cpu_us, Some(1234));
        assert!(read_log(Some("alice"), 1) == Some(log_text.clone()));
        assert!(read_log(Some("bob"), 1).is_none(), "not bob's");
        assert!(read_log(None, 1) == Some(log_text.clone()), "an admin's");
        let stored = entries(&state.join("logs"));
        assert_eq!(stored.len(), 1);
        assert!(fs::metadata(&stored[0]).expect("stat").len() < log_text.len() as u64 / 4);
        // The log (50 minutes old) goes first, with a log retention of 40 minutes, then the
        // record with a record retention of 45.
        let mut policy = StorePolicy {
            log_retention: 2400,
            ..StorePolicy::default()
        };
        store.set_policy(policy.clone());
        assert_eq!(store.collect().expect("collect").records, 0);
        assert!(read_log(Some("alice"), 1).is_none());
        assert!(entries(&state.join("logs")).is_empty());
        policy.record_retention = 2700;
        store.set_policy(policy);
        assert_eq!(store.collect().expect("collect").records, 1);
        assert_eq!(store.records(Some("alice"), 10).expect("records").len(), 1);
        // A log stored without its record (a crash in between) goes at the next start.
        fs::write(state.join("logs").join("orphan.zst"), b"x").expect("write");
        drop(store);
        let store = open(&state);
        assert!(entries(&state.join("logs")).is_empty());
        assert_eq!(store.next_build_id(), 4, "after the highest recorded");
    }
}
