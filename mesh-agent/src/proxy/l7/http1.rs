//! HTTP/1.x: one request at a time, in order, over one upstream connection.
//!
//! Pipelined requests wait in the client buffer until the exchange before them is complete,
//! so responses (and the `403` of a denied request) go back in request order. Heads are parsed
//! with `httparse` (strict: no obs-fold) and re-serialized with CRLF line ends before they are
//! forwarded, so the pod sees exactly the head that was authorized. Bodies are streamed through
//! a bounded buffer, never held whole; chunked bodies are decoded and re-encoded (extensions
//! dropped, trailers validated). The connection is closed after a response when the request or
//! the response asks for it, the request is HTTP/1.0, the response is close-delimited, or the
//! pod answered before the request body was complete.

use std::{future::Future, io, io::Write as _};

use bytes::{Buf, BufMut, BytesMut};
use tokio::{
    io::{split, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    time::{timeout, timeout_at, Instant},
};

use super::{
    normalize::{split_target, Normalizer},
    Authorize, ClientIo, L7Error, L7Limits, L7Stats, RequestVerdict, RequestView, Side,
    MAX_HEADERS_CAP, READ_CHUNK,
};

const DENIED: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\
content-length: 19\r\n\r\nRBAC: access denied";
const DENIED_CLOSE: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\
content-length: 19\r\nconnection: close\r\n\r\nRBAC: access denied";
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const TOO_MANY: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
content-length: 0\r\nconnection: close\r\n\r\n";
const BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
/// Longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Most fields in chunked trailers.
const MAX_TRAILERS: usize = 32;

/// Fields that must not appear in trailers (RFC 9110 §6.5.1: framing, routing, connection
/// management, authentication, request modifiers and content description).
const FORBIDDEN_TRAILERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "trailer",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "expect",
    "max-forwards",
    "range",
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "www-authenticate",
    "proxy-authenticate",
    "content-encoding",
    "content-type",
    "content-range",
    "cache-control",
];

fn forbidden_trailer(name: &str) -> bool {
    FORBIDDEN_TRAILERS
        .iter()
        .any(|f| f.eq_ignore_ascii_case(name))
}

/// A method as policies name them: a token (httparse checked that) without lower-case
/// letters. Methods are case-sensitive (RFC 9110 §9.1): `get` is not `GET`, and a policy on
/// `GET` must not be passed by a request the pod may read as `GET`.
pub fn valid_method(method: &str) -> bool {
    !method.is_empty() && !method.bytes().any(|b| b.is_ascii_lowercase())
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Empty,
    Length(u64),
    Chunked,
    /// Responses only: until the upstream closes.
    UntilClose,
}

/// A parsed, checked and authorized request head.
#[derive(Debug)]
struct ReqHead {
    len: usize,
    body: Body,
    allowed: bool,
    /// Close after this exchange (client asked, or HTTP/1.0).
    close: bool,
    expect_continue: bool,
    upgrade: bool,
    head: bool,
}

/// What ended a response.
enum RespEnd {
    Done {
        close: bool,
    },
    /// `101` to an upgrade request: raw bytes from now on.
    Switched,
}

/// Where a request failed before forwarding, and the answer to send (none when the client
/// is gone or was idle).
struct Refusal {
    answer: Option<&'static [u8]>,
    error: L7Error,
}

impl From<L7Error> for Refusal {
    fn from(error: L7Error) -> Self {
        let answer = match error {
            L7Error::HeadTooLarge { .. } | L7Error::TooManyHeaders { .. } => Some(TOO_LARGE),
            L7Error::HeaderTimeout { .. } => Some(TIMEOUT),
            L7Error::PendingHeads { .. } => Some(TOO_MANY),
            L7Error::BadRequest { .. } => Some(BAD_REQUEST),
            _ => None,
        };
        Self { answer, error }
    }
}

type Halves<T> = (ReadHalf<T>, WriteHalf<T>);

