//! The agent's configuration: every flag and environment variable of `mesh-agent run`, parsed
//! once (clap, `--flag` or `MESH_*`), validated, and logged once at start. Every tunable the
//! agent uses is here with its default; `mesh-agent run --help` is the reference.
// The field docs are clap's help text: `[default: <x>]` there is for the terminal, not rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// `mesh-agent run`: everything the node agent needs.
#[derive(Args, Clone, Debug)]
pub struct Config {
    /// This node's name (matches `node:` in the registry).
    #[arg(long, env = "MESH_NODE")]
    pub node: String,
    /// Standalone: read the mesh state (nodes, workloads, services) from this registry file
    /// and follow its changes, instead of from the authority's state stream (the default).
    #[arg(long, env = "MESH_REGISTRY")]
    pub registry: Option<PathBuf>,
    /// The node's pod cgroup parent, relative to the cgroup2 mount (found in
    /// /proc/self/mountinfo). The programs attach here.
    #[arg(long, env = "MESH_POD_CGROUP")]
    pub pod_cgroup: PathBuf,
    /// Outbound listener, IPv4 `ip:port`; the IP must be reachable from pods.
    #[arg(long, env = "MESH_OUTBOUND")]
    pub outbound: SocketAddr,
    /// IPv6 outbound listener `[ip]:port` (same port). Without it, IPv6
    /// connects of enrolled workloads to mesh destinations are refused.
    #[arg(long, env = "MESH_OUTBOUND6")]
    pub outbound6: Option<SocketAddr>,
    /// bpffs directory where the maps are pinned.
    #[arg(long, env = "MESH_PIN_DIR", default_value = mesh_common::names::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Seconds in-flight connections may drain on SIGTERM.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT_SECS", default_value_t = 5)]
    pub drain_timeout_secs: u64,
    /// Directory with this node's credentials: node.pem, node.key.pem, bundle.pem
    /// (written by `mesh-agent authority join`).
    #[arg(long, env = "MESH_IDENTITY_DIR")]
    pub identity_dir: PathBuf,
    /// The authority's service address `ip:port`.
    #[arg(long, env = "MESH_AUTHORITY")]
    pub authority: SocketAddr,
    /// Inbound HBONE listener `ip:port` [default: <outbound ip>:15008].
    #[arg(long, env = "MESH_HBONE")]
    pub hbone: Option<SocketAddr>,
    /// Admin listener: Prometheus `/metrics` and `/healthz`.
    #[arg(long, env = "MESH_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Networks (CIDR, comma-separated or repeated) allowed to connect to the admin port,
    /// besides the node's own addresses (processes on the host). Pods are refused unless listed:
    /// add the Prometheus scrapers' addresses here.
    #[arg(long, env = "MESH_ADMIN_ALLOW", value_delimiter = ',', default_value = "127.0.0.0/8,::1/128", value_parser = parse_net)]
    pub admin_allow: Vec<crate::policy::model::IpNet>,
    /// Requested lifetime of workload certificates, in seconds (at least 60); they are
    /// rotated at half-life.
    #[arg(long, env = "MESH_CERT_LIFETIME_SECS", default_value_t = 86_400)]
    pub cert_lifetime_secs: u64,
    /// Policy directory (Istio AuthorizationPolicy/PeerAuthentication YAML): applied at start
    /// and on every change (polled every --policy-poll-ms); a bad change is refused and logged.
    #[arg(long, env = "MESH_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// The configuration signers pinned on this node (`mesh-agent config signers … --file`):
    /// when the file exists, only configuration bundles signed by one of its active signers
    /// are applied (and never one below the highest version applied). Default
    /// `<identity-dir>/signers.json`.
    #[arg(long, env = "MESH_SIGNERS")]
    pub signers: Option<PathBuf>,
    /// The mesh-wide policy namespace: its policies apply to every workload.
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = crate::operator::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// A trust domain treated as this mesh's own in policy principals (Istio's
    /// `trustDomainAliases`, e.g. the old trust domain during a migration); repeatable.
    #[arg(
        long = "trust-domain-alias",
        env = "MESH_TRUST_DOMAIN_ALIASES",
        value_delimiter = ','
    )]
    pub trust_domain_aliases: Vec<String>,
    /// Unix socket for upgrades: a starting agent takes the listening sockets of the agent
    /// running here over it (no connection attempt is refused while they change places); the
    /// running agent then drains and exits. Root only.
    /// [default: /run/mesh-agent/<node>/handoff.sock]
    #[arg(long, env = "MESH_HANDOFF_SOCKET")]
    pub handoff_socket: Option<PathBuf>,
    /// Where the agent persists its workload certificates, keys and trust state, so that it
    /// can start while the authority is unreachable. [default: <identity-dir>/state]
    #[arg(long, env = "MESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// After handing over to a successor and draining, exit (true) or stay idle until SIGTERM
    /// (false: a Kubernetes pod would otherwise restart the old container).
    #[arg(long, env = "MESH_EXIT_AFTER_HANDOFF", default_value_t = true, action = clap::ArgAction::Set)]
    pub exit_after_handoff: bool,
    /// How request paths on HTTP ports are normalized before L7 policy matching; the
    /// normalized path is also what the pod receives. Istio's modes; the default is the
    /// strictest (Istio defaults to BASE). See the README, "Path normalization".
    #[arg(long, env = "MESH_PATH_NORMALIZATION", value_enum, ignore_case = true,
          default_value_t = crate::proxy::l7::normalize::PathNormalization::default())]
    pub path_normalization: crate::proxy::l7::normalize::PathNormalization,
    #[command(flatten)]
    pub limits: crate::proxy::limits::LimitOptions,
    #[command(flatten)]
    pub tunables: Tunables,
    /// The audit log (directory default: `<state-dir>/audit`).
    #[command(flatten)]
    pub audit: crate::audit::AuditOptions,
}

