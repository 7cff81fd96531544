//! The pinned policy maps (`mesh_pol_*`, and `policy_gen` in `mesh_config`): write a
//! generation and swap it in atomically, read a generation back.
//!
//! Update protocol ([`PolicyMaps::apply`]), under an exclusive `flock` on the pin directory
//! (the agent and `mesh-agent policy apply` may both write):
//! 1. `G` = the active generation (`mesh_config.policy_gen`), `N = G + 1` (skipping 0);
//!    entries of any generation other than `G` (left over by a crashed writer) are deleted;
//! 2. generation `N` is written completely; on any error what was written of `N` is removed
//!    and `G` stays active;
//! 3. `policy_gen = N` with one write of the config slot: the kernel and the agents switch;
//! 4. after [`GRACE`] (a program that read `G` just before the flip finishes its lookups),
//!    every entry of generation `G` is deleted.
//!
//! [`PolicyMaps::read_view`] reads one generation back into a [`PolicyView`]: the agent's
//! decisions (L4 on the inbound side, per request on HTTP ports) come from the same entries
//! the kernel reads.
//!
//! Readers and swaps: the kernel reads `policy_gen` once per connect and finishes its lookups
//! well within [`GRACE`], so it only ever sees an intact generation (written completely
//! before the flip, deleted only after the flip and the grace period). A user-space read of
//! a generation is a walk of six maps that may take longer than the grace period, so a
//! reader could overlap the deletion of the generation it reads and see it half deleted (no
//! destination entries: allow-all, failing open; no class: deny-all). Readers therefore use
//! [`PolicyMaps::read_active_view`] ([`read_consistent`]): read the active generation, then
//! check that it is *still* active; deletion starts only after a flip, so a generation that
//! is still active after the read was intact during all of it. Otherwise the read is thrown
//! away and retried on the new generation.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData, MapError,
};
use mesh_common::{
    names,
    policy::{
        PolDstKey, PolDstValue, PolL4Key, PolL4Value, PolL7Key, PolL7Value, PolOpKey, PolOpValue,
        PolPlainData, PolPlainKey, PolPlainValue, PolSrcKey, PolSrcValue, PolStrKey, PolStrValue,
    },
    AgentConfig,
};
use nix::fcntl::Flock;
use tracing::{debug, warn};

use super::compile::CompiledPolicy;
use super::engine::{PolicyView, RawGeneration};

/// How long the old generation stays after the flip.
pub const GRACE: Duration = Duration::from_millis(50);
/// How many times [`read_consistent`] retries a read that overlapped a swap.
pub const READ_ATTEMPTS: usize = 8;

/// Errors of the policy maps, naming the map.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("opening pinned map {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("locking the pin directory {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("generation {gen} is inconsistent: {problem}")]
    Inconsistent { gen: u32, problem: String },
    /// Every read overlapped a swap ([`READ_ATTEMPTS`] of them): nothing consistent was read.
    #[error("the active policy generation changed during each of {attempts} reads")]
    Unstable { attempts: usize },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map {
        map,
        source: Box::new(source),
    }
}

/// Policy map keys carry their generation first.
trait GenKey: aya::Pod + Eq + std::hash::Hash {
    fn gen(&self) -> u32;
    fn set_gen(&mut self, gen: u32);
}

macro_rules! gen_key {
    ($($t:ty),*) => {$(
        impl GenKey for $t {
            fn gen(&self) -> u32 { self.gen }
            fn set_gen(&mut self, gen: u32) { self.gen = gen; }
        }
    )*};
}
gen_key!(PolSrcKey, PolDstKey, PolL4Key, PolL7Key, PolOpKey, PolStrKey);

/// One policy map with its name.
struct GenMap<K, V> {
    name: &'static str,
    map: HashMap<MapData, K, V>,
}

