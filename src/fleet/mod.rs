//! The fleet: the builders of `[fleet] machines` (Nix's machines format, parsed by
//! [`nixbuild_core::machines`]), each reached over SSH with the identity and the pinned host
//! key of its line, and probed: a machine is up when SSH, the login and the protocol
//! handshake of its URI (`nix-store --serve --write` for `ssh://`, `nix-daemon --stdio` for
//! `ssh-ng://`) work, and down otherwise, with why and when it is tried again. The file is
//! re-read when it changes (or when the setting does, on reload); a file with an error
//! leaves the machines as they were.
//!
//! The scheduler gets every machine ([`Fleet::sync`] after each change): what it builds,
//! its job limit, and whether it is up. A build placed on a machine runs there through a
//! [`conn::Session`] of its protocol, kept open between builds in the machine's [`Remote`]
//! (at most its job limit of them). A build that fails because of its machine marks the
//! machine down ([`Fleet::failed`]) until a probe finds it up again.

pub mod conn;
pub mod daemon_conn;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nixbuild_core::machines::{parse_machines, MachineLine, Protocol};
use nixbuild_core::store_path::StorePath;
use nixbuild_ssh::client::{self, Target};
use nixbuild_ssh::ssh_key::PublicKey;
use serde::Serialize;

use crate::builds::placement::{FleetMachine, Placement};
use crate::config::FleetConfig;
use crate::reload::LiveConfig;
use conn::{Fault, Session};

/// Largest machines file read, in bytes.
const MAX_FILE: u64 = 1 << 20;

/// Longest wait before a machine that is down is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// How often the file and the probes' times are looked at.
const TICK: Duration = Duration::from_millis(500);

/// The machines and what the last probe of each found, and the placement that gets them.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fleet {
    state: Arc<Mutex<State>>,
    placement: Arc<Placement>,
}

#[derive(Debug, Default)]
struct State {
    /// The file the machines came from, as it was when read.
    source: Option<Source>,
    /// The last problem with the file (the machines stay as they were).
    file_error: Option<String>,
    machines: Vec<Machine>,
    /// `[fleet] probe_interval` and `build_locally` as last configured.
    probe_interval: Duration,
    build_locally: bool,
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
    remote: Arc<Remote>,
    probe: Probe,
    /// When to probe next.
    due: Instant,
}

/// A machine builds go to: its line, how to reach it, its open sessions, and what went
/// there.
#[derive(Debug)]
pub struct Remote {
    /// Its line of the machines file.
    pub line: MachineLine,
    /// What the scheduler sees of it, from its line.
    pub spec: nixbuild_core::scheduler::Machine,
    target: Target,
    /// `[fleet] io_timeout` when it was read.
    io_timeout: Duration,
    /// Sessions open and idle, newest last; at most the machine's job limit.
    idle: Mutex<Vec<Session>>,
    /// Builds running there now.
    running: AtomicU64,
    /// Builds sent there.
    builds: AtomicU64,
    /// NAR bytes sent to it and received from it.
    sent: AtomicU64,
    received: AtomicU64,
    /// Per input path being or lately copied there: when its last copy ended. Builds that
    /// lack the same path take turns, and the later ones skip the copy.
    uploads: Mutex<HashMap<StorePath, UploadSlot>>,
}

/// When a path's last copy to a machine ended (`None`: never, or it failed), held while a
/// copy runs.
pub type UploadSlot = Arc<tokio::sync::Mutex<Option<Instant>>>;

/// Upload slots kept per machine before idle ones are forgotten.
const MAX_UPLOAD_SLOTS: usize = 4096;

/// A build's hold on a machine's running count, released when dropped.
#[derive(Debug)]
pub struct OnMachine(Arc<Remote>);