pub(super) async fn serve<C, U, F, Fut>(
    client: ClientIo<C>,
    mut rbuf: BytesMut,
    connect: F,
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
    let (mut crd, mut cwr) = split(client);
    let mut connect = Some(connect);
    let mut upstream: Option<Halves<U>> = None;
    let mut ubuf = BytesMut::new();
    let mut head = Vec::with_capacity(1024);
    let mut norm = Normalizer::default();
    loop {
        let req = match read_request(&mut crd, &mut rbuf, authz, limits, &mut head, &mut norm).await
        {
            Ok(Some(req)) => req,
            Ok(None) => return shutdown(&mut cwr).await,
            // A keep-alive connection that stays idle between requests just ends.
            Err(Refusal {
                error: L7Error::IdleTimeout { .. },
                ..
            }) if rbuf.is_empty() => return shutdown(&mut cwr).await,
            Err(Refusal { answer, error }) => return fail(&mut cwr, answer, error).await,
        };
        rbuf.advance(req.len);
        stats.requests += 1;

        if !req.allowed {
            stats.denied += 1;
            // After a denial the client may or may not send a body it announced with
            // `Expect: 100-continue`: the framing is lost, so close.
            let close = req.close || (req.expect_continue && req.body != Body::Empty);
            write_client(&mut cwr, if close { DENIED_CLOSE } else { DENIED }).await?;
            flush_client(&mut cwr).await?;
            if close {
                return shutdown(&mut cwr).await;
            }
            let discarded = copy_body(
                &mut crd,
                &mut rbuf,
                &mut tokio::io::sink(),
                req.body,
                limits,
                Side::Client,
                limits.max_discard_bytes,
            )
            .await?;
            if discarded.is_none() {
                return shutdown(&mut cwr).await;
            }
            continue;
        }

        let (urd, uwr) = match &mut upstream {
            Some((r, w)) => (r, w),
            slot @ None => {
                // `connect` is only gone once an upstream existed, and a closed upstream
                // ends the client connection too.
                let Some(connect) = connect.take() else {
                    return Err(L7Error::UnexpectedEof {
                        side: Side::Upstream,
                    });
                };
                match connect().await {
                    Ok(u) => {
                        let (r, w) = slot.insert(split(u));
                        (r, w)
                    }
                    Err(source) => {
                        return fail(&mut cwr, Some(BAD_GATEWAY), L7Error::Connect { source })
                            .await;
                    }
                }
            }
        };
        write_upstream(uwr, &head).await?;

        let mut responded = false;
        let end = {
            let body = async {
                let r = copy_body(
                    &mut crd,
                    &mut rbuf,
                    uwr,
                    req.body,
                    limits,
                    Side::Client,
                    u64::MAX,
                )
                .await;
                if r.is_ok() {
                    flush_to(uwr, Side::Upstream).await?;
                }
                r
            };
            let resp = forward_response(
                urd,
                &mut ubuf,
                &mut cwr,
                &req,
                limits,
                &mut head,
                &mut responded,
            );
            tokio::pin!(body, resp);
            let mut body_done = req.body == Body::Empty;
            loop {
                tokio::select! {
                    r = &mut body, if !body_done => match r {
                        Ok(_) => body_done = true,
                        // A malformed or cut request body: answered below, not dropped.
                        Err(e) => break Err(e),
                    },
                    r = &mut resp => break r.map(|end| (end, body_done)),
                }
            }
        };
        let (end, body_done) = match end {
            Ok(e) => e,
            Err(e) => {
                let answer = match e {
                    _ if responded => None,
                    L7Error::BadRequest { .. } => Some(BAD_REQUEST),
                    L7Error::IdleTimeout {
                        side: Side::Client, ..
                    } => Some(TIMEOUT),
                    L7Error::Io {
                        side: Side::Client, ..
                    }
                    | L7Error::UnexpectedEof { side: Side::Client } => None,
                    _ => Some(BAD_GATEWAY),
                };
                return fail(&mut cwr, answer, e).await;
            }
        };
        match end {
            RespEnd::Switched => {
                return tunnel(&mut crd, &mut rbuf, &mut cwr, urd, &mut ubuf, uwr).await;
            }
            RespEnd::Done { close } => {
                if close || req.close || !body_done {
                    return shutdown(&mut cwr).await;
                }
            }
        }
    }
}

