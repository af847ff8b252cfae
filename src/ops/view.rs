//! What `nixbuild` commands answer, as text for people and as JSON for scripts. Every JSON
//! answer is one object `{"version": 1, "kind": "<kind>", ...}` (docs/operations.md lists
//! each kind's fields); fields are only ever added within a version.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nixbuild_core::scheduler::ByteCount;
use serde::Serialize;

use crate::builds::{LiveBuild, LiveState};
use crate::store::{BuildRecord, DayUsage, GcStats, HeldPath};

/// The version of the JSON answers' schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Characters of a build's error a list shows.
pub const LISTED_ERROR: usize = 200;

/// One answer.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Document {
    /// `help --json`.
    Help {
        /// The help text.
        text: &'static str,
    },
    /// `whoami`.
    Whoami(Whoami),
    /// `builds`: newest first.
    Builds {
        /// The builds.
        builds: Vec<BuildView>,
    },
    /// `show`.
    Build {
        /// The build.
        build: BuildView,
    },
    /// `log --json`.
    Log {
        /// The build.
        id: u64,
        /// Whether the build had ended (the log is whole).
        complete: bool,
        /// The log, as text (invalid UTF-8 replaced).
        log: String,
    },
    /// `cancel`.
    Cancelled {
        /// The build cancelled.
        id: u64,
    },
    /// `usage`.
    Usage {
        /// Whose (`null`: every account's).
        account: Option<String>,
        /// From when (ms since the epoch).
        since_ms: u64,
        /// Per day, oldest first.
        days: Vec<DayView>,
        /// NAR bytes held now.
        nar_bytes: u64,
        /// Paths held now.
        paths: u64,
    },
    /// `paths`: most recently used first.
    Paths {
        /// The paths.
        #[serde(serialize_with = "held_paths")]
        paths: Vec<HeldPath>,
    },
    /// `accounts`.
    Accounts {
        /// Every account known from the store, the configuration and the builds in flight.
        accounts: Vec<AccountView>,
    },
    /// `gc`.
    Collected {
        /// What the collection removed.
        stats: CollectedView,
    },
    /// `status`.
    Status(Status),
}

/// `whoami`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct Whoami {
    /// The account.
    pub account: String,
    /// The key's SHA256 fingerprint.
    pub key: String,
    /// Whether it is an admin.
    pub admin: bool,
    /// Most builds queued or running.
    pub max_builds: usize,
    /// Most builds running (`null`: only the fair share limits it).
    pub max_running_builds: Option<usize>,
    /// Most sessions at once.
    pub max_sessions: usize,
    /// How long unused paths are kept, in seconds.
    pub retention_seconds: u64,
    /// The storage quota in bytes (`null`: none).
    pub quota_bytes: Option<u64>,
    /// NAR bytes held.
    pub nar_bytes: u64,
    /// Paths held.
    pub paths: u64,
    /// Builds queued or running now.
    pub builds_in_flight: usize,
}

/// A build, in flight or recorded.
#[derive(Debug, Clone, Serialize)]
pub struct BuildView {
    /// Its id.
    pub id: u64,
    /// The derivation.
    pub drv: String,
    /// The accounts that asked for it (an admin's view); in an account's own view, that
    /// account alone.
    pub accounts: Vec<String>,
    /// Whether it was one build for several requests (of several accounts, or several of
    /// one).
    pub shared: bool,
    /// `waiting`, `running`, `ending` (outcome known, record being stored) or `finished`.
    pub state: &'static str,
    /// For a finished build, its result as Nix names it (`Built`, `PermanentFailure`, ...).
    pub status: Option<String>,
    /// For a failed build, the message its clients got.
    pub error: Option<String>,
    /// For a waiting build, what it waits for and where it stands in the queue.
    pub waiting_for: Option<String>,
    /// When it was submitted (ms since the epoch).
    pub submitted_ms: u64,
    /// When it was granted its cores and started.
    pub started_ms: Option<u64>,
    /// When it ended.
    pub ended_ms: Option<u64>,
    /// Cores granted.
    pub cores: Option<u32>,
    /// For a running build, the host CPUs granted (`0-3,8`).
    pub cpus: Option<String>,
    /// Memory granted, in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time its processes used, in seconds (so far, for a running build).
    pub cpu_seconds: Option<f64>,
    /// The most memory it held at once, in bytes (so far, for a running build).
    pub peak_memory_bytes: Option<u64>,
    /// Its outputs by name.
    pub outputs: BTreeMap<String, String>,
    /// NAR bytes of its outputs.
    pub output_bytes: Option<u64>,
    /// Bytes of its log.
    pub log_bytes: Option<u64>,
    /// The machine of the fleet it runs on (a running build; null: this host).
    pub machine: Option<String>,
}

