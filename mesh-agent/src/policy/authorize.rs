//! The proxies' view of a policy generation: each [`PolicyView`] read back from the pinned
//! maps becomes an [`Authorizer`] snapshot. Connection decisions are the kernel's L4 decision
//! re-made with the verified source; request decisions finish what the kernel cannot decide.
//! Dry-run denials and AUDIT matches are logged here (`dry-run deny`, `audit`); enforced
//! denials are logged by the proxies (`connection denied`).

use std::{net::IpAddr, sync::Arc};

use tokio::sync::watch;
use tracing::info;

use super::maps::{Family, L4Decision, L4Verdict, PolicyView, RequestDecision, RequestFacts};
use crate::proxy::authz::{
    Authorizer, ConnInfo, ConnVerdict, Policies, RequestAttrs, RequestVerdict,
};

/// One generation, as the proxies ask it.
pub struct Snapshot {
    view: Arc<PolicyView>,
}

impl Snapshot {
    pub fn new(view: Arc<PolicyView>) -> Self {
        Self { view }
    }

    fn family(c: &ConnInfo) -> Family {
        match c.src_ip().unwrap_or(c.dst.ip().to_canonical()) {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `(set, class)` for a connection with a known source, `None` without any policy.
    fn key(&self, c: &ConnInfo) -> Option<(u32, u32)> {
        let src = c.src_workload?;
        self.view
            .decide_l4(src, c.dst_workload, Self::family(c), c.dst.port())
            .key
    }
}

fn name(p: &Option<Arc<str>>) -> &str {
    p.as_deref().unwrap_or("-")
}

/// A connection decision with what the view found: the verdict the proxies act on and the
/// L4 decision behind it (`None`: the source is not a known workload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnExplained {
    pub verdict: ConnVerdict,
    pub l4: Option<L4Decision>,
    /// The connection is served request by request (an HTTP port it is allowed on): dry-run
    /// and AUDIT results come from each request, not from `l4`.
    pub per_request: bool,
}

/// A request decision with what the view found (`None`: no L4 key, see [`Snapshot::request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestExplained {
    pub verdict: RequestVerdict,
    pub decision: Option<RequestDecision>,
}

impl Snapshot {
    /// The connection decision of [`Authorizer::connection`], with its details (used by the
    /// proxies through the trait, and by `mesh-agent policy check`).
    pub fn explain_connection(&self, c: &ConnInfo) -> ConnExplained {
        let Some(src) = c.src_workload else {
            // The source is not a known workload of the verified identity (no or a foreign
            // `Forwarded` claim): only a destination without policy accepts it.
            let verdict = match self.view.dst_set(c.dst_workload) {
                None if c.http => ConnVerdict::PerRequest,
                None => ConnVerdict::Allow,
                Some(_) => ConnVerdict::Deny { policy: None },
            };
            return ConnExplained {
                per_request: verdict == ConnVerdict::PerRequest,
                verdict,
                l4: None,
            };
        };
        let d = self
            .view
            .decide_l4(src, c.dst_workload, Self::family(c), c.dst.port());
        // A declared HTTP port speaks HTTP/1.1 or h2c only, whatever the policy (registry
        // `httpPorts`: other bytes are refused): an allowed connection there is still served
        // request by request, so non-HTTP bytes never reach the pod.
        let per_request = c.http && d.verdict != L4Verdict::Deny;
        let verdict = match d.verdict {
            L4Verdict::Deny => ConnVerdict::Deny {
                policy: d.policy.as_ref().map(|p| p.to_string()),
            },
            L4Verdict::PerRequest => ConnVerdict::PerRequest,
            L4Verdict::Allow if per_request => ConnVerdict::PerRequest,
            L4Verdict::Allow => ConnVerdict::Allow,
        };
        ConnExplained {
            verdict,
            l4: Some(d),
            per_request,
        }
    }

