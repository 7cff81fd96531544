//! The destination side of every connection, whichever way it arrived: an HBONE tunnel from
//! another node's agent ([`super::inbound`]) or a same-node connection
//! ([`super::outbound`]). Both call [`Destination::serve`] with the connection's facts; it
//! decides (L4, with the verified source), then either serves the connection request by
//! request (HTTP ports, [`super::l7`]) or connects to the pod and copies, under supervision
//! (a new policy generation that denies it closes it), and returns how it ended with the
//! bytes moved — counted live, so right on every outcome. Denials are logged and counted
//! here (`connection denied`, `mesh_policy_denials_total`).

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{
    connect_from,
    copy::{self, Counters, Far},
    hbone,
    l7::{self, normalize::PathNormalization},
    limits::{self, Admission},
    record::{Carried, Outcome},
    SourceAddrs,
};
use crate::{
    audit::{AuditLog, ConnectionFields, Layer, Verdict},
    metrics::{DenialSide, Direction, Metrics, Outcome as StreamOutcome, PolicyLayer, Side},
    policy::{
        Authorizer, ConnDecision, ConnInfo, ConnVerdict, Policies, RequestAttrs, RequestVerdict,
    },
    state::live::Closed,
};

/// What the destination side needs (shared by both proxies).
#[derive(Clone)]
pub struct Destination {
    pub policies: Policies,
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    /// The node's mesh source addresses (upstream sockets bind them).
    pub source: SourceAddrs,
    /// How long the pod may take to accept.
    pub connect_timeout: Duration,
    /// How request paths on HTTP ports are normalized before L7 policy and forwarding.
    pub path_normalization: PathNormalization,
    /// Where decisions are recorded (`None`: not recorded, in tests).
    pub audit: Option<AuditLog>,
}

/// The client side of a connection at its destination.
pub enum Downstream<'a> {
    /// A same-node connection: the captured socket itself.
    Local(&'a mut TcpStream),
    /// An HBONE CONNECT, not answered yet (refused with a status, or accepted as a tunnel).
    Hbone(hbone::ConnectRequest),
}

impl Downstream<'_> {
    fn side(&self) -> DenialSide {
        match self {
            Self::Local(_) => DenialSide::Local,
            Self::Hbone(_) => DenialSide::Inbound,
        }
    }

    fn proxy(&self) -> Direction {
        match self {
            Self::Local(_) => Direction::Outbound,
            Self::Hbone(_) => Direction::Inbound,
        }
    }
}

/// How a connection went at its destination.
#[derive(Debug)]
pub struct Served {
    pub carried: Carried,
    /// Refused before anything was carried (an HBONE stream was answered with an error
    /// status; a same-node connection is closed by its caller).
    pub refused: bool,
}

impl Served {
    fn refused(outcome: Outcome) -> Self {
        Self {
            carried: Carried::nothing(outcome),
            refused: true,
        }
    }

    fn carried(carried: Carried) -> Self {
        Self {
            carried,
            refused: false,
        }
    }
}

/// Why a destination connection was turned away before being served.
#[derive(Debug)]
pub enum Turned {
    /// Over the connection budget (counted and logged by the limits): no record.
    OverLimit(limits::Refused),
}

impl Destination {
    /// Serves one connection at its destination: decide → L7 or connect → copy under
    /// supervision. `l7_source` is the address whose share of pending request heads the
    /// connection takes.
    pub async fn serve(
        &self,
        down: Downstream<'_>,
        info: &ConnInfo,
        l7_source: IpAddr,
        conn_id: u64,
        closed: Closed,
    ) -> Result<Served, Turned> {
        let enforcer = Enforcer {
            policies: &self.policies,
            metrics: &self.metrics,
            side: down.side(),
            audit: self.audit.as_ref(),
        };
        if enforcer.audit_down() {
            if let Downstream::Hbone(connect) = down {
                self.reject(connect, StatusCode::SERVICE_UNAVAILABLE);
            }
            return Ok(Served::refused(Outcome::Refused(
                "the audit log is unavailable (--audit-fail-closed)".to_owned(),
            )));
        }
        let decision = decide(enforcer, info);
        let policy = match decision.verdict {
            ConnVerdict::Allow => None,
            ConnVerdict::PerRequest if info.http => None,
            ConnVerdict::Deny => Some(decision.policy.clone()),
            // Request-level rules on a port that is not HTTP: nothing can satisfy them.
            ConnVerdict::PerRequest => Some(None),
        };
        if let Some(policy) = policy {
            if let Downstream::Hbone(connect) = down {
                self.reject(connect, StatusCode::FORBIDDEN);
            }
            return Ok(Served::refused(Outcome::Denied { policy }));
        }
        let served = self
            .serve_allowed(
                down,
                enforcer,
                info,
                decision.verdict,
                (l7_source, conn_id),
                closed,
            )
            .await?;
        // Boxed: the record (and, fail closed, the wait for room in the queue) is paid at the
        // end only, not carried in the state of every live connection.
        Box::pin(enforcer.record_served(info, &decision, &served.carried)).await;
        Ok(served)
    }

