//! The audit record: one JSON object per line, schema version [`SCHEMA_VERSION`].
//!
//! A record's canonical bytes are its line exactly as written, without the newline: the
//! writer serializes a record once, and the next record's `prev` is the SHA-256 of those
//! bytes. Verification therefore never re-serializes (no JSON canonicalization question).

use ring::digest;
use serde::{Deserialize, Serialize};

/// The version of the record schema written by this build (`v` in every record).
pub const SCHEMA_VERSION: u32 = 1;

/// A SHA-256 digest, the link of the chain.
pub type Hash = [u8; 32];

/// `prev` of the very first record of a node's log.
pub const GENESIS: Hash = [0; 32];

/// The longest line `verify` and `query` accept (a record the writer made is far shorter:
/// every free-text field is capped at [`MAX_FIELD_LEN`]).
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// Free-text fields (paths, hosts, details) are cut to this many bytes, so that a request
/// path cannot blow up a record.
pub const MAX_FIELD_LEN: usize = 2048;

/// The SHA-256 of a record's canonical bytes (its line without the newline).
pub fn hash_line(line: &[u8]) -> Hash {
    let d = digest::digest(&digest::SHA256, line);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses lower- or upper-case hex of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Kind {
    /// The agent started (first record after every start).
    AgentStart,
    /// The agent stopped (last record of a clean shutdown).
    AgentStop,
    /// A connection decision: in the kernel (L4), at the destination (L4), or for HTTP
    /// requests (L7, with request counts), once per connection.
    Connection,
    /// Plaintext to an enrolled workload from outside the mesh: refused, flagged or denied.
    Plaintext,
    /// A configuration change: accepted, refused, drift, unauthorized load.
    Config,
    /// A certificate event: issued, rotated, revoked, refused.
    Cert,
    /// Audit custody, at the authority: a node's audit key registered, a node's checkpoint
    /// accepted or refused (`action`: `key_registered`, `checkpoint_accepted`,
    /// `checkpoint_refused`; `subject`: the node).
    Custody,
    /// The writer's queue overflowed: `lost` records were dropped (never silently).
    RecordsLost,
    /// The log was recovered at start: a torn final line (a crash mid-write) was cut off
    /// and kept aside (`detail`).
    Recovered,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentStart => "agent_start",
            Self::AgentStop => "agent_stop",
            Self::Connection => "connection",
            Self::Plaintext => "plaintext",
            Self::Config => "config",
            Self::Cert => "cert",
            Self::Custody => "custody",
            Self::RecordsLost => "records_lost",
            Self::Recovered => "recovered",
        }
    }
}

/// A decision's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed by policy (or no policy applies).
    Allow,
    /// Denied by policy (or the default deny).
    Deny,
    /// A dry-run policy would have denied; the traffic went through.
    DryRunDeny,
    /// Allowed and marked by an `AUDIT` policy.
    Audit,
    /// Plaintext refused by STRICT mTLS.
    Refused,
    /// Plaintext accepted and flagged (PERMISSIVE).
    Flagged,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::DryRunDeny => "dry_run_deny",
            Self::Audit => "audit",
            Self::Refused => "refused",
            Self::Flagged => "flagged",
        }
    }
}

/// Where a decision was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// In the kernel, at `connect()` or at the SYN.
    Kernel,
    /// In the agent, on the connection (L4).
    L4,
    /// In the agent, per HTTP request (L7).
    L7,
}

/// One audit record as written: the chain header, then the event's fields (absent fields are
/// not written). Field order is fixed by this struct; see the README's "Audit log".
/// Unknown fields are ignored on reading (a newer minor schema adds fields; `v` changes when
/// a field changes meaning).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// Position in the node's chain: 0, 1, 2, … without gaps, across segments.
    pub seq: u64,
    /// When the writer took the event, RFC 3339 UTC with nanoseconds.
    pub time: String,
    /// The node whose agent wrote the record.
    pub node: String,
    /// Hex SHA-256 of the previous record's line (64 zeros for the first record).
    pub prev: String,
    /// The kind of event.
    pub kind: Kind,
    #[serde(flatten)]
    pub body: Body,
}

