//! Policy test cases: a policy, a request and the decision expected, run through
//! [`super::check`] — the conformance suite (`mesh-agent/tests/conformance/*.yaml`, cases
//! built from Istio's sources) and the mesh scenario that replays some of them on a real
//! mini-cluster share this format and runner.
//!
//! ```yaml
//! cases:
//!   - name: deny-principal-tcp
//!     source: "istio/istio tests/integration/security/authz_test.go TestAuthz_DenyPrincipal"
//!     policies: |            # Istio YAML documents, written to an empty policy directory
//!       apiVersion: security.istio.io/v1
//!       ...
//!     trust_domain: cluster.local   # optional
//!     root_namespace: istio-system  # optional
//!     request: {from: ns2/a, to: ns1/b, port: 19090}       # also from_ip, plaintext,
//!                                                          # method, path, host
//!     expect: {decision: deny, policy: ns1/b}              # decision allow|deny|invalid;
//!                                                          # optional policy, dry_run,
//!                                                          # audit, normalized_path
//!     known_difference: "why we differ"   # optional: the case is expected to fail
//!     mesh: true                          # optional: also replayed on the real mesh
//! ```

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use super::{check, compile_view, CheckError, CheckReport, CheckRequest, Decision, HttpRequest};
use crate::registry::Registry;

/// Default trust domain and root namespace of a case.
pub const CASE_TRUST_DOMAIN: &str = "cluster.local";
pub const CASE_ROOT_NAMESPACE: &str = "istio-system";

/// A file of cases.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// Policies shared by several cases, as YAML anchors (`principal: &principal |`) that
    /// cases refer to (`policies: *principal`); not read otherwise.
    #[serde(default, rename = "x-policies")]
    pub shared_policies: std::collections::BTreeMap<String, String>,
    pub cases: Vec<Case>,
}

/// One case.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// Where the expected decision comes from (repository, path and test, or URL and
    /// section).
    pub source: String,
    /// Istio YAML documents (may be empty: no policy).
    #[serde(default)]
    pub policies: String,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub root_namespace: Option<String>,
    pub request: CaseRequest,
    pub expect: Expect,
    /// Why this project does not (yet) decide as Istio does; the case must then fail.
    #[serde(default)]
    pub known_difference: Option<String>,
    /// Also replayed through the real mesh (the `policy_check_matches_the_mesh` scenario).
    #[serde(default)]
    pub mesh: bool,
}

/// The request of a case (the `policy check` flags).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub from_ip: Option<IpAddr>,
    #[serde(default)]
    pub plaintext: bool,
    pub to: String,
    pub port: u16,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// Header fields, `NAME: VALUE` each.
    #[serde(default)]
    pub headers: Vec<String>,
}

impl CaseRequest {
    /// As a [`CheckRequest`]; `None` without a source.
    pub fn to_check(&self) -> Option<CheckRequest> {
        let from = match (&self.from, self.from_ip) {
            (Some(name), _) => super::RequestSource::Workload(name.clone()),
            (None, Some(ip)) => super::RequestSource::Ip(ip),
            (None, None) => return None,
        };
        Some(CheckRequest {
            from,
            plaintext: self.plaintext,
            to: self.to.clone(),
            port: self.port,
            http: HttpRequest {
                method: self.method.clone(),
                path: self.path.clone(),
                host: self.host.clone(),
                headers: self
                    .headers
                    .iter()
                    .filter_map(|h| super::parse_header(h).ok())
                    .collect(),
            },
            path_normalization: Default::default(),
        })
    }

    /// The equivalent `mesh-agent policy check` flags (without the policy and registry).
    pub fn cli_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |flag: &str, v: &Option<String>| {
            if let Some(v) = v {
                a.push(flag.to_owned());
                a.push(v.clone());
            }
        };
        push("--from", &self.from);
        push("--from-ip", &self.from_ip.map(|ip| ip.to_string()));
        push("--to", &Some(self.to.clone()));
        push("--port", &Some(self.port.to_string()));
        push("--method", &self.method);
        push("--path", &self.path);
        push("--host", &self.host);
        if self.plaintext {
            a.push("--plaintext".to_owned());
        }
        a
    }
}