    /// Serves a connection the policy allows (whole, or request by request).
    async fn serve_allowed(
        &self,
        down: Downstream<'_>,
        enforcer: Enforcer<'_>,
        info: &ConnInfo,
        verdict: ConnVerdict,
        (l7_source, conn_id): (IpAddr, u64),
        closed: Closed,
    ) -> Result<Served, Turned> {
        // A same-node pod connection this agent opens is a descriptor of the budget too (an
        // HBONE tunnel took its slot when it was accepted).
        let _upstream_slot = match &down {
            Downstream::Local(_) => Some(
                self.admission
                    .admit(Direction::Outbound, info.dst)
                    .map_err(Turned::OverLimit)?,
            ),
            Downstream::Hbone(_) => None,
        };
        let _active =
            matches!(down, Downstream::Hbone(_)).then(|| self.metrics.active(Direction::Inbound));
        if verdict == ConnVerdict::PerRequest {
            // Boxed: the L7 state is large, and only L7 connections should pay for it.
            return Ok(
                Box::pin(self.serve_l7(down, enforcer, info, (l7_source, conn_id), closed)).await,
            );
        }
        let mut upstream =
            match Box::pin(connect_from(&self.source, info.dst, self.connect_timeout)).await {
                Ok(s) => s,
                Err(e) => {
                    if let Downstream::Hbone(connect) = down {
                        self.reject(connect, StatusCode::SERVICE_UNAVAILABLE);
                    }
                    return Ok(Served::carried(Carried::nothing(Outcome::Failed(
                        e.to_string(),
                    ))));
                }
            };
        let counts = Counters::default();
        let (copied, local) = match down {
            Downstream::Local(client) => {
                let copy = copy::bidirectional(client, Far::Tcp(&mut upstream), &counts);
                (self.supervised(info, conn_id, closed, copy).await, true)
            }
            Downstream::Hbone(connect) => {
                let Some(tunnel) = self.answer(connect, conn_id) else {
                    return Ok(Served::refused(Outcome::Failed(
                        "answering CONNECT failed".to_owned(),
                    )));
                };
                let copy = copy::bidirectional(&mut upstream, Far::Tunnel(tunnel), &counts);
                (self.supervised(info, conn_id, closed, copy).await, false)
            }
        };
        // Local: `near` is the client; HBONE: `near` is the pod.
        let (bytes_sent, bytes_received) = if local {
            (counts.sent(), counts.received())
        } else {
            (counts.received(), counts.sent())
        };
        let outcome = match copied {
            Supervised::Done(Ok(())) => Outcome::Ok,
            Supervised::Done(Err(e)) if local => {
                // A reset mid-stream is an ordinary end for a same-node TCP flow.
                debug!(conn_id, error = %e, "copy ended with error");
                Outcome::Ok
            }
            Supervised::Done(Err(e)) => Outcome::Failed(e.to_string()),
            Supervised::Revoked { .. } => Outcome::Revoked,
            Supervised::Removed => Outcome::Removed,
        };
        Ok(Served::carried(Carried {
            bytes_sent,
            bytes_received,
            ..Carried::nothing(outcome)
        }))
    }

