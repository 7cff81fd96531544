//! Outbound HBONE connections, pooled per (source identity, destination identity,
//! destination node address), each carrying up to [`hbone::MAX_CONCURRENT_STREAMS`] tunnels.
//!
//! A pooled connection is used only with the client configuration it was made with: when the
//! source certificate rotates or the bundle changes, the identity layer hands out a new
//! configuration and new tunnels go over new connections while the old ones drain. Idle
//! connections are closed after [`PoolConfig::idle_timeout`]. When the revocation list
//! changes, connections whose server certificate is now revoked are torn down, with their
//! tunnels.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::ClientConfig;
use tokio::{task::AbortHandle, time::timeout};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{
    connect_from,
    hbone::{self, HboneError, Tunnel},
    ConnectError, SourceAddrs,
};
use crate::{
    metrics::{Metrics, Outcome, Side},
    tls::{server_name_for, verify::peer_serial, Serial, SpiffeId, TrustStore},
};

/// Pool tunables.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// TCP connect to the peer agent.
    pub connect_timeout: Duration,
    /// TLS + HTTP/2 handshakes.
    pub handshake_timeout: Duration,
    /// Waiting for the peer's answer to a CONNECT.
    pub stream_timeout: Duration,
    /// A connection with no tunnel for this long is closed.
    pub idle_timeout: Duration,
    /// Tunnels per connection (at most the server's advertised limit).
    pub max_streams: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            stream_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_streams: hbone::MAX_CONCURRENT_STREAMS as usize,
        }
    }
}

/// Why no tunnel could be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("TLS handshake with {peer}: {source}")]
    Tls {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} with {peer} timed out")]
    Timeout {
        what: &'static str,
        peer: SocketAddr,
    },
    #[error("HBONE with {peer}: {source}")]
    Hbone {
        peer: SocketAddr,
        #[source]
        source: HboneError,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: SpiffeId,
    dst: SpiffeId,
    peer: SocketAddr,
}

struct Conn {
    sender: SendRequest<Bytes>,
    /// The configuration it was made with (identity + bundle generation).
    config: Arc<ClientConfig>,
    /// Serial of the peer agent's certificate, to act on revocations.
    server_serial: Option<Serial>,
    streams: AtomicUsize,
    dead: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
    driver: AbortHandle,
}

impl Conn {
    fn usable(&self, config: &Arc<ClientConfig>, max: usize) -> bool {
        !self.dead.load(Ordering::Acquire)
            && Arc::ptr_eq(&self.config, config)
            && self.streams.load(Ordering::Acquire) < max
    }

    fn close(&self) {
        self.dead.store(true, Ordering::Release);
        self.driver.abort();
    }
}

