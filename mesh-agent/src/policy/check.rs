//! `mesh-agent policy check`: what the destination agent would decide for one connection or
//! request, without a cluster.
//!
//! There is no second evaluator here. The policies are compiled by the agent's compiler into
//! one generation of the policy maps, read as the [`PolicyView`] the agent reads back from
//! the pinned maps (or the live generation is read from a node's pin directory), and the
//! request is asked of that view — [`PolicyView::explain_connection`] and
//! [`PolicyView::explain_request`] are what `Authorizer::connection`/`request` run for every
//! HBONE and same-node connection. What the proxies add on top is mirrored in one place
//! each: the PeerAuthentication of the destination for plaintext ([`plaintext_decision`]),
//! request-level verdicts on a port that is not HTTP (refused, as `proxy/inbound.rs`
//! refuses them), and the request path ([`normalize_for_check`]).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;

pub mod cases;

use super::{
    authorize::{ConnInfo, ConnVerdict, RequestAttrs, RequestVerdict},
    engine::PolicyView,
    maps::{MapsError, PolicyMaps},
    source::{ApplyError, CompileContext},
};
use crate::{
    registry::{Registry, Workload},
    tls::TrustDomain,
};

/// The generation number a compiled (not applied) view is given.
pub const CHECK_GENERATION: u32 = 1;

/// Why a check could not be made. Every variant but [`CheckError::Maps`] is bad input
/// (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Policy(#[from] ApplyError),
    #[error("reading the live policy generation: {0}")]
    Maps(#[from] MapsError),
    #[error("unknown workload {name:?}: no workload of the registry is `namespace/name` {name}")]
    UnknownWorkload { name: String },
    #[error("workload {name:?} must be written `namespace/name`")]
    WorkloadName { name: String },
    #[error("{addr} is not the address of a workload of the registry{hint}")]
    UnknownAddress { addr: IpAddr, hint: &'static str },
    #[error("--to {to:?} is neither `namespace/name` of a workload nor an IP address")]
    Destination { to: String },
    #[error("workload {workload} has no {family} address (the destination is {dst})")]
    NoAddress {
        workload: String,
        family: &'static str,
        dst: IpAddr,
    },
    #[error("trust domain {td:?}: {source}")]
    TrustDomain {
        td: String,
        #[source]
        source: crate::tls::SpiffeIdError,
    },
    #[error("source workload {workload}: {source}")]
    Identity {
        workload: String,
        #[source]
        source: crate::tls::SpiffeIdError,
    },
    #[error("the request path {path:?} cannot be used: {problem}")]
    Path { path: String, problem: &'static str },
    #[error("port 0 is not a destination port")]
    Port,
}

impl CheckError {
    /// Bad input (the policy, the registry, the request): exit code 2.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Policy(ApplyError::Maps(_)) | Self::Maps(_))
    }
}

/// Compiles the policy directory `dir` for `registry` exactly as the agent does (the same
/// loader, compiler and map contents) and reads it as the agent reads a generation.
pub fn compile_view(
    dir: &Path,
    registry: Arc<Registry>,
    root_ns: &str,
    trust_domain: &str,
) -> Result<PolicyView, CheckError> {
    let ctx = CompileContext {
        registry,
        root_ns: root_ns.to_owned(),
        trust_domain: trust_domain.to_owned(),
        // TODO(lead): a `policy check --trust-domain-alias`, as `run`/`apply` have.
        trust_domain_aliases: Vec::new(),
    };
    let (_, compiled) = ctx.load_and_compile(dir)?;
    PolicyView::from_compiled(CHECK_GENERATION, &compiled)
        .map_err(|e| CheckError::Policy(ApplyError::Maps(e)))
}

/// The active generation of the maps pinned in `pin_dir` (a node's live policy).
pub fn pinned_view(pin_dir: &Path) -> Result<PolicyView, CheckError> {
    let maps = PolicyMaps::open(pin_dir)?;
    // Never a generation being swapped out (re-checked after the read).
    Ok(maps.read_active_view()?)
}

/// Who sends the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestSource {
    /// A workload of the registry, `namespace/name`.
    Workload(String),
    /// An address: a workload's (then that workload), or, with plaintext, anything.
    Ip(IpAddr),
}