/// Timeouts and intervals. Every value must be positive.
#[derive(Args, Clone, Debug)]
pub struct Tunables {
    /// Milliseconds allowed for the TLS handshake and the HTTP/2 preface/settings exchange of
    /// an inbound HBONE connection, each.
    #[arg(long, env = "MESH_INBOUND_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000, value_parser = positive)]
    pub inbound_handshake_timeout_ms: u64,
    /// Milliseconds allowed to connect to a pod on this node (inbound tunnels and same-node
    /// connections).
    #[arg(long, env = "MESH_POD_CONNECT_TIMEOUT_MS", default_value_t = 5_000, value_parser = positive)]
    pub pod_connect_timeout_ms: u64,
    /// Milliseconds allowed for the TCP connect to a peer agent's HBONE port.
    #[arg(long, env = "MESH_PEER_CONNECT_TIMEOUT_MS", default_value_t = 5_000, value_parser = positive)]
    pub peer_connect_timeout_ms: u64,
    /// Milliseconds allowed for the TLS and HTTP/2 handshakes with a peer agent.
    #[arg(long, env = "MESH_PEER_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000, value_parser = positive)]
    pub peer_handshake_timeout_ms: u64,
    /// Milliseconds allowed for a peer agent's answer to a CONNECT.
    #[arg(long, env = "MESH_PEER_STREAM_TIMEOUT_MS", default_value_t = 10_000, value_parser = positive)]
    pub peer_stream_timeout_ms: u64,
    /// Seconds a pooled HBONE connection may carry no tunnel before it is closed.
    #[arg(long, env = "MESH_POOL_IDLE_TIMEOUT_SECS", default_value_t = 90, value_parser = positive)]
    pub pool_idle_timeout_secs: u64,
    /// Seconds between sweeps of idle and revoked pooled HBONE connections.
    #[arg(long, env = "MESH_POOL_SWEEP_INTERVAL_SECS", default_value_t = 10, value_parser = positive)]
    pub pool_sweep_interval_secs: u64,
    /// Milliseconds between checks of the authority's trust bundle and revocation list (and of
    /// certificates due for rotation); at least 50.
    #[arg(long, env = "MESH_CERT_REFRESH_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(50..))]
    pub cert_refresh_ms: u64,
    /// Seconds the agent waits at start for its workload certificates (those not restored
    /// from --state-dir); past it, it starts anyway and obtains them later (until then those
    /// workloads cannot connect).
    #[arg(long, env = "MESH_CERT_STARTUP_TIMEOUT_SECS", default_value_t = 30, value_parser = positive)]
    pub cert_startup_timeout_secs: u64,
    /// Milliseconds between checks of --policy-dir for changes.
    #[arg(long, env = "MESH_POLICY_POLL_MS", default_value_t = 500, value_parser = positive)]
    pub policy_poll_ms: u64,
    /// Milliseconds between checks of the active policy generation in the pinned maps (a
    /// generation applied by `mesh-agent policy apply` or another agent).
    #[arg(long, env = "MESH_GENERATION_POLL_MS", default_value_t = 200, value_parser = positive)]
    pub generation_poll_ms: u64,
    /// Milliseconds between read-backs of the maps the state programs (`mesh_workloads`,
    /// `mesh_dests`, `mesh_peers`): an entry changed, added or removed by anyone but the agent
    /// is an unauthorized load, counted and reverted.
    #[arg(long, env = "MESH_MAPS_CHECK_MS", default_value_t = 1_000, value_parser = positive)]
    pub maps_check_ms: u64,
    /// Milliseconds between checks for the cgroups of this node's workloads that do not exist
    /// yet, and between checks of `--registry` for changes.
    #[arg(long, env = "MESH_STATE_POLL_MS", default_value_t = 100, value_parser = positive)]
    pub state_poll_ms: u64,
    /// Milliseconds a starting agent waits for the authority's state before it starts from the
    /// state it persisted (or, with none, from an empty state that it fills when the authority
    /// answers).
    #[arg(long, env = "MESH_STATE_STARTUP_TIMEOUT_MS", default_value_t = 5_000, value_parser = positive)]
    pub state_startup_timeout_ms: u64,
    /// Seconds a successor agent (an upgrade) may take from receiving the listening sockets to
    /// being ready (it may be waiting for certificates); past it this agent keeps serving.
    #[arg(long, env = "MESH_HANDOFF_READY_TIMEOUT_SECS", default_value_t = 300, value_parser = positive)]
    pub handoff_ready_timeout_secs: u64,
}

