//! The compiled policy implements the reference semantics: property tests that generate small
//! registries and bundles, compile them, read the generation back as a [`PolicyView`] (in
//! memory, exactly the entries [`super::maps::PolicyMaps::apply`] would write) and check, for
//! random connections and requests, that the view decides what [`eval::evaluate`] decides.
//!
//! The view is asked as the proxies and the kernel ask it: `decide_l4` for every connection;
//! on one of the destination's `httpPorts`, when the L4 answer needs the request,
//! `decide_request` with the request as the HTTP parser sees it (query string and all). A
//! non-HTTP port is a plain TCP connection (no request). Compared: allowed or not; whether a
//! policy decided (and that it is one of those the evaluator finds matching, of the deciding
//! action); for allowed connections, whether a dry-run policy would deny and whether an AUDIT
//! policy matched. PeerAuthentication: the compiler's mode and the generation's
//! `POL_DST_F_PERMISSIVE` (what agents derive `WORKLOAD_F_PERMISSIVE` from) against
//! [`eval::effective_mtls`].

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use proptest::prelude::*;

use super::strategies::{full_source, operation, pick, rule};

use super::{
    compile::{compile_with, permissive, principal},
    engine::{Family, PolicyView},
    eval::{self, evaluate, HttpRequest, Peer, Request, Target},
    model::{
        Action, AuthorizationPolicy, Condition, IpNet, MtlsMode, Operation, Origin,
        PeerAuthentication, PolicyBundle, Rule, ServiceAccount, Source, StringMatch, TrustDomains,
    },
    parse::parse_cidr,
    ConnVerdict, RequestAttrs,
};
use crate::registry::{Registry, Workload};

const ROOT: &str = eval::DEFAULT_ROOT_NAMESPACE;
/// The mesh's trust domain: not `cluster.local`, so that the `cluster.local` pointer and the
/// alias are exercised.
const TD: &str = "td.local";
/// A trust-domain alias of the mesh.
const ALIAS: &str = "old.td";

fn trust_domains() -> TrustDomains {
    TrustDomains::new(TD, vec![ALIAS.to_owned()])
}

/// One generated workload (`w<i>`, addresses derived from its position).
#[derive(Clone, Debug)]
struct GenWorkload {
    namespace: &'static str,
    service_account: &'static str,
    app: Option<&'static str>,
    v4: bool,
    v6: bool,
    http_ports: Vec<u16>,
    permissive: bool,
}

fn arb_workload() -> impl Strategy<Value = GenWorkload> {
    (
        prop::sample::select(vec!["default", "other"]),
        prop::sample::select(vec!["sa-a", "sa-b"]),
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        prop::sample::select(vec![(true, false), (false, true), (true, true)]),
        prop::collection::btree_set(prop::sample::select(vec![8080u16, 9000]), 0..3),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(namespace, service_account, app, (v4, v6), http, permissive)| GenWorkload {
                namespace,
                service_account,
                app,
                v4,
                v6,
                http_ports: http.into_iter().collect(),
                permissive,
            },
        )
}

/// The registry of `ws` (one node), through the real parser.
fn registry(ws: &[GenWorkload]) -> Registry {
    let mut text = String::from("nodes:\n  - {name: n1, address: 10.0.0.1}\nworkloads:\n");
    for (i, w) in ws.iter().enumerate() {
        let n = i + 1;
        let mut ips = Vec::new();
        if w.v4 {
            ips.push(format!("\"10.{n}.0.2\""));
        }
        if w.v6 {
            ips.push(format!("\"fd00:{n}::2\""));
        }
        let labels = w
            .app
            .map(|a| format!(", labels: {{app: {a}, tier: t}}"))
            .unwrap_or_default();
        let http = if w.http_ports.is_empty() {
            String::new()
        } else {
            let ports: Vec<String> = w.http_ports.iter().map(u16::to_string).collect();
            format!(", httpPorts: [{}]", ports.join(", "))
        };
        let pa = if w.permissive {
            ", peerAuthentication: PERMISSIVE"
        } else {
            ""
        };
        text.push_str(&format!(
            "  - {{name: w{n}, namespace: {}, serviceAccount: {}, node: n1, ips: [{}]{labels}{http}{pa}}}\n",
            w.namespace,
            w.service_account,
            ips.join(", ")
        ));
    }
    Registry::parse_all(&text, Path::new("registry.yaml"))
        .unwrap_or_else(|e| panic!("generated registry refused: {e}\n{text}"))
}

