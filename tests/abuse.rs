//! The protocol abuse suite: hostile sessions over real connections (the relay, and a subset
//! over our SSH server with the real OpenSSH client), one daemon for all the cases of a
//! transport. Each case is one row of [`cases`]: the bytes a hostile client sends after its
//! hello and what must come of them. For every case the suite checks that
//!
//! - the session ends with `error: <needle>` on stderr and a non-zero status (or, for a
//!   derivation that cannot be built, a failed BuildResult whose message has the needle);
//! - a concurrent session of another account completes a real operation (QueryValidPaths
//!   and DumpStorePath of its own path, byte for byte) while the hostile one runs;
//! - the store is unchanged: every SQLite row and every file of `objects/` as before, and
//!   nothing left in `tmp/` ([`harness::StoreSnapshot`]);
//!
//! and at the end that the daemon never panicked and stops cleanly with a consistent store.
//! Content that looks hostile but is legitimate (symlink loops, symlinks out of the store,
//! a directory of many entries) is stored verbatim and served back byte for byte.
//!
//! (`serve_bad_input.rs` has the cases this suite does not repeat: NAR hash and size lies,
//! `..` and `/` entry names, a 2^40-byte string, opcode 42, write commands without
//! `--write`, the path-count and request-byte caps.)

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use harness::hostile::{
    assert_failures_logged, bad_nars, bad_paths, check_daemon, check_error, dir_nar,
    endless_file_nar, guarded, nested_nar, wide_nar, Bystander, Cut, Fixture, FILE, W,
};
use harness::ssh::{SshServer, SshSession};
use harness::{sha256, test_path, Daemon, Script};
use nixbuild_core::derivation::{BasicDerivation, DerivationOutput};
use nixbuild_core::nar::NarNode;
use nixbuild_core::serve::{
    AddToStoreNar, BuildOptions, BuildStatus, ExportMarker, ExportTrailer, Opcode, PathWithOutputs,
    Request, Response,
};
use nixbuild_core::store_path::StorePath;

/// Limits small enough that "just over" each of them is cheap to send.
const MAX_NAR_SIZE: u64 = 3 << 20;
const MAX_PATHS: u64 = 100;
const MAX_REQUEST_BYTES: u64 = 65536;
const MAX_UPLOAD: u64 = 5 << 20;
const CONFIG: &str = "[store]\nmax_nar_size = 3145728\nmax_paths_per_request = 100\n\
                      max_request_bytes = 65536\n[limits]\nmax_upload_bytes_per_session = 5242880\n";

// ---------------------------------------------------------------------------------------
// The fixture: paths uploaded before the cases, by three accounts.

/// The fixture of the cases.
type Ctx = Fixture;

fn upload(daemon: &Daemon, account: &str, path: &StorePath, nar: &[u8]) {
    let script = Script::new().add_honest(path, nar);
    let reply = daemon.relay(account, true, &script.bytes);
    assert_eq!(reply.status, 0, "upload of {path}: {reply:?}");
    assert_eq!(reply.responses(&script.ops), vec![Response::Added]);
}

/// What the serve protocol's cases make of the fixture.
trait Serve {
    fn bystander_exchange(&self) -> (Vec<u8>, Vec<u8>);
    fn build(&self, drv: BasicDerivation) -> Vec<u8>;
}

impl Serve for Ctx {
    /// The bystander's request, and the exact answer it must get.
    fn bystander_exchange(&self) -> (Vec<u8>, Vec<u8>) {
        let mut request = Vec::new();
        let paths = BTreeSet::from([self.good.clone()]);
        let query = Request::QueryValidPaths {
            lock: false,
            substitute: false,
            paths: paths.clone(),
        };
        query.encode(harness::VERSION, &mut request);
        Request::DumpStorePath {
            path: self.good.clone(),
        }
        .encode(harness::VERSION, &mut request);
        let mut answer = Vec::new();
        Response::ValidPaths(paths).encode(harness::VERSION, &mut answer);
        answer.extend_from_slice(&self.good_nar);
        (request, answer)
    }

