//! The protocol abuse suite of the worker protocol (`nix-daemon --stdio`, ssh-ng): the twin of
//! `abuse.rs`, over the relay (`nixbuild-serve --stdio`) and a subset over our SSH server
//! with the real OpenSSH client, one daemon for all the cases of a transport. Each case is
//! one row of [`cases`]: a hostile session and what must come of it. For every case the
//! suite checks that
//!
//! - the session ends with the error (its needle) on the log channel and `error: ` on
//!   stderr, non-zero status; or, for a request a shared server refuses, the request is
//!   answered with `STDERR_ERROR` and the session goes on (a query after it is answered);
//!   or, for a derivation that cannot be built, a failed BuildResult has the needle;
//! - a concurrent worker session of another account is served meanwhile (IsValidPath and
//!   NarFromPath of its own path, byte for byte);
//! - the store is unchanged: every SQLite row and every file of `objects/` as before, and
//!   nothing left in `tmp/`;
//!
//! and at the end that the daemon never panicked and stops cleanly with a consistent store.
//! (`worker_bad_input.rs` has the NAR hash and size lies, the cut AddMultipleToStore stream,
//! the operations a shared server refuses, and the memory budget.)

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use harness::hostile::{
    assert_failures_logged, bad_nars, bad_paths, check_daemon, check_error, dir_nar,
    endless_file_nar, guarded, nested_nar, Bystander, Cut, Fixture, FILE, W,
};
use harness::ssh::SshServer;
use harness::worker::{
    framed, info, relay_command, run_cmd, run_cmd_held, run_cmd_waiting, ssh_command, Answer,
    Script, Transcript, WorkerSession, V,
};
use harness::{file_nar, sha256, Daemon};
use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::derivation::{BasicDerivation, DerivationOutput};
use nixbuild_core::hash::HashAlgo;
use nixbuild_core::nar::NarNode;
use nixbuild_core::serve::BuildStatus;
use nixbuild_core::store_path::{make_fixed_output_path, StorePath};
use nixbuild_core::worker::request::AddToStoreForm;
use nixbuild_core::worker::{
    BuildMode, DerivedPath, Opcode, Request, Response, StderrMessage, WorkerVersion,
};

/// Limits small enough that "just over" each of them is cheap to send.
const MAX_NAR_SIZE: u64 = 3 << 20;
const MAX_PATHS: u64 = 100;
const MAX_REQUEST_BYTES: u64 = 65536;
const MAX_UPLOAD: u64 = 5 << 20;
const CONFIG: &str = "[store]\nmax_nar_size = 3145728\nmax_paths_per_request = 100\n\
                      max_request_bytes = 65536\n[limits]\nmax_upload_bytes_per_session = 5242880\n";

const CLIENT_MAGIC: u64 = 0x6e69_7863;
const SERVER_MAGIC: u64 = 0x6478_696f;

type Ctx = Fixture;

fn upload(daemon: &Daemon, account: &str, path: &StorePath, nar: &[u8]) {
    let t = run_cmd(
        relay_command(daemon, account),
        &Script::new(V).add(path, nar, sha256(nar)),
    );
    assert!(
        t.status == 0 && matches!(t.answers[..], [Answer::Ok(Some(Response::Nothing))]),
        "upload of {path}: {t:?}"
    );
}

/// The bystander's requests, and the exact answer they must get.
fn bystander_exchange(ctx: &Ctx) -> (Vec<u8>, Vec<u8>) {
    let mut request = Vec::new();
    Request::IsValidPath(ctx.good.clone()).encode(V, &mut request);
    Request::NarFromPath(ctx.good.clone()).encode(V, &mut request);
    let mut answer = Vec::new();
    StderrMessage::Last.encode(V, &mut answer);
    Response::Int(1).encode(V, &mut answer);
    StderrMessage::Last.encode(V, &mut answer);
    answer.extend_from_slice(&ctx.good_nar);
    (request, answer)
}

// ---------------------------------------------------------------------------------------
// Building hostile requests.

/// An AddToStoreNar header (or an AddMultipleToStore path's metadata), field by field as
/// sent, and the NAR after it.
#[derive(Clone)]
struct RawAdd {
    path: Vec<u8>,
    deriver: Vec<u8>,
    hash: Vec<u8>,
    references: Vec<Vec<u8>>,
    nar_size: u64,
    ultimate: u64,
    ca: Vec<u8>,
    repair: u64,
    dont_check_sigs: u64,
    nar: Vec<u8>,
}

impl RawAdd {
    /// An honest upload of `nar` as `path`.
    fn new(path: &StorePath, nar: &[u8]) -> RawAdd {
        RawAdd {
            path: path.to_absolute().into_bytes(),
            deriver: Vec::new(),
            hash: sha256(nar).to_base16().into_bytes(),
            references: Vec::new(),
            nar_size: nar.len() as u64,
            ultimate: 0,
            ca: Vec::new(),
            repair: 0,
            dont_check_sigs: 0,
            nar: nar.to_vec(),
        }
    }

    fn refs(mut self, refs: &[&StorePath]) -> RawAdd {
        self.references = refs.iter().map(|p| p.to_absolute().into_bytes()).collect();
        self
    }

    /// The metadata: path, deriver, narHash, references, registrationTime, narSize,
    /// ultimate, sigs, ca.
    fn info(&self) -> W {
        let mut w = W::new()
            .s(&self.path)
            .s(&self.deriver)
            .s(&self.hash)
            .u(self.references.len() as u64);
        for r in &self.references {
            w = w.s(r);
        }
        w.u(0).u(self.nar_size).u(self.ultimate).u(0).s(&self.ca)
    }

    /// AddToStoreNar of it, the NAR framed.
    fn single(&self) -> Vec<u8> {
        self.header().raw(&framed(&self.nar)).into()
    }

    /// AddToStoreNar of it at 1.21 and 1.22, where the server asks for the NAR with
    /// STDERR_READ: the request, then `answer` as the client's answer to the first ask.
    fn tunnelled(&self, answer: &[u8]) -> Script {
        Script::new(WorkerVersion::V1_21).raw(&self.header().s(answer).0)
    }

    fn header(&self) -> W {
        W::new()
            .op(Opcode::AddToStoreNar)
            .raw(&self.info().0)
            .u(self.repair)
            .u(self.dont_check_sigs)
    }
}

/// AddMultipleToStore of `paths`, the stream framed.
fn multi(paths: &[RawAdd]) -> Vec<u8> {
    let mut inner = W::new().u(paths.len() as u64);
    for p in paths {
        inner = inner.raw(&p.info().0).raw(&p.nar);
    }
    multi_raw(&inner.0)
}

