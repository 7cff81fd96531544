//! Authorization at the destination, as the proxies see it: one [`Authorizer`] snapshot per
//! policy generation, published through a watch channel. The destination side of every
//! connection — an HBONE tunnel from another node, or a same-node connection — asks it once
//! for the connection (L4, with the verified identity) and, on HTTP ports where the answer
//! depends on the request, once per request (L7). When a new snapshot is published, live
//! connections are asked again and closed if no longer allowed ([`supervise`]).

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    metrics::{DenialSide, Metrics, PolicyLayer},
    tls::SpiffeId,
};

/// What the destination knows of a connection when it authorizes it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The source workload (registry id), when the source address is one of a workload that
    /// has the verified identity.
    pub src_workload: Option<u32>,
    /// The verified identity of the source (mTLS, or the kernel for same-node).
    pub src_identity: SpiffeId,
    /// The original source address (same-node: the pod's; HBONE: the `Forwarded` claim,
    /// admitted only if it belongs to a workload with the verified identity).
    pub src_addr: Option<SocketAddr>,
    /// The original destination.
    pub dst: SocketAddr,
    /// The destination workload (registry id), on this node.
    pub dst_workload: u32,
    /// `namespace/name` of the destination workload (for logs).
    pub dst_name: String,
    /// Whether the destination port is one of the workload's `httpPorts`.
    pub http: bool,
}

impl ConnInfo {
    pub fn src_ip(&self) -> Option<IpAddr> {
        self.src_addr.map(|a| a.ip().to_canonical())
    }
}

/// An L4 decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnVerdict {
    Allow,
    Deny {
        policy: Option<String>,
    },
    /// Depends on each request (HTTP ports only).
    PerRequest,
}

/// An L7 decision for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    Allow,
    Deny { policy: Option<String> },
}

/// One HTTP request, as far as policy looks at it.
#[derive(Clone, Copy)]
pub struct RequestAttrs<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: Option<&'a str>,
    /// Header fields (`when` `request.headers[...]`).
    pub headers: &'a dyn crate::policy::maps::RequestHeaders,
}

impl std::fmt::Debug for RequestAttrs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestAttrs")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// A policy snapshot.
pub trait Authorizer: Send + Sync + 'static {
    /// The connection-level decision.
    fn connection(&self, c: &ConnInfo) -> ConnVerdict;
    /// The decision for one request on a connection whose verdict was `PerRequest`.
    fn request(&self, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestVerdict;
    /// The generation it was read from (0: no policy).
    fn generation(&self) -> u32;
}

/// No policy loaded: everything is allowed.
#[derive(Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn connection(&self, _: &ConnInfo) -> ConnVerdict {
        ConnVerdict::Allow
    }

    fn request(&self, _: &ConnInfo, _: &RequestAttrs<'_>) -> RequestVerdict {
        RequestVerdict::Allow
    }

    fn generation(&self) -> u32 {
        0
    }
}

/// The current policy snapshot, and notification of new ones.
pub type Policies = watch::Receiver<Arc<dyn Authorizer>>;

/// A channel that only ever holds [`AllowAll`] (no policy configured).
pub fn allow_all() -> (watch::Sender<Arc<dyn Authorizer>>, Policies) {
    watch::channel(Arc::new(AllowAll) as Arc<dyn Authorizer>)
}

/// What enforcing at the destination needs: the policy snapshots, where denials are counted,
/// and which side decides (`inbound` over HBONE, `local` for same-node connections).
#[derive(Clone, Copy)]
pub struct Enforcer<'a> {
    pub policies: &'a Policies,
    pub metrics: &'a Metrics,
    pub side: DenialSide,
}

/// The connection decision under the current snapshot, logged and counted when it denies.
pub fn decide(e: Enforcer<'_>, c: &ConnInfo) -> ConnVerdict {
    let snapshot = Arc::clone(&e.policies.borrow());
    let verdict = snapshot.connection(c);
    if let ConnVerdict::Deny { policy } = &verdict {
        e.metrics.policy_denial(PolicyLayer::L4, e.side);
        warn!(
            layer = "l4",
            side = e.side.as_str(),
            src_identity = %c.src_identity,
            src_addr = c.src_addr.map(tracing::field::display),
            dst = %c.dst,
            dst_workload = %c.dst_name,
            port = c.dst.port(),
            policy = policy.as_deref().unwrap_or("-"),
            generation = snapshot.generation(),
            "connection denied"
        );
    }
    verdict
}

