//! `audit query`: a SQLite index beside the chain.
//!
//! The segments stay the source of truth: the index holds, per record, the fields filters
//! use and where the line is (segment, offset, length); results are read back from the
//! segments. The index is brought up to date before every query (only bytes appended since
//! the last run are read) and rebuilt from scratch when a segment shrank or changed under
//! it. Deleting the index file is always safe.

use std::{
    fs,
    io::{self, Read as _, Seek as _, SeekFrom},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use rusqlite::{params, params_from_iter, Connection, OptionalExtension as _};
use serde::Deserialize;

use super::{
    record::{hash_line, hex, namespace_of, parse_time_ns, Kind, Record, Verdict, MAX_LINE_LEN},
    segment::list_segments,
};

/// The index file's default name in the audit directory.
pub const INDEX_FILE: &str = "index.sqlite";

/// The secondary indexes: (name, column).
const INDEXES: &[(&str, &str)] = &[
    ("records_time", "time_ns"),
    ("records_src_id", "src_identity"),
    ("records_dst_id", "dst_identity"),
    ("records_src_wl", "src_workload"),
    ("records_dst_wl", "dst_workload"),
    ("records_src_ns", "src_ns"),
    ("records_dst_ns", "dst_ns"),
    ("records_policy", "policy"),
    ("records_segment", "segment"),
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
const INDEX_VERSION: &str = "1";

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

/// How an index update went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    pub indexed: u64,
    /// Lines skipped: oversize or not a record (`audit verify` says more).
    pub skipped: u64,
    pub rebuilt: bool,
}

/// An open index over an audit directory.
pub struct Index {
    dir: PathBuf,
    path: PathBuf,
    db: Connection,
}

impl Index {
    /// Opens (or creates) the index at `path` for the log in `dir`.
    pub fn open(dir: &Path, path: &Path) -> Result<Self, IndexError> {
        let sql = |source| IndexError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let db = Connection::open(path).map_err(sql)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA cache_size = -65536;
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
            db.execute_batch("DROP TABLE IF EXISTS records; DROP TABLE IF EXISTS segments;")
                .map_err(sql)?;
        }
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS segments (
                 first_seq INTEGER PRIMARY KEY,
                 indexed_bytes INTEGER NOT NULL,
                 first_line TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS records (
                 seq INTEGER PRIMARY KEY,
                 time_ns INTEGER NOT NULL,
                 kind TEXT NOT NULL,
                 verdict TEXT,
                 src_identity TEXT, dst_identity TEXT,
                 src_workload TEXT, dst_workload TEXT,
                 src_ns TEXT, dst_ns TEXT,
                 port INTEGER,
                 policy TEXT,
                 segment INTEGER NOT NULL,
                 offset INTEGER NOT NULL,
                 len INTEGER NOT NULL);",
        )
        .map_err(sql)?;
        db.execute_batch(&create_indexes()).map_err(sql)?;
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('version', ?1)",
            [INDEX_VERSION],
        )
        .map_err(sql)?;
        Ok(Self {
            dir: dir.to_owned(),
            path: path.to_owned(),
            db,
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> IndexError + '_ {
        |source| IndexError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Indexes what was appended since the last update; rebuilds when a segment changed
    /// under the index; forgets segments that were removed.
    pub fn update(&mut self) -> Result<UpdateStats, IndexError> {
        let dir_io = |source| IndexError::Io {
            path: self.dir.clone(),
            source,
        };
        let segments = list_segments(&self.dir).map_err(dir_io)?;
        let mut stats = UpdateStats::default();
        let mut plan = Vec::with_capacity(segments.len());
        for (first_seq, path) in &segments {
            let (size, first_line) = first_line_hash(path)?;
            let known: Option<(u64, String)> = self
                .db
                .query_row(
                    "SELECT indexed_bytes, first_line FROM segments WHERE first_seq = ?1",
                    [*first_seq as i64],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
                )
                .optional()
                .map_err(self.sql())?;
            let from = match known {
                Some((indexed, hash))
                    if indexed <= size && (indexed == 0 || hash == first_line) =>
                {
                    indexed
                }
                Some(_) => {
                    stats.rebuilt = true;
                    0
                }
                None => 0,
            };
            plan.push((*first_seq, path.clone(), from, first_line));
        }
        let tx = self.db.transaction().map_err(|source| IndexError::Sqlite {
            path: self.path.clone(),
            source,
        })?;
        let sql = |source| IndexError::Sqlite {
            path: self.path.clone(),
            source,
        };
        if stats.rebuilt {
            tx.execute_batch("DELETE FROM records; DELETE FROM segments;")
                .map_err(sql)?;
            for p in &mut plan {
                p.2 = 0;
            }
        }
        // A bulk load into an empty table: build the secondary indexes once at the end
        // (several times faster than maintaining them row by row).
        let empty: bool = tx
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM records)", [], |r| {
                r.get(0)
            })
            .map_err(sql)?;
        if empty {
            tx.execute_batch(&drop_indexes()).map_err(sql)?;
        }
        // Segments gone from the directory (retention): forget their records.
        let present: Vec<i64> = plan.iter().map(|p| p.0 as i64).collect();
        {
            let mut stmt = tx.prepare("SELECT first_seq FROM segments").map_err(sql)?;
            let known: Vec<i64> = stmt
                .query_map([], |r| r.get(0))
                .map_err(sql)?
                .collect::<Result<_, _>>()
                .map_err(sql)?;
            for k in known.into_iter().filter(|k| !present.contains(k)) {
                tx.execute("DELETE FROM records WHERE segment = ?1", [k])
                    .map_err(sql)?;
                tx.execute("DELETE FROM segments WHERE first_seq = ?1", [k])
                    .map_err(sql)?;
            }
        }
        {
            let mut insert = tx
                .prepare(
                    "INSERT OR REPLACE INTO records (seq, time_ns, kind, verdict, src_identity,
                         dst_identity, src_workload, dst_workload, src_ns, dst_ns, port, policy,
                         segment, offset, len)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                )
                .map_err(sql)?;
            for (first_seq, path, from, first_line) in &plan {
                let io = |source| IndexError::Io {
                    path: path.clone(),
                    source,
                };
                let mut f = fs::File::open(path).map_err(io)?;
                f.seek(SeekFrom::Start(*from)).map_err(io)?;
                let mut data = Vec::new();
                f.read_to_end(&mut data).map_err(io)?;
                // Only complete lines: a line being written is indexed next time.
                let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let mut offset = *from;
                for line in data[..complete].split(|&b| b == b'\n') {
                    let line_offset = offset;
                    offset += line.len() as u64 + 1;
                    if line.is_empty() && line_offset >= from + complete as u64 {
                        break;
                    }
                    let row = if line.len() > MAX_LINE_LEN {
                        None
                    } else {
                        serde_json::from_slice::<Row<'_>>(line).ok()
                    };
                    let Some(row) = row else {
                        stats.skipped += 1;
                        continue;
                    };
                    let Some(time_ns) = parse_time_ns(row.time) else {
                        stats.skipped += 1;
                        continue;
                    };
                    let ns = |w: &Option<std::borrow::Cow<'_, str>>,
                              i: &Option<std::borrow::Cow<'_, str>>| {
                        w.as_deref()
                            .and_then(namespace_of)
                            .or_else(|| i.as_deref().and_then(namespace_of))
                            .map(str::to_owned)
                    };
                    insert
                        .execute(params![
                            row.seq as i64,
                            time_ns as i64,
                            row.kind,
                            row.verdict,
                            row.src_identity.as_deref(),
                            row.dst_identity.as_deref(),
                            row.src_workload.as_deref(),
                            row.dst_workload.as_deref(),
                            ns(&row.src_workload, &row.src_identity),
                            ns(&row.dst_workload, &row.dst_identity),
                            row.port,
                            row.policy.as_deref(),
                            *first_seq as i64,
                            line_offset as i64,
                            line.len() as i64,
                        ])
                        .map_err(sql)?;
                    stats.indexed += 1;
                }
                tx.execute(
                    "INSERT OR REPLACE INTO segments (first_seq, indexed_bytes, first_line)
                     VALUES (?1, ?2, ?3)",
                    params![
                        *first_seq as i64,
                        (*from + complete as u64) as i64,
                        first_line
                    ],
                )
                .map_err(sql)?;
            }
        }
        if empty {
            tx.execute_batch(&create_indexes()).map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(stats)
    }

    /// The records matching `filter`, in seq order, read back from the segments.
    pub fn query(&self, filter: &Filter) -> Result<Vec<(Record, Vec<u8>)>, IndexError> {
        let mut clauses: Vec<&str> = Vec::new();
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        use rusqlite::types::Value;
        let mut arg = |clause: &'static str, v: Value, n: usize| {
            clauses.push(clause);
            for _ in 0..n {
                args.push(v.clone());
            }
        };
        if let Some(t) = filter.since_ns {
            arg("time_ns >= ?", Value::Integer(clamp_ns(t)), 1);
        }
        if let Some(t) = filter.until_ns {
            arg("time_ns < ?", Value::Integer(clamp_ns(t)), 1);
        }
        if let Some(s) = &filter.src {
            arg(
                "(src_identity = ? OR src_workload = ?)",
                Value::Text(s.clone()),
                2,
            );
        }
        if let Some(s) = &filter.dst {
            arg(
                "(dst_identity = ? OR dst_workload = ?)",
                Value::Text(s.clone()),
                2,
            );
        }
        if let Some(s) = &filter.namespace {
            arg("(src_ns = ? OR dst_ns = ?)", Value::Text(s.clone()), 2);
        }
        if let Some(p) = filter.port {
            arg("port = ?", Value::Integer(p.into()), 1);
        }
        if let Some(v) = filter.verdict {
            arg("verdict = ?", Value::Text(v.as_str().into()), 1);
        }
        if let Some(k) = filter.kind {
            arg("kind = ?", Value::Text(k.as_str().into()), 1);
        }
        if let Some(p) = &filter.policy {
            arg("policy = ?", Value::Text(p.clone()), 1);
        }
        if let Some(s) = filter.after_seq {
            arg("seq > ?", Value::Integer(s as i64), 1);
        }
        let mut sql_text = String::from("SELECT seq, segment, offset, len FROM records");
        if !clauses.is_empty() {
            sql_text.push_str(" WHERE ");
            sql_text.push_str(&clauses.join(" AND "));
        }
        sql_text.push_str(" ORDER BY seq");
        if let Some(l) = filter.limit {
            sql_text.push_str(&format!(" LIMIT {l}"));
        }
        let sql = self.sql();
        let mut stmt = self.db.prepare(&sql_text).map_err(&sql)?;
        let hits: Vec<(u64, u64, u64, usize)> = stmt
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
        let mut out = Vec::with_capacity(hits.len());
        let mut open: Option<(u64, fs::File, PathBuf)> = None;
        for (seq, segment, offset, len) in hits {
            if open.as_ref().map(|o| o.0) != Some(segment) {
                let path = self.dir.join(super::segment::segment_name(segment));
                let f = fs::File::open(&path).map_err(|source| IndexError::Io {
                    path: path.clone(),
                    source,
                })?;
                open = Some((segment, f, path));
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
                    // The segment changed under the index: make the next update rebuild.
                    let _ = self.db.execute("DELETE FROM segments", []);
                    return Err(IndexError::Stale {
                        path: path.clone(),
                        seq,
                    });
                }
            }
        }
        Ok(out)
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
