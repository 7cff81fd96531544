//! Inbound: HBONE from other node agents. Each connection is TLS 1.3 with a verified client
//! workload certificate (the identity layer's server config); the server certificate is the
//! destination workload's, chosen by SNI. Each HTTP/2 `CONNECT` stream is checked — its
//! `:authority` must be an address of the local workload whose certificate was presented —
//! and carried to that pod from the node's mesh source address.
//!
//! Every refusal (handshake, preface, frame, request) is logged as `hbone rejected` with the
//! peer and a reason, and costs nothing beyond its own connection: handshakes and connections
//! are bounded, every phase has a timeout. When the revocation list changes, connections
//! whose client certificate is now revoked are closed with all their tunnels.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Request, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    destination::{Destination, Downstream, Turned},
    hbone::{self, BadRequest},
    limits::{self, Accepted, Admission, Guard, SourceKey},
    listen,
    record::{self, ConnRecord, RecordKind, Transport},
    Identities, ProxyDeps,
};
use crate::{
    metrics::{Direction, Metrics, Outcome, Side},
    policy::ConnInfo,
    registry::Registry,
    state::live::MeshHandle,
    tls::{
        server_name_for,
        verify::{peer_identity, peer_serial},
        SpiffeId,
    },
};

/// Inbound tunables.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// TLS handshake and HTTP/2 preface/settings exchange, each.
    pub handshake_timeout: Duration,
    /// Connecting to the local pod.
    pub connect_timeout: Duration,
    /// How long in-flight tunnels may drain on shutdown.
    pub drain_timeout: Duration,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// The inbound proxy.
pub struct Inbound {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

struct Ctx {
    node: String,
    mesh: MeshHandle,
    identities: Arc<dyn Identities>,
    metrics: Arc<Metrics>,
    /// The destination side of each tunnel.
    dest: Destination,
    cfg: InboundConfig,
    /// Tunnel (stream) ids.
    next_id: AtomicU64,
    /// HBONE connection ids.
    next_conn: AtomicU64,
    /// One budget with the outbound proxy: HBONE connections and tunnels each take a slot.
    admission: Arc<Admission>,
}

/// Why a stream was refused (the reason logged and the status answered).
#[derive(Debug, thiserror::Error)]
enum StreamRefusal {
    #[error(transparent)]
    Malformed(#[from] BadRequest),
    #[error("{dst} is not a workload on this node")]
    NotLocal { dst: SocketAddr },
    #[error(
        "{dst} belongs to {workload}, whose identity is not {served} (the certificate presented)"
    )]
    WrongWorkload {
        dst: SocketAddr,
        workload: String,
        served: SpiffeId,
    },
    #[error("denied by policy {}", policy.as_deref().unwrap_or("(no ALLOW policy matched)"))]
    Policy { policy: Option<String> },
}

impl StreamRefusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(b) => b.status(),
            Self::NotLocal { .. } => StatusCode::BAD_REQUEST,
            Self::WrongWorkload { .. } | Self::Policy { .. } => StatusCode::FORBIDDEN,
        }
    }
}

impl Inbound {
    /// `listener` is already bound (before anything is attached).
    pub fn new(listener: TcpListener, deps: ProxyDeps, cfg: InboundConfig) -> Self {
        let dest = deps.destination(cfg.connect_timeout);
        let ProxyDeps {
            node,
            mesh,
            identities,
            metrics,
            admission,
            ..
        } = deps;
        Self {
            listener,
            ctx: Arc::new(Ctx {
                node,
                mesh,
                identities,
                dest,
                metrics,
                cfg,
                next_id: AtomicU64::new(1),
                next_conn: AtomicU64::new(1),
                admission,
            }),
        }
    }

    /// Serves until `shutdown` turns true, then lets tunnels drain for `drain_timeout`.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let admission = Arc::clone(&self.ctx.admission);
        let listeners = [self.listener];
        let stop = shutdown.clone();
        let ctx = self.ctx;
        listen::accept_loop(
            || limits::accept(&listeners, &admission, Direction::Inbound),
            shutdown,
            ctx.cfg.drain_timeout,
            "hbone connections",
            |accepted| match accepted {
                Accepted::Admitted(stream, peer, slot) => {
                    // Before TLS: a peer address past its share costs no handshake.
                    let key = SourceKey::Peer(peer.ip());
                    let Ok(source_slot) = admission.admit_source(Direction::Inbound, key, peer)
                    else {
                        limits::reset(stream);
                        return None;
                    };
                    let ctx = Arc::clone(&ctx);
                    let stop = stop.clone();
                    Some(async move {
                        let _slots = (slot, source_slot);
                        ctx.connection(stream, peer, stop).await;
                    })
                }
                Accepted::Refused(stream, _) => {
                    limits::reset(stream);
                    None
                }
            },
        )
        .await;
    }
}

