//! Build records and stored logs: one row in `builds` for each build an account asked for
//! and that ended (built, failed, or refused once it had been queued), and its log, zstd
//! compressed, in `logs/<name>.zst`. The collector removes logs after `log_retention` and
//! records after `record_retention`.
//!
//! A log is written to `logs/<name>.part` while the build runs ([`LogWriter`]), renamed to
//! `logs/<name>` when it ends, and then the record naming it is inserted; a crash in between
//! leaves a log without a record, which [`Store::open`] removes (with any `.part`).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::db::{now, now_ms, to_sql_int};
use super::error::{db_err, io_err, StoreError};
use super::gc::STEP_ROWS;
use super::Store;

/// The zstd level logs are compressed at: fast, and build logs shrink several times anyway.
const LOG_LEVEL: i32 = 3;

/// Creates the `builds` table (schema version 2).
pub(super) fn create_table(tx: &Connection) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE builds (
            id INTEGER PRIMARY KEY,
            account TEXT NOT NULL,
            drv TEXT NOT NULL,
            outputs TEXT NOT NULL,
            submitted_ms INTEGER NOT NULL,
            started_ms INTEGER,
            ended_ms INTEGER NOT NULL,
            status TEXT NOT NULL,
            error TEXT NOT NULL,
            cores INTEGER NOT NULL,
            memory INTEGER NOT NULL,
            cpu_us INTEGER,
            peak_memory INTEGER,
            output_bytes INTEGER NOT NULL,
            shared INTEGER NOT NULL,
            log TEXT,
            log_bytes INTEGER NOT NULL
        );
        CREATE INDEX builds_by_account ON builds(account, id);
        CREATE INDEX builds_by_end ON builds(ended_ms);",
    )
    .map_err(db_err("create the builds table"))
}

/// One build as recorded when it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    /// The record's row id (assigned when inserted; ignored by [`Store::insert_records`]).
    pub id: i64,
    /// The build's id, as users name it ([`Store::next_build_id`]): the records of one build
    /// shared by several accounts have the same.
    pub build: u64,
    /// The account that asked for it.
    pub account: String,
    /// The derivation's store path.
    pub drv: String,
    /// `name path` per output, one per line.
    pub outputs: String,
    /// When it was submitted, in milliseconds since the epoch.
    pub submitted_ms: u64,
    /// When its builder started, if it did.
    pub started_ms: Option<u64>,
    /// When it ended.
    pub ended_ms: u64,
    /// The result, as Nix names it (`Built`, `PermanentFailure`, `TimedOut`, ...).
    pub status: String,
    /// The error message the client got; empty on success.
    pub error: String,
    /// Cores granted (its `NIX_BUILD_CORES`); 0 when it never started.
    pub cores: u32,
    /// Memory granted, in bytes; 0 when it never started.
    pub memory: u64,
    /// CPU time its processes used, in microseconds, from its cgroup.
    pub cpu_us: Option<u64>,
    /// The most memory its cgroup held at once, in bytes.
    pub peak_memory: Option<u64>,
    /// The NAR bytes of the outputs it wrote.
    pub output_bytes: u64,
    /// Whether it was one build shared between several requests.
    pub shared: bool,
    /// The bytes of its log, before compression.
    pub log_bytes: u64,
}

/// A build's log on its way to the store: compressed as it arrives, into `logs/<name>.part`.
pub struct LogWriter {
    tmp: PathBuf,
    encoder: Option<zstd::Encoder<'static, BufWriter<File>>>,
    bytes: u64,
}

impl LogWriter {
    /// Appends `chunk` of the log.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if let Some(encoder) = &mut self.encoder {
            encoder
                .write_all(chunk)
                .map_err(io_err("write a build log", &self.tmp))?;
            self.bytes += chunk.len() as u64;
        }
        Ok(())
    }
}

/// Where a running build's log stands: its file, opened at the checkpoint (so that the build
/// ending, which renames or removes it, does not take it away), and how many bytes it holds
/// uncompressed ([`LogWriter::checkpoint`]).
#[derive(Debug)]
pub struct LogCheckpoint {
    file: File,
    path: PathBuf,
    bytes: u64,
}

impl LogWriter {
    /// Flushes what was written so far to the file, so that a reader can decompress it while
    /// the build goes on ([`LogCheckpoint::read`]).
    pub fn checkpoint(&mut self) -> Result<LogCheckpoint, StoreError> {
        if let Some(encoder) = &mut self.encoder {
            encoder
                .flush()
                .map_err(io_err("flush a build log", &self.tmp))?;
        }
        let file = File::open(&self.tmp).map_err(io_err("read a build log", &self.tmp))?;
        Ok(LogCheckpoint {
            file,
            path: self.tmp.clone(),
            bytes: self.bytes,
        })
    }
}

