//! Bundles attacked: every byte of a signed bundle flipped, every field changed, a thousand
//! broken inputs, signatures by the wrong keys, rollbacks; the digest pinned and checked
//! against an independent computation; build refusals; the signer set's rotation.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair as _},
};

use super::*;

const CREATED: &str = "2026-01-02T03:04:05Z";

/// Two workloads on one node (shared with the CLI tests).
const REGISTRY: &str = include_str!("../../tests/bundle/registry.yaml");

/// Lets `shop/web` call `shop/api`.
const ALLOW: &str = include_str!("../../tests/bundle/allow.yaml");

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
";

fn key() -> Ed25519KeyPair {
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

fn id(k: &Ed25519KeyPair) -> KeyId {
    KeyId::of(k.public_key().as_ref())
}

fn public(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

fn policy(name: &str, text: &str) -> PolicyFile {
    PolicyFile {
        name: name.into(),
        text: text.into(),
    }
}

fn small(version: u64) -> Bundle {
    Bundle::new(
        version,
        CREATED.into(),
        Some("rev-1".into()),
        REGISTRY.into(),
        vec![policy("allow.yaml", ALLOW)],
    )
    .unwrap()
}

/// A set with `keys` in the given states.
fn set(keys: &[(&Ed25519KeyPair, SignerState)]) -> SignerSet {
    let mut s = SignerSet::new();
    for (k, state) in keys {
        let kid = s.add(public(k)).unwrap();
        match state {
            SignerState::Pending => {}
            SignerState::Active => s.activate(&kid).unwrap(),
            SignerState::Retired => s.retire(&kid).unwrap(),
        }
    }
    s
}

fn signed(b: &Bundle, keys: &[&Ed25519KeyPair]) -> SignedBundle {
    SignedBundle::new(b.clone(), keys.iter().map(|k| sign(b, k)).collect())
}

/// `parse_signed` then `verify`: the reason of the refusal, or `None` when valid.
fn outcome(bytes: &[u8], signers: &SignerSet, active: Option<u64>) -> Option<&'static str> {
    match parse_signed(bytes) {
        Err(r) => Some(r.reason()),
        Ok(s) => verify(&s, signers, active).err().map(|r| r.reason()),
    }
}

fn reason(s: &SignedBundle, signers: &SignerSet, active: Option<u64>) -> Option<&'static str> {
    verify(s, signers, active).err().map(|r| r.reason())
}

fn write_source(dir: &Path, registry: &str, policies: &[(&str, &str)]) {
    fs::create_dir_all(dir.join("policies")).unwrap();
    fs::write(dir.join("registry.yaml"), registry).unwrap();
    for (name, text) in policies {
        fs::write(dir.join("policies").join(name), text).unwrap();
    }
}

#[test]
fn round_trip_build_sign_verify() {
    let tmp = tempfile::tempdir().unwrap();
    write_source(
        tmp.path(),
        REGISTRY,
        &[("b-strict.yml", STRICT), ("a-allow.yaml", ALLOW)],
    );
    // Not a policy file: ignored, as the policy loader ignores it.
    fs::write(tmp.path().join("policies/README.md"), "notes").unwrap();
    let b = Bundle::build(tmp.path(), 3, Some("abc123".into())).unwrap();
    assert_eq!(b.version(), 3);
    assert_eq!(b.source_revision(), Some("abc123"));
    assert_eq!(b.registry_text(), REGISTRY);
    let names: Vec<&str> = b.policies().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a-allow.yaml", "b-strict.yml"]);
    assert_eq!(b.digest(), b.compute_digest());
    assert!(b.digest().starts_with("sha256:") && b.digest().len() == 71);
    assert!(time::OffsetDateTime::parse(
        b.created(),
        &time::format_description::well_known::Rfc3339
    )
    .is_ok());

    let k = key();
    let s = signed(&b, &[&k]);
    let bytes = s.to_json();
    assert!(bytes.starts_with(b"{\"bundle\":{\"schema\":1,") && bytes.ends_with(b"\"}]}"));
    let parsed = parse_signed(&bytes).unwrap();
    assert_eq!(parsed, s);
    let signers = set(&[(&k, SignerState::Active)]);
    let v = verify_signed_by(&parsed, &signers, Some(2)).unwrap();
    assert_eq!(v.bundle, &b);
    assert_eq!(v.signed_by, [id(&k)]);

    // The content checks from the bundle's own texts.
    let content = v.bundle.check_content(&CheckOptions::default()).unwrap();
    assert_eq!(content.registry.workloads.len(), 2);
    assert_eq!(content.policies.authz.len(), 1);
    assert_eq!(content.policies.peer_authn.len(), 1);
    assert_eq!(content.compiled.policies, 1);

    // An unsigned bundle file reads back as itself.
    assert_eq!(parse_unsigned(&b.to_json()).unwrap(), b);
    assert_eq!(parse_any(&b.to_json()).unwrap().signatures.len(), 0);
    assert_eq!(parse_any(&bytes).unwrap(), s);
}

#[test]
fn build_reads_each_file_once() {
    let tmp = tempfile::tempdir().unwrap();
    write_source(tmp.path(), REGISTRY, &[("allow.yaml", ALLOW)]);
    let b = Bundle::build(tmp.path(), 1, None).unwrap();
    // The sources change after the build: the bundle carries (and checks) what was read.
    fs::write(tmp.path().join("policies/allow.yaml"), "garbage: [").unwrap();
    fs::write(tmp.path().join("registry.yaml"), "nodes: [").unwrap();
    assert_eq!(b.policies()[0].text, ALLOW);
    b.check_content(&CheckOptions::default()).unwrap();
    assert_eq!(b.digest(), b.compute_digest());
}

