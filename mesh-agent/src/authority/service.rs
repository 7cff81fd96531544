//! The authority's network service and the node agent's client for it.
//!
//! Transport: TLS 1.3 only (rustls, ring), ALPN `mesh-authority/1`. The authority presents
//! `spiffe://<td>/authority` (a certificate it issues itself, kept in memory and renewed at
//! half-life or when the active root changes); the client must present a node certificate
//! (`spiffe://<td>/node/<node>`) that chains to the trust bundle and is not revoked.
//!
//! Protocol: see [`super::protocol`].
//!
//!
//! `lifetime_secs` is optional (default 24 h, at least 60 s); a longer request than the
//! service's [`ServeConfig::max_lifetime`] is shortened to it. `root` and `active_root` let an
//! agent notice that issuance moved to another root and re-issue its certificates promptly. A node may only
//! obtain certificates for identities of workloads the registry places on it
//! ([`authorize_request`]); refusals are logged with the node and identity. Bounds: a request
//! line may be at most [`ServeConfig::max_line`] bytes (an oversize line is answered with an
//! error and the connection closed), a connection serves at most
//! [`ServeConfig::max_requests`] requests (then it is closed: the client reconnects), a
//! connection idle for [`ServeConfig::idle_timeout`] is closed, and at most
//! [`ServeConfig::max_connections`] are served at once. Malformed input is answered with an
//! error, never a panic.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{atomic::Ordering, Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::ca::{
    authorize_request, Authority, RootId, DEFAULT_WORKLOAD_LIFETIME, MAX_WORKLOAD_LIFETIME,
};
use super::custody::Custody;
use super::protocol::{
    read_line_bounded, write_line, LineRead, Request, Response, ALPN_AUTHORITY, MAX_STATE_WAIT,
};
use super::AuthorityError;
use crate::audit::AuditLog;
use crate::tls::spiffe::{NodeId, PeerId, SpiffeId};
use crate::tls::verify::{peer_id, tls13_server, SpiffeClientVerifier};

/// The registry lookup shared by the service's connections: identity → nodes hosting it.
type RegistryLookup = Arc<dyn Fn(&SpiffeId) -> Vec<String> + Send + Sync>;

/// Limits of the authority service. `Default` gives the documented values.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Longest request line in bytes, newline excluded. Default 64 KiB.
    pub max_line: usize,
    /// Requests served on one connection before it is closed. Default 1000.
    pub max_requests: usize,
    /// Time allowed for the TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// A connection with no complete request for this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed on accept. Default 256.
    pub max_connections: usize,
    /// Longest workload certificate lifetime handed out; longer requests are shortened to it.
    /// Default (and upper bound) 30 days.
    pub max_lifetime: Duration,
    /// Where the nodes' audit checkpoints are kept. Default: a [`Custody`] under the
    /// authority directory.
    pub custody: Option<Arc<Custody>>,
    /// The authority's own audit log (certificates issued, refused requests, checkpoints
    /// accepted or refused). Default none.
    pub audit: Option<AuditLog>,
    /// The published mesh state agents follow (`op: state`). Default none: refused.
    pub state: Option<crate::state::publish::StateFeed>,
    /// A node that reports it does not run the published version for longer than this gets
    /// no new workload certificate until it does. Default none (not enforced).
    pub stale_config_grace: Option<Duration>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_line: 64 * 1024,
            max_requests: 1000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            max_lifetime: MAX_WORKLOAD_LIFETIME,
            custody: None,
            audit: None,
            state: None,
            stale_config_grace: None,
        }
    }
}

