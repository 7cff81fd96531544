//! Anti-rollback survives restarts. Version 2 (a DENY of a1 → b1) is applied; n1's agent is
//! restarted (the highest version it applied is persisted). Then the authority is "restored
//! from an old backup": its state directory loses the record of what it published and it is
//! pointed at the validly signed version 1 again. It publishes version 1; both agents refuse
//! it (`reason="rollback"`), and so does n1's agent when it restarts once more with only that
//! authority to ask: it starts from its persisted version 2. a1 → b1 stays denied throughout.

use mesh_tests::{require_privileges, wait_for, Host, DEFAULT_TIMEOUT};

use super::{
    policy_common::expect_denied,
    signed_common::{deny_a1, publish, rejected, signed_cluster, wait_active, wait_denied},
};

#[test]
fn rollback_refused_even_after_agent_restart() {
    require_privileges();
    let (cluster, mut agents, k1) = signed_cluster();
    let (a1, b1) = (cluster.pod("a1"), cluster.pod("b1"));
    let _server = b1.serve(&[8080]);
    let v1 = cluster.tmp_dir().join("bundle-v1.json");
    let deny = deny_a1();
    publish(&cluster, &k1, 2, &[("deny.yaml", &deny)]);
    wait_active(&cluster, 2);
    wait_denied(a1, b1.addr4(8080));
    agents[0].stop();
    agents[0].restart();
    wait_active(&cluster, 2);

    // The authority, restored from an old backup, serves version 1 again.
    {
        let mut a = cluster.authority();
        a.stop();
        std::fs::remove_file(a.dir().join("state/ids.json")).expect("forget what was published");
    }
    cluster.install_bundle(&v1);
    cluster.authority().start();
    for i in 0..2 {
        wait_for(DEFAULT_TIMEOUT, "the rollback refused", || {
            (rejected(&cluster, i, "rollback") >= 1.0).then_some(())
        });
        assert_eq!(cluster.node(i).metric("mesh_config_active_version"), 2.0);
    }
    expect_denied(a1, b1.addr4(8080));

    // A restart with only that authority to ask: the persisted version 2 is what runs.
    agents[0].stop();
    agents[0].restart();
    assert_eq!(cluster.node(0).metric("mesh_config_active_version"), 2.0);
    assert!(rejected(&cluster, 0, "rollback") >= 1.0);
    expect_denied(a1, b1.addr4(8080));
}
