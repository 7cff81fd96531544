//! The one accept loop of the agent's TCP listeners (outbound, HBONE inbound, admin): accept
//! until told to stop, each connection served as a task of its own, then drain; accept errors
//! (descriptor exhaustion and the like) back off exponentially instead of spinning.

use std::{future::Future, time::Duration};

use tokio::{sync::watch, task::JoinSet, time::timeout};
use tracing::{info, warn};

/// First pause after a failed `accept()`.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between attempts while `accept()` keeps failing.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Exponential back-off for a failing accept: [`BACKOFF_MIN`], doubled per failure up to
/// [`BACKOFF_MAX`], back to the start after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The pause to take now (and doubles the next one).
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        now
    }

    /// Waits for the pause due now.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// An accept succeeded: the next failure starts over.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Accepts with `accept` until it succeeds, backing off ([`Backoff`]) after each failure
/// (logged, with `what`).
pub async fn accept_retrying<T, F, Fut>(what: &'static str, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    let mut backoff = Backoff::default();
    loop {
        match accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                warn!(error = %e, what, "accept failed: backing off");
                backoff.wait().await;
            }
        }
    }
}

/// Serves a listener: `accept()` yields the next connection (its own errors handled inside,
/// with a [`Backoff`]); `serve(conn)` turns it into the task that serves it (`None`: nothing
/// to run, e.g. refused). Runs until `stop` turns true (or its sender is gone), then lets the
/// tasks finish for up to `drain`, and aborts the rest (logging how many `what` were cut).
pub async fn accept_loop<C, A, AFut, S, SFut>(
    mut accept: A,
    mut stop: watch::Receiver<bool>,
    drain_for: Duration,
    what: &'static str,
    mut serve: S,
) where
    A: FnMut() -> AFut,
    AFut: Future<Output = C>,
    S: FnMut(C) -> Option<SFut>,
    SFut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            conn = accept() => {
                if let Some(task) = serve(conn) {
                    tasks.spawn(task);
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    if !tasks.is_empty() {
        info!(
            active = tasks.len(),
            drain_ms = drain_for.as_millis() as u64,
            what,
            "draining"
        );
    }
    drain(&mut tasks, drain_for, what).await;
}

/// Lets the tasks of `set` finish for up to `limit` (shutdown), then aborts what is left,
/// logging how many `what` were cut.
pub async fn drain<T: 'static>(set: &mut JoinSet<T>, limit: Duration, what: &'static str) {
    let drained = timeout(limit, async { while set.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(aborted = set.len(), what, "drain timeout: closing the rest");
        set.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], BACKOFF_MIN);
        assert_eq!(delays[1], BACKOFF_MIN * 2);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }

    #[tokio::test]
    async fn serves_until_stopped_then_drains() {
        let (tx, rx) = watch::channel(false);
        let served = Arc::new(AtomicUsize::new(0));
        let mut n = 0u32;
        let counted = Arc::clone(&served);
        let looping = accept_loop(
            move || {
                n += 1;
                let i = n;
                async move {
                    if i > 3 {
                        std::future::pending::<()>().await;
                    }
                    i
                }
            },
            rx,
            Duration::from_secs(5),
            "test connections",
            move |_| {
                let counted = Arc::clone(&counted);
                Some(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    counted.fetch_add(1, Ordering::SeqCst);
                })
            },
        );
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(true).unwrap();
        };
        tokio::join!(looping, stopper);
        // Stopped before the tasks ended: the drain waited for all three.
        assert_eq!(served.load(Ordering::SeqCst), 3);
    }
}
