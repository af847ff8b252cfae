//! The record each build leaves in the store when it ends ([`crate::store::BuildRecord`]):
//! one per account that asked for it, all naming the same stored log.

use nixbuild_core::store_path::StorePath;

use super::run::Usage;
use super::waiters::Shared;
use super::{Outcome, LOG_TARGET};
use crate::store::{now_ms, BuildRecord, Store};

/// What the build service knows of a build that ended.
pub(super) struct BuildFacts<'a> {
    /// The derivation.
    pub drv_path: &'a StorePath,
    /// When it was submitted.
    pub submitted_ms: u64,
    /// How it ended.
    pub outcome: &'a Outcome,
    /// What it was granted and used (all zero when it never started).
    pub usage: Usage,
}

/// Records `build` for each account that asked for it (`account` first), with its stored
/// log. A failure is logged: the build's result stands without its record.
pub(super) async fn record(store: &Store, build: &Shared, account: &str, facts: BuildFacts<'_>) {
    let outcome = facts.outcome;
    let mut accounts = build.accounts();
    accounts.remove(account);
    let shared = !accounts.is_empty();
    let outputs: String = outcome
        .outputs
        .iter()
        .map(|(name, path)| format!("{name} {path}\n"))
        .collect();
    let first = BuildRecord {
        id: 0,
        build: build.id,
        account: account.to_owned(),
        drv: facts.drv_path.to_string(),
        outputs,
        submitted_ms: facts.submitted_ms,
        started_ms: (outcome.times_built > 0).then(|| outcome.start_time.saturating_mul(1000)),
        ended_ms: now_ms(),
        status: format!("{:?}", outcome.status),
        error: outcome.message.clone(),
        cores: facts.usage.cores,
        memory: facts.usage.memory,
        cpu_us: facts.usage.cpu_us,
        peak_memory: facts.usage.peak_memory,
        output_bytes: 0,
        shared,
        log_bytes: 0,
    };
    let log = build.take_stored_log();
    let store = store.clone();
    let output_paths: Vec<StorePath> = outcome.outputs.values().cloned().collect();
    let drv = facts.drv_path.clone();
    let written = tokio::task::spawn_blocking(move || {
        let mut first = first;
        first.output_bytes = store
            .query_path_infos(&first.account, &output_paths, None)?
            .values()
            .map(|info| info.nar_size)
            .sum();
        let records: Vec<BuildRecord> = std::iter::once(first.clone())
            .chain(accounts.into_iter().map(|a| BuildRecord {
                account: a,
                ..first.clone()
            }))
            .collect();
        store.insert_records(&records, log)
    })
    .await;
    let failed = match written {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(target: LOG_TARGET, drv = %drv, "the build's record is not stored: {failed}");
}
