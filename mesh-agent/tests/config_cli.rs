//! `mesh-agent config …` as a pipeline runs it: the real binary, files in a temporary
//! directory, exit codes and `--output json`.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

mod common;
use common::{run, s};

/// Two workloads on one node (shared with the unit tests of `bundle`).
const REGISTRY: &str = include_str!("bundle/registry.yaml");

/// Lets `shop/web` call `shop/api`.
const ALLOW: &str = include_str!("bundle/allow.yaml");

/// Runs with `--output json`; exit code and the document.
fn run_json(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (code, out, err) = run(&all);
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}{err}"));
    (code, v, err)
}

fn source(dir: &Path, registry: &str, policies: &[(&str, &str)]) {
    fs::create_dir_all(dir.join("policies")).unwrap();
    fs::write(dir.join("registry.yaml"), registry).unwrap();
    for (name, text) in policies {
        fs::write(dir.join("policies").join(name), text).unwrap();
    }
}

/// A key made by `config keygen`; its id.
fn keygen(path: &Path) -> String {
    let (code, v, err) = run_json(&["config", "keygen", "--out", s(path)]);
    assert_eq!(code, 0, "{err}");
    v["keyId"].as_str().unwrap().to_owned()
}

#[test]
fn keygen_bundle_sign_verify_as_a_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    source(&src, REGISTRY, &[("allow.yaml", ALLOW)]);
    let (key, key_s) = (t.join("ci.key"), t.join("ci.key").display().to_string());

    // keygen: 0600 key, hex public key, never overwritten.
    let kid = keygen(&key);
    assert_eq!(kid.len(), 32);
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = fs::read_to_string(t.join("ci.key.pub")).unwrap();
    assert_eq!(public.trim().len(), 64);
    let before = fs::read(&key).unwrap();
    let (code, _, err) = run(&["config", "keygen", "--out", &key_s]);
    assert_eq!(code, 2);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read(&key).unwrap(), before);

    // bundle → sign.
    let b1 = t.join("b1.json");
    let (code, v, err) = run_json(&[
        "config",
        "bundle",
        s(&src),
        "--version",
        "1",
        "--source-revision",
        "c0ffee",
        "--out",
        s(&b1),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["workloads"], 2);
    assert_eq!(v["authorizationPolicies"], 1);
    let digest = v["digest"].as_str().unwrap().to_owned();
    let s1 = t.join("s1.json");
    let (code, v, err) = run_json(&["config", "sign", s(&b1), "--key", &key_s, "--out", s(&s1)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["keyId"], kid.as_str());
    assert_eq!(v["digest"], digest.as_str());
    // Signing again with the same key: refused, nothing written.
    let (code, _, err) = run(&["config", "sign", s(&s1), "--key", &key_s, "--out", s(&s1)]);
    assert_eq!(code, 2);
    assert!(err.contains("already signed by key"), "{err}");

    // verify: pending key does not count; active does; rollback refused.
    let signers = t.join("signers.json");
    let (code, v, err) = run_json(&[
        "config",
        "signers",
        "add",
        s(&t.join("ci.key.pub")),
        "--file",
        s(&signers),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["signers"][0]["state"], "pending");
    let verify = |extra: &[&str]| {
        let mut args = vec!["config", "verify", s(&s1), "--signers", s(&signers)];
        args.extend(extra);
        run_json(&args)
    };
    let (code, v, _) = verify(&[]);
    assert_eq!(code, 1);
    assert_eq!(v["valid"], false);
    assert_eq!(v["reason"], "unknown_signer");
    let (code, _, err) = run(&["config", "signers", "activate", &kid, "--file", s(&signers)]);
    assert_eq!(code, 0, "{err}");
    let (code, v, _) = verify(&[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["valid"], true);
    assert_eq!(v["version"], 1);
    assert_eq!(v["digest"], digest.as_str());
    assert_eq!(v["sourceRevision"], "c0ffee");
    assert_eq!(v["signedBy"][0], kid.as_str());
    let (code, v, _) = verify(&["--active-version", "1"]);
    assert_eq!(code, 1);
    assert_eq!(v["reason"], "rollback");
    let (code, out, _) = run(&["config", "verify", s(&s1), "--signers", s(&signers)]);
    assert_eq!(code, 0);
    assert!(out.starts_with("valid: bundle version 1 (sha256:"), "{out}");

    // One byte of the registry changed in the file: refused, reason printed.
    let text = fs::read_to_string(&s1).unwrap();
    let tampered = t.join("tampered.json");
    fs::write(&tampered, text.replacen("10.1.0.3", "10.1.0.4", 1)).unwrap();
    let (code, out, _) = run(&["config", "verify", s(&tampered), "--signers", s(&signers)]);
    assert_eq!(code, 1);
    assert!(out.starts_with("REFUSED (digest_mismatch): "), "{out}");
    fs::write(&tampered, &text[..text.len() / 2]).unwrap();
    let (code, v, _) = run_json(&["config", "verify", s(&tampered), "--signers", s(&signers)]);
    assert_eq!(code, 1);
    assert_eq!(v["reason"], "malformed");

    // Bad input: exit 2.
    let (code, _, err) = run(&[
        "config",
        "verify",
        s(&t.join("none.json")),
        "--signers",
        s(&signers),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("none.json"), "{err}");
    fs::write(t.join("bad-signers.json"), "{}").unwrap();
    let (code, _, err) = run(&[
        "config",
        "verify",
        s(&s1),
        "--signers",
        s(&t.join("bad-signers.json")),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("signers"), "{err}");

    // --previous: the next version; a second key signs too.
    let b2 = t.join("b2.json");
    let (code, v, err) = run_json(&[
        "config",
        "bundle",
        s(&src),
        "--previous",
        s(&s1),
        "--out",
        s(&b2),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["version"], 2);
    let key2 = t.join("ops.key");
    let kid2 = keygen(&key2);
    let s2 = t.join("s2.json");
    for k in [&key, &key2] {
        let input = if s2.exists() { &s2 } else { &b2 };
        let (code, _, err) = run(&["config", "sign", s(input), "--key", s(k), "--out", s(&s2)]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, v, _) = run_json(&[
        "config",
        "verify",
        s(&s2),
        "--signers",
        s(&signers),
        "--active-version",
        "1",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["signedBy"], serde_json::json!([kid]));
    let signed: serde_json::Value = serde_json::from_slice(&fs::read(&s2).unwrap()).unwrap();
    assert_eq!(signed["signatures"][1]["keyId"], kid2.as_str());

    // A key readable by others is refused.
    fs::set_permissions(&key2, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run(&[
        "config",
        "sign",
        s(&b2),
        "--key",
        s(&key2),
        "--out",
        s(&t.join("x")),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!t.join("x").exists());
}

#[test]
fn bundle_refuses_a_source_that_would_not_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("b.json");
    let bundle = |dir: &Path| {
        run(&[
            "config",
            "bundle",
            s(dir),
            "--version",
            "1",
            "--out",
            s(&out),
        ])
    };
    // A workload on a node that is not listed.
    let src = t.join("bad-registry");
    source(
        &src,
        &REGISTRY.replace(
            "node: n1\n    ips: [\"10.1.0.3\"]",
            "node: n9\n    ips: [\"10.1.0.3\"]",
        ),
        &[],
    );
    let (code, _, err) = bundle(&src);
    assert_eq!(code, 2);
    assert!(
        err.contains("registry.yaml:") && err.contains("n9"),
        "{err}"
    );
    assert!(!out.exists());
    // A policy with an unknown field: file:line.
    let src = t.join("bad-policy");
    source(
        &src,
        REGISTRY,
        &[("p.yaml", &ALLOW.replace("rules:", "rulez:"))],
    );
    let (code, _, err) = bundle(&src);
    assert_eq!(code, 2);
    assert!(err.contains("policies/p.yaml:"), "{err}");
    assert!(!out.exists());
    // Neither --version nor --previous; version 0; a --previous that is not a bundle.
    let good = t.join("good");
    source(&good, REGISTRY, &[("p.yaml", ALLOW)]);
    let (code, _, _) = run(&["config", "bundle", s(&good), "--out", s(&out)]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&[
        "config",
        "bundle",
        s(&good),
        "--version",
        "0",
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 2);
    fs::write(t.join("junk.json"), "{\"bundle\":1}").unwrap();
    let (code, _, err) = run(&[
        "config",
        "bundle",
        s(&good),
        "--previous",
        s(&t.join("junk.json")),
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("malformed"), "{err}");
    assert!(!out.exists());
    // The trust domain flag reaches the compiler: a good source builds.
    let (code, out_text, err) = run(&[
        "config",
        "bundle",
        s(&good),
        "--version",
        "3",
        "--trust-domain",
        "example.org",
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out_text.starts_with("bundle version 3 (sha256:"),
        "{out_text}"
    );
}

#[test]
fn diff_exit_codes_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (a, b) = (t.join("a"), t.join("b"));
    source(&a, REGISTRY, &[("allow.yaml", ALLOW)]);
    source(
        &b,
        &REGISTRY.replace("labels: {app: web}", "labels: {app: api}"),
        &[("allow.yaml", ALLOW)],
    );
    let (old, new, same) = (t.join("old.json"), t.join("new.json"), t.join("same.json"));
    for (dir, out, version) in [(&a, &old, "1"), (&b, &new, "2"), (&a, &same, "3")] {
        let (code, _, err) = run(&[
            "config",
            "bundle",
            s(dir),
            "--version",
            version,
            "--out",
            s(out),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, v, _) = run_json(&["config", "diff", s(&old), s(&same)]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["identical"], true);
    let (code, v, _) = run_json(&["config", "diff", s(&old), s(&new)]);
    assert_eq!(code, 1);
    assert_eq!(v["identical"], false);
    assert_eq!(v["old"]["version"], 1);
    assert_eq!(v["new"]["version"], 2);
    assert_eq!(v["workloads"]["changed"][0]["name"], "shop/web");
    assert_eq!(
        v["workloads"]["changed"][0]["fields"],
        serde_json::json!(["labels"])
    );
    let p = &v["policies"]["changed"][0];
    assert_eq!(p["policy"], "shop/api-readers");
    assert_eq!(p["fields"], serde_json::json!([]));
    assert_eq!(p["workloadsBefore"], serde_json::json!(["shop/api"]));
    assert_eq!(
        p["workloadsAfter"],
        serde_json::json!(["shop/api", "shop/web"])
    );
    let (code, out, _) = run(&["config", "diff", s(&old), s(&new)]);
    assert_eq!(code, 1);
    assert!(out.contains("~ shop/web (labels)"), "{out}");
    assert!(
        out.contains("~ AuthorizationPolicy shop/api-readers (selection only): selected shop/api; now selects shop/api, shop/web"),
        "{out}"
    );
    // Trouble: a missing file, a tampered one.
    let (code, _, err) = run(&["config", "diff", s(&old), s(&t.join("none.json"))]);
    assert_eq!(code, 2);
    assert!(err.contains("none.json"), "{err}");
    let tampered = t.join("tampered.json");
    let text = fs::read_to_string(&new).unwrap();
    fs::write(&tampered, text.replacen("shop", "shoq", 1)).unwrap();
    let (code, _, err) = run(&["config", "diff", s(&old), s(&tampered)]);
    assert_eq!(code, 2);
    assert!(err.contains("does not match its content"), "{err}");
}

#[test]
fn signers_rotate_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let file = t.join("signers.json");
    let f = s(&file);
    let (old, new) = (keygen(&t.join("old.key")), keygen(&t.join("new.key")));
    for (args, code_want) in [
        (vec!["add", s(&t.join("old.key.pub"))], 0),
        (vec!["activate", &old], 0),
        (vec!["add", s(&t.join("old.key.pub"))], 2),
        (vec!["add", s(&t.join("new.key.pub"))], 0),
        (vec!["activate", &new], 0),
        (vec!["retire", &old], 0),
        (vec!["activate", &old], 2),
        (vec!["retire", "00000000000000000000000000000000"], 2),
        (vec!["retire", "not-a-key-id"], 2),
        (vec!["add", s(&t.join("old.key"))], 2),
    ] {
        let mut all = vec!["config", "signers"];
        all.extend(&args);
        all.extend(["--file", f]);
        let (code, out, err) = run(&all);
        assert_eq!(code, code_want, "{args:?}: {out}{err}");
    }
    let (code, v, _) = run_json(&["config", "signers", "list", "--file", f]);
    assert_eq!(code, 0);
    assert_eq!(
        v,
        serde_json::json!([
            {"keyId": old, "publicKey": fs::read_to_string(t.join("old.key.pub")).unwrap().trim(), "state": "retired"},
            {"keyId": new, "publicKey": fs::read_to_string(t.join("new.key.pub")).unwrap().trim(), "state": "active"},
        ])
    );
    // Retiring the last active key is allowed (a compromised key), with a warning.
    let (code, v, _) = run_json(&["config", "signers", "retire", &new, "--file", f]);
    assert_eq!(code, 0);
    assert_eq!(v["action"], "retire");
    assert!(v["warning"].as_str().unwrap().contains("every bundle"));
    // No --file; a file that is not a signer set.
    let (code, _, err) = run(&["config", "signers", "list"]);
    assert_eq!(code, 2);
    assert!(err.contains("--file"), "{err}");
    let (code, _, _) = run(&[
        "config",
        "signers",
        "list",
        "--file",
        s(&t.join("old.key.pub")),
    ]);
    assert_eq!(code, 2);
}

#[test]
fn join_pins_the_authoritys_signers_and_refuses_a_bad_set() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ca = t.join("ca");
    let (code, _, err) = run(&[
        "authority",
        "init",
        "--dir",
        s(&ca),
        "--trust-domain",
        "cluster.local",
    ]);
    assert_eq!(code, 0, "{err}");
    let join = |node: &str| {
        let out = t.join(node);
        let r = run_json(&[
            "authority",
            "join",
            "--dir",
            s(&ca),
            "--node",
            node,
            "--out",
            s(&out),
        ]);
        (r, out)
    };
    // No signers at the authority: nothing pinned (the node runs unsigned configuration).
    let ((code, v, err), n1) = join("n1");
    assert_eq!(code, 0, "{err}");
    assert!(!n1.join("signers.json").exists());
    assert!(!v["files"].to_string().contains("signers.json"), "{v}");

    // With signers: the set is pinned beside the trust bundle, as the authority has it.
    let signers = ca.join("signers.json");
    let kid = keygen(&t.join("ci.key"));
    for args in [
        vec!["add", s(&t.join("ci.key.pub"))],
        vec!["activate", &kid],
    ] {
        let mut all = vec!["config", "signers"];
        all.extend(&args);
        all.extend(["--file", s(&signers)]);
        let (code, out, err) = run(&all);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    let ((code, v, err), n2) = join("n2");
    assert_eq!(code, 0, "{err}");
    assert!(v["files"].to_string().contains("signers.json"), "{v}");
    let (code, pinned, _) = run_json(&[
        "config",
        "signers",
        "list",
        "--file",
        s(&n2.join("signers.json")),
    ]);
    assert_eq!(code, 0);
    assert_eq!(pinned[0]["keyId"], kid.as_str());
    assert_eq!(pinned[0]["state"], "active");

    // A signer set the authority cannot load refuses the join (exit 2), and pins nothing.
    fs::write(&signers, "{not json").unwrap();
    let n3 = t.join("n3");
    let (code, _, err) = run(&[
        "authority",
        "join",
        "--dir",
        s(&ca),
        "--node",
        "n3",
        "--out",
        s(&n3),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("signers"), "{err}");
    assert!(!n3.exists(), "credentials written for a refused join");
}
