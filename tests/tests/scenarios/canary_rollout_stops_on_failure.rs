//! Controlled deployment windows (issue 12). Nodes n1 (a1) and n2 (b1, b2); k1 pinned on both,
//! k2 trusted by the authority and pinned on n2 only.
//!
//! (a) Version 2 — a DENY of a1 → b1 and b2 → b1 — with canary n1 and a window: n1 applies it
//!     and its kernel refuses a1 → b1 while n2 still runs version 1 (b2 → b1, decided by n2,
//!     still works, and `config status` shows n2 meant for version 1, not drifting); after
//!     the window n2 runs version 2 and refuses b2 → b1.
//! (b) Version 3 — no policy, signed by k2, canary n1 — is refused by n1 (unknown signer):
//!     the rollout halts at once; `config status` shows the halt with n1's reason (exit 3);
//!     past the window n2, which would accept k2, has still not received it (it runs version
//!     2, b2 → b1 still refused, no drift).
//!     The authority, restarted, resumes the halted rollout from its record.
//! (c) Version 4 — signed by k1, activation time a few seconds ahead, no canaries — supersedes
//!     the halted rollout: nobody receives it before the activation time, both after.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_tests::{
    authority::run_cli_status, require_privileges, wait_for, Agent, ClientRequest, Cluster, Host,
    DEFAULT_TIMEOUT,
};

use super::{
    policy_common::{authz, expect_allowed, expect_denied, principal},
    signed_common::{rejected, wait_active, wait_denied},
};
use crate::cluster;

/// Canary window of version 2: long enough for n1 to apply it and the traffic checks to run
/// inside it.
const WINDOW_V2: u64 = 15;
/// Canary window of version 3 (it halts before; the test waits past it).
const WINDOW_V3: u64 = 4;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A DENY of a1 → b1 and b2 → b1.
fn deny_to_b1() -> String {
    authz(
        "deny-to-b1",
        "b1",
        "DENY",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{}\", \"{}\"]}}\n",
            principal("a1"),
            principal("b2")
        ),
    )
}

/// Publishes `version` signed by `key` with `policies` and `config bundle` arguments `args`.
fn publish_with(
    cluster: &Cluster,
    key: &mesh_tests::signing::SignerKey,
    version: u64,
    policies: &[(&str, &str)],
    args: &[&str],
) {
    let signed = cluster.build_bundle_file_with(
        key,
        version,
        &mesh_tests::signing::BundleSpec {
            workloads: &cluster.registry_entries(),
            services: cluster.services(),
            policies,
            args,
            ..Default::default()
        },
    );
    cluster.install_bundle(&signed);
}

/// `config status --output json` at the authority: the exit code and the document.
fn status(cluster: &Cluster) -> (Option<i32>, serde_json::Value) {
    let dir = cluster.authority().dir().to_string_lossy().into_owned();
    let (code, out) = run_cli_status(&["config", "status", "--dir", &dir, "--output", "json"]);
    let v = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (code, v)
}

/// The `config status` entry of `node`.
fn agent<'a>(status: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    status["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["node"] == node))
        .unwrap_or(&serde_json::Value::Null)
}

fn active_version(cluster: &Cluster, i: usize) -> u64 {
    cluster.node(i).metric("mesh_config_active_version") as u64
}

/// The cluster with version 1 applied on both nodes, k1 pinned on both, k2 trusted by the
/// authority and pinned on n2.
fn setup() -> (
    Cluster,
    Vec<Agent>,
    mesh_tests::signing::SignerKey,
    mesh_tests::signing::SignerKey,
) {
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(1, "b1")
        .add_pod(1, "b2")
        .build();
    let (k1, k2) = (cluster.signer_key("k1"), cluster.signer_key("k2"));
    cluster.trust_signer(&cluster.authority_signers(), &k1);
    cluster.trust_signer(&cluster.authority_signers(), &k2);
    cluster.trust_signer(&cluster.node_signers(0), &k1);
    cluster.trust_signer(&cluster.node_signers(1), &k1);
    cluster.trust_signer(&cluster.node_signers(1), &k2);
    publish_with(&cluster, &k1, 1, &[], &[]);
    {
        let mut a = cluster.authority();
        a.stop();
        // The versions the registry mode published are not the signer's: start afresh.
        let _ = std::fs::remove_file(a.dir().join("state/ids.json"));
        a.follow_bundle(&cluster.tmp_dir().join(mesh_tests::signing::BUNDLE_FILE));
        a.start();
    }
    let agents = cluster.start_agents();
    wait_active(&cluster, 1);
    (cluster, agents, k1, k2)
}

