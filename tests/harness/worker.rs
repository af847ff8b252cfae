//! A scripted worker-protocol (`nix-daemon --stdio`, ssh-ng) client: the bytes of a session
//! and the requests whose answers it expects ([`Script`]), run through the relay
//! (`nixbuild-serve --stdio`) or the SSH front door, and what came back decoded from the log
//! channel ([`Transcript`]); and a session kept open ([`WorkerSession`]), for bystanders.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use nixbuild_core::hash::Hash;
use nixbuild_core::serve::AddToStoreNar;
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire::{self, Reader};
use nixbuild_core::worker::{
    ClientHello, Limits, LogField, Opcode, Request, Response, ServerHello, StderrMessage,
    WorkerVersion,
};

use super::ssh::SshServer;
use super::{example_bin, Daemon};

/// The version most scripted clients speak (Nix 2.8).
pub const V: WorkerVersion = WorkerVersion::V1_34;

/// A scripted client session: its bytes and the requests whose answers it expects.
#[derive(Clone)]
pub struct Script {
    pub version: WorkerVersion,
    pub bytes: Vec<u8>,
    pub ops: Vec<Opcode>,
}

impl Script {
    /// The client's hello at `version`, with no features.
    pub fn new(version: WorkerVersion) -> Script {
        Script {
            version,
            bytes: hello(version),
            ops: Vec::new(),
        }
    }

    /// A session of exactly `bytes` (a handshake of its own), decoded as `version`'s.
    pub fn bare(version: WorkerVersion, bytes: Vec<u8>) -> Script {
        Script {
            version,
            bytes,
            ops: Vec::new(),
        }
    }

    pub fn request(mut self, req: &Request) -> Script {
        req.encode(self.version, &mut self.bytes);
        self.ops.push(req.opcode());
        self
    }

    pub fn raw(mut self, bytes: &[u8]) -> Script {
        self.bytes.extend_from_slice(bytes);
        self
    }

    /// Raw bytes of a request `op` whose answer the script expects.
    pub fn raw_request(mut self, op: Opcode, bytes: &[u8]) -> Script {
        self.ops.push(op);
        self.raw(bytes)
    }

    /// `data` as one frame, then the end of the stream.
    pub fn framed(self, data: &[u8]) -> Script {
        self.raw(&framed(data))
    }

    /// AddToStoreNar of `nar` for `path` claiming `hash`, the NAR framed.
    pub fn add(self, path: &StorePath, nar: &[u8], hash: Hash) -> Script {
        self.add_info(info(path, nar, hash), nar)
    }

    /// AddToStoreNar with the header `info`, `nar` framed.
    pub fn add_info(self, info: AddToStoreNar, nar: &[u8]) -> Script {
        self.request(&Request::AddToStoreNar {
            info: Box::new(info),
            repair: false,
            dont_check_sigs: false,
        })
        .framed(nar)
    }

    /// AddMultipleToStore of the de-framed `stream` (see [`multiple`]), framed.
    pub fn add_multiple(self, stream: &[u8]) -> Script {
        self.request(&Request::AddMultipleToStore {
            repair: false,
            dont_check_sigs: true,
        })
        .framed(stream)
    }
}

/// The client's hello at `version`, with no features.
pub fn hello(version: WorkerVersion) -> Vec<u8> {
    let mut bytes = Vec::new();
    ClientHello {
        version,
        features: BTreeSet::new(),
        affinity: None,
        reserve_space: false,
    }
    .encode(WorkerVersion::SERVER, &mut bytes);
    bytes
}

/// `data` as one frame, then the end of the stream (an empty `data` is the end alone).
pub fn framed(data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    if !data.is_empty() {
        b.extend_from_slice(&(data.len() as u64).to_le_bytes());
        b.extend_from_slice(data);
    }
    b.extend_from_slice(&0u64.to_le_bytes());
    b
}

/// An honest header for `nar` of `path`, but for the claimed `hash`.
pub fn info(path: &StorePath, nar: &[u8], hash: Hash) -> AddToStoreNar {
    AddToStoreNar {
        path: path.clone(),
        deriver: None,
        nar_hash: hash,
        references: BTreeSet::new(),
        registration_time: 0,
        nar_size: nar.len() as u64,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: None,
    }
}

/// An AddMultipleToStore stream (de-framed) of `paths` (path, NAR, claimed hash).
pub fn multiple(paths: &[(&StorePath, &[u8], Hash)]) -> Vec<u8> {
    let infos: Vec<(AddToStoreNar, &[u8])> = paths
        .iter()
        .map(|(path, nar, hash)| (info(path, nar, *hash), *nar))
        .collect();
    multiple_infos(&infos)
}

