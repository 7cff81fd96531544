//! Harness for the mesh's privileged integration scenarios: a real cluster in
//! miniature, built per test out of network namespaces, veth links, a bridge
//! and cgroups, with one `mesh-agent` per node.
//!
//! Every guard tears down what it created when dropped, also while a panic
//! unwinds: processes (SIGTERM, then SIGKILL, by pid, only those spawned
//! here), namespaces, links, cgroups, bpffs pins and temporary directories.
//! Names are unique per test (`mt<pid>x<counter>`), so tests run side by side.
//!
//! ```no_run
//! use mesh_tests::{require_privileges, Cluster, Host, ClientRequest};
//! require_privileges();
//! let cluster = Cluster::builder().nodes(2).add_pod(0, "a1").add_pod(1, "b1").build();
//! let _agents = cluster.start_agents();
//! let _server = cluster.pod("b1").serve(&[8080]);
//! let run = cluster.pod("a1").client(&ClientRequest::new(cluster.pod("b1").addr4(8080)));
//! run.expect_ok();
//! ```
//!
//! This library is used by the scenarios in `tests/tests/` and by the demo and
//! benchmark binaries; nothing in it is test-only.

pub mod agent;
pub mod authority;
pub mod bpftool;
pub mod capture;
pub mod cgroup;
pub mod cluster;
pub mod hbone;
pub mod httpload;
pub mod net;
pub mod netns;
pub mod poll;
pub mod process;
pub mod registry;
pub mod signing;
pub mod stop;
pub mod sys;
pub mod testpod;
pub mod tmp;

pub use agent::{agent_bin, Agent, AgentExit, AgentSpec, FlowRecord};
pub use authority::Authority;
pub use cgroup::Cgroup;
pub use cluster::{Cluster, ClusterBuilder, Host, Node, Place, Pod, PolicyApply};
pub use netns::{Netns, Veth};
pub use poll::{eventually, wait_for, DEFAULT_TIMEOUT, POLL_INTERVAL};
pub use process::{Output, Proc};
pub use registry::{NodeEntry, RenderedRegistry, ServiceEntry, WorkloadEntry};
pub use sys::{
    bpffs_mount, cgroup2_mount, nofile_limit, raise_nofile, require_privileges, rss_kib, unique_id,
};
pub use testpod::{
    Accepted, ClientProc, ClientRequest, ClientResult, ClientRun, HeldConnection, HeldMany,
    HoldSummary, HttpResponse, HttpRun, Server,
};
pub use tmp::TempDir;