/// The HTTP request, as sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// Default `GET`.
    pub method: Option<String>,
    /// The request target as sent (raw). Default `/`.
    pub path: Option<String>,
    /// `Host`/`:authority`; default absent.
    pub host: Option<String>,
    /// Other header fields, `(name, value)` in order (`when request.headers[...]`).
    pub headers: Vec<(String, String)>,
}

/// Header fields given to `policy check`, read as the agent reads a request's.
#[derive(Clone, Debug, Default)]
pub struct CheckHeaders<'a>(pub &'a [(String, String)]);

impl crate::policy::RequestHeaders for CheckHeaders<'_> {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for (n, v) in self.0 {
            if n.eq_ignore_ascii_case(name) {
                f(v.as_bytes());
            }
        }
    }
}

/// A `--header NAME:VALUE` argument (name a token; the value as given, surrounding
/// whitespace trimmed as HTTP does).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected NAME:VALUE"))?;
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{name:?}: not a header field name"));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!("{name}: control characters in the value"));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_owned()))
}

/// One connection (and, on an HTTP port, one request) to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    pub from: RequestSource,
    /// Plaintext (no mTLS: no principal, no namespace) rather than mTLS.
    pub plaintext: bool,
    /// `namespace/name` of a workload, or one of its addresses.
    pub to: String,
    pub port: u16,
    pub http: HttpRequest,
    /// The mesh's path normalization (`mesh-agent run --path-normalization`).
    pub path_normalization: crate::proxy::l7::normalize::PathNormalization,
}

/// What decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Allow,
    Deny,
}

/// Where the decision was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// PeerAuthentication (plaintext to a STRICT workload is dropped by the kernel).
    PeerAuthentication,
    /// The connection (the kernel at `connect()`, and the destination agent).
    L4,
    /// The HTTP request (the destination agent).
    L7,
}

/// A dry-run policy's result for an allowed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DryRun {
    /// Always `deny` (a dry-run policy is only reported when it would deny).
    pub would: Decision,
    /// The dry-run policy, when one is named.
    pub policy: Option<String>,
}

/// The source as the destination sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceReport {
    /// `namespace/name`, when the source is a workload.
    pub workload: Option<String>,
    /// The principal policies match (`<td>/ns/<ns>/sa/<sa>`); none for plaintext.
    pub principal: Option<String>,
    pub ip: Option<IpAddr>,
    pub mtls: bool,
}

/// The destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationReport {
    pub workload: String,
    pub ip: IpAddr,
    pub port: u16,
    /// The port is one of the workload's `httpPorts`: requests are decided one by one.
    pub http: bool,
    /// The effective PeerAuthentication mode (`STRICT` or `PERMISSIVE`).
    pub mtls_mode: &'static str,
}

/// The request as decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestReport {
    pub method: String,
    /// As given.
    pub path: String,
    /// What policies were matched against (see [`normalize_for_check`]).
    pub normalized_path: String,
    pub host: Option<String>,
}

/// The result of a check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub decision: Decision,
    pub layer: Layer,
    /// The policy that decided (`namespace/name`); none when a default decided.
    pub policy: Option<String>,
    /// In words: which policy or which default decided.
    pub reason: String,
    /// Dry-run policies that would deny this allowed request.
    pub dry_run: Option<DryRun>,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
    pub source: SourceReport,
    pub destination: DestinationReport,
    /// The HTTP request, on an HTTP port.
    pub request: Option<RequestReport>,
    /// The policy generation decided with (`1` for a compiled directory).
    pub generation: u32,
    /// Remarks (fields given but not used, and why).
    pub notes: Vec<String>,
}

impl CheckReport {
    /// The process exit code: 0 allow, 3 deny.
    pub fn exit_code(&self) -> u8 {
        match self.decision {
            Decision::Allow => 0,
            Decision::Deny => 3,
        }
    }

