//! When the store's collector runs inside the daemon: every `[store] gc_interval`, whenever
//! free space on the state directory's file system is below `[store] gc_free_space`
//! (checked every [`FREE_SPACE_CHECK`]), and on SIGUSR1 (`kill -USR1`, or `systemctl kill
//! -s USR1 nixbuild`) or `nixbuild gc` ([`Collector`]). One collection runs at a time, on the collector's own thread
//! (`nixbuild-gc`, there from the start, so that collections add no thread), in steps that
//! never hold the store lock for long (see [`crate::store`]'s `gc` module), beside normal
//! service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::METRICS;
use crate::reload::LiveConfig;
use crate::store::{GcStats, Store};

/// How often free space is checked against `[store] gc_free_space`.
pub const FREE_SPACE_CHECK: Duration = Duration::from_secs(10);

/// Why a collection started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Schedule,
    FreeSpace,
    Request,
    Command,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Schedule => "scheduled",
            Reason::FreeSpace => "free space below store.gc_free_space",
            Reason::Request => "requested (SIGUSR1)",
            Reason::Command => "requested (nixbuild gc)",
        }
    }
}

/// A collection's result as `nixbuild gc` hears it.
pub type Collected = Result<GcStats, String>;

/// Asks the running collector for a collection now (`nixbuild gc`). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Collector(mpsc::Sender<oneshot::Sender<Collected>>);

/// The collector's end of [`Collector`]'s requests, for [`run`].
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<oneshot::Sender<Collected>>);

/// A [`Collector`] and the requests it sends, for [`run`].
pub fn channel() -> (Collector, Requests) {
    let (tx, rx) = mpsc::channel(16);
    (Collector(tx), Requests(rx))
}

impl Collector {
    /// Runs a collection (after the one under way, if any) and returns what it did.
    pub async fn collect(&self) -> Collected {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(tx)
            .await
            .map_err(|_| "the collector is not running".to_owned())?;
        rx.await
            .map_err(|_| "the collector stopped before it collected".to_owned())?
    }
}

/// Watches for SIGUSR1, the request for a collection; the daemon does this before it
/// listens, since the signal's default action would end it.
pub fn watch_requests() -> Option<Signal> {
    match signal(SignalKind::user_defined1()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot watch for SIGUSR1 ({e}): collections run on schedule only");
            None
        }
    }
}

/// Runs collections until `stop` turns true, on each of `signals` (from
/// [`watch_requests`]) and each of `requests` (answered with the result); the policy and
/// settings are read from `live` before each, so a reload takes effect at the next one.
pub async fn run(
    store: Store,
    live: Arc<LiveConfig>,
    mut signals: Option<Signal>,
    mut requests: Requests,
    mut stop: watch::Receiver<bool>,
) {
    let (start_tx, mut start_rx) = mpsc::channel::<Reason>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<Collected>(1);
    let worker = {
        let store = store.clone();
        std::thread::Builder::new()
            .name("nixbuild-gc".into())
            .spawn(move || {
                // Ends once this task is gone (its sender dropped), after the collection
                // under way.
                while let Some(reason) = start_rx.blocking_recv() {
                    if done_tx.blocking_send(collect(&store, reason)).is_err() {
                        return;
                    }
                }
            })
    };
    if let Err(e) = worker {
        tracing::error!("cannot start the collector's thread: {e}; nothing is collected");
        return;
    }
    let mut next = Instant::now() + Duration::from_secs(live.get().store.gc_interval);
    loop {
        let mut asker = None;
        let reason = tokio::select! {
            () = tokio::time::sleep_until(next.into()) => Reason::Schedule,
            () = crate::daemon::next_signal(&mut signals) => Reason::Request,
            Some(tx) = requests.0.recv() => {
                asker = Some(tx);
                Reason::Command
            }
            () = tokio::time::sleep(FREE_SPACE_CHECK) => {
                let threshold = live.get().store.gc_free_space();
                match store.free_space() {
                    Ok(free) if free < threshold => Reason::FreeSpace,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!("cannot check free space for the collector: {e}");
                        continue;
                    }
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        };
        let done = match start_tx.send(reason).await {
            Ok(()) => done_rx.recv().await,
            Err(_) => None,
        };
        let Some(done) = done else {
            tracing::error!("the collector's thread is gone; nothing more is collected");
            return;
        };
        if let Some(asker) = asker {
            let _ = asker.send(done);
        }
        next = Instant::now() + Duration::from_secs(live.get().store.gc_interval);
    }
}

/// One collection, on the collector's thread, logged and counted.
fn collect(store: &Store, reason: Reason) -> Collected {
    let started = Instant::now();
    let collected = store.collect().map_err(|e| e.to_string());
    match &collected {
        Ok(stats) => tracing::info!(
            reason = reason.as_str(),
            grants = stats.grants,
            objects = stats.objects,
            bytes = stats.bytes,
            records = stats.records,
            steps = stats.steps,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "collection done"
        ),
        Err(e) => tracing::error!(reason = reason.as_str(), "collection failed: {e}"),
    }
    if let Ok(stats) = &collected {
        METRICS.collection(stats.bytes, stats.grants);
    }
    collected
}
