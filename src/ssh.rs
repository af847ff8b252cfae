//! The daemon's SSH front door: [`nixbuild_ssh`]'s server, configured from `[ssh]`, with the
//! host key in the state directory, running each `nix-store --serve` channel as a serve
//! [`session`](crate::session) of the key's account on the daemon's store (`nix-daemon
//! --stdio` as a worker session), and each `nixbuild …` command through [`crate::ops`].

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nixbuild_core::budget::MemoryBudget;
use nixbuild_ssh::host_key::{self, HostKeyError, HOST_KEY_FILE};
use nixbuild_ssh::server::{Limits, Reloader, ServerError};
use nixbuild_ssh::ssh_key::PublicKey;
use nixbuild_ssh::{
    ChannelStdout, Ciphers, KeyTypes, Server, ServerConfig, SessionRequest, SessionService,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::Instrument;

use crate::builds::BuildService;
use crate::collector::Collector;
use crate::config::Config;
use crate::metrics::METRICS;
use crate::reload::LiveConfig;
use crate::service::{SessionPlaces, SessionSettings};
use crate::session::{self, SessionError, SessionOutput};
use crate::store::Store;

/// Why the SSH front door could not start.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The host key could not be loaded or created.
    #[error("SSH host key: {0}")]
    HostKey(#[from] HostKeyError),
    /// The server could not start (keys file, listening socket).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The configuration is inconsistent (normally caught when it is loaded).
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Runs SSH sessions on the daemon's store, each with the configuration in force when it
/// starts.
pub struct SshSessions {
    store: Store,
    builds: BuildService,
    config: Arc<LiveConfig>,
    budget: Arc<MemoryBudget>,
    places: Arc<SessionPlaces>,
    collector: Collector,
}

impl SessionService for SshSessions {
    async fn serve<R, E>(
        &self,
        request: &SessionRequest,
        stdin: R,
        stdout: ChannelStdout<'_>,
        stderr: &mut E,
    ) -> u32
    where
        R: AsyncRead + Unpin + Send,
        E: AsyncWrite + Unpin + Send + Sync,
    {
        // Every line of the session carries its connection's number.
        let span = tracing::info_span!("ssh", conn = request.connection);
        async move {
            let account = request.account.as_str();
            let conn = request.connection;
            let config = self.config.get();
            // Held for the session's life, as a relayed session holds its places.
            let places = self.places.daemon_place().and_then(|daemon| {
                let account = self
                    .places
                    .account_place(account, config.limits.max_sessions_per_account)?;
                Ok((daemon, account))
            });
            let _places = match places {
                Ok(places) => places,
                Err(refusal) => {
                    tracing::warn!(%account, conn, "refused a session: {refusal}");
                    METRICS.refused(crate::metrics::Refusal::Sessions);
                    let _ = write_line(stderr, &format!("error: {refusal}\n")).await;
                    return 1;
                }
            };
            let mut out = ChannelOutput {
                stdout,
                answers: BytesMut::new(),
                stderr,
            };
            if let Some(words) = &request.command {
                let ops = crate::ops::Ops {
                    store: &self.store,
                    builds: &self.builds,
                    config: &config,
                    collector: Some(&self.collector),
                    account,
                    key: &request.key,
                };
                return crate::ops::run(&ops, words, &mut out).await;
            }
            let _counted = METRICS.session_started(request.protocol.into());
            let settings = SessionSettings::new(&config, account, request.write, &self.budget);
            tracing::info!(
                %account,
                write = request.write,
                protocol = request.protocol.name(),
                conn,
                peer = %request.peer,
                "session start"
            );
            let (store, builds) = (&self.store, &self.builds);
            let served = session::serve_protocol(
                request.protocol,
                store,
                builds,
                &settings,
                stdin,
                &mut out,
            )
            .await;
            let flushed = out.flush().await.map_err(SessionError::Io);
            match served.and(flushed) {
                Ok(()) => {
                    tracing::info!(%account, conn, status = 0, "session end");
                    0
                }
                Err(e) => {
                    tracing::info!(%account, conn, status = 1, error = %e, "session end");
                    1
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Writes `line` to a session's stderr.
async fn write_line<E: AsyncWrite + Unpin>(stderr: &mut E, line: &str) -> io::Result<()> {
    stderr.write_all(line.as_bytes()).await?;
    stderr.flush().await
}

/// Protocol answers up to this size are gathered and sent together at the next flush.
const GATHER: usize = 64 * 1024;

/// A session's output on its SSH channel: small protocol answers gathered into one buffer
/// that goes out at each flush; NAR chunks handed to the channel as they are, not copied.
struct ChannelOutput<'a, 'e, E> {
    stdout: ChannelStdout<'a>,
    answers: BytesMut,
    stderr: &'e mut E,
}

impl<E: AsyncWrite + Unpin + Send + Sync> SessionOutput for ChannelOutput<'_, '_, E> {
    async fn stdout(&mut self, bytes: Bytes) -> io::Result<()> {
        if self.answers.len() + bytes.len() <= GATHER {
            self.answers.extend_from_slice(&bytes);
            return Ok(());
        }
        self.flush().await?;
        self.stdout.send(bytes).await
    }

    async fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stderr.write_all(bytes).await?;
        self.stderr.flush().await
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.answers.is_empty() {
            return Ok(());
        }
        self.stdout.send(self.answers.split().freeze()).await
    }
}

/// A bound SSH server, ready to run.
pub struct FrontDoor {
    server: Server<SshSessions>,
}

/// The SSH server's limits under `config`.
pub fn limits(config: &Config) -> Limits {
    Limits {
        auth_timeout: config.timeouts.auth(),
        idle_timeout: config.timeouts.idle(),
        max_connections: config.ssh.max_connections,
        max_unauthenticated: config.ssh.max_unauthenticated,
        max_unauthenticated_per_source: config.ssh.max_unauthenticated_per_source,
        max_connections_per_account: config.ssh.max_connections_per_account,
        max_sessions_per_connection: config.ssh.max_sessions_per_connection,
        shutdown_grace: config.timeouts.shutdown(),
    }
}

/// Starts listening for SSH when `ssh.listen` is set (`None` otherwise): loads or creates the
/// host key in `state_dir`, reads the authorized keys, binds, and prints on stdout (and
/// writes to [`host_key::PINS_FILE`]) what users pin the host key with. Sessions take the
/// configuration in force from `live`, hold unfinished requests against `budget`, the
/// daemon's one budget, and take their places among `places` as relayed sessions do;
/// `nixbuild gc` asks `collector`.
pub async fn bind(
    state_dir: &Path,
    live: Arc<LiveConfig>,
    store: Store,
    builds: BuildService,
    budget: Arc<MemoryBudget>,
    places: Arc<SessionPlaces>,
    collector: Collector,
) -> Result<Option<FrontDoor>, SshError> {
    let config = live.get();
    let Some(listen) = config.ssh.listen else {
        return Ok(None);
    };
    let authorized_keys = config.ssh.authorized_keys.clone().ok_or_else(|| {
        SshError::Config("ssh.listen is set but ssh.authorized_keys is not".into())
    })?;
    let key_types =
        KeyTypes::from_names(&config.ssh.key_types).map_err(|e| SshError::Config(e.to_string()))?;
    let ciphers =
        Ciphers::from_names(&config.ssh.ciphers).map_err(|e| SshError::Config(e.to_string()))?;
    let (host_key, created) = host_key::load_or_create(state_dir)?;
    let key_file = state_dir.join(HOST_KEY_FILE);
    if created {
        tracing::info!(file = %key_file.display(), "generated a new SSH host key");
    }
    let public = host_key.public_key().clone();
    let sessions = SshSessions {
        store,
        builds,
        config: live.clone(),
        budget,
        places,
        collector,
    };
    let server = Server::bind(
        ServerConfig {
            listen,
            host_key,
            authorized_keys,
            key_types,
            ciphers,
            limits: limits(&config),
        },
        sessions,
    )
    .await?;
    let addr = server.local_addr().map_err(|e| {
        SshError::Server(ServerError::Listen {
            addr: listen,
            source: e,
        })
    })?;
    tracing::info!(
        %addr,
        host_key = %host_key::fingerprint(&public),
        "listening for SSH"
    );
    let pins = pins_text(addr, &public, &key_file.with_extension("pub"));
    // The file is a copy for whoever did not see stdout (a service's journal scrolled away):
    // without it the daemon still serves, and the log has the fingerprint.
    match host_key::write_pins(state_dir, &pins) {
        Ok(path) => tracing::info!(file = %path.display(), "wrote the host key's pins"),
        Err(e) => tracing::warn!("cannot write the host key's pins: {e}"),
    }
    // A closed stdout must not stop the daemon either.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(pins.as_bytes()).and_then(|()| out.flush());
    Ok(Some(FrontDoor { server }))
}

impl FrontDoor {
    /// A handle that re-reads the authorized keys and changes the limits while it runs.
    pub fn reloader(&self) -> Reloader {
        self.server.reloader()
    }

    /// Serves until `shutdown` resolves, then drains (see [`Server::run`]).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        self.server.run(shutdown).await;
    }
}

/// The host to name in a `known_hosts` line for `addr`: the address itself, or this
/// machine's name when it listens on all addresses.
fn host_for(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "HOST".to_owned())
    } else {
        addr.ip().to_string()
    }
}

/// The lines users pin the host key with (README, "SSH"), printed on stdout at start and
/// kept in [`host_key::PINS_FILE`].
fn pins_text(addr: SocketAddr, key: &PublicKey, pub_file: &Path) -> String {
    let host = host_for(addr);
    let port = addr.port();
    let config = host_key::ssh_config("nixbuild", &host, port, "~/.ssh/id_ed25519");
    format!(
        "nixbuild-server: SSH on {addr}\n\
         \x20 host key: {fingerprint} ({pub_file})\n\
         \x20 known_hosts line: {known_hosts}\n\
         \x20 machines file host key (8th field): {machines}\n\
         \x20 for that field to work on this port, and to pin the key as \"nixbuild {line}\"\n\
         \x20 in known_hosts instead, use HostKeyAlias in ~/.ssh/config:\n{config}",
        fingerprint = host_key::fingerprint(key),
        pub_file = pub_file.display(),
        known_hosts = host_key::known_hosts_line(&host, port, key),
        machines = host_key::machines_host_key(key),
        line = host_key::public_line(key),
        config = config
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>(),
    )
}
