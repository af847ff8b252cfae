//! The fleet: the builders of `[fleet] machines` (Nix's machines format, parsed by
//! [`nixbuild_core::machines`]), each reached over SSH with the identity and the pinned host
//! key of its line, and probed: a machine is up when SSH, the login and the protocol
//! handshake of its URI (`nix-store --serve --write` for `ssh://`, `nix-daemon --stdio` for
//! `ssh-ng://`) work, and down otherwise, with why and when it is tried again. The file is
//! re-read when it changes (or when the setting does, on reload); a file with an error
//! leaves the machines as they were.
//!
//! This is the first part of scaling out: the machines and their state are known and shown
//! (`nixbuild status`); builds still run on this host.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nixbuild_core::machines::{parse_machines, MachineLine, Protocol};
use nixbuild_core::serve::handshake::{ClientHello, ServerHello};
use nixbuild_core::serve::ProtocolVersion;
use nixbuild_core::wire::BufMutExt;
use nixbuild_ssh::client::{self, Connection, Target};
use nixbuild_ssh::ssh_key::PublicKey;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::FleetConfig;
use crate::reload::LiveConfig;

/// Largest machines file read, in bytes.
const MAX_FILE: u64 = 1 << 20;

/// Longest wait before a machine that is down is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// How often the file and the probes' times are looked at.
const TICK: Duration = Duration::from_millis(500);

/// The machines and what the last probe of each found. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Fleet(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// The file the machines came from, as it was when read.
    source: Option<Source>,
    /// The last problem with the file (the machines stay as they were).
    file_error: Option<String>,
    machines: Vec<Machine>,
}

/// A machines file as read: path, size and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Debug)]
struct Machine {
    line: MachineLine,
    target: Target,
    probe: Probe,
    /// When to probe next.
    due: Instant,
}

impl Machine {
    /// Probes failed in a row.
    fn failures(&self) -> u32 {
        match self.probe {
            Probe::Down { failures, .. } => failures,
            Probe::Unknown | Probe::Up { .. } => 0,
        }
    }
}

/// What the last probe of a machine found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Probe {
    /// Not probed yet.
    Unknown,
    /// It answered the handshake.
    Up {
        /// The protocol version it speaks, such as `2.7` or `1.38`.
        protocol_version: String,
        /// How long connecting, logging in and the handshake took, in ms.
        latency_ms: u64,
    },
    /// It did not.
    Down {
        /// Why.
        error: String,
        /// Probes failed in a row.
        failures: u32,
    },
}

/// One machine as `nixbuild status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineView {
    /// Its URI.
    pub uri: String,
    /// The systems it builds for.
    pub systems: Vec<String>,
    /// Most builds at once.
    pub max_jobs: u32,
    /// Its speed factor.
    pub speed_factor: f64,
    /// Features it supports, mandatory ones included.
    pub features: Vec<String>,
    /// Its mandatory features.
    pub mandatory_features: Vec<String>,
    /// What the last probe found.
    #[serde(flatten)]
    pub probe: Probe,
}

/// The fleet as `nixbuild status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetView {
    /// The machines file, when one is set.
    pub file: Option<PathBuf>,
    /// The last problem reading it (its machines are the ones read before).
    pub file_error: Option<String>,
    /// The machines.
    pub machines: Vec<MachineView>,
}

impl Fleet {
    /// The machines and their state now.
    pub fn view(&self) -> FleetView {
        let state = self.lock();
        FleetView {
            file: state.source.as_ref().map(|s| s.path.clone()),
            file_error: state.file_error.clone(),
            machines: state
                .machines
                .iter()
                .map(|m| MachineView {
                    uri: m.line.uri.to_string(),
                    systems: m.line.systems.clone(),
                    max_jobs: m.line.max_jobs,
                    speed_factor: m.line.speed_factor,
                    features: m
                        .line
                        .supported_features
                        .union(&m.line.mandatory_features)
                        .cloned()
                        .collect(),
                    mandatory_features: m.line.mandatory_features.iter().cloned().collect(),
                    probe: m.probe.clone(),
                })
                .collect(),
        }
    }

