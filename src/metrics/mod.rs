//! The daemon's metrics, exposed in the Prometheus text format (version 0.0.4) at `/metrics`
//! on the address of `[metrics] listen`.
//!
//! [`Metrics`] holds the counters and histograms, updated lock-free by the code that does the
//! work (one process-wide [`METRICS`]); the gauges that describe the daemon's state (queue,
//! grants, store size, free space) are read at scrape time into a [`Snapshot`]. Every label
//! value comes from a bounded set ([`Direction`], [`Refusal`], [`SessionKind`],
//! [`BuildStatus`]), never from an account or a derivation, so the number of series is fixed.
//! [`serve`] is the scrape endpoint, a minimal HTTP/1.1 responder.

mod http;

pub use http::serve;

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nixbuild_core::serve::BuildStatus;

/// Where bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a client into the store (`nix copy --to`, build inputs).
    Upload,
    /// From the store to a client (build outputs, `nix copy --from`).
    Download,
    /// From a substituter into the store.
    Substitute,
    /// Build inputs copied to a machine of the fleet.
    ToMachine,
    /// Build outputs copied back from a machine of the fleet.
    FromMachine,
}

impl Direction {
    const ALL: [Direction; 5] = [
        Direction::Upload,
        Direction::Download,
        Direction::Substitute,
        Direction::ToMachine,
        Direction::FromMachine,
    ];

    /// The value of the `direction` label.
    fn label(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
            Direction::Substitute => "substitute",
            Direction::ToMachine => "to_machine",
            Direction::FromMachine => "from_machine",
        }
    }
}

/// Why something was refused (bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many sessions (the daemon's or the account's).
    Sessions,
    /// Too many builds queued or running for the account.
    Builds,
    /// The account's store quota is used up.
    Quota,
    /// A request the daemon does not serve (system, feature, protocol operation).
    Unsupported,
    /// Free space on the state directory's file system is below the reserve.
    DiskReserve,
    /// A `nixbuild` command refused (not a command, not allowed, not found).
    Command,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::Sessions,
        Refusal::Builds,
        Refusal::Quota,
        Refusal::Unsupported,
        Refusal::DiskReserve,
        Refusal::Command,
    ];

    /// The value of the `reason` label.
    fn label(self) -> &'static str {
        match self {
            Refusal::Sessions => "sessions",
            Refusal::Builds => "builds",
            Refusal::Quota => "quota",
            Refusal::Unsupported => "unsupported",
            Refusal::DiskReserve => "disk_reserve",
            Refusal::Command => "command",
        }
    }
}

/// Which kind of SSH/relay session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// `nix-store --serve`.
    Serve,
    /// `nix-daemon --stdio` (the worker protocol).
    Daemon,
    /// `nixbuild <subcommand>`, the operations interface.
    Command,
}

impl SessionKind {
    const ALL: [SessionKind; 3] = [
        SessionKind::Serve,
        SessionKind::Daemon,
        SessionKind::Command,
    ];

    /// The value of the `protocol` label.
    fn label(self) -> &'static str {
        match self {
            SessionKind::Serve => "serve",
            SessionKind::Daemon => "daemon",
            SessionKind::Command => "command",
        }
    }
}

impl From<nixbuild_core::serve::Protocol> for SessionKind {
    fn from(protocol: nixbuild_core::serve::Protocol) -> SessionKind {
        match protocol {
            nixbuild_core::serve::Protocol::Serve => SessionKind::Serve,
            nixbuild_core::serve::Protocol::Daemon => SessionKind::Daemon,
        }
    }
}

/// How many build statuses there are: the wire values 0 to `STATUSES - 1`.
const STATUSES: usize = 15;

/// The value of the `result` label: the status's name in snake_case.
fn status_label(status: BuildStatus) -> &'static str {
    match status {
        BuildStatus::Built => "built",
        BuildStatus::Substituted => "substituted",
        BuildStatus::AlreadyValid => "already_valid",
        BuildStatus::PermanentFailure => "permanent_failure",
        BuildStatus::InputRejected => "input_rejected",
        BuildStatus::OutputRejected => "output_rejected",
        BuildStatus::TransientFailure => "transient_failure",
        BuildStatus::CachedFailure => "cached_failure",
        BuildStatus::TimedOut => "timed_out",
        BuildStatus::MiscFailure => "misc_failure",
        BuildStatus::DependencyFailed => "dependency_failed",
        BuildStatus::LogLimitExceeded => "log_limit_exceeded",
        BuildStatus::NotDeterministic => "not_deterministic",
        BuildStatus::ResolvesToAlreadyValid => "resolves_to_already_valid",
        BuildStatus::NoSubstituters => "no_substituters",
    }
}

