//! `audit query`: a SQLite index beside the chain.
//!
//! The segments stay the source of truth: the index holds, per record, the fields filters
//! use and where the line is (segment, offset, length); results are read back from the
//! segments. The process that owns the log keeps the index up to date (`indexer.rs`: batched
//! transactions, bounded lag); a query reads the index in one snapshot and, for what the
//! index does not cover yet (the tail written since the indexer's last commit), the segments
//! directly. A log nobody is writing (an offline copy) is indexed by the query itself.
//!
//! Every update is one `BEGIN IMMEDIATE` transaction that reads the indexed positions, inserts
//! the new rows (`INSERT OR IGNORE` keyed by seq: two updaters never duplicate a row) and moves
//! the positions, so a crash mid-batch leaves the index at its last commit. The index is
//! rebuilt from scratch when a segment shrank or changed under it, when its layout version
//! differs, and (by the indexer) when the file is corrupt. Deleting the index file is always
//! safe.
//!
//! Identities, workloads, namespaces and policies are interned (table `strings`): rows and
//! their indexes hold integers, and a filter value unknown to the index matches nothing
//! without touching `records`.

use std::{
    collections::HashMap,
    fs,
    io::{self, Read as _, Seek as _, SeekFrom},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension as _};
use serde::Deserialize;

use super::{
    record::{hash_line, hex, namespace_of, parse_time_ns, Kind, Record, Verdict, MAX_LINE_LEN},
    segment::list_segments,
};

/// The index file's default name in the audit directory.
pub const INDEX_FILE: &str = "index.sqlite";

/// Bytes of log one update transaction reads at most (about 60,000 records): the indexer
/// commits at least this often while it catches up.
pub const STEP_BYTES: u64 = 32 << 20;

/// How long a connection waits for another one's write lock (the indexer's batch, or another
/// query indexing an offline log).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The secondary indexes: (name, columns). Rows are keyed by seq, so every index ends with
/// seq and equality lookups come out in seq order (no sort). The filter `audit query --src
/// --dst --verdict` is one range of `records_src_wl` (or `records_src_id`).
const INDEXES: &[(&str, &str)] = &[
    ("records_time", "time_ns"),
    ("records_src_wl", "src_wl, dst_wl, verdict"),
    ("records_src_id", "src_id, dst_id, verdict"),
    ("records_dst_wl", "dst_wl, verdict"),
    ("records_dst_id", "dst_id, verdict"),
    ("records_src_ns", "src_ns"),
    ("records_dst_ns", "dst_ns"),
    ("records_policy", "policy"),
];

fn create_indexes() -> String {
    INDEXES
        .iter()
        .map(|(name, col)| format!("CREATE INDEX IF NOT EXISTS {name} ON records ({col});"))
        .collect()
}

fn drop_indexes() -> String {
    INDEXES
        .iter()
        .map(|(name, _)| format!("DROP INDEX IF EXISTS {name};"))
        .collect()
}

/// Bumped when the index layout changes (the index is then rebuilt).
const INDEX_VERSION: &str = "2";

/// Roles an interned string has had in indexed records (bits of `strings.roles`).
const ROLE_IDENTITY: i64 = 1;
const ROLE_WORKLOAD: i64 = 2;
const ROLE_NAMESPACE: i64 = 4;
const ROLE_POLICY: i64 = 8;

/// Unindexed bytes above which an update into an empty index builds the secondary indexes
/// once at the end (several times faster than maintaining them row by row).
const BULK_BYTES: u64 = 64 << 20;

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("audit index {path}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("audit log {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {path}: the index points at seq {seq} but the segment has something else there; run again (the index is rebuilt)")]
    Stale { path: PathBuf, seq: u64 },
}

impl IndexError {
    /// The index file is not a database or is damaged: it must be rebuilt.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            IndexError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            )
        )
    }
}

/// The fields an index row needs (borrowed from the line: no allocation per field).
#[derive(Deserialize)]
struct Row<'a> {
    seq: u64,
    #[serde(borrow)]
    time: &'a str,
    kind: &'a str,
    #[serde(default)]
    verdict: Option<&'a str>,
    #[serde(default, borrow)]
    src_identity: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    dst_identity: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    src_workload: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    dst_workload: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default, borrow)]
    policy: Option<std::borrow::Cow<'a, str>>,
}

