//! Privileged integration scenarios: each builds its own mini-cluster
//! (network namespaces, veths, cgroups) and runs real agents on the real
//! kernel. Run as root: `cargo xtask test`, or
//! `cargo build -p mesh-agent && cargo test -p mesh-tests -- --test-threads=2`.

mod scenarios;

use std::net::SocketAddr;

use mesh_tests::{Agent, ClientResult, Cluster, ClusterBuilder, FlowRecord, Host, Pod, Server};

/// A cluster builder that runs this build's `mesh-testpod` in pods.
pub fn cluster() -> ClusterBuilder {
    Cluster::builder().testpod_bin(env!("CARGO_BIN_EXE_mesh-testpod"))
}

/// The hello line the server in pod `dst` sends for a connection that
/// arrived at `addr`: the proof that the original destination was reached.
pub fn hello_of(dst: &Pod, addr: SocketAddr) -> String {
    format!("{} {addr}", dst.name())
}

/// Asserts that `result` (one connection of a client in pod `src`, which sent
/// `sent`) reached pod `dst` at the address it connected to, and that the
/// source node's `agent` carried it: its flow record names the source
/// workload, the original destination, the destination workload and the
/// bytes each way. Returns the record.
#[track_caller]
pub fn assert_via_agent(
    agent: &Agent,
    src: &Pod,
    dst: &Pod,
    result: &ClientResult,
    sent: &str,
) -> FlowRecord {
    let target: SocketAddr = result
        .connect_addr()
        .expect("client reports where it connected");
    let hello = hello_of(dst, target);
    assert_eq!(
        result.hello.as_deref(),
        Some(hello.as_str()),
        "original destination not reached: {result:?}"
    );
    assert!(result.echo_ok, "{result:?}");
    let local = result
        .local_addr()
        .expect("client reports its local address");
    let flow = agent.wait_flow_from(local);
    assert_eq!(
        flow.src_workload.as_deref(),
        Some(src.workload().as_str()),
        "source workload: {:?}",
        flow.raw
    );
    assert_eq!(
        flow.orig_dst(),
        Some(target),
        "original destination: {:?}",
        flow.raw
    );
    assert_eq!(
        flow.dst_workload.as_deref(),
        Some(dst.workload().as_str()),
        "destination workload: {:?}",
        flow.raw
    );
    assert_eq!(
        flow.outcome.as_deref(),
        Some("ok"),
        "outcome: {:?}",
        flow.raw
    );
    assert_eq!(
        flow.bytes_sent,
        Some(sent.len() as u64),
        "bytes client→destination: {:?}",
        flow.raw
    );
    let received = hello.len() + 1 + sent.len();
    assert_eq!(
        flow.bytes_received,
        Some(received as u64),
        "bytes destination→client: {:?}",
        flow.raw
    );
    flow
}

/// One connection from `src` to `dst` port 8080 sending `sent`, asserted carried by
/// `agent` ([`assert_via_agent`]).
#[track_caller]
pub fn assert_carried(agent: &Agent, src: &Pod, dst: &Pod, sent: &str) -> FlowRecord {
    let run = src.client(&mesh_tests::ClientRequest::new(dst.addr4(8080)).send(sent));
    assert_via_agent(agent, src, dst, run.single(), sent)
}

/// Asserts that `result` reached the server named `dst_name` directly: the
/// hello names it and the address connected to, and the server saw the
/// client's own address as peer (no agent in between).
#[track_caller]
pub fn assert_direct(server: &Server, dst_name: &str, result: &ClientResult) {
    let target = result
        .connect_addr()
        .expect("client reports where it connected");
    assert_eq!(
        result.hello.as_deref(),
        Some(format!("{dst_name} {target}").as_str()),
        "{result:?}"
    );
    assert!(result.echo_ok, "{result:?}");
    let local = result
        .local_addr()
        .expect("client reports its local address");
    assert!(
        server.accepted_from(local).is_some(),
        "server {dst_name} did not see the client's own address {local} as peer (redirected?): accepted {:?}",
        server.accepted()
    );
}

/// Connects from `src` to `dst` (a mesh destination) while no agent listens on its node and
/// asserts the kernel still captured it: refused at once (ECONNREFUSED from the agent's
/// address, under 100 ms), nothing reached the destination. Returns the result.
#[track_caller]
pub fn expect_refused(src: &Pod, dst: SocketAddr, payload: &str) -> ClientResult {
    let run = src.client(
        &mesh_tests::ClientRequest::new(dst)
            .send(payload)
            .io_timeout(std::time::Duration::from_secs(2)),
    );
    let r = run
        .results
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{} → {dst}: no result: {:?}", src.name(), run.output));
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("Connection refused"),
        "{} → {dst}: with no agent a captured connect must be refused, got {r:?}",
        src.name()
    );
    let us = r.connect_us.expect("client reports connect time");
    assert!(us < 100_000, "{} → {dst}: refusal took {us} µs", src.name());
    assert!(r.hello.is_none(), "reached the destination: {r:?}");
    r
}

/// Asserts that no agent logged a flow from `result`'s client socket.
#[track_caller]
pub fn assert_no_flow(agents: &[Agent], result: &ClientResult) {
    let local = result
        .local_addr()
        .expect("client reports its local address");
    for a in agents {
        if let Some(f) = a.flow_from(local) {
            panic!(
                "agent {} carried a connection it should not have: {:?}",
                a.spec().node,
                f.raw
            );
        }
    }
}

/// Serials of every `workload certificate issued` line of `agent` for `identity`, in order.
pub fn issued_serials(agent: &Agent, identity: &str) -> Vec<String> {
    agent
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "workload certificate issued" && l["identity"] == identity)
        .filter_map(|l| l["serial"].as_str().map(str::to_owned))
        .collect()
}

/// Asserts (bounded) that no program or link of ours is attached to `node`'s pod cgroup any
/// more, `after` naming what should have detached them.
#[track_caller]
pub fn assert_detached(node: &mesh_tests::Node, timeout: std::time::Duration, after: &str) {
    mesh_tests::assert_eventually!(
        timeout = timeout,
        node.attached_progs().is_empty(),
        "programs still attached after {after}: {:?}",
        node.attached_progs()
    );
    mesh_tests::assert_eventually!(
        timeout = timeout,
        node.attached_links().is_empty(),
        "links left after {after}: {:?}",
        node.attached_links()
    );
}
