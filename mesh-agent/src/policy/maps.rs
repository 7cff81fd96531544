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
    collections::HashMap as StdHashMap,
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::Arc,
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
        PLAIN_GEN_BITS, POL_ACTION_ALLOW, POL_ACTION_AUDIT, POL_ACTION_DENY, POL_ALLOW, POL_DENY,
        POL_DST_F_PERMISSIVE, POL_FIELD_GROUP_SHIFT, POL_FIELD_HEADER, POL_FIELD_HOST,
        POL_FIELD_MASK, POL_FIELD_METHOD, POL_FIELD_NOT_HEADER, POL_FIELD_NOT_HOST,
        POL_FIELD_NOT_METHOD, POL_FIELD_NOT_PATH, POL_FIELD_PATH, POL_F_AUDIT, POL_F_AUDIT_L7,
        POL_F_DRY_RUN_DENY, POL_F_DRY_RUN_L4_ALLOWED, POL_F_DRY_RUN_L7, POL_F_L4_ALLOWED, POL_L7,
        POL_L7_F_DRY_RUN, POL_MATCH_EXACT, POL_MATCH_PREFIX, POL_MATCH_PRESENCE, POL_MATCH_SUFFIX,
        POL_MATCH_TEMPLATE, POL_STR_MAX,
    },
    AgentConfig,
};
use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, warn};

use super::compile::CompiledPolicy;
use super::model::Pattern;

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
        let raw = RawGeneration {
            src: self.src.read(gen)?,
            dst: self.dst.read(gen)?,
            l4: self.l4.read(gen)?,
            l7: self.l7.read(gen)?,
            ops: self.ops.read(gen)?,
            strs: self.strs.read(gen)?,
            plain: self.plain.read(gen)?,
        };
        PolicyView::build(gen, raw)
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
    let file = File::open(dir).map_err(|source| MapsError::Lock {
        path: dir.to_owned(),
        source,
    })?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| MapsError::Lock {
        path: dir.to_owned(),
        source: io::Error::from(errno),
    })
}

/// The entries of one generation, as read.
#[derive(Clone, Debug, Default)]
pub struct RawGeneration {
    pub src: Vec<(PolSrcKey, PolSrcValue)>,
    pub dst: Vec<(PolDstKey, PolDstValue)>,
    pub l4: Vec<(PolL4Key, PolL4Value)>,
    pub l7: Vec<(PolL7Key, PolL7Value)>,
    pub ops: Vec<(PolOpKey, PolOpValue)>,
    pub strs: Vec<(PolStrKey, PolStrValue)>,
    pub plain: Vec<(PolPlainKey, PolPlainValue)>,
}

impl From<&CompiledPolicy> for RawGeneration {
    fn from(c: &CompiledPolicy) -> Self {
        Self {
            src: c.src.clone(),
            dst: c.dst.clone(),
            l4: c.l4.clone(),
            l7: c.l7.clone(),
            ops: c.ops.clone(),
            strs: c.strs.clone(),
            plain: c.plain.clone(),
        }
    }
}

/// An address family, for the source class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// One term of a request-level clause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// `POL_FIELD_*`.
    pub field: u32,
    /// `POL_MATCH_*`.
    pub kind: u32,
    /// The pattern (empty for presence).
    pub pattern: Arc<str>,
}

/// A request-level clause of an L4 entry (`mesh_pol_l7` with its terms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause {
    /// `POL_ACTION_*`.
    pub action: u32,
    /// From a dry-run policy: reported, never enforced.
    pub dry_run: bool,
    /// The policy (`ns/name`).
    pub policy: Option<Arc<str>>,
    pub terms: Vec<Term>,
}

/// A request's header fields, as the policy reads them.
pub trait RequestHeaders {
    /// Calls `f` with every value of header `name` (given lowercase; compare names
    /// case-insensitively), in the order received.
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8]));
}

/// A request without header fields (or whose headers no policy reads).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHeaders;

impl RequestHeaders for NoHeaders {
    fn for_each_value(&self, _: &str, _: &mut dyn FnMut(&[u8])) {}
}

/// Header fields as (name, value) pairs.
impl RequestHeaders for &[(&str, &str)] {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for (n, v) in self.iter() {
            if n.eq_ignore_ascii_case(name) {
                f(v.as_bytes());
            }
        }
    }
}

/// One HTTP request as a clause matches it: absent method/host are `""`; `path` without its
/// query string (see [`PolicyView::decide_request_with`]).
#[derive(Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a dyn RequestHeaders,
}