impl Row<'_> {
    /// Parses a line; `None` for an oversize line or one that is not a record.
    fn parse(line: &[u8]) -> Option<Row<'_>> {
        if line.len() > MAX_LINE_LEN {
            return None;
        }
        serde_json::from_slice(line).ok()
    }

    /// The source namespace: the workload's, else the identity's.
    fn src_ns(&self) -> Option<&str> {
        ns_of(&self.src_workload, &self.src_identity)
    }

    fn dst_ns(&self) -> Option<&str> {
        ns_of(&self.dst_workload, &self.dst_identity)
    }
}

fn ns_of<'a>(
    w: &'a Option<std::borrow::Cow<'_, str>>,
    i: &'a Option<std::borrow::Cow<'_, str>>,
) -> Option<&'a str> {
    w.as_deref()
        .and_then(namespace_of)
        .or_else(|| i.as_deref().and_then(namespace_of))
}

/// Parses RFC 3339 times, remembering the last one (a batch shares one time).
#[derive(Default)]
struct TimeCache {
    last: Option<(String, i128)>,
}

impl TimeCache {
    fn ns(&mut self, s: &str) -> Option<i128> {
        if let Some((t, ns)) = &self.last {
            if t == s {
                return Some(*ns);
            }
        }
        let ns = parse_time_ns(s)?;
        self.last = Some((s.to_owned(), ns));
        Some(ns)
    }
}

/// What `audit query` filters on; every given filter must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Inclusive, nanoseconds since the epoch.
    pub since_ns: Option<i128>,
    /// Exclusive.
    pub until_ns: Option<i128>,
    /// Source identity (SPIFFE ID) or workload (`ns/name`).
    pub src: Option<String>,
    pub dst: Option<String>,
    /// Source or destination namespace.
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub verdict: Option<Verdict>,
    pub kind: Option<Kind>,
    pub policy: Option<String>,
    /// Only records after this seq (`--follow`).
    pub after_seq: Option<u64>,
    pub limit: Option<u64>,
}

impl Filter {
    /// Whether the record `row` (with its time in ns) matches: the same test the SQL makes.
    fn matches(&self, row: &Row<'_>, time_ns: i128) -> bool {
        let eq = |v: &Option<std::borrow::Cow<'_, str>>, s: &str| v.as_deref() == Some(s);
        self.since_ns.is_none_or(|t| time_ns >= t)
            && self.until_ns.is_none_or(|t| time_ns < t)
            && self
                .src
                .as_deref()
                .is_none_or(|s| eq(&row.src_identity, s) || eq(&row.src_workload, s))
            && self
                .dst
                .as_deref()
                .is_none_or(|s| eq(&row.dst_identity, s) || eq(&row.dst_workload, s))
            && self
                .namespace
                .as_deref()
                .is_none_or(|n| row.src_ns() == Some(n) || row.dst_ns() == Some(n))
            && self.port.is_none_or(|p| row.port == Some(p))
            && self.verdict.is_none_or(|v| row.verdict == Some(v.as_str()))
            && self.kind.is_none_or(|k| row.kind == k.as_str())
            && self.policy.as_deref().is_none_or(|p| eq(&row.policy, p))
            && self.after_seq.is_none_or(|s| row.seq > s)
    }
}

/// How an index update went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    pub indexed: u64,
    /// Lines skipped: oversize or not a record (`audit verify` says more).
    pub skipped: u64,
    pub rebuilt: bool,
    /// The highest seq the index now covers, when this update moved it.
    pub last_seq: Option<u64>,
    /// The step's byte budget ran out before the end of the log (`update_step`).
    pub more: bool,
}

impl UpdateStats {
    fn add(&mut self, o: &UpdateStats) {
        self.indexed += o.indexed;
        self.skipped += o.skipped;
        self.rebuilt |= o.rebuilt;
        self.last_seq = o.last_seq.or(self.last_seq);
        self.more = o.more;
    }
}

/// Where the index stands on one segment.
#[derive(Clone, Debug)]
struct Known {
    indexed_bytes: u64,
    first_line: String,
}

/// An open index over an audit directory.
pub struct Index {
    dir: PathBuf,
    path: PathBuf,
    db: Connection,
    /// Interned strings: value → (id, roles), as committed (cleared when a write fails).
    strings: HashMap<String, (i64, i64)>,
}

