//! What the abuse suites of both protocols share (`tests/abuse.rs`, `tests/worker_abuse.rs`,
//! `tests/worker_bad_input.rs`): hand-made wire bytes ([`W`]), hostile NARs and store paths,
//! where to cut a request, and the guard every hostile case runs under: a bystander session
//! of another account served meanwhile, and the store unchanged after.

use std::collections::{BTreeMap, BTreeSet};

use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::derivation::{BasicDerivation, DerivationOutput};
use nixbuild_core::hash::{Hash, HashAlgo};
use nixbuild_core::store_path::make_fixed_output_path;

use nixbuild_core::nar::NarNode;
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire::BufMutExt;

use super::ssh::SshSession;
use super::{file_nar, raw_nar, Daemon, RelaySession, StoreSnapshot};

// ---------------------------------------------------------------------------------------
// Hand-made wire bytes.

/// An opcode of either protocol, as sent.
pub trait WireOp {
    fn wire(self) -> u64;
}

impl WireOp for nixbuild_core::serve::Opcode {
    fn wire(self) -> u64 {
        self.to_wire()
    }
}

impl WireOp for nixbuild_core::worker::Opcode {
    fn wire(self) -> u64 {
        self.to_wire()
    }
}

/// Hand-made wire bytes.
#[derive(Default, Clone)]
pub struct W(pub Vec<u8>);

impl W {
    pub fn new() -> W {
        W::default()
    }
    /// A u64.
    pub fn u(mut self, n: u64) -> W {
        self.0.put_wire_u64(n);
        self
    }
    /// A string.
    pub fn s(mut self, b: &[u8]) -> W {
        self.0.put_wire_bytes(b);
        self
    }
    /// A store path, absolute.
    pub fn p(self, p: &StorePath) -> W {
        self.s(p.to_absolute().as_bytes())
    }
    /// Bytes as they are.
    pub fn raw(mut self, b: &[u8]) -> W {
        self.0.extend_from_slice(b);
        self
    }
    /// An opcode.
    pub fn op(self, op: impl WireOp) -> W {
        self.u(op.wire())
    }
}

impl From<W> for Vec<u8> {
    fn from(w: W) -> Vec<u8> {
        w.0
    }
}

/// Where to cut a request.
#[derive(Clone, Copy)]
pub enum Cut {
    At(usize),
    Half,
    Short(usize),
}

impl Cut {
    pub fn apply(self, mut bytes: Vec<u8>) -> Vec<u8> {
        let len = match self {
            Cut::At(n) => n,
            Cut::Half => bytes.len() / 2 + 3,
            Cut::Short(n) => bytes.len() - n,
        };
        bytes.truncate(len);
        bytes
    }
}

// ---------------------------------------------------------------------------------------
// Hostile NARs and store paths.

/// A NAR of a directory holding `entries` (name, node tokens) in the order given.
pub fn dir_nar(entries: &[(&[u8], &[&[u8]])]) -> Vec<u8> {
    let mut tokens: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for (name, node) in entries {
        tokens.extend_from_slice(&[b"entry", b"(", b"name", name, b"node"]);
        tokens.extend_from_slice(node);
        tokens.push(b")");
    }
    tokens.push(b")");
    raw_nar(&tokens)
}

/// The tokens of a small regular file, for [`dir_nar`].
pub const FILE: &[&[u8]] = &[b"(", b"type", b"regular", b"contents", b"x", b")"];

/// A NAR of `depth` directories nested in each other, each with one entry `d`.
pub fn nested_nar(depth: usize) -> Vec<u8> {
    let mut out = W::new().s(b"nix-archive-1");
    for _ in 0..depth {
        out = out
            .s(b"(")
            .s(b"type")
            .s(b"directory")
            .s(b"entry")
            .s(b"(")
            .s(b"name")
            .s(b"d")
            .s(b"node");
    }
    out = out
        .s(b"(")
        .s(b"type")
        .s(b"regular")
        .s(b"contents")
        .s(b"")
        .s(b")");
    for _ in 0..depth {
        out = out.s(b")").s(b")");
    }
    out.into()
}

