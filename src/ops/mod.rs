//! The operations interface: `ssh HOST nixbuild <subcommand> [--json]`, run as the key's
//! account (docs/operations.md). [`command`] parses the words; this module answers from the
//! build service's builds in flight, the store's build records, logs, traffic and paths, and
//! the configuration; [`view`] renders the answers as text or as JSON (schema version
//! [`view::SCHEMA_VERSION`]).
//!
//! An account sees and acts on only its own builds, logs, paths and usage: every lookup is
//! made with the account (a build id of another account is "not found", exactly like one
//! that never existed). Accounts in `[admin] accounts` may add `--account NAME` or `--all`
//! and have `accounts`, `gc` and `status`.

pub mod command;
pub mod view;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};

use bytes::Bytes;

use crate::builds::{BuildService, LiveBuild};
use crate::collector::Collector;
use crate::config::Config;
use crate::session::{SessionOutput, WriteTimeout};
use crate::store::{BuildRecord, LogReader, Store, StoreError};
use command::{BuildRef, Command, Invocation, Scope};
use view::{BuildView, Document};

/// Exit status of a command that did what was asked.
pub const EXIT_OK: u32 = 0;
/// Exit status of a command that failed (not found, refused, an internal error).
pub const EXIT_FAILED: u32 = 1;
/// Exit status of words that are not a command.
pub const EXIT_USAGE: u32 = 2;
/// What `whoami` says of the key of a command relayed by `nixbuild-serve`: OpenSSH checked
/// it, and the relay only knows the account its forced command names.
pub const RELAYED_KEY: &str = "(checked by OpenSSH; relayed by nixbuild-serve)";

/// What a command runs with: the service, and who asks.
pub struct Ops<'a> {
    /// The daemon's store.
    pub store: &'a Store,
    /// The daemon's build service.
    pub builds: &'a BuildService,
    /// The configuration in force.
    pub config: &'a Config,
    /// The collector, for `gc`.
    pub collector: Option<&'a Collector>,
    /// The account of the key.
    pub account: &'a str,
    /// The key's fingerprint.
    pub key: &'a str,
}

/// Why a command failed: the message its caller gets after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The words are not a command.
    #[error(transparent)]
    Usage(#[from] command::ParseError),
    /// Not allowed for this account.
    #[error("{0}")]
    Denied(String),
    /// No such build (for this account).
    #[error("{0}")]
    NotFound(String),
    /// The build cannot be cancelled.
    #[error(transparent)]
    Cancel(#[from] crate::builds::CancelError),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The collector failed.
    #[error("collection failed: {0}")]
    Collect(String),
    /// A blocking task failed.
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The output could not be written (the client went away).
    #[error("writing the answer: {0}")]
    Io(#[from] io::Error),
}

/// Runs `nixbuild <words>` for `ops`' account, writing the answer to `out`'s stdout and
/// errors to its stderr; returns the exit status.
pub async fn run<O: SessionOutput>(ops: &Ops<'_>, words: &[String], out: &mut O) -> u32 {
    let _counted = crate::metrics::METRICS.session_started(crate::metrics::SessionKind::Command);
    tracing::info!(account = ops.account, command = ?words, "nixbuild command");
    // A client that stops reading cannot hold its session place (and a log reader) forever.
    let out = &mut WriteTimeout {
        inner: out,
        limit: ops.config.timeouts.write(),
    };
    let result = match command::parse(words) {
        Ok(invocation) => ops.execute(&invocation, out).await,
        Err(e) => Err(OpsError::Usage(e)),
    };
    let status = match &result {
        Ok(()) => EXIT_OK,
        Err(OpsError::Usage(_)) => EXIT_USAGE,
        Err(_) => EXIT_FAILED,
    };
    if let Err(e) = &result {
        tracing::info!(account = ops.account, error = %e, "nixbuild command failed");
        if e.is_refusal() {
            crate::metrics::METRICS.refused(crate::metrics::Refusal::Command);
        }
        let _ = out.stderr(format!("error: {e}\n").as_bytes()).await;
    }
    let _ = out.flush().await;
    status
}

impl OpsError {
    /// Whether the caller was refused (bad words, not allowed, not found), rather than the
    /// server failing.
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            OpsError::Usage(_) | OpsError::Denied(_) | OpsError::NotFound(_) | OpsError::Cancel(_)
        )
    }
}