/// Every build status, in wire order.
fn statuses() -> impl Iterator<Item = BuildStatus> {
    (0..).map_while(BuildStatus::from_wire)
}

/// A histogram's finite upper bounds: in microseconds, to compare with an observation, and
/// as written in the `le` label.
type Bounds = [(u64, &'static str); BOUNDS];

/// How many finite bounds a histogram has (then `+Inf`).
const BOUNDS: usize = 10;

/// Buckets for waits and build durations: from a tenth of a second to four hours.
const LONG: Bounds = [
    (100_000, "0.1"),
    (500_000, "0.5"),
    (1_000_000, "1"),
    (5_000_000, "5"),
    (15_000_000, "15"),
    (60_000_000, "60"),
    (300_000_000, "300"),
    (900_000_000, "900"),
    (3_600_000_000, "3600"),
    (14_400_000_000, "14400"),
];

/// Buckets for a build's setup (sandbox, inputs): from 5 ms to 5 s.
const SHORT: Bounds = [
    (5_000, "0.005"),
    (10_000, "0.01"),
    (25_000, "0.025"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (250_000, "0.25"),
    (500_000, "0.5"),
    (1_000_000, "1"),
    (2_500_000, "2.5"),
    (5_000_000, "5"),
];

/// A histogram of durations with fixed buckets.
struct Histogram {
    bounds: &'static Bounds,
    /// Observations per bucket, not cumulative; the last is above every bound (`+Inf`).
    buckets: [AtomicU64; BOUNDS + 1],
    /// The sum of all observations, in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static Bounds) -> Histogram {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; BOUNDS + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let bucket = self
            .bounds
            .iter()
            .position(|&(bound, _)| micros <= bound)
            .unwrap_or(BOUNDS);
        if let Some(b) = self.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        // Saturates rather than wraps, so the sum never goes down.
        let _ = self
            .sum_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_add(micros))
            });
    }
}

/// A number of microseconds written as seconds in decimal, without trailing zeros (`1.5`,
/// `0.000001`, `3`), a valid Prometheus float.
struct Seconds(u64);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, micros) = (self.0 / 1_000_000, self.0 % 1_000_000);
        if micros == 0 {
            return write!(f, "{secs}");
        }
        let frac = format!("{micros:06}");
        write!(f, "{secs}.{}", frac.trim_end_matches('0'))
    }
}

/// A counter per value of a label.
struct Counters<const N: usize>([AtomicU64; N]);

impl<const N: usize> Counters<N> {
    const fn new() -> Self {
        Counters([const { AtomicU64::new(0) }; N])
    }

