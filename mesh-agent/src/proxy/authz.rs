//! Enforcement at the destination: the policy engine's decisions ([`crate::policy`]) logged
//! and counted when they deny, and live connections re-checked against every new generation
//! and closed if no longer allowed ([`supervise`]).

use std::{future::Future, sync::Arc};

use tracing::{info, warn};

use crate::{
    metrics::{DenialSide, Metrics, PolicyLayer},
    policy::{
        Authorizer, ConnDecision, ConnInfo, ConnVerdict, Policies, RequestAttrs, RequestVerdict,
    },
};

/// What enforcing at the destination needs: the policy snapshots, where denials are counted,
/// and which side decides (`inbound` over HBONE, `local` for same-node connections).
#[derive(Clone, Copy)]
pub struct Enforcer<'a> {
    pub policies: &'a Policies,
    pub metrics: &'a Metrics,
    pub side: DenialSide,
}

/// The connection decision under the current generation, logged and counted when it denies.
pub fn decide(e: Enforcer<'_>, c: &ConnInfo) -> ConnDecision {
    let snapshot = Arc::clone(&e.policies.borrow());
    let d = snapshot.connection(c);
    if d.verdict == ConnVerdict::Deny {
        let policy = &d.policy;
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
    d
}

/// The request decision under the current generation, logged and counted when it denies.
pub fn decide_request(e: Enforcer<'_>, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestVerdict {
    let snapshot = Arc::clone(&e.policies.borrow());
    let d = snapshot.request(c, req);
    if d.verdict == RequestVerdict::Deny {
        let policy = &d.policy;
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
    d.verdict
}

/// How a supervised connection ended.
#[derive(Debug)]
pub enum Supervised<T> {
    /// The work finished by itself.
    Done(T),
    /// A new policy no longer allows the connection: the work was dropped (closing it).
    Revoked { policy: Option<std::sync::Arc<str>> },
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
                let d = snapshot.connection(c);
                if d.verdict == ConnVerdict::Deny {
                    let policy = d.policy;
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
    use crate::{
        identity::SpiffeId,
        policy::{allow_all, PolicyView},
    };
    use std::time::Duration;
    use tokio::sync::watch;

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
            tx.send(Arc::new(PolicyView::deny_all(2))).unwrap();
        };
        let (out, ()) = tokio::join!(supervise(rx, &c, 1, work), flip);
        assert!(matches!(out, Supervised::Revoked { policy: None }));
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
            tx.send(Arc::new(PolicyView::default())).unwrap();
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
        assert_eq!(decide(enforcer(&allow), &c).verdict, ConnVerdict::Allow);
        let (_tx, deny) = watch::channel(Arc::new(PolicyView::deny_all(3)));
        assert_eq!(decide(enforcer(&deny), &c).verdict, ConnVerdict::Deny);
        let req = RequestAttrs {
            method: "GET",
            path: "/",
            host: None,
            headers: &crate::policy::engine::NoHeaders,
        };
        assert_eq!(
            decide_request(enforcer(&deny), &c, &req),
            RequestVerdict::Deny
        );
        let text = metrics.render();
        for needle in [
            r#"mesh_policy_denials_total{layer="l4",side="inbound"} 1"#,
            r#"mesh_policy_denials_total{layer="l7",side="inbound"} 1"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
    }
}
