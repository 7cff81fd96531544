//! Kubernetes-style names (DNS-1123), checked the same way wherever the mesh reads one: the
//! registry, policies and the operator commands.

/// The longest DNS-1123 label.
pub const MAX_LABEL_LEN: usize = 63;
/// The longest DNS-1123 subdomain (node names, policy names).
pub const MAX_SUBDOMAIN_LEN: usize = 253;

/// A DNS-1123 label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SUBDOMAIN_LEN && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        for ok in ["a", "a-1", "0", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok:?}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
        assert!(is_dns_subdomain("node-1.example"));
        for bad in ["", ".a", "a.", "a..b", &format!("{}.a", "a".repeat(252))] {
            assert!(!is_dns_subdomain(bad), "{bad:?}");
        }
    }
}