    fn add(&self, index: usize, n: u64) {
        if let Some(c) = self.0.get(index) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn get(&self, index: usize) -> u64 {
        self.0.get(index).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// The daemon's counters and histograms. All methods take `&self` and are lock-free
/// (atomics); the gauges of the daemon's state come from a [`Snapshot`] at scrape time.
pub struct Metrics {
    sessions: Counters<3>,
    sessions_total: Counters<3>,
    transferred: Counters<5>,
    refusals: Counters<7>,
    builds_queued: AtomicU64,
    fleet_builds: AtomicU64,
    builds_finished: Counters<STATUSES>,
    queue_wait: Histogram,
    setup: Histogram,
    duration: Histogram,
    gc_runs: AtomicU64,
    gc_freed_bytes: AtomicU64,
    gc_removed_paths: AtomicU64,
}

/// The process's metrics (one daemon per process).
pub static METRICS: Metrics = Metrics::new();

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// All counters and histograms at zero; `const`, so that it can be a `static`.
    pub const fn new() -> Metrics {
        Metrics {
            sessions: Counters::new(),
            sessions_total: Counters::new(),
            transferred: Counters::new(),
            refusals: Counters::new(),
            builds_queued: AtomicU64::new(0),
            fleet_builds: AtomicU64::new(0),
            builds_finished: Counters::new(),
            queue_wait: Histogram::new(&LONG),
            setup: Histogram::new(&SHORT),
            duration: Histogram::new(&LONG),
            gc_runs: AtomicU64::new(0),
            gc_freed_bytes: AtomicU64::new(0),
            gc_removed_paths: AtomicU64::new(0),
        }
    }

    /// Counts a session of `kind` that starts now; it is counted as open until the guard
    /// is dropped.
    pub fn session_started(&'static self, kind: SessionKind) -> SessionGuard {
        self.sessions.add(kind as usize, 1);
        self.sessions_total.add(kind as usize, 1);
        SessionGuard {
            metrics: self,
            kind,
        }
    }

    /// Counts `bytes` moved in `direction`.
    pub fn transferred(&self, direction: Direction, bytes: u64) {
        self.transferred.add(direction as usize, bytes);
    }

    /// Counts a refusal for `reason`.
    pub fn refused(&self, reason: Refusal) {
        self.refusals.add(reason as usize, 1);
    }

    /// Counts a build handed to the scheduler.
    pub fn build_queued(&self) {
        self.builds_queued.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a build sent to a machine of the fleet.
    pub fn fleet_build(&self) {
        self.fleet_builds.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a build that starts: how long it waited in the queue, and how long its setup
    /// (sandbox, inputs) took.
    pub fn build_started(&self, queue_wait: Duration, setup: Duration) {
        self.queue_wait.observe(queue_wait);
        self.setup.observe(setup);
    }

    /// Counts a build that ended with `status`, and records its `duration` when it ran.
    pub fn build_finished(&self, status: BuildStatus, duration: Option<Duration>) {
        self.builds_finished
            .add(usize::try_from(status.to_wire()).unwrap_or(usize::MAX), 1);
        if let Some(d) = duration {
            self.duration.observe(d);
        }
    }

    /// Counts a collection of the store that freed `freed_bytes` and removed
    /// `removed_paths`.
    pub fn collection(&self, freed_bytes: u64, removed_paths: u64) {
        self.gc_runs.fetch_add(1, Ordering::Relaxed);
        self.gc_freed_bytes
            .fetch_add(freed_bytes, Ordering::Relaxed);
        self.gc_removed_paths
            .fetch_add(removed_paths, Ordering::Relaxed);
    }

    /// The text exposition (format version 0.0.4) of every metric, with `snapshot`'s gauges.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = Exposition(String::with_capacity(8 * 1024));
        let s = snapshot;
        let gauges = [
            (
                "nixbuild_builds_waiting",
                "Builds queued and not started.",
                s.builds_waiting,
            ),
            (
                "nixbuild_builds_running",
                "Builds running.",
                s.builds_running,
            ),
            (
                "nixbuild_cores_granted",
                "Cores granted to running builds.",
                s.cores_granted,
            ),
            (
                "nixbuild_memory_granted_bytes",
                "Memory granted to running builds.",
                s.memory_granted_bytes,
            ),
            (
                "nixbuild_cores",
                "Cores the daemon may grant to builds.",
                s.cores_total,
            ),
            (
                "nixbuild_memory_bytes",
                "Memory the daemon may grant to builds.",
                s.memory_total_bytes,
            ),
            (
                "nixbuild_store_nar_bytes",
                "NAR bytes of every account's paths (a path several accounts hold counts for each).",
                s.store_nar_bytes,
            ),
            ("nixbuild_store_paths", "Paths of every account (a path several accounts hold counts for each).", s.store_paths),
            (
                "nixbuild_store_free_bytes",
                "Free space on the state directory's file system.",
                s.free_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            out.single(name, GAUGE, help, value);
        }

        let help = "Machines of [fleet], by the state of their last probe.";
        let machines = ["unknown", "up", "down"].into_iter().zip(s.machines);
        out.labelled("nixbuild_fleet_machines", GAUGE, help, "state", machines);
        let help = "Builds running on machines of [fleet].";
        out.single(
            "nixbuild_fleet_builds_running",
            GAUGE,
            help,
            s.fleet_running,
        );
        let help =
            "Builds sent to machines of [fleet] (attempts: a build placed again counts again).";
        let sent = self.fleet_builds.load(Ordering::Relaxed);
        out.single("nixbuild_fleet_builds_total", COUNTER, help, sent);

        let sessions = |c: &Counters<3>| SessionKind::ALL.map(|k| (k.label(), c.get(k as usize)));
        let help = "Sessions open, by protocol.";
        out.labelled(
            "nixbuild_sessions",
            GAUGE,
            help,
            "protocol",
            sessions(&self.sessions),
        );
        let help = "Sessions started, by protocol.";
        let started = sessions(&self.sessions_total);
        out.labelled(
            "nixbuild_sessions_total",
            COUNTER,
            help,
            "protocol",
            started,
        );
        let help = "Bytes of store objects moved, by direction.";
        let moved = Direction::ALL.map(|d| (d.label(), self.transferred.get(d as usize)));
        out.labelled(
            "nixbuild_transfer_bytes_total",
            COUNTER,
            help,
            "direction",
            moved,
        );
        let help = "Requests refused, by reason.";
        let refused = Refusal::ALL.map(|r| (r.label(), self.refusals.get(r as usize)));
        out.labelled("nixbuild_refusals_total", COUNTER, help, "reason", refused);

        let help = "Builds handed to the scheduler.";
        let queued = self.builds_queued.load(Ordering::Relaxed);
        out.single("nixbuild_builds_queued_total", COUNTER, help, queued);
        let help = "Builds finished, by result.";
        let finished = statuses().map(|status| {
            let index = usize::try_from(status.to_wire()).unwrap_or(usize::MAX);
            (status_label(status), self.builds_finished.get(index))
        });
        out.labelled(
            "nixbuild_builds_finished_total",
            COUNTER,
            help,
            "result",
            finished,
        );
        let help = "Time builds waited in the queue.";
        out.histogram("nixbuild_build_queue_wait_seconds", help, &self.queue_wait);
        let help = "Time taken to set up builds before their builders ran.";
        out.histogram("nixbuild_build_setup_seconds", help, &self.setup);
        let help = "Time builds ran.";
        out.histogram("nixbuild_build_duration_seconds", help, &self.duration);

        let gc = [
            (
                "nixbuild_gc_runs_total",
                "Collections of the store.",
                &self.gc_runs,
            ),
            (
                "nixbuild_gc_freed_bytes_total",
                "Bytes freed by collections.",
                &self.gc_freed_bytes,
            ),
            (
                "nixbuild_gc_removed_paths_total",
                "Paths (one account's grant each) removed by collections.",
                &self.gc_removed_paths,
            ),
        ];
        for (name, help, counter) in gc {
            out.single(name, COUNTER, help, counter.load(Ordering::Relaxed));
        }

        let help = "The daemon's version, as a label; always 1.";
        let version = [(env!("CARGO_PKG_VERSION"), 1)];
        out.labelled("nixbuild_build_info", GAUGE, help, "version", version);
        out.0
    }
}

/// Counts a session as open until dropped; from [`Metrics::session_started`].
#[must_use = "the session is counted as open until the guard is dropped"]
#[derive(Debug)]
pub struct SessionGuard {
    metrics: &'static Metrics,
    kind: SessionKind,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(open) = self.metrics.sessions.0.get(self.kind as usize) {
            // Saturates: a gauge below zero would be a bug, not a reason to wrap.
            let _ = open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Gauges read at scrape time from the daemon's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Builds queued and not started.
    pub builds_waiting: u64,
    /// Builds running.
    pub builds_running: u64,
    /// Cores granted to running builds.
    pub cores_granted: u64,
    /// Memory granted to running builds, in bytes.
    pub memory_granted_bytes: u64,
    /// Cores the daemon may grant to builds.
    pub cores_total: u64,
    /// Memory the daemon may grant to builds, in bytes.
    pub memory_total_bytes: u64,
    /// The NAR bytes of every account's paths (a path several accounts hold counts for
    /// each).
    pub store_nar_bytes: u64,
    /// The paths of every account (a path several accounts hold counts for each).
    pub store_paths: u64,
    /// Free space on the state directory's file system, in bytes.
    pub free_bytes: u64,
    /// Machines of `[fleet]` by the state of their last probe: not probed yet, up, down.
    pub machines: [u64; 3],
    /// Builds running on machines of `[fleet]`.
    pub fleet_running: u64,
}

/// The `TYPE` of a gauge family.
const GAUGE: &str = "gauge";

/// The `TYPE` of a counter family.
const COUNTER: &str = "counter";

/// The text being written.
struct Exposition(String);

impl Exposition {
    fn line(&mut self, args: fmt::Arguments<'_>) {
        // Writing to a String cannot fail.
        let _ = self.0.write_fmt(args);
        self.0.push('\n');
    }

    /// The `HELP` and `TYPE` lines of a family; `help` has no backslash or newline.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.line(format_args!("# HELP {name} {help}"));
        self.line(format_args!("# TYPE {name} {kind}"));
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.line(format_args!("{name} {value}"));
    }

    /// A family of one sample per value of the label `key`.
    fn labelled<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        key: &str,
        samples: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        self.family(name, kind, help);
        for (label, value) in samples {
            self.line(format_args!(
                "{name}{{{key}=\"{}\"}} {value}",
                Escaped(label)
            ));
        }
    }

    /// A histogram family: its `_bucket`, `_sum` and `_count` samples. The count is the
    /// `+Inf` bucket as written, so that the two agree even while observations are made.
    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, "histogram", help);
        let mut cumulative = 0u64;
        let les = histogram.bounds.iter().map(|&(_, le)| le).chain(["+Inf"]);
        for (bucket, le) in histogram.buckets.iter().zip(les) {
            cumulative = cumulative.saturating_add(bucket.load(Ordering::Relaxed));
            self.line(format_args!("{name}_bucket{{le=\"{le}\"}} {cumulative}"));
        }
        let sum = Seconds(histogram.sum_micros.load(Ordering::Relaxed));
        self.line(format_args!("{name}_sum {sum}"));
        self.line(format_args!("{name}_count {cumulative}"));
    }
}

/// A label value with `\`, `"` and newlines escaped as the text format requires.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    /// The value of the sample written exactly as `series` (name and labels).
    fn value(text: &str, series: &str) -> u64 {
        let line = text
            .lines()
            .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
            .unwrap_or_else(|| panic!("no sample {series} in\n{text}"));
        line[series.len() + 1..].parse().unwrap()
    }

