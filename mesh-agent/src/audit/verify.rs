//! `audit verify`: walks the chain across segments and checks it against signed checkpoints.
//!
//! The chain alone catches an edited, inserted, deleted or reordered record and a missing
//! middle segment (every record names its seq and the hash of the line before it). What it
//! cannot catch — the tail cut off, or a chain rewritten from some record on with every
//! `prev` recomputed — the checkpoints catch: each is a signature by the node's audit key
//! over a (seq, head hash) the chain must still contain.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    checkpoint::Checkpoint,
    record::{hash_line, hex, Hash, Record, GENESIS, MAX_LINE_LEN, SCHEMA_VERSION},
    segment::list_segments,
};

/// What kind of damage a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A line that is not a record of a known schema version (or is too long).
    Malformed,
    /// A record whose `prev` is not the hash of the line before it: that line was edited,
    /// or this record was inserted or forged.
    ChainBroken,
    /// A seq higher than expected: records deleted or reordered, or a whole segment removed.
    Missing,
    /// A seq lower than expected: records reordered, duplicated or inserted.
    OutOfOrder,
    /// A segment whose name does not match its first record (renamed or moved).
    SegmentName,
    /// A non-final segment ending in an incomplete line.
    Truncated,
    /// A checkpoint line that does not parse.
    CheckpointMalformed,
    /// A checkpoint whose signature is not the given key's.
    BadSignature,
    /// A checkpoint covering a seq past the end of the log: the tail was cut off.
    TailMissing,
    /// A record that does not hash to what a signed checkpoint says: the chain was rewritten.
    CheckpointMismatch,
}

/// One problem, where it is.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// The file (segment or checkpoints file).
    pub file: String,
    /// 1-based line in that file.
    pub line: usize,
    /// The seq of the record concerned, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub message: String,
}

/// The result of a verification.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub records: u64,
    pub segments: usize,
    /// First and last seq seen (absent for an empty log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Hash of the last record's line.
    pub head: String,
    pub checkpoints_verified: usize,
    /// The first problem found (verification stops walking the chain there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad: Option<Finding>,
    /// Every problem found.
    pub problems: Vec<Finding>,
    /// What is not tampering but limits what was proven (a torn tail, no checkpoints, …).
    pub warnings: Vec<String>,
}

/// Where to find what verification needs.
#[derive(Clone, Debug)]
pub struct VerifyInput {
    pub dir: PathBuf,
    /// Checkpoints file(s): the node's own and/or the authority's copy.
    pub checkpoints: Vec<PathBuf>,
    /// Ed25519 public key (raw) to check signatures with.
    pub key: Option<[u8; 32]>,
    /// The log must start at seq 0: a removed first segment is tampering, not retention.
    pub from_genesis: bool,
}

/// An I/O problem that stops verification (exit 2, not "tampered").
#[derive(Debug, thiserror::Error)]
#[error("{path}")]
pub struct VerifyIoError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

struct Located {
    hash: Hash,
    file: String,
    line: usize,
}