    /// How many machines are not probed yet, up and down (for the metrics).
    pub fn counts(&self) -> [u64; 3] {
        let mut counts = [0; 3];
        for m in &self.lock().machines {
            let i = match m.probe {
                Probe::Unknown => 0,
                Probe::Up { .. } => 1,
                Probe::Down { .. } => 2,
            };
            counts[i] += 1;
        }
        counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the machines file again when the setting or the file changed.
    fn refresh(&self, config: &FleetConfig) {
        let Some(path) = &config.machines else {
            let mut state = self.lock();
            if state.source.is_some() {
                tracing::info!("[fleet] machines unset: no machines");
            }
            *state = State::default();
            return;
        };
        let seen = std::fs::metadata(path).map(|m| Source {
            path: path.clone(),
            len: m.len(),
            modified: m.modified().ok(),
        });
        let mut state = self.lock();
        let source = match seen {
            Ok(source) if state.source.as_ref() == Some(&source) => return,
            Ok(source) => source,
            Err(e) => {
                let error = format!("cannot read {}: {e}", path.display());
                if state.file_error.as_ref() != Some(&error) {
                    tracing::warn!("[fleet] machines: {error}; the machines stay as they were");
                    state.file_error = Some(error);
                }
                return;
            }
        };
        match load(path, config) {
            Ok(machines) => {
                tracing::info!(
                    file = %path.display(),
                    machines = machines.len(),
                    "[fleet] machines read"
                );
                // Machines that stay, wherever their lines now stand, keep what their
                // probes found.
                let mut old: std::collections::HashMap<String, Machine> =
                    std::mem::take(&mut state.machines)
                        .into_iter()
                        .map(|m| (m.line.to_line(), m))
                        .collect();
                state.machines = machines
                    .into_iter()
                    .map(|m| old.remove(&m.line.to_line()).unwrap_or(m))
                    .collect();
                state.file_error = None;
            }
            Err(error) => {
                tracing::warn!("[fleet] machines: {error}; the machines stay as they were");
                state.file_error = Some(error);
            }
        }
        state.source = Some(source);
    }

    /// The machines whose probe is due, as (index, line, target).
    fn due(&self, now: Instant) -> Vec<(usize, MachineLine, Target)> {
        self.lock()
            .machines
            .iter()
            .enumerate()
            .filter(|(_, m)| m.due <= now)
            .map(|(i, m)| (i, m.line.clone(), m.target.clone()))
            .collect()
    }

    /// Records what a probe found, unless the machines changed meanwhile, and when to probe
    /// next: `interval` after a success, doubling after each failure up to [`MAX_BACKOFF`].
    fn record(
        &self,
        index: usize,
        line: &MachineLine,
        found: Result<(String, u64), String>,
        interval: Duration,
    ) {
        let mut state = self.lock();
        let Some(machine) = state
            .machines
            .get_mut(index)
            .filter(|m| m.line.to_line() == line.to_line())
        else {
            return;
        };
        machine.probe = match found {
            Ok((protocol_version, latency_ms)) => {
                if !matches!(machine.probe, Probe::Up { .. }) {
                    tracing::info!(machine = %line.uri, protocol_version, latency_ms, "machine up");
                }
                Probe::Up {
                    protocol_version,
                    latency_ms,
                }
            }
            Err(error) => {
                let failures = machine.failures().saturating_add(1);
                if failures == 1 {
                    tracing::warn!(machine = %line.uri, "machine down: {error}");
                }
                Probe::Down { error, failures }
            }
        };
        let wait = match machine.failures() {
            0 => interval,
            n => interval
                .saturating_mul(1 << n.min(16))
                .min(MAX_BACKOFF)
                .max(interval),
        };
        machine.due = Instant::now() + wait;
    }
}

/// Reads and checks a machines file: every machine needs its identity file and its pinned
/// host key, since builds and their outputs will cross to it.
fn load(path: &Path, config: &FleetConfig) -> Result<Vec<Machine>, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!(
            "{} is larger than {MAX_FILE} bytes",
            path.display()
        ));
    }
    let lines = parse_machines(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let now = Instant::now();
    lines
        .into_iter()
        .map(|line| {
            let at = |problem: String| format!("{}, line {}: {problem}", path.display(), line.line);
            let key = line.host_key.as_ref().ok_or_else(|| {
                at(
                    "a fleet machine needs its pinned host key (the 8th field: the base64 of \
                    its public host key line)"
                        .into(),
                )
            })?;
            let host_key = PublicKey::from_bytes(&key.blob)
                .map_err(|e| at(format!("the host key cannot be used: {e}")))?;
            let identity = line.ssh_key.as_ref().ok_or_else(|| {
                at("a fleet machine needs its SSH identity file (the 3rd field)".into())
            })?;
            let identity =
                client::load_identity(Path::new(identity)).map_err(|e| at(e.to_string()))?;
            let target = Target {
                host: line.uri.host.clone(),
                port: line.uri.port.unwrap_or(22),
                user: line.uri.user.clone().unwrap_or_else(|| "root".to_owned()),
                identity,
                host_key,
                timeout: Duration::from_secs(config.connect_timeout),
            };
            Ok(Machine {
                line,
                target,
                probe: Probe::Unknown,
                due: now,
            })
        })
        .collect()
}