impl std::fmt::Debug for RequestFacts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestFacts")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Clause {
    /// [`Self::matches_request`] for a request without header fields.
    pub fn matches(&self, method: &str, path: &str, host: &str) -> bool {
        self.matches_request(&RequestFacts {
            method,
            path,
            host,
            headers: &NoHeaders,
        })
    }

    /// Whether the request matches. Terms are grouped by (field, group) — the field's high
    /// bits (`POL_FIELD_GROUP_SHIFT`) are the group: in a group a positive field (`METHOD`,
    /// `PATH`, `HOST`, `HEADER`) matches when any of its terms does, a negative one (`NOT_*`)
    /// when none does; every group present must match; no terms match every request. An
    /// absent method, path or host is the empty string (which matches no pattern but an
    /// exact `""`); an absent header matches no pattern, not even presence. Hosts compare
    /// ASCII case-insensitively (patterns are stored lowercase), exactly as sent. A clause
    /// with a field or kind this version does not know fails closed: an ALLOW clause never
    /// matches, any other always does (a wider deny or audit).
    pub fn matches_request(&self, req: &RequestFacts<'_>) -> bool {
        let known = |t: &Term| {
            pattern_of(t.kind, "").is_some()
                && (POL_FIELD_METHOD..=POL_FIELD_NOT_HEADER).contains(&(t.field & POL_FIELD_MASK))
        };
        if !self.terms.iter().all(known) {
            return self.action != POL_ACTION_ALLOW;
        }
        // (positive field, group) of each term; the negative field of a pair shares it.
        let pair = |field: u32| {
            let base = field & POL_FIELD_MASK;
            let group = field >> POL_FIELD_GROUP_SHIFT;
            let positive = match base {
                POL_FIELD_NOT_METHOD => POL_FIELD_METHOD,
                POL_FIELD_NOT_PATH => POL_FIELD_PATH,
                POL_FIELD_NOT_HOST => POL_FIELD_HOST,
                POL_FIELD_NOT_HEADER => POL_FIELD_HEADER,
                b => b,
            };
            (positive, group, base != positive)
        };
        let mut header: Option<(String, Option<Vec<u8>>)> = None;
        let mut hit = |t: &Term| -> bool {
            match t.field & POL_FIELD_MASK {
                POL_FIELD_METHOD | POL_FIELD_NOT_METHOD => t.matches(req.method),
                POL_FIELD_PATH | POL_FIELD_NOT_PATH => t.matches(req.path),
                POL_FIELD_HOST | POL_FIELD_NOT_HOST => t.matches(req.host),
                POL_FIELD_HEADER | POL_FIELD_NOT_HEADER => {
                    let Some((name, pattern)) = t.pattern.split_once(':') else {
                        return false;
                    };
                    // One header looked up per group, joined as Envoy sees repeated fields.
                    if header.as_ref().is_none_or(|(n, _)| n != name) {
                        let mut values = Vec::new();
                        req.headers
                            .for_each_value(name, &mut |v| values.push(v.to_vec()));
                        let joined = super::eval::join_values(values.iter().map(Vec::as_slice));
                        header = Some((name.to_owned(), joined));
                    }
                    let value = header.as_ref().and_then(|(_, v)| v.as_deref());
                    match pattern_of(t.kind, pattern) {
                        Some(p) => super::eval::header_pattern_matches(p, value),
                        None => false,
                    }
                }
                _ => false,
            }
        };
        let mut done: Vec<(u32, u32)> = Vec::new();
        for t in &self.terms {
            let (positive, group, _) = pair(t.field);
            if done.contains(&(positive, group)) {
                continue;
            }
            done.push((positive, group));
            let mut any_positive = false;
            let mut positive_hit = false;
            for u in self.terms.iter().filter(|u| {
                let (p, g, _) = pair(u.field);
                (p, g) == (positive, group)
            }) {
                let negative = pair(u.field).2;
                if negative {
                    if hit(u) {
                        return false;
                    }
                } else {
                    any_positive = true;
                    positive_hit = positive_hit || hit(u);
                }
            }
            if any_positive && !positive_hit {
                return false;
            }
        }
        true
    }
}

/// The request path as policies see it: without query string or fragment.
fn policy_path(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or("")
}