/// Reads and checks the next request head; `None` when the client closed between requests.
async fn read_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    authz: &dyn Authorize,
    limits: &L7Limits,
    out: &mut Vec<u8>,
    norm: &mut Normalizer,
) -> Result<Option<ReqHead>, Refusal> {
    let mut deadline = (!buf.is_empty()).then(|| Instant::now() + limits.header_timeout);
    // Held while this head is incomplete (counted against the source's cap).
    let mut pending = match deadline {
        Some(_) => limits.enter_head()?,
        None => None,
    };
    loop {
        if !buf.is_empty() {
            if let Some(req) = parse_request(buf, authz, limits, out, norm)? {
                return Ok(Some(req));
            }
            if buf.len() >= limits.max_head_bytes {
                return Err(L7Error::HeadTooLarge {
                    limit: limits.max_head_bytes,
                }
                .into());
            }
        }
        let room = head_room(buf, limits);
        buf.reserve(room);
        let mut limited = (&mut *buf).limit(room);
        let read = rd.read_buf(&mut limited);
        let n = match deadline {
            Some(d) => timeout_at(d, read)
                .await
                .map_err(|_| L7Error::HeaderTimeout {
                    after: limits.header_timeout,
                })?,
            None => timeout(limits.idle_timeout, read)
                .await
                .map_err(|_| L7Error::IdleTimeout {
                    side: Side::Client,
                    after: limits.idle_timeout,
                })?,
        }
        .map_err(|source| L7Error::Io {
            side: Side::Client,
            source,
        })?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(L7Error::UnexpectedEof { side: Side::Client }.into())
            };
        }
        deadline.get_or_insert_with(|| Instant::now() + limits.header_timeout);
        if pending.is_none() {
            pending = limits.enter_head()?;
        }
    }
}

