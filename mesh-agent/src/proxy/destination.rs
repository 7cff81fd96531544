//! The destination side of every connection, whichever way it arrived: an HBONE tunnel from
//! another node's agent ([`super::inbound`]) or a same-node connection
//! ([`super::outbound`]). Both call [`Destination::serve`] with the connection's facts; it
//! decides (L4, with the verified source), then either serves the connection request by
//! request (HTTP ports, [`super::l7`]) or connects to the pod and copies, under supervision
//! (a new policy generation that denies it closes it), and returns how it ended with the
//! bytes moved — counted live, so right on every outcome.

use std::{net::IpAddr, sync::Arc, time::Duration};

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    authz::{self, Enforcer, Supervised},
    connect_from,
    copy::{self, Counters, Far},
    hbone,
    l7::{self, normalize::PathNormalization},
    limits::{self, Admission},
    record::Outcome,
    SourceAddrs,
};
use crate::{
    metrics::{DenialSide, Direction, Metrics, Outcome as StreamOutcome, Side},
    policy::{ConnInfo, ConnVerdict, Policies, RequestAttrs},
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
    pub outcome: Outcome,
    /// HTTP requests seen and denied (served per request only).
    pub requests: Option<u64>,
    pub denied: Option<u64>,
    /// Bytes source → destination and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Refused before anything was carried (an HBONE stream was answered with an error
    /// status; a same-node connection is closed by its caller).
    pub refused: bool,
}

impl Served {
    fn refused(outcome: Outcome) -> Self {
        Self {
            outcome,
            requests: None,
            denied: None,
            bytes_sent: 0,
            bytes_received: 0,
            refused: true,
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
    ) -> Result<Served, Turned> {
        let enforcer = Enforcer {
            policies: &self.policies,
            metrics: &self.metrics,
            side: down.side(),
        };
        let decision = authz::decide(enforcer, info);
        let policy = match decision.verdict {
            ConnVerdict::Allow => None,
            ConnVerdict::PerRequest if info.http => None,
            ConnVerdict::Deny => Some(decision.policy),
            // Request-level rules on a port that is not HTTP: nothing can satisfy them.
            ConnVerdict::PerRequest => Some(None),
        };
        if let Some(policy) = policy {
            if let Downstream::Hbone(connect) = down {
                self.reject(connect, StatusCode::FORBIDDEN);
            }
            return Ok(Served::refused(Outcome::Denied { policy }));
        }
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
        if decision.verdict == ConnVerdict::PerRequest {
            // Boxed: the L7 state is large, and only L7 connections should pay for it.
            return Ok(Box::pin(self.serve_l7(down, enforcer, info, l7_source, conn_id)).await);
        }
        let mut upstream =
            match Box::pin(connect_from(&self.source, info.dst, self.connect_timeout)).await {
                Ok(s) => s,
                Err(e) => {
                    if let Downstream::Hbone(connect) = down {
                        self.reject(connect, StatusCode::SERVICE_UNAVAILABLE);
                    }
                    return Ok(Served {
                        refused: false,
                        ..Served::refused(Outcome::Failed(e.to_string()))
                    });
                }
            };
        let counts = Counters::default();
        let (copied, local) = match down {
            Downstream::Local(client) => {
                let copy = copy::bidirectional(client, Far::Tcp(&mut upstream), &counts);
                (self.supervised(info, conn_id, copy).await, true)
            }
            Downstream::Hbone(connect) => {
                let Some(tunnel) = self.answer(connect, conn_id) else {
                    return Ok(Served::refused(Outcome::Failed(
                        "answering CONNECT failed".to_owned(),
                    )));
                };
                let copy = copy::bidirectional(&mut upstream, Far::Tunnel(tunnel), &counts);
                (self.supervised(info, conn_id, copy).await, false)
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
        };
        Ok(Served {
            outcome,
            requests: None,
            denied: None,
            bytes_sent,
            bytes_received,
            refused: false,
        })
    }

    async fn supervised<T>(
        &self,
        info: &ConnInfo,
        conn_id: u64,
        work: impl std::future::Future<Output = T>,
    ) -> Supervised<T> {
        authz::supervise(self.policies.clone(), info, conn_id, work).await
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
        l7_source: IpAddr,
        conn_id: u64,
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
            authz::decide_request(enforcer, info, &attrs)
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
                self.supervised(info, conn_id, work).await
            }
            Downstream::Hbone(connect_req) => {
                let Some(tunnel) = self.answer(connect_req, conn_id) else {
                    return Served::refused(Outcome::Failed("answering CONNECT failed".to_owned()));
                };
                let client = hbone::TunnelStream::new(tunnel);
                let work = l7::serve_with_stats(client, connect, &decide, &limits, &mut stats);
                self.supervised(info, conn_id, work).await
            }
        };
        let outcome = match result {
            Supervised::Done(Ok(())) => Outcome::Ok,
            Supervised::Done(Err(e)) => Outcome::Failed(e.to_string()),
            Supervised::Revoked { .. } => Outcome::Revoked,
        };
        Served {
            outcome,
            requests: Some(stats.requests),
            denied: Some(stats.denied),
            bytes_sent: stats.bytes_in,
            bytes_received: stats.bytes_out,
            refused: false,
        }
    }
}
