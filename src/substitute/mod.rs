//! The server's binary-cache client: fetches paths that configured caches have, instead of
//! having clients upload them (`[substituters]` in the configuration).
//!
//! A path is substituted only with its whole closure, references first, and only from a
//! narinfo signed by a trusted key. Each NAR streams from the cache through its
//! decompressor into an [`Import`] (validated, unpacked and hashed as it arrives, never held
//! in memory) that is committed with the narinfo's NAR hash, size, references, content
//! address, deriver and signatures as the claim, so the store checks the contents against
//! what the signature covers. Substituted paths are registered for [`PUBLIC_ACCOUNT`]: one
//! copy for the whole server, granted ([`Store::grant_closure`]) to each account that asks.
//! Two requests for the same path wait for one download.
//!
//! Any failure (a cache down, a 404, a bad or untrusted signature, a truncated or corrupt
//! NAR, a hash mismatch) is logged with its cause and registers nothing; the path is then
//! simply not substituted, and the client uploads it as it would without substituters.
//!
//! All calls block; the daemon calls them in blocking tasks.

mod cache;

pub use cache::{CacheLocation, CacheUrl};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nixbuild_core::binary_cache::{Compression, NarInfo, NarInfoError, PublicKey, TrustedKeys};
use nixbuild_core::store_path::StorePath;

use crate::config::SubstitutersConfig;
use crate::metrics::{Direction, METRICS};
use crate::store::{Import, PathClaim, Pins, Store, StoreError, Traffic, PUBLIC_ACCOUNT};
use cache::{read_small, Cache, Fetched};

/// Most paths one request may make the substituter look at (the closure of what it asks
/// for): far above any real closure, and a bound on what a cache can make it hold.
const MAX_CLOSURE: usize = 200_000;
/// Bytes read from a decompressor at a time.
const CHUNK: usize = 256 << 10;

/// Why a path could not be fetched from a cache. The substituter logs these and goes on as
/// if the path were not there.
#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    /// The HTTP request failed (connection, TLS, timeout, protocol).
    #[error("GET {url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// The client's error.
        source: Box<ureq::Error>,
    },
    /// The cache answered with an unexpected status.
    #[error("GET {url}: HTTP status {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// Reading or decompressing a file failed (a connection cut mid-transfer, corrupt data).
    #[error("reading {url}: {source}")]
    Read {
        /// The URL or file.
        url: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A narinfo or `nix-cache-info` larger than any real one.
    #[error("{url} is larger than {max} bytes")]
    TooLarge {
        /// The URL or file.
        url: String,
        /// The limit.
        max: u64,
    },
    /// The cache has no `nix-cache-info`.
    #[error("{cache} has no nix-cache-info: not a binary cache")]
    NoCacheInfo {
        /// The cache.
        cache: String,
    },
    /// Its `nix-cache-info` cannot be read.
    #[error("{cache}/nix-cache-info: {source}")]
    CacheInfo {
        /// The cache.
        cache: String,
        /// What is wrong.
        source: NarInfoError,
    },
    /// A narinfo that cannot be read.
    #[error("{url}: {source}")]
    NarInfo {
        /// The narinfo's URL.
        url: String,
        /// What is wrong.
        source: NarInfoError,
    },
    /// A narinfo describing another path than the one asked for.
    #[error("{url} describes {found}, not {expected}")]
    WrongPath {
        /// The narinfo's URL.
        url: String,
        /// The path asked for.
        expected: Box<StorePath>,
        /// The path it describes.
        found: Box<StorePath>,
    },
    /// No signature of the narinfo verifies with a trusted key.
    #[error(
        "{url}: no valid signature by a trusted key (signatures: {sigs}; trusted: \
         [substituters] trusted_public_keys)"
    )]
    Untrusted {
        /// The narinfo's URL.
        url: String,
        /// The key names of its signatures, or `none`.
        sigs: String,
    },
    /// A compression this server cannot decompress.
    #[error("{url}: compression {compression} is not supported (none, xz, zstd, bzip2)")]
    Compression {
        /// The narinfo's URL.
        url: String,
        /// The method named.
        compression: String,
    },
    /// The narinfo's NAR is not in the cache.
    #[error("{url}: not found")]
    NarMissing {
        /// The NAR's URL.
        url: String,
    },
    /// The NAR is longer than its narinfo says.
    #[error("{url}: the NAR is longer than the narinfo's NarSize {nar_size}")]
    NarTooLong {
        /// The NAR's URL.
        url: String,
        /// The size the narinfo gives.
        nar_size: u64,
    },
    /// The store refused the NAR (its hash, size, content address or format) or failed.
    #[error("{url}: {source}")]
    Store {
        /// The NAR's URL.
        url: String,
        /// The store's error.
        source: Box<StoreError>,
    },
    /// A reference could not be substituted, so neither can this path.
    #[error("its reference {0} could not be substituted")]
    Reference(Box<StorePath>),
}

