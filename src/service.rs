//! The service a protocol driver talks to, for one session: the store, the build service
//! and the limits of one account ([`SessionContext`]), and the errors they answer with
//! ([`ServiceError`]). The serve driver ([`crate::session`]) decodes requests and writes
//! answers; what a request does to the store, which builds it starts and which limits it is
//! held to is here, so that a second protocol's driver (the worker protocol, ssh-ng) reuses
//! it rather than copying it. Every call runs as the session's account and sees only its
//! paths.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nixbuild_core::account::{AccountCounts, AccountSlot};
use nixbuild_core::budget::MemoryBudget;
use nixbuild_core::content_address::ContentAddress;
use nixbuild_core::serve::{self, BuildOptions, ValidPathInfo};
use nixbuild_core::store_path::StorePath;
use nixbuild_core::wire;
use nixbuild_core::worker::DerivedPath;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::buffers::{BufferPool, CHANNEL_DEPTH};
use crate::builds::{BuildJob, BuildService, DrvError, GraphPlan, GraphRun, Waiter};
use crate::config::Config;
use crate::metrics::{Direction, METRICS};
use crate::store::{Import, PathClaim, Pins, Store, StoreError, Traffic};
use crate::substitute::Substituter;

/// Queries of at most this many paths run on the session's thread when the store is idle
/// (see [`SessionContext::query`]).
const INLINE_QUERY_PATHS: usize = 64;

/// Why a session was refused before it began, relayed or over SSH; the client sees it after
/// `error: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionLimit {
    /// The daemon serves `[limits] max_sessions` sessions already.
    #[error(
        "the nixbuild daemon is serving its maximum of {0} sessions; try again later \
         (max_sessions in [limits] of the server's configuration)"
    )]
    Daemon(usize),
    /// The account has `[limits] max_sessions_per_account` sessions already.
    #[error(
        "account {account} already has {max} sessions, the most this server allows at once \
         (max_sessions_per_account in [limits] of the server's configuration)"
    )]
    Account {
        /// The account.
        account: String,
        /// Its limit.
        max: usize,
    },
}

/// The places sessions hold while they run, relayed and over SSH alike: one among `[limits]
/// max_sessions` for the daemon, one among `max_sessions_per_account` for the account. Both
/// bound what sessions hold beside the request budget (chunk buffers, channels).
#[derive(Debug)]
pub struct SessionPlaces {
    open: Arc<Semaphore>,
    max: usize,
    accounts: Arc<AccountCounts>,
}

impl SessionPlaces {
    /// Room for `max_sessions` sessions at once (fixed until a restart).
    pub fn new(max_sessions: usize) -> SessionPlaces {
        SessionPlaces {
            open: Arc::new(Semaphore::new(max_sessions)),
            max: max_sessions,
            accounts: Arc::default(),
        }
    }

    /// A place among the daemon's sessions, held until dropped.
    pub fn daemon_place(&self) -> Result<OwnedSemaphorePermit, SessionLimit> {
        self.open
            .clone()
            .try_acquire_owned()
            .map_err(|_| SessionLimit::Daemon(self.max))
    }

    /// A place among `account`'s at most `max` sessions, held until dropped.
    pub fn account_place(&self, account: &str, max: usize) -> Result<AccountSlot, SessionLimit> {
        self.accounts
            .acquire(account, max)
            .ok_or_else(|| SessionLimit::Account {
                account: account.to_owned(),
                max,
            })
    }
}

/// Why the service refused or failed a session's request. The message is what the client
/// sees after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The store refused or failed.
    #[error("{what}: {source}")]
    Store {
        /// What the session was doing.
        what: String,
        /// The store's error (boxed: it is large, and errors are rare).
        source: Box<StoreError>,
    },
    /// A request names more paths than the configuration allows.
    #[error(
        "{request} names {count} paths; this server accepts at most {max} per request \
         (max_paths_per_request in [store] of the server's configuration)"
    )]
    TooManyPaths {
        /// The request.
        request: &'static str,
        /// How many paths it names.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The session uploaded more NAR bytes than the configuration allows.
    #[error(
        "this session uploaded more than {max} bytes of NAR data, the most this server \
         accepts in one session (max_upload_bytes_per_session in [limits] of the server's \
         configuration)"
    )]
    UploadLimit {
        /// The limit.
        max: u64,
    },
    /// A blocking store task panicked or was cancelled (a bug, not bad input).
    #[error("internal error in a store task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A store error met while doing `what`.
