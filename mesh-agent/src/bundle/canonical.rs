//! The canonical encoding a bundle's digest covers.
//!
//! The digest is `sha256:` followed by the lower-case hex of SHA-256 over these items, in
//! this order, with nothing between them:
//!
//! | item | encoding |
//! |---|---|
//! | the tag `mesh-config-bundle/digest/v1` | string |
//! | `schema` | u64 |
//! | `kind` | string |
//! | `version` | u64 |
//! | `created` | string |
//! | `sourceRevision` | byte `0x00` when null or absent; byte `0x01` then the string |
//! | `registry` | string |
//! | the number of policy files | u64 |
//! | each policy file, in list order (sorted by name) | `name` string, then `text` string |
//! | `rollout`, only when present (absent: nothing, so bundles without one keep the digest they always had) | the tag `rollout/v1` string; `activateAt` as `sourceRevision`; the number of canary nodes u64 then each as a string, in list order; `canaryWindowSecs` byte `0x00` when absent, byte `0x01` then the u64 |
//!
//! A u64 is 8 bytes big-endian; a string is its length in bytes as a u64, then its UTF-8
//! bytes — the decoded value, whatever JSON escapes spelled it. Every field but `digest` is
//! covered; every item is self-delimiting, so no two different bundles share an encoding.

use ring::digest::{Context, SHA256};

use super::Bundle;

/// The first item of the encoding.
pub const DIGEST_TAG: &str = "mesh-config-bundle/digest/v1";
/// The first item of a rollout's encoding.
pub const ROLLOUT_TAG: &str = "rollout/v1";

/// The canonical encoding of `bundle` (everything but its digest).
pub fn encode(bundle: &Bundle) -> Vec<u8> {
    let mut out = Vec::new();
    write(bundle, &mut |b| out.extend_from_slice(b));
    out
}

/// `sha256:<hex>` of [`encode`], computed without building the encoding in memory.
pub fn digest(bundle: &Bundle) -> String {
    let mut ctx = Context::new(&SHA256);
    write(bundle, &mut |b| ctx.update(b));
    format!("sha256:{}", super::hex::encode(ctx.finish().as_ref()))
}

fn string(out: &mut dyn FnMut(&[u8]), s: &str) {
    out(&(s.len() as u64).to_be_bytes());
    out(s.as_bytes());
}

fn write(b: &Bundle, out: &mut dyn FnMut(&[u8])) {
    string(out, DIGEST_TAG);
    out(&u64::from(b.schema).to_be_bytes());
    string(out, &b.kind);
    out(&b.version.to_be_bytes());
    string(out, &b.created);
    optional(out, b.source_revision.as_deref());
    string(out, &b.registry);
    out(&(b.policies.len() as u64).to_be_bytes());
    for p in &b.policies {
        string(out, &p.name);
        string(out, &p.text);
    }
    // Appended after the self-delimiting policy list: an encoding that ends there is a
    // bundle without a rollout, one that goes on carries one.
    if let Some(r) = &b.rollout {
        string(out, ROLLOUT_TAG);
        optional(out, r.activate_at.as_deref());
        out(&(r.canary_nodes.len() as u64).to_be_bytes());
        for n in &r.canary_nodes {
            string(out, n);
        }
        match r.canary_window_secs {
            None => out(&[0]),
            Some(w) => {
                out(&[1]);
                out(&w.to_be_bytes());
            }
        }
    }
}

fn optional(out: &mut dyn FnMut(&[u8]), s: Option<&str>) {
    match s {
        None => out(&[0]),
        Some(s) => {
            out(&[1]);
            string(out, s);
        }
    }
}
