//! Kernel → agent events: the `mesh_events` ring buffer, read without
//! blocking the runtime, and the task that logs them.
//!
//! The ring buffer's fd is registered with tokio ([`AsyncFd`]); the kernel
//! wakes it when a record is committed while the reader has caught up, so
//! the reader drains everything before it waits again.

use std::{io, net::SocketAddr, sync::Arc};

use aya::maps::{MapData, RingBuf};
use mesh_common::{
    Event, EVENT_BASELINE_DENIED, EVENT_BASELINE_DROPPED, EVENT_L4_DENIED, EVENT_L4_WOULD_DENY,
    EVENT_PLAINTEXT_DENIED, EVENT_PLAINTEXT_PERMISSIVE, EVENT_PLAINTEXT_REFUSED,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use crate::{
    policy::PolicyView,
    proxy::{
        ip_from_words,
        record::{Carried, ConnRecord, Outcome, RecordKind, Transport},
    },
    registry::Registry,
};

/// What an [`Event`]'s `kind` says, for the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `EVENT_PLAINTEXT_REFUSED`: a STRICT workload's SYN from outside the mesh was dropped.
    PlaintextRefused,
    /// `EVENT_PLAINTEXT_PERMISSIVE`: plaintext from outside the mesh reached a PERMISSIVE workload.
    PlaintextPermissive,
    /// `EVENT_L4_DENIED`: a connect denied by L4 policy in the kernel.
    L4Denied,
    /// `EVENT_L4_WOULD_DENY`: a connect a dry-run policy would have denied.
    L4WouldDeny,
    /// `EVENT_PLAINTEXT_DENIED`: plaintext to a PERMISSIVE workload refused by policy.
    PlaintextDenied,
    /// `EVENT_BASELINE_DENIED`: a connect from the pod tree refused by the safe baseline.
    BaselineDenied,
    /// `EVENT_BASELINE_DROPPED`: a SYN to the pod tree dropped by the safe baseline.
    BaselineDropped,
}

/// An event kind this build does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown event kind {0}")]
pub struct UnknownKind(pub u32);

impl TryFrom<u32> for EventKind {
    type Error = UnknownKind;

    fn try_from(kind: u32) -> Result<Self, UnknownKind> {
        match kind {
            EVENT_PLAINTEXT_REFUSED => Ok(Self::PlaintextRefused),
            EVENT_PLAINTEXT_PERMISSIVE => Ok(Self::PlaintextPermissive),
            EVENT_L4_DENIED => Ok(Self::L4Denied),
            EVENT_L4_WOULD_DENY => Ok(Self::L4WouldDeny),
            EVENT_PLAINTEXT_DENIED => Ok(Self::PlaintextDenied),
            EVENT_BASELINE_DENIED => Ok(Self::BaselineDenied),
            EVENT_BASELINE_DROPPED => Ok(Self::BaselineDropped),
            other => Err(UnknownKind(other)),
        }
    }
}

/// The packet's source as a socket address (IPv4-mapped comes back as IPv4).
pub fn event_src(e: &Event) -> SocketAddr {
    SocketAddr::new(ip_from_words(e.src_addr_be), u16::from_be(e.src_port_be))
}

/// The packet's destination as a socket address.
pub fn event_dst(e: &Event) -> SocketAddr {
    SocketAddr::new(ip_from_words(e.dst_addr_be), u16::from_be(e.dst_port_be))
}

/// Decodes one ring buffer record (the kernel's native-endian `Event`
/// layout); `None` if it is too short.
pub fn decode(b: &[u8]) -> Option<Event> {
    if b.len() < size_of::<Event>() {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let words = |o: usize| [u32_at(o), u32_at(o + 4), u32_at(o + 8), u32_at(o + 12)];
    Some(Event {
        kind: u32_at(0),
        workload_id: u32_at(4),
        src_addr_be: words(8),
        dst_addr_be: words(24),
        src_port_be: u16_at(40),
        dst_port_be: u16_at(42),
        family: u32_at(44),
        peer_workload_id: u32_at(48),
        policy_str: u32_at(52),
        policy_gen: u32_at(56),
        _reserved: u32_at(60),
    })
}

/// The reader of `mesh_events`.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records too short to be an [`Event`] (a kernel/agent mismatch).
    malformed: u64,
}

impl EventReader {
    /// Registers the ring buffer with the current tokio runtime.
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the RingBuf owns its MapData, which owns the map's fd
        // (an OwnedFd): it stays open and is never replaced while the
        // AsyncFd (which owns the RingBuf) lives, and `as_raw_fd` always
        // returns that fd.
        #[allow(unsafe_code)]
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
        Ok(Self { ring, malformed: 0 })
    }

    /// The next event, if one is waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            let item = self.ring.get_mut().next()?;
            match decode(&item) {
                Some(e) => return Some(e),
                None => {
                    self.malformed += 1;
                    debug!(
                        len = item.len(),
                        malformed = self.malformed,
                        "short event record skipped"
                    );
                }
            }
        }
    }

    /// The next event; waits (without blocking the runtime) until there is one.
    pub async fn next(&mut self) -> io::Result<Event> {
        loop {
            if let Some(e) = self.try_next() {
                return Ok(e);
            }
            // Readiness is cleared *before* the buffer is checked again, so a
            // record committed after the check wakes the next wait.
            let mut guard = self.ring.readable_mut().await?;
            guard.clear_ready();
        }
    }
}