    async fn supervised<T>(
        &self,
        info: &ConnInfo,
        conn_id: u64,
        closed: Closed,
        work: impl Future<Output = T>,
    ) -> Supervised<T> {
        supervise(self.policies.clone(), info, conn_id, closed, work).await
    }

    fn reject(&self, connect: hbone::ConnectRequest, status: StatusCode) {
        self.metrics
            .hbone_stream(Side::Server, StreamOutcome::Error);
        hbone::reject(connect.respond, status);
    }

    /// Answers an HBONE CONNECT with 200: the tunnel.
    fn answer(&self, connect: hbone::ConnectRequest, conn_id: u64) -> Option<hbone::Tunnel> {
        match hbone::accept(connect) {
            Ok(t) => {
                self.metrics.hbone_stream(Side::Server, StreamOutcome::Ok);
                Some(t)
            }
            Err(e) => {
                self.metrics
                    .hbone_stream(Side::Server, StreamOutcome::Error);
                debug!(conn_id, error = %e, "answering CONNECT failed");
                None
            }
        }
    }

    /// Serves the connection request by request, authorizing each against the generation
    /// current at that request (a policy change applies to the next request), and forwards
    /// allowed requests to the pod (connected lazily, from the node's mesh address). The
    /// connection as a whole stays under supervision: a generation that denies it closes it.
    async fn serve_l7(
        &self,
        down: Downstream<'_>,
        enforcer: Enforcer<'_>,
        info: &ConnInfo,
        (l7_source, conn_id): (IpAddr, u64),
        closed: Closed,
    ) -> Served {
        let proxy = down.proxy();
        let limits = l7::L7Limits {
            header_timeout: self.admission.limits().head_timeout,
            head_gate: Some(self.admission.head_gate(proxy, l7_source)),
            path_normalization: self.path_normalization,
            ..l7::L7Limits::default()
        };
        let decide = |req: &l7::RequestView<'_>| {
            // The normalized path (no query), the authority the pod routes by.
            let attrs = RequestAttrs {
                method: req.method,
                path: req.path,
                host: req.host,
                headers: &req.headers,
            };
            decide_request(enforcer, info, &attrs)
        };
        let (source, dst, limit) = (self.source, info.dst, self.connect_timeout);
        let connect = move || async move {
            connect_from(&source, dst, limit)
                .await
                .map_err(std::io::Error::other)
        };
        let mut stats = l7::L7Stats::default();
        let result = match down {
            Downstream::Local(client) => {
                let work = l7::serve_with_stats(client, connect, &decide, &limits, &mut stats);
                self.supervised(info, conn_id, closed, work).await
            }
            Downstream::Hbone(connect_req) => {
                let Some(tunnel) = self.answer(connect_req, conn_id) else {
                    return Served::refused(Outcome::Failed("answering CONNECT failed".to_owned()));
                };
                let client = hbone::TunnelStream::new(tunnel);
                let work = l7::serve_with_stats(client, connect, &decide, &limits, &mut stats);
                self.supervised(info, conn_id, closed, work).await
            }
        };
        let outcome = match result {
            Supervised::Done(Ok(())) => Outcome::Ok,
            Supervised::Done(Err(e)) => Outcome::Failed(e.to_string()),
            Supervised::Revoked { .. } => Outcome::Revoked,
            Supervised::Removed => Outcome::Removed,
        };
        Served::carried(Carried {
            outcome,
            requests: Some(stats.requests),
            denied: Some(stats.denied),
            bytes_sent: stats.bytes_in,
            bytes_received: stats.bytes_out,
        })
    }
}

/// What enforcing at the destination needs: the policy snapshots, where denials are counted
/// and recorded, and which side decides (`inbound` over HBONE, `local` for same-node
/// connections).
#[derive(Clone, Copy)]
pub struct Enforcer<'a> {
    pub policies: &'a Policies,
    pub metrics: &'a Metrics,
    pub side: DenialSide,
    pub audit: Option<&'a AuditLog>,
}