/// A tunnel's claim on its connection; releases the stream slot on drop.
pub struct StreamSlot {
    conn: Arc<Conn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// The pool. Shared by every outbound connection of the agent.
pub struct Pool {
    cfg: PoolConfig,
    source: SourceAddrs,
    metrics: Arc<Metrics>,
    conns: Mutex<HashMap<Key, Vec<Arc<Conn>>>>,
    /// One dial at a time per key, so a burst of connects shares new connections.
    dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    pub fn new(cfg: PoolConfig, source: SourceAddrs, metrics: Arc<Metrics>) -> Self {
        Self {
            cfg,
            source,
            metrics,
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a tunnel to `authority` (the original destination) at the agent `peer`, as
    /// `src`, accepting only a server that is `dst`; `source` is the original client address
    /// (sent as `Forwarded`).
    pub async fn tunnel(
        &self,
        src: &SpiffeId,
        dst: &SpiffeId,
        peer: SocketAddr,
        config: Arc<ClientConfig>,
        authority: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<(Tunnel, StreamSlot), PoolError> {
        let key = Key {
            src: src.clone(),
            dst: dst.clone(),
            peer,
        };
        // A pooled connection whose peer agent is going away (GOAWAY while it drains for an
        // upgrade, or its socket already closed) refuses the CONNECT before the tunnel carries
        // a byte of the client's: the CONNECT is tried again on a new connection, which
        // reaches the peer's successor on the same listening socket. Bounded: a fresh
        // connection that fails is an answer.
        let mut reused_tries = 0;
        loop {
            let (conn, reused) = self.conn_for(&key, &config).await?;
            let slot = StreamSlot { conn };
            let opened = timeout(
                self.cfg.stream_timeout,
                hbone::open(&slot.conn.sender, authority, source),
            )
            .await;
            match opened {
                Ok(Ok(tunnel)) => {
                    self.metrics.hbone_stream(Side::Client, Outcome::Ok);
                    return Ok((tunnel, slot));
                }
                Ok(Err(source)) => {
                    let closing = matches!(source, HboneError::H2(ref e)
                        if e.is_io() || e.is_go_away()
                            || e.reason() == Some(h2::Reason::REFUSED_STREAM));
                    if closing {
                        slot.conn.dead.store(true, Ordering::Release);
                    }
                    if closing && reused && reused_tries < 2 {
                        reused_tries += 1;
                        debug!(%peer, error = %source, "pooled connection is closing; retrying the CONNECT on a new one");
                        continue;
                    }
                    self.metrics.hbone_stream(Side::Client, Outcome::Error);
                    return Err(PoolError::Hbone { peer, source });
                }
                Err(_) => {
                    self.metrics.hbone_stream(Side::Client, Outcome::Error);
                    return Err(PoolError::Timeout {
                        what: "CONNECT",
                        peer,
                    });
                }
            }
        }
    }

    /// A connection for `key` with a stream slot taken: a pooled one (`true`) or a new one.
    async fn conn_for(
        &self,
        key: &Key,
        config: &Arc<ClientConfig>,
    ) -> Result<(Arc<Conn>, bool), PoolError> {
        if let Some(c) = self.claim(key, config) {
            return Ok((c, true));
        }
        let lock = {
            let mut d = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(d.entry(key.clone()).or_default())
        };
        let _dialing = lock.lock().await;
        if let Some(c) = self.claim(key, config) {
            return Ok((c, true));
        }
        // Boxed: TLS and h2 handshake state is large and short-lived.
        let dialing = Box::pin(self.dial(key, Arc::clone(config)));
        let conn = Arc::new(dialing.await?);
        conn.streams.fetch_add(1, Ordering::AcqRel);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(Arc::clone(&conn));
        Ok((conn, false))
    }

    /// A live connection for `key` made with `config` that has a free stream slot; the
    /// slot is taken. Dead and superseded idle connections are dropped on the way.
    fn claim(&self, key: &Key, config: &Arc<ClientConfig>) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| {
            let live = !c.dead.load(Ordering::Acquire);
            let current = Arc::ptr_eq(&c.config, config);
            live && (current || c.streams.load(Ordering::Acquire) > 0)
        });
        let conn = list
            .iter()
            .find(|c| c.usable(config, self.cfg.max_streams))
            .cloned();
        if let Some(c) = &conn {
            c.streams.fetch_add(1, Ordering::AcqRel);
        }
        conn
    }

    async fn dial(&self, key: &Key, config: Arc<ClientConfig>) -> Result<Conn, PoolError> {
        let peer = key.peer;
        let tcp = connect_from(&self.source, peer, self.cfg.connect_timeout).await?;
        let connector = TlsConnector::from(Arc::clone(&config));
        let tls = match timeout(
            self.cfg.handshake_timeout,
            connector.connect(server_name_for(&key.dst), tcp),
        )
        .await
        {
            Ok(Ok(tls)) => {
                self.metrics.tls_handshake(Side::Client, Outcome::Ok);
                tls
            }
            Ok(Err(source)) => {
                self.metrics.tls_handshake(Side::Client, Outcome::Error);
                warn!(%peer, src = %key.src, dst = %key.dst, error = %source, "hbone handshake failed");
                return Err(PoolError::Tls { peer, source });
            }
            Err(_) => {
                self.metrics.tls_handshake(Side::Client, Outcome::Error);
                return Err(PoolError::Timeout {
                    what: "TLS handshake",
                    peer,
                });
            }
        };
        let server_serial = peer_serial(tls.get_ref().1);
        let (sender, connection) = match timeout(
            self.cfg.handshake_timeout,
            hbone::client_builder().handshake::<_, Bytes>(tls),
        )
        .await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                return Err(PoolError::Hbone {
                    peer,
                    source: e.into(),
                })
            }
            Err(_) => {
                return Err(PoolError::Timeout {
                    what: "HTTP/2 handshake",
                    peer,
                })
            }
        };
        let dead = Arc::new(AtomicBool::new(false));
        let dead_flag = Arc::clone(&dead);
        let (src, dst) = (key.src.clone(), key.dst.clone());
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "hbone connection ended");
            }
            dead_flag.store(true, Ordering::Release);
        })
        .abort_handle();
        info!(%peer, %src, %dst, "hbone connection established");
        Ok(Conn {
            sender,
            config,
            server_serial,
            streams: AtomicUsize::new(0),
            dead,
            idle_since: Mutex::new(Instant::now()),
            driver,
        })
    }

    /// Closes idle connections past the idle timeout and connections whose server
    /// certificate `trust` now revokes (with their tunnels). Returns how many were closed.
    pub fn sweep(&self, trust: &TrustStore) -> usize {
        let now = Instant::now();
        let mut closed = 0;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for (key, list) in conns.iter_mut() {
            list.retain(|c| {
                let revoked = c
                    .server_serial
                    .as_ref()
                    .is_some_and(|s| trust.is_revoked(s));
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.idle_since.lock().unwrap_or_else(|p| p.into_inner()))
                        >= self.cfg.idle_timeout;
                let dead = c.dead.load(Ordering::Acquire);
                if revoked {
                    warn!(peer = %key.peer, dst = %key.dst, serial = %c.server_serial.as_ref().map(ToString::to_string).unwrap_or_default(),
                          "connection closed: peer certificate revoked");
                }
                if revoked || idle || dead {
                    c.close();
                    closed += usize::from(!dead);
                    false
                } else {
                    true
                }
            });
        }
        conns.retain(|_, l| !l.is_empty());
        closed
    }

    /// Closes every pooled connection (shutdown).
    pub fn close_all(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for c in conns.values().flatten() {
            c.close();
        }
        conns.clear();
    }

    /// Connections currently pooled (for tests and status).
    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