/// Logs every event until `stop` turns true, and hands each to `on_event`
/// (the app counts metrics there): `plaintext refused` (STRICT) and
/// `plaintext inside a secure zone` (PERMISSIVE), with `src`, `dst` and
/// `dst_workload` (`namespace/name` from the registry); `connection denied` (layer `l4`,
/// side `kernel`) and `dry-run deny` for L4 policy, with `src_workload`, `src_identity`,
/// `dst_workload`, `dst`, `port`, `policy` (`ns/name` from the policy view of the event's
/// generation, `-` for a default deny) and `generation`.
pub fn spawn_event_log(
    mut reader: EventReader,
    mesh: crate::state::live::MeshHandle,
    views: watch::Receiver<Arc<PolicyView>>,
    trust_domain: String,
    on_event: impl Fn(&Event) + Send + 'static,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut limit = LogLimit::new(std::time::Instant::now());
        loop {
            let event = tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                    continue;
                }
                next = reader.next() => match next {
                    Ok(e) => e,
                    Err(e) => {
                        error!(error = %e, "reading kernel events failed; event log stopped");
                        break;
                    }
                },
            };
            if limit.admit(std::time::Instant::now()) {
                log_event(&event, &mesh.registry(), &views.borrow(), &trust_domain);
            }
            on_event(&event);
        }
        // Whatever is already in the buffer at shutdown is still logged.
        while let Some(event) = reader.try_next() {
            if limit.admit(std::time::Instant::now()) {
                log_event(&event, &mesh.registry(), &views.borrow(), &trust_domain);
            }
            on_event(&event);
        }
    })
}

/// Kernel event lines logged per second at most: a SYN flood against a STRICT pod (one event
/// per SYN, retransmissions included) must not flood the agent's log. Every event is still
/// counted in the metrics; the lines past the limit are summarized once the second is over.
pub const EVENT_LOG_LINES_PER_SEC: u32 = 100;