/// A segment on disk: first seq, path, size, hash of its first line.
struct OnDisk {
    first_seq: u64,
    path: PathBuf,
    size: u64,
    first_line: String,
}

fn on_disk(dir: &Path) -> Result<Vec<OnDisk>, IndexError> {
    let segments = list_segments(dir).map_err(|source| IndexError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::with_capacity(segments.len());
    for (first_seq, path) in segments {
        match first_line_hash(&path) {
            Ok((size, first_line)) => out.push(OnDisk {
                first_seq,
                path,
                size,
                first_line,
            }),
            // Removed between the listing and the open (retention): not there.
            Err(IndexError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Where to start reading `seg` given what the index knows: `None` when the segment changed
/// under the index (it shrank, or its first line differs).
fn resume_at(seg: &OnDisk, known: Option<&Known>) -> Option<u64> {
    match known {
        None => Some(0),
        Some(k)
            if k.indexed_bytes <= seg.size
                && (k.indexed_bytes == 0 || k.first_line == seg.first_line) =>
        {
            Some(k.indexed_bytes)
        }
        Some(_) => None,
    }
}

impl Index {
    /// Opens (or creates) the index at `path` for the log in `dir`, for reading and updating.
    pub fn open(dir: &Path, path: &Path) -> Result<Self, IndexError> {
        let sql = |source| IndexError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let db = Connection::open(path).map_err(sql)?;
        db.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA cache_size = -65536;
             PRAGMA wal_autocheckpoint = 16384;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(sql)?;
        let version: Option<String> = db
            .query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)?;
        if version.as_deref() != Some(INDEX_VERSION) {
            db.execute_batch(
                "BEGIN IMMEDIATE;
                 DROP TABLE IF EXISTS records; DROP TABLE IF EXISTS segments;
                 DROP TABLE IF EXISTS strings; DELETE FROM meta;
                 COMMIT;",
            )
            .map_err(sql)?;
        }
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS segments (
                 first_seq INTEGER PRIMARY KEY,
                 indexed_bytes INTEGER NOT NULL,
                 first_line TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS strings (
                 id INTEGER PRIMARY KEY,
                 s TEXT NOT NULL UNIQUE,
                 roles INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS records (
                 seq INTEGER PRIMARY KEY,
                 time_ns INTEGER NOT NULL,
                 kind TEXT NOT NULL,
                 verdict TEXT,
                 src_id INTEGER, dst_id INTEGER,
                 src_wl INTEGER, dst_wl INTEGER,
                 src_ns INTEGER, dst_ns INTEGER,
                 port INTEGER,
                 policy INTEGER,
                 segment INTEGER NOT NULL,
                 offset INTEGER NOT NULL,
                 len INTEGER NOT NULL);",
        )
        .map_err(sql)?;
        // Not inside a bulk load (indexes dropped until it ends): the indexes exist.
        let bulk: bool = db
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'bulk')",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if !bulk {
            db.execute_batch(&create_indexes()).map_err(sql)?;
        }
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('version', ?1)",
            [INDEX_VERSION],
        )
        .map_err(sql)?;
        Ok(Self {
            dir: dir.to_owned(),
            path: path.to_owned(),
            db,
            strings: HashMap::new(),
        })
    }

    /// [`Index::open`]; a file that is not a database or is damaged is deleted (with its WAL)
    /// and the index recreated empty (to be rebuilt from the segments).
    /// Bounds SQLite's page cache of this connection to `kib` KiB (the agent's indexer keeps
    /// a small one: it lives in the node agent, whose memory is budgeted; `audit query` keeps
    /// the default of [`Index::open`]).
    pub fn set_cache_kib(&self, kib: u32) -> Result<(), IndexError> {
        self.db
            .execute_batch(&format!("PRAGMA cache_size = -{kib};"))
            .map_err(|source| IndexError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    pub fn open_or_recreate(dir: &Path, path: &Path) -> Result<(Self, bool), IndexError> {
        match Self::open(dir, path) {
            Ok(i) => Ok((i, false)),
            Err(e) if e.is_corrupt() => {
                remove_index_files(path);
                Self::open(dir, path).map(|i| (i, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Opens an existing index for reading only (nothing is written: another process, the
    /// log's writer, keeps it). `None` when there is no usable index (absent, another layout,
    /// unreadable): the caller reads the segments.
    pub fn open_existing(dir: &Path, path: &Path) -> Option<Self> {
        if !path.exists() {
            return None;
        }
        let db = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .ok()?;
        db.busy_timeout(BUSY_TIMEOUT).ok()?;
        let version: Option<String> = db
            .query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })
            .ok();
        (version.as_deref() == Some(INDEX_VERSION)).then(|| Self {
            dir: dir.to_owned(),
            path: path.to_owned(),
            db,
            strings: HashMap::new(),
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> IndexError + '_ {
        |source| IndexError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The seq after the highest one indexed (0 for an empty index).
    pub fn next_seq(&self) -> Result<u64, IndexError> {
        self.db
            .query_row("SELECT COALESCE(MAX(seq) + 1, 0) FROM records", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(self.sql())
    }

    /// Makes the next update rebuild the index from scratch.
    pub fn mark_for_rebuild(&self) -> Result<(), IndexError> {
        self.db
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('rebuild', '1')",
                [],
            )
            .map(drop)
            .map_err(self.sql())
    }

    /// Indexes everything appended since the last update, in transactions of at most
    /// [`STEP_BYTES`]; rebuilds when a segment changed under the index; forgets segments
    /// that were removed. An empty index facing a large log builds its secondary indexes
    /// once, at the end.
    pub fn update(&mut self) -> Result<UpdateStats, IndexError> {
        self.update_until(&|| false, &mut |_| {})
    }

    /// [`Index::update`], stopping between transactions once `stop()` says so; `committed` is
    /// called after each transaction.
    pub fn update_until(
        &mut self,
        stop: &dyn Fn() -> bool,
        committed: &mut dyn FnMut(&UpdateStats),
    ) -> Result<UpdateStats, IndexError> {
        let mut total = UpdateStats::default();
        let bulk = self.bulk_worth_it()?;
        if bulk {
            self.db
                .execute_batch(&format!(
                    "BEGIN IMMEDIATE; {} INSERT OR REPLACE INTO meta (key, value) VALUES ('bulk', '1'); COMMIT;",
                    drop_indexes()
                ))
                .map_err(self.sql())?;
        }
        loop {
            let s = self.update_step(STEP_BYTES)?;
            committed(&s);
            total.add(&s);
            if !s.more || stop() {
                break;
            }
        }
        if bulk || self.in_bulk()? {
            self.finish_bulk()?;
        }
        Ok(total)
    }

    /// Whether the index is in a bulk load (its secondary indexes dropped).
    fn in_bulk(&self) -> Result<bool, IndexError> {
        self.db
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'bulk')",
                [],
                |r| r.get(0),
            )
            .map_err(self.sql())
    }

    /// Builds the secondary indexes and ends the bulk load.
    fn finish_bulk(&self) -> Result<(), IndexError> {
        self.db
            .execute_batch(&format!(
                "BEGIN IMMEDIATE; {} DELETE FROM meta WHERE key = 'bulk'; COMMIT;",
                create_indexes()
            ))
            .map_err(self.sql())
    }

    /// An empty index and more than [`BULK_BYTES`] to index.
    fn bulk_worth_it(&self) -> Result<bool, IndexError> {
        let empty: bool = self
            .db
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM records)", [], |r| {
                r.get(0)
            })
            .map_err(self.sql())?;
        if !empty {
            return Ok(false);
        }
        let total: u64 = on_disk(&self.dir)?.iter().map(|s| s.size).sum();
        Ok(total > BULK_BYTES)
    }

    /// One transaction: indexes at most `max_bytes` of what was appended (whole lines; at
    /// least one line). `more` says whether there is more to index.
    pub fn update_step(&mut self, max_bytes: u64) -> Result<UpdateStats, IndexError> {
        let r = self.update_step_inner(max_bytes);
        if r.is_err() {
            // The transaction rolled back: interned ids from it may not exist.
            self.strings.clear();
        }
        r
    }

    fn update_step_inner(&mut self, max_bytes: u64) -> Result<UpdateStats, IndexError> {
        let segments = on_disk(&self.dir)?;
        let path = self.path.clone();
        let sql = |source| IndexError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = rusqlite::Transaction::new_unchecked(
            &self.db,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(sql)?;
        let mut stats = UpdateStats::default();
        let known = read_known(&tx).map_err(sql)?;
        let mut rebuild: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'rebuild')",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        let mut plan = Vec::with_capacity(segments.len());
        for seg in &segments {
            match resume_at(seg, known.get(&seg.first_seq)) {
                Some(from) => plan.push(from),
                None => {
                    rebuild = true;
                    plan.push(0);
                }
            }
        }
        if rebuild {
            stats.rebuilt = true;
            tx.execute_batch(
                "DELETE FROM records; DELETE FROM segments; DELETE FROM meta WHERE key = 'rebuild';",
            )
            .map_err(sql)?;
            plan.iter_mut().for_each(|p| *p = 0);
        } else {
            // Segments gone from the directory (retention): forget their records (a segment's
            // records are the seqs from its first to the next known segment's first).
            let present: std::collections::HashSet<u64> =
                segments.iter().map(|s| s.first_seq).collect();
            let mut firsts: Vec<u64> = known.keys().copied().collect();
            firsts.sort_unstable();
            for (i, k) in firsts.iter().enumerate() {
                if present.contains(k) {
                    continue;
                }
                let hi = firsts.get(i + 1).map_or(i64::MAX, |n| *n as i64);
                tx.execute(
                    "DELETE FROM records WHERE seq >= ?1 AND seq < ?2 AND segment = ?1",
                    params![*k as i64, hi],
                )
                .map_err(sql)?;
                tx.execute("DELETE FROM segments WHERE first_seq = ?1", [*k as i64])
                    .map_err(sql)?;
            }
        }
        let mut budget = max_bytes.max(1);
        let mut times = TimeCache::default();
        for (seg, from) in segments.iter().zip(plan) {
            if from >= seg.size {
                continue;
            }
            if budget == 0 {
                stats.more = true;
                break;
            }
            let (data, complete, cut) = read_tail(&seg.path, from, seg.size, budget)?;
            budget = budget.saturating_sub(complete as u64);
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO records (seq, time_ns, kind, verdict, src_id, dst_id,
                         src_wl, dst_wl, src_ns, dst_ns, port, policy, segment, offset, len)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                )
                .map_err(sql)?;
            let mut offset = from;
            for line in data[..complete].split(|&b| b == b'\n') {
                let line_offset = offset;
                offset += line.len() as u64 + 1;
                if line_offset >= from + complete as u64 {
                    break;
                }
                let Some(row) = Row::parse(line) else {
                    stats.skipped += 1;
                    continue;
                };
                let Some(time_ns) = times.ns(row.time) else {
                    stats.skipped += 1;
                    continue;
                };
                let mut id = |s: Option<&str>, role: i64| -> Result<Option<i64>, IndexError> {
                    s.map(|s| intern(&tx, &mut self.strings, s, role).map_err(sql))
                        .transpose()
                };
                let src_id = id(row.src_identity.as_deref(), ROLE_IDENTITY)?;
                let dst_id = id(row.dst_identity.as_deref(), ROLE_IDENTITY)?;
                let src_wl = id(row.src_workload.as_deref(), ROLE_WORKLOAD)?;
                let dst_wl = id(row.dst_workload.as_deref(), ROLE_WORKLOAD)?;
                let src_ns = id(row.src_ns(), ROLE_NAMESPACE)?;
                let dst_ns = id(row.dst_ns(), ROLE_NAMESPACE)?;
                let policy = id(row.policy.as_deref(), ROLE_POLICY)?;
                let inserted = insert
                    .execute(params![
                        row.seq as i64,
                        clamp_ns(time_ns),
                        row.kind,
                        row.verdict,
                        src_id,
                        dst_id,
                        src_wl,
                        dst_wl,
                        src_ns,
                        dst_ns,
                        row.port,
                        policy,
                        seg.first_seq as i64,
                        line_offset as i64,
                        line.len() as i64,
                    ])
                    .map_err(sql)?;
                // 0: already there (another updater indexed it).
                stats.indexed += inserted as u64;
                stats.last_seq = Some(stats.last_seq.map_or(row.seq, |s| s.max(row.seq)));
            }
            tx.execute(
                "INSERT OR REPLACE INTO segments (first_seq, indexed_bytes, first_line)
                 VALUES (?1, ?2, ?3)",
                params![
                    seg.first_seq as i64,
                    (from + complete as u64) as i64,
                    seg.first_line
                ],
            )
            .map_err(sql)?;
            // The index stays a prefix of the log: the next segment only once this one is
            // indexed to its end.
            if cut {
                stats.more = true;
                break;
            }
        }
        tx.commit().map_err(sql)?;
        Ok(stats)
    }

    /// The records matching `filter`, in seq order: what the index covers (one snapshot),
    /// read back from the segments, and the unindexed tail read from the segments directly.
    /// Nothing is written.
    pub fn query(&self, filter: &Filter) -> Result<Vec<(Record, Vec<u8>)>, IndexError> {
        let sql = self.sql();
        // One read transaction: the positions and the rows are the same snapshot.
        let tx =
            rusqlite::Transaction::new_unchecked(&self.db, rusqlite::TransactionBehavior::Deferred)
                .map_err(&sql)?;
        let known = read_known(&tx).map_err(&sql)?;
        let segments = on_disk(&self.dir)?;
        // A segment changed under the index: the index cannot be trusted.
        if segments
            .iter()
            .any(|s| resume_at(s, known.get(&s.first_seq)).is_none())
        {
            return Err(IndexError::Stale {
                path: self.dir.clone(),
                seq: 0,
            });
        }
        let hits = self.index_hits(&tx, filter)?;
        drop(tx);
        let present: HashMap<u64, &OnDisk> = segments.iter().map(|s| (s.first_seq, s)).collect();
        let mut out = Vec::with_capacity(hits.len());
        let mut open: Option<(u64, fs::File, PathBuf)> = None;
        for (seq, segment, offset, len) in hits {
            // A segment removed since (retention): its records are gone.
            let Some(seg) = present.get(&segment) else {
                continue;
            };
            if open.as_ref().map(|o| o.0) != Some(segment) {
                let f = fs::File::open(&seg.path).map_err(|source| IndexError::Io {
                    path: seg.path.clone(),
                    source,
                })?;
                open = Some((segment, f, seg.path.clone()));
            }
            let (_, f, path) = open.as_ref().expect("just set");
            let mut line = vec![0u8; len];
            f.read_exact_at(&mut line, offset)
                .map_err(|source| IndexError::Io {
                    path: path.clone(),
                    source,
                })?;
            match serde_json::from_slice::<Record>(&line) {
                Ok(r) if r.seq == seq => out.push((r, line)),
                _ => {
                    return Err(IndexError::Stale {
                        path: path.clone(),
                        seq,
                    })
                }
            }
        }
        // The tail: what each segment holds past what the snapshot indexed.
        let tail: Vec<(&OnDisk, u64)> = segments
            .iter()
            .map(|s| (s, known.get(&s.first_seq).map_or(0, |k| k.indexed_bytes)))
            .collect();
        scan_into(&tail, filter, &mut out)?;
        finish(&mut out, filter);
        Ok(out)
    }

    /// The rows of the index matching `filter`: (seq, segment, offset, len) in seq order.
    fn index_hits(
        &self,
        tx: &rusqlite::Transaction<'_>,
        filter: &Filter,
    ) -> Result<Vec<(u64, u64, u64, usize)>, IndexError> {
        let sql = self.sql();
        let Some((text, args)) = self.hits_sql(tx, filter)? else {
            return Ok(Vec::new());
        };
        let mut stmt = tx.prepare(&text).map_err(&sql)?;
        let hits = stmt
            .query_map(params_from_iter(args), |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)? as usize,
                ))
            })
            .map_err(&sql)?
            .collect::<Result<_, _>>()
            .map_err(&sql)?;
        Ok(hits)
    }

    /// The SQL of `filter` and its arguments; `None` when a filter value was never indexed in
    /// that role (nothing in the index can match).
    fn hits_sql(
        &self,
        tx: &rusqlite::Transaction<'_>,
        filter: &Filter,
    ) -> Result<Option<(String, Vec<rusqlite::types::Value>)>, IndexError> {
        use rusqlite::types::Value;
        let sql = self.sql();
        // Interned values: (id, roles).
        let lookup = |s: &str| -> Result<Option<(i64, i64)>, IndexError> {
            tx.query_row("SELECT id, roles FROM strings WHERE s = ?1", [s], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(&sql)
        };
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        // `--src`/`--dst`: the identity column, the workload column or both, by the roles
        // the value has had (a SPIFFE ID is never a workload name: one index range).
        for (v, id_col, wl_col) in [
            (&filter.src, "src_id", "src_wl"),
            (&filter.dst, "dst_id", "dst_wl"),
        ] {
            let Some(v) = v else { continue };
            let Some((id, roles)) = lookup(v)? else {
                return Ok(None);
            };
            let mut cols = Vec::new();
            for (role, col) in [(ROLE_IDENTITY, id_col), (ROLE_WORKLOAD, wl_col)] {
                if roles & role != 0 {
                    cols.push(format!("{col} = ?"));
                    args.push(Value::Integer(id));
                }
            }
            if cols.is_empty() {
                return Ok(None);
            }
            clauses.push(format!("({})", cols.join(" OR ")));
        }
        for (v, role, clause, n) in [
            (
                &filter.namespace,
                ROLE_NAMESPACE,
                "(src_ns = ? OR dst_ns = ?)",
                2,
            ),
            (&filter.policy, ROLE_POLICY, "policy = ?", 1),
        ] {
            let Some(v) = v else { continue };
            match lookup(v)? {
                Some((id, roles)) if roles & role != 0 => {
                    clauses.push(clause.to_owned());
                    args.extend(std::iter::repeat_n(Value::Integer(id), n));
                }
                _ => return Ok(None),
            }
        }
        let mut arg = |clause: &str, v: Value| {
            clauses.push(clause.to_owned());
            args.push(v);
        };
        if let Some(t) = filter.since_ns {
            arg("time_ns >= ?", Value::Integer(clamp_ns(t)));
        }
        if let Some(t) = filter.until_ns {
            arg("time_ns < ?", Value::Integer(clamp_ns(t)));
        }
        if let Some(p) = filter.port {
            arg("port = ?", Value::Integer(p.into()));
        }
        if let Some(v) = filter.verdict {
            arg("verdict = ?", Value::Text(v.as_str().into()));
        }
        if let Some(k) = filter.kind {
            arg("kind = ?", Value::Text(k.as_str().into()));
        }
        if let Some(s) = filter.after_seq {
            arg("seq > ?", Value::Integer(s.min(i64::MAX as u64) as i64));
        }
        let mut text = String::from("SELECT seq, segment, offset, len FROM records");
        if !clauses.is_empty() {
            text.push_str(" WHERE ");
            text.push_str(&clauses.join(" AND "));
        }
        text.push_str(" ORDER BY seq");
        if let Some(l) = filter.limit {
            text.push_str(&format!(" LIMIT {}", l.min(i64::MAX as u64)));
        }
        Ok(Some((text, args)))
    }

    /// The query plan SQLite chooses for `filter` (`EXPLAIN QUERY PLAN`, one detail a line).
    pub fn plan(&self, filter: &Filter) -> Result<Vec<String>, IndexError> {
        let sql = self.sql();
        let tx =
            rusqlite::Transaction::new_unchecked(&self.db, rusqlite::TransactionBehavior::Deferred)
                .map_err(&sql)?;
        let Some((text, args)) = self.hits_sql(&tx, filter)? else {
            return Ok(vec!["no rows: a filter value the index never saw".into()]);
        };
        let mut stmt = tx
            .prepare(&format!("EXPLAIN QUERY PLAN {text}"))
            .map_err(&sql)?;
        let rows = stmt
            .query_map(params_from_iter(args), |r| r.get::<_, String>(3))
            .map_err(&sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&sql)?;
        Ok(rows)
    }
}

/// Sorts `out` by seq, drops duplicates (none expected) and applies the limit.
fn finish(out: &mut Vec<(Record, Vec<u8>)>, filter: &Filter) {
    out.sort_by_key(|(r, _)| r.seq);
    out.dedup_by_key(|(r, _)| r.seq);
    if let Some(l) = filter.limit {
        out.truncate(usize::try_from(l).unwrap_or(usize::MAX));
    }
}

/// The records matching `filter` read from the segments alone, without an index (a log with
/// no usable index, or one that changed under it).
pub fn scan(dir: &Path, filter: &Filter) -> Result<Vec<(Record, Vec<u8>)>, IndexError> {
    let segments = on_disk(dir)?;
    let all: Vec<(&OnDisk, u64)> = segments.iter().map(|s| (s, 0)).collect();
    let mut out = Vec::new();
    scan_into(&all, filter, &mut out)?;
    finish(&mut out, filter);
    Ok(out)
}

/// Appends the records of each segment from its offset on that match `filter` (complete
/// lines only), reading in chunks.
fn scan_into(
    from: &[(&OnDisk, u64)],
    filter: &Filter,
    out: &mut Vec<(Record, Vec<u8>)>,
) -> Result<(), IndexError> {
    let mut times = TimeCache::default();
    for (seg, start) in from {
        let mut pos = *start;
        // The size now (the writer may have appended since the listing).
        let size = match fs::metadata(&seg.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(IndexError::Io {
                    path: seg.path.clone(),
                    source,
                })
            }
        };
        while pos < size {
            let (data, complete, _) = read_tail(&seg.path, pos, size, STEP_BYTES)?;
            if complete == 0 {
                break;
            }
            for line in data[..complete].split(|&b| b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                let Some(row) = Row::parse(line) else {
                    continue;
                };
                let Some(t) = times.ns(row.time) else {
                    continue;
                };
                if filter.matches(&row, t) {
                    if let Ok(r) = serde_json::from_slice::<Record>(line) {
                        out.push((r, line.to_vec()));
                    }
                }
            }
            pos += complete as u64;
        }
    }
    Ok(())
}

/// Reads `path` from `from` (up to `size`): at most `budget` bytes, or more to reach the end
/// of a line longer than that. Returns the data, the length of its complete lines, and whether
/// the budget cut it before `size`.
fn read_tail(
    path: &Path,
    from: u64,
    size: u64,
    budget: u64,
) -> Result<(Vec<u8>, usize, bool), IndexError> {
    let io = |source| IndexError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    f.seek(SeekFrom::Start(from)).map_err(io)?;
    let want = size.saturating_sub(from).min(budget.max(1));
    let mut data = Vec::with_capacity(want as usize);
    (&mut f).take(want).read_to_end(&mut data).map_err(io)?;
    let mut complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete == 0 && from + (data.len() as u64) < size {
        // One line longer than the budget: read on to its end.
        let mut rest = Vec::new();
        (&mut f)
            .take(size - from - data.len() as u64)
            .read_to_end(&mut rest)
            .map_err(io)?;
        data.extend_from_slice(&rest);
        complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    }
    let cut = from + (data.len() as u64) < size;
    Ok((data, complete, cut))
}

fn read_known(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<HashMap<u64, Known>> {
    let mut stmt =
        tx.prepare_cached("SELECT first_seq, indexed_bytes, first_line FROM segments")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            Known {
                indexed_bytes: r.get::<_, i64>(1)? as u64,
                first_line: r.get(2)?,
            },
        ))
    })?;
    rows.collect()
}