#[test]
fn build_refuses_what_would_not_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let build = |dir: &Path| Bundle::build(dir, 1, None);

    // No registry.
    fs::create_dir_all(dir.join("none")).unwrap();
    assert!(matches!(
        build(&dir.join("none")),
        Err(BuildError::Io { .. })
    ));

    // A registry that does not parse strictly (an entry refused: the whole build is).
    let bad_registry = REGISTRY.replace("10.1.0.3", "10.1.0.2");
    write_source(&dir.join("dup-ip"), &bad_registry, &[]);
    let e = build(&dir.join("dup-ip")).unwrap_err();
    assert!(
        matches!(e, BuildError::Content(ContentError::Registry(_))),
        "{e}"
    );
    assert!(e.to_string().contains("registry.yaml:"), "{e}");

    // A policy that does not parse: named with its real path and line.
    write_source(
        &dir.join("bad-policy"),
        REGISTRY,
        &[("p.yaml", &ALLOW.replace("principals", "principalz"))],
    );
    let e = build(&dir.join("bad-policy")).unwrap_err();
    assert!(
        matches!(e, BuildError::Content(ContentError::Policy(_))),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&dir.join("bad-policy/policies/p.yaml").display().to_string()),
        "{e}"
    );

    // The same policy in two files: refused like a policy directory refuses it.
    write_source(
        &dir.join("twice"),
        REGISTRY,
        &[("a.yaml", ALLOW), ("b.yaml", ALLOW)],
    );
    let e = build(&dir.join("twice")).unwrap_err().to_string();
    assert!(e.contains("defined twice") && e.contains("a.yaml:1"), "{e}");
    assert_eq!(
        crate::policy::source::load_dir(&dir.join("twice/policies"))
            .unwrap_err()
            .to_string()
            .replace(&dir.join("twice/policies").display().to_string(), ""),
        e.replace(&dir.join("twice/policies").display().to_string(), "")
    );

    // A policy the loader refuses for its meaning: a DENY without rules.
    let deny_all = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: d, namespace: shop}
spec: {action: DENY}
";
    write_source(&dir.join("deny"), REGISTRY, &[("d.yaml", deny_all)]);
    assert!(build(&dir.join("deny")).is_err());

    // A policy file name a bundle cannot carry.
    write_source(&dir.join("hidden"), REGISTRY, &[(".hidden.yaml", ALLOW)]);
    let e = build(&dir.join("hidden")).unwrap_err();
    assert!(
        matches!(e, BuildError::Bundle(Rejection::Schema { .. })),
        "{e}"
    );

    // Version 0.
    write_source(&dir.join("ok"), REGISTRY, &[]);
    let e = Bundle::build(&dir.join("ok"), 0, None).unwrap_err();
    assert!(
        matches!(e, BuildError::Bundle(Rejection::Schema { .. })),
        "{e}"
    );
    // No policies directory at all: a mesh without policy.
    fs::remove_dir_all(dir.join("ok/policies")).unwrap();
    assert!(Bundle::build(&dir.join("ok"), 1, None)
        .unwrap()
        .policies()
        .is_empty());
}

#[test]
fn materialized_bundle_loads_as_its_own_texts() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Bundle::new(
        4,
        CREATED.into(),
        None,
        REGISTRY.into(),
        vec![policy("b.yml", STRICT), policy("a.yaml", ALLOW)],
    )
    .unwrap();
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("policies")).unwrap();
    fs::write(out.join("policies/stale.yaml"), ALLOW).unwrap();
    b.materialize(&out).unwrap();
    assert!(!out.join("policies/stale.yaml").exists());
    assert_eq!(
        fs::read_to_string(out.join("registry.yaml")).unwrap(),
        REGISTRY
    );
    let from_dir = crate::policy::source::load_dir(&out.join("policies")).unwrap();
    let from_memory = b.parse_policies().unwrap();
    assert_eq!(from_dir.authz.len(), from_memory.authz.len());
    assert_eq!(from_dir.authz[0].rules, from_memory.authz[0].rules);
    assert_eq!(from_dir.peer_authn[0].mode, from_memory.peer_authn[0].mode);
}

/// The digest of a fixed bundle, computed independently (Python's hashlib over the encoding
/// the `canonical` module documents): a change of the format changes this test.
#[test]
fn digest_is_the_documented_encoding() {
    let b = Bundle::new(
        7,
        CREATED.into(),
        Some("abc".into()),
        "r".into(),
        vec![policy("b.yml", "y"), policy("a.yaml", "x")],
    )
    .unwrap();
    assert_eq!(
        b.digest(),
        "sha256:acbbdac341c984cba1e22a93942430803f408c14b8a813214314b2e62b746fbe"
    );
    let b = Bundle::new(7, CREATED.into(), None, "r".into(), Vec::new()).unwrap();
    assert_eq!(
        b.digest(),
        "sha256:bcfefb535ccf6c96a6fb069ff0b6d37222ddf63a3b8c5953d6722f2ec6599f47"
    );
    // The encoding is self-delimiting: moving bytes between fields changes it.
    let moved = |rev: &str, reg: &str| {
        Bundle::new(7, CREATED.into(), Some(rev.into()), reg.into(), Vec::new())
            .unwrap()
            .digest()
            .to_owned()
    };
    assert_ne!(moved("ab", "cr"), moved("abc", "r"));
    let none = Bundle::new(7, CREATED.into(), None, "".into(), Vec::new()).unwrap();
    let empty_file = Bundle::new(
        7,
        CREATED.into(),
        None,
        "".into(),
        vec![policy("a.yaml", "")],
    )
    .unwrap();
    assert_ne!(none.digest(), empty_file.digest());
    assert_eq!(
        canonical::encode(&none).len(),
        8 + 28 + 8 + 8 + 18 + 8 + 8 + 20 + 1 + 8 + 8
    );
}