/// The request decision under the current snapshot, logged and counted when it denies.
pub fn decide_request(e: Enforcer<'_>, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestVerdict {
    let snapshot = Arc::clone(&e.policies.borrow());
    let verdict = snapshot.request(c, req);
    if let RequestVerdict::Deny { policy } = &verdict {
        e.metrics.policy_denial(PolicyLayer::L7, e.side);
        warn!(
            layer = "l7",
            side = e.side.as_str(),
            src_identity = %c.src_identity,
            dst = %c.dst,
            dst_workload = %c.dst_name,
            port = c.dst.port(),
            method = req.method,
            path = req.path,
            host = req.host.unwrap_or("-"),
            policy = policy.as_deref().unwrap_or("-"),
            generation = snapshot.generation(),
            "connection denied"
        );
    }
    verdict
}

/// How a supervised connection ended.
#[derive(Debug)]
pub enum Supervised<T> {
    /// The work finished by itself.
    Done(T),
    /// A new policy no longer allows the connection: the work was dropped (closing it).
    Revoked { policy: Option<String> },
}

/// Runs `work` (a connection) until it finishes, re-checking the connection against every new
/// policy snapshot; if one denies it, `work` is dropped — which closes the connection — and
/// the closure is logged.
pub async fn supervise<T>(
    mut policies: Policies,
    c: &ConnInfo,
    conn_id: u64,
    work: impl Future<Output = T>,
) -> Supervised<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Supervised::Done(out),
            changed = policies.changed() => {
                if changed.is_err() {
                    // The publisher is gone (shutdown): finish without further checks.
                    return Supervised::Done(work.await);
                }
                let snapshot = Arc::clone(&policies.borrow_and_update());
                if let ConnVerdict::Deny { policy } = snapshot.connection(c) {
                    info!(
                        conn_id,
                        src_identity = %c.src_identity,
                        dst = %c.dst,
                        dst_workload = %c.dst_name,
                        policy = policy.as_deref().unwrap_or("-"),
                        generation = snapshot.generation(),
                        "connection closed: no longer allowed"
                    );
                    return Supervised::Revoked { policy };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct DenyAll(u32);

    impl Authorizer for DenyAll {
        fn connection(&self, _: &ConnInfo) -> ConnVerdict {
            ConnVerdict::Deny {
                policy: Some("ns/deny".into()),
            }
        }
        fn request(&self, _: &ConnInfo, _: &RequestAttrs<'_>) -> RequestVerdict {
            RequestVerdict::Deny { policy: None }
        }
        fn generation(&self) -> u32 {
            self.0
        }
    }

    fn info() -> ConnInfo {
        ConnInfo {
            src_workload: Some(1),
            src_identity: SpiffeId::parse("spiffe://td/ns/default/sa/a").unwrap(),
            src_addr: Some("10.1.0.2:4000".parse().unwrap()),
            dst: "10.2.0.2:8080".parse().unwrap(),
            dst_workload: 2,
            dst_name: "default/b".into(),
            http: false,
        }
    }

    #[tokio::test]
    async fn a_new_denying_snapshot_closes_live_work() {
        let (tx, rx) = allow_all();
        let c = info();
        let work = tokio::time::sleep(Duration::from_secs(30));
        let flip = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(Arc::new(DenyAll(2))).unwrap();
        };
        let (out, ()) = tokio::join!(supervise(rx, &c, 1, work), flip);
        assert!(matches!(out, Supervised::Revoked { policy: Some(p) } if p == "ns/deny"));
    }

    #[tokio::test]
    async fn an_allowing_snapshot_leaves_work_alone() {
        let (tx, rx) = allow_all();
        let c = info();
        let work = async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            7
        };
        let flip = async {
            tx.send(Arc::new(AllowAll)).unwrap();
        };
        let (out, ()) = tokio::join!(supervise(rx, &c, 1, work), flip);
        assert!(matches!(out, Supervised::Done(7)));
        let metrics = Metrics::new();
        let enforcer = |policies| Enforcer {
            policies,
            metrics: &metrics,
            side: DenialSide::Inbound,
        };
        let (_allow_tx, allow) = allow_all();
        assert_eq!(decide(enforcer(&allow), &c), ConnVerdict::Allow);
        let (_tx, deny) = watch::channel(Arc::new(DenyAll(3)) as Arc<dyn Authorizer>);
        assert!(matches!(
            decide(enforcer(&deny), &c),
            ConnVerdict::Deny { .. }
        ));
        let req = RequestAttrs {
            method: "GET",
            path: "/",
            host: None,
            headers: &crate::policy::maps::NoHeaders,
        };
        assert!(matches!(
            decide_request(enforcer(&deny), &c, &req),
            RequestVerdict::Deny { .. }
        ));
        let text = metrics.render();
        for needle in [
            r#"mesh_policy_denials_total{layer="l4",side="inbound"} 1"#,
            r#"mesh_policy_denials_total{layer="l7",side="inbound"} 1"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
    }
}
