//! Segment files: `segment-<first seq, 20 digits>.jsonl` in the audit directory, one record
//! per line, and the synchronous writer that appends to them, rotates them and checkpoints
//! the chain head.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    checkpoint::{self, AuditKey},
    record::{format_time, hash_line, hex, Entry, Hash, Record, GENESIS, SCHEMA_VERSION},
};

/// The checkpoints file's name in the audit directory (the default `--checkpoints`).
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
/// The exported public key's name in the audit directory.
pub const PUBLIC_KEY_FILE: &str = "audit-key.pub";

const PREFIX: &str = "segment-";
const SUFFIX: &str = ".jsonl";

/// The file name of the segment whose first record is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}{SUFFIX}")
}

/// The first seq a segment file name claims, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, ordered by first seq.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Errors of the writer.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("audit log {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("serializing an audit record")]
    Serialize(#[source] serde_json::Error),
}

/// Tunables of the writer.
#[derive(Clone, Debug)]
pub struct SegmentConfig {
    pub dir: PathBuf,
    pub node: String,
    /// A segment is closed once it reaches this size.
    pub max_bytes: u64,
    /// A segment is closed once it is this old (counted from when this process opened it).
    pub max_age: Duration,
    /// The chain head is checkpointed this often (when it moved), and at every rotation.
    pub checkpoint_interval: Duration,
    /// Where checkpoints are appended.
    pub checkpoints: PathBuf,
    /// Where every checkpoint is also offered, for the authority (never waits).
    pub forward: Option<super::forward::CheckpointSink>,
}

/// What recovery found at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// A torn or unparseable tail of the last segment (bytes cut off), and where it is kept.
    pub torn: Option<(u64, PathBuf)>,
}

struct Open {
    file: fs::File,
    path: PathBuf,
    bytes: u64,
    opened: Instant,
}

/// Appends records to the current segment, keeping the chain.
pub struct SegmentWriter {
    cfg: SegmentConfig,
    key: AuditKey,
    current: Option<Open>,
    next_seq: u64,
    head: Hash,
    checkpointed: Option<u64>,
    last_checkpoint: Instant,
    checkpoints_written: u64,
    rotations: u64,
    line: Vec<u8>,
    batch: Vec<u8>,
}

impl SegmentWriter {
    /// Opens the log in `cfg.dir` (created if missing) and resumes the chain from the last
    /// valid record of the last segment. A torn tail is cut off, kept beside the segment
    /// (`<segment>.torn-<unix time>`) and reported in the returned [`Recovery`].
    pub fn open(cfg: SegmentConfig, key: AuditKey) -> Result<(Self, Recovery), SegmentError> {
        let dir_io = |source| SegmentError::Io {
            path: cfg.dir.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&cfg.dir)
            .map_err(dir_io)?;
        let segments = list_segments(&cfg.dir).map_err(dir_io)?;
        let mut recovery = Recovery::default();
        let mut next_seq = 0;
        let mut head = GENESIS;
        let mut current = None;
        if let Some((first_seq, path)) = segments.last() {
            let io = |source| SegmentError::Io {
                path: path.clone(),
                source,
            };
            let data = fs::read(path).map_err(io)?;
            let (valid_len, last) = last_valid_record(&data);
            if valid_len < data.len() {
                let torn = &data[valid_len..];
                let aside = path.with_extension(format!(
                    "jsonl.torn-{}",
                    time::OffsetDateTime::now_utc().unix_timestamp()
                ));
                fs::write(&aside, torn).map_err(io)?;
                let f = fs::OpenOptions::new().write(true).open(path).map_err(io)?;
                f.set_len(valid_len as u64).map_err(io)?;
                f.sync_all().map_err(io)?;
                warn!(
                    segment = %path.display(),
                    bytes = torn.len(),
                    kept = %aside.display(),
                    "audit log: torn tail cut off at start (crash mid-write?)"
                );
                recovery.torn = Some((torn.len() as u64, aside));
            }
            match last {
                Some((seq, h)) => {
                    next_seq = seq + 1;
                    head = h;
                }
                None => {
                    // An empty last segment (a crash right after a rotation): the chain
                    // head is the previous segment's last record.
                    if let Some((_, prev)) = segments.iter().rev().nth(1) {
                        let data = fs::read(prev).map_err(|source| SegmentError::Io {
                            path: prev.clone(),
                            source,
                        })?;
                        if let (_, Some((seq, h))) = last_valid_record(&data) {
                            next_seq = seq + 1;
                            head = h;
                        }
                    }
                    if next_seq != *first_seq {
                        fs::remove_file(path).map_err(io)?;
                    }
                }
            }
            if path.exists() {
                let file = fs::OpenOptions::new().append(true).open(path).map_err(io)?;
                current = Some(Open {
                    file,
                    path: path.clone(),
                    bytes: valid_len as u64,
                    opened: Instant::now(),
                });
            }
        }
        info!(dir = %cfg.dir.display(), next_seq, "audit log opened");
        Ok((
            Self {
                cfg,
                key,
                current,
                next_seq,
                head,
                checkpointed: None,
                last_checkpoint: Instant::now(),
                checkpoints_written: 0,
                rotations: 0,
                line: Vec::with_capacity(1024),
                batch: Vec::with_capacity(64 * 1024),
            },
            recovery,
        ))
    }

    /// The seq the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Checkpoints this writer appended.
    pub fn checkpoints_written(&self) -> u64 {
        self.checkpoints_written
    }

    /// Segments this writer closed.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Hash of the last record's line ([`GENESIS`] for an empty log).
    pub fn head(&self) -> Hash {
        self.head
    }

