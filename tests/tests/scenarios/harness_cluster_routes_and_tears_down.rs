//! The harness itself, without an agent: pods reach each other directly on
//! IPv4 and IPv6 (same node and across nodes, replies name the right pod),
//! processes land in their pod's cgroup, and dropping the cluster leaves no
//! namespace, cgroup or temp dir behind.

use std::time::Duration;

use mesh_tests::{cgroup2_mount, require_privileges, ClientRequest, Host};

use crate::cluster;

#[test]
fn harness_cluster_routes_and_tears_down() {
    require_privileges();
    let cluster = cluster().nodes(2).pods_per_node(2).build();
    let id = cluster.id().to_owned();
    let tmp = cluster.tmp_dir().to_owned();
    let cg_root = cgroup2_mount().join(format!("mesh-{id}"));
    assert!(cg_root.join("n1/pods/a1").is_dir());
    assert!(cg_root.join("n2/pods/b2").is_dir());

    let b1 = cluster.pod("b1");
    let a2 = cluster.pod("a2");
    {
        let _s1 = b1.serve(&[8080]);
        let _s2 = a2.serve(&[8080]);
        let a1 = cluster.pod("a1");
        for (dst, name) in [
            (b1.addr4(8080), "b1"),
            (b1.addr6(8080), "b1"),
            (a2.addr4(8080), "a2"),
            (a2.addr6(8080), "a2"),
        ] {
            let r = a1.client(&ClientRequest::new(dst)).single().clone();
            assert_eq!(r.hello_name(), Some(name), "{r:?}");
            assert_eq!(r.hello_addr(), Some(dst), "{r:?}");
            // Without an agent nothing is redirected: the source is the pod.
            assert_eq!(
                r.local_addr().map(|a| a.ip()),
                Some(if dst.is_ipv4() {
                    a1.ip4().into()
                } else {
                    a1.ip6().into()
                })
            );
        }
        // A node reaches the pods of the other node, and the fabric works.
        let r = cluster
            .node(0)
            .client(&ClientRequest::new(b1.addr4(8080)))
            .single()
            .clone();
        assert_eq!(r.hello_name(), Some("b1"));

        // A pod process is in its pod's cgroup; a node process is not in any
        // of the cluster's cgroups.
        let mut cmd = std::process::Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        let out = a1.run(cmd, "cgroup", Duration::from_secs(5));
        let rel = a1.cgroup_rel();
        assert!(
            out.stdout.contains(&format!("0::/{}", rel.display())),
            "{}",
            out.stdout
        );
        let mut cmd = std::process::Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        let out = cluster.node(0).run(cmd, "cgroup", Duration::from_secs(5));
        assert!(
            !out.stdout.contains(&format!("mesh-{id}")),
            "{}",
            out.stdout
        );
    }
    drop(cluster);

    let netns = std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(
        !netns.iter().any(|n| n.starts_with(&format!("{id}-"))),
        "namespaces left: {netns:?}"
    );
    assert!(!cg_root.exists(), "cgroup {} left", cg_root.display());
    assert!(!tmp.exists(), "temp dir {} left", tmp.display());
}
