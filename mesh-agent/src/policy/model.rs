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

/// One rule: some `from` AND some `to` (an empty list matches anything).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
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

/// Istio string matching: exact, prefix `x*`, suffix `*x`, presence `*`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
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
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Presence => !value.is_empty(),
        }
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
}

impl StringMatch {
    pub fn as_pattern(&self) -> Pattern<'_> {
        match self {
            Self::Exact(s) => Pattern::Exact(s),
            Self::Prefix(s) => Pattern::Prefix(s),
            Self::Suffix(s) => Pattern::Suffix(s),
            Self::Presence => Pattern::Presence,
        }
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    Strict,
    Permissive,
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