impl BuildView {
    /// A build in flight.
    pub fn live(build: &LiveBuild) -> BuildView {
        let mut view = BuildView {
            id: build.id,
            drv: build.drv.to_absolute(),
            accounts: build.accounts.clone(),
            shared: build.accounts.len() > 1,
            state: "waiting",
            status: None,
            error: None,
            waiting_for: None,
            submitted_ms: build.submitted_ms,
            started_ms: None,
            ended_ms: None,
            cores: None,
            cpus: None,
            memory_bytes: None,
            cpu_seconds: None,
            peak_memory_bytes: None,
            outputs: BTreeMap::new(),
            output_bytes: None,
            log_bytes: None,
            machine: None,
        };
        match &build.state {
            LiveState::Waiting { reason } => view.waiting_for = Some(reason.clone()),
            LiveState::Running {
                started_ms,
                cpus,
                memory,
                cpu_us,
                peak_memory,
                machine,
            } => {
                view.state = "running";
                view.started_ms = Some(*started_ms);
                if machine.is_none() {
                    view.cores = Some(u32::try_from(cpus.len()).unwrap_or(u32::MAX));
                    view.cpus = Some(crate::cgroup::format_cpu_list(cpus));
                    view.memory_bytes = Some(*memory);
                }
                view.machine.clone_from(machine);
                view.cpu_seconds = cpu_us.map(|us| us as f64 / 1e6);
                view.peak_memory_bytes = *peak_memory;
            }
            LiveState::Ended => view.state = "ending",
        }
        view
    }

    /// A recorded build (one account's record).
    pub fn recorded(record: BuildRecord) -> BuildView {
        let started = record.started_ms.is_some();
        BuildView {
            id: record.build,
            drv: record.drv,
            accounts: vec![record.account],
            shared: record.shared,
            state: "finished",
            status: Some(record.status),
            error: (!record.error.is_empty()).then_some(record.error),
            waiting_for: None,
            submitted_ms: record.submitted_ms,
            started_ms: record.started_ms,
            ended_ms: Some(record.ended_ms),
            cores: started.then_some(record.cores),
            cpus: None,
            memory_bytes: started.then_some(record.memory),
            cpu_seconds: record.cpu_us.map(|us| us as f64 / 1e6),
            peak_memory_bytes: record.peak_memory,
            outputs: record
                .outputs
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(name, path)| (name.to_owned(), path.to_owned()))
                .collect(),
            output_bytes: Some(record.output_bytes),
            log_bytes: Some(record.log_bytes),
            machine: None,
        }
    }

    /// Cuts the error to its first line, at most [`LISTED_ERROR`] characters, for a list
    /// (`show` has it whole).
    pub fn shorten_error(&mut self) {
        if let Some(error) = &mut self.error {
            let first = error.lines().next().unwrap_or_default();
            let cut: String = first.chars().take(LISTED_ERROR).collect();
            if cut.len() < error.len() {
                *error = format!("{cut}…");
            }
        }
    }

    /// Whether it is still in flight.
    pub fn is_live(&self) -> bool {
        self.state != "finished"
    }

    /// Its result or state, for a table.
    fn result(&self) -> &str {
        self.status.as_deref().unwrap_or(self.state)
    }
}

/// One day of `usage`.
#[derive(Debug, Clone, Serialize)]
pub struct DayView {
    /// The day (UTC), `YYYY-MM-DD`.
    pub date: String,
    /// Builds that ended.
    pub builds: u64,
    /// Of those, the ones that failed.
    pub failed: u64,
    /// CPU time used, in seconds.
    pub cpu_seconds: f64,
    /// Cores granted times how long, in core-seconds.
    pub core_seconds: f64,
    /// The most memory one build held at once, in bytes.
    pub peak_memory_bytes: u64,
    /// NAR bytes of the outputs built.
    pub output_bytes: u64,
    /// NAR bytes uploaded.
    pub uploaded_bytes: u64,
    /// NAR bytes downloaded.
    pub downloaded_bytes: u64,
    /// Bytes fetched from binary caches.
    pub substituted_bytes: u64,
}

