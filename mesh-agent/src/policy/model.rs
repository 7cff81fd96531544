//! Typed Istio security objects, as this project supports them (docs/CONTRACTS.md, issue 4).
//!
//! Policy types are kept apart from their wire formats: `parse` turns YAML into these,
//! `compile` turns these (with the registry) into BPF map contents, `eval` evaluates them
//! directly (the reference semantics).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

/// Where an object came from, for error messages and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based line of the object's first line in `file`.
    pub line: usize,
}

/// Everything loaded from a policy directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyBundle {
    pub authz: Vec<AuthorizationPolicy>,
    pub peer_authn: Vec<PeerAuthentication>,
}

/// `security.istio.io/v1` `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    pub origin: Origin,
    /// `spec.selector.matchLabels`; `None`: every workload of the namespace (or of the mesh,
    /// in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    /// `None`: no `rules` key. Absent or empty rules match nothing.
    pub rules: Option<Vec<Rule>>,
    /// `metadata.annotations["istio.io/dry-run"] == "true"`: log, never enforce.
    pub dry_run: bool,
}

impl AuthorizationPolicy {
    /// `namespace/name`, as logs and errors name a policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// One rule: some `from` AND some `to` (an absent list matches anything) AND every `when`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    /// `when`: every condition must hold.
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether the rule uses a field only HTTP requests have (in an operation or a condition):
    /// on a non-HTTP port such an ALLOW rule never matches, and a DENY or AUDIT one matches
    /// ignoring those fields (Istio's fail-safe).
    pub fn has_http_fields(&self) -> bool {
        self.to.iter().any(Operation::has_http_fields)
            || self.when.iter().any(Condition::is_http_only)
    }
}

/// One `when` condition of a rule: some `values` entry matches (or there is none) and no
/// `notValues` entry does. Only keys that need no JWT are supported (istio/istio
/// `pilot/pkg/security/authz/model/model.go`, `New`).
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// `source.ip` and `remote.ip` (this mesh reads no X-Forwarded-For or PROXY protocol:
    /// the remote address is the source address).
    SourceIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    /// `source.namespace`.
    SourceNamespace {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    /// `source.principal` (`<td>/ns/<ns>/sa/<sa>`; trust-domain aliases apply).
    SourcePrincipal {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    /// `source.serviceAccount` (`ns/sa`, or `sa` in the policy's namespace).
    SourceServiceAccount {
        values: Vec<ServiceAccount>,
        not_values: Vec<ServiceAccount>,
    },
    /// `destination.ip`: the destination workload's address of the connection's family.
    DestinationIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    /// `destination.port`.
    DestinationPort {
        values: Vec<u16>,
        not_values: Vec<u16>,
    },
    /// `request.headers[<name>]`, `name` stored lowercase (header names compare
    /// case-insensitively). HTTP only.
    RequestHeader {
        name: String,
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
}

impl Condition {
    /// Whether the condition can only be decided on an HTTP request.
    pub fn is_http_only(&self) -> bool {
        matches!(self, Self::RequestHeader { .. })
    }
}

/// A `serviceAccounts` entry: `namespace/name` (a bare `name` is in the policy's namespace,
/// resolved by the parser).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// Istio matches `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?` (istio/istio
    /// `pilot/pkg/security/authz/model/generator.go`, `serviceAccountRegex`): any trust
    /// domain, this namespace and this service account. Principals here are exactly
    /// `<td>/ns/<ns>/sa/<sa>`.
    pub fn matches_principal(&self, principal: &str) -> bool {
        principal_parts(principal)
            .is_some_and(|(_, ns, sa)| ns == self.namespace && sa == self.name)
    }
}

/// `<td>/ns/<ns>/sa/<sa>` → `(td, ns, sa)`, if the principal has exactly that shape.
pub fn principal_parts(principal: &str) -> Option<(&str, &str, &str)> {
    let mut it = principal.split('/');
    let (td, ns_kw, ns, sa_kw, sa) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    (it.next().is_none() && ns_kw == "ns" && sa_kw == "sa").then_some((td, ns, sa))
}

/// `rules[].from[].source`: every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Source {
    /// `<trust-domain>/ns/<ns>/sa/<sa>` patterns.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    /// `serviceAccounts` (Istio ≥ 1.23): `ns/sa`, any trust domain.
    pub service_accounts: Vec<ServiceAccount>,
    pub not_service_accounts: Vec<ServiceAccount>,
    /// `trustDomains`/`notTrustDomains` (recent Istio): the trust domain of the peer's
    /// certificate. Plaintext has none: it matches no `trustDomains` entry and every
    /// `notTrustDomains` list.
    pub trust_domains: Vec<StringMatch>,
    pub not_trust_domains: Vec<StringMatch>,
}

