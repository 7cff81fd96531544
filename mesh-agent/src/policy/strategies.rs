//! Proptest generators of policy objects, shared by the evaluator's property tests and the
//! compiled-vs-reference conformance test; each caller brings its own value sets.

use proptest::prelude::*;

use super::model::{IpNet, Operation, Rule, Source, StringMatch};

/// Up to two patterns out of `values`.
pub fn pick(values: &'static [&'static str]) -> impl Strategy<Value = Vec<StringMatch>> {
    prop::collection::vec(
        prop::sample::select(values).prop_map(|p| {
            if super::model::is_path_template(p) {
                StringMatch::Template(p.to_owned())
            } else {
                StringMatch::from_pattern(p)
            }
        }),
        0..3,
    )
}

/// A source with every field drawn from the given sets.
pub fn full_source(
    principals: &'static [&'static str],
    namespaces: &'static [&'static str],
    nets: impl Strategy<Value = Vec<IpNet>> + Clone,
) -> impl Strategy<Value = Source> {
    (
        pick(principals),
        pick(principals),
        pick(namespaces),
        pick(namespaces),
        nets.clone(),
        nets,
    )
        .prop_map(
            |(principals, not_principals, namespaces, not_namespaces, ip_blocks, not_ip_blocks)| {
                Source {
                    principals,
                    not_principals,
                    namespaces,
                    not_namespaces,
                    ip_blocks,
                    not_ip_blocks,
                    service_accounts: Vec::new(),
                    not_service_accounts: Vec::new(),
                    trust_domains: Vec::new(),
                    not_trust_domains: Vec::new(),
                }
            },
        )
}

/// An operation over `ports`; HTTP fields (from the given sets) in one case out of
/// `1 + plain_weight`, so that non-HTTP requests match often too.
pub fn operation(
    ports: impl Strategy<Value = Vec<u16>> + Clone,
    methods: &'static [&'static str],
    paths: &'static [&'static str],
    hosts: &'static [&'static str],
    plain_weight: u32,
) -> impl Strategy<Value = Operation> {
    let http = (
        pick(methods),
        pick(methods),
        pick(paths),
        pick(paths),
        pick(hosts),
        pick(hosts),
    );
    let http = prop_oneof![plain_weight => Just(Default::default()), 1 => http];
    (ports.clone(), ports, http).prop_map(
        |(ports, not_ports, (methods, not_methods, paths, not_paths, hosts, not_hosts))| {
            Operation {
                ports,
                not_ports,
                methods,
                not_methods,
                paths,
                not_paths,
                hosts,
                not_hosts,
            }
        },
    )
}

/// A rule of fewer than `max` sources and operations.
pub fn rule(
    source: impl Strategy<Value = Source>,
    operation: impl Strategy<Value = Operation>,
    max: usize,
) -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source, 0..max),
        prop::collection::vec(operation, 0..max),
    )
        .prop_map(|(from, to)| Rule {
            from,
            to,
            when: Vec::new(),
        })
}
