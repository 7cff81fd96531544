//! SPIFFE IDs: parsing, formatting and strict validation.
//!
//! Three shapes are used by the mesh, all in one trust domain:
//!
//! | shape                                   | type        | who holds it                  |
//! |-----------------------------------------|-------------|-------------------------------|
//! | `spiffe://<td>/ns/<ns>/sa/<sa>`         | [`SpiffeId`]| a workload (X.509-SVID)       |
//! | `spiffe://<td>/node/<node>`             | [`NodeId`]  | a node agent, towards the authority |
//! | `spiffe://<td>/authority`               | [`PeerId::Authority`] | the authority's TLS server |
//!
//! Validation follows the SPIFFE ID specification: scheme `spiffe` (lower case), trust domain of
//! `[a-z0-9._-]` (at most 255 bytes), path segments of `[A-Za-z0-9._-]`, no empty, `.` or `..`
//! segment, no trailing slash, no query, fragment, port, user info or percent-encoding, and the
//! whole ID at most 2048 bytes. Each error names the offending part.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const SCHEME_PREFIX: &str = "spiffe://";
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not an acceptable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("SPIFFE ID {input:?} is {len} bytes long, the maximum is {MAX_ID_LEN}")]
    TooLong { input: String, len: usize },
    #[error("SPIFFE ID {input:?} does not start with \"spiffe://\"")]
    WrongScheme { input: String },
    #[error("SPIFFE ID {input:?} has an empty trust domain")]
    EmptyTrustDomain { input: String },
    #[error(
        "trust domain {trust_domain:?} is {len} bytes long, the maximum is {MAX_TRUST_DOMAIN_LEN}"
    )]
    TrustDomainTooLong { trust_domain: String, len: usize },
    #[error(
        "trust domain {trust_domain:?} contains {ch:?}: only lower-case letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar { trust_domain: String, ch: char },
    #[error("SPIFFE ID {input:?} has an empty path segment (double or trailing slash)")]
    EmptySegment { input: String },
    #[error("SPIFFE ID {input:?} has a {segment:?} path segment")]
    DotSegment { input: String, segment: String },
    #[error(
        "path segment {segment:?} of SPIFFE ID {input:?} contains {ch:?}: only letters, digits, '.', '-' and '_' are allowed"
    )]
    SegmentChar {
        input: String,
        segment: String,
        ch: char,
    },
    #[error("SPIFFE ID {input:?} is not a workload ID: the path must be /ns/<namespace>/sa/<service-account>")]
    NotWorkload { input: String },
    #[error("SPIFFE ID {input:?} is not a node ID: the path must be /node/<node>")]
    NotNode { input: String },
    #[error(
        "SPIFFE ID {input:?} is none of the mesh's shapes (/ns/<ns>/sa/<sa>, /node/<node>, /authority)"
    )]
    UnknownShape { input: String },
    #[error("{what} {value:?} is not a valid SPIFFE path segment")]
    BadComponent { what: &'static str, value: String },
}