impl Drop for OnMachine {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Remote {
    fn new(line: MachineLine, target: Target, io_timeout: Duration) -> Remote {
        let spec = nixbuild_core::scheduler::Machine {
            systems: line.systems.clone(),
            supported_features: line.supported_features.iter().cloned().collect(),
            mandatory_features: line.mandatory_features.iter().cloned().collect(),
            // What a machine has is its own scheduler's business: here each of its jobs
            // counts as a core of a nominal GiB.
            cores: line.max_jobs,
            memory: u64::from(line.max_jobs) << 30,
            max_jobs: line.max_jobs,
            speed: speed(line.speed_factor),
        };
        Remote {
            line,
            spec,
            target,
            io_timeout,
            idle: Mutex::default(),
            running: AtomicU64::new(0),
            builds: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            uploads: Mutex::default(),
        }
    }

    /// The slot of `path`'s copies to this machine: lock it around a copy, and skip the
    /// copy when the last one ended after the machine was asked what it lacks.
    pub fn upload_slot(&self, path: &StorePath) -> UploadSlot {
        let mut uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        if uploads.len() >= MAX_UPLOAD_SLOTS && !uploads.contains_key(path) {
            uploads.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        uploads.entry(path.clone()).or_default().clone()
    }

    /// Its URI, for messages.
    pub fn name(&self) -> String {
        self.line.uri.to_string()
    }

    /// Counts a build running there until the hold is dropped.
    pub fn hold(self: &Arc<Self>) -> OnMachine {
        self.running.fetch_add(1, Ordering::Relaxed);
        self.builds.fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS.fleet_build();
        OnMachine(self.clone())
    }

    /// Counts NAR bytes sent to it (`up`) or received from it.
    pub fn count(&self, up: bool, bytes: u64) {
        let (counter, direction) = if up {
            (&self.sent, crate::metrics::Direction::ToMachine)
        } else {
            (&self.received, crate::metrics::Direction::FromMachine)
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        crate::metrics::METRICS.transferred(direction, bytes);
    }

    /// A session: an idle one still open, or a new one.
    pub async fn session(&self) -> Result<Session, Fault> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(conn) if conn.is_open() => return Ok(conn),
                Some(_) => continue,
                None => break,
            }
        }
        let session = conn::open(
            self.line.uri.protocol,
            &self.name(),
            &self.target,
            &remote_command(&self.line),
            self.io_timeout,
        )
        .await?;
        tracing::info!(machine = %self.name(), version = %session.version(), "opened a session");
        Ok(session)
    }

    /// Keeps a session that finished its work cleanly for the next build.
    pub fn give_back(&self, conn: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if conn.is_open() && idle.len() < self.line.max_jobs as usize {
            idle.push(conn);
        }
    }

