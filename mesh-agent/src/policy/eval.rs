//! The reference evaluator: Istio's authorization semantics, straight from the model
//! (docs/CONTRACTS.md, issue 4). Unit and property tests pin the semantics down here; the
//! compiler's map contents are cross-checked against it. Not a hot path.
//!
//! Semantics:
//! - Scope: a policy in namespace N applies to the workloads of N, a policy in the root
//!   namespace to every workload; with `selector.matchLabels`, only to workloads whose labels
//!   contain all of them ([`selects`]).
//! - A policy matches when one of its rules does; no `rules` or `rules: []` matches nothing,
//!   `rules: [{}]` everything. A rule matches when some `from` matches (or `from` is empty) and
//!   some `to` matches (or `to` is empty). In a source or an operation every non-empty field
//!   must match (one of its patterns does) and no `not*` pattern may match.
//! - Values: principals against `<td>/ns/<ns>/sa/<sa>` (no `spiffe://`), namespaces against the
//!   peer's namespace (both empty for a peer without mTLS identity: positive patterns, even
//!   `*`, do not match it, `not*` ones exclude nothing); `ipBlocks` against the peer's address;
//!   ports against the destination port; methods exactly (case-sensitive); paths against the
//!   request path without its query string; hosts case-insensitively against Host/`:authority`,
//!   as sent and with a `:port` suffix stripped.
//! - HTTP-only fields (methods, paths, hosts and their `not*`) on a request that is not HTTP:
//!   an ALLOW or AUDIT rule that has any never matches; a DENY rule matches ignoring them
//!   (Istio's fail-safe: a DENY is never narrowed into allowing).
//! - Decision: a matching enforced DENY denies; else, if an enforced ALLOW policy selects the
//!   workload, the request is allowed iff one of them matches; else it is allowed. AUDIT and
//!   dry-run policies never change the decision, they are only reported.
//! - The result is independent of the order of policies: ties are broken by `namespace/name`.

use std::{collections::BTreeMap, net::IpAddr};

use super::model::{
    Action, AuthorizationPolicy, MtlsMode, Operation, PolicyBundle, Rule, Source, StringMatch,
};

/// Istio's default root namespace (policies there apply mesh-wide).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The workload a request is for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Who the request comes from.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// The peer's authenticated identity, `<td>/ns/<ns>/sa/<sa>`; `None` without mTLS.
    pub principal: Option<&'a str>,
    /// The peer's namespace (from its identity); `None` without mTLS.
    pub namespace: Option<&'a str>,
    /// The connection's source address.
    pub ip: IpAddr,
}

/// The HTTP part of a request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The request target; a query string (`?…`) is ignored.
    pub path: &'a str,
    /// `Host` / `:authority`, if sent.
    pub host: Option<&'a str>,
}

/// One request (or connection) to the target.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The destination port.
    pub port: u16,
    /// `None`: a TCP connection, or a port that does not speak HTTP.
    pub http: Option<HttpRequest<'a>>,
}

/// The outcome of [`evaluate`]. Policies are named `namespace/name`; lists are sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided: the DENY that denied or the ALLOW that allowed (the first by
    /// name when several did). `None` when no policy matched: allowed because no ALLOW policy
    /// selects the workload, or denied because none of those that do matched.
    pub policy: Option<String>,
    /// Dry-run policies that would have denied: matching dry-run DENYs, and the dry-run ALLOWs
    /// selecting the workload when neither they nor an enforced ALLOW matched.
    pub dry_run_denies: Vec<String>,
    /// AUDIT policies (dry-run or not) that select the workload and match.
    pub audits: Vec<String>,
}

/// Decides `req` from `peer` to `target` under `bundle`, `root_ns` being the root namespace.
pub fn evaluate(
    bundle: &PolicyBundle,
    root_ns: &str,
    target: Target<'_>,
    peer: Peer<'_>,
    req: Request<'_>,
) -> Decision {
    let mut deny: Option<String> = None;
    let mut allow: Option<String> = None;
    let mut allow_selects = false;
    let mut dry_allows = Vec::new();
    let mut dry_allow_matched = false;
    let mut decision = Decision::default();
    for p in bundle.authz.iter().filter(|p| selects(p, root_ns, target)) {
        let matched = policy_matches(p, peer, req);
        match (p.action, p.dry_run) {
            (Action::Deny, false) if matched => keep_first(&mut deny, p.key()),
            (Action::Deny, true) if matched => decision.dry_run_denies.push(p.key()),
            (Action::Deny, _) => {}
            (Action::Allow, false) => {
                allow_selects = true;
                if matched {
                    keep_first(&mut allow, p.key());
                }
            }
            (Action::Allow, true) => {
                dry_allows.push(p.key());
                dry_allow_matched |= matched;
            }
            (Action::Audit, _) if matched => decision.audits.push(p.key()),
            (Action::Audit, _) => {}
        }
    }
    (decision.allowed, decision.policy) = match (deny, allow_selects) {
        (Some(d), _) => (false, Some(d)),
        (None, true) => (allow.is_some(), allow.clone()),
        (None, false) => (true, None),
    };
    if !dry_allow_matched && allow.is_none() {
        decision.dry_run_denies.append(&mut dry_allows);
    }
    for list in [&mut decision.dry_run_denies, &mut decision.audits] {
        list.sort();
        list.dedup();
    }
    decision
}

