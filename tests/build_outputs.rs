//! Output processing of a finished build (`nixbuild::builds::outputs`), on trees made by hand
//! as a builder would leave them: owned by a build uid, with careless modes. Checked against
//! the real Nix where Nix computes the same thing (`nix-store --dump`, `nix-hash`).

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::Nix;
use nixbuild::builds::outputs::{
    process_outputs, ExpectedOutput, OutputError, OutputLimits, OutputsRequest, ProcessedOutput,
};
use nixbuild::store::{BuiltPath, PathClaim, Store, StoreError, StoreLimits};
use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::derivation::options::DerivationOptions;
use nixbuild_core::derivation::{fallback_output_path, DerivationOutput};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::nar::NarNode;
use nixbuild_core::nixbase32;
use nixbuild_core::rewrite::HashModulo;
use nixbuild_core::serve::BuildStatus;
use nixbuild_core::store_path::{make_fixed_output_path, make_store_path, StorePath};

/// The host uid the "builder" ran as.
const BUILD_UID: u32 = 30_001;
const ACCOUNT: &str = "alice";

const LIMITS: StoreLimits = StoreLimits {
    max_nar_size: 1 << 30,
    disk_reserve: 0,
};

fn sha256(data: &[u8]) -> Hash {
    Hash::compute(HashAlgo::Sha256, data)
}

fn path(name: &str, seed: &str) -> StorePath {
    make_store_path("output:out", &sha256(seed.as_bytes()), name).expect("path")
}

/// A store, a scratch `/nix/store` for the build, and the derivation's path.
struct Env {
    dir: tempfile::TempDir,
    store: Store,
    drv: StorePath,
    builds: u32,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state"), LIMITS).expect("open store");
        Env {
            dir,
            store,
            drv: path("thing.drv", "drv"),
            builds: 0,
        }
    }

    /// A fresh scratch store directory, as the sandbox leaves it.
    fn scratch(&mut self) -> PathBuf {
        self.builds += 1;
        let dir = self.dir.path().join(format!("build-{}/store", self.builds));
        fs::create_dir_all(&dir).expect("mkdir scratch");
        dir
    }

    fn objects(&self) -> BTreeSet<String> {
        fs::read_dir(self.dir.path().join("state/objects"))
            .expect("list objects")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect()
    }

    /// Where the store keeps the object of `path` with this NAR hash.
    fn object(&self, path: &StorePath, nar_hash: &Hash) -> PathBuf {
        let id = format!("{}:{}", path.base_name(), nar_hash.to_base16());
        self.dir
            .path()
            .join("state/objects")
            .join(nixbase32::encode(sha256(id.as_bytes()).digest()))
    }

    /// Uploads `node` as `path` with `references` for the account.
    fn input(&self, path: &StorePath, node: &NarNode, references: &[&StorePath]) {
        self.upload_as(ACCOUNT, path, node, references);
    }

    /// Uploads `node` as `path` with `references` for `account`.
    fn upload_as(
        &self,
        account: &str,
        path: &StorePath,
        node: &NarNode,
        references: &[&StorePath],
    ) {
        let nar = node.to_nar().expect("nar");
        let mut import = self.store.begin_import(account).expect("begin import");
        import.write(&nar).expect("write");
        import
            .commit(PathClaim {
                path: path.clone(),
                deriver: None,
                nar_hash: Some(sha256(&nar)),
                nar_size: Some(nar.len() as u64),
                references: references.iter().map(|r| (*r).clone()).collect(),
                registration_time: 1,
                ca: None,
                sigs: BTreeSet::new(),
            })
            .expect("commit input");
    }

    fn process(
        &self,
        scratch: &Path,
        outputs: &[ExpectedOutput],
        inputs: &BTreeSet<StorePath>,
        checks: &DerivationOptions,
    ) -> Result<Vec<ProcessedOutput>, OutputError> {
        self.process_request(&OutputsRequest {
            account: ACCOUNT,
            sharers: &[],
            drv_path: &self.drv,
            scratch_store: scratch,
            build_uid: BUILD_UID,
            outputs,
            input_closure: inputs,
            options: checks,
            limits: OutputLimits::NONE,
            abort: &AtomicBool::new(false),
        })
    }

    /// Processes `outputs` (no inputs, no checks) for `account` and `sharers`, within
    /// `limits`, with `abort` as the build service's flag.
    fn process_shared(
        &self,
        scratch: &Path,
        outputs: &[ExpectedOutput],
        (account, sharers): (&str, &[String]),
        limits: OutputLimits,
        abort: &AtomicBool,
    ) -> Result<Vec<ProcessedOutput>, OutputError> {
        self.process_request(&OutputsRequest {
            account,
            sharers,
            drv_path: &self.drv,
            scratch_store: scratch,
            build_uid: BUILD_UID,
            outputs,
            input_closure: &BTreeSet::new(),
            options: &DerivationOptions::default(),
            limits,
            abort,
        })
    }

    /// Processes `outputs` for the account alone within `limits`.
    fn process_within(
        &self,
        scratch: &Path,
        outputs: &[ExpectedOutput],
        limits: OutputLimits,
    ) -> Result<Vec<ProcessedOutput>, OutputError> {
        let not_aborted = AtomicBool::new(false);
        self.process_shared(scratch, outputs, (ACCOUNT, &[]), limits, &not_aborted)
    }

    fn process_request(
        &self,
        request: &OutputsRequest<'_>,
    ) -> Result<Vec<ProcessedOutput>, OutputError> {
        process_outputs(&self.store, request)
    }

    /// The NAR hash of `path` as `account` sees it, if valid for it.
    fn nar_hash(&self, account: &str, path: &StorePath) -> Option<Hash> {
        self.store
            .query_path_info(account, path)
            .expect("query")
            .and_then(|info| info.nar_hash)
    }

    fn valid(&self, account: &str, path: &StorePath) -> bool {
        self.store
            .query_path_info(account, path)
            .expect("query")
            .is_some()
    }
}

fn output(name: &str, path: &StorePath) -> ExpectedOutput {
    ExpectedOutput {
        name: name.to_owned(),
        path: path.clone(),
        fixed: None,
        floating: None,
    }
}

fn set(paths: &[&StorePath]) -> BTreeSet<StorePath> {
    paths.iter().map(|p| (*p).clone()).collect()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write(path: &Path, contents: impl AsRef<[u8]>, mode: u32) {
    fs::write(path, contents).expect("write");
    chmod(path, mode);
}

fn mkdir(path: &Path, mode: u32) {
    fs::create_dir(path).expect("mkdir");
    chmod(path, mode);
}

/// Gives the tree at `path` to `uid` (not following symlinks), as if the builder made it.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(100)).expect("lchown");
    if fs::symlink_metadata(path).expect("lstat").is_dir() {
        for entry in fs::read_dir(path).expect("list") {
            chown_tree(&entry.expect("entry").path(), uid);
        }
    }
}