/// Parses, checks and authorizes a request head; writes the head to forward into `out`: the
/// normalized path in origin-form, with `Host` from an absolute-form target. `Ok(None)`:
/// incomplete.
fn parse_request(
    buf: &[u8],
    authz: &dyn Authorize,
    limits: &L7Limits,
    out: &mut Vec<u8>,
    norm: &mut Normalizer,
) -> Result<Option<ReqHead>, L7Error> {
    let bad = |detail| L7Error::BadRequest { detail };
    let max_headers = limits.max_headers.min(MAX_HEADERS_CAP);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut headers[..max_headers]);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(L7Error::TooManyHeaders { limit: max_headers })
        }
        Err(_) => return Err(bad("malformed request head")),
    };
    if len > limits.max_head_bytes {
        return Err(L7Error::HeadTooLarge {
            limit: limits.max_head_bytes,
        });
    }
    let (Some(method), Some(raw_target), Some(version)) = (req.method, req.path, req.version)
    else {
        return Err(bad("malformed request head"));
    };
    if method == "CONNECT" {
        return Err(bad("CONNECT is not proxied"));
    }
    if !valid_method(method) {
        return Err(bad("method is not an upper-case token"));
    }
    let target = split_target(raw_target, method).map_err(|e| bad(e.detail()))?;
    let path = norm
        .normalize(target.path, limits.path_normalization)
        .map_err(|e| bad(e.detail()))?;

    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut host: Option<&str> = None;
    let mut conn_close = false;
    let mut conn_upgrade = false;
    let mut upgrade_header = false;
    let mut upgrade_h2c = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Even identical repeats are refused (RFC 9112 §6.3 would allow merging them).
            if length.is_some() {
                return Err(bad("several content-length fields"));
            }
            add_length(&mut length, h.value).map_err(bad)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !trimmed(h.value).eq_ignore_ascii_case(b"chunked") {
                return Err(bad("unsupported transfer-encoding"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(bad("several host headers"));
            }
            host = Some(std::str::from_utf8(trimmed(h.value)).map_err(|_| bad("invalid host"))?);
        } else if name.eq_ignore_ascii_case("connection") {
            conn_close |= has_token(h.value, b"close");
            conn_upgrade |= has_token(h.value, b"upgrade");
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_header = true;
            upgrade_h2c |= has_token(h.value, b"h2c");
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= trimmed(h.value).eq_ignore_ascii_case(b"100-continue");
        }
    }
    if chunked && length.is_some() {
        return Err(bad("both content-length and transfer-encoding"));
    }
    if chunked && version == 0 {
        return Err(bad("transfer-encoding in http/1.0"));
    }
    let body = match (chunked, length) {
        (true, _) => Body::Chunked,
        (false, Some(0) | None) => Body::Empty,
        (false, Some(n)) => Body::Length(n),
    };

    // RFC 9112 §3.2.2: the authority of an absolute-form target overrides Host.
    let host = target.authority.or(host);
    let view = RequestView {
        method,
        path,
        host,
        headers: super::HeaderFields::Http1(req.headers),
    };
    let allowed = matches!(authz.authorize(&view), RequestVerdict::Allow);

    out.clear();
    if allowed {
        // Origin-form, the normalized path, the query as sent.
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        if let Some(query) = target.query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        let _ = write!(out, " HTTP/1.{version}\r\n");
        if let Some(authority) = target.authority {
            let _ = write!(out, "host: {authority}\r\n");
        }
        write_fields(out, req.headers, |name| {
            (target.authority.is_some() && name.eq_ignore_ascii_case("host"))
                || (upgrade_h2c
                    && (name.eq_ignore_ascii_case("upgrade")
                        || name.eq_ignore_ascii_case("http2-settings")))
        });
    }
    Ok(Some(ReqHead {
        len,
        body,
        allowed,
        close: conn_close || version == 0,
        expect_continue,
        upgrade: conn_upgrade && upgrade_header && !upgrade_h2c,
        head: method == "HEAD",
    }))
}

/// A parsed response head, already serialized into `out`.
struct RespHead {
    len: usize,
    status: u16,
    body: Body,
    close: bool,
}

fn parse_response(
    buf: &[u8],
    req: &ReqHead,
    limits: &L7Limits,
    out: &mut Vec<u8>,
) -> Result<Option<RespHead>, L7Error> {
    let bad = |detail| L7Error::BadResponse { detail };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(bad("malformed response head")),
    };
    if len > limits.max_head_bytes {
        return Err(bad("response head too large"));
    }
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(bad("malformed response head"));
    };
    let mut length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut close = version == 0;
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            add_length(&mut length, h.value).map_err(bad)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            // Only the last coding decides whether the body is chunked.
            chunked = last_token_is(h.value, b"chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, b"close") {
                close = true;
            } else if version == 0 && has_token(h.value, b"keep-alive") {
                close = false;
            }
        }
    }
    let body = match status {
        100..=199 => Body::Empty,
        204 | 304 => Body::Empty,
        _ if req.head => Body::Empty,
        _ if te && chunked => Body::Chunked,
        _ if te => Body::UntilClose,
        _ => match length {
            Some(0) => Body::Empty,
            Some(n) => Body::Length(n),
            None => Body::UntilClose,
        },
    };
    if body == Body::UntilClose || (te && length.is_some()) {
        close = true;
    }
    out.clear();
    let reason = resp.reason.unwrap_or("");
    let _ = write!(out, "HTTP/1.{version} {status} {reason}\r\n");
    // With both, Transfer-Encoding wins (RFC 9112 §6.3): drop the stale length.
    write_fields(out, resp.headers, |name| {
        te && name.eq_ignore_ascii_case("content-length")
    });
    Ok(Some(RespHead {
        len,
        status,
        body,
        close,
    }))
}

