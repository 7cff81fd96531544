//! Outbound: connections captured by `cgroup/connect4|6` arrive here. For each one the agent
//! finds the original destination and the source workload in `mesh_conn_dst` (written by
//! sock_ops), then carries it:
//! - to a workload on another node: over an HBONE tunnel to that node's agent, presenting the
//!   *source workload's* certificate and accepting only the *destination workload's*
//!   ([`Pool`]); no byte leaves the node in plaintext;
//! - to a workload on this node: straight to the pod, from the node's mesh source address
//!   (the identity of both ends is known from the kernel: the source cgroup and the
//!   destination's registry entry).
//!
//! Bytes are copied both ways with back-pressure and half-close preserved. A connection whose
//! source has no certificate, or whose destination node is unknown, is refused (fail closed).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mesh_common::{ConnKey, OrigDst};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use super::{
    conn_key,
    copy::{self, Counters, Far},
    destination::{Destination, Downstream, Turned},
    hbone::HBONE_PORT,
    limits::{self, Accepted, Admission, Guard, SourceKey},
    listen, orig_dst_addr,
    pool::{Pool, PoolConfig, PoolError},
    record::{Carried, ConnRecord, Outcome, RecordKind, Transport},
    services::{self as svc, Balancer, ServiceRefusal, MAX_ENDPOINT_TRIES},
    ConnectError, Identities, ProxyDeps,
};
use crate::{
    bpf::Dataplane,
    identity::IdentityError,
    metrics::{Direction, Metrics},
    policy::ConnInfo,
    state::live::{MeshHandle, MeshState},
    tls::SpiffeId,
};

/// Where the kernel recorded each captured connection's original destination (sock_ops
/// writes `mesh_conn_dst`; the [`Dataplane`] reads it). A trait so the proxies run in one
/// process in tests, with a table filled by the test.
pub trait OrigDsts: Send + Sync + 'static {
    /// Takes (reads and removes) the record of the connection `key`.
    fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst>;
}

impl OrigDsts for Dataplane {
    fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst> {
        Dataplane::take_orig_dst(self, key)
    }
}

/// Tunables of the outbound proxy.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// How long to wait for a local destination to accept.
    pub connect_timeout: Duration,
    /// How long in-flight connections may drain on shutdown.
    pub drain_timeout: Duration,
    /// How often idle and revoked pooled HBONE connections are swept.
    pub sweep_interval: Duration,
    /// The HBONE connection pool's timeouts.
    pub pool: PoolConfig,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            sweep_interval: Duration::from_secs(10),
            pool: PoolConfig::default(),
        }
    }
}

/// The outbound proxy: its listeners and what it needs per connection.
pub struct Outbound {
    listeners: Vec<TcpListener>,
    ctx: Arc<Ctx>,
}

struct Ctx {
    orig_dsts: Arc<dyn OrigDsts>,
    /// The mesh state: each connection reads the version current when it arrives.
    mesh: MeshHandle,
    identities: Arc<dyn Identities>,
    /// This node's name.
    node: String,
    pool: Pool,
    metrics: Arc<Metrics>,
    /// The destination side of same-node connections (no inbound hop).
    dest: Destination,
    cfg: OutboundConfig,
    next_id: AtomicU64,
    admission: Arc<Admission>,
    /// Active connections per service endpoint, and the choice among endpoints.
    balancer: Balancer,
}