/// The trust domain of a principal `<td>/ns/<ns>/sa/<sa>` (`""` for none: plaintext).
pub fn principal_trust_domain(principal: &str) -> &str {
    principal_parts(principal).map_or("", |(td, _, _)| td)
}

/// `rules[].to[].operation`: every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
}

impl Operation {
    /// Whether the operation uses a field only HTTP requests have.
    pub fn has_http_fields(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}

/// Istio string matching: exact, prefix `x*`, suffix `*x`, presence `*`; for paths also a
/// URI template with `{*}`/`{**}` segments.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
    /// A path template (validated by the parser, see [`template_matches`]).
    Template(String),
}

impl StringMatch {
    /// `x*` → prefix, `*x` → suffix, `*` → presence, anything else exact.
    pub fn from_pattern(p: &str) -> Self {
        if p == "*" {
            Self::Presence
        } else if let Some(prefix) = p.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else if let Some(suffix) = p.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else {
            Self::Exact(p.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        self.as_pattern().matches(value)
    }
}

/// A [`StringMatch`] borrowed: what the compiled form (read back from the maps) matches with,
/// without allocating per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Suffix(&'a str),
    Presence,
    Template(&'a str),
}

impl Pattern<'_> {
    /// Case-sensitive matching (every field but hosts).
    pub fn matches(self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(p) => value.starts_with(p),
            Self::Suffix(s) => value.ends_with(s),
            Self::Presence => !value.is_empty(),
            Self::Template(t) => template_matches(t, value),
        }
    }

    /// ASCII case-insensitive matching: `hosts`/`notHosts`. Istio builds an Envoy header
    /// matcher on `:authority` with `ignore_case` (istio/istio
    /// `pilot/pkg/security/authz/matcher/header.go`, `HostMatcher`): exact, prefix or suffix,
    /// against the value as sent — a `:port` is part of it (ISTIO-SECURITY-2021-008:
    /// `hosts: ["example.com"]` does not match `Host: example.com:80`), and so is a trailing
    /// dot.
    pub fn matches_ignore_case(self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            Self::Exact(s) => v.eq_ignore_ascii_case(s.as_bytes()),
            Self::Prefix(p) => v
                .get(..p.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes())),
            Self::Suffix(s) => v
                .len()
                .checked_sub(s.len())
                .and_then(|start| v.get(start..))
                .is_some_and(|t| t.eq_ignore_ascii_case(s.as_bytes())),
            Self::Presence => !v.is_empty(),
            // Never produced for hosts; a template never matches a host.
            Self::Template(_) => false,
        }
    }
}

impl StringMatch {
    pub fn as_pattern(&self) -> Pattern<'_> {
        match self {
            Self::Exact(s) => Pattern::Exact(s),
            Self::Prefix(s) => Pattern::Prefix(s),
            Self::Suffix(s) => Pattern::Suffix(s),
            Self::Presence => Pattern::Presence,
            Self::Template(s) => Pattern::Template(s),
        }
    }
}

/// `{*}` in a path template.
pub const MATCH_ONE: &str = "{*}";
/// `{**}` in a path template.
pub const MATCH_ANY: &str = "{**}";

/// Whether `s` uses a path-template operator (istio/istio `pkg/config/security`,
/// `ContainsPathTemplate`).
pub fn is_path_template(s: &str) -> bool {
    s.contains(MATCH_ONE) || s.contains(MATCH_ANY)
}

/// The characters a template operator matches: RFC 3986 `pchar` as Envoy's URI template
/// matcher takes it (`a-zA-Z0-9-._~%!$&'()+,;:@=`; Istio: `pkg/config/security`,
/// `validLiteral`).
pub fn is_template_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

