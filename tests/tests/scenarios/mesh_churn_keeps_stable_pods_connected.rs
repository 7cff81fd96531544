//! Churn: for 60 s, 20 workloads are added to and 20 removed from the mesh state every second
//! (alternating between n1 and n2; each with its own identity, so n1 and n2 issue and drop
//! certificates all along; their cgroups do not exist, so they stay pending), while the stable
//! pods a1 and b1 exchange traffic both ways at 10 connections/s each. Not one stable connection
//! fails, a capture on the link never sees their payload in clear, both agents applied a
//! stream of versions and end on the latest, and neither restarted.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use mesh_tests::{
    capture::{contains, Capture},
    require_privileges, wait_for, ClientRequest, Host, WorkloadEntry, DEFAULT_TIMEOUT,
};

use crate::cluster;

const SECONDS: u64 = 60;
/// One workload added and one removed per tick: 20 of each per second.
const TICK: Duration = Duration::from_millis(50);
/// Churn workloads present at any moment.
const WINDOW: usize = 20;

fn churn_entry(i: usize) -> WorkloadEntry {
    let node = i % 2;
    WorkloadEntry {
        name: format!("churn-{i}"),
        namespace: "default".into(),
        service_account: format!("sa-churn-{i}"),
        node: format!("n{}", node + 1),
        ips: vec![
            format!("10.{}.{}.{}", node + 1, 100 + (i / 250) % 100, 1 + i % 250)
                .parse()
                .expect("ip"),
        ],
        cgroup: Some(format!("mesh-churn-never-created/churn-{i}")),
        labels: vec![("app".into(), format!("churn-{i}"))],
        peer_authentication: None,
        extra_lines: Vec::new(),
    }
}

#[test]
fn mesh_churn_keeps_stable_pods_connected() {
    require_privileges();
    let cluster = cluster().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
    let agents = cluster.start_agents();
    let pids: Vec<_> = agents.iter().map(|a| a.pid()).collect();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _servers = (a1.serve(&[8080]), b1.serve(&[8080]));
    let applied_before = cluster
        .node(0)
        .metric(r#"mesh_state_updates_total{result="applied"}"#);
    let capture = Capture::start(cluster.bridge_netns());
    let sent = "stable-payload-churn-3e8b";
    let count = (SECONDS * 10) as usize;
    let request = |dst| {
        ClientRequest::new(dst)
            .send(sent)
            .count(count)
            .interval(Duration::from_millis(100))
            .io_timeout(Duration::from_secs(5))
    };
    let forth = a1.spawn_client(&request(b1.addr4(8080)));
    let back = b1.spawn_client(&request(a1.addr4(8080)));

    let stable = cluster.registry_entries();
    let nodes = cluster.registry_nodes();
    let started = Instant::now();
    let ticks = (SECONDS * 1000 / TICK.as_millis() as u64) as usize;
    for t in 0..ticks {
        let mut entries = stable.clone();
        entries.extend((t.saturating_sub(WINDOW)..t).map(churn_entry));
        let text = mesh_tests::registry::render_with_services(&nodes, &entries, &[]).text;
        let path = cluster.tmp_dir().join("registry.yaml");
        let tmp = cluster.tmp_dir().join(".registry.yaml.tmp");
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .expect("write the registry");
        // Pacing: the next change at the next tick.
        let next = started + TICK * (t as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let version = cluster.published_version();
    cluster.wait_state_applied(&[0, 1], version);

    for (name, client) in [("a1→b1", forth), ("b1→a1", back)] {
        let run = client.wait();
        let failed: Vec<_> = run.results.iter().filter(|r| !r.echo_ok).collect();
        assert!(
            failed.is_empty() && run.results.len() == count,
            "{name}: {} of {} stable connections failed during the churn: {:?}",
            failed.len(),
            run.results.len(),
            failed.iter().take(5).collect::<Vec<_>>()
        );
    }
    let frames = capture.stop();
    assert!(
        frames.iter().all(|f| !contains(f, sent.as_bytes())),
        "a stable payload crossed the link in plaintext during the churn"
    );
    let applied = cluster
        .node(0)
        .metric(r#"mesh_state_updates_total{result="applied"}"#)
        - applied_before;
    let mut report = String::new();
    let _ = write!(report, "{applied} versions applied on n1");
    assert!(
        applied >= 100.0,
        "{report}: the churn did not reach the agent"
    );
    wait_for(
        DEFAULT_TIMEOUT,
        "n1 dropped the churn certificates it held",
        || {
            let m = cluster.node(0).metrics();
            let churn_certs = m
                .keys()
                .filter(|k| k.starts_with("mesh_cert_expiry_seconds") && k.contains("sa-churn-"))
                .count();
            (churn_certs <= WINDOW).then_some(())
        },
    );
    let now: Vec<_> = agents.iter().map(|a| a.pid()).collect();
    assert_eq!(pids, now, "no agent restarted");
}