/// What a case expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expected {
    Allow,
    Deny,
    /// Refused as bad input (exit 2): the policy is invalid.
    Invalid,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub decision: Expected,
    /// The deciding policy, `namespace/name`; `"-"`: a default decided (no policy).
    #[serde(default)]
    pub policy: Option<String>,
    /// Whether a dry-run policy would deny.
    #[serde(default)]
    pub dry_run_deny: Option<bool>,
    /// The AUDIT policies that match (exactly).
    #[serde(default)]
    pub audit: Option<Vec<String>>,
    #[serde(default)]
    pub normalized_path: Option<String>,
}

/// What running a case found.
#[derive(Debug)]
pub enum Outcome {
    /// Decided as expected.
    Passed,
    /// Not as expected (why).
    Failed(String),
}

/// Loads a case file.
pub fn load(path: &Path) -> Result<CaseFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Every case of every case file in `dir` (`*.yaml` but `registry.yaml`), files in name
/// order, each named `<file stem>/<case name>`.
pub fn load_dir(dir: &Path) -> Result<Vec<(String, Case)>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "registry.yaml")
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let stem = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for c in load(&f)?.cases {
            out.push((format!("{stem}/{}", c.name), c));
        }
    }
    Ok(out)
}

/// Writes the case's policies into `dir` (created empty) as `policies.yaml`.
pub fn write_policies(case: &Case, dir: &Path) -> std::io::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    if !case.policies.trim().is_empty() {
        std::fs::write(dir.join("policies.yaml"), &case.policies)?;
    }
    Ok(dir.to_owned())
}

/// Runs `case` through [`compile_view`] and [`check`] (the `policy check` code path), with
/// its policies written to `scratch` (emptied first).
pub fn run(
    case: &Case,
    registry: Arc<Registry>,
    scratch: &Path,
) -> Result<Result<CheckReport, CheckError>, std::io::Error> {
    let dir = write_policies(case, scratch)?;
    let td = case.trust_domain.as_deref().unwrap_or(CASE_TRUST_DOMAIN);
    let root = case
        .root_namespace
        .as_deref()
        .unwrap_or(CASE_ROOT_NAMESPACE);
    let Some(req) = case.request.to_check() else {
        return Ok(Err(CheckError::WorkloadName {
            name: "(the case names no source: `from` or `from_ip`)".to_owned(),
        }));
    };
    Ok(compile_view(&dir, Arc::clone(&registry), root, td)
        .and_then(|view| check(Arc::new(view), &registry, td, &req)))
}

/// Compares what [`run`] found with what `case` expects.
pub fn judge(case: &Case, found: &Result<CheckReport, CheckError>) -> Outcome {
    let e = &case.expect;
    let report = match (e.decision, found) {
        (Expected::Invalid, Err(err)) if err.is_bad_input() => return Outcome::Passed,
        (Expected::Invalid, Err(err)) => {
            return Outcome::Failed(format!("expected bad input, got a runtime error: {err}"))
        }
        (Expected::Invalid, Ok(r)) => {
            return Outcome::Failed(format!(
                "expected the policy to be refused, got {:?} ({})",
                r.decision, r.reason
            ))
        }
        (_, Err(err)) => return Outcome::Failed(format!("refused: {err}")),
        (_, Ok(r)) => r,
    };
    let want = match e.decision {
        Expected::Allow => Decision::Allow,
        _ => Decision::Deny,
    };
    let mut wrong = Vec::new();
    if report.decision != want {
        wrong.push(format!(
            "decision {:?}, expected {want:?} ({})",
            report.decision, report.reason
        ));
    }
    if let Some(p) = &e.policy {
        let got = report.policy.as_deref().unwrap_or("-");
        if got != p {
            wrong.push(format!("deciding policy {got}, expected {p}"));
        }
    }
    if let Some(d) = e.dry_run_deny {
        if report.dry_run.is_some() != d {
            wrong.push(format!(
                "dry-run deny {:?}, expected {d}",
                report.dry_run.as_ref().map(|d| d.policy.clone())
            ));
        }
    }
    if let Some(a) = &e.audit {
        let mut got = report.audit.clone();
        let mut want = a.clone();
        got.sort();
        want.sort();
        if got != want {
            wrong.push(format!("audit {got:?}, expected {want:?}"));
        }
    }
    if let Some(n) = &e.normalized_path {
        let got = report.request.as_ref().map(|r| r.normalized_path.as_str());
        if got != Some(n.as_str()) {
            wrong.push(format!("normalized path {got:?}, expected {n:?}"));
        }
    }
    if wrong.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed(wrong.join("; "))
    }
}
