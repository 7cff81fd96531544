//! Resource bounds of the proxies: the open-files limit, the connection budget, per-source
//! caps and the cap on incomplete HTTP request heads.
//!
//! - At start the agent raises its `RLIMIT_NOFILE` soft limit to the hard limit
//!   ([`raise_nofile_limit`]) and derives the connection budget from the effective limit
//!   ([`default_max_connections`]). The budget counts the TCP connections (descriptors) the
//!   proxies hold for traffic: a connection the outbound proxy accepted, the upstream
//!   connection it opens to a pod on the same node, an HBONE connection the inbound proxy
//!   accepted, and the pod connection of each inbound tunnel. So a proxied connection costs
//!   two slots when both ends are on one node, one on each agent when it crosses nodes. The
//!   rest of the limit is a reserve for the listeners, the admin port, the BPF maps and
//!   programs, the TLS connection to the authority, the log, and the outbound pool's HBONE
//!   connections (one per 100 tunnels of an identity pair and node).
//! - [`Admission`] hands out RAII [`Guard`]s: one *slot* per TCP connection of that budget
//!   (both proxies draw from it), one per connection of a *source* (outbound: the source workload; inbound: the peer agent
//!   address for HBONE connections, the verified source address for tunnels), and one per
//!   *incomplete request head* of a source address on L7 ports. Dropping the guard gives the
//!   unit back. Past a cap nothing waits: the caller refuses at once (a TCP reset, an HBONE
//!   `503`, an HTTP `429`), the refusal is counted in `mesh_connections_refused_total{proxy,
//!   reason}` and logged at most once a second per proxy and reason (with how many were not
//!   logged).
//! - [`accept`] is the one accept loop step of both proxies: it takes a slot or resets the
//!   connection, and on `EMFILE`/`ENFILE` it counts, refuses the pending connection with the
//!   descriptor it keeps in reserve for that, and backs off instead of spinning (the pending
//!   connection keeps the listener readable).

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::listen::Backoff;
use crate::metrics::{Direction, Metrics, RefusalReason};

/// Descriptors kept out of the connection budget whatever the limit: listeners, admin
/// connections, maps and programs, the authority connection, the log, the spare descriptor.
pub const FD_RESERVE_BASE: u64 = 128;
/// Besides [`FD_RESERVE_BASE`], this fraction (1/n) of the limit is kept in reserve too: the
/// outbound pool's HBONE connections, connections being refused, policy reloads.
pub const FD_RESERVE_DIVISOR: u64 = 16;
/// The smallest connection budget derived from a (tiny) limit.
pub const MIN_DERIVED_CONNECTIONS: usize = 16;
/// Default cap on incomplete request heads per source address.
pub const DEFAULT_PENDING_HEADS_PER_SOURCE: usize = 256;
/// Default time from a request head's first byte (or a connection's start) to its end.
pub const DEFAULT_HEAD_TIMEOUT_SECS: u64 = 10;
/// At most one log line per proxy and refusal reason in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the limits module.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("reading RLIMIT_NOFILE: {0}")]
    GetLimit(#[source] nix::Error),
    #[error("raising the RLIMIT_NOFILE soft limit from {from} to {to}: {source}")]
    SetLimit {
        from: u64,
        to: u64,
        #[source]
        source: nix::Error,
    },
    #[error("--{flag} {value}: must be at least 1")]
    Zero { flag: &'static str, value: u64 },
    #[error("--max-connections-per-source {per_source}: must not exceed --max-connections {max}")]
    PerSourceAboveMax { per_source: usize, max: usize },
}

/// The limit flags of `mesh-agent run`.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct LimitOptions {
    /// TCP connections the proxies hold for traffic at once, both proxies together: each
    /// connection the outbound proxy accepts and each it opens to a pod on this node, each
    /// HBONE connection the inbound proxy accepts and each tunnel's pod connection (a
    /// same-node connection takes 2, a cross-node one 1 on each agent). Past it a new
    /// connection is reset at once (an HBONE tunnel is answered 503) and counted in
    /// mesh_connections_refused_total{reason="cap"} [default: open-files limit − reserve,
    /// reserve = 128 + limit/16; 832 at a limit of 1024]
    #[arg(long, env = "MESH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections served at once from one source: the source workload (outbound), the peer
    /// agent's address (inbound HBONE connections), the verified source address (inbound
    /// tunnels). Past it: reset or 503, reason="source_cap" [default: half of
    /// --max-connections]
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// Incomplete HTTP request heads at once from one source address on L7 ports (from a
    /// connection's first byte, or a request's, to the end of its head). Past it the
    /// connection is closed (429 when the request line was read), reason="pending_heads".
    #[arg(long, env = "MESH_MAX_PENDING_HEADS_PER_SOURCE", default_value_t = DEFAULT_PENDING_HEADS_PER_SOURCE)]
    pub max_pending_heads_per_source: usize,
    /// Seconds an HTTP request head may take on L7 ports, from its first byte (the
    /// connection's start for the first one) to its end; then 408 and the connection closed.
    #[arg(long, env = "MESH_REQUEST_HEAD_TIMEOUT_SECS", default_value_t = DEFAULT_HEAD_TIMEOUT_SECS)]
    pub request_head_timeout_secs: u64,
}