impl From<DayUsage> for DayView {
    fn from(d: DayUsage) -> DayView {
        DayView {
            date: utc_date(d.day),
            builds: d.builds,
            failed: d.failed,
            cpu_seconds: d.cpu_us as f64 / 1e6,
            core_seconds: d.core_ms as f64 / 1e3,
            peak_memory_bytes: d.peak_memory,
            output_bytes: d.output_bytes,
            uploaded_bytes: d.traffic.uploaded,
            downloaded_bytes: d.traffic.downloaded,
            substituted_bytes: d.traffic.substituted,
        }
    }
}

/// One account in `accounts`.
#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    /// Its name.
    pub account: String,
    /// Whether it is an admin.
    pub admin: bool,
    /// NAR bytes held.
    pub nar_bytes: u64,
    /// Paths held.
    pub paths: u64,
    /// Its quota in bytes (`null`: none).
    pub quota_bytes: Option<u64>,
    /// Its retention in seconds.
    pub retention_seconds: u64,
    /// Builds running.
    pub running: usize,
    /// Builds waiting.
    pub waiting: usize,
}

/// What `gc` removed.
#[derive(Debug, Clone, Serialize)]
pub struct CollectedView {
    /// Grants (an account's paths) removed.
    pub paths: u64,
    /// Objects removed from disk.
    pub objects: u64,
    /// Their NAR bytes.
    pub bytes: u64,
    /// Build records removed.
    pub records: u64,
}

impl From<GcStats> for CollectedView {
    fn from(s: GcStats) -> CollectedView {
        CollectedView {
            paths: s.grants,
            objects: s.objects,
            bytes: s.bytes,
            records: s.records,
        }
    }
}

/// `status`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The server's version.
    pub server_version: &'static str,
    /// Cores the scheduler hands out.
    pub cores: u64,
    /// Memory it hands out, in bytes.
    pub memory_bytes: u64,
    /// Builds running.
    pub builds_running: u64,
    /// Builds waiting.
    pub builds_waiting: u64,
    /// Cores granted now.
    pub cores_granted: u64,
    /// Memory granted now, in bytes.
    pub memory_granted_bytes: u64,
    /// Free bytes on the state directory's file system.
    pub free_bytes: u64,
    /// The disk reserve, in bytes.
    pub disk_reserve_bytes: u64,
    /// Accounts holding paths.
    pub accounts: usize,
    /// NAR bytes of every account's paths (a path held by several counts for each).
    pub nar_bytes: u64,
    /// Paths of every account.
    pub paths: u64,
    /// Paths pinned by sessions and builds now.
    pub pinned_paths: usize,
    /// The machines of `[fleet]` and what their last probes found (null: none set).
    pub fleet: Option<crate::fleet::FleetView>,
}

fn held_paths<S: serde::Serializer>(paths: &[HeldPath], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct PathView<'a> {
        path: String,
        nar_size: u64,
        last_used: u64,
        registration_time: u64,
        #[serde(skip)]
        _p: std::marker::PhantomData<&'a ()>,
    }
    s.collect_seq(paths.iter().map(|p| PathView {
        path: p.path.to_absolute(),
        nar_size: p.nar_size,
        last_used: p.last_used,
        registration_time: p.registration_time,
        _p: std::marker::PhantomData,
    }))
}

impl Document {
    /// The answer as `account` may see it: a build shared with other accounts names only
    /// `account` (that it is shared shows in `shared`).
    pub fn seen_by(mut self, account: &str) -> Document {
        let own = |b: &mut BuildView| b.accounts.retain(|a| a == account);
        match &mut self {
            Document::Builds { builds } => builds.iter_mut().for_each(own),
            Document::Build { build } => own(build),
            _ => {}
        }
        self
    }

