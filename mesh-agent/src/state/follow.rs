//! How an agent follows the mesh state: fetch versions from the authority (or its own file),
//! apply each one, retry pending cgroups.
//!
//! Two tasks: the fetcher keeps one long-poll open to the authority (reconnecting with capped
//! back-off; the authority's identity is pinned by the client) and leaves only the newest
//! snapshot in a `watch` slot, so an agent that falls behind skips straight to the latest; the
//! applier applies whatever is in the slot, one at a time, and meanwhile polls for the cgroups
//! of local workloads that do not exist yet.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{
    ids::IdAllocator,
    live::Applier,
    publish::{Sink, SourceWatch},
    Snapshot,
};
use crate::{error_chain, identity::AuthorityClient};

/// How long one long-poll waits at the authority.
pub const LONG_POLL: Duration = Duration::from_secs(25);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The newest snapshot received, waiting to be applied.
pub type Slot = watch::Receiver<Option<Arc<Snapshot>>>;

/// Fetches snapshots from the authority into a slot, starting after version `after`.
/// Each request reports what `mesh` has applied (the authority's intended vs active).
pub fn spawn_fetcher(
    mut client: AuthorityClient,
    after: Option<u64>,
    mesh: super::live::MeshHandle,
    mut stop: watch::Receiver<bool>,
) -> (Slot, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None::<Arc<Snapshot>>);
    let handle = tokio::spawn(async move {
        let mut after = after;
        let mut backoff = BACKOFF_MIN;
        let mut down_since: Option<String> = None;
        loop {
            let mut refusals = mesh.refused();
            let active = {
                let m = mesh.load();
                crate::authority::protocol::Active {
                    version: m.version,
                    digest: m.digest.clone(),
                    refused: refusals.borrow_and_update().clone(),
                }
            };
            // A version applied — or refused — while the poll waits is reported at once (a
            // new poll on a new connection: the old one may still deliver the old answer).
            let reported = active.clone();
            let mut applied = mesh.subscribe();
            let newly_applied = async move {
                loop {
                    tokio::select! {
                        changed = applied.changed() => {
                            if changed.is_err() {
                                return std::future::pending::<()>().await;
                            }
                            let m = Arc::clone(&applied.borrow_and_update());
                            if m.version != reported.version || m.digest != reported.digest {
                                return;
                            }
                        }
                        changed = refusals.changed() => {
                            if changed.is_err() {
                                return std::future::pending::<()>().await;
                            }
                            if *refusals.borrow_and_update() != reported.refused {
                                return;
                            }
                        }
                    }
                }
            };
            let fetched = tokio::select! {
                r = client.state_reporting(after, LONG_POLL, Some(active)) => r,
                () = newly_applied => {
                    client.disconnect();
                    continue;
                }
                _ = stop.wait_for(|s| *s) => return,
            };
            match fetched {
                Ok(got) => {
                    if down_since.take().is_some() {
                        info!("state stream from the authority restored");
                    }
                    backoff = BACKOFF_MIN;
                    if let Some(snapshot) = got {
                        // Verified again by the applier; a bad one is refused there, and the
                        // next request still asks for anything newer than what we run.
                        after = Some(snapshot.version);
                        tx.send_replace(Some(Arc::new(snapshot)));
                    }
                }
                Err(e) => {
                    let text = error_chain(&e);
                    if down_since.as_deref() != Some(&text) {
                        warn!(error = %text, "state stream from the authority unavailable; serving the applied state, retrying");
                        down_since = Some(text);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    });
    (rx, handle)
}

/// Follows a local registry file (`--registry`) into a slot: ids and versions persisted in
/// `state_dir`. Returns the slot with the file's first version in it.
pub fn spawn_file_source(
    registry: PathBuf,
    state_dir: &std::path::Path,
    interval: Duration,
    stop: watch::Receiver<bool>,
) -> Result<(Slot, JoinHandle<()>), super::publish::RefreshError> {
    let (tx, rx) = watch::channel(None::<Arc<Snapshot>>);
    let mut source = SourceWatch {
        registry_path: registry,
        signers: None,
        ids: IdAllocator::open(state_dir)?,
        sink: Arc::new(tx) as Arc<dyn Sink>,
        on_registry: Box::new(|_| {}),
    };
    source.refresh(super::now_unix_ms())?;
    let handle = tokio::spawn(source.run(interval, stop));
    Ok((rx, handle))
}

/// Applies every snapshot that lands in `slot` until `stop`; every `pending_poll` retries the
/// cgroups of local workloads that had none.
pub fn spawn_applier(
    mut applier: Applier,
    mut slot: Slot,
    pending_poll: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(pending_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = slot.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let Some(snapshot) = slot.borrow_and_update().clone() else { continue };
                    if snapshot.version == applier.version()
                        && snapshot.digest == applier.digest()
                    {
                        // What it runs is meant for it again (a halted rollout): no drift.
                        applier.report_drift(&snapshot);
                        continue;
                    }
                    // Parsing and map writes: milliseconds, on this task only.
                    if let Err(e) = tokio::task::block_in_place(|| applier.apply(&snapshot)) {
                        warn!(version = snapshot.version, error = %error_chain(&e),
                              "state refused; the applied state stays");
                        applier.note_refused(&snapshot, &refusal_reason(&e));
                    }
                    applier.report_drift(&snapshot);
                }
                _ = tick.tick() => {
                    tokio::task::block_in_place(|| applier.resolve_pending());
                }
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

/// The reason reported to the authority for a refused version: the label (as
/// `mesh_config_rejected_total`'s, or `state` / `maps`) and the error.
fn refusal_reason(e: &super::live::ApplyError) -> String {
    use super::live::ApplyError;
    let label = match e {
        ApplyError::Signed(s) => s.reason(),
        ApplyError::Snapshot(_) | ApplyError::Registry { .. } => "state",
        ApplyError::Maps(_) => "maps",
    };
    format!("{label}: {}", error_chain(e))
}