/// A validated SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name (not a URI).
    pub fn new(name: impl Into<String>) -> Result<Self, SpiffeIdError> {
        let name = name.into();
        validate_trust_domain(&name, &name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`: the ID of the trust domain itself (put into the CA certificates).
    pub fn uri(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> String {
        td.0
    }
}

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds a workload ID from its parts, validating each.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let namespace = namespace.into();
        let service_account = service_account.into();
        check_component("namespace", &namespace)?;
        check_component("service account", &service_account)?;
        let id = Self {
            trust_domain,
            namespace,
            service_account,
        };
        check_len(&id.to_string())?;
        Ok(id)
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`, nothing else.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        match PeerId::parse(input) {
            Ok(PeerId::Workload(id)) => Ok(id),
            Ok(_) | Err(SpiffeIdError::UnknownShape { .. }) => Err(SpiffeIdError::NotWorkload {
                input: input.to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = WorkloadPath {
            trust_domain: self.trust_domain.as_str(),
            namespace: &self.namespace,
            service_account: &self.service_account,
        };
        write!(f, "{SCHEME_PREFIX}{path}")
    }
}

/// The one place a workload identity is spelled: `<td>/ns/<ns>/sa/<sa>`, the SPIFFE ID without
/// its `spiffe://` scheme (the form policies name principals in).
struct WorkloadPath<'a> {
    trust_domain: &'a str,
    namespace: &'a str,
    service_account: &'a str,
}

impl fmt::Display for WorkloadPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A workload's policy principal, `<td>/ns/<ns>/sa/<sa>` (its SPIFFE ID without `spiffe://`).
/// Not validated: for names taken from an already validated registry.
pub fn workload_principal(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    WorkloadPath {
        trust_domain,
        namespace,
        service_account,
    }
    .to_string()
}

/// A workload's SPIFFE ID as a string, `spiffe://<td>/ns/<ns>/sa/<sa>`. Not validated: use
/// [`SpiffeId::new`] where the ID is checked or used for TLS.
pub fn workload_uri(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    let path = WorkloadPath {
        trust_domain,
        namespace,
        service_account,
    };
    format!("{SCHEME_PREFIX}{path}")
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

/// A node agent's identity towards the authority: `spiffe://<trust-domain>/node/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId {
    trust_domain: TrustDomain,
    node: String,
}

impl NodeId {
    pub fn new(trust_domain: TrustDomain, node: impl Into<String>) -> Result<Self, SpiffeIdError> {
        let node = node.into();
        check_component("node name", &node)?;
        let id = Self { trust_domain, node };
        check_len(&id.to_string())?;
        Ok(id)
    }

    /// Parses `spiffe://<td>/node/<node>`, nothing else.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        match PeerId::parse(input) {
            Ok(PeerId::Node(id)) => Ok(id),
            Ok(_) | Err(SpiffeIdError::UnknownShape { .. }) => Err(SpiffeIdError::NotNode {
                input: input.to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}/node/{}", self.trust_domain, self.node)
    }
}

impl FromStr for NodeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for NodeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.to_string()
    }
}

/// Any identity the mesh issues certificates for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerId {
    Workload(SpiffeId),
    Node(NodeId),
    /// `spiffe://<td>/authority`: the authority's own TLS server identity.
    Authority(TrustDomain),
}

impl PeerId {
    /// Parses and validates any of the three shapes.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        check_len(input)?;
        let rest = input
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| SpiffeIdError::WrongScheme {
                input: input.to_owned(),
            })?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain {
                input: input.to_owned(),
            });
        }
        validate_trust_domain(td, input)?;
        let trust_domain = TrustDomain(td.to_owned());
        let segments: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path[1..].split('/').collect()
        };
        for segment in &segments {
            validate_segment(segment, input)?;
        }
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => Ok(PeerId::Workload(SpiffeId {
                trust_domain,
                namespace: (*ns).to_owned(),
                service_account: (*sa).to_owned(),
            })),
            ["node", node] => Ok(PeerId::Node(NodeId {
                trust_domain,
                node: (*node).to_owned(),
            })),
            ["authority"] => Ok(PeerId::Authority(trust_domain)),
            _ => Err(SpiffeIdError::UnknownShape {
                input: input.to_owned(),
            }),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            PeerId::Workload(id) => id.trust_domain(),
            PeerId::Node(id) => id.trust_domain(),
            PeerId::Authority(td) => td,
        }
    }

    /// The authority's identity in `trust_domain`.
    pub fn authority(trust_domain: &TrustDomain) -> Self {
        PeerId::Authority(trust_domain.clone())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerId::Workload(id) => id.fmt(f),
            PeerId::Node(id) => id.fmt(f),
            PeerId::Authority(td) => write!(f, "{SCHEME_PREFIX}{td}/authority"),
        }
    }
}

impl FromStr for PeerId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<SpiffeId> for PeerId {
    fn from(id: SpiffeId) -> Self {
        PeerId::Workload(id)
    }
}

impl From<NodeId> for PeerId {
    fn from(id: NodeId) -> Self {
        PeerId::Node(id)
    }
}

fn check_len(input: &str) -> Result<(), SpiffeIdError> {
    if input.len() > MAX_ID_LEN {
        return Err(SpiffeIdError::TooLong {
            input: input.chars().take(64).collect::<String>() + "…",
            len: input.len(),
        });
    }
    Ok(())
}

fn validate_trust_domain(td: &str, input: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain {
            input: input.to_owned(),
        });
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong {
            trust_domain: td.to_owned(),
            len: td.len(),
        });
    }
    if let Some(ch) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::TrustDomainChar {
            trust_domain: td.to_owned(),
            ch,
        });
    }
    Ok(())
}

