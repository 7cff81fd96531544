//! The authority's rollout of a published version: which version each node is meant to run
//! (issue 12, controlled deployment windows).
//!
//! A [`RolloutRecord`] follows one published version (the *target*) through its phases, with
//! time given by the caller (Unix milliseconds; never read here, so tests inject it):
//!
//! - `pending` — before the bundle's activation time: nobody receives the target;
//! - `canary` — from the activation time (or the publication, if later) for the window: the
//!   canary nodes receive it, every other node keeps what it had;
//! - `released` — after the window, if every canary reported the target active (version and
//!   digest): every node receives it. A version without a rollout is `released` at once;
//! - `halted` — a canary reported that it refused the target, or had not reported it active
//!   by the end of the window: nobody else ever receives it. Canaries that run it keep it (no
//!   version goes backwards on a node); canaries that refused it keep what they had. Only a
//!   later version supersedes a halted rollout.
//!
//! What a node keeps when it is not (yet) given the target: the last version released to
//! every node (`base`), or — for a node that ran an unfinished earlier rollout's version —
//! that version (`held`). A later version starts from these, so nobody is ever moved back.
//!
//! The record is persisted (`state/rollout.json`) by the publisher after every change, and
//! read by `config status`: [`RolloutRecord::intended`] answers the same for both.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::bundle::Rollout;

/// Name of the rollout record in the authority directory.
pub const ROLLOUT_FILE: &str = "state/rollout.json";

/// A version as agents report it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRef {
    pub version: u64,
    pub digest: String,
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Canary,
    Released,
    Halted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Canary => "canary",
            Self::Released => "released",
            Self::Halted => "halted",
        }
    }
}

/// Why and when a rollout stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Halt {
    pub at_unix_ms: u64,
    /// The canary that refused it or did not report it (none: no node matched).
    pub node: Option<String>,
    /// The canary's refusal reason (a label such as `unknown_signer`, and its detail), or
    /// `not active by the end of the window`.
    pub reason: String,
}

/// A change of phase, for logs and audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The activation time came: the canaries receive the target.
    Canary,
    /// Every node receives the target.
    Released,
    Halted(Halt),
}

/// One published version's rollout (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutRecord {
    pub target: VersionRef,
    /// What the bundle asked for (`None`: released at once).
    pub rollout: Option<Rollout>,
    /// The canary nodes: the bundle's names and the registry's nodes its patterns match.
    pub canaries: BTreeSet<String>,
    pub published_unix_ms: u64,
    /// When the canaries receive it (the activation time, or the publication if later).
    pub canary_from_unix_ms: u64,
    /// When the window ends (= `canary_from` without canaries).
    pub window_end_unix_ms: u64,
    pub phase: Phase,
    /// Canaries that reported the target active.
    pub canaries_active: BTreeSet<String>,
    pub halt: Option<Halt>,
    pub released_unix_ms: Option<u64>,
    /// The last version released to every node: what the others keep.
    pub base: Option<VersionRef>,
    /// Nodes that run an earlier unfinished rollout's version, and keep it.
    pub held: BTreeMap<String, VersionRef>,
}