fn nets() -> impl Strategy<Value = Vec<IpNet>> + Clone {
    prop::collection::vec(
        prop::sample::select(vec![
            "10.1.0.0/16",
            "10.2.0.2",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "fd00:1::/32",
            "fd00:2::2",
            "fd00::/8",
            "::/0",
        ])
        .prop_map(|s| parse_cidr(s).unwrap()),
        0..2,
    )
}

fn arb_source() -> impl Strategy<Value = Source> {
    let principals: &'static [&'static str] = &[
        "cluster.local/ns/default/sa/sa-a",
        "cluster.local/ns/default/sa/sa-b",
        "old.td/ns/other/sa/sa-a",
        "td.local/ns/default/sa/sa-b",
        "foreign.td/ns/default/sa/sa-a",
        "cluster.local/ns/other/*",
        "cluster.local/ns/other/sa/*",
        "*.td/ns/default/sa/sa-a",
        "*/sa/sa-b",
        "*",
    ];
    let namespaces: &'static [&'static str] = &["default", "other", "oth*", "*ult", "*"];
    // Mostly one kind of field at a time, so that sources often match.
    let full = full_source(principals, namespaces, nets());
    let sas = prop::collection::vec(arb_service_account(), 0..3);
    prop_oneof![
        1 => (sas.clone(), sas).prop_map(|(service_accounts, not_service_accounts)| Source {
            service_accounts,
            not_service_accounts,
            ..Source::default()
        }),
        2 => pick(principals).prop_map(|principals| Source { principals, ..Source::default() }),
        1 => (pick(trust_domain_patterns()), pick(trust_domain_patterns())).prop_map(
            |(trust_domains, not_trust_domains)| Source {
                trust_domains,
                not_trust_domains,
                ..Source::default()
            }
        ),
        1 => pick(principals).prop_map(|not_principals| Source { not_principals, ..Source::default() }),
        1 => pick(namespaces).prop_map(|namespaces| Source { namespaces, ..Source::default() }),
        1 => (nets(), nets()).prop_map(|(ip_blocks, not_ip_blocks)| Source { ip_blocks, not_ip_blocks, ..Source::default() }),
        2 => full,
    ]
}

/// `trustDomains` patterns: the mesh's, `cluster.local`, an alias, a foreign one, wildcards.
fn trust_domain_patterns() -> &'static [&'static str] {
    &[
        "cluster.local",
        "td.local",
        "old.td",
        "bad.example",
        "*.local",
        "td*",
        "*",
    ]
}

fn arb_operation() -> impl Strategy<Value = Operation> {
    let ports = prop::collection::vec(prop::sample::select(vec![80u16, 8080, 9000]), 0..3);
    // Hosts stored lowercase, as the parser stores them.
    operation(
        ports,
        &["GET", "POST", "*"],
        &[
            "/api/*",
            "/health",
            "*.json",
            "*",
            "/api/{*}",
            "/{**}/x",
            "/{*}/{**}",
        ],
        &["web", "web.svc", "*.svc", "web*", "*"],
        2,
    )
}

fn arb_service_account() -> impl Strategy<Value = ServiceAccount> + Clone {
    (
        prop::sample::select(vec!["default", "other"]),
        prop::sample::select(vec!["sa-a", "sa-b"]),
    )
        .prop_map(|(ns, sa)| ServiceAccount {
            namespace: ns.into(),
            name: sa.into(),
        })
}

