//! Kernel side of the agent: load the programs, pin the maps, attach to the
//! node's pod cgroup parent through pinned links, and typed handles on the shared maps.
//!
//! Failure model: maps are pinned under the pin directory and the programs are attached
//! through `bpf_link`s pinned there too ([`links`]), so the mesh stays in the kernel whatever
//! happens to the agent process: crash, SIGKILL, OOM kill, SIGTERM or an upgrade. With no
//! agent running, a captured connect is still rewritten to the agent's listener address and
//! refused there (ECONNREFUSED, nothing leaves in plaintext), kernel L4 denials and the STRICT
//! ingress check keep applying. A starting agent reuses the pinned maps whose layout matches
//! this build (their contents included) and adopts the pinned links, swapping in its own
//! program version atomically where it differs. Only [`uninstall`] (`mesh-agent uninstall`)
//! detaches and unpins.
//!
//! [`events`] reads the kernel's `mesh_events` ring buffer.

pub mod events;
pub mod links;

use std::{
    collections::HashSet,
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, RingBuf},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr,
        ProgramError, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use mesh_common::{
    capacity, counters, names, policy as pol, AgentConfig, CgroupKey, ConnKey, DestValue, IpKey,
    OrigDst, PeerValue, WorkloadValue, CONFIG_F_BASELINE, CONFIG_F_READY,
};

use self::{
    events::EventReader,
    links::{Hook, LinkError, PinnedCgroupLink},
};
use tracing::{debug, info, warn};

