//! `nixbuild-serve`: a drop-in for `nix-store` and `nix-daemon` as a remote program, relaying
//! one `nix-store --serve` session (`ssh://`) or one `nix-daemon --stdio` session
//! (`ssh-ng://`) to the nixbuild daemon (docs/design.md, Processes).
//!
//! ```text
//! nixbuild-serve --serve [--write] [--state-dir DIR] [--account NAME] [nix-store options, ignored]
//! nixbuild-serve --stdio [--state-dir DIR] [--account NAME] [nix-daemon options, ignored]
//! ```
//!
//! The state directory comes from `--state-dir` or `NIXBUILD_STATE_DIR` (default
//! `/var/lib/nixbuild`), the account from `--account` or `NIXBUILD_ACCOUNT` (default
//! `default`). As an OpenSSH forced command (`command="nixbuild-serve --account alice"`),
//! `--serve` and `--write` are taken from the client's command in `SSH_ORIGINAL_COMMAND`,
//! and so is `nixbuild <subcommand>` (the operations interface, docs/operations.md); the
//! account and state directory never are.
//!
//! It hands its stdin and stdout to the daemon over the socket (SCM_RIGHTS), so the daemon
//! reads and writes the client's pipes itself and the relay stays out of the data path; it
//! writes the daemon's messages to stderr and exits with the daemon's status. When stdin or
//! stdout is neither a pipe nor a socket (a file, a terminal), the relay puts a pipe in
//! between and copies.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