impl Ops<'_> {
    fn is_admin(&self) -> bool {
        self.config.admin.is_admin(self.account)
    }

    /// The account whose data the invocation reads (`None`: every account's).
    fn scope(&self, invocation: &Invocation) -> Result<Option<String>, OpsError> {
        let denied = || {
            OpsError::Denied(
                "only admins ([admin] accounts in the server's configuration) may use \
                 --account NAME or --all"
                    .to_owned(),
            )
        };
        match &invocation.scope {
            Scope::Own => Ok(Some(self.account.to_owned())),
            Scope::Account(a) if a == self.account => Ok(Some(a.clone())),
            Scope::Account(a) if self.is_admin() => Ok(Some(a.clone())),
            Scope::All if self.is_admin() => Ok(None),
            _ => Err(denied()),
        }
    }

    async fn execute<O: SessionOutput>(
        &self,
        invocation: &Invocation,
        out: &mut O,
    ) -> Result<(), OpsError> {
        if invocation.command.admin_only() && !self.is_admin() {
            return Err(OpsError::Denied(
                "only admins ([admin] accounts in the server's configuration) may run this"
                    .to_owned(),
            ));
        }
        let scope = self.scope(invocation)?;
        let scope = scope.as_deref();
        let json = invocation.json;
        let document = match &invocation.command {
            Command::Help => {
                if json {
                    Document::Help {
                        text: command::HELP,
                    }
                } else {
                    return write(out, command::HELP.as_bytes()).await;
                }
            }
            Command::Whoami => self.whoami().await?,
            Command::Builds { max } => Document::Builds {
                builds: self.builds_list(scope, *max).await?,
            },
            Command::Show(build) => Document::Build {
                build: self.find(scope, build).await?,
            },
            Command::Log { build, follow } => {
                return self.log(scope, build, *follow, json, out).await;
            }
            Command::Cancel(id) => {
                let by = if self.is_admin() {
                    format!("admin {}", self.account)
                } else {
                    format!("account {}", self.account)
                };
                let as_account = if self.is_admin() { None } else { scope };
                self.builds.cancel(as_account, *id, &by)?;
                Document::Cancelled { id: *id }
            }
            Command::Usage { since } => self.usage(scope, *since).await?,
            Command::Paths { max } => {
                let Some(account) = scope else {
                    return Err(OpsError::Denied(
                        "paths lists one account's paths: use --account NAME".to_owned(),
                    ));
                };
                let (store, account, max) = (self.store.clone(), account.to_owned(), *max);
                let paths =
                    tokio::task::spawn_blocking(move || store.held_paths(&account, max)).await??;
                Document::Paths { paths }
            }
            Command::Accounts => self.accounts().await?,
            Command::Gc => {
                let collector = self
                    .collector
                    .ok_or_else(|| OpsError::Collect("the collector is not running".into()))?;
                let stats = collector.collect().await.map_err(OpsError::Collect)?;
                Document::Collected {
                    stats: stats.into(),
                }
            }
            Command::Status => self.status().await?,
        };
        let document = match scope {
            Some(account) => document.seen_by(account),
            None => document,
        };
        let text = if json {
            document.to_json()
        } else {
            document.to_text()
        };
        write(out, text.as_bytes()).await
    }

    /// Builds in flight and the newest `max` records, newest first; a shared build once.
    async fn builds_list(
        &self,
        scope: Option<&str>,
        max: usize,
    ) -> Result<Vec<BuildView>, OpsError> {
        let live = self.builds.live_builds(scope);
        let (store, account) = (self.store.clone(), scope.map(str::to_owned));
        // Enough rows for `max` builds even when each has a record per account.
        let rows = if account.is_some() { max } else { max * 4 };
        let recorded = tokio::task::spawn_blocking(move || {
            let records = store.records(account.as_deref(), rows)?;
            let mut views = merge_records(records);
            views.truncate(max);
            for view in &mut views {
                view.shorten_error();
            }
            Ok::<_, StoreError>(views)
        })
        .await??;
        let mut views: BTreeMap<u64, BuildView> = BTreeMap::new();
        for view in recorded {
            views.insert(view.id, view);
        }
        for build in &live {
            views.insert(build.id, BuildView::live(build));
        }
        Ok(views.into_values().rev().collect())
    }

    /// The build `build` names, live or recorded.
    async fn find(&self, scope: Option<&str>, build: &BuildRef) -> Result<BuildView, OpsError> {
        let not_found = || OpsError::NotFound(format!("no build {} for this account", name(build)));
        let live = match build {
            BuildRef::Id(id) => self.builds.live_build(scope, *id),
            BuildRef::Drv(drv) => self
                .builds
                .live_builds(scope)
                .into_iter()
                .rev()
                .find(|b| &b.drv == drv),
        };
        if let Some(live) = live {
            return Ok(BuildView::live(&live));
        }
        let (store, account, build) = (self.store.clone(), scope.map(str::to_owned), build.clone());
        let records = tokio::task::spawn_blocking(move || match build {
            BuildRef::Id(id) => store.build_records(account.as_deref(), id),
            BuildRef::Drv(drv) => {
                let newest = store.drv_records(account.as_deref(), &drv.to_absolute(), 1)?;
                match newest.first() {
                    Some(r) => store.build_records(account.as_deref(), r.build),
                    None => Ok(Vec::new()),
                }
            }
        })
        .await??;
        merge_records(records)
            .into_iter()
            .next()
            .ok_or_else(not_found)
    }

    /// `log`: a live build's log so far (and, with `follow`, the rest), or a finished one's
    /// stored log, streamed as it is decompressed.
    async fn log<O: SessionOutput>(
        &self,
        scope: Option<&str>,
        build: &BuildRef,
        follow: bool,
        json: bool,
        out: &mut O,
    ) -> Result<(), OpsError> {
        let found = self.find(scope, build).await?;
        let id = found.id;
        let mut log = LogOut {
            json: json.then(Vec::new),
        };
        // A build whose outcome is known and whose log went to its record is read from the
        // record, once it is stored.
        let live = found
            .is_live()
            .then(|| self.builds.follow(scope, id))
            .flatten()
            .filter(|reader| reader.so_far.is_some() || reader.outcome().is_none());
        if live.is_none() && found.is_live() {
            self.wait_recorded(scope, id).await;
        }
        let complete = match live {
            Some(mut reader) => {
                if let Some(so_far) = reader.so_far.take() {
                    log.stream(out, so_far.open()?).await?;
                }
                if follow {
                    while let Some(chunk) = reader.next().await {
                        log.emit(out, chunk).await?;
                    }
                }
                reader.outcome().is_some()
            }
            None => {
                let (store, account) = (self.store.clone(), scope.map(str::to_owned));
                let reader = tokio::task::spawn_blocking(move || {
                    store.open_record_log(account.as_deref(), id)
                })
                .await??
                .ok_or_else(|| {
                    OpsError::NotFound(format!(
                        "the log of build {id} is not kept (it expired after [store] \
                         log_retention, or could not be stored)"
                    ))
                })?;
                log.stream(out, reader).await?;
                true
            }
        };
        match log.json {
            Some(text) => {
                let doc = Document::Log {
                    id,
                    complete,
                    log: String::from_utf8_lossy(&text).into_owned(),
                };
                write(out, doc.to_json().as_bytes()).await
            }
            None => Ok(()),
        }
    }

    /// Waits (at most [`RECORD_WAIT`]) until build `id`, whose outcome is known, has left the
    /// builds in flight: its record is stored then.
    async fn wait_recorded(&self, scope: Option<&str>, id: u64) {
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        while self.builds.live_build(scope, id).is_some() && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn whoami(&self) -> Result<Document, OpsError> {
        let store = self.store.clone();
        let account = self.account.to_owned();
        let (nar_bytes, paths) =
            tokio::task::spawn_blocking(move || store.usage(&account)).await??;
        let policy = self.store.policy();
        let (max_builds, max_running) = self.builds.limits_of(self.account);
        let live = self.builds.live_builds(Some(self.account));
        Ok(Document::Whoami(view::Whoami {
            account: self.account.to_owned(),
            key: self.key.to_owned(),
            admin: self.is_admin(),
            max_builds,
            max_running_builds: max_running,
            max_sessions: self.config.limits.max_sessions_per_account,
            retention_seconds: policy.retention_of(self.account),
            quota_bytes: policy.quota_of(self.account),
            nar_bytes,
            paths,
            builds_in_flight: live.len(),
        }))
    }

    async fn usage(&self, scope: Option<&str>, since: u64) -> Result<Document, OpsError> {
        // Whole UTC days, as the store sums them.
        let since_ms = crate::store::now_ms().saturating_sub(since.saturating_mul(1000));
        let since_ms = since_ms - since_ms % 86_400_000;
        let (store, account) = (self.store.clone(), scope.map(str::to_owned));
        let (days, holding) = tokio::task::spawn_blocking(move || {
            let days = store.daily_usage(account.as_deref(), since_ms)?;
            let holding = match account.as_deref() {
                Some(a) => store.usage(a)?,
                None => {
                    let all = store.total_holding()?;
                    (all.nar_bytes, all.paths)
                }
            };
            Ok::<_, StoreError>((days, holding))
        })
        .await??;
        Ok(Document::Usage {
            account: scope.map(str::to_owned),
            since_ms,
            days: days.into_iter().map(Into::into).collect(),
            nar_bytes: holding.0,
            paths: holding.1,
        })
    }

    async fn accounts(&self) -> Result<Document, OpsError> {
        let store = self.store.clone();
        let holdings = tokio::task::spawn_blocking(move || store.holdings()).await??;
        let policy = self.store.policy();
        let live = self.builds.live_builds(None);
        let mut names: Vec<String> = holdings.iter().map(|h| h.account.clone()).collect();
        names.extend(self.config.accounts.keys().cloned());
        names.extend(live.iter().flat_map(|b| b.accounts.iter().cloned()));
        names.sort();
        names.dedup();
        let accounts = names
            .into_iter()
            .map(|name| {
                let held = holdings.iter().find(|h| h.account == name);
                let in_flight: Vec<&LiveBuild> =
                    live.iter().filter(|b| b.accounts.contains(&name)).collect();
                view::AccountView {
                    nar_bytes: held.map_or(0, |h| h.nar_bytes),
                    paths: held.map_or(0, |h| h.paths),
                    quota_bytes: policy.quota_of(&name),
                    retention_seconds: policy.retention_of(&name),
                    running: in_flight.iter().filter(|b| b.is_running()).count(),
                    waiting: in_flight.iter().filter(|b| !b.is_running()).count(),
                    admin: self.config.admin.is_admin(&name),
                    account: name,
                }
            })
            .collect();
        Ok(Document::Accounts { accounts })
    }

    async fn status(&self) -> Result<Document, OpsError> {
        let store = self.store.clone();
        let (free, all) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((store.free_space()?, store.total_holding()?))
        })
        .await??;
        let load = self.builds.load();
        Ok(Document::Status(view::Status {
            server_version: env!("CARGO_PKG_VERSION"),
            cores: load.cores,
            memory_bytes: load.memory,
            builds_running: load.running,
            builds_waiting: load.waiting,
            cores_granted: load.cores_granted,
            memory_granted_bytes: load.memory_granted,
            free_bytes: free,
            disk_reserve_bytes: self.config.store.disk_reserve,
            accounts: all.accounts,
            nar_bytes: all.nar_bytes,
            paths: all.paths,
            pinned_paths: self.store.pinned_rows(),
            fleet: Some(self.builds.fleet().view())
                .filter(|f| f.file.is_some() || !f.machines.is_empty()),
        }))
    }
}