/// Envoy's URI template match (the matcher Istio uses for paths with `{*}`/`{**}`,
/// `envoy.path.match.uri_template`): `{*}` matches one or more template characters within
/// one segment, `{**}` zero or more template characters or `/` (the rest of the path, up to
/// the literal text after it); literal text matches exactly. `path` is the request path
/// without its query string. A template the parser would refuse never matches.
pub fn template_matches(template: &str, path: &str) -> bool {
    let mut t = template;
    let mut p = path.as_bytes();
    loop {
        let one = t.find(MATCH_ONE);
        let any = t.find(MATCH_ANY);
        let (at, is_any) = match (one, any) {
            (None, None) => return p == t.as_bytes(),
            (Some(o), Some(a)) if a <= o => (a, true),
            (Some(o), _) => (o, false),
            (None, Some(a)) => (a, true),
        };
        let literal = &t.as_bytes()[..at];
        if !p.starts_with(literal) {
            return false;
        }
        p = &p[literal.len()..];
        if is_any {
            // `{**}` is the last operator (the parser refuses another after it): the rest of
            // the template is literal and must end the path.
            let rest = &t[at + MATCH_ANY.len()..];
            if is_path_template(rest) {
                return false;
            }
            let Some(middle_len) = p.len().checked_sub(rest.len()) else {
                return false;
            };
            let (middle, tail) = p.split_at(middle_len);
            return tail == rest.as_bytes()
                && middle.iter().all(|&b| b == b'/' || is_template_char(b));
        }
        let n = p.iter().take_while(|&&b| is_template_char(b)).count();
        if n == 0 {
            return false;
        }
        p = &p[n..];
        t = &t[at + MATCH_ONE.len()..];
    }
}

/// Istio's pointer to the local trust domain in policies (`constants.DefaultClusterLocalDomain`).
pub const CLUSTER_LOCAL: &str = "cluster.local";

/// The mesh's trust domain and its aliases (Istio's `meshConfig.trustDomain` and
/// `trustDomainAliases`): identities of any of them are treated alike in principals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustDomains {
    pub local: String,
    pub aliases: Vec<String>,
}

impl TrustDomains {
    pub fn new(local: impl Into<String>, aliases: Vec<String>) -> Self {
        Self {
            local: local.into(),
            aliases,
        }
    }