/// Creates a single-file output `path` in `scratch` holding `contents`, owned by the build.
fn file_output(scratch: &Path, path: &StorePath, contents: impl AsRef<[u8]>) -> PathBuf {
    let root = scratch.join(path.base_name());
    write(&root, contents, 0o644);
    chown_tree(&root, BUILD_UID);
    root
}

/// Asserts every node under `path` is canonical: root-owned, mtime 1, 0444/0555 files,
/// 0555 directories, no extended attributes.
fn assert_canonical(path: &Path) {
    let meta = fs::symlink_metadata(path).expect("lstat");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path:?} owner");
    assert_eq!(meta.mtime(), 1, "{path:?} mtime");
    assert_eq!(
        rustix::fs::llistxattr_query(path).expect("listxattr"),
        0,
        "{path:?} has extended attributes"
    );
    if meta.file_type().is_symlink() {
        return;
    }
    let mode = meta.mode() & 0o7777;
    if meta.is_dir() {
        assert_eq!(mode, 0o555, "{path:?} mode");
        for entry in fs::read_dir(path).expect("list") {
            assert_canonical(&entry.expect("entry").path());
        }
    } else {
        assert!(mode == 0o444 || mode == 0o555, "{path:?} mode {mode:o}");
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).expect("lstat").mode() & 0o7777
}

