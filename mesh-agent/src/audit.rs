//! The tamper-evident audit log: every security decision and change, one JSON line each,
//! hash-chained, in size- and time-rotated segments, with signed checkpoints of the head.
//!
//! - [`record`]: the versioned record schema (the README's "Audit log" documents it);
//! - [`segment`]: segment files, the synchronous writer, recovery at start;
//! - [`checkpoint`]: the node audit key (Ed25519) and signed checkpoints;
//! - [`verify`]: `audit verify`, the chain checked against the checkpoints;
//! - [`index`]: `audit query`, a SQLite index beside the chain (rebuildable from it);
//! - [`indexer`]: the writer's process keeps that index up to date on its own thread.
//!
//! [`AuditLog`] is the handle the agent holds: callers hand it an [`Entry`] and return; a
//! writer thread fed by a bounded queue writes batches. A full queue never blocks a
//! connection: the record is dropped and counted, and the next batch starts with a
//! `records_lost` record saying how many. With `fail_closed`, [`AuditLog::record`] waits for
//! room in the queue instead, and fails once the writer has stopped or failed, so that the
//! caller can refuse what it could not record.

pub mod checkpoint;
pub mod forward;
pub mod index;
pub mod indexer;
pub mod kernel;
pub mod record;
pub mod segment;
pub mod verify;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub use record::{Body, Entry, Kind, Layer, Verdict};

use self::{
    checkpoint::{AuditKey, KeyError},
    segment::{SegmentConfig, SegmentError, SegmentWriter},
};

/// Records a batch holds at most (one `write` per batch).
const BATCH: usize = 512;

/// The writer's lock file in the audit directory (one writer per directory).
pub const LOCK_FILE: &str = "writer.lock";

/// How the agent's audit log is set up. Defaults are documented on each field.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The audit directory (segments, checkpoints, public key). Default
    /// `<state-dir>/audit`.
    pub dir: PathBuf,
    /// The node audit key (PKCS#8, 0600). Default `<state-dir>/audit-key.pk8`.
    pub key: PathBuf,
    pub node: String,
    /// Segment size limit. Default 64 MiB.
    pub segment_max_bytes: u64,
    /// Segment age limit. Default 1 h.
    pub segment_max_age: Duration,
    /// Checkpoint interval. Default 60 s (and at every rotation and at stop).
    pub checkpoint_interval: Duration,
    /// Queue capacity in records. Default 65,536.
    pub queue: usize,
    /// Callers of [`AuditLog::record`] wait for room (and fail once the log is down)
    /// instead of dropping records. Default false.
    pub fail_closed: bool,
    /// Every checkpoint is also offered here, to be sent to the authority. Default none.
    pub forward: Option<forward::CheckpointSink>,
    /// Keep `DIR/index.sqlite` up to date on an indexer thread (what `audit query` reads).
    /// Default true.
    pub index: bool,
}

impl AuditConfig {
    /// The defaults for a node, under `state_dir`.
    pub fn new(node: &str, state_dir: &std::path::Path) -> Self {
        Self {
            dir: state_dir.join("audit"),
            key: state_dir.join("audit-key.pk8"),
            node: node.to_owned(),
            segment_max_bytes: 64 << 20,
            segment_max_age: Duration::from_secs(3600),
            checkpoint_interval: Duration::from_secs(60),
            queue: 65_536,
            fail_closed: false,
            forward: None,
            index: true,
        }
    }
}