/// Serves the authority on `listener` with the default limits until `shutdown` completes.
/// `registry_lookup` returns the nodes hosting a workload with a given identity.
pub async fn serve<F>(
    listener: TcpListener,
    authority: Arc<Authority>,
    registry_lookup: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AuthorityError>
where
    F: Fn(&SpiffeId) -> Vec<String> + Send + Sync + 'static,
{
    serve_with(
        listener,
        authority,
        registry_lookup,
        ServeConfig::default(),
        shutdown,
    )
    .await
}

/// [`serve`] with explicit limits. On shutdown, stops accepting and drops open connections.
pub async fn serve_with<F>(
    listener: TcpListener,
    authority: Arc<Authority>,
    registry_lookup: F,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AuthorityError>
where
    F: Fn(&SpiffeId) -> Vec<String> + Send + Sync + 'static,
{
    let resolver = Arc::new(AuthorityCertResolver::new(authority.clone())?);
    let tls = tls13_server(
        SpiffeClientVerifier::nodes(authority.trust_store()),
        resolver,
        &[ALPN_AUTHORITY],
    )?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let lookup: RegistryLookup = Arc::new(registry_lookup);
    let mut config = config;
    if config.custody.is_none() {
        config.custody = Some(Arc::new(Custody::new(authority.dir())));
    }
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut tasks = JoinSet::new();
    let local = listener.local_addr().ok();
    info!(addr = ?local, trust_domain = %authority.trust_domain(), "authority service listening");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "authority accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    warn!(peer = %peer, limit = config.max_connections, "authority connection refused: too many connections");
                    continue;
                };
                let acceptor = acceptor.clone();
                let authority = authority.clone();
                let lookup = lookup.clone();
                let config = config.clone();
                tasks.spawn(async move {
                    serve_connection(tcp, peer, acceptor, authority, lookup, config).await;
                    drop(slot);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
    info!(addr = ?local, "authority service stopped");
    Ok(())
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    authority: Arc<Authority>,
    lookup: RegistryLookup,
    config: Arc<ServeConfig>,
) {
    let tls = match timeout(config.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(peer = %peer, error = %e, "authority TLS handshake failed");
            return;
        }
        Err(_) => {
            warn!(peer = %peer, "authority TLS handshake timed out");
            return;
        }
    };
    // The verifier admits node identities only; this is a second look, not the check.
    let node = match peer_id(tls.get_ref().1) {
        Some(PeerId::Node(node)) => node,
        other => {
            warn!(peer = %peer, identity = ?other, "authority client is not a node");
            return;
        }
    };
    debug!(peer = %peer, node = %node, "node connected to the authority");
    let mut stream = BufReader::new(tls);
    let mut line = Vec::with_capacity(4096);
    for _ in 0..config.max_requests {
        line.clear();
        let read = timeout(
            config.idle_timeout,
            read_line_bounded(&mut stream, &mut line, config.max_line),
        )
        .await;
        let response = match read {
            Err(_) => {
                debug!(node = %node, "authority connection idle, closing");
                return;
            }
            Ok(Err(e)) => {
                debug!(node = %node, error = %e, "authority connection read failed");
                return;
            }
            Ok(Ok(LineRead::Eof)) => return,
            Ok(Ok(LineRead::TooLong)) => {
                warn!(node = %node, limit = config.max_line, "authority request line too long, closing");
                let r = Response::error(format!(
                    "request line longer than {} bytes",
                    config.max_line
                ));
                let _ = timeout(config.idle_timeout, write_line(&mut stream, &r.to_line())).await;
                let _ = stream.get_mut().shutdown().await;
                return;
            }
            Ok(Ok(LineRead::Line)) => match serde_json::from_slice::<Request>(&line) {
                Ok(Request::State {
                    after,
                    wait_ms,
                    active,
                }) => {
                    let published = match &config.state {
                        None => None,
                        Some(feed) => {
                            let wait = wait_ms
                                .map_or(MAX_STATE_WAIT, Duration::from_millis)
                                .min(MAX_STATE_WAIT);
                            feed.next(node.node(), after, active, wait).await
                        }
                    };
                    let written = match (&config.state, published) {
                        (Some(_), Some(p)) => {
                            debug!(node = %node, version = p.snapshot.version, after = ?after, "state sent");
                            timeout(config.idle_timeout, write_line(&mut stream, &p.line)).await
                        }
                        (Some(_), None) => {
                            let r = Response {
                                ok: true,
                                unchanged: Some(true),
                                ..Response::default()
                            };
                            timeout(config.idle_timeout, write_line(&mut stream, &r.to_line()))
                                .await
                        }
                        (None, _) => {
                            let r = Response::error("this authority publishes no state");
                            timeout(config.idle_timeout, write_line(&mut stream, &r.to_line()))
                                .await
                        }
                    };
                    if !matches!(written, Ok(Ok(()))) {
                        debug!(node = %node, "authority state write failed, closing");
                        return;
                    }
                    continue;
                }
                parsed => handle_request(parsed, &node, &authority, &*lookup, &config),
            },
        };
        // A client that stops reading does not hold the connection forever.
        match timeout(
            config.idle_timeout,
            write_line(&mut stream, &response.to_line()),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(node = %node, error = %e, "authority connection write failed");
                return;
            }
            Err(_) => {
                debug!(node = %node, "authority client not reading, closing");
                return;
            }
        }
    }
    debug!(node = %node, limit = config.max_requests, "request limit reached, closing");
    let _ = stream.get_mut().shutdown().await;
}

fn handle_request(
    request: Result<Request, serde_json::Error>,
    node: &NodeId,
    authority: &Authority,
    lookup: &(dyn Fn(&SpiffeId) -> Vec<String> + Send + Sync),
    config: &ServeConfig,
) -> Response {
    let audit = config.audit.as_ref();
    let refused = |subject: &str, message: &str| {
        if let Some(a) = audit {
            a.cert_event(
                "refused",
                subject,
                Some(format!("node {}: {message}", node.node())),
            );
        }
    };
    let request: Request = match request {
        Ok(r) => r,
        Err(e) => {
            warn!(node = %node, error = %e, "malformed authority request");
            refused("malformed request", &e.to_string());
            return Response::error(format!("malformed request: {e}"));
        }
    };
    match request {
        Request::Bundle {} => Response {
            ok: true,
            bundle_pem: Some(authority.bundle_pem()),
            active_root: Some(authority.active_root()),
            ..Response::default()
        },
        Request::Revocations {} => Response {
            ok: true,
            revoked: Some(authority.revocations()),
            ..Response::default()
        },
        Request::Sign {
            identity,
            csr_pem,
            lifetime_secs,
        } => {
            let id = match SpiffeId::parse(&identity) {
                Ok(id) => id,
                Err(e) => {
                    warn!(node = %node, error = %e, "certificate request for an invalid identity");
                    refused(
                        &identity.chars().take(260).collect::<String>(),
                        &e.to_string(),
                    );
                    return Response::error(e.to_string());
                }
            };
            if let (Some(feed), Some(grace)) = (&config.state, config.stale_config_grace) {
                if let Some(stale) = feed.stale_for(node.node()).filter(|s| *s > grace) {
                    let message = format!(
                        "node {} does not run the published configuration (for {} s, grace {} s): no new certificates until it does",
                        node.node(),
                        stale.as_secs(),
                        grace.as_secs()
                    );
                    warn!(node = %node, identity = %id, "certificate request refused: stale configuration");
                    refused(&id.to_string(), &message);
                    return Response::error(message);
                }
            }
            if let Err(e) = authorize_request(node.node(), &id, |id| lookup(id)) {
                warn!(node = %node, identity = %id, error = %e, "certificate request refused");
                refused(&id.to_string(), &e.to_string());
                // The details (where the workload runs) stay in the log.
                return Response::error(format!(
                    "not authorized: node {} hosts no workload with identity {id}",
                    node.node()
                ));
            }
            let lifetime = lifetime_secs
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_WORKLOAD_LIFETIME)
                .min(config.max_lifetime);
            match authority.sign_workload_csr_rooted(&csr_pem, &id, lifetime) {
                Ok((chain, root)) => {
                    info!(node = %node, identity = %id, lifetime_secs = lifetime.as_secs(), "certificate request granted");
                    if let Some(a) = audit {
                        a.cert_event(
                            "issued",
                            &id.to_string(),
                            Some(format!(
                                "node {}, lifetime {} s, root {root}",
                                node.node(),
                                lifetime.as_secs()
                            )),
                        );
                    }
                    Response {
                        ok: true,
                        cert_chain_pem: Some(chain),
                        root: Some(root),
                        ..Response::default()
                    }
                }
                Err(e) => {
                    warn!(node = %node, identity = %id, error = %e, "certificate request failed");
                    refused(&id.to_string(), &e.to_string());
                    Response::error(e.to_string())
                }
            }
        }
        // Answered by the connection loop (it waits); never reaches here.
        Request::State { .. } => Response::error("internal error: state request misrouted"),
        Request::Checkpoint { checkpoint } => {
            let Some(custody) = config.custody.as_deref() else {
                return Response::error("this authority keeps no audit checkpoints");
            };
            let keys = custody.stats().keys_registered.load(Ordering::Relaxed);
            let result = custody.accept(node.node(), &checkpoint);
            if let Some(a) = audit {
                if custody.stats().keys_registered.load(Ordering::Relaxed) != keys {
                    a.custody_event(
                        "key_registered",
                        node.node(),
                        Some(format!("first use: {}", checkpoint.key)),
                    );
                }
            }
            match result {
                Ok(held) => {
                    debug!(node = %node, seq = checkpoint.seq, ?held, "audit checkpoint accepted");
                    if let Some(a) = audit {
                        a.custody_event(
                            "checkpoint_accepted",
                            node.node(),
                            Some(format!("seq {} head {}", checkpoint.seq, checkpoint.head)),
                        );
                    }
                    Response {
                        ok: true,
                        ..Response::default()
                    }
                }
                Err(e) => {
                    warn!(node = %node, seq = checkpoint.seq, error = %e, "audit checkpoint refused");
                    if let Some(a) = audit {
                        a.custody_event("checkpoint_refused", node.node(), Some(e.to_string()));
                    }
                    Response::error(format!("checkpoint refused: {e}"))
                }
            }
        }
    }
}

