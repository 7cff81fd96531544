//! Authorization at the destination, as the proxies ask it: what they know of a connection
//! ([`ConnInfo`]) and of a request ([`RequestAttrs`]), one verdict type per level
//! ([`ConnVerdict`], [`RequestVerdict`]) and the [`Authorizer`] trait that the policy engine
//! ([`super::engine::PolicyView`], one generation of the maps) implements. The destination
//! side of every connection — an HBONE tunnel from another node, or a same-node connection —
//! asks it once for the connection (L4, with the verified identity) and, on HTTP ports, once
//! per request (L7). The active generation is published through a watch channel
//! ([`Policies`]); live connections are asked again on every new one.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::sync::watch;

use super::engine::{L4Decision, PolicyView, RequestDecision, RequestHeaders};
use crate::tls::SpiffeId;

/// What the destination knows of a connection when it authorizes it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The source workload (registry id), when the source address is one of a workload that
    /// has the verified identity.
    pub src_workload: Option<u32>,
    /// The verified identity of the source (mTLS, or the kernel for same-node).
    pub src_identity: SpiffeId,
    /// The original source address (same-node: the pod's; HBONE: the `Forwarded` claim,
    /// admitted only if it belongs to a workload with the verified identity).
    pub src_addr: Option<SocketAddr>,
    /// The original destination.
    pub dst: SocketAddr,
    /// The destination workload (registry id), on this node.
    pub dst_workload: u32,
    /// `namespace/name` of the destination workload (for logs).
    pub dst_name: String,
    /// Whether the destination port is one of the workload's `httpPorts`.
    pub http: bool,
}

impl ConnInfo {
    pub fn src_ip(&self) -> Option<IpAddr> {
        self.src_addr.map(|a| a.ip().to_canonical())
    }
}

/// The verdict for a connection (L4), the kernel's and the agent's alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnVerdict {
    Allow,
    Deny,
    /// Allowed at L4, decided per request (HTTP ports only; elsewhere a proxy refuses it).
    PerRequest,
}

/// The verdict for one HTTP request (L7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequestVerdict {
    Allow,
    /// Denied (the default: fail closed).
    #[default]
    Deny,
}

/// A connection decision with what the engine found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnDecision {
    pub verdict: ConnVerdict,
    /// The deciding policy (`ns/name`), if one decided.
    pub policy: Option<Arc<str>>,
    /// The L4 lookup behind it (`None`: the source is not a known workload).
    pub l4: Option<L4Decision>,
    /// The connection is served request by request (an HTTP port it is allowed on): dry-run
    /// and AUDIT results come from each request, not from `l4`.
    pub per_request: bool,
    /// The policy generation that decided (0: no policy).
    pub generation: u32,
}

/// One HTTP request, as far as policy looks at it.
#[derive(Clone, Copy)]
pub struct RequestAttrs<'a> {
    pub method: &'a str,
    /// The normalized path (policy ignores the query string).
    pub path: &'a str,
    pub host: Option<&'a str>,
    /// Header fields (`when` `request.headers[...]`).
    pub headers: &'a dyn RequestHeaders,
}

impl std::fmt::Debug for RequestAttrs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestAttrs")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// A policy generation as the proxies ask it.
pub trait Authorizer: Send + Sync + 'static {
    /// The connection-level decision.
    fn connection(&self, c: &ConnInfo) -> ConnDecision;
    /// The decision for one request on a connection whose verdict was `PerRequest`.
    fn request(&self, c: &ConnInfo, req: &RequestAttrs<'_>) -> RequestDecision;
    /// The generation it was read from (0: no policy).
    fn generation(&self) -> u32;
}

/// The active policy generation, and notification of new ones (the generation watcher,
/// [`super::source::spawn_generation_watcher`], publishes it).
pub type Policies = watch::Receiver<Arc<PolicyView>>;

/// A channel that only ever holds generation 0 (no policy: everything is allowed).
pub fn allow_all() -> (watch::Sender<Arc<PolicyView>>, Policies) {
    watch::channel(Arc::new(PolicyView::default()))
}