    /// BuildDerivation of `drv` as the session's request.
    fn build(&self, drv: BasicDerivation) -> Vec<u8> {
        let name = std::str::from_utf8(&drv.env[&b"name"[..]]).expect("UTF-8 name");
        encode(&Request::BuildDerivation {
            drv_path: self.fresh(&format!("{name}.drv")),
            drv: Box::new(drv),
            options: BuildOptions::default(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Building hostile bytes.

fn encode(req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    req.encode(harness::VERSION, &mut out);
    out
}

/// The header of an AddToStoreNar of `nar` for `path` with `references`, honest otherwise.
fn add_header(path: &StorePath, nar: &[u8], references: &[&StorePath]) -> AddToStoreNar {
    AddToStoreNar {
        path: path.clone(),
        deriver: None,
        nar_hash: sha256(nar),
        references: references.iter().map(|p| (*p).clone()).collect(),
        registration_time: 0,
        nar_size: nar.len() as u64,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: None,
    }
}

/// AddToStoreNar of `nar` for `path`, honest.
fn add(path: &StorePath, nar: &[u8]) -> Vec<u8> {
    let mut out = encode(&Request::AddToStoreNar(Box::new(add_header(
        path,
        nar,
        &[],
    ))));
    out.extend_from_slice(nar);
    out
}

/// ImportPaths of entries `(path, NAR, references)`, with the end marker.
fn import(entries: &[(&StorePath, &[u8], &[&StorePath])]) -> Vec<u8> {
    let mut out = encode(&Request::ImportPaths);
    for (path, nar, references) in entries {
        ExportMarker::Entry.encode(&mut out);
        out.extend_from_slice(nar);
        ExportTrailer {
            path: (*path).clone(),
            references: references.iter().map(|p| (*p).clone()).collect(),
            deriver: None,
            legacy_signature: None,
        }
        .encode(&mut out);
    }
    ExportMarker::End.encode(&mut out);
    out
}

/// ImportPaths of one entry whose trailer is `trailer` (raw: magic, path, references,
/// deriver, signature flag, ...), then the end marker.
fn import_trailer(nar: &[u8], trailer: W) -> Vec<u8> {
    W::new()
        .op(Opcode::ImportPaths)
        .u(1)
        .raw(nar)
        .raw(&trailer.0)
        .u(0)
        .into()
}

/// The start of a good export trailer: the magic.
fn nixe() -> W {
    W::new().u(0x4558_494e)
}

/// An output as BuildDerivation sends it: name, path, hashAlgo, hash.
type RawOutput<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8]);

/// A BuildDerivation whose fields are given raw: outputs `(name, path, algo, hash)`,
/// inputSrcs, and the six option words.
fn raw_build(
    drv_path: &[u8],
    outputs: &[RawOutput<'_>],
    inputs: &[&[u8]],
    options: [u64; 6],
) -> Vec<u8> {
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
    w = w
        .s(b"x86_64-linux")
        .s(b"/bin/sh")
        .u(0)
        .u(1)
        .s(b"name")
        .s(b"x");
    for o in options {
        w = w.u(o);
    }
    w.into()
}

// ---------------------------------------------------------------------------------------
// The table.

/// What must come of a hostile session.
enum Expect {
    /// The session ends with `error: ` and this needle on stderr, non-zero status.
    Error(String),
    /// The request is a BuildDerivation answered with a failed BuildResult of this status
    /// whose message has the needle; the session goes on (docs/serve-protocol.md §5).
    Build(BuildStatus, &'static str),
}

type Input = Box<dyn Fn(&Ctx) -> Vec<u8> + Send + Sync>;

/// One hostile session.
struct Case {
    name: String,
    expect: Expect,
    /// Whether the bytes start with the client's hello (handshake cases send their own).
    hello: bool,
    /// Whether the SSH test runs it too.
    ssh: bool,
    input: Input,
}

/// A case ending with `error: ...needle...`.
fn fails(name: impl Into<String>, needle: impl Into<String>, input: Input) -> Case {
    Case {
        name: name.into(),
        expect: Expect::Error(needle.into()),
        hello: true,
        ssh: false,
        input,
    }
}

/// Like [`fails`], run over SSH too.
fn fails_ssh(name: &str, needle: &str, input: Input) -> Case {
    Case {
        ssh: true,
        ..fails(name, needle, input)
    }
}

/// A handshake case: `input` is everything the client sends.
fn handshake(name: &str, needle: &str, input: Vec<u8>) -> Case {
    Case {
        hello: false,
        ..fails(name, needle, Box::new(move |_| input.clone()))
    }
}

/// A BuildDerivation answered with a failed BuildResult.
fn build_fails(name: &str, status: BuildStatus, needle: &'static str, input: Input) -> Case {
    Case {
        name: name.into(),
        expect: Expect::Build(status, needle),
        hello: true,
        ssh: false,
        input,
    }
}

/// Every case, in order.
fn cases() -> Vec<Case> {
    let mut c = vec![
        // Handshake.
        handshake("bad magic", "protocol mismatch: expected magic 0x390c9deb, got 0xdeadbeef", W::new().u(0xdead_beef).u(0x207).into()),
        handshake("server's magic", "got 0x5452eecb", W::new().u(0x5452_eecb).u(0x207).into()),
        handshake("version 3.7", "unsupported 'nix-store --serve' protocol version 0x307", W::new().u(0x390c_9deb).u(0x307).into()),
        handshake("version 1.1", "unsupported 'nix-store --serve' protocol version 0x101", W::new().u(0x390c_9deb).u(0x101).into()),
        handshake("version u64::MAX", "protocol version 0xffffffffffffffff", W::new().u(0x390c_9deb).u(u64::MAX).into()),
        handshake("half a magic", "unexpected end of input in the handshake", vec![0xeb, 0x9d, 0x0c, 0x39]),
        handshake("magic only", "unexpected end of input in the handshake", W::new().u(0x390c_9deb).into()),
        // Opcodes.
        fails_ssh("opcode 0", "unknown serve command 0", Box::new(|_| W::new().u(0).into())),
        fails("opcode u64::MAX", "unknown serve command 18446744073709551615", Box::new(|_| W::new().u(u64::MAX).into())),
        fails("half an opcode", "unexpected end of input in a request", Box::new(|_| vec![1, 0, 0])),
        // Absurd lengths and counts, and just over each limit.
        fails_ssh("DumpStorePath path of u64::MAX bytes", "path at offset 8: string of 18446744073709551615 bytes exceeds the limit of 4096", Box::new(|_| W::new().op(Opcode::DumpStorePath).u(u64::MAX).into())),
        fails("DumpStorePath path of 4097 bytes", "string of 4097 bytes exceeds the limit of 4096", Box::new(|_| W::new().op(Opcode::DumpStorePath).u(4097).into())),
        fails_ssh("QueryPathInfos of u64::MAX paths", "paths at offset 8: 18446744073709551615 elements exceed the limit of 100", Box::new(|_| W::new().op(Opcode::QueryPathInfos).u(u64::MAX).into())),
        fails("QueryClosure of u64::MAX paths", "18446744073709551615 elements exceed the limit of 100", Box::new(|_| W::new().op(Opcode::QueryClosure).u(0).u(u64::MAX).into())),
        fails("QueryClosure of 101 paths", "101 elements exceed the limit of 100", Box::new(|_| W::new().op(Opcode::QueryClosure).u(0).u(MAX_PATHS + 1).into())),
        fails("ExportPaths of u64::MAX paths", "18446744073709551615 elements exceed the limit of 100", Box::new(|_| W::new().op(Opcode::ExportPaths).u(0).u(u64::MAX).into())),
        fails("BuildPaths of u64::MAX entries", "BuildPaths entries at offset 8: 18446744073709551615 elements exceed", Box::new(|_| W::new().op(Opcode::BuildPaths).u(u64::MAX).into())),
        fails("BuildPaths entry of u64::MAX bytes", "BuildPaths entry at offset 16: string of 18446744073709551615 bytes", Box::new(|_| W::new().op(Opcode::BuildPaths).u(1).u(u64::MAX).into())),
        fails("BuildDerivation of u64::MAX outputs", "outputs at offset", Box::new(|c| W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv")).u(u64::MAX).into())),
        fails("BuildDerivation output name of u64::MAX bytes", "output name at offset", Box::new(|c| W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv")).u(1).u(u64::MAX).into())),
        fails("BuildDerivation inputSrcs of u64::MAX paths", "inputSrcs at offset", Box::new(|c| W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv")).u(0).u(u64::MAX).into())),
        fails("BuildDerivation builder of u64::MAX bytes", "builder at offset", Box::new(|c| W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv")).u(0).u(0).s(b"x86_64-linux").u(u64::MAX).into())),
        fails("BuildDerivation args of u64::MAX strings", "args at offset", Box::new(|c| W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv")).u(0).u(0).s(b"x86_64-linux").s(b"/bin/sh").u(u64::MAX).into())),
        fails("BuildDerivation env of u64::MAX entries", "env at offset", Box::new(|c| W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv")).u(0).u(0).s(b"x86_64-linux").s(b"/bin/sh").u(0).u(u64::MAX).into())),
        fails("BuildDerivation env value just over max_request_bytes", format!("{} bytes", MAX_REQUEST_BYTES + 1), Box::new(|c| W::new().op(Opcode::BuildDerivation).p(&c.fresh("x.drv")).u(0).u(0).s(b"x86_64-linux").s(b"/bin/sh").u(0).u(1).s(b"k").u(MAX_REQUEST_BYTES + 1).into())),
        fails("AddToStoreNar narSize u64::MAX", "narSize at offset", Box::new(|c| { let mut h = add_header(&c.fresh("x"), b"", &[]); h.nar_size = u64::MAX; encode(&Request::AddToStoreNar(Box::new(h))) })),
        fails("AddToStoreNar narSize just over max_nar_size", format!("{} is not in 1..={MAX_NAR_SIZE}", MAX_NAR_SIZE + 1), Box::new(|c| { let mut h = add_header(&c.fresh("x"), b"", &[]); h.nar_size = MAX_NAR_SIZE + 1; encode(&Request::AddToStoreNar(Box::new(h))) })),
        fails("AddToStoreNar narSize 0", "0 is not in 1..=", Box::new(|c| { let mut h = add_header(&c.fresh("x"), b"", &[]); h.nar_size = 0; encode(&Request::AddToStoreNar(Box::new(h))) })),
        fails("AddToStoreNar narHash of u64::MAX bytes", "narHash at offset", Box::new(|c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").u(u64::MAX).into())),
        fails("AddToStoreNar references of u64::MAX paths", "references at offset", Box::new(|c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(u64::MAX).into())),
        fails("AddToStoreNar sigs of u64::MAX strings", "sigs at offset", Box::new(|c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(0).u(0).u(8).u(0).u(u64::MAX).into())),
        fails("AddToStoreNar ca of u64::MAX bytes", "ca at offset", Box::new(|c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(0).u(0).u(8).u(0).u(0).u(u64::MAX).into())),
        fails("NAR file of u64::MAX bytes in AddToStoreNar", "invalid NAR: NAR is incomplete", Box::new(|c| { let nar = endless_file_nar(); add(&c.fresh("x"), &nar) })),
        fails("NAR file of u64::MAX bytes in ImportPaths", "unexpected end of input in a NAR", Box::new(|c| { let nar = endless_file_nar(); import_trailer(&nar, nixe().p(&c.fresh("x"))) })),
        fails("NAR entry name of u64::MAX bytes", "entry name of 18446744073709551615 bytes exceeds the limit of 255 bytes", Box::new(|c| { let nar: Vec<u8> = W::new().s(b"nix-archive-1").s(b"(").s(b"type").s(b"directory").s(b"entry").s(b"(").s(b"name").u(u64::MAX).into(); import_trailer(&nar, nixe().p(&c.fresh("x"))) })),
        fails("ImportPaths NAR just over max_nar_size", "NAR exceeds the limit of 3145728 bytes", Box::new(|c| import(&[(&c.fresh("big"), &harness::file_nar(&vec![1u8; MAX_NAR_SIZE as usize]), &[])]))),
        fails("ImportPaths of a directory too big for max_nar_size", "NAR exceeds the limit of 3145728 bytes", Box::new(|c| import(&[(&c.fresh("wide"), &wide_nar(40_000), &[])]))),
        // (Entries before the 101st are imported, each complete and verified, as upstream does: the
        // path is one `a` has already, so that the store stays as it was.)
        fails("ImportPaths of 101 paths", "ImportPaths names 101 paths; this server accepts at most 100", Box::new(|c| { let nar = harness::file_nar(b"mine"); let entries: Vec<(&StorePath, &[u8], &[&StorePath])> = (0..=MAX_PATHS).map(|_| (&c.mine, &nar[..], &[][..])).collect(); import(&entries) })),
        fails("uploads just over max_upload_bytes_per_session", format!("uploaded more than {MAX_UPLOAD} bytes of NAR data"), Box::new(|c| [add(&c.bb, &c.bb_nar), add(&c.bb, &c.bb_nar), add(&c.bb, &c.bb_nar)].concat())),
        fails("export trailer references of u64::MAX paths", "references at offset", Box::new(|c| import_trailer(&harness::file_nar(b"t"), nixe().p(&c.fresh("x")).u(u64::MAX)))),
        fails("export trailer path of u64::MAX bytes", "export path at offset 8: string of 18446744073709551615 bytes", Box::new(|_| import_trailer(&harness::file_nar(b"t"), nixe().u(u64::MAX)))),
        fails("export trailer signature of u64::MAX bytes", "export signature at offset 88: string of 18446744073709551615 bytes exceeds the limit of 65536", Box::new(|c| import_trailer(&harness::file_nar(b"t"), nixe().p(&c.fresh("x")).u(0).s(b"").u(1).u(u64::MAX)))),
        fails("export marker 2", "input doesn't look like something created by 'nix-store --export' (got 2)", Box::new(|_| W::new().op(Opcode::ImportPaths).u(2).into())),
        fails("export trailer magic", "export magic at offset 0: expected 0x4558494e (\"NIXE\"), got 0x4558494f", Box::new(|c| import_trailer(&harness::file_nar(b"t"), W::new().u(0x4558_494f).p(&c.fresh("x")).u(0).s(b"").u(0)))),
        // Booleans other than 0 and 1.
        fails_ssh("QueryValidPaths lock 2", "lock at offset 8: boolean must be 0 or 1, got 2", Box::new(|c| W::new().op(Opcode::QueryValidPaths).u(2).u(0).u(1).p(&c.mine).into())),
        fails("QueryValidPaths substitute 2", "substitute at offset 16: boolean must be 0 or 1, got 2", Box::new(|c| W::new().op(Opcode::QueryValidPaths).u(0).u(2).u(1).p(&c.mine).into())),
        fails("QueryValidPaths lock u64::MAX", "lock at offset 8: boolean must be 0 or 1, got 18446744073709551615", Box::new(|_| W::new().op(Opcode::QueryValidPaths).u(u64::MAX).u(0).u(0).into())),
        fails("QueryClosure includeOutputs 2", "includeOutputs at offset 8: boolean must be 0 or 1, got 2", Box::new(|c| W::new().op(Opcode::QueryClosure).u(2).u(1).p(&c.mine).into())),
        fails("AddToStoreNar ultimate 2", "ultimate at offset", Box::new(|c| W::new().op(Opcode::AddToStoreNar).p(&c.fresh("x")).s(b"").s(sha256(b"").to_base16().as_bytes()).u(0).u(0).u(8).u(2).u(0).s(b"").into())),
        fails("BuildDerivation enforceDeterminism 2", "enforceDeterminism at offset", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[], &[], [0, 0, 0, 0, 2, 0]))),
        fails("BuildDerivation keepFailed 2", "keepFailed at offset", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[], &[], [0, 0, 0, 0, 0, 2]))),
        fails("BuildPaths keepFailed 7", "keepFailed at offset", Box::new(|c| W::new().op(Opcode::BuildPaths).u(1).p(&c.mine).u(0).u(0).u(0).u(0).u(0).u(7).into())),
        fails("export trailer signature flag 2", "export signature flag at offset 80: boolean must be 0 or 1, got 2", Box::new(|c| import_trailer(&harness::file_nar(b"t"), nixe().p(&c.fresh("x")).u(0).s(b"").u(2)))),
        // Derivations with invalid outputs, and build inputs the account cannot see.
        build_fails("fixed-output hash that does not match", BuildStatus::OutputRejected, "hash mismatch in fixed-output derivation", Box::new(|c| c.build(c.fixed_output("fod-mismatch", b"what was promised\n", None, "echo what was built > $out")))),
        build_fails("fixed-output path that its hash does not give", BuildStatus::InputRejected, "is declared as", Box::new(|c| c.build(c.fixed_output("fod-path", b"x", Some(c.fresh("fod-path")), "echo x > $out")))),
        build_fails("fixed output not alone", BuildStatus::InputRejected, "must be the only output", Box::new(|c| { let mut drv = c.fixed_output("fod-two", b"x", None, "true"); drv.outputs.insert("dev".into(), DerivationOutput::InputAddressed(c.fresh("fod-two-dev"))); c.build(drv) })),
        build_fails("input the account cannot see", BuildStatus::MiscFailure, "is not valid on this server for this account", Box::new(|c| { let mut drv = c.derivation("uses-hidden", BTreeMap::from([("out".to_owned(), DerivationOutput::InputAddressed(c.fresh("uses-hidden")))]), "cat $0 > $out"); drv.input_srcs.insert(c.hidden.clone()); c.build(drv) })),
        build_fails("input nobody uploaded", BuildStatus::MiscFailure, "is not valid on this server for this account", Box::new(|c| { let mut drv = c.derivation("uses-missing", BTreeMap::from([("out".to_owned(), DerivationOutput::InputAddressed(c.fresh("uses-missing")))]), "true"); drv.input_srcs.insert(c.fresh("missing")); c.build(drv) })),
        fails("output name with a space", "invalid output name", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"a b", c.fresh("x").to_absolute().as_bytes(), b"", b"")], &[], [0; 6]))),
        fails("empty output name", "invalid output name", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"", c.fresh("x").to_absolute().as_bytes(), b"", b"")], &[], [0; 6]))),
        fails("output name with '!'", "invalid output name", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out!x", c.fresh("x").to_absolute().as_bytes(), b"", b"")], &[], [0; 6]))),
        fails("output hash that is not base16", "derivation output \"out\"", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out", c.fresh("x").to_absolute().as_bytes(), b"sha256", b"zz")], &[], [0; 6]))),
        fails("output hash algorithm unknown", "derivation output \"out\"", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out", c.fresh("x").to_absolute().as_bytes(), b"r:sha3", &[b'0'; 64])], &[], [0; 6]))),
        fails("output with a hash and no algorithm", "derivation output \"out\"", Box::new(|c| raw_build(c.fresh("x.drv").to_absolute().as_bytes(), &[(b"out", c.fresh("x").to_absolute().as_bytes(), b"", &[b'0'; 64])], &[], [0; 6]))),
        // References to paths the account cannot see.
        fails_ssh("AddToStoreNar referencing another account's path", "-hidden, which is not valid for account \"a\"", Box::new(|c| { let nar = harness::file_nar(b"refers"); let mut out = encode(&Request::AddToStoreNar(Box::new(add_header(&c.fresh("refers"), &nar, &[&c.hidden])))); out.extend_from_slice(&nar); out })),
        fails("AddToStoreNar referencing a path nobody has", "-nobody, which is not valid for account \"a\"", Box::new(|c| { let nar = harness::file_nar(b"refers"); let mut out = encode(&Request::AddToStoreNar(Box::new(add_header(&c.fresh("refers"), &nar, &[&c.fresh("nobody")])))); out.extend_from_slice(&nar); out })),
        fails("ImportPaths referencing another account's path", "-hidden, which is not valid for account \"a\"", Box::new(|c| import(&[(&c.fresh("refers"), &harness::file_nar(b"refers"), &[&c.hidden])]))),
        fails("DumpStorePath of another account's path", "-hidden is not valid for account \"a\"", Box::new(|c| encode(&Request::DumpStorePath { path: c.hidden.clone() }))),
        fails("ExportPaths of another account's path", "-hidden' is not valid", Box::new(|c| encode(&Request::ExportPaths { sign: 0, paths: BTreeSet::from([c.hidden.clone()]) }))),
        fails("QueryClosure of another account's path", "computing a closure: path /nix/store/", Box::new(|c| encode(&Request::QueryClosure { include_outputs: false, paths: BTreeSet::from([c.hidden.clone()]) }))),
        // NARs that must be refused (in AddToStoreNar: the rows of `bad_nars()` below; `..` is
        // in serve_bad_input.rs).
        fails("NAR entries out of order in ImportPaths", "not sorted", Box::new(|c| import(&[(&c.fresh("x"), &dir_nar(&[(b"b", FILE), (b"a", FILE)]), &[])]))),
        fails("NAR entry named '/' in ImportPaths", "invalid entry name", Box::new(|c| import(&[(&c.fresh("x"), &dir_nar(&[(b"/", FILE)]), &[])]))),
        fails("NAR nested 100,000 deep in AddToStoreNar", "nesting depth reaches the limit of 64", Box::new(|c| { let nar = nested_nar(100_000); let mut h = add_header(&c.fresh("x"), &nar, &[]); h.nar_size = MAX_NAR_SIZE; [encode(&Request::AddToStoreNar(Box::new(h))), nar[..MAX_NAR_SIZE as usize].to_vec()].concat() })),
        fails("NAR nested 100,000 deep in ImportPaths", "nesting depth reaches the limit of 64", Box::new(|c| import(&[(&c.fresh("x"), &nested_nar(100_000), &[])]))),
    ];
    // NARs that must be refused, in AddToStoreNar.
    for (what, nar, needle) in bad_nars() {
        c.push(fails(
            format!("NAR {what}"),
            needle,
            Box::new(move |c| add(&c.fresh("x"), &nar)),
        ));
    }
    // Invalid store paths, in every field that holds one.
    for (what, bad, needle) in bad_paths() {
        let b = bad.clone();
        c.push(fails(
            format!("DumpStorePath: {what}"),
            format!("path at offset 8: {needle}"),
            Box::new(move |_| W::new().op(Opcode::DumpStorePath).s(&b).into()),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("QueryValidPaths: {what}"),
            format!("paths at offset 32: {needle}"),
            Box::new(move |_| {
                W::new()
                    .op(Opcode::QueryValidPaths)
                    .u(0)
                    .u(0)
                    .u(1)
                    .s(&b)
                    .into()
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("QueryPathInfos: {what}"),
            needle,
            Box::new(move |c| {
                W::new()
                    .op(Opcode::QueryPathInfos)
                    .u(2)
                    .p(&c.mine)
                    .s(&b)
                    .into()
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("QueryClosure: {what}"),
            needle,
            Box::new(move |_| W::new().op(Opcode::QueryClosure).u(0).u(1).s(&b).into()),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("ExportPaths: {what}"),
            needle,
            Box::new(move |_| W::new().op(Opcode::ExportPaths).u(0).u(1).s(&b).into()),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("BuildPaths: {what}"),
            format!("BuildPaths entry at offset 16: {needle}"),
            Box::new(move |_| {
                W::new()
                    .op(Opcode::BuildPaths)
                    .u(1)
                    .s(&b)
                    .u(0)
                    .u(0)
                    .u(0)
                    .u(0)
                    .u(0)
                    .u(0)
                    .into()
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("AddToStoreNar path: {what}"),
            format!("path at offset 8: {needle}"),
            Box::new(move |_| {
                let nar = harness::file_nar(b"x");
                W::new()
                    .op(Opcode::AddToStoreNar)
                    .s(&b)
                    .s(b"")
                    .s(sha256(&nar).to_base16().as_bytes())
                    .u(0)
                    .u(0)
                    .u(nar.len() as u64)
                    .u(0)
                    .u(0)
                    .s(b"")
                    .raw(&nar)
                    .into()
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("AddToStoreNar deriver: {what}"),
            format!("deriver at offset 64: {needle}"),
            Box::new(move |c| {
                let nar = harness::file_nar(b"x");
                W::new()
                    .op(Opcode::AddToStoreNar)
                    .p(&c.fresh("x"))
                    .s(&b)
                    .s(sha256(&nar).to_base16().as_bytes())
                    .u(0)
                    .u(0)
                    .u(nar.len() as u64)
                    .u(0)
                    .u(0)
                    .s(b"")
                    .raw(&nar)
                    .into()
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("AddToStoreNar reference: {what}"),
            format!("references at offset 152: {needle}"),
            Box::new(move |c| {
                let nar = harness::file_nar(b"x");
                W::new()
                    .op(Opcode::AddToStoreNar)
                    .p(&c.fresh("x"))
                    .s(b"")
                    .s(sha256(&nar).to_base16().as_bytes())
                    .u(1)
                    .s(&b)
                    .u(0)
                    .u(nar.len() as u64)
                    .u(0)
                    .u(0)
                    .s(b"")
                    .raw(&nar)
                    .into()
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("BuildDerivation drvPath: {what}"),
            format!("drvPath at offset 8: {needle}"),
            Box::new(move |_| raw_build(&b, &[], &[], [0; 6])),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("BuildDerivation output path: {what}"),
            "derivation output \"out\"",
            Box::new(move |c| {
                raw_build(
                    c.fresh("x.drv").to_absolute().as_bytes(),
                    &[(b"out", &b, b"", b"")],
                    &[],
                    [0; 6],
                )
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("BuildDerivation inputSrcs: {what}"),
            format!("inputSrcs at offset 88: {needle}"),
            Box::new(move |c| {
                raw_build(
                    c.fresh("x.drv").to_absolute().as_bytes(),
                    &[],
                    &[&b],
                    [0; 6],
                )
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("export trailer path: {what}"),
            needle,
            Box::new(move |_| {
                import_trailer(&harness::file_nar(b"t"), nixe().s(&b).u(0).s(b"").u(0))
            }),
        ));
        let b = bad.clone();
        c.push(fails(
            format!("export trailer reference: {what}"),
            needle,
            Box::new(move |c| {
                import_trailer(
                    &harness::file_nar(b"t"),
                    nixe().p(&c.fresh("x")).u(1).s(&b).s(b"").u(0),
                )
            }),
        ));
        let b = bad;
        c.push(fails(
            format!("export trailer deriver: {what}"),
            needle,
            Box::new(move |c| {
                import_trailer(
                    &harness::file_nar(b"t"),
                    nixe().p(&c.fresh("x")).u(0).s(&b).u(0),
                )
            }),
        ));
    }
    c.extend(truncations());
    // More of the generated rows over SSH too.
    const ALSO_OVER_SSH: [&str; 6] = [
        "NAR entry with an empty name",
        "NAR nested 100 deep",
        "DumpStorePath: store-dir",
        "BuildDerivation cut mid-way",
        "ImportPaths cut in its NAR",
        "output name with a space",
    ];
    for case in &mut c {
        case.ssh |= ALSO_OVER_SSH.contains(&case.name.as_str());
    }
    c
}

/// Every opcode's request cut short: the client leaves after part of it.
fn truncations() -> Vec<Case> {
    let requests: Vec<(&str, Input)> = vec![
        (
            "QueryValidPaths",
            Box::new(|c| {
                encode(&Request::QueryValidPaths {
                    lock: false,
                    substitute: false,
                    paths: BTreeSet::from([c.mine.clone(), c.fresh("q")]),
                })
            }),
        ),
        (
            "QueryPathInfos",
            Box::new(|c| {
                encode(&Request::QueryPathInfos {
                    paths: BTreeSet::from([c.mine.clone(), c.fresh("q")]),
                })
            }),
        ),
        (
            "DumpStorePath",
            Box::new(|c| {
                encode(&Request::DumpStorePath {
                    path: c.mine.clone(),
                })
            }),
        ),
        (
            "ExportPaths",
            Box::new(|c| {
                encode(&Request::ExportPaths {
                    sign: 0,
                    paths: BTreeSet::from([c.mine.clone()]),
                })
            }),
        ),
        (
            "BuildPaths",
            Box::new(|c| {
                encode(&Request::BuildPaths {
                    paths: vec![PathWithOutputs {
                        path: c.fresh("x.drv"),
                        outputs: BTreeSet::from(["out".to_owned()]),
                    }],
                    options: BuildOptions::default(),
                })
            }),
        ),
        (
            "QueryClosure",
            Box::new(|c| {
                encode(&Request::QueryClosure {
                    include_outputs: true,
                    paths: BTreeSet::from([c.mine.clone()]),
                })
            }),
        ),
        (
            "BuildDerivation",
            Box::new(|c| {
                c.build(c.derivation(
                    "cut",
                    BTreeMap::from([(
                        "out".to_owned(),
                        DerivationOutput::InputAddressed(c.fresh("cut")),
                    )]),
                    "true",
                ))
            }),
        ),
        (
            "AddToStoreNar header",
            Box::new(|c| {
                encode(&Request::AddToStoreNar(Box::new(add_header(
                    &c.fresh("cut"),
                    &harness::file_nar(b"cut"),
                    &[&c.mine],
                ))))
            }),
        ),
    ];
    let mut out = Vec::new();
    for (op, full) in requests {
        let full = std::sync::Arc::new(full);
        // The error names the request: "in a QueryValidPaths request", "in an ExportPaths ...".
        let name = op.split(' ').next().unwrap_or(op);
        let article = if name.starts_with(['A', 'E', 'I']) {
            "an"
        } else {
            "a"
        };
        let request = format!("{article} {name}");
        // After the opcode, inside a u64 or a string, and one byte short.
        for (at, cut) in [
            ("after the opcode", Cut::At(8)),
            ("mid-way", Cut::Half),
            ("one byte short", Cut::Short(1)),
        ] {
            let full = full.clone();
            out.push(fails(
                format!("{op} cut {at}"),
                format!("unexpected end of input in {request} request"),
                Box::new(move |c| cut.apply(full(c))),
            ));
        }
    }
    let nar = harness::file_nar(&[3u8; 1000]);
    let n = nar.clone();
    out.push(fails_ssh(
        "AddToStoreNar cut in its NAR",
        "unexpected end of input in a NAR",
        Box::new(move |c| Cut::Short(100).apply(add(&c.fresh("cut"), &n))),
    ));
    out.push(fails(
        "ImportPaths cut after the opcode",
        "unexpected end of input in an export stream",
        Box::new(|_| encode(&Request::ImportPaths)),
    ));
    let n = nar.clone();
    out.push(fails(
        "ImportPaths cut in its NAR",
        "unexpected end of input in a NAR",
        Box::new(move |c| Cut::Short(500).apply(import(&[(&c.fresh("cut"), &n, &[])]))),
    ));
    let n = nar.clone();
    out.push(fails(
        "ImportPaths cut in a trailer",
        "unexpected end of input in an export stream",
        Box::new(move |c| Cut::Short(20).apply(import(&[(&c.fresh("cut"), &n, &[])]))),
    ));
    // (A complete entry is imported, as upstream does: `a` has this one already.)
    out.push(fails(
        "ImportPaths without its end marker",
        "unexpected end of input in an export stream",
        Box::new(|c| Cut::Short(8).apply(import(&[(&c.mine, &harness::file_nar(b"mine"), &[])]))),
    ));
    out
}

// ---------------------------------------------------------------------------------------
// Running the cases.

/// The client's hello.
fn hello() -> Vec<u8> {
    Script::new().bytes
}

/// Runs `case` with `run` (which plays the hostile session and checks its end) while the
/// bystander does its operation, then checks that the store is unchanged.
fn run_case(
    daemon: &Daemon,
    ctx: &Ctx,
    bystander: &mut dyn Bystander,
    case: &Case,
    run: impl FnOnce(&[u8]),
) {
    let mut input = if case.hello { hello() } else { Vec::new() };
    input.extend_from_slice(&(case.input)(ctx));
    let (request, answer) = ctx.bystander_exchange();
    guarded(daemon, bystander, (&request, &answer), &case.name, || {
        run(&input)
    });
}

/// Runs every case through the relay as account `a`.
fn run_relay(daemon: &Daemon, ctx: &Ctx, cases: &[Case]) {
    let mut bystander = daemon.open("good", false);
    bystander.send(&hello());
    assert_eq!(bystander.read(16), expected_server_hello());
    for case in cases {
        run_case(daemon, ctx, &mut bystander, case, |input| {
            match &case.expect {
                Expect::Error(needle) => {
                    let reply = daemon.relay("a", true, input);
                    check_error(&case.name, reply.status, &reply.stderr, needle);
                }
                Expect::Build(status, needle) => {
                    let ops = [Opcode::BuildDerivation];
                    let reply = daemon.relay_waiting("a", input, &ops);
                    assert_eq!(reply.status, 0, "{}: {reply:?}", case.name);
                    let [Response::Build(result)] = &reply.responses(&ops)[..] else {
                        panic!("{}: not a BuildResult: {reply:?}", case.name);
                    };
                    let msg = String::from_utf8_lossy(&result.error_msg);
                    assert_eq!(result.status, *status, "{}: {msg}", case.name);
                    assert!(
                        msg.contains(needle),
                        "{}: {msg:?} lacks {needle:?}",
                        case.name
                    );
                }
            }
        });
    }
    let end = bystander.finish();
    assert_eq!(end.status, 0, "the bystander's session: {end:?}");
}

fn expected_server_hello() -> Vec<u8> {
    let mut out = Vec::new();
    nixbuild_core::serve::ServerHello {
        version: nixbuild_core::serve::ProtocolVersion::SERVER,
    }
    .encode(&mut out);
    out
}

#[test]
fn hostile_sessions_over_the_relay() {
    let daemon = Daemon::start_with_config(CONFIG, &[]);
    let ctx = Ctx::setup(|account, path, nar| upload(&daemon, account, path, nar));
    let cases = cases();
    run_relay(&daemon, &ctx, &cases);
    // Every error case was logged by the daemon as a failed session.
    let errors = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Error(_)))
        .count();
    assert_failures_logged(&daemon, errors);
    check_daemon(daemon);
}

#[test]
fn hostile_sessions_over_ssh() {
    const ALIAS: &str = "abuse";
    let client = tempfile::tempdir().expect("temp dir");
    let key_a = SshServer::key(client.path(), "id_a", "ed25519", "a");
    let key_good = SshServer::key(client.path(), "id_good", "ed25519", "good");
    let server = SshServer::start(CONFIG, client, &[&key_a, &key_good]);
    let ctx = Ctx::setup(|account, path, nar| upload(&server.daemon, account, path, nar));
    let config_a = server.ssh_config(ALIAS, &key_a);
    let config_good = server.ssh_config("abuse-good", &key_good);
    let mut bystander = SshSession::open(&config_good, "abuse-good");
    let cases: Vec<Case> = cases().into_iter().filter(|c| c.ssh).collect();
    assert_eq!(cases.len(), 12, "cases over SSH");
    for case in &cases {
        let Expect::Error(needle) = &case.expect else {
            panic!("{}: only error cases run over SSH", case.name);
        };
        run_case(&server.daemon, &ctx, &mut bystander, case, |input| {
            let session = SshSession::open(&config_a, ALIAS);
            let mut session = session;
            // The hello went at open; send the rest, then leave as the client would.
            session.exchange(&input[16..], 0);
            let (status, stderr) = session.close();
            check_error(&case.name, status, &stderr, needle);
        });
    }
    let (status, stderr) = bystander.close();
    assert_eq!(status, 0, "the bystander's SSH session: {stderr}");
    check_daemon(server.daemon);
}

/// Legitimate content that looks hostile: symlink loops, symlinks out of the store and up
/// the tree, a directory of many entries. Stored verbatim, served back byte for byte, and
/// never followed by the server (the object holds the links themselves).
#[test]
fn hostile_looking_content_is_stored_verbatim() {
    let daemon = Daemon::start_with_config(CONFIG, &[]);
    let s = harness::salt();
    let link = |t: &[u8]| NarNode::Symlink { target: t.to_vec() };
    let loops = NarNode::Directory(BTreeMap::from([
        (b"a".to_vec(), link(b"b")),
        (b"abs".to_vec(), link(b"/etc/shadow")),
        (b"b".to_vec(), link(b"a")),
        (b"self".to_vec(), link(b"self")),
        (b"up".to_vec(), link(b"../../../../../../etc")),
        (b"dot".to_vec(), link(b".")),
        (
            b"sub".to_vec(),
            NarNode::Directory(BTreeMap::from([(b"back".to_vec(), link(b".."))])),
        ),
    ]))
    .to_nar()
    .expect("nar");
    let root_link = link(b"/proc/self/root").to_nar().expect("nar");
    let wide = wide_nar(10_000);
    let paths = [
        (test_path(&format!("{s}-loops"), "loops"), loops),
        (test_path(&format!("{s}-root-link"), "root-link"), root_link),
        (test_path(&format!("{s}-wide"), "wide"), wide),
    ];
    for (path, nar) in &paths {
        upload(&daemon, "a", path, nar);
        let script = Script::new().request(&Request::DumpStorePath { path: path.clone() });
        let reply = daemon.relay("a", false, &script.bytes);
        assert_eq!(reply.status, 0, "{reply:?}");
        assert!(
            reply.stdout[16..] == nar[..],
            "{path}: a different NAR came back"
        );
    }
    // On disk the links are links, with the targets as sent.
    let state = daemon.state_dir();
    let stopped = daemon.stop();
    for (path, _) in &paths {
        assert!(stopped.valid("a", path));
    }
    let objects = std::fs::read_dir(state.join("objects")).expect("objects/");
    let mut found = BTreeSet::new();
    for object in objects {
        let dir = object.expect("entry").path();
        if let Ok(t) = std::fs::read_link(dir.join("a")) {
            assert_eq!(t, Path::new("b"));
            assert_eq!(
                std::fs::read_link(dir.join("self")).expect("self"),
                Path::new("self")
            );
            assert_eq!(
                std::fs::read_link(dir.join("abs")).expect("abs"),
                Path::new("/etc/shadow")
            );
            assert_eq!(
                std::fs::read_link(dir.join("sub/back")).expect("back"),
                Path::new("..")
            );
            found.insert("loops");
        }
        if std::fs::read_link(&dir).is_ok_and(|t| t == Path::new("/proc/self/root")) {
            found.insert("root-link");
        }
    }
    assert_eq!(found, BTreeSet::from(["loops", "root-link"]));
}
