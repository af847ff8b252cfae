//! The relay's protocol on the daemon's socket `<state-dir>/serve.sock` (docs/design.md,
//! Processes), spoken by both ends: `nixbuild-serve` (the relay) connects, names the account in
//! a header line and hands over its stdin and stdout; the daemon ([`crate::daemon`]) runs the
//! session on those descriptors and sends messages and the exit status back in frames.
//!
//! ```text
//! relay → daemon:  "nixbuild-relay 2 account=<name> write=<0|1>[ protocol=daemon|
//!                  command=<hex>]\n", sent with SCM_RIGHTS
//!                  carrying two descriptors: the relay's stdin, then its stdout (each a pipe
//!                  or a socket); nothing else follows
//! daemon → relay:  frames [u8 tag][u32 LE len][len bytes]
//!                  tag 2: stderr bytes, tag 3: exit status (u32 LE), end
//! ```
//!
//! The relay used to copy every byte both ways (version 1); handing the descriptors over
//! takes it out of the data path, which halves the copies through the kernel and saves a
//! process wake-up per chunk. The daemon closes its copy of the client's stdout before it
//! sends the exit status, so the client has seen all output by then.

use std::io;
use std::path::{Path, PathBuf};

use nixbuild_core::serve::Protocol;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

/// Frame tag: bytes for the relay's stderr (messages).
pub const FRAME_STDERR: u8 = 2;
/// Frame tag: the exit status (4 bytes, u32 LE); the last frame.
pub const FRAME_EXIT: u8 = 3;
/// Largest payload of one frame the daemon sends (the protocol allows up to `u32::MAX`).
pub const MAX_FRAME: usize = 1 << 20;
/// How many descriptors the relay hands over with its header: stdin, stdout.
pub const RELAY_FDS: usize = 2;
/// Longest relay header line accepted, newline included: room for a `nixbuild` command of
/// [`nixbuild_ssh::exec::MAX_COMMAND`] bytes, hex-encoded.
pub const MAX_HEADER: usize = 256 + 2 * nixbuild_ssh::exec::MAX_COMMAND;
/// Version of the relay protocol named in the header.
const RELAY_VERSION: &str = "2";

/// Length of a frame's header: the tag and the payload's length.
pub const FRAME_HEADER_LEN: usize = 5;

/// The header of a frame of `len` payload bytes tagged `tag`.
pub fn frame_header(tag: u8, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[0] = tag;
    header[1..].copy_from_slice(&len.to_le_bytes());
    header
}

/// The tag and payload length of a frame's header (the inverse of [`frame_header`]).
pub fn parse_frame_header(header: [u8; FRAME_HEADER_LEN]) -> (u8, u32) {
    let [tag, len @ ..] = header;
    (tag, u32::from_le_bytes(len))
}

/// Why a relay header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayHeaderError {
    /// Not of the form `nixbuild-relay 2 account=<name> write=<0|1>[ protocol=daemon|
    /// command=<hex>]`.
    #[error(
        "malformed relay header {0:?}: expected \"nixbuild-relay 2 account=<name> \
         write=<0|1>[ protocol=daemon|command=<hex>]\""
    )]
    Malformed(String),
    /// An account name outside `[A-Za-z0-9._@+-]{1,64}`.
    #[error("invalid account name {0:?}: expected 1 to 64 of A-Z a-z 0-9 . _ @ + -")]
    BadAccount(String),
}

/// The header line a relay sends first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayHeader {
    /// The account the session runs as.
    pub account: String,
    /// Whether the client asked for `--write`.
    pub write: bool,
    /// The protocol the session speaks (`protocol=daemon` for `--stdio`; absent for the
    /// serve protocol, as relays before the worker protocol sent it).
    pub protocol: Protocol,
    /// For `nixbuild <subcommand>` (the client's `SSH_ORIGINAL_COMMAND` behind a forced
    /// command): the command as the client sent it (`command=` in hex); `protocol` is then
    /// [`Protocol::Serve`] and unused.
    pub command: Option<String>,
}