    /// The JSON form: one line.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Envelope<'a> {
            version: u32,
            #[serde(flatten)]
            document: &'a Document,
        }
        let mut text = serde_json::to_string(&Envelope {
            version: SCHEMA_VERSION,
            document: self,
        })
        .unwrap_or_else(|e| format!("{{\"version\":{SCHEMA_VERSION},\"error\":\"{e}\"}}"));
        text.push('\n');
        text
    }

    /// The text form, for people.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        match self {
            Document::Help { text } => t.push_str(text),
            Document::Whoami(w) => {
                let _ = writeln!(
                    t,
                    "account:        {}{}",
                    w.account,
                    if w.admin { " (admin)" } else { "" }
                );
                let _ = writeln!(t, "key:            {}", w.key);
                let _ = writeln!(
                    t,
                    "holds:          {} paths, {}",
                    w.paths,
                    ByteCount(w.nar_bytes)
                );
                let quota = w
                    .quota_bytes
                    .map_or("none".to_owned(), |q| ByteCount(q).to_string());
                let _ = writeln!(t, "quota:          {quota}");
                let _ = writeln!(t, "retention:      {}", seconds(w.retention_seconds));
                let running = w
                    .max_running_builds
                    .map_or("fair share".to_owned(), |m| m.to_string());
                let _ = writeln!(
                    t,
                    "builds:         {} in flight; at most {} queued or running, {running} running",
                    w.builds_in_flight, w.max_builds
                );
                let _ = writeln!(t, "sessions:       at most {}", w.max_sessions);
            }
            Document::Builds { builds } => {
                let _ = writeln!(
                    t,
                    "{:<7} {:<17} {:<19} {:>8} {:>5} {:>9} {:>8} {:>9}  {:<12} DERIVATION",
                    "ID",
                    "RESULT",
                    "SUBMITTED (UTC)",
                    "TIME",
                    "CORES",
                    "MEMORY",
                    "CPU",
                    "PEAK",
                    "ACCOUNT"
                );
                for b in builds {
                    let time = match (b.started_ms, b.ended_ms) {
                        (Some(s), Some(e)) => seconds(e.saturating_sub(s) / 1000),
                        (Some(s), None) => seconds(crate::store::now_ms().saturating_sub(s) / 1000),
                        _ => "-".to_owned(),
                    };
                    let _ = writeln!(
                        t,
                        "{:<7} {:<17} {:<19} {:>8} {:>5} {:>9} {:>8} {:>9}  {:<12} {}",
                        b.id,
                        b.result(),
                        utc_time(b.submitted_ms),
                        time,
                        opt(b.cores),
                        opt(b.memory_bytes.map(ByteCount)),
                        opt(b.cpu_seconds.map(|s| format!("{s:.1}s"))),
                        opt(b.peak_memory_bytes.map(ByteCount)),
                        b.accounts.join(","),
                        short_drv(&b.drv),
                    );
                    if let Some(w) = &b.waiting_for {
                        let _ = writeln!(t, "        {w}");
                    }
                }
            }
            Document::Build { build: b } => {
                let _ = writeln!(t, "build:          {}", b.id);
                let _ = writeln!(t, "derivation:     {}", b.drv);
                let _ = writeln!(t, "accounts:       {}", b.accounts.join(", "));
                let _ = writeln!(t, "state:          {}", b.result());
                if let Some(w) = &b.waiting_for {
                    let _ = writeln!(
                        t,
                        "waiting for:    {}",
                        w.trim_start_matches("waiting for ")
                    );
                }
                let _ = writeln!(t, "submitted:      {} UTC", utc_time(b.submitted_ms));
                if let Some(s) = b.started_ms {
                    let _ = writeln!(t, "started:        {} UTC", utc_time(s));
                }
                if let Some(e) = b.ended_ms {
                    let _ = writeln!(t, "ended:          {} UTC", utc_time(e));
                }
                if let Some(m) = &b.machine {
                    let _ = writeln!(t, "machine:        {m}");
                }
                if let Some(c) = b.cores {
                    let cpus = b.cpus.as_ref().map_or(String::new(), |c| format!(" ({c})"));
                    let _ = writeln!(t, "cores:          {c}{cpus}");
                }
                if let Some(m) = b.memory_bytes {
                    let _ = writeln!(t, "memory:         {}", ByteCount(m));
                }
                if let Some(c) = b.cpu_seconds {
                    let _ = writeln!(t, "cpu time:       {c:.3} s");
                }
                if let Some(p) = b.peak_memory_bytes {
                    let _ = writeln!(t, "peak memory:    {}", ByteCount(p));
                }
                for (name, path) in &b.outputs {
                    let _ = writeln!(t, "output {name:<8} {path}");
                }
                if let Some(o) = b.output_bytes {
                    let _ = writeln!(t, "output size:    {}", ByteCount(o));
                }
                if let Some(l) = b.log_bytes {
                    let _ = writeln!(
                        t,
                        "log:            {} (nixbuild log {})",
                        ByteCount(l),
                        b.id
                    );
                }
                if let Some(e) = &b.error {
                    let _ = writeln!(t, "error:          {e}");
                }
            }
            Document::Log { log, .. } => t.push_str(log),
            Document::Cancelled { id } => {
                let _ = writeln!(t, "cancelled build {id}");
            }
            Document::Usage {
                account,
                days,
                nar_bytes,
                paths,
                ..
            } => {
                let whose = account.as_deref().unwrap_or("all accounts");
                let _ = writeln!(t, "{whose} holds {paths} paths, {}", ByteCount(*nar_bytes));
                let _ = writeln!(
                    t,
                    "{:<10} {:>6} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    "DAY",
                    "BUILDS",
                    "FAILED",
                    "CPU-S",
                    "CORE-S",
                    "PEAK",
                    "BUILT",
                    "UP",
                    "DOWN",
                    "CACHES"
                );
                for d in days {
                    let _ = writeln!(
                        t,
                        "{:<10} {:>6} {:>6} {:>10.1} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9}",
                        d.date,
                        d.builds,
                        d.failed,
                        d.cpu_seconds,
                        d.core_seconds,
                        ByteCount(d.peak_memory_bytes).to_string(),
                        ByteCount(d.output_bytes).to_string(),
                        ByteCount(d.uploaded_bytes).to_string(),
                        ByteCount(d.downloaded_bytes).to_string(),
                        ByteCount(d.substituted_bytes).to_string(),
                    );
                }
            }
            Document::Paths { paths } => {
                let _ = writeln!(t, "{:>10}  {:<19}  PATH", "SIZE", "LAST USED (UTC)");
                for p in paths {
                    let _ = writeln!(
                        t,
                        "{:>10}  {:<19}  {}",
                        ByteCount(p.nar_size).to_string(),
                        utc_time(p.last_used.saturating_mul(1000)),
                        p.path
                    );
                }
            }
            Document::Accounts { accounts } => {
                let _ = writeln!(
                    t,
                    "{:<20} {:>8} {:>10} {:>10} {:>10} {:>7} {:>7}",
                    "ACCOUNT", "PATHS", "HOLDS", "QUOTA", "RETENTION", "RUNNING", "WAITING"
                );
                for a in accounts {
                    let name = if a.admin {
                        format!("{} (admin)", a.account)
                    } else {
                        a.account.clone()
                    };
                    let _ = writeln!(
                        t,
                        "{:<20} {:>8} {:>10} {:>10} {:>10} {:>7} {:>7}",
                        name,
                        a.paths,
                        ByteCount(a.nar_bytes).to_string(),
                        a.quota_bytes
                            .map_or("none".to_owned(), |q| ByteCount(q).to_string()),
                        seconds(a.retention_seconds),
                        a.running,
                        a.waiting
                    );
                }
            }
            Document::Collected { stats } => {
                let _ = writeln!(
                    t,
                    "collected {} paths, {} objects ({}), {} build records",
                    stats.paths,
                    stats.objects,
                    ByteCount(stats.bytes),
                    stats.records
                );
            }
            Document::Status(s) => {
                let _ = writeln!(t, "nixbuild {}", s.server_version);
                let _ = writeln!(
                    t,
                    "capacity:   {} cores, {}",
                    s.cores,
                    ByteCount(s.memory_bytes)
                );
                let _ = writeln!(
                    t,
                    "builds:     {} running ({} cores, {}), {} waiting",
                    s.builds_running,
                    s.cores_granted,
                    ByteCount(s.memory_granted_bytes),
                    s.builds_waiting
                );
                let _ = writeln!(
                    t,
                    "store:      {} paths of {} accounts, {}; {} pinned",
                    s.paths,
                    s.accounts,
                    ByteCount(s.nar_bytes),
                    s.pinned_paths
                );
                let _ = writeln!(
                    t,
                    "disk:       {} free (reserve {})",
                    ByteCount(s.free_bytes),
                    ByteCount(s.disk_reserve_bytes)
                );
                if let Some(fleet) = &s.fleet {
                    fleet_lines(&mut t, fleet);
                }
            }
        }
        t
    }
}