/// Reads the upstream's response(s) to `req` — interim `1xx` first — and writes them to the
/// client. `responded` turns true once anything was written to the client.
async fn forward_response<R, W>(
    rd: &mut R,
    buf: &mut BytesMut,
    wr: &mut W,
    req: &ReqHead,
    limits: &L7Limits,
    out: &mut Vec<u8>,
    responded: &mut bool,
) -> Result<RespEnd, L7Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let head = loop {
            if !buf.is_empty() {
                if let Some(head) = parse_response(buf, req, limits, out)? {
                    break head;
                }
                if buf.len() >= limits.max_head_bytes {
                    return Err(L7Error::BadResponse {
                        detail: "response head too large",
                    });
                }
            }
            if read_more(rd, buf, head_room(buf, limits), limits, Side::Upstream).await? == 0 {
                return Err(L7Error::UnexpectedEof {
                    side: Side::Upstream,
                });
            }
        };
        buf.advance(head.len);
        if head.status == 101 {
            if !req.upgrade {
                return Err(L7Error::BadResponse {
                    detail: "101 to a request that did not ask to upgrade",
                });
            }
            *responded = true;
            write_client(wr, out).await?;
            flush_client(wr).await?;
            return Ok(RespEnd::Switched);
        }
        *responded = true;
        write_client(wr, out).await?;
        if (100..200).contains(&head.status) {
            flush_client(wr).await?;
            continue;
        }
        copy_body(rd, buf, wr, head.body, limits, Side::Upstream, u64::MAX).await?;
        flush_client(wr).await?;
        return Ok(RespEnd::Done { close: head.close });
    }
}

/// Copies one body from `rd` (through `buf`, which may hold bytes already read) to `wr`.
/// `Ok(None)` when more than `max` bytes of content would be copied (nothing past `max` is).
async fn copy_body<R, W>(
    rd: &mut R,
    buf: &mut BytesMut,
    wr: &mut W,
    body: Body,
    limits: &L7Limits,
    from: Side,
    max: u64,
) -> Result<Option<u64>, L7Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to = other(from);
    match body {
        Body::Empty => Ok(Some(0)),
        Body::Length(n) => {
            if n > max {
                return Ok(None);
            }
            copy_exact(rd, buf, wr, n, limits, from).await?;
            Ok(Some(n))
        }
        Body::UntilClose => {
            let mut total = 0u64;
            loop {
                if buf.is_empty() && read_more(rd, buf, READ_CHUNK, limits, from).await? == 0 {
                    return Ok(Some(total));
                }
                total += buf.len() as u64;
                if total > max {
                    return Ok(None);
                }
                write_to(wr, buf, to).await?;
                buf.clear();
            }
        }
        Body::Chunked => {
            let mut total = 0u64;
            let mut line = [0u8; 24];
            loop {
                let (used, size) = loop {
                    match httparse::parse_chunk_size(buf) {
                        Ok(httparse::Status::Complete(r)) => break r,
                        Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => {
                            read_some(rd, buf, limits, from).await?;
                        }
                        _ => return Err(malformed(from, "invalid chunk size line")),
                    }
                };
                buf.advance(used);
                if size == 0 {
                    // Last chunk: trailer fields, then the empty line.
                    let len = loop {
                        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
                        match httparse::parse_headers(buf, &mut fields) {
                            Ok(httparse::Status::Complete((len, _))) => break len,
                            Ok(httparse::Status::Partial) if buf.len() < limits.max_head_bytes => {
                                read_some(rd, buf, limits, from).await?;
                            }
                            _ => return Err(malformed(from, "invalid chunked trailers")),
                        }
                    };
                    let mut trailers = Vec::new();
                    if len > 2 {
                        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
                        let Ok(httparse::Status::Complete((_, fields))) =
                            httparse::parse_headers(&buf[..len], &mut fields)
                        else {
                            return Err(malformed(from, "invalid chunked trailers"));
                        };
                        let forbidden = |h: &httparse::Header<'_>| forbidden_trailer(h.name);
                        // A client's are refused (nothing of a smuggled head goes on); a
                        // pod's are dropped.
                        if from == Side::Client && fields.iter().any(forbidden) {
                            return Err(malformed(from, "forbidden field in chunked trailers"));
                        }
                        write_fields(&mut trailers, fields, forbidden_trailer);
                    } else {
                        trailers.extend_from_slice(b"\r\n");
                    }
                    write_to(wr, b"0\r\n", to).await?;
                    write_to(wr, &trailers, to).await?;
                    buf.advance(len);
                    return Ok(Some(total));
                }
                total = total.saturating_add(size);
                if total > max {
                    return Ok(None);
                }
                let mut cursor = io::Cursor::new(&mut line[..]);
                let _ = write!(cursor, "{size:x}\r\n");
                let n = cursor.position() as usize;
                write_to(wr, &line[..n], to).await?;
                copy_exact(rd, buf, wr, size, limits, from).await?;
                while buf.len() < 2 {
                    read_some(rd, buf, limits, from).await?;
                }
                if &buf[..2] != b"\r\n" {
                    return Err(malformed(from, "chunk data not followed by CRLF"));
                }
                buf.advance(2);
                write_to(wr, b"\r\n", to).await?;
            }
        }
    }
}

