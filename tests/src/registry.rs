//! Writing the agent's workload registry (YAML, docs/CONTRACTS.md).

use std::{fmt::Write as _, net::IpAddr, ops::RangeInclusive};

/// One workload of the registry. `extra_lines` are appended verbatim (already
/// indented by the renderer) so scenarios can inject malformed content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadEntry {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Relative to the cgroup2 mount; `None` leaves the field out.
    pub cgroup: Option<String>,
    pub labels: Vec<(String, String)>,
    /// `peerAuthentication:` as written (`STRICT`, `PERMISSIVE`, or anything
    /// to test refusals); `None` leaves the field out (STRICT).
    pub peer_authentication: Option<String>,
    pub extra_lines: Vec<String>,
}

/// One entry of the registry's `nodes:` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: String,
    pub address: IpAddr,
    pub address6: Option<IpAddr>,
}

/// One entry of the registry's `services:` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    /// `(port, targetPort)` pairs.
    pub ports: Vec<(u16, u16)>,
    /// The label selector (`key: value` pairs).
    pub selector: Vec<(String, String)>,
}

impl ServiceEntry {
    /// `namespace/name`, as the agent names services in its flow records and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl WorkloadEntry {
    /// `namespace/name`, as the agent names workloads in its flow records.
    pub fn workload_id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A rendered registry and, for each entry, the 1-based lines it occupies
/// (so a scenario can check that an error names the right line).
#[derive(Clone, Debug)]
pub struct RenderedRegistry {
    pub text: String,
    pub entry_lines: Vec<RangeInclusive<usize>>,
}

/// Renders `entries` and `nodes` in the registry format (workloads first,
/// so the workloads' line numbers do not depend on the nodes):
///
/// ```yaml
/// workloads:
///   - name: a1
///     namespace: default
///     serviceAccount: sa-a1
///     node: n1
///     ips: ["10.1.0.2", "fd00:1::2"]
///     cgroup: mesh-mt1x0/n1/pods/a1
///     labels: {app: a1}
///     peerAuthentication: PERMISSIVE
/// nodes:
///   - name: n1
///     address: 10.0.0.1
///     address6: fd00::1
/// ```
pub fn render(nodes: &[NodeEntry], entries: &[WorkloadEntry]) -> RenderedRegistry {
    render_with_services(nodes, entries, &[])
}

/// [`render`], then `services:` (after the nodes: the other lines stay put) when there are any:
///
/// ```yaml
/// services:
///   - name: web
///     namespace: default
///     vips: ["10.96.0.10"]
///     ports: [{port: 80, targetPort: 8080}]
///     selector: {svc: web}
/// ```
pub fn render_with_services(
    nodes: &[NodeEntry],
    entries: &[WorkloadEntry],
    services: &[ServiceEntry],
) -> RenderedRegistry {
    let mut text = String::from("# written by mesh-tests\nworkloads:\n");
    let mut line = 3; // the next line to be written
    let mut entry_lines = Vec::with_capacity(entries.len());
    for e in entries {
        let first = line;
        let mut push = |s: String| {
            text.push_str(&s);
            text.push('\n');
            line += 1;
        };
        push(format!("  - name: {}", e.name));
        push(format!("    namespace: {}", e.namespace));
        push(format!("    serviceAccount: {}", e.service_account));
        push(format!("    node: {}", e.node));
        let ips: Vec<String> = e.ips.iter().map(|ip| format!("\"{ip}\"")).collect();
        push(format!("    ips: [{}]", ips.join(", ")));
        if let Some(cg) = &e.cgroup {
            push(format!("    cgroup: {cg}"));
        }
        if !e.labels.is_empty() {
            let mut l = String::from("    labels: {");
            for (i, (k, v)) in e.labels.iter().enumerate() {
                let _ = write!(l, "{}{k}: {v}", if i > 0 { ", " } else { "" });
            }
            l.push('}');
            push(l);
        }
        if let Some(pa) = &e.peer_authentication {
            push(format!("    peerAuthentication: {pa}"));
        }
        for extra in &e.extra_lines {
            push(format!("    {extra}"));
        }
        entry_lines.push(first..=line - 1);
    }
    text.push_str("nodes:\n");
    for n in nodes {
        let _ = writeln!(text, "  - name: {}", n.name);
        let _ = writeln!(text, "    address: \"{}\"", n.address);
        if let Some(a6) = n.address6 {
            let _ = writeln!(text, "    address6: \"{a6}\"");
        }
    }
    if !services.is_empty() {
        text.push_str("services:\n");
    }
    for s in services {
        let vips: Vec<String> = s.vips.iter().map(|ip| format!("\"{ip}\"")).collect();
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|(p, t)| format!("{{port: {p}, targetPort: {t}}}"))
            .collect();
        let selector: Vec<String> = s
            .selector
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(text, "  - name: {}", s.name);
        let _ = writeln!(text, "    namespace: {}", s.namespace);
        let _ = writeln!(text, "    vips: [{}]", vips.join(", "));
        let _ = writeln!(text, "    ports: [{}]", ports.join(", "));
        let _ = writeln!(text, "    selector: {{{}}}", selector.join(", "));
    }
    RenderedRegistry { text, entry_lines }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_line_ranges() {
        let e = WorkloadEntry {
            name: "a1".into(),
            namespace: "default".into(),
            service_account: "sa-a1".into(),
            node: "n1".into(),
            ips: vec!["10.1.0.2".parse().unwrap(), "fd00:1::2".parse().unwrap()],
            cgroup: Some("mesh-x/n1/pods/a1".into()),
            labels: vec![("app".into(), "a1".into())],
            peer_authentication: None,
            extra_lines: vec![],
        };
        let mut e2 = e.clone();
        e2.name = "a2".into();
        e2.cgroup = None;
        e2.extra_lines = vec!["colour: blue".into()];
        e2.peer_authentication = Some("PERMISSIVE".into());
        let nodes = [NodeEntry {
            name: "n1".into(),
            address: "10.0.0.1".parse().unwrap(),
            address6: Some("fd00::1".parse().unwrap()),
        }];
        let r = render(&nodes, &[e, e2]);
        let lines: Vec<&str> = r.text.lines().collect();
        assert_eq!(r.entry_lines, vec![3..=9, 10..=17]);
        assert_eq!(lines[2], "  - name: a1");
        assert_eq!(lines[6], "    ips: [\"10.1.0.2\", \"fd00:1::2\"]");
        assert_eq!(lines[9], "  - name: a2");
        assert_eq!(lines[15], "    peerAuthentication: PERMISSIVE");
        assert_eq!(lines[16], "    colour: blue");
        assert_eq!(
            &lines[17..],
            [
                "nodes:",
                "  - name: n1",
                "    address: \"10.0.0.1\"",
                "    address6: \"fd00::1\""
            ]
        );
    }
}