/// A build as named on the command line, for messages.
fn name(build: &BuildRef) -> String {
    match build {
        BuildRef::Id(id) => id.to_string(),
        BuildRef::Drv(drv) => format!("of {drv}"),
    }
}

/// Records (newest first) as builds: the records of one shared build, one per account,
/// become one view naming every account.
fn merge_records(records: Vec<BuildRecord>) -> Vec<BuildView> {
    let mut views: Vec<BuildView> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    for record in records {
        match index.get(&record.build) {
            Some(&i) => views[i].accounts.push(record.account),
            None => {
                index.insert(record.build, views.len());
                views.push(BuildView::recorded(record));
            }
        }
    }
    for view in &mut views {
        view.accounts.sort();
    }
    views
}

/// Longest `log` waits for the record of a build that has just ended.
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Most bytes of log `log --json` puts in its document (the text form streams any size).
pub const MAX_JSON_LOG: usize = 16 << 20;

/// Bytes of a stored log read at a time.
const LOG_CHUNK: usize = 64 << 10;

/// Where `log` sends a log: to the client as it comes, or, for `--json`, kept for the
/// document.
struct LogOut {
    json: Option<Vec<u8>>,
}

impl LogOut {
    async fn emit<O: SessionOutput>(&mut self, out: &mut O, chunk: Bytes) -> Result<(), OpsError> {
        let Some(kept) = &mut self.json else {
            out.stdout(chunk).await?;
            return Ok(out.flush().await?);
        };
        if kept.len() + chunk.len() > MAX_JSON_LOG {
            return Err(OpsError::Denied(format!(
                "the log is longer than {} MiB, the most `log --json` returns; read it \
                 without --json",
                MAX_JSON_LOG >> 20
            )));
        }
        kept.extend_from_slice(&chunk);
        Ok(())
    }

    /// Sends what `reader` decompresses, chunk by chunk, read on a blocking thread.
    async fn stream<O: SessionOutput>(
        &mut self,
        out: &mut O,
        mut reader: LogReader,
    ) -> Result<(), OpsError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let task = tokio::task::spawn_blocking(move || loop {
            let mut buf = vec![0; LOG_CHUNK];
            let chunk = match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        });
        while let Some(chunk) = rx.recv().await {
            self.emit(out, chunk?).await?;
        }
        Ok(task.await?)
    }
}

async fn write<O: SessionOutput>(out: &mut O, bytes: &[u8]) -> Result<(), OpsError> {
    out.stdout(Bytes::copy_from_slice(bytes)).await?;
    Ok(out.flush().await?)
}