#[test]
fn canary_rollout_stops_on_failure() {
    require_privileges();
    let (cluster, _agents, k1, k2) = setup();
    let (a1, b1, b2) = (cluster.pod("a1"), cluster.pod("b1"), cluster.pod("b2"));
    let _server = b1.serve(&[8080]);
    let dst = b1.addr4(8080);
    expect_allowed(a1, dst);
    expect_allowed(b2, dst);

    // (a) Canary n1 first, then everyone after the window.
    let deny = deny_to_b1();
    let window = WINDOW_V2.to_string();
    publish_with(
        &cluster,
        &k1,
        2,
        &[("deny.yaml", &deny)],
        &["--canary-nodes", "n1", "--canary-window-secs", &window],
    );
    wait_for(DEFAULT_TIMEOUT, "n1 (canary) runs v2", || {
        (active_version(&cluster, 0) == 2).then_some(())
    });
    wait_denied(a1, dst);
    // n2 decides b2 → b1 by itself: still version 1, still allowed.
    expect_allowed(b2, dst);
    assert_eq!(
        active_version(&cluster, 1),
        1,
        "n2 received v2 during the window"
    );
    let (code, st) = wait_for(DEFAULT_TIMEOUT, "config status: n1 reported v2", || {
        let (code, st) = status(&cluster);
        (agent(&st, "n1")["activeVersion"] == 2).then_some((code, st))
    });
    // Everything above happened inside the window (else this test proves nothing).
    assert_eq!(st["rollout"]["phase"], "canary", "{st}");
    assert_eq!(st["rollout"]["target"]["version"], 2, "{st}");
    assert_eq!(agent(&st, "n2")["intendedVersion"], 1, "{st}");
    assert_eq!(agent(&st, "n2")["drift"], false, "{st}");
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(
        active_version(&cluster, 1),
        1,
        "n2 received v2 during the window"
    );
    let window_end = st["rollout"]["windowEndUnixMs"]
        .as_u64()
        .expect("window end");

    wait_for(
        Duration::from_secs(WINDOW_V2) + DEFAULT_TIMEOUT,
        "n2 runs v2 after the window",
        || (active_version(&cluster, 1) == 2).then_some(()),
    );
    assert!(
        now_ms() >= window_end,
        "n2 applied v2 before the window ended"
    );
    wait_denied(b2, dst);
    let (code, st) = status(&cluster);
    assert_eq!(st["rollout"]["phase"], "released", "{st}");
    assert!(
        st["rollout"]["releasedUnixMs"].as_u64() >= Some(window_end),
        "{st}"
    );
    assert_eq!(code, Some(0), "{st}");

    // (b) A version the canary refuses halts the rollout; n2 never receives it.
    let window = WINDOW_V3.to_string();
    publish_with(
        &cluster,
        &k2,
        3,
        &[],
        &["--canary-nodes", "n1", "--canary-window-secs", &window],
    );
    wait_for(DEFAULT_TIMEOUT, "n1 refuses v3 (unknown signer)", || {
        (rejected(&cluster, 0, "unknown_signer") >= 1.0).then_some(())
    });
    let st = wait_for(
        DEFAULT_TIMEOUT,
        "config status shows the halt (exit 3)",
        || {
            let (code, st) = status(&cluster);
            (code == Some(3) && st["halted"] == true).then_some(st)
        },
    );
    assert_eq!(st["rollout"]["target"]["version"], 3, "{st}");
    assert_eq!(st["rollout"]["halt"]["node"], "n1", "{st}");
    let reason = st["rollout"]["halt"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("unknown_signer"), "{st}");
    assert_eq!(agent(&st, "n1")["refused"]["version"], 3, "{st}");
    let logged = |message: &str| {
        cluster
            .authority()
            .log_lines()
            .iter()
            .any(|l| l["message"] == message)
    };
    assert!(logged("rollout halted"), "the halt is not logged");
    let window_end = st["rollout"]["windowEndUnixMs"]
        .as_u64()
        .expect("window end");
    // The one wait that is a time and not a condition: n2 must still not have v3 once the
    // window is over (the point is that nothing happens).
    wait_for(
        Duration::from_secs(WINDOW_V3) + DEFAULT_TIMEOUT,
        "the end of v3's window",
        || (now_ms() > window_end + 1000).then_some(()),
    );
    assert_eq!(active_version(&cluster, 1), 2, "n2 received the halted v3");
    assert_eq!(active_version(&cluster, 0), 2, "n1 left v2");
    assert_eq!(cluster.node(1).metric("mesh_config_drift"), 0.0);
    // n1 is meant for v2 again (it refused v3): it does not drift either.
    wait_for(DEFAULT_TIMEOUT, "n1 no longer drifts", || {
        (cluster.node(0).metric("mesh_config_drift") == 0.0).then_some(())
    });
    assert_eq!(rejected(&cluster, 1, "unknown_signer"), 0.0, "n2 saw v3");
    expect_denied(b2, dst);
    let (code, st) = status(&cluster);
    assert_eq!(code, Some(3), "{st}");
    assert_eq!(st["rollout"]["phase"], "halted", "{st}");
    assert_eq!(agent(&st, "n2")["intendedVersion"], 2, "{st}");
    assert_eq!(agent(&st, "n2")["received"], 2, "{st}");
    assert_eq!(agent(&st, "n2")["drift"], false, "{st}");

    // An authority restarted mid-rollout resumes it from its record: still halted, n2 still
    // meant for (and served) v2 from the persisted copy, although the followed file is v3.
    {
        let mut a = cluster.authority();
        a.stop();
        a.start();
    }
    let st = wait_for(
        DEFAULT_TIMEOUT,
        "n2 reports to the restarted authority",
        || {
            let (code, st) = status(&cluster);
            (code == Some(3) && agent(&st, "n2")["seenUnixMs"].as_u64() > Some(window_end))
                .then_some(st)
        },
    );
    assert_eq!(st["rollout"]["phase"], "halted", "{st}");
    assert!(
        logged("rollout resumed"),
        "the restarted authority did not resume"
    );
    assert_eq!(agent(&st, "n2")["intendedVersion"], 2, "{st}");
    assert_eq!(
        active_version(&cluster, 1),
        2,
        "n2 after the authority's restart"
    );
    expect_denied(b2, dst);

    // (c) An activation time ahead: nobody before it, both after; it supersedes the halt.
    let activate_ms = (now_ms() / 1000 + 6) * 1000;
    let activate_at = time_rfc3339(activate_ms / 1000);
    publish_with(&cluster, &k1, 4, &[], &["--activate-at", &activate_at]);
    wait_for(
        DEFAULT_TIMEOUT,
        "the authority publishes v4 (pending)",
        || {
            let (_, st) = status(&cluster);
            (st["rollout"]["target"]["version"] == 4).then_some(())
        },
    );
    // Checked at every poll until just before the activation time: nobody runs v4 before it.
    let until = std::time::Instant::now()
        + std::time::Duration::from_millis(activate_ms.saturating_sub(now_ms() + 300));
    mesh_tests::poll::holds_until(until, || {
        for i in 0..2 {
            assert_eq!(active_version(&cluster, i), 2, "n{} ran v4 early", i + 1);
        }
        let (_, st) = status(&cluster);
        assert_eq!(st["rollout"]["phase"], "pending", "{st}");
    });
    wait_active(&cluster, 4);
    assert!(
        now_ms() >= activate_ms,
        "v4 applied before its activation time"
    );
    // The policy of a version is compiled a moment after the version is applied.
    for src in [a1, b2] {
        wait_for(
            DEFAULT_TIMEOUT,
            &format!("{} → b1 allowed by v4", src.name()),
            || {
                let run = src.client(&ClientRequest::new(dst).send("allowed?"));
                run.results
                    .first()
                    .is_some_and(|r| r.echo_ok && r.hello.is_some())
                    .then_some(())
            },
        );
    }
    wait_for(DEFAULT_TIMEOUT, "config status clean", || {
        let (code, st) = status(&cluster);
        (code == Some(0) && st["rollout"]["phase"] == "released").then_some(())
    });
}

/// `secs` since the epoch as RFC 3339 UTC (`YYYY-MM-DDTHH:MM:SSZ`).
fn time_rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