    /// The families in `text`, with their types, in order.
    fn families(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                (name.to_owned(), kind.to_owned())
            })
            .collect()
    }

    #[test]
    fn every_family_has_help_and_type_and_its_samples_follow() {
        let m = Metrics::new();
        let text = m.render(&Snapshot::default());
        let families = families(&text);
        assert_eq!(families.len(), 9 + 1 + 2 + 1 + 1 + 1 + 1 + 3 + 3 + 1 + 2);
        for (name, kind) in &families {
            assert!(name.starts_with("nixbuild_"), "{name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} is a {kind}"
            );
        }
        // Each sample belongs to the family whose TYPE line came last.
        let mut current = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                current = t.split_once(' ').unwrap().0.to_owned();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| *b == current))
                    .unwrap_or(name);
                assert_eq!(base, current, "{line}");
            }
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn gauges_come_from_the_snapshot() {
        let snapshot = Snapshot {
            builds_waiting: 1,
            builds_running: 2,
            cores_granted: 3,
            memory_granted_bytes: 4,
            cores_total: 5,
            memory_total_bytes: 6,
            store_nar_bytes: 7,
            store_paths: 8,
            free_bytes: 9,
            machines: [10, 11, 12],
            fleet_running: 13,
        };
        let text = Metrics::new().render(&snapshot);
        for (series, v) in [
            ("nixbuild_builds_waiting", 1),
            ("nixbuild_builds_running", 2),
            ("nixbuild_cores_granted", 3),
            ("nixbuild_memory_granted_bytes", 4),
            ("nixbuild_cores", 5),
            ("nixbuild_memory_bytes", 6),
            ("nixbuild_store_nar_bytes", 7),
            ("nixbuild_store_paths", 8),
            ("nixbuild_store_free_bytes", 9),
            ("nixbuild_fleet_machines{state=\"unknown\"}", 10),
            ("nixbuild_fleet_machines{state=\"up\"}", 11),
            ("nixbuild_fleet_machines{state=\"down\"}", 12),
            ("nixbuild_fleet_builds_running", 13),
        ] {
            assert_eq!(value(&text, series), v, "{series}");
        }
    }

    #[test]
    fn every_label_value_is_present_at_zero() {
        let text = Metrics::new().render(&Snapshot::default());
        for p in ["serve", "daemon", "command"] {
            assert_eq!(
                value(&text, &format!("nixbuild_sessions{{protocol=\"{p}\"}}")),
                0
            );
            let total = format!("nixbuild_sessions_total{{protocol=\"{p}\"}}");
            assert_eq!(value(&text, &total), 0);
        }
        for d in [
            "upload",
            "download",
            "substitute",
            "to_machine",
            "from_machine",
        ] {
            let series = format!("nixbuild_transfer_bytes_total{{direction=\"{d}\"}}");
            assert_eq!(value(&text, &series), 0);
        }
        for r in [
            "sessions",
            "builds",
            "quota",
            "unsupported",
            "disk_reserve",
            "command",
        ] {
            assert_eq!(
                value(&text, &format!("nixbuild_refusals_total{{reason=\"{r}\"}}")),
                0
            );
        }
        assert_eq!(statuses().count(), STATUSES);
        for status in statuses() {
            let series = format!(
                "nixbuild_builds_finished_total{{result=\"{}\"}}",
                status_label(status)
            );
            assert_eq!(value(&text, &series), 0);
        }
        assert!(text.contains("nixbuild_builds_finished_total{result=\"no_substituters\"} 0\n"));
        assert!(text.contains("nixbuild_builds_finished_total{result=\"already_valid\"} 0\n"));
        for name in [
            "nixbuild_builds_queued_total",
            "nixbuild_fleet_builds_total",
            "nixbuild_gc_runs_total",
            "nixbuild_gc_freed_bytes_total",
            "nixbuild_gc_removed_paths_total",
        ] {
            assert_eq!(value(&text, name), 0);
        }
        let info = format!(
            "nixbuild_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&text, &info), 1);
    }

    #[test]
    fn counters_increase_after_calls() {
        let m = Metrics::new();
        m.transferred(Direction::Upload, 100);
        m.transferred(Direction::Upload, 23);
        m.transferred(Direction::Substitute, 7);
        m.transferred(Direction::FromMachine, 9);
        m.fleet_build();
        m.refused(Refusal::Quota);
        m.refused(Refusal::Quota);
        m.refused(Refusal::DiskReserve);
        m.build_queued();
        m.build_finished(BuildStatus::Built, Some(Duration::from_secs(2)));
        m.build_finished(BuildStatus::NoSubstituters, None);
        m.build_finished(BuildStatus::TimedOut, Some(Duration::from_secs(20_000)));
        m.collection(4096, 3);
        m.collection(1, 1);
        let text = m.render(&Snapshot::default());
        for (series, v) in [
            ("nixbuild_transfer_bytes_total{direction=\"upload\"}", 123),
            ("nixbuild_transfer_bytes_total{direction=\"download\"}", 0),
            ("nixbuild_transfer_bytes_total{direction=\"substitute\"}", 7),
            (
                "nixbuild_transfer_bytes_total{direction=\"from_machine\"}",
                9,
            ),
            ("nixbuild_fleet_builds_total", 1),
            ("nixbuild_refusals_total{reason=\"quota\"}", 2),
            ("nixbuild_refusals_total{reason=\"disk_reserve\"}", 1),
            ("nixbuild_refusals_total{reason=\"sessions\"}", 0),
            ("nixbuild_builds_queued_total", 1),
            ("nixbuild_builds_finished_total{result=\"built\"}", 1),
            (
                "nixbuild_builds_finished_total{result=\"no_substituters\"}",
                1,
            ),
            ("nixbuild_builds_finished_total{result=\"timed_out\"}", 1),
            ("nixbuild_builds_finished_total{result=\"misc_failure\"}", 0),
            ("nixbuild_build_duration_seconds_count", 2),
            ("nixbuild_build_duration_seconds_bucket{le=\"5\"}", 1),
            ("nixbuild_build_duration_seconds_bucket{le=\"14400\"}", 1),
            ("nixbuild_build_duration_seconds_bucket{le=\"+Inf\"}", 2),
            ("nixbuild_gc_runs_total", 2),
            ("nixbuild_gc_freed_bytes_total", 4097),
            ("nixbuild_gc_removed_paths_total", 4),
        ] {
            assert_eq!(value(&text, series), v, "{series}");
        }
        assert!(text.contains("\nnixbuild_build_duration_seconds_sum 20002\n"));
    }

    #[test]
    fn buckets_are_cumulative_and_end_in_inf_equal_to_count() {
        let m = Metrics::new();
        let setups = [
            0, 1, 5, 6, 99, 100, 101, 700, 1_000, 3_000, 4_999, 5_000, 5_001, 90_000,
        ];
        for ms in setups {
            m.build_started(Duration::from_millis(ms * 100), Duration::from_millis(ms));
        }
        let text = m.render(&Snapshot::default());
        for name in [
            "nixbuild_build_queue_wait_seconds",
            "nixbuild_build_setup_seconds",
            "nixbuild_build_duration_seconds",
        ] {
            let prefix = format!("{name}_bucket{{le=\"");
            let buckets: Vec<(&str, u64)> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .map(|l| {
                    let (le, v) = l.split_once("\"} ").unwrap();
                    (le, v.parse().unwrap())
                })
                .collect();
            assert_eq!(buckets.len(), BOUNDS + 1, "{name}");
            assert_eq!(buckets.last().unwrap().0, "+Inf");
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{name}: {buckets:?}"
            );
            let les: Vec<f64> = buckets[..BOUNDS]
                .iter()
                .map(|(le, _)| le.parse().unwrap())
                .collect();
            assert!(les.windows(2).all(|w| w[0] < w[1]), "{name}: {les:?}");
            let count = value(&text, &format!("{name}_count"));
            assert_eq!(buckets.last().unwrap().1, count);
        }
        // Setup: bounds are inclusive (`le`), in seconds.
        for (le, v) in [
            ("0.005", 3),
            ("0.01", 4),
            ("0.1", 6),
            ("0.5", 7),
            ("1", 9),
            ("2.5", 9),
            ("5", 12),
            ("+Inf", 14),
        ] {
            let series = format!("nixbuild_build_setup_seconds_bucket{{le=\"{le}\"}}");
            assert_eq!(value(&text, &series), v, "{series}");
        }
        // Sums in seconds, from milliseconds: 110.012 s of setup, a hundred times that waited.
        assert_eq!(setups.iter().sum::<u64>(), 110_012);
        assert!(
            text.contains("\nnixbuild_build_setup_seconds_sum 110.012\n"),
            "{text}"
        );
        assert!(text.contains("\nnixbuild_build_queue_wait_seconds_sum 11001.2\n"));
        assert_eq!(value(&text, "nixbuild_build_queue_wait_seconds_count"), 14);
        assert!(text.contains("\nnixbuild_build_duration_seconds_sum 0\n"));
        assert_eq!(value(&text, "nixbuild_build_duration_seconds_count"), 0);
    }

    #[test]
    fn session_guard_counts_open_sessions_until_dropped() {
        static M: Metrics = Metrics::new();
        let open = |p: &str| {
            value(
                &M.render(&Snapshot::default()),
                &format!("nixbuild_sessions{{protocol=\"{p}\"}}"),
            )
        };
        let total = |p: &str| {
            value(
                &M.render(&Snapshot::default()),
                &format!("nixbuild_sessions_total{{protocol=\"{p}\"}}"),
            )
        };
        let a = M.session_started(SessionKind::Serve);
        let b = M.session_started(SessionKind::Serve);
        let c = M.session_started(SessionKind::Daemon);
        assert_eq!((open("serve"), open("daemon"), open("command")), (2, 1, 0));
        drop(a);
        assert_eq!(open("serve"), 1);
        drop((b, c));
        assert_eq!((open("serve"), open("daemon")), (0, 0));
        assert_eq!(
            (total("serve"), total("daemon"), total("command")),
            (2, 1, 0)
        );
    }

    #[test]
    fn seconds_are_valid_prometheus_floats() {
        for (micros, text) in [
            (0, "0"),
            (1, "0.000001"),
            (5_000, "0.005"),
            (1_500_000, "1.5"),
            (3_000_000, "3"),
            (10_000_010, "10.00001"),
            (u64::MAX, "18446744073709.551615"),
        ] {
            assert_eq!(Seconds(micros).to_string(), text);
            let _: f64 = text.parse().unwrap();
        }
        assert_eq!(Escaped("a\"b\\c\nd").to_string(), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn huge_durations_saturate_the_sum() {
        let m = Metrics::new();
        m.build_finished(BuildStatus::Built, Some(Duration::MAX));
        m.build_finished(BuildStatus::Built, Some(Duration::MAX));
        let text = m.render(&Snapshot::default());
        assert!(text.contains("\nnixbuild_build_duration_seconds_sum 18446744073709.551615\n"));
        let inf = "nixbuild_build_duration_seconds_bucket{le=\"+Inf\"}";
        assert_eq!(value(&text, inf), 2);
        assert_eq!(
            value(
                &text,
                "nixbuild_build_duration_seconds_bucket{le=\"14400\"}"
            ),
            0
        );
    }
}