#[test]
fn digest_is_stable_across_round_trips_key_order_and_escapes() {
    let k = key();
    let signers = set(&[(&k, SignerState::Active)]);
    let s = signed(&small(5), &[&k]);
    let compact = s.to_json();
    // serde round trips.
    let back = parse_signed(&compact).unwrap();
    assert_eq!(back.bundle.compute_digest(), s.bundle.digest());
    assert_eq!(back.to_json(), compact);
    let value: serde_json::Value = serde_json::from_slice(&compact).unwrap();
    let from_value: SignedBundle = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(from_value, s);
    // Keys in another order (serde_json's map sorts them), pretty-printed.
    let sorted = serde_json::to_vec_pretty(&value).unwrap();
    assert_ne!(sorted, compact);
    assert!(
        String::from_utf8_lossy(&sorted).find("\"created\"")
            < String::from_utf8_lossy(&sorted).find("\"schema\"")
    );
    assert_eq!(outcome(&sorted, &signers, None), None);
    // Reversed key order, by hand.
    let text = String::from_utf8(compact.clone()).unwrap();
    let reversed = format!(
        "{{\"signatures\":{},\"bundle\":{}}}",
        serde_json::to_string(&value["signatures"]).unwrap(),
        serde_json::to_string(&value["bundle"]).unwrap()
    );
    assert_ne!(reversed, text);
    assert_eq!(outcome(reversed.as_bytes(), &signers, None), None);
    // Another spelling of the same string: `\u0061` for `a`.
    let escaped = text.replacen("api-readers", "\\u0061pi-readers", 1);
    assert_ne!(escaped, text);
    assert_eq!(outcome(escaped.as_bytes(), &signers, None), None);
    // A `sourceRevision` of null and an absent one are the same value.
    let b = Bundle::new(1, CREATED.into(), None, "r".into(), Vec::new()).unwrap();
    let with_null = String::from_utf8(b.to_json()).unwrap();
    assert!(with_null.contains("\"sourceRevision\":null"));
    let without = with_null.replace("\"sourceRevision\":null,", "");
    assert_eq!(parse_unsigned(without.as_bytes()).unwrap(), b);
}

/// Mutations of one byte: a bit flip, case, the high bit, and a few JSON characters.
fn mutations(b: u8) -> impl Iterator<Item = u8> {
    [
        b ^ 0x01,
        b ^ 0x20,
        b ^ 0x80,
        b ^ 0xff,
        b'0',
        b'"',
        b'\\',
        b'{',
        b' ',
        b'a',
    ]
    .into_iter()
    .filter(move |m| *m != b)
}

/// The byte range of the first JSON string value of `key` in `json` (without the quotes).
fn value_range(json: &[u8], key: &str) -> std::ops::Range<usize> {
    let needle = format!("\"{key}\":\"");
    let text = std::str::from_utf8(json).unwrap();
    let start = text.find(&needle).unwrap() + needle.len();
    let mut end = start;
    let b = text.as_bytes();
    while b[end] != b'"' {
        end += if b[end] == b'\\' { 2 } else { 1 };
    }
    start..end
}

#[test]
fn every_byte_flipped_is_refused_with_a_precise_reason() {
    let k = key();
    let signers = set(&[(&k, SignerState::Active)]);
    let json = signed(&small(2), &[&k]).to_json();
    assert_eq!(outcome(&json, &signers, Some(1)), None);
    let registry = value_range(&json, "registry");
    let text = value_range(&json, "text");
    let digest = value_range(&json, "digest");
    let key_id = value_range(&json, "keyId");
    let sig = value_range(&json, "sig");
    let mut tried = 0;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..json.len() {
        for m in mutations(json[i]) {
            let mut bad = json.clone();
            bad[i] = m;
            let Some(r) = outcome(&bad, &signers, Some(1)) else {
                panic!(
                    "byte {i} ({:?} → {:?}) accepted",
                    json[i] as char, m as char
                );
            };
            tried += 1;
            seen.insert(r);
            // Inside a value, the refusal names that value (or the JSON that broke).
            let allowed: &[&str] =
                if registry.contains(&i) || text.contains(&i) || digest.contains(&i) {
                    &["digest_mismatch", "malformed"]
                } else if key_id.contains(&i) {
                    &["unknown_signer", "malformed"]
                } else if sig.contains(&i) {
                    &["bad_signature", "malformed"]
                } else {
                    &REASONS
                };
            assert!(
                allowed.contains(&r),
                "byte {i} ({:?} → {:?}): {r}",
                json[i] as char,
                m as char
            );
        }
    }
    assert!(tried > json.len() * 8);
    for r in [
        "malformed",
        "schema",
        "digest_mismatch",
        "unknown_signer",
        "bad_signature",
    ] {
        assert!(seen.contains(r), "no mutation was refused as {r}: {seen:?}");
    }
}

#[test]
fn every_field_value_changed_is_refused_with_its_reason() {
    let k = key();
    let signers = set(&[(&k, SignerState::Active)]);
    let good = signed(&small(2), &[&k]);
    assert_eq!(reason(&good, &signers, None), None);

    // Each byte of each string field, flipped in its low bit (ASCII stays ASCII).
    type Field = fn(&mut Bundle) -> &mut String;
    let fields: [(&str, Field, &[&str]); 7] = [
        ("kind", |b| &mut b.kind, &["schema"]),
        // A digit changed is still a time: then the digest tells.
        (
            "created",
            |b| &mut b.created,
            &["schema", "digest_mismatch"],
        ),
        ("registry", |b| &mut b.registry, &["digest_mismatch"]),
        ("digest", |b| &mut b.digest, &["digest_mismatch"]),
        (
            "policy name",
            |b| &mut b.policies[0].name,
            &["schema", "digest_mismatch"],
        ),
        (
            "policy text",
            |b| &mut b.policies[0].text,
            &["digest_mismatch"],
        ),
        (
            "source revision",
            |b| b.source_revision.as_mut().unwrap(),
            &["digest_mismatch", "schema"],
        ),
    ];
    for (what, field, allowed) in fields {
        let len = field(&mut good.bundle.clone()).len();
        for i in 0..len {
            let mut s = good.clone();
            let mut bytes = std::mem::take(field(&mut s.bundle)).into_bytes();
            bytes[i] ^= 0x01;
            *field(&mut s.bundle) = String::from_utf8(bytes).unwrap();
            let r = reason(&s, &signers, None).unwrap_or_else(|| panic!("{what}[{i}] accepted"));
            assert!(allowed.contains(&r), "{what}[{i}]: {r}");
        }
    }
    // Integers.
    for (what, change, want) in [
        (
            "schema",
            (|b: &mut Bundle| b.schema = 2) as fn(&mut Bundle),
            "schema",
        ),
        ("version+1", |b| b.version += 1, "digest_mismatch"),
        ("version-1", |b| b.version -= 1, "digest_mismatch"),
        ("version 0", |b| b.version = 0, "schema"),
        (
            "revision dropped",
            |b| b.source_revision = None,
            "digest_mismatch",
        ),
        ("policy dropped", |b| b.policies.clear(), "digest_mismatch"),
        (
            "policy added",
            |b| b.policies.push(policy("z.yaml", "")),
            "digest_mismatch",
        ),
        (
            "policies unsorted",
            |b| b.policies.insert(0, policy("z.yaml", "")),
            "schema",
        ),
    ] {
        let mut s = good.clone();
        change(&mut s.bundle);
        assert_eq!(reason(&s, &signers, None), Some(want), "{what}");
    }
    // Every bit of the signature and of the key id.
    for i in 0..64 * 8 {
        let mut s = good.clone();
        s.signatures[0].sig[i / 8] ^= 1 << (i % 8);
        assert_eq!(
            reason(&s, &signers, None),
            Some("bad_signature"),
            "sig bit {i}"
        );
    }
    for i in 0..16 * 8 {
        let mut s = good.clone();
        s.signatures[0].key_id.0[i / 8] ^= 1 << (i % 8);
        assert_eq!(
            reason(&s, &signers, None),
            Some("unknown_signer"),
            "keyId bit {i}"
        );
    }
}