impl RelayHeader {
    /// Parses the line, without its newline.
    pub fn parse(line: &[u8]) -> Result<RelayHeader, RelayHeaderError> {
        let text = String::from_utf8_lossy(line);
        let malformed = || RelayHeaderError::Malformed(text.clone().into_owned());
        let mut words = text.split(' ');
        let (
            Some("nixbuild-relay"),
            Some(RELAY_VERSION),
            Some(account),
            Some(write),
            protocol,
            None,
        ) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        )
        else {
            return Err(malformed());
        };
        let (protocol, command) = match protocol {
            None => (Protocol::Serve, None),
            Some("protocol=daemon") => (Protocol::Daemon, None),
            Some(word) => {
                let hex = word.strip_prefix("command=").ok_or_else(malformed)?;
                let command = from_hex(hex).ok_or_else(malformed)?;
                (Protocol::Serve, Some(command))
            }
        };
        let account = account.strip_prefix("account=").ok_or_else(malformed)?;
        let write = match write {
            "write=0" => false,
            "write=1" => true,
            _ => return Err(malformed()),
        };
        check_account_name(account)?;
        Ok(RelayHeader {
            account: account.to_owned(),
            write,
            protocol,
            command,
        })
    }

    /// The line, newline included.
    pub fn encode(&self) -> String {
        let protocol = match (&self.command, self.protocol) {
            (Some(command), _) => format!(" command={}", to_hex(command.as_bytes())),
            (None, Protocol::Serve) => String::new(),
            (None, Protocol::Daemon) => " protocol=daemon".to_owned(),
        };
        format!(
            "nixbuild-relay {RELAY_VERSION} account={} write={}{protocol}\n",
            self.account,
            u8::from(self.write)
        )
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The UTF-8 text `hex` encodes (lower-case, two digits a byte).
fn from_hex(hex: &str) -> Option<String> {
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Checks an account name: 1 to 64 characters of `[A-Za-z0-9._@+-]` (docs/design.md, Accounts).
pub fn check_account_name(name: &str) -> Result<(), RelayHeaderError> {
    if nixbuild_core::account::is_valid_account_name(name) {
        Ok(())
    } else {
        Err(RelayHeaderError::BadAccount(name.to_owned()))
    }
}

/// The socket of the daemon serving `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("serve.sock")
}

/// The frames the daemon sends the relay: stderr bytes and the exit status.
pub struct RelayFrames<W> {
    w: BufWriter<W>,
}

impl<W: AsyncWrite + Unpin + Send> RelayFrames<W> {
    /// Frames onto `w`.
    pub fn new(w: W) -> Self {
        RelayFrames {
            w: BufWriter::with_capacity(64 * 1024, w),
        }
    }

    async fn frame(&mut self, tag: u8, payload: &[u8]) -> io::Result<()> {
        for piece in payload.chunks(MAX_FRAME) {
            let len = u32::try_from(piece.len()).map_err(io::Error::other)?;
            self.w.write_all(&frame_header(tag, len)).await?;
            self.w.write_all(piece).await?;
        }
        Ok(())
    }

    /// Sends bytes for the relay's stderr.
    pub async fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.frame(FRAME_STDERR, bytes).await?;
        self.w.flush().await
    }

    /// Sends the exit status, the last frame, and shuts the connection down.
    pub async fn exit(mut self, status: u32) -> io::Result<()> {
        self.frame(FRAME_EXIT, &status.to_le_bytes()).await?;
        self.w.flush().await?;
        self.w.shutdown().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_bad_lines() {
        let h = RelayHeader {
            account: "alice@laptop".into(),
            write: true,
            protocol: Protocol::Serve,
            command: None,
        };
        let line = h.encode();
        assert_eq!(line, "nixbuild-relay 2 account=alice@laptop write=1\n");
        assert_eq!(RelayHeader::parse(line.trim_end().as_bytes()).unwrap(), h);
        let d = RelayHeader {
            protocol: Protocol::Daemon,
            ..h
        };
        let line = d.encode();
        assert_eq!(
            line,
            "nixbuild-relay 2 account=alice@laptop write=1 protocol=daemon\n"
        );
        assert_eq!(RelayHeader::parse(line.trim_end().as_bytes()).unwrap(), d);
        let c = RelayHeader {
            account: "alice".into(),
            write: false,
            protocol: Protocol::Serve,
            command: Some("nixbuild log 'a b' é".into()),
        };
        let line = c.encode();
        assert!(line.starts_with("nixbuild-relay 2 account=alice write=0 command=6e6978"));
        assert_eq!(RelayHeader::parse(line.trim_end().as_bytes()).unwrap(), c);
        let longest = RelayHeader {
            command: Some("x".repeat(nixbuild_ssh::exec::MAX_COMMAND)),
            account: "a".repeat(64),
            ..c
        };
        assert!(longest.encode().len() <= MAX_HEADER);
        for bad in [
            "nixbuild-relay 2 account=a write=0 command=6",
            "nixbuild-relay 2 account=a write=0 command=zz",
            "nixbuild-relay 2 account=a write=0 command=ff",
            "nixbuild-relay 2 account=a write=0 commands=61",
            "nixbuild-relay 1 account=a write=1",
            "nixbuild-relay 2 account=a write=2",
            "nixbuild-relay 2 user=a write=1",
            "nixbuild-relay 2 account=a write=1 extra",
            "nixbuild-relay 2 account=a write=1 protocol=serve",
            "nixbuild-relay 2 account=a",
        ] {
            assert!(
                matches!(
                    RelayHeader::parse(bad.as_bytes()),
                    Err(RelayHeaderError::Malformed(_))
                ),
                "{bad}"
            );
        }
        for bad in ["", "a/b", "a b", &"x".repeat(65), "é"] {
            let line = format!("nixbuild-relay 2 account={bad} write=0");
            assert!(RelayHeader::parse(line.as_bytes()).is_err(), "{bad:?}");
        }
        check_account_name(&"x".repeat(64)).unwrap();
    }

    #[test]
    fn a_frame_header_round_trips() {
        let header = frame_header(FRAME_EXIT, 4);
        assert_eq!(header, [3, 4, 0, 0, 0]);
        assert_eq!(parse_frame_header(header), (FRAME_EXIT, 4));
    }
}