#[test]
fn outputs_are_canonicalised_and_hashed_like_nix() {
    let nix = Nix::new();
    let mut env = Env::new();
    let scratch = env.scratch();
    let out = path("thing", "out");
    let root = scratch.join(out.base_name());
    mkdir(&root, 0o755);
    mkdir(&root.join("bin"), 0o700);
    write(&root.join("bin/tool"), "#!/bin/sh\n", 0o700);
    write(&root.join("bin/setuid"), "suid", 0o4755);
    write(&root.join("data"), "careless modes", 0o666);
    write(&root.join("private"), "", 0o600);
    mkdir(&root.join("sticky"), 0o1777);
    std::os::unix::fs::symlink("../data", root.join("bin/link")).expect("symlink");
    fs::hard_link(root.join("data"), root.join("sticky/data-again")).expect("hard link");
    rustix::fs::lsetxattr(
        root.join("data"),
        "user.builder",
        b"left behind",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("setxattr");
    chown_tree(&root, BUILD_UID);
    // chown drops setuid; the builder's own file would keep it.
    chmod(&root.join("bin/setuid"), 0o4755);
    assert_eq!(mode(&root.join("bin/setuid")), 0o4755);

    let done = env
        .process(
            &scratch,
            &[output("out", &out)],
            &BTreeSet::new(),
            &DerivationOptions::default(),
        )
        .expect("outputs accepted");
    assert_eq!(done.len(), 1);
    let info = &done[0].info;
    assert!(done[0].registered);
    assert_eq!(done[0].name, "out");
    assert_eq!(info.deriver.as_ref(), Some(&env.drv));
    assert_eq!(info.ca, None);
    assert!(info.references.is_empty());
    let nar_hash = info.nar_hash.expect("nar hash");

    // The files moved into the store, canonical, the setuid bit dropped as Nix does.
    assert!(!root.exists(), "the tree is moved, not copied");
    let object = env.object(&out, &nar_hash);
    assert_canonical(&object);
    assert_eq!(mode(&object.join("bin/setuid")), 0o555);
    assert_eq!(mode(&object.join("bin/tool")), 0o555);
    assert_eq!(mode(&object.join("data")), 0o444);
    assert_eq!(mode(&object.join("private")), 0o444);
    assert_eq!(
        fs::metadata(object.join("data")).expect("stat").ino(),
        fs::metadata(object.join("sticky/data-again"))
            .expect("stat")
            .ino(),
        "hard links within an output are kept"
    );

    // Nix's NAR of the same files: same hash and size.
    let nar = nix.dump(&object);
    assert_eq!(nar_hash, sha256(&nar));
    assert_eq!(info.nar_size, nar.len() as u64);
    let nix_hash = nix.run_line(
        "nix-hash",
        [
            OsStr::new("--type"),
            OsStr::new("sha256"),
            object.as_os_str(),
        ],
    );
    assert_eq!(nix_hash, nar_hash.to_base16());
    assert!(env.store.verify().expect("verify").is_empty());
}

/// Runs the build and expects a refusal that registers nothing and adds no object.
fn refused(
    env: &Env,
    scratch: &Path,
    outputs: &[ExpectedOutput],
    inputs: &BTreeSet<StorePath>,
    checks: &DerivationOptions,
) -> OutputError {
    let objects = env.objects();
    let err = env
        .process(scratch, outputs, inputs, checks)
        .expect_err("outputs refused");
    for o in outputs {
        assert!(!env.valid(ACCOUNT, &o.path), "{} registered", o.name);
    }
    assert_eq!(env.objects(), objects, "no object added");
    err
}

#[test]
fn fifos_sockets_and_devices_are_refused() {
    let mut env = Env::new();
    let out = path("thing", "out");
    for kind in ["fifo", "socket", "device", "root-fifo"] {
        let scratch = env.scratch();
        let root = scratch.join(out.base_name());
        let node = if kind == "root-fifo" {
            root.clone()
        } else {
            mkdir(&root, 0o755);
            mkdir(&root.join("sub"), 0o755);
            write(&root.join("sub/a"), "fine", 0o644);
            root.join("sub").join(kind)
        };
        let mode = rustix::fs::Mode::from_raw_mode(0o644);
        match kind {
            "socket" => drop(std::os::unix::net::UnixListener::bind(&node).expect("bind")),
            "device" => rustix::fs::mknodat(
                rustix::fs::CWD,
                &node,
                rustix::fs::FileType::CharacterDevice,
                mode,
                rustix::fs::makedev(1, 3),
            )
            .expect("mknod"),
            _ => rustix::fs::mknodat(rustix::fs::CWD, &node, rustix::fs::FileType::Fifo, mode, 0)
                .expect("mkfifo"),
        }
        chown_tree(&root, BUILD_UID);
        let err = refused(
            &env,
            &scratch,
            &[output("out", &out)],
            &BTreeSet::new(),
            &DerivationOptions::default(),
        );
        let shown = if kind == "root-fifo" {
            out.to_string()
        } else {
            format!("{out}/sub/{kind}")
        };
        assert!(
            matches!(err, OutputError::UnsupportedType { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("file '{shown}' has an unsupported type")
        );
        assert_eq!(err.build_status(), BuildStatus::OutputRejected);
    }
}

#[test]
fn suspicious_roots_and_foreign_files_are_refused() {
    let mut env = Env::new();
    let out = path("thing", "out");
    let suspicious = format!(
        "suspicious ownership or permission on '{out}' for output 'out'; rejecting this build \
         output"
    );
    // A group-writable root, and a root owned by someone else.
    for (mode, uid) in [
        (0o775, BUILD_UID),
        (0o757, BUILD_UID),
        (0o755, BUILD_UID + 1),
    ] {
        let scratch = env.scratch();
        let root = scratch.join(out.base_name());
        mkdir(&root, 0o755);
        write(&root.join("f"), "f", 0o644);
        chown_tree(&root, uid);
        chmod(&root, mode);
        let err = refused(
            &env,
            &scratch,
            &[output("out", &out)],
            &BTreeSet::new(),
            &DerivationOptions::default(),
        );
        assert!(matches!(err, OutputError::Suspicious { .. }), "{err:?}");
        assert_eq!(err.to_string(), suspicious);
    }
    // A file inside that the build does not own (as a hard link to a host file would be).
    let scratch = env.scratch();
    let root = scratch.join(out.base_name());
    mkdir(&root, 0o755);
    mkdir(&root.join("etc"), 0o755);
    write(&root.join("etc/shadow"), "secret", 0o640);
    chown_tree(&root, BUILD_UID);
    std::os::unix::fs::lchown(root.join("etc/shadow"), Some(0), Some(0)).expect("chown");
    let err = refused(
        &env,
        &scratch,
        &[output("out", &out)],
        &BTreeSet::new(),
        &DerivationOptions::default(),
    );
    assert_eq!(
        err.to_string(),
        format!("invalid ownership on file '{out}/etc/shadow'")
    );
    assert_eq!(err.build_status(), BuildStatus::OutputRejected);
}

#[test]
fn a_missing_output_is_refused_and_nothing_is_registered() {
    let mut env = Env::new();
    let scratch = env.scratch();
    let out = path("thing", "out");
    let dev = path("thing-dev", "dev");
    file_output(&scratch, &out, "present");
    let err = refused(
        &env,
        &scratch,
        &[output("dev", &dev), output("out", &out)],
        &BTreeSet::new(),
        &DerivationOptions::default(),
    );
    assert_eq!(
        err.to_string(),
        format!(
            "builder for '{}' failed to produce output path for output 'dev' at '{dev}'",
            env.drv
        )
    );
    assert_eq!(err.build_status(), BuildStatus::OutputRejected);
}

#[test]
fn symlink_outputs_are_accepted() {
    let nix = Nix::new();
    let mut env = Env::new();
    let scratch = env.scratch();
    let out = path("link", "out");
    let root = scratch.join(out.base_name());
    std::os::unix::fs::symlink("/somewhere/else", &root).expect("symlink");
    chown_tree(&root, BUILD_UID);
    let done = env
        .process(
            &scratch,
            &[output("out", &out)],
            &BTreeSet::new(),
            &DerivationOptions::default(),
        )
        .expect("a symlink is a valid output");
    let hash = done[0].info.nar_hash.expect("hash");
    let object = env.object(&out, &hash);
    assert_canonical(&object);
    assert_eq!(sha256(&nix.dump(&object)), hash);
}

/// Inputs for the reference tests: `a` refers to `b`; `c` is in the closure but unused;
/// `d` is valid for the account but not an input of the build.
struct Inputs {
    a: StorePath,
    b: StorePath,
    c: StorePath,
    d: StorePath,
}

impl Inputs {
    fn upload(env: &Env) -> Inputs {
        let inputs = Inputs {
            a: path("a", "a"),
            b: path("b", "b"),
            c: path("c", "c"),
            d: path("d", "d"),
        };
        let file = |s: &str| NarNode::File {
            executable: false,
            contents: s.as_bytes().to_vec(),
        };
        env.input(&inputs.b, &file("b"), &[]);
        env.input(&inputs.a, &file(&inputs.b.to_string()), &[&inputs.b]);
        env.input(&inputs.c, &file("c"), &[]);
        env.input(&inputs.d, &file("d"), &[]);
        inputs
    }

    fn closure(&self) -> BTreeSet<StorePath> {
        set(&[&self.a, &self.b, &self.c])
    }
}

#[test]
fn references_are_found_only_among_candidates() {
    let mut env = Env::new();
    let inputs = Inputs::upload(&env);
    let scratch = env.scratch();
    let out = path("thing", "out");
    let dev = path("thing-dev", "dev");
    let root = scratch.join(out.base_name());
    mkdir(&root, 0o755);
    write(
        &root.join("refs"),
        format!("{} {} {}/bin {}", inputs.a, dev, out, inputs.d),
        0o644,
    );
    chown_tree(&root, BUILD_UID);
    // A bare hash part is a reference too.
    file_output(
        &scratch,
        &dev,
        format!("prefix{}suffix", inputs.b.hash_part()),
    );
    let done = env
        .process(
            &scratch,
            &[output("out", &out), output("dev", &dev)],
            &inputs.closure(),
            &DerivationOptions::default(),
        )
        .expect("accepted");
    assert_eq!(
        done.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
        ["out", "dev"],
        "in the order given"
    );
    assert_eq!(done[0].info.references, set(&[&inputs.a, &dev, &out]));
    assert_eq!(done[1].info.references, set(&[&inputs.b]));
    for o in &done {
        let stored = env
            .store
            .query_path_info(ACCOUNT, &o.path)
            .expect("query")
            .expect("valid");
        assert_eq!(stored, o.info);
        assert!(
            !env.valid("bob", &o.path),
            "registered for the account only"
        );
    }
    let closure = env
        .store
        .query_closure(ACCOUNT, &set(&[&out]), false)
        .expect("closure");
    assert_eq!(closure, set(&[&out, &dev, &inputs.a, &inputs.b]));
}

/// Outputs of 8 MiB or more are hashed on a second thread while the dump reads and scans
/// them: the same NAR hash and size as Nix's, references found across the dumper's 256 KiB
/// buffers, and a fixed output's own algorithm hashed there too.
#[test]
fn big_outputs_are_hashed_aside_with_the_same_results() {
    let nix = Nix::new();
    let mut env = Env::new();
    let inputs = Inputs::upload(&env);
    let scratch = env.scratch();
    let out = path("big", "out");
    let root = scratch.join(out.base_name());
    mkdir(&root, 0o755);
    // Not all zeros, so that a shifted or dropped buffer changes the hash.
    let mut big: Vec<u8> = (0..9u32 << 20).map(|i| (i % 251) as u8).collect();
    // One reference straddles the end of the dumper's first 256 KiB buffer (232 bytes of
    // NAR framing come before the contents), another ends the file.
    let a = inputs.a.to_string();
    let at = 256 * 1024 - 232 - 20;
    big[at..at + a.len()].copy_from_slice(a.as_bytes());
    let b = inputs.b.hash_part();
    let end = big.len();
    big[end - b.len()..].copy_from_slice(b.as_bytes());
    write(&root.join("big"), &big, 0o644);
    write(&root.join("small"), "after the big one", 0o644);
    chown_tree(&root, BUILD_UID);
    let done = env
        .process(
            &scratch,
            &[output("out", &out)],
            &inputs.closure(),
            &DerivationOptions::default(),
        )
        .expect("accepted");
    let info = &done[0].info;
    assert_eq!(info.references, set(&[&inputs.a, &inputs.b]));
    let object = env.object(&out, &info.nar_hash.expect("nar hash"));
    let nar = nix.dump(&object);
    assert_eq!(info.nar_hash, Some(sha256(&nar)));
    assert_eq!(info.nar_size, nar.len() as u64);

    // A recursive fixed output hashed with sha512 on the hashing thread too.
    let mut env = Env::new();
    let staging = env.dir.path().join("staging");
    fs::create_dir(&staging).expect("mkdir");
    let contents = "0123456789abcdef".repeat(9 << 16);
    let (fixed, _) = fixed_output(
        &nix,
        &staging,
        &env.scratch(),
        ContentAddressMethod::Recursive,
        HashAlgo::Sha512,
        fixed_tree(ContentAddressMethod::Recursive, &contents),
    );
    let done = env
        .process(
            &env.dir.path().join("build-1/store"),
            std::slice::from_ref(&fixed),
            &BTreeSet::new(),
            &DerivationOptions::default(),
        )
        .expect("the fixed output's hash matches");
    assert_eq!(done[0].info.ca, fixed.fixed);
}

#[test]
fn a_cycle_between_outputs_is_refused() {
    let mut env = Env::new();
    let scratch = env.scratch();
    let out = path("thing", "out");
    let dev = path("thing-dev", "dev");
    file_output(&scratch, &out, dev.to_string());
    file_output(&scratch, &dev, out.to_string());
    let err = refused(
        &env,
        &scratch,
        &[output("out", &out), output("dev", &dev)],
        &BTreeSet::new(),
        &DerivationOptions::default(),
    );
    assert_eq!(
        err.to_string(),
        format!(
            "cycle detected in build of '{}' in the references of output 'dev' from output 'out'",
            env.drv
        )
    );
    assert_eq!(err.build_status(), BuildStatus::OutputRejected);
}

#[test]
fn outputs_already_valid_are_not_registered_again() {
    let mut env = Env::new();
    let out = path("thing", "out");
    let scratch = env.scratch();
    file_output(&scratch, &out, "first");
    let first = env
        .process(
            &scratch,
            &[output("out", &out)],
            &BTreeSet::new(),
            &DerivationOptions::default(),
        )
        .expect("first build");
    assert!(first[0].registered);
    let objects = env.objects();
    let scratch = env.scratch();
    let second_root = file_output(&scratch, &out, "second, different");
    let second = env
        .process(
            &scratch,
            &[output("out", &out)],
            &BTreeSet::new(),
            &DerivationOptions::default(),
        )
        .expect("second build");
    assert!(!second[0].registered);
    assert_eq!(second[0].info, first[0].info);
    assert_eq!(env.objects(), objects);
    let meta = fs::symlink_metadata(&second_root).expect("left in place");
    assert_eq!(meta.uid(), BUILD_UID, "left unexamined");
}

#[test]
fn trees_deeper_than_a_nar_allows_are_refused() {
    let mut env = Env::new();
    let out = path("deep", "out");
    // The root is at depth 0; a NAR holds nodes down to depth 63.
    let nested = |scratch: &Path, dirs: usize| {
        let root = scratch.join(out.base_name());
        let mut dir = root.clone();
        for _ in 0..dirs {
            mkdir(&dir, 0o755);
            dir.push("d");
        }
        chown_tree(&root, BUILD_UID);
    };
    let scratch = env.scratch();
    nested(&scratch, 65);
    let err = refused(
        &env,
        &scratch,
        &[output("out", &out)],
        &BTreeSet::new(),
        &DerivationOptions::default(),
    );
    assert!(matches!(err, OutputError::TooDeep { .. }), "{err:?}");
    let shown = format!("{out}{}", "/d".repeat(64));
    assert_eq!(
        err.to_string(),
        format!("path '{shown}' exceeds maximum NAR directory depth of 64")
    );

    let scratch = env.scratch();
    nested(&scratch, 64);
    env.process(
        &scratch,
        &[output("out", &out)],
        &BTreeSet::new(),
        &DerivationOptions::default(),
    )
    .expect("63 levels below the root fit in a NAR");
}

/// `nix-hash --type <algo> [--flat] <path>` as a hash.
fn nix_hash(nix: &Nix, algo: HashAlgo, flat: bool, path: &Path) -> Hash {
    let mut args = vec![OsStr::new("--type"), OsStr::new(algo.name())];
    if flat {
        args.push(OsStr::new("--flat"));
    }
    args.push(path.as_os_str());
    Hash::parse_encoded(algo, &nix.run_line("nix-hash", args)).expect("nix-hash output")
}

/// Makes a fixed output's tree under `staging` with `make`, hashes it with Nix, and moves it
/// to where the build would have put the output with that content address.
fn fixed_output(
    nix: &Nix,
    staging: &Path,
    scratch: &Path,
    method: ContentAddressMethod,
    algo: HashAlgo,
    make: impl FnOnce(&Path),
) -> (ExpectedOutput, Hash) {
    let tree = staging.join("tree");
    make(&tree);
    chown_tree(&tree, BUILD_UID);
    let hash = nix_hash(nix, algo, method == ContentAddressMethod::Flat, &tree);
    let ca = ContentAddress { method, hash };
    let path = make_fixed_output_path("fixed", &ca, &BTreeSet::new(), false).expect("path");
    fs::rename(&tree, scratch.join(path.base_name())).expect("move into scratch");
    let expected = ExpectedOutput {
        name: "out".to_owned(),
        path,
        fixed: Some(ca),
        floating: None,
    };
    (expected, hash)
}

fn fixed_tree(method: ContentAddressMethod, contents: &str) -> impl FnOnce(&Path) + '_ {
    move |root: &Path| match method {
        ContentAddressMethod::Recursive => {
            mkdir(root, 0o755);
            write(&root.join("file"), contents, 0o644);
            write(&root.join("exe"), "#!/bin/sh\n", 0o755);
            std::os::unix::fs::symlink("file", root.join("link")).expect("symlink");
        }
        _ => write(root, contents, 0o644),
    }
}

#[test]
fn fixed_outputs_are_checked_against_their_hash() {
    let nix = Nix::new();
    for method in [ContentAddressMethod::Flat, ContentAddressMethod::Recursive] {
        for algo in [HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512] {
            let mut env = Env::new();
            let staging = env.dir.path().join("staging");
            fs::create_dir(&staging).expect("mkdir");
            let (right, hash) = fixed_output(
                &nix,
                &staging,
                &env.scratch(),
                method,
                algo,
                fixed_tree(method, "the right contents"),
            );

            // The same output with other contents: refused with Nix's message.
            let scratch = env.scratch();
            let (_, got) = fixed_output(
                &nix,
                &staging,
                &staging,
                method,
                algo,
                fixed_tree(method, "other contents"),
            );
            let wrong = fs::read_dir(&staging)
                .expect("list")
                .next()
                .expect("the other tree")
                .expect("entry")
                .path();
            fs::rename(wrong, scratch.join(right.path.base_name())).expect("move");
            let err = refused(
                &env,
                &scratch,
                std::slice::from_ref(&right),
                &BTreeSet::new(),
                &DerivationOptions::default(),
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "hash mismatch in fixed-output derivation '{}':\n  specified: {}\n     \
                     got:    {}",
                    env.drv,
                    hash.to_sri(),
                    got.to_sri()
                ),
                "{method:?} {algo}"
            );
            assert_eq!(err.build_status(), BuildStatus::OutputRejected);

            // The right contents: registered with their content address.
            let done = env
                .process(
                    &env.dir.path().join("build-1/store"),
                    std::slice::from_ref(&right),
                    &BTreeSet::new(),
                    &DerivationOptions::default(),
                )
                .unwrap_or_else(|e| panic!("{method:?} {algo}: {e}"));
            assert_eq!(done[0].info.ca, right.fixed, "{method:?} {algo}");
            assert!(done[0].info.references.is_empty());
        }
    }
}

/// Makes an output's tree at the path it is given.
type MakeTree = Box<dyn FnOnce(&Path)>;

#[test]
fn flat_fixed_outputs_must_be_plain_files_without_references() {
    let nix = Nix::new();
    let mut env = Env::new();
    let inputs = Inputs::upload(&env);
    let staging = env.dir.path().join("staging");
    fs::create_dir(&staging).expect("mkdir");
    let flat = ContentAddressMethod::Flat;
    let cases: [(&str, MakeTree); 2] = [
        (
            "executable",
            Box::new(|root: &Path| write(root, "#!/bin/sh\n", 0o755)),
        ),
        (
            "directory",
            Box::new(|root: &Path| {
                mkdir(root, 0o755);
                write(&root.join("f"), "f", 0o644);
            }),
        ),
    ];
    for (what, make) in cases {
        let scratch = env.scratch();
        // A flat hash of a directory cannot be computed; any hash does for a path.
        let (expected, _) = fixed_output(
            &nix,
            &staging,
            &scratch,
            ContentAddressMethod::Recursive,
            HashAlgo::Sha256,
            make,
        );
        let path = make_fixed_output_path(
            "fixed",
            &ContentAddress {
                method: flat,
                hash: sha256(what.as_bytes()),
            },
            &BTreeSet::new(),
            false,
        )
        .expect("path");
        fs::rename(
            scratch.join(expected.path.base_name()),
            scratch.join(path.base_name()),
        )
        .expect("rename");
        let expected = ExpectedOutput {
            name: "out".to_owned(),
            path: path.clone(),
            fixed: Some(ContentAddress {
                method: flat,
                hash: sha256(what.as_bytes()),
            }),
            floating: None,
        };
        let err = refused(
            &env,
            &scratch,
            &[expected],
            &BTreeSet::new(),
            &DerivationOptions::default(),
        );
        assert_eq!(
            err.to_string(),
            format!(
                "output path '{path}' should be a non-executable regular file since recursive \
                 hashing is not enabled (outputHashMode=flat)"
            ),
            "{what}"
        );
    }

    // A fixed output may not refer to its inputs.
    let scratch = env.scratch();
    let (expected, _) = fixed_output(
        &nix,
        &staging,
        &scratch,
        ContentAddressMethod::Recursive,
        HashAlgo::Sha256,
        fixed_tree(ContentAddressMethod::Recursive, &inputs.a.to_string()),
    );
    let err = refused(
        &env,
        &scratch,
        &[expected],
        &inputs.closure(),
        &DerivationOptions::default(),
    );
    assert_eq!(
        err.to_string(),
        format!(
            "fixed-output derivations must not reference store paths: '{}' references 1 \
             distinct paths, e.g. '{}'",
            env.drv, inputs.a
        )
    );
}

/// The options of a derivation whose environment sets `var` to `value`.
fn checks(var: &str, value: &str) -> DerivationOptions {
    let env = BTreeMap::from([
        (var.as_bytes().to_vec(), value.as_bytes().to_vec()),
        (b"name".to_vec(), b"thing".to_vec()),
    ]);
    DerivationOptions::from_env(&env).expect("options")
}

/// Reference checks: the variable, its value (`A`, `B`, `C` stand for the inputs' paths),
/// and the paths the refusal lists (`OUT` for the output itself), none when accepted.
const REFERENCE_CASES: &[(&str, &str, &[&str])] = &[
    ("allowedReferences", "A out", &[]),
    // A self-reference is a reference: it must be allowed too.
    ("allowedReferences", "A", &["OUT"]),
    ("allowedReferences", "B\tout\nC", &["A"]),
    // Requisites ignore the output itself.
    ("allowedRequisites", "A B", &[]),
    ("allowedRequisites", "A", &["B"]),
    // An empty list is a check too.
    ("allowedRequisites", "", &["A", "B"]),
    ("disallowedReferences", "B", &[]),
    ("disallowedReferences", "C A", &["A"]),
    ("disallowedRequisites", "C out", &[]),
    ("disallowedRequisites", "B A", &["A", "B"]),
];

#[test]
fn reference_checks_accept_and_reject_like_nix() {
    for &(var, value, bad) in REFERENCE_CASES {
        let mut env = Env::new();
        let inputs = Inputs::upload(&env);
        let scratch = env.scratch();
        let out = path("thing", "out");
        // `out` refers to `a` (which refers to `b`) and to itself.
        file_output(&scratch, &out, format!("{} {out}", inputs.a));
        // Store paths are lowercase, so replacing one letter cannot touch another's path.
        let value = value
            .replace('A', &inputs.a.to_string())
            .replace('B', &inputs.b.to_string())
            .replace('C', &inputs.c.to_string());
        let spec = checks(var, &value);
        let outputs = [output("out", &out)];
        if bad.is_empty() {
            env.process(&scratch, &outputs, &inputs.closure(), &spec)
                .unwrap_or_else(|e| panic!("{var} = {value:?}: {e}"));
            continue;
        }
        let bad: BTreeSet<&StorePath> = bad
            .iter()
            .map(|token| match *token {
                "A" => &inputs.a,
                "B" => &inputs.b,
                _ => &out,
            })
            .collect();
        let err = refused(&env, &scratch, &outputs, &inputs.closure(), &spec);
        let listed: String = bad.iter().map(|p| format!("\n  {p}")).collect();
        assert_eq!(
            err.to_string(),
            format!("output '{out}' is not allowed to refer to the following paths:{listed}"),
            "{var} = {value:?}"
        );
        assert_eq!(err.build_status(), BuildStatus::OutputRejected);
    }
}

#[test]
fn illegal_reference_specifiers_are_refused() {
    let mut env = Env::new();
    let out = path("thing", "out");
    for value in ["dev", "/nix/store/not-a-store-path"] {
        let scratch = env.scratch();
        file_output(&scratch, &out, "no references");
        let err = refused(
            &env,
            &scratch,
            &[output("out", &out)],
            &BTreeSet::new(),
            &checks("disallowedRequisites", &format!("out {value}")),
        );
        assert_eq!(
            err.to_string(),
            format!("derivation contains an illegal reference specifier '{value}'")
        );
    }
}

#[test]
fn a_refused_second_output_registers_neither() {
    let mut env = Env::new();
    let inputs = Inputs::upload(&env);
    let scratch = env.scratch();
    let out = path("thing", "out");
    let dev = path("thing-dev", "dev");
    file_output(&scratch, &dev, "clean");
    file_output(&scratch, &out, format!("{} {dev}", inputs.c));
    let err = refused(
        &env,
        &scratch,
        &[output("dev", &dev), output("out", &out)],
        &inputs.closure(),
        &checks("disallowedRequisites", &inputs.c.to_string()),
    );
    assert!(matches!(err, OutputError::NotAllowed { .. }), "{err:?}");
    assert!(!env.valid(ACCOUNT, &dev));
}

/// The options of a derivation with structured attributes `json` (`@A@`, `@B@`, `@C@` stand for
/// the inputs' paths).
fn structured(json: &str, inputs: &Inputs) -> DerivationOptions {
    let json = json
        .replace("@A@", &inputs.a.to_string())
        .replace("@B@", &inputs.b.to_string())
        .replace("@C@", &inputs.c.to_string());
    let env = BTreeMap::from([(b"__json".to_vec(), json.into_bytes())]);
    DerivationOptions::from_env(&env).expect("options")
}

#[test]
fn structured_output_checks_apply_per_output_and_count_the_output_itself() {
    let cases: &[(&str, Option<&str>)] = &[
        // Only the output named is checked.
        (r#"{"outputChecks":{"dev":{"allowedReferences":[]}}}"#, None),
        (
            r#"{"outputChecks":{"out":{"allowedReferences":["out","@A@"]}}}"#,
            None,
        ),
        // The output is one of its own requisites here (Nix's ignoreSelfRefs is off).
        (
            r#"{"outputChecks":{"out":{"allowedRequisites":["@A@","@B@"]}}}"#,
            Some("is not allowed to refer to the following paths:\n  OUT"),
        ),
        (
            r#"{"outputChecks":{"out":{"allowedRequisites":["out","@A@","@B@"]}}}"#,
            None,
        ),
        // Top-level lists do nothing with structured attributes.
        (r#"{"allowedReferences":[]}"#, None),
        (r#"{"outputChecks":{"out":{"maxSize":100000}}}"#, None),
        (
            r#"{"outputChecks":{"out":{"maxSize":10}}}"#,
            Some("path 'OUT' is too large at 208 bytes; limit is 10 bytes"),
        ),
        (
            r#"{"outputChecks":{"out":{"maxClosureSize":200}}}"#,
            Some("closure of path 'OUT' is too large at "),
        ),
    ];
    for &(json, refusal) in cases {
        let mut env = Env::new();
        let inputs = Inputs::upload(&env);
        let scratch = env.scratch();
        let out = path("thing", "out");
        file_output(&scratch, &out, format!("{} {out}", inputs.a));
        let options = structured(json, &inputs);
        let outputs = [output("out", &out)];
        match refusal {
            None => {
                env.process(&scratch, &outputs, &inputs.closure(), &options)
                    .unwrap_or_else(|e| panic!("{json}: {e}"));
            }
            Some(want) => {
                let err = refused(&env, &scratch, &outputs, &inputs.closure(), &options);
                let want = want.replace("OUT", &out.to_string());
                assert!(err.to_string().contains(&want), "{json}: {err}");
                assert_eq!(err.build_status(), BuildStatus::OutputRejected);
                assert!(!env.valid(ACCOUNT, &out));
            }
        }
    }
}

#[test]
fn unsafe_discard_references_registers_an_output_without_references() {
    let mut env = Env::new();
    let inputs = Inputs::upload(&env);
    let scratch = env.scratch();
    let out = path("thing", "out");
    let dev = path("thing-dev", "dev");
    file_output(&scratch, &out, format!("{} {out}", inputs.a));
    file_output(&scratch, &dev, format!("{}", inputs.a));
    let options = structured(
        r#"{"unsafeDiscardReferences":{"out":true,"dev":false}}"#,
        &inputs,
    );
    let done = env
        .process(
            &scratch,
            &[output("dev", &dev), output("out", &out)],
            &inputs.closure(),
            &options,
        )
        .expect("registered");
    assert!(done[1].info.references.is_empty(), "{:?}", done[1]);
    assert_eq!(done[0].info.references, BTreeSet::from([inputs.a.clone()]));
}

#[test]
fn expected_outputs_come_from_derivation_outputs() {
    let out = path("thing", "out");
    let ca = ContentAddress {
        method: ContentAddressMethod::Recursive,
        hash: sha256(b"x"),
    };
    let drv = path("thing.drv", "drv");
    assert_eq!(
        ExpectedOutput::from_derivation(
            &drv,
            "out",
            &DerivationOutput::InputAddressed(out.clone())
        ),
        Some(output("out", &out))
    );
    assert_eq!(
        ExpectedOutput::from_derivation(
            &drv,
            "out",
            &DerivationOutput::Fixed {
                path: out.clone(),
                ca
            }
        )
        .and_then(|o| o.fixed),
        Some(ca)
    );
    // A floating output is built at its temporary path.
    let floating = ExpectedOutput::from_derivation(
        &drv,
        "dev",
        &DerivationOutput::Floating {
            method: ContentAddressMethod::Recursive,
            algo: HashAlgo::Sha256,
        },
    )
    .expect("an expected output");
    assert_eq!(
        floating.path,
        fallback_output_path(&drv, "dev").expect("a path")
    );
    assert_eq!(
        floating.floating,
        Some((ContentAddressMethod::Recursive, HashAlgo::Sha256))
    );
    assert_eq!(
        ExpectedOutput::from_derivation(&drv, "out", &DerivationOutput::Deferred),
        None
    );
}

#[test]
fn register_built_is_all_or_nothing() {
    let env = Env::new();
    let inputs = Inputs::upload(&env);
    let staging = env.dir.path().join("staging");
    fs::create_dir(&staging).expect("mkdir");
    let first = path("first", "first");
    let second = path("second", "second");
    let files = staging.join("first");
    fs::write(&files, "first").expect("write");
    chmod(&files, 0o444);
    let nar = NarNode::File {
        executable: false,
        contents: b"first".to_vec(),
    }
    .to_nar()
    .expect("nar");
    let built = |path: &StorePath, files: PathBuf, references: BTreeSet<StorePath>| BuiltPath {
        path: path.clone(),
        files,
        nar_hash: sha256(&nar),
        nar_size: nar.len() as u64,
        references,
        deriver: Some(env.drv.clone()),
        ca: None,
    };
    let objects = env.objects();
    let valid_none = |env: &Env| !env.valid(ACCOUNT, &first) && !env.valid(ACCOUNT, &second);

    // The second path's files are missing: the first one's object, already moved, goes.
    let err = env
        .store
        .register_built(
            ACCOUNT,
            &[
                built(&first, files.clone(), set(&[&inputs.a])),
                built(&second, staging.join("missing"), set(&[&first])),
            ],
        )
        .expect_err("the missing files fail the registration");
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(valid_none(&env));
    assert_eq!(env.objects(), objects);

    // A reference that is not valid for the account fails before anything moves.
    fs::write(&files, "first").expect("write");
    let err = env
        .store
        .register_built(
            ACCOUNT,
            &[built(
                &first,
                files.clone(),
                set(&[&first, &path("z", "z")]),
            )],
        )
        .expect_err("unknown reference");
    assert!(
        matches!(err, StoreError::MissingReference { .. }),
        "{err:?}"
    );
    assert!(files.exists());
    assert!(valid_none(&env));

    // A content address that does not give the path.
    let ca = ContentAddress {
        method: ContentAddressMethod::Flat,
        hash: sha256(b"first"),
    };
    let mut with_ca = built(&first, files.clone(), BTreeSet::new());
    with_ca.ca = Some(ca);
    let err = env
        .store
        .register_built(ACCOUNT, &[with_ca])
        .expect_err("path mismatch");
    assert!(matches!(err, StoreError::PathMismatch { .. }), "{err:?}");
    assert!(valid_none(&env));
    assert_eq!(env.objects(), objects);
}

/// An account's view of one output before a shared build: none, or its own upload.
type Before = Option<u32>;

fn shared_case() -> impl proptest::strategy::Strategy<Value = (Vec<Vec<Before>>, Vec<u32>)> {
    use proptest::prelude::*;
    (1usize..=3, 1usize..=3).prop_flat_map(|(accounts, outputs)| {
        (
            proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(any::<u32>()), outputs),
                accounts,
            ),
            proptest::collection::vec(any::<u32>(), outputs),
        )
    })
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(32))]

    /// The sharing invariant (issue 14): whatever the accounts of a shared build held
    /// before, each ends up with its own upload where it had one and with the bytes this
    /// build produced everywhere else: never bytes that another account uploaded.
    #[test]
    fn a_shared_build_gives_each_account_its_own_upload_or_the_built_bytes(
        (before, built) in shared_case()
    ) {
        let mut env = Env::new();
        let names = ["out", "dev", "lib"];
        let accounts: Vec<String> = (0..before.len()).map(|i| format!("account-{i}")).collect();
        let outputs: Vec<ExpectedOutput> = built
            .iter()
            .zip(names)
            .map(|(_, name)| output(name, &path(&format!("thing-{name}"), name)))
            .collect();
        let upload = |account: &str, o: &ExpectedOutput, n: u32| {
            format!("uploaded by {account} at {}: {n}\n", o.name).into_bytes()
        };
        for (account, held) in accounts.iter().zip(&before) {
            for (o, n) in outputs.iter().zip(held) {
                if let Some(n) = n {
                    let node = NarNode::File { executable: false, contents: upload(account, o, *n) };
                    env.upload_as(account, &o.path, &node, &[]);
                }
            }
        }
        let scratch = env.scratch();
        for (o, n) in outputs.iter().zip(&built) {
            file_output(&scratch, &o.path, format!("built {}: {n}\n", o.name));
        }
        let (account, sharers) = accounts.split_first().expect("an account");
        env.process_shared(&scratch, &outputs, (account, sharers), OutputLimits::NONE, &AtomicBool::new(false))
            .expect("outputs accepted");
        for (account, held) in accounts.iter().zip(&before) {
            for ((o, had), n) in outputs.iter().zip(held).zip(&built) {
                let expected = match had {
                    Some(u) => upload(account, o, *u),
                    None => format!("built {}: {n}\n", o.name).into_bytes(),
                };
                let nar = NarNode::File { executable: false, contents: expected }.to_nar().expect("nar");
                proptest::prop_assert_eq!(
                    env.nar_hash(account, &o.path),
                    Some(sha256(&nar)),
                    "{} of {} (held before: {:?})", o.name, account, had
                );
                proptest::prop_assert!(env.object(&o.path, &sha256(&nar)).exists());
            }
        }
    }
}