impl RolloutRecord {
    /// The rollout of `target` with `rollout`, published at `now`; `nodes` are the registry's
    /// node names (patterns are resolved against them); `previous` is the record of the
    /// version published before, if any.
    pub fn start(
        target: VersionRef,
        rollout: Option<&Rollout>,
        nodes: &[String],
        previous: Option<&RolloutRecord>,
        now: u64,
    ) -> Self {
        let (base, held) = match previous {
            None => (None, BTreeMap::new()),
            Some(p) => p.kept(),
        };
        let canaries: BTreeSet<String> = match rollout {
            None => BTreeSet::new(),
            Some(r) => r
                .canary_nodes
                .iter()
                .filter(|p| !p.ends_with('*'))
                .cloned()
                .chain(nodes.iter().filter(|n| r.is_canary(n)).cloned())
                .collect(),
        };
        let canary_from = rollout
            .and_then(Rollout::activate_at_unix_ms)
            .map_or(now, |at| at.max(now));
        let window_ms = rollout
            .and_then(|r| r.canary_window_secs)
            .map_or(0, |s| s.saturating_mul(1000));
        let mut record = Self {
            target,
            rollout: rollout.cloned(),
            canaries,
            published_unix_ms: now,
            canary_from_unix_ms: canary_from,
            window_end_unix_ms: canary_from.saturating_add(window_ms),
            phase: Phase::Pending,
            canaries_active: BTreeSet::new(),
            halt: None,
            released_unix_ms: None,
            base,
            held,
        };
        let has_canaries = rollout.is_some_and(|r| !r.canary_nodes.is_empty());
        if has_canaries && record.canaries.is_empty() {
            record.phase = Phase::Halted;
            record.halt = Some(Halt {
                at_unix_ms: now,
                node: None,
                reason: "no node matches the canary selector".into(),
            });
        } else {
            record.tick(now);
        }
        record
    }

    /// What every node keeps when the next version supersedes this one: the base, and the
    /// nodes that run a version above it.
    fn kept(&self) -> (Option<VersionRef>, BTreeMap<String, VersionRef>) {
        match self.phase {
            Phase::Released => (Some(self.target.clone()), BTreeMap::new()),
            Phase::Pending => (self.base.clone(), self.held.clone()),
            Phase::Canary | Phase::Halted => {
                let mut held = self.held.clone();
                for n in &self.canaries_active {
                    held.insert(n.clone(), self.target.clone());
                }
                (self.base.clone(), held)
            }
        }
    }

    /// Moves through the phases due at `now`.
    pub fn tick(&mut self, now: u64) -> Option<Transition> {
        match self.phase {
            Phase::Pending if now >= self.canary_from_unix_ms => {
                if self.canaries.is_empty() {
                    self.release(now);
                    Some(Transition::Released)
                } else {
                    self.phase = Phase::Canary;
                    Some(Transition::Canary)
                }
            }
            Phase::Canary if now >= self.window_end_unix_ms => {
                match self
                    .canaries
                    .iter()
                    .find(|c| !self.canaries_active.contains(*c))
                {
                    None => {
                        self.release(now);
                        Some(Transition::Released)
                    }
                    Some(missing) => Some(self.stop(
                        now,
                        Some(missing.clone()),
                        "not active by the end of the window".into(),
                    )),
                }
            }
            _ => None,
        }
    }

    fn release(&mut self, now: u64) {
        self.phase = Phase::Released;
        self.released_unix_ms = Some(now);
        self.held.clear();
    }

    fn stop(&mut self, now: u64, node: Option<String>, reason: String) -> Transition {
        let halt = Halt {
            at_unix_ms: now,
            node,
            reason,
        };
        self.phase = Phase::Halted;
        self.halt = Some(halt.clone());
        Transition::Halted(halt)
    }

    /// What `node` reported: the version it runs, and the last version it refused (with the
    /// reason). A canary running the target counts; one refusing it halts the rollout.
    pub fn observe(
        &mut self,
        node: &str,
        active: Option<&VersionRef>,
        refused: Option<(&VersionRef, &str)>,
        now: u64,
    ) -> Option<Transition> {
        if !self.canaries.contains(node) {
            return None;
        }
        if active == Some(&self.target) && matches!(self.phase, Phase::Canary | Phase::Halted) {
            self.canaries_active.insert(node.to_owned());
        }
        match refused {
            Some((v, reason)) if v == &self.target && self.phase == Phase::Canary => {
                Some(self.stop(now, Some(node.to_owned()), format!("refused: {reason}")))
            }
            _ => None,
        }
    }