async fn copy_exact<R, W>(
    rd: &mut R,
    buf: &mut BytesMut,
    wr: &mut W,
    mut left: u64,
    limits: &L7Limits,
    from: Side,
) -> Result<(), L7Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while left > 0 {
        if buf.is_empty() {
            read_some(rd, buf, limits, from).await?;
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        write_to(wr, &buf[..take], other(from)).await?;
        buf.advance(take);
        left -= take as u64;
    }
    Ok(())
}

/// Reads up to `room` more bytes into `buf`, waiting at most the idle timeout.
async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    room: usize,
    limits: &L7Limits,
    side: Side,
) -> Result<usize, L7Error> {
    buf.reserve(room);
    timeout(
        limits.idle_timeout,
        rd.read_buf(&mut (&mut *buf).limit(room)),
    )
    .await
    .map_err(|_| L7Error::IdleTimeout {
        side,
        after: limits.idle_timeout,
    })?
    .map_err(|source| L7Error::Io { side, source })
}

/// [`read_more`] a chunk, where the end of the stream would cut a message short.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limits: &L7Limits,
    from: Side,
) -> Result<(), L7Error> {
    match read_more(rd, buf, READ_CHUNK, limits, from).await? {
        0 => Err(L7Error::UnexpectedEof { side: from }),
        _ => Ok(()),
    }
}

/// How much more of a head may be read into `buf` at once (at least 1, so that a head at
/// the limit is still told from a larger one).
fn head_room(buf: &BytesMut, limits: &L7Limits) -> usize {
    limits
        .max_head_bytes
        .saturating_sub(buf.len())
        .clamp(1, READ_CHUNK)
}

/// After an upstream `101`: raw bytes both ways until both sides have closed.
async fn tunnel<CR, CW, UR, UW>(
    crd: &mut CR,
    rbuf: &mut BytesMut,
    cwr: &mut CW,
    urd: &mut UR,
    ubuf: &mut BytesMut,
    uwr: &mut UW,
) -> Result<(), L7Error>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let up = splice(crd, rbuf, uwr, Side::Client);
    let down = splice(urd, ubuf, cwr, Side::Upstream);
    tokio::try_join!(up, down).map(|_| ())
}

/// One direction of [`tunnel`]: what `buf` holds, then raw bytes from `rd` until it ends,
/// then `wr` is shut down.
async fn splice<R, W>(rd: &mut R, buf: &mut BytesMut, wr: &mut W, from: Side) -> Result<(), L7Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to = other(from);
    write_to(wr, buf, to).await?;
    buf.clear();
    tokio::io::copy(rd, wr)
        .await
        .map_err(|source| L7Error::Io { side: from, source })?;
    wr.shutdown()
        .await
        .map_err(|source| L7Error::Io { side: to, source })
}