/// AddMultipleToStore of the de-framed stream `inner`, framed.
fn multi_raw(inner: &[u8]) -> Vec<u8> {
    W::new()
        .op(Opcode::AddMultipleToStore)
        .u(0)
        .u(1)
        .raw(&framed(inner))
        .into()
}

/// A NAR of a directory of four files of 1 MiB: more than max_nar_size. (Not abuse.rs's
/// directory of 40,000 files: that max_nar_size's worth of them is extracted before the NAR
/// is found too long takes seconds, and is the same on both protocols.)
fn big_dir_nar() -> Vec<u8> {
    let files = (0..4u8).map(|i| {
        let file = NarNode::File {
            executable: false,
            contents: vec![i; 1 << 20],
        };
        (vec![b'a' + i], file)
    });
    NarNode::Directory(files.collect()).to_nar().expect("a NAR")
}

/// A NAR whose first entry name claims u64::MAX bytes.
fn endless_name_nar() -> Vec<u8> {
    W::new()
        .s(b"nix-archive-1")
        .s(b"(")
        .s(b"type")
        .s(b"directory")
        .s(b"entry")
        .s(b"(")
        .s(b"name")
        .u(u64::MAX)
        .into()
}

/// The path `x` of a file holding `contents` added flat, and that content address.
fn fixed_path(contents: &[u8]) -> (StorePath, String) {
    let ca = ContentAddress {
        method: ContentAddressMethod::Flat,
        hash: sha256(contents),
    };
    let path = make_fixed_output_path("x", &ca, &BTreeSet::new(), false).expect("fixed path");
    (path, ca.to_string())
}

/// An output as BuildDerivation sends it: name, path, hashAlgo, hash.
type RawOutput<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8]);

