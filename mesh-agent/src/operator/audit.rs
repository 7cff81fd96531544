//! `mesh-agent audit verify|query`: check and search a node's audit log.
//!
//! Exit codes (both commands): 0 ok; 1 the log is tampered (`verify`); 2 usage or I/O error
//! (a missing directory, an unreadable file, a bad argument).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use crate::audit::{
    checkpoint::read_public_key,
    index::{scan, Filter, Index, IndexError, INDEX_FILE},
    record::{parse_time_ns, Kind, Record, Verdict},
    segment::{CHECKPOINTS_FILE, PUBLIC_KEY_FILE},
    verify::{verify, Report, VerifyInput},
    LOCK_FILE,
};

use nix::fcntl::{Flock, FlockArg};

use super::{print, with_stderr_logs, OutputFormat};
use crate::error_chain;

/// Exit code: the log verified.
pub const EXIT_OK: u8 = 0;
/// Exit code: the log is tampered (or a checkpoint is bad).
pub const EXIT_TAMPERED: u8 = 1;
/// Exit code: usage or I/O error.
pub const EXIT_ERROR: u8 = 2;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints. Exit 0 ok, 1 tampered, 2 error.
    Verify(VerifyArgs),
    /// Search the log (a SQLite index beside it, kept by the writer's indexer, or brought up to
    /// date by the query when no writer runs; the unindexed tail is read from the segments).
    Query(QueryArgs),
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The audit directory (segments).
    pub dir: PathBuf,
    /// Checkpoints file(s) to verify against, e.g. the authority's copy; repeatable.
    /// [default: DIR/checkpoints.jsonl]
    #[arg(long)]
    pub checkpoints: Vec<PathBuf>,
    /// The log must start at seq 0: a removed first segment is reported as tampering (by
    /// default it is taken for retention, with a warning).
    #[arg(long)]
    pub from_genesis: bool,
    /// The node's audit public key (hex) as registered with the authority.
    /// [default: DIR/audit-key.pub, which proves less: it sits beside the log]
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// The audit directory (segments).
    pub dir: PathBuf,
    /// Records at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_rfc3339)]
    pub since: Option<i128>,
    /// Records before this time (RFC 3339).
    #[arg(long, value_parser = parse_rfc3339)]
    pub until: Option<i128>,
    /// Source identity (SPIFFE ID) or workload (`namespace/name`).
    #[arg(long)]
    pub src: Option<String>,
    /// Destination identity (SPIFFE ID) or workload (`namespace/name`).
    #[arg(long)]
    pub dst: Option<String>,
    /// Source or destination namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Destination port.
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long, value_enum)]
    pub verdict: Option<Verdict>,
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// The deciding policy, `namespace/name` (`-`: the default decision).
    #[arg(long)]
    pub policy: Option<String>,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Keep running and print matching records as they are written.
    #[arg(long)]
    pub follow: bool,
    /// The index file [default: DIR/index.sqlite].
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// `json`: the matching records as written (JSON lines, ready for a log pipeline);
    /// `text`: one line per record for people.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

fn parse_rfc3339(s: &str) -> Result<i128, String> {
    parse_time_ns(s).ok_or_else(|| format!("{s:?} is not an RFC 3339 time (2026-01-02T03:04:05Z)"))
}

pub fn main(args: AuditArgs) -> ExitCode {
    with_stderr_logs(|| match args.command {
        AuditCommand::Verify(a) => verify_main(&a),
        AuditCommand::Query(a) => query_main(&a),
    })
}

fn fail(what: &str, e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {what}: {}", error_chain(e));
    ExitCode::from(EXIT_ERROR)
}