pub fn store_error(what: &str) -> impl FnOnce(StoreError) -> ServiceError + '_ {
    move |source| {
        if matches!(source, StoreError::Quota { .. }) {
            crate::metrics::METRICS.refused(crate::metrics::Refusal::Quota);
        }
        ServiceError::Store {
            what: what.to_owned(),
            source: Box::new(source),
        }
    }
}

impl Drop for SessionContext<'_> {
    /// Adds what the session moved to its account's traffic of the day (`nixbuild usage`),
    /// off the session's thread.
    fn drop(&mut self) {
        let traffic = Traffic {
            uploaded: self.uploaded,
            downloaded: self.downloaded,
            substituted: 0,
        };
        if traffic.is_empty() {
            return;
        }
        let (store, account) = (self.store.clone(), self.settings.account.clone());
        let count = move || {
            if let Err(e) = store.add_traffic(&account, traffic) {
                tracing::warn!(%account, "the session's traffic is not counted: {e}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(count)),
            Err(_) => count(),
        }
    }
}

/// What one session may do.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The account whose paths the session sees and adds to.
    pub account: String,
    /// `--write`: ImportPaths, AddToStoreNar, BuildPaths and BuildDerivation are allowed.
    pub write_allowed: bool,
    /// Bounds for the protocol decoder.
    pub limits: serve::Limits,
    /// Most paths in one request or ImportPaths stream.
    pub max_paths_per_request: usize,
    /// Most bytes held of one unfinished request or ImportPaths trailer.
    pub max_request_bytes: usize,
    /// From the start of the session to the end of the handshake.
    pub handshake_timeout: Duration,
    /// Longest wait for the client's next bytes after the handshake.
    pub idle_timeout: Duration,
    /// Longest wait for one write or flush to the client.
    pub write_timeout: Duration,
    /// Most NAR bytes the session may upload.
    pub max_upload_bytes: u64,
    /// The daemon's budget of bytes held of unfinished requests, shared by all sessions
    /// (`[limits] max_buffered_bytes`).
    pub buffer_budget: Arc<MemoryBudget>,
}

impl SessionSettings {
    /// The settings for `account` under `config`, holding unfinished requests against
    /// `buffer_budget` (the daemon's one budget, [`Config::buffered_budget`]).
    pub fn new(
        config: &Config,
        account: &str,
        write_allowed: bool,
        buffer_budget: &Arc<MemoryBudget>,
    ) -> Self {
        let defaults = wire::Limits::default();
        SessionSettings {
            account: account.to_owned(),
            write_allowed,
            limits: serve::Limits {
                max_nar_size: config.store.max_nar_size,
                wire: wire::Limits {
                    max_list_len: config.store.max_paths_per_request,
                    max_string_len: config.store.max_request_bytes.min(defaults.max_string_len),
                    ..defaults
                },
            },
            max_paths_per_request: config.store.max_paths_per_request,
            max_request_bytes: config.store.max_request_bytes,
            handshake_timeout: config.timeouts.handshake(),
            idle_timeout: config.timeouts.idle(),
            write_timeout: config.timeouts.write(),
            max_upload_bytes: config.limits.max_upload_bytes_per_session,
            buffer_budget: buffer_budget.clone(),
        }
    }
}

/// One session's view of the service: the store and build service, as the session's
/// account, within its settings' limits. A protocol driver makes one per session and asks it
/// for everything that touches the store or starts a build.
pub struct SessionContext<'a> {
    store: &'a Store,
    builds: &'a BuildService,
    settings: &'a SessionSettings,
    /// NAR bytes uploaded so far in this session.
    uploaded: u64,
    /// NAR bytes downloaded so far in this session.
    downloaded: u64,
    /// What the session was told is valid, uploaded, or asked the closure of: kept from
    /// the collector until the session ends.
    pins: Pins,
}

impl<'a> SessionContext<'a> {
    /// A session on `store` and `builds` with `settings`, nothing uploaded yet.
    pub fn new(store: &'a Store, builds: &'a BuildService, settings: &'a SessionSettings) -> Self {
        SessionContext {
            store,
            builds,
            settings,
            uploaded: 0,
            downloaded: 0,
            pins: store.pins(),
        }
    }

