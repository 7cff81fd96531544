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
//!   request path without its query string (exact, prefix, suffix, presence, or a `{*}`/`{**}`
//!   template, [`super::model::template_matches`]); hosts ASCII case-insensitively against
//!   Host/`:authority` exactly as sent — a `:port` is part of the value, as in Istio
//!   (ISTIO-SECURITY-2021-008); `serviceAccounts` against the namespace and service account
//!   of the principal (any trust domain).
//! - `when`: every condition must hold ([`condition_matches`]); `request.headers[...]` is
//!   HTTP-only like methods, paths and hosts.
//! - Principals are matched after the trust-domain rewrite
//!   ([`PolicyBundle::for_trust_domains`]); [`evaluate`] takes the rewritten bundle.
//! - HTTP-only fields (methods, paths, hosts and their `not*`) on a request that is not HTTP:
//!   an ALLOW rule that has any (in any of its operations) never matches; a DENY or AUDIT
//!   rule matches ignoring them (Istio's fail-safe: its RBAC builder drops the ALLOW rule, and
//!   ignores the field for DENY and AUDIT, "a wider deny or audit policy"; a DENY is never
//!   narrowed into allowing).
//! - Decision: a matching enforced DENY denies; else, if an enforced ALLOW policy selects the
//!   workload, the request is allowed iff one of them matches; else it is allowed. AUDIT and
//!   dry-run policies never change the decision, they are only reported.
//! - The result is independent of the order of policies: ties are broken by `namespace/name`.

use std::{collections::BTreeMap, net::IpAddr};

use super::model::{
    Action, AuthorizationPolicy, Condition, IpNet, MtlsMode, Operation, Pattern,
    PeerAuthentication, PolicyBundle, Rule, ServiceAccount, Source, StringMatch,
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
    /// The request's header fields as (name, value); names compare case-insensitively.
    pub headers: &'a [(&'a str, &'a str)],
}

/// One request (or connection) to the target.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The destination port.
    pub port: u16,
    /// The destination workload's address the connection is for (`destination.ip`).
    pub dst_ip: Option<IpAddr>,
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
    let allow = p.action == Action::Allow;
    p.rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|r| rule_matches(r, allow, peer, req))
}

/// `allow`: the rule is an ALLOW rule: on a non-HTTP request, HTTP-only fields make it
/// unmatchable; in DENY and AUDIT rules they are ignored instead.
fn rule_matches(rule: &Rule, allow: bool, peer: Peer<'_>, req: Request<'_>) -> bool {
    if req.http.is_none() && allow && rule.has_http_fields() {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req)))
        && rule.when.iter().all(|c| condition_matches(c, peer, req))
}

fn source_matches(s: &Source, peer: Peer<'_>) -> bool {
    let principal = peer.principal.unwrap_or("");
    let namespace = peer.namespace.unwrap_or("");
    strings(&s.principals, &s.not_principals, |m| m.matches(principal))
        && strings(&s.namespaces, &s.not_namespaces, |m| m.matches(namespace))
        && ips(&s.ip_blocks, &s.not_ip_blocks, Some(peer.ip))
        && service_accounts(&s.service_accounts, &s.not_service_accounts, peer.principal)
        && {
            let td = super::model::principal_trust_domain(principal);
            strings(&s.trust_domains, &s.not_trust_domains, |m| m.matches(td))
        }
}

/// A list of blocks with its `not*` counterpart against an address (none: in no block).
fn ips(pos: &[IpNet], neg: &[IpNet], ip: Option<IpAddr>) -> bool {
    let within = |n: &IpNet| ip.is_some_and(|ip| n.contains(ip));
    (pos.is_empty() || pos.iter().any(within)) && !neg.iter().any(within)
}

/// `serviceAccounts`/`notServiceAccounts` against a principal (none: matches no entry).
fn service_accounts(
    pos: &[ServiceAccount],
    neg: &[ServiceAccount],
    principal: Option<&str>,
) -> bool {
    let hit = |sa: &ServiceAccount| principal.is_some_and(|p| sa.matches_principal(p));
    (pos.is_empty() || pos.iter().any(hit)) && !neg.iter().any(hit)
}

/// One `when` condition. On a non-HTTP request an HTTP-only condition holds (DENY and AUDIT
/// rules ignore it; ALLOW rules with one were already excluded in [`rule_matches`]).
pub fn condition_matches(c: &Condition, peer: Peer<'_>, req: Request<'_>) -> bool {
    match c {
        Condition::SourceIp { values, not_values } => ips(values, not_values, Some(peer.ip)),
        Condition::DestinationIp { values, not_values } => ips(values, not_values, req.dst_ip),
        Condition::SourceNamespace { values, not_values } => {
            let ns = peer.namespace.unwrap_or("");
            strings(values, not_values, |m| m.matches(ns))
        }
        Condition::SourcePrincipal { values, not_values } => {
            let p = peer.principal.unwrap_or("");
            strings(values, not_values, |m| m.matches(p))
        }
        Condition::SourceServiceAccount { values, not_values } => {
            service_accounts(values, not_values, peer.principal)
        }
        Condition::DestinationPort { values, not_values } => {
            (values.is_empty() || values.contains(&req.port)) && !not_values.contains(&req.port)
        }
        Condition::RequestHeader {
            name,
            values,
            not_values,
        } => {
            let Some(http) = req.http else {
                return true;
            };
            let value = joined_header(http.headers, name);
            let hit = |m: &StringMatch| header_pattern_matches(m.as_pattern(), value.as_deref());
            (values.is_empty() || values.iter().any(hit)) && !not_values.iter().any(hit)
        }
    }
}

/// The values of header `name` (any case) joined with `,` as Envoy's header matcher sees
/// several fields of one name; `None` if the request has none.
fn joined_header(headers: &[(&str, &str)], name: &str) -> Option<Vec<u8>> {
    join_values(
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes()),
    )
}

/// Several values of one header as one (`a,b`); `None` without any.
pub fn join_values<'v>(values: impl Iterator<Item = &'v [u8]>) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for v in values {
        match &mut out {
            Some(buf) => {
                buf.push(b',');
                buf.extend_from_slice(v);
            }
            None => out = Some(v.to_vec()),
        }
    }
    out
}