fn verify_main(a: &VerifyArgs) -> ExitCode {
    if !a.dir.is_dir() {
        eprintln!("error: {}: not a directory", a.dir.display());
        return ExitCode::from(EXIT_ERROR);
    }
    let checkpoints = if a.checkpoints.is_empty() {
        let local = a.dir.join(CHECKPOINTS_FILE);
        if local.exists() {
            vec![local]
        } else {
            Vec::new()
        }
    } else {
        a.checkpoints.clone()
    };
    let (key_path, key_beside) = match &a.key {
        Some(k) => (Some(k.clone()), false),
        None => {
            let p = a.dir.join(PUBLIC_KEY_FILE);
            (p.exists().then_some(p), true)
        }
    };
    let key = match key_path.as_deref().map(read_public_key).transpose() {
        Ok(k) => k,
        Err(e) => {
            return fail(
                &format!("audit key {}", key_path.unwrap_or_default().display()),
                &e,
            )
        }
    };
    let mut report = match verify(&VerifyInput {
        dir: a.dir.clone(),
        checkpoints,
        key,
        from_genesis: a.from_genesis,
    }) {
        Ok(r) => r,
        Err(e) => return fail("verifying", &e),
    };
    if key_beside && key.is_some() {
        report.warnings.push(format!(
            "signatures checked with {} from beside the log: pass --key with the key the authority registered",
            PUBLIC_KEY_FILE
        ));
    }
    let text = verify_text(&report);
    if let Err(e) = print(a.output, &report, &text) {
        return fail("writing the report", &e);
    }
    ExitCode::from(if report.ok { EXIT_OK } else { EXIT_TAMPERED })
}