/// A term's kind and pattern as a [`Pattern`]; `None` for an unknown kind.
fn pattern_of(kind: u32, p: &str) -> Option<Pattern<'_>> {
    Some(match kind {
        POL_MATCH_EXACT => Pattern::Exact(p),
        POL_MATCH_PREFIX => Pattern::Prefix(p),
        POL_MATCH_SUFFIX => Pattern::Suffix(p),
        POL_MATCH_PRESENCE => Pattern::Presence,
        POL_MATCH_TEMPLATE => Pattern::Template(p),
        _ => return None,
    })
}

impl Term {
    fn matches(&self, value: &str) -> bool {
        // Unknown kinds never match (a newer compiler): ALLOW clauses then fail closed.
        let Some(pattern) = pattern_of(self.kind, &self.pattern) else {
            return false;
        };
        let field = self.field & POL_FIELD_MASK;
        if field == POL_FIELD_HOST || field == POL_FIELD_NOT_HOST {
            // Hosts match as the reference evaluator matches them (case-insensitively).
            return super::eval::host_pattern_matches(pattern, value);
        }
        pattern.matches(value)
    }
}

/// The L4 entry of (set, class, port) with its clauses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Entry {
    pub value: PolL4Value,
    pub clauses: Vec<Clause>,
}

/// The verdict at L4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Verdict {
    Allow,
    Deny,
    /// Allowed at L4, decided per request ([`PolicyView::decide_request`]).
    PerRequest,
}

/// What [`PolicyView::decide_l4`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Decision {
    pub verdict: L4Verdict,
    /// The deciding policy, if one decided (none: no policy selects the destination, or the
    /// default deny of ALLOW policies that matched nothing, or an inconsistency).
    pub policy: Option<Arc<str>>,
    /// A dry-run policy would deny at L4 (the policy, if one is named).
    pub dry_run_deny: Option<Option<Arc<str>>>,
    /// An AUDIT policy matched at L4.
    pub audit: Option<Arc<str>>,
    /// (set, class) to pass to `decide_request`; `None` when no policy selects the
    /// destination.
    pub key: Option<(u32, u32)>,
    /// Requests must be evaluated (the verdict is per request, or a dry-run or AUDIT policy
    /// may match per request).
    pub needs_request: bool,
}

/// What [`PolicyView::decide_request`] found for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestDecision {
    pub allowed: bool,
    /// The deciding policy, if one decided.
    pub policy: Option<Arc<str>>,
    /// The request is allowed but dry-run policies would deny it (with the policy, if named).
    pub dry_run_deny: Option<Option<Arc<str>>>,
    /// AUDIT policies that matched (L4 and per request, without repetition).
    pub audit: Vec<Arc<str>>,
}

/// One generation of the policy maps, in memory, for the agent's decisions.
#[derive(Clone, Debug, Default)]
pub struct PolicyView {
    gen: u32,
    /// Destination workload → policy set (workloads no policy selects are absent).
    dst: StdHashMap<u32, u32>,
    /// Workloads whose effective PeerAuthentication is PERMISSIVE (`POL_DST_F_PERMISSIVE`).
    permissive: std::collections::HashSet<u32>,
    src: StdHashMap<u32, PolSrcValue>,
    l4: StdHashMap<(u32, u32, u32), L4Entry>,
    strings: StdHashMap<u32, Arc<str>>,
    l4_entries: usize,
    /// `mesh_pol_plain`: (prefix length in the mapped 128-bit space, address, class), longest
    /// prefixes first.
    plain: Vec<(u32, u128, u32)>,
    /// Every decision denies (a generation that could not be read back).
    deny_all: bool,
}