impl Default for LimitOptions {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_connections_per_source: None,
            max_pending_heads_per_source: DEFAULT_PENDING_HEADS_PER_SOURCE,
            request_head_timeout_secs: DEFAULT_HEAD_TIMEOUT_SECS,
        }
    }
}

/// The limits in force (flags resolved against the effective open-files limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connection slots, both proxies together.
    pub max_connections: usize,
    /// Slots one source may hold.
    pub per_source: usize,
    /// Incomplete request heads one source address may have.
    pub pending_heads_per_source: usize,
    /// First byte to end of a request head.
    pub head_timeout: Duration,
}

impl ConnectionLimits {
    /// Limits for a process whose open-files limit is `nofile`, with every default.
    pub fn for_nofile(nofile: u64) -> Self {
        LimitOptions::default()
            .resolve(nofile)
            .unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

/// The connection budget for an open-files limit: `limit − reserve`, reserve
/// `128 + limit/16`, at least [`MIN_DERIVED_CONNECTIONS`].
pub fn default_max_connections(nofile: u64) -> usize {
    let reserve = FD_RESERVE_BASE + nofile / FD_RESERVE_DIVISOR;
    let budget = nofile.saturating_sub(reserve);
    usize::try_from(budget)
        .unwrap_or(usize::MAX)
        .max(MIN_DERIVED_CONNECTIONS)
}

impl LimitOptions {
    /// Resolves the flags against the effective open-files limit `nofile`.
    pub fn resolve(&self, nofile: u64) -> Result<ConnectionLimits, LimitsError> {
        let nonzero = |flag, value: usize| {
            if value == 0 {
                Err(LimitsError::Zero { flag, value: 0 })
            } else {
                Ok(value)
            }
        };
        let max_connections = match self.max_connections {
            Some(v) => nonzero("max-connections", v)?,
            None => default_max_connections(nofile),
        };
        let per_source = match self.max_connections_per_source {
            Some(v) => nonzero("max-connections-per-source", v)?,
            None => max_connections.div_ceil(2),
        };
        if per_source > max_connections {
            return Err(LimitsError::PerSourceAboveMax {
                per_source,
                max: max_connections,
            });
        }
        let pending_heads_per_source = nonzero(
            "max-pending-heads-per-source",
            self.max_pending_heads_per_source,
        )?;
        if self.request_head_timeout_secs == 0 {
            return Err(LimitsError::Zero {
                flag: "request-head-timeout-secs",
                value: 0,
            });
        }
        Ok(ConnectionLimits {
            max_connections,
            per_source,
            pending_heads_per_source,
            head_timeout: Duration::from_secs(self.request_head_timeout_secs),
        })
    }
}

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit in force now (the effective limit).
    pub soft: u64,
    pub hard: u64,
}

/// Raises the `RLIMIT_NOFILE` soft limit to the hard limit (to `/proc/sys/fs/nr_open` when
/// the hard limit is infinite, since no descriptor table grows beyond it).
pub fn raise_nofile_limit() -> Result<NofileLimit, LimitsError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitsError::GetLimit)?;
    let target = if hard == RLIM_INFINITY {
        nr_open().unwrap_or(1 << 20)
    } else {
        hard
    };
    if soft != RLIM_INFINITY && soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard).map_err(|source| {
            LimitsError::SetLimit {
                from: soft,
                to: target,
                source,
            }
        })?;
    }
    let (now, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitsError::GetLimit)?;
    Ok(NofileLimit {
        before: soft,
        soft: now,
        hard,
    })
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Start-up: raises the open-files limit, resolves `opts` against it and logs both. A limit
/// that cannot be raised is logged and the current one used.
pub fn init(opts: &LimitOptions) -> Result<ConnectionLimits, LimitsError> {
    let nofile = match raise_nofile_limit() {
        Ok(l) => {
            info!(
                soft = l.soft,
                hard = l.hard,
                before = l.before,
                "open files limit"
            );
            l.soft
        }
        Err(e) => {
            let current =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .map(|(s, _)| s)
                    .unwrap_or(1024);
            warn!(error = %e, soft = current, "open files limit not raised");
            current
        }
    };
    let limits = opts.resolve(nofile)?;
    let budget = default_max_connections(nofile);
    if limits.max_connections > budget {
        warn!(
            max_connections = limits.max_connections,
            budget,
            nofile,
            "--max-connections exceeds what the open files limit carries: accept errors (EMFILE) \
             will refuse connections instead"
        );
    }
    info!(
        max_connections = limits.max_connections,
        max_connections_per_source = limits.per_source,
        max_pending_heads_per_source = limits.pending_heads_per_source,
        request_head_timeout_secs = limits.head_timeout.as_secs(),
        nofile,
        "connection limits"
    );
    Ok(limits)
}