    /// The request decision of [`Authorizer::request`], with its details.
    pub fn explain_request(&self, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestExplained {
        let Some((set, class)) = self.key(c) else {
            let verdict = match self.view.dst_set(c.dst_workload) {
                None => RequestVerdict::Allow,
                Some(_) => RequestVerdict::Deny { policy: None },
            };
            return RequestExplained {
                verdict,
                decision: None,
            };
        };
        let r = self.view.decide_request_with(
            set,
            class,
            c.dst.port(),
            &RequestFacts {
                method: req.method,
                path: req.path,
                host: req.host.unwrap_or(""),
                headers: req.headers,
            },
        );
        let verdict = if r.allowed {
            RequestVerdict::Allow
        } else {
            RequestVerdict::Deny {
                policy: r.policy.as_ref().map(|p| p.to_string()),
            }
        };
        RequestExplained {
            verdict,
            decision: Some(r),
        }
    }

    /// The view this snapshot decides with.
    pub fn view(&self) -> &PolicyView {
        &self.view
    }
}

impl Authorizer for Snapshot {
    fn connection(&self, c: &ConnInfo) -> ConnVerdict {
        let e = self.explain_connection(c);
        if let (Some(d), false) = (&e.l4, e.per_request) {
            if let Some(would) = &d.dry_run_deny {
                info!(layer = "l4", src_identity = %c.src_identity, dst = %c.dst,
                      dst_workload = %c.dst_name, policy = name(would),
                      generation = self.view.generation(), "dry-run deny");
            }
            if let Some(audit) = &d.audit {
                info!(layer = "l4", src_identity = %c.src_identity, dst = %c.dst,
                      dst_workload = %c.dst_name, policy = &**audit,
                      generation = self.view.generation(), "audit");
            }
        }
        e.verdict
    }

    fn request(&self, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestVerdict {
        let e = self.explain_request(c, req);
        if let Some(r) = &e.decision {
            if let Some(would) = &r.dry_run_deny {
                info!(layer = "l7", src_identity = %c.src_identity, dst = %c.dst,
                      dst_workload = %c.dst_name, method = req.method, path = req.path,
                      policy = name(would), generation = self.view.generation(), "dry-run deny");
            }
            for audit in &r.audit {
                info!(layer = "l7", src_identity = %c.src_identity, dst = %c.dst,
                      dst_workload = %c.dst_name, method = req.method, path = req.path,
                      allowed = r.allowed, policy = &**audit,
                      generation = self.view.generation(), "audit");
            }
        }
        e.verdict
    }

    fn generation(&self) -> u32 {
        self.view.generation()
    }
}

/// Republishes every policy generation the watcher reads as an [`Authorizer`] snapshot, until
/// `stop`.
pub fn bridge(
    mut views: watch::Receiver<Arc<PolicyView>>,
    mut stop: watch::Receiver<bool>,
) -> Policies {
    let first = Arc::clone(&views.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(Snapshot::new(first)) as Arc<dyn Authorizer>);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let view = Arc::clone(&views.borrow_and_update());
                    let _ = tx.send(Arc::new(Snapshot::new(view)) as Arc<dyn Authorizer>);
                }
                _ = stop.changed() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::SpiffeId;

    fn conn(src_workload: Option<u32>, http: bool) -> ConnInfo {
        ConnInfo {
            src_workload,
            src_identity: SpiffeId::parse("spiffe://td/ns/default/sa/a").unwrap(),
            src_addr: Some("10.1.0.2:4000".parse().unwrap()),
            dst: "10.2.0.2:8080".parse().unwrap(),
            dst_workload: 2,
            dst_name: "default/b".into(),
            http,
        }
    }

    #[test]
    fn http_ports_are_served_per_request_even_without_policy() {
        let s = Snapshot::new(Arc::new(PolicyView::default()));
        for src in [Some(1), None] {
            assert_eq!(s.connection(&conn(src, true)), ConnVerdict::PerRequest);
            assert_eq!(s.connection(&conn(src, false)), ConnVerdict::Allow);
            let req = RequestAttrs {
                method: "GET",
                path: "/",
                host: None,
                headers: &crate::policy::maps::NoHeaders,
            };
            assert_eq!(s.request(&conn(src, true), &req), RequestVerdict::Allow);
        }
    }
}