/// A one-second window of [`EVENT_LOG_LINES_PER_SEC`] lines.
struct LogLimit {
    window: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    fn new(now: std::time::Instant) -> Self {
        Self {
            window: now,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether the event seen at `now` is logged; reports the suppressed count of the last
    /// window when a new one starts.
    fn admit(&mut self, now: std::time::Instant) -> bool {
        if now.duration_since(self.window) >= std::time::Duration::from_secs(1) {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    limit_per_sec = EVENT_LOG_LINES_PER_SEC,
                    "kernel event lines suppressed (still counted in the metrics)"
                );
            }
            *self = Self::new(now);
        }
        if self.logged < EVENT_LOG_LINES_PER_SEC {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// The policy name of an `EVENT_L4_*`: from the view when it is of the event's generation.
pub(crate) fn policy_name(event: &Event, view: &PolicyView) -> String {
    if event.policy_str == 0 {
        return "-".to_owned();
    }
    if view.generation() == event.policy_gen {
        if let Some(s) = view.string(event.policy_str) {
            return s.to_string();
        }
    }
    format!("gen{}#{}", event.policy_gen, event.policy_str)
}

fn log_event(event: &Event, registry: &Registry, view: &PolicyView, trust_domain: &str) {
    let src = event_src(event);
    let dst = event_dst(event);
    let dst_workload = registry
        .by_id(event.workload_id)
        .map(|w| w.key())
        .unwrap_or_else(|| format!("unknown#{}", event.workload_id));
    match EventKind::try_from(event.kind) {
        Ok(EventKind::PlaintextRefused) => {
            warn!(src = %src, dst = %dst, dst_workload = %dst_workload, "plaintext refused");
        }
        Ok(EventKind::PlaintextDenied) => warn!(
            layer = "l4",
            side = "kernel",
            src = %src,
            dst = %dst,
            dst_workload = %dst_workload,
            port = dst.port(),
            policy = %policy_name(event, view),
            generation = event.policy_gen,
            "plaintext denied by policy"
        ),
        Ok(EventKind::BaselineDenied) => warn!(
            side = "kernel",
            dst = %dst,
            "connect refused by the safe baseline (no verified configuration)"
        ),
        Ok(EventKind::BaselineDropped) => warn!(
            side = "kernel",
            src = %src,
            dst = %dst,
            "inbound connection dropped by the safe baseline (no verified configuration)"
        ),
        Ok(EventKind::PlaintextPermissive) => warn!(
            src = %src,
            dst = %dst,
            dst_workload = %dst_workload,
            "plaintext inside a secure zone"
        ),
        Ok(kind @ (EventKind::L4Denied | EventKind::L4WouldDeny)) => {
            let src = registry.by_id(event.workload_id);
            let src_workload = src
                .map(|w| w.key())
                .unwrap_or_else(|| format!("unknown#{}", event.workload_id));
            let src_identity = src.map(|w| w.spiffe_id(trust_domain)).unwrap_or_default();
            let dst_workload = registry
                .by_id(event.peer_workload_id)
                .map(|w| w.key())
                .unwrap_or_else(|| format!("unknown#{}", event.peer_workload_id));
            let policy = policy_name(event, view);
            let port = dst.port();
            if kind == EventKind::L4Denied {
                ConnRecord {
                    conn_id: None,
                    transport: Transport::Kernel,
                    src_workload: Some(src_workload),
                    src_identity: Some(src_identity),
                    src_addr: None,
                    peer: None,
                    dst,
                    dst_workload: Some(dst_workload),
                    dst_identity: None,
                    service: None,
                    endpoint: None,
                    generation: Some(event.policy_gen),
                    duration_ms: 0,
                    carried: Carried::nothing(Outcome::Denied {
                        policy: (policy != "-").then(|| Arc::from(policy.as_str())),
                    }),
                }
                .log(RecordKind::KernelDenied);
            } else {
                info!(
                    layer = "l4",
                    side = "kernel",
                    src_workload = %src_workload,
                    src_identity = %src_identity,
                    dst_workload = %dst_workload,
                    dst = %dst,
                    port,
                    policy = %policy,
                    generation = event.policy_gen,
                    "dry-run deny"
                );
            }
        }
        Err(e) => debug!(kind = e.0, "unknown kernel event skipped"),
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_flood_is_cut_to_the_limit_per_second_and_resumes() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(t0);
        let admitted = (0..10_000).filter(|_| l.admit(t0)).count();
        assert_eq!(admitted, EVENT_LOG_LINES_PER_SEC as usize);
        assert_eq!(l.suppressed, 10_000 - u64::from(EVENT_LOG_LINES_PER_SEC));
        assert!(
            l.admit(t0 + Duration::from_millis(1001)),
            "a new second logs again"
        );
        assert_eq!(l.suppressed, 0);
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::AF_INET;

    use super::*;
    use crate::proxy::ip_words;

    fn encode(e: &Event) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(e.kind.to_ne_bytes());
        b.extend(e.workload_id.to_ne_bytes());
        for w in e.src_addr_be.iter().chain(&e.dst_addr_be) {
            b.extend(w.to_ne_bytes());
        }
        b.extend(e.src_port_be.to_ne_bytes());
        b.extend(e.dst_port_be.to_ne_bytes());
        b.extend(e.family.to_ne_bytes());
        for w in [e.peer_workload_id, e.policy_str, e.policy_gen, e._reserved] {
            b.extend(w.to_ne_bytes());
        }
        b
    }

    #[test]
    fn decode_matches_the_kernel_layout() {
        let e = Event {
            kind: EVENT_PLAINTEXT_REFUSED,
            workload_id: 7,
            src_addr_be: ip_words("10.1.0.1".parse().unwrap()),
            dst_addr_be: ip_words("10.1.0.2".parse().unwrap()),
            src_port_be: 40000u16.to_be(),
            dst_port_be: 8080u16.to_be(),
            family: u32::from(AF_INET),
            peer_workload_id: 3,
            policy_str: 4,
            policy_gen: 5,
            _reserved: 0,
        };
        let b = encode(&e);
        assert_eq!(b.len(), size_of::<Event>());
        let d = decode(&b).unwrap();
        assert_eq!(d, e);
        assert_eq!(event_src(&d), "10.1.0.1:40000".parse().unwrap());
        assert_eq!(event_dst(&d), "10.1.0.2:8080".parse().unwrap());
        assert!(decode(&b[..63]).is_none());
        // Ring buffer records are padded to 8 bytes: longer is fine.
        let mut longer = b.clone();
        longer.extend([0; 8]);
        assert_eq!(decode(&longer), Some(e));
    }

    #[test]
    fn kinds() {
        assert_eq!(EventKind::try_from(1).unwrap(), EventKind::PlaintextRefused);
        assert_eq!(
            EventKind::try_from(2).unwrap(),
            EventKind::PlaintextPermissive
        );
        assert_eq!(EventKind::try_from(3).unwrap(), EventKind::L4Denied);
        assert_eq!(EventKind::try_from(4).unwrap(), EventKind::L4WouldDeny);
        assert_eq!(EventKind::try_from(5).unwrap(), EventKind::PlaintextDenied);
        assert_eq!(EventKind::try_from(6).unwrap(), EventKind::BaselineDenied);
        assert_eq!(EventKind::try_from(7).unwrap(), EventKind::BaselineDropped);
        assert!(EventKind::try_from(0).is_err());
        assert!(EventKind::try_from(8).is_err());
    }
}
