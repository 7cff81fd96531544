//! Direct writes to the maps the mesh state programs are caught and undone. On n1, with the
//! DENY of a1 → b1 applied, an attacker with bpftool access tries two bypasses:
//! - deleting b1's address from `mesh_dests` (a1's connects to it would no longer be captured:
//!   no mesh, no policy);
//! - deleting a1's cgroup from `mesh_workloads` (a1 would be unenrolled: its traffic leaves
//!   the mesh).
//!
//! Each time n1's agent reads the map back, finds entries it did not write
//! (`mesh_config_unauthorized_loads_total`, a log line naming the map), and writes the state
//! again: the entry is back in the pinned map and a1 → b1 is refused by the kernel again.

use mesh_common::names;
use mesh_tests::{bpftool, require_privileges, wait_for, Host, DEFAULT_TIMEOUT};
use serde_json::Value;

use super::{policy_common::expect_denied, signed_common::signed_cluster_denying};

/// The raw entries of a pinned map (bpftool's `key` byte arrays, as hex strings).
fn raw_keys(pin: &std::path::Path) -> Vec<Vec<String>> {
    let dump = bpftool::json(&["map", "dump", "pinned", pin.to_str().expect("UTF-8 pin")]);
    let Value::Array(entries) = dump else {
        panic!("bpftool dump of {}: {dump}", pin.display());
    };
    entries
        .iter()
        .map(|e| {
            e["key"]
                .as_array()
                .unwrap_or_else(|| panic!("no raw key in {e}"))
                .iter()
                .map(|b| {
                    b.as_str()
                        .unwrap_or_else(|| panic!("key byte {b}"))
                        .trim_start_matches("0x")
                        .to_owned()
                })
                .collect()
        })
        .collect()
}

#[track_caller]
fn delete(pin: &std::path::Path, key: &[String]) {
    let mut args = vec![
        "map",
        "delete",
        "pinned",
        pin.to_str().expect("UTF-8 pin"),
        "key",
        "hex",
    ];
    args.extend(key.iter().map(String::as_str));
    bpftool::run(&args);
}

#[test]
fn direct_state_map_writes_detected_and_restored() {
    require_privileges();
    let (cluster, agents, _k1, _server) = signed_cluster_denying();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let n1 = cluster.node(0);
    let unauthorized = || n1.metric("mesh_config_unauthorized_loads_total");

    // b1's IPv4 address as a `mesh_dests` key: IPv4-mapped, network order.
    let o = b1.ip4().octets();
    let b1_key: Vec<String> = [0u8; 10]
        .iter()
        .chain(&[0xff, 0xff])
        .chain(&o)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dests = n1.pin_dir().join(names::MAP_DESTS);
    assert!(
        raw_keys(&dests).contains(&b1_key),
        "b1 is not a destination"
    );
    let before = unauthorized();
    delete(&dests, &b1_key);
    wait_for(DEFAULT_TIMEOUT, "the deleted destination restored", || {
        raw_keys(&dests).contains(&b1_key).then_some(())
    });
    assert!(unauthorized() > before, "the change was not counted");
    wait_for(DEFAULT_TIMEOUT, "the agent says which map", || {
        agents[0].log_lines().into_iter().find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("unauthorized map change"))
                && l["maps"].to_string().contains(names::MAP_DESTS)
        })
    });
    expect_denied(a1, b1.addr4(8080));

    // a1's enrolment: n1 enrols only a1.
    let workloads = n1.pin_dir().join(names::MAP_WORKLOADS);
    let enrolled = raw_keys(&workloads);
    assert_eq!(enrolled.len(), 1, "n1 should enrol a1 only: {enrolled:?}");
    let before = unauthorized();
    delete(&workloads, &enrolled[0]);
    wait_for(DEFAULT_TIMEOUT, "a1's enrolment restored", || {
        (raw_keys(&workloads) == enrolled).then_some(())
    });
    assert!(unauthorized() > before, "the change was not counted");
    expect_denied(a1, b1.addr4(8080));
}