impl SubstituteError {
    /// Whether the cache failed to answer (rather than answering something wrong): then it
    /// is skipped for a while.
    fn cache_unavailable(&self) -> bool {
        match self {
            SubstituteError::Http { .. } => true,
            SubstituteError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// The binary-cache client of one daemon. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Substituter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    caches: Vec<Cache>,
    trusted: TrustedKeys,
    agent: ureq::Agent,
    config: SubstitutersConfig,
    /// Narinfo lookups remembered, by hash part.
    memo: Mutex<HashMap<String, Memo>>,
    /// Requests to caches at once, for the whole server.
    slots: Slots,
    /// Downloads at once, for the whole server: taken before a slot of `slots`.
    downloads: Slots,
    /// The paths being downloaded, each with the lock its download holds.
    inflight: Mutex<HashMap<StorePath, Arc<Mutex<()>>>>,
}

/// A narinfo lookup's result, and when it was made.
#[derive(Debug, Clone)]
struct Memo {
    found: Option<Found>,
    at: Instant,
}

/// Where a path is: the index of the cache, and its verified narinfo.
#[derive(Debug, Clone)]
struct Found {
    cache: usize,
    info: Arc<NarInfo>,
}

/// A counting semaphore for blocking threads.
#[derive(Debug)]
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// One of the [`Slots`], given back when dropped.
struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n.max(1)),
            freed: Condvar::new(),
        }
    }

    fn take(&self) -> Slot<'_> {
        let mut free = lock(&self.free);
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.freed.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a path of one substitution stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Done,
    Failed,
}

/// The states of one substitution's paths, which downloads wait on for their references.
struct Progress {
    states: Mutex<HashMap<StorePath, State>>,
    changed: Condvar,
    /// The public rows this substitution found or committed, kept from the collector until
    /// they are granted (a reference committed early must still be there for its referrers).
    pins: Pins,
}

impl Progress {
    fn set(&self, path: &StorePath, state: State) {
        lock(&self.states).insert(path.clone(), state);
        self.changed.notify_all();
    }

    /// Waits until none of `refs` is pending; whether all are done (a path missing from
    /// the map is one this substitution does not fetch, valid already).
    fn wait_for(&self, refs: &[&StorePath]) -> Result<(), StorePath> {
        let mut states = lock(&self.states);
        loop {
            let mut pending = false;
            for r in refs {
                match states.get(*r) {
                    Some(State::Failed) => return Err((*r).clone()),
                    Some(State::Pending) => pending = true,
                    Some(State::Done) | None => {}
                }
            }
            if !pending {
                return Ok(());
            }
            states = self.changed.wait(states).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The store's refusal of the NAR at `url`.
fn store_error(url: &str) -> impl Fn(StoreError) -> SubstituteError + Copy + '_ {
    move |source| SubstituteError::Store {
        url: url.to_owned(),
        source: Box::new(source),
    }
}

/// `n` bytes in MiB, as Nix prints sizes.
fn mib(n: u64) -> String {
    format!("{:.2} MiB", n as f64 / (1 << 20) as f64)
}

impl Substituter {
    /// The substituter of `config` for `store`; `None` when no cache is configured.
    /// The configuration was checked when loaded, so its URLs and keys are valid.
    pub fn new(store: Store, config: &SubstitutersConfig) -> Result<Option<Substituter>, String> {
        if config.urls.is_empty() {
            return Ok(None);
        }
        let caches = config
            .urls
            .iter()
            .map(|u| CacheUrl::parse(u).map(Cache::new))
            .collect::<Result<Vec<_>, _>>()?;
        let keys = config
            .trusted_public_keys
            .iter()
            .map(|k| PublicKey::parse(k).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            tracing::warn!(
                "[substituters] has no trusted_public_keys: nothing will be substituted"
            );
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(config.connect_timeout)))
            .timeout_per_read(Some(Duration::from_secs(config.read_timeout)))
            .max_idle_connections_per_host(config.max_connections)
            .max_idle_connections(config.max_connections.saturating_mul(caches.len()))
            .user_agent(concat!("nixbuild/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Some(Substituter {
            inner: Arc::new(Inner {
                store,
                caches,
                trusted: TrustedKeys::new(keys),
                agent,
                config: config.clone(),
                memo: Mutex::default(),
                slots: Slots::new(config.max_parallel),
                downloads: Slots::new(config.max_downloads),
                inflight: Mutex::default(),
            }),
        }))
    }