/// Why a captured connection was not carried through.
#[derive(Debug, thiserror::Error)]
enum FlowError {
    #[error("no original destination recorded")]
    NoOrigDst,
    #[error("original destination is the agent itself")]
    Loop,
    #[error("unknown workload #{id}")]
    UnknownWorkload { id: u32 },
    #[error("no HBONE address for node {node}")]
    UnknownNode { node: String },
    #[error("no certificate for {src}: {source}")]
    NoCertificate {
        src: SpiffeId,
        #[source]
        source: Box<IdentityError>,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Tunnel(#[from] PoolError),
    #[error("refused: {0}")]
    OverLimit(#[from] limits::Refused),
    #[error("service: {0}")]
    Service(#[from] ServiceRefusal),
}

/// What a connection to a service VIP became.
struct ServiceFlow {
    /// `namespace/name` of the service (none: the VIP is no service's).
    service: Option<String>,
    /// The last endpoint tried.
    endpoint: Option<SocketAddr>,
}

impl Outbound {
    /// Wraps already-bound listeners (bound before the kernel side is
    /// attached, so a port conflict leaves nothing attached).
    pub fn new(
        listeners: Vec<TcpListener>,
        orig_dsts: Arc<dyn OrigDsts>,
        deps: ProxyDeps,
        cfg: OutboundConfig,
    ) -> Self {
        let dest = deps.destination(cfg.connect_timeout);
        let ProxyDeps {
            node,
            mesh,
            identities,
            metrics,
            source,
            admission,
            ..
        } = deps;
        let pool = Pool::new(cfg.pool.clone(), source, Arc::clone(&metrics));
        Self {
            listeners,
            ctx: Arc::new(Ctx {
                orig_dsts,
                mesh,
                identities,
                node,
                pool,
                metrics,
                dest,
                cfg,
                next_id: AtomicU64::new(1),
                admission,
                balancer: Balancer::new(),
            }),
        }
    }

    /// Accepts until `shutdown` turns true, then drains in-flight connections for up to
    /// `drain_timeout`. Pooled HBONE connections are swept meanwhile (idle ones, and those
    /// whose peer certificate was revoked).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let ctx = self.ctx;
        let maintenance = tokio::spawn(Arc::clone(&ctx).maintain_pool(shutdown.clone()));
        let listeners = self.listeners;
        listen::accept_loop(
            || limits::accept(&listeners, &ctx.admission, Direction::Outbound),
            shutdown,
            ctx.cfg.drain_timeout,
            "connections",
            |accepted| match accepted {
                Accepted::Admitted(stream, peer, slot) => {
                    let ctx = Arc::clone(&ctx);
                    Some(async move { ctx.handle(stream, peer, slot).await })
                }
                Accepted::Refused(stream, peer) => {
                    ctx.refuse(stream, peer);
                    None
                }
            },
        )
        .await;
        let _ = maintenance.await;
        ctx.pool.close_all();
    }
}

impl Ctx {
    /// Sweeps the pool every `sweep_interval` and at every revocation, until `shutdown`.
    async fn maintain_pool(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut revocations = self.identities.revocations();
        let mut watching_revocations = true;
        let mut sweep = tokio::time::interval(self.cfg.sweep_interval);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
                changed = revocations.changed(), if watching_revocations => match changed {
                    Ok(()) => {
                        self.pool.sweep(&self.identities.trust());
                    }
                    // The identity layer is gone (shutdown): nothing more to watch.
                    Err(_) => watching_revocations = false,
                },
                _ = sweep.tick() => {
                    self.pool.sweep(&self.identities.trust());
                    let mesh = self.mesh.load();
                    self.balancer.retain(|id| mesh.registry.by_id(id).is_some());
                }
            }
        }
    }

    /// A connection refused by the limits (already counted and logged): its kernel record is
    /// dropped and it is reset.
    fn refuse(&self, client: TcpStream, peer: SocketAddr) {
        if let Ok(local) = client.local_addr() {
            let _ = self
                .orig_dsts
                .take_orig_dst(&conn_key(canonical(peer), canonical(local)));
        }
        limits::reset(client);
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr, _slot: Guard) {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => {
                warn!(conn_id, error = %e, "local_addr");
                return;
            }
        };
        let peer = canonical(peer);
        let local = canonical(local);
        let Some(orig) = self.orig_dsts.take_orig_dst(&conn_key(peer, local)) else {
            // Not captured by our programs (or the record was lost): refuse
            // rather than guess where it was going.
            log_refused(conn_id, peer, &FlowError::NoOrigDst);
            let _ = client.shutdown().await;
            return;
        };
        let source = SourceKey::Workload(orig.src_workload_id);
        let Ok(_source_slot) = self
            .admission
            .admit_source(Direction::Outbound, source, peer)
        else {
            limits::reset(client);
            return;
        };
        let dst = orig_dst_addr(&orig);
        let _active = self.metrics.active(Direction::Outbound);
        let mesh = self.mesh.load();
        let src_workload = workload_name(&mesh, orig.src_workload_id);
        let src_identity = identity_name(&mesh, orig.src_workload_id);
        let (orig, flow, transport, result) = if orig.dst_workload_id == 0 {
            // A service VIP (the kernel leaves the destination workload to the agent).
            self.carry_service(&mesh, &mut client, orig, dst, (local, conn_id))
                .await
        } else {
            let (transport, result) = self
                .carry(&mesh, &mut client, &orig, dst, (local, conn_id))
                .await;
            let flow = ServiceFlow {
                service: None,
                endpoint: None,
            };
            (orig, flow, transport, result)
        };
        let dst_workload = workload_name(&mesh, orig.dst_workload_id);
        let dst_identity = identity_name(&mesh, orig.dst_workload_id);
        drop(mesh);
        if let Err(FlowError::OverLimit(_)) = &result {
            // Counted and logged (rate-limited) by the limits: no flow record either.
            limits::reset(client);
            return;
        }
        let carried = result.unwrap_or_else(|e| {
            Carried::nothing(match e {
                FlowError::Connect(_) | FlowError::Tunnel(_) => Outcome::Failed(e.to_string()),
                e => Outcome::Refused(e.to_string()),
            })
        });
        ConnRecord {
            conn_id: Some(conn_id),
            transport,
            src_workload: Some(src_workload),
            src_identity: Some(src_identity),
            src_addr: Some(peer),
            peer: Some(peer),
            dst,
            dst_workload: Some(dst_workload),
            dst_identity: Some(dst_identity),
            service: flow.service,
            endpoint: flow.endpoint,
            generation: None,
            duration_ms: started.elapsed().as_millis() as u64,
            carried,
        }
        .log(RecordKind::Flow);
    }