    /// The next time [`RolloutRecord::tick`] has something to do.
    pub fn deadline(&self) -> Option<u64> {
        match self.phase {
            Phase::Pending => Some(self.canary_from_unix_ms),
            Phase::Canary => Some(self.window_end_unix_ms),
            Phase::Released | Phase::Halted => None,
        }
    }

    /// The version `node` is meant to run now (`None`: none yet).
    pub fn intended(&self, node: &str) -> Option<&VersionRef> {
        let given = match self.phase {
            Phase::Released => true,
            Phase::Pending => false,
            Phase::Canary => self.canaries.contains(node),
            Phase::Halted => self.canaries_active.contains(node),
        };
        if given {
            Some(&self.target)
        } else {
            self.held.get(node).or(self.base.as_ref())
        }
    }

    /// Since when `node` is meant to run [`RolloutRecord::intended`] (Unix ms; for the
    /// target, when it was given to that node; else when this record started).
    pub fn intended_since(&self, node: &str) -> u64 {
        match self.intended(node) {
            Some(v) if v == &self.target => match self.released_unix_ms {
                Some(at) if !self.canaries.contains(node) => at,
                _ => self.canary_from_unix_ms,
            },
            _ => self.published_unix_ms,
        }
    }

    /// Every version some node may be meant to run (the target, the base, the held ones).
    pub fn versions(&self) -> BTreeSet<VersionRef> {
        if self.phase == Phase::Released {
            return BTreeSet::from([self.target.clone()]);
        }
        let mut out: BTreeSet<VersionRef> = self.held.values().cloned().collect();
        out.extend(self.base.clone());
        out.insert(self.target.clone());
        out
    }