    /// Makes as many of `wanted` valid for `account` as the caches allow: each path the
    /// account lacks is fetched with its closure (unless the server has it already) and
    /// granted to the account. `progress` gets a line for each path fetched. Returns the
    /// paths of `wanted` granted now; failures are logged, never returned.
    pub fn substitute(
        &self,
        account: &str,
        wanted: &BTreeSet<StorePath>,
        progress: &(dyn Fn(String) + Sync),
    ) -> BTreeSet<StorePath> {
        match self.try_substitute(account, wanted, progress) {
            Ok(granted) => granted,
            Err(e) => {
                tracing::warn!(account, "substitution failed: {e}");
                BTreeSet::new()
            }
        }
    }

    /// [`Substituter::substitute`] with its progress lines collected, for callers that pass
    /// them on later (a build's log, a graph build's notes).
    pub fn substitute_collecting(
        &self,
        account: &str,
        wanted: &BTreeSet<StorePath>,
    ) -> Vec<String> {
        let lines = Mutex::new(Vec::new());
        self.substitute(account, wanted, &|line| lock(&lines).push(line));
        lines.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// Which of `paths` a cache has, or the server holds already (narinfo lookups only, in
    /// parallel; nothing is fetched).
    pub fn substitutable(&self, paths: &BTreeSet<StorePath>) -> BTreeSet<StorePath> {
        let held = match self.inner.store.query_valid_paths(PUBLIC_ACCOUNT, paths) {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!("substitution lookup failed: {e}");
                return BTreeSet::new();
            }
        };
        let lookups: Vec<StorePath> = paths.difference(&held).cloned().collect();
        let found = self.parallel(self.inner.config.max_parallel, &lookups, |p| {
            self.lookup(p).is_some()
        });
        let mut result = held;
        result.extend(
            lookups
                .into_iter()
                .zip(found)
                .filter(|(_, f)| *f)
                .map(|(p, _)| p),
        );
        result
    }

    /// The bytes fetching `paths` would download and unpack (QueryMissing's
    /// `downloadSize` and `narSize`): from their narinfos (looked up again, normally
    /// remembered), or their NAR size for those the server already holds, whose download
    /// is nothing. Paths no cache has count nothing.
    pub fn sizes(&self, paths: &BTreeSet<StorePath>) -> (u64, u64) {
        let held = self
            .inner
            .store
            .query_path_infos(PUBLIC_ACCOUNT, paths, None)
            .unwrap_or_default();
        let (mut download, mut unpacked) = (0u64, 0u64);
        for path in paths {
            if let Some(info) = held.get(path) {
                unpacked = unpacked.saturating_add(info.nar_size);
            } else if let Some(f) = self.lookup(path) {
                let nar = f.info.nar_size;
                download = download.saturating_add(f.info.file_size.unwrap_or(nar));
                unpacked = unpacked.saturating_add(nar);
            }
        }
        (download, unpacked)
    }