    /// What the session may do, for whom.
    pub fn settings(&self) -> &'a SessionSettings {
        self.settings
    }

    /// The store (for the calls a driver makes in its own blocking tasks, such as exports
    /// streamed to the client).
    pub fn store(&self) -> &'a Store {
        self.store
    }

    /// Refuses a request naming more than `max_paths_per_request` paths.
    pub fn check_count(&self, request: &'static str, count: usize) -> Result<(), ServiceError> {
        let max = self.settings.max_paths_per_request;
        if count > max {
            return Err(ServiceError::TooManyPaths {
                request,
                count,
                max,
            });
        }
        Ok(())
    }

    /// Counts `bytes` more NAR bytes uploaded, refusing them past `max_upload_bytes`.
    pub fn charge_upload(&mut self, bytes: u64) -> Result<(), ServiceError> {
        self.uploaded = self.uploaded.saturating_add(bytes);
        METRICS.transferred(Direction::Upload, bytes);
        let max = self.settings.max_upload_bytes;
        if self.uploaded > max {
            return Err(ServiceError::UploadLimit { max });
        }
        Ok(())
    }

    /// Counts `bytes` NAR bytes sent to the client.
    pub fn count_download(&mut self, bytes: u64) {
        self.downloaded = self.downloaded.saturating_add(bytes);
        METRICS.transferred(Direction::Download, bytes);
    }

    /// Runs a store call for this session's account in a blocking task.
    pub async fn blocking<T, F>(&self, what: &str, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &str) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        let account = self.settings.account.clone();
        tokio::task::spawn_blocking(move || f(&store, &account))
            .await?
            .map_err(store_error(what))
    }

    /// Runs a store query for this session's account: on the session's own thread when it
    /// is `small` and the store is idle, since handing a query of a few paths to a blocking
    /// thread and back (two wake-ups) costs more than the query (a few indexed SQLite reads
    /// from memory); otherwise in a blocking task. (Nix asks QueryPathInfos for one path at
    /// a time before each download.)
    pub async fn query<T, F>(&self, what: &str, small: bool, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &str) -> Result<T, StoreError> + Send + 'static,
    {
        if small && self.store.is_idle() {
            return f(self.store, &self.settings.account).map_err(store_error(what));
        }
        self.blocking(what, f).await
    }

    /// Which of `paths` the account sees (QueryValidPaths).
    pub async fn query_valid_paths(
        &self,
        paths: BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ServiceError> {
        let small = paths.len() <= INLINE_QUERY_PATHS;
        let pins = self.pins.clone();
        self.query("querying valid paths", small, move |s, a| {
            s.hold_valid_paths(a, &paths, Some(&pins))
        })
        .await
    }

    /// Starts fetching from the binary caches those of `paths` the account lacks (with their
    /// closures) and granting them to it; `None` when no cache is configured. The driver
    /// relays its progress lines to the client, then asks which paths are valid.
    pub fn substitute(&self, paths: &BTreeSet<StorePath>) -> Option<Substitution> {
        let substituter = self.builds.substituter()?.clone();
        let account = self.settings.account.clone();
        let paths = paths.clone();
        let (tx, lines) = mpsc::channel(CHANNEL_DEPTH);
        let task = tokio::task::spawn_blocking(move || {
            substituter.substitute(&account, &paths, &|line| {
                // The session may be gone; the paths are fetched all the same.
                let _ = tx.blocking_send(line);
            });
        });
        Some(Substitution { lines, task })
    }

    /// Which of `paths` a binary cache has (or the server holds from one); none without
    /// caches. Nothing is fetched.
    pub async fn substitutable(
        &self,
        paths: BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ServiceError> {
        self.ask_substituter(move |s| s.substitutable(&paths)).await
    }

    /// The bytes fetching `paths` from the caches would download and unpack (see
    /// [`crate::substitute::Substituter::sizes`]); nothing without caches.
    pub async fn substitution_sizes(
        &self,
        paths: BTreeSet<StorePath>,
    ) -> Result<(u64, u64), ServiceError> {
        self.ask_substituter(move |s| s.sizes(&paths)).await
    }

    /// `f` of the substituter in a blocking task; the default answer without caches.
    async fn ask_substituter<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        T: Default + Send + 'static,
        F: FnOnce(&Substituter) -> T + Send + 'static,
    {
        let Some(substituter) = self.builds.substituter().cloned() else {
            return Ok(T::default());
        };
        Ok(tokio::task::spawn_blocking(move || f(&substituter)).await?)
    }

    /// Where the content-addressed output `drv_output` (`sha256:<hex>!<output>`) was built
    /// for the account, if it still holds that path (QueryRealisation).
    pub async fn query_realisation(
        &self,
        drv_output: String,
    ) -> Result<Option<StorePath>, ServiceError> {
        self.query("querying a realisation", true, move |s, a| {
            s.query_realisation(a, &drv_output)
        })
        .await
    }

    /// The path infos of those of `paths` the account sees (QueryPathInfos).
    pub async fn query_path_infos(
        &self,
        paths: BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, ValidPathInfo>, ServiceError> {
        let small = paths.len() <= INLINE_QUERY_PATHS;
        let pins = self.pins.clone();
        self.query("querying path infos", small, move |s, a| {
            s.query_path_infos(a, &paths, Some(&pins))
        })
        .await
    }

    /// The closure of `paths` as the account sees it, with the outputs of derivations when
    /// `include_outputs` (QueryClosure).
    pub async fn query_closure(
        &self,
        paths: BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, ServiceError> {
        let pins = self.pins.clone();
        self.blocking("computing a closure", move |s, a| {
            let closure = s.query_closure(a, &paths, include_outputs)?;
            // Pinned once found: a path collected in between is missing from the pins, and
            // the closure is walked again from what is held now.
            if s.hold_valid_paths(a, &closure, Some(&pins))?.len() == closure.len() {
                return Ok(closure);
            }
            s.query_closure(a, &paths, include_outputs)
        })
        .await
    }

    /// Starts the blocking task that feeds the NAR about to arrive to a new [`Import`] for
    /// the account; `ca` is the content address the claim will carry, when known before the
    /// NAR. Chunks sent to it rejoin `pool` once written.
    pub(crate) fn start_upload(&self, ca: Option<ContentAddress>, pool: &BufferPool) -> Upload {
        let (chunks, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let store = self.store.clone();
        let account = self.settings.account.clone();
        let pool = pool.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut import = store.begin_import(&account)?;
            if let Some(ca) = &ca {
                import.expect_ca(ca);
            }
            while let Some(chunk) = rx.blocking_recv() {
                import.write(&chunk)?;
                pool.give(chunk);
            }
            Ok(import)
        });
        Upload { chunks, task }
    }

    /// Registers a complete import as `claim` says (verified first) and grants it to the
    /// account.
    pub async fn commit(&self, import: Import, claim: PathClaim) -> Result<(), ServiceError> {
        let path = claim.path.clone();
        let pins = self.pins.clone();
        let held = BTreeSet::from([path.clone()]);
        self.blocking(&format!("adding {path}"), move |s, a| {
            import.commit(claim)?;
            s.hold_valid_paths(a, &held, Some(&pins))
        })
        .await?;
        tracing::info!(account = %self.settings.account, path = %path, "registered import");
        Ok(())
    }

    /// Hands `job` to the build service; its [`Waiter`] streams the log and the outcome.
    pub async fn submit(&self, job: BuildJob) -> Waiter {
        self.builds.submit(job).await
    }

    /// Works out the graph build of `requests` (BuildPaths; QueryMissing without `fetch`)
    /// from the account's view of the store; with `fetch`, what binary caches have is
    /// fetched first instead of built (the plan's `notes` say what).
    pub async fn plan_graph(
        &self,
        requests: Vec<DerivedPath>,
        fetch: bool,
    ) -> Result<GraphPlan, DrvError> {
        self.builds
            .plan_graph(&self.settings.account, requests, fetch)
            .await
    }

    /// Starts the graph build of `plan` with the client's limits `options`; `keep_going`
    /// when the client chose, otherwise `[builds] keep_going`.
    pub fn run_graph(
        &self,
        plan: GraphPlan,
        options: BuildOptions,
        keep_going: Option<bool>,
    ) -> GraphRun {
        self.builds
            .run_graph(plan, &self.settings.account, options, keep_going)
    }
}

/// A substitution under way ([`SessionContext::substitute`]).
pub struct Substitution {
    lines: mpsc::Receiver<String>,
    task: JoinHandle<()>,
}

impl Substitution {
    /// The next line of progress for the client (one per path fetched); `None` once the
    /// substitution is over.
    pub async fn next_line(&mut self) -> Option<String> {
        self.lines.recv().await
    }

    /// Waits for the end of the substitution.
    pub async fn finish(self) -> Result<(), ServiceError> {
        Ok(self.task.await?)
    }
}

/// A NAR on its way to the store: a blocking task writes the chunks it receives to an
/// [`Import`] and hands the import back when the channel closes.
pub struct Upload {
    chunks: mpsc::Sender<Bytes>,
    task: JoinHandle<Result<Import, StoreError>>,
}

impl Upload {
    /// Sends the next chunk of the NAR; `false` when the import task has stopped (on an
    /// error, which [`Upload::finish`] returns).
    pub async fn send(&self, chunk: Bytes) -> bool {
        self.chunks.send(chunk).await.is_ok()
    }

    /// Closes the channel and waits for the import task: the import with the whole NAR, or
    /// the store's error met while `what`.
    pub async fn finish(self, what: String) -> Result<Import, ServiceError> {
        let Upload { chunks, task } = self;
        drop(chunks);
        task.await?.map_err(|source| ServiceError::Store {
            what,
            source: Box::new(source),
        })
    }
}