fn verify_text(r: &Report) -> String {
    let mut out = String::new();
    let range = match (r.first_seq, r.last_seq) {
        (Some(a), Some(b)) => format!("seq {a}..={b}"),
        _ => "empty".into(),
    };
    if r.ok {
        out.push_str(&format!(
            "ok: {} records in {} segments ({range}), {} checkpoints verified, head {}\n",
            r.records, r.segments, r.checkpoints_verified, r.head
        ));
    } else {
        if let Some(f) = &r.first_bad {
            out.push_str(&format!(
                "TAMPERED: first bad record at {}:{}{}: {}\n",
                f.file,
                f.line,
                f.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
                f.message
            ));
        }
        for p in r.problems.iter().skip(1) {
            out.push_str(&format!("  also {}:{}: {}\n", p.file, p.line, p.message));
        }
    }
    for w in &r.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

fn query_main(a: &QueryArgs) -> ExitCode {
    if !a.dir.is_dir() {
        eprintln!("error: {}: not a directory", a.dir.display());
        return ExitCode::from(EXIT_ERROR);
    }
    let index_path = a.index.clone().unwrap_or_else(|| a.dir.join(INDEX_FILE));
    let mut filter = Filter {
        since_ns: a.since,
        until_ns: a.until,
        src: a.src.clone(),
        dst: a.dst.clone(),
        namespace: a.namespace.clone(),
        port: a.port,
        verdict: a.verdict,
        kind: a.kind,
        policy: a.policy.clone(),
        after_seq: None,
        limit: a.limit,
    };
    let mut source = Source::None;
    loop {
        let hits = match run_query(&a.dir, &index_path, &mut source, &filter) {
            Ok(h) => h,
            Err(e) => return fail("querying", &e),
        };
        if let Some((last, _)) = hits.last() {
            filter.after_seq = Some(last.seq);
        }
        if let Err(e) = print_records(a.output, &hits) {
            return fail("writing", &e);
        }
        if !a.follow {
            return ExitCode::from(EXIT_OK);
        }
        // --follow polls: the writer appends in batches, so 250 ms keeps up without spinning.
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether a process holds the log's writer lock (an agent or authority writing it, whose
/// indexer keeps the index).
pub fn writer_running(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    matches!(
        Flock::lock(file, FlockArg::LockSharedNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// How the query reads the log.
enum Source {
    None,
    /// The writer's indexer keeps the index: read it, never write it (absent: no usable index
    /// yet, read the segments).
    Reader(Option<Index>),
    /// Nobody writes the log: the query indexes what is missing itself.
    Updater(Index),
}

/// The records matching `filter`. With a writer running: the index as its indexer last
/// committed it plus the tail read from the segments, nothing written. Without: the index
/// brought up to date first (a stale index rebuilt once). With no usable index: the segments
/// read directly.
fn run_query(
    dir: &Path,
    index_path: &Path,
    source: &mut Source,
    filter: &Filter,
) -> Result<Vec<(Record, Vec<u8>)>, IndexError> {
    let running = writer_running(dir);
    let reopen = match source {
        Source::None => true,
        Source::Reader(_) => !running,
        Source::Updater(_) => running,
    };
    if reopen {
        *source = if running {
            Source::Reader(Index::open_existing(dir, index_path))
        } else {
            match Index::open_or_recreate(dir, index_path) {
                Ok((index, recreated)) => {
                    if recreated {
                        tracing::warn!(index = %index_path.display(), "the index was corrupt: rebuilt from the segments");
                    }
                    Source::Updater(index)
                }
                Err(e) => {
                    tracing::warn!(index = %index_path.display(), error = %error_chain(&e), "index unusable: reading the segments");
                    Source::Reader(None)
                }
            }
        };
    }
    match source {
        Source::None | Source::Reader(None) => scan(dir, filter),
        Source::Reader(Some(index)) => match index.query(filter) {
            Ok(hits) => Ok(hits),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "index unusable: reading the segments");
                scan(dir, filter)
            }
        },
        Source::Updater(index) => {
            let stats = index.update()?;
            if stats.skipped > 0 {
                tracing::warn!(
                    skipped = stats.skipped,
                    "lines that are not records were skipped (run `audit verify`)"
                );
            }
            match index.query(filter) {
                Err(IndexError::Stale { .. }) => {
                    index.mark_for_rebuild()?;
                    index.update()?;
                    index.query(filter)
                }
                other => other,
            }
        }
    }
}

fn print_records(format: OutputFormat, hits: &[(Record, Vec<u8>)]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for (r, line) in hits {
        match format {
            OutputFormat::Json => {
                out.write_all(line)?;
                out.write_all(b"\n")?;
            }
            OutputFormat::Text => writeln!(out, "{}", text_line(r))?,
        }
    }
    out.flush()
}

/// One record for people: time, seq, kind, verdict, who → whom, and what decided.
pub fn text_line(r: &Record) -> String {
    let b = &r.body;
    let mut s = format!("{} #{} {}", r.time, r.seq, r.kind.as_str());
    let mut field = |name: &str, v: Option<&str>| {
        if let Some(v) = v {
            s.push_str(&format!(" {name}={v}"));
        }
    };
    field("verdict", b.verdict.map(Verdict::as_str));
    field(
        "src",
        b.src_workload
            .as_deref()
            .or(b.src_identity.as_deref())
            .or(b.src_addr.as_deref()),
    );
    field(
        "dst",
        b.dst_workload
            .as_deref()
            .or(b.dst_identity.as_deref())
            .or(b.dst_addr.as_deref()),
    );
    field("port", b.port.map(|p| p.to_string()).as_deref());
    field("method", b.method.as_deref());
    field("host", b.host.as_deref());
    field("path", b.path.as_deref());
    field("policy", b.policy.as_deref());
    field("generation", b.generation.map(|g| g.to_string()).as_deref());
    field("outcome", b.outcome.as_deref());
    field("action", b.action.as_deref());
    field("subject", b.subject.as_deref());
    field("lost", b.lost.map(|l| l.to_string()).as_deref());
    field("detail", b.detail.as_deref());
    s
}

/// Where `verify` looks for the public key when `--key` is not given (for docs and tests).
pub fn default_key_path(dir: &Path) -> PathBuf {
    dir.join(PUBLIC_KEY_FILE)
}