    /// Carries one connection: the transport chosen and how it went.
    async fn carry(
        &self,
        mesh: &MeshState,
        client: &mut TcpStream,
        orig: &mesh_common::OrigDst,
        dst: SocketAddr,
        (local, conn_id): (SocketAddr, u64),
    ) -> (Transport, Result<Carried, FlowError>) {
        if canonical(dst) == local {
            return (Transport::Local, Err(FlowError::Loop));
        }
        let Some(dst_w) = mesh.registry.by_id(orig.dst_workload_id) else {
            return (
                Transport::Local,
                Err(FlowError::UnknownWorkload {
                    id: orig.dst_workload_id,
                }),
            );
        };
        let _ = client.set_nodelay(true);
        if dst_w.node == self.node {
            // Boxed, like every set-up phase below: a held connection's task keeps only the
            // state of its copy (10,000 idle connections, 10,000 tasks).
            return (
                Transport::Local,
                Box::pin(self.carry_local(mesh, client, orig, dst_w, dst, conn_id)).await,
            );
        }
        (
            Transport::Hbone,
            self.carry_hbone(mesh, client, orig, &dst_w.node, dst).await,
        )
    }

    /// A connection to service VIP:port `dst`: an endpoint chosen among the service's
    /// workloads (power of two choices on active connections), the connection carried to
    /// `endpoint_ip:targetPort` as to that workload. An endpoint that fails before any byte of
    /// the client's was sent is replaced by another, up to [`MAX_ENDPOINT_TRIES`] distinct
    /// ones. A VIP:port that is not a declared service port is refused (closed).
    /// Returns the original destination as carried (its workload the last endpoint tried).
    async fn carry_service(
        &self,
        mesh: &MeshState,
        client: &mut TcpStream,
        mut orig: OrigDst,
        dst: SocketAddr,
        (local, conn_id): (SocketAddr, u64),
    ) -> (OrigDst, ServiceFlow, Transport, Result<Carried, FlowError>) {
        let mut flow = ServiceFlow {
            service: None,
            endpoint: None,
        };
        let (service, target_port) = match svc::lookup(&mesh.registry, dst) {
            Ok(found) => found,
            Err(e) => {
                if let Some(s) = mesh.registry.services.by_vip(dst.ip()) {
                    let key = s.key();
                    self.metrics.service_connection(&key, "refused");
                    flow.service = Some(key);
                }
                return (orig, flow, Transport::Local, Err(e.into()));
            }
        };
        let key = service.key();
        let mut tried = [0u32; MAX_ENDPOINT_TRIES];
        let mut last = Err(FlowError::Service(ServiceRefusal::NoEndpoint));
        let mut transport = Transport::Local;
        for attempt in 0..MAX_ENDPOINT_TRIES {
            let Some(id) = self.balancer.choose(&service.endpoints, &tried[..attempt]) else {
                break;
            };
            tried[attempt] = id;
            let Some(endpoint) = svc::endpoint_addr(&mesh.registry, id, dst.ip(), target_port)
            else {
                continue;
            };
            let _held = self.balancer.hold(id);
            orig.dst_workload_id = id;
            orig.addr_be = super::ip_words(endpoint.ip());
            orig.port_be = target_port.to_be();
            orig.family = if endpoint.is_ipv4() {
                mesh_common::AF_INET
            } else {
                mesh_common::AF_INET6
            };
            flow.endpoint = Some(endpoint);
            let (t, result) = self
                .carry(mesh, client, &orig, endpoint, (local, conn_id))
                .await;
            transport = t;
            let retry = match &result {
                // Nothing of the client's was sent: the tunnel or the pod was never reached.
                Err(
                    FlowError::Connect(_) | FlowError::Tunnel(_) | FlowError::UnknownNode { .. },
                ) => true,
                // Same node: the pod refused the connect (a port speaking HTTP may have read
                // the request head already, so only other ports are retried).
                Ok(c) => {
                    transport == Transport::Local
                        && matches!(c.outcome, Outcome::Failed(_))
                        && c.bytes_sent == 0
                        && c.bytes_received == 0
                        && !mesh
                            .registry
                            .by_id(id)
                            .is_some_and(|w| w.is_http_port(target_port))
                }
                Err(_) => false,
            };
            last = result;
            if !retry {
                break;
            }
            warn!(conn_id, service = %key, %endpoint, attempt, "service endpoint failed before any byte; trying another");
        }
        let result_label = match &last {
            Ok(c) if !matches!(c.outcome, Outcome::Failed(_)) => "ok",
            Err(FlowError::Service(_)) => "refused",
            _ => "failed",
        };
        self.metrics.service_connection(&key, result_label);
        flow.service = Some(key);
        (orig, flow, transport, last)
    }