impl Enforcer<'_> {
    /// Counts and logs a denial: the connection (`req` none, layer l4) or one request (l7).
    fn denied(&self, c: &ConnInfo, req: Option<&RequestAttrs<'_>>, policy: Option<&str>, gen: u32) {
        let layer = if req.is_some() {
            PolicyLayer::L7
        } else {
            PolicyLayer::L4
        };
        self.metrics.policy_denial(layer, self.side);
        warn!(
            layer = if req.is_some() { "l7" } else { "l4" },
            side = self.side.as_str(),
            src_identity = %c.src_identity,
            src_addr = c.src_addr.map(tracing::field::display),
            dst = %c.dst,
            dst_workload = %c.dst_name,
            port = c.dst.port(),
            method = req.map(|r| r.method),
            path = req.map(|r| r.path),
            host = req.map(|r| r.host.unwrap_or("-")),
            policy = policy.unwrap_or("-"),
            generation = gen,
            "connection denied"
        );
    }

    /// The audit log must record every decision (`--audit-fail-closed`) and cannot: nothing
    /// is served.
    fn audit_down(&self) -> bool {
        self.audit
            .is_some_and(|a| a.fail_closed() && !a.available())
    }

    /// Records one decision without waiting. `false`: the log must record every decision
    /// (`--audit-fail-closed`) and could not take this one — the caller denies.
    fn record(&self, c: &ConnInfo, fields: ConnectionFields) -> bool {
        let Some(audit) = self.audit else {
            return true;
        };
        if audit.try_record(connection_entry(c, fields)).is_ok() {
            return true;
        }
        warn!(dst = %c.dst, src_identity = %c.src_identity,
              "decision refused: the audit log cannot record it (--audit-fail-closed)");
        false
    }
}

impl Enforcer<'_> {
    /// The one audit record of an allowed connection, when it ends: how it went, the bytes,
    /// the requests served and denied (each denial was recorded when decided). Fail closed,
    /// it waits for room in the queue rather than drop the record.
    async fn record_served(&self, c: &ConnInfo, d: &ConnDecision, carried: &Carried) {
        let Some(audit) = self.audit else {
            return;
        };
        let verdict = match carried.outcome {
            Outcome::Revoked => Verdict::Deny,
            _ => Verdict::Allow,
        };
        let fields = ConnectionFields {
            layer: Some(if carried.requests.is_some() {
                Layer::L7
            } else {
                Layer::L4
            }),
            verdict: Some(verdict),
            policy: d.policy.as_ref().map(|p| p.to_string()),
            generation: Some(u64::from(d.generation)),
            outcome: Some(carried.outcome.to_string()),
            bytes_sent: Some(carried.bytes_sent),
            bytes_received: Some(carried.bytes_received),
            requests_allowed: carried
                .requests
                .map(|r| r.saturating_sub(carried.denied.unwrap_or(0))),
            requests_denied: carried.denied,
            ..ConnectionFields::default()
        };
        if audit.record(connection_entry(c, fields)).await.is_err() {
            warn!(dst = %c.dst, src_identity = %c.src_identity,
                  "connection record lost: the audit log is unavailable");
        }
    }
}

/// The audit record of a connection decision, with the connection's facts.
fn connection_entry(c: &ConnInfo, fields: ConnectionFields) -> crate::audit::Entry {
    ConnectionFields {
        src_identity: Some(c.src_identity.to_string()),
        dst_workload: Some(c.dst_name.clone()),
        src_addr: c.src_addr,
        dst_addr: Some(c.dst),
        ..fields
    }
    .entry(crate::audit::Kind::Connection)
}

impl Enforcer<'_> {
    /// Records one decision: the denial, or the dry-run denial and AUDIT matches of what was
    /// allowed (an allowed connection is recorded once, when it ends, with its counts), each as
    /// `base` with its verdict and policy. `false`: one could not be recorded under
    /// `--audit-fail-closed` — the caller denies.
    fn record_decision(
        &self,
        c: &ConnInfo,
        denied: bool,
        policy: Option<&Arc<str>>,
        dry_run_deny: Option<&Option<Arc<str>>>,
        audits: &[Arc<str>],
        base: impl Fn() -> ConnectionFields,
    ) -> bool {
        if self.audit.is_none() || (!denied && dry_run_deny.is_none() && audits.is_empty()) {
            return true;
        }
        let name = |p: Option<&Arc<str>>| p.map(|p| p.to_string());
        let mut records = Vec::new();
        if denied {
            records.push((Verdict::Deny, name(policy)));
        } else {
            if let Some(would) = dry_run_deny {
                records.push((Verdict::DryRunDeny, name(would.as_ref())));
            }
            records.extend(audits.iter().map(|a| (Verdict::Audit, Some(a.to_string()))));
        }
        records.into_iter().all(|(verdict, policy)| {
            self.record(
                c,
                ConnectionFields {
                    verdict: Some(verdict),
                    policy,
                    ..base()
                },
            )
        })
    }
}