/// Who a per-source cap counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// Outbound: the source workload (kernel-attested), by registry id.
    Workload(u32),
    /// Inbound HBONE connections: the peer agent's address.
    Peer(IpAddr),
    /// Inbound tunnels: the verified original source address (the peer's when none is
    /// verified).
    Addr(IpAddr),
}

/// Why a guard was not given; already counted and logged by [`Admission`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {limit} in use", reason.as_str())]
pub struct Refused {
    pub reason: RefusalReason,
    pub limit: usize,
}

/// One unit of a counted resource; given back on drop.
#[must_use = "the unit is given back when the guard is dropped"]
pub struct Guard {
    admission: Arc<Admission>,
    unit: Unit,
}

enum Unit {
    Slot,
    Source(SourceKey),
    Head(IpAddr),
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match &self.unit {
            Unit::Slot => "slot".to_owned(),
            Unit::Source(k) => format!("source {k:?}"),
            Unit::Head(ip) => format!("pending head {ip}"),
        };
        f.debug_struct("Guard").field("unit", &unit).finish()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let a = &self.admission;
        match &self.unit {
            Unit::Slot => {
                a.slots.fetch_sub(1, Ordering::AcqRel);
            }
            Unit::Source(key) => release(&a.sources, key),
            Unit::Head(ip) => release(&a.heads, ip),
        }
    }
}

/// A table of counts per key; keys at zero are removed (the table holds only live sources).
type Counts<K> = Mutex<HashMap<K, usize>>;

fn acquire<K: Eq + Hash + Copy>(table: &Counts<K>, key: &K, limit: usize) -> bool {
    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
    let n = t.entry(*key).or_insert(0);
    if *n >= limit {
        if *n == 0 {
            t.remove(key);
        }
        return false;
    }
    *n += 1;
    true
}

fn release<K: Eq + Hash>(table: &Counts<K>, key: &K) {
    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = t.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            t.remove(key);
        }
    }
}

