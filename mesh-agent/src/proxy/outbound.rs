//! Outbound: connections captured by `cgroup/connect4|6` arrive here. For
//! each one the agent finds the original destination and the source workload
//! in `mesh_conn_dst` (written by sock_ops), connects to the destination and
//! copies bytes both ways with half-close preserved.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::timeout,
};
use tracing::{debug, info, warn};

use super::{conn_key, orig_dst_addr};
use crate::{bpf::Dataplane, registry::Registry};

/// Size of each direction's copy buffer.
const COPY_BUF: usize = 64 * 1024;

/// Tunables of the outbound proxy.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// How long to wait for the destination to accept.
    pub connect_timeout: Duration,
    /// How long in-flight connections may drain on shutdown.
    pub drain_timeout: Duration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// The outbound proxy: its listeners and what it needs per connection.
pub struct Outbound {
    listeners: Vec<TcpListener>,
    ctx: Arc<Ctx>,
}

struct Ctx {
    dataplane: Arc<Dataplane>,
    registry: Arc<Registry>,
    cfg: OutboundConfig,
    next_id: AtomicU64,
}

/// Why a captured connection was not carried through.
#[derive(Debug, thiserror::Error)]
enum FlowError {
    #[error("no original destination recorded")]
    NoOrigDst,
    #[error("original destination is the agent itself")]
    Loop,
    #[error("connect to {dst} timed out")]
    ConnectTimeout { dst: SocketAddr },
    #[error("connect to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Outbound {
    /// Wraps already-bound listeners (bound before the kernel side is
    /// attached, so a port conflict leaves nothing attached).
    pub fn new(
        listeners: Vec<TcpListener>,
        dataplane: Arc<Dataplane>,
        registry: Arc<Registry>,
        cfg: OutboundConfig,
    ) -> Self {
        Self {
            listeners,
            ctx: Arc::new(Ctx {
                dataplane,
                registry,
                cfg,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Accepts until `shutdown` turns true, then drains in-flight
    /// connections for up to `drain_timeout`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut accepts = JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<(TcpStream, SocketAddr)>(1024);
        for listener in self.listeners {
            let tx = conn_tx.clone();
            accepts.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok(pair) => {
                            if tx.send(pair).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        drop(conn_tx);

        let mut flows = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                next = conn_rx.recv() => match next {
                    Some((stream, peer)) => {
                        let ctx = Arc::clone(&self.ctx);
                        flows.spawn(async move { ctx.handle(stream, peer).await });
                    }
                    None => break,
                },
                Some(_) = flows.join_next(), if !flows.is_empty() => {}
            }
        }
        accepts.abort_all();
        let active = flows.len();
        if active > 0 {
            info!(active, drain_ms = self.ctx.cfg.drain_timeout.as_millis() as u64, "draining");
        }
        let drained = timeout(self.ctx.cfg.drain_timeout, async {
            while flows.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(aborted = flows.len(), "drain timeout: closing remaining connections");
            flows.abort_all();
        }
    }
}

impl Ctx {
    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
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
        let Some(orig) = self.dataplane.take_orig_dst(&conn_key(peer, local)) else {
            // Not captured by our programs (or the record was lost): refuse
            // rather than guess where it was going.
            log_refused(conn_id, peer, &FlowError::NoOrigDst);
            let _ = client.shutdown().await;
            return;
        };
        let dst = orig_dst_addr(&orig);
        let src_workload = self.workload_name(orig.src_workload_id);
        let dst_workload = self.workload_name(orig.dst_workload_id);
        let result = self.carry(&mut client, dst, local).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok((sent, received)) => info!(
                conn_id,
                src_workload = %src_workload,
                src_addr = %peer,
                orig_dst = %dst,
                dst_workload = %dst_workload,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                outcome = "ok",
                "flow"
            ),
            Err(e) => info!(
                conn_id,
                src_workload = %src_workload,
                src_addr = %peer,
                orig_dst = %dst,
                dst_workload = %dst_workload,
                bytes_sent = 0u64,
                bytes_received = 0u64,
                duration_ms,
                outcome = %e,
                "flow"
            ),
        }
    }

    async fn carry(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        local: SocketAddr,
    ) -> Result<(u64, u64), FlowError> {
        if canonical(dst) == local {
            return Err(FlowError::Loop);
        }
        let mut upstream = match timeout(self.cfg.connect_timeout, TcpStream::connect(dst)).await {
            Err(_) => return Err(FlowError::ConnectTimeout { dst }),
            Ok(Err(source)) => return Err(FlowError::Connect { dst, source }),
            Ok(Ok(s)) => s,
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        match tokio::io::copy_bidirectional_with_sizes(client, &mut upstream, COPY_BUF, COPY_BUF)
            .await
        {
            Ok(counts) => Ok(counts),
            Err(e) => {
                // A reset mid-stream is an ordinary end for a TCP flow; the
                // byte counts are lost with the error, so report zero.
                debug!(error = %e, "copy ended with error");
                Ok((0, 0))
            }
        }
    }

    fn workload_name(&self, id: u32) -> String {
        self.registry
            .by_id(id)
            .map(|w| w.key())
            .unwrap_or_else(|| format!("unknown#{id}"))
    }
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
