//! Sending every checkpoint the writer appends to the authority, which keeps a copy
//! ([`crate::authority::custody`]).
//!
//! The writer only offers a checkpoint to a bounded queue ([`CheckpointSink::offer`], never
//! waits): the audit writer and the data path are never held up by the authority. A task
//! ([`CheckpointQueue::run`]) sends them in order over the node's mTLS channel to the
//! authority; while the authority is unreachable it retries the same checkpoint with a
//! growing pause (up to [`MAX_BACKOFF`]), and the queue fills. A full queue drops the newest
//! checkpoint (counted, logged): the next one covers the whole chain up to it, so nothing
//! the authority keeps is weakened, only its granularity. A checkpoint the authority refuses
//! (a key it does not know for this node, a rollback) is logged and counted, not retried.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::checkpoint::Checkpoint;
use crate::identity::{AuthorityClient, IdentityError};

/// Checkpoints queued for the authority. At the default interval (60 s), 17 hours.
pub const QUEUE: usize = 1024;
/// Longest pause between two attempts while the authority is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Counters of the forwarding.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Accepted by the authority.
    pub sent: AtomicU64,
    /// Refused by the authority (not retried).
    pub refused: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Attempts that failed to reach the authority (retried).
    pub retries: AtomicU64,
}

impl crate::metrics::ScrapeHook for ForwardStats {
    fn refresh(&self, metrics: &crate::metrics::Metrics) {
        metrics.set_audit_forward(self);
    }
}

/// The writer's end: offers checkpoints without ever waiting.
#[derive(Clone, Debug)]
pub struct CheckpointSink {
    tx: mpsc::Sender<Checkpoint>,
    stats: Arc<ForwardStats>,
}

/// The sending end, run as a task with [`CheckpointQueue::run`].
#[derive(Debug)]
pub struct CheckpointQueue {
    rx: mpsc::Receiver<Checkpoint>,
    stats: Arc<ForwardStats>,
}

/// A queue of `capacity` checkpoints (at least 1).
pub fn channel(capacity: usize) -> (CheckpointSink, CheckpointQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stats = Arc::new(ForwardStats::default());
    (
        CheckpointSink {
            tx,
            stats: Arc::clone(&stats),
        },
        CheckpointQueue { rx, stats },
    )
}

impl CheckpointSink {
    /// Queues `cp` for the authority; drops it (counted) if the queue is full or the
    /// sending task is gone.
    pub fn offer(&self, cp: &Checkpoint) {
        if self.tx.try_send(cp.clone()).is_err() {
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(seq = cp.seq, dropped = n, "audit checkpoint queue to the authority full: checkpoint dropped (a later one covers it)");
            }
        }
    }

    pub fn stats(&self) -> &ForwardStats {
        &self.stats
    }
}

impl CheckpointQueue {
    pub fn stats(&self) -> Arc<ForwardStats> {
        Arc::clone(&self.stats)
    }

    /// Sends queued checkpoints with `client` until every [`CheckpointSink`] is gone and
    /// the queue is empty (the writer closed the log). Cancel-safe at any await.
    pub async fn run(mut self, mut client: AuthorityClient) {
        while let Some(cp) = self.rx.recv().await {
            let mut backoff = FIRST_BACKOFF;
            loop {
                match client.checkpoint(&cp).await {
                    Ok(()) => {
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        debug!(seq = cp.seq, "audit checkpoint kept by the authority");
                        break;
                    }
                    Err(IdentityError::Refused { message }) => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(seq = cp.seq, error = %message, "the authority refused an audit checkpoint");
                        break;
                    }
                    Err(e) => {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        info!(seq = cp.seq, error = %e, retry_in_ms = backoff.as_millis() as u64,
                              "audit checkpoint not sent to the authority yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}
