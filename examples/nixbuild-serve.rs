//! `nixbuild-serve`: a drop-in for `nix-store` as a remote program, relaying one
//! `nix-store --serve` session to the nixbuild daemon (DESIGN.md, Processes).
//!
//! ```text
//! nixbuild-serve --serve [--write] [--state-dir DIR] [--account NAME] [nix-store options, ignored]
//! ```
//!
//! The state directory comes from `--state-dir` or `NIXBUILD_STATE_DIR` (default
//! `/var/lib/nixbuild`), the account from `--account` or `NIXBUILD_ACCOUNT` (default
//! `default`). As an OpenSSH forced command (`command="nixbuild-serve --account alice"`),
//! `--serve` and `--write` are taken from the client's command in `SSH_ORIGINAL_COMMAND`;
//! the account and state directory never are.
//!
//! It copies stdin to the daemon's socket and the daemon's frames to stdout and stderr, and
//! exits with the daemon's status. It sits in the data path of every transfer, so it copies
//! through two fixed buffers and does nothing else.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nixbuild::daemon::{self, RelayHeader, FRAME_EXIT, FRAME_STDERR, FRAME_STDOUT};

/// Size of the copy buffers.
const BUF: usize = 256 * 1024;
/// Default state directory, as in the README.
const DEFAULT_STATE_DIR: &str = "/var/lib/nixbuild";
/// nix-store options that take a value (`--option` takes two), skipped with it.
const VALUE_OPTIONS: &[&str] = &[
    "--store",
    "--builders",
    "--max-jobs",
    "-j",
    "--cores",
    "--log-format",
    "--max-silent-time",
    "--timeout",
    "--eval-store",
    "--include",
];

struct Mode {
    serve: bool,
    write: bool,
}

impl Mode {
    /// Scans nix-store arguments for `--serve` and `--write`, skipping option values.
    fn scan<'a>(args: impl IntoIterator<Item = &'a str>) -> Mode {
        let mut mode = Mode {
            serve: false,
            write: false,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a {
                "--serve" => mode.serve = true,
                "--write" => mode.write = true,
                "--option" => {
                    args.next();
                    args.next();
                }
                _ if VALUE_OPTIONS.contains(&a) => {
                    args.next();
                }
                _ => {}
            }
        }
        mode
    }
}

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
                     [nix-store options, ignored]"
                );
                return Ok(0);
            }
            _ => rest.push(a.as_str()),
        }
    }
    let mut mode = Mode::scan(rest);
    if !mode.serve {
        // A forced command: the client's own command line says what it wants.
        if let Ok(original) = std::env::var("SSH_ORIGINAL_COMMAND") {
            mode = Mode::scan(original.split_whitespace().skip(1));
        }
    }
    if !mode.serve {
        return Err("only 'nix-store --serve' sessions are supported: pass --serve".into());
    }
    let header = RelayHeader {
        account: account.unwrap_or_else(|| "default".to_owned()),
        write: mode.write,
    };
    daemon::check_account_name(&header.account).map_err(|e| e.to_string())?;
    let sock = daemon::socket_path(&state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
    let mut stream = UnixStream::connect(&sock).map_err(|e| {
        format!(
            "cannot connect to the nixbuild daemon at {}: {e}; is nixbuild-server running?",
            sock.display()
        )
    })?;
    stream
        .write_all(header.encode().as_bytes())
        .map_err(|e| format!("sending to the daemon: {e}"))?;
    let upstream = stream
        .try_clone()
        .map_err(|e| format!("duplicating the socket: {e}"))?;
    std::thread::spawn(move || copy_stdin(upstream));
    demultiplex(stream).map_err(|e| format!("relaying the daemon's answer: {e}"))
}

/// Copies stdin to the daemon until EOF, then shuts down the write half. A write error
/// means the daemon ended the session; its frames say why.
fn copy_stdin(mut upstream: UnixStream) {
    let Ok(mut stdin) = raw(&io::stdin()) else {
        return;
    };
    let mut buf = vec![0u8; BUF];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if upstream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = upstream.shutdown(Shutdown::Write);
}

/// Writes the daemon's frames to stdout and stderr and returns the exit status.
fn demultiplex(stream: UnixStream) -> io::Result<u32> {
    let mut stdout = raw(&io::stdout())?;
    let mut stderr = raw(&io::stderr())?;
    let mut frames = BufReader::with_capacity(BUF, stream);
    loop {
        let mut header = [0u8; 5];
        if let Err(e) = frames.read_exact(&mut header) {
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    io::Error::other("the daemon closed the connection without an exit status")
                }
                _ => e,
            });
        }
        let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
        match header[0] {
            FRAME_STDOUT => copy_exact(&mut frames, &mut stdout, len)?,
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