    fn try_substitute(
        &self,
        account: &str,
        wanted: &BTreeSet<StorePath>,
        progress: &(dyn Fn(String) + Sync),
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let store = &self.inner.store;
        let valid = store.query_valid_paths(account, wanted)?;
        let missing: BTreeSet<StorePath> = wanted.difference(&valid).cloned().collect();
        if missing.is_empty() {
            return Ok(BTreeSet::new());
        }
        let pins = store.pins();
        let (found, mut states) = self.plan(&missing, &pins)?;
        let (order, cyclic) = dependencies_first(&found);
        for path in cyclic {
            tracing::warn!(path = %path, "not substituted: its narinfo's references form a cycle");
            states.insert(path, State::Failed);
        }
        let progress_states = Progress {
            states: Mutex::new(states),
            changed: Condvar::new(),
            pins,
        };
        // No more threads than downloads at once: the decompressors' memory stays with
        // the threads that used it (glibc's arenas keep what a large free returns), so
        // more threads would hold more of it for nothing.
        let fetched_bytes = std::sync::atomic::AtomicU64::new(0);
        self.parallel(self.inner.config.max_downloads, &order, |(path, f)| {
            let outcome = self.fetch_path(path, f, &progress_states);
            let state = match outcome {
                Ok(fetched) => {
                    if fetched {
                        let bytes = f.info.file_size.unwrap_or(f.info.nar_size);
                        fetched_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                        METRICS.transferred(Direction::Substitute, bytes);
                        let cache = &self.inner.caches[f.cache].url.display;
                        tracing::info!(path = %path, cache = %cache, nar_size = f.info.nar_size, "substituted");
                        let download = f
                            .info
                            .file_size
                            .map_or_else(|| "? MiB".to_owned(), mib);
                        progress(format!(
                            "copying path '{path}' from '{cache}' ({download} download, {} \
                             unpacked)",
                            mib(f.info.nar_size)
                        ));
                    }
                    State::Done
                }
                Err(e) => {
                    tracing::warn!(path = %path, "not substituted: {e}");
                    State::Failed
                }
            };
            progress_states.set(path, state);
        });
        let substituted = fetched_bytes.into_inner();
        if substituted > 0 {
            let traffic = Traffic {
                substituted,
                ..Traffic::default()
            };
            if let Err(e) = store.add_traffic(account, traffic) {
                tracing::warn!(account, "the substitution's traffic is not counted: {e}");
            }
        }
        let public = store.query_valid_paths(PUBLIC_ACCOUNT, &missing)?;
        if public.is_empty() {
            return Ok(public);
        }
        store.grant_closure(PUBLIC_ACCOUNT, account, &public)?;
        tracing::info!(account, paths = public.len(), "granted substituted paths");
        Ok(public)
    }