/// The connection decision under the current generation, logged and counted when it denies.
pub fn decide(e: Enforcer<'_>, c: &ConnInfo) -> ConnDecision {
    let snapshot = Arc::clone(&e.policies.borrow());
    let mut d = snapshot.connection(c);
    // Request-level rules on a port that is not HTTP deny too (see `serve`).
    let denied =
        d.verdict == ConnVerdict::Deny || (d.verdict == ConnVerdict::PerRequest && !c.http);
    let l4 = d.l4.as_ref().filter(|_| !d.per_request);
    let audits: Vec<Arc<str>> = l4.and_then(|l| l.audit.clone()).into_iter().collect();
    let generation = d.generation;
    let base = || ConnectionFields {
        layer: Some(Layer::L4),
        generation: Some(u64::from(generation)),
        ..ConnectionFields::default()
    };
    let dry_run = l4.and_then(|l| l.dry_run_deny.as_ref());
    if !e.record_decision(c, denied, d.policy.as_ref(), dry_run, &audits, base) {
        d.verdict = ConnVerdict::Deny;
    }
    if d.verdict == ConnVerdict::Deny {
        e.denied(c, None, d.policy.as_deref(), snapshot.generation());
    }
    d
}

/// The request decision under the current generation, logged and counted when it denies.
pub fn decide_request(e: Enforcer<'_>, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestVerdict {
    let snapshot = Arc::clone(&e.policies.borrow());
    let mut d = snapshot.request(c, req);
    if e.audit_down() {
        return RequestVerdict::Deny;
    }
    let base = || ConnectionFields {
        layer: Some(Layer::L7),
        generation: Some(u64::from(snapshot.generation())),
        method: Some(req.method.to_owned()),
        path: Some(req.path.to_owned()),
        host: req.host.map(str::to_owned),
        ..ConnectionFields::default()
    };
    let denied = d.verdict == RequestVerdict::Deny;
    if !e.record_decision(
        c,
        denied,
        d.policy.as_ref(),
        d.dry_run_deny.as_ref(),
        &d.audit,
        base,
    ) {
        d.verdict = RequestVerdict::Deny;
    }
    if d.verdict == RequestVerdict::Deny {
        e.denied(c, Some(req), d.policy.as_deref(), snapshot.generation());
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
    /// The workload left the mesh state (or its identity or addresses changed): the work was
    /// dropped.
    Removed,
}

/// Runs `work` (a connection) until it finishes, re-checking the connection against every new
/// policy snapshot; if one denies it, `work` is dropped — which closes the connection — and
/// the closure is logged.
pub async fn supervise<T>(
    mut policies: Policies,
    c: &ConnInfo,
    conn_id: u64,
    closed: Closed,
    work: impl Future<Output = T>,
) -> Supervised<T> {
    tokio::pin!(work);
    let closed = closed.wait();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            out = &mut work => return Supervised::Done(out),
            () = &mut closed => {
                info!(
                    conn_id,
                    src_identity = %c.src_identity,
                    dst = %c.dst,
                    dst_workload = %c.dst_name,
                    "connection closed: workload removed from the mesh state"
                );
                return Supervised::Removed;
            }
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
        metrics::Metrics,
        policy::{allow_all, PolicyView},
        tls::SpiffeId,
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
        let (out, ()) = tokio::join!(supervise(rx, &c, 1, Closed::never(), work), flip);
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
        let (out, ()) = tokio::join!(supervise(rx, &c, 1, Closed::never(), work), flip);
        assert!(matches!(out, Supervised::Done(7)));
        let metrics = Metrics::new();
        let enforcer = |policies| Enforcer {
            policies,
            metrics: &metrics,
            side: DenialSide::Inbound,
            audit: None,
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
