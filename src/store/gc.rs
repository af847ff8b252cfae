//! The collector: removes the grants that have gone unused for longer than their account's
//! retention, then the objects no grant holds any more, and old build records.
//!
//! A *root* here is a grant (an account's row for a path) used within its account's
//! retention, or pinned by a session, build or export at this moment ([`super::Pins`]).
//! Whatever a root references stays, because a row is removed only when no other row of the
//! same account refers to it (references never leave an account). So removal peels an
//! expired closure from its top: a path, then the references it was the last referrer of,
//! in the same step.
//!
//! The work is cut into steps of at most [`STEP_ROWS`] rows each, each one SQLite
//! transaction under the store lock: other requests wait for at most one step. A step
//! deletes the rows and, for each object left without a row, its `objects` row, commits,
//! and then, still under the lock, renames the object's directory into `tmp/`; the directory
//! is deleted after the lock is released. Imports look for an object and place theirs under
//! the same lock, so an import of the same contents either finds the object (and its new
//! row keeps it) or places a fresh copy after the old one has moved away. A crash after the
//! commit leaves directories without rows, which [`Store::open`] removes, and anything in
//! `tmp/`, which it empties; a crash before the commit leaves everything as it was.
//!
//! Rows that claim to reference each other in a cycle (no real store path can, but a
//! client's claimed references are taken as given) are never removed by peeling; they keep
//! counting against their own account's quota and nobody else's.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::sync::atomic::Ordering;

use rusqlite::{params, OptionalExtension, Transaction};

use super::db::{self, now};
use super::error::{db_err, io_err, StoreError};
use super::{fsutil, Store};
use crate::failpoint::failpoint;

/// Most rows one step scans, and half the rows it looks at in all (scanned and reached by
/// following references): the bound on how long a step holds the store lock (about 10 ms;
/// `benches/gc`).
pub const STEP_ROWS: usize = 64;

/// What a collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Grants (account rows) removed.
    pub grants: u64,
    /// Objects removed from disk.
    pub objects: u64,
    /// The NAR bytes of those objects: what the disk got back, give or take file-system
    /// overhead.
    pub bytes: u64,
    /// Build records removed, with their logs.
    pub records: u64,
    /// Steps taken (each one lock hold).
    pub steps: u64,
}

impl std::ops::AddAssign for GcStats {
    fn add_assign(&mut self, other: GcStats) {
        self.grants += other.grants;
        self.objects += other.objects;
        self.bytes += other.bytes;
        self.records += other.records;
        self.steps += other.steps;
    }
}

/// Where a pass over one account's expired rows stands: the last `(last_used, id)` seen.
type Cursor = (i64, i64);

impl Store {
    /// Collects every account's expired grants (with the retention the store's policy gives
    /// each), the objects left without a grant, and build records past their retention.
    pub fn collect(&self) -> Result<GcStats, StoreError> {
        let mut stats = GcStats::default();
        for account in self.accounts()? {
            stats += self.collect_account(&account)?;
        }
        stats.records += self.expire_records()?;
        self.expire_traffic(self.policy().record_retention)?;
        Ok(stats)
    }

    /// Collects `account`'s grants unused for longer than its retention.
    pub fn collect_account(&self, account: &str) -> Result<GcStats, StoreError> {
        let retention = self.policy().retention_of(account);
        let cutoff = db::to_sql_int(now().saturating_sub(retention));
        let mut stats = GcStats::default();
        // A pass may leave a row whose last referrer it removed later in the same pass;
        // another pass takes it. Each pass that removes nothing is the last.
        loop {
            let before = stats.grants;
            let mut cursor = (i64::MIN, i64::MIN);
            while self.collect_step(account, cutoff, &mut cursor, &mut stats)? {}
            if stats.grants == before {
                return Ok(stats);
            }
        }
    }