/// A stored log being read, decompressed as it is read.
pub type LogReader = Box<dyn std::io::Read + Send>;

impl LogCheckpoint {
    /// The log up to the checkpoint (later writes cut off), decompressed as it is read.
    pub fn open(self) -> Result<LogReader, StoreError> {
        use std::io::Read;
        // Reading stops at the checkpoint, where the flushed blocks end, before the
        // unfinished frame would make the decoder complain.
        Ok(Box::new(decoder(self.file, &self.path)?.take(self.bytes)))
    }
}

fn decoder(
    file: File,
    path: &std::path::Path,
) -> Result<zstd::Decoder<'static, std::io::BufReader<File>>, StoreError> {
    zstd::Decoder::new(file).map_err(io_err("decompress a build log", path))
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("tmp", &self.tmp)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Not finished: the build's record was never written. Best effort: open empties tmp/.
        if self.encoder.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<BuildRecord> {
    let u = |i: usize| -> rusqlite::Result<u64> { Ok(row.get::<_, i64>(i)?.max(0) as u64) };
    let o = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
    };
    Ok(BuildRecord {
        id: row.get(0)?,
        account: row.get(1)?,
        drv: row.get(2)?,
        outputs: row.get(3)?,
        submitted_ms: u(4)?,
        started_ms: o(5)?,
        ended_ms: u(6)?,
        status: row.get(7)?,
        error: row.get(8)?,
        cores: u32::try_from(u(9)?).unwrap_or(u32::MAX),
        memory: u(10)?,
        cpu_us: o(11)?,
        peak_memory: o(12)?,
        output_bytes: u(13)?,
        shared: row.get(14)?,
        log_bytes: u(15)?,
        build: u(16)?,
    })
}

/// Inserts one record naming log `log_name`; its id.
fn insert_one(
    conn: &Connection,
    record: &BuildRecord,
    log_name: Option<&str>,
    log_bytes: u64,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO builds (account, drv, outputs, submitted_ms, started_ms, ended_ms,
             status, error, cores, memory, cpu_us, peak_memory, output_bytes, shared, log,
             log_bytes, build) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
             ?14, ?15, ?16, ?17) RETURNING id",
    )
    .and_then(|mut st| {
        st.query_row(
            params![
                record.account,
                record.drv,
                record.outputs,
                to_sql_int(record.submitted_ms),
                record.started_ms.map(to_sql_int),
                to_sql_int(record.ended_ms),
                record.status,
                record.error,
                record.cores,
                to_sql_int(record.memory),
                record.cpu_us.map(to_sql_int),
                record.peak_memory.map(to_sql_int),
                to_sql_int(record.output_bytes),
                record.shared,
                log_name,
                to_sql_int(log_bytes),
                to_sql_int(record.build),
            ],
            |row| row.get(0),
        )
    })
    .map_err(db_err("record a build"))
}

const RECORD_COLUMNS: &str = "id, account, drv, outputs, submitted_ms, started_ms, ended_ms, \
     status, error, cores, memory, cpu_us, peak_memory, output_bytes, shared, log_bytes, build";

/// Adds the build ids to a version-2 `builds` table that lacks them (in place: older binaries
/// ignore the column), each old record its row id, and the table keeping the highest id ever
/// handed out, so that ids are never reused even once their records expired; and the indexes
/// of the operations interface's lookups (by derivation, by account and end).
pub(super) fn add_build_ids(tx: &Connection) -> Result<(), StoreError> {
    let has: bool = tx
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('builds') WHERE name = 'build'",
            [],
            |row| row.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(db_err("look for the builds' ids"))?;
    if !has {
        tx.execute_batch(
            "ALTER TABLE builds ADD COLUMN build INTEGER NOT NULL DEFAULT 0;
             UPDATE builds SET build = id;
             CREATE INDEX builds_by_build ON builds(build, account);",
        )
        .map_err(db_err("add the builds' ids"))?;
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS build_ids (last INTEGER NOT NULL);
         INSERT INTO build_ids (last) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM build_ids);
         CREATE INDEX IF NOT EXISTS builds_by_drv ON builds(drv);
         CREATE INDEX IF NOT EXISTS builds_by_account_end ON builds(account, ended_ms);",
    )
    .map_err(db_err(
        "create the table of build ids and the records' indexes",
    ))
}