    /// Halted: other nodes never receive the target (`config status` exits non-zero).
    pub fn halted(&self) -> bool {
        self.phase == Phase::Halted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    fn v(n: u64) -> VersionRef {
        VersionRef {
            version: n,
            digest: format!("sha256:{n}"),
        }
    }

    fn canary(at: Option<u64>, nodes: &[&str], window: u64) -> Rollout {
        Rollout {
            activate_at: at.map(|ms| {
                let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap();
                crate::audit::record::format_time(t)
            }),
            canary_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            canary_window_secs: (!nodes.is_empty()).then_some(window),
        }
    }

    fn nodes() -> Vec<String> {
        ["n1", "n2", "edge-a", "edge-b"]
            .iter()
            .map(|n| (*n).to_owned())
            .collect()
    }

    /// v1 released to everyone at `t`.
    fn released(t: u64) -> RolloutRecord {
        let r = RolloutRecord::start(v(1), None, &nodes(), None, t);
        assert_eq!(r.phase, Phase::Released);
        r
    }

    #[test]
    fn canaries_first_then_everyone_when_every_canary_runs_it() {
        let t = 1_000_000 * S;
        let base = released(t);
        let r1 = canary(None, &["n1"], 30);
        let mut r = RolloutRecord::start(v(2), Some(&r1), &nodes(), Some(&base), t + S);
        assert_eq!(r.phase, Phase::Canary);
        assert_eq!(r.intended("n1"), Some(&v(2)));
        assert_eq!(r.intended("n2"), Some(&v(1)));
        assert_eq!(r.deadline(), Some(t + 31 * S));
        // Not yet active: nothing happens before the window ends.
        assert_eq!(r.tick(t + 30 * S), None);
        assert_eq!(r.observe("n1", Some(&v(2)), None, t + 5 * S), None);
        // A non-canary reporting anything changes nothing.
        assert_eq!(
            r.observe("n2", Some(&v(2)), Some((&v(2), "x")), t + 5 * S),
            None
        );
        assert_eq!(r.phase, Phase::Canary);
        assert_eq!(r.intended("n2"), Some(&v(1)));
        assert_eq!(r.tick(t + 31 * S), Some(Transition::Released));
        assert_eq!(r.intended("n2"), Some(&v(2)));
        assert_eq!(r.intended("unknown-node"), Some(&v(2)));
        assert_eq!(r.intended_since("n2"), t + 31 * S);
        assert_eq!(r.intended_since("n1"), t + S);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_canary_refusing_halts_and_the_others_never_receive_it() {
        let t = 5_000 * S;
        let base = released(t);
        let mut r = RolloutRecord::start(
            v(2),
            Some(&canary(None, &["n1"], 30)),
            &nodes(),
            Some(&base),
            t,
        );
        // A refusal of another version (e.g. an older one) does not count.
        assert_eq!(r.observe("n1", Some(&v(1)), Some((&v(9), "x")), t), None);
        let got = r.observe(
            "n1",
            Some(&v(1)),
            Some((&v(2), "unknown_signer: key x")),
            t + S,
        );
        let Some(Transition::Halted(h)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(h.node.as_deref(), Some("n1"));
        assert!(h.reason.contains("unknown_signer"), "{}", h.reason);
        assert!(r.halted());
        // Past the window: still halted, nobody else receives it; n1 keeps what it runs.
        assert_eq!(r.tick(t + 3600 * S), None);
        assert_eq!(r.intended("n2"), Some(&v(1)));
        assert_eq!(r.intended("n1"), Some(&v(1)));
        // A second refusal does not halt twice.
        assert_eq!(r.observe("n1", None, Some((&v(2), "x")), t + 2 * S), None);
    }

    #[test]
    fn a_silent_canary_halts_at_the_end_of_the_window() {
        let t = 9_000 * S;
        let base = released(t);
        let mut r = RolloutRecord::start(
            v(2),
            Some(&canary(None, &["n1", "edge-*"], 10)),
            &nodes(),
            Some(&base),
            t,
        );
        let want: BTreeSet<String> = ["n1", "edge-a", "edge-b"]
            .iter()
            .map(|s| (*s).into())
            .collect();
        assert_eq!(r.canaries, want);
        r.observe("n1", Some(&v(2)), None, t + S);
        r.observe("edge-a", Some(&v(2)), None, t + S);
        let got = r.tick(t + 10 * S);
        let Some(Transition::Halted(h)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(h.node.as_deref(), Some("edge-b"));
        // Canaries that run it keep it; the silent one and the rest keep v1.
        assert_eq!(r.intended("n1"), Some(&v(2)));
        assert_eq!(r.intended("edge-a"), Some(&v(2)));
        assert_eq!(r.intended("edge-b"), Some(&v(1)));
        assert_eq!(r.intended("n2"), Some(&v(1)));
        // A canary reporting it active after the halt keeps it (it runs it), and the
        // rollout stays halted.
        r.observe("edge-b", Some(&v(2)), None, t + 11 * S);
        assert_eq!(r.intended("edge-b"), Some(&v(2)));
        assert!(r.halted());
        // v3 without a rollout supersedes: everyone.
        let r3 = RolloutRecord::start(v(3), None, &nodes(), Some(&r), t + 20 * S);
        assert_eq!(r3.phase, Phase::Released);
        assert_eq!(r3.intended("n2"), Some(&v(3)));
    }

    #[test]
    fn activation_time_holds_everyone_back_until_it_comes() {
        let t = 20_000 * S;
        let base = released(t);
        let at = t + 60 * S;
        let mut r = RolloutRecord::start(
            v(2),
            Some(&canary(Some(at), &[], 0)),
            &nodes(),
            Some(&base),
            t,
        );
        assert_eq!(r.phase, Phase::Pending);
        assert_eq!(r.intended("n1"), Some(&v(1)));
        assert_eq!(r.deadline(), Some(at));
        assert_eq!(r.tick(at - 1), None);
        assert_eq!(r.tick(at), Some(Transition::Released));
        assert_eq!(r.intended("n1"), Some(&v(2)));
        // No previous version at all: nobody has anything before the activation time.
        let r = RolloutRecord::start(v(1), Some(&canary(Some(at), &[], 0)), &nodes(), None, t);
        assert_eq!(r.intended("n1"), None);
        // An activation time in the past: at once.
        let r = RolloutRecord::start(
            v(2),
            Some(&canary(Some(t - S), &[], 0)),
            &nodes(),
            Some(&base),
            t,
        );
        assert_eq!(r.phase, Phase::Released);
        // Activation then canaries: the window starts at the activation time.
        let mut r = RolloutRecord::start(
            v(2),
            Some(&canary(Some(at), &["n1"], 10)),
            &nodes(),
            Some(&base),
            t,
        );
        assert_eq!(r.intended("n1"), Some(&v(1)));
        assert_eq!(r.tick(at), Some(Transition::Canary));
        assert_eq!(r.intended("n1"), Some(&v(2)));
        assert_eq!(r.deadline(), Some(at + 10 * S));
    }

    #[test]
    fn a_later_version_supersedes_without_moving_anyone_back() {
        let t = 30_000 * S;
        let base = released(t);
        let mut r2 = RolloutRecord::start(
            v(2),
            Some(&canary(None, &["n1"], 60)),
            &nodes(),
            Some(&base),
            t,
        );
        r2.observe("n1", Some(&v(2)), None, t + S);
        // v3 during v2's window, canary n2: n1 keeps v2, n2 gets v3, others keep v1.
        let mut r3 = RolloutRecord::start(
            v(3),
            Some(&canary(None, &["n2"], 60)),
            &nodes(),
            Some(&r2),
            t + 2 * S,
        );
        assert_eq!(r3.intended("n1"), Some(&v(2)));
        assert_eq!(r3.intended("n2"), Some(&v(3)));
        assert_eq!(r3.intended("edge-a"), Some(&v(1)));
        assert_eq!(
            r3.versions()
                .into_iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            [1, 2, 3]
        );
        r3.observe("n2", Some(&v(3)), None, t + 3 * S);
        assert_eq!(r3.tick(t + 62 * S), Some(Transition::Released));
        assert_eq!(r3.intended("n1"), Some(&v(3)));
        assert!(r3.held.is_empty());
        // A pending version superseded: nobody had it; what they kept stays.
        let r4 = RolloutRecord::start(
            v(4),
            Some(&canary(Some(t + 1000 * S), &[], 0)),
            &nodes(),
            Some(&r3),
            t + 70 * S,
        );
        let r5 = RolloutRecord::start(
            v(5),
            Some(&canary(None, &["n1"], 5)),
            &nodes(),
            Some(&r4),
            t + 71 * S,
        );
        assert_eq!(r5.intended("n2"), Some(&v(3)));
        assert_eq!(r5.intended("n1"), Some(&v(5)));
    }

    #[test]
    fn canary_patterns_matching_no_node_halt_at_once() {
        let r = RolloutRecord::start(
            v(2),
            Some(&canary(None, &["zone-*"], 5)),
            &nodes(),
            Some(&released(0)),
            S,
        );
        assert!(r.halted());
        assert_eq!(r.halt.as_ref().and_then(|h| h.node.as_deref()), None);
        assert_eq!(r.intended("n1"), Some(&v(1)));
    }

    #[test]
    fn the_record_round_trips_and_is_read_strictly() {
        let r = RolloutRecord::start(
            v(2),
            Some(&canary(None, &["n1"], 5)),
            &nodes(),
            Some(&released(0)),
            S,
        );
        let text = serde_json::to_string(&r).unwrap();
        let back: RolloutRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let evil = text.replacen('{', "{\"evil\":1,", 1);
        assert!(serde_json::from_str::<RolloutRecord>(&evil).is_err());
        let bad_phase = text.replace("\"canary\"", "\"done\"");
        assert!(serde_json::from_str::<RolloutRecord>(&bad_phase).is_err());
    }
}
