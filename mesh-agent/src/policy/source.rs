//! Where policy comes from and how the agent keeps the maps current:
//! - [`load_dir`]: a policy directory → [`PolicyBundle`] (the one place the parser is wired);
//! - [`CompileContext::load_and_compile`] and [`apply_dir`]: load, compile, apply (the agent at
//!   start, its watcher, the CLI);
//! - [`spawn_dir_watcher`]: polls the directory every `--policy-poll-ms` and re-applies on change;
//!   a refused change is logged (`policy refused`) and the active generation stays;
//! - [`spawn_generation_watcher`]: polls `mesh_config.policy_gen` every `--generation-poll-ms` and
//!   publishes the active generation as a [`PolicyView`] (for the proxies), whoever applied
//!   it (this agent or `mesh-agent policy apply`).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, error, info, warn};

use super::{
    compile::{self, CompileError, CompiledPolicy},
    engine::PolicyView,
    maps::{MapsError, PolicyMaps},
    model::PolicyBundle,
};
use crate::{
    audit::AuditLog,
    error_chain,
    metrics::{ApplyResult, Metrics},
    registry::Registry,
};

/// Most files a directory fingerprint covers (the loader refuses more anyway).
const MAX_FINGERPRINT_FILES: usize = 4_096;

/// A polling task's clock: the next tick, unless asked to stop first.
struct Poller {
    tick: tokio::time::Interval,
    stop: watch::Receiver<bool>,
}

impl Poller {
    fn new(every: Duration, stop: watch::Receiver<bool>) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { tick, stop }
    }

    /// Waits for the next tick; `false` once a stop was requested (or its sender is gone).
    async fn next(&mut self) -> bool {
        loop {
            tokio::select! {
                changed = self.stop.changed() => {
                    if changed.is_err() || *self.stop.borrow() {
                        return false;
                    }
                }
                _ = self.tick.tick() => return true,
            }
        }
    }
}

/// Why loading a policy directory failed (the parser's error: file:line, policy, field).
pub type LoadError = super::parse::PolicyError;

/// Loads a policy directory (every `*.yaml`/`*.yml`, strictly parsed).
pub fn load_dir(dir: &Path) -> Result<PolicyBundle, LoadError> {
    super::parse::load_dir(dir)
}

