//! The node agent's client for the authority service (see [`crate::authority::protocol`]).

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::IdentityError;
use crate::audit::checkpoint::Checkpoint;
use crate::authority::protocol::{
    read_line_bounded, write_line, LineRead, Request, Response, ALPN_AUTHORITY, MAX_RESPONSE_LINE,
    MAX_STATE_LINE,
};
use crate::authority::RootId;
use crate::tls::cert::{
    certified_key, certs_from_pem, csr_pem, identity_params, new_key, node_id_of,
};
use crate::tls::verify::{tls13_client, SpiffeServerVerifier, TrustStore};
use crate::tls::{NodeId, PeerId, Serial, SpiffeId, TlsError, WorkloadCert};

/// A node agent's connection to the authority. Requests are sequential (`&mut self`); a
/// connection closed by the authority (request limit, restart) is re-opened once per request.
pub struct AuthorityClient {
    addr: String,
    node: NodeId,
    connector: TlsConnector,
    trust: Arc<TrustStore>,
    timeout: Duration,
    conn: Option<BufReader<tokio_rustls::client::TlsStream<TcpStream>>>,
}

impl std::fmt::Debug for AuthorityClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityClient")
            .field("addr", &self.addr)
            .field("node", &self.node.to_string())
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl AuthorityClient {
    /// Default time allowed for connecting plus one request/response.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Connects to the authority at `addr` (`host:port`) as the node whose certificate chain
    /// and key are given, trusting the roots in `bundle_pem`.
    pub async fn connect(
        addr: &str,
        node_cert_chain_pem: &str,
        node_key_pem: &str,
        bundle_pem: &str,
    ) -> Result<Self, IdentityError> {
        let chain = certs_from_pem(node_cert_chain_pem, "node certificate")?;
        let node = node_id_of(&chain)?;
        let trust = TrustStore::from_bundle_pem(node.trust_domain().clone(), bundle_pem)?;
        Self::connect_with_trust(addr, node_cert_chain_pem, node_key_pem, trust).await
    }

    /// Like [`AuthorityClient::connect`], sharing a trust store with the rest of the agent (so
    /// that a bundle fetched here and installed with [`TrustStore::set_bundle_pem`] is used
    /// for the authority too).
    pub async fn connect_with_trust(
        addr: &str,
        node_cert_chain_pem: &str,
        node_key_pem: &str,
        trust: Arc<TrustStore>,
    ) -> Result<Self, IdentityError> {
        let mut client = Self::new(addr, node_cert_chain_pem, node_key_pem, trust)?;
        let conn = timeout(client.timeout, client.open()).await.map_err(|_| {
            IdentityError::Timeout {
                op: "connecting to the authority",
                after: client.timeout,
            }
        })??;
        client.conn = Some(conn);
        Ok(client)
    }

    /// A client that connects on its first request (no I/O here): an agent can start while
    /// the authority is unreachable and keep retrying.
    pub fn new(
        addr: &str,
        node_cert_chain_pem: &str,
        node_key_pem: &str,
        trust: Arc<TrustStore>,
    ) -> Result<Self, IdentityError> {
        let chain = certs_from_pem(node_cert_chain_pem, "node certificate")?;
        let node = node_id_of(&chain)?;
        if node.trust_domain() != trust.trust_domain() {
            return Err(TlsError::ForeignTrustDomain {
                identity: node.to_string(),
                expected: trust.trust_domain().clone(),
            }
            .into());
        }
        let ck = certified_key(chain, node_key_pem)?;
        let verifier =
            SpiffeServerVerifier::for_peer(trust.clone(), PeerId::authority(trust.trust_domain()));
        let config = tls13_client(verifier, ck, &[ALPN_AUTHORITY])?;
        Ok(Self {
            addr: addr.to_owned(),
            node,
            connector: TlsConnector::from(Arc::new(config)),
            trust,
            timeout: Self::DEFAULT_TIMEOUT,
            conn: None,
        })
    }

    /// Drops the connection (a request abandoned mid-way must not leave its answer to be read
    /// as the next one's); the next request connects again.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The trust store this client verifies the authority with.
    pub fn trust_store(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    /// Obtains a certificate for `identity`: a P-256 key pair is generated here and only a CSR
    /// is sent. The returned certificate is checked: it is for `identity`, carries our key and
    /// verifies against our trust bundle.
    pub async fn sign(
        &mut self,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        self.sign_rooted(identity, lifetime)
            .await
            .map(|(cert, _)| cert)
    }

    /// [`AuthorityClient::sign`], also returning the root the certificate chains to, if the
    /// authority names it.
    pub async fn sign_rooted(
        &mut self,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(WorkloadCert, Option<RootId>), IdentityError> {
        let key = new_key()?;
        let csr_pem = csr_pem(identity_params(&identity.to_string())?, &key)?;
        let response = self
            .request(&Request::Sign {
                identity: identity.to_string(),
                csr_pem,
                lifetime_secs: Some(lifetime.as_secs()),
            })
            .await?;
        let chain = response
            .cert_chain_pem
            .ok_or_else(|| IdentityError::Protocol {
                detail: "sign response without cert_chain_pem".into(),
            })?;
        let cert = WorkloadCert::from_pem(&chain, &key.serialize_pem())?;
        if cert.identity() != identity {
            return Err(TlsError::WrongPeer {
                expected: identity.to_string(),
                got: cert.identity().to_string(),
            }
            .into());
        }
        self.trust.verify_workload_cert(&cert)?;
        Ok((cert, response.root))
    }

    /// The authority's current trust bundle (PEM). Install it with
    /// [`TrustStore::set_bundle_pem`].
    pub async fn bundle(&mut self) -> Result<String, IdentityError> {
        self.bundle_rooted().await.map(|(pem, _)| pem)
    }

    /// [`AuthorityClient::bundle`] and the root new certificates are issued under, if the
    /// authority names it.
    pub async fn bundle_rooted(&mut self) -> Result<(String, Option<RootId>), IdentityError> {
        let response = self.request(&Request::Bundle {}).await?;
        let pem = response.bundle_pem.ok_or_else(|| IdentityError::Protocol {
            detail: "bundle response without bundle_pem".into(),
        })?;
        certs_from_pem(&pem, "trust bundle")?;
        Ok((pem, response.active_root))
    }

    /// The authority's revoked serials. Install them with [`TrustStore::set_revoked`].
    pub async fn revocations(&mut self) -> Result<Vec<Serial>, IdentityError> {
        let response = self.request(&Request::Revocations {}).await?;
        response.revoked.ok_or_else(|| IdentityError::Protocol {
            detail: "revocations response without revoked".into(),
        })
    }

    /// Hands a signed audit checkpoint of this node's chain to the authority, which keeps
    /// it (see [`crate::authority::custody`]). A refusal is [`IdentityError::Refused`].
    pub async fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), IdentityError> {
        self.request(&Request::Checkpoint {
            checkpoint: checkpoint.clone(),
        })
        .await
        .map(|_| ())
    }

    /// The mesh state once its version differs from `after` (`None`: whatever is current),
    /// waiting up to `wait` at the authority; `Ok(None)` when nothing changed by then. The
    /// snapshot is returned as sent: verify it ([`crate::state::Snapshot::verify`]) before use.
    pub async fn state(
        &mut self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<Option<crate::state::Snapshot>, IdentityError> {
        self.state_reporting(after, wait, None).await
    }

    /// [`AuthorityClient::state`], reporting what this agent runs (`active`).
    pub async fn state_reporting(
        &mut self,
        after: Option<u64>,
        wait: Duration,
        active: Option<crate::authority::protocol::Active>,
    ) -> Result<Option<crate::state::Snapshot>, IdentityError> {
        let request = Request::State {
            after,
            wait_ms: Some(wait.as_millis() as u64),
            active,
        };
        // The request's own deadline (never stored: a poll abandoned mid-way changes nothing).
        let response = self
            .request_bounded(&request, MAX_STATE_LINE, self.timeout + wait)
            .await?;
        match (response.state, response.unchanged) {
            (Some(s), _) => Ok(Some(*s)),
            (None, Some(true)) => Ok(None),
            _ => Err(IdentityError::Protocol {
                detail: "state response without state".into(),
            }),
        }
    }

    /// The open connection, taken out of the client: for tests that write raw request lines.
    #[cfg(test)]
    pub(crate) fn into_connection(
        self,
    ) -> Option<BufReader<tokio_rustls::client::TlsStream<TcpStream>>> {
        self.conn
    }

    async fn open(
        &self,
    ) -> Result<BufReader<tokio_rustls::client::TlsStream<TcpStream>>, IdentityError> {
        let tcp =
            TcpStream::connect(&self.addr)
                .await
                .map_err(|source| IdentityError::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        let name =
            ServerName::try_from("authority.mesh.internal").expect("a constant valid DNS name");
        let tls =
            self.connector
                .connect(name, tcp)
                .await
                .map_err(|source| IdentityError::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
        Ok(BufReader::new(tls))
    }

    async fn request(&mut self, request: &Request) -> Result<Response, IdentityError> {
        self.request_bounded(request, MAX_RESPONSE_LINE, self.timeout)
            .await
    }

    async fn request_bounded(
        &mut self,
        request: &Request,
        max: usize,
        after: Duration,
    ) -> Result<Response, IdentityError> {
        let mut line = serde_json::to_vec(request).map_err(|e| IdentityError::Protocol {
            detail: format!("encoding the request: {e}"),
        })?;
        line.push(b'\n');
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = timeout(after, self.exchange(&line, max))
                .await
                .unwrap_or(Err(IdentityError::Timeout {
                    op: "authority request",
                    after,
                }));
            match result {
                Ok(response) if response.ok => return Ok(response),
                Ok(response) => {
                    return Err(IdentityError::Refused {
                        message: response.error.unwrap_or_default(),
                    })
                }
                Err(e) => {
                    self.conn = None;
                    // A connection the authority closed (limit, restart): one fresh try.
                    if attempt == 1 && matches!(e, IdentityError::Transport { .. }) {
                        debug!(error = %e, "authority connection lost, reconnecting");
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn exchange(&mut self, line: &[u8], max: usize) -> Result<Response, IdentityError> {
        if self.conn.is_none() {
            self.conn = Some(self.open().await?);
        }
        let conn = self.conn.as_mut().expect("connection opened above");
        let transport = |source| IdentityError::Transport { source };
        write_line(conn, line).await.map_err(transport)?;
        let mut buf = Vec::with_capacity(4096);
        match read_line_bounded(conn, &mut buf, max)
            .await
            .map_err(transport)?
        {
            LineRead::Line => {}
            LineRead::Eof => {
                return Err(IdentityError::Transport {
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })
            }
            LineRead::TooLong => {
                return Err(IdentityError::Protocol {
                    detail: format!("response line longer than {max} bytes"),
                })
            }
        }
        serde_json::from_slice(&buf).map_err(|e| IdentityError::Protocol {
            detail: format!("malformed response: {e}"),
        })
    }
}
