//! One record per connection the proxies carried (or refused): who, from where, to what, how
//! much, how it ended. A plain [`Serialize`] struct — the shape an audit record reuses — and
//! the log line emitted from one place ([`ConnRecord::log`]): `flow` for the outbound side
//! (same-node and HBONE), `inbound` for an HBONE tunnel at its destination, `connection
//! denied` for a connect the kernel refused by policy (from its event). The JSON field names
//! of these lines are the ones docs/CONTRACTS.md and the harness parse.

use std::{net::SocketAddr, sync::Arc};

use serde::{Serialize, Serializer};
use tracing::{info, warn};

/// How a connection was carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Over an HBONE tunnel (mTLS) between node agents.
    Hbone,
    /// Same node: the agent is both ends.
    Local,
    /// Never reached a proxy: decided by the kernel's programs (reported as an event).
    Kernel,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hbone => "hbone",
            Self::Local => "local",
            Self::Kernel => "kernel",
        }
    }
}

/// How a connection ended. Logged (and serialized) as its text: `ok`, or the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Outcome {
    /// Carried until both sides closed.
    #[error("ok")]
    Ok,
    /// Denied by policy at the destination (the deciding policy, if one decided).
    #[error("denied by policy {}", policy.as_deref().unwrap_or("(no ALLOW policy matched)"))]
    Denied { policy: Option<Arc<str>> },
    /// Closed by a new policy generation that no longer allows it.
    #[error("closed: no longer allowed by policy")]
    Revoked,
    /// Closed because a workload of the connection left the mesh state (or its identity,
    /// node or addresses changed).
    #[error("closed: workload removed from the mesh state")]
    Removed,
    /// Not carried: the reason (no original destination, unknown workload, no certificate…).
    #[error("{0}")]
    Refused(String),
    /// Carrying failed part-way or could not start (connect, tunnel, copy, HTTP errors).
    #[error("{0}")]
    Failed(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok)
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What was carried and how it ended: the part of a record the data path fills in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Carried {
    pub outcome: Outcome,
    /// HTTP requests seen and denied (connections served per request only).
    pub requests: Option<u64>,
    pub denied: Option<u64>,
    /// Bytes source → destination, destination → source: counted live, so right on every
    /// outcome.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Carried {
    /// Ended before any byte was carried.
    pub fn nothing(outcome: Outcome) -> Self {
        Self {
            outcome,
            requests: None,
            denied: None,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }
}

/// Which log line a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The outbound side: `flow`.
    Flow,
    /// An HBONE tunnel at its destination: `inbound`.
    Inbound,
    /// A connect refused by the kernel's L4 policy: `connection denied` (side `kernel`).
    KernelDenied,
}

/// One connection, as logged.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRecord {
    /// The proxy's connection id (none for a connection the kernel refused).
    pub conn_id: Option<u64>,
    pub transport: Transport,
    /// `namespace/name` of the source workload, when known.
    pub src_workload: Option<String>,
    /// The source identity (verified by mTLS, or attested by the kernel).
    pub src_identity: Option<String>,
    /// The original source address (the pod's), when known.
    pub src_addr: Option<SocketAddr>,
    /// The peer this proxy accepted from (the HBONE peer agent; the pod for `flow`).
    pub peer: Option<SocketAddr>,
    /// The original destination.
    pub dst: SocketAddr,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    /// `flow` to a service virtual IP: the service (`namespace/name`); `dst` is the VIP:port
    /// the client connected to and `dst_workload`/`dst_identity` the chosen endpoint.
    pub service: Option<String>,
    /// `flow` to a service: the chosen endpoint's address (`endpoint_ip:targetPort`).
    pub endpoint: Option<SocketAddr>,
    /// The policy generation that decided, when known.
    pub generation: Option<u32>,
    pub duration_ms: u64,
    #[serde(flatten)]
    pub carried: Carried,
}

impl ConnRecord {
    /// Emits the record as its log line.
    pub fn log(&self, kind: RecordKind) {
        let opt = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_owned());
        match kind {
            RecordKind::Flow => info!(
                conn_id = self.conn_id,
                src_workload = %opt(&self.src_workload),
                src_identity = %opt(&self.src_identity),
                src_addr = self.peer.map(tracing::field::display),
                orig_dst = %self.dst,
                dst_workload = %opt(&self.dst_workload),
                dst_identity = %opt(&self.dst_identity),
                service = %opt(&self.service),
                endpoint = self.endpoint.map(tracing::field::display),
                transport = self.transport.as_str(),
                requests = self.carried.requests,
                denied = self.carried.denied,
                bytes_sent = self.carried.bytes_sent,
                bytes_received = self.carried.bytes_received,
                duration_ms = self.duration_ms,
                outcome = %self.carried.outcome,
                "flow"
            ),
            RecordKind::Inbound => info!(
                conn_id = self.conn_id,
                peer_identity = %opt(&self.src_identity),
                src_addr = self.peer.map(tracing::field::display),
                orig_src = self.src_addr.map(tracing::field::display),
                dst = %self.dst,
                dst_workload = %opt(&self.dst_workload),
                requests = self.carried.requests,
                denied = self.carried.denied,
                bytes_in = self.carried.bytes_sent,
                bytes_out = self.carried.bytes_received,
                duration_ms = self.duration_ms,
                outcome = %self.carried.outcome,
                "inbound"
            ),
            RecordKind::KernelDenied => {
                let policy = match &self.carried.outcome {
                    Outcome::Denied { policy } => policy.as_deref().unwrap_or("-"),
                    _ => "-",
                };
                warn!(
                    layer = "l4",
                    side = "kernel",
                    src_workload = %opt(&self.src_workload),
                    src_identity = %self.src_identity.as_deref().unwrap_or(""),
                    dst_workload = %opt(&self.dst_workload),
                    dst = %self.dst,
                    port = self.dst.port(),
                    policy,
                    generation = self.generation,
                    "connection denied"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_serializes_as_its_text() {
        let r = ConnRecord {
            conn_id: Some(7),
            transport: Transport::Local,
            src_workload: Some("default/a".into()),
            src_identity: None,
            src_addr: None,
            peer: Some("10.1.0.2:4000".parse().unwrap()),
            dst: "10.1.0.3:8080".parse().unwrap(),
            dst_workload: None,
            dst_identity: None,
            service: None,
            endpoint: None,
            generation: None,
            duration_ms: 1,
            carried: Carried {
                bytes_sent: 5,
                bytes_received: 9,
                ..Carried::nothing(Outcome::Denied {
                    policy: Some("default/deny".into()),
                })
            },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outcome"], "denied by policy default/deny");
        assert_eq!(v["transport"], "local");
        assert_eq!(v["bytes_received"], 9);
        assert_eq!(Outcome::Ok.to_string(), "ok");
        assert_eq!(
            Outcome::Revoked.to_string(),
            "closed: no longer allowed by policy"
        );
    }
}
