//! What accounts used, for the operations interface (`nixbuild usage`, `paths`, `accounts`):
//! the bytes each account moved per day (`traffic`, kept as long as the build records), the
//! per-day sums of its build records, and the paths it holds.

use std::collections::BTreeMap;

use nixbuild_core::store_path::StorePath;
use rusqlite::{params, Connection};

use super::db::{now, to_sql_int};
use super::error::{db_err, StoreError};
use super::Store;

/// Milliseconds in a day: usage is summed per UTC day.
const DAY_MS: u64 = 86_400_000;

/// Creates the `traffic` table when it is missing (in place: older binaries ignore it).
pub(super) fn create_table(tx: &Connection) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS traffic (
            account TEXT NOT NULL,
            day INTEGER NOT NULL,
            uploaded INTEGER NOT NULL,
            downloaded INTEGER NOT NULL,
            substituted INTEGER NOT NULL,
            PRIMARY KEY (account, day)
        ) WITHOUT ROWID",
    )
    .map_err(db_err("create the traffic table"))
}

/// Bytes an account moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// NAR bytes it uploaded (ImportPaths, AddToStoreNar, ...).
    pub uploaded: u64,
    /// NAR bytes it downloaded (exports, NarFromPath).
    pub downloaded: u64,
    /// Bytes the server fetched from binary caches for it.
    pub substituted: u64,
}

impl Traffic {
    /// Whether nothing moved.
    pub fn is_empty(&self) -> bool {
        *self == Traffic::default()
    }
}

/// One account's (or, summed, every account's) use of the server on one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DayUsage {
    /// The day, in days since the epoch.
    pub day: u64,
    /// Builds that ended that day.
    pub builds: u64,
    /// Of those, the ones that did not succeed.
    pub failed: u64,
    /// CPU time their processes used, in microseconds.
    pub cpu_us: u64,
    /// Cores granted times the time they ran, in core-milliseconds.
    pub core_ms: u64,
    /// The most memory one of them held at once, in bytes.
    pub peak_memory: u64,
    /// NAR bytes of the outputs they wrote.
    pub output_bytes: u64,
    /// Bytes moved that day.
    pub traffic: Traffic,
}

/// One path an account holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPath {
    /// The store path.
    pub path: StorePath,
    /// Its NAR size in bytes.
    pub nar_size: u64,
    /// When the account last used it (seconds since the epoch, the server's clock).
    pub last_used: u64,
    /// When it was registered, as the client claimed (seconds since the epoch).
    pub registration_time: u64,
}

/// What every account holds together (a path several accounts hold counts for each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TotalHolding {
    /// Accounts holding paths.
    pub accounts: usize,
    /// NAR bytes of their paths.
    pub nar_bytes: u64,
    /// How many paths.
    pub paths: u64,
}

/// What an account holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountHolding {
    /// The account.
    pub account: String,
    /// NAR bytes of its paths.
    pub nar_bytes: u64,
    /// How many paths.
    pub paths: u64,
}

fn unsigned(v: i64) -> u64 {
    v.max(0) as u64
}

impl Store {
    /// Adds `traffic` to `account`'s today.
    pub fn add_traffic(&self, account: &str, traffic: Traffic) -> Result<(), StoreError> {
        if traffic.is_empty() {
            return Ok(());
        }
        let day = now() / (DAY_MS / 1000);
        self.inner
            .lock_db()
            .prepare_cached(
                "INSERT INTO traffic (account, day, uploaded, downloaded, substituted)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (account, day) DO UPDATE SET
                    uploaded = uploaded + excluded.uploaded,
                    downloaded = downloaded + excluded.downloaded,
                    substituted = substituted + excluded.substituted",
            )
            .and_then(|mut st| {
                st.execute(params![
                    account,
                    to_sql_int(day),
                    to_sql_int(traffic.uploaded),
                    to_sql_int(traffic.downloaded),
                    to_sql_int(traffic.substituted),
                ])
            })
            .map(drop)
            .map_err(db_err("count an account's traffic"))
    }