impl Ctx {
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(self.identities.server_config());
        let tls = match timeout(self.cfg.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.metrics.tls_handshake(Side::Server, Outcome::Error);
                warn!(%peer, reason = %format!("TLS handshake: {e}"), "hbone rejected");
                return;
            }
            Err(_) => {
                self.metrics.tls_handshake(Side::Server, Outcome::Error);
                warn!(%peer, reason = "TLS handshake timed out", "hbone rejected");
                return;
            }
        };
        self.metrics.tls_handshake(Side::Server, Outcome::Ok);
        let (peer_id, serial, served) = {
            let conn = tls.get_ref().1;
            let served = conn.server_name().and_then(|sni| self.served(sni));
            (peer_identity(conn), peer_serial(conn), served)
        };
        // The verifier admits only workload identities with a serial, and the resolver only
        // our workloads' names; anything else here is a bug, refused all the same.
        let (Some(peer_id), Some(serial), Some(served)) = (peer_id, serial, served) else {
            warn!(%peer, reason = "no verified workload identity or served workload", "hbone rejected");
            return;
        };
        let mut h2 = match timeout(
            self.cfg.handshake_timeout,
            hbone::server_builder().handshake::<_, Bytes>(tls),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(%peer, peer_identity = %peer_id, reason = %format!("HTTP/2 preface: {e}"), "hbone rejected");
                return;
            }
            Err(_) => {
                warn!(%peer, peer_identity = %peer_id, reason = "HTTP/2 preface timed out", "hbone rejected");
                return;
            }
        };
        let hbone_conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        debug!(hbone_conn, %peer, peer_identity = %peer_id, %served, "hbone connection accepted");
        let peer_id = Arc::new(peer_id);
        let mut revocations = self.identities.revocations();
        // A revocation that landed between the handshake and the subscription counts too.
        let mut watching_revocations = true;
        let mut watching_stop = true;
        let mut streams = JoinSet::new();
        if self.identities.trust().is_revoked(&serial) {
            warn!(hbone_conn, %peer, peer_identity = %peer_id, serial = %serial, tunnels = 0usize,
                  "connection closed: peer certificate revoked");
            return;
        }
        loop {
            tokio::select! {
                next = h2.accept() => match next {
                    Some(Ok((req, respond))) => {
                        // Each tunnel takes a slot of the budget; past it, 503 at once.
                        let Ok(slot) = self.admission.admit(Direction::Inbound, peer) else {
                            self.metrics.hbone_stream(Side::Server, Outcome::Error);
                            hbone::reject(respond, StatusCode::SERVICE_UNAVAILABLE);
                            continue;
                        };
                        let ctx = Arc::clone(&self);
                        let peer_id = Arc::clone(&peer_id);
                        let served = served.clone();
                        streams.spawn(async move {
                            ctx.stream(req, respond, peer, &peer_id, &served, slot).await;
                        });
                    }
                    Some(Err(e)) => {
                        if !(e.is_io() || e.is_go_away()) || e.is_reset() {
                            warn!(%peer, peer_identity = %peer_id, reason = %format!("HTTP/2: {e}"), "hbone rejected");
                        }
                        break;
                    }
                    None => break,
                },
                changed = revocations.changed(), if watching_revocations => {
                    if changed.is_err() {
                        // The identity layer is gone (shutdown): nothing more to watch.
                        watching_revocations = false;
                        continue;
                    }
                    if self.identities.trust().is_revoked(&serial) {
                        warn!(hbone_conn, %peer, peer_identity = %peer_id, serial = %serial,
                              tunnels = streams.len(), "connection closed: peer certificate revoked");
                        streams.abort_all();
                        return;
                    }
                }
                _ = stop.changed(), if watching_stop => {
                    watching_stop = false;
                    h2.graceful_shutdown();
                }
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        }
        // The connection is done accepting; tunnels already open run to their end.
        while streams.join_next().await.is_some() {}
    }

    async fn stream(
        &self,
        req: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        peer: SocketAddr,
        peer_id: &SpiffeId,
        served: &SpiffeId,
        _slot: Guard,
    ) {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let connect = match hbone::parse_connect(req, respond) {
            Ok(c) => c,
            Err((bad, respond)) => {
                return self.refuse(
                    respond,
                    peer,
                    peer_id,
                    conn_id,
                    StreamRefusal::Malformed(bad),
                )
            }
        };
        let dst = connect.authority;
        let mesh = self.mesh.load();
        let workload = match mesh.registry.by_ip(dst.ip()) {
            Some(w) if w.node == self.node => w,
            _ => {
                return self.refuse(
                    connect.respond,
                    peer,
                    peer_id,
                    conn_id,
                    StreamRefusal::NotLocal { dst },
                )
            }
        };
        if mesh.identity(workload.id) != Some(served) {
            let refusal = StreamRefusal::WrongWorkload {
                dst,
                workload: workload.key(),
                served: served.clone(),
            };
            return self.refuse(connect.respond, peer, peer_id, conn_id, refusal);
        }
        let dst_workload = workload.key();
        let (src_workload, src_addr) =
            verified_source(&mesh.registry, connect.forwarded_for, peer_id);
        // The source's share: its verified address, else the peer agent's.
        let source = src_addr.map_or(peer.ip(), |a| a.ip());
        let Ok(_source_slot) =
            self.admission
                .admit_source(Direction::Inbound, SourceKey::Addr(source), peer)
        else {
            self.metrics.hbone_stream(Side::Server, Outcome::Error);
            return hbone::reject(connect.respond, StatusCode::SERVICE_UNAVAILABLE);
        };
        let info = ConnInfo {
            src_workload,
            src_identity: peer_id.clone(),
            src_addr,
            dst,
            dst_workload: workload.id,
            dst_name: dst_workload.clone(),
            http: workload.is_http_port(dst.port()),
        };
        let l7_source = src_addr.map_or(peer.ip(), |a| a.ip());
        let closed = self.mesh.closers().watch(&[workload.id]);
        let done = match self
            .dest
            .serve(
                Downstream::Hbone(connect),
                &info,
                l7_source,
                conn_id,
                closed,
            )
            .await
        {
            Ok(s) => s,
            Err(Turned::OverLimit(_)) => return,
        };
        if done.refused {
            if let record::Outcome::Denied { policy } = &done.carried.outcome {
                let why = StreamRefusal::Policy {
                    policy: policy.as_deref().map(str::to_owned),
                };
                warn!(conn_id, %peer, peer_identity = %peer_id, reason = %why, "hbone rejected");
            }
            return;
        }
        ConnRecord {
            conn_id: Some(conn_id),
            transport: Transport::Hbone,
            src_workload: info
                .src_workload
                .and_then(|id| mesh.registry.by_id(id))
                .map(|w| w.key()),
            src_identity: Some(info.src_identity.to_string()),
            src_addr: info.src_addr,
            peer: Some(peer),
            dst: info.dst,
            dst_workload: Some(info.dst_name.clone()),
            dst_identity: Some(served.to_string()),
            service: None,
            endpoint: None,
            generation: None,
            duration_ms: started.elapsed().as_millis() as u64,
            carried: done.carried,
        }
        .log(RecordKind::Inbound);
    }

    /// The identity of this node's workloads whose server name is `sni` (what the resolver
    /// presented), in the current state.
    fn served(&self, sni: &str) -> Option<SpiffeId> {
        let mesh = self.mesh.load();
        let found = mesh
            .registry
            .local(&self.node)
            .filter_map(|w| mesh.identity(w.id))
            .find(|id| server_name_for(id).to_str() == sni)
            .cloned();
        found
    }

    fn refuse(
        &self,
        respond: SendResponse<Bytes>,
        peer: SocketAddr,
        peer_id: &SpiffeId,
        conn_id: u64,
        why: StreamRefusal,
    ) {
        self.metrics.hbone_stream(Side::Server, Outcome::Error);
        warn!(conn_id, %peer, peer_identity = %peer_id, reason = %why, "hbone rejected");
        hbone::reject(respond, why.status());
    }
}

/// The source workload and address a `Forwarded` claim names, if the address belongs to a
/// workload that has the peer's verified identity; otherwise nothing (the claim is
/// ignored and logged: the peer can only speak for its own identity).
fn verified_source(
    registry: &Registry,
    claim: Option<SocketAddr>,
    peer_id: &SpiffeId,
) -> (Option<u32>, Option<SocketAddr>) {
    let Some(addr) = claim else {
        return (None, None);
    };
    match registry.by_ip(addr.ip()) {
        Some(w)
            if w.namespace == peer_id.namespace()
                && w.service_account == peer_id.service_account() =>
        {
            (Some(w.id), Some(addr))
        }
        other => {
            warn!(claimed = %addr, peer_identity = %peer_id,
                  owner = other.map(|w| w.key()).unwrap_or_else(|| "none".into()),
                  "forwarded source not owned by the peer identity: ignored");
            (None, None)
        }
    }
}