    /// Appends `entries` with one write, rotating first when the segment is full.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), SegmentError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.batch.clear();
        let mut seq = self.next_seq;
        let mut head = self.head;
        let time = format_time(time::OffsetDateTime::now_utc());
        for entry in entries {
            let mut body = entry.body.clone();
            body.cap_fields();
            let record = Record {
                v: SCHEMA_VERSION,
                seq,
                time: time.clone(),
                node: self.cfg.node.clone(),
                prev: hex(&head),
                kind: entry.kind,
                body,
            };
            self.line.clear();
            serde_json::to_writer(&mut self.line, &record).map_err(SegmentError::Serialize)?;
            head = hash_line(&self.line);
            self.batch.extend_from_slice(&self.line);
            self.batch.push(b'\n');
            seq += 1;
        }
        let full = self
            .current
            .as_ref()
            .is_some_and(|c| c.bytes > 0 && c.bytes + self.batch.len() as u64 > self.cfg.max_bytes);
        if full {
            self.rotate()?;
        }
        let first = self.next_seq;
        let batch = std::mem::take(&mut self.batch);
        let open = self.current_or_create(first)?;
        let written = open.file.write_all(&batch);
        let len = batch.len() as u64;
        self.batch = batch;
        let open = self.current.as_mut().expect("opened above");
        if let Err(source) = written {
            // A partial write leaves a torn tail: cut it so the chain stays whole.
            let _ = open.file.set_len(open.bytes);
            return Err(SegmentError::Io {
                path: open.path.clone(),
                source,
            });
        }
        open.bytes += len;
        self.next_seq = seq;
        self.head = head;
        Ok(())
    }

    /// Time-driven work: rotation by age, the periodic checkpoint.
    pub fn tick(&mut self) -> Result<(), SegmentError> {
        let old = self
            .current
            .as_ref()
            .is_some_and(|c| c.bytes > 0 && c.opened.elapsed() >= self.cfg.max_age);
        if old {
            self.rotate()?;
        }
        if self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Syncs the segment and appends a signed checkpoint of the head, if it moved.
    pub fn checkpoint(&mut self) -> Result<(), SegmentError> {
        self.last_checkpoint = Instant::now();
        if self.next_seq == 0 || self.checkpointed == Some(self.next_seq - 1) {
            return Ok(());
        }
        if let Some(open) = &self.current {
            open.file.sync_data().map_err(|source| SegmentError::Io {
                path: open.path.clone(),
                source,
            })?;
        }
        let seq = self.next_seq - 1;
        let cp = self.key.checkpoint(
            &self.cfg.node,
            seq,
            &self.head,
            format_time(time::OffsetDateTime::now_utc()),
        );
        checkpoint::append(&self.cfg.checkpoints, &cp).map_err(|source| SegmentError::Io {
            path: self.cfg.checkpoints.clone(),
            source,
        })?;
        if let Some(sink) = &self.cfg.forward {
            sink.offer(&cp);
        }
        self.checkpointed = Some(seq);
        self.checkpoints_written += 1;
        Ok(())
    }

    /// Closes the current segment (checkpointed); the next append opens a new one.
    pub fn rotate(&mut self) -> Result<(), SegmentError> {
        self.checkpoint()?;
        if let Some(open) = self.current.take() {
            self.rotations += 1;
            info!(segment = %open.path.display(), bytes = open.bytes, "audit segment closed");
        }
        Ok(())
    }

    fn current_or_create(&mut self, first_seq: u64) -> Result<&mut Open, SegmentError> {
        if self.current.is_none() {
            let path = self.cfg.dir.join(segment_name(first_seq));
            let file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&path)
                .map_err(|source| SegmentError::Io {
                    path: path.clone(),
                    source,
                })?;
            self.current = Some(Open {
                file,
                path,
                bytes: 0,
                opened: Instant::now(),
            });
        }
        Ok(self.current.as_mut().expect("just set"))
    }
}

/// The length of the prefix of `data` made of complete lines up to and including the last
/// line that parses as a record, and that record's seq and line hash.
fn last_valid_record(data: &[u8]) -> (usize, Option<(u64, Hash)>) {
    // Complete lines end with '\n'; walk back from the last one.
    let mut end = match data.iter().rposition(|&b| b == b'\n') {
        Some(i) => i,
        None => return (0, None),
    };
    loop {
        let start = data[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let line = &data[start..end];
        if let Ok(r) = serde_json::from_slice::<Record>(line) {
            return (end + 1, Some((r.seq, hash_line(line))));
        }
        if start == 0 {
            return (0, None);
        }
        end = start - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Body, Kind};

    #[test]
    fn segment_names_round_trip_and_reject_others() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("segment-42.jsonl"), None);
        assert_eq!(
            parse_segment_name("segment-0000000000000000004x.jsonl"),
            None
        );
        assert_eq!(parse_segment_name("checkpoints.jsonl"), None);
    }

    #[test]
    fn last_valid_record_skips_a_torn_tail() {
        let entry = |seq: u64| {
            let r = Record {
                v: 1,
                seq,
                time: "t".into(),
                node: "n".into(),
                prev: hex(&GENESIS),
                kind: Kind::AgentStart,
                body: Body::default(),
            };
            serde_json::to_string(&r).unwrap()
        };
        let good = format!("{}\n{}\n", entry(0), entry(1));
        assert_eq!(last_valid_record(good.as_bytes()).0, good.len());
        let torn = format!("{good}{{\"v\":1,\"se");
        let (len, last) = last_valid_record(torn.as_bytes());
        assert_eq!(len, good.len());
        assert_eq!(last.unwrap().0, 1);
        let garbage_line = format!("{good}not json\n");
        assert_eq!(last_valid_record(garbage_line.as_bytes()).0, good.len());
        assert_eq!(last_valid_record(b"junk"), (0, None));
    }
}