/// xorshift64*: reproducible noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn a_thousand_broken_inputs_are_each_refused_with_a_reason() {
    let k = key();
    let signers = set(&[(&k, SignerState::Active)]);
    let json = signed(&small(2), &[&k]).to_json();
    let text = String::from_utf8(json.clone()).unwrap();
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();

    // Truncated: every length short of the whole.
    let step = (json.len() / 300).max(1);
    for len in (0..json.len()).step_by(step) {
        inputs.push((format!("truncated to {len}"), json[..len].to_vec()));
    }
    // Random bytes, random lengths.
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    for i in 0..250 {
        let len = noise.below(2048);
        let bytes = (0..len).map(|_| noise.next() as u8).collect();
        inputs.push((format!("random {i}"), bytes));
    }
    // Random JSON-looking text.
    let tokens = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"bundle\"",
        "\"signatures\"",
        "\"schema\"",
        "1",
        "-1",
        "1e999",
        "null",
        "true",
        "\"x\"",
        "\"keyId\"",
        "\"sig\"",
        "\"policies\"",
        " ",
    ];
    for i in 0..250 {
        let n = 1 + noise.below(40);
        let s: String = (0..n).map(|_| tokens[noise.below(tokens.len())]).collect();
        inputs.push((format!("tokens {i}: {s}"), s.into_bytes()));
    }
    // Random splices of the valid text: a slice moved, removed or repeated.
    for i in 0..250 {
        let (a, b) = (noise.below(json.len()), noise.below(json.len()));
        let (a, b) = (a.min(b), a.max(b).max(a.min(b) + 1));
        let mut bytes = json.clone();
        match i % 3 {
            0 => {
                bytes.drain(a..b);
            }
            1 => {
                let piece = json[a..b].to_vec();
                let at = noise.below(bytes.len());
                bytes.splice(at..at, piece);
            }
            _ => {
                for _ in 0..1 + noise.below(8) {
                    let at = noise.below(bytes.len());
                    bytes[at] = noise.next() as u8;
                }
            }
        }
        if bytes != json {
            inputs.push((format!("splice {i}"), bytes));
        }
    }
    // Shapes that parse as JSON but are not bundles, and limits.
    let b = &text[text.find("\"bundle\":").unwrap() + 9..text.find(",\"signatures\"").unwrap()];
    let shapes: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("null", "null".into()),
        ("array", "[]".into()),
        ("empty object", "{}".into()),
        ("no signatures field", format!("{{\"bundle\":{b}}}")),
        (
            "signatures null",
            format!("{{\"bundle\":{b},\"signatures\":null}}"),
        ),
        ("trailing garbage", format!("{text}x")),
        ("two documents", format!("{text}{text}")),
        ("upper-case hex", {
            let sig = value_range(&json, "sig");
            let mut t = text.clone();
            t.replace_range(sig.clone(), &text[sig].to_uppercase());
            t
        }),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        (
            "nested bundle",
            format!("{{\"bundle\":{text},\"signatures\":[]}}"),
        ),
    ];
    for (what, s) in shapes {
        inputs.push((what.into(), s.into_bytes()));
    }
    // One edit of the valid text each.
    let edits = [
        ("unknown field", "{\"bundle\"", "{\"x\":1,\"bundle\""),
        (
            "unknown bundle field",
            "\"schema\":1",
            "\"schema\":1,\"extra\":true",
        ),
        (
            "duplicate field",
            "\"schema\":1",
            "\"schema\":1,\"schema\":1",
        ),
        ("schema as string", "\"schema\":1", "\"schema\":\"1\""),
        ("negative version", "\"version\":2", "\"version\":-2"),
        (
            "huge version",
            "\"version\":2",
            "\"version\":18446744073709551616",
        ),
        ("float version", "\"version\":2", "\"version\":2.0"),
        ("policy name with a slash", "allow.yaml", "x/allow.yaml"),
        ("policy name ..", "allow.yaml", "..allow.yaml"),
        ("bad time", CREATED, "yesterday"),
        ("bad kind", KIND, "mesh-config-bundlf"),
    ];
    for (what, from, to) in edits {
        assert!(text.contains(from), "{what}");
        inputs.push((what.into(), text.replacen(from, to, 1).into_bytes()));
    }
    // Over the limits.
    let many_policies: Vec<String> = (0..=MAX_POLICY_FILES)
        .map(|i| format!("{{\"name\":\"p{i:05}.yaml\",\"text\":\"\"}}"))
        .collect();
    inputs.push((
        "10,001 policy files".into(),
        text.replacen(
            &text[text.find("\"policies\":[").unwrap()..text.find("],\"digest\"").unwrap() + 1],
            &format!("\"policies\":[{}]", many_policies.join(",")),
            1,
        )
        .into_bytes(),
    ));
    let sig_entry = &text[text.find("{\"keyId\"").unwrap()..text.rfind(']').unwrap()];
    inputs.push((
        "17 signatures".into(),
        text.replacen(sig_entry, &vec![sig_entry; 17].join(","), 1)
            .into_bytes(),
    ));
    inputs.push((
        "two signatures by one key".into(),
        text.replacen(sig_entry, &[sig_entry; 2].join(","), 1)
            .into_bytes(),
    ));
    let mut huge = json.clone();
    huge.resize(MAX_BUNDLE_BYTES + 1, b' ');
    inputs.push(("64 MiB + 1".into(), huge));

    assert!(inputs.len() >= 1000, "{} inputs", inputs.len());
    let mut reasons = std::collections::BTreeMap::new();
    for (what, bytes) in &inputs {
        let r = outcome(bytes, &signers, None).unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(REASONS.contains(&r), "{what}: {r}");
        *reasons.entry(r).or_insert(0) += 1;
    }
    let limit = |what: &str| {
        let (_, bytes) = inputs.iter().find(|(w, _)| w == what).unwrap();
        parse_signed(bytes).unwrap_err()
    };
    assert_eq!(limit("10,001 policy files").reason(), "oversized");
    assert_eq!(limit("17 signatures").reason(), "oversized");
    assert_eq!(limit("64 MiB + 1").reason(), "oversized");
    assert_eq!(limit("two signatures by one key").reason(), "malformed");
    assert_eq!(limit("bad time").reason(), "schema");
    assert_eq!(limit("policy name with a slash").reason(), "schema");
    assert_eq!(limit("upper-case hex").reason(), "malformed");
    // The refusal says what is wrong, briefly.
    let e = limit("unknown bundle field").to_string();
    assert!(e.contains("unknown field `extra`"), "{e}");
    let long_name = text.replacen("\"schema\":1", &format!("\"{}\":1", "x".repeat(100_000)), 1);
    let e = parse_signed(long_name.as_bytes()).unwrap_err();
    assert_eq!(e.reason(), "malformed");
    assert!(e.to_string().len() < 400, "{e}");
    assert!(reasons["malformed"] > 500, "{reasons:?}");
}