    /// The report for humans.
    pub fn text(&self) -> String {
        let mut t = format!(
            "decision: {}\nreason: {}\n",
            match self.decision {
                Decision::Allow => "ALLOW",
                Decision::Deny => "DENY",
            },
            self.reason
        );
        t.push_str(&format!(
            "policy: {}\n",
            self.policy.as_deref().unwrap_or("- (a default decided)")
        ));
        if let Some(d) = &self.dry_run {
            t.push_str(&format!(
                "dry-run: would deny ({})\n",
                d.policy
                    .as_deref()
                    .unwrap_or("default deny of dry-run ALLOW policies")
            ));
        }
        if !self.audit.is_empty() {
            t.push_str(&format!("audit: {}\n", self.audit.join(", ")));
        }
        let s = &self.source;
        t.push_str(&format!(
            "source: {} ({}{})\n",
            s.workload.as_deref().unwrap_or("-"),
            if s.mtls { "mTLS " } else { "plaintext" },
            s.principal.as_deref().unwrap_or(""),
        ));
        let d = &self.destination;
        t.push_str(&format!(
            "destination: {} {} port {}{} ({})\n",
            d.workload,
            d.ip,
            d.port,
            if d.http { " (HTTP)" } else { "" },
            d.mtls_mode
        ));
        if let Some(r) = &self.request {
            t.push_str(&format!(
                "request: {} {} host {}\nnormalized path: {}\n",
                r.method,
                r.path,
                r.host.as_deref().unwrap_or("-"),
                r.normalized_path
            ));
        }
        for n in &self.notes {
            t.push_str(&format!("note: {n}\n"));
        }
        t.push_str(&format!("generation: {}\n", self.generation));
        t
    }
}

/// Why a path cannot be normalized (the request would be refused with `400`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PathRejected(pub &'static str);

/// What policies are matched against, from the request as sent: the agent's own request-target
/// split and path normalizer (`proxy/l7/normalize.rs`, the mesh default mode) — an absolute-form
/// target's authority replaces the host, the query is not matched. An `Err` is a request the
/// agent refuses with `400` before policy (the same checks as `proxy/l7/http1.rs`).
pub fn normalize_for_check(
    raw: &str,
    method: &str,
    mode: crate::proxy::l7::normalize::PathNormalization,
) -> Result<(String, Option<String>), PathRejected> {
    use crate::proxy::l7::normalize::{normalize, split_target};
    if !crate::proxy::l7::http1::valid_method(method) {
        return Err(PathRejected("method with lower-case letters or empty"));
    }
    let target = split_target(raw, method).map_err(|e| PathRejected(e.detail()))?;
    let path = if target.is_asterisk() {
        "*".to_owned()
    } else {
        normalize(target.path, mode).map_err(|e| PathRejected(e.detail()))?
    };
    Ok((path, target.authority.map(str::to_owned)))
}

/// Whether `w` is PERMISSIVE under `view`: the generation's `POL_DST_F_PERMISSIVE`, or the
/// registry's `peerAuthentication` when no policy is loaded (generation 0) — what the agent
/// programs as `WORKLOAD_F_PERMISSIVE` (`app.rs`, `enrolled`).
pub fn effective_permissive(view: &PolicyView, w: &Workload) -> bool {
    if view.generation() == 0 {
        w.permissive
    } else {
        view.permissive(w.id)
    }
}

/// The decision for plaintext (no mTLS) from `src_ip` to `dst` port `port`, which the kernel
/// makes at the destination (`mesh-ebpf/src/ingress.rs`): STRICT drops it; PERMISSIVE
/// authorizes it as Istio does — no principal, no namespace, the source address against
/// ipBlocks — with the generation's plaintext classes ([`PolicyView::decide_plaintext`], the
/// kernel's lookup). Returns the decision, the deciding policy and the reason.
pub fn plaintext_decision(
    view: &PolicyView,
    src_ip: IpAddr,
    dst: &Workload,
    port: u16,
) -> (Decision, Option<String>, String) {
    if !effective_permissive(view, dst) {
        return (
            Decision::Deny,
            None,
            format!(
                "{} is STRICT: plaintext is dropped by the kernel (PeerAuthentication)",
                dst.key()
            ),
        );
    }
    let d = view.decide_plaintext(src_ip, dst.id, port);
    let policy = d.policy.as_ref().map(|p| p.to_string());
    let allowed = d.verdict == crate::policy::ConnVerdict::Allow;
    let reason =
        match (allowed, &policy, d.key, d.needs_request) {
            (true, _, None, _) => format!(
                "{} is PERMISSIVE and no policy selects it: plaintext reaches the pod",
                dst.key()
            ),
            (true, Some(p), _, _) => format!("PERMISSIVE; plaintext allowed by {p}"),
            (true, None, _, _) => "PERMISSIVE; plaintext allowed (no ALLOW policy)".to_owned(),
            (false, _, _, true) => format!(
            "PERMISSIVE; deciding plaintext needs the HTTP request, which the kernel cannot see: \
             refused (fail closed){}",
            policy.as_deref().map(|p| format!(", {p}")).unwrap_or_default()
        ),
            (false, Some(p), _, _) => format!("PERMISSIVE; plaintext denied by {p}"),
            (false, None, _, _) => {
                "PERMISSIVE; plaintext has no principal and no namespace, and no ALLOW policy \
             matches it (implicit deny)"
                    .to_owned()
            }
        };
    (
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny
        },
        policy,
        reason,
    )
}