/// Keeps the smallest key, so the result does not depend on policy order.
fn keep_first(slot: &mut Option<String>, key: String) {
    if slot.as_ref().is_none_or(|k| key < *k) {
        *slot = Some(key);
    }
}

/// Whether `p` applies to `target`: same namespace (or `p` in the root namespace `root_ns`),
/// and the target's labels contain the selector's (no selector: every workload in scope).
pub fn selects(p: &AuthorizationPolicy, root_ns: &str, target: Target<'_>) -> bool {
    (p.namespace == target.namespace || p.namespace == root_ns)
        && labels_match(p.selector.as_ref(), target.labels)
}

fn labels_match(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Whether one of `p`'s rules matches (whatever `p`'s scope and dry-run flag).
pub fn policy_matches(p: &AuthorizationPolicy, peer: Peer<'_>, req: Request<'_>) -> bool {
    let deny = p.action == Action::Deny;
    p.rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|r| rule_matches(r, deny, peer, req))
}

/// `deny`: the rule is a DENY rule (HTTP-only fields are ignored on non-HTTP requests rather
/// than making the rule unmatchable).
fn rule_matches(rule: &Rule, deny: bool, peer: Peer<'_>, req: Request<'_>) -> bool {
    if req.http.is_none() && !deny && rule.to.iter().any(Operation::has_http_fields) {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req)))
}

fn source_matches(s: &Source, peer: Peer<'_>) -> bool {
    let principal = peer.principal.unwrap_or("");
    let namespace = peer.namespace.unwrap_or("");
    strings(&s.principals, &s.not_principals, |m| m.matches(principal))
        && strings(&s.namespaces, &s.not_namespaces, |m| m.matches(namespace))
        && (s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|n| n.contains(peer.ip)))
        && !s.not_ip_blocks.iter().any(|n| n.contains(peer.ip))
}

/// On a non-HTTP request the HTTP fields are not looked at (see [`rule_matches`]).
fn operation_matches(o: &Operation, req: Request<'_>) -> bool {
    if !(o.ports.is_empty() || o.ports.contains(&req.port)) || o.not_ports.contains(&req.port) {
        return false;
    }
    let Some(http) = req.http else {
        return true;
    };
    let path = http.path.split_once('?').map_or(http.path, |(p, _)| p);
    let host = http.host.unwrap_or("");
    let bare_host = strip_port(host);
    strings(&o.methods, &o.not_methods, |m| m.matches(http.method))
        && strings(&o.paths, &o.not_paths, |m| m.matches(path))
        && strings(&o.hosts, &o.not_hosts, |m| {
            host_matches(m, host) || bare_host.is_some_and(|h| host_matches(m, h))
        })
}

/// A field with its `not*` counterpart: some pattern matches (or none given), no `not*` does.
fn strings(
    pos: &[StringMatch],
    neg: &[StringMatch],
    matches: impl Fn(&StringMatch) -> bool,
) -> bool {
    (pos.is_empty() || pos.iter().any(&matches)) && !neg.iter().any(matches)
}

/// `host` without a trailing `:port`, if it has one (`[::1]:80` → `[::1]`).
fn strip_port(host: &str) -> Option<&str> {
    let (h, port) = host.rsplit_once(':')?;
    let numeric = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (numeric && !h.is_empty() && (!h.contains(':') || h.ends_with(']'))).then_some(h)
}

/// [`StringMatch::matches`], ASCII case-insensitively.
fn host_matches(m: &StringMatch, value: &str) -> bool {
    let v = value.as_bytes();
    match m {
        StringMatch::Exact(s) => v.eq_ignore_ascii_case(s.as_bytes()),
        StringMatch::Prefix(p) => v
            .get(..p.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes())),
        StringMatch::Suffix(s) => v
            .len()
            .checked_sub(s.len())
            .and_then(|start| v.get(start..))
            .is_some_and(|t| t.eq_ignore_ascii_case(s.as_bytes())),
        StringMatch::Presence => !v.is_empty(),
    }
}

/// The mTLS mode for inbound traffic to `target`: the PeerAuthentication with a selector
/// matching it in its namespace, else the one without selector in its namespace, else the one
/// without selector in the root namespace `root_ns`, else `registry_default`, else STRICT.
/// (Selector policies in the root namespace apply to the root namespace's workloads only, as
/// in Istio.) Several at the same level: the first by `(namespace, name)` — Istio takes the
/// oldest, and this model has no creation time.
pub fn effective_mtls(
    bundle: &PolicyBundle,
    root_ns: &str,
    target: Target<'_>,
    registry_default: Option<MtlsMode>,
) -> MtlsMode {
    let level = |ns: &str, with_selector: bool| {
        bundle
            .peer_authn
            .iter()
            .filter(|p| p.namespace == ns)
            .filter(|p| match &p.selector {
                Some(s) if !s.is_empty() => with_selector && labels_match(Some(s), target.labels),
                _ => !with_selector,
            })
            .min_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
            .map(|p| p.mode)
    };
    level(target.namespace, true)
        .or_else(|| level(target.namespace, false))
        .or_else(|| level(root_ns, false))
        .or(registry_default)
        .unwrap_or(MtlsMode::Strict)
}