fn validate_segment(segment: &str, input: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment {
            input: input.to_owned(),
        });
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment {
            input: input.to_owned(),
            segment: segment.to_owned(),
        });
    }
    if let Some(ch) = segment
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::SegmentChar {
            input: input.to_owned(),
            segment: segment.to_owned(),
            ch,
        });
    }
    Ok(())
}

fn check_component(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    validate_segment(value, value).map_err(|_| SpiffeIdError::BadComponent {
        what,
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn workload_id_roundtrips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sa-a").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sa-a");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sa-a");
        assert_eq!(SpiffeId::new(td(), "default", "sa-a").unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/default/sa/sa-a\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn node_and_authority_ids() {
        let n = NodeId::parse("spiffe://cluster.local/node/n1").unwrap();
        assert_eq!(n.node(), "n1");
        assert_eq!(NodeId::new(td(), "n1").unwrap(), n);
        assert_eq!(
            PeerId::parse("spiffe://cluster.local/authority").unwrap(),
            PeerId::Authority(td())
        );
        assert_eq!(
            PeerId::authority(&td()).to_string(),
            "spiffe://cluster.local/authority"
        );
        assert!(matches!(
            SpiffeId::parse("spiffe://cluster.local/node/n1"),
            Err(SpiffeIdError::NotWorkload { .. })
        ));
        assert!(matches!(
            NodeId::parse("spiffe://cluster.local/ns/a/sa/b"),
            Err(SpiffeIdError::NotNode { .. })
        ));
    }

    #[test]
    fn rejects_malformed_ids_with_a_named_problem() {
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, SpiffeIdError::Empty)),
            ("http://cluster.local/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::WrongScheme { .. })
            }),
            ("SPIFFE://cluster.local/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::WrongScheme { .. })
            }),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::EmptyTrustDomain { .. })
            }),
            ("spiffe://Cluster.local/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::TrustDomainChar { ch: 'C', .. })
            }),
            ("spiffe://cluster.local:443/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::TrustDomainChar { ch: ':', .. })
            }),
            ("spiffe://user@cluster.local/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::TrustDomainChar { ch: '@', .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b/", |e| {
                matches!(e, SpiffeIdError::EmptySegment { .. })
            }),
            ("spiffe://cluster.local/ns//sa/b", |e| {
                matches!(e, SpiffeIdError::EmptySegment { .. })
            }),
            ("spiffe://cluster.local/ns/../sa/b", |e| {
                matches!(e, SpiffeIdError::DotSegment { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", |e| {
                matches!(e, SpiffeIdError::SegmentChar { ch: '?', .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b#f", |e| {
                matches!(e, SpiffeIdError::SegmentChar { ch: '#', .. })
            }),
            ("spiffe://cluster.local/ns/a%20/sa/b", |e| {
                matches!(e, SpiffeIdError::SegmentChar { ch: '%', .. })
            }),
            ("spiffe://cluster.local/ns/a/sa", |e| {
                matches!(e, SpiffeIdError::NotWorkload { .. })
            }),
            ("spiffe://cluster.local", |e| {
                matches!(e, SpiffeIdError::NotWorkload { .. })
            }),
            ("spiffe://cluster.local/ns/a/sa/b/extra", |e| {
                matches!(e, SpiffeIdError::NotWorkload { .. })
            }),
        ];
        for (input, ok) in cases {
            let err = SpiffeId::parse(input).unwrap_err();
            assert!(ok(&err), "{input:?} gave unexpected error {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(3000));
        assert!(matches!(
            SpiffeId::parse(&long),
            Err(SpiffeIdError::TooLong { .. })
        ));
        let long_td = format!("spiffe://{}/ns/a/sa/b", "a".repeat(300));
        assert!(matches!(
            SpiffeId::parse(&long_td),
            Err(SpiffeIdError::TrustDomainTooLong { .. })
        ));
        assert!(matches!(
            SpiffeId::new(td(), "a/b", "c"),
            Err(SpiffeIdError::BadComponent {
                what: "namespace",
                ..
            })
        ));
        assert!(TrustDomain::new("").is_err());
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://x/ns/a\"").is_err());
    }
}