#[test]
fn signatures_by_the_wrong_keys_or_over_the_wrong_digest_are_refused() {
    let (active, other, retired, pending) = (key(), key(), key(), key());
    let signers = set(&[
        (&active, SignerState::Active),
        (&retired, SignerState::Retired),
        (&pending, SignerState::Pending),
    ]);
    let b = small(5);
    assert_eq!(reason(&signed(&b, &[&active]), &signers, None), None);

    let r = verify(&signed(&b, &[&other]), &signers, None).unwrap_err();
    assert_eq!(
        r,
        Rejection::UnknownSigner {
            version: 5,
            key_ids: vec![id(&other)]
        }
    );
    assert!(r.to_string().contains(&id(&other).to_string()));
    let r = verify(&signed(&b, &[&retired]), &signers, None).unwrap_err();
    assert_eq!(
        r,
        Rejection::RetiredSigner {
            version: 5,
            key_ids: vec![id(&retired)]
        }
    );
    // Added, not activated: does not count yet.
    assert_eq!(
        reason(&signed(&b, &[&pending]), &signers, None),
        Some("unknown_signer")
    );
    assert_eq!(
        reason(&signed(&b, &[&other, &retired]), &signers, None),
        Some("retired_signer")
    );
    // Signatures that do not count are ignored beside one that does.
    assert_eq!(
        reason(
            &signed(&b, &[&other, &retired, &pending, &active]),
            &signers,
            None
        ),
        None
    );
    let two = signed(&b, &[&other, &active]);
    let v = verify_signed_by(&two, &signers, None).unwrap();
    assert_eq!(v.signed_by, [id(&active)]);

    // No signature.
    assert_eq!(
        verify(&signed(&b, &[]), &signers, None).unwrap_err(),
        Rejection::MissingSignature { version: 5 }
    );
    // A signature by the active key over another bundle's digest.
    let other_bundle = small(6);
    let stolen = SignedBundle::new(b.clone(), vec![sign(&other_bundle, &active)]);
    assert_eq!(
        verify(&stolen, &signers, None).unwrap_err(),
        Rejection::BadSignature {
            version: 5,
            key_id: id(&active)
        }
    );
    // A forged signature by an active key refuses the bundle, even beside a good one.
    let mut two_active = set(&[
        (&active, SignerState::Active),
        (&retired, SignerState::Active),
    ]);
    let mut s = signed(&b, &[&active, &retired]);
    s.signatures[1].sig = s.signatures[0].sig;
    assert_eq!(reason(&s, &two_active, None), Some("bad_signature"));
    two_active.retire(&id(&retired)).unwrap();
    // The bad signature is by a retired key now: it does not count, the good one does.
    assert_eq!(reason(&s, &two_active, None), None);

    // The same key twice: refused, and `add_signature` will not do it.
    let mut dup = signed(&b, &[&active]);
    dup.signatures.push(dup.signatures[0]);
    assert_eq!(reason(&dup, &signers, None), Some("malformed"));
    assert_eq!(
        parse_signed(&dup.to_json()).unwrap_err().reason(),
        "malformed"
    );
    let mut once = signed(&b, &[&active]);
    assert!(!once.add_signature(sign(&b, &active)));
    assert!(once.add_signature(sign(&b, &other)));
    assert_eq!(once.signatures.len(), 2);

    // An empty signer set trusts nothing.
    assert_eq!(
        reason(&signed(&b, &[&active]), &SignerSet::new(), None),
        Some("unknown_signer")
    );
}

