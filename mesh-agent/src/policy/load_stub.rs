//! TEMPORARY stand-in for `policy/parse.rs` (written in parallel by another engineer): a
//! minimal YAML → [`PolicyBundle`] loader so that the agent, the operator CLI and the
//! privileged scenarios can run before the real parser is merged.
//!
//! It is strict in the same direction as the contract (unknown kinds and fields are refused,
//! nothing is widened) but reports errors without line numbers. To wire the real parser,
//! change [`super::source::load_dir`] to call `parse::load_dir` and delete this file.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::model::{
    Action, AuthorizationPolicy, IpNet, MtlsMode, Operation, Origin, PeerAuthentication,
    PolicyBundle, Rule, Source, StringMatch,
};

/// Most files a policy directory may hold.
const MAX_FILES: usize = 1_024;
/// Largest policy file.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Why a policy directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum StubError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc {
    api_version: String,
    kind: String,
    metadata: Meta,
    #[serde(default)]
    spec: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    name: String,
    namespace: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzSpec {
    selector: Option<Selector>,
    action: Option<String>,
    rules: Option<Vec<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<RawFrom>,
    #[serde(default)]
    to: Vec<RawTo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    source: RawSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    operation: RawOperation,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOperation {
    #[serde(default)]
    ports: Vec<serde_json::Value>,
    #[serde(default)]
    not_ports: Vec<serde_json::Value>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSpec {
    selector: Option<Selector>,
    mtls: Option<Mtls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    mode: String,
}

/// Loads every `*.yaml`/`*.yml` file of `dir` (multi-document files allowed).
pub fn load_dir(dir: &Path) -> Result<PolicyBundle, StubError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StubError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            )
        })
        .collect();
    files.sort();
    if files.len() > MAX_FILES {
        return Err(StubError::Invalid {
            path: dir.to_owned(),
            problem: format!("more than {MAX_FILES} policy files"),
        });
    }
    let mut bundle = PolicyBundle::default();
    for file in files {
        let len = fs::metadata(&file).map_err(io(&file))?.len();
        if len > MAX_FILE_BYTES {
            return Err(StubError::Invalid {
                path: file,
                problem: format!("larger than {MAX_FILE_BYTES} bytes"),
            });
        }
        let text = fs::read_to_string(&file).map_err(io(&file))?;
        load_text(&text, &file, &mut bundle)?;
    }
    Ok(bundle)
}