/// Verifies the log in `input.dir`.
pub fn verify(input: &VerifyInput) -> Result<Report, VerifyIoError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| VerifyIoError { path, source }
    };
    let mut problems = Vec::new();
    let mut warnings = Vec::new();

    // Checkpoints first: the walk records the hashes at their seqs.
    let mut checkpoints = Vec::new();
    for path in &input.checkpoints {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let file = path.display().to_string();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Checkpoint>(line) {
                Ok(cp) => checkpoints.push((file.clone(), i + 1, cp)),
                Err(e) => problems.push(Finding {
                    kind: FindingKind::CheckpointMalformed,
                    file: file.clone(),
                    line: i + 1,
                    seq: None,
                    message: format!("not a checkpoint: {e}"),
                }),
            }
        }
    }
    if checkpoints.is_empty() {
        warnings.push(
            "no checkpoints: a truncated tail or a recomputed chain cannot be detected".to_owned(),
        );
    }
    let mut wanted: HashMap<u64, Option<Located>> = checkpoints
        .iter()
        .map(|(_, _, cp)| (cp.seq, None))
        .collect();

    let segments = list_segments(&input.dir).map_err(io_err(&input.dir))?;
    let mut expected: Option<u64> = None;
    let mut prev: Option<(Hash, String, usize)> = None;
    let mut first_seq = None;
    let mut records = 0u64;
    let mut stopped = false;
    'segments: for (index, (name_seq, path)) in segments.iter().enumerate() {
        let last_segment = index + 1 == segments.len();
        let data = fs::read(path).map_err(io_err(path))?;
        let file = path.display().to_string();
        let mut rest: &[u8] = &data;
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let l = &rest[..i];
                    rest = &rest[i + 1..];
                    (l, true)
                }
                None => {
                    let l = rest;
                    rest = &[];
                    (l, false)
                }
            };
            let finding = |kind, seq, message: String| Finding {
                kind,
                file: file.clone(),
                line: line_no,
                seq,
                message,
            };
            if !complete {
                if last_segment {
                    warnings.push(format!(
                        "{file}:{line_no}: torn final line ({} bytes, a crash mid-write?): verified up to the record before it",
                        line.len()
                    ));
                } else {
                    problems.push(finding(
                        FindingKind::Truncated,
                        None,
                        "incomplete line at the end of a segment that is not the last".into(),
                    ));
                    stopped = true;
                }
                break 'segments;
            }
            let record = if line.len() > MAX_LINE_LEN {
                Err(format!(
                    "line of {} bytes (limit {MAX_LINE_LEN})",
                    line.len()
                ))
            } else {
                serde_json::from_slice::<Record>(line).map_err(|e| format!("not a record: {e}"))
            };
            let record = match record {
                Ok(r) if r.v == SCHEMA_VERSION => r,
                Ok(r) => {
                    problems.push(finding(
                        FindingKind::Malformed,
                        Some(r.seq),
                        format!("unknown schema version {}", r.v),
                    ));
                    stopped = true;
                    break 'segments;
                }
                Err(message) => {
                    problems.push(finding(FindingKind::Malformed, None, message));
                    stopped = true;
                    break 'segments;
                }
            };
            let seq = record.seq;
            if line_no == 1 && seq != *name_seq {
                problems.push(finding(
                    FindingKind::SegmentName,
                    Some(seq),
                    format!("segment named for seq {name_seq} starts with seq {seq}"),
                ));
                stopped = true;
                break 'segments;
            }
            match expected {
                None => {
                    first_seq = Some(seq);
                    if seq == 0 {
                        if record.prev != hex(&GENESIS) {
                            problems.push(finding(
                                FindingKind::ChainBroken,
                                Some(seq),
                                "the first record (seq 0) does not start the chain".into(),
                            ));
                            stopped = true;
                            break 'segments;
                        }
                    } else if input.from_genesis {
                        problems.push(finding(
                            FindingKind::Missing,
                            Some(seq),
                            format!("the log starts at seq {seq}: records 0..={} are missing (the first segments were removed)", seq - 1),
                        ));
                        stopped = true;
                        break 'segments;
                    } else {
                        warnings.push(format!(
                            "the log starts at seq {seq} ({file}): earlier segments were removed (retention?); checkpoints before it are not checked"
                        ));
                    }
                }
                Some(want) if seq > want => {
                    problems.push(finding(
                        FindingKind::Missing,
                        Some(seq),
                        format!(
                            "seq {seq} where {want} was expected: records deleted or reordered, or a segment removed",
                        ),
                    ));
                    stopped = true;
                    break 'segments;
                }
                Some(want) if seq < want => {
                    problems.push(finding(
                        FindingKind::OutOfOrder,
                        Some(seq),
                        format!("seq {seq} where {want} was expected (reordered, duplicated or inserted record)"),
                    ));
                    stopped = true;
                    break 'segments;
                }
                Some(_) => {
                    let (prev_hash, prev_file, prev_line) =
                        prev.as_ref().expect("set with expected");
                    if record.prev != hex(prev_hash) {
                        let mut f = finding(
                            FindingKind::ChainBroken,
                            Some(seq - 1),
                            format!(
                                "seq {seq} ({file}:{line_no}) does not chain to seq {} ({prev_file}:{prev_line}): that record was edited, or this one forged",
                                seq - 1
                            ),
                        );
                        f.file = prev_file.clone();
                        f.line = *prev_line;
                        problems.push(f);
                        stopped = true;
                        break 'segments;
                    }
                }
            }
            let hash = hash_line(line);
            if let Some(slot) = wanted.get_mut(&seq) {
                *slot = Some(Located {
                    hash,
                    file: file.clone(),
                    line: line_no,
                });
            }
            records += 1;
            expected = Some(seq + 1);
            prev = Some((hash, file.clone(), line_no));
        }
    }
    let last_seq = expected.map(|e| e - 1);

    let mut checkpoints_verified = 0;
    if !checkpoints.is_empty() && input.key.is_none() {
        warnings.push("no public key: checkpoint signatures not checked".into());
    }
    for (file, line, cp) in &checkpoints {
        let finding = |kind, message: String| Finding {
            kind,
            file: file.clone(),
            line: *line,
            seq: Some(cp.seq),
            message,
        };
        if let Some(key) = &input.key {
            if !cp.signature_valid(key) {
                problems.push(finding(
                    FindingKind::BadSignature,
                    format!(
                        "checkpoint of seq {} is not signed by the node's audit key",
                        cp.seq
                    ),
                ));
                continue;
            }
        } else {
            continue;
        }
        if first_seq.is_some_and(|f| cp.seq < f) {
            continue;
        }
        match wanted.get(&cp.seq).and_then(Option::as_ref) {
            Some(at) => {
                if cp.head_hash() != Some(at.hash) {
                    let mut f = finding(
                        FindingKind::CheckpointMismatch,
                        format!(
                            "seq {} ({}:{}) does not match the signed checkpoint ({file}:{line}): the chain was rewritten",
                            cp.seq, at.file, at.line
                        ),
                    );
                    f.file = at.file.clone();
                    f.line = at.line;
                    problems.push(f);
                } else {
                    checkpoints_verified += 1;
                }
            }
            // Past the point where the walk stopped: already reported.
            None if stopped => {}
            None => problems.push(finding(
                FindingKind::TailMissing,
                match last_seq {
                    Some(l) => format!(
                        "a signed checkpoint covers seq {} but the log ends at seq {l}: the tail (or the last segments) was removed",
                        cp.seq
                    ),
                    None => format!(
                        "a signed checkpoint covers seq {} but the log is empty",
                        cp.seq
                    ),
                },
            )),
        }
    }
    // The chain finding first: it names the earliest bad record.
    let first_bad = problems
        .iter()
        .find(|p| {
            !matches!(
                p.kind,
                FindingKind::CheckpointMalformed | FindingKind::BadSignature
            )
        })
        .or(problems.first())
        .cloned();
    Ok(Report {
        ok: problems.is_empty(),
        records,
        segments: segments.len(),
        first_seq,
        last_seq,
        head: hex(&prev.map_or(GENESIS, |(h, _, _)| h)),
        checkpoints_verified,
        first_bad,
        problems,
        warnings,
    })
}