/// How a `request.headers[...]` value pattern matches a header (istio/istio
/// `pilot/pkg/security/authz/matcher/header.go`, `HeaderMatcher`): `*` is presence (the
/// header is there, even empty), `x*`/`*x` prefix/suffix, else exact, case-sensitively; an
/// absent header matches no pattern. Shared with the compiled form.
pub fn header_pattern_matches(m: Pattern<'_>, value: Option<&[u8]>) -> bool {
    let Some(v) = value else {
        return false;
    };
    match m {
        Pattern::Exact(s) => v == s.as_bytes(),
        Pattern::Prefix(p) => v.starts_with(p.as_bytes()),
        Pattern::Suffix(s) => v.ends_with(s.as_bytes()),
        Pattern::Presence => true,
        Pattern::Template(_) => false,
    }
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
    strings(&o.methods, &o.not_methods, |m| m.matches(http.method))
        && strings(&o.paths, &o.not_paths, |m| m.matches(path))
        && strings(&o.hosts, &o.not_hosts, |m| {
            host_pattern_matches(m.as_pattern(), host)
        })
}

/// How a `hosts`/`notHosts` pattern matches a request's Host (or `:authority`): ASCII
/// case-insensitively, exactly as sent — no `:port` stripping
/// ([`Pattern::matches_ignore_case`]). Shared with the compiled form (`engine::Clause`), so
/// both decide hosts alike.
pub fn host_pattern_matches(m: Pattern<'_>, host: &str) -> bool {
    m.matches_ignore_case(host)
}

/// A field with its `not*` counterpart: some pattern matches (or none given), no `not*` does.
fn strings(
    pos: &[StringMatch],
    neg: &[StringMatch],
    matches: impl Fn(&StringMatch) -> bool,
) -> bool {
    (pos.is_empty() || pos.iter().any(&matches)) && !neg.iter().any(matches)
}

/// The mTLS mode for inbound traffic to `target` ([`effective_port_mtls`] without ports).
pub fn effective_mtls(
    bundle: &PolicyBundle,
    root_ns: &str,
    target: Target<'_>,
    registry_default: Option<MtlsMode>,
) -> MtlsMode {
    effective_port_mtls(bundle, root_ns, target, registry_default).0
}