use nixbuild::core::serve::{Protocol, ServeArgs};
use nixbuild::relay_protocol::{
    self, parse_frame_header, RelayHeader, FRAME_EXIT, FRAME_HEADER_LEN, FRAME_STDERR, RELAY_FDS,
};
use nixbuild_ssh::exec::MAX_COMMAND;
use rustix::fs::FileType;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Size of the copy buffers (frames, and the copies through an interposed pipe).
const BUF: usize = 256 * 1024;
/// Default state directory, as in the README.
const DEFAULT_STATE_DIR: &str = "/var/lib/nixbuild";
fn main() {
    match run() {
        Ok(status) => std::process::exit(i32::try_from(status).unwrap_or(1)),
        Err(msg) => {
            eprintln!("nixbuild-serve: {msg}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<u32, String> {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(OsString::into_string)
        .collect::<Result<_, _>>()
        .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
    let mut state_dir = std::env::var_os("NIXBUILD_STATE_DIR").map(PathBuf::from);
    let mut account = std::env::var("NIXBUILD_ACCOUNT").ok();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--state-dir" => state_dir = Some(it.next().ok_or("--state-dir needs a value")?.into()),
            "--account" => account = Some(it.next().ok_or("--account needs a value")?.clone()),
            "--help" | "-h" => {
                println!(
                    "usage: nixbuild-serve --serve [--write] [--state-dir DIR] [--account NAME] \
                     [nix-store options, ignored]\n       nixbuild-serve --stdio [--state-dir DIR] \
                     [--account NAME] [nix-daemon options, ignored]"
                );
                return Ok(0);
            }
            _ => rest.push(a.as_str()),
        }
    }
    let mut mode = ServeArgs::scan(rest);
    let mut command = None;
    if !mode.serve && !mode.stdio {
        // A forced command: the client's own command line says what it wants, a session of
        // one of Nix's protocols or `nixbuild <subcommand>`.
        if let Ok(original) = std::env::var("SSH_ORIGINAL_COMMAND") {
            if original.split_whitespace().next() == Some("nixbuild") {
                if original.len() > MAX_COMMAND {
                    return Err(format!("the command is longer than {MAX_COMMAND} bytes"));
                }
                command = Some(original);
            } else {
                mode = ServeArgs::scan(original.split_whitespace().skip(1));
            }
        }
    }
    let protocol = match (mode.serve, mode.stdio) {
        (true, _) => Protocol::Serve,
        (false, true) => Protocol::Daemon,
        (false, false) if command.is_some() => Protocol::Serve,
        (false, false) => {
            return Err(
                "pass --serve (as 'nix-store --serve', for ssh:// stores) or --stdio \
                        (as 'nix-daemon --stdio', for ssh-ng:// stores)"
                    .into(),
            )
        }
    };
    let header = RelayHeader {
        account: account.unwrap_or_else(|| "default".to_owned()),
        // A daemon-protocol session may always write, as `nix-daemon --stdio` does.
        write: mode.write || protocol == Protocol::Daemon,
        protocol,
        command,
    };
    relay_protocol::check_account_name(&header.account).map_err(|e| e.to_string())?;
    let sock = relay_protocol::socket_path(&state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
    let stream = UnixStream::connect(&sock).map_err(|e| {
        format!(
            "cannot connect to the nixbuild daemon at {}: {e}; is nixbuild-server running?",
            sock.display()
        )
    })?;
    let stdin = io::stdin();
    let stdout = io::stdout();
    let input = Handover::input(stdin.as_fd()).map_err(|e| format!("stdin: {e}"))?;
    let output = Handover::output(stdout.as_fd()).map_err(|e| format!("stdout: {e}"))?;
    let sent = send_header(&stream, &header, [input.fd(), output.fd()]);
    // The daemon holds the descriptors now (or has refused): without our copy of an
    // interposed pipe's write end, its copier sees EOF when the daemon closes its own.
    let output_copier = output.into_copier();
    drop(input);
    if let Err(e) = sent {
        // The daemon may have refused the connection before reading the header: its
        // frames say why.
        return demultiplex(stream).map_err(|_| format!("sending to the daemon: {e}"));
    }
    let status = demultiplex(stream).map_err(|e| format!("relaying the daemon's answer: {e}"))?;
    if let Some(copier) = output_copier {
        copier
            .join()
            .map_err(|_| "the stdout copier panicked".to_owned())?
            .map_err(|e| format!("copying to stdout: {e}"))?;
    }
    Ok(status)
}

/// Sends the header line with the client's stdin and stdout attached.
fn send_header(
    stream: &UnixStream,
    header: &RelayHeader,
    fds: [BorrowedFd<'_>; RELAY_FDS],
) -> io::Result<()> {
    let line = header.encode();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(RELAY_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the descriptors"));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[io::IoSlice::new(line.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )?;
    // The descriptors went with the first byte; the rest of a short write follows plainly.
    (&*stream).write_all(&line.as_bytes()[sent..])
}

/// One standard stream as handed to the daemon: the stream itself when it is a pipe or a
/// socket, otherwise our end of a pipe whose other end a thread copies from or to it.
enum Handover<'a> {
    Direct(BorrowedFd<'a>),
    Interposed {
        end: OwnedFd,
        copier: JoinHandle<io::Result<()>>,
    },
}

impl<'a> Handover<'a> {
    fn direct(fd: BorrowedFd<'a>) -> io::Result<bool> {
        let ty = FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode);
        Ok(matches!(ty, FileType::Fifo | FileType::Socket))
    }

    /// Stdin: the daemon gets the read end of a pipe that a thread fills from `fd`.
    fn input(fd: BorrowedFd<'a>) -> io::Result<Handover<'a>> {
        if Self::direct(fd)? {
            return Ok(Handover::Direct(fd));
        }
        let (read, write) = rustix::pipe::pipe()?;
        let mut from = File::from(fd.try_clone_to_owned()?);
        let mut to = File::from(write);
        let copier = std::thread::spawn(move || io::copy(&mut from, &mut to).map(drop));
        Ok(Handover::Interposed { end: read, copier })
    }

    /// Stdout: the daemon gets the write end of a pipe that a thread drains into `fd`.
    fn output(fd: BorrowedFd<'a>) -> io::Result<Handover<'a>> {
        if Self::direct(fd)? {
            return Ok(Handover::Direct(fd));
        }
        let (read, write) = rustix::pipe::pipe()?;
        let mut from = File::from(read);
        let mut to = File::from(fd.try_clone_to_owned()?);
        let copier = std::thread::spawn(move || io::copy(&mut from, &mut to).map(drop));
        Ok(Handover::Interposed { end: write, copier })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Handover::Direct(fd) => *fd,
            Handover::Interposed { end, .. } => end.as_fd(),
        }
    }

    /// Drops our end of the pipe, if any, and returns the copier to wait for.
    fn into_copier(self) -> Option<JoinHandle<io::Result<()>>> {
        match self {
            Handover::Direct(_) => None,
            Handover::Interposed { copier, .. } => Some(copier),
        }
    }
}

/// Writes the daemon's frames to stdout and stderr and returns the exit status.
fn demultiplex(stream: UnixStream) -> io::Result<u32> {
    let mut stderr = raw(&io::stderr())?;
    let mut frames = BufReader::with_capacity(BUF, stream);
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        if let Err(e) = frames.read_exact(&mut header) {
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    io::Error::other("the daemon closed the connection without an exit status")
                }
                _ => e,
            });
        }
        let (tag, len) = parse_frame_header(header);
        match tag {
            FRAME_STDERR => copy_exact(&mut frames, &mut stderr, len)?,
            FRAME_EXIT if len == 4 => {
                let mut status = [0u8; 4];
                frames.read_exact(&mut status)?;
                return Ok(u32::from_le_bytes(status));
            }
            tag => {
                return Err(io::Error::other(format!(
                    "unexpected frame (tag {tag}, length {len}) from the daemon"
                )))
            }
        }
    }
}

/// Moves `len` bytes from the frame reader's buffer to `out` without another copy.
fn copy_exact(frames: &mut BufReader<UnixStream>, out: &mut File, len: u32) -> io::Result<()> {
    let mut left = len as usize;
    while left > 0 {
        let chunk = frames.fill_buf()?;
        if chunk.is_empty() {
            return Err(io::Error::other(
                "the daemon closed the connection mid-frame",
            ));
        }
        let n = chunk.len().min(left);
        out.write_all(&chunk[..n])?;
        frames.consume(n);
        left -= n;
    }
    Ok(())
}

/// An unbuffered handle on a standard stream (std's own buffer stdout by lines).
fn raw(stream: &impl AsFd) -> io::Result<File> {
    Ok(File::from(stream.as_fd().try_clone_to_owned()?))
}