    /// The accounts holding at least one row, by skipping along the `(account, path)` index
    /// (one lookup per account rather than a scan of every row).
    fn accounts(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.inner.lock_db();
        conn.prepare_cached(
            "WITH RECURSIVE a(name) AS (
                SELECT MIN(account) FROM paths
                UNION ALL
                SELECT (SELECT MIN(account) FROM paths WHERE account > a.name) FROM a
                WHERE a.name IS NOT NULL
            ) SELECT name FROM a WHERE name IS NOT NULL",
        )
        .and_then(|mut st| st.query_map([], |row| row.get(0))?.collect())
        .map_err(db_err("list accounts"))
    }

    /// One step: scans up to [`STEP_ROWS`] of `account`'s rows last used before `cutoff`
    /// after `cursor`, removes those nothing holds (following references), removes the
    /// objects left without a row, and moves the cursor. `true` while there may be more.
    fn collect_step(
        &self,
        account: &str,
        cutoff: i64,
        cursor: &mut Cursor,
        stats: &mut GcStats,
    ) -> Result<bool, StoreError> {
        let mut conn = self.inner.lock_db();
        let tx = conn
            .transaction()
            .map_err(db_err("begin a collection step"))?;
        let scanned: Vec<Cursor> = tx
            .prepare_cached(
                "SELECT last_used, id FROM paths
                 WHERE account = ?1 AND last_used < ?2 AND (last_used, id) > (?3, ?4)
                 ORDER BY last_used, id LIMIT ?5",
            )
            .and_then(|mut st| {
                st.query_map(
                    params![account, cutoff, cursor.0, cursor.1, STEP_ROWS as i64],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?
                .collect::<Result<_, _>>()
            })
            .map_err(db_err("scan expired paths"))?;
        if let Some(last) = scanned.last() {
            *cursor = *last;
        }
        let mut stack: Vec<i64> = scanned.iter().rev().map(|&(_, id)| id).collect();
        let mut budget = 2 * STEP_ROWS;
        let mut touched = BTreeSet::new();
        let mut removed = HashSet::new();
        while let Some(id) = stack.pop() {
            // A scanned row already removed by following references costs nothing.
            if removed.contains(&id) {
                continue;
            }
            if budget == 0 {
                break;
            }
            budget -= 1;
            if self.inner.pins.is_pinned(id) {
                continue;
            }
            if let Some(row) = remove_row(&tx, account, id, cutoff)? {
                stats.grants += 1;
                removed.insert(id);
                touched.insert(row.object);
                stack.extend(row.references);
            }
        }
        let mut gone = Vec::new();
        for key in touched {
            if let Some(size) = remove_object_row(&tx, &key)? {
                stats.objects += 1;
                stats.bytes += size;
                gone.push(key);
            }
        }
        failpoint!("gc-before-commit");
        tx.commit().map_err(db_err("commit a collection step"))?;
        stats.steps += 1;
        failpoint!("gc-after-commit");
        let mut trash = Vec::with_capacity(gone.len());
        for key in &gone {
            let from = self.inner.objects.join(key);
            let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
            let to = self
                .inner
                .tmp
                .join(format!("gc-{}-{n}", std::process::id()));
            match fs::rename(&from, &to) {
                Ok(()) => trash.push(to),
                // Already gone: removed by hand, or never placed by a crashed commit.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("move a collected object out", &from)(e)),
            }
        }
        drop(conn);
        failpoint!("gc-before-delete");
        for dir in trash {
            fsutil::remove_tree(&dir).map_err(io_err("delete a collected object", &dir))?;
        }
        Ok(scanned.len() == STEP_ROWS)
    }
}

/// A row that [`remove_row`] removed.
struct Removed {
    object: String,
    /// The rows it referenced (of the same account), which may have lost their last
    /// referrer.
    references: Vec<i64>,
}

/// Removes row `id` of `account` with its references, signatures and realisations, and
/// takes it out of the account's usage, when it is still expired (last used before
/// `cutoff`) and no other row refers to it; `None` otherwise.
fn remove_row(
    tx: &Transaction<'_>,
    account: &str,
    id: i64,
    cutoff: i64,
) -> Result<Option<Removed>, StoreError> {
    let row: Option<(String, String, i64)> = tx
        .prepare_cached(
            "SELECT p.path, p.object, o.nar_size FROM paths p JOIN objects o ON o.key = p.object
             WHERE p.id = ?1 AND p.account = ?2 AND p.last_used < ?3
             AND NOT EXISTS (SELECT 1 FROM refs r WHERE r.reference = p.id AND r.referrer != p.id)",
        )
        .and_then(|mut st| {
            st.query_row(params![id, account, cutoff], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()
        })
        .map_err(db_err("check an expired path"))?;
    let Some((path, object, nar_size)) = row else {
        return Ok(None);
    };
    let references: Vec<i64> = tx
        .prepare_cached("SELECT reference FROM refs WHERE referrer = ?1 AND reference != ?1")
        .and_then(|mut st| st.query_map([id], |row| row.get(0))?.collect())
        .map_err(db_err("read an expired path's references"))?;
    let delete = |sql: &str, p: &[&dyn rusqlite::ToSql]| {
        tx.prepare_cached(sql)
            .and_then(|mut st| st.execute(p))
            .map_err(db_err("remove an expired path"))
    };
    delete("DELETE FROM refs WHERE referrer = ?1", &[&id])?;
    delete("DELETE FROM sigs WHERE path = ?1", &[&id])?;
    delete(
        "DELETE FROM realisations WHERE account = ?1 AND path = ?2",
        &[&account, &path],
    )?;
    delete("DELETE FROM paths WHERE id = ?1", &[&id])?;
    db::charge(tx, account, -nar_size, -1).map_err(db_err("update an account's usage"))?;
    Ok(Some(Removed { object, references }))
}

/// Removes the row of object `key` when no path row holds it any more; its NAR size if so.
fn remove_object_row(tx: &Transaction<'_>, key: &str) -> Result<Option<u64>, StoreError> {
    let size: Option<i64> = tx
        .prepare_cached(
            "DELETE FROM objects WHERE key = ?1
             AND NOT EXISTS (SELECT 1 FROM paths WHERE object = ?1) RETURNING nar_size",
        )
        .and_then(|mut st| st.query_row([key], |row| row.get(0)).optional())
        .map_err(db_err("remove a collected object"))?;
    Ok(size.map(|s| u64::try_from(s).unwrap_or(0)))
}
