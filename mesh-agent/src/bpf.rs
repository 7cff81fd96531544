//! Kernel side of the agent: load the programs, pin the maps, attach to the
//! node's pod cgroup parent, and typed handles on the shared maps.
//!
//! Restart semantics: maps are pinned under the pin directory. A restarted
//! agent (e.g. after SIGKILL) reuses pins whose layout matches this build and
//! replaces the others; the programs themselves are attached through
//! `bpf_link`s owned by the agent process, so the kernel detaches them when
//! the process dies and a restart never stacks a second copy. A clean
//! shutdown detaches and removes the pin directory.
//!
//! [`events`] reads the kernel's `mesh_events` ring buffer.

pub mod events;

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use mesh_common::{
    capacity, counters, names, policy as pol, AgentConfig, CgroupKey, ConnKey, DestValue, IpKey,
    OrigDst, PeerValue, WorkloadValue,
};

use self::events::EventReader;
use tracing::{debug, info, warn};

/// The kernel object built by `mesh-agent/build.rs` from `mesh-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

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
        _ => return None,
    })
}

/// Removes pins in `dir` that this build would not reuse: unknown names and
/// maps whose key/value size or capacity differ.
fn prune_incompatible_pins(dir: &Path) -> Result<(), BpfError> {
    let entries = fs::read_dir(dir).map_err(|source| BpfError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
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
            fs::remove_file(&path).map_err(|source| BpfError::PinDir {
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
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
    pin_dir: PathBuf,
    workloads: Mutex<HashMap<MapData, CgroupKey, WorkloadValue>>,
    dests: Mutex<HashMap<MapData, IpKey, DestValue>>,
    config: Mutex<Array<MapData, AgentConfig>>,
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
        prune_incompatible_pins(pin_dir)?;
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
        for prog in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            let p: &mut CgroupSockAddr = typed_program(&mut ebpf, prog)?;
            p.load().map_err(loaded(prog))?;
            p.attach(&cgroup, CGROUP_ATTACH_MODE)
                .map_err(attached(prog))?;
            info!(prog, cgroup = %pod_cgroup.display(), "attached");
        }
        let prog = names::PROG_SOCKOPS;
        let p: &mut SockOps = typed_program(&mut ebpf, prog)?;
        p.load().map_err(loaded(prog))?;
        p.attach(&cgroup, CGROUP_ATTACH_MODE)
            .map_err(attached(prog))?;
        info!(prog, cgroup = %pod_cgroup.display(), "attached");
        let prog = names::PROG_INGRESS;
        let p: &mut CgroupSkb = typed_program(&mut ebpf, prog)?;
        p.load().map_err(loaded(prog))?;
        p.attach(&cgroup, CgroupSkbAttachType::Ingress, CGROUP_ATTACH_MODE)
            .map_err(attached(prog))?;
        info!(prog, cgroup = %pod_cgroup.display(), "attached");

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
            pin_dir: pin_dir.to_owned(),
            workloads: Mutex::new(workloads),
            dests: Mutex::new(dests),
            config: Mutex::new(config),
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
    pub fn set_config(&self, mut cfg: AgentConfig) -> Result<(), BpfError> {
        let mut config = lock(&self.config);
        cfg.policy_gen = config.get(&0, 0).map(|c| c.policy_gen).unwrap_or(0);
        config.set(0, cfg, 0).map_err(map_err(names::MAP_CONFIG))
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

    /// Detaches the programs and removes the pins. Called on clean shutdown.
    pub fn shutdown(mut self) {
        // Dropping the Ebpf object closes the bpf_link fds: programs detach.
        drop(self.ebpf.take());
        for name in names::ALL_MAPS {
            let path = self.pin_dir.join(name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(pin = %path.display(), error = %e, "removing pin"),
            }
        }
        if let Err(e) = fs::remove_dir(&self.pin_dir) {
            warn!(dir = %self.pin_dir.display(), error = %e, "removing pin directory");
        }
        info!(dir = %self.pin_dir.display(), "detached and unpinned");
    }
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