/// The effective PeerAuthentication of `target`, as Istio composes it (istio/istio
/// `pilot/pkg/security/authn/policy_applier.go`, `ComposePeerAuthentication`): the mesh
/// policy (root namespace `root_ns`, no selector), then the namespace policy (no selector),
/// then the workload policy (a selector matching the workload, not in the root namespace);
/// each one that is not UNSET overrides the one before; the start is `registry_default`,
/// else STRICT (Istio starts from PERMISSIVE: this mesh is STRICT unless told otherwise).
/// `portLevelMtls` of the workload policy gives per-port modes (UNSET: the workload's mode).
/// Several at one level: the first by `(namespace, name)` — Istio takes the oldest, and this
/// model has no creation time. The returned modes are never UNSET.
pub fn effective_port_mtls(
    bundle: &PolicyBundle,
    root_ns: &str,
    target: Target<'_>,
    registry_default: Option<MtlsMode>,
) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
    let has_selector = |p: &PeerAuthentication| p.selector.as_ref().is_some_and(|s| !s.is_empty());
    let first = |f: &dyn Fn(&PeerAuthentication) -> bool| {
        bundle
            .peer_authn
            .iter()
            .filter(|p| f(p))
            .min_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    };
    let mesh = first(&|p| p.namespace == root_ns && !has_selector(p));
    let namespace =
        first(&|p| p.namespace != root_ns && p.namespace == target.namespace && !has_selector(p));
    let workload = first(&|p| {
        p.namespace != root_ns
            && p.namespace == target.namespace
            && has_selector(p)
            && labels_match(p.selector.as_ref(), target.labels)
    });
    let mut mode = registry_default
        .filter(|m| *m != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Strict);
    for p in [mesh, namespace, workload].into_iter().flatten() {
        if p.mode != MtlsMode::Unset {
            mode = p.mode;
        }
    }
    let ports = workload
        .map(|w| {
            w.port_level
                .iter()
                .map(|(port, m)| (*port, if *m == MtlsMode::Unset { mode } else { *m }))
                .collect()
        })
        .unwrap_or_default();
    (mode, ports)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use crate::policy::strategies::{full_source, operation, rule};

    use super::*;
    use crate::policy::{
        model::{IpNet, Origin, PeerAuthentication, TrustDomains},
        parse::parse_str,
    };

    const ROOT: &str = DEFAULT_ROOT_NAMESPACE;
    const SLEEP: &str = "cluster.local/ns/client/sa/sleep";
    const ADMIN: &str = "cluster.local/ns/ops/sa/admin";

    /// Policies from YAML documents (each a `(namespace, name, spec)`), via the parser.
    fn bundle(policies: &[(&str, &str, &str)]) -> PolicyBundle {
        let text: String = policies
            .iter()
            .map(|(ns, name, spec)| {
                format!(
                    "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                     metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
                )
            })
            .collect();
        parse_str(&text, Path::new("test.yaml")).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn peer(principal: Option<&'static str>) -> Peer<'static> {
        Peer {
            principal,
            namespace: principal.and_then(|p| p.split('/').nth(2)),
            ip: "10.0.0.5".parse().unwrap(),
        }
    }

    fn tcp(port: u16) -> Request<'static> {
        Request {
            port,
            dst_ip: None,
            http: None,
        }
    }

    fn http(
        method: &'static str,
        path: &'static str,
        host: Option<&'static str>,
    ) -> Request<'static> {
        Request {
            port: 8080,
            dst_ip: None,
            http: Some(HttpRequest {
                method,
                path,
                host,
                headers: &[],
            }),
        }
    }

    /// Evaluates for workload `app=web` in `default`.
    fn eval(b: &PolicyBundle, peer: Peer<'_>, req: Request<'_>) -> Decision {
        let l = labels(&[("app", "web"), ("version", "v1")]);
        evaluate(
            b,
            ROOT,
            Target {
                namespace: "default",
                labels: &l,
            },
            peer,
            req,
        )
    }

    fn allowed(b: &PolicyBundle, peer: Peer<'_>, req: Request<'_>) -> bool {
        eval(b, peer, req).allowed
    }

    /// One ALLOW policy in `default` with one rule `rule` (YAML flow mapping).
    fn allow_rule(rule: &str) -> PolicyBundle {
        bundle(&[("default", "a", &format!("  rules: [{rule}]"))])
    }

    #[test]
    fn no_policy_allows() {
        let d = eval(&PolicyBundle::default(), peer(None), tcp(80));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                ..Decision::default()
            }
        );
    }

    #[test]
    fn rules_absent_empty_and_any() {
        // No rules / empty rules: an ALLOW matches nothing, so it denies what it selects.
        for spec in ["  action: ALLOW", "  rules: []"] {
            let b = bundle(&[("default", "a", spec)]);
            let d = eval(&b, peer(Some(SLEEP)), tcp(80));
            assert_eq!((d.allowed, d.policy), (false, None), "{spec}");
        }
        // A DENY without rules is refused by the parser (as by Istio); built by hand it
        // denies nothing.
        let mut b = bundle(&[("default", "d", "  action: DENY\n  rules: [{}]")]);
        b.authz[0].rules = None;
        assert!(allowed(&b, peer(Some(SLEEP)), tcp(80)));
        // `rules: [{}]` matches everything.
        let b = allow_rule("{}");
        let d = eval(&b, peer(None), tcp(1));
        assert_eq!((d.allowed, d.policy.as_deref()), (true, Some("default/a")));
        let b = bundle(&[("default", "d", "  action: DENY\n  rules: [{}]")]);
        let d = eval(&b, peer(Some(SLEEP)), http("GET", "/", None));
        assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("default/d")));
        // Empty from / to lists are refused by the parser (Istio: "must not be empty").
        for rule in ["{from: []}", "{to: []}"] {
            let text = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: a, namespace: default}}\nspec:\n  rules: [{rule}]\n"
            );
            assert!(parse_str(&text, Path::new("x.yaml")).is_err(), "{rule}");
        }
    }

    #[test]
    fn principals_all_match_forms() {
        let cases: &[(&str, Option<&'static str>, bool)] = &[
            (SLEEP, Some(SLEEP), true),
            (SLEEP, Some(ADMIN), false),
            ("cluster.local/ns/client/*", Some(SLEEP), true),
            ("cluster.local/ns/client/*", Some(ADMIN), false),
            ("*/sa/sleep", Some(SLEEP), true),
            ("*/sa/sleep", Some(ADMIN), false),
            ("*", Some(SLEEP), true),
            // Without mTLS there is no principal: even presence does not match.
            ("*", None, false),
            (SLEEP, None, false),
        ];
        for &(pattern, who, want) in cases {
            let b = allow_rule(&format!(
                "{{from: [{{source: {{principals: [\"{pattern}\"]}}}}]}}"
            ));
            assert_eq!(
                allowed(&b, peer(who), tcp(80)),
                want,
                "principals {pattern} {who:?}"
            );
            let b = allow_rule(&format!(
                "{{from: [{{source: {{notPrincipals: [\"{pattern}\"]}}}}]}}"
            ));
            assert_eq!(
                allowed(&b, peer(who), tcp(80)),
                !want,
                "notPrincipals {pattern} {who:?}"
            );
        }
        // Several values: any one.
        let b = allow_rule(&format!(
            "{{from: [{{source: {{principals: [\"{ADMIN}\", \"{SLEEP}\"]}}}}]}}"
        ));
        assert!(allowed(&b, peer(Some(SLEEP)), tcp(80)));
        // X together with notX: in X and not in notX.
        let b = allow_rule(
            "{from: [{source: {principals: [\"cluster.local/*\"], notPrincipals: [\"*/sa/admin\"]}}]}",
        );
        assert!(allowed(&b, peer(Some(SLEEP)), tcp(80)));
        assert!(!allowed(&b, peer(Some(ADMIN)), tcp(80)));
        assert!(!allowed(&b, peer(None), tcp(80)));
    }

    #[test]
    fn namespaces_and_ip_blocks() {
        let b = allow_rule("{from: [{source: {namespaces: [client, \"o*\"]}}]}");
        assert!(allowed(&b, peer(Some(SLEEP)), tcp(80)));
        assert!(allowed(&b, peer(Some(ADMIN)), tcp(80)));
        assert!(!allowed(&b, peer(None), tcp(80)));
        let b = allow_rule("{from: [{source: {notNamespaces: [\"*ps\"]}}]}");
        assert!(allowed(&b, peer(Some(SLEEP)), tcp(80)));
        assert!(!allowed(&b, peer(Some(ADMIN)), tcp(80)));
        assert!(allowed(&b, peer(None), tcp(80)));
        let b = allow_rule("{from: [{source: {namespaces: [\"*\"], notNamespaces: [ops]}}]}");
        assert!(allowed(&b, peer(Some(SLEEP)), tcp(80)));
        assert!(!allowed(&b, peer(Some(ADMIN)), tcp(80)));

        let b = allow_rule(
            "{from: [{source: {ipBlocks: [10.0.0.0/24, \"fd00::/8\"], notIpBlocks: [10.0.0.5]}}]}",
        );
        let at = |ip: &str| Peer {
            ip: ip.parse().unwrap(),
            ..peer(None)
        };
        assert!(allowed(&b, at("10.0.0.6"), tcp(80)));
        assert!(!allowed(&b, at("10.0.0.5"), tcp(80)));
        assert!(!allowed(&b, at("10.0.1.6"), tcp(80)));
        assert!(allowed(&b, at("fd00::1"), tcp(80)));
        assert!(allowed(&b, at("::ffff:10.0.0.7"), tcp(80)));
        let b = allow_rule("{from: [{source: {notIpBlocks: [0.0.0.0/0]}}]}");
        assert!(!allowed(&b, at("1.2.3.4"), tcp(80)));
        assert!(allowed(&b, at("fd00::1"), tcp(80)));
    }

    #[test]
    fn sources_and_fields_combine() {
        // Within a source: all fields; across sources: any.
        let b = allow_rule(&format!(
            "{{from: [{{source: {{principals: [\"{SLEEP}\"], ipBlocks: [192.168.0.0/16]}}}}, \
             {{source: {{namespaces: [ops]}}}}]}}"
        ));
        assert!(!allowed(&b, peer(Some(SLEEP)), tcp(80)));
        assert!(allowed(
            &b,
            Peer {
                ip: "192.168.1.1".parse().unwrap(),
                ..peer(Some(SLEEP))
            },
            tcp(80)
        ));
        assert!(allowed(&b, peer(Some(ADMIN)), tcp(80)));
        // from AND to.
        let b = allow_rule(
            "{from: [{source: {namespaces: [ops]}}], to: [{operation: {ports: [\"80\"]}}]}",
        );
        assert!(allowed(&b, peer(Some(ADMIN)), tcp(80)));
        assert!(!allowed(&b, peer(Some(ADMIN)), tcp(81)));
        assert!(!allowed(&b, peer(Some(SLEEP)), tcp(80)));
        // Rules: any.
        let b = bundle(&[("default", "a", "  rules:\n  - to: [{operation: {ports: [\"1\"]}}]\n  - to: [{operation: {ports: [\"2\"]}}]")]);
        assert!(allowed(&b, peer(None), tcp(2)));
        assert!(!allowed(&b, peer(None), tcp(3)));
    }

    #[test]
    fn ports() {
        let b = allow_rule("{to: [{operation: {ports: [\"80\", 8080]}}]}");
        assert!(allowed(&b, peer(None), tcp(80)));
        assert!(allowed(&b, peer(None), tcp(8080)));
        assert!(!allowed(&b, peer(None), tcp(81)));
        let b = allow_rule("{to: [{operation: {notPorts: [\"22\"]}}]}");
        assert!(allowed(&b, peer(None), tcp(80)));
        assert!(!allowed(&b, peer(None), tcp(22)));
        let b = allow_rule("{to: [{operation: {ports: [\"22\"], notPorts: [\"22\"]}}]}");
        assert!(!allowed(&b, peer(None), tcp(22)));
    }

    #[test]
    fn methods_paths_hosts() {
        let op = |o: &str| allow_rule(&format!("{{to: [{{operation: {{{o}}}}}]}}"));
        let get = http("GET", "/api/v1/items?x=1", Some("Web.Default.svc:8080"));

        let cases: &[(&str, bool)] = &[
            ("methods: [GET]", true),
            ("methods: [get]", false),
            ("methods: [\"G*\"]", true),
            ("methods: [\"*T\"]", true),
            ("methods: [\"*\"]", true),
            ("notMethods: [GET]", false),
            ("notMethods: [POST]", true),
            ("methods: [\"*\"], notMethods: [GET]", false),
            ("paths: [/api/v1/items]", true),
            ("paths: [\"/api/*\"]", true),
            ("paths: [\"*/items\"]", true),
            ("paths: [\"*\"]", true),
            ("paths: [/api]", false),
            ("notPaths: [\"/api/*\"]", false),
            ("notPaths: [/admin]", true),
            ("paths: [\"/api/*\"], notPaths: [\"*/items\"]", false),
            // Hosts: case-insensitive, the `:port` is part of the value (Istio,
            // ISTIO-SECURITY-2021-008).
            ("hosts: [web.default.svc]", false),
            ("hosts: [\"web.default.svc:8080\"]", true),
            ("hosts: [\"WEB.DEFAULT.SVC:8080\"]", true),
            ("hosts: [WEB.DEFAULT.SVC]", false),
            ("hosts: [\"web.*\"]", true),
            ("hosts: [\"*.svc\"]", false),
            ("hosts: [\"*.svc:8080\"]", true),
            ("hosts: [\"*\"]", true),
            ("hosts: [other.svc]", false),
            ("notHosts: [\"*.SVC:8080\"]", false),
            ("notHosts: [\"*.SVC\"]", true),
            ("notHosts: [other]", true),
            ("hosts: [\"*\"], notHosts: [\"web.*\"]", false),
        ];
        for &(o, want) in cases {
            assert_eq!(allowed(&op(o), peer(None), get), want, "{o}");
        }
        // No Host header: presence does not match, notHosts excludes nothing.
        let no_host = http("GET", "/", None);
        assert!(!allowed(&op("hosts: [\"*\"]"), peer(None), no_host));
        assert!(allowed(&op("notHosts: [\"*\"]"), peer(None), no_host));
        // IPv6 literal authority: the port is part of it too.
        let v6 = http("GET", "/", Some("[fd00::1]:8080"));
        assert!(!allowed(&op("hosts: [\"[fd00::1]\"]"), peer(None), v6));
        assert!(allowed(&op("hosts: [\"[fd00::1]:8080\"]"), peer(None), v6));
        // Combined: every field.
        let b = op("methods: [GET], paths: [\"/api/*\"], hosts: [\"web.*\"], ports: [\"8080\"]");
        assert!(allowed(&b, peer(None), get));
        assert!(!allowed(
            &b,
            peer(None),
            http("POST", "/api/v1/items", Some("web"))
        ));
    }

    #[test]
    fn hosts_as_istio_matches_them() {
        // ISTIO-SECURITY-2021-008: `hosts: ["example.com"]` does not match
        // `Host: example.com:80`; a DENY on it is bypassed with the port, so write both.
        let deny = bundle(&[(
            "default",
            "d",
            "  action: DENY\n  rules: [{to: [{operation: {hosts: [example.com]}}]}]",
        )]);
        let host = |h: &'static str| http("GET", "/", Some(h));
        assert!(!allowed(&deny, peer(None), host("example.com")));
        assert!(!allowed(&deny, peer(None), host("EXAMPLE.com")));
        for bypass in [
            "example.com:80",
            "example.com.",
            "example.com.:80",
            "xexample.com",
        ] {
            assert!(allowed(&deny, peer(None), host(bypass)), "{bypass}");
        }
        let both = bundle(&[(
            "default",
            "d",
            "  action: DENY\n  rules: [{to: [{operation: {hosts: [example.com, \"example.com:*\"]}}]}]",
        )]);
        for h in ["example.com", "Example.COM:80", "example.com:8080"] {
            assert!(!allowed(&both, peer(None), host(h)), "{h}");
        }
        // Suffix wildcard: a subdomain with any port only if the pattern says so.
        let allow = allow_rule("{to: [{operation: {hosts: [\"*.example.com\"]}}]}");
        assert!(allowed(&allow, peer(None), host("a.EXAMPLE.com")));
        assert!(!allowed(&allow, peer(None), host("a.example.com:443")));
        assert!(!allowed(&allow, peer(None), host("example.com")));
        assert!(!allowed(&allow, peer(None), host("a.example.com.")));
    }

    /// An HTTP request with headers.
    fn http_h(
        path: &'static str,
        headers: &'static [(&'static str, &'static str)],
    ) -> Request<'static> {
        Request {
            port: 8080,
            dst_ip: Some("10.9.0.1".parse().unwrap()),
            http: Some(HttpRequest {
                method: "GET",
                path,
                host: Some("web"),
                headers,
            }),
        }
    }

    #[test]
    fn when_conditions() {
        let rule = |w: &str| allow_rule(&format!("{{when: [{w}]}}"));
        let p = Peer {
            ip: "10.0.0.5".parse().unwrap(),
            ..peer(Some(SLEEP))
        };
        let req = http_h("/", &[("X-Token", "abc"), ("x-token", "def")]);
        let cases: &[(&str, bool)] = &[
            ("{key: source.ip, values: [10.0.0.0/24]}", true),
            ("{key: source.ip, values: [10.0.1.0/24]}", false),
            ("{key: source.ip, notValues: [10.0.0.5]}", false),
            ("{key: remote.ip, values: [10.0.0.5]}", true),
            ("{key: destination.ip, values: [10.9.0.0/16]}", true),
            ("{key: destination.ip, notValues: [10.9.0.1]}", false),
            ("{key: destination.port, values: [\"8080\"]}", true),
            ("{key: destination.port, notValues: [\"8080\"]}", false),
            ("{key: source.namespace, values: [client]}", true),
            ("{key: source.namespace, values: [ops]}", false),
            (
                "{key: source.principal, values: [\"cluster.local/ns/client/*\"]}",
                true,
            ),
            ("{key: source.serviceAccount, values: [client/sleep]}", true),
            ("{key: source.serviceAccount, values: [sleep]}", false),
            // Header fields of one name are joined with `,` (Envoy), case-insensitive names.
            (
                "{key: \"request.headers[x-token]\", values: [\"abc,def\"]}",
                true,
            ),
            (
                "{key: \"request.headers[X-TOKEN]\", values: [\"abc*\"]}",
                true,
            ),
            ("{key: \"request.headers[x-token]\", values: [abc]}", false),
            ("{key: \"request.headers[x-token]\", values: [\"*\"]}", true),
            (
                "{key: \"request.headers[x-other]\", values: [\"*\"]}",
                false,
            ),
            (
                "{key: \"request.headers[x-other]\", notValues: [\"*\"]}",
                true,
            ),
            (
                "{key: \"request.headers[x-token]\", notValues: [\"*def\"]}",
                false,
            ),
            // Two conditions: both must hold.
            (
                "{key: source.namespace, values: [client]}, {key: source.ip, values: [1.2.3.4]}",
                false,
            ),
        ];
        for &(w, want) in cases {
            assert_eq!(allowed(&rule(w), p, req), want, "{w}");
        }
        // Without mTLS identity: identity conditions' values never match.
        let anon = Peer {
            ip: "10.0.0.5".parse().unwrap(),
            ..peer(None)
        };
        assert!(!allowed(
            &rule("{key: source.principal, values: [\"*\"]}"),
            anon,
            req
        ));
        assert!(allowed(
            &rule("{key: source.principal, notValues: [\"*\"]}"),
            anon,
            req
        ));
        assert!(!allowed(
            &rule("{key: source.serviceAccount, values: [client/sleep]}"),
            anon,
            req
        ));
        // Header conditions off HTTP: an ALLOW never matches, a DENY ignores them (wider).
        let hdr = "{key: \"request.headers[x-token]\", values: [abc]}";
        assert!(!allowed(&rule(hdr), p, tcp(8080)));
        let deny = bundle(&[(
            "default",
            "d",
            &format!("  action: DENY\n  rules: [{{when: [{hdr}]}}]"),
        )]);
        assert!(!allowed(&deny, p, tcp(8080)));
        assert!(allowed(&deny, p, http_h("/", &[("x-token", "zzz")])));
        assert!(!allowed(&deny, p, http_h("/", &[("x-token", "abc")])));
    }

    #[test]
    fn principals_with_trust_domains_and_aliases() {
        let tds = TrustDomains::new("corp.example", vec!["old.example".into()]);
        let allow = |pattern: &str| {
            allow_rule(&format!(
                "{{from: [{{source: {{principals: [\"{pattern}\"]}}}}]}}"
            ))
            .for_trust_domains(&tds)
        };
        let me = Some("corp.example/ns/client/sa/sleep");
        let p = peer(me);
        for (pattern, want) in [
            ("corp.example/ns/client/sa/sleep", true),
            ("cluster.local/ns/client/sa/sleep", true),
            ("old.example/ns/client/sa/sleep", true),
            ("other.example/ns/client/sa/sleep", false),
            ("cluster.local/ns/client/sa/sleep2", false),
            ("cluster.local/ns/client/sa/*", true),
            ("*/ns/client/sa/sleep", true),
            ("cluster.local/*", false),
        ] {
            assert_eq!(allowed(&allow(pattern), p, tcp(80)), want, "{pattern}");
        }
        // notPrincipals are rewritten too: a DENY on the alias catches the local identity.
        let deny = bundle(&[(
            "default",
            "d",
            "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [\"old.example/ns/client/sa/sleep\"]}}]}]",
        )])
        .for_trust_domains(&tds);
        assert!(allowed(&deny, p, tcp(80)));
        assert!(!allowed(
            &deny,
            peer(Some("corp.example/ns/ops/sa/admin")),
            tcp(80)
        ));
    }

    #[test]
    fn service_accounts_and_templates() {
        let sa = bundle(&[(
            "client",
            "a",
            "  rules: [{from: [{source: {serviceAccounts: [sleep], notServiceAccounts: [ops/admin]}}]}]",
        )]);
        let l = labels(&[]);
        let t = Target {
            namespace: "client",
            labels: &l,
        };
        let e = |p: Option<&'static str>| evaluate(&sa, ROOT, t, peer(p), tcp(80)).allowed;
        assert!(e(Some(SLEEP)));
        assert!(e(Some("other.td/ns/client/sa/sleep")), "any trust domain");
        assert!(!e(Some(ADMIN)));
        assert!(
            !e(Some("cluster.local/ns/ops/sa/sleep")),
            "bare name: the policy's namespace"
        );
        assert!(!e(None));

        let tpl = allow_rule("{to: [{operation: {paths: [\"/api/{*}/items/{**}\"]}}]}");
        for (path, want) in [
            ("/api/v1/items/", true),
            ("/api/v1/items/a/b?x=1", true),
            ("/api/v1/items", false),
            ("/api/v1/v2/items/a", false),
            ("/api//items/a", false),
            ("/API/v1/items/a", false),
        ] {
            assert_eq!(
                allowed(&tpl, peer(None), http("GET", path, None)),
                want,
                "{path}"
            );
        }
    }

    #[test]
    fn http_fields_on_tcp() {
        // ALLOW: a rule with HTTP fields never matches a non-HTTP request...
        let b = allow_rule("{to: [{operation: {ports: [\"80\"], methods: [GET]}}]}");
        assert!(!allowed(&b, peer(None), tcp(80)));
        // ... even if another of its operations has none.
        let b = allow_rule("{to: [{operation: {paths: [/x]}}, {operation: {ports: [\"80\"]}}]}");
        assert!(!allowed(&b, peer(None), tcp(80)));
        assert!(allowed(
            &b,
            peer(None),
            Request {
                port: 80,
                ..http("GET", "/y", None)
            }
        ));
        // ... but other rules of the policy still do.
        let b = bundle(&[("default", "a", "  rules:\n  - to: [{operation: {notMethods: [GET]}}]\n  - to: [{operation: {ports: [\"80\"]}}]")]);
        assert!(allowed(&b, peer(None), tcp(80)));
        // DENY: the HTTP fields are ignored, the rest still applies.
        let b = bundle(&[(
            "default",
            "d",
            "  action: DENY\n  rules: [{to: [{operation: {ports: [\"80\"], methods: [GET]}}]}]",
        )]);
        let d = eval(&b, peer(None), tcp(80));
        assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("default/d")));
        assert!(allowed(&b, peer(None), tcp(81)));
        let b = bundle(&[(
            "default",
            "d",
            "  action: DENY\n  rules: [{to: [{operation: {notPaths: [/public]}}]}]",
        )]);
        assert!(!allowed(&b, peer(None), tcp(80)));
        assert!(allowed(&b, peer(None), http("GET", "/public", None)));
        // AUDIT is not enforced and follows DENY's rule (a wider audit, as in Istio).
        let b = bundle(&[(
            "default",
            "au",
            "  action: AUDIT\n  rules: [{to: [{operation: {methods: [GET]}}]}]",
        )]);
        assert_eq!(eval(&b, peer(None), tcp(80)).audits, vec!["default/au"]);
        assert_eq!(
            eval(&b, peer(None), http("GET", "/", None)).audits,
            vec!["default/au"]
        );
    }

    #[test]
    fn deny_beats_allow_and_allow_needs_a_match() {
        let b = bundle(&[
            (
                "default",
                "allow-sleep",
                &format!("  rules: [{{from: [{{source: {{principals: [\"{SLEEP}\"]}}}}]}}]"),
            ),
            (
                "default",
                "deny-8443",
                "  action: DENY\n  rules: [{to: [{operation: {ports: [\"8443\"]}}]}]",
            ),
        ]);
        let d = eval(&b, peer(Some(SLEEP)), tcp(80));
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (true, Some("default/allow-sleep"))
        );
        let d = eval(&b, peer(Some(SLEEP)), tcp(8443));
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (false, Some("default/deny-8443"))
        );
        // An ALLOW selects the workload and does not match: denied, no policy to name.
        let d = eval(&b, peer(Some(ADMIN)), tcp(80));
        assert_eq!((d.allowed, d.policy), (false, None));
        // Only a DENY: everything else is allowed.
        let deny_only = bundle(&[(
            "default",
            "deny-8443",
            "  action: DENY\n  rules: [{to: [{operation: {ports: [\"8443\"]}}]}]",
        )]);
        assert!(allowed(&deny_only, peer(Some(ADMIN)), tcp(80)));
    }

    #[test]
    fn audit_never_decides() {
        let b = bundle(&[
            ("default", "audit", "  action: AUDIT\n  rules: [{}]"),
            (
                "istio-system",
                "audit-mesh",
                "  action: AUDIT\n  rules: [{to: [{operation: {ports: [\"80\"]}}]}]",
            ),
        ]);
        let d = eval(&b, peer(None), tcp(80));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                policy: None,
                dry_run_denies: vec![],
                audits: vec!["default/audit".into(), "istio-system/audit-mesh".into()],
            }
        );
        let mut with_deny = b.clone();
        with_deny
            .authz
            .extend(bundle(&[("default", "d", "  action: DENY\n  rules: [{}]")]).authz);
        let d = eval(&with_deny, peer(None), tcp(81));
        assert_eq!(
            (d.allowed, d.audits),
            (false, vec!["default/audit".to_owned()])
        );
    }

    #[test]
    fn dry_run_never_enforces() {
        let dry = |spec: &str, name: &str| {
            let mut b = bundle(&[("default", name, spec)]);
            b.authz[0].dry_run = true;
            b
        };
        let d = eval(
            &dry("  action: DENY\n  rules: [{}]", "d"),
            peer(None),
            tcp(80),
        );
        assert_eq!(
            d,
            Decision {
                allowed: true,
                policy: None,
                dry_run_denies: vec!["default/d".into()],
                audits: vec![]
            }
        );
        // A dry-run ALLOW that would not allow.
        let b = dry("  rules: [{to: [{operation: {ports: [\"1\"]}}]}]", "a");
        let d = eval(&b, peer(None), tcp(80));
        assert_eq!(
            (d.allowed, d.dry_run_denies),
            (true, vec!["default/a".to_owned()])
        );
        let d = eval(&b, peer(None), tcp(1));
        assert_eq!((d.allowed, d.dry_run_denies), (true, vec![]));
        // Alongside an enforced ALLOW that matches: it would not deny either.
        let mut both = b.clone();
        both.authz.extend(allow_rule("{}").authz);
        let d = eval(&both, peer(None), tcp(80));
        assert_eq!(
            (d.allowed, d.policy.as_deref(), d.dry_run_denies),
            (true, Some("default/a"), vec![])
        );
        // The annotation sets it from YAML too.
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: d\n  \
                    namespace: default\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n  rules: [{}]\n";
        let b = parse_str(text, Path::new("x.yaml")).unwrap();
        assert!(allowed(&b, peer(None), tcp(80)));
    }

    #[test]
    fn scope_root_namespace_and_selectors() {
        let deny_all = "  action: DENY\n  rules: [{}]";
        // Another namespace: not in scope.
        let b = bundle(&[("other", "d", deny_all)]);
        assert!(allowed(&b, peer(None), tcp(80)));
        // The root namespace: mesh-wide.
        let b = bundle(&[("istio-system", "d", deny_all)]);
        assert!(!allowed(&b, peer(None), tcp(80)));
        let l = labels(&[]);
        let t = Target {
            namespace: "default",
            labels: &l,
        };
        assert!(
            evaluate(&b, "mesh-root", t, peer(None), tcp(80)).allowed,
            "root is a parameter"
        );
        let b = bundle(&[("mesh-root", "d", deny_all)]);
        assert!(!evaluate(&b, "mesh-root", t, peer(None), tcp(80)).allowed);
        // Selectors: all labels must be present with equal values.
        for (sel, want_selected) in [
            ("{app: web}", true),
            ("{app: web, version: v1}", true),
            ("{app: web, version: v2}", false),
            ("{app: db}", false),
            ("{tier: x}", false),
        ] {
            let spec = format!("  selector: {{matchLabels: {sel}}}\n{deny_all}");
            for ns in ["default", "istio-system"] {
                let b = bundle(&[(ns, "d", &spec)]);
                assert_eq!(
                    !allowed(&b, peer(None), tcp(80)),
                    want_selected,
                    "{ns} {sel}"
                );
                assert_eq!(
                    selects(
                        &b.authz[0],
                        ROOT,
                        Target {
                            namespace: "default",
                            labels: &labels(&[("app", "web"), ("version", "v1")])
                        }
                    ),
                    want_selected
                );
            }
        }
        // An ALLOW that does not select the workload does not make it default-deny.
        let b = bundle(&[(
            "default",
            "a",
            "  selector: {matchLabels: {app: db}}\n  rules: [{}]",
        )]);
        let no_rules = bundle(&[("default", "a", "  selector: {matchLabels: {app: db}}")]);
        assert!(allowed(&b, peer(None), tcp(80)));
        assert!(allowed(&no_rules, peer(None), tcp(80)));
    }

    fn pa(
        ns: &str,
        name: &str,
        selector: Option<&[(&str, &str)]>,
        mode: MtlsMode,
    ) -> PeerAuthentication {
        PeerAuthentication {
            namespace: ns.into(),
            name: name.into(),
            origin: Origin {
                file: "x.yaml".into(),
                line: 1,
            },
            selector: selector.map(labels),
            mode,
            port_level: BTreeMap::new(),
        }
    }

    #[test]
    fn mtls_levels() {
        use MtlsMode::{Permissive as P, Strict as S};
        let l = labels(&[("app", "web")]);
        let t = Target {
            namespace: "default",
            labels: &l,
        };
        let mode = |pas: Vec<PeerAuthentication>, reg| {
            effective_mtls(
                &PolicyBundle {
                    authz: vec![],
                    peer_authn: pas,
                },
                ROOT,
                t,
                reg,
            )
        };
        assert_eq!(mode(vec![], None), S);
        assert_eq!(mode(vec![], Some(P)), P);
        assert_eq!(mode(vec![pa(ROOT, "m", None, P)], Some(S)), P);
        assert_eq!(
            mode(
                vec![pa(ROOT, "m", None, P), pa("default", "n", None, S)],
                None
            ),
            S
        );
        assert_eq!(
            mode(
                vec![
                    pa("default", "n", None, S),
                    pa("default", "w", Some(&[("app", "web")]), P)
                ],
                None
            ),
            P
        );
        // A selector that does not match, or another namespace: not considered.
        assert_eq!(
            mode(vec![pa("default", "w", Some(&[("app", "db")]), P)], None),
            S
        );
        assert_eq!(mode(vec![pa("other", "n", None, P)], None), S);
        // A selector policy in the root namespace applies to the root namespace only.
        assert_eq!(
            mode(vec![pa(ROOT, "w", Some(&[("app", "web")]), P)], None),
            S
        );
        // An empty selector is namespace-wide.
        assert_eq!(mode(vec![pa("default", "e", Some(&[]), P)], None), P);
        // Same level: the first by name, whatever the order.
        assert_eq!(
            mode(
                vec![pa("default", "b", None, S), pa("default", "a", None, P)],
                None
            ),
            P
        );
        assert_eq!(
            mode(
                vec![pa("default", "a", None, P), pa("default", "b", None, S)],
                None
            ),
            P
        );
    }

    #[test]
    fn mtls_unset_disable_and_ports() {
        use MtlsMode::{Disable as D, Permissive as P, Strict as S, Unset as U};
        let l = labels(&[("app", "web")]);
        let t = Target {
            namespace: "default",
            labels: &l,
        };
        let with_ports = |mut p: PeerAuthentication, ports: &[(u16, MtlsMode)]| {
            p.port_level = ports.iter().copied().collect();
            p
        };
        let eff = |pas: Vec<PeerAuthentication>, reg| {
            effective_port_mtls(
                &PolicyBundle {
                    authz: vec![],
                    peer_authn: pas,
                },
                ROOT,
                t,
                reg,
            )
        };
        // UNSET inherits: workload → namespace → mesh → registry default → STRICT.
        assert_eq!(eff(vec![pa("default", "n", None, U)], None).0, S);
        assert_eq!(eff(vec![pa("default", "n", None, U)], Some(P)).0, P);
        assert_eq!(
            eff(
                vec![pa(ROOT, "m", None, D), pa("default", "n", None, U)],
                None
            )
            .0,
            D
        );
        assert_eq!(
            eff(
                vec![
                    pa(ROOT, "m", None, P),
                    pa("default", "n", None, S),
                    pa("default", "w", Some(&[("app", "web")]), U)
                ],
                None
            )
            .0,
            S
        );
        assert!(D.accepts_plaintext() && P.accepts_plaintext() && !S.accepts_plaintext());
        // Port level: from the workload policy only; UNSET ports take the workload's mode.
        let w = with_ports(
            pa("default", "w", Some(&[("app", "web")]), S),
            &[(8080, D), (9090, U)],
        );
        let (mode, ports) = eff(vec![pa("default", "n", None, P), w], None);
        assert_eq!(mode, S);
        assert_eq!(ports, BTreeMap::from([(8080, D), (9090, S)]));
        // A selector policy in the root namespace is ignored (Istio: workload policies are
        // not in the root namespace).
        let root_sel = with_ports(pa(ROOT, "w", Some(&[("app", "web")]), P), &[(80, D)]);
        assert_eq!(eff(vec![root_sel], None), (S, BTreeMap::new()));
    }

    #[test]
    fn hand_built_models_never_panic() {
        // The evaluator takes any model, not only parsed ones.
        let mut b = allow_rule("{}");
        let rule = &mut b.authz[0].rules.as_mut().unwrap()[0];
        rule.from.push(Source {
            ip_blocks: vec![
                IpNet {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix: 200,
                },
                IpNet {
                    addr: "::ffff:10.0.0.0".parse().unwrap(),
                    prefix: 104,
                },
            ],
            principals: vec![
                StringMatch::Prefix(String::new()),
                StringMatch::Suffix(String::new()),
            ],
            ..Source::default()
        });
        rule.to.push(Operation {
            hosts: vec![
                StringMatch::Suffix("ÉÉÉ".into()),
                StringMatch::Prefix("é".into()),
            ],
            ..Operation::default()
        });
        let _ = eval(&b, peer(None), http("GET", "é", Some("xé")));
        let _ = eval(&b, peer(Some("")), http("", "", Some("")));
    }

    // Property tests over a small universe, so that random policies often match.

    fn arb_source() -> impl Strategy<Value = Source> {
        let principals: &'static [&'static str] =
            &[SLEEP, ADMIN, "cluster.local/ns/client/*", "*/sa/admin", "*"];
        let nets = prop::collection::vec(
            prop::sample::select(vec!["10.0.0.0/24", "10.0.0.5", "0.0.0.0/0", "fd00::/8"])
                .prop_map(|s| crate::policy::parse::parse_cidr(s).unwrap()),
            0..2,
        );
        full_source(principals, &["client", "ops", "o*", "*"], nets)
    }

    fn arb_operation() -> impl Strategy<Value = Operation> {
        let ports = prop::collection::vec(prop::sample::select(vec![80u16, 8080, 9000]), 0..2);
        // Most operations without HTTP fields, so TCP requests match too.
        operation(
            ports,
            &["GET", "POST", "*"],
            &["/api/*", "/health", "*"],
            &["web", "*.svc", "*"],
            3,
        )
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        rule(arb_source(), arb_operation(), 2)
    }

    fn arb_policy() -> impl Strategy<Value = AuthorizationPolicy> {
        let selector = prop::option::of(
            prop::sample::select(vec!["web", "db"]).prop_map(|app| labels(&[("app", app)])),
        );
        (
            prop::sample::select(vec!["default", "other", ROOT]),
            selector,
            prop::sample::select(vec![Action::Allow, Action::Deny, Action::Audit]),
            prop::option::of(prop::collection::vec(arb_rule(), 0..3)),
            prop::bool::weighted(0.2),
        )
            .prop_map(
                |(ns, selector, action, rules, dry_run)| AuthorizationPolicy {
                    namespace: ns.into(),
                    name: String::new(),
                    origin: Origin {
                        file: "prop.yaml".into(),
                        line: 1,
                    },
                    selector,
                    action,
                    rules,
                    dry_run,
                },
            )
    }

    /// Policies with unique names `p0`, `p1`, … (prefix `prefix`).
    fn arb_policies(
        prefix: &'static str,
        n: std::ops::Range<usize>,
    ) -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
        prop::collection::vec(arb_policy(), n).prop_map(move |mut ps| {
            for (i, p) in ps.iter_mut().enumerate() {
                p.name = format!("{prefix}{i}");
            }
            ps
        })
    }

    #[derive(Clone, Debug)]
    struct Case {
        principal: Option<&'static str>,
        ip: IpAddr,
        port: u16,
        http: Option<(&'static str, &'static str, Option<&'static str>)>,
    }

    fn arb_case() -> impl Strategy<Value = Case> {
        (
            prop::option::of(prop::sample::select(vec![SLEEP, ADMIN])),
            prop::sample::select(vec!["10.0.0.5", "10.0.0.9", "192.168.0.1", "fd00::5"])
                .prop_map(|s| s.parse().unwrap()),
            prop::sample::select(vec![80u16, 8080, 9000, 22]),
            prop::option::of((
                prop::sample::select(vec!["GET", "POST", "DELETE"]),
                prop::sample::select(vec!["/api/x", "/health", "/"]),
                prop::option::of(prop::sample::select(vec!["web", "web.svc:8080", "other"])),
            )),
        )
            .prop_map(|(principal, ip, port, http)| Case {
                principal,
                ip,
                port,
                http,
            })
    }

    fn run(b: &PolicyBundle, c: &Case) -> Decision {
        let p = Peer {
            ip: c.ip,
            ..peer(c.principal)
        };
        let req = Request {
            port: c.port,
            dst_ip: None,
            http: c.http.map(|(method, path, host)| HttpRequest {
                method,
                path,
                host,
                headers: &[],
            }),
        };
        eval(b, p, req)
    }

    fn with(mut b: PolicyBundle, p: AuthorizationPolicy) -> PolicyBundle {
        b.authz.push(p);
        b
    }

    fn match_all(ns: &str, name: &str, action: Action) -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: ns.into(),
            name: name.into(),
            origin: Origin {
                file: "prop.yaml".into(),
                line: 1,
            },
            selector: None,
            action,
            rules: Some(vec![Rule::default()]),
            dry_run: false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn non_matching_deny_changes_nothing(ps in arb_policies("p", 0..6), extra in arb_policy(), c in arb_case()) {
            let b = PolicyBundle { authz: ps, peer_authn: vec![] };
            let deny = AuthorizationPolicy { action: Action::Deny, name: "zz-extra".into(), ..extra };
            let p = Peer { ip: c.ip, ..peer(c.principal) };
            let req = Request { port: c.port, dst_ip: None, http: c.http.map(|(method, path, host)| HttpRequest { method, path, host, headers: &[] }) };
            let l = labels(&[("app", "web"), ("version", "v1")]);
            let t = Target { namespace: "default", labels: &l };
            prop_assume!(!(selects(&deny, ROOT, t) && policy_matches(&deny, p, req)));
            prop_assert_eq!(run(&with(b.clone(), deny), &c), run(&b, &c));
        }

        #[test]
        fn match_all_allow_without_deny_allows(ps in arb_policies("p", 0..6), c in arb_case()) {
            let ps = ps.into_iter().filter(|p| p.action != Action::Deny || p.dry_run).collect();
            let b = PolicyBundle { authz: ps, peer_authn: vec![] };
            let d = run(&with(b, match_all("default", "allow-all", Action::Allow)), &c);
            prop_assert!(d.allowed);
            prop_assert!(d.policy.is_some());
        }

        #[test]
        fn match_all_deny_denies(ps in arb_policies("p", 0..6), c in arb_case(), root in any::<bool>()) {
            let ns = if root { ROOT } else { "default" };
            let b = PolicyBundle { authz: ps, peer_authn: vec![] };
            let d = run(&with(b, match_all(ns, "deny-all", Action::Deny)), &c);
            prop_assert!(!d.allowed);
            prop_assert!(d.policy.is_some());
        }

        #[test]
        fn dry_run_and_audit_never_change_allowed(ps in arb_policies("p", 0..6), extra in arb_policies("x", 1..4), c in arb_case()) {
            let b = PolicyBundle { authz: ps, peer_authn: vec![] };
            let before = run(&b, &c);
            let mut added = b.clone();
            for (i, p) in extra.into_iter().enumerate() {
                let p = if i % 2 == 0 {
                    AuthorizationPolicy { dry_run: true, ..p }
                } else {
                    AuthorizationPolicy { action: Action::Audit, ..p }
                };
                added.authz.push(p);
            }
            let after = run(&added, &c);
            prop_assert_eq!(after.allowed, before.allowed);
            prop_assert_eq!(after.policy, before.policy);
        }

        #[test]
        fn order_does_not_matter(ps in arb_policies("p", 0..8).prop_shuffle(), c in arb_case()) {
            let b = PolicyBundle { authz: ps, peer_authn: vec![] };
            let mut sorted = b.clone();
            sorted.authz.sort_by(|a, b| a.name.cmp(&b.name));
            let mut reversed = sorted.clone();
            reversed.authz.reverse();
            let d = run(&b, &c);
            prop_assert_eq!(&d, &run(&sorted, &c));
            prop_assert_eq!(&d, &run(&reversed, &c));
        }

        #[test]
        fn decision_is_explained(ps in arb_policies("p", 0..8), c in arb_case()) {
            // Denied iff a selecting enforced DENY matches, or selecting enforced ALLOWs exist
            // and none matches; the named policy is of the deciding action.
            let b = PolicyBundle { authz: ps, peer_authn: vec![] };
            let d = run(&b, &c);
            if let Some(name) = &d.policy {
                let p = b.authz.iter().find(|p| &p.key() == name).unwrap();
                prop_assert!(!p.dry_run);
                prop_assert_eq!(p.action, if d.allowed { Action::Allow } else { Action::Deny });
            } else if !d.allowed {
                prop_assert!(b.authz.iter().any(|p| p.action == Action::Allow && !p.dry_run));
            }
        }
    }
}