    /// The verified narinfos of `missing` and of their closures, except what the server
    /// holds already; and the initial state of every path met: done for those the server
    /// holds, failed for those no cache has, pending for the rest.
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        missing: &BTreeSet<StorePath>,
        pins: &Pins,
    ) -> Result<(BTreeMap<StorePath, Found>, HashMap<StorePath, State>), StoreError> {
        let store = &self.inner.store;
        let mut found = BTreeMap::new();
        let mut states = HashMap::new();
        let mut seen: HashSet<StorePath> = missing.iter().cloned().collect();
        let mut level: BTreeSet<StorePath> = missing.clone();
        while !level.is_empty() {
            let held = store.hold_valid_paths(PUBLIC_ACCOUNT, &level, Some(pins))?;
            let lookups: Vec<StorePath> = level.difference(&held).cloned().collect();
            for p in held {
                states.insert(p, State::Done);
            }
            let results =
                self.parallel(self.inner.config.max_parallel, &lookups, |p| self.lookup(p));
            let mut next = BTreeSet::new();
            for (path, result) in lookups.into_iter().zip(results) {
                let Some(f) = result else {
                    states.insert(path, State::Failed);
                    continue;
                };
                for r in &f.info.references {
                    if seen.len() >= MAX_CLOSURE {
                        tracing::warn!(
                            "a substitution reached {MAX_CLOSURE} paths; the rest is not \
                             substituted"
                        );
                        break;
                    }
                    if seen.insert(r.clone()) {
                        next.insert(r.clone());
                    }
                }
                states.insert(path.clone(), State::Pending);
                found.insert(path, f);
            }
            level = next;
        }
        // A reference left out at the cap fails what refers to it.
        for f in found.values() {
            for r in &f.info.references {
                states.entry(r.clone()).or_insert(State::Failed);
            }
        }
        Ok((found, states))
    }

    /// Runs `f` on each of `items` on up to `threads` threads; the results in order.
    fn parallel<T: Sync, R: Send>(
        &self,
        threads: usize,
        items: &[T],
        f: impl Fn(&T) -> R + Sync,
    ) -> Vec<R> {
        let threads = threads.min(items.len());
        if threads <= 1 {
            return items.iter().map(f).collect();
        }
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(items.len()));
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    lock(&results).push((i, r));
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// The verified narinfo of `path` from the first cache (by priority) that has one,
    /// remembered for the configured time; `None` when no cache has it.
    fn lookup(&self, path: &StorePath) -> Option<Found> {
        let inner = &self.inner;
        let hash = path.hash_part();
        if let Some(memo) = lock(&inner.memo).get(hash) {
            let ttl = match &memo.found {
                Some(_) => inner.config.narinfo_positive_ttl,
                None => inner.config.narinfo_negative_ttl,
            };
            if memo.at.elapsed() < Duration::from_secs(ttl) {
                return memo.found.clone().filter(|f| f.info.store_path == *path);
            }
        }
        let mut order: Vec<usize> = (0..inner.caches.len()).collect();
        order.sort_by_key(|&i| inner.caches[i].priority());
        let mut answered = true;
        let mut found = None;
        for i in order {
            let cache = &inner.caches[i];
            let read = {
                let _slot = inner.slots.take();
                if !cache.usable(&inner.agent) {
                    answered = false;
                    continue;
                }
                self.read_narinfo(cache, path)
            };
            match read {
                Ok(Some(info)) => {
                    found = Some(Found {
                        cache: i,
                        info: Arc::new(info),
                    });
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %path, cache = %cache.url.display, "{e}");
                    if e.cache_unavailable() {
                        cache.mark_down(&e);
                    }
                    answered = false;
                }
            }
        }
        if found.is_some() || answered {
            self.remember(hash, found.clone());
        }
        found
    }

    fn remember(&self, hash: &str, found: Option<Found>) {
        let mut memo = lock(&self.inner.memo);
        if memo.len() >= self.inner.config.narinfo_cache_entries {
            memo.clear();
        }
        if self.inner.config.narinfo_cache_entries > 0 {
            memo.insert(
                hash.to_owned(),
                Memo {
                    found,
                    at: Instant::now(),
                },
            );
        }
    }

    /// `path`'s narinfo in `cache`, checked: it describes `path`, a trusted key signed it,
    /// and its compression is one this server reads.
    fn read_narinfo(
        &self,
        cache: &Cache,
        path: &StorePath,
    ) -> Result<Option<NarInfo>, SubstituteError> {
        let name = format!("{}.narinfo", path.hash_part());
        let url = format!("{}/{name}", cache.url.display);
        let bytes = match cache.fetch(&self.inner.agent, &name)? {
            Fetched::Missing => return Ok(None),
            Fetched::Found(r) => read_small(r, &cache.url.display, &name)?,
        };
        let info = NarInfo::parse(&bytes).map_err(|source| SubstituteError::NarInfo {
            url: url.clone(),
            source,
        })?;
        if info.store_path != *path {
            return Err(SubstituteError::WrongPath {
                url,
                expected: Box::new(path.clone()),
                found: Box::new(info.store_path),
            });
        }
        let fingerprint = info.fingerprint();
        if self
            .inner
            .trusted
            .signer(fingerprint.as_bytes(), &info.sigs)
            .is_none()
        {
            let names: Vec<&str> = info
                .sigs
                .iter()
                .map(|s| s.split_once(':').map_or(s.as_str(), |(n, _)| n))
                .collect();
            return Err(SubstituteError::Untrusted {
                url,
                sigs: if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                },
            });
        }
        if let Compression::Other(c) = &info.compression {
            return Err(SubstituteError::Compression {
                url,
                compression: c.clone(),
            });
        }
        Ok(Some(info))
    }

    /// Fetches `path` into the server's public view once its references are there; `false`
    /// when another request fetched it meanwhile.
    fn fetch_path(
        &self,
        path: &StorePath,
        found: &Found,
        progress: &Progress,
    ) -> Result<bool, SubstituteError> {
        let refs: Vec<&StorePath> = found
            .info
            .references
            .iter()
            .filter(|r| *r != path)
            .collect();
        // Not worth downloading when a reference already failed.
        if let Some(r) = refs
            .iter()
            .find(|r| lock(&progress.states).get(**r) == Some(&State::Failed))
        {
            return Err(SubstituteError::Reference(Box::new((*r).clone())));
        }
        let entry = lock(&self.inner.inflight)
            .entry(path.clone())
            .or_default()
            .clone();
        let result = {
            let _one_download = lock(&entry);
            self.download_once(path, found, &refs, progress)
        };
        let mut inflight = lock(&self.inner.inflight);
        // The map's and this call's: nobody else waits for it.
        if Arc::strong_count(&entry) == 2 {
            inflight.remove(path);
        }
        result
    }

    /// Under the path's download lock: unless another request registered it meanwhile,
    /// downloads it, waits for its references, and commits it.
    fn download_once(
        &self,
        path: &StorePath,
        found: &Found,
        refs: &[&StorePath],
        progress: &Progress,
    ) -> Result<bool, SubstituteError> {
        let inner = &self.inner;
        let nar_url = format!(
            "{}/{}",
            inner.caches[found.cache].url.display, found.info.url
        );
        let store_err = store_error(&nar_url);
        let one: BTreeSet<StorePath> = [path.clone()].into();
        if !inner
            .store
            .hold_valid_paths(PUBLIC_ACCOUNT, &one, Some(&progress.pins))
            .map_err(store_err)?
            .is_empty()
        {
            return Ok(false);
        }
        let import = {
            // Always in this order (lookups take only a request slot), so that no two
            // downloads wait for each other's slot.
            let _download = inner.downloads.take();
            let _slot = inner.slots.take();
            self.download(found, &nar_url)?
        };
        progress
            .wait_for(refs)
            .map_err(|r| SubstituteError::Reference(Box::new(r)))?;
        let info = &found.info;
        let claim = PathClaim {
            path: path.clone(),
            deriver: info.deriver.clone(),
            nar_hash: Some(info.nar_hash),
            nar_size: Some(info.nar_size),
            references: info.references.clone(),
            registration_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ca: info.ca,
            sigs: info.sigs.clone(),
        };
        import.commit(claim).map_err(store_err)?;
        inner
            .store
            .hold_valid_paths(PUBLIC_ACCOUNT, &one, Some(&progress.pins))
            .map_err(store_error(&nar_url))?;
        Ok(true)
    }

    /// Streams the NAR of `found` from its cache through its decompressor into a new
    /// import of the public view, never more than [`CHUNK`] bytes at a time.
    fn download(&self, found: &Found, nar_url: &str) -> Result<Import, SubstituteError> {
        let inner = &self.inner;
        let info = &found.info;
        let read_err = |source| SubstituteError::Read {
            url: nar_url.to_owned(),
            source,
        };
        let store_err = store_error(nar_url);
        let raw = match inner.caches[found.cache].fetch(&inner.agent, &info.url)? {
            Fetched::Found(r) => r,
            Fetched::Missing => {
                return Err(SubstituteError::NarMissing {
                    url: nar_url.to_owned(),
                })
            }
        };
        let mut nar: Box<dyn Read + Send> = match &info.compression {
            Compression::None => raw,
            Compression::Xz => Box::new(liblzma::read::XzDecoder::new(raw)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(raw).map_err(read_err)?),
            Compression::Bzip2 => Box::new(bzip2::read::BzDecoder::new(raw)),
            Compression::Other(c) => {
                return Err(SubstituteError::Compression {
                    url: nar_url.to_owned(),
                    compression: c.clone(),
                })
            }
        };
        let mut import = inner
            .store
            .begin_import(PUBLIC_ACCOUNT)
            .map_err(store_err)?;
        if let Some(ca) = &info.ca {
            import.expect_ca(ca);
        }
        let mut buf = vec![0; CHUNK];
        let mut total = 0u64;
        loop {
            let n = nar.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                return Ok(import);
            }
            total += n as u64;
            if total > info.nar_size {
                return Err(SubstituteError::NarTooLong {
                    url: nar_url.to_owned(),
                    nar_size: info.nar_size,
                });
            }
            import.write(&buf[..n]).map_err(store_err)?;
        }
    }
}