    /// A same-node connection: this agent is also the destination side, so it serves it as
    /// the destination ([`Destination::serve`]: the destination's policy, L4 with the
    /// kernel-attested source, L7 on HTTP ports) before the bytes reach the pod.
    async fn carry_local(
        &self,
        mesh: &MeshState,
        client: &mut TcpStream,
        orig: &mesh_common::OrigDst,
        dst_w: &crate::registry::Workload,
        dst: SocketAddr,
        conn_id: u64,
    ) -> Result<Carried, FlowError> {
        let src_identity = identity(mesh, orig.src_workload_id)?.clone();
        let src_addr = client.peer_addr().ok().map(canonical);
        let info = ConnInfo {
            src_workload: Some(orig.src_workload_id),
            src_identity,
            src_addr,
            dst: canonical(dst),
            dst_workload: dst_w.id,
            dst_name: dst_w.key(),
            http: dst_w.is_http_port(dst.port()),
        };
        let l7_source = src_addr.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
        match self
            .dest
            .serve(
                Downstream::Local(client),
                &info,
                l7_source,
                conn_id,
                self.mesh.closers().watch(&[orig.src_workload_id, dst_w.id]),
            )
            .await
        {
            Ok(served) => Ok(served.carried),
            Err(Turned::OverLimit(e)) => Err(FlowError::OverLimit(e)),
        }
    }

    async fn carry_hbone(
        &self,
        mesh: &MeshState,
        client: &mut TcpStream,
        orig: &mesh_common::OrigDst,
        dst_node: &str,
        dst: SocketAddr,
    ) -> Result<Carried, FlowError> {
        let src_id = identity(mesh, orig.src_workload_id)?;
        let dst_id = identity(mesh, orig.dst_workload_id)?;
        let peer = mesh
            .registry
            .node(dst_node)
            .map(|n| SocketAddr::new(n.address, HBONE_PORT))
            .ok_or_else(|| FlowError::UnknownNode {
                node: dst_node.to_owned(),
            })?;
        let closed = self
            .mesh
            .closers()
            .watch(&[orig.src_workload_id, orig.dst_workload_id]);
        let config = self
            .identities
            .client_config(src_id, dst_id)
            .map_err(|source| FlowError::NoCertificate {
                src: src_id.clone(),
                source: Box::new(source),
            })?;
        let (tunnel, _slot) = Box::pin(self.pool.tunnel(
            src_id,
            dst_id,
            peer,
            config,
            canonical(dst),
            client.peer_addr().ok().map(canonical),
        ))
        .await?;
        let counts = Counters::default();
        let copied = tokio::select! {
            copied = copy::bidirectional(client, Far::Tunnel(tunnel), &counts) => match copied {
                Ok(()) => Outcome::Ok,
                Err(e) => Outcome::Failed(format!("tunnel: {e}")),
            },
            () = closed.wait() => Outcome::Removed,
        };
        Ok(Carried {
            bytes_sent: counts.sent(),
            bytes_received: counts.received(),
            ..Carried::nothing(copied)
        })
    }
}

fn identity(mesh: &MeshState, id: u32) -> Result<&SpiffeId, FlowError> {
    mesh.identity(id).ok_or(FlowError::UnknownWorkload { id })
}

fn identity_name(mesh: &MeshState, id: u32) -> String {
    identity(mesh, id)
        .map(ToString::to_string)
        .unwrap_or_else(|_| format!("unknown#{id}"))
}

fn workload_name(mesh: &MeshState, id: u32) -> String {
    mesh.registry
        .by_id(id)
        .map(|w| w.key())
        .unwrap_or_else(|| format!("unknown#{id}"))
}

fn log_refused(conn_id: u64, peer: SocketAddr, e: &FlowError) {
    warn!(conn_id, src_addr = %peer, reason = %e, "captured connection refused");
}

/// IPv4-mapped IPv6 socket addresses (from a dual-stack listener) as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}
