//! The agent's proxies, shaped like ztunnel's:
//! - [`outbound`] accepts the connections the kernel captured from local pods and carries
//!   them to their original destination: over an HBONE tunnel (mTLS, HTTP/2 CONNECT) to the
//!   destination node's agent, or straight to the pod when it is on this node;
//! - [`inbound`] terminates HBONE from other agents, verifies the peer workload's identity
//!   and carries each tunnel to the local pod;
//! - [`pool`] keeps outbound HBONE connections per (source identity, destination identity,
//!   destination node);
//! - [`hbone`] is the wire format (transport-agnostic framing);
//! - [`l7`] enforces authorization per HTTP request on ports declared HTTP.

pub mod copy;
pub mod destination;
pub mod hbone;
pub mod inbound;
#[cfg(test)]
mod inproc_tests;
pub mod l7;
pub mod limits;
pub mod listen;
pub mod outbound;
pub mod pool;
pub mod record;
pub mod services;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_common::{is_mapped_v4, mapped_v4, ConnKey, OrigDst, AF_INET};
use rustls::{ClientConfig, ServerConfig};
use tokio::{net::TcpStream, sync::watch, time::timeout};

use crate::identity::IdentityError;
use crate::tls::{SpiffeId, TrustStore};

/// What the proxies need from the identity layer (the agent's identity manager implements
/// it; tests can use a fixed set of certificates).
pub trait Identities: Send + Sync + 'static {
    /// Inbound HBONE: TLS 1.3, ALPN h2, this node's workload certificates chosen by SNI,
    /// client certificates required and verified.
    fn server_config(&self) -> Arc<ServerConfig>;
    /// Outbound HBONE: presents `src`'s current certificate and accepts only `dst`.
    fn client_config(
        &self,
        src: &SpiffeId,
        dst: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError>;
    /// The trust bundle and revocation list in force.
    fn trust(&self) -> Arc<TrustStore>;
    /// Bumped whenever the revocation list changes: live connections are re-checked.
    fn revocations(&self) -> watch::Receiver<u64>;
}

/// What both proxies share: the registry, identities, destination policy, telemetry and the
/// node's mesh source addresses.
#[derive(Clone)]
pub struct ProxyDeps {
    /// This node's name.
    pub node: String,
    /// The mesh state (workloads, nodes, services), current version.
    pub mesh: crate::state::live::MeshHandle,
    pub identities: Arc<dyn Identities>,
    pub trust_domain: crate::tls::TrustDomain,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub policies: crate::policy::Policies,
    pub source: SourceAddrs,
    /// How request paths on HTTP ports are normalized before L7 policy and forwarding.
    pub path_normalization: l7::normalize::PathNormalization,
    /// The connection budget, per-source caps and request-head bounds of both proxies.
    pub admission: Arc<limits::Admission>,
    /// Where the destination side records its decisions (`None`: not recorded).
    pub audit: Option<crate::audit::AuditLog>,
}

impl ProxyDeps {
    /// The destination side both proxies share, connecting to pods within `connect_timeout`.
    pub fn destination(&self, connect_timeout: Duration) -> destination::Destination {
        destination::Destination {
            policies: self.policies.clone(),
            metrics: Arc::clone(&self.metrics),
            admission: Arc::clone(&self.admission),
            source: self.source,
            connect_timeout,
            path_normalization: self.path_normalization,
            audit: self.audit.clone(),
        }
    }
}

