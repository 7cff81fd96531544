//! A bundle's rollout: when the authority may release it, and to which nodes first.
//!
//! ```json
//! "rollout":{"activateAt":"2026-01-02T03:04:05Z","canaryNodes":["n1","edge-*"],"canaryWindowSecs":60}
//! ```
//!
//! - `activateAt` (optional): an RFC 3339 time in UTC (`Z`); nobody receives the bundle
//!   before it.
//! - `canaryNodes` (optional, with `canaryWindowSecs`): node names (DNS-1123 subdomains), or
//!   a prefix pattern ending in `*` (`edge-*`); at most [`MAX_CANARY_NODES`] entries, unique.
//!   From the activation time these nodes alone receive the bundle; after the window, and
//!   only if every canary reported the version active, every node does.
//! - `canaryWindowSecs`: 1 ..= [`MAX_WINDOW_SECS`], only with `canaryNodes`.
//!
//! Both are covered by the digest (see [`super::canonical`]) and so by the signatures: a
//! rollout cannot be changed or removed after signing. A bundle without `rollout` is released
//! to every node as soon as the authority publishes it.

use serde::{Deserialize, Serialize};

use super::Rejection;

/// Most entries in `canaryNodes`.
pub const MAX_CANARY_NODES: usize = 256;
/// Longest canary window: one week.
pub const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;

/// When and to whom a bundle is released first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate_at: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "bounded_nodes"
    )]
    pub canary_nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_window_secs: Option<u64>,
}

impl Rollout {
    /// Checks the fields (see the module documentation); `Err` names the problem.
    pub fn check(&self) -> Result<(), Rejection> {
        let schema = |detail: String| Rejection::Schema { detail };
        if self.activate_at.is_none() && self.canary_nodes.is_empty() {
            return Err(schema(
                "rollout with neither activateAt nor canaryNodes".into(),
            ));
        }
        if let Some(at) = &self.activate_at {
            parse_utc(at).map_err(schema)?;
        }
        if self.canary_nodes.len() > MAX_CANARY_NODES {
            return Err(Rejection::Oversized {
                detail: format!(
                    "{} canary nodes (at most {MAX_CANARY_NODES})",
                    self.canary_nodes.len()
                ),
            });
        }
        for (i, n) in self.canary_nodes.iter().enumerate() {
            if !is_node_pattern(n) {
                return Err(schema(format!(
                    "canary node {:?} is not a node name (a DNS-1123 subdomain) or a prefix pattern ending in `*`",
                    super::truncated(n)
                )));
            }
            if self.canary_nodes[..i].contains(n) {
                return Err(schema(format!("canary node {n:?} listed twice")));
            }
        }
        match (self.canary_nodes.is_empty(), self.canary_window_secs) {
            (false, None) => Err(schema("canaryNodes without canaryWindowSecs".into())),
            (true, Some(_)) => Err(schema("canaryWindowSecs without canaryNodes".into())),
            (false, Some(w)) if w == 0 || w > MAX_WINDOW_SECS => Err(schema(format!(
                "canaryWindowSecs {w} (1 to {MAX_WINDOW_SECS})"
            ))),
            _ => Ok(()),
        }
    }

    /// The activation time in Unix milliseconds (`None`: at once). Checked by
    /// [`Rollout::check`]; an unparsable time (never in a checked bundle) counts as "never".
    pub fn activate_at_unix_ms(&self) -> Option<u64> {
        self.activate_at
            .as_deref()
            .map(|t| parse_utc(t).unwrap_or(u64::MAX))
    }

    /// Whether `node` is a canary (an exact name, or a pattern's prefix).
    pub fn is_canary(&self, node: &str) -> bool {
        self.canary_nodes.iter().any(|p| matches(p, node))
    }