/// The paths of `found`, each after the references it has among them; and those in a
/// reference cycle (which real store paths cannot form, but a cache's narinfos can claim),
/// which cannot be ordered and are not fetched.
fn dependencies_first(
    found: &BTreeMap<StorePath, Found>,
) -> (Vec<(StorePath, Found)>, Vec<StorePath>) {
    // Kahn's algorithm over the references among `found`, self-references left out.
    let mut waiting: HashMap<&StorePath, usize> = HashMap::new();
    let mut referrers: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    for (path, f) in found {
        let refs = f
            .info
            .references
            .iter()
            .filter(|r| *r != path && found.contains_key(*r));
        let mut n = 0;
        for r in refs {
            referrers.entry(r).or_default().push(path);
            n += 1;
        }
        waiting.insert(path, n);
    }
    let mut ready: Vec<&StorePath> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(p, _)| *p)
        .collect();
    let mut order = Vec::with_capacity(found.len());
    while let Some(path) = ready.pop() {
        if let Some(f) = found.get(path) {
            order.push((path.clone(), f.clone()));
        }
        for referrer in referrers.get(path).into_iter().flatten() {
            if let Some(n) = waiting.get_mut(referrer) {
                *n -= 1;
                if *n == 0 {
                    ready.push(referrer);
                }
            }
        }
    }
    let cyclic = waiting
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(p, _)| p.clone())
        .collect();
    (order, cyclic)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic is how a test reports failure

    use super::*;
    use crate::store::StoreLimits;

    /// The cache Nix 2.8 wrote (nixbuild-core/tests/data/binary-cache/xz), copied so that a
    /// test may take files away.
    fn fixture_cache() -> tempfile::TempDir {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("nixbuild-core/tests/data/binary-cache/xz");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nar")).unwrap();
        for sub in ["", "nar"] {
            for entry in std::fs::read_dir(from.join(sub)).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_file() {
                    std::fs::copy(entry.path(), dir.path().join(sub).join(entry.file_name()))
                        .unwrap();
                }
            }
        }
        dir
    }

    fn substituter(cache: &std::path::Path, state: &std::path::Path) -> Substituter {
        let store = Store::open(
            state,
            StoreLimits {
                max_nar_size: 1 << 30,
                disk_reserve: 0,
            },
        )
        .unwrap();
        let public = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("nixbuild-core/tests/data/binary-cache/test-cache-1.public"),
        )
        .unwrap();
        let config = SubstitutersConfig {
            urls: vec![format!("file://{}", cache.display())],
            trusted_public_keys: vec![public.trim().to_owned()],
            ..SubstitutersConfig::default()
        };
        Substituter::new(store, &config).unwrap().unwrap()
    }

    fn path(base: &str) -> StorePath {
        StorePath::from_base_name(base.as_bytes()).unwrap()
    }

    #[test]
    fn a_path_is_fetched_once_and_granted_to_each_account() {
        let cache = fixture_cache();
        let state = tempfile::tempdir().unwrap();
        let s = substituter(cache.path(), state.path());
        let a = path("z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt");
        let wanted = BTreeSet::from([a.clone()]);
        let lines = Mutex::new(Vec::new());
        let granted = s.substitute("alice", &wanted, &|l| lock(&lines).push(l));
        assert_eq!(granted, wanted);
        assert_eq!(
            lock(&lines).as_slice(),
            [format!(
                "copying path '{a}' from 'file://{}' (0.00 MiB download, 0.00 MiB unpacked)",
                cache.path().display()
            )]
        );
        // Bob gets the server's copy: the cache's files are not needed again.
        std::fs::remove_dir_all(cache.path().join("nar")).unwrap();
        assert_eq!(s.substitute("bob", &wanted, &|_| {}), wanted);
        let store = &s.inner.store;
        for account in ["alice", "bob", PUBLIC_ACCOUNT] {
            let info = store.query_path_info(account, &a).unwrap().unwrap();
            assert_eq!(
                info.sigs.len(),
                1,
                "{account}: the narinfo's signature is kept"
            );
            assert!(info.ca.is_some(), "{account}: and its content address");
        }
        assert!(store.verify().unwrap().is_empty());
    }

    #[test]
    fn a_path_whose_reference_cannot_be_fetched_registers_nothing() {
        // golden-ref refers to the busybox path, whose narinfo is there but not its NAR.
        let cache = fixture_cache();
        let state = tempfile::tempdir().unwrap();
        let s = substituter(cache.path(), state.path());
        let top = path("q1phm7nwklpk0f8ivsxjd29d3g3bdxzz-golden-ref");
        let busybox = path("ikfa7wfzsy90l6n35ic32mpi3y8756wy-bbdir");
        assert_eq!(
            s.substitutable(&BTreeSet::from([top.clone()])),
            BTreeSet::from([top.clone()]),
            "its narinfo is signed: it looks substitutable"
        );
        assert!(s
            .substitute("alice", &BTreeSet::from([top.clone()]), &|_| {})
            .is_empty());
        let both = BTreeSet::from([top, busybox]);
        let store = &s.inner.store;
        assert!(store
            .query_valid_paths(PUBLIC_ACCOUNT, &both)
            .unwrap()
            .is_empty());
        assert!(store.query_valid_paths("alice", &both).unwrap().is_empty());
        assert!(store.verify().unwrap().is_empty());
    }

    #[test]
    fn a_path_no_cache_has_is_remembered_as_missing() {
        let cache = fixture_cache();
        let state = tempfile::tempdir().unwrap();
        let s = substituter(cache.path(), state.path());
        let a = path("z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt");
        let narinfo = cache
            .path()
            .join("z3n6ml62lc6l9glpaz6fq7fvi2rks9vq.narinfo");
        let hidden = cache.path().join("hidden");
        std::fs::rename(&narinfo, &hidden).unwrap();
        let one = BTreeSet::from([a.clone()]);
        assert!(s.substitutable(&one).is_empty());
        // Within the negative TTL (an hour) the cache is not asked again.
        std::fs::rename(&hidden, &narinfo).unwrap();
        assert!(s.substitutable(&one).is_empty());
        lock(&s.inner.memo).clear();
        assert_eq!(s.substitutable(&one), one);
    }

    #[test]
    fn every_supported_compression_is_decoded() {
        use nixbuild_core::binary_cache::SecretKey;
        use std::io::Write;
        let cache = tempfile::tempdir().unwrap();
        std::fs::create_dir(cache.path().join("nar")).unwrap();
        std::fs::write(
            cache.path().join("nix-cache-info"),
            "StoreDir: /nix/store\n",
        )
        .unwrap();
        let key = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("nixbuild-core/tests/data/binary-cache/test-cache-1.secret"),
        )
        .unwrap();
        let key = SecretKey::parse(&key).unwrap();
        let mut wanted = BTreeSet::new();
        for (i, compression) in ["none", "xz", "zstd", "bzip2"].into_iter().enumerate() {
            // The NAR of a regular file holding the compression's name.
            let nar = nixbuild_core::nar::NarNode::File {
                executable: false,
                contents: compression.as_bytes().to_vec(),
            }
            .to_nar()
            .unwrap();
            let packed = match compression {
                "none" => nar.clone(),
                "xz" => {
                    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                    e.write_all(&nar).unwrap();
                    e.finish().unwrap()
                }
                "zstd" => zstd::encode_all(&nar[..], 3).unwrap(),
                _ => {
                    let mut e =
                        bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
                    e.write_all(&nar).unwrap();
                    e.finish().unwrap()
                }
            };
            let p = path(&format!("{i}{}-{compression}", "0".repeat(31)));
            let url = format!("nar/{i}.nar.{compression}");
            std::fs::write(cache.path().join(&url), &packed).unwrap();
            let mut info = NarInfo::parse(
                format!(
                    "StorePath: {}\nURL: {url}\nCompression: {compression}\nNarHash: {}\nNarSize: {}\n",
                    p.to_absolute(),
                    nixbuild_core::hash::Hash::compute(nixbuild_core::hash::HashAlgo::Sha256, &nar),
                    nar.len()
                )
                .as_bytes(),
            )
            .unwrap();
            info.sigs.insert(key.sign(info.fingerprint().as_bytes()));
            std::fs::write(
                cache.path().join(format!("{}.narinfo", p.hash_part())),
                info.to_text(),
            )
            .unwrap();
            wanted.insert(p);
        }
        let state = tempfile::tempdir().unwrap();
        let s = substituter(cache.path(), state.path());
        assert_eq!(s.substitute("alice", &wanted, &|_| {}), wanted);
        assert!(s.inner.store.verify().unwrap().is_empty());
    }

    fn found(refs: &[&StorePath], path: &StorePath) -> Found {
        let text = format!(
            "StorePath: {}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1h5fyjcwjlia4rjfs1x5jwx2zlyfr0jbq9rngl71amlf3wjg260s\nNarSize: 1\nReferences: {}\n",
            path.to_absolute(),
            refs.iter().map(|r| r.base_name()).collect::<Vec<_>>().join(" ")
        );
        Found {
            cache: 0,
            info: Arc::new(NarInfo::parse(text.as_bytes()).unwrap()),
        }
    }

    #[test]
    fn references_come_first_and_cycles_are_set_apart() {
        let p = |n: &str| path(&format!("{}-{n}", "0".repeat(31) + &n[..1]));
        let (a, b, c, x, y) = (p("a"), p("b"), p("c"), p("x"), p("y"));
        // c -> b -> a, c -> a, a -> a (itself); x <-> y.
        let map = BTreeMap::from([
            (a.clone(), found(&[&a], &a)),
            (b.clone(), found(&[&a], &b)),
            (c.clone(), found(&[&a, &b], &c)),
            (x.clone(), found(&[&y], &x)),
            (y.clone(), found(&[&x], &y)),
        ]);
        let (order, mut cyclic) = dependencies_first(&map);
        let order: Vec<StorePath> = order.into_iter().map(|(p, _)| p).collect();
        assert_eq!(order, vec![a, b, c]);
        cyclic.sort();
        assert_eq!(cyclic, vec![x, y]);
    }
}