/// The event part of a record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<Layer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<String>,
    /// `namespace/name` of the source workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_workload: Option<String>,
    /// `namespace/name` of the destination workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `namespace/name` of the deciding policy (`-`: the default deny or allow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The policy generation the decision was made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// How the connection ended (`ok`, `peer_reset`, `policy_close`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// HTTP requests on the connection that were allowed / denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_allowed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_denied: Option<u64>,
    /// `config` and `cert`: what happened (`accepted`, `refused`, `issued`, `rotated`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `config` and `cert`: what it happened to (a file, a SPIFFE ID, a serial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Free text: an error, a reason, the agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `records_lost`: how many records the full queue dropped since the last such record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

impl Body {
    /// Cuts every free-text field to [`MAX_FIELD_LEN`] bytes (on a char boundary).
    pub fn cap_fields(&mut self) {
        for f in [
            &mut self.src_identity,
            &mut self.dst_identity,
            &mut self.src_workload,
            &mut self.dst_workload,
            &mut self.method,
            &mut self.path,
            &mut self.host,
            &mut self.policy,
            &mut self.outcome,
            &mut self.action,
            &mut self.subject,
            &mut self.detail,
        ]
        .into_iter()
        .flatten()
        {
            if f.len() > MAX_FIELD_LEN {
                let mut end = MAX_FIELD_LEN;
                while !f.is_char_boundary(end) {
                    end -= 1;
                }
                f.truncate(end);
            }
        }
    }
}

/// An event to record: its kind and fields; the writer adds the chain header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub body: Body,
}

/// RFC 3339 UTC with nanoseconds.
pub fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses an RFC 3339 time into nanoseconds since the epoch.
pub fn parse_time_ns(s: &str) -> Option<i128> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

/// The namespace of a workload key `ns/name` or a SPIFFE ID `spiffe://td/ns/<ns>/sa/<sa>`.
pub fn namespace_of(s: &str) -> Option<&str> {
    if let Some(rest) = s.strip_prefix("spiffe://") {
        let mut parts = rest.split('/');
        let _td = parts.next()?;
        return match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        };
    }
    s.split_once('/').map(|(ns, _)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = hash_line(b"x");
        assert_eq!(unhex::<32>(&hex(&h)), Some(h));
        assert_eq!(unhex::<32>("zz"), None);
        assert_eq!(unhex::<2>("zzzz"), None);
    }

    #[test]
    fn namespace_of_workload_and_identity() {
        assert_eq!(namespace_of("shop/ledger"), Some("shop"));
        assert_eq!(namespace_of("spiffe://td/ns/shop/sa/ledger"), Some("shop"));
        assert_eq!(namespace_of("spiffe://td/x"), None);
    }

    #[test]
    fn record_round_trips_and_omits_absent_fields() {
        let r = Record {
            v: SCHEMA_VERSION,
            seq: 3,
            time: "2026-01-01T00:00:00Z".into(),
            node: "n1".into(),
            prev: hex(&GENESIS),
            kind: Kind::Connection,
            body: Body {
                verdict: Some(Verdict::Deny),
                port: Some(80),
                ..Body::default()
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains("method"), "{line}");
        assert!(line.contains(r#""verdict":"deny""#), "{line}");
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r);
    }

    #[test]
    fn long_fields_are_capped_on_a_char_boundary() {
        let mut b = Body {
            path: Some("é".repeat(MAX_FIELD_LEN)),
            ..Body::default()
        };
        b.cap_fields();
        let p = b.path.unwrap();
        assert!(p.len() <= MAX_FIELD_LEN && p.len() >= MAX_FIELD_LEN - 1);
    }
}