/// The counters behind every cap of both proxies. Shared (`Arc`) by the accept loops, the
/// per-connection tasks and the L7 head reader.
pub struct Admission {
    limits: ConnectionLimits,
    slots: AtomicUsize,
    sources: Counts<SourceKey>,
    heads: Counts<IpAddr>,
    metrics: Arc<Metrics>,
    logs: [LogLimiter; LOG_SLOTS],
    /// Accept errors other than descriptor exhaustion.
    accept_errors: LogLimiter,
    /// A descriptor held in reserve: on EMFILE it is closed so the pending connection can be
    /// accepted and reset (refused at once instead of left hanging in the queue).
    spare: Mutex<Option<std::fs::File>>,
}

const LOG_SLOTS: usize = 2 * RefusalReason::ALL.len();

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.limits)
            .field("slots", &self.slots.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Admission {
    pub fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.set_connection_limit(limits.max_connections);
        Arc::new(Self {
            limits,
            slots: AtomicUsize::new(0),
            sources: Mutex::new(HashMap::new()),
            heads: Mutex::new(HashMap::new()),
            metrics,
            logs: Default::default(),
            accept_errors: LogLimiter::default(),
            spare: Mutex::new(open_spare()),
        })
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Slots in use now.
    pub fn in_use(&self) -> usize {
        self.slots.load(Ordering::Acquire)
    }

    /// A connection slot for `proxy`, or a counted and logged refusal.
    pub fn admit(self: &Arc<Self>, proxy: Direction, peer: SocketAddr) -> Result<Guard, Refused> {
        let max = self.limits.max_connections;
        let taken = self
            .slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            Ok(self.guard(Unit::Slot))
        } else {
            Err(self.refuse(proxy, RefusalReason::Cap, max, Some(peer)))
        }
    }

    /// A place among `key`'s connections, or a counted and logged refusal.
    pub fn admit_source(
        self: &Arc<Self>,
        proxy: Direction,
        key: SourceKey,
        peer: SocketAddr,
    ) -> Result<Guard, Refused> {
        let limit = self.limits.per_source;
        if acquire(&self.sources, &key, limit) {
            Ok(self.guard(Unit::Source(key)))
        } else {
            Err(self.refuse(proxy, RefusalReason::SourceCap, limit, Some(peer)))
        }
    }

    /// A place among `source`'s incomplete request heads, or a counted and logged refusal.
    pub fn enter_head(
        self: &Arc<Self>,
        proxy: Direction,
        source: IpAddr,
    ) -> Result<Guard, Refused> {
        let limit = self.limits.pending_heads_per_source;
        if acquire(&self.heads, &source, limit) {
            Ok(self.guard(Unit::Head(source)))
        } else {
            let peer = SocketAddr::new(source, 0);
            Err(self.refuse(proxy, RefusalReason::PendingHeads, limit, Some(peer)))
        }
    }

    /// The gate the L7 head reader of a connection from `source` passes through.
    pub fn head_gate(self: &Arc<Self>, proxy: Direction, source: IpAddr) -> HeadGate {
        HeadGate {
            admission: Arc::clone(self),
            proxy,
            source,
        }
    }

    fn guard(self: &Arc<Self>, unit: Unit) -> Guard {
        Guard {
            admission: Arc::clone(self),
            unit,
        }
    }

    /// Counts a refusal and logs it (rate-limited).
    fn refuse(
        &self,
        proxy: Direction,
        reason: RefusalReason,
        limit: usize,
        peer: Option<SocketAddr>,
    ) -> Refused {
        self.metrics.connection_refused(proxy, reason);
        let slot = reason.index() * 2 + usize::from(proxy == Direction::Inbound);
        if let Some(suppressed) = self.logs[slot].allow() {
            warn!(
                proxy = proxy.as_str(),
                reason = reason.as_str(),
                limit,
                peer = peer.map(tracing::field::display),
                suppressed,
                "connection refused"
            );
        }
        Refused { reason, limit }
    }

    fn take_spare(&self) -> Option<std::fs::File> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn restore_spare(&self) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.is_none() {
            *spare = open_spare();
        }
    }
}

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// What the L7 head reader of one connection needs: where its source's incomplete heads are
/// counted.
#[derive(Clone)]
pub struct HeadGate {
    admission: Arc<Admission>,
    proxy: Direction,
    source: IpAddr,
}

impl fmt::Debug for HeadGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadGate")
            .field("proxy", &self.proxy)
            .field("source", &self.source)
            .finish()
    }
}