/// Where the agent's own upstream sockets come from: the node addresses that the kernel's
/// STRICT check admits as "from the mesh".
#[derive(Clone, Copy, Debug)]
pub struct SourceAddrs {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

impl SourceAddrs {
    fn for_dst(&self, dst: &SocketAddr) -> Option<IpAddr> {
        match dst {
            SocketAddr::V4(_) => self.v4,
            SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => self.v4,
            SocketAddr::V6(_) => self.v6,
        }
    }
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {dst} timed out after {after:?}")]
    Timeout { dst: SocketAddr, after: Duration },
    #[error("connect to {dst}: {source}")]
    Io {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Connects to `dst` from the node's mesh source address (when one is configured for the
/// family), with a timeout and `TCP_NODELAY`.
pub async fn connect_from(
    src: &SourceAddrs,
    dst: SocketAddr,
    limit: Duration,
) -> Result<TcpStream, ConnectError> {
    let dst = match dst {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => dst,
        },
        v4 => v4,
    };
    let io = |source| ConnectError::Io { dst, source };
    let sock = match dst {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(io)?;
    if let Some(ip) = src.for_dst(&dst) {
        // Bind the address only: the port is chosen at connect() from the whole 4-tuple, so
        // connections to different destinations can share source ports (no ephemeral-port
        // exhaustion from binding). Best effort: without it, bind still works.
        let _ = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        sock.bind(SocketAddr::new(ip, 0)).map_err(io)?;
    }
    let stream = timeout(limit, sock.connect(dst))
        .await
        .map_err(|_| ConnectError::Timeout { dst, after: limit })?
        .map_err(io)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// An IP address as 4 network-order words, IPv4 mapped into IPv6.
pub fn ip_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => mapped_v4(u32::from_ne_bytes(v4.octets())),
            None => words_of(v6.octets()),
        },
    }
}

fn words_of(b: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The inverse of [`ip_words`]: mapped addresses come back as IPv4.
pub fn ip_from_words(w: [u32; 4]) -> IpAddr {
    if is_mapped_v4(&w) {
        IpAddr::from(w[3].to_ne_bytes())
    } else {
        let mut b = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(b)
    }
}

/// The key the kernel's sock_ops program wrote for a connection that the
/// agent accepted from `peer` on `local`.
pub fn conn_key(peer: SocketAddr, local: SocketAddr) -> ConnKey {
    ConnKey {
        src_addr_be: ip_words(peer.ip()),
        dst_addr_be: ip_words(local.ip()),
        src_port: u32::from(peer.port()),
        dst_port: u32::from(local.port()),
    }
}

/// The original destination as a socket address, in the family the
/// application used.
pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    let ip = ip_from_words(orig.addr_be);
    let ip = match (orig.family, ip) {
        (AF_INET, ip) => ip,
        (_, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (_, ip) => ip,
    };
    SocketAddr::new(ip, u16::from_be(orig.port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_sockets_bind_the_mesh_address_without_reserving_a_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let src = SourceAddrs {
            v4: Some("127.0.0.1".parse().unwrap()),
            v6: None,
        };
        let stream = connect_from(&src, dst, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(stream.local_addr().unwrap().ip(), src.v4.unwrap());
        let no_port =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::IpBindAddressNoPort)
                .unwrap();
        assert!(no_port, "IP_BIND_ADDRESS_NO_PORT not set");
    }

    #[test]
    fn words_roundtrip_v4_and_v6() {
        for s in ["10.1.0.2", "fd00:1::2", "::1", "192.168.7.9"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(ip_from_words(ip_words(ip)), ip, "{s}");
        }
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            ip_from_words(ip_words(mapped)),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn conn_key_matches_kernel_layout() {
        let k = conn_key(
            "10.1.0.2:40000".parse().unwrap(),
            "10.0.0.1:15001".parse().unwrap(),
        );
        assert_eq!(k.src_port, 40000);
        assert_eq!(k.dst_port, 15001);
        assert_eq!(k.src_addr_be[3].to_ne_bytes(), [10, 1, 0, 2]);
    }

    #[test]
    fn orig_dst_keeps_family_and_port() {
        let o = OrigDst {
            addr_be: ip_words("10.2.0.3".parse().unwrap()),
            port_be: 8080u16.to_be(),
            family: AF_INET,
            src_workload_id: 1,
            dst_workload_id: 2,
        };
        assert_eq!(orig_dst_addr(&o), "10.2.0.3:8080".parse().unwrap());
    }
}