/// Up to two patterns of `values`.
fn pats(values: &'static [&'static str]) -> impl Strategy<Value = Vec<StringMatch>> + Clone {
    prop::collection::vec(
        prop::sample::select(values).prop_map(StringMatch::from_pattern),
        0..3,
    )
}

fn arb_condition() -> impl Strategy<Value = Condition> {
    let ports = prop::collection::vec(prop::sample::select(vec![80u16, 8080, 9000]), 0..2);
    let sas = prop::collection::vec(arb_service_account(), 0..2);
    let ns: &'static [&'static str] = &["default", "other", "*"];
    let principals: &'static [&'static str] = &[
        "cluster.local/ns/default/sa/sa-a",
        "old.td/ns/other/sa/sa-b",
        "*",
    ];
    let header_values: &'static [&'static str] = &["yes", "y*", "*s", "*", "no"];
    prop_oneof![
        (nets(), nets())
            .prop_map(|(values, not_values)| Condition::SourceIp { values, not_values }),
        (nets(), nets())
            .prop_map(|(values, not_values)| Condition::DestinationIp { values, not_values }),
        (pats(ns), pats(ns))
            .prop_map(|(values, not_values)| Condition::SourceNamespace { values, not_values }),
        (pats(principals), pats(principals))
            .prop_map(|(values, not_values)| Condition::SourcePrincipal { values, not_values }),
        (sas.clone(), sas).prop_map(|(values, not_values)| Condition::SourceServiceAccount {
            values,
            not_values
        }),
        (ports.clone(), ports)
            .prop_map(|(values, not_values)| Condition::DestinationPort { values, not_values }),
        (
            prop::sample::select(vec!["x-a", "x-b"]),
            pats(header_values),
            pats(header_values)
        )
            .prop_map(|(name, values, not_values)| Condition::RequestHeader {
                name: name.into(),
                values,
                not_values
            }),
    ]
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        rule(arb_source(), arb_operation(), 3),
        prop_oneof![
            3 => Just(Vec::new()),
            2 => prop::collection::vec(arb_condition(), 1..3),
        ],
    )
        .prop_map(|(mut r, when)| {
            r.when = when;
            r
        })
}

fn origin() -> Origin {
    Origin {
        file: PathBuf::from("prop.yaml"),
        line: 1,
    }
}

fn selector() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    prop::option::of(prop::sample::select(vec![
        vec![],
        vec![("app", "a")],
        vec![("app", "b")],
        vec![("app", "a"), ("tier", "t")],
        vec![("app", "c")],
    ]))
    .prop_map(|s| {
        s.map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
    })
}

fn arb_policy() -> impl Strategy<Value = AuthorizationPolicy> {
    (
        prop::sample::select(vec!["default", "other", ROOT]),
        selector(),
        prop::sample::select(vec![Action::Allow, Action::Deny, Action::Audit]),
        prop::option::weighted(0.9, prop::collection::vec(arb_rule(), 0..3)),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(ns, selector, action, rules, dry_run)| AuthorizationPolicy {
                namespace: ns.into(),
                name: String::new(),
                origin: origin(),
                selector,
                action,
                rules,
                dry_run,
            },
        )
}

fn arb_peer_authn() -> impl Strategy<Value = PeerAuthentication> {
    (
        prop::sample::select(vec!["default", "other", ROOT]),
        selector(),
        prop::sample::select(vec![
            MtlsMode::Strict,
            MtlsMode::Permissive,
            MtlsMode::Unset,
            MtlsMode::Disable,
        ]),
    )
        .prop_map(|(ns, selector, mode)| PeerAuthentication {
            namespace: ns.into(),
            name: String::new(),
            origin: origin(),
            selector,
            mode,
            port_level: BTreeMap::new(),
        })
}

/// A bundle with unique policy names (`p0`, … and `pa0`, …).
fn arb_bundle() -> impl Strategy<Value = PolicyBundle> {
    (
        prop::collection::vec(arb_policy(), 0..6),
        prop::collection::vec(arb_peer_authn(), 0..4),
    )
        .prop_map(|(mut authz, mut peer_authn)| {
            for (i, p) in authz.iter_mut().enumerate() {
                p.name = format!("p{i}");
            }
            for (i, p) in peer_authn.iter_mut().enumerate() {
                p.name = format!("pa{i}");
            }
            PolicyBundle { authz, peer_authn }
        })
}

