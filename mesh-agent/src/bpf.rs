//! Kernel side of the agent: load the programs, pin the maps, attach to the
//! node's pod cgroup parent, and typed handles on the shared maps.
//!
//! Restart semantics: maps are pinned under the pin directory. A restarted
//! agent (e.g. after SIGKILL) reuses pins whose layout matches this build and
//! replaces the others; the programs themselves are attached through
//! `bpf_link`s owned by the agent process, so the kernel detaches them when
//! the process dies and a restart never stacks a second copy. A clean
//! shutdown detaches and removes the pin directory.

use std::{
    collections::HashSet,
    fs,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
    Ebpf, EbpfError, EbpfLoader,
};
use mesh_common::{
    capacity, counters, names, AgentConfig, CgroupKey, ConnKey, DestValue, IpKey, OrigDst,
    WorkloadValue,
};
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
    counters: PerCpuArray<MapData, u64>,
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
        for prog in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(prog)
                .ok_or(BpfError::MissingProgram { prog })?
                .try_into()
                .map_err(|e| BpfError::Program {
                    prog,
                    source: Box::new(e),
                })?;
            p.load().map_err(|e| BpfError::Program {
                prog,
                source: Box::new(e),
            })?;
            p.attach(&cgroup, CGROUP_ATTACH_MODE)
                .map_err(|e| BpfError::Attach {
                    prog,
                    cgroup: pod_cgroup.to_owned(),
                    source: Box::new(e),
                })?;
            info!(prog, cgroup = %pod_cgroup.display(), "attached");
        }
        {
            let prog = names::PROG_SOCKOPS;
            let p: &mut SockOps = ebpf
                .program_mut(prog)
                .ok_or(BpfError::MissingProgram { prog })?
                .try_into()
                .map_err(|e| BpfError::Program {
                    prog,
                    source: Box::new(e),
                })?;
            p.load().map_err(|e| BpfError::Program {
                prog,
                source: Box::new(e),
            })?;
            p.attach(&cgroup, CGROUP_ATTACH_MODE)
                .map_err(|e| BpfError::Attach {
                    prog,
                    cgroup: pod_cgroup.to_owned(),
                    source: Box::new(e),
                })?;
            info!(prog, cgroup = %pod_cgroup.display(), "attached");
        }

        let mut take = |map: &'static str| {
            ebpf.take_map(map)
                .ok_or(BpfError::MissingMap { map })
        };
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

        Ok(Self {
            ebpf: Some(ebpf),
            pin_dir: pin_dir.to_owned(),
            workloads: Mutex::new(workloads),
            dests: Mutex::new(dests),
            config: Mutex::new(config),
            conns: Mutex::new(conns),
            counters,
        })
    }

    /// Publishes where captured connections go. Written before any workload
    /// is enrolled so the kernel never captures towards an unset listener.
    pub fn set_config(&self, cfg: AgentConfig) -> Result<(), BpfError> {
        lock(&self.config)
            .set(0, cfg, 0)
            .map_err(map_err(names::MAP_CONFIG))
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
    let stale: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| !keep.contains(k)).collect();
    for k in stale {
        map.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}
