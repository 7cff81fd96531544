//! A test client for a node agent's HBONE port (15008), legitimate or hostile: TLS 1.3 with
//! any client certificate (another trust domain's, an expired one, a node's), a server
//! verifier that expects a chosen workload identity, then HTTP/2 requests of any shape.
//!
//! Sockets belong to the network namespace of the thread that creates them, so everything
//! here runs on a current-thread tokio runtime inside a thread that joined the node's
//! namespace ([`run_in_netns`]); a multi-threaded runtime would open sockets from threads in
//! the test process's own namespace.

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, StatusCode};
use mesh_agent::tls::{provider, server_name_for, SpiffeId, SpiffeServerVerifier, TrustStore};
use rustls::ClientConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::{client::TlsStream, TlsConnector};

/// The trust domain of every test cluster, parsed.
pub fn trust_domain() -> mesh_agent::tls::TrustDomain {
    mesh_agent::tls::TrustDomain::new(crate::authority::TRUST_DOMAIN)
        .expect("the test trust domain is valid")
}

/// The SPIFFE ID of workload `sa` (service account) in namespace `ns` of the test trust domain.
#[track_caller]
pub fn workload_id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(trust_domain(), ns, sa).unwrap_or_else(|e| panic!("SPIFFE ID for {ns}/{sa}: {e}"))
}

/// Runs `f`'s future to completion on a current-thread runtime, on a thread inside the network
/// namespace `ns` (see the module documentation), and returns its output.
#[track_caller]
pub fn run_in_netns<F, Fut, T>(ns: &Path, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    crate::netns::in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a current-thread tokio runtime")
            .block_on(f())
    })
}

/// A TLS 1.3 client configuration with ALPN `h2` that presents the chain and key given (PEM,
/// anything: the point is to try certificates the server must refuse) and accepts only a
/// server that verifies against `trust` as the workload `expect_server`.
#[track_caller]
pub fn client_config(
    trust: Arc<TrustStore>,
    chain_pem: &str,
    key_pem: &str,
    expect_server: &SpiffeId,
) -> Arc<ClientConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("client certificate chain PEM: {e}"));
    assert!(
        !chain.is_empty(),
        "client certificate chain PEM holds no certificate"
    );
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .unwrap_or_else(|e| panic!("client key PEM: {e}"));
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported by the ring provider")
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(trust, expect_server.clone()))
        .with_client_auth_cert(chain, key)
        .unwrap_or_else(|e| panic!("client certificate and key: {e}"));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// How one attempt at an HBONE connection ended.
#[derive(Debug)]
pub struct Attempt {
    /// The client socket's local address (a node agent logs it as `peer`).
    pub local: Option<SocketAddr>,
    /// `Ok(status)` if a request got an answer; otherwise where and why it failed.
    pub result: Result<StatusCode, String>,
}

impl Attempt {
    /// Whether the request was answered with a success status (a tunnel was opened).
    pub fn succeeded(&self) -> bool {
        matches!(&self.result, Ok(s) if s.is_success())
    }
}

/// TCP connect to `addr` (bounded by `limit`); returns the stream and its local address.
pub async fn tcp_connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    match timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("tcp connect: {e}")),
        Err(_) => Err("tcp connect timed out".into()),
    }
}

/// The TLS handshake on `tcp`, with SNI [`server_name_for`] `sni` (the workload whose
/// certificate the agent should present).
pub async fn tls_handshake(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    sni: &SpiffeId,
    limit: Duration,
) -> Result<TlsStream<TcpStream>, String> {
    let name: ServerName<'static> = server_name_for(sni);
    match timeout(limit, TlsConnector::from(config).connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("tls: {e}")),
        Err(_) => Err("tls handshake timed out".into()),
    }
}

/// The HTTP/2 handshake over an established stream; the connection is driven by a task of
/// the current runtime.
pub async fn h2_handshake<S>(io: S, limit: Duration) -> Result<SendRequest<Bytes>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = match timeout(limit, h2::client::handshake(io)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(format!("h2 handshake: {e}")),
        Err(_) => return Err("h2 handshake timed out".into()),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Sends `req` (no body) and waits for the response status.
pub async fn h2_request(
    send: SendRequest<Bytes>,
    req: Request<()>,
    limit: Duration,
) -> Result<StatusCode, String> {
    let fut = async move {
        let mut send = send
            .ready()
            .await
            .map_err(|e| format!("h2 not ready: {e}"))?;
        let (response, _body) = send
            .send_request(req, false)
            .map_err(|e| format!("h2 send: {e}"))?;
        let response = response.await.map_err(|e| format!("h2 response: {e}"))?;
        Ok(response.status())
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err("h2 request timed out".into()),
    }
}

/// A CONNECT request for `authority`, as HBONE sends it.
pub fn connect_request(authority: SocketAddr) -> Request<()> {
    Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .expect("a CONNECT request to ip:port is valid")
}

/// The whole path: TCP, TLS (SNI for `sni`), HTTP/2, then `req`; every step bounded by
/// `limit`. Success means the agent answered the request.
pub async fn attempt(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sni: &SpiffeId,
    req: Request<()>,
    limit: Duration,
) -> Attempt {
    let tcp = match tcp_connect(addr, limit).await {
        Ok(t) => t,
        Err(e) => {
            return Attempt {
                local: None,
                result: Err(e),
            }
        }
    };
    let local = tcp.local_addr().ok();
    let result = async {
        let tls = tls_handshake(tcp, config, sni, limit).await?;
        let send = h2_handshake(tls, limit).await?;
        h2_request(send, req, limit).await
    }
    .await;
    Attempt { local, result }
}