/// The highest build id handed out before this start.
pub(super) fn last_build_id(conn: &Connection) -> Result<u64, StoreError> {
    conn.query_row(
        "SELECT max((SELECT last FROM build_ids), (SELECT coalesce(max(build), 0) FROM builds))",
        [],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| n.max(0) as u64)
    .map_err(db_err("read the last build id"))
}

/// The `WHERE` clause for the rows `account` may read (every row for `None`), with the
/// account as parameter `?1`: two texts, so that each statement can use its index (an `OR`
/// would make SQLite scan the table).
pub(super) fn visible(account: Option<&str>) -> &'static str {
    match account {
        Some(_) => "account = ?1",
        None => "?1 IS NULL",
    }
}

impl Store {
    /// The `logs/` directory.
    fn logs_dir(&self) -> PathBuf {
        self.inner.state_dir.join("logs")
    }

    /// Starts a log for a build about to run.
    pub fn begin_log(&self) -> Result<LogWriter, StoreError> {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        // Unique across restarts too: a name is never reused while its record may exist.
        let name = format!("{}-{}-{n}.zst", now_ms(), std::process::id());
        let tmp = self.logs_dir().join(format!("{name}.part"));
        let file = File::create(&tmp).map_err(io_err("create a build log", &tmp))?;
        let encoder = zstd::Encoder::new(BufWriter::new(file), LOG_LEVEL)
            .map_err(io_err("start compressing a build log", &tmp))?;
        Ok(LogWriter {
            tmp,
            encoder: Some(encoder),
            bytes: 0,
        })
    }