/// The kernel object built by `mesh-agent/build.rs` from `mesh-ebpf`: what [`Dataplane::load`]
/// loads, and what the kernel-program tests (`mesh-tests`, `tests/kernel.rs`) load unpinned.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Errors of the kernel side, each with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("loading the kernel object: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("program {prog} missing from the kernel object")]
    MissingProgram { prog: &'static str },
    #[error("map {map} missing from the kernel object")]
    MissingMap { map: &'static str },
    #[error("program {prog}: {source}")]
    Program {
        prog: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {prog} to cgroup {cgroup}: {source}")]
    Attach {
        prog: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("opening cgroup {cgroup}: {source}")]
    Cgroup {
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("event reader on {map}: {source}")]
    Events {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {map} reader was already taken")]
    EventsTaken { map: &'static str },
    #[error("pinned link of {prog}: {source}")]
    Link {
        prog: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("the link of {prog} is not an fd link: {source}")]
    FdLink {
        prog: &'static str,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning the link of {prog} at {path}: {source}")]
    PinLink {
        prog: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map {
        map,
        source: Box::new(source),
    }
}

/// Expected layout of each pinned map, to decide reuse vs replace.
fn expected_layout(name: &str) -> Option<(u32, u32, u32)> {
    use core::mem::size_of;
    let s = |n: usize| n as u32;
    Some(match name {
        names::MAP_WORKLOADS => (
            s(size_of::<CgroupKey>()),
            s(size_of::<WorkloadValue>()),
            capacity::WORKLOADS,
        ),
        names::MAP_DESTS => (
            s(size_of::<IpKey>()),
            s(size_of::<DestValue>()),
            capacity::DESTINATIONS,
        ),
        names::MAP_CONFIG => (4, s(size_of::<AgentConfig>()), capacity::CONFIG),
        names::MAP_COOKIE_DST => (8, s(size_of::<OrigDst>()), capacity::COOKIE_ORIG_DST),
        names::MAP_CONN_DST => (
            s(size_of::<ConnKey>()),
            s(size_of::<OrigDst>()),
            capacity::CONN_ORIG_DST,
        ),
        names::MAP_COUNTERS => (4, 8, counters::COUNT),
        // Ring buffers have no key or value; max_entries is the byte size.
        names::MAP_EVENTS => (0, 0, capacity::EVENTS_BYTES),
        names::MAP_PEERS => (
            s(size_of::<IpKey>()),
            s(size_of::<PeerValue>()),
            capacity::PEERS,
        ),
        names::MAP_POL_SRC => (
            s(size_of::<pol::PolSrcKey>()),
            s(size_of::<pol::PolSrcValue>()),
            pol::capacity::POL_SRC,
        ),
        names::MAP_POL_DST => (
            s(size_of::<pol::PolDstKey>()),
            s(size_of::<pol::PolDstValue>()),
            pol::capacity::POL_DST,
        ),
        names::MAP_POL_L4 => (
            s(size_of::<pol::PolL4Key>()),
            s(size_of::<pol::PolL4Value>()),
            pol::capacity::POL_L4,
        ),
        names::MAP_POL_L7 => (
            s(size_of::<pol::PolL7Key>()),
            s(size_of::<pol::PolL7Value>()),
            pol::capacity::POL_L7,
        ),
        names::MAP_POL_OPS => (
            s(size_of::<pol::PolOpKey>()),
            s(size_of::<pol::PolOpValue>()),
            pol::capacity::POL_OPS,
        ),
        names::MAP_POL_STRS => (
            s(size_of::<pol::PolStrKey>()),
            s(size_of::<pol::PolStrValue>()),
            pol::capacity::POL_STRS,
        ),
        names::MAP_POL_PLAIN => (
            s(size_of::<pol::PolPlainKey>()),
            s(size_of::<pol::PolPlainValue>()),
            pol::capacity::POL_PLAIN,
        ),
        _ => return None,
    })
}

/// Removes map pins in `dir` that this build would not reuse: unknown names and maps whose
/// key/value size or capacity differ. Link pins (`link_…`) are left to [`attach_pinned`].
/// Returns whether a map this build uses was removed (its programs must then be swapped in
/// even where their instructions are unchanged: the pinned programs still use the old map).
fn prune_incompatible_pins(dir: &Path) -> Result<bool, BpfError> {
    let mut replaced = false;
    let entries = fs::read_dir(dir).map_err(|source| BpfError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(names::LINK_PIN_PREFIX) {
            continue;
        }
        let keep = match (expected_layout(&name), MapInfo::from_pin(&path)) {
            (Some((k, v, n)), Ok(info)) => {
                info.key_size() == k && info.value_size() == v && info.max_entries() == n
            }
            _ => false,
        };
        if keep {
            info!(pin = %path.display(), "reusing pinned map");
        } else {
            warn!(pin = %path.display(), "removing stale or incompatible pin");
            replaced |= names::ALL_MAPS.contains(&name.as_str());
            fs::remove_file(&path).map_err(|source| BpfError::PinDir {
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(replaced)
}

fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    fs::create_dir_all(dir).map_err(|source| BpfError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    let st = nix::sys::statfs::statfs(dir).map_err(|e| BpfError::PinDir {
        path: dir.to_owned(),
        source: io::Error::from(e),
    })?;
    if st.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        return Err(BpfError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// The program `prog` of the object, as its type `P`.
fn typed_program<'a, P>(ebpf: &'a mut Ebpf, prog: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(prog)
        .ok_or(BpfError::MissingProgram { prog })?
        .try_into()
        .map_err(|e| BpfError::Program {
            prog,
            source: Box::new(e),
        })
}

/// Attach mode for our cgroup programs. aya attaches through `BPF_LINK_CREATE`, and a cgroup
/// `bpf_link` always coexists with other programs on the cgroup (the kernel attaches links as
/// `BPF_F_ALLOW_MULTI`); the link path rejects any flag, so `AllowMultiple` (flag
/// `BPF_F_ALLOW_MULTI`) fails there with EINVAL on current kernels. `Single` passes no flag.
const CGROUP_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The loaded and attached kernel side, with typed handles on the maps.
pub struct Dataplane {
    ebpf: Option<Ebpf>,
    /// How each program came to be on its hook at this start.
    links: Vec<LinkReport>,
    pin_dir: PathBuf,
    workloads: Mutex<HashMap<MapData, CgroupKey, WorkloadValue>>,
    dests: Mutex<HashMap<MapData, IpKey, DestValue>>,
    config: Mutex<Array<MapData, AgentConfig>>,
    /// The slot as this agent last wrote it (its `policy_gen` aside: the policy writer's).
    written_config: Mutex<Option<AgentConfig>>,
    conns: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    peers: Mutex<HashMap<MapData, IpKey, PeerValue>>,
    counters: PerCpuArray<MapData, u64>,
    /// Taken once by [`Dataplane::take_event_reader`].
    events: Mutex<Option<RingBuf<MapData>>>,
}

impl Dataplane {
    /// Loads the programs, pins (or reuses) the maps under `pin_dir` and
    /// attaches the programs to `pod_cgroup`.
    pub fn load(pin_dir: &Path, pod_cgroup: &Path) -> Result<Self, BpfError> {
        ensure_bpffs(pin_dir)?;
        // A map that is re-created (its pin was incompatible, or is missing) is not the one the
        // attached programs use: they must then be swapped even where their code is the same.
        let missing = names::ALL_MAPS.iter().any(|m| !pin_dir.join(m).exists());
        let maps_replaced = prune_incompatible_pins(pin_dir)? || missing;
        let pins: Vec<(&'static str, PathBuf)> = names::ALL_MAPS
            .iter()
            .map(|m| (*m, pin_dir.join(m)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| BpfError::Load(Box::new(e)))?;

        let cgroup = fs::File::open(pod_cgroup).map_err(|source| BpfError::Cgroup {
            cgroup: pod_cgroup.to_owned(),
            source,
        })?;
        let cgroup_id = links::cgroup_id(pod_cgroup).map_err(|source| BpfError::Cgroup {
            cgroup: pod_cgroup.to_owned(),
            source,
        })?;
        let loaded = |prog: &'static str| {
            move |e: ProgramError| BpfError::Program {
                prog,
                source: Box::new(e),
            }
        };
        let attached = |prog: &'static str| {
            move |e: ProgramError| BpfError::Attach {
                prog,
                cgroup: pod_cgroup.to_owned(),
                source: Box::new(e),
            }
        };
        let target = AttachTarget {
            pin_dir,
            cgroup: pod_cgroup,
            cgroup_id,
            maps_replaced,
        };
        let mut links = Vec::new();
        for (prog, hook) in [
            (names::PROG_CONNECT4, Hook::Connect4),
            (names::PROG_CONNECT6, Hook::Connect6),
        ] {
            let p: &mut CgroupSockAddr = typed_program(&mut ebpf, prog)?;
            p.load().map_err(loaded(prog))?;
            let fd = program_fd(prog, p.fd().map_err(loaded(prog))?.as_fd())?;
            links.push(target.attach_pinned(prog, hook, fd, || {
                let id = p
                    .attach(&cgroup, CGROUP_ATTACH_MODE)
                    .map_err(attached(prog))?;
                let link = p.take_link(id).map_err(attached(prog))?;
                FdLink::try_from(link).map_err(|e| fd_link_err(prog, e))
            })?);
        }
        let prog = names::PROG_SOCKOPS;
        let p: &mut SockOps = typed_program(&mut ebpf, prog)?;
        p.load().map_err(loaded(prog))?;
        let fd = program_fd(prog, p.fd().map_err(loaded(prog))?.as_fd())?;
        links.push(target.attach_pinned(prog, Hook::SockOps, fd, || {
            let id = p
                .attach(&cgroup, CGROUP_ATTACH_MODE)
                .map_err(attached(prog))?;
            let link = p.take_link(id).map_err(attached(prog))?;
            FdLink::try_from(link).map_err(|e| fd_link_err(prog, e))
        })?);
        let prog = names::PROG_INGRESS;
        let p: &mut CgroupSkb = typed_program(&mut ebpf, prog)?;
        p.load().map_err(loaded(prog))?;
        let fd = program_fd(prog, p.fd().map_err(loaded(prog))?.as_fd())?;
        links.push(target.attach_pinned(prog, Hook::Ingress, fd, || {
            let id = p
                .attach(&cgroup, CgroupSkbAttachType::Ingress, CGROUP_ATTACH_MODE)
                .map_err(attached(prog))?;
            let link = p.take_link(id).map_err(attached(prog))?;
            FdLink::try_from(link).map_err(|e| fd_link_err(prog, e))
        })?);

        let mut take = |map: &'static str| ebpf.take_map(map).ok_or(BpfError::MissingMap { map });
        let workloads = HashMap::try_from(take(names::MAP_WORKLOADS)?)
            .map_err(map_err(names::MAP_WORKLOADS))?;
        let dests =
            HashMap::try_from(take(names::MAP_DESTS)?).map_err(map_err(names::MAP_DESTS))?;
        let config =
            Array::try_from(take(names::MAP_CONFIG)?).map_err(map_err(names::MAP_CONFIG))?;
        let conns =
            HashMap::try_from(take(names::MAP_CONN_DST)?).map_err(map_err(names::MAP_CONN_DST))?;
        let counters = PerCpuArray::try_from(take(names::MAP_COUNTERS)?)
            .map_err(map_err(names::MAP_COUNTERS))?;
        let peers =
            HashMap::try_from(take(names::MAP_PEERS)?).map_err(map_err(names::MAP_PEERS))?;
        let events =
            RingBuf::try_from(take(names::MAP_EVENTS)?).map_err(map_err(names::MAP_EVENTS))?;

        Ok(Self {
            ebpf: Some(ebpf),
            links,
            pin_dir: pin_dir.to_owned(),
            workloads: Mutex::new(workloads),
            dests: Mutex::new(dests),
            config: Mutex::new(config),
            written_config: Mutex::new(None),
            conns: Mutex::new(conns),
            peers: Mutex::new(peers),
            counters,
            events: Mutex::new(Some(events)),
        })
    }

    /// Publishes where captured connections go. Written before any workload
    /// is enrolled so the kernel never captures towards an unset listener.
    /// `cfg.policy_gen` is ignored: the generation already published (by an agent before a
    /// restart, or by `mesh-agent policy apply`) is kept, since its maps are still pinned.
    /// The safe baseline bit is kept too; on fresh pins (the slot never marked ready: a first
    /// boot) it is set: nothing in the pod tree talks until a configuration is programmed.
    /// Returns whether the baseline is on.
    pub fn set_config(&self, mut cfg: AgentConfig) -> Result<bool, BpfError> {
        let mut config = lock(&self.config);
        let _pins = self.lock_pins()?;
        let (old_gen, old_flags) = config
            .get(&0, 0)
            .map(|c| (c.policy_gen, c.flags))
            .unwrap_or((0, 0));
        cfg.policy_gen = old_gen;
        let fresh = old_flags & CONFIG_F_READY == 0;
        cfg.flags &= !CONFIG_F_BASELINE;
        if fresh || old_flags & CONFIG_F_BASELINE != 0 {
            cfg.flags |= CONFIG_F_BASELINE;
        }
        config.set(0, cfg, 0).map_err(map_err(names::MAP_CONFIG))?;
        *lock(&self.written_config) = Some(cfg);
        Ok(cfg.flags & CONFIG_F_BASELINE != 0)
    }

    /// Turns the safe baseline (`CONFIG_F_BASELINE`) on or off; returns whether it changed.
    /// Read-modify-write of the config slot under the pin directory's lock, which `policy
    /// apply` (another process) also takes to swap the policy generation in the same slot.
    pub fn set_baseline(&self, on: bool) -> Result<bool, BpfError> {
        let mut config = lock(&self.config);
        let _pins = self.lock_pins()?;
        let mut cfg = config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?;
        if (cfg.flags & CONFIG_F_BASELINE != 0) == on {
            return Ok(false);
        }
        cfg.flags ^= CONFIG_F_BASELINE;
        config.set(0, cfg, 0).map_err(map_err(names::MAP_CONFIG))?;
        *lock(&self.written_config) = Some(cfg);
        Ok(true)
    }

    /// Rewrites the config slot when its redirect target or flags (the safe baseline bit
    /// among them) are not what this agent wrote — someone else changed them; the policy
    /// generation in it stays as it is (the policy writer checks that one). True when it did.
    pub fn restore_config(&self) -> Result<bool, BpfError> {
        let mut config = lock(&self.config);
        let Some(want) = *lock(&self.written_config) else {
            return Ok(false);
        };
        let same = |c: &AgentConfig| {
            AgentConfig {
                policy_gen: 0,
                ..*c
            } == AgentConfig {
                policy_gen: 0,
                ..want
            }
        };
        if config.get(&0, 0).is_ok_and(|c| same(&c)) {
            return Ok(false);
        }
        let _pins = self.lock_pins()?;
        let gen = config.get(&0, 0).map(|c| c.policy_gen).unwrap_or(0);
        config
            .set(
                0,
                AgentConfig {
                    policy_gen: gen,
                    ..want
                },
                0,
            )
            .map_err(map_err(names::MAP_CONFIG))?;
        Ok(true)
    }

    /// Whether the safe baseline is on.
    pub fn baseline(&self) -> bool {
        lock(&self.config)
            .get(&0, 0)
            .is_ok_and(|c| c.flags & CONFIG_F_BASELINE != 0)
    }

    fn lock_pins(&self) -> Result<nix::fcntl::Flock<fs::File>, BpfError> {
        lock_pin_dir(&self.pin_dir).map_err(|source| BpfError::PinDir {
            path: self.pin_dir.clone(),
            source,
        })
    }

    /// Makes `mesh_workloads` equal to `want`: inserts and updates first, then
    /// removes what is no longer wanted.
    pub fn sync_workloads(&self, want: &[(CgroupKey, WorkloadValue)]) -> Result<(), BpfError> {
        sync_hash(&mut lock(&self.workloads), want, names::MAP_WORKLOADS)
    }

    /// Makes `mesh_dests` equal to `want`.
    pub fn sync_dests(&self, want: &[(IpKey, DestValue)]) -> Result<(), BpfError> {
        sync_hash(&mut lock(&self.dests), want, names::MAP_DESTS)
    }

    /// Makes `mesh_peers` (mesh agent addresses the inbound STRICT check
    /// admits) equal to `want`.
    pub fn sync_peers(&self, want: &[(IpKey, PeerValue)]) -> Result<(), BpfError> {
        sync_hash(&mut lock(&self.peers), want, names::MAP_PEERS)
    }

    /// Which of `mesh_peers`, `mesh_dests` and `mesh_workloads` do not hold exactly what
    /// was last written to them (`peers`, `dests`, `workloads`): entries changed, added or
    /// removed by someone else. A map that cannot be read counts as changed.
    pub fn changed_maps(
        &self,
        peers: &[(IpKey, PeerValue)],
        dests: &[(IpKey, DestValue)],
        workloads: &[(CgroupKey, WorkloadValue)],
    ) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !holds_exactly(&lock(&self.peers), peers) {
            out.push(names::MAP_PEERS);
        }
        if !holds_exactly(&lock(&self.dests), dests) {
            out.push(names::MAP_DESTS);
        }
        if !holds_exactly(&lock(&self.workloads), workloads) {
            out.push(names::MAP_WORKLOADS);
        }
        out
    }

    /// The reader of the kernel's `mesh_events` ring buffer. There is one:
    /// the second call fails. Needs a tokio runtime (the ring buffer's fd is
    /// registered with it).
    pub fn take_event_reader(&self) -> Result<EventReader, BpfError> {
        let map = names::MAP_EVENTS;
        let ring = lock(&self.events)
            .take()
            .ok_or(BpfError::EventsTaken { map })?;
        EventReader::new(ring).map_err(|source| BpfError::Events { map, source })
    }

    /// Takes the original destination recorded for a captured connection
    /// (the entry is removed: each connection is looked up once).
    pub fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst> {
        let mut conns = lock(&self.conns);
        let found = conns.get(key, 0).ok()?;
        if let Err(e) = conns.remove(key) {
            debug!(error = %e, "removing a connection entry");
        }
        Some(found)
    }

    /// Sums of the per-CPU kernel counters, indexed as `mesh_common::counters`.
    pub fn counters(&self) -> [u64; counters::COUNT as usize] {
        let mut out = [0u64; counters::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// The kernel counters with their names, in index order.
    pub fn named_counters(&self) -> Vec<(&'static str, u64)> {
        counters::NAMES
            .iter()
            .copied()
            .zip(self.counters())
            .collect()
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// How each program came to be on its hook at this start (attached, adopted, updated).
    pub fn links(&self) -> &[LinkReport] {
        &self.links
    }

    /// Releases the agent's handles at exit. The programs stay attached through their pinned
    /// links and the maps stay pinned, contents included: the mesh stays closed until the
    /// next agent adopts it. Only [`uninstall`] takes it off the node.
    pub fn release(mut self) {
        drop(self.ebpf.take());
        info!(dir = %self.pin_dir.display(), "exiting; programs stay attached and maps pinned");
    }
}

/// How a program came to be on its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// No link was pinned: attached and pinned now.
    Attached,
    /// The pinned link already runs this build's program: kept as it is.
    Adopted,
    /// The pinned link ran another program: swapped atomically (`BPF_LINK_UPDATE`).
    Updated,
    /// The pinned link was on another cgroup or hook: the new one was attached first, then the
    /// old one detached.
    Moved,
}

impl LinkAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Adopted => "adopted",
            Self::Updated => "updated",
            Self::Moved => "moved",
        }
    }
}

/// One program's link at start.
#[derive(Clone, Copy, Debug)]
pub struct LinkReport {
    pub prog: &'static str,
    pub link_id: u32,
    pub prog_id: u32,
    pub action: LinkAction,
}

fn fd_link_err(prog: &'static str, e: aya::programs::links::LinkError) -> BpfError {
    BpfError::FdLink {
        prog,
        source: Box::new(e),
    }
}

fn program_fd(prog: &'static str, fd: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd, BpfError> {
    fd.try_clone_to_owned().map_err(|e| BpfError::Program {
        prog,
        source: Box::new(ProgramError::IOError(e)),
    })
}

/// Where the programs go: the pod cgroup parent, and the pins.
struct AttachTarget<'a> {
    pin_dir: &'a Path,
    cgroup: &'a Path,
    cgroup_id: u64,
    maps_replaced: bool,
}

impl AttachTarget<'_> {
    /// Puts `prog` (loaded, `prog_fd`) on `hook` of the pod cgroup through the link pinned in
    /// the pin directory: adopts the pinned link when it runs the same program, swaps the
    /// program in atomically when it runs another, and only when no usable link is pinned
    /// attaches a new one (`attach_new`) and pins it. The hook is never left empty.
    fn attach_pinned(
        &self,
        prog: &'static str,
        hook: Hook,
        prog_fd: OwnedFd,
        attach_new: impl FnOnce() -> Result<FdLink, BpfError>,
    ) -> Result<LinkReport, BpfError> {
        let path = links::pin_path(self.pin_dir, prog);
        let link_err = |source| BpfError::Link { prog, source };
        let pinned = match PinnedCgroupLink::open(&path) {
            Ok(p) => p,
            Err(e @ LinkError::NotCgroupLink { .. }) => {
                warn!(prog, pin = %path.display(), error = %e, "removing a pin that is not our link");
                fs::remove_file(&path).map_err(|source| BpfError::PinDir {
                    path: path.clone(),
                    source,
                })?;
                None
            }
            Err(e) => return Err(link_err(e)),
        };
        let report = |link: &PinnedCgroupLink, action| LinkReport {
            prog,
            link_id: link.state.link_id,
            prog_id: link.state.prog_id,
            action,
        };
        let old = match pinned {
            Some(mut link)
                if link.state.cgroup_id == self.cgroup_id
                    && link.state.attach_type == hook as u32 =>
            {
                let new_tag = links::program_tag(prog_fd.as_fd()).map_err(|source| {
                    link_err(LinkError::Syscall {
                        op: "BPF_OBJ_GET_INFO_BY_FD(prog)",
                        path: path.clone(),
                        source,
                    })
                })?;
                let same = !self.maps_replaced && link.program_tag().map_err(link_err)? == new_tag;
                let action = if same {
                    LinkAction::Adopted
                } else {
                    link.update(prog_fd.as_fd()).map_err(link_err)?;
                    LinkAction::Updated
                };
                info!(prog, link_id = link.state.link_id, prog_id = link.state.prog_id,
                      cgroup = %self.cgroup.display(), action = action.as_str(), "pinned link");
                return Ok(report(&link, action));
            }
            other => other,
        };
        // Attach first, then retire the old link: the hook is never empty.
        let fresh = attach_new()?;
        let action = match old {
            Some(old) => {
                warn!(
                    prog,
                    old_link_id = old.state.link_id,
                    old_cgroup_id = old.state.cgroup_id,
                    "pinned link is on another cgroup or hook; replacing it"
                );
                old.detach_and_unpin().map_err(link_err)?;
                LinkAction::Moved
            }
            None => LinkAction::Attached,
        };
        fresh.pin(&path).map_err(|e| BpfError::PinLink {
            prog,
            path: path.clone(),
            source: Box::new(e),
        })?;
        let link = PinnedCgroupLink::open(&path)
            .map_err(link_err)?
            .ok_or_else(|| {
                link_err(LinkError::Syscall {
                    op: "BPF_OBJ_GET",
                    path: path.clone(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                })
            })?;
        info!(prog, link_id = link.state.link_id, prog_id = link.state.prog_id,
              cgroup = %self.cgroup.display(), action = action.as_str(), "pinned link");
        Ok(report(&link, action))
    }
}

/// What [`uninstall`] removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Uninstalled {
    /// Links detached (program names).
    pub links: Vec<String>,
    /// Map pins removed.
    pub maps: Vec<String>,
    /// Whether the pin directory itself was removed.
    pub dir_removed: bool,
}

/// Takes the mesh off the node: detaches every pinned link in `pin_dir` (`BPF_LINK_DETACH`,
/// effective even while an agent still holds the link), removes every pin and the directory.
/// Idempotent: a missing directory is not an error. The only way the kernel programs leave.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, BpfError> {
    let mut done = Uninstalled::default();
    let entries = match fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(done),
        Err(source) => {
            return Err(BpfError::PinDir {
                path: pin_dir.to_owned(),
                source,
            })
        }
    };
    let pin_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BpfError::PinDir { path, source }
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    // Links first: once they are gone nothing runs that reads the maps.
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(names::LINK_PIN_PREFIX))
    });
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(prog) = name.strip_prefix(names::LINK_PIN_PREFIX) {
            match PinnedCgroupLink::open(&path) {
                Ok(Some(link)) => {
                    let id = link.state.link_id;
                    link.detach_and_unpin().map_err(|source| BpfError::Link {
                        prog: "uninstall",
                        source,
                    })?;
                    info!(prog, link_id = id, "detached");
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(pin = %path.display(), error = %e, "not a link; removing the pin");
                    fs::remove_file(&path).map_err(pin_err(&path))?;
                }
            }
            done.links.push(prog.to_owned());
        } else {
            fs::remove_file(&path).map_err(pin_err(&path))?;
            done.maps.push(name);
        }
    }
    fs::remove_dir(pin_dir).map_err(pin_err(pin_dir))?;
    done.dir_removed = true;
    info!(dir = %pin_dir.display(), links = done.links.len(), maps = done.maps.len(),
          "uninstalled: nothing of the mesh is left in the kernel");
    Ok(done)
}

/// Map handles are only touched under their mutex; a panic while holding one
/// leaves the kernel map itself consistent, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn sync_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    want: &[(K, V)],
    name: &'static str,
) -> Result<(), BpfError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    for (k, v) in want {
        map.insert(k, v, 0).map_err(map_err(name))?;
    }
    let keep: HashSet<K> = want.iter().map(|(k, _)| *k).collect();
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(k))
        .collect();
    for k in stale {
        map.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}

/// Whether `map` holds exactly the entries of `want` (one pass over the map).
fn holds_exactly<K, V>(map: &HashMap<MapData, K, V>, want: &[(K, V)]) -> bool
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let want: std::collections::HashMap<K, V> = want.iter().copied().collect();
    let mut seen = 0usize;
    for entry in map.iter() {
        match entry {
            Ok((k, v)) if want.get(&k) == Some(&v) => seen += 1,
            _ => return false,
        }
    }
    seen == want.len()
}

/// An exclusive lock on the pin directory: held by whoever rewrites the config slot or swaps a
/// policy generation (the agent and `mesh-agent policy apply` are different processes).
pub fn lock_pin_dir(dir: &Path) -> io::Result<nix::fcntl::Flock<fs::File>> {
    let file = fs::File::open(dir)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io::Error::from(errno))
}