/// Presents the authority's own certificate; re-issues it at half-life or when the active
/// root has changed (so that it chains to the root that survives a rotation).
struct AuthorityCertResolver {
    authority: Arc<Authority>,
    current: Mutex<ServerCert>,
}

struct ServerCert {
    key: Arc<CertifiedKey>,
    rotate_at: SystemTime,
    root: RootId,
}

impl std::fmt::Debug for AuthorityCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityCertResolver")
            .finish_non_exhaustive()
    }
}

impl AuthorityCertResolver {
    fn new(authority: Arc<Authority>) -> Result<Self, AuthorityError> {
        let current = Self::issue(&authority)?;
        Ok(Self {
            authority,
            current: Mutex::new(current),
        })
    }

    fn issue(authority: &Authority) -> Result<ServerCert, AuthorityError> {
        let root = authority.active_root();
        let (key, rotate_at) = authority.issue_server_cert()?;
        Ok(ServerCert {
            key,
            rotate_at,
            root,
        })
    }
}

impl ResolvesServerCert for AuthorityCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if SystemTime::now() >= current.rotate_at || current.root != self.authority.active_root() {
            match Self::issue(&self.authority) {
                Ok(next) => *current = next,
                Err(e) => {
                    warn!(error = %e, "could not renew the authority's certificate, keeping the current one")
                }
            }
        }
        Some(current.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ca::tests::{td, wid, TempDir};
    use crate::authority::protocol::MAX_RESPONSE_LINE;
    use crate::identity::{AuthorityClient, IdentityError, NodeCredentials};
    use crate::tls::cert::{certs_from_pem, new_key, CertInfo, WorkloadCert};
    use crate::tls::verify::{tls13_client, SpiffeServerVerifier, TrustStore};
    use rustls_pki_types::ServerName;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_rustls::TlsConnector;

    struct Running {
        _dir: TempDir,
        ca: Arc<Authority>,
        addr: String,
        n1: NodeCredentials,
        n2: NodeCredentials,
        stop: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<Result<(), AuthorityError>>>,
    }

    impl Running {
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            let r = timeout(Duration::from_secs(10), self.task.take().unwrap())
                .await
                .expect("serve did not stop")
                .unwrap();
            r.unwrap();
        }
    }

    /// Registry: sa-a on n1, sa-b on n2.
    fn registry(id: &SpiffeId) -> Vec<String> {
        match id.service_account() {
            "sa-a" => vec!["n1".into()],
            "sa-b" => vec!["n2".into()],
            _ => vec![],
        }
    }

    async fn start(tag: &str, config: ServeConfig) -> Running {
        let dir = TempDir::new(tag);
        let ca = Arc::new(Authority::init(&dir.0, td()).unwrap());
        let n1 = ca.node_credentials("n1").unwrap();
        let n2 = ca.node_credentials("n2").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(listener, ca.clone(), registry, config, async {
            let _ = rx.await;
        }));
        Running {
            _dir: dir,
            ca,
            addr,
            n1,
            n2,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn client(r: &Running, creds: &NodeCredentials) -> AuthorityClient {
        AuthorityClient::connect(&r.addr, &creds.chain_pem, &creds.key_pem, &creds.bundle_pem)
            .await
            .unwrap()
    }

    /// A raw TLS connection as node `creds`, for hand-written request lines.
    async fn raw(
        r: &Running,
        creds: &NodeCredentials,
    ) -> BufReader<tokio_rustls::client::TlsStream<TcpStream>> {
        let c = client(r, creds).await;
        c.into_connection().unwrap()
    }

    async fn send_raw(
        conn: &mut BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
        line: &[u8],
    ) -> Option<serde_json::Value> {
        write_line(conn, line).await.ok()?;
        let mut buf = Vec::new();
        match timeout(
            Duration::from_secs(10),
            read_line_bounded(conn, &mut buf, MAX_RESPONSE_LINE),
        )
        .await
        .expect("no answer")
        {
            Ok(LineRead::Line) => Some(serde_json::from_slice(&buf).unwrap()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn state_long_poll_answers_changes_and_refuses_bad_requests() {
        use crate::state::{publish::Publisher, Snapshot};
        let (publisher, feed) = Publisher::new(None);
        let r = start(
            "state",
            ServeConfig {
                state: Some(feed.clone()),
                ..ServeConfig::default()
            },
        )
        .await;
        let mut c1 = client(&r, &r.n1).await;
        // Nothing published yet: the wait ends with "unchanged".
        assert_eq!(
            c1.state(None, Duration::from_millis(50)).await.unwrap(),
            None
        );
        publisher.publish(Snapshot::new(1, "test".into(), "workloads: []\n".into(), 1));
        let got = c1.state(None, Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(got.version, 1);
        got.verify().unwrap();
        // Up to date: unchanged after the wait; a change while waiting is answered at once.
        assert_eq!(
            c1.state(Some(1), Duration::from_millis(50)).await.unwrap(),
            None
        );
        let waiting = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let s = c1.state(Some(1), Duration::from_secs(20)).await;
            (s, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing: the poll is waiting
        publisher.publish(Snapshot::new(
            2,
            "test".into(),
            "nodes: []\nworkloads: []\n".into(),
            2,
        ));
        let (s, took) = waiting.await.unwrap();
        assert_eq!(s.unwrap().unwrap().version, 2);
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
        // A node's reported version is what it asked after.
        assert_eq!(feed.agents()["n1"].version, 1);
        // Malformed state requests are refused, the connection keeps serving.
        let mut raw = raw(&r, &r.n2).await;
        for bad in [
            &b"{\"op\":\"state\",\"after\":\"x\"}\n"[..],
            b"{\"op\":\"state\",\"after\":-1}\n",
            b"{\"op\":\"state\",\"wait_ms\":1,\"evil\":true}\n",
        ] {
            let v = send_raw(&mut raw, bad).await.expect("an answer");
            assert_eq!(v["ok"], false, "{v}");
        }
        let v = send_raw(&mut raw, b"{\"op\":\"state\",\"after\":2,\"wait_ms\":10}\n")
            .await
            .expect("an answer");
        assert_eq!(v["unchanged"], true, "{v}");
    }

    #[tokio::test]
    async fn state_refused_by_an_authority_that_publishes_none() {
        let r = start("nostate", ServeConfig::default()).await;
        let mut c1 = client(&r, &r.n1).await;
        assert!(matches!(
            c1.state(None, Duration::ZERO).await,
            Err(IdentityError::Refused { .. })
        ));
    }

    #[tokio::test]
    async fn sign_bundle_and_revocations_over_loopback() {
        let r = start("svc", ServeConfig::default()).await;
        let mut c1 = client(&r, &r.n1).await;
        assert_eq!(c1.node().node(), "n1");

        let cert = c1
            .sign(&wid("default", "sa-a"), Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(cert.identity(), &wid("default", "sa-a"));
        let life = cert.remaining();
        assert!(
            life > Duration::from_secs(590) && life <= Duration::from_secs(600),
            "{life:?}"
        );
        // The key stayed here: the certificate carries the key we hold.
        assert!(cert.certified_key().keys_match().is_ok());

        // Default lifetime when none is asked for: 24 h (through a raw request).
        let mut conn = raw(&r, &r.n1).await;
        let key = new_key().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let req = serde_json::json!({"op":"sign","identity":"spiffe://cluster.local/ns/default/sa/sa-a","csr_pem":csr});
        let v = send_raw(&mut conn, format!("{req}\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(v["ok"], true, "{v}");
        let chain = v["cert_chain_pem"].as_str().unwrap();
        let wc = WorkloadCert::from_pem(chain, &key.serialize_pem()).unwrap();
        let life = wc.remaining();
        assert!(
            life > Duration::from_secs(24 * 3600 - 60) && life <= Duration::from_secs(24 * 3600)
        );

        // Node n1 may not obtain sa-b (it lives on n2), nor an unknown identity.
        let err = c1
            .sign(&wid("default", "sa-b"), Duration::from_secs(600))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, IdentityError::Refused { message } if message.contains("not authorized")),
            "{err}"
        );
        assert!(c1
            .sign(&wid("default", "nobody"), Duration::from_secs(600))
            .await
            .is_err());
        // n2 may.
        let mut c2 = client(&r, &r.n2).await;
        c2.sign(&wid("default", "sa-b"), Duration::from_secs(600))
            .await
            .unwrap();
        // Lifetime bounds are enforced by the authority.
        let err = c1
            .sign(&wid("default", "sa-a"), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, IdentityError::Refused { .. }), "{err}");

        assert_eq!(c1.bundle().await.unwrap(), r.ca.bundle_pem());
        assert!(c1.revocations().await.unwrap().is_empty());
        r.ca.revoke(cert.serial().clone()).unwrap();
        assert_eq!(c1.revocations().await.unwrap(), vec![cert.serial().clone()]);
        c1.trust_store()
            .set_revoked(c1.revocations().await.unwrap());
        assert!(c1.trust_store().is_revoked(cert.serial()));

        // A revoked node certificate can no longer connect.
        let n1_serial = CertInfo::parse(&certs_from_pem(&r.n1.chain_pem, "t").unwrap()[0])
            .unwrap()
            .serial;
        r.ca.revoke(n1_serial).unwrap();
        let mut again =
            AuthorityClient::connect(&r.addr, &r.n1.chain_pem, &r.n1.key_pem, &r.n1.bundle_pem)
                .await;
        // TLS 1.3: the client may finish its handshake before the server's refusal arrives.
        if let Ok(c) = again.as_mut() {
            assert!(c.bundle().await.is_err());
        }
        r.stop().await;
    }

    #[tokio::test]
    async fn malformed_and_oversize_lines_are_answered_not_fatal() {
        let r = start("svc-bad", ServeConfig::default()).await;
        let mut conn = raw(&r, &r.n1).await;
        for bad in [
            &b"not json"[..],
            b"{}",
            b"{\"op\":\"launch\"}",
            b"{\"op\":\"sign\"}",
            b"{\"op\":\"sign\",\"identity\":\"spiffe://cluster.local/ns/default/sa/sa-a\",\"csr_pem\":\"junk\"}",
            b"{\"op\":\"sign\",\"identity\":\"http://x\",\"csr_pem\":\"junk\"}",
            b"{\"op\":\"bundle\",\"extra\":1}",
            b"\xff\xfe\x00",
            b"",
            b"[1,2,3]",
            b"{\"op\":\"sign\",\"identity\":\"spiffe://cluster.local/ns/default/sa/sa-a\",\"csr_pem\":\"x\",\"lifetime_secs\":-1}",
        ] {
            let v = send_raw(&mut conn, &[bad, b"\n"].concat()).await.unwrap();
            assert_eq!(v["ok"], false, "{:?} → {v}", String::from_utf8_lossy(bad));
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        // The connection still works.
        let v = send_raw(&mut conn, b"{\"op\":\"bundle\"}\n").await.unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["bundle_pem"].as_str().unwrap(), r.ca.bundle_pem());

        // An oversize line: answered with an error, then the connection is closed.
        let mut huge = vec![b'a'; 70 * 1024];
        huge.push(b'\n');
        let v = send_raw(&mut conn, &huge).await.unwrap();
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("longer than 65536"));
        assert!(send_raw(&mut conn, b"{\"op\":\"bundle\"}\n")
            .await
            .is_none());

        // The service keeps serving others.
        let mut c = client(&r, &r.n2).await;
        c.bundle().await.unwrap();
        r.stop().await;
    }

    #[tokio::test]
    async fn request_count_per_connection_is_bounded() {
        let config = ServeConfig {
            max_requests: 3,
            ..ServeConfig::default()
        };
        let r = start("svc-limit", config).await;
        let mut conn = raw(&r, &r.n1).await;
        for _ in 0..3 {
            assert!(send_raw(&mut conn, b"{\"op\":\"revocations\"}\n")
                .await
                .is_some());
        }
        assert!(send_raw(&mut conn, b"{\"op\":\"revocations\"}\n")
            .await
            .is_none());
        // A lazy client connects on its first request.
        let trust = TrustStore::from_bundle_pem(td(), &r.n2.bundle_pem).unwrap();
        let mut lazy =
            AuthorityClient::new(&r.addr, &r.n2.chain_pem, &r.n2.key_pem, trust).unwrap();
        assert_eq!(lazy.bundle().await.unwrap(), r.ca.bundle_pem());
        // The client reconnects by itself when the authority closes the connection.
        let mut c = client(&r, &r.n1).await;
        for _ in 0..7 {
            c.revocations().await.unwrap();
        }
        r.stop().await;
    }

    #[tokio::test]
    async fn service_survives_root_rotation() {
        let r = start("svc-rot", ServeConfig::default()).await;
        let old = r.ca.active_root();
        let new = r.ca.add_root().unwrap();
        // Nodes install the two-root bundle, then issuance switches to the new root.
        let mut c = client(&r, &r.n1).await;
        let bundle = c.bundle().await.unwrap();
        c.trust_store().set_bundle_pem(&bundle).unwrap();
        r.ca.activate_root(&new).unwrap();
        // The node (old-root certificate) still connects; the authority now presents a
        // certificate under the new root, which the node accepts.
        let mut c = AuthorityClient::connect(&r.addr, &r.n1.chain_pem, &r.n1.key_pem, &bundle)
            .await
            .unwrap();
        let wc = c
            .sign(&wid("default", "sa-a"), Duration::from_secs(600))
            .await
            .unwrap();
        let issuing = certs_from_pem(wc.chain_pem(), "t").unwrap()[1].clone();
        assert_eq!(
            CertInfo::parse(&issuing).unwrap().uri_sans,
            vec![td().uri()]
        );
        // Re-issue the node certificate, retire the old root: the new credentials work, the
        // old node certificate no longer does.
        let fresh = r.ca.node_credentials("n1").unwrap();
        r.ca.retire_root(&old).unwrap();
        let fresh = NodeCredentials {
            bundle_pem: r.ca.bundle_pem(),
            ..fresh
        };
        let mut c = client(&r, &fresh).await;
        c.sign(&wid("default", "sa-a"), Duration::from_secs(600))
            .await
            .unwrap();
        let stale =
            AuthorityClient::connect(&r.addr, &r.n1.chain_pem, &r.n1.key_pem, &bundle).await;
        if let Ok(mut s) = stale {
            assert!(s.bundle().await.is_err());
        }
        r.stop().await;
    }

    #[tokio::test]
    async fn only_node_identities_may_connect() {
        let r = start("svc-who", ServeConfig::default()).await;
        // A workload certificate, valid in the mesh, is not a node identity.
        let wc =
            r.ca.issue_workload_cert(&wid("default", "sa-a"), Duration::from_secs(600))
                .unwrap();
        assert!(AuthorityClient::connect(
            &r.addr,
            wc.chain_pem(),
            wc.key_pem(),
            &r.ca.bundle_pem()
        )
        .await
        .is_err());
        let ck = wc.certified_key();
        let trust = r.ca.trust_store();
        let verifier = SpiffeServerVerifier::for_peer(trust.clone(), PeerId::authority(&td()));
        let cfg = tls13_client(verifier, ck, &[ALPN_AUTHORITY]).unwrap();
        let tcp = TcpStream::connect(&r.addr).await.unwrap();
        let name = ServerName::try_from("authority.mesh.internal").unwrap();
        let outcome = async {
            let tls = TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
            let mut conn = BufReader::new(tls);
            write_line(&mut conn, b"{\"op\":\"bundle\"}\n").await?;
            let mut buf = Vec::new();
            match read_line_bounded(&mut conn, &mut buf, 1 << 20).await? {
                LineRead::Line => Ok(buf),
                _ => Err(std::io::Error::other("closed")),
            }
        };
        assert!(timeout(Duration::from_secs(10), outcome)
            .await
            .unwrap()
            .is_err());

        // A node of another authority (other roots) is refused too.
        let other_dir = TempDir::new("svc-who-other");
        let other = Authority::init(&other_dir.0, td()).unwrap();
        let stranger = other.node_credentials("n1").unwrap();
        let attempt = AuthorityClient::connect(
            &r.addr,
            &stranger.chain_pem,
            &stranger.key_pem,
            &r.ca.bundle_pem(),
        )
        .await;
        if let Ok(mut c) = attempt {
            assert!(c.bundle().await.is_err());
        }
        r.stop().await;
    }
}

#[cfg(test)]
mod custody_tests {
    use super::*;
    use crate::audit::checkpoint::{AuditKey, Checkpoint};
    use crate::audit::verify::{verify, FindingKind, VerifyInput};
    use crate::audit::{forward, segment, AuditConfig};
    use crate::authority::ca::tests::{td, TempDir};
    use crate::authority::custody::{Custody, CHECKPOINTS_FILE, NODES_DIR};
    use crate::identity::{AuthorityClient, IdentityError};
    use crate::tls::verify::TrustStore;
    use tokio::sync::oneshot;

    struct Running {
        _dir: TempDir,
        ca: Arc<Authority>,
        custody: Arc<Custody>,
        addr: String,
        stop: oneshot::Sender<()>,
    }

    /// Serves `ca` on `listener` with a custody of its own; returns it and the stop switch.
    fn serve_custody(
        listener: TcpListener,
        ca: &Arc<Authority>,
    ) -> (Arc<Custody>, oneshot::Sender<()>) {
        let custody = Arc::new(Custody::new(ca.dir()));
        let (stop, rx) = oneshot::channel::<()>();
        let config = ServeConfig {
            custody: Some(custody.clone()),
            ..ServeConfig::default()
        };
        tokio::spawn(serve_with(
            listener,
            ca.clone(),
            |_: &SpiffeId| vec![],
            config,
            async {
                let _ = rx.await;
            },
        ));
        (custody, stop)
    }

    async fn start(tag: &str, listener: TcpListener) -> Running {
        let dir = TempDir::new(tag);
        let ca = Arc::new(Authority::init(&dir.0, td()).unwrap());
        let addr = listener.local_addr().unwrap().to_string();
        let (custody, stop) = serve_custody(listener, &ca);
        Running {
            _dir: dir,
            ca,
            custody,
            addr,
            stop,
        }
    }

    fn client(r: &Running, node: &str) -> AuthorityClient {
        let creds = r.ca.node_credentials(node).unwrap();
        let trust = TrustStore::from_bundle_pem(td(), &creds.bundle_pem).unwrap();
        AuthorityClient::new(&r.addr, &creds.chain_pem, &creds.key_pem, trust).unwrap()
    }

    fn copy_of(r: &Running, node: &str) -> std::path::PathBuf {
        r.ca.dir().join(NODES_DIR).join(node).join(CHECKPOINTS_FILE)
    }

    #[tokio::test]
    async fn the_agents_checkpoints_reach_the_authority_and_catch_a_deleted_segment() {
        let r = start("cp-fwd", TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
        let node_dir = TempDir::new("cp-fwd-node");
        let (sink, queue) = forward::channel(forward::QUEUE);
        let stats = queue.stats();
        let sender = tokio::spawn(queue.run(client(&r, "n1")));
        let key = AuditKey::ephemeral().unwrap();
        let public = crate::audit::record::unhex::<32>(&key.public_hex()).unwrap();
        let log = crate::audit::AuditLog::start_with_key(
            AuditConfig {
                forward: Some(sink),
                segment_max_bytes: 4096,
                ..AuditConfig::new("n1", &node_dir.0)
            },
            key,
        )
        .unwrap();
        for i in 0..60 {
            log.cert_event(
                "issued",
                &format!("spiffe://cluster.local/ns/d/sa/s{i}"),
                None,
            );
        }
        log.shutdown("test").await;
        drop(log);
        timeout(Duration::from_secs(20), sender)
            .await
            .expect("the forwarder did not finish")
            .unwrap();
        assert!(stats.sent.load(Ordering::Relaxed) >= 2, "{stats:?}");
        assert_eq!(stats.refused.load(Ordering::Relaxed), 0);
        let dir = node_dir.0.join("audit");
        let authority_copy = copy_of(&r, "n1");
        let input = VerifyInput {
            dir: dir.clone(),
            checkpoints: vec![authority_copy.clone()],
            key: Some(public),
            from_genesis: true,
        };
        assert!(verify(&input).unwrap().ok);
        // The attacker deletes the last segment and the node's own checkpoints.
        let segs = segment::list_segments(&dir).unwrap();
        assert!(segs.len() >= 2, "{segs:?}");
        std::fs::remove_file(&segs.last().unwrap().1).unwrap();
        std::fs::write(dir.join(segment::CHECKPOINTS_FILE), "").unwrap();
        let report = verify(&input).unwrap();
        assert!(!report.ok);
        assert_eq!(report.first_bad.unwrap().kind, FindingKind::TailMissing);
        let _ = r.stop.send(());
    }

    #[tokio::test]
    async fn forged_replayed_and_malformed_checkpoints_are_refused_over_the_wire() {
        let r = start("cp-att", TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
        let k1 = AuditKey::ephemeral().unwrap();
        let k2 = AuditKey::ephemeral().unwrap();
        let mut n1 = client(&r, "n1");
        let mut n2 = client(&r, "n2");
        let cp = |k: &AuditKey, node: &str, seq: u64| {
            k.checkpoint(node, seq, &[7; 32], "2026-01-01T00:00:00Z".into())
        };
        n1.checkpoint(&cp(&k1, "n1", 5)).await.unwrap();
        n2.checkpoint(&cp(&k2, "n2", 5)).await.unwrap();
        let before = std::fs::read(copy_of(&r, "n1")).unwrap();
        let refused = |e: IdentityError, want: &str| match e {
            IdentityError::Refused { message } => {
                assert!(message.contains(want), "{message} lacks {want:?}")
            }
            other => panic!("not refused: {other}"),
        };
        // Signed by another node's key.
        refused(
            n1.checkpoint(&cp(&k2, "n1", 6)).await.unwrap_err(),
            "re-keying is an operator action",
        );
        // n2 handing in n1's checkpoint.
        refused(
            n2.checkpoint(&cp(&k1, "n1", 6)).await.unwrap_err(),
            "but was sent by node",
        );
        // A replayed older one.
        refused(
            n1.checkpoint(&cp(&k1, "n1", 4)).await.unwrap_err(),
            "rollback or replay refused",
        );
        // Malformed and oversize messages, on a raw connection.
        let mut raw = client(&r, "n1");
        raw.bundle().await.unwrap();
        let mut conn = raw.into_connection().unwrap();
        for (line, want) in [
            (
                br#"{"op":"checkpoint","checkpoint":{"v":1}}"#.to_vec(),
                "malformed request",
            ),
            (
                format!(
                    r#"{{"op":"checkpoint","checkpoint":{}}}"#,
                    serde_json::to_string(&Checkpoint {
                        sig: "00".into(),
                        ..cp(&k1, "n1", 9)
                    })
                    .unwrap()
                )
                .into_bytes(),
                "malformed checkpoint",
            ),
            (
                format!(
                    r#"{{"op":"checkpoint","checkpoint":{{"node":"{}"}}}}"#,
                    "n".repeat(70_000)
                )
                .into_bytes(),
                "longer than",
            ),
        ] {
            let mut line = line;
            line.push(b'\n');
            write_line(&mut conn, &line).await.unwrap();
            let mut buf = Vec::new();
            let got = timeout(
                Duration::from_secs(10),
                read_line_bounded(&mut conn, &mut buf, 1 << 20),
            )
            .await
            .unwrap()
            .unwrap();
            assert!(matches!(got, LineRead::Line));
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["ok"], false, "{v}");
            assert!(v["error"].as_str().unwrap().contains(want), "{v}");
        }
        assert_eq!(std::fs::read(copy_of(&r, "n1")).unwrap(), before);
        assert_eq!(r.custody.stats().refused.load(Ordering::Relaxed), 4);
        assert_eq!(r.custody.stats().keys_registered.load(Ordering::Relaxed), 2);
        let _ = r.stop.send(());
    }

    #[tokio::test]
    async fn checkpoints_queue_while_the_authority_is_down_and_go_out_when_it_is_back() {
        // Reserve a port, release it: the agent's first attempts fail to connect.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dir = TempDir::new("cp-down");
        let ca = Arc::new(Authority::init(&dir.0, td()).unwrap());
        let creds = ca.node_credentials("n1").unwrap();
        let trust = TrustStore::from_bundle_pem(td(), &creds.bundle_pem).unwrap();
        let c = AuthorityClient::new(&port.to_string(), &creds.chain_pem, &creds.key_pem, trust)
            .unwrap();
        let (sink, queue) = forward::channel(4);
        let stats = queue.stats();
        let sender = tokio::spawn(queue.run(c));
        let k = AuditKey::ephemeral().unwrap();
        for seq in 0..6 {
            sink.offer(&k.checkpoint("n1", seq, &[1; 32], "t".into()));
        }
        // The queue holds 4 (one may be in flight already): the rest dropped, counted.
        assert!(stats.dropped.load(Ordering::Relaxed) >= 1);
        drop(sink);
        // The first attempt fails: nothing listens yet.
        timeout(Duration::from_secs(10), async {
            while stats.retries.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the forwarder never tried to reach the authority");
        let listener = TcpListener::bind(port).await.unwrap();
        let (custody, stop) = serve_custody(listener, &ca);
        timeout(Duration::from_secs(30), sender)
            .await
            .expect("queued checkpoints were not sent once the authority was back")
            .unwrap();
        let sent = stats.sent.load(Ordering::Relaxed);
        assert_eq!(sent + stats.dropped.load(Ordering::Relaxed), 6);
        assert_eq!(custody.stats().accepted.load(Ordering::Relaxed), sent);
        let _ = stop.send(());
    }
}