#[test]
fn versions_at_or_below_the_active_one_are_rollbacks() {
    let k = key();
    let signers = set(&[(&k, SignerState::Active)]);
    let s = signed(&small(5), &[&k]);
    assert_eq!(reason(&s, &signers, None), None);
    assert_eq!(reason(&s, &signers, Some(4)), None);
    assert_eq!(
        verify(&s, &signers, Some(5)).unwrap_err(),
        Rejection::Rollback {
            version: 5,
            active: 5
        }
    );
    assert_eq!(
        verify(&s, &signers, Some(9)).unwrap_err(),
        Rejection::Rollback {
            version: 5,
            active: 9
        }
    );
    // Authenticity comes first: a bad bundle is never reported as a mere rollback.
    let mut bad = s.clone();
    bad.signatures[0].sig[0] ^= 1;
    assert_eq!(reason(&bad, &signers, Some(9)), Some("bad_signature"));
}

#[test]
fn reasons_are_the_documented_labels() {
    let k = KeyId([0; 16]);
    let all = [
        Rejection::Malformed {
            detail: String::new(),
        },
        Rejection::Oversized {
            detail: String::new(),
        },
        Rejection::Schema {
            detail: String::new(),
        },
        Rejection::DigestMismatch {
            version: 1,
            claimed: String::new(),
            computed: String::new(),
        },
        Rejection::MissingSignature { version: 1 },
        Rejection::BadSignature {
            version: 1,
            key_id: k,
        },
        Rejection::UnknownSigner {
            version: 1,
            key_ids: vec![k],
        },
        Rejection::RetiredSigner {
            version: 1,
            key_ids: vec![k],
        },
        Rejection::Rollback {
            version: 1,
            active: 1,
        },
    ];
    let reasons: Vec<&str> = all.iter().map(Rejection::reason).collect();
    assert_eq!(reasons, REASONS);
}

#[test]
fn signer_set_rotates_like_trust_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("signers.json");
    let (old, new) = (key(), key());
    let mut s = SignerSet::load_or_empty(&path).unwrap();
    assert!(s.signers().is_empty());
    let old_id = s.add(public(&old)).unwrap();
    assert_eq!(old_id, id(&old));
    s.activate(&old_id).unwrap();
    s.save(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );

    let b = small(1);
    let by_old = signed(&b, &[&old]);
    let by_new = signed(&b, &[&new]);
    // 1. add: the new key is known, its signatures do not count yet.
    let mut s = SignerSet::load(&path).unwrap();
    let new_id = s.add(public(&new)).unwrap();
    assert_eq!(s.get(&new_id).unwrap().state, SignerState::Pending);
    assert_eq!(reason(&by_new, &s, None), Some("unknown_signer"));
    assert!(matches!(
        s.add(public(&new)),
        Err(SignerError::AlreadyPresent {
            state: SignerState::Pending,
            ..
        })
    ));
    // 2. activate: both count.
    s.activate(&new_id).unwrap();
    s.activate(&new_id).unwrap();
    assert_eq!(reason(&by_old, &s, None), None);
    assert_eq!(reason(&by_new, &s, None), None);
    // 3. retire the old one: for good.
    s.retire(&old_id).unwrap();
    assert_eq!(reason(&by_old, &s, None), Some("retired_signer"));
    assert_eq!(reason(&by_new, &s, None), None);
    assert!(matches!(
        s.activate(&old_id),
        Err(SignerError::Retired { .. })
    ));
    assert!(matches!(
        s.add(public(&old)),
        Err(SignerError::AlreadyPresent {
            state: SignerState::Retired,
            ..
        })
    ));
    assert!(matches!(
        s.retire(&KeyId([7; 16])),
        Err(SignerError::Unknown { .. })
    ));
    s.save(&path).unwrap();
    assert_eq!(SignerSet::load(&path).unwrap(), s);
    assert_eq!(s.active().count(), 1);
}

#[test]
fn signer_set_files_are_read_strictly() {
    let k = key();
    let good = format!(
        "{{\"signers\":[{{\"keyId\":\"{}\",\"publicKey\":\"{}\",\"state\":\"active\"}}]}}",
        id(&k),
        hex::encode(&public(&k))
    );
    let p = Path::new("signers.json");
    assert_eq!(
        SignerSet::parse(good.as_bytes(), p)
            .unwrap()
            .active()
            .count(),
        1
    );
    let other = KeyId([1; 16]).to_string();
    let entry = &good[12..good.len() - 2];
    for (what, text) in [
        ("not JSON", "{".to_owned()),
        (
            "unknown field",
            good.replace("\"state\"", "\"x\":1,\"state\""),
        ),
        ("unknown state", good.replace("active", "trusted")),
        (
            "key id of another key",
            good.replace(&id(&k).to_string(), &other),
        ),
        (
            "upper-case hex",
            good.replace(&id(&k).to_string(), &id(&k).to_string().to_uppercase()),
        ),
        ("short key", good.replace(&hex::encode(&public(&k)), "abcd")),
        (
            "listed twice",
            good.replace(entry, &format!("{entry},{entry}")),
        ),
    ] {
        let e = SignerSet::parse(text.as_bytes(), p);
        assert!(
            matches!(e, Err(SignerError::Malformed { .. })),
            "{what}: {e:?}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.json");
    fs::write(
        &big,
        vec![b' '; signers::MAX_SIGNERS_FILE_BYTES as usize + 1],
    )
    .unwrap();
    assert!(matches!(
        SignerSet::load(&big),
        Err(SignerError::TooLarge { .. })
    ));
    assert!(matches!(
        SignerSet::load(&tmp.path().join("missing.json")),
        Err(SignerError::File(_))
    ));
}

#[test]
fn signing_keys_are_private_and_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ci.key");
    let pair = signers::generate_key(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public_path = signers::public_key_path(&path);
    assert_eq!(public_path, tmp.path().join("ci.key.pub"));
    assert_eq!(
        signers::read_public_key(&public_path).unwrap(),
        pair.public_key().as_ref()
    );
    let loaded = signers::load_key(&path).unwrap();
    assert_eq!(loaded.public_key().as_ref(), pair.public_key().as_ref());
    assert!(matches!(
        signers::generate_key(&path),
        Err(KeyError::Exists { .. })
    ));
    // A lone .pub blocks a new key too (no pair that does not match).
    let lone = tmp.path().join("lone");
    fs::write(signers::public_key_path(&lone), "x").unwrap();
    assert!(matches!(
        signers::generate_key(&lone),
        Err(KeyError::Exists { .. })
    ));
    assert!(!lone.exists());

    // PEM, as openssl writes it.
    let der = fs::read(&path).unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64(&der)
    );
    let pem_path = tmp.path().join("ci.pem");
    fs::write(&pem_path, pem).unwrap();
    fs::set_permissions(&pem_path, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        signers::load_key(&pem_path).unwrap().public_key().as_ref(),
        pair.public_key().as_ref()
    );

    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        signers::load_key(&path),
        Err(KeyError::Permissions { mode: 0o640, .. })
    ));
    let garbage = tmp.path().join("garbage");
    fs::write(&garbage, "not a key").unwrap();
    fs::set_permissions(&garbage, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        signers::load_key(&garbage),
        Err(KeyError::Malformed { .. })
    ));
    assert!(matches!(
        signers::read_public_key(&garbage),
        Err(KeyError::PublicKey { .. })
    ));
}

