//! The safe baseline. Node n2 boots for the first time (fresh pins) with no configuration it
//! can verify: the authority publishes version 1 signed by a key that n1 pins and n2 does not.
//! n1 applies it; n2 refuses it and seals its pod tree in the kernel (`CONFIG_F_BASELINE` in
//! the pinned `mesh_config`, as `bpftool map dump` shows), reporting
//! `mesh_config_state{state="baseline"} 1`:
//! - b1 (on n2) cannot connect anywhere but loopback: to a1 (a mesh destination) and to x1 (a
//!   pod outside the mesh) the connect fails with EPERM at once; to its own 127.0.0.1 it works;
//! - nothing reaches b1: plaintext from x1 (not enrolled, passed by n1) has its SYN dropped on
//!   n2, and a1's mesh connection (n1 is configured) gets no answer from b1;
//! - both are counted in the pinned counters (`connect_denied_baseline`,
//!   `ingress_dropped_baseline`).
//!
//! Clearing the bit by hand with bpftool is undone by n2's agent within a read-back
//! (`mesh_config_unauthorized_loads_total`). The baseline holds while n2's agent is SIGKILLed and after it restarts (still nothing
//! verified). Version 2, signed by the key both nodes pin, lifts it: `mesh_config_state` turns
//! `active`, the bit is gone, a1 → b1 goes through the mesh, and x1's plaintext is refused by
//! STRICT (not by the baseline).

use std::time::Duration;

use mesh_common::{counters as ctr, names, CONFIG_F_BASELINE};
use mesh_tests::{
    bpftool, require_privileges, wait_for, ClientRequest, Cluster, Host, DEFAULT_TIMEOUT,
};

use super::signed_common::publish;
use crate::{assert_via_agent, cluster};

/// Refused connects either fail at once (EPERM) or time out (a dropped SYN).
const REFUSED_TIMEOUT: Duration = Duration::from_millis(1500);

const BASELINE: &str = r#"mesh_config_state{state="baseline"}"#;
const ACTIVE: &str = r#"mesh_config_state{state="active"}"#;

fn flags(cluster: &Cluster, node: usize) -> u32 {
    bpftool::config_flags(&cluster.node(node).pin_dir().join(names::MAP_CONFIG))
}

fn counter(cluster: &Cluster, node: usize, index: u32) -> u64 {
    bpftool::counters(&cluster.node(node).pin_dir().join(names::MAP_COUNTERS))
        .get(index as usize)
        .copied()
        .unwrap_or(0)
}

/// `src` → `dst` fails at connect() with EPERM (the kernel refused it).
#[track_caller]
fn expect_eperm(src: &mesh_tests::Pod, dst: std::net::SocketAddr) {
    let run = src.client(
        &ClientRequest::new(dst)
            .send("x")
            .io_timeout(REFUSED_TIMEOUT),
    );
    assert!(
        run.results.first().is_some_and(|r| r
            .error
            .as_deref()
            .is_some_and(|e| e.contains("Operation not permitted"))),
        "{} → {dst} was not refused with EPERM: {:?}",
        src.name(),
        run.results
    );
}

/// `src` → `dst` gets no answer from the destination.
#[track_caller]
fn expect_unanswered(src: &mesh_tests::Pod, dst: std::net::SocketAddr) {
    let run = src.client(
        &ClientRequest::new(dst)
            .send("x")
            .io_timeout(REFUSED_TIMEOUT),
    );
    assert!(
        !run.success() && run.results.iter().all(|r| r.hello.is_none()),
        "{} → {dst} was answered: {:?}",
        src.name(),
        run.results
    );
}

