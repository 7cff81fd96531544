//! The indexer: the process that owns the log keeps its query index up to date, on its own
//! thread, off every caller's path.
//!
//! The writer thread tells it, after each batch, how far the log goes ([`Indexer::written`]:
//! a mutex held for a store and a notify, never while indexing). The indexer wakes at most
//! every [`INTERVAL`] (at once at a rotation), indexes what was appended in transactions of
//! at most [`index::STEP_BYTES`] and publishes how far the index goes. At start it catches
//! up with whatever the log holds beyond the index (the whole log after the index was
//! deleted). A corrupt index file is deleted and rebuilt from the segments; other errors
//! (I/O, a lock held too long) are counted and retried at the next wake.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::index::{self, Index};

/// The longest the index trails the log while records are written (plus one transaction).
pub const INTERVAL: Duration = Duration::from_millis(250);

/// At stop, the indexer catches up for at most this long (the next start, or a query,
/// indexes the rest).
pub const STOP_BUDGET: Duration = Duration::from_secs(2);

/// The indexer's progress, read by the metrics, tests and the bench.
#[derive(Debug, Default)]
pub struct IndexStats {
    /// The next seq the index has not covered yet (0: nothing indexed).
    pub indexed_next: AtomicU64,
    /// The next seq the writer will write.
    pub written_next: AtomicU64,
    /// Records indexed by this process.
    pub indexed: AtomicU64,
    /// Rebuilds from scratch (a corrupt, deleted-and-recreated or stale index).
    pub rebuilds: AtomicU64,
    pub errors: AtomicU64,
}

impl IndexStats {
    /// Records written but not indexed yet.
    pub fn lag(&self) -> u64 {
        self.written_next
            .load(Ordering::Relaxed)
            .saturating_sub(self.indexed_next.load(Ordering::Relaxed))
    }
}

#[derive(Default)]
struct Wake {
    /// A rotation happened (or stop): index now, not at the next interval.
    urgent: bool,
    /// Stop requested: one last catch-up until this deadline.
    stop: Option<Instant>,
}

struct Shared {
    wake: Mutex<Wake>,
    cv: Condvar,
    stats: Arc<IndexStats>,
}

impl Shared {
    /// Stop was requested and its catch-up budget is spent.
    fn out_of_time(&self) -> bool {
        lock(&self.wake).stop.is_some_and(|d| Instant::now() >= d)
    }
}

/// The handle the writer thread holds.
pub struct Indexer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Indexer {
    /// Starts the indexer of the log in `dir`, its index at `path`, publishing into `stats`.
    pub fn start(dir: PathBuf, path: PathBuf, stats: Arc<IndexStats>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            wake: Mutex::new(Wake::default()),
            cv: Condvar::new(),
            stats,
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("audit-indexer".into())
            .spawn(move || run(&dir, &path, &thread_shared))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The writer wrote up to (not including) `next_seq`; `rotated`: a segment was closed.
    pub fn written(&self, next_seq: u64, rotated: bool) {
        self.shared
            .stats
            .written_next
            .store(next_seq, Ordering::Relaxed);
        if rotated {
            lock(&self.shared.wake).urgent = true;
            self.shared.cv.notify_one();
        }
    }

    /// Stops the indexer after a last catch-up of at most [`STOP_BUDGET`], and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        {
            let mut w = lock(&self.shared.wake);
            w.stop.get_or_insert_with(|| Instant::now() + STOP_BUDGET);
            w.urgent = true;
        }
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn lock(m: &Mutex<Wake>) -> std::sync::MutexGuard<'_, Wake> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// SQLite page cache of the agent's indexer connection (KiB): the agent's memory is budgeted.
const INDEXER_CACHE_KIB: u32 = 8 * 1024;

/// Opens the index, recreating a corrupt file.
fn open(dir: &Path, path: &Path, shared: &Shared) -> Option<Index> {
    match Index::open_or_recreate(dir, path) {
        Ok((index, recreated)) => {
            if let Err(e) = index.set_cache_kib(INDEXER_CACHE_KIB) {
                warn!(index = %path.display(), error = %crate::error_chain(&e), "bounding the audit index cache");
            }
            if recreated {
                shared.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                warn!(index = %path.display(), "audit index was corrupt: deleted, rebuilt from the segments");
            }
            Some(index)
        }
        Err(e) => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            warn!(index = %path.display(), error = %crate::error_chain(&e), "audit index unavailable: retried later");
            None
        }
    }
}

fn run(dir: &Path, path: &Path, shared: &Shared) {
    let mut index = None;
    // The index's position is not known until the first pass.
    let mut first = true;
    loop {
        let last = lock(&shared.wake).stop.is_some();
        let behind = shared.stats.lag() > 0;
        if first || behind || last {
            // A corrupt file is recreated and indexed again at once (once per pass).
            for _ in 0..2 {
                if pass(dir, path, &mut index, shared) {
                    break;
                }
            }
            first = false;
        }
        if last {
            break;
        }
        let mut w = lock(&shared.wake);
        if !w.urgent && w.stop.is_none() {
            w = shared
                .cv
                .wait_timeout(w, INTERVAL)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        w.urgent = false;
    }
}

/// One catch-up: opens the index if needed and indexes what was appended. `false` when the
/// index was found corrupt and deleted (the caller runs another pass to rebuild it).
fn pass(dir: &Path, path: &Path, index: &mut Option<Index>, shared: &Shared) -> bool {
    if index.is_none() {
        *index = open(dir, path, shared);
    }
    let Some(ix) = index.as_mut() else {
        return true;
    };
    // The index is a prefix of the log: each commit moves the published position.
    let mut publish = |s: &index::UpdateStats| {
        if let Some(last) = s.last_seq {
            shared.stats.indexed_next.store(last + 1, Ordering::Relaxed);
        }
    };
    let result = ix
        .update_until(&|| shared.out_of_time(), &mut publish)
        .and_then(|s| ix.next_seq().map(|next| (s, next)));
    match result {
        Ok((s, next)) => {
            shared.stats.indexed_next.store(next, Ordering::Relaxed);
            shared.stats.indexed.fetch_add(s.indexed, Ordering::Relaxed);
            if s.rebuilt {
                shared.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                info!(index = %path.display(), "audit index rebuilt: a segment changed under it");
            }
            if s.skipped > 0 {
                warn!(
                    skipped = s.skipped,
                    "audit index: lines that are not records skipped (run `audit verify`)"
                );
            }
            true
        }
        Err(e) if e.is_corrupt() => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            shared.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
            warn!(index = %path.display(), error = %crate::error_chain(&e), "audit index corrupt: deleted, rebuilt from the segments");
            *index = None;
            index::remove_index_files(path);
            false
        }
        Err(e) => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            warn!(index = %path.display(), error = %crate::error_chain(&e), "audit index update failed: retried later");
            true
        }
    }
}