    /// A line for people: `activate at T; canaries n1, n2 for S s`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(at) = &self.activate_at {
            parts.push(format!("activate at {at}"));
        }
        if let Some(w) = self.canary_window_secs {
            parts.push(format!(
                "canaries {} for {w} s",
                self.canary_nodes.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// Whether canary entry `pattern` selects `node`.
pub fn matches(pattern: &str, node: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => node.starts_with(prefix),
        None => pattern == node,
    }
}

/// A node name, or a non-empty prefix of one followed by `*`.
fn is_node_pattern(s: &str) -> bool {
    match s.strip_suffix('*') {
        Some(prefix) => {
            !prefix.is_empty()
                && prefix.len() < crate::names::MAX_SUBDOMAIN_LEN
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && prefix.as_bytes()[0].is_ascii_alphanumeric()
        }
        None => crate::names::is_dns_subdomain(s),
    }
}

/// Unix milliseconds of an RFC 3339 time written in UTC (`Z` or `+00:00`).
pub fn parse_utc(t: &str) -> Result<u64, String> {
    let quoted = super::truncated(t);
    // RFC 3339 lets a space stand for `T`; one spelling only here.
    if t.as_bytes().get(10) != Some(&b'T') {
        return Err(format!(
            "activateAt {quoted:?} is not an RFC 3339 time (…T…Z)"
        ));
    }
    let parsed = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("activateAt {quoted:?} is not an RFC 3339 time"))?;
    if !parsed.offset().is_utc() {
        return Err(format!("activateAt {quoted:?} is not in UTC (end it in Z)"));
    }
    let ms = parsed.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).map_err(|_| format!("activateAt {quoted:?} is before 1970"))
}

fn bounded_nodes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    super::bounded_vec(d, MAX_CANARY_NODES, "canary nodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(at: Option<&str>, nodes: &[&str], w: Option<u64>) -> Rollout {
        Rollout {
            activate_at: at.map(Into::into),
            canary_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            canary_window_secs: w,
        }
    }

    #[test]
    fn valid_rollouts_check() {
        for ok in [
            r(Some("2026-01-02T03:04:05Z"), &[], None),
            r(Some("2026-01-02T03:04:05.5+00:00"), &[], None),
            r(None, &["n1"], Some(1)),
            r(None, &["n1", "edge-*", "a.b.c"], Some(MAX_WINDOW_SECS)),
            r(Some("1970-01-01T00:00:00Z"), &["n1"], Some(30)),
        ] {
            ok.check().unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        assert_eq!(
            r(Some("1970-01-01T00:00:01Z"), &[], None).activate_at_unix_ms(),
            Some(1000)
        );
    }

    #[test]
    fn malformed_rollouts_are_refused_with_a_reason() {
        let long = "a".repeat(300);
        let cases: Vec<(Rollout, &str)> = vec![
            (r(None, &[], None), "schema"),
            (r(Some("tomorrow"), &[], None), "schema"),
            (r(Some("2026-01-02T03:04:05+01:00"), &[], None), "schema"),
            (r(Some("2026-01-02 03:04:05Z"), &[], None), "schema"),
            (r(Some(""), &[], None), "schema"),
            (r(None, &["n1"], None), "schema"),
            (r(None, &[], Some(5)), "schema"),
            (r(Some("2026-01-02T03:04:05Z"), &[], Some(5)), "schema"),
            (r(None, &["n1"], Some(0)), "schema"),
            (r(None, &["n1"], Some(MAX_WINDOW_SECS + 1)), "schema"),
            (r(None, &["N1"], Some(5)), "schema"),
            (r(None, &["*"], Some(5)), "schema"),
            (r(None, &["n*1"], Some(5)), "schema"),
            (r(None, &["n1", "n1"], Some(5)), "schema"),
            (r(None, &["n 1"], Some(5)), "schema"),
            (r(None, &["n1\n"], Some(5)), "schema"),
            (r(None, &["../n1"], Some(5)), "schema"),
            (r(None, &[""], Some(5)), "schema"),
            (r(None, &[&long], Some(5)), "schema"),
            (r(None, &["-n*"], Some(5)), "schema"),
        ];
        for (rollout, want) in cases {
            let got = rollout.check().map_err(|e| e.reason());
            assert_eq!(got, Err(want), "{rollout:?}");
        }
        let many: Vec<String> = (0..=MAX_CANARY_NODES).map(|i| format!("n{i}")).collect();
        let too_many = Rollout {
            canary_nodes: many,
            canary_window_secs: Some(5),
            ..Rollout::default()
        };
        assert_eq!(too_many.check().map_err(|e| e.reason()), Err("oversized"));
    }

    #[test]
    fn patterns_match_prefixes_names_match_exactly() {
        let r = r(None, &["n1", "edge-*"], Some(5));
        assert!(r.is_canary("n1"));
        assert!(!r.is_canary("n10"));
        assert!(!r.is_canary("n"));
        assert!(r.is_canary("edge-a"));
        assert!(r.is_canary("edge-"));
        assert!(!r.is_canary("edge"));
        assert!(!r.is_canary("core-1"));
    }
}
