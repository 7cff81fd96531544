//! Wiring and lifecycle of the node agent: validate everything first, then bind, obtain the
//! workloads' certificates, attach, fill the maps, serve; on SIGTERM/SIGINT drain, detach and
//! unpin. A failure before "ready" undoes whatever was already done, so the agent never runs
//! half-configured, and nothing is captured before it can be carried over mTLS.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use mesh_common::{AgentConfig, CONFIG_F_IPV6, CONFIG_F_READY};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    audit::AuditLog,
    bpf::{events::spawn_event_log, BpfError, Dataplane},
    bundle::SignerSet,
    cgroup::{self, CgroupError},
    config::{Config, ConfigError, OutboundAddrs},
    handoff::{self, HandoffError, Role, Takeover},
    identity::{
        manager::{IdentityManager, ManagerConfig},
        IdentityError, NodeCredentials,
    },
    metrics::{self, Metrics, ScrapeHook},
    policy::{
        engine::PolicyView,
        maps::{MapsError, PolicyMaps},
        source::{
            apply_source_counted, spawn_dir_watcher, spawn_generation_watcher, CompileContext,
            DirWatch, PolicySource,
        },
    },
    proxy::{
        hbone::HBONE_PORT,
        inbound::{Inbound, InboundConfig},
        ip_words,
        outbound::{Outbound, OutboundConfig},
        pool::PoolConfig,
        Identities, ProxyDeps, SourceAddrs,
    },
    registry::{Registry, RegistryError},
    state::{
        follow::{spawn_applier, spawn_fetcher, spawn_file_source},
        live::{enrolled, Applier, MeshState, NodeContext, Programmer, WorkloadIdentities},
        signed::Guard,
        Snapshot,
    },
    tls::{SpiffeId, TrustStore},
};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("node credentials in {dir}: {source}")]
    Credentials {
        dir: PathBuf,
        #[source]
        source: Box<IdentityError>,
    },
    #[error("node credentials in {dir} are for node {found:?}, not --node {node:?}")]
    CredentialsNode {
        dir: PathBuf,
        found: String,
        node: String,
    },
    #[error("obtaining workload certificates: {0}")]
    Identity(#[source] Box<IdentityError>),
    #[error("policy maps: {0}")]
    PolicyMaps(#[from] MapsError),
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Limits(#[from] crate::proxy::limits::LimitsError),
    #[error("mesh state source: {0}")]
    StateSource(#[source] Box<crate::state::publish::RefreshError>),
    #[error("configuration signers {}: {detail}", path.display())]
    Signers { path: PathBuf, detail: String },
}

impl AppError {
    /// Configuration errors (exit code 2) versus runtime failures (1).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Registry(_)
                | Self::StateSource(_)
                | Self::Signers { .. }
                | Self::Cgroup(_)
                | Self::Config(_)
                | Self::Credentials { .. }
                | Self::CredentialsNode { .. }
                | Self::Limits(_)
        )
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: Config) -> Result<(), AppError> {
    let OutboundAddrs {
        v4: outbound4,
        v6: outbound6,
    } = opts.validate()?;

    // 1. Validate every input before touching the kernel.
    let cgroup_root = cgroup::cgroup2_mount()?;
    let pod_cgroup = cgroup::resolve(&cgroup_root, &opts.pod_cgroup)?;
    let creds =
        NodeCredentials::load(&opts.identity_dir).map_err(|source| AppError::Credentials {
            dir: opts.identity_dir.clone(),
            source: Box::new(source),
        })?;
    if creds.node.node() != opts.node {
        return Err(AppError::CredentialsNode {
            dir: opts.identity_dir.clone(),
            found: creds.node.node().to_owned(),
            node: opts.node.clone(),
        });
    }
    let trust_domain = creds.node.trust_domain().clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    // Signed configuration: with signers pinned, only verified bundles are applied.
    let guard = open_guard(&opts)?;
    // The mesh state: the authority's stream (or `--registry`), else what was persisted.
    let mut initial = initial_state(&opts, &creds, stop_rx.clone()).await?;
    let mut verified = None;
    if let Some(g) = &guard {
        // The authority's state, else the persisted one: the first that verifies.
        let persisted = || Snapshot::load(&opts.state_dir()).ok().flatten();
        let candidates = [initial.snapshot.take(), None];
        for (i, candidate) in candidates.into_iter().enumerate() {
            let (snapshot, from) = match (i, candidate) {
                (0, Some(s)) => (s, initial.source),
                (1, _) if initial.source != "persisted" => match persisted() {
                    Some(s) => (s, "persisted"),
                    None => continue,
                },
                _ => continue,
            };
            let parsed = Applier::parse(&snapshot, &opts.node, &cgroup_root).ok();
            match g.check(
                &snapshot,
                parsed.as_ref().map(|p| &p.0),
                &opts.node,
                &cgroup_root,
            ) {
                Ok(v) => {
                    verified = Some(v);
                    initial.snapshot = Some(snapshot);
                    initial.source = from;
                    break;
                }
                Err(e) => {
                    metrics.config_rejected(e.reason());
                    warn!(reason = e.reason(), error = %e, source = from,
                          "starting configuration refused");
                }
            }
        }
        if verified.is_none() {
            initial.snapshot = None;
        }
    }
    let (registry, state_version, state_digest) = match &initial.snapshot {
        Some(snapshot) => match Applier::parse(snapshot, &opts.node, &cgroup_root) {
            Ok((registry, refused)) => {
                for e in &refused {
                    warn!(version = snapshot.version, error = %e, "state entry refused; the rest is applied");
                }
                (Some(registry), snapshot.version, snapshot.digest.clone())
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "starting state unusable");
                (None, 0, String::new())
            }
        },
        None => (None, 0, String::new()),
    };
    // Nothing (verified) to apply: the safe baseline until a configuration arrives.
    let configured = registry.is_some();
    if !configured {
        warn!("no verified configuration: safe baseline (the pod tree neither sends nor receives) until one is applied");
    }
    let registry = registry.unwrap_or_else(Registry::empty);
    if registry.node(&opts.node).is_none() {
        warn!(node = %opts.node, "this node is not (yet) in the mesh state's nodes: nothing is enrolled until it is");
    }
    let local_ids: BTreeSet<SpiffeId> = registry
        .local(&opts.node)
        .filter_map(|w| w.identity(&trust_domain).ok())
        .collect();
    let hbone_addr = opts
        .hbone
        .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(*outbound4.ip()), HBONE_PORT));
    let source = SourceAddrs {
        v4: Some(IpAddr::V4(*outbound4.ip())),
        v6: outbound6.map(|a| IpAddr::V6(*a.ip())),
    };
    info!(
        node = %opts.node,
        registry = ?opts.registry,
        state_version,
        state_source = initial.source,
        workloads = registry.workloads.len(),
        local = registry.local(&opts.node).count(),
        identities = local_ids.len(),
        trust_domain = %trust_domain,
        pod_cgroup = %pod_cgroup.display(),
        pin_dir = %opts.pin_dir.display(),
        outbound = %outbound4,
        outbound6 = ?outbound6,
        hbone = %hbone_addr,
        admin = %opts.admin,
        authority = %opts.authority,
        cert_lifetime_secs = opts.cert_lifetime_secs,
        drain_timeout_secs = opts.drain_timeout_secs,
        policy_dir = ?opts.policy_dir,
        root_namespace = %opts.root_namespace,
        trust_domain_aliases = ?opts.trust_domain_aliases,
        handoff_socket = %opts.handoff_socket().display(),
        state_dir = %opts.state_dir().display(),
        path_normalization = %opts.path_normalization,
        exit_after_handoff = opts.exit_after_handoff,
        admin_allow = ?opts.admin_allow,
        limits = ?opts.limits,
        tunables = ?opts.tunables,
        "configuration"
    );
    let mut signals = Signals::new()?;
    // Every checkpoint also goes to the authority (sent once the identity manager is up).
    let (checkpoint_sink, checkpoint_queue) =
        crate::audit::forward::channel(crate::audit::forward::QUEUE);
    let audit = if opts.audit.audit_off {
        warn!("audit log disabled (--audit-off): no decision is recorded");
        None
    } else {
        Some(AuditLog::start(crate::audit::AuditConfig {
            forward: Some(checkpoint_sink),
            ..opts.audit.config(&opts.node, &opts.state_dir())
        })?)
    };
    // Raise RLIMIT_NOFILE and size the connection budget from it, before binding.
    let conn_limits = crate::proxy::limits::init(&opts.limits)?;

    // 2. Listening sockets: taken over from a running agent (an upgrade or restart: the
    //    connection queues never close), else bound (a port conflict must fail before
    //    anything is attached).
    let mut takeover = {
        let path = opts.handoff_socket();
        tokio::task::spawn_blocking(move || Takeover::request(&path))
            .await
            .map_err(|e| HandoffError::Protocol {
                path: opts.handoff_socket(),
                detail: e.to_string(),
            })??
    };
    let mut sockets = Vec::new();
    let mut listen = |role: Role, addr: SocketAddr| -> Result<TcpListener, AppError> {
        let listener = match takeover.as_mut().and_then(|t| t.take(role, addr)) {
            Some(l) => l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map_err(|source| AppError::Bind { addr, source })?,
            None => bind(addr)?,
        };
        let dup = handoff::dup(&listener).map_err(|source| AppError::Bind { addr, source })?;
        sockets.push((role, addr, dup));
        Ok(listener)
    };
    let mut listeners = vec![listen(Role::Outbound4, SocketAddr::V4(outbound4))?];
    if let Some(a) = outbound6 {
        listeners.push(listen(Role::Outbound6, SocketAddr::V6(a))?);
    }
    let hbone_listener = listen(Role::Hbone, hbone_addr)?;
    let admin_listener = listen(Role::Admin, opts.admin)?;

    // 3. Certificates for every local workload before anything is captured.
    let manager = IdentityManager::start(
        ManagerConfig {
            authority: opts.authority,
            creds: creds.clone(),
            workloads: local_ids.into_iter().collect(),
            lifetime: opts.cert_lifetime(),
            refresh: opts.tunables.cert_refresh(),
            startup_timeout: opts.tunables.cert_startup_timeout(),
            state_dir: Some(opts.state_dir()),
            audit: audit.clone(),
        },
        stop_rx.clone(),
    )
    .await
    .map_err(|e| AppError::Identity(Box::new(e)))?;
    let identities: Arc<dyn Identities> = Arc::new(ManagerIdentities(Arc::clone(&manager)));
    let checkpoint_stats = checkpoint_queue.stats();
    let checkpoint_forwarder = tokio::spawn(
        checkpoint_queue.run(
            crate::identity::AuthorityClient::new(
                &opts.authority.to_string(),
                &creds.chain_pem,
                &creds.key_pem,
                manager.trust(),
            )
            .map_err(|e| AppError::Identity(Box::new(e)))?,
        ),
    );

    // 4. Attach and fill the maps; undo on any failure.
    // Policy is applied before any workload is enrolled: nothing is captured unchecked.
    let dataplane = Arc::new(Dataplane::load(&opts.pin_dir, &pod_cgroup)?);
    let registry = Arc::new(registry);
    let policy_ctx = CompileContext {
        registry: Arc::clone(&registry),
        root_ns: opts.root_namespace.clone(),
        trust_domain: trust_domain.to_string(),
        trust_domain_aliases: opts.trust_domain_aliases.clone(),
    };
    let programmer = Arc::new(Programmer::new(Arc::clone(&dataplane), opts.node.clone()));
    let signed_policies = guard
        .as_ref()
        .map(|_| verified.as_ref().map(|v| Arc::clone(&v.policies)));
    if guard.is_some() && opts.policy_dir.is_some() {
        warn!(
            "--policy-dir is ignored: with pinned signers, policy comes only from verified bundles"
        );
    }
    let started = match start_policy(
        &opts,
        &policy_ctx,
        signed_policies,
        &metrics,
        audit.as_ref(),
    ) {
        Ok((maps, view)) => {
            let (policies_tx, policies_rx) = watch::channel(Arc::clone(&view));
            programmer.follow_policies(policies_rx);
            // Nothing verified: the maps stay as pinned (never emptied), and the kernel seals
            // the pod tree (the safe baseline) until the applier programs a configuration.
            set_redirect(&dataplane, outbound4, outbound6)
                .and_then(|_| {
                    if configured {
                        programmer.program(&registry)
                    } else {
                        dataplane.set_baseline(true).map(drop)
                    }
                })
                .and_then(|()| dataplane.take_event_reader())
                .map(|events| (events, maps, view, policies_tx))
                .map_err(AppError::from)
        }
        Err(e) => Err(AppError::from(e)),
    };
    let (events, policy_maps, initial_view, initial_policies) = match started {
        Ok(v) => v,
        Err(e) => {
            release_dataplane(dataplane);
            return Err(e);
        }
    };
    // The applier owns the state from here; the proxies read it through `mesh`.
    if let (Some(g), Some(v)) = (guard.as_ref(), verified.as_ref()) {
        metrics.config_verified(v.version);
        info!(version = v.version, digest = %v.digest, highest = g.highest().version,
              "starting configuration verified");
    }
    let signed_mode = guard.is_some();
    let mut guard = guard;
    if let (Some(g), Some(v)) = (guard.as_mut(), verified.as_ref()) {
        if let Err(e) = g.applied(v) {
            warn!(error = %e, "persisting the highest configuration version");
        }
    }
    let (applier, mesh) = Applier::new(
        NodeContext {
            node: opts.node.clone(),
            cgroup_root: cgroup_root.clone(),
            trust_domain: trust_domain.clone(),
            state_dir: Some(opts.state_dir()),
            guard,
        },
        MeshState::new(
            state_version,
            state_digest,
            (*registry).clone(),
            &trust_domain,
        )
        .with_policies(verified.as_ref().map(|v| Arc::clone(&v.policies))),
        Arc::clone(&programmer),
        Arc::new(ManagerWorkloads(Arc::clone(&manager))),
        Arc::clone(&metrics),
        audit.clone(),
    );
    if let Some(snapshot) = &initial.snapshot {
        if initial.source == "authority" {
            if let Err(e) = snapshot.persist(&opts.state_dir()) {
                warn!(error = %e, "persisting the starting state");
            }
        }
    }
    metrics.state_applied(state_version, None, registry.pending(&opts.node).count());
    metrics.add_hook(Arc::new(ScrapeSources {
        manager: Arc::clone(&manager),
        dataplane: Arc::clone(&dataplane),
    }));
    info!(
        node = %opts.node,
        outbound = %outbound4,
        outbound6 = ?outbound6,
        hbone = %hbone_addr,
        admin = %opts.admin,
        pin_dir = %opts.pin_dir.display(),
        "agent ready"
    );

    // 5. Serve until told to stop.
    // Policy: the active generation for the proxies; the directory, if any, watched.
    // One task follows the active generation, whoever wrote it (this agent's directory
    // watcher or `mesh-agent policy apply`): the proxies decide with it (a `PolicyView` is
    // their `Authorizer`), and PeerAuthentication (and the generation gauge) follow it.
    let follow = generation_follower(
        Arc::clone(&programmer),
        Arc::clone(&metrics),
        &registry,
        &opts.node,
        &initial_view,
    );
    let (policies, generation_watcher) = spawn_generation_watcher(
        policy_maps.watcher,
        initial_view,
        audit.clone(),
        opts.tunables.generation_poll(),
        follow,
        stop_rx.clone(),
    );
    programmer.follow_policies(policies.clone());
    drop(initial_policies);
    let dir_watcher = match policy_maps.writer {
        Some(writer) => Some(spawn_dir_watcher(
            DirWatch {
                dir: if signed_mode {
                    None
                } else {
                    opts.policy_dir.clone()
                },
                ctx: policy_ctx,
                mesh: mesh.clone(),
                maps: writer,
                metrics: Arc::clone(&metrics),
                audit: audit.clone(),
                interval: opts.tunables.policy_poll(),
                exclusive: signed_mode,
            },
            stop_rx.clone(),
        )),
        None => None,
    };
    // Kernel events: plaintext connections refused (STRICT) or flagged (PERMISSIVE), L4
    // policy denials.
    let event_metrics = Arc::clone(&metrics);
    if let Some(audit) = &audit {
        metrics.add_hook(Arc::new(audit.clone()));
    }
    metrics.add_hook(checkpoint_stats);
    let event_audit = (
        audit.clone(),
        mesh.clone(),
        policies.clone(),
        trust_domain.to_string(),
    );
    let event_log = spawn_event_log(
        events,
        mesh.clone(),
        policies.clone(),
        trust_domain.to_string(),
        move |event| {
            let (audit, mesh, views, td) = &event_audit;
            if let Some(audit) = audit {
                audit.kernel_event(event, &mesh.registry(), &views.borrow(), td);
            }
            match event.kind {
                mesh_common::EVENT_PLAINTEXT_REFUSED => {
                    event_metrics.plaintext(metrics::PlaintextVerdict::Refused)
                }
                mesh_common::EVENT_PLAINTEXT_PERMISSIVE => {
                    event_metrics.plaintext(metrics::PlaintextVerdict::Permissive)
                }
                mesh_common::EVENT_PLAINTEXT_DENIED => {
                    event_metrics.plaintext(metrics::PlaintextVerdict::Denied);
                    event_metrics
                        .policy_denial(metrics::PolicyLayer::L4, metrics::DenialSide::Kernel)
                }
                mesh_common::EVENT_L4_DENIED => event_metrics
                    .policy_denial(metrics::PolicyLayer::L4, metrics::DenialSide::Kernel),
                _ => {}
            }
        },
        stop_rx.clone(),
    );
    let deps = ProxyDeps {
        node: opts.node.clone(),
        mesh: mesh.clone(),
        identities,
        trust_domain: trust_domain.clone(),
        metrics: Arc::clone(&metrics),
        policies: policies.clone(),
        source,
        path_normalization: opts.path_normalization,
        admission: crate::proxy::limits::Admission::new(conn_limits, Arc::clone(&metrics)),
        audit: audit.clone(),
    };
    let outbound = Outbound::new(
        listeners,
        dataplane.clone(),
        deps.clone(),
        OutboundConfig {
            connect_timeout: opts.tunables.pod_connect_timeout(),
            drain_timeout: opts.drain_timeout(),
            sweep_interval: opts.tunables.pool_sweep_interval(),
            pool: PoolConfig {
                connect_timeout: opts.tunables.peer_connect_timeout(),
                handshake_timeout: opts.tunables.peer_handshake_timeout(),
                stream_timeout: opts.tunables.peer_stream_timeout(),
                idle_timeout: opts.tunables.pool_idle_timeout(),
                ..PoolConfig::default()
            },
        },
    );
    let inbound = Inbound::new(
        hbone_listener,
        deps,
        InboundConfig {
            handshake_timeout: opts.tunables.inbound_handshake_timeout(),
            connect_timeout: opts.tunables.pod_connect_timeout(),
            drain_timeout: opts.drain_timeout(),
        },
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(outbound.run(stop_rx.clone()));
    tasks.spawn(inbound.run(stop_rx.clone()));
    tasks.spawn(metrics::serve_admin(
        admin_listener,
        Arc::clone(&metrics),
        metrics::AdminAllow {
            nets: opts.admin_allow.clone(),
            // The node's own addresses: its outbound listeners' (known without any state) and,
            // as the state at start lists them, its node addresses.
            node_addrs: std::iter::once(IpAddr::V4(*outbound4.ip()))
                .chain(outbound6.map(|a| IpAddr::V6(*a.ip())))
                .chain(
                    registry
                        .node(&opts.node)
                        .into_iter()
                        .flat_map(|n| n.addresses()),
                )
                .collect(),
        },
        stop_rx.clone(),
    ));
    // The mesh state follows the authority (or `--registry`) from here.
    let (slot, fetcher) = match initial.file {
        Some((slot, watcher)) => (slot, watcher),
        None => {
            let client = crate::identity::AuthorityClient::new(
                &opts.authority.to_string(),
                &creds.chain_pem,
                &creds.key_pem,
                manager.trust(),
            )
            .map_err(|e| AppError::Identity(Box::new(e)))?;
            let after = (state_version != 0).then_some(state_version);
            spawn_fetcher(client, after, mesh.clone(), stop_rx.clone())
        }
    };
    let state_applier = spawn_applier(applier, slot, opts.tunables.state_poll(), stop_rx.clone());
    let map_watch = crate::state::live::spawn_map_watch(
        Arc::clone(&programmer),
        Arc::clone(&metrics),
        audit.clone(),
        opts.tunables.maps_check(),
        stop_rx.clone(),
    );
    // Serving: the previous agent, if any, may stop accepting now; then this one answers the
    // next successor.
    if let Some(t) = takeover {
        match tokio::task::spawn_blocking(move || t.complete()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "completing the handoff; the previous agent serves on beside this one")
            }
            Err(e) => warn!(error = %e, "completing the handoff"),
        }
    }
    let (handed_tx, mut handed_rx) = watch::channel(false);
    if let Err(e) = handoff::serve(
        opts.handoff_socket(),
        sockets,
        opts.tunables.handoff_ready_timeout(),
        handed_tx,
        stop_rx.clone(),
    ) {
        warn!(error = %e, "handoff socket unavailable: upgrades of this agent will bind afresh");
    }
    let reason = tokio::select! {
        signal = signals.recv() => signal,
        _ = handed_rx.wait_for(|h| *h) => "handed over to a successor",
    };
    let handed_over = *handed_rx.borrow();
    info!(reason, "shutting down: draining; the kernel side stays");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = event_log.await;
    if let Some(audit) = &audit {
        audit.shutdown(reason).await;
    }
    // The final checkpoint to the authority, if it answers soon.
    if tokio::time::timeout(std::time::Duration::from_secs(2), checkpoint_forwarder)
        .await
        .is_err()
    {
        warn!("the final audit checkpoint could not be sent to the authority");
    }
    let _ = generation_watcher.await;
    let _ = state_applier.await;
    let _ = map_watch.await;
    let _ = fetcher.await;
    if let Some(w) = dir_watcher {
        let _ = w.await;
    }
    drop(policies);
    // The scrape hook holds the dataplane: release it so the pins can go.
    drop(metrics);
    drop(manager);
    let counters = dataplane.named_counters();
    info!(?counters, "kernel counters at exit");
    if handed_over && !opts.exit_after_handoff {
        info!("drained after the handoff; idle until SIGTERM");
        let signal = signals.recv().await;
        info!(signal, "exiting");
    }
    release_dataplane(dataplane);
    Ok(())
}