fn positive(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_net(s: &str) -> Result<crate::policy::model::IpNet, String> {
    crate::policy::parse::parse_cidr(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

/// A configuration refused before anything is touched.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--outbound {addr}: must be an IPv4 address with a non-zero port")]
    OutboundV4 { addr: SocketAddr },
    #[error("--outbound6 {addr}: must be an IPv6 address with the same port as --outbound")]
    OutboundV6 { addr: SocketAddr },
    #[error("--cert-lifetime-secs {secs}: must be at least 60")]
    CertLifetime { secs: u64 },
}

/// The outbound listeners, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboundAddrs {
    pub v4: SocketAddrV4,
    pub v6: Option<SocketAddrV6>,
}

impl Config {
    /// Checks what clap cannot check field by field; returns the outbound listeners.
    pub fn validate(&self) -> Result<OutboundAddrs, ConfigError> {
        let v4 = match self.outbound {
            SocketAddr::V4(a) if a.port() != 0 && !a.ip().is_unspecified() => a,
            addr => return Err(ConfigError::OutboundV4 { addr }),
        };
        let v6 = match self.outbound6 {
            None => None,
            Some(SocketAddr::V6(a)) if a.port() == v4.port() && !a.ip().is_unspecified() => Some(a),
            Some(addr) => return Err(ConfigError::OutboundV6 { addr }),
        };
        if self.cert_lifetime_secs < 60 {
            return Err(ConfigError::CertLifetime {
                secs: self.cert_lifetime_secs,
            });
        }
        Ok(OutboundAddrs { v4, v6 })
    }

    /// Grace period for in-flight connections on shutdown.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// Requested workload certificate lifetime.
    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_secs)
    }

    /// The handoff socket: `--handoff-socket`, or `/run/mesh-agent/<node>/handoff.sock`.
    pub fn handoff_socket(&self) -> PathBuf {
        self.handoff_socket.clone().unwrap_or_else(|| {
            PathBuf::from("/run/mesh-agent")
                .join(&self.node)
                .join("handoff.sock")
        })
    }

    /// The persisted identity state: `--state-dir`, or `<identity-dir>/state`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.identity_dir.join("state"))
    }

    /// `--signers`, or `<identity-dir>/signers.json`.
    pub fn signers_file(&self) -> PathBuf {
        self.signers
            .clone()
            .unwrap_or_else(|| self.identity_dir.join("signers.json"))
    }
}