/// One connection (and, on an HTTP port, one request on it).
#[derive(Clone, Debug)]
struct Case {
    src: usize,
    dst: usize,
    port: u16,
    /// Prefer IPv6 (if the source has an IPv6 address).
    v6: bool,
    method: &'static str,
    path: &'static str,
    host: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        prop::sample::select(vec![80u16, 8080, 9000, 22]),
        any::<bool>(),
        prop::sample::select(vec!["GET", "POST", "DELETE"]),
        prop::sample::select(vec![
            "/api/x",
            "/health",
            "/",
            "/api/x?q=1",
            "/a.json",
            "/health?x.json",
            "/api/x/x",
            "/api/",
            "/api/x/",
        ]),
        prop::option::of(prop::sample::select(vec![
            "web",
            "WEB",
            "web.svc:8080",
            "Web.Svc",
            "other",
            "[::1]:80",
        ])),
        prop::sample::select(vec![
            &[][..],
            &[("X-A", "yes")][..],
            &[("x-a", "no"), ("X-A", "yes")][..],
            &[("x-b", "")][..],
            &[("x-a", "yes"), ("x-b", "nos")][..],
        ]),
    )
        .prop_map(|(src, dst, port, v6, method, path, host, headers)| Case {
            src: src.index(usize::MAX),
            dst: dst.index(usize::MAX),
            port,
            v6,
            method,
            path,
            host,
            headers,
        })
}

/// What the compiled view decided, in the evaluator's terms.
#[derive(Debug)]
struct Got {
    allowed: bool,
    policy: Option<Arc<str>>,
    dry_run_deny: bool,
    audit: bool,
}

/// The source address of `w` for a connection of `family`, if it has one.
fn address(w: &Workload, v6: bool) -> Option<(IpAddr, Family)> {
    let want = |ip: &IpAddr| matches!(ip.to_canonical(), IpAddr::V6(_)) == v6;
    w.ips
        .iter()
        .copied()
        .find(want)
        .map(|ip| (ip, if v6 { Family::V6 } else { Family::V4 }))
}

/// Asks the view as the kernel and the destination agent do.
fn decide(view: &PolicyView, src: &Workload, dst: &Workload, family: Family, c: &Case) -> Got {
    let http = dst.http_ports().contains(&c.port);
    let d = view.decide_l4(src.id, dst.id, family, c.port);
    assert!(
        http || d.verdict != ConnVerdict::PerRequest,
        "per-request verdict on non-HTTP port {}: {d:?}",
        c.port
    );
    match d.verdict {
        ConnVerdict::Deny => Got {
            allowed: false,
            policy: d.policy,
            dry_run_deny: false,
            audit: false,
        },
        _ if http && d.needs_request => {
            let (set, class) = d.key.expect("a per-request decision has a key");
            let r = view.decide_request_with(
                set,
                class,
                c.port,
                &RequestAttrs {
                    method: c.method,
                    path: c.path,
                    host: c.host,
                    headers: &c.headers,
                },
            );
            Got {
                allowed: r.allowed(),
                policy: r.policy,
                dry_run_deny: r.dry_run_deny.is_some(),
                audit: !r.audit.is_empty(),
            }
        }
        _ => Got {
            allowed: true,
            policy: d.policy,
            dry_run_deny: d.dry_run_deny.is_some(),
            audit: d.audit.is_some(),
        },
    }
}