/// An AddMultipleToStore stream (de-framed) of `(metadata, NAR)` pairs.
pub fn multiple_infos(paths: &[(AddToStoreNar, &[u8])]) -> Vec<u8> {
    let mut inner = (paths.len() as u64).to_le_bytes().to_vec();
    for (info, nar) in paths {
        info.encode(&mut inner);
        inner.extend_from_slice(nar);
    }
    inner
}

/// What the server answered to one request.
#[derive(Debug)]
pub enum Answer {
    Ok(Option<Response>),
    Error(String),
}

impl Answer {
    /// Whether `answers` are those of an upload (AddToStoreNar) and an IsValidPath of the
    /// uploaded path: acknowledged, then valid.
    pub fn added_then_valid(answers: &[Answer]) -> bool {
        matches!(
            answers,
            [
                Answer::Ok(Some(Response::Nothing)),
                Answer::Ok(Some(Response::Int(1)))
            ]
        )
    }
}

/// What a session gave back, decoded.
#[derive(Debug)]
pub struct Transcript {
    pub status: i32,
    pub answers: Vec<Answer>,
    /// Log lines (STDERR_NEXT) and build log lines.
    pub log: Vec<String>,
    /// An error after the last answer (the one that ended the session), if any.
    pub fatal: Option<String>,
    pub stderr: String,
}

/// Runs `script` through the relay as `account`.
pub fn run(daemon: &Daemon, account: &str, script: &Script) -> Transcript {
    run_cmd(relay_command(daemon, account), script)
}

/// Runs `script` through the relay as `account`, keeping the client's side open until every
/// request of the script is answered (or the session ends): a client that waits for its
/// answers, as Nix does (the end of its input means it is gone, which cancels a build).
pub fn run_waiting(daemon: &Daemon, account: &str, script: &Script) -> Transcript {
    run_cmd_waiting(relay_command(daemon, account), script)
}

/// Like [`run_waiting`], with `cmd` (the relay or ssh).
pub fn run_cmd_waiting(cmd: Command, script: &Script) -> Transcript {
    let mut child = spawn(cmd);
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let _ = stdin.write_all(&script.bytes);
    let mut received = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let t = decode(script, 0, &received, Vec::new());
        if t.answers.len() >= script.ops.len() {
            break;
        }
        match stdout.read(&mut buf).expect("read the session's stdout") {
            0 => break,
            n => received.extend_from_slice(&buf[..n]),
        }
    }
    drop(stdin);
    stdout.read_to_end(&mut received).expect("read the rest");
    let out = child.wait_with_output().expect("wait for the session");
    decode(
        script,
        out.status.code().unwrap_or(-1),
        &received,
        out.stderr,
    )
}

/// Runs `script` through the SSH front door with the real OpenSSH client (`ssh-ng://`'s
/// command, `nix-daemon --stdio`) as the account of `config`'s key.
pub fn run_ssh(config: &Path, alias: &str, script: &Script) -> Transcript {
    run_cmd(ssh_command(config, alias), script)
}

/// The relay as `account` (`nixbuild-serve --stdio`).
pub fn relay_command(daemon: &Daemon, account: &str) -> Command {
    let mut cmd = Command::new(example_bin("nixbuild-serve"));
    cmd.arg("--stdio")
        .env("NIXBUILD_STATE_DIR", daemon.state_dir())
        .env("NIXBUILD_ACCOUNT", account);
    cmd
}

/// `ssh -F config alias nix-daemon --stdio`.
pub fn ssh_command(config: &Path, alias: &str) -> Command {
    SshServer::ssh(config, alias, &["nix-daemon", "--stdio"])
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the session's command")
}

/// Runs `cmd` with `script` on its stdin, then closed.
pub fn run_cmd(cmd: Command, script: &Script) -> Transcript {
    let mut child = spawn(cmd);
    let mut stdin = child.stdin.take().expect("stdin");
    let input = script.bytes.clone();
    // The server may end the session before reading everything: ignore a broken pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for the session");
    writer.join().expect("stdin writer");
    decode(
        script,
        out.status.code().unwrap_or(-1),
        &out.stdout,
        out.stderr,
    )
}

/// Runs `cmd` with `script` on its stdin, which stays open until the server ends the
/// session of its own accord: for sessions the server must end without waiting for the
/// client to leave. A session still open after `limit` is killed, and the test fails.
pub fn run_cmd_held(cmd: Command, script: &Script, limit: std::time::Duration) -> Transcript {
    let mut child = spawn(cmd);
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let input = script.bytes.clone();
    // The server may end the session before reading everything: ignore a broken pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        stdin
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = tx.send(());
        out
    });
    let ended = rx.recv_timeout(limit).is_ok();
    if !ended {
        let _ = child.kill();
    }
    let stdin = writer.join().expect("stdin writer");
    let received = reader.join().expect("stdout reader");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for the session");
    assert!(
        ended,
        "the session did not end within {limit:?} of its bad input; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    decode(
        script,
        out.status.code().unwrap_or(-1),
        &received,
        out.stderr,
    )
}