/// The identity manager as the proxies see it.
struct ManagerIdentities(Arc<IdentityManager>);

impl Identities for ManagerIdentities {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.0.server_config()
    }

    fn client_config(
        &self,
        src: &SpiffeId,
        dst: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        self.0.client_config(src, dst)
    }

    fn trust(&self) -> Arc<TrustStore> {
        self.0.trust()
    }

    fn revocations(&self) -> watch::Receiver<u64> {
        self.0.revocation_generation()
    }
}

/// Values read at scrape time: certificate lifetimes and rotations, kernel counters.
struct ScrapeSources {
    manager: Arc<IdentityManager>,
    dataplane: Arc<Dataplane>,
}

impl ScrapeHook for ScrapeSources {
    fn refresh(&self, metrics: &Metrics) {
        let expiries: Vec<(String, std::time::Duration)> = self
            .manager
            .expiries()
            .into_iter()
            .map(|(id, remaining)| (id.to_string(), remaining))
            .collect();
        metrics.set_cert_expiries(&expiries);
        let (ok, error) = self.manager.rotations();
        metrics.set_cert_rotations(ok, error);
        for (name, value) in mesh_common::counters::NAMES
            .iter()
            .zip(self.dataplane.counters())
        {
            metrics.set_kernel_counter(name, value);
        }
        // What the kernel enforces, read back from the pinned slot.
        metrics.set_config_state(self.dataplane.baseline());
    }
}