#[test]
fn first_boot_without_bundle_is_fail_closed() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_unregistered_pod(0, "x1")
        .add_pod(1, "b1")
        .build();
    let (a1, x1, b1) = (cluster.pod("a1"), cluster.pod("x1"), cluster.pod("b1"));
    let k1 = cluster.signer_key("k1");
    let n1_only = cluster.signer_key("n1-only");
    for key in [&k1, &n1_only] {
        cluster.trust_signer(&cluster.authority_signers(), key);
    }
    cluster.trust_signer(&cluster.node_signers(0), &k1);
    cluster.trust_signer(&cluster.node_signers(0), &n1_only);
    cluster.trust_signer(&cluster.node_signers(1), &k1);
    publish(&cluster, &n1_only, 1, &[]);
    cluster.follow_bundle_afresh(&[]);
    let _a1_server = a1.serve(&[8080]);
    let _x1_server = x1.serve(&[8080]);
    let _b1_server = b1.serve(&[8080]);
    let _b1_loopback = b1.place().serve_on(&["127.0.0.1:8081".parse().unwrap()]);
    let mut agents = cluster.start_agents();

    // n1 runs version 1; n2 refused it and, with nothing verified, is in the baseline.
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    wait_for(DEFAULT_TIMEOUT, "n1 applies version 1", || {
        (n1.metric("mesh_config_active_version") == 1.0).then_some(())
    });
    wait_for(DEFAULT_TIMEOUT, "n2 refuses version 1", || {
        (n2.metric(r#"mesh_config_rejected_total{reason="unknown_signer"}"#) >= 1.0).then_some(())
    });
    assert_eq!(n2.metric(BASELINE), 1.0, "{}", agents[1].tail_stdout(20));
    assert_eq!(n2.metric(ACTIVE), 0.0);
    assert_eq!(n1.metric(BASELINE), 0.0);
    assert_eq!(n1.metric(ACTIVE), 1.0);
    assert_ne!(
        flags(&cluster, 1) & CONFIG_F_BASELINE,
        0,
        "bpftool: n2 not sealed"
    );
    assert_eq!(
        flags(&cluster, 0) & CONFIG_F_BASELINE,
        0,
        "bpftool: n1 sealed"
    );

    let sealed = |cluster: &Cluster, when: &str| {
        let denied = counter(cluster, 1, ctr::CONNECT_DENIED_BASELINE);
        let dropped = counter(cluster, 1, ctr::INGRESS_DROPPED_BASELINE);
        // Nothing leaves b1 but loopback, IPv4 and IPv6, mesh destination or not.
        expect_eperm(b1, a1.addr4(8080));
        expect_eperm(b1, a1.addr6(8080));
        expect_eperm(b1, x1.addr4(8080));
        let own = b1.client(&ClientRequest::new("127.0.0.1:8081".parse().unwrap()).send("self"));
        assert!(
            own.success(),
            "{when}: b1 → its own loopback: {:?}",
            own.results
        );
        // Nothing reaches b1: plaintext from outside the mesh, and the mesh itself.
        expect_unanswered(x1, b1.addr4(8080));
        expect_unanswered(a1, b1.addr4(8080));
        assert!(
            counter(cluster, 1, ctr::CONNECT_DENIED_BASELINE) >= denied + 3,
            "{when}: connect_denied_baseline did not count the refused connects"
        );
        assert!(
            counter(cluster, 1, ctr::INGRESS_DROPPED_BASELINE) > dropped,
            "{when}: ingress_dropped_baseline did not count the dropped SYNs"
        );
    };
    sealed(&cluster, "first boot");

    // Unsealing by hand (clearing the bit with bpftool) does not last: the agent reads the
    // slot back and seals it again.
    let config_pin = cluster.node(1).pin_dir().join(names::MAP_CONFIG);
    let p = config_pin.to_str().expect("UTF-8 pin");
    let dump = bpftool::json(&["map", "dump", "pinned", p]);
    let mut value: Vec<u8> = dump[0]["value"]
        .as_array()
        .unwrap_or_else(|| panic!("no raw value in {dump}"))
        .iter()
        .map(|b| {
            u8::from_str_radix(b.as_str().expect("hex byte").trim_start_matches("0x"), 16)
                .expect("hex byte")
        })
        .collect();
    // `AgentConfig.flags` is the u32 at offset 24 (little-endian).
    value[24] &= !(CONFIG_F_BASELINE as u8);
    let hex: Vec<String> = value.iter().map(|b| format!("{b:02x}")).collect();
    let mut args = vec![
        "map", "update", "pinned", p, "key", "hex", "00", "00", "00", "00",
    ];
    args.push("value");
    args.push("hex");
    args.extend(hex.iter().map(String::as_str));
    let before = n2.metric("mesh_config_unauthorized_loads_total");
    bpftool::run(&args);
    wait_for(
        DEFAULT_TIMEOUT,
        "n2's agent seals its pod tree again",
        || {
            (flags(&cluster, 1) & CONFIG_F_BASELINE != 0
                && n2.metric("mesh_config_unauthorized_loads_total") > before)
                .then_some(())
        },
    );
    sealed(&cluster, "unsealed by hand, sealed again");

    // Each refusal is the kernel's decision, reported as an event: logged and audited.
    wait_for(DEFAULT_TIMEOUT, "n2 logs a baseline refusal", || {
        agents[1].log_lines().into_iter().find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connect refused by the safe baseline"))
                && l["dst"] == a1.addr4(8080).to_string()
        })
    });
    let audit_dir = cluster.agent_spec(1).identity_dir.join("state/audit");
    let audit = |args: &[&str]| {
        let mut all = vec!["audit", "query", audit_dir.to_str().expect("UTF-8 dir")];
        all.extend(args);
        all.extend(["--output", "json"]);
        mesh_tests::authority::run_cli(&all)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect::<Vec<_>>()
    };
    wait_for(
        DEFAULT_TIMEOUT,
        "n2's audit log has the baseline's decisions",
        || {
            let records = audit(&["--policy", "safe-baseline"]);
            let out = records.iter().any(|r| {
                r["verdict"] == "deny"
                    && r["dst_addr"].as_str() == Some(&a1.addr4(8080).to_string())
            });
            let inbound = records
                .iter()
                .any(|r| r["dst_addr"].as_str() == Some(&b1.addr4(8080).to_string()));
            (out && inbound).then_some(())
        },
    );

    // The seal is the kernel's: it holds with n2's agent SIGKILLed, and after its restart.
    agents[1].kill_sigkill();
    sealed(&cluster, "agent killed");
    agents[1].restart();
    wait_for(
        DEFAULT_TIMEOUT,
        "n2's restarted agent reports the baseline",
        || (n2.metric(BASELINE) == 1.0).then_some(()),
    );
    sealed(&cluster, "agent restarted");

    // A bundle n2 verifies lifts the baseline.
    publish(&cluster, &k1, 2, &[]);
    wait_for(DEFAULT_TIMEOUT, "n2 applies version 2", || {
        (n2.metric("mesh_config_active_version") == 2.0).then_some(())
    });
    wait_for(DEFAULT_TIMEOUT, "n2 leaves the baseline", || {
        (n2.metric(BASELINE) == 0.0 && n2.metric(ACTIVE) == 1.0).then_some(())
    });
    assert_eq!(
        flags(&cluster, 1) & CONFIG_F_BASELINE,
        0,
        "bpftool: n2 still sealed"
    );
    let dropped = counter(&cluster, 1, ctr::INGRESS_DROPPED_BASELINE);
    let sent = "through the mesh";
    wait_for(DEFAULT_TIMEOUT, "a1 → b1 over the mesh", || {
        let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
        run.success().then_some(())
    });
    let run = a1.client(&ClientRequest::new(b1.addr4(8080)).send(sent));
    assert_via_agent(&agents[0], a1, b1, run.single(), sent);
    let refused = counter(&cluster, 1, ctr::INGRESS_PLAINTEXT_REFUSED);
    expect_unanswered(x1, b1.addr4(8080));
    assert!(counter(&cluster, 1, ctr::INGRESS_PLAINTEXT_REFUSED) > refused);
    assert_eq!(
        counter(&cluster, 1, ctr::INGRESS_DROPPED_BASELINE),
        dropped,
        "the baseline still dropped SYNs after it was lifted"
    );
}