/// Decodes what the server sent in answer to `script`, as far as it is complete.
pub fn decode(script: &Script, status: i32, stdout: &[u8], stderr: Vec<u8>) -> Transcript {
    let limits = Limits::default().wire;
    let mut t = Transcript {
        status,
        answers: Vec::new(),
        log: Vec::new(),
        fatal: None,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    let mut r = Reader::new(stdout);
    let v = WorkerVersion::negotiate(script.version, WorkerVersion::SERVER);
    match wire::complete(ServerHello::read(&mut r, script.version, &limits)) {
        Ok(Some(_)) => {}
        Ok(None) if status == 0 => return t,
        _ => {
            // Refused in the handshake: an error message may follow the magic and version.
            t.fatal = Some(String::from_utf8_lossy(stdout).into_owned());
            return t;
        }
    }
    let mut ops = script.ops.iter();
    let mut op = ops.next();
    while r.remaining() > 0 {
        let Ok(Some(msg)) = wire::complete(StderrMessage::read(&mut r, v, &limits)) else {
            break;
        };
        match msg {
            StderrMessage::Next(line) => t.log.push(String::from_utf8_lossy(&line).into()),
            StderrMessage::Result { fields, .. } => {
                for f in fields {
                    if let LogField::String(s) = f {
                        t.log.push(String::from_utf8_lossy(&s).into());
                    }
                }
            }
            StderrMessage::Error(e) => {
                let msg = String::from_utf8_lossy(&e.msg).into_owned();
                match op {
                    Some(_) if r.remaining() > 0 || status == 0 => {
                        t.answers.push(Answer::Error(msg));
                        op = ops.next();
                    }
                    _ => t.fatal = Some(msg),
                }
            }
            StderrMessage::Last => {
                let Some(&o) = op else {
                    panic!("an answer to a request the script did not expect: {t:?}");
                };
                let Ok(Some(answer)) = wire::complete(Response::read(&mut r, o, v, &limits)) else {
                    break;
                };
                if answer.is_none() {
                    let mut nar = nixbuild_core::nar::NarValidator::new();
                    let n = nar.feed(&stdout[r.position()..]).expect("a valid NAR");
                    r.take(n).expect("the NAR");
                }
                t.answers.push(Answer::Ok(answer));
                op = ops.next();
            }
            _ => {}
        }
    }
    t
}

impl Transcript {
    /// Asserts the session ended with an error containing `needle`, on the log channel and
    /// on stderr.
    pub fn assert_fatal(&self, needle: &str) {
        assert_ne!(self.status, 0, "{self:?}");
        let fatal = self.fatal.as_deref().unwrap_or("");
        assert!(
            fatal.contains(needle) && self.stderr.contains(needle),
            "expected an error with {needle:?} on the log channel and stderr: {self:?}"
        );
    }
}

/// A worker session driven step by step: the hellos are exchanged at open.
pub struct WorkerSession {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

impl WorkerSession {
    /// Starts `cmd` (the relay or ssh) and exchanges hellos at version [`V`].
    pub fn open(cmd: Command) -> WorkerSession {
        let mut child = spawn(cmd);
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        stdin.write_all(&hello(V)).expect("send the hello");
        let limits = Limits::default().wire;
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            let mut r = Reader::new(&got);
            let hello = wire::complete(ServerHello::read(&mut r, V, &limits));
            if hello.expect("a server hello").is_some() {
                assert_eq!(r.remaining(), 0);
                break;
            }
            stdout
                .read_exact(&mut byte)
                .expect("read the server's hello");
            got.push(byte[0]);
        }
        WorkerSession {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    /// Sends `bytes` and reads exactly `len` bytes back.
    pub fn exchange(&mut self, bytes: &[u8], len: usize) -> Vec<u8> {
        let stdin = self.stdin.as_mut().expect("open");
        stdin.write_all(bytes).expect("send to the session");
        stdin.flush().expect("flush");
        let mut answer = vec![0u8; len];
        self.stdout
            .read_exact(&mut answer)
            .expect("read the session's answer");
        answer
    }

    /// Closes stdin (the client is done) and returns the exit status and stderr.
    pub fn close(mut self) -> (i32, String) {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let _ = self.stdout.read_to_end(&mut rest);
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = self.child.wait().expect("wait for the session");
        (status.code().unwrap_or(-1), stderr)
    }
}

impl Drop for WorkerSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl super::hostile::Bystander for WorkerSession {
    fn exchange(&mut self, request: &[u8], len: usize) -> Vec<u8> {
        WorkerSession::exchange(self, request, len)
    }
}