/// Opens the map pinned as `dir/name` as the typed handle `T` (`wrap` names its kind).
fn open_pinned<T: TryFrom<Map, Error = MapError>>(
    dir: &Path,
    name: &str,
    wrap: fn(MapData) -> Map,
) -> Result<T, MapsError> {
    let path = dir.join(name);
    let open_err = |source| MapsError::Open {
        path: path.clone(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    T::try_from(wrap(data)).map_err(open_err)
}

/// Removes `stale` keys of map `name` with `remove` (a key already gone is fine); returns
/// how many.
fn remove_keys<K>(
    name: &'static str,
    stale: Vec<K>,
    mut remove: impl FnMut(&K) -> Result<(), MapError>,
) -> Result<usize, MapsError> {
    for k in &stale {
        match remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(stale.len())
}

impl<K: GenKey, V: aya::Pod> GenMap<K, V> {
    fn open(dir: &Path, name: &'static str) -> Result<Self, MapsError> {
        let map = open_pinned(dir, name, Map::HashMap)?;
        Ok(Self { name, map })
    }

    /// Writes `entries` under generation `gen`; stops at the first error.
    fn write(&mut self, gen: u32, entries: &[(K, V)]) -> Result<(), MapsError> {
        for (k, v) in entries {
            let mut k = *k;
            k.set_gen(gen);
            self.map.insert(k, v, 0).map_err(map_err(self.name))?;
        }
        Ok(())
    }

    /// Deletes every entry whose generation `drop(gen)` says; returns how many.
    fn delete_where(&mut self, drop: impl Fn(u32) -> bool) -> Result<usize, MapsError> {
        let stale: Vec<K> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| drop(k.gen()))
            .collect();
        remove_keys(self.name, stale, |k| self.map.remove(k))
    }

    /// Every entry of generation `gen`.
    fn read(&self, gen: u32) -> Result<Vec<(K, V)>, MapsError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            match item {
                Ok((k, v)) if k.gen() == gen => out.push((k, v)),
                Ok(_) => {}
                // Deleted between the key walk and the lookup (a concurrent swap).
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(self.name)(e)),
            }
        }
        Ok(out)
    }
}

/// Typed handles on the pinned policy maps and `mesh_config`.
pub struct PolicyMaps {
    dir: PathBuf,
    config: Array<MapData, AgentConfig>,
    src: GenMap<PolSrcKey, PolSrcValue>,
    dst: GenMap<PolDstKey, PolDstValue>,
    l4: GenMap<PolL4Key, PolL4Value>,
    l7: GenMap<PolL7Key, PolL7Value>,
    ops: GenMap<PolOpKey, PolOpValue>,
    strs: GenMap<PolStrKey, PolStrValue>,
    plain: PlainMap,
}

/// `mesh_pol_plain`, the LPM trie of plaintext source classes (its generation is in the key
/// data, after the prefix length).
struct PlainMap {
    map: LpmTrie<MapData, PolPlainData, PolPlainValue>,
}

impl PlainMap {
    const NAME: &'static str = names::MAP_POL_PLAIN;

    fn open(dir: &Path) -> Result<Self, MapsError> {
        let map = open_pinned(dir, Self::NAME, Map::LpmTrie)?;
        Ok(Self { map })
    }

    fn write(
        &mut self,
        gen: u32,
        entries: &[(PolPlainKey, PolPlainValue)],
    ) -> Result<(), MapsError> {
        for (k, v) in entries {
            let mut data = k.data;
            data.gen = gen;
            self.map
                .insert(&LpmKey::new(k.prefix_len, data), v, 0)
                .map_err(map_err(Self::NAME))?;
        }
        Ok(())
    }