/// Why a policy could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("loading {}: {source}", dir.display())]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<LoadError>,
    },
    #[error("compiling: {0}")]
    Compile(#[from] CompileError),
    #[error("writing the policy maps: {0}")]
    Maps(#[from] MapsError),
}

/// What compiling needs besides the bundle.
#[derive(Clone)]
pub struct CompileContext {
    pub registry: Arc<Registry>,
    pub root_ns: String,
    pub trust_domain: String,
    /// Istio's `trustDomainAliases`: principals in these (and in `cluster.local`) stand for
    /// the same principals in `trust_domain`.
    pub trust_domain_aliases: Vec<String>,
}

impl CompileContext {
    /// The trust domain with its aliases.
    pub fn trust_domains(&self) -> super::model::TrustDomains {
        super::model::TrustDomains::new(&*self.trust_domain, self.trust_domain_aliases.clone())
    }

    /// Loads the policy files of a configuration bundle and compiles them.
    pub fn compile_files(
        &self,
        files: &[crate::bundle::PolicyFile],
    ) -> Result<(PolicyBundle, CompiledPolicy), ApplyError> {
        let texts: Vec<(&str, &str)> = files
            .iter()
            .map(|f| (f.name.as_str(), f.text.as_str()))
            .collect();
        let bundle = super::parse::load_texts(&texts).map_err(|source| ApplyError::Load {
            dir: PathBuf::from("bundle"),
            source: Box::new(source),
        })?;
        self.compile(bundle)
    }

    /// Compiles a loaded bundle against the registry.
    fn compile(&self, bundle: PolicyBundle) -> Result<(PolicyBundle, CompiledPolicy), ApplyError> {
        let compiled = compile::compile_with(
            &bundle,
            &self.registry,
            &self.root_ns,
            &self.trust_domains(),
        )?;
        Ok((bundle, compiled))
    }

    /// Loads `dir` and compiles it.
    pub fn load_and_compile(
        &self,
        dir: &Path,
    ) -> Result<(PolicyBundle, CompiledPolicy), ApplyError> {
        let bundle = load_dir(dir).map_err(|source| ApplyError::Load {
            dir: dir.to_owned(),
            source: Box::new(source),
        })?;
        self.compile(bundle)
    }
}

/// Where an agent's policy comes from: its `--policy-dir`, or the verified configuration
/// bundle of the mesh state (nodes with pinned signers).
#[derive(Clone, Debug)]
pub enum PolicySource {
    Dir(PathBuf),
    Bundle(Arc<[crate::bundle::PolicyFile]>),
}

impl PolicySource {
    /// What the audit record and the logs name.
    pub fn subject(&self) -> String {
        match self {
            Self::Dir(d) => d.display().to_string(),
            Self::Bundle(_) => "configuration bundle".to_owned(),
        }
    }
}

/// Loads, compiles and applies `dir` to `maps`; logs `policy applied`. Returns the bundle
/// (for the PeerAuthentication flags) and the generation.
pub fn apply_dir(
    ctx: &CompileContext,
    maps: &mut PolicyMaps,
    dir: &Path,
) -> Result<(PolicyBundle, u32), ApplyError> {
    apply_source(ctx, maps, &PolicySource::Dir(dir.to_owned()))
}

/// [`apply_dir`] for any [`PolicySource`].
pub fn apply_source(
    ctx: &CompileContext,
    maps: &mut PolicyMaps,
    source: &PolicySource,
) -> Result<(PolicyBundle, u32), ApplyError> {
    let started = std::time::Instant::now();
    let (bundle, compiled) = match source {
        PolicySource::Dir(dir) => ctx.load_and_compile(dir)?,
        PolicySource::Bundle(files) => ctx.compile_files(files)?,
    };
    let compile_ms = started.elapsed().as_millis() as u64;
    let generation = maps.apply(&compiled)?;
    info!(
        generation,
        compile_ms,
        apply_ms = started.elapsed().as_millis() as u64,
        policies = compiled.policies,
        l4_entries = compiled.l4.len(),
        l7_clauses = compiled.l7.len(),
        sets = compiled.sets,
        classes = compiled.classes,
        "policy applied"
    );
    Ok((bundle, generation))
}

/// [`apply_dir`], counted in `mesh_policy_applies_total` and recorded in the audit log
/// (kind `config`, action `accepted` with the new generation, or `refused` with the
/// reason); a refusal is logged (`policy refused`) and the active generation stays. Returns
/// the new generation.
pub fn apply_source_counted(
    ctx: &CompileContext,
    maps: &mut PolicyMaps,
    source: &PolicySource,
    metrics: &Metrics,
    audit: Option<&AuditLog>,
) -> Option<u32> {
    let subject = source.subject();
    match apply_source(ctx, maps, source) {
        Ok((_, generation)) => {
            metrics.policy_apply(ApplyResult::Ok);
            if let Some(a) = audit {
                a.config_event("accepted", &subject, Some(generation.into()), None);
            }
            Some(generation)
        }
        Err(e) => {
            metrics.policy_apply(ApplyResult::Refused);
            let reason = error_chain(&e);
            warn!(error = %reason, source = %subject, "policy refused");
            if let Some(a) = audit {
                a.config_event("refused", &subject, None, Some(reason));
            }
            None
        }
    }
}

/// The names, sizes and mtimes of the directory's entries: a change in any is a change.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out: Vec<_> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .take(MAX_FINGERPRINT_FILES)
            .map(|e| {
                let meta = e.metadata().ok();
                (
                    e.path(),
                    meta.as_ref().map_or(0, |m| m.len()),
                    meta.and_then(|m| m.modified().ok()),
                )
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// What the directory watcher follows and where it applies.
pub struct DirWatch {
    /// The policy directory (`--policy-dir`), if any; the policies of a verified bundle in
    /// the mesh state take its place.
    pub dir: Option<PathBuf>,
    /// Compile settings; the registry is taken from `mesh` at each apply.
    pub ctx: CompileContext,
    /// The mesh state: a new version recompiles the directory against it.
    pub mesh: crate::state::live::MeshHandle,
    pub maps: PolicyMaps,
    pub metrics: Arc<Metrics>,
    pub audit: Option<AuditLog>,
    /// `--policy-poll-ms`.
    pub interval: Duration,
    /// Signed configuration: this watcher is the only legitimate writer of the maps, so an
    /// active generation it did not write (`policy apply` by hand, a direct map write) is an
    /// unauthorized load — reported and replaced by the verified policy at the next tick.
    pub exclusive: bool,
}

/// Polls `dir` every `interval` (`--policy-poll-ms`) and follows the mesh state; on a change of
/// either loads, compiles and applies the directory (the generation carries the
/// PeerAuthentication flags too: the agent re-programs them from every generation it sees). A
/// failure logs `policy refused` and keeps the active generation.
pub fn spawn_dir_watcher(w: DirWatch, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    let DirWatch {
        dir,
        ctx,
        mesh,
        maps,
        metrics,
        audit,
        interval,
        exclusive,
    } = w;
    let maps = Arc::new(std::sync::Mutex::new(maps));
    tokio::spawn(async move {
        let fingerprint_of = |dir: Option<PathBuf>| async move {
            match dir {
                None => Some(Vec::new()),
                Some(d) => tokio::task::spawn_blocking(move || fingerprint(&d))
                    .await
                    .ok(),
            }
        };
        let mut seen = fingerprint_of(dir.clone()).await.unwrap_or_default();
        // The generation this watcher last wrote (0: none yet; the start-up apply is not
        // known here, so the first tick adopts what is active).
        let ours = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // ... and the content digest of that generation as written.
        let ours_digest: Arc<std::sync::Mutex<Option<[u8; 32]>>> = Arc::default();
        let mut state = mesh.subscribe();
        let mut watching_state = true;
        let mut applied_registry = Arc::clone(&ctx.registry);
        let mut poll = Poller::new(interval, stop);
        loop {
            // The next tick, or at once when a new mesh state was applied (the policy is
            // recompiled against it: selectors, workload ids; and a verified bundle's
            // policies are the policy).
            let state_changed = tokio::select! {
                more = poll.next() => if more { false } else { break },
                changed = state.changed(), if watching_state => {
                    // The applier is gone (shutdown): the directory alone from here.
                    watching_state = changed.is_ok();
                    watching_state
                }
            };
            let Some(now) = fingerprint_of(dir.clone()).await else {
                continue;
            };
            let current = mesh.load();
            let registry = Arc::clone(&current.registry);
            let new_state = state_changed && !Arc::ptr_eq(&registry, &applied_registry);
            let mut unauthorized = false;
            if exclusive {
                let maps2 = Arc::clone(&maps);
                let active = tokio::task::spawn_blocking(move || {
                    let maps = maps2.lock().unwrap_or_else(|p| p.into_inner());
                    let gen = maps.active_generation()?;
                    Ok::<_, MapsError>((gen, maps.content_digest(gen).ok()))
                })
                .await;
                let written = ours.load(std::sync::atomic::Ordering::Relaxed);
                if let Ok(Ok((active, digest))) = active {
                    let expected = *ours_digest.lock().unwrap_or_else(|p| p.into_inner());
                    if written == 0 {
                        ours.store(active, std::sync::atomic::Ordering::Relaxed);
                        *ours_digest.lock().unwrap_or_else(|p| p.into_inner()) = digest;
                    } else if active == written
                        && digest.is_some()
                        && expected.is_some()
                        && digest != expected
                    {
                        unauthorized = true;
                        metrics.config_unauthorized_load();
                        warn!(active,
                              "unauthorized policy load: the entries of the active generation were changed; restoring the verified policy");
                        if let Some(a) = &audit {
                            a.config_event(
                                "unauthorized",
                                "policy_generation",
                                Some(active.into()),
                                Some(
                                    "its entries were changed; restoring the verified policy"
                                        .to_owned(),
                                ),
                            );
                        }
                    } else if active != written {
                        unauthorized = true;
                        metrics.config_unauthorized_load();
                        warn!(active, expected = written,
                              "unauthorized policy load: the active generation is not the verified configuration's; restoring it");
                        if let Some(a) = &audit {
                            a.config_event(
                                "unauthorized",
                                "policy_generation",
                                Some(active.into()),
                                Some(format!(
                                    "expected generation {written}; restoring the verified policy"
                                )),
                            );
                        }
                    }
                }
            }
            if now == seen && !new_state && !unauthorized {
                continue;
            }
            let source = match (&current.policies, &dir) {
                (Some(files), _) => PolicySource::Bundle(Arc::clone(files)),
                (None, Some(d)) => PolicySource::Dir(d.clone()),
                (None, None) => continue,
            };
            seen = now;
            applied_registry = Arc::clone(&registry);
            debug!(source = %source.subject(), new_state, "policy source or mesh state changed");
            let (ctx2, maps2, metrics2, audit2) = (
                CompileContext {
                    registry,
                    ..ctx.clone()
                },
                Arc::clone(&maps),
                Arc::clone(&metrics),
                audit.clone(),
            );
            let (ours2, ours_digest2) = (Arc::clone(&ours), Arc::clone(&ours_digest));
            let done = tokio::task::spawn_blocking(move || {
                let mut maps = maps2.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(generation) =
                    apply_source_counted(&ctx2, &mut maps, &source, &metrics2, audit2.as_ref())
                {
                    ours2.store(generation, std::sync::atomic::Ordering::Relaxed);
                    *ours_digest2.lock().unwrap_or_else(|p| p.into_inner()) =
                        maps.content_digest(generation).ok();
                }
            })
            .await;
            if done.is_err() {
                error!("policy apply task panicked");
            }
        }
    })
}

/// The one task that follows policy generations: publishes the active generation as a
/// [`PolicyView`] — the receiver always holds the view of the generation the kernel uses
/// (within `interval`, `--generation-poll-ms`); it is the proxies' `Authorizer` — and calls `on_generation` with
/// each new view, after publishing it (the agent re-programs workload flags from it). A
/// generation that cannot be read back consistently is published as a deny-all view (fail
/// closed) and logged. Each swap is recorded in the audit log (kind `config`, subject
/// `policy_generation`: action `activated`, or `fail_closed` for the deny-all view).
pub fn spawn_generation_watcher(
    maps: PolicyMaps,
    initial: Arc<PolicyView>,
    audit: Option<AuditLog>,
    interval: Duration,
    mut on_generation: impl FnMut(&PolicyView) + Send + 'static,
    stop: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<PolicyView>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(initial);
    let maps = Arc::new(maps);
    let handle = tokio::spawn(async move {
        let mut poll = Poller::new(interval, stop);
        loop {
            if !poll.next().await {
                break;
            }
            let current = tx.borrow().generation();
            let maps2 = Arc::clone(&maps);
            let read = tokio::task::spawn_blocking(move || {
                let gen = maps2.active_generation()?;
                if gen == current {
                    return Ok(None);
                }
                // Never a generation being deleted: re-checked after the read, retried.
                maps2.read_active_view().map(Some)
            })
            .await;
            match read {
                Ok(Ok(Some(view))) => {
                    info!(
                        generation = view.generation(),
                        l4_entries = view.l4_entries(),
                        "policy generation active"
                    );
                    if let Some(a) = &audit {
                        a.config_event(
                            "activated",
                            "policy_generation",
                            Some(view.generation().into()),
                            Some(format!("{} L4 entries", view.l4_entries())),
                        );
                    }
                    let view = Arc::new(view);
                    tx.send_replace(Arc::clone(&view));
                    on_generation(&view);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    error!(error = %error_chain(&e), "reading the active policy generation");
                    // A generation that stayed active and still reads inconsistent is broken:
                    // fail closed. A read that kept overlapping swaps (`Unstable`) keeps the
                    // previous view and is tried again at the next poll.
                    if let MapsError::Inconsistent { gen, .. } = e {
                        if let Some(a) = &audit {
                            a.config_event(
                                "fail_closed",
                                "policy_generation",
                                Some(gen.into()),
                                Some(format!("unreadable, denying all: {}", error_chain(&e))),
                            );
                        }
                        let view = Arc::new(PolicyView::deny_all(gen));
                        tx.send_replace(Arc::clone(&view));
                        on_generation(&view);
                    }
                }
                Err(_) => error!("policy view task panicked"),
            }
        }
    });
    (rx, handle)
}