/// Compiles `bundle` for `ws` and checks every case; `Err` describes the first disagreement.
fn check(ws: &[GenWorkload], bundle: &PolicyBundle, cases: &[Case]) -> Result<(), String> {
    let reg = registry(ws);
    let tds = trust_domains();
    let compiled = compile_with(bundle, &reg, ROOT, &tds).map_err(|e| format!("compile: {e}"))?;
    // The evaluator decides on the principals as Istio rewrites them for the trust domains.
    let bundle = &bundle.for_trust_domains(&tds);
    let view = PolicyView::from_compiled(1, &compiled).map_err(|e| format!("view: {e}"))?;
    for c in cases {
        let src = &reg.workloads[c.src % reg.workloads.len()];
        let dst = &reg.workloads[c.dst % reg.workloads.len()];
        let Some((ip, family)) = address(src, c.v6).or_else(|| address(src, !c.v6)) else {
            continue;
        };
        let src_principal = principal(TD, src);
        let peer = Peer {
            principal: Some(&src_principal),
            namespace: Some(&src.namespace),
            ip,
        };
        let target = Target {
            namespace: &dst.namespace,
            labels: &dst.labels,
        };
        let http = dst.http_ports().contains(&c.port);
        let dst_ip = address(dst, family == Family::V6).map(|(ip, _)| ip);
        let req = Request {
            port: c.port,
            dst_ip,
            http: http.then_some(HttpRequest {
                method: c.method,
                path: c.path,
                host: c.host,
                headers: c.headers,
            }),
        };
        let want = evaluate(bundle, ROOT, target, peer, req);
        let got = decide(&view, src, dst, family, c);
        let context = || {
            format!(
                "{} → {} port {} ({family:?} from {ip}), request {:?}:\n  eval {want:?}\n  compiled {got:?}",
                src.key(),
                dst.key(),
                c.port,
                req.http
            )
        };
        if got.allowed != want.allowed {
            return Err(format!("allowed differs: {}", context()));
        }
        let enforced_allows = || {
            bundle.authz.iter().filter(|p| {
                p.action == Action::Allow && !p.dry_run && eval::selects(p, ROOT, target)
            })
        };
        let named_ok = match (&got.policy, &want.policy) {
            (Some(_), Some(_)) | (None, None) => true,
            // Denied without a name: the default deny must hold too (a DENY that matches only
            // per request is not named when the kernel already denies at connect()).
            (None, Some(_)) => {
                !want.allowed
                    && enforced_allows().next().is_some()
                    && !enforced_allows().any(|p| eval::policy_matches(p, peer, req))
            }
            (Some(_), None) => false,
        };
        if !named_ok {
            return Err(format!("deciding policy differs: {}", context()));
        }
        if let Some(name) = &got.policy {
            // Several policies may decide; the compiled one must be one of them.
            let action = if want.allowed {
                Action::Allow
            } else {
                Action::Deny
            };
            let ok = bundle.authz.iter().any(|p| {
                p.key() == **name
                    && p.action == action
                    && !p.dry_run
                    && eval::selects(p, ROOT, target)
                    && eval::policy_matches(p, peer, req)
            });
            if !ok {
                return Err(format!("{name} did not decide: {}", context()));
            }
        }
        if want.allowed {
            if got.dry_run_deny == want.dry_run_denies.is_empty() {
                return Err(format!("dry-run deny differs: {}", context()));
            }
            if got.audit == want.audits.is_empty() {
                return Err(format!("audit differs: {}", context()));
            }
        }
    }
    for w in &reg.workloads {
        let target = Target {
            namespace: &w.namespace,
            labels: &w.labels,
        };
        let registry_default = w.permissive.then_some(MtlsMode::Permissive);
        let want = eval::effective_mtls(bundle, ROOT, target, registry_default).accepts_plaintext();
        if permissive(bundle, w, ROOT) != want || view.permissive(w.id) != want {
            return Err(format!(
                "{}: PERMISSIVE is {want} by the evaluator, {} compiled",
                w.key(),
                !want
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn compiled_policy_decides_as_the_evaluator(
        ws in prop::collection::vec(arb_workload(), 2..6),
        bundle in arb_bundle(),
        cases in prop::collection::vec(arb_case(), 1..24),
    ) {
        if let Err(e) = check(&ws, &bundle, &cases) {
            return Err(TestCaseError::fail(e));
        }
    }
}
