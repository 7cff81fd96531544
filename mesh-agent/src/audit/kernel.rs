//! Kernel events as audit records: plaintext refused, flagged or denied at the SYN, and L4
//! decisions at `connect()` (denied, dry-run deny).

use mesh_common::Event;

use super::{
    record::{Body, Entry, Kind, Layer, Verdict},
    AuditLog,
};
use crate::{
    bpf::events::{event_dst, event_src, policy_name, EventKind},
    policy::PolicyView,
    registry::Registry,
};

/// The `policy` of a decision made by the safe baseline (no verified configuration).
pub const BASELINE_POLICY: &str = "safe-baseline";

/// The record of a kernel event, with workloads and the deciding policy resolved from the
/// registry and the policy view (of the event's generation); `None` for an unknown kind.
pub fn entry(
    event: &Event,
    registry: &Registry,
    view: &PolicyView,
    trust_domain: &str,
) -> Option<Entry> {
    let event_kind = EventKind::try_from(event.kind).ok()?;
    let src = event_src(event);
    let dst = event_dst(event);
    let workload = |id: u32| registry.by_id(id);
    let mut body = Body {
        layer: Some(Layer::Kernel),
        src_addr: Some(src.to_string()),
        dst_addr: Some(dst.to_string()),
        port: Some(dst.port()),
        ..Body::default()
    };
    let (kind, verdict) = match event_kind {
        EventKind::PlaintextRefused => (Kind::Plaintext, Verdict::Refused),
        EventKind::PlaintextPermissive => (Kind::Plaintext, Verdict::Flagged),
        EventKind::PlaintextDenied => (Kind::Plaintext, Verdict::Deny),
        EventKind::L4Denied => (Kind::Connection, Verdict::Deny),
        EventKind::L4WouldDeny => (Kind::Connection, Verdict::DryRunDeny),
        EventKind::BaselineDenied | EventKind::BaselineDropped => {
            // No workload is known (nothing is verified): the decision is the baseline's.
            body.verdict = Some(Verdict::Deny);
            body.policy = Some(BASELINE_POLICY.to_owned());
            if event_kind == EventKind::BaselineDenied {
                // The connecting socket is not bound yet.
                body.src_addr = None;
            }
            return Some(Entry {
                kind: Kind::Connection,
                body,
            });
        }
    };
    body.verdict = Some(verdict);
    if kind == Kind::Plaintext {
        // The event's workload is the destination.
        if let Some(w) = workload(event.workload_id) {
            body.dst_workload = Some(w.key());
            body.dst_identity = Some(w.spiffe_id(trust_domain));
        }
    } else {
        if let Some(w) = workload(event.workload_id) {
            body.src_workload = Some(w.key());
            body.src_identity = Some(w.spiffe_id(trust_domain));
        }
        if let Some(w) = workload(event.peer_workload_id) {
            body.dst_workload = Some(w.key());
            body.dst_identity = Some(w.spiffe_id(trust_domain));
        }
    }
    if matches!(verdict, Verdict::Deny | Verdict::DryRunDeny) {
        body.policy = Some(policy_name(event, view));
        body.generation = Some(event.policy_gen.into());
    }
    Some(Entry { kind, body })
}

impl AuditLog {
    /// Records a kernel event (never waits: the kernel has already decided).
    pub fn kernel_event(
        &self,
        event: &Event,
        registry: &Registry,
        view: &PolicyView,
        trust_domain: &str,
    ) {
        if let Some(e) = entry(event, registry, view, trust_domain) {
            self.emit(e);
        }
    }
}