/// The id of `s`, inserted if new, with `role` added to its roles.
fn intern(
    tx: &rusqlite::Transaction<'_>,
    cache: &mut HashMap<String, (i64, i64)>,
    s: &str,
    role: i64,
) -> rusqlite::Result<i64> {
    if let Some((id, roles)) = cache.get_mut(s) {
        if *roles & role == 0 {
            tx.execute(
                "UPDATE strings SET roles = roles | ?2 WHERE id = ?1",
                params![*id, role],
            )?;
            *roles |= role;
        }
        return Ok(*id);
    }
    tx.execute(
        "INSERT INTO strings (s, roles) VALUES (?1, ?2)
         ON CONFLICT (s) DO UPDATE SET roles = roles | excluded.roles",
        params![s, role],
    )?;
    let (id, roles): (i64, i64) =
        tx.query_row("SELECT id, roles FROM strings WHERE s = ?1", [s], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    cache.insert(s.to_owned(), (id, roles));
    Ok(id)
}

/// Deletes the index file and its WAL and shared-memory files.
pub fn remove_index_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = fs::remove_file(PathBuf::from(p));
    }
}

fn clamp_ns(t: i128) -> i64 {
    t.clamp(i64::MIN.into(), i64::MAX.into()) as i64
}

/// A segment's size and the hash of its first line (empty: `""`).
fn first_line_hash(path: &Path) -> Result<(u64, String), IndexError> {
    let io = |source| IndexError::Io {
        path: path.to_owned(),
        source,
    };
    let f = fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    // Most first lines are well under 4 KiB: read more only when needed.
    let mut want = 4096usize;
    loop {
        let len = want.min(size as usize);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0).map_err(io)?;
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            return Ok((size, hex(&hash_line(&buf[..i]))));
        }
        if len == size as usize || len > MAX_LINE_LEN {
            return Ok((size, String::new()));
        }
        want *= 4;
    }
}