/// Makes `path` in `scratch` a sparse file of `len` bytes, owned by the build.
fn sparse_output(scratch: &Path, path: &StorePath, len: u64) {
    let root = scratch.join(path.base_name());
    fs::File::create(&root)
        .expect("create")
        .set_len(len)
        .expect("truncate");
    chown_tree(&root, BUILD_UID);
}

fn too_large(result: Result<Vec<ProcessedOutput>, OutputError>) -> String {
    match result {
        Err(e @ OutputError::TooLarge { .. }) => {
            assert_eq!(e.build_status(), BuildStatus::OutputRejected);
            e.to_string()
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn a_sparse_output_over_max_nar_size_is_refused_from_its_size() {
    let mut env = Env::new();
    let out = path("sparse", "out");
    let scratch = env.scratch();
    sparse_output(&scratch, &out, 1 << 40);
    let limits = OutputLimits {
        max_nar_size: 1 << 30,
        max_output_size: u64::MAX,
    };
    let message = too_large(env.process_within(&scratch, &[output("out", &out)], limits));
    assert!(
        message.contains("its files hold more than 1073741824 bytes")
            && message.contains("max_nar_size in [store]"),
        "{message}"
    );
    assert!(!env.valid(ACCOUNT, &out));
    assert!(env.objects().is_empty());
}

#[test]
fn an_output_whose_nar_outgrows_the_limit_is_stopped_while_dumped() {
    let mut env = Env::new();
    let out = path("many", "out");
    let scratch = env.scratch();
    let root = scratch.join(out.base_name());
    mkdir(&root, 0o755);
    for i in 0..100 {
        write(&root.join(format!("empty-{i}")), "", 0o644);
    }
    chown_tree(&root, BUILD_UID);
    // No bytes in files, but over 10 KiB of NAR framing.
    let limits = OutputLimits {
        max_nar_size: 4096,
        max_output_size: u64::MAX,
    };
    let message = too_large(env.process_within(&scratch, &[output("out", &out)], limits));
    assert!(
        message.contains("its NAR has more than 4096 bytes"),
        "{message}"
    );
    assert!(!env.valid(ACCOUNT, &out));
}

#[test]
fn all_outputs_of_a_build_together_are_held_to_max_output_size() {
    let mut env = Env::new();
    let (out, dev) = (path("two", "out"), path("two-dev", "dev"));
    let scratch = env.scratch();
    file_output(&scratch, &out, vec![b'o'; 600]);
    file_output(&scratch, &dev, vec![b'd'; 600]);
    let outputs = [output("out", &out), output("dev", &dev)];
    let limits = OutputLimits {
        max_nar_size: 1000,
        max_output_size: 1000,
    };
    let message = too_large(env.process_within(&scratch, &outputs, limits));
    assert!(message.contains("max_output_size in [builds]"), "{message}");
    assert!(!env.valid(ACCOUNT, &out) && !env.valid(ACCOUNT, &dev));
    // Each alone fits: the same outputs, left anew.
    let scratch = env.scratch();
    file_output(&scratch, &out, vec![b'o'; 600]);
    file_output(&scratch, &dev, vec![b'd'; 600]);
    let limits = OutputLimits {
        max_nar_size: 1000,
        max_output_size: 2000,
    };
    env.process_within(&scratch, &outputs, limits)
        .expect("within both limits");
}

#[test]
fn aborted_processing_registers_nothing() {
    let mut env = Env::new();
    let out = path("aborted", "out");
    let scratch = env.scratch();
    file_output(&scratch, &out, "never registered");
    let result = env.process_shared(
        &scratch,
        &[output("out", &out)],
        (ACCOUNT, &[]),
        OutputLimits::NONE,
        &AtomicBool::new(true),
    );
    assert!(matches!(result, Err(OutputError::Aborted)), "{result:?}");
    assert!(!env.valid(ACCOUNT, &out));
    assert!(env.objects().is_empty());
}

/// Floating content-addressed output `name` of `env`'s derivation (`r:sha256`), at its
/// temporary path.
fn floating(env: &Env, name: &str, method: ContentAddressMethod) -> ExpectedOutput {
    let output = DerivationOutput::Floating {
        method,
        algo: HashAlgo::Sha256,
    };
    ExpectedOutput::from_derivation(&env.drv, name, &output).expect("an expected output")
}

/// Builds, in `env`, outputs `lib` (a file naming itself) and `out` (a tree referring to
/// itself in a file, a symlink target and a file name, to `lib` and to input `a`) of a
/// floating content-addressed derivation, and processes them.
fn build_floating(env: &mut Env, inputs: &Inputs) -> BTreeMap<String, ProcessedOutput> {
    let scratch = env.scratch();
    let out = floating(env, "out", ContentAddressMethod::Recursive);
    let lib = floating(env, "lib", ContentAddressMethod::Recursive);
    file_output(&scratch, &lib.path, format!("I am {}\n", lib.path));
    let root = scratch.join(out.path.base_name());
    mkdir(&root, 0o755);
    write(
        &root.join("self"),
        format!("{}/self uses {} and {}\n", out.path, lib.path, inputs.a),
        0o644,
    );
    std::os::unix::fs::symlink(format!("{}/self", out.path), root.join("link")).expect("symlink");
    // A file named with the output's own hash part (alone in its directory: a rename that
    // changed the order of entries would change the NAR beyond the hash parts).
    mkdir(&root.join("sub"), 0o755);
    write(&root.join("sub").join(out.path.hash_part()), "x", 0o755);
    chown_tree(&root, BUILD_UID);
    env.process(
        &scratch,
        &[lib, out],
        &inputs.closure(),
        &DerivationOptions::default(),
    )
    .expect("processed")
    .into_iter()
    .map(|o| (o.name.clone(), o))
    .collect()
}

#[test]
fn floating_outputs_get_content_addressed_paths_with_their_references_rewritten() {
    let mut env = Env::new();
    let inputs = Inputs::upload(&env);
    let temporary = fallback_output_path(&env.drv, "out").expect("a path");
    let done = build_floating(&mut env, &inputs);
    let (out, lib) = (&done["out"], &done["lib"]);
    assert_eq!(out.path.name(), "thing");
    assert_eq!(lib.path.name(), "thing-lib");
    assert_ne!(out.path, temporary);
    assert!(out.registered && lib.registered);
    assert!(env.valid(ACCOUNT, &out.path) && env.valid(ACCOUNT, &lib.path));
    assert_eq!(
        out.info.references,
        set(&[&out.path, &lib.path, &inputs.a]),
        "its own final path, the other output's, the input"
    );
    assert_eq!(lib.info.references, set(&[&lib.path]));
    // The path is the content address of the output modulo itself, with its references.
    for o in [out, lib] {
        let ca = o.info.ca.expect("a content address");
        assert_eq!(ca.method, ContentAddressMethod::Recursive);
        let others: BTreeSet<StorePath> = o
            .info
            .references
            .iter()
            .filter(|r| **r != o.path)
            .cloned()
            .collect();
        assert_eq!(
            make_fixed_output_path(o.path.name(), &ca, &others, true).expect("a path"),
            o.path
        );
    }
    // The files name the final paths only.
    let files = env.object(&out.path, &out.info.nar_hash.expect("a NAR hash"));
    assert_eq!(
        fs::read_to_string(files.join("self")).expect("read"),
        format!("{}/self uses {} and {}\n", out.path, lib.path, inputs.a)
    );
    assert_eq!(
        fs::read_link(files.join("link")).expect("readlink"),
        Path::new(&format!("{}/self", out.path))
    );
    assert!(files.join("sub").join(out.path.hash_part()).is_file());
    assert_canonical(&files);
    let nar = Nix::new().dump(&files);
    assert_eq!(Some(sha256(&nar)), out.info.nar_hash);
    assert_eq!(nar.len() as u64, out.info.nar_size);
    // What a client checks when it imports the path: its NAR modulo its own hash part has
    // the content address's hash.
    for o in [out, lib] {
        let files = env.object(&o.path, &o.info.nar_hash.expect("a NAR hash"));
        let mut modulo =
            HashModulo::new(HashAlgo::Sha256, o.path.hash_part().as_bytes()).expect("modulo");
        modulo.update(&Nix::new().dump(&files));
        let ca = o.info.ca.expect("a content address");
        assert_eq!(modulo.finish(), (ca.hash, true), "{}", o.name);
    }

    // Another derivation of the same name (so other temporary paths) whose builder writes
    // the same: the same final paths.
    let mut other = Env::new();
    other.drv = path("thing.drv", "another derivation");
    assert_ne!(
        fallback_output_path(&other.drv, "out").expect("a path"),
        temporary
    );
    let inputs2 = Inputs::upload(&other);
    let again = build_floating(&mut other, &inputs2);
    for name in ["out", "lib"] {
        assert_eq!(again[name].path, done[name].path, "{name}");
        assert_eq!(
            again[name].info.nar_hash, done[name].info.nar_hash,
            "{name}"
        );
    }
}

#[test]
fn a_flat_floating_output_may_not_refer_to_paths() {
    let mut env = Env::new();
    let inputs = Inputs::upload(&env);
    let scratch = env.scratch();
    let out = floating(&env, "out", ContentAddressMethod::Flat);
    file_output(&scratch, &out.path, format!("uses {}\n", inputs.a));
    let err = refused(
        &env,
        &scratch,
        &[out],
        &inputs.closure(),
        &DerivationOptions::default(),
    );
    assert!(matches!(err, OutputError::ContentAddressed { .. }), "{err}");
    assert_eq!(err.build_status(), BuildStatus::OutputRejected);
}