/// Lets go of the kernel side: the programs stay attached and the maps pinned (see
/// [`crate::bpf`]'s failure model), whether the agent stops cleanly or fails to start.
fn release_dataplane(dataplane: Arc<Dataplane>) {
    match Arc::try_unwrap(dataplane) {
        Ok(dp) => dp.release(),
        Err(_) => tracing::warn!("dataplane still shared at exit; the kernel keeps it anyway"),
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
    sock.bind(addr)
        .map_err(|source| AppError::Bind { addr, source })?;
    sock.listen(4096)
        .map_err(|source| AppError::Bind { addr, source })
}

/// Points the kernel's redirect at this agent's outbound listeners (and marks it ready).
/// Returns whether the safe baseline is on (kept from before, or fresh pins).
fn set_redirect(
    dp: &Dataplane,
    outbound4: std::net::SocketAddrV4,
    outbound6: Option<std::net::SocketAddrV6>,
) -> Result<bool, BpfError> {
    let mut cfg = AgentConfig {
        redirect_ip4_be: u32::from_ne_bytes(outbound4.ip().octets()),
        redirect_port_be: u32::from(outbound4.port().to_be()),
        redirect_ip6_be: [0; 4],
        flags: CONFIG_F_READY,
        policy_gen: 0,
    };
    if let Some(a6) = outbound6 {
        cfg.redirect_ip6_be = ip_words((*a6.ip()).into());
        cfg.flags |= CONFIG_F_IPV6;
    }
    dp.set_config(cfg)
}

/// The node's signed-configuration guard, when signers are pinned (`--signers`, default
/// `<identity-dir>/signers.json`): a file that exists but cannot be read refuses the start.
fn open_guard(opts: &Config) -> Result<Option<Guard>, AppError> {
    let path = opts.signers_file();
    if !path.exists() {
        return Ok(None);
    }
    let signers = SignerSet::load(&path).map_err(|e| AppError::Signers {
        path: path.clone(),
        detail: crate::error_chain(&e),
    })?;
    let guard = Guard::open(signers, &opts.state_dir())
        .map_err(|detail| AppError::Signers {
            path: path.clone(),
            detail,
        })?
        .following(path.clone());
    info!(signers = %path.display(), highest = guard.highest().version,
          "signed configuration required: signers pinned");
    Ok(Some(guard))
}

/// Where the agent's first state came from, and (standalone) the file it follows.
struct InitialState {
    snapshot: Option<Snapshot>,
    /// `authority`, `persisted`, `file` or `none`.
    source: &'static str,
    file: Option<(crate::state::follow::Slot, tokio::task::JoinHandle<()>)>,
}

/// The state to start from: `--registry` (standalone), else the authority's current state
/// (waiting up to `--state-startup-timeout-ms`), else the last state this node verified and
/// persisted, else none (the agent starts empty and fills in when the authority answers).
async fn initial_state(
    opts: &Config,
    creds: &NodeCredentials,
    stop: watch::Receiver<bool>,
) -> Result<InitialState, AppError> {
    if let Some(path) = &opts.registry {
        let (slot, watcher) = spawn_file_source(
            path.clone(),
            &opts.state_dir(),
            opts.tunables.state_poll(),
            stop,
        )
        .map_err(|e| AppError::StateSource(Box::new(e)))?;
        let snapshot = slot.borrow().as_deref().cloned();
        return Ok(InitialState {
            snapshot,
            source: "file",
            file: Some((slot, watcher)),
        });
    }
    let fetched = async {
        let trust =
            TrustStore::from_bundle_pem(creds.node.trust_domain().clone(), &creds.bundle_pem)?;
        let mut client = crate::identity::AuthorityClient::new(
            &opts.authority.to_string(),
            &creds.chain_pem,
            &creds.key_pem,
            trust,
        )?;
        client.set_timeout(opts.tunables.state_startup_timeout());
        client.state(None, std::time::Duration::ZERO).await
    };
    let timeout = opts.tunables.state_startup_timeout();
    match tokio::time::timeout(timeout, fetched).await {
        Ok(Ok(Some(snapshot))) => match snapshot.verify() {
            Ok(()) => {
                return Ok(InitialState {
                    snapshot: Some(snapshot),
                    source: "authority",
                    file: None,
                })
            }
            Err(e) => {
                warn!(error = %e, "the authority's state is refused; trying the persisted one")
            }
        },
        Ok(Ok(None)) => warn!("the authority has no state yet; trying the persisted one"),
        Ok(Err(e)) => {
            warn!(error = %crate::error_chain(&e), "the authority is unreachable; starting from the persisted state")
        }
        Err(_) => warn!(
            after_ms = timeout.as_millis() as u64,
            "the authority did not answer; starting from the persisted state"
        ),
    }
    match Snapshot::load(&opts.state_dir()) {
        Ok(Some(snapshot)) => {
            info!(version = snapshot.version, digest = %snapshot.short_digest(), "starting from the persisted state");
            Ok(InitialState {
                snapshot: Some(snapshot),
                source: "persisted",
                file: None,
            })
        }
        Ok(None) => {
            warn!("no persisted state: starting empty until the authority answers");
            Ok(InitialState {
                snapshot: None,
                source: "none",
                file: None,
            })
        }
        Err(e) => {
            warn!(error = %e, "the persisted state is refused: starting empty until the authority answers");
            Ok(InitialState {
                snapshot: None,
                source: "none",
                file: None,
            })
        }
    }
}

/// Handles on the pinned policy maps: one for the generation watcher, one (with a policy
/// directory) for the directory watcher.
struct StartedPolicy {
    watcher: PolicyMaps,
    writer: Option<PolicyMaps>,
}

/// Opens the policy maps, applies `--policy-dir` once (a refusal is logged and the pinned
/// generation, if any, stays), and reads the active generation back.
/// `signed`: with pinned signers, `Some(the verified bundle's policies, if any)`.
fn start_policy(
    opts: &Config,
    ctx: &CompileContext,
    signed: Option<Option<Arc<[crate::bundle::PolicyFile]>>>,
    metrics: &Metrics,
    audit: Option<&AuditLog>,
) -> Result<(StartedPolicy, Arc<PolicyView>), MapsError> {
    let watcher = PolicyMaps::open(&opts.pin_dir)?;
    let signed_mode = signed.is_some();
    let source = match (signed, &opts.policy_dir) {
        // Signed configuration: a verified bundle's policies, nothing else.
        (Some(policies), _) => policies.map(PolicySource::Bundle),
        (None, dir) => dir.clone().map(PolicySource::Dir),
    };
    let writer = if signed_mode || opts.policy_dir.is_some() {
        let mut writer = PolicyMaps::open(&opts.pin_dir)?;
        if let Some(source) = &source {
            apply_source_counted(ctx, &mut writer, source, metrics, audit);
        }
        Some(writer)
    } else {
        None
    };
    let gen = watcher.active_generation()?;
    let view = match watcher.read_active_view() {
        Ok(v) => v,
        Err(e @ (MapsError::Inconsistent { .. } | MapsError::Unstable { .. })) => {
            warn!(error = %e, "active policy generation unreadable; denying until replaced");
            PolicyView::deny_all(gen)
        }
        Err(e) => return Err(e),
    };
    Ok((StartedPolicy { watcher, writer }, Arc::new(view)))
}

/// What the generation watcher does with each new generation: re-programs the local
/// workloads' `WORKLOAD_F_PERMISSIVE` (logs `peer authentication programmed` when a flag
/// changed) and sets `mesh_policy_generation`.
fn generation_follower(
    programmer: Arc<Programmer>,
    metrics: Arc<Metrics>,
    registry: &Registry,
    node: &str,
    initial: &PolicyView,
) -> impl FnMut(&PolicyView) + Send + 'static {
    metrics.set_policy_generation(initial.generation());
    let mut programmed = enrolled(registry, node, Some(initial));
    move |view| {
        metrics.set_policy_generation(view.generation());
        match programmer.reprogram_enrolment(&mut programmed) {
            Ok(Some((enrolled, permissive))) => info!(
                generation = view.generation(),
                permissive, enrolled, "peer authentication programmed"
            ),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, generation = view.generation(), "re-programming peer authentication")
            }
        }
    }
}

/// The identity manager as the state applier sees it.
struct ManagerWorkloads(Arc<IdentityManager>);

impl WorkloadIdentities for ManagerWorkloads {
    fn set_workloads(&self, ids: Vec<SpiffeId>) {
        if let Err(e) = self.0.set_workloads(ids) {
            warn!(error = %crate::error_chain(&e), "workload identities refused; the previous set stays");
        }
    }
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
        let int =
            tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
        Ok(Self { term, int })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