/// The agent's audit flags (`mesh-agent run`), flattened into its options.
#[derive(clap::Args, Clone, Debug)]
pub struct AuditOptions {
    /// Audit log directory: segments, checkpoints, the exported audit public key.
    /// [default: <state-dir>/audit]
    #[arg(long, env = "MESH_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    /// The node audit signing key (Ed25519 PKCS#8, generated at first start, mode 0600). Its
    /// public half is written to <audit-dir>/audit-key.pub; the authority binds it to this
    /// node (`authority audit-key`, or on the first checkpoint).
    /// [default: <state-dir>/audit-key.pk8]
    #[arg(long, env = "MESH_AUDIT_KEY")]
    pub audit_key: Option<PathBuf>,
    /// A segment is closed at this size (bytes, at least 4096).
    #[arg(long, env = "MESH_AUDIT_SEGMENT_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(4096..))]
    pub audit_segment_bytes: u64,
    /// A segment is closed at this age (seconds, at least 1).
    #[arg(long, env = "MESH_AUDIT_SEGMENT_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_segment_secs: u64,
    /// The chain head is checkpointed (signed) this often, in seconds (at least 1), and at
    /// every rotation and stop; every checkpoint is also sent to the authority, which keeps
    /// a copy.
    #[arg(long, env = "MESH_AUDIT_CHECKPOINT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_secs: u64,
    /// Records the queue to the writer holds; past it records are dropped and counted
    /// (a `records_lost` record), unless --audit-fail-closed.
    #[arg(long, env = "MESH_AUDIT_QUEUE", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    pub audit_queue: u64,
    /// Decisions wait for room in the audit queue instead of dropping records, and are
    /// refused once the log cannot be written.
    #[arg(long, env = "MESH_AUDIT_FAIL_CLOSED", default_value_t = false, action = clap::ArgAction::Set)]
    pub audit_fail_closed: bool,
    /// No audit log at all (benchmarks and debugging only): nothing is recorded, and the
    /// agent warns at start.
    #[arg(long, env = "MESH_AUDIT_OFF", default_value_t = false, action = clap::ArgAction::Set)]
    pub audit_off: bool,
    /// Keep the query index (<audit-dir>/index.sqlite) up to date on a thread of the agent,
    /// within about 250 ms of the log; `false`: `audit query` indexes what it needs itself.
    #[arg(long, env = "MESH_AUDIT_INDEX", default_value_t = true, action = clap::ArgAction::Set)]
    pub audit_index: bool,
}

impl AuditOptions {
    /// The configuration for `node` with state under `state_dir`.
    pub fn config(&self, node: &str, state_dir: &std::path::Path) -> AuditConfig {
        let defaults = AuditConfig::new(node, state_dir);
        AuditConfig {
            dir: self.audit_dir.clone().unwrap_or(defaults.dir),
            key: self.audit_key.clone().unwrap_or(defaults.key),
            node: node.to_owned(),
            segment_max_bytes: self.audit_segment_bytes,
            segment_max_age: Duration::from_secs(self.audit_segment_secs),
            checkpoint_interval: Duration::from_secs(self.audit_checkpoint_secs),
            queue: usize::try_from(self.audit_queue).unwrap_or(usize::MAX),
            fail_closed: self.audit_fail_closed,
            forward: None,
            index: self.audit_index,
        }
    }
}

/// Why the audit log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("starting the audit writer thread")]
    Thread(#[source] std::io::Error),
}

/// The log is down (fail-closed mode): the caller must not go on with what it could not record.
#[derive(Debug, thiserror::Error)]
#[error("the audit log is unavailable")]
pub struct AuditUnavailable;

/// Counters of the log, read by the metrics at scrape time.
#[derive(Debug, Default)]
pub struct AuditStats {
    pub written: AtomicU64,
    /// Records dropped (queue full or a failed write), in total.
    pub lost: AtomicU64,
    pub checkpoints: AtomicU64,
    pub write_errors: AtomicU64,
    /// The query index's progress (the indexer's, when it runs).
    pub index: Arc<indexer::IndexStats>,
}

enum Msg {
    /// Boxed: the queue holds pointers, not 450-byte records.
    Entry(Box<Entry>),
    Tick,
    Stop(oneshot::Sender<()>),
}

struct Shared {
    stats: AuditStats,
    /// Lost since the last `records_lost` record.
    pending_lost: AtomicU64,
    failed: AtomicBool,
    fail_closed: bool,
}

/// The agent's handle on its audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("fail_closed", &self.shared.fail_closed)
            .finish_non_exhaustive()
    }
}

/// The fields of one connection decision, as the proxy knows them (mapped from its
/// connection record).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionFields {
    pub layer: Option<Layer>,
    pub verdict: Option<Verdict>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub src_addr: Option<SocketAddr>,
    pub dst_addr: Option<SocketAddr>,
    pub port: Option<u16>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub policy: Option<String>,
    pub generation: Option<u64>,
    pub outcome: Option<String>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub requests_allowed: Option<u64>,
    pub requests_denied: Option<u64>,
}

impl ConnectionFields {
    /// The record of these fields.
    pub fn entry(&self, kind: Kind) -> Entry {
        Entry {
            kind,
            body: Body {
                verdict: self.verdict,
                layer: self.layer,
                src_identity: self.src_identity.clone(),
                dst_identity: self.dst_identity.clone(),
                src_workload: self.src_workload.clone(),
                dst_workload: self.dst_workload.clone(),
                src_addr: self.src_addr.map(|a| a.to_string()),
                dst_addr: self.dst_addr.map(|a| a.to_string()),
                port: self.port.or(self.dst_addr.map(|a| a.port())),
                method: self.method.clone(),
                path: self.path.clone(),
                host: self.host.clone(),
                policy: self.policy.clone(),
                generation: self.generation,
                outcome: self.outcome.clone(),
                bytes_sent: self.bytes_sent,
                bytes_received: self.bytes_received,
                requests_allowed: self.requests_allowed,
                requests_denied: self.requests_denied,
                ..Body::default()
            },
        }
    }
}