    /// Closes the idle sessions (the machine failed or left).
    fn close_idle(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
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
    /// Builds running there now.
    pub running: u64,
    /// Builds sent there since this server started.
    pub builds: u64,
    /// NAR bytes sent to it (inputs).
    pub bytes_sent: u64,
    /// NAR bytes received from it (outputs).
    pub bytes_received: u64,
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
    /// A fleet with no machines yet, whose machines go to `placement`.
    pub fn new(placement: Arc<Placement>) -> Fleet {
        Fleet {
            state: Arc::default(),
            placement,
        }
    }

    /// The machines and their state now.
    pub fn view(&self) -> FleetView {
        let state = self.lock();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FleetView {
            file: state.source.as_ref().map(|s| s.path.clone()),
            file_error: state.file_error.clone(),
            machines: state
                .machines
                .iter()
                .map(|m| {
                    let (r, line) = (&m.remote, &m.remote.line);
                    MachineView {
                        uri: line.uri.to_string(),
                        systems: line.systems.clone(),
                        max_jobs: line.max_jobs,
                        speed_factor: line.speed_factor,
                        features: line
                            .supported_features
                            .union(&line.mandatory_features)
                            .cloned()
                            .collect(),
                        mandatory_features: line.mandatory_features.iter().cloned().collect(),
                        probe: m.probe.clone(),
                        running: load(&r.running),
                        builds: load(&r.builds),
                        bytes_sent: load(&r.sent),
                        bytes_received: load(&r.received),
                    }
                })
                .collect(),
        }
    }

    /// Gives the placement the machines as they are now: each machine with what it builds,
    /// its job limit, and whether it is up (a machine not probed yet counts as up: its first
    /// build finds out).
    pub fn sync(&self) {
        let state = self.lock();
        let build_locally = state.build_locally;
        let machines: Vec<FleetMachine> = state
            .machines
            .iter()
            .map(|m| FleetMachine {
                available: !matches!(m.probe, Probe::Down { .. }),
                remote: m.remote.clone(),
            })
            .collect();
        drop(state);
        self.placement.sync_fleet(&machines, build_locally);
    }

    /// Takes the settings of `[fleet]` that hold between reads of the file.
    fn configure(&self, config: &FleetConfig) {
        let mut state = self.lock();
        state.probe_interval = Duration::from_secs(config.probe_interval);
        state.build_locally = config.build_locally;
    }

    /// A build found `remote` failing (`fault`): it is down from now until a probe finds
    /// it up, which is due after one probe interval; its idle sessions are closed.
    pub fn failed(&self, remote: &Arc<Remote>, fault: &Fault) {
        remote.close_idle();
        {
            let mut state = self.lock();
            let interval = state.probe_interval;
            let Some(machine) = state
                .machines
                .iter_mut()
                .find(|m| Arc::ptr_eq(&m.remote, remote))
            else {
                return;
            };
            let failures = machine.failures().saturating_add(1);
            tracing::warn!(machine = %remote.name(), "machine down (a build found it failing): {fault}");
            machine.probe = Probe::Down {
                error: fault.to_string(),
                failures,
            };
            machine.due = Instant::now() + interval;
        }
        self.sync();
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

    /// Builds running on the machines now.
    pub fn running(&self) -> u64 {
        self.lock()
            .machines
            .iter()
            .map(|m| m.remote.running.load(Ordering::Relaxed))
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the machines file again when the setting or the file changed.
    fn refresh(&self, config: &FleetConfig) {
        let Some(path) = &config.machines else {
            let mut state = self.lock();
            if state.source.is_some() {
                tracing::info!("[fleet] machines unset: no machines");
            }
            state.source = None;
            state.file_error = None;
            for gone in std::mem::take(&mut state.machines) {
                gone.remote.close_idle();
            }
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
                        .map(|m| (m.remote.line.to_line(), m))
                        .collect();
                state.machines = machines
                    .into_iter()
                    .map(|m| old.remove(&m.remote.line.to_line()).unwrap_or(m))
                    .collect();
                for gone in old.values() {
                    gone.remote.close_idle();
                }
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
            .map(|(i, m)| (i, m.remote.line.clone(), m.remote.target.clone()))
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
            .filter(|m| m.remote.line.to_line() == line.to_line())
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

/// The scheduler's speed of a speed factor: thousandths, at least 1.
fn speed(factor: f64) -> u32 {
    let milli = (factor * f64::from(nixbuild_core::scheduler::Machine::NORMAL_SPEED)).round();
    if milli.is_finite() {
        milli.clamp(1.0, f64::from(u32::MAX)) as u32
    } else {
        nixbuild_core::scheduler::Machine::NORMAL_SPEED
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
                remote: Arc::new(Remote::new(
                    line,
                    target,
                    Duration::from_secs(config.io_timeout),
                )),
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

/// Opens a session with the machine (SSH, login, the protocol's handshake, as a build's
/// session is opened); the version it speaks and how long it all took, in ms.
async fn probe(line: &MachineLine, target: &Target) -> Result<(String, u64), String> {
    let started = Instant::now();
    let session = conn::open(
        line.uri.protocol,
        &line.uri.to_string(),
        target,
        &remote_command(line),
        target.timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    let latency = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok((session.version(), latency))
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
        fleet.configure(&config.fleet);
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
        fleet.sync();
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
            fleet.sync();
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}
