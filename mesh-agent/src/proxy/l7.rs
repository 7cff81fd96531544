//! L7: per-request enforcement on ports a workload declares HTTP (`httpPorts`).
//!
//! [`serve`] sits between a client byte stream (an accepted HBONE tunnel, or the local path)
//! and the local pod. It detects the protocol from the first bytes — the HTTP/2 prior-knowledge
//! preface means h2c ([`h2c`]), a valid HTTP/1.x request line means HTTP/1.1 ([`http1`]),
//! anything else is refused ([`L7Error::NotHttp`]) without contacting the pod — then asks an
//! [`Authorize`] once per request, at request-head time, and forwards allowed requests while
//! answering denied ones with `403` and body `RBAC: access denied`.
//!
//! The pod is connected lazily, when the first allowed request arrives: a connection whose
//! requests are all denied never reaches it. `connect_upstream` is called at most once; when
//! the pod closes its side, the client connection is closed after the response in flight
//! (HTTP/1.1) or later allowed streams are answered `502` (h2c).
//!
//! This module logs nothing per request: the [`Authorize`] implementation sees every request
//! (method, path, host) and knows its verdict and policy, so it is where per-request logs
//! (`connection denied`, `audit`, `dry-run deny`) are written; [`serve`] returns the counts
//! and the reason a connection failed.
//!
//! Request targets go through [`normalize`] first: the authority of an absolute-form target
//! replaces `Host`, the path is normalized, and the normalized path is both what the
//! [`Authorize`] sees and what the pod receives (in origin-form, the query as sent).
//!
//! Decisions on the edges (each answered `400` and the connection closed, never forwarded):
//! `CONNECT`; a target [`normalize`] refuses (`%00`, invalid percent-encoding, a fragment,
//! authority-form, `*` other than with `OPTIONS`…); a method with lower-case letters (methods
//! are case-sensitive and policies name them upper-case; Istio refuses them too);
//! `Content-Length` together with `Transfer-Encoding`; an invalid `Content-Length` or more than
//! one (identical ones too: stricter than RFC 9112 §6.3, which lets a recipient merge them);
//! a `Transfer-Encoding` other than `chunked`; several `Host` headers; framing, routing,
//! authentication or content fields in a request's chunked trailers (in a response's they
//! are dropped); a malformed chunk after the head was forwarded (`400`, the pod's connection
//! closed). h2c: a `host` header that disagrees with `:authority`.
//! `Upgrade` requests (e.g. WebSocket) are authorized like any request; if allowed and the pod
//! answers `101`, the connection becomes a raw byte copy both ways for the rest of its life (no
//! further per-request decisions: it is no longer HTTP). An `Upgrade: h2c` offer is removed
//! (with `HTTP2-Settings`) before forwarding, so a connection can never switch to HTTP/2
//! behind the per-request checks; clients speak h2c here with prior knowledge.

pub mod h2c;
pub mod http1;
pub mod normalize;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What an [`Authorize`] sees of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The normalized path ([`normalize`]), without the query: what policy matches and
    /// what is forwarded (`*` for `OPTIONS *`).
    pub path: &'a str,
    /// The authority the pod will route by: an absolute-form target's (HTTP/1.x, it
    /// overrides `Host`), else `Host`; `:authority`, else `host` (h2c).
    pub host: Option<&'a str>,
    /// The request's header fields (policy `when` `request.headers[...]`).
    pub headers: HeaderFields<'a>,
}

/// A request's header fields as parsed, HTTP/1.x or h2c.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderFields<'a> {
    Http1(&'a [httparse::Header<'a>]),
    H2(&'a http::HeaderMap),
}

impl crate::policy::RequestHeaders for HeaderFields<'_> {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        match self {
            Self::Http1(fields) => fields
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .for_each(|h| f(h.value)),
            Self::H2(map) => map.get_all(name).iter().for_each(|v| f(v.as_bytes())),
        }
    }
}

pub use crate::policy::RequestVerdict;