impl AuditLog {
    /// Opens (or creates) the log, loads or generates the node audit key, recovers a torn
    /// tail, starts the writer thread and records `agent_start` (and `recovered` when a tail
    /// was cut). Must be called within a tokio runtime (the checkpoint ticker).
    pub fn start(cfg: AuditConfig) -> Result<Self, AuditError> {
        let key = AuditKey::load_or_generate(&cfg.key, &cfg.dir.join(segment::PUBLIC_KEY_FILE))?;
        Self::start_with_key(cfg, key)
    }

    /// [`AuditLog::start`] with a given key.
    ///
    /// One writer per directory: the writer holds an exclusive `flock` on `DIR/writer.lock`.
    /// During an upgrade the previous agent still holds it while it drains; the new agent's
    /// records then wait in the queue until the old writer has written its `agent_stop`
    /// and final checkpoint, and the chain goes on from there.
    pub fn start_with_key(cfg: AuditConfig, key: AuditKey) -> Result<Self, AuditError> {
        let seg_cfg = SegmentConfig {
            dir: cfg.dir.clone(),
            node: cfg.node.clone(),
            max_bytes: cfg.segment_max_bytes,
            max_age: cfg.segment_max_age,
            checkpoint_interval: cfg.checkpoint_interval,
            checkpoints: cfg.dir.join(segment::CHECKPOINTS_FILE),
            forward: cfg.forward.clone(),
        };
        let shared = Arc::new(Shared {
            stats: AuditStats::default(),
            pending_lost: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            fail_closed: cfg.fail_closed,
        });
        let lock_path = cfg.dir.join(LOCK_FILE);
        let lock_io = |source| {
            AuditError::Segment(SegmentError::Io {
                path: lock_path.clone(),
                source,
            })
        };
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(&cfg.dir)
                .map_err(lock_io)?;
        }
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(lock_io)?;
        let ready = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok((open_writer(seg_cfg, key, &shared)?, lock)),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                info!(
                    dir = %cfg.dir.display(),
                    "audit log held by the previous agent (upgrade): records queue until it has closed it"
                );
                Err((file, seg_cfg, key))
            }
            Err((_, errno)) => return Err(lock_io(std::io::Error::from(errno))),
        };
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let thread_shared = Arc::clone(&shared);
        let index_dir = cfg.index.then(|| cfg.dir.clone());
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let (writer, _lock) = match ready {
                    Ok(w) => w,
                    Err((file, seg_cfg, key)) => {
                        let opened = Flock::lock(file, FlockArg::LockExclusive)
                            .map_err(|(_, errno)| {
                                AuditError::Segment(SegmentError::Io {
                                    path: seg_cfg.dir.join(LOCK_FILE),
                                    source: errno.into(),
                                })
                            })
                            .and_then(|lock| {
                                open_writer(seg_cfg, key, &thread_shared).map(|w| (w, lock))
                            });
                        match opened {
                            Ok(w) => w,
                            Err(e) => {
                                thread_shared.failed.store(true, Ordering::Relaxed);
                                error!(error = %e, "audit log unavailable: records are lost (counted)");
                                return;
                            }
                        }
                    }
                };
                let indexer = index_dir.and_then(|dir| {
                    let path = dir.join(index::INDEX_FILE);
                    match indexer::Indexer::start(dir, path, Arc::clone(&thread_shared.stats.index)) {
                        Ok(i) => Some(i),
                        Err(e) => {
                            warn!(error = %e, "audit indexer not started: `audit query` indexes what it needs itself");
                            None
                        }
                    }
                });
                write_loop(writer, rx, &thread_shared, indexer);
            })
            .map_err(AuditError::Thread)?;
        let ticker = tx.clone();
        let tick = cfg
            .checkpoint_interval
            .min(cfg.segment_max_age)
            .min(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                match ticker.try_send(Msg::Tick) {
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                    _ => continue,
                }
            }
        });
        info!(dir = %cfg.dir.display(), fail_closed = cfg.fail_closed, "audit log started");
        Ok(Self { tx, shared })
    }

    /// Records `entry` without ever waiting: a full queue drops it and counts it (the loss
    /// is itself recorded). For events that already happened (kernel decisions).
    pub fn emit(&self, entry: Entry) {
        if self.tx.try_send(Msg::Entry(Box::new(entry))).is_err() {
            self.shared.pending_lost.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records `entry`. Best effort (default): as [`AuditLog::emit`], always `Ok`. Fail
    /// closed: waits for room in the queue, and fails once the log is down.
    pub async fn record(&self, entry: Entry) -> Result<(), AuditUnavailable> {
        match self.fail_closed_entry(entry)? {
            None => Ok(()),
            Some(msg) => self.tx.send(msg).await.map_err(|_| AuditUnavailable),
        }
    }

    /// Best effort: emits `entry` (`None`). Fail closed: the message to queue, or `Err` when
    /// the log is down.
    fn fail_closed_entry(&self, entry: Entry) -> Result<Option<Msg>, AuditUnavailable> {
        if !self.shared.fail_closed {
            self.emit(entry);
            return Ok(None);
        }
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err(AuditUnavailable);
        }
        Ok(Some(Msg::Entry(Box::new(entry))))
    }

    /// Records `entry` without waiting, for a decision being made. Best effort: as
    /// [`AuditLog::emit`], always `Ok`. Fail closed: `Err` when the queue is full or the log is
    /// down, and the caller refuses what it could not record.
    pub fn try_record(&self, entry: Entry) -> Result<(), AuditUnavailable> {
        match self.fail_closed_entry(entry)? {
            None => Ok(()),
            Some(msg) => self.tx.try_send(msg).map_err(|_| AuditUnavailable),
        }
    }

    /// Whether records can still be written: fail-closed callers refuse what they cannot
    /// record once the writer failed.
    pub fn available(&self) -> bool {
        !self.shared.failed.load(Ordering::Relaxed)
    }

    /// Records one connection decision (kind `connection`).
    pub async fn connection(&self, fields: &ConnectionFields) -> Result<(), AuditUnavailable> {
        self.record(fields.entry(Kind::Connection)).await
    }

    /// Records a configuration event: `action` is `accepted`, `refused`, `drift` or
    /// `unauthorized`; `subject` the file or bundle; `generation` the policy generation.
    pub fn config_event(
        &self,
        action: &str,
        subject: &str,
        generation: Option<u64>,
        detail: Option<String>,
    ) {
        self.emit(Entry {
            kind: Kind::Config,
            body: Body {
                action: Some(action.to_owned()),
                subject: Some(subject.to_owned()),
                generation,
                detail,
                ..Body::default()
            },
        });
    }

    /// Records a certificate event: `action` is `issued`, `rotated`, `revoked`, `refused` or
    /// `dropped` (the workload left the node); `subject` the SPIFFE ID (or serial).
    pub fn cert_event(&self, action: &str, subject: &str, detail: Option<String>) {
        self.emit(action_entry(Kind::Cert, action, subject, detail));
    }

    /// Records an audit-custody event at the authority (kind `custody`): `action` is
    /// `key_registered`, `checkpoint_accepted` or `checkpoint_refused`; `subject` the node.
    pub fn custody_event(&self, action: &str, subject: &str, detail: Option<String>) {
        self.emit(action_entry(Kind::Custody, action, subject, detail));
    }

    /// Whether callers wait for the log.
    pub fn fail_closed(&self) -> bool {
        self.shared.fail_closed
    }

    /// The log's counters.
    pub fn stats(&self) -> &AuditStats {
        &self.shared.stats
    }

    /// Records `agent_stop`, writes what is queued, checkpoints and stops the writer.
    pub async fn shutdown(&self, reason: &str) {
        let stop = Entry {
            kind: Kind::AgentStop,
            body: Body {
                detail: Some(reason.to_owned()),
                ..Body::default()
            },
        };
        // Shutdown may wait: the stop record is never dropped.
        let _ = self.tx.send(Msg::Entry(Box::new(stop))).await;
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

/// A record of `kind` about `action` on `subject`.
fn action_entry(kind: Kind, action: &str, subject: &str, detail: Option<String>) -> Entry {
    Entry {
        kind,
        body: Body {
            action: Some(action.to_owned()),
            subject: Some(subject.to_owned()),
            detail,
            ..Body::default()
        },
    }
}

/// Opens the segments (recovering a torn tail) and writes `recovered` (if a tail was cut)
/// and `agent_start`, checkpointed.
fn open_writer(
    seg_cfg: SegmentConfig,
    key: AuditKey,
    shared: &Shared,
) -> Result<SegmentWriter, AuditError> {
    let (mut writer, recovery) = SegmentWriter::open(seg_cfg, key)?;
    let mut first = Vec::new();
    if let Some((bytes, kept)) = recovery.torn {
        first.push(Entry {
            kind: Kind::Recovered,
            body: Body {
                action: Some("torn_tail_cut".into()),
                subject: Some(kept.display().to_string()),
                detail: Some(format!(
                    "{bytes} bytes after the last complete record were cut off at start and kept aside"
                )),
                ..Body::default()
            },
        });
    }
    first.push(Entry {
        kind: Kind::AgentStart,
        body: Body {
            detail: Some(format!("mesh-agent {}", env!("CARGO_PKG_VERSION"))),
            ..Body::default()
        },
    });
    writer.append(&first)?;
    writer.checkpoint()?;
    shared
        .stats
        .written
        .fetch_add(first.len() as u64, Ordering::Relaxed);
    shared
        .stats
        .checkpoints
        .store(writer.checkpoints_written(), Ordering::Relaxed);
    Ok(writer)
}

/// Tells the indexer how far the log goes (and whether a segment was closed since).
fn tell_indexer(indexer: Option<&indexer::Indexer>, writer: &SegmentWriter, rotations: &mut u64) {
    if let Some(ix) = indexer {
        let rotated = writer.rotations() != *rotations;
        *rotations = writer.rotations();
        ix.written(writer.next_seq(), rotated);
    }
}

fn write_loop(
    mut writer: SegmentWriter,
    mut rx: mpsc::Receiver<Msg>,
    shared: &Shared,
    indexer: Option<indexer::Indexer>,
) {
    let mut batch = Vec::with_capacity(BATCH + 1);
    let mut stop = None;
    let mut rotations = writer.rotations();
    tell_indexer(indexer.as_ref(), &writer, &mut rotations);
    while stop.is_none() {
        let Some(msg) = rx.blocking_recv() else {
            break;
        };
        let mut tick = false;
        let mut next = Some(msg);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Entry(e) => batch.push(*e),
                Msg::Tick => tick = true,
                Msg::Stop(done) => {
                    stop = Some(done);
                    break;
                }
            }
            if batch.len() >= BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        let lost = shared.pending_lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            batch.insert(
                0,
                Entry {
                    kind: Kind::RecordsLost,
                    body: Body {
                        lost: Some(lost),
                        detail: Some("the audit queue was full".into()),
                        ..Body::default()
                    },
                },
            );
        }
        write_batch(&mut writer, &mut batch, shared);
        if tick {
            if let Err(e) = writer.tick() {
                failed(shared, &e);
            }
        }
        shared
            .stats
            .checkpoints
            .store(writer.checkpoints_written(), Ordering::Relaxed);
        tell_indexer(indexer.as_ref(), &writer, &mut rotations);
    }
    // Stop: whatever is still queued, then a final checkpoint.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Entry(e) = msg {
            batch.push(*e);
        }
    }
    write_batch(&mut writer, &mut batch, shared);
    if let Err(e) = writer.checkpoint() {
        failed(shared, &e);
    }
    shared
        .stats
        .checkpoints
        .store(writer.checkpoints_written(), Ordering::Relaxed);
    tell_indexer(indexer.as_ref(), &writer, &mut rotations);
    // The index catches up with the end of the log (bounded: indexer::STOP_BUDGET).
    if let Some(ix) = indexer {
        ix.stop();
    }
    info!(next_seq = writer.next_seq(), "audit log closed");
    if let Some(done) = stop {
        let _ = done.send(());
    }
}

impl crate::metrics::ScrapeHook for AuditLog {
    fn refresh(&self, metrics: &crate::metrics::Metrics) {
        metrics.set_audit(self.stats());
    }
}

fn write_batch(writer: &mut SegmentWriter, batch: &mut Vec<Entry>, shared: &Shared) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match writer.append(batch) {
        Ok(()) => {
            shared.stats.written.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            failed(shared, &e);
            shared.pending_lost.fetch_add(n, Ordering::Relaxed);
            shared.stats.lost.fetch_add(n, Ordering::Relaxed);
        }
    }
    batch.clear();
}

fn failed(shared: &Shared, e: &SegmentError) {
    shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
    if shared.fail_closed {
        shared.failed.store(true, Ordering::Relaxed);
        error!(error = %e, "audit log write failed: fail-closed callers are refused from now on");
    } else {
        warn!(error = %e, "audit log write failed: records lost (counted, recorded once writable)");
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod index_tests;
