//! What a daemon's log says about its builds and downloads, for tests that check from the
//! server's side what ran, in which order, how many at once, and what left the server.
//!
//! The log is tracing's default format: one record per event, starting with a timestamp
//! (`2026-12-06T06:11:59.123456Z  INFO target: message key=value …`). A record may span
//! several lines (a failed build's message quotes its log tail), and its fields come after
//! the message, so a record is read whole and its fields are taken from its end.

/// What a build event of the log (target `nixbuild::build`) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `queued`: the build waits for the scheduler.
    Queued,
    /// `building`: the build's sandbox is starting (it holds its grant and a uid).
    Building,
    /// `build finished: …`: the build is over (`status=` says how).
    Finished,
}

/// One build event of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildEvent {
    /// What happened.
    pub kind: Kind,
    /// The account the build ran for.
    pub account: String,
    /// The derivation (absolute `.drv` path).
    pub drv: String,
    /// The cores granted (`cores=` of a `building` event).
    pub cores: Option<u32>,
    /// How the build ended (`status=` of a `build finished` event: `Built`, …).
    pub status: Option<String>,
}

/// The log's records: each line starting with a timestamp, with the lines after it that do
/// not.
pub fn records(log: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines() {
        match out.last_mut() {
            Some(last) if !starts_with_timestamp(line) => {
                last.push('\n');
                last.push_str(line);
            }
            _ => out.push(line.to_owned()),
        }
    }
    out
}

/// Whether `line` starts like `2026-12-06T06:11:59`.
fn starts_with_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() >= 19
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
}

/// The value of field `key` in a record: the last ` key=` (fields follow the message, which
/// may quote anything), up to the next white space.
pub fn field<'a>(record: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let at = record.rfind(&needle)? + needle.len();
    record[at..].split_whitespace().next()
}

/// The build events of `log`, in the log's order.
pub fn build_events(log: &str) -> Vec<BuildEvent> {
    const TARGET: &str = "nixbuild::build: ";
    records(log)
        .iter()
        .filter_map(|record| {
            let message = &record[record.find(TARGET)? + TARGET.len()..];
            let kind = if message.starts_with("queued ") {
                Kind::Queued
            } else if message.starts_with("building ") && field(record, "uid").is_some() {
                Kind::Building
            } else if message.starts_with("build finished") {
                Kind::Finished
            } else {
                return None;
            };
            Some(BuildEvent {
                kind,
                account: field(record, "account")?.to_owned(),
                drv: field(record, "drv")?.to_owned(),
                cores: field(record, "cores").and_then(|c| c.parse().ok()),
                status: field(record, "status").map(str::to_owned),
            })
        })
        .collect()
}

/// The store paths whose NARs the daemon sent over ssh-ng (NarFromPath: `sent NAR` with
/// `path=`), in the log's order.
pub fn sent_nars(log: &str) -> Vec<String> {
    records(log)
        .iter()
        .filter(|r| r.contains(" sent NAR"))
        .filter_map(|r| field(r, "path").map(str::to_owned))
        .collect()
}

/// How many builds of `drv` the events show starting.
pub fn starts_of(events: &[BuildEvent], drv: &str) -> usize {
    events
        .iter()
        .filter(|e| e.kind == Kind::Building && e.drv == drv)
        .count()
}

/// The most builds, and the most cores, that the events show running at once (between a
/// build's `building` and its `build finished`).
pub fn most_at_once(events: &[BuildEvent]) -> (usize, u32) {
    let mut running: Vec<(&str, u32)> = Vec::new();
    let (mut builds, mut cores) = (0, 0);
    for e in events {
        match e.kind {
            Kind::Building => {
                running.push((&e.drv, e.cores.unwrap_or(1)));
                builds = builds.max(running.len());
                cores = cores.max(running.iter().map(|(_, c)| c).sum());
            }
            Kind::Finished => {
                if let Some(i) = running.iter().position(|(d, _)| *d == e.drv) {
                    running.remove(i);
                }
            }
            Kind::Queued => {}
        }
    }
    (builds, cores)
}