impl PolicyView {
    /// Builds the view of generation `gen` from its entries; refuses an inconsistent one
    /// (a clause, term or string referred to but missing).
    pub fn build(gen: u32, raw: RawGeneration) -> Result<Self, MapsError> {
        let bad = |problem: String| MapsError::Inconsistent { gen, problem };
        let mut strings = StdHashMap::new();
        for (k, v) in &raw.strs {
            let len = (v.len as usize).min(POL_STR_MAX);
            let s = String::from_utf8_lossy(&v.bytes[..len]);
            strings.insert(k.str_id, Arc::<str>::from(s.as_ref()));
        }
        let string = |id: u32| -> Result<Option<Arc<str>>, MapsError> {
            if id == 0 {
                return Ok(None);
            }
            strings
                .get(&id)
                .cloned()
                .map(Some)
                .ok_or_else(|| bad(format!("string {id} missing")))
        };
        let ops: StdHashMap<(u32, u32), PolOpValue> = raw
            .ops
            .iter()
            .map(|(k, v)| ((k.op_id, k.index), *v))
            .collect();
        let l7: StdHashMap<(u32, u32, u32, u32), PolL7Value> = raw
            .l7
            .iter()
            .map(|(k, v)| ((k.set_id, k.class_id, k.port, k.index), *v))
            .collect();
        let mut l4 = StdHashMap::with_capacity(raw.l4.len());
        for (k, v) in &raw.l4 {
            let mut clauses = Vec::with_capacity(v.l7_count as usize);
            for index in 0..v.l7_count {
                let c = l7
                    .get(&(k.set_id, k.class_id, k.port, index))
                    .ok_or_else(|| bad(format!("clause {index} of {k:?} missing")))?;
                let mut terms = Vec::with_capacity(c.op_count as usize);
                for t in 0..c.op_count {
                    let op = ops
                        .get(&(c.op_id, t))
                        .ok_or_else(|| bad(format!("term {t} of operation {} missing", c.op_id)))?;
                    let pattern = string(op.str_id)?.unwrap_or_else(|| Arc::from(""));
                    terms.push(Term {
                        field: op.field,
                        kind: op.kind,
                        pattern,
                    });
                }
                clauses.push(Clause {
                    action: c.action,
                    dry_run: c.flags & POL_L7_F_DRY_RUN != 0,
                    policy: string(c.policy_str)?,
                    terms,
                });
            }
            l4.insert(
                (k.set_id, k.class_id, k.port),
                L4Entry { value: *v, clauses },
            );
        }
        Ok(Self {
            gen,
            dst: raw
                .dst
                .iter()
                .filter(|(_, v)| v.set_id != 0)
                .map(|(k, v)| (k.workload_id, v.set_id))
                .collect(),
            permissive: raw
                .dst
                .iter()
                .filter(|(_, v)| v.flags & POL_DST_F_PERMISSIVE != 0)
                .map(|(k, _)| k.workload_id)
                .collect(),
            src: raw.src.iter().map(|(k, v)| (k.workload_id, *v)).collect(),
            l4_entries: l4.len(),
            l4,
            strings,
            plain: {
                let mut plain: Vec<(u32, u128, u32)> = raw
                    .plain
                    .iter()
                    .map(|(k, v)| {
                        let b = k.data.addr_be;
                        let bytes: Vec<u8> = b.iter().flat_map(|w| w.to_ne_bytes()).collect();
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&bytes);
                        (
                            k.prefix_len.saturating_sub(PLAIN_GEN_BITS).min(128),
                            u128::from_be_bytes(a),
                            v.class_id,
                        )
                    })
                    .collect();
                plain.sort_by_key(|e| std::cmp::Reverse(e.0));
                plain
            },
            deny_all: false,
        })
    }

    /// The view of `compiled` as generation `gen`, built in memory: what
    /// [`PolicyMaps::apply`] writes and [`PolicyMaps::read_view`] reads back, without BPF.
    pub fn from_compiled(gen: u32, compiled: &CompiledPolicy) -> Result<Self, MapsError> {
        Self::build(gen, RawGeneration::from(compiled))
    }

    /// A view of generation `gen` in which everything is denied (fail closed, for a
    /// generation that could not be read back).
    pub fn deny_all(gen: u32) -> Self {
        Self {
            gen,
            deny_all: true,
            ..Self::default()
        }
    }

    /// The generation this view is of (0: no policy).
    pub fn generation(&self) -> u32 {
        self.gen
    }

    /// Number of L4 entries.
    pub fn l4_entries(&self) -> usize {
        self.l4_entries
    }

    /// The string `id` (policy names in events).
    pub fn string(&self, id: u32) -> Option<Arc<str>> {
        self.strings.get(&id).cloned()
    }

    /// Every (destination workload, set) pair, by workload id.
    pub fn destinations(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = self.dst.iter().map(|(w, s)| (*w, *s)).collect();
        out.sort_unstable();
        out
    }

    /// Whether workload `workload_id` is PERMISSIVE in this generation (its effective
    /// PeerAuthentication; `false` for a generation 0 view: the registry decides then).
    pub fn permissive(&self, workload_id: u32) -> bool {
        self.permissive.contains(&workload_id)
    }

    /// Workloads that are PERMISSIVE in this generation, sorted.
    pub fn permissive_workloads(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.permissive.iter().copied().collect();
        out.sort_unstable();
        out
    }

    /// The policy set of destination workload `workload_id` (`None`: no policy selects it).
    pub fn dst_set(&self, workload_id: u32) -> Option<u32> {
        self.dst.get(&workload_id).copied()
    }

    /// The source class of workload `workload_id` for connections from its `family` address.
    pub fn src_class(&self, workload_id: u32, family: Family) -> Option<u32> {
        self.src.get(&workload_id).map(|v| match family {
            Family::V4 => v.class4,
            Family::V6 => v.class6,
        })
    }

    /// The class of plaintext from `ip`: the longest `mesh_pol_plain` prefix containing it —
    /// the kernel's lookup.
    pub fn plain_class(&self, ip: std::net::IpAddr) -> Option<u32> {
        let v6 = match ip.to_canonical() {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
            std::net::IpAddr::V6(a) => a,
        };
        let addr = u128::from(v6);
        self.plain
            .iter()
            .find(|(bits, net, _)| {
                let mask = if *bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                addr & mask == *net & mask
            })
            .map(|(_, _, class)| *class)
    }

    /// The L4 decision for plaintext (accepted under PERMISSIVE: no principal, no namespace)
    /// from `src_ip` to `dst_workload` port `port`, as the kernel's ingress program decides
    /// it: no policy set → allow; the class by longest prefix; its entry's `POL_ALLOW` allows,
    /// anything else denies — `POL_L7` too (`needs_request` says so), since plaintext cannot
    /// reach the agent for the request (fail closed); a missing class or entry denies.
    pub fn decide_plaintext(
        &self,
        src_ip: std::net::IpAddr,
        dst_workload: u32,
        port: u16,
    ) -> L4Decision {
        self.decide_class(dst_workload, || self.plain_class(src_ip), port, true)
    }

    /// The entry for (set, class, port), else (set, class, 0) — the kernel's lookup.
    pub fn l4_entry(&self, set: u32, class: u32, port: u16) -> Option<&L4Entry> {
        self.l4
            .get(&(set, class, u32::from(port)))
            .or_else(|| self.l4.get(&(set, class, 0)))
    }

    /// The L4 decision for a connection from `src_workload` (its `family` address) to
    /// `dst_workload` port `port`, exactly as the kernel decides it: no policy set → allow;
    /// a missing class or entry, or an unknown verdict → deny (fail closed).
    pub fn decide_l4(
        &self,
        src_workload: u32,
        dst_workload: u32,
        family: Family,
        port: u16,
    ) -> L4Decision {
        self.decide_class(
            dst_workload,
            || self.src_class(src_workload, family),
            port,
            false,
        )
    }

    /// The kernel's L4 lookup for a source of class `class()` (looked up only when a policy
    /// set selects the destination). `plaintext`: only `POL_ALLOW` allows, no dry run or
    /// audit (the ingress program's reading); else the connect program's.
    fn decide_class(
        &self,
        dst_workload: u32,
        class: impl FnOnce() -> Option<u32>,
        port: u16,
        plaintext: bool,
    ) -> L4Decision {
        let deny = |key| L4Decision {
            verdict: L4Verdict::Deny,
            policy: None,
            dry_run_deny: None,
            audit: None,
            key,
            needs_request: false,
        };
        if self.deny_all {
            return deny(None);
        }
        let Some(set) = self.dst_set(dst_workload) else {
            return L4Decision {
                verdict: L4Verdict::Allow,
                ..deny(None)
            };
        };
        let Some(class) = class() else {
            return deny(None);
        };
        let Some(entry) = self.l4_entry(set, class, port) else {
            return deny(Some((set, class)));
        };
        let v = entry.value;
        let verdict = match v.verdict {
            POL_ALLOW => L4Verdict::Allow,
            POL_L7 if !plaintext => L4Verdict::PerRequest,
            _ => L4Verdict::Deny,
        };
        if plaintext {
            return L4Decision {
                verdict,
                policy: self.string(v.policy_str),
                key: Some((set, class)),
                needs_request: v.verdict == POL_L7,
                ..deny(None)
            };
        }
        let allowed = verdict != L4Verdict::Deny;
        L4Decision {
            verdict,
            policy: self.string(v.policy_str),
            dry_run_deny: (allowed && v.flags & POL_F_DRY_RUN_DENY != 0)
                .then(|| self.string(v.dry_run_str)),
            audit: (v.flags & POL_F_AUDIT != 0)
                .then(|| self.string(v.audit_str))
                .flatten(),
            key: Some((set, class)),
            needs_request: allowed
                && (verdict == L4Verdict::PerRequest
                    || v.flags & (POL_F_DRY_RUN_L7 | POL_F_AUDIT_L7) != 0),
        }
    }

    /// The decision for one HTTP request on a connection of (set, class) to `port`
    /// (from [`L4Decision::key`]); `path` is the request target as sent (its query string
    /// and fragment are ignored), `host` is `Host`/`:authority`; absent values are `""`.
    ///
    /// 1. The entry (port, else port 0); none: denied (fail closed).
    /// 2. Enforced: `POL_DENY` → denied (entry policy); `POL_ALLOW` → allowed (entry policy);
    ///    `POL_L7` → the first non-dry-run DENY clause that matches denies (its policy);
    ///    else with `POL_F_L4_ALLOWED` allowed (entry policy); else the first non-dry-run
    ///    ALLOW clause that matches allows (its policy); else denied (no policy). Any other
    ///    verdict: denied.
    /// 3. Dry run, only for an allowed request: `POL_F_DRY_RUN_DENY` → would deny (entry
    ///    `dry_run_str`); `POL_F_DRY_RUN_L7` → the same as 2 over every clause, dry-run ones
    ///    included, with `POL_F_DRY_RUN_L4_ALLOWED` in place of `POL_F_L4_ALLOWED`; a denial
    ///    there is reported as `dry_run_deny` (the DENY clause's policy, or the first dry-run
    ///    ALLOW clause's policy for a default deny).
    /// 4. Audit: `POL_F_AUDIT` (entry `audit_str`) and every AUDIT clause that matches.
    pub fn decide_request(
        &self,
        set: u32,
        class: u32,
        port: u16,
        method: &str,
        path: &str,
        host: &str,
    ) -> RequestDecision {
        self.decide_request_with(
            set,
            class,
            port,
            &RequestFacts {
                method,
                path,
                host,
                headers: &NoHeaders,
            },
        )
    }

    /// [`Self::decide_request`] with the request's header fields (`when`
    /// `request.headers[...]` conditions read them).
    pub fn decide_request_with(
        &self,
        set: u32,
        class: u32,
        port: u16,
        req: &RequestFacts<'_>,
    ) -> RequestDecision {
        let RequestFacts {
            method, path, host, ..
        } = *req;
        if self.deny_all {
            return RequestDecision::default();
        }
        let Some(entry) = self.l4_entry(set, class, port) else {
            return RequestDecision::default();
        };
        let v = entry.value;
        let facts = RequestFacts {
            method,
            path: policy_path(path),
            host,
            headers: req.headers,
        };
        let matching = |action: u32, with_dry_run: bool| {
            entry.clauses.iter().find(|c| {
                c.action == action && (with_dry_run || !c.dry_run) && c.matches_request(&facts)
            })
        };
        let (allowed, policy) = match v.verdict {
            POL_ALLOW => (true, self.string(v.policy_str)),
            POL_L7 => {
                if let Some(c) = matching(POL_ACTION_DENY, false) {
                    (false, c.policy.clone())
                } else if v.flags & POL_F_L4_ALLOWED != 0 {
                    (true, self.string(v.policy_str))
                } else if let Some(c) = matching(POL_ACTION_ALLOW, false) {
                    (true, c.policy.clone())
                } else {
                    (false, None)
                }
            }
            POL_DENY => (false, self.string(v.policy_str)),
            _ => (false, None),
        };
        let mut out = RequestDecision {
            allowed,
            policy,
            dry_run_deny: None,
            audit: Vec::new(),
        };
        if allowed {
            if v.flags & POL_F_DRY_RUN_DENY != 0 {
                out.dry_run_deny = Some(self.string(v.dry_run_str));
            } else if v.flags & POL_F_DRY_RUN_L7 != 0 {
                if let Some(c) = matching(POL_ACTION_DENY, true) {
                    out.dry_run_deny = Some(c.policy.clone());
                } else if v.flags & POL_F_DRY_RUN_L4_ALLOWED == 0
                    && matching(POL_ACTION_ALLOW, true).is_none()
                {
                    let named = entry
                        .clauses
                        .iter()
                        .find(|c| c.dry_run && c.action == POL_ACTION_ALLOW)
                        .and_then(|c| c.policy.clone());
                    out.dry_run_deny = Some(named);
                }
            }
        }
        if v.flags & POL_F_AUDIT != 0 {
            out.audit.extend(self.string(v.audit_str));
        }
        for c in &entry.clauses {
            if c.action == POL_ACTION_AUDIT && c.matches_request(&facts) {
                if let Some(p) = &c.policy {
                    if !out.audit.contains(p) {
                        out.audit.push(p.clone());
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_hosts_match_like_the_evaluator() {
        let clause = |field, kind, pattern: &str| Clause {
            action: POL_ACTION_ALLOW,
            dry_run: false,
            policy: None,
            terms: vec![Term {
                field,
                kind,
                pattern: Arc::from(pattern),
            }],
        };
        let exact = clause(POL_FIELD_HOST, POL_MATCH_EXACT, "api.shop");
        for host in ["api.shop", "API.Shop"] {
            assert!(exact.matches("GET", "/", host), "{host}");
        }
        // The port is part of the host, as in Istio (ISTIO-SECURITY-2021-008); so is a
        // trailing dot.
        for host in [
            "api.shop:8080",
            "api.shop.",
            "api.shop.evil",
            "api.shop:x",
            "",
        ] {
            assert!(!exact.matches("GET", "/", host), "{host}");
        }
        let suffix = clause(POL_FIELD_HOST, POL_MATCH_SUFFIX, ".shop");
        assert!(suffix.matches("GET", "/", "WEB.SHOP"));
        assert!(!suffix.matches("GET", "/", "WEB.SHOP:80"));
        let not_host = clause(POL_FIELD_NOT_HOST, POL_MATCH_PREFIX, "admin.");
        assert!(!not_host.matches("GET", "/", "Admin.shop:443"));
        assert!(not_host.matches("GET", "/", "api.shop"));
        // Methods stay case-sensitive.
        let method = clause(POL_FIELD_METHOD, POL_MATCH_EXACT, "GET");
        assert!(!method.matches("get", "/", ""));
    }
    use crate::policy::compile::{
        compile,
        tests::{from_principal, policy, registry, to_ports},
    };
    use crate::policy::model::{Action, Operation, PolicyBundle, Rule, StringMatch};

    fn view(authz: Vec<crate::policy::model::AuthorizationPolicy>) -> PolicyView {
        let c = compile(
            &PolicyBundle {
                authz,
                peer_authn: vec![],
            },
            &registry(),
            "istio-system",
            "cluster.local",
        )
        .unwrap();
        PolicyView::build(7, RawGeneration::from(&c)).unwrap()
    }

    fn get_api(action: Action, name: &str) -> crate::policy::model::AuthorizationPolicy {
        policy(
            "default",
            name,
            Some("b"),
            action,
            Some(vec![Rule {
                from: vec![from_principal("cluster.local/ns/default/sa/sa-a")],
                to: vec![Operation {
                    methods: vec![StringMatch::Exact("GET".into())],
                    paths: vec![StringMatch::from_pattern("/api/*")],
                    not_paths: vec![StringMatch::Exact("/api/secret".into())],
                    ..Operation::default()
                }],
                when: vec![],
            }]),
        )
    }

    #[test]
    fn no_policy_allows() {
        let v = PolicyView::default();
        let d = v.decide_l4(1, 3, Family::V4, 80);
        assert_eq!(d.verdict, L4Verdict::Allow);
        assert!(d.key.is_none());
    }

    #[test]
    fn l4_decisions_match_the_kernel_lookup() {
        let v = view(vec![policy(
            "default",
            "allow-a",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![from_principal("cluster.local/ns/default/sa/sa-a")],
                to: vec![to_ports(&[9000])],
                when: vec![],
            }]),
        )]);
        let d = v.decide_l4(1, 4, Family::V4, 9000);
        assert_eq!(d.verdict, L4Verdict::Allow);
        assert_eq!(d.policy.as_deref(), Some("default/allow-a"));
        assert_eq!(v.decide_l4(1, 4, Family::V4, 9001).verdict, L4Verdict::Deny);
        assert_eq!(v.decide_l4(5, 4, Family::V4, 9000).verdict, L4Verdict::Deny);
        // IPv6 of a1 is the same principal: allowed too.
        assert_eq!(
            v.decide_l4(1, 4, Family::V6, 9000).verdict,
            L4Verdict::Allow
        );
        // An unknown source workload: fail closed.
        assert_eq!(
            v.decide_l4(99, 4, Family::V4, 9000).verdict,
            L4Verdict::Deny
        );
    }

    #[test]
    fn allow_per_request() {
        let v = view(vec![get_api(Action::Allow, "allow-get")]);
        let d = v.decide_l4(1, 3, Family::V4, 8080);
        assert_eq!(d.verdict, L4Verdict::PerRequest);
        assert!(d.needs_request);
        let (set, class) = d.key.unwrap();
        let r = v.decide_request(set, class, 8080, "GET", "/api/x", "b");
        assert!(r.allowed);
        assert_eq!(r.policy.as_deref(), Some("default/allow-get"));
        assert!(
            !v.decide_request(set, class, 8080, "POST", "/api/x", "b")
                .allowed
        );
        assert!(
            !v.decide_request(set, class, 8080, "GET", "/apx", "b")
                .allowed
        );
        assert!(
            !v.decide_request(set, class, 8080, "GET", "/api/secret", "b")
                .allowed
        );
        // c1 is not sa-a: denied at L4.
        assert_eq!(v.decide_l4(5, 3, Family::V4, 8080).verdict, L4Verdict::Deny);
    }

    #[test]
    fn hosts_ignore_case_keep_port_paths_ignore_query() {
        // Regression (property test): the view compared hosts case-sensitively and without
        // stripping `:port`, and left the query string on the path (the evaluator does not).
        let allow = policy(
            "default",
            "allow-web",
            Some("b"),
            Action::Allow,
            Some(vec![Rule {
                from: vec![],
                to: vec![Operation {
                    hosts: vec![StringMatch::from_pattern("web.svc")],
                    paths: vec![StringMatch::from_pattern("*.json")],
                    ..Operation::default()
                }],
                when: vec![],
            }]),
        );
        let v = view(vec![allow]);
        let (set, class) = v.decide_l4(1, 3, Family::V4, 8080).key.unwrap();
        let allowed = |path, host| {
            v.decide_request(set, class, 8080, "GET", path, host)
                .allowed
        };
        assert!(allowed("/a.json", "web.svc"));
        assert!(allowed("/a.json", "Web.SVC"));
        assert!(!allowed("/a.json", "web.svc:8080"));
        assert!(allowed("/a.json?x=1", "web.svc"));
        assert!(!allowed("/a.json/x", "web.svc"));
        assert!(!allowed("/a.json", "web.svc:x"));
        assert!(!allowed("/a.json", "other"));
    }

    #[test]
    fn deny_per_request_then_allowed() {
        let v = view(vec![get_api(Action::Deny, "deny-get")]);
        let d = v.decide_l4(1, 3, Family::V4, 8080);
        assert_eq!(d.verdict, L4Verdict::PerRequest);
        let (set, class) = d.key.unwrap();
        let r = v.decide_request(set, class, 8080, "GET", "/api/x", "");
        assert!(!r.allowed);
        assert_eq!(r.policy.as_deref(), Some("default/deny-get"));
        assert!(
            v.decide_request(set, class, 8080, "POST", "/api/x", "")
                .allowed
        );
    }

    #[test]
    fn dry_run_and_audit_reported() {
        let mut dry = get_api(Action::Deny, "dry-get");
        dry.dry_run = true;
        let audit = policy(
            "default",
            "audit-post",
            Some("b"),
            Action::Audit,
            Some(vec![Rule {
                from: vec![],
                to: vec![Operation {
                    methods: vec![StringMatch::Exact("POST".into())],
                    ..Operation::default()
                }],
                when: vec![],
            }]),
        );
        let v = view(vec![dry, audit]);
        let d = v.decide_l4(1, 3, Family::V4, 8080);
        assert_eq!(d.verdict, L4Verdict::Allow);
        assert!(d.needs_request);
        let (set, class) = d.key.unwrap();
        let r = v.decide_request(set, class, 8080, "GET", "/api/x", "");
        assert!(r.allowed);
        assert_eq!(r.dry_run_deny, Some(Some(Arc::from("default/dry-get"))));
        assert!(r.audit.is_empty());
        let r = v.decide_request(set, class, 8080, "POST", "/api/x", "");
        assert!(r.allowed && r.dry_run_deny.is_none());
        assert_eq!(r.audit, vec![Arc::<str>::from("default/audit-post")]);
        // On b2 (no HTTP port) the AUDIT matches ignoring its method: at L4.
        let d = v.decide_l4(1, 4, Family::V4, 8080);
        assert_eq!(d.audit.as_deref(), Some("default/audit-post"));
    }

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
        let compile_one = |authz| {
            compile(
                &PolicyBundle {
                    authz,
                    peer_authn: vec![],
                },
                &registry(),
                "istio-system",
                "cluster.local",
            )
            .unwrap()
        };
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
            L4Verdict::Allow
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