/// Standard base64 (tests only: PEM by hand).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn diff_names_what_changed_and_for_which_workloads() {
    let deny = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {tier: front}}
  action: DENY
  rules:
  - to:
    - operation: {ports: [\"9000\"]}
";
    let old = Bundle::new(
        1,
        CREATED.into(),
        None,
        REGISTRY.into(),
        vec![policy("allow.yaml", ALLOW), policy("strict.yaml", STRICT)],
    )
    .unwrap();
    // Same meaning, other text (a comment, the policy in another file): identical.
    let same = Bundle::new(
        2,
        CREATED.into(),
        None,
        format!("# a comment\n{REGISTRY}"),
        vec![policy("moved.yaml", &format!("{ALLOW}---\n{STRICT}"))],
    )
    .unwrap();
    let d = diff::diff(&old, &same, "istio-system").unwrap();
    assert!(d.identical, "{d:?}");
    assert_eq!((d.old.version, d.new.version), (1, 2));

    // web gets `tier: front` and a new address; a workload and a node are added; the allow
    // policy now also admits sa/api; a DENY is added; the PeerAuthentication goes.
    let registry = REGISTRY
        .replace("labels: {app: web}", "labels: {app: web, tier: front}")
        .replace("10.1.0.3", "10.1.0.9")
        .replace("nodes:\n", "nodes:\n  - name: n2\n    address: 10.0.0.2\n")
        + "  - name: cart
    namespace: shop
    serviceAccount: cart
    node: n2
    ips: [\"10.2.0.2\"]
    cgroup: pods/cart
    labels: {app: cart, tier: front}
";
    let new = Bundle::new(
        3,
        CREATED.into(),
        None,
        registry,
        vec![
            policy(
                "allow.yaml",
                &ALLOW.replace(
                    "[\"cluster.local/ns/shop/sa/web\"]",
                    "[\"cluster.local/ns/shop/sa/web\", \"cluster.local/ns/shop/sa/api\"]",
                ),
            ),
            policy("deny.yaml", deny),
        ],
    )
    .unwrap();
    let d = diff::diff(&old, &new, "istio-system").unwrap();
    assert!(!d.identical);
    assert_eq!(d.nodes.added, ["n2"]);
    assert_eq!(d.workloads.added, ["shop/cart"]);
    assert_eq!(d.workloads.changed.len(), 1);
    assert_eq!(d.workloads.changed[0].name, "shop/web");
    assert_eq!(d.workloads.changed[0].fields, ["ips", "labels"]);
    assert!(d.services.is_empty());
    assert_eq!(d.policies.added.len(), 1);
    assert_eq!(d.policies.added[0].policy, "shop/no-admin");
    assert_eq!(d.policies.added[0].workloads, ["shop/cart", "shop/web"]);
    assert_eq!(d.policies.removed.len(), 1);
    assert_eq!(d.policies.removed[0].kind, "PeerAuthentication");
    assert_eq!(d.policies.removed[0].workloads, ["shop/api", "shop/web"]);
    assert_eq!(d.policies.changed.len(), 1);
    let c = &d.policies.changed[0];
    assert_eq!(
        (c.kind, c.policy.as_str()),
        ("AuthorizationPolicy", "shop/api-readers")
    );
    assert_eq!(c.fields, ["rules"]);
    assert_eq!(c.workloads_before, ["shop/api"]);
    assert_eq!(c.workloads_after, ["shop/api"]);

    // Only the selection changes: api loses its label.
    let relabelled = Bundle::new(
        4,
        CREATED.into(),
        None,
        REGISTRY.replace("labels: {app: api}", "labels: {app: api2}"),
        vec![policy("allow.yaml", ALLOW), policy("strict.yaml", STRICT)],
    )
    .unwrap();
    let d = diff::diff(&old, &relabelled, "istio-system").unwrap();
    let c = &d.policies.changed[0];
    assert!(c.fields.is_empty());
    assert_eq!(c.workloads_before, ["shop/api"]);
    assert!(c.workloads_after.is_empty());

    // A bundle whose registry does not parse cannot be compared.
    let broken = Bundle::new(5, CREATED.into(), None, "nodes: [".into(), Vec::new()).unwrap();
    assert!(matches!(
        diff::diff(&old, &broken, "istio-system"),
        Err(diff::DiffError::Registry { side: "new", .. })
    ));
}

fn rollout(at: Option<&str>, nodes: &[&str], window: Option<u64>) -> Rollout {
    Rollout {
        activate_at: at.map(Into::into),
        canary_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        canary_window_secs: window,
    }
}

/// A rollout is appended to the documented encoding (vectors from Python's hashlib); the
/// same bundle without one keeps its old digest.
#[test]
fn rollout_is_covered_by_the_documented_encoding() {
    let base = Bundle::new(
        7,
        CREATED.into(),
        Some("abc".into()),
        "r".into(),
        vec![policy("b.yml", "y"), policy("a.yaml", "x")],
    )
    .unwrap();
    let old = "sha256:acbbdac341c984cba1e22a93942430803f408c14b8a813214314b2e62b746fbe";
    assert_eq!(base.digest(), old);
    assert_eq!(base.clone().with_rollout(None).unwrap().digest(), old);
    for (r, want) in [
        (
            rollout(Some("2026-02-01T00:00:00Z"), &["n1", "edge-*"], Some(60)),
            "e9b397c63b6d66bd317003a4bbc158087f1eaf06c790aacdfff2cc95ec6643cd",
        ),
        (
            rollout(None, &["n1"], Some(5)),
            "32a1bdd73ab0bdd59851e220cf989107f14f3ad5b1dd0f48cc9c6da7a2b4358b",
        ),
        (
            rollout(Some("2026-02-01T00:00:00Z"), &[], None),
            "1d66ae65fd46272e08695131c7e77d2dd1c7dd08fc564417f6909036e66a1c6d",
        ),
    ] {
        let b = base.clone().with_rollout(Some(r.clone())).unwrap();
        assert_eq!(b.digest(), format!("sha256:{want}"), "{r:?}");
        // Round trip through the file format keeps the rollout and the digest.
        let back = parse_unsigned(&b.to_json()).unwrap();
        assert_eq!(back.rollout(), Some(&r));
        assert_eq!(back.digest(), b.digest());
    }
    // Without a rollout the file has no `rollout` key (older readers read it).
    assert!(!String::from_utf8(base.to_json())
        .unwrap()
        .contains("rollout"));
}

/// A signed bundle whose rollout is changed, added or removed after signing is refused.
#[test]
fn rollout_changed_after_signing_is_refused() {
    let k = key();
    let signers = set(&[(&k, SignerState::Active)]);
    let b = small(3)
        .with_rollout(Some(rollout(None, &["n1"], Some(30))))
        .unwrap();
    let s = signed(&b, &[&k]);
    assert_eq!(reason(&s, &signers, None), None);
    let json = String::from_utf8(s.to_json()).unwrap();
    let edits = [
        json.replace("\"canaryWindowSecs\":30", "\"canaryWindowSecs\":31"),
        json.replace("[\"n1\"]", "[\"n2\"]"),
        json.replace("[\"n1\"]", "[\"n1\",\"n2\"]"),
        json.replace(
            "\"rollout\":{\"canaryNodes\":[\"n1\"],\"canaryWindowSecs\":30},",
            "",
        ),
        json.replace(
            "\"canaryNodes\"",
            "\"activateAt\":\"2020-01-01T00:00:00Z\",\"canaryNodes\"",
        ),
    ];
    for e in &edits {
        assert_ne!(e, &json, "the edit applies");
        assert_eq!(
            outcome(e.as_bytes(), &signers, None),
            Some("digest_mismatch"),
            "{e}"
        );
    }
    // A rollout added to a signed bundle without one.
    let plain = signed(&small(3), &[&k]);
    let json = String::from_utf8(plain.to_json()).unwrap();
    let added = json.replace(
        ",\"digest\"",
        ",\"rollout\":{\"canaryNodes\":[\"n1\"],\"canaryWindowSecs\":30},\"digest\"",
    );
    assert_ne!(added, json);
    assert_eq!(
        outcome(added.as_bytes(), &signers, None),
        Some("digest_mismatch")
    );
}

/// Malformed rollout fields in a file are refused strictly, before any digest work.
#[test]
fn malformed_rollout_fields_are_refused() {
    let b = small(3)
        .with_rollout(Some(rollout(None, &["n1"], Some(30))))
        .unwrap();
    let json = String::from_utf8(b.to_json()).unwrap();
    let good = "\"rollout\":{\"canaryNodes\":[\"n1\"],\"canaryWindowSecs\":30}";
    assert!(json.contains(good));
    let many: Vec<String> = (0..=rollout::MAX_CANARY_NODES)
        .map(|i| format!("\"n{i}\""))
        .collect();
    let many = format!(
        "\"rollout\":{{\"canaryNodes\":[{}],\"canaryWindowSecs\":30}}",
        many.join(",")
    );
    for (replacement, want) in [
        (
            "\"rollout\":{\"canaryNodes\":[\"n1\"],\"canaryWindowSecs\":30,\"evil\":1}",
            "malformed",
        ),
        (
            "\"rollout\":{\"canaryNodes\":\"n1\",\"canaryWindowSecs\":30}",
            "malformed",
        ),
        (
            "\"rollout\":{\"canaryNodes\":[\"n1\"],\"canaryWindowSecs\":-1}",
            "malformed",
        ),
        (
            "\"rollout\":{\"canaryNodes\":[\"n1\"],\"canaryWindowSecs\":\"30\"}",
            "malformed",
        ),
        (
            "\"rollout\":{\"canaryNodes\":[1],\"canaryWindowSecs\":30}",
            "malformed",
        ),
        // serde reads a struct from a list too: an empty one is an empty rollout.
        ("\"rollout\":[]", "schema"),
        ("\"rollout\":{}", "schema"),
        ("\"rollout\":{\"canaryNodes\":[\"n1\"]}", "schema"),
        (
            "\"rollout\":{\"canaryNodes\":[\"n1\"],\"canaryWindowSecs\":0}",
            "schema",
        ),
        (
            "\"rollout\":{\"canaryNodes\":[\"N1\"],\"canaryWindowSecs\":30}",
            "schema",
        ),
        ("\"rollout\":{\"activateAt\":\"soon\"}", "schema"),
        (
            "\"rollout\":{\"activateAt\":\"2026-01-01T00:00:00+02:00\"}",
            "schema",
        ),
        (many.as_str(), "oversized"),
    ] {
        let bad = json.replace(good, replacement);
        assert_eq!(
            parse_unsigned(bad.as_bytes())
                .map(|_| ())
                .map_err(|e| e.reason()),
            Err(want),
            "{replacement}"
        );
    }
    // `"rollout":null` is no rollout: the digest (computed without one) then mismatches.
    let null = json.replace(good, "\"rollout\":null");
    assert_eq!(
        parse_unsigned(null.as_bytes())
            .map(|_| ())
            .map_err(|e| e.reason()),
        Err("digest_mismatch")
    );
}