    fn delete_where(&mut self, drop: impl Fn(u32) -> bool) -> Result<usize, MapsError> {
        let stale: Vec<LpmKey<PolPlainData>> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| drop(k.data().gen))
            .collect();
        remove_keys(Self::NAME, stale, |k| self.map.remove(k))
    }

    fn read(&self, gen: u32) -> Result<Vec<(PolPlainKey, PolPlainValue)>, MapsError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            match item {
                Ok((k, v)) if k.data().gen == gen => out.push((
                    PolPlainKey {
                        prefix_len: k.prefix_len(),
                        data: k.data(),
                    },
                    v,
                )),
                Ok(_) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(Self::NAME)(e)),
            }
        }
        Ok(out)
    }
}

impl PolicyMaps {
    /// Opens the maps pinned in `pin_dir` (by a running agent).
    pub fn open(pin_dir: &Path) -> Result<Self, MapsError> {
        let config = open_pinned(pin_dir, names::MAP_CONFIG, Map::Array)?;
        Ok(Self {
            dir: pin_dir.to_owned(),
            config,
            src: GenMap::open(pin_dir, names::MAP_POL_SRC)?,
            dst: GenMap::open(pin_dir, names::MAP_POL_DST)?,
            l4: GenMap::open(pin_dir, names::MAP_POL_L4)?,
            l7: GenMap::open(pin_dir, names::MAP_POL_L7)?,
            ops: GenMap::open(pin_dir, names::MAP_POL_OPS)?,
            strs: GenMap::open(pin_dir, names::MAP_POL_STRS)?,
            plain: PlainMap::open(pin_dir)?,
        })
    }

    /// The active generation (0: no policy).
    pub fn active_generation(&self) -> Result<u32, MapsError> {
        self.config
            .get(&0, 0)
            .map(|c| c.policy_gen)
            .map_err(map_err(names::MAP_CONFIG))
    }

    /// Writes `compiled` as a new generation and makes it active (see the module docs).
    /// Returns the new generation. On error the previous generation stays active.
    pub fn apply(&mut self, compiled: &CompiledPolicy) -> Result<u32, MapsError> {
        let _lock = lock_dir(&self.dir)?;
        let old = self.active_generation()?;
        let new = match old.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        let leftovers = self.delete_where(|g| g != old)?;
        if leftovers > 0 {
            warn!(
                entries = leftovers,
                "removed leftover policy entries of an unfinished update"
            );
        }
        if let Err(e) = self.write_all(new, compiled) {
            if let Err(cleanup) = self.delete_where(|g| g == new) {
                warn!(error = %cleanup, generation = new, "removing a partly written generation");
            }
            return Err(e);
        }
        let mut cfg = self.config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?;
        cfg.policy_gen = new;
        if let Err(e) = self.config.set(0, cfg, 0) {
            let _ = self.delete_where(|g| g == new);
            return Err(map_err(names::MAP_CONFIG)(e));
        }
        std::thread::sleep(GRACE);
        let removed = self.delete_where(|g| g != new)?;
        debug!(
            generation = new,
            previous = old,
            removed,
            "policy generation swapped"
        );
        Ok(new)
    }

    fn write_all(&mut self, gen: u32, c: &CompiledPolicy) -> Result<(), MapsError> {
        // Strings and operations before what refers to them; destinations last.
        self.strs.write(gen, &c.strs)?;
        self.ops.write(gen, &c.ops)?;
        self.l7.write(gen, &c.l7)?;
        self.l4.write(gen, &c.l4)?;
        self.plain.write(gen, &c.plain)?;
        self.src.write(gen, &c.src)?;
        self.dst.write(gen, &c.dst)
    }

    fn delete_where(&mut self, drop: impl Fn(u32) -> bool + Copy) -> Result<usize, MapsError> {
        Ok(self.dst.delete_where(drop)?
            + self.src.delete_where(drop)?
            + self.l4.delete_where(drop)?
            + self.l7.delete_where(drop)?
            + self.ops.delete_where(drop)?
            + self.strs.delete_where(drop)?
            + self.plain.delete_where(drop)?)
    }

    /// Reads the active generation consistently: never a generation that was being deleted
    /// ([`read_consistent`]).
    pub fn read_active_view(&self) -> Result<PolicyView, MapsError> {
        read_consistent(|| self.active_generation(), |gen| self.read_view(gen))
    }