/// A BuildDerivation whose fields are given raw: outputs `(name, path, algo, hash)`,
/// inputSrcs, and the buildMode.
fn raw_build(drv_path: &[u8], outputs: &[RawOutput<'_>], inputs: &[&[u8]], mode: u64) -> Vec<u8> {
    let mut w = W::new()
        .op(Opcode::BuildDerivation)
        .s(drv_path)
        .u(outputs.len() as u64);
    for (name, path, algo, hash) in outputs {
        w = w.s(name).s(path).s(algo).s(hash);
    }
    w = w.u(inputs.len() as u64);
    for i in inputs {
        w = w.s(i);
    }
    w.s(b"x86_64-linux")
        .s(b"/bin/sh")
        .u(0)
        .u(1)
        .s(b"name")
        .s(b"x")
        .u(mode)
        .into()
}

/// The start of a BuildDerivation of a fresh `.drv`.
fn drv_start(c: &Ctx) -> W {
    W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv"))
}

/// BuildDerivation of `drv`, encoded.
fn build(c: &Ctx, drv: BasicDerivation) -> Script {
    let name = std::str::from_utf8(&drv.env[&b"name"[..]]).expect("UTF-8 name");
    Script::new(V).request(&Request::BuildDerivation {
        drv_path: c.fresh(&format!("{name}.drv")),
        drv: Box::new(drv),
        mode: BuildMode::Normal,
    })
}

/// A derivation of `name` with one input-addressed output and `input` among its inputs.
fn uses(c: &Ctx, name: &str, input: &StorePath) -> BasicDerivation {
    let out = DerivationOutput::InputAddressed(c.fresh(name));
    let mut drv = c.derivation(name, BTreeMap::from([("out".to_owned(), out)]), "true");
    drv.input_srcs.insert(input.clone());
    drv
}

// ---------------------------------------------------------------------------------------
// The table.

/// What must come of a hostile session.
enum Expect {
    /// The session ends with the needle on the log channel and `error: ` on stderr.
    Fatal(String),
    /// The last request is answered with `STDERR_ERROR` holding the needle, and the
    /// session goes on: an IsValidPath sent after it is answered.
    Refused(&'static str),
    /// The request is a BuildDerivation answered with a failed BuildResult of this status
    /// whose message has the needle.
    Build(BuildStatus, &'static str),
}

type Input = Box<dyn Fn(&Ctx) -> Script + Send + Sync>;

/// A request's bytes, made from the fixture.
type Bytes = Box<dyn Fn(&Ctx) -> Vec<u8> + Send + Sync>;

/// One hostile session.
struct Case {
    name: String,
    expect: Expect,
    /// Whether the SSH test runs it too.
    ssh: bool,
    /// Whether the bytes are cut short, so that only the end of the client's input shows
    /// what is wrong (otherwise the client keeps its side open, and the server must end the
    /// session by itself).
    cut: bool,
    input: Input,
}

/// A case whose session, the hello and then `bytes`, ends with `...needle...`.
fn fails(
    name: impl Into<String>,
    needle: impl Into<String>,
    bytes: impl Fn(&Ctx) -> Vec<u8> + Send + Sync + 'static,
) -> Case {
    Case {
        name: name.into(),
        expect: Expect::Fatal(needle.into()),
        ssh: false,
        cut: false,
        input: Box::new(move |c| Script::new(V).raw(&bytes(c))),
    }
}

/// A case whose session is `script` (whose requests before the last are answered).
fn fails_script(
    name: &str,
    needle: impl Into<String>,
    script: impl Fn(&Ctx) -> Script + Send + Sync + 'static,
) -> Case {
    Case {
        name: name.into(),
        expect: Expect::Fatal(needle.into()),
        ssh: false,
        cut: false,
        input: Box::new(script),
    }
}

/// A handshake case: `bytes` is everything the client sends.
fn handshake(name: &str, needle: &str, bytes: impl Into<Vec<u8>>) -> Case {
    let bytes = bytes.into();
    Case {
        name: name.into(),
        expect: Expect::Fatal(needle.into()),
        ssh: false,
        cut: false,
        input: Box::new(move |_| Script::bare(V, bytes.clone())),
    }
}

/// A request refused with `...needle...`, the session going on.
fn refused(
    name: &str,
    needle: &'static str,
    req: impl Fn(&Ctx) -> Request + Send + Sync + 'static,
) -> Case {
    refused_script(name, needle, move |c| Script::new(V).request(&req(c)))
}

/// Like [`refused`], for a request with a payload: its whole session is `script`.
fn refused_script(
    name: &str,
    needle: &'static str,
    script: impl Fn(&Ctx) -> Script + Send + Sync + 'static,
) -> Case {
    Case {
        name: name.into(),
        expect: Expect::Refused(needle),
        ssh: false,
        cut: false,
        input: Box::new(script),
    }
}

/// A BuildDerivation answered with a failed BuildResult.
fn build_fails(
    name: &str,
    status: BuildStatus,
    needle: &'static str,
    drv: impl Fn(&Ctx) -> BasicDerivation + Send + Sync + 'static,
) -> Case {
    Case {
        name: name.into(),
        expect: Expect::Build(status, needle),
        ssh: false,
        cut: false,
        input: Box::new(move |c| build(c, drv(c))),
    }
}

/// `n` copies of a path string, as a list.
fn list_of(n: u64, item: &[u8]) -> W {
    let mut w = W::new().u(n);
    for _ in 0..n {
        w = w.s(item);
    }
    w
}

/// Every case, in order.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let v38 = WorkerVersion::V1_38.to_wire();
    let big = MAX_REQUEST_BYTES + 1;
    let mut c = vec![
        // Handshake.
        handshake("bad magic", "protocol mismatch: expected magic 0x6e697863, got 0xdeadbeef", W::new().u(0xdead_beef).u(v38)),
        handshake("server's magic", "got 0x6478696f", W::new().u(SERVER_MAGIC).u(v38)),
        handshake("version 0x114 (Nix 2.2)", "unsupported Nix daemon protocol version 0x114: nixbuild serves clients from Nix 2.3 (protocol 1.21) on", W::new().u(CLIENT_MAGIC).u(0x114)),
        handshake("version 2.38", "unsupported Nix daemon protocol version 0x226", W::new().u(CLIENT_MAGIC).u(0x226)),
        handshake("version u64::MAX", "protocol version 0xffffffffffffffff", W::new().u(CLIENT_MAGIC).u(u64::MAX)),
        handshake("half a magic", "unexpected end of input in the handshake", vec![0x63, 0x78, 0x69, 0x6e]),
        handshake("magic only", "unexpected end of input in the handshake", W::new().u(CLIENT_MAGIC)),
        handshake("1.38 features of u64::MAX strings", "features at offset 0: 18446744073709551615 elements exceed the limit of 100", W::new().u(CLIENT_MAGIC).u(v38).u(u64::MAX)),
        handshake("1.38 features just over the list limit", "101 elements exceed the limit of 100", W::new().u(CLIENT_MAGIC).u(v38).u(MAX_PATHS + 1)),
        handshake("1.38 feature of 4097 bytes", "string of 4097 bytes exceeds the limit of 4096", W::new().u(CLIENT_MAGIC).u(v38).u(1).u(4097)),
        handshake("1.38 features cut short", "unexpected end of input in the handshake", W::new().u(CLIENT_MAGIC).u(v38).u(2).s(b"a")),
        handshake("affinity flag 2", "affinity flag at offset 0: boolean must be 0 or 1, got 2", W::new().u(CLIENT_MAGIC).u(V.to_wire()).u(2).u(0)),
        // Opcodes.
        fails("opcode 0", "invalid operation 0", |_| W::new().u(0).into()),
        fails("opcode u64::MAX", "invalid operation 18446744073709551615", |_| W::new().u(u64::MAX).into()),
        fails("half an opcode", "unexpected end of input in a request", |_| vec![1, 0, 0]),
        // Absurd lengths and counts, and just over each limit.
        fails("IsValidPath path of u64::MAX bytes", "string of 18446744073709551615 bytes exceeds the limit of 4096", |_| W::new().op(Opcode::IsValidPath).u(u64::MAX).into()),
        fails("IsValidPath path of 4097 bytes", "string of 4097 bytes exceeds the limit of 4096", |_| W::new().op(Opcode::IsValidPath).u(4097).into()),
        fails("QueryPathInfo path of u64::MAX bytes", "string of 18446744073709551615 bytes exceeds the limit of 4096", |_| W::new().op(Opcode::QueryPathInfo).u(u64::MAX).into()),
        fails("NarFromPath path of u64::MAX bytes", "string of 18446744073709551615 bytes exceeds the limit of 4096", |_| W::new().op(Opcode::NarFromPath).u(u64::MAX).into()),
        fails("QueryValidPaths of u64::MAX paths", "18446744073709551615 elements exceed the limit of 100", |_| W::new().op(Opcode::QueryValidPaths).u(u64::MAX).into()),
        fails("QueryValidPaths of 101 paths", "101 elements exceed the limit of 100", |_| W::new().op(Opcode::QueryValidPaths).u(MAX_PATHS + 1).into()),
        fails("QueryMissing of u64::MAX paths", "18446744073709551615 elements exceed the limit of 100", |_| W::new().op(Opcode::QueryMissing).u(u64::MAX).into()),
        fails("QueryMissing of 101 paths", "101 elements exceed the limit of 100", |c| W::new().op(Opcode::QueryMissing).raw(&list_of(MAX_PATHS + 1, c.mine.to_absolute().as_bytes()).0).into()),
        fails("BuildPaths of u64::MAX entries", "18446744073709551615 elements exceed the limit of 100", |_| W::new().op(Opcode::BuildPaths).u(u64::MAX).into()),
        fails("BuildPaths of 101 entries", "101 elements exceed the limit of 100", |c| W::new().op(Opcode::BuildPaths).raw(&list_of(MAX_PATHS + 1, c.mine.to_absolute().as_bytes()).0).u(0).into()),
        fails("BuildPaths entry of u64::MAX bytes", "string of 18446744073709551615 bytes exceeds the limit of 4096", |_| W::new().op(Opcode::BuildPaths).u(1).u(u64::MAX).into()),
        fails("BuildPathsWithResults of u64::MAX entries", "18446744073709551615 elements exceed the limit of 100", |_| W::new().op(Opcode::BuildPathsWithResults).u(u64::MAX).into()),
        fails("BuildPathsWithResults entry of 4097 bytes", "string of 4097 bytes exceeds the limit of 4096", |_| W::new().op(Opcode::BuildPathsWithResults).u(1).u(4097).into()),
        fails("BuildDerivation of u64::MAX outputs", "18446744073709551615 elements exceed", |c| drv_start(c).u(u64::MAX).into()),
        fails("BuildDerivation output name of u64::MAX bytes", "string of 18446744073709551615 bytes", |c| drv_start(c).u(1).u(u64::MAX).into()),
        fails("BuildDerivation inputSrcs of u64::MAX paths", "18446744073709551615 elements exceed", |c| drv_start(c).u(0).u(u64::MAX).into()),
        fails("BuildDerivation builder of u64::MAX bytes", "string of 18446744073709551615 bytes", |c| drv_start(c).u(0).u(0).s(b"x86_64-linux").u(u64::MAX).into()),
        fails("BuildDerivation args of u64::MAX strings", "18446744073709551615 elements exceed", |c| drv_start(c).u(0).u(0).s(b"x86_64-linux").s(b"/bin/sh").u(u64::MAX).into()),
        fails("BuildDerivation env of u64::MAX entries", "18446744073709551615 elements exceed", |c| drv_start(c).u(0).u(0).s(b"x86_64-linux").s(b"/bin/sh").u(0).u(u64::MAX).into()),
        fails("BuildDerivation env value just over max_request_bytes", format!("{big} bytes"), move |c| drv_start(c).u(0).u(0).s(b"x86_64-linux").s(b"/bin/sh").u(0).u(1).s(b"k").u(big).into()),
        fails("AddToStoreNar narSize u64::MAX", "narSize at offset", |c| RawAdd { nar_size: u64::MAX, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddToStoreNar narSize just over max_nar_size", format!("{} is not in 1..={MAX_NAR_SIZE}", MAX_NAR_SIZE + 1), |c| RawAdd { nar_size: MAX_NAR_SIZE + 1, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddToStoreNar narSize 0", "0 is not in 1..=", |c| RawAdd { nar_size: 0, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddToStoreNar narHash of u64::MAX bytes", "string of 18446744073709551615 bytes", |c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").u(u64::MAX).into()),
        fails("AddToStoreNar narHash not a hash", "narHash", |c| RawAdd { hash: b"sha256:zz".to_vec(), ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddToStoreNar references of u64::MAX paths", "18446744073709551615 elements exceed", |c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(u64::MAX).into()),
        fails("AddToStoreNar references of 101 paths", "101 elements exceed the limit of 100", |c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(MAX_PATHS + 1).into()),
        fails("AddToStoreNar sigs of u64::MAX strings", "18446744073709551615 elements exceed", |c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(0).u(0).u(8).u(0).u(u64::MAX).into()),
        fails("AddToStoreNar ca of u64::MAX bytes", "string of 18446744073709551615 bytes", |c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(0).u(0).u(8).u(0).u(0).u(u64::MAX).into()),
        fails("AddToStoreNar ca not a content address", "ca at offset", |c| RawAdd { ca: b"fixed:sha3:00".to_vec(), ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddToStoreNar NAR longer than max_nar_size", "is not in 1..=3145728", |c| RawAdd::new(&c.fresh("big"), &file_nar(&vec![1u8; MAX_NAR_SIZE as usize])).single()),
        fails("AddMultipleToStore of u64::MAX paths", "18446744073709551615 elements exceed the limit of 100", |_| multi_raw(&W::new().u(u64::MAX).0)),
        fails("AddMultipleToStore of 101 paths", "101 elements exceed the limit of 100", |_| multi_raw(&W::new().u(MAX_PATHS + 1).0)),
        fails("AddMultipleToStore path of u64::MAX bytes", "string of 18446744073709551615 bytes", |_| multi_raw(&W::new().u(1).u(u64::MAX).0)),
        fails("AddMultipleToStore references of u64::MAX paths", "18446744073709551615 elements exceed", |c| multi_raw(&W::new().u(1).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(u64::MAX).0)),
        fails("AddMultipleToStore narSize u64::MAX", "narSize at offset", |c| multi(&[RawAdd { nar_size: u64::MAX, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }])),
        fails("AddMultipleToStore narSize just over max_nar_size", format!("{} is not in 1..={MAX_NAR_SIZE}", MAX_NAR_SIZE + 1), |c| multi(&[RawAdd { nar_size: MAX_NAR_SIZE + 1, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }])),
        fails("AddMultipleToStore narSize 0", "0 is not in 1..=", |c| multi(&[RawAdd { nar_size: 0, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }])),
        fails("AddMultipleToStore ca of u64::MAX bytes", "string of 18446744073709551615 bytes", |c| multi_raw(&W::new().u(1).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(0).u(0).u(8).u(0).u(0).u(u64::MAX).0)),
        fails("AddMultipleToStore reference of 1 MiB", "references at offset 144: string of 1048576 bytes exceeds the limit of 4096", |c| multi_raw(&W::new().u(1).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(1).u(1 << 20).0)),
        fails("SetOptions overrides of u64::MAX pairs", "18446744073709551615 elements exceed", |_| { let mut w = W::new().op(Opcode::SetOptions); for _ in 0..12 { w = w.u(0); } w.u(u64::MAX).into() }),
        fails("SetOptions overrides of 101 pairs", "101 elements exceed the limit of 100", |_| { let mut w = W::new().op(Opcode::SetOptions); for _ in 0..12 { w = w.u(0); } w.u(MAX_PATHS + 1).into() }),
        fails("SetOptions setting value just over max_request_bytes", format!("{big} bytes"), move |_| { let mut w = W::new().op(Opcode::SetOptions); for _ in 0..12 { w = w.u(0); } w.u(1).s(b"cores").u(big).into() }),
        fails("SetOptions setting name of 4097 bytes", "setting name at offset 112: string of 4097 bytes exceeds the limit of 4096", |_| { let mut w = W::new().op(Opcode::SetOptions); for _ in 0..12 { w = w.u(0); } w.u(1).s(&[b'n'; 4097]).s(b"1").into() }),
        fails("AddTextToStore text of u64::MAX bytes", "string of 18446744073709551615 bytes", |_| W::new().op(Opcode::AddTextToStore).s(b"t").u(u64::MAX).into()),
        fails("AddTextToStore text just over max_request_bytes", format!("{big} bytes"), move |_| W::new().op(Opcode::AddTextToStore).s(b"t").u(big).into()),
        fails("AddToStore dump just over max_request_bytes", "max_request_bytes in [store]", move |_| W::new().op(Opcode::AddToStore).s(b"d").s(b"fixed:sha256").u(0).u(0).raw(&framed(&vec![b'd'; big as usize])).into()),
        fails_script("uploads just over max_upload_bytes_per_session", format!("uploaded more than {MAX_UPLOAD} bytes of NAR data"), |c| { let a = RawAdd::new(&c.bb, &c.bb_nar).single(); (0..3).fold(Script::new(V), |s, _| s.raw_request(Opcode::AddToStoreNar, &a)) }),
        fails("AddMultipleToStore uploads just over max_upload_bytes_per_session", format!("uploaded more than {MAX_UPLOAD} bytes of NAR data"), |c| { let a = RawAdd::new(&c.bb, &c.bb_nar); multi(&[a.clone(), a.clone(), a]) }),
        // Booleans other than 0 and 1, modes out of range.
        fails("AddToStoreNar repair 2", "repair at offset", |c| RawAdd { repair: 2, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddToStoreNar dontCheckSigs 2", "dontCheckSigs at offset", |c| RawAdd { dont_check_sigs: 2, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddToStoreNar ultimate 2", "ultimate at offset", |c| RawAdd { ultimate: 2, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()),
        fails("AddMultipleToStore ultimate 2", "ultimate at offset", |c| multi(&[RawAdd { ultimate: 2, ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }])),
        fails("AddMultipleToStore repair 2", "repair at offset 8: boolean must be 0 or 1, got 2", |_| W::new().op(Opcode::AddMultipleToStore).u(2).u(0).raw(&framed(&W::new().u(0).0)).into()),
        fails("AddMultipleToStore dontCheckSigs 2", "dontCheckSigs at offset 16: boolean must be 0 or 1, got 2", |_| W::new().op(Opcode::AddMultipleToStore).u(0).u(2).raw(&framed(&W::new().u(0).0)).into()),
        fails("QueryValidPaths substitute 2", "substitute at offset", |c| W::new().op(Opcode::QueryValidPaths).u(1).p(&c.mine).u(2).into()),
        fails("AddToStore repair 2", "repair at offset", |_| W::new().op(Opcode::AddToStore).s(b"d").s(b"fixed:sha256").u(0).u(2).raw(&framed(b"d")).into()),
        fails("BuildPaths mode 3", "buildMode at offset", |c| W::new().op(Opcode::BuildPaths).u(1).p(&c.mine).u(3).into()),
        fails("BuildPathsWithResults mode u64::MAX", "buildMode at offset", |c| W::new().op(Opcode::BuildPathsWithResults).u(1).p(&c.mine).u(u64::MAX).into()),
        fails("BuildDerivation buildMode 7", "buildMode at offset", |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[], &[], 7)),
        // Derived paths that are not.
        fails("QueryMissing drv!", "no output names after '!'", |c| W::new().op(Opcode::QueryMissing).u(1).s(format!("{}!", c.fresh("x.drv")).as_bytes()).into()),
        fails("QueryMissing outputs of a non-derivation", "outputs of a path that is not a derivation", |c| W::new().op(Opcode::QueryMissing).u(1).s(format!("{}!out", c.mine).as_bytes()).into()),
        fails("BuildPaths drv!", "no output names after '!'", |c| W::new().op(Opcode::BuildPaths).u(1).s(format!("{}!", c.fresh("x.drv")).as_bytes()).u(0).into()),
        fails("BuildPaths outputs of a non-derivation", "outputs of a path that is not a derivation", |c| W::new().op(Opcode::BuildPaths).u(1).s(format!("{}!out", c.mine).as_bytes()).u(0).into()),
        fails("BuildPathsWithResults output name with a space", "output \"a b\"", |c| W::new().op(Opcode::BuildPathsWithResults).u(1).s(format!("{}!a b", c.fresh("x.drv")).as_bytes()).u(0).into()),
        fails("BuildPathsWithResults output name with '!'", "output \"o!x\"", |c| W::new().op(Opcode::BuildPathsWithResults).u(1).s(format!("{}!o!x", c.fresh("x.drv")).as_bytes()).u(0).into()),
        fails("BuildPathsWithResults outputs not UTF-8", "outputs are not UTF-8", |c| W::new().op(Opcode::BuildPathsWithResults).u(1).s(&[format!("{}!", c.fresh("x.drv")).as_bytes(), &[0xff]].concat()).u(0).into()),
        // Derivations with invalid outputs, and build inputs the account cannot see.
        build_fails("fixed-output hash that does not match", BuildStatus::OutputRejected, "hash mismatch in fixed-output derivation", |c| c.fixed_output("fod-mismatch", b"what was promised\n", None, "echo what was built > $out")),
        build_fails("fixed-output path that its hash does not give", BuildStatus::InputRejected, "is declared as", |c| c.fixed_output("fod-path", b"x", Some(c.fresh("fod-path")), "echo x > $out")),
        build_fails("fixed output not alone", BuildStatus::InputRejected, "must be the only output", |c| { let mut drv = c.fixed_output("fod-two", b"x", None, "true"); drv.outputs.insert("dev".into(), DerivationOutput::InputAddressed(c.fresh("fod-two-dev"))); drv }),
        build_fails("input the account cannot see", BuildStatus::MiscFailure, "is not valid on this server for this account", |c| uses(c, "uses-hidden", &c.hidden)),
        build_fails("input nobody uploaded", BuildStatus::MiscFailure, "is not valid on this server for this account", |c| uses(c, "uses-missing", &c.fresh("missing"))),
        fails("output name with a space", "invalid output name", |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"a b", c.fresh("x").to_absolute().as_bytes(), b"", b"")], &[], 0)),
        fails("empty output name", "invalid output name", |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"", c.fresh("x").to_absolute().as_bytes(), b"", b"")], &[], 0)),
        fails("output name with '!'", "invalid output name", |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out!x", c.fresh("x").to_absolute().as_bytes(), b"", b"")], &[], 0)),
        fails("output hash that is not base16", "derivation output \"out\"", |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out", c.fresh("x").to_absolute().as_bytes(), b"sha256", b"zz")], &[], 0)),
        fails("output hash algorithm unknown", "derivation output \"out\"", |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out", c.fresh("x").to_absolute().as_bytes(), b"r:sha3", &[b'0'; 64])], &[], 0)),
        fails("output with a hash and no algorithm", "derivation output \"out\"", |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out", c.fresh("x").to_absolute().as_bytes(), b"", &[b'0'; 64])], &[], 0)),
        // References to paths the account cannot see; paths it may not read.
        fails("AddToStoreNar referencing another account's path", "-hidden, which is not valid for account \"a\"", |c| RawAdd::new(&c.fresh("refers"), &file_nar(b"refers")).refs(&[&c.hidden]).single()),
        fails("AddToStoreNar referencing a path nobody has", "-nobody, which is not valid for account \"a\"", |c| RawAdd::new(&c.fresh("refers"), &file_nar(b"refers")).refs(&[&c.fresh("nobody")]).single()),
        fails("AddMultipleToStore referencing another account's path", "-hidden, which is not valid for account \"a\"", |c| multi(&[RawAdd::new(&c.fresh("refers"), &file_nar(b"refers")).refs(&[&c.hidden])])),
        fails("AddMultipleToStore referencing a path nobody has", "-nobody, which is not valid for account \"a\"", |c| multi(&[RawAdd::new(&c.fresh("refers"), &file_nar(b"refers")).refs(&[&c.fresh("nobody")])])),
        refused("AddTextToStore referencing another account's path", "-hidden", |c| Request::AddTextToStore { name: "refers".into(), text: b"refers".to_vec(), references: BTreeSet::from([c.hidden.clone()]) }),
        refused_script("AddToStore referencing another account's path", "-hidden", |c| Script::new(V).request(&Request::AddToStore { name: "refers".into(), form: AddToStoreForm::Addressed { method: ContentAddressMethod::Text, algo: HashAlgo::Sha256, references: BTreeSet::from([c.hidden.clone()]), repair: false } }).framed(b"refers")),
        refused("NarFromPath of another account's path", "-hidden' is not valid", |c| Request::NarFromPath(c.hidden.clone())),
        refused("EnsurePath of another account's path", "-hidden' is not valid on this server", |c| Request::EnsurePath(c.hidden.clone())),
        refused("BuildPaths of another account's path", "-hidden' is not valid on this server and is not a derivation", |c| Request::BuildPaths { paths: vec![DerivedPath::Opaque(c.hidden.clone())], mode: BuildMode::Normal }),
        refused("QueryDerivationOutputMap of another account's path", "-hidden", |c| Request::QueryDerivationOutputMap(c.hidden.clone())),
        // NARs the store must refuse, whose sizes are the rest of the NAR's.
        fails("NAR file of u64::MAX bytes in AddToStoreNar", "NAR is incomplete", |c| RawAdd::new(&c.fresh("x"), &endless_file_nar()).single()),
        fails("NAR file of u64::MAX bytes in AddMultipleToStore", "NAR is incomplete", |c| multi(&[RawAdd::new(&c.fresh("x"), &endless_file_nar())])),
        fails("NAR nested 100,000 deep in AddToStoreNar", "nesting depth reaches the limit of 64", |c| { let nar = nested_nar(100_000); RawAdd::new(&c.fresh("x"), &nar[..MAX_NAR_SIZE as usize]).single() }),
        fails("NAR nested 100,000 deep in AddMultipleToStore", "nesting depth reaches the limit of 64", |c| { let nar = nested_nar(100_000); multi(&[RawAdd::new(&c.fresh("x"), &nar[..MAX_NAR_SIZE as usize])]) }),
        fails("NAR entry name of u64::MAX bytes in AddToStoreNar", "entry name of 18446744073709551615 bytes exceeds the limit of 255 bytes", |c| RawAdd::new(&c.fresh("x"), &endless_name_nar()).single()),
        fails("NAR entry name of u64::MAX bytes in AddMultipleToStore", "entry name of 18446744073709551615 bytes exceeds the limit of 255 bytes", |c| multi(&[RawAdd::new(&c.fresh("x"), &endless_name_nar())])),
        fails("AddToStoreNar of a directory too big for max_nar_size", "AddToStoreNar: the framed stream goes on after narSize bytes", |c| { let nar = big_dir_nar(); RawAdd { nar_size: MAX_NAR_SIZE, ..RawAdd::new(&c.fresh("wide"), &nar) }.single() }),
        fails("AddMultipleToStore of a directory too big for max_nar_size", "invalid NAR: NAR is incomplete: input ends at byte 3145728", |c| { let nar = big_dir_nar(); multi(&[RawAdd { nar_size: MAX_NAR_SIZE, ..RawAdd::new(&c.fresh("wide"), &nar) }]) }),
        fails("NAR after a good path in AddMultipleToStore", "not sorted", |c| multi(&[RawAdd::new(&c.mine, &file_nar(b"mine")), RawAdd::new(&c.fresh("x"), &dir_nar(&[(b"b", FILE), (b"a", FILE)]))])),
        fails("AddToStoreNar framed stream ends before narSize", "the framed stream ended 8 bytes before narSize", |c| { let nar = file_nar(b"x"); RawAdd { nar_size: nar.len() as u64 + 8, ..RawAdd::new(&c.fresh("x"), &nar) }.single() }),
        fails("AddToStore content-address method unknown", "content-address method at offset", |_| W::new().op(Opcode::AddToStore).s(b"d").s(b"fixed:whirlpool").u(0).u(0).raw(&framed(b"d")).into()),
        fails("SetOptions setting name not UTF-8", "setting name at offset 112", |_| { let mut w = W::new().op(Opcode::SetOptions); for _ in 0..12 { w = w.u(0); } w.u(1).s(&[0xff, 0xfe]).s(b"1").into() }),
        fails("AddBuildLog of a path that is not a base name", "drvPath at offset 8", |c| W::new().op(Opcode::AddBuildLog).p(&c.fresh("x.drv")).raw(&framed(b"log")).into()),
        refused("AddTextToStore of a name with a slash", "a/b", |_| Request::AddTextToStore { name: "a/b".into(), text: b"t".to_vec(), references: BTreeSet::new() }),
        refused("QueryDerivationOutputMap of a path that is not a derivation", "-mine", |c| Request::QueryDerivationOutputMap(c.mine.clone())),
        fails("AddToStoreNar ca the NAR does not have", "content address mismatch for", |_| { let (path, ca) = fixed_path(b"other"); RawAdd { ca: ca.into_bytes(), ..RawAdd::new(&path, &file_nar(b"x")) }.single() }),
        fails("AddMultipleToStore ca the NAR does not have", "content address mismatch for", |_| { let (path, ca) = fixed_path(b"other"); multi(&[RawAdd { ca: ca.into_bytes(), ..RawAdd::new(&path, &file_nar(b"x")) }]) }),
        fails("AddToStoreNar ca that does not give its path", "is not the path of content address", |c| { let (_, ca) = fixed_path(b"x"); RawAdd { ca: ca.into_bytes(), ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single() }),
        // Payloads of older clients: AddToStoreNar's NAR through STDERR_READ (1.21, 1.22),
        // and the legacy AddToStore's raw NAR.
        fails_script("AddToStoreNar at 1.21 of a bad NAR", "invalid entry name", |c| { let nar = dir_nar(&[(b".", FILE)]); RawAdd::new(&c.fresh("x"), &nar).tunnelled(&nar) }),
        fails_script("AddToStoreNar at 1.21 answered with no data", "the client sent no data for STDERR_READ", |c| RawAdd::new(&c.fresh("x"), &file_nar(b"x")).tunnelled(b"")),
        fails_script("AddToStoreNar at 1.21 answered with more than asked", "tunnelled data at offset 0: string of 128 bytes exceeds the limit of 120", |c| { let nar = file_nar(b"x"); RawAdd::new(&c.fresh("x"), &nar).tunnelled(&[&nar[..], &[0; 8]].concat()) }),
        fails_script("legacy AddToStore of a bad NAR", "NAR in AddToStore: NAR byte 128: invalid entry name", |_| Script::new(WorkerVersion::V1_21).raw(&W::new().op(Opcode::AddToStore).s(b"d").u(1).u(1).s(b"sha256").raw(&dir_nar(&[(b"", FILE)])).0)),
        fails_script("legacy AddToStore recursive 2", "recursive at offset", |_| Script::new(WorkerVersion::V1_21).raw(&W::new().op(Opcode::AddToStore).s(b"d").u(1).u(2).s(b"sha256").0)),
    ];
    // Every refused NAR, in both requests that upload one.
    for (what, nar, needle) in bad_nars() {
        let n = nar.clone();
        c.push(fails(format!("NAR {what} in AddToStoreNar"), needle, move |c| RawAdd::new(&c.fresh("x"), &n).single()));
        c.push(fails(format!("NAR {what} in AddMultipleToStore"), needle, move |c| multi(&[RawAdd::new(&c.fresh("x"), &nar)])));
    }
    // Invalid store paths, in every field that holds one.
    for (what, bad, needle) in bad_paths() {
        let path_requests = [Opcode::IsValidPath, Opcode::QueryPathInfo, Opcode::NarFromPath];
        for op in path_requests {
            let b = bad.clone();
            c.push(fails(format!("{}: {what}", op.name()), needle, move |_| W::new().op(op).s(&b).into()));
        }
        let b = bad.clone();
        c.push(fails(format!("QueryValidPaths: {what}"), needle, move |c| W::new().op(Opcode::QueryValidPaths).u(2).p(&c.mine).s(&b).u(0).into()));
        let b = bad.clone();
        c.push(fails(format!("QueryMissing: {what}"), needle, move |_| W::new().op(Opcode::QueryMissing).u(1).s(&b).into()));
        let b = bad.clone();
        c.push(fails(format!("BuildPathsWithResults: {what}"), needle, move |_| W::new().op(Opcode::BuildPathsWithResults).u(1).s(&[&b[..], b"!out"].concat()).u(0).into()));
        let b = bad.clone();
        c.push(fails(format!("AddToStoreNar path: {what}"), needle, move |_| RawAdd { path: b.clone(), ..RawAdd::new(&harness::test_path("x", "x"), &file_nar(b"x")) }.single()));
        let b = bad.clone();
        c.push(fails(format!("AddToStoreNar deriver: {what}"), needle, move |c| RawAdd { deriver: b.clone(), ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()));
        let b = bad.clone();
        c.push(fails(format!("AddToStoreNar reference: {what}"), needle, move |c| RawAdd { references: vec![b.clone()], ..RawAdd::new(&c.fresh("x"), &file_nar(b"x")) }.single()));
        let b = bad.clone();
        c.push(fails(format!("AddMultipleToStore path: {what}"), needle, move |_| multi(&[RawAdd { path: b.clone(), ..RawAdd::new(&harness::test_path("x", "x"), &file_nar(b"x")) }])));
        let b = bad.clone();
        c.push(fails(format!("BuildDerivation drvPath: {what}"), needle, move |_| raw_build(&b, &[], &[], 0)));
        let b = bad.clone();
        c.push(fails(format!("BuildDerivation output path: {what}"), "derivation output \"out\"", move |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out", &b, b"", b"")], &[], 0)));
        let b = bad.clone();
        c.push(fails(format!("BuildDerivation inputSrcs: {what}"), needle, move |c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[], &[&b], 0)));
    }
    c.extend(truncations());
    const OVER_SSH: [&str; 15] = [
        "input the account cannot see",
        "bad magic",
        "version 0x114 (Nix 2.2)",
        "1.38 features of u64::MAX strings",
        "opcode 0",
        "QueryValidPaths of u64::MAX paths",
        "BuildDerivation env value just over max_request_bytes",
        "AddToStoreNar narSize just over max_nar_size",
        "AddMultipleToStore of 101 paths",
        "AddToStoreNar dontCheckSigs 2",
        "BuildPaths outputs of a non-derivation",
        "AddMultipleToStore referencing another account's path",
        "NarFromPath of another account's path",
        "NAR nested 100 deep in AddMultipleToStore",
        "AddToStoreNar path: store-dir",
    ];
    // Sessions whose error is the end of the client's input.
    const CUT: [&str; 4] = ["half a magic", "magic only", "1.38 features cut short", "half an opcode"];
    for case in &mut c {
        case.ssh |= OVER_SSH.contains(&case.name.as_str());
        case.cut |= CUT.contains(&case.name.as_str()) || case.name.contains(" cut ");
    }
    c
}

/// Requests cut short: the client leaves after part of one.
fn truncations() -> Vec<Case> {
    let requests: Vec<(&str, Bytes)> = vec![
        (
            "IsValidPath",
            Box::new(|c| enc(&Request::IsValidPath(c.mine.clone()))),
        ),
        (
            "QueryValidPaths",
            Box::new(|c| {
                enc(&Request::QueryValidPaths {
                    paths: BTreeSet::from([c.mine.clone(), c.fresh("q")]),
                    substitute: false,
                })
            }),
        ),
        (
            "QueryMissing",
            Box::new(|c| {
                enc(&Request::QueryMissing(vec![DerivedPath::Opaque(
                    c.mine.clone(),
                )]))
            }),
        ),
        (
            "BuildPathsWithResults",
            Box::new(|c| {
                enc(&Request::BuildPathsWithResults {
                    paths: vec![DerivedPath::Opaque(c.mine.clone())],
                    mode: BuildMode::Normal,
                })
            }),
        ),
        (
            "BuildDerivation",
            Box::new(|c| {
                raw_build(
                    c.fresh("cut.drv").to_absolute().as_bytes(),
                    &[],
                    &[c.mine.to_absolute().as_bytes()],
                    0,
                )
            }),
        ),
        (
            "AddToStoreNar header",
            Box::new(|c| {
                enc(&Request::AddToStoreNar {
                    info: Box::new(info(
                        &c.fresh("cut"),
                        &file_nar(b"cut"),
                        sha256(&file_nar(b"cut")),
                    )),
                    repair: false,
                    dont_check_sigs: false,
                })
            }),
        ),
    ];
    let mut out = Vec::new();
    for (op, full) in requests {
        let full = std::sync::Arc::new(full);
        // The error names the request: "in a QueryValidPaths request", "in an IsValidPath ...".
        let name = op.split(' ').next().unwrap_or(op);
        let article = if name.starts_with(['A', 'I']) {
            "an"
        } else {
            "a"
        };
        let needle = format!("unexpected end of input in {article} {name} request");
        for (at, cut) in [
            ("after the opcode", Cut::At(8)),
            ("mid-way", Cut::Half),
            ("one byte short", Cut::Short(1)),
        ] {
            let full = full.clone();
            out.push(fails(format!("{op} cut {at}"), needle.clone(), move |c| {
                cut.apply(full(c))
            }));
        }
    }
    let nar = file_nar(&[3u8; 1000]);
    let n = nar.clone();
    out.push(fails(
        "AddToStoreNar cut in its NAR",
        "unexpected end of input in the data that follows an AddToStoreNar request",
        move |c| Cut::Short(100).apply(RawAdd::new(&c.fresh("cut"), &n).single()),
    ));
    out.push(fails(
        "AddMultipleToStore cut in its metadata",
        "unexpected end of input in the data that follows an AddMultipleToStore request",
        move |c| Cut::Short(8 + nar.len() + 40).apply(multi(&[RawAdd::new(&c.fresh("cut"), &nar)])),
    ));
    out
}

fn enc(req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    req.encode(V, &mut out);
    out
}

// ---------------------------------------------------------------------------------------
// Running the cases.

/// Plays `case` with `cmd` (the relay or ssh as account `a`) and checks what came of it.
fn play(case: &Case, ctx: &Ctx, cmd: std::process::Command) {
    let name = &case.name;
    let mut script = (case.input)(ctx);
    match &case.expect {
        Expect::Fatal(needle) => {
            let started = std::time::Instant::now();
            // The server must end the session itself, unless the input's end is the error.
            let t = match case.cut {
                true => run_cmd(cmd, &script),
                false => run_cmd_held(cmd, &script, Duration::from_secs(10)),
            };
            eprintln!("{name}: {:?} ({:?})", t.fatal, started.elapsed());
            check_error(name, t.status, &t.stderr, needle);
            let fatal = t.fatal.as_deref().unwrap_or("");
            assert!(
                fatal.contains(needle.as_str()),
                "{name}: expected the error {needle:?} on the log channel: {t:?}"
            );
        }
        Expect::Refused(needle) => {
            script = script.request(&Request::IsValidPath(ctx.mine.clone()));
            let t = run_cmd(cmd, &script);
            assert_eq!(t.status, 0, "{name}: {t:?}");
            match &t.answers[..] {
                [Answer::Error(msg), Answer::Ok(Some(Response::Int(1)))] => {
                    assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}")
                }
                _ => panic!("{name}: not refused, or the session did not go on: {t:?}"),
            }
        }
        Expect::Build(status, needle) => {
            let t: Transcript = run_cmd_waiting(cmd, &script);
            assert_eq!(t.status, 0, "{name}: {t:?}");
            let [Answer::Ok(Some(Response::Build(result)))] = &t.answers[..] else {
                panic!("{name}: not a BuildResult: {t:?}");
            };
            let msg = String::from_utf8_lossy(&result.error_msg);
            assert_eq!(result.status, *status, "{name}: {msg}");
            assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
        }
    }
}

/// Runs `cases`, each with `cmd()` as the hostile session's command, while `bystander` is
/// served; returns the failures (all cases run, so that one run shows every difference).
fn run_all(
    daemon: &Daemon,
    ctx: &Ctx,
    bystander: &mut dyn Bystander,
    cases: &[&Case],
    cmd: &dyn Fn() -> std::process::Command,
) -> Vec<String> {
    let (request, answer) = bystander_exchange(ctx);
    let mut failures = Vec::new();
    for case in cases {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            guarded(
                daemon,
                &mut *bystander,
                (&request, &answer),
                &case.name,
                || play(case, ctx, cmd()),
            )
        }));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", case.name));
        }
    }
    failures
}

fn assert_none_failed(failures: &[String], total: usize) {
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn hostile_worker_sessions_over_the_relay() {
    let daemon = Daemon::start_with_config(CONFIG, &[]);
    let ctx = Ctx::setup(|account, path, nar| upload(&daemon, account, path, nar));
    let cases = cases();
    let names: BTreeSet<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), cases.len(), "case names are unique");
    let mut bystander = WorkerSession::open(relay_command(&daemon, "good"));
    // WORKER_ABUSE_ONLY=<part of a name> runs only the cases so named, for debugging.
    let only = std::env::var("WORKER_ABUSE_ONLY").unwrap_or_default();
    let all: Vec<&Case> = cases.iter().filter(|c| c.name.contains(&only)).collect();
    let failures = run_all(&daemon, &ctx, &mut bystander, &all, &|| {
        relay_command(&daemon, "a")
    });
    assert_none_failed(&failures, all.len());
    let (status, stderr) = bystander.close();
    assert_eq!(status, 0, "the bystander's session: {stderr}");
    // Every session that ended with an error was logged by the daemon as a failed one.
    let errors = all
        .iter()
        .filter(|c| matches!(c.expect, Expect::Fatal(_)))
        .count();
    assert_failures_logged(&daemon, errors);
    check_daemon(daemon);
}

#[test]
fn hostile_worker_sessions_over_ssh() {
    const ALIAS: &str = "worker-abuse";
    let client = tempfile::tempdir().expect("temp dir");
    let key_a = SshServer::key(client.path(), "id_a", "ed25519", "a");
    let key_good = SshServer::key(client.path(), "id_good", "ed25519", "good");
    let server = SshServer::start(CONFIG, client, &[&key_a, &key_good]);
    let ctx = Ctx::setup(|account, path, nar| upload(&server.daemon, account, path, nar));
    let config_a = server.ssh_config(ALIAS, &key_a);
    let config_good = server.ssh_config("worker-abuse-good", &key_good);
    let mut bystander = WorkerSession::open(ssh_command(&config_good, "worker-abuse-good"));
    let cases = cases();
    let over_ssh: Vec<&Case> = cases.iter().filter(|c| c.ssh).collect();
    assert_eq!(over_ssh.len(), 15, "cases over SSH");
    let config: &Path = &config_a;
    let failures = run_all(&server.daemon, &ctx, &mut bystander, &over_ssh, &|| {
        ssh_command(config, ALIAS)
    });
    assert_none_failed(&failures, over_ssh.len());
    let (status, stderr) = bystander.close();
    assert_eq!(status, 0, "the bystander's SSH session: {stderr}");
    check_daemon(server.daemon);
}