fn workload_by_name<'r>(registry: &'r Registry, name: &str) -> Result<&'r Workload, CheckError> {
    let Some((ns, n)) = name.split_once('/') else {
        return Err(CheckError::WorkloadName {
            name: name.to_owned(),
        });
    };
    registry
        .workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == n)
        .ok_or_else(|| CheckError::UnknownWorkload {
            name: name.to_owned(),
        })
}

fn family_name(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical().is_ipv4() == b.to_canonical().is_ipv4()
}

/// The workload's address of `dst`'s family.
fn address_like(w: &Workload, dst: IpAddr) -> Result<IpAddr, CheckError> {
    w.ips
        .iter()
        .copied()
        .find(|ip| same_family(*ip, dst))
        .ok_or(CheckError::NoAddress {
            workload: w.key(),
            family: family_name(dst),
            dst,
        })
}

/// Checks `req` against `view`, as the destination agent decides it.
pub fn check(
    view: Arc<PolicyView>,
    registry: &Registry,
    trust_domain: &str,
    req: &CheckRequest,
) -> Result<CheckReport, CheckError> {
    if req.port == 0 {
        return Err(CheckError::Port);
    }
    // The destination and its address.
    let (dst, dst_ip) = match req.to.parse::<IpAddr>() {
        Ok(ip) => {
            let w = registry
                .by_ip(ip.to_canonical())
                .ok_or(CheckError::UnknownAddress {
                    addr: ip,
                    hint: " (--to must be a mesh workload)",
                })?;
            (w, ip.to_canonical())
        }
        Err(_) if req.to.contains('/') => {
            let w = workload_by_name(registry, &req.to)?;
            let src_ip = match &req.from {
                RequestSource::Ip(ip) => Some(*ip),
                RequestSource::Workload(name) => {
                    workload_by_name(registry, name)?.ips.first().copied()
                }
            };
            // The destination's address of the source's family (IPv4 first).
            let ip = src_ip
                .and_then(|s| w.ips.iter().copied().find(|ip| same_family(*ip, s)))
                .or_else(|| w.ips.first().copied())
                .ok_or_else(|| CheckError::UnknownWorkload {
                    name: req.to.clone(),
                })?;
            (w, ip)
        }
        Err(_) => {
            return Err(CheckError::Destination { to: req.to.clone() });
        }
    };
    // The source.
    let src: Option<&Workload> = match &req.from {
        RequestSource::Workload(name) => Some(workload_by_name(registry, name)?),
        RequestSource::Ip(ip) => match registry.by_ip(ip.to_canonical()) {
            Some(w) => Some(w),
            None if req.plaintext => None,
            None => {
                return Err(CheckError::UnknownAddress {
                    addr: *ip,
                    hint: ": only a --plaintext source can be outside the mesh (mTLS sources \
                           are workloads)",
                })
            }
        },
    };
    let src_ip = match (&req.from, src) {
        (RequestSource::Ip(ip), _) => {
            if !same_family(*ip, dst_ip) {
                return Err(CheckError::NoAddress {
                    workload: dst.key(),
                    family: family_name(*ip),
                    dst: *ip,
                });
            }
            ip.to_canonical()
        }
        (RequestSource::Workload(_), Some(w)) => address_like(w, dst_ip)?,
        (RequestSource::Workload(name), None) => {
            return Err(CheckError::UnknownWorkload { name: name.clone() })
        }
    };
    let http = dst.is_http_port(req.port);
    let permissive = effective_permissive(&view, dst);
    let mut notes = Vec::new();
    let request = if http {
        let method = req.http.method.clone().unwrap_or_else(|| "GET".to_owned());
        let path = req.http.path.clone().unwrap_or_else(|| "/".to_owned());
        if req.http.method.is_none() && req.http.path.is_none() {
            notes.push(format!(
                "port {} is an HTTP port of {}: decided for `GET /` (give --method/--path)",
                req.port,
                dst.key()
            ));
        }
        let normalized = normalize_for_check(&path, &method, req.path_normalization);
        let host = match &normalized {
            Ok((_, Some(authority))) => Some(authority.clone()),
            _ => req.http.host.clone(),
        };
        let normalized = normalized.map(|(p, _)| p);
        Some((method, path, host, normalized))
    } else {
        if req.http != HttpRequest::default() {
            notes.push(format!(
                "port {} is not one of {}'s httpPorts: the connection is TCP, --method/--path/\
                 --host are not seen",
                req.port,
                dst.key()
            ));
        }
        None
    };
    let principal = |w: &Workload| super::compile::principal(trust_domain, w);
    let mut report = CheckReport {
        decision: Decision::Deny,
        layer: Layer::L4,
        policy: None,
        reason: String::new(),
        dry_run: None,
        audit: Vec::new(),
        source: SourceReport {
            workload: src.map(Workload::key),
            principal: src.filter(|_| !req.plaintext).map(principal),
            ip: Some(src_ip),
            mtls: !req.plaintext,
        },
        destination: DestinationReport {
            workload: dst.key(),
            ip: dst_ip,
            port: req.port,
            http,
            mtls_mode: if permissive { "PERMISSIVE" } else { "STRICT" },
        },
        request: None,
        generation: view.generation(),
        notes,
    };
    if let Some((method, path, host, normalized)) = &request {
        report.request = Some(RequestReport {
            method: method.clone(),
            path: path.clone(),
            normalized_path: normalized.clone().unwrap_or_default(),
            host: host.clone(),
        });
    }

    if req.plaintext {
        let (decision, policy, reason) = plaintext_decision(&view, src_ip, dst, req.port);
        report.layer = if effective_permissive(&view, dst) {
            Layer::L4
        } else {
            Layer::PeerAuthentication
        };
        report.decision = decision;
        report.policy = policy;
        report.reason = reason;
        return Ok(report);
    }

    let src = src.ok_or(CheckError::UnknownAddress {
        addr: src_ip,
        hint: "",
    })?;
    let td = TrustDomain::new(trust_domain).map_err(|source| CheckError::TrustDomain {
        td: trust_domain.to_owned(),
        source,
    })?;
    let src_identity = src.identity(&td).map_err(|source| CheckError::Identity {
        workload: src.key(),
        source,
    })?;
    let info = ConnInfo {
        src_workload: Some(src.id),
        src_identity,
        src_addr: Some(SocketAddr::new(src_ip, 0)),
        dst: SocketAddr::new(dst_ip, req.port),
        dst_workload: dst.id,
        dst_name: dst.key(),
        http,
    };
    let conn = view.explain_connection(&info);
    let l4 = conn.l4.as_ref();
    match conn.verdict {
        ConnVerdict::Deny => {
            let policy = conn.policy.as_ref().map(|p| p.to_string());
            report.decision = Decision::Deny;
            report.policy = policy.clone();
            report.reason = match policy {
                Some(p) => format!("DENY policy {p} matched the connection"),
                None => format!(
                    "ALLOW policies select {} and none allows this connection (implicit deny)",
                    dst.key()
                ),
            };
            return Ok(report);
        }
        ConnVerdict::Allow => {
            report.decision = Decision::Allow;
            report.policy = l4.and_then(|d| d.policy.as_ref()).map(|p| p.to_string());
            report.reason = match (&report.policy, l4.and_then(|d| d.key)) {
                (Some(p), _) => format!("ALLOW policy {p} matched the connection"),
                (None, None) => format!("no AuthorizationPolicy selects {}", dst.key()),
                (None, Some(_)) => format!(
                    "no DENY policy matched and no ALLOW policy selects {}",
                    dst.key()
                ),
            };
            if let Some(d) = l4 {
                report.dry_run = d.dry_run_deny.as_ref().map(|p| DryRun {
                    would: Decision::Deny,
                    policy: p.as_ref().map(|p| p.to_string()),
                });
                report.audit.extend(d.audit.iter().map(|a| a.to_string()));
            }
            return Ok(report);
        }
        ConnVerdict::PerRequest => {}
    }
    // Request by request.
    let Some((method, _, host, normalized)) = &request else {
        // Request-level rules on a port that is not HTTP: nothing can satisfy them
        // (`proxy/inbound.rs` refuses the connection).
        report.reason = "request-level rules on a port that is not HTTP".to_owned();
        return Ok(report);
    };
    report.layer = Layer::L7;
    let path = match normalized {
        Ok(p) => p,
        Err(PathRejected(problem)) => {
            report.reason = format!("the request is refused with 400 before policy: {problem}");
            return Ok(report);
        }
    };
    let attrs = RequestAttrs {
        method,
        path,
        host: host.as_deref(),
        headers: &CheckHeaders(&req.http.headers),
    };
    let r = view.explain_request(&info, &attrs);
    report.policy = r.policy.as_ref().map(|p| p.to_string());
    report.decision = match r.verdict {
        RequestVerdict::Allow => Decision::Allow,
        RequestVerdict::Deny => Decision::Deny,
    };
    let selected = view.dst_set(dst.id).is_some();
    report.reason = match (report.decision, &report.policy) {
        (Decision::Deny, Some(p)) => format!("DENY policy {p} matched the request"),
        (Decision::Deny, None) => format!(
            "ALLOW policies select {} and none allows this request (implicit deny)",
            dst.key()
        ),
        (Decision::Allow, Some(p)) => format!("ALLOW policy {p} matched the request"),
        (Decision::Allow, None) if selected => format!(
            "no DENY policy matched and no ALLOW policy selects {}",
            dst.key()
        ),
        (Decision::Allow, None) => format!("no AuthorizationPolicy selects {}", dst.key()),
    };
    if report.decision == Decision::Allow {
        report.dry_run = r.dry_run_deny.as_ref().map(|p| DryRun {
            would: Decision::Deny,
            policy: p.as_ref().map(|p| p.to_string()),
        });
    }
    report.audit = r.audit.iter().map(|a| a.to_string()).collect();
    Ok(report)
}

