//! The Istio conformance suite: every case of `tests/conformance/*.yaml` (policies, a request
//! and the decision Istio's own sources give, each citing where) run through the `policy
//! check` code path — the agent's compiler, its policy view and its `Snapshot` decisions — and
//! the cases marked `mesh: true` also through the `mesh-agent policy check` binary.
//!
//! A case marked `known_difference` is one where this project still decides otherwise than
//! Istio: it must fail (a mark on a case that passes is an error: remove it). The summary
//! prints the counts and every known difference with its reason.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use mesh_agent::{
    policy::check::cases::{self, Case, Expected, Outcome},
    registry::Registry,
};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-agent");

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// Every case file, by name, with its cases.
fn all_cases() -> Vec<(String, Case)> {
    cases::load_dir(&suite_dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn registry() -> Arc<Registry> {
    Arc::new(Registry::load_all(&suite_dir().join("registry.yaml")).expect("registry"))
}

struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("mesh-conf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_case_cites_its_source_and_names_are_unique() {
    let cases = all_cases();
    let mut names: Vec<&str> = cases.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate case names");
    for (name, c) in &cases {
        let s = c.source.trim();
        assert!(
            s.starts_with("istio/istio ")
                || s.starts_with("istio/ztunnel ")
                || s.starts_with("https://istio.io/"),
            "{name}: source must cite istio/istio, istio/ztunnel (path + test) or an istio.io URL: {s:?}"
        );
        if let Some(k) = &c.known_difference {
            assert!(!k.trim().is_empty(), "{name}: empty known_difference");
        }
    }
    assert!(cases.len() >= 80, "only {} cases", cases.len());
}

#[test]
fn istio_conformance_through_policy_check() {
    let registry = registry();
    let scratch = Scratch::new("lib");
    let cases = all_cases();
    let (mut passed, mut known, mut failures) = (0usize, Vec::new(), Vec::new());
    for (i, (name, case)) in cases.iter().enumerate() {
        let found = cases::run(case, Arc::clone(&registry), &scratch.0.join(i.to_string()))
            .expect("writing the case's policies");
        let outcome = cases::judge(case, &found);
        match (outcome, &case.known_difference) {
            (Outcome::Passed, None) => passed += 1,
            (Outcome::Failed(why), Some(reason)) => known.push((name, reason, why)),
            (Outcome::Failed(why), None) => failures.push(format!("{name}: {why}")),
            (Outcome::Passed, Some(reason)) => failures.push(format!(
                "{name}: marked known_difference ({reason}) but now decides as Istio: remove the mark"
            )),
        }
    }
    println!(
        "\nIstio conformance: {} cases, {passed} passed, {} known differences, {} failed",
        cases.len(),
        known.len(),
        failures.len()
    );
    for (name, reason, why) in &known {
        println!("  known difference {name}: {reason}\n      (we decide: {why})");
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

/// The `mesh: true` cases through the binary: the exit code and the JSON decision agree with
/// the library, and with the expectation unless the case is a known difference.
#[test]
fn mesh_cases_through_the_cli_binary() {
    let scratch = Scratch::new("cli");
    let registry_path = suite_dir().join("registry.yaml");
    let mut ran = 0;
    for (i, (name, case)) in all_cases().into_iter().enumerate() {
        if !case.mesh {
            continue;
        }
        let dir = cases::write_policies(&case, &scratch.0.join(i.to_string())).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["policy", "check", "--output", "json", "--policy-dir"])
            .arg(&dir)
            .arg("--registry")
            .arg(&registry_path)
            .args(case.request.cli_args());
        if let Some(td) = &case.trust_domain {
            cmd.args(["--trust-domain", td]);
        }
        let out = cmd.output().expect("running mesh-agent");
        let code = out.status.code().unwrap_or(-1);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = match case.expect.decision {
            Expected::Allow => 0,
            Expected::Deny => 3,
            Expected::Invalid => 2,
        };
        if case.known_difference.is_none() {
            assert_eq!(code, want, "{name}: exit code\n{stdout}\n{stderr}");
        }
        match code {
            0 | 3 => {
                let v: serde_json::Value = serde_json::from_str(&stdout)
                    .unwrap_or_else(|e| panic!("{name}: JSON: {e}\n{stdout}"));
                let decision = if code == 0 { "allow" } else { "deny" };
                assert_eq!(v["decision"], decision, "{name}: {stdout}");
            }
            2 => assert!(stderr.contains("error:"), "{name}: {stderr}"),
            other => panic!("{name}: exit code {other}\n{stderr}"),
        }
        ran += 1;
    }
    assert!(ran >= 6, "only {ran} cases are marked `mesh: true`");
}

#[test]
fn cli_bad_input_exits_2_with_a_message() {
    let scratch = Scratch::new("bad");
    let registry_path = suite_dir().join("registry.yaml");
    let check = |policy: &str, extra: &[&str]| {
        std::fs::write(scratch.0.join("p.yaml"), policy).unwrap();
        let out = Command::new(BIN)
            .args(["policy", "check", "--policy-dir"])
            .arg(&scratch.0)
            .arg("--registry")
            .arg(&registry_path)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: ns1}\nspec: {}\n";
    let (code, err) = check(ok, &["--from", "ns1/nope", "--to", "ns1/b", "--port", "80"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown workload") && err.contains("ns1/nope"),
        "{err}"
    );
    let (code, err) = check(ok, &["--from", "nope", "--to", "ns1/b", "--port", "80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("namespace/name"), "{err}");
    let (code, err) = check(
        ok,
        &["--from-ip", "10.9.9.9", "--to", "ns1/b", "--port", "80"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--plaintext"), "{err}");
    let (code, err) = check(ok, &["--from", "ns1/a", "--to", "10.8.8.8", "--port", "80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("10.8.8.8"), "{err}");
    let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: ns1}\nspec: {action: MAYBE}\n";
    let (code, err) = check(bad, &["--from", "ns1/a", "--to", "ns1/b", "--port", "80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("p.yaml"), "the message names the file: {err}");
    // Neither --policy-dir nor --pin-dir: clap's usage error.
    let out = Command::new(BIN)
        .args(["policy", "check", "--registry"])
        .arg(&registry_path)
        .args(["--from", "ns1/a", "--to", "ns1/b", "--port", "80"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn cli_text_output_names_the_policy_and_normalized_path() {
    let scratch = Scratch::new("text");
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: ns1}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/admin\"]}\n";
    std::fs::write(scratch.0.join("p.yaml"), policy).unwrap();
    let out = Command::new(BIN)
        .args(["policy", "check", "--policy-dir"])
        .arg(&scratch.0)
        .arg("--registry")
        .arg(suite_dir().join("registry.yaml"))
        .args([
            "--from",
            "ns1/a",
            "--to",
            "10.1.0.2",
            "--port",
            "18080",
            "--path",
            "/admin?x=1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("decision: DENY"), "{text}");
    assert!(text.contains("policy: ns1/deny-admin"), "{text}");
    assert!(text.contains("normalized path: /admin\n"), "{text}");
}