/// Decides requests. Called once per request, at request-head time, before anything of the
/// request reaches the pod; it may consult a policy snapshot that changes between requests.
pub trait Authorize: Send + Sync {
    fn authorize(&self, req: &RequestView<'_>) -> RequestVerdict;
}

impl<F> Authorize for F
where
    F: Fn(&RequestView<'_>) -> RequestVerdict + Send + Sync,
{
    fn authorize(&self, req: &RequestView<'_>) -> RequestVerdict {
        self(req)
    }
}

/// Largest header count [`L7Limits::max_headers`] may ask for (parsing uses a stack array).
pub const MAX_HEADERS_CAP: usize = 128;

/// Bounds and settings of one L7 connection.
#[derive(Clone, Debug)]
pub struct L7Limits {
    /// Largest request or response head (HTTP/1.x, chunked trailers included), and the
    /// largest header list (h2c). Default 64 KiB. Larger request heads are answered `431`.
    pub max_head_bytes: usize,
    /// Most header fields in an HTTP/1.x head; at most [`MAX_HEADERS_CAP`]. Default 128.
    pub max_headers: usize,
    /// From a connection's start (or a request's first byte) to its complete head, and the
    /// h2c preface and settings exchange. Default 10 s.
    pub header_timeout: Duration,
    /// Longest wait for bytes from the side being waited on (between requests, during bodies,
    /// for a response), and longest h2c connection without streams. Default 60 s.
    pub idle_timeout: Duration,
    /// The body of a denied HTTP/1.x request is read and discarded so that the next request
    /// parses; beyond this many bytes the connection is closed instead. Default 1 MiB.
    pub max_discard_bytes: u64,
    /// h2c streams open at once from the client. Default 100.
    pub max_concurrent_streams: u32,
    /// How request paths are normalized before matching and forwarding. Default
    /// `DECODE_AND_MERGE_SLASHES`.
    pub path_normalization: normalize::PathNormalization,
    /// Where this connection's incomplete request heads are counted against its source's cap
    /// ([`super::limits`]): from the first byte to protocol detection, and from a request's
    /// first byte to the end of its head (HTTP/1.x). Default none (uncounted).
    pub head_gate: Option<super::limits::HeadGate>,
}

impl L7Limits {
    /// One of the source's incomplete heads, held until the guard is dropped; nothing when
    /// uncounted.
    pub(crate) fn enter_head(&self) -> Result<Option<super::limits::Guard>, L7Error> {
        self.head_gate
            .as_ref()
            .map(|g| {
                g.enter()
                    .map_err(|r| L7Error::PendingHeads { limit: r.limit })
            })
            .transpose()
    }
}

impl Default for L7Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            max_headers: MAX_HEADERS_CAP,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_discard_bytes: 1024 * 1024,
            max_concurrent_streams: 100,
            path_normalization: normalize::PathNormalization::default(),
            head_gate: None,
        }
    }
}

/// The protocol a connection was detected to speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Http1,
    H2c,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::H2c => "h2c",
        }
    }
}

/// What a connection carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Stats {
    /// Requests (HTTP/1.x) or streams (h2c) whose head was received.
    pub requests: u64,
    /// Of which denied by the [`Authorize`].
    pub denied: u64,
    /// Bytes read from the client.
    pub bytes_in: u64,
    /// Bytes written to the client.
    pub bytes_out: u64,
    /// Meaningful once detection succeeded (an [`L7Error::NotHttp`] leaves the default).
    pub protocol: Protocol,
}

/// Which end of the proxy an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
        })
    }
}