    /// Reads generation `gen` back (an empty, allow-all view for 0). Only consistent if `gen`
    /// stays active during the read: see [`Self::read_active_view`].
    pub fn read_view(&self, gen: u32) -> Result<PolicyView, MapsError> {
        if gen == 0 {
            return Ok(PolicyView::default());
        }
        PolicyView::build(gen, self.read_raw(gen)?)
    }

    /// Every entry of generation `gen`, as stored.
    fn read_raw(&self, gen: u32) -> Result<RawGeneration, MapsError> {
        Ok(RawGeneration {
            src: self.src.read(gen)?,
            dst: self.dst.read(gen)?,
            l4: self.l4.read(gen)?,
            l7: self.l7.read(gen)?,
            ops: self.ops.read(gen)?,
            strs: self.strs.read(gen)?,
            plain: self.plain.read(gen)?,
        })
    }

    /// A SHA-256 of every entry of generation `gen` (order-independent): equal digests, equal
    /// content. What a writer compares against to notice entries changed behind its back.
    pub fn content_digest(&self, gen: u32) -> Result<[u8; 32], MapsError> {
        let raw = self.read_raw(gen)?;
        let mut lines: Vec<String> = Vec::new();
        lines.extend(raw.src.iter().map(|e| format!("src {e:?}")));
        lines.extend(raw.dst.iter().map(|e| format!("dst {e:?}")));
        lines.extend(raw.l4.iter().map(|e| format!("l4 {e:?}")));
        lines.extend(raw.l7.iter().map(|e| format!("l7 {e:?}")));
        lines.extend(raw.ops.iter().map(|e| format!("op {e:?}")));
        lines.extend(raw.strs.iter().map(|e| format!("str {e:?}")));
        lines.extend(raw.plain.iter().map(|e| format!("plain {e:?}")));
        lines.sort_unstable();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for l in &lines {
            ctx.update(l.as_bytes());
            ctx.update(b"\n");
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Ok(out)
    }
}

/// Reads the generation `active()` names with `read(gen)`, then checks that it is still the
/// active one; if not, the read may have overlapped its deletion (which starts only after a
/// flip) and is retried on the new one, up to [`READ_ATTEMPTS`] times. A view whose
/// generation stayed active from before to after the read was read intact. An
/// [`MapsError::Inconsistent`] read is retried the same way when the generation changed
/// meanwhile (it was being deleted), and returned when it did not (a real inconsistency).
pub fn read_consistent<T>(
    active: impl Fn() -> Result<u32, MapsError>,
    read: impl Fn(u32) -> Result<T, MapsError>,
) -> Result<T, MapsError> {
    let mut gen = active()?;
    for _ in 0..READ_ATTEMPTS {
        let result = read(gen);
        let now = active()?;
        if now == gen {
            return result;
        }
        debug!(
            generation = gen,
            active = now,
            "policy generation swapped during a read; reading again"
        );
        gen = now;
    }
    Err(MapsError::Unstable {
        attempts: READ_ATTEMPTS,
    })
}

/// Exclusive lock on the pin directory, released on drop.
fn lock_dir(dir: &Path) -> Result<Flock<File>, MapsError> {
    crate::bpf::lock_pin_dir(dir).map_err(|source| MapsError::Lock {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::{
        compile,
        tests::{policy, registry},
    };
    use crate::policy::engine::{tests::get_api, Family};
    use crate::policy::model::{Action, PolicyBundle, Rule};
    use crate::policy::ConnVerdict;
    use std::{collections::HashMap as StdHashMap, sync::Arc};

    /// Generations in memory, written and deleted map by map with the protocol of
    /// [`PolicyMaps::apply`], read map by map as [`PolicyMaps::read_view`] does.
    struct FakeMaps {
        active: std::sync::atomic::AtomicU32,
        gens: std::sync::Mutex<StdHashMap<u32, RawGeneration>>,
    }

    /// The maps of a generation, in the order the reader walks them (as `read_view`).
    const READ_ORDER: [&str; 6] = ["src", "dst", "l4", "l7", "ops", "strs"];

    impl FakeMaps {
        fn new() -> Self {
            Self {
                active: std::sync::atomic::AtomicU32::new(0),
                gens: std::sync::Mutex::new(StdHashMap::new()),
            }
        }

        fn active(&self) -> Result<u32, MapsError> {
            Ok(self.active.load(std::sync::atomic::Ordering::SeqCst))
        }

        fn with<R>(&self, f: impl FnOnce(&mut StdHashMap<u32, RawGeneration>) -> R) -> R {
            f(&mut self.gens.lock().unwrap_or_else(|p| p.into_inner()))
        }

        /// One map of generation `gen` (empty if gone), copied under the lock.
        fn read_map(&self, gen: u32, map: &str, into: &mut RawGeneration) {
            self.with(|g| {
                let Some(r) = g.get(&gen) else { return };
                match map {
                    "src" => into.src = r.src.clone(),
                    "dst" => into.dst = r.dst.clone(),
                    "l4" => into.l4 = r.l4.clone(),
                    "l7" => into.l7 = r.l7.clone(),
                    "ops" => into.ops = r.ops.clone(),
                    _ => into.strs = r.strs.clone(),
                }
            });
        }

        /// `read_view`: map by map, `between` called after each.
        fn read_view(
            &self,
            gen: u32,
            between: &mut dyn FnMut(&str),
        ) -> Result<PolicyView, MapsError> {
            if gen == 0 {
                return Ok(PolicyView::default());
            }
            let mut raw = RawGeneration::default();
            for map in READ_ORDER {
                self.read_map(gen, map, &mut raw);
                between(map);
            }
            PolicyView::build(gen, raw)
        }

        /// `apply`'s protocol: write the new generation, flip, (grace), delete the old one
        /// map by map in `apply`'s order (destinations first), `between` after each step.
        fn swap(&self, c: &CompiledPolicy, between: &mut dyn FnMut()) -> u32 {
            let old = self.active.load(std::sync::atomic::Ordering::SeqCst);
            let new = old + 1;
            self.with(|g| g.insert(new, RawGeneration::from(c)));
            self.active.store(new, std::sync::atomic::Ordering::SeqCst);
            between();
            for map in ["dst", "src", "l4", "l7", "ops", "strs"] {
                self.with(|g| {
                    if let Some(r) = g.get_mut(&old) {
                        match map {
                            "dst" => r.dst.clear(),
                            "src" => r.src.clear(),
                            "l4" => r.l4.clear(),
                            "l7" => r.l7.clear(),
                            "ops" => r.ops.clear(),
                            _ => r.strs.clear(),
                        }
                    }
                });
                between();
            }
            self.with(|g| g.remove(&old));
            new
        }
    }

    /// What a view decides, comparable.
    fn summary(v: &PolicyView) -> (usize, Vec<(u32, u32)>, Vec<u32>) {
        (v.l4_entries(), v.destinations(), v.permissive_workloads())
    }

    fn two_generations() -> (CompiledPolicy, CompiledPolicy) {
        let compile_one = crate::policy::engine::tests::compiled;
        let a = compile_one(vec![get_api(Action::Allow, "allow-get")]);
        let b = compile_one(vec![
            get_api(Action::Deny, "deny-get"),
            policy(
                "other",
                "allow-c",
                None,
                Action::Allow,
                Some(vec![Rule::default()]),
            ),
        ]);
        assert_ne!(
            summary(&PolicyView::from_compiled(1, &a).unwrap()),
            summary(&PolicyView::from_compiled(1, &b).unwrap())
        );
        (a, b)
    }

    #[test]
    fn a_read_overlapping_a_swap_is_thrown_away_and_retried() {
        let (a, b) = two_generations();
        let maps = FakeMaps::new();
        maps.swap(&a, &mut || {});
        let g = maps.active().unwrap();
        // The reader reads `src` of G; then the whole swap to N runs, G is deleted; the
        // reader goes on reading G's other maps: what it read is half of G.
        let swapped = std::cell::Cell::new(false);
        let naive = maps
            .read_view(g, &mut |map| {
                if map == "src" && !swapped.get() {
                    swapped.set(true);
                    maps.swap(&b, &mut || {});
                }
            })
            .unwrap();
        // Half a generation: its classes but no destinations — every destination is "not
        // selected by any policy", i.e. allow-all. This is the failure being fixed.
        assert!(naive.destinations().is_empty());
        assert_eq!(
            naive.decide_l4(1, 3, Family::V4, 8080).verdict,
            ConnVerdict::Allow
        );

        // The same interleaving through `read_consistent`: the first read is discarded (the
        // active generation changed), the second reads N whole.
        maps.swap(&a, &mut || {});
        let g = maps.active().unwrap();
        let swapped = std::cell::Cell::new(false);
        let view = read_consistent(
            || maps.active(),
            |gen| {
                maps.read_view(gen, &mut |map| {
                    if map == "src" && !swapped.get() {
                        swapped.set(true);
                        maps.swap(&b, &mut || {});
                    }
                })
            },
        )
        .unwrap();
        assert_eq!(view.generation(), g + 1);
        assert_eq!(
            summary(&view),
            summary(&PolicyView::from_compiled(1, &b).unwrap())
        );
    }

    #[test]
    fn readers_racing_swaps_only_see_whole_generations() {
        let (a, b) = two_generations();
        let want = [
            summary(&PolicyView::from_compiled(1, &a).unwrap()),
            summary(&PolicyView::from_compiled(1, &b).unwrap()),
        ];
        let maps = Arc::new(FakeMaps::new());
        maps.swap(&a, &mut || {});
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (maps, stop, want) = (Arc::clone(&maps), Arc::clone(&stop), want.clone());
                std::thread::spawn(move || {
                    let (mut reads, mut torn) = (0u32, 0u32);
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let v = read_consistent(
                            || maps.active(),
                            |gen| maps.read_view(gen, &mut |_| std::thread::yield_now()),
                        );
                        match v {
                            Ok(v) => {
                                // Odd generations are `a`, even ones `b`.
                                let expected = &want[((v.generation() + 1) % 2) as usize];
                                assert_eq!(&summary(&v), expected, "generation {}", v.generation());
                                reads += 1;
                            }
                            Err(MapsError::Unstable { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                        // The naive read, for the record: torn reads do happen here.
                        let g = maps.active().unwrap();
                        if let Ok(v) = maps.read_view(g, &mut |_| std::thread::yield_now()) {
                            let expected = &want[((g + 1) % 2) as usize];
                            if &summary(&v) != expected {
                                torn += 1;
                            }
                        }
                    }
                    (reads, torn)
                })
            })
            .collect();
        for i in 0..400 {
            let c = if i % 2 == 0 { &b } else { &a };
            maps.swap(c, &mut || std::thread::yield_now());
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut total = 0;
        for r in readers {
            let (reads, _torn) = r.join().unwrap();
            total += reads;
        }
        assert!(total > 0, "no consistent read completed");
    }

    #[test]
    fn inconsistent_generation_refused() {
        let v = vec![get_api(Action::Allow, "allow-get")];
        let c = compile(
            &PolicyBundle {
                authz: v,
                peer_authn: vec![],
            },
            &registry(),
            "istio-system",
            "cluster.local",
        )
        .unwrap();
        let mut raw = RawGeneration::from(&c);
        raw.ops.clear();
        assert!(matches!(
            PolicyView::build(3, raw),
            Err(MapsError::Inconsistent { gen: 3, .. })
        ));
    }
}