fn load_text(text: &str, file: &Path, bundle: &mut PolicyBundle) -> Result<(), StubError> {
    let invalid = |problem: String| StubError::Invalid {
        path: file.to_owned(),
        problem,
    };
    let docs: Vec<Option<Doc>> =
        serde_saphyr::from_multiple(text).map_err(|e| invalid(e.to_string()))?;
    for doc in docs.into_iter().flatten() {
        let origin = Origin {
            file: file.to_owned(),
            line: 1,
        };
        let key = format!("{}/{}", doc.metadata.namespace, doc.metadata.name);
        let inv = |what: String| invalid(format!("{key}: {what}"));
        if doc.api_version != "security.istio.io/v1" && doc.api_version != "security.istio.io/v1beta1"
        {
            return Err(inv(format!("apiVersion {:?} not supported", doc.api_version)));
        }
        match doc.kind.as_str() {
            "AuthorizationPolicy" => {
                let spec: AuthzSpec =
                    serde_json::from_value(doc.spec).map_err(|e| inv(e.to_string()))?;
                let action = match spec.action.as_deref() {
                    None | Some("ALLOW") => Action::Allow,
                    Some("DENY") => Action::Deny,
                    Some("AUDIT") => Action::Audit,
                    Some(other) => return Err(inv(format!("action {other:?} not supported"))),
                };
                let rules = match spec.rules {
                    None => None,
                    Some(rules) => Some(
                        rules
                            .into_iter()
                            .map(|r| rule(r).map_err(&inv))
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                };
                let dry_run = doc
                    .metadata
                    .annotations
                    .get("istio.io/dry-run")
                    .is_some_and(|v| v == "true");
                bundle.authz.push(AuthorizationPolicy {
                    namespace: doc.metadata.namespace,
                    name: doc.metadata.name,
                    origin,
                    selector: spec.selector.map(|s| s.match_labels),
                    action,
                    rules,
                    dry_run,
                });
            }
            "PeerAuthentication" => {
                let spec: PeerSpec =
                    serde_json::from_value(doc.spec).map_err(|e| inv(e.to_string()))?;
                let mode = match spec.mtls.as_ref().map(|m| m.mode.as_str()) {
                    Some("STRICT") => MtlsMode::Strict,
                    Some("PERMISSIVE") => MtlsMode::Permissive,
                    other => return Err(inv(format!("mtls mode {other:?} not supported"))),
                };
                bundle.peer_authn.push(PeerAuthentication {
                    namespace: doc.metadata.namespace,
                    name: doc.metadata.name,
                    origin,
                    selector: spec.selector.map(|s| s.match_labels),
                    mode,
                });
            }
            other => return Err(inv(format!("kind {other:?} not supported"))),
        }
    }
    Ok(())
}

fn rule(r: RawRule) -> Result<Rule, String> {
    let strings = |v: Vec<String>| v.iter().map(|s| StringMatch::from_pattern(s)).collect();
    let nets = |v: Vec<String>| v.iter().map(|s| ip_net(s)).collect::<Result<Vec<_>, _>>();
    let ports = |v: Vec<serde_json::Value>| {
        v.iter()
            .map(|p| {
                let n = match p {
                    serde_json::Value::String(s) => s.parse::<u16>().ok(),
                    serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    _ => None,
                };
                n.filter(|n| *n != 0).ok_or_else(|| format!("port {p} is not 1..=65535"))
            })
            .collect::<Result<Vec<u16>, String>>()
    };
    let mut from = Vec::new();
    for f in r.from {
        let s = f.source;
        from.push(Source {
            principals: strings(s.principals),
            not_principals: strings(s.not_principals),
            namespaces: strings(s.namespaces),
            not_namespaces: strings(s.not_namespaces),
            ip_blocks: nets(s.ip_blocks)?,
            not_ip_blocks: nets(s.not_ip_blocks)?,
        });
    }
    let mut to = Vec::new();
    for t in r.to {
        let o = t.operation;
        to.push(Operation {
            ports: ports(o.ports)?,
            not_ports: ports(o.not_ports)?,
            methods: strings(o.methods),
            not_methods: strings(o.not_methods),
            paths: strings(o.paths),
            not_paths: strings(o.not_paths),
            hosts: strings(o.hosts),
            not_hosts: strings(o.not_hosts),
        });
    }
    Ok(Rule { from, to })
}

fn ip_net(s: &str) -> Result<IpNet, String> {
    let bad = || format!("ipBlock {s:?} is not an address or CIDR");
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    if prefix > max {
        return Err(bad());
    }
    Ok(IpNet { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_istio_yaml() {
        let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-a
  namespace: default
  annotations: {istio.io/dry-run: "true"}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sa-a"], ipBlocks: ["10.0.0.0/8"]}
    to:
    - operation: {ports: ["8080"], methods: ["GET"]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p, namespace: default}
spec: {mtls: {mode: PERMISSIVE}}
"#;
        let mut b = PolicyBundle::default();
        load_text(text, Path::new("x.yaml"), &mut b).unwrap();
        assert_eq!(b.authz.len(), 1);
        let p = &b.authz[0];
        assert!(p.dry_run);
        assert_eq!(p.action, Action::Deny);
        let rules = p.rules.as_ref().unwrap();
        assert_eq!(rules[0].to[0].ports, vec![8080]);
        assert_eq!(rules[0].from[0].ip_blocks[0].prefix, 8);
        assert_eq!(b.peer_authn[0].mode, MtlsMode::Permissive);
        let mut b = PolicyBundle::default();
        assert!(load_text(&text.replace("action: DENY", "action: CUSTOM"), Path::new("x"), &mut b).is_err());
        assert!(load_text(&text.replace("methods:", "colour:"), Path::new("x"), &mut b).is_err());
    }
}