/// Why an L7 connection ended other than by the client closing it between requests.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    /// The first bytes are neither the h2 preface nor an HTTP/1.x request line; the upstream
    /// was not contacted.
    #[error("not HTTP: {detail}")]
    NotHttp { detail: &'static str },
    /// Answered `431`.
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    /// Answered `431`.
    #[error("request head has more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    /// Answered `400`.
    #[error("bad request: {detail}")]
    BadRequest { detail: &'static str },
    /// The source has too many incomplete request heads: answered `429` when the request
    /// line was read, otherwise closed.
    #[error("too many incomplete request heads from this source (limit {limit})")]
    PendingHeads { limit: usize },
    /// Answered `408` when part of a head had arrived.
    #[error("request head not complete within {after:?}")]
    HeaderTimeout { after: Duration },
    #[error("{side} sent nothing for {after:?}")]
    IdleTimeout { side: Side, after: Duration },
    /// Answered `502`.
    #[error("connecting upstream: {source}")]
    Connect {
        #[source]
        source: io::Error,
    },
    /// Answered `502` when no response head had been forwarded yet.
    #[error("bad response from upstream: {detail}")]
    BadResponse { detail: &'static str },
    #[error("{side} closed the connection in the middle of a message")]
    UnexpectedEof { side: Side },
    #[error("{side} i/o: {source}")]
    Io {
        side: Side,
        #[source]
        source: io::Error,
    },
    #[error("{side} http/2: {source}")]
    H2 {
        side: Side,
        #[source]
        source: h2::Error,
    },
}

/// The body of every denial.
pub const DENY_BODY: &[u8] = b"RBAC: access denied";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Read size on both sides of an HTTP/1.x connection.
const READ_CHUNK: usize = 16 * 1024;

/// Serves one client connection until it ends; see the module docs.
pub async fn serve<C, U, F, Fut>(
    client: C,
    connect_upstream: F,
    authz: &dyn Authorize,
    limits: &L7Limits,
) -> Result<L7Stats, L7Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    F: FnOnce() -> Fut,
    Fut: Future<Output = io::Result<U>>,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut stats = L7Stats::default();
    serve_with_stats(client, connect_upstream, authz, limits, &mut stats).await?;
    Ok(stats)
}

/// [`serve`], with the counts kept in `stats` whatever the outcome (for metrics on failed
/// connections too).
pub async fn serve_with_stats<C, U, F, Fut>(
    client: C,
    connect_upstream: F,
    authz: &dyn Authorize,
    limits: &L7Limits,
    stats: &mut L7Stats,
) -> Result<(), L7Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    F: FnOnce() -> Fut,
    Fut: Future<Output = io::Result<U>>,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let counters = Arc::new(ByteCounters::default());
    let mut io = ClientIo {
        inner: client,
        prefix: Bytes::new(),
        counters: Arc::clone(&counters),
    };
    let result = async {
        let head = limits.enter_head()?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let Some(protocol) = detect(&mut io, &mut buf, limits).await? else {
            return Ok(());
        };
        drop(head);
        stats.protocol = protocol;
        match protocol {
            Protocol::Http1 => http1::serve(io, buf, connect_upstream, authz, limits, stats).await,
            Protocol::H2c => {
                io.prefix = buf.freeze();
                h2c::serve(io, connect_upstream, authz, limits, stats).await
            }
        }
    }
    .await;
    stats.bytes_in = counters.read.load(Ordering::Relaxed);
    stats.bytes_out = counters.written.load(Ordering::Relaxed);
    result
}

/// Reads until the first bytes tell the protocol. `None`: the client closed without sending
/// anything.
async fn detect<C: AsyncRead + Unpin>(
    io: &mut C,
    buf: &mut BytesMut,
    limits: &L7Limits,
) -> Result<Option<Protocol>, L7Error> {
    let deadline = tokio::time::Instant::now() + limits.header_timeout;
    loop {
        if let Some(p) = classify(buf)? {
            return Ok(Some(p));
        }
        if buf.len() >= limits.max_head_bytes {
            return Err(L7Error::HeadTooLarge {
                limit: limits.max_head_bytes,
            });
        }
        buf.reserve(READ_CHUNK.min(limits.max_head_bytes - buf.len()));
        let n = tokio::time::timeout_at(deadline, io.read_buf(buf))
            .await
            .map_err(|_| L7Error::HeaderTimeout {
                after: limits.header_timeout,
            })?
            .map_err(|source| L7Error::Io {
                side: Side::Client,
                source,
            })?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(L7Error::NotHttp {
                    detail: "connection closed before a complete request line",
                })
            };
        }
    }
}

/// `Ok(None)`: not enough bytes yet to tell.
fn classify(buf: &[u8]) -> Result<Option<Protocol>, L7Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return Ok((n == H2_PREFACE.len()).then_some(Protocol::H2c));
    }
    if buf[0] == 0x16 {
        return Err(L7Error::NotHttp {
            detail: "tls handshake",
        });
    }
    // Only the request line decides: errors in the header fields are answered `400`.
    let line = match buf.iter().position(|&b| b == b'\n') {
        Some(i) => &buf[..=i],
        None => buf,
    };
    match httparse::Request::new(&mut []).parse(line) {
        Ok(_) if line.ends_with(b"\n") => Ok(Some(Protocol::Http1)),
        Ok(_) => Ok(None),
        Err(_) => Err(L7Error::NotHttp {
            detail: "invalid http/1.x request line",
        }),
    }
}

#[derive(Debug, Default)]
struct ByteCounters {
    read: AtomicU64,
    written: AtomicU64,
}

/// The client stream: replays the bytes read during detection (h2c), counts both ways.
struct ClientIo<C> {
    inner: C,
    prefix: Bytes,
    counters: Arc<ByteCounters>,
}

impl<C: AsyncRead + Unpin> AsyncRead for ClientIo<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = (buf.filled().len() - before) as u64;
            this.counters.read.fetch_add(n, Ordering::Relaxed);
        }
        polled
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for ClientIo<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.counters.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.counters.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