/// Where the policy to check against comes from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// A policy directory, compiled with the agent's compiler.
    Dir(PathBuf),
    /// A node's pin directory: its active generation.
    Pinned(PathBuf),
}

impl PolicySource {
    /// The view to check against.
    pub fn view(
        &self,
        registry: Arc<Registry>,
        root_ns: &str,
        trust_domain: &str,
    ) -> Result<PolicyView, CheckError> {
        match self {
            Self::Dir(dir) => compile_view(dir, registry, root_ns, trust_domain),
            Self::Pinned(pin_dir) => pinned_view(pin_dir),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_arguments_are_validated() {
        assert_eq!(
            parse_header("X-Foo: foo ").unwrap(),
            ("x-foo".to_owned(), "foo".to_owned())
        );
        assert_eq!(parse_header("a:").unwrap(), ("a".to_owned(), String::new()));
        for bad in ["no-colon", ":v", "bad name:v", "x:a\r\nb", "x\u{0}:v"] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
        use crate::policy::RequestHeaders as _;
        let h = vec![
            ("x-foo".to_owned(), "1".to_owned()),
            ("x-foo".to_owned(), "2".to_owned()),
        ];
        let mut seen = Vec::new();
        CheckHeaders(&h).for_each_value("X-FOO", &mut |v| seen.push(v.to_vec()));
        assert_eq!(seen, vec![b"1".to_vec(), b"2".to_vec()]);
    }

    #[test]
    fn normalize_for_check_is_the_agents_normalizer() {
        use crate::proxy::l7::normalize::PathNormalization as M;
        let d = M::default();
        let n = |raw: &str| normalize_for_check(raw, "GET", d);
        assert_eq!(n("/a/b?x=1").unwrap(), ("/a/b".to_owned(), None));
        assert_eq!(n("/public/..%2fadmin").unwrap().0, "/admin");
        assert_eq!(n("//admin").unwrap().0, "/admin");
        assert_eq!(n("/%61dmin").unwrap().0, "/admin");
        assert_eq!(
            n("http://b1/admin").unwrap(),
            ("/admin".to_owned(), Some("b1".to_owned()))
        );
        assert!(n("/admin%00").is_err());
        assert!(n("/a#f").is_err());
        assert!(normalize_for_check("/", "get", d).is_err());
        assert_eq!(
            normalize_for_check("/a/../b", "GET", M::None).unwrap().0,
            "/a/../b"
        );
    }
}