impl Tunables {
    pub fn inbound_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.inbound_handshake_timeout_ms)
    }
    pub fn pod_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.pod_connect_timeout_ms)
    }
    pub fn peer_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_connect_timeout_ms)
    }
    pub fn peer_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_handshake_timeout_ms)
    }
    pub fn peer_stream_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_stream_timeout_ms)
    }
    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.pool_idle_timeout_secs)
    }
    pub fn pool_sweep_interval(&self) -> Duration {
        Duration::from_secs(self.pool_sweep_interval_secs)
    }
    pub fn cert_refresh(&self) -> Duration {
        Duration::from_millis(self.cert_refresh_ms)
    }
    pub fn cert_startup_timeout(&self) -> Duration {
        Duration::from_secs(self.cert_startup_timeout_secs)
    }
    pub fn policy_poll(&self) -> Duration {
        Duration::from_millis(self.policy_poll_ms)
    }
    pub fn generation_poll(&self) -> Duration {
        Duration::from_millis(self.generation_poll_ms)
    }
    pub fn maps_check(&self) -> Duration {
        Duration::from_millis(self.maps_check_ms)
    }
    pub fn state_poll(&self) -> Duration {
        Duration::from_millis(self.state_poll_ms)
    }
    pub fn state_startup_timeout(&self) -> Duration {
        Duration::from_millis(self.state_startup_timeout_ms)
    }
    pub fn handoff_ready_timeout(&self) -> Duration {
        Duration::from_secs(self.handoff_ready_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    const REQUIRED: &[&str] = &[
        "mesh-agent",
        "--node=n1",
        "--registry=/r.yaml",
        "--pod-cgroup=pods",
        "--outbound=10.0.0.1:15001",
        "--identity-dir=/id",
        "--authority=10.0.0.9:15012",
    ];

    #[test]
    fn defaults_are_the_documented_values() {
        let c = Cli::try_parse_from(REQUIRED).unwrap().config;
        assert_eq!(c.drain_timeout(), Duration::from_secs(5));
        assert_eq!(
            c.handoff_socket(),
            PathBuf::from("/run/mesh-agent/n1/handoff.sock")
        );
        assert_eq!(c.state_dir(), PathBuf::from("/id/state"));
        assert_eq!(c.tunables.policy_poll(), Duration::from_millis(500));
        assert_eq!(c.tunables.generation_poll(), Duration::from_millis(200));
        assert_eq!(c.tunables.cert_refresh(), Duration::from_secs(1));
        assert_eq!(c.tunables.pool_idle_timeout(), Duration::from_secs(90));
    }

    #[test]
    fn validate_checks_the_listeners_and_the_lifetime() {
        let parse = |extra: &[&str]| {
            let mut args = REQUIRED.to_vec();
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).unwrap().config.validate()
        };
        let ok = parse(&["--outbound6=[fd00::1]:15001"]).unwrap();
        assert_eq!(ok.v4.port(), 15001);
        assert!(ok.v6.is_some());
        for (extra, want) in [
            ("--outbound6=[fd00::1]:15002", "same port"),
            ("--cert-lifetime-secs=59", "at least 60"),
        ] {
            let e = parse(&[extra]).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let mut args = REQUIRED.to_vec();
        args[4] = "--outbound=0.0.0.0:15001";
        let e = Cli::try_parse_from(args)
            .unwrap()
            .config
            .validate()
            .unwrap_err();
        assert!(matches!(e, ConfigError::OutboundV4 { .. }), "{e}");
    }

    #[test]
    fn zero_and_too_small_values_are_refused() {
        for bad in [
            "--policy-poll-ms=0",
            "--cert-refresh-ms=10",
            "--pool-idle-timeout-secs=x",
        ] {
            let mut args = REQUIRED.to_vec();
            args.push(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad} accepted");
        }
    }
}