    /// Records a build that ended, once per account that asked for it, all with its log
    /// when there is one; returns the records' ids.
    pub fn insert_records(
        &self,
        records: &[BuildRecord],
        log: Option<LogWriter>,
    ) -> Result<Vec<i64>, StoreError> {
        let (log_name, log_bytes) = match log {
            Some(mut log) => {
                let encoder = log.encoder.take();
                let name = log
                    .tmp
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".part"))
                    .unwrap_or("log.zst")
                    .to_owned();
                let target = self.logs_dir().join(&name);
                if let Some(encoder) = encoder {
                    let mut out = encoder
                        .finish()
                        .map_err(io_err("finish a build log", &log.tmp))?;
                    out.flush()
                        .map_err(io_err("finish a build log", &log.tmp))?;
                }
                fs::rename(&log.tmp, &target).map_err(io_err("store a build log", &target))?;
                (Some(name), log.bytes)
            }
            None => (None, 0),
        };
        let conn = self.inner.lock_db();
        let tx = conn
            .unchecked_transaction()
            .map_err(db_err("begin recording a build"))?;
        let mut ids = Vec::with_capacity(records.len());
        for record in records {
            ids.push(insert_one(&tx, record, log_name.as_deref(), log_bytes)?);
        }
        if let Some(last) = records.iter().map(|r| r.build).max() {
            tx.prepare_cached("UPDATE build_ids SET last = max(last, ?1)")
                .and_then(|mut st| st.execute([to_sql_int(last)]))
                .map_err(db_err("keep the last build id"))?;
        }
        tx.commit().map_err(db_err("commit a build's records"))?;
        Ok(ids)
    }

    /// A new build id, never handed out before by this store.
    pub fn next_build_id(&self) -> u64 {
        self.inner.last_build_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The build records `account` may read (every account's with `None`), newest first, at
    /// most `max`.
    pub fn records(
        &self,
        account: Option<&str>,
        max: usize,
    ) -> Result<Vec<BuildRecord>, StoreError> {
        self.select_records("?2 IS NULL", account, rusqlite::types::Null, max)
    }

    /// The records of build `build` that `account` may read (every account's with `None`).
    pub fn build_records(
        &self,
        account: Option<&str>,
        build: u64,
    ) -> Result<Vec<BuildRecord>, StoreError> {
        self.select_records("build = ?2", account, to_sql_int(build), 64)
    }

    /// The newest records of derivation `drv` (a full store path) that `account` may read,
    /// at most `max`.
    pub fn drv_records(
        &self,
        account: Option<&str>,
        drv: &str,
        max: usize,
    ) -> Result<Vec<BuildRecord>, StoreError> {
        self.select_records("drv = ?2", account, drv, max)
    }

    fn select_records(
        &self,
        condition: &str,
        account: Option<&str>,
        value: impl rusqlite::ToSql,
        max: usize,
    ) -> Result<Vec<BuildRecord>, StoreError> {
        let conn = self.inner.lock_reader();
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM builds WHERE {} AND {condition}
             ORDER BY id DESC LIMIT ?3",
            visible(account)
        );
        conn.prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_map(
                    params![account, value, max.min(i64::MAX as usize) as i64],
                    record_from_row,
                )?
                .collect()
            })
            .map_err(db_err("read build records"))
    }

    /// The stored log of build `build` as `account` may read it (any account's with
    /// `None`), if it is still kept, decompressed as it is read.
    pub fn open_record_log(
        &self,
        account: Option<&str>,
        build: u64,
    ) -> Result<Option<LogReader>, StoreError> {
        let name: Option<String> = {
            let conn = self.inner.lock_reader();
            let sql = format!(
                "SELECT log FROM builds WHERE {} AND build = ?2 AND log IS NOT NULL LIMIT 1",
                visible(account)
            );
            conn.prepare_cached(&sql)
                .and_then(|mut st| {
                    st.query_row(params![account, to_sql_int(build)], |row| row.get(0))
                        .optional()
                })
                .map_err(db_err("look up a build log"))?
        };
        let Some(name) = name else {
            return Ok(None);
        };
        let path = self.logs_dir().join(name);
        let file = File::open(&path).map_err(io_err("read a build log", &path))?;
        Ok(Some(Box::new(decoder(file, &path)?)))
    }

    /// Removes logs older than the log retention and records older than the record
    /// retention, in steps of [`STEP_ROWS`]; returns the records removed.
    pub(super) fn expire_records(&self) -> Result<u64, StoreError> {
        let policy = self.policy();
        let now_ms = now().saturating_mul(1000);
        let log_cutoff = to_sql_int(now_ms.saturating_sub(policy.log_retention * 1000));
        let record_cutoff = to_sql_int(now_ms.saturating_sub(policy.record_retention * 1000));
        let mut removed = 0;
        loop {
            let (logs, records) = {
                let conn = self.inner.lock_db();
                let tx = conn
                    .unchecked_transaction()
                    .map_err(db_err("begin expiring build records"))?;
                let expired_logs: Vec<(i64, String)> = tx
                    .prepare_cached(
                        "SELECT id, log FROM builds WHERE ended_ms < ?1 AND log IS NOT NULL
                         LIMIT ?2",
                    )
                    .and_then(|mut st| {
                        st.query_map(params![log_cutoff, STEP_ROWS as i64], |row| {
                            Ok((row.get(0)?, row.get(1)?))
                        })?
                        .collect()
                    })
                    .map_err(db_err("find expired build logs"))?;
                let mut logs = Vec::with_capacity(expired_logs.len());
                for (id, log) in expired_logs {
                    tx.prepare_cached("UPDATE builds SET log = NULL WHERE id = ?1")
                        .and_then(|mut st| st.execute([id]))
                        .map_err(db_err("expire a build log"))?;
                    logs.push(log);
                }
                let expired: Vec<Option<String>> = tx
                    .prepare_cached(
                        "DELETE FROM builds WHERE id IN (SELECT id FROM builds
                         WHERE ended_ms < ?1 LIMIT ?2) RETURNING log",
                    )
                    .and_then(|mut st| {
                        st.query_map(params![record_cutoff, STEP_ROWS as i64], |row| row.get(0))?
                            .collect()
                    })
                    .map_err(db_err("expire build records"))?;
                tx.commit()
                    .map_err(db_err("commit expiring build records"))?;
                let records = expired.len();
                logs.extend(expired.into_iter().flatten());
                (logs, records)
            };
            for name in &logs {
                let file = self.logs_dir().join(name);
                match fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io_err("remove a build log", &file)(e))
                    }
                    _ => {}
                }
            }
            removed += records as u64;
            if logs.len() < STEP_ROWS && records < STEP_ROWS {
                return Ok(removed);
            }
        }
    }

    /// Removes the logs no record names (a crash between storing a log and recording its
    /// build, or while a build ran). Only [`Store::open`] calls this.
    pub(super) fn remove_orphan_logs(&self) -> Result<(), StoreError> {
        let names: std::collections::HashSet<String> = {
            let conn = self.inner.lock_db();
            conn.prepare("SELECT log FROM builds WHERE log IS NOT NULL")
                .and_then(|mut st| st.query_map([], |row| row.get(0))?.collect())
                .map_err(db_err("list build logs"))?
        };
        super::remove_entries(&self.logs_dir(), |name| names.contains(name))
    }
}
