//! Wiring and lifecycle of the node agent: validate everything first, then
//! bind, attach, fill the maps, serve; on SIGTERM/SIGINT drain, detach and
//! unpin. A failure before "ready" undoes whatever was already done, so the
//! agent never runs half-configured.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use mesh_common::{
    AgentConfig, CgroupKey, DestValue, IpKey, WorkloadValue, CONFIG_F_IPV6, CONFIG_F_READY,
    DEST_F_LOCAL, WORKLOAD_F_CAPTURE,
};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tracing::info;

use crate::{
    bpf::{BpfError, Dataplane},
    cgroup::{self, CgroupError},
    proxy::{
        ip_words,
        outbound::{Outbound, OutboundConfig},
    },
    registry::{Registry, RegistryError},
};

/// Everything `mesh-agent run` needs, parsed and validated by the CLI.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// This node's name, as in the registry's `node:` fields.
    pub node: String,
    /// The workload registry file.
    pub registry: PathBuf,
    /// The node's pod cgroup parent, relative to the cgroup2 mount.
    pub pod_cgroup: PathBuf,
    /// Outbound listener (IPv4); its address is what pods' connects are rewritten to.
    pub outbound: SocketAddr,
    /// Optional IPv6 outbound listener (must use the same port).
    pub outbound6: Option<SocketAddr>,
    /// bpffs directory for the pins.
    pub pin_dir: PathBuf,
    /// Grace period for in-flight connections on shutdown.
    pub drain_timeout: Duration,
}

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("--outbound {addr}: must be an IPv4 address with a non-zero port")]
    OutboundV4 { addr: SocketAddr },
    #[error("--outbound6 {addr}: must be an IPv6 address with the same port as --outbound")]
    OutboundV6 { addr: SocketAddr },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

impl AppError {
    /// Configuration errors (exit code 2) versus runtime failures (1).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Registry(_) | Self::Cgroup(_) | Self::OutboundV4 { .. } | Self::OutboundV6 { .. }
        )
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> Result<(), AppError> {
    let outbound4 = match opts.outbound {
        SocketAddr::V4(a) if a.port() != 0 && !a.ip().is_unspecified() => a,
        addr => return Err(AppError::OutboundV4 { addr }),
    };
    let outbound6 = match opts.outbound6 {
        None => None,
        Some(SocketAddr::V6(a)) if a.port() == outbound4.port() && !a.ip().is_unspecified() => {
            Some(a)
        }
        Some(addr) => return Err(AppError::OutboundV6 { addr }),
    };

    // 1. Validate every input before touching the kernel.
    let cgroup_root = cgroup::cgroup2_mount()?;
    let pod_cgroup = cgroup::resolve(&cgroup_root, &opts.pod_cgroup)?;
    let registry = Arc::new(Registry::load(&opts.registry, &opts.node, &cgroup_root)?);
    info!(
        node = %opts.node,
        registry = %opts.registry.display(),
        workloads = registry.workloads.len(),
        local = registry.local(&opts.node).count(),
        pod_cgroup = %pod_cgroup.display(),
        pin_dir = %opts.pin_dir.display(),
        outbound = %outbound4,
        outbound6 = ?outbound6,
        "configuration"
    );
    let mut signals = Signals::new()?;

    // 2. Bind (a port conflict must fail before anything is attached).
    let mut listeners = vec![bind(SocketAddr::V4(outbound4))?];
    if let Some(a) = outbound6 {
        listeners.push(bind(SocketAddr::V6(a))?);
    }

    // 3. Attach and fill the maps; undo on any failure.
    let dataplane = Arc::new(Dataplane::load(&opts.pin_dir, &pod_cgroup)?);
    if let Err(e) = program_maps(&dataplane, &registry, &opts.node, outbound4, outbound6) {
        shutdown_dataplane(dataplane);
        return Err(e.into());
    }
    info!(
        node = %opts.node,
        outbound = %outbound4,
        outbound6 = ?outbound6,
        pin_dir = %opts.pin_dir.display(),
        "agent ready"
    );

    // 4. Serve until told to stop.
    let (stop_tx, stop_rx) = watch::channel(false);
    let outbound = Outbound::new(
        listeners,
        Arc::clone(&dataplane),
        Arc::clone(&registry),
        OutboundConfig {
            drain_timeout: opts.drain_timeout,
            ..OutboundConfig::default()
        },
    );
    let serving = tokio::spawn(outbound.run(stop_rx));
    let signal = signals.recv().await;
    info!(signal, "shutting down");
    let _ = stop_tx.send(true);
    let _ = serving.await;
    let counters = dataplane.counters();
    info!(?counters, "kernel counters at exit");
    shutdown_dataplane(dataplane);
    Ok(())
}

fn shutdown_dataplane(dataplane: Arc<Dataplane>) {
    match Arc::try_unwrap(dataplane) {
        Ok(dp) => dp.shutdown(),
        Err(_) => tracing::error!("dataplane still shared at shutdown; pins left in place"),
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|source| AppError::Bind { addr, source })?;
    sock.set_reuseaddr(true)
        .map_err(|source| AppError::Bind { addr, source })?;
    sock.bind(addr).map_err(|source| AppError::Bind { addr, source })?;
    sock.listen(4096).map_err(|source| AppError::Bind { addr, source })
}

/// Publishes the listener, then every destination, then enrols the local
/// workloads (enrolment last: nothing is captured before it can be carried).
fn program_maps(
    dp: &Dataplane,
    registry: &Registry,
    node: &str,
    outbound4: std::net::SocketAddrV4,
    outbound6: Option<std::net::SocketAddrV6>,
) -> Result<(), BpfError> {
    let mut cfg = AgentConfig {
        redirect_ip4_be: u32::from_ne_bytes(outbound4.ip().octets()),
        redirect_port_be: u32::from(outbound4.port().to_be()),
        redirect_ip6_be: [0; 4],
        flags: CONFIG_F_READY,
        _pad: 0,
    };
    if let Some(a6) = outbound6 {
        cfg.redirect_ip6_be = ip_words((*a6.ip()).into());
        cfg.flags |= CONFIG_F_IPV6;
    }
    dp.set_config(cfg)?;

    let dests: Vec<(IpKey, DestValue)> = registry
        .workloads
        .iter()
        .flat_map(|w| {
            let flags = if w.node == node { DEST_F_LOCAL } else { 0 };
            w.ips.iter().map(move |ip| {
                (
                    IpKey { addr_be: ip_words(*ip) },
                    DestValue { workload_id: w.id, flags },
                )
            })
        })
        .collect();
    dp.sync_dests(&dests)?;

    let workloads: Vec<(CgroupKey, WorkloadValue)> = registry
        .local(node)
        .filter_map(|w| {
            w.cgroup_id.map(|id| {
                (
                    CgroupKey { cgroup_id: id },
                    WorkloadValue { workload_id: w.id, flags: WORKLOAD_F_CAPTURE },
                )
            })
        })
        .collect();
    dp.sync_workloads(&workloads)?;
    info!(destinations = dests.len(), enrolled = workloads.len(), "maps programmed");
    Ok(())
}

/// SIGTERM and SIGINT, installed before anything is attached so a signal
/// during start-up still leads to a clean exit.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, AppError> {
        let term =
            tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signals)?;
        let int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
        Ok(Self { term, int })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