/// A NAR of a directory with `n` empty files.
pub fn wide_nar(n: usize) -> Vec<u8> {
    let mut entries = BTreeMap::new();
    for i in 0..n {
        entries.insert(
            format!("f{i:07}").into_bytes(),
            NarNode::File {
                executable: false,
                contents: Vec::new(),
            },
        );
    }
    NarNode::Directory(entries).to_nar().expect("wide nar")
}

/// A NAR that claims a file of u64::MAX bytes, then 64 zero bytes.
pub fn endless_file_nar() -> Vec<u8> {
    W::new()
        .s(b"nix-archive-1")
        .s(b"(")
        .s(b"type")
        .s(b"regular")
        .s(b"contents")
        .u(u64::MAX)
        .raw(&[0; 64])
        .into()
}

/// NARs a store must refuse, complete and small (each is its own upload), with what makes
/// them so and the needle of the error: `(what, NAR, needle)`. (`..` is in
/// serve_bad_input.rs; the endless file and 100,000-deep nesting are cases of their own,
/// the error depending on how the NAR is cut.)
pub fn bad_nars() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let link = |t: &[u8]| {
        raw_nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            t,
            b")",
        ])
    };
    let mut bad_padding = file_nar(b"x");
    let at = bad_padding.len() - 23;
    bad_padding[at] = 1;
    vec![
        (
            "entry named '.'",
            dir_nar(&[(b".", FILE)]),
            "invalid entry name",
        ),
        (
            "entry with an empty name",
            dir_nar(&[(b"", FILE)]),
            "invalid entry name",
        ),
        (
            "entry name with NUL",
            dir_nar(&[(b"a\0b", FILE)]),
            "invalid entry name",
        ),
        (
            "entry named '/'",
            dir_nar(&[(b"/", FILE)]),
            "invalid entry name",
        ),
        (
            "entry name of 256 bytes",
            dir_nar(&[(&[b'n'; 256], FILE)]),
            "entry name of 256 bytes exceeds the limit of 255 bytes",
        ),
        (
            "entries out of order",
            dir_nar(&[(b"b", FILE), (b"a", FILE)]),
            "not sorted",
        ),
        (
            "entries duplicated",
            dir_nar(&[(b"a", FILE), (b"a", FILE)]),
            "not sorted",
        ),
        (
            "symlink with an empty target",
            link(b""),
            "empty symlink target",
        ),
        (
            "symlink target with NUL",
            link(b"a\0b"),
            "symlink target contains NUL",
        ),
        (
            "symlink target of 4096 bytes",
            link(&[b'a'; 4096]),
            "symlink target of 4096 bytes exceeds the limit of 4095 bytes",
        ),
        (
            "executable marker with a value",
            raw_nar(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"yes",
                b"contents",
                b"x",
                b")",
            ]),
            "expected an empty string after `executable`",
        ),
        (
            "of a socket",
            raw_nar(&[b"nix-archive-1", b"(", b"type", b"socket", b")"]),
            "expected `regular`, `symlink` or `directory`, found `socket`",
        ),
        (
            "magic",
            raw_nar(&[
                b"nix-archive-2",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"x",
                b")",
            ]),
            "expected `nix-archive-1`, found `nix-archive-2`",
        ),
        ("padding not zero", bad_padding, "non-zero padding byte"),
        (
            "nested 64 deep",
            nested_nar(64),
            "nesting depth reaches the limit of 64",
        ),
        (
            "nested 100 deep",
            nested_nar(100),
            "nesting depth reaches the limit of 64",
        ),
    ]
}

