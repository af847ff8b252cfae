//! The SSH client a front uses to reach its builders: it logs in with the identity of the
//! builder's machines-file line, accepts only the host key pinned there, and runs one command
//! per channel (`nix-store --serve --write`), handing back its stdin, stdout and stderr.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use crate::ssh_key;

/// Bytes of a command's stdout buffered ahead of its reader.
const STDOUT_BUFFER: usize = 256 * 1024;

/// Why a builder could not be reached or would not run the command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The identity file could not be read or is not a private key.
    #[error("cannot load the SSH identity {path}: {source}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: russh::keys::Error,
    },
    /// No TCP connection, or the SSH handshake failed.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// `host:port`.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The builder's host key is not the pinned one.
    #[error("{address} presented host key {presented}, not the pinned {pinned}")]
    HostKey {
        /// `host:port`.
        address: String,
        /// The fingerprint it presented.
        presented: String,
        /// The pinned fingerprint.
        pinned: String,
    },
    /// The builder refused the identity.
    #[error("{address} refused the key {fingerprint} for user {user}")]
    Refused {
        /// `host:port`.
        address: String,
        /// The user logged in as.
        user: String,
        /// The identity's fingerprint.
        fingerprint: String,
    },
    /// Connecting or logging in took longer than allowed.
    #[error("{address} did not answer within {timeout:?}")]
    Timeout {
        /// `host:port`.
        address: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The SSH connection failed after the handshake.
    #[error("SSH to {address}: {source}")]
    Ssh {
        /// `host:port`.
        address: String,
        /// What russh said.
        source: russh::Error,
    },
}

/// Where and as whom to log in.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// The private key to log in with.
    pub identity: Arc<PrivateKey>,
    /// The only host key accepted.
    pub host_key: PublicKey,
    /// Longest time for connecting and logging in.
    pub timeout: Duration,
}

impl Target {
    /// `host:port`, with IPv6 addresses in brackets.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Loads an OpenSSH private key file (not encrypted).
pub fn load_identity(path: &Path) -> Result<Arc<PrivateKey>, ClientError> {
    russh::keys::load_secret_key(path, None)
        .map(Arc::new)
        .map_err(|source| ClientError::Identity {
            path: path.to_owned(),
            source,
        })
}

/// The SHA256 fingerprint users see (`SHA256:…`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// A russh client handler that accepts only the pinned host key, and remembers the key the
/// server presented (for the message when it is another).
#[derive(Debug)]
pub struct Pinned {
    pinned: PublicKey,
    presented: Arc<std::sync::Mutex<Option<PublicKey>>>,
}

impl Pinned {
    /// Accepts `pinned` only.
    pub fn new(pinned: PublicKey) -> Pinned {
        Pinned {
            pinned,
            presented: Arc::default(),
        }
    }

    /// Where the presented key will be, once the handshake has reached the check.
    pub fn presented(&self) -> Arc<std::sync::Mutex<Option<PublicKey>>> {
        Arc::clone(&self.presented)
    }
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(key.clone());
        Ok(key.key_data() == self.pinned.key_data())
    }
}

/// An authenticated SSH connection to a builder; each [`Connection::exec`] opens a channel.
pub struct Connection {
    handle: Handle<Pinned>,
    address: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects, checks the host key and logs in, within the target's timeout.
    pub async fn open(target: &Target) -> Result<Connection, ClientError> {
        let address = target.address();
        tokio::time::timeout(target.timeout, Self::open_now(target, address.clone()))
            .await
            .map_err(|_| ClientError::Timeout {
                address,
                timeout: target.timeout,
            })?
    }

    async fn open_now(target: &Target, address: String) -> Result<Connection, ClientError> {
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            ..client::Config::default()
        });
        let handler = Pinned::new(target.host_key.clone());
        let presented = handler.presented();
        let socket = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| ClientError::Connect {
                address: address.clone(),
                reason: e.to_string(),
            })?;
        let mut handle = match client::connect_stream(config, socket, handler).await {
            Ok(handle) => handle,
            // russh reports a refused key as an error of its own; say which key it was.
            Err(russh::Error::UnknownKey) => {
                let presented = presented.lock().unwrap_or_else(|e| e.into_inner()).take();
                return Err(ClientError::HostKey {
                    address,
                    presented: presented.map_or_else(|| "none".to_owned(), |k| fingerprint(&k)),
                    pinned: fingerprint(&target.host_key),
                });
            }
            Err(e) => {
                return Err(ClientError::Connect {
                    address,
                    reason: e.to_string(),
                })
            }
        };
        let hash = match target.identity.algorithm() {
            ssh_key::Algorithm::Rsa { .. } => Some(HashAlg::Sha512),
            _ => None,
        };
        let key = PrivateKeyWithHashAlg::new(target.identity.clone(), hash);
        let auth = handle
            .authenticate_publickey(&target.user, key)
            .await
            .map_err(|source| ClientError::Ssh {
                address: address.clone(),
                source,
            })?;
        if !auth.success() {
            return Err(ClientError::Refused {
                address,
                user: target.user.clone(),
                fingerprint: fingerprint(target.identity.public_key()),
            });
        }
        Ok(Connection { handle, address })
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs `command` on a new channel.
    pub async fn exec(&self, command: &str) -> Result<RemoteCommand, ClientError> {
        let ssh = |source| ClientError::Ssh {
            address: self.address.clone(),
            source,
        };
        let channel = self.handle.channel_open_session().await.map_err(ssh)?;
        channel.exec(true, command).await.map_err(ssh)?;
        Ok(RemoteCommand::start(channel))
    }
}

/// A command running on a builder: its stdin, its stdout as a byte stream, its stderr in
/// chunks, and how it ended.
pub struct RemoteCommand {
    /// Its stdin.
    pub stdin: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    /// Its stdout.
    pub stdout: DuplexStream,
    /// Its stderr as it arrives (bounded: a slow reader slows the command).
    pub stderr: mpsc::Receiver<Vec<u8>>,
    /// Its exit status when it ends (`None`: the channel closed without one).
    pub exit: tokio::sync::oneshot::Receiver<Option<u32>>,
}

impl std::fmt::Debug for RemoteCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCommand").finish_non_exhaustive()
    }
}

impl RemoteCommand {
    fn start(mut channel: Channel<Msg>) -> RemoteCommand {
        let stdin = Box::new(channel.make_writer());
        let (mut stdout_in, stdout) = tokio::io::duplex(STDOUT_BUFFER);
        let (stderr_in, stderr) = mpsc::channel(64);
        let (exit_in, exit) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut status = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        // The reader went away: keep draining for the exit status.
                        let _ = stdout_in.write_all(&data).await;
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        let _ = stderr_in.send(data.to_vec()).await;
                    }
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::Eof => {
                        let _ = stdout_in.shutdown().await;
                    }
                    ChannelMsg::Failure => {
                        let _ = stderr_in
                            .send(b"the server refused to run the command".to_vec())
                            .await;
                        break;
                    }
                    _ => {}
                }
            }
            let _ = stdout_in.shutdown().await;
            let _ = exit_in.send(status);
        });
        RemoteCommand {
            stdin,
            stdout,
            stderr,
            exit,
        }
    }
}