impl HeadGate {
    /// Holds one of the source's incomplete heads until the guard is dropped.
    pub fn enter(&self) -> Result<Guard, Refused> {
        self.admission.enter_head(self.proxy, self.source)
    }
}

/// At most one `true` per [`LOG_INTERVAL`]; counts the rest.
#[derive(Default)]
struct LogLimiter {
    /// Milliseconds since [`epoch`] before which nothing is logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogLimiter {
    /// `Some(events not logged since the last line)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Acquire);
        let interval = u64::try_from(LOG_INTERVAL.as_millis()).unwrap_or(1000);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + interval, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// What one [`accept`] step produced.
#[derive(Debug)]
pub enum Accepted {
    /// A connection with its slot.
    Admitted(TcpStream, SocketAddr, Guard),
    /// Past the cap (already counted and logged): the caller cleans up what it keeps about
    /// the connection, then [`reset`]s it.
    Refused(TcpStream, SocketAddr),
}

/// Accepts the next connection of any of `listeners` for `proxy` and takes its slot. Accept
/// errors never end the loop: descriptor exhaustion (`EMFILE`, `ENFILE`) is counted
/// (`reason="fd_limit"`), the pending connection is accepted with the reserve descriptor and
/// reset, and the loop backs off ([`Backoff`]) when that is not possible; other errors are
/// logged (rate-limited) and backed off.
pub async fn accept(
    listeners: &[TcpListener],
    admission: &Arc<Admission>,
    proxy: Direction,
) -> Accepted {
    let mut backoff = Backoff::default();
    loop {
        let (which, accepted) = std::future::poll_fn(|cx| {
            for (i, l) in listeners.iter().enumerate() {
                if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                    return std::task::Poll::Ready((i, r));
                }
            }
            std::task::Poll::Pending
        })
        .await;
        match accepted {
            Ok((stream, peer)) => {
                return match admission.admit(proxy, peer) {
                    Ok(slot) => Accepted::Admitted(stream, peer, slot),
                    Err(_) => Accepted::Refused(stream, peer),
                };
            }
            Err(e) if is_fd_exhaustion(&e) => {
                // accept() fails so before it looks at the queue: refuse what is pending
                // with the reserve descriptor, else wait (without spinning) for a descriptor.
                if refuse_with_spare(&listeners[which], admission).await {
                    admission.refuse(proxy, RefusalReason::FdLimit, admission.in_use(), None);
                    continue;
                }
                if let Some(suppressed) = admission.accept_errors.allow() {
                    warn!(proxy = proxy.as_str(), error = %e, suppressed, "accept failed: backing off");
                }
                backoff.wait().await;
            }
            // The peer gave up before we accepted: nothing to do.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                debug!(error = %e, "accept: connection aborted");
            }
            Err(e) => {
                if let Some(suppressed) = admission.accept_errors.allow() {
                    warn!(proxy = proxy.as_str(), error = %e, suppressed, "accept failed");
                }
                backoff.wait().await;
            }
        }
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Frees the reserve descriptor, accepts one pending connection with it (without waiting:
/// `false` when none is queued) and resets it.
async fn refuse_with_spare(listener: &TcpListener, admission: &Admission) -> bool {
    let Some(spare) = admission.take_spare() else {
        return false;
    };
    drop(spare);
    // One non-blocking attempt; `Pending` also clears the listener's readiness, so the next
    // accept waits for a new connection instead of retrying at once.
    let accepted =
        std::future::poll_fn(|cx| std::task::Poll::Ready(listener.poll_accept(cx))).await;
    let refused = match accepted {
        std::task::Poll::Ready(Ok((stream, _))) => {
            reset(stream);
            true
        }
        _ => false,
    };
    admission.restore_spare();
    refused
}

/// Closes `stream` with a reset (`SO_LINGER` 0): the peer sees `ECONNRESET` at once, and no
/// `TIME_WAIT` is kept.
pub fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) =
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)
    {
        debug!(error = %e, "SO_LINGER on a refused connection");
    }
    drop(stream);
}

#[cfg(test)]
mod tests;