    /// The local trust domain first, then the aliases.
    fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.local.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// A principal pattern as Istio rewrites it before matching (istio/istio
    /// `pilot/pkg/security/trustdomain/bundle.go`, `ReplaceTrustDomainAliases`): a pattern of
    /// the form `<td>/ns/<ns>/sa/<sa>` whose trust domain is `cluster.local` or one of the
    /// mesh's (local or alias, wildcards allowed on either side) stands for the same
    /// principal in every one of the mesh's trust domains; anything else (`*/ns/…`, fewer or
    /// more segments, a foreign trust domain) is kept as written.
    pub fn expand(&self, m: &StringMatch) -> Vec<StringMatch> {
        let raw = match m {
            StringMatch::Exact(s) => s.clone(),
            StringMatch::Prefix(s) => format!("{s}*"),
            StringMatch::Suffix(s) => format!("*{s}"),
            StringMatch::Presence | StringMatch::Template(_) => return vec![m.clone()],
        };
        let parts: Vec<&str> = raw.split('/').collect();
        if parts.len() != 5 || parts[0] == "*" {
            return vec![m.clone()];
        }
        let td = parts[0];
        let known = self.all().any(|t| td_string_match(td, t));
        if !(known || td == CLUSTER_LOCAL) {
            return vec![m.clone()];
        }
        let mut out: Vec<StringMatch> = Vec::new();
        for t in self.all() {
            let p = if suffix_match(t, td) {
                m.clone()
            } else {
                StringMatch::from_pattern(&format!("{t}/{}", parts[1..].join("/")))
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    /// `trustDomains` entries as the principals' trust domains are read: an exact
    /// `cluster.local`, the local trust domain or an alias stands for every one of the mesh's
    /// trust domains; anything else is kept as written.
    pub fn expand_domains(&self, list: &[StringMatch]) -> Vec<StringMatch> {
        let mut out: Vec<StringMatch> = Vec::new();
        for m in list {
            let ours = matches!(m, StringMatch::Exact(td)
                if td == CLUSTER_LOCAL || self.all().any(|t| t == td));
            let add: Vec<StringMatch> = if ours {
                self.all()
                    .map(|t| StringMatch::Exact(t.to_owned()))
                    .collect()
            } else {
                vec![m.clone()]
            };
            for e in add {
                if !out.contains(&e) {
                    out.push(e);
                }
            }
        }
        out
    }

    /// [`Self::expand`] over a list.
    pub fn expand_all(&self, list: &[StringMatch]) -> Vec<StringMatch> {
        let mut out: Vec<StringMatch> = Vec::new();
        for m in list {
            for e in self.expand(m) {
                if !out.contains(&e) {
                    out.push(e);
                }
            }
        }
        out
    }
}

/// istio/istio `pilot/pkg/security/trustdomain/util.go`, `stringMatch` of one list entry:
/// either side may carry the wildcard.
fn td_string_match(a: &str, s: &str) -> bool {
    a == s
        || s == "*"
        || prefix_match(a, s)
        || prefix_match(s, a)
        || suffix_match(a, s)
        || suffix_match(s, a)
}

fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|p| a.ends_with(p))
}

impl PolicyBundle {
    /// The bundle with every principal pattern (`principals`, `notPrincipals`, `when`
    /// `source.principal`) rewritten for the mesh's trust domains ([`TrustDomains::expand`]),
    /// as Istio does before it builds its matchers (`Model.MigrateTrustDomain`). Both the
    /// compiler and the reference evaluator decide on this form.
    pub fn for_trust_domains(&self, tds: &TrustDomains) -> PolicyBundle {
        let mut out = self.clone();
        for p in &mut out.authz {
            for r in p.rules.iter_mut().flatten() {
                for s in &mut r.from {
                    s.principals = tds.expand_all(&s.principals);
                    s.not_principals = tds.expand_all(&s.not_principals);
                    s.trust_domains = tds.expand_domains(&s.trust_domains);
                    s.not_trust_domains = tds.expand_domains(&s.not_trust_domains);
                }
                for c in &mut r.when {
                    if let Condition::SourcePrincipal { values, not_values } = c {
                        *values = tds.expand_all(values);
                        *not_values = tds.expand_all(not_values);
                    }
                }
            }
        }
        out
    }
}

/// A CIDR block (`10.0.0.0/8`, `fd00::/16`, or a bare address = full-length prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr.to_canonical(), ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                // `saturating_sub`: a prefix longer than the family's (never parsed) is a full mask.
                let mask = u32::MAX
                    .checked_shl(32u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `security.istio.io/v1` `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    pub origin: Origin,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`: per-port modes of the selected workloads (only with a selector,
    /// as Istio validates).
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// `spec.mtls.mode` (and `portLevelMtls` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Inherit from the parent scope (`spec.mtls` absent is the same).
    Unset,
    Strict,
    Permissive,
    /// Istio: plaintext only. Here: plaintext from outside the mesh is accepted (as under
    /// PERMISSIVE); traffic between mesh workloads keeps its mTLS (the agents' HBONE, which
    /// does not depend on the workload).
    Disable,
}

impl MtlsMode {
    /// Whether the mode accepts plaintext from outside the mesh (`POL_DST_F_PERMISSIVE`).
    pub fn accepts_plaintext(self) -> bool {
        matches!(self, Self::Permissive | Self::Disable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(StringMatch::from_pattern("*"), StringMatch::Presence);
        assert!(StringMatch::from_pattern("/api/*").matches("/api/x"));
        assert!(!StringMatch::from_pattern("/api/*").matches("/apx"));
        assert!(StringMatch::from_pattern("*.local").matches("a.local"));
        assert!(StringMatch::from_pattern("GET").matches("GET"));
        assert!(!StringMatch::from_pattern("GET").matches("GETX"));
    }

    #[test]
    fn path_templates_match_as_envoy_uri_templates() {
        let t = |tpl: &str, path: &str| template_matches(tpl, path);
        // `{*}`: exactly one non-empty segment.
        assert!(t("/foo/{*}", "/foo/bar"));
        for p in ["/foo/bar/baz", "/foo/", "/foo", "/foo//", "/foo/bar/"] {
            assert!(!t("/foo/{*}", p), "{p}");
        }
        // `{**}`: the rest (zero or more characters, `/` included) up to the literal after.
        for p in ["/foo/", "/foo/bar", "/foo/bar/baz.txt", "/foo//"] {
            assert!(t("/foo/{**}", p), "{p}");
        }
        assert!(!t("/foo/{**}", "/foo"));
        assert!(!t("/foo/{**}", "/foobar"));
        for p in ["/foo/bar/", "/foo//", "/foo/bar/baz/"] {
            assert!(t("/foo/{**}/", p), "{p}");
        }
        assert!(!t("/foo/{**}/", "/foo/bar"));
        assert!(t("/foo/{*}/bar/{**}", "/foo/buzz/bar/"));
        assert!(t("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz"));
        assert!(!t("/foo/{*}/bar/{**}", "/foo/a/b/bar/baz"));
        assert!(t("/{**}/x", "/a/b/x"));
        assert!(!t("/{**}/x", "/a/b/xy"));
        // Attacker forms: characters outside pchar are never matched by an operator (the
        // query string is removed before matching; `?`, `#`, `\`, space, `{` stay
        // literal-only). Dot segments are plain characters here: normalization (the proxy's)
        // removes them before matching.
        for p in [
            "/foo/a b",
            "/foo/a\\b",
            "/foo/a?b",
            "/foo/{x}",
            "/foo/\u{e9}",
        ] {
            assert!(!t("/foo/{*}", p), "{p:?}");
        }
        assert!(
            t("/foo/{*}", "/foo/.."),
            "a dot segment is a segment until normalized"
        );
        assert!(t("/admin/{**}", "/admin/%2e%2e/x"));
        // A template the parser refuses never matches.
        assert!(!t("/{**}/{*}", "/a/b"));
        assert!(!t("/{**}/{**}", "/a/b"));
    }

    #[test]
    fn trust_domain_rewrite_as_istio() {
        // istio/istio pilot/pkg/security/trustdomain/bundle_test.go, in spirit.
        let tds = TrustDomains::new("td2", vec!["td1".into()]);
        let e = |p: &str| -> Vec<String> {
            tds.expand(&StringMatch::from_pattern(p))
                .into_iter()
                .map(|m| match m {
                    StringMatch::Exact(s) => s,
                    StringMatch::Prefix(s) => format!("{s}*"),
                    StringMatch::Suffix(s) => format!("*{s}"),
                    StringMatch::Presence => "*".into(),
                    StringMatch::Template(s) => s,
                })
                .collect()
        };
        assert_eq!(
            e("td1/ns/foo/sa/bar"),
            ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]
        );
        assert_eq!(
            e("td2/ns/foo/sa/bar"),
            ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]
        );
        // `cluster.local` points at the local trust domain and its aliases...
        assert_eq!(
            e("cluster.local/ns/foo/sa/bar"),
            ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]
        );
        // ... a foreign trust domain does not.
        assert_eq!(e("td3/ns/foo/sa/bar"), ["td3/ns/foo/sa/bar"]);
        // Not five segments, or `*` as the trust domain: kept as written.
        assert_eq!(e("cluster.local/ns/foo/*"), ["cluster.local/ns/foo/*"]);
        assert_eq!(e("*/ns/foo/sa/bar"), ["*/ns/foo/sa/bar"]);
        assert_eq!(e("*"), ["*"]);
        // Wildcards in the trust domain.
        assert_eq!(
            e("cluster.local/ns/foo/sa/*"),
            ["td2/ns/foo/sa/*", "td1/ns/foo/sa/*"]
        );
        assert_eq!(
            e("*2/ns/foo/sa/bar"),
            ["*2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]
        );
        // Without aliases `cluster.local` is just the local trust domain.
        let local = TrustDomains::new("example.org", vec![]);
        let m = local.expand(&StringMatch::from_pattern("cluster.local/ns/a/sa/b"));
        assert_eq!(m, vec![StringMatch::Exact("example.org/ns/a/sa/b".into())]);
        // The attacker-style near misses stay near misses.
        for p in [
            "cluster.localx/ns/a/sa/b",
            "xcluster.local/ns/a/sa/b",
            "Cluster.Local/ns/a/sa/b",
        ] {
            assert_eq!(
                local.expand(&StringMatch::from_pattern(p)),
                vec![StringMatch::Exact(p.into())]
            );
        }
    }

    #[test]
    fn service_accounts_match_namespace_and_name_in_any_trust_domain() {
        let sa = ServiceAccount {
            namespace: "ns".into(),
            name: "web".into(),
        };
        assert!(sa.matches_principal("td/ns/ns/sa/web"));
        assert!(sa.matches_principal("other.td/ns/ns/sa/web"));
        for p in [
            "td/ns/ns/sa/web2",
            "td/ns/ns2/sa/web",
            "td/ns/ns/sa/web/x",
            "td/sa/web/ns/ns",
            "td/ns/ns/sa/WEB",
            "",
        ] {
            assert!(!sa.matches_principal(p), "{p}");
        }
    }

    #[test]
    fn cidrs() {
        let n = IpNet {
            addr: "10.1.0.0".parse().unwrap(),
            prefix: 16,
        };
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        let all = IpNet {
            addr: "0.0.0.0".parse().unwrap(),
            prefix: 0,
        };
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6 = IpNet {
            addr: "fd00:1::".parse().unwrap(),
            prefix: 32,
        };
        assert!(v6.contains("fd00:1::5".parse().unwrap()));
        assert!(!v6.contains("fd00:2::5".parse().unwrap()));
    }
}