    /// Per UTC day from the day of `since_ms` on (oldest first, whole days): the builds of
    /// `account` (every account's with `None`) that ended, from their records, and the bytes
    /// moved.
    pub fn daily_usage(
        &self,
        account: Option<&str>,
        since_ms: u64,
    ) -> Result<Vec<DayUsage>, StoreError> {
        let since_ms = since_ms - since_ms % DAY_MS;
        let conn = self.inner.lock_reader();
        let mut days: BTreeMap<u64, DayUsage> = BTreeMap::new();
        let since = to_sql_int(since_ms);
        let visible = super::records::visible(account);
        conn.prepare_cached(&format!(
            "SELECT ended_ms / 86400000, count(*),
                    sum(status NOT IN ('Built', 'Substituted', 'AlreadyValid')),
                    sum(coalesce(cpu_us, 0)),
                    sum(CASE WHEN started_ms IS NULL THEN 0
                        ELSE cores * max(ended_ms - started_ms, 0) END),
                    max(coalesce(peak_memory, 0)), sum(output_bytes)
             FROM builds WHERE {visible} AND ended_ms >= ?2
             GROUP BY 1"
        ))
        .and_then(|mut st| {
            let rows = st.query_map(params![account, since], |row| {
                Ok(DayUsage {
                    day: unsigned(row.get(0)?),
                    builds: unsigned(row.get(1)?),
                    failed: unsigned(row.get(2)?),
                    cpu_us: unsigned(row.get(3)?),
                    core_ms: unsigned(row.get(4)?),
                    peak_memory: unsigned(row.get(5)?),
                    output_bytes: unsigned(row.get(6)?),
                    traffic: Traffic::default(),
                })
            })?;
            for day in rows {
                let day = day?;
                days.insert(day.day, day);
            }
            Ok(())
        })
        .map_err(db_err("sum build records per day"))?;
        conn.prepare_cached(&format!(
            "SELECT day, sum(uploaded), sum(downloaded), sum(substituted) FROM traffic
             WHERE {visible} AND day >= ?2 GROUP BY day"
        ))
        .and_then(|mut st| {
            let rows = st.query_map(params![account, to_sql_int(since_ms / DAY_MS)], |row| {
                Ok((
                    unsigned(row.get(0)?),
                    Traffic {
                        uploaded: unsigned(row.get(1)?),
                        downloaded: unsigned(row.get(2)?),
                        substituted: unsigned(row.get(3)?),
                    },
                ))
            })?;
            for row in rows {
                let (day, traffic) = row?;
                let entry = days.entry(day).or_insert_with(|| DayUsage {
                    day,
                    ..DayUsage::default()
                });
                entry.traffic = traffic;
            }
            Ok(())
        })
        .map_err(db_err("sum traffic per day"))?;
        Ok(days.into_values().collect())
    }

    /// The paths `account` holds, most recently used first, at most `max`.
    pub fn held_paths(&self, account: &str, max: usize) -> Result<Vec<HeldPath>, StoreError> {
        let conn = self.inner.lock_reader();
        let rows: Vec<(String, i64, i64, i64)> = conn
            .prepare_cached(
                "SELECT p.path, o.nar_size, p.last_used, p.registration_time
                 FROM paths p JOIN objects o ON o.key = p.object
                 WHERE p.account = ?1 ORDER BY p.last_used DESC LIMIT ?2",
            )
            .and_then(|mut st| {
                st.query_map(params![account, max.min(i64::MAX as usize) as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect()
            })
            .map_err(db_err("list an account's paths"))?;
        drop(conn);
        rows.into_iter()
            .map(|(path, nar_size, last_used, registration_time)| {
                let path = StorePath::from_base_name(path.as_bytes()).map_err(|_| {
                    StoreError::Corrupt {
                        field: "paths.path",
                        value: path.clone(),
                    }
                })?;
                Ok(HeldPath {
                    path,
                    nar_size: unsigned(nar_size),
                    last_used: unsigned(last_used),
                    registration_time: unsigned(registration_time),
                })
            })
            .collect()
    }

    /// Every account that holds paths, by name.
    pub fn holdings(&self) -> Result<Vec<AccountHolding>, StoreError> {
        self.inner
            .lock_reader()
            .prepare_cached("SELECT account, nar_bytes, paths FROM usage ORDER BY account")
            .and_then(|mut st| {
                st.query_map([], |row| {
                    Ok(AccountHolding {
                        account: row.get(0)?,
                        nar_bytes: unsigned(row.get(1)?),
                        paths: unsigned(row.get(2)?),
                    })
                })?
                .collect()
            })
            .map_err(db_err("list the accounts' usage"))
    }

    /// What every account holds together, from the `usage` sums (one small scan).
    pub fn total_holding(&self) -> Result<TotalHolding, StoreError> {
        self.inner
            .lock_reader()
            .prepare_cached(
                "SELECT count(*), coalesce(sum(nar_bytes), 0), coalesce(sum(paths), 0) FROM usage",
            )
            .and_then(|mut st| {
                st.query_row([], |row| {
                    Ok(TotalHolding {
                        accounts: usize::try_from(unsigned(row.get(0)?)).unwrap_or(usize::MAX),
                        nar_bytes: unsigned(row.get(1)?),
                        paths: unsigned(row.get(2)?),
                    })
                })
            })
            .map_err(db_err("sum the accounts' usage"))
    }

    /// Removes traffic older than the record retention (the collector's runs).
    pub(super) fn expire_traffic(&self, record_retention: u64) -> Result<(), StoreError> {
        let cutoff = now().saturating_sub(record_retention) / (DAY_MS / 1000);
        self.inner
            .lock_db()
            .prepare_cached("DELETE FROM traffic WHERE day < ?1")
            .and_then(|mut st| st.execute([to_sql_int(cutoff)]))
            .map(drop)
            .map_err(db_err("expire traffic"))
    }
}