/// Absolute store path strings that are not valid store paths, with what makes them so.
pub fn bad_paths() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let h = "0".repeat(32);
    vec![
        (
            "hash-char",
            format!("/nix/store/{}e-x", "0".repeat(31)).into_bytes(),
            "invalid character 'e' at position 31 of the hash part",
        ),
        (
            "short-hash",
            format!("/nix/store/{}-x", "0".repeat(31)).into_bytes(),
            "store path base name \"0000000000000000000000000000000-x\" is too short",
        ),
        (
            "store-dir",
            format!("/gnu/store/{h}-x").into_bytes(),
            "path \"/gnu/store/00000000000000000000000000000000-x\" is not in /nix/store",
        ),
        (
            "relative",
            format!("{h}-x").into_bytes(),
            "path \"00000000000000000000000000000000-x\" is not in /nix/store",
        ),
        (
            "empty-name",
            format!("/nix/store/{h}-").into_bytes(),
            "store path base name \"00000000000000000000000000000000-\" is too short",
        ),
        (
            "name-char",
            format!("/nix/store/{h}-a b").into_bytes(),
            "invalid character ' ' at position 1 of store path name",
        ),
        (
            "name-slash",
            format!("/nix/store/{h}-a/../../etc").into_bytes(),
            "invalid character '/' at position 1 of store path name",
        ),
        (
            "name-dotdot",
            format!("/nix/store/{h}-..").into_bytes(),
            "store path name \"..\" is reserved",
        ),
        (
            "name-nul",
            format!("/nix/store/{h}-a\0b").into_bytes(),
            "invalid character '\\0' at position 1 of store path name",
        ),
        (
            "name-long",
            format!("/nix/store/{h}-{}", "a".repeat(212)).into_bytes(),
            "store path name is 212 bytes long, the limit is 211",
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// The fixture.

/// What the cases refer to: paths uploaded before the cases, by three accounts (`a`, `b`,
/// `good`).
pub struct Fixture {
    pub salt: String,
    /// Account `a`'s busybox (`bin/sh`), the builder of the derivation cases.
    pub bb: StorePath,
    /// Its NAR.
    pub bb_nar: Vec<u8>,
    /// A small path of account `a`.
    pub mine: StorePath,
    /// A path only account `b` has: `a` must not be able to see or use it.
    pub hidden: StorePath,
    /// The bystander's (account `good`) path and its NAR.
    pub good: StorePath,
    pub good_nar: Vec<u8>,
}

impl Fixture {
    /// Uploads the fixture's paths with `upload(account, path, NAR)`.
    pub fn setup(upload: impl Fn(&str, &StorePath, &[u8])) -> Fixture {
        let salt = super::salt();
        let bb_nar = NarNode::Directory(BTreeMap::from([(
            b"bin".to_vec(),
            NarNode::Directory(BTreeMap::from([
                (
                    b"busybox".to_vec(),
                    NarNode::File {
                        executable: true,
                        contents: std::fs::read("/bin/busybox").expect("read /bin/busybox"),
                    },
                ),
                (
                    b"sh".to_vec(),
                    NarNode::Symlink {
                        target: b"busybox".to_vec(),
                    },
                ),
            ])),
        )]))
        .to_nar()
        .expect("busybox nar");
        let ctx = Fixture {
            bb: super::test_path(&format!("{salt}-bb"), "busybox"),
            mine: super::test_path(&format!("{salt}-mine"), "mine"),
            hidden: super::test_path(&format!("{salt}-hidden"), "hidden"),
            good: super::test_path(&format!("{salt}-good"), "good"),
            good_nar: super::file_nar(format!("good {salt}").as_bytes()),
            bb_nar,
            salt,
        };
        upload("a", &ctx.bb, &ctx.bb_nar);
        upload("a", &ctx.mine, &super::file_nar(b"mine"));
        upload("b", &ctx.hidden, &super::file_nar(b"hidden"));
        upload("good", &ctx.good, &ctx.good_nar);
        ctx
    }

    /// A valid store path nobody uploaded.
    pub fn fresh(&self, name: &str) -> StorePath {
        super::test_path(&format!("{}-fresh-{name}", self.salt), name)
    }

    /// A derivation named `name` whose builder is busybox's `sh -c script`, with `outputs`
    /// as given and `bb` as its input.
    pub fn derivation(
        &self,
        name: &str,
        outputs: BTreeMap<String, DerivationOutput>,
        script: &str,
    ) -> BasicDerivation {
        let builder = format!("{}/bin/sh", self.bb);
        let mut env: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::from([
            (b"builder".to_vec(), builder.clone().into_bytes()),
            (b"name".to_vec(), name.as_bytes().to_vec()),
            (b"system".to_vec(), b"x86_64-linux".to_vec()),
        ]);
        for (output, out) in &outputs {
            let path = out.path().map(StorePath::to_absolute).unwrap_or_default();
            env.insert(output.clone().into_bytes(), path.into_bytes());
        }
        BasicDerivation {
            outputs,
            input_srcs: BTreeSet::from([self.bb.clone()]),
            platform: b"x86_64-linux".to_vec(),
            builder: builder.into_bytes(),
            args: vec![b"-c".to_vec(), script.as_bytes().to_vec()],
            env,
        }
    }

    /// A fixed-output derivation of `name` whose declared flat sha256 is that of `claimed`;
    /// the path is the one that hash gives unless `path` says otherwise.
    pub fn fixed_output(
        &self,
        name: &str,
        claimed: &[u8],
        path: Option<StorePath>,
        script: &str,
    ) -> BasicDerivation {
        let ca = ContentAddress {
            method: ContentAddressMethod::Flat,
            hash: Hash::compute(HashAlgo::Sha256, claimed),
        };
        let path = path.unwrap_or_else(|| {
            make_fixed_output_path(name, &ca, &BTreeSet::new(), false).expect("fixed path")
        });
        self.derivation(
            name,
            BTreeMap::from([("out".to_owned(), DerivationOutput::Fixed { path, ca })]),
            script,
        )
    }
}

// ---------------------------------------------------------------------------------------
// The guard of every case.

/// Checks the end of a failed session: non-zero status and `error: ...needle...`.
pub fn check_error(case: &str, status: i32, stderr: &str, needle: &str) {
    assert_ne!(
        status, 0,
        "{case}: the session succeeded; stderr: {stderr:?}"
    );
    assert!(
        stderr.contains("error: ") && stderr.contains(needle),
        "{case}: expected 'error: ...{needle}...' on stderr, got {stderr:?}"
    );
}

/// A session of another account kept open through the cases.
pub trait Bystander: Send {
    /// Sends `request` and returns `len` bytes of answer.
    fn exchange(&mut self, request: &[u8], len: usize) -> Vec<u8>;
}

impl Bystander for RelaySession {
    fn exchange(&mut self, request: &[u8], len: usize) -> Vec<u8> {
        self.send(request);
        self.read(len)
    }
}

impl Bystander for SshSession {
    fn exchange(&mut self, request: &[u8], len: usize) -> Vec<u8> {
        SshSession::exchange(self, request, len)
    }
}

/// Runs `run` (which plays the hostile session of `case` and checks its end) while the
/// bystander sends `request` and must get exactly `answer`, then checks that the store is
/// as it was before.
pub fn guarded(
    daemon: &Daemon,
    bystander: &mut dyn Bystander,
    (request, answer): (&[u8], &[u8]),
    case: &str,
    run: impl FnOnce(),
) {
    let before: StoreSnapshot = daemon.snapshot();
    std::thread::scope(|s| {
        let other = s.spawn(|| bystander.exchange(request, answer.len()));
        run();
        let got = other.join().expect("the bystander's session");
        assert!(got == answer, "{case}: the bystander got a wrong answer");
    });
    daemon.assert_unchanged(&before, case);
}

/// Checks that the daemon logged at least `errors` sessions as failed: every case that must
/// end its session with an error did, as the daemon saw it.
pub fn assert_failures_logged(daemon: &Daemon, errors: usize) {
    let log = daemon.log();
    let failed = log.lines().filter(|l| l.contains("status=1")).count();
    assert!(
        failed >= errors,
        "{failed} failed sessions logged for {errors} error cases"
    );
}

/// Checks what only the daemon knows after the cases: no panic, and (at stop) a clean exit
/// with a consistent store and no leftovers.
pub fn check_daemon(daemon: Daemon) {
    let log = daemon.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    daemon.stop();
}