/// The command that starts the machine's side of its protocol.
fn remote_command(line: &MachineLine) -> String {
    match line.uri.protocol {
        Protocol::Serve => format!(
            "{} --serve --write",
            line.uri.remote_program.as_deref().unwrap_or("nix-store")
        ),
        Protocol::Daemon => format!(
            "{} --stdio",
            line.uri.remote_program.as_deref().unwrap_or("nix-daemon")
        ),
    }
}

/// The client's opening of the handshake: the serve protocol's hello, or the daemon
/// protocol's magic (its server answers that before the client says more).
fn opening(protocol: Protocol) -> Vec<u8> {
    let mut hello = Vec::new();
    match protocol {
        Protocol::Serve => ClientHello {
            version: ProtocolVersion::SERVER,
        }
        .encode(&mut hello),
        Protocol::Daemon => hello.put_wire_u64(nixbuild_core::worker::handshake::CLIENT_MAGIC),
    }
    hello
}

/// The version in the server's 16-byte answer (magic and version), as `2.7` or `1.38`.
fn answer_version(protocol: Protocol, answer: &[u8; 16]) -> Result<String, String> {
    match protocol {
        Protocol::Serve => match ServerHello::decode(answer) {
            Ok(Some((hello, _))) => Ok(format!("2.{}", hello.version.minor())),
            Ok(None) => Err("a short hello".to_owned()),
            Err(e) => Err(e.to_string()),
        },
        Protocol::Daemon => {
            let [magic, version] = [&answer[..8], &answer[8..]]
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            if magic == nixbuild_core::worker::handshake::SERVER_MAGIC {
                Ok(format!("{}.{}", version >> 8, version & 0xff))
            } else {
                Err(format!("{magic:#x} is not the daemon protocol's magic"))
            }
        }
    }
}

/// Connects, logs in and runs the protocol's handshake; the version the machine speaks and
/// how long it all took, in ms.
async fn probe(line: &MachineLine, target: &Target) -> Result<(String, u64), String> {
    let started = Instant::now();
    let attempt = async {
        let connection = Connection::open(target).await.map_err(|e| e.to_string())?;
        let mut command = connection
            .exec(&remote_command(line))
            .await
            .map_err(|e| e.to_string())?;
        let hello = opening(line.uri.protocol);
        command
            .stdin
            .write_all(&hello)
            .await
            .map_err(|e| format!("cannot send the handshake: {e}"))?;
        command.stdin.flush().await.map_err(|e| e.to_string())?;
        let mut answer = [0u8; 16];
        if let Err(e) = command.stdout.read_exact(&mut answer).await {
            let mut said = Vec::new();
            while let Ok(Some(chunk)) =
                tokio::time::timeout(Duration::from_millis(200), command.stderr.recv()).await
            {
                said.extend_from_slice(&chunk);
            }
            let said = String::from_utf8_lossy(&said);
            return Err(format!(
                "`{}` gave no handshake ({e}){}",
                remote_command(line),
                if said.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", said.trim().chars().take(300).collect::<String>())
                }
            ));
        }
        answer_version(line.uri.protocol, &answer).map_err(|e| {
            format!(
                "`{}` did not answer the handshake: {e}",
                remote_command(line)
            )
        })
    };
    let version = tokio::time::timeout(target.timeout, attempt)
        .await
        .map_err(|_| format!("no handshake within {:?}", target.timeout))??;
    let latency = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok((version, latency))
}

/// Keeps the fleet current until `stop`: re-reads the machines file when it changes and
/// probes each machine when it is due, all machines at once.
pub async fn run(
    fleet: Fleet,
    live: Arc<LiveConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let config = live.get();
        if config.fleet.machines.is_none() {
            // Nothing to read: no thread of the blocking pool is kept busy for it.
            fleet.refresh(&config.fleet);
        } else {
            let (fleet, fleet_config) = (fleet.clone(), config.fleet.clone());
            if tokio::task::spawn_blocking(move || fleet.refresh(&fleet_config))
                .await
                .is_err()
            {
                tracing::error!("reading the machines file failed");
            }
        }
        let now = Instant::now();
        let due = fleet.due(now);
        if !due.is_empty() {
            let mut probes = tokio::task::JoinSet::new();
            for (index, line, target) in due {
                probes.spawn(async move {
                    let found = probe(&line, &target).await;
                    (index, line, found)
                });
            }
            let interval = Duration::from_secs(config.fleet.probe_interval);
            while let Some(done) = probes.join_next().await {
                match done {
                    Ok((index, line, found)) => fleet.record(index, &line, found, interval),
                    Err(e) => tracing::error!("a probe failed: {e}"),
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}