/// Writes header fields but those `skip` names, then the empty line that ends a head.
fn write_fields(out: &mut Vec<u8>, headers: &[httparse::Header<'_>], skip: impl Fn(&str) -> bool) {
    for h in headers {
        if skip(h.name) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn malformed(from: Side, detail: &'static str) -> L7Error {
    match from {
        Side::Client => L7Error::BadRequest { detail },
        Side::Upstream => L7Error::BadResponse { detail },
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    }
}

async fn write_to<W: AsyncWrite + Unpin>(wr: &mut W, b: &[u8], side: Side) -> Result<(), L7Error> {
    wr.write_all(b)
        .await
        .map_err(|source| L7Error::Io { side, source })
}

async fn write_client<W: AsyncWrite + Unpin>(wr: &mut W, b: &[u8]) -> Result<(), L7Error> {
    write_to(wr, b, Side::Client).await
}

async fn flush_to<W: AsyncWrite + Unpin>(wr: &mut W, side: Side) -> Result<(), L7Error> {
    wr.flush()
        .await
        .map_err(|source| L7Error::Io { side, source })
}

async fn flush_client<W: AsyncWrite + Unpin>(wr: &mut W) -> Result<(), L7Error> {
    flush_to(wr, Side::Client).await
}

async fn write_upstream<W: AsyncWrite + Unpin>(wr: &mut W, b: &[u8]) -> Result<(), L7Error> {
    write_to(wr, b, Side::Upstream).await?;
    flush_to(wr, Side::Upstream).await
}

/// A failed connection's end: `answer` (if any) as the last bytes to the client, then close.
async fn fail<W: AsyncWrite + Unpin>(
    wr: &mut W,
    answer: Option<&[u8]>,
    error: L7Error,
) -> Result<(), L7Error> {
    if let Some(answer) = answer {
        let _ = wr.write_all(answer).await;
    }
    let _ = wr.shutdown().await;
    Err(error)
}

/// The normal end of a connection: our side closed after the last response.
async fn shutdown<W: AsyncWrite + Unpin>(wr: &mut W) -> Result<(), L7Error> {
    let _ = wr.shutdown().await;
    Ok(())
}

fn trimmed(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| trimmed(t).eq_ignore_ascii_case(token))
}

fn last_token_is(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .next_back()
        .is_some_and(|t| trimmed(t).eq_ignore_ascii_case(token))
}

/// Takes in a Content-Length field: an invalid value, or one other than an earlier field's,
/// is refused (the detail of the error is returned).
fn add_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), &'static str> {
    let n = parse_length(value).ok_or("invalid content-length")?;
    if length.is_some_and(|l| l != n) {
        return Err("conflicting content-length");
    }
    *length = Some(n);
    Ok(())
}

/// A Content-Length value: digits only, at most 18 of them (no sign, no list).
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trimmed(v);
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_strict() {
        assert_eq!(parse_length(b"42"), Some(42));
        assert_eq!(parse_length(b" 7 "), Some(7));
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"1,1",
            b"0x10",
            b"1 2",
            b"9999999999999999999",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tokens() {
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!has_token(b"closed", b"close"));
        assert!(last_token_is(b"gzip, chunked", b"chunked"));
        assert!(!last_token_is(b"chunked, gzip", b"chunked"));
    }

    fn parse(raw: &[u8]) -> Result<Option<ReqHead>, L7Error> {
        let allow = |_: &RequestView<'_>| RequestVerdict::Allow;
        parse_request(
            raw,
            &allow,
            &L7Limits::default(),
            &mut Vec::new(),
            &mut Normalizer::default(),
        )
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases: [&[u8]; 6] = [
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                matches!(parse(raw), Err(L7Error::BadRequest { .. })),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn framing_and_connection_flags() {
        let r = parse(b"POST /x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, Body::Chunked);
        let r = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(r.close);
        let r = parse(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.upgrade);
        assert!(parse(b"GET / HTTP/1.1\r\nhost: a\r\n").unwrap().is_none());
    }
}