/// The fleet's lines of `status`: the file, its last problem, a line per machine.
fn fleet_lines(t: &mut String, fleet: &crate::fleet::FleetView) {
    use crate::fleet::Probe;
    let file = fleet
        .file
        .as_ref()
        .map_or("-".to_owned(), |f| f.display().to_string());
    let _ = writeln!(t, "machines:   {} from {file}", fleet.machines.len());
    if let Some(error) = &fleet.file_error {
        let _ = writeln!(t, "  file error: {error}");
    }
    for m in &fleet.machines {
        let state = match &m.probe {
            Probe::Unknown => "not probed yet".to_owned(),
            Probe::Up {
                protocol_version,
                latency_ms,
            } => format!("up (protocol {protocol_version}, {latency_ms} ms)"),
            Probe::Down { error, failures } => format!("DOWN ({failures} failed): {error}"),
        };
        let _ = writeln!(
            t,
            "  {} {} jobs {} speed {}: {state}; {} running, {} builds, {} sent, {} received",
            m.uri,
            if m.systems.is_empty() {
                "-".to_owned()
            } else {
                m.systems.join(",")
            },
            m.max_jobs,
            m.speed_factor,
            m.running,
            m.builds,
            nixbuild_core::scheduler::ByteCount(m.bytes_sent),
            nixbuild_core::scheduler::ByteCount(m.bytes_received),
        );
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}

/// A derivation's name without its store directory and hash, for tables.
fn short_drv(drv: &str) -> &str {
    let base = drv.rsplit('/').next().unwrap_or(drv);
    base.split_once('-').map_or(base, |(_, name)| name)
}

/// A duration in seconds as `1h2m`, `3m4s` or `5s`.
fn seconds(s: u64) -> String {
    match s {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `YYYY-MM-DD` of day `days` since the epoch (the proleptic Gregorian calendar).
pub fn utc_date(days: u64) -> String {
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of `ms` since the epoch.
pub fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil(secs / 86_400);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Year, month and day of day `days` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(11_016), "2000-02-29");
        assert_eq!(utc_time(1_796_531_400_000), "2026-12-06 04:30:00");
        assert_eq!(utc_date(20_794), "2026-12-07");
    }

    #[test]
    fn json_answers_carry_the_schema_version_and_kind() {
        let doc = Document::Cancelled { id: 7 };
        let v: serde_json::Value = serde_json::from_str(&doc.to_json()).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["kind"], "cancelled");
        assert_eq!(v["id"], 7);
    }

    #[test]
    fn recorded_builds_show_their_outputs_and_times() {
        let record = BuildRecord {
            id: 3,
            build: 9,
            account: "alice".into(),
            drv: "/nix/store/0c7ixmd36m0lxkigqcpshbhqkcm6w40l-hello.drv".into(),
            outputs: "out /nix/store/1c7ixmd36m0lxkigqcpshbhqkcm6w40l-hello\n".into(),
            submitted_ms: 1_000,
            started_ms: Some(2_000),
            ended_ms: 62_000,
            status: "Built".into(),
            error: String::new(),
            cores: 2,
            memory: 1 << 30,
            cpu_us: Some(1_500_000),
            peak_memory: Some(5 << 20),
            output_bytes: 100,
            shared: false,
            log_bytes: 12,
        };
        let view = BuildView::recorded(record);
        assert_eq!(view.id, 9);
        assert_eq!(view.cpu_seconds, Some(1.5));
        let text = Document::Builds {
            builds: vec![view.clone()],
        }
        .to_text();
        assert!(text.contains("Built"), "{text}");
        assert!(text.contains("1m0s"), "{text}");
        assert!(text.contains("hello.drv"), "{text}");
        let text = Document::Build { build: view }.to_text();
        assert!(
            text.contains("output out      /nix/store/1c7ixmd36m0lxkigqcpshbhqkcm6w40l-hello"),
            "{text}"
        );
    }
}
