//! h2c with prior knowledge: an h2 server towards the client, one h2 client connection to the
//! pod (opened with the first allowed stream).
//!
//! Every stream is authorized from its request head (`:method`, `:path`, `:authority`) when it
//! is accepted; denied streams are answered `403` with `RBAC: access denied` on the spot,
//! allowed ones are forwarded by a task of their own (headers, body, trailers both ways). Flow
//! control carries back-pressure end to end: received data is only released (window reopened)
//! once the other connection has accepted it. `:path` goes through [`super::normalize`]: the
//! normalized path is what policy matches and what the pod receives. Answered `400` (never
//! forwarded): `CONNECT`, a `:path` the normalizer refuses, a method with lower-case letters,
//! and a `host` header that disagrees with `:authority`.

use std::{future::poll_fn, future::Future, io, pin::Pin};

use bytes::Bytes;
use h2::{client::SendRequest, server::SendResponse, Reason, RecvStream, SendStream};
use http::{
    header, uri::PathAndQuery, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinSet,
    time::timeout,
};

use super::{
    normalize::{split_target, Normalizer, PathNormalization},
    Authorize, ClientIo, L7Error, L7Limits, L7Stats, RequestVerdict, RequestView, Side, DENY_BODY,
};

const STREAM_WINDOW: u32 = 256 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 64 * 1024;

fn server_builder(limits: &L7Limits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_concurrent_reset_streams(64)
        .max_pending_accept_reset_streams(64);
    b
}

fn client_builder(limits: &L7Limits) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .enable_push(false);
    b
}

/// The upstream connection's state.
enum Upstream<U> {
    /// Not needed yet.
    Idle,
    Up {
        send: SendRequest<Bytes>,
        /// Boxed: large, and there is one per connection at most.
        conn: Box<h2::client::Connection<U, Bytes>>,
    },
    /// Connecting failed or the connection ended: allowed streams are answered `502`.
    Gone,
}

pub(super) async fn serve<C, U, F, Fut>(
    client: ClientIo<C>,
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
    let client_err = |source| L7Error::H2 {
        side: Side::Client,
        source,
    };
    let mut server = timeout(
        limits.header_timeout,
        server_builder(limits).handshake::<_, Bytes>(client),
    )
    .await
    .map_err(|_| L7Error::HeaderTimeout {
        after: limits.header_timeout,
    })?
    .map_err(client_err)?;

    let mut connect = Some(connect);
    let mut upstream: Upstream<U> = Upstream::Idle;
    // The first failure; the connection goes on serving what it can.
    let mut failure: Option<L7Error> = None;
    let mut streams = JoinSet::new();
    let mut closing = false;
    let mut norm = Normalizer::default();
    loop {
        let idle = streams.is_empty() && !closing;
        tokio::select! {
            accepted = server.accept() => match accepted {
                None => break,
                Some(Err(e)) => {
                    failure.get_or_insert(client_err(e));
                    break;
                }
                Some(Ok((mut req, respond))) => {
                    stats.requests += 1;
                    match decide(&req, authz, limits.path_normalization, &mut norm) {
                        Decision::Deny => {
                            stats.denied += 1;
                            answer(respond, StatusCode::FORBIDDEN, DENY_BODY);
                            continue;
                        }
                        Decision::Refuse => {
                            answer(respond, StatusCode::BAD_REQUEST, b"");
                            continue;
                        }
                        Decision::Allow(None) => {}
                        Decision::Allow(Some(uri)) => *req.uri_mut() = uri,
                    }
                    if matches!(upstream, Upstream::Idle) {
                        upstream = match open_upstream(connect.take(), limits).await {
                            Ok((send, conn)) => Upstream::Up {
                                send,
                                conn: Box::new(conn),
                            },
                            Err(e) => {
                                failure.get_or_insert(e);
                                Upstream::Gone
                            }
                        };
                    }
                    match &upstream {
                        Upstream::Up { send, .. } => {
                            streams.spawn(forward(req, respond, send.clone()));
                        }
                        _ => answer(respond, StatusCode::BAD_GATEWAY, b""),
                    }
                }
            },
            ended = drive(&mut upstream) => {
                if let Err(source) = ended {
                    failure.get_or_insert(L7Error::H2 { side: Side::Upstream, source });
                }
                upstream = Upstream::Gone;
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            _ = tokio::time::sleep(limits.idle_timeout), if idle => {
                // No stream for a while: GOAWAY, then `accept` ends once the client is done.
                server.graceful_shutdown();
                closing = true;
            }
        }
    }
    // The client connection is over; let stream tasks notice, keeping the upstream driven.
    let drained = timeout(limits.idle_timeout, async {
        loop {
            tokio::select! {
                next = streams.join_next() => if next.is_none() { break },
                _ = drive(&mut upstream) => upstream = Upstream::Gone,
            }
        }
    })
    .await;
    if drained.is_err() {
        streams.abort_all();
    }
    failure.map_or(Ok(()), Err)
}

/// Polls the upstream connection; pending forever when there is none.
async fn drive<U>(upstream: &mut Upstream<U>) -> Result<(), h2::Error>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    match upstream {
        Upstream::Up { conn, .. } => poll_fn(|cx| Pin::new(&mut **conn).poll(cx)).await,
        _ => std::future::pending().await,
    }
}

async fn open_upstream<U, F, Fut>(
    connect: Option<F>,
    limits: &L7Limits,
) -> Result<(SendRequest<Bytes>, h2::client::Connection<U, Bytes>), L7Error>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = io::Result<U>>,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let Some(connect) = connect else {
        return Err(L7Error::UnexpectedEof {
            side: Side::Upstream,
        });
    };
    let io = connect()
        .await
        .map_err(|source| L7Error::Connect { source })?;
    timeout(limits.header_timeout, client_builder(limits).handshake(io))
        .await
        .map_err(|_| L7Error::Connect {
            source: io::Error::new(io::ErrorKind::TimedOut, "h2 handshake with upstream"),
        })?
        .map_err(|source| L7Error::H2 {
            side: Side::Upstream,
            source,
        })
}

enum Decision {
    /// With the URI to forward when normalization changed the path.
    Allow(Option<Uri>),
    Deny,
    Refuse,
}

fn decide(
    req: &Request<RecvStream>,
    authz: &dyn Authorize,
    mode: PathNormalization,
    norm: &mut Normalizer,
) -> Decision {
    let method = req.method().as_str();
    if req.method() == Method::CONNECT || method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Decision::Refuse;
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_header = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(h), None) => match h.to_str() {
            Ok(h) => Some(h),
            Err(_) => return Decision::Refuse,
        },
        (Some(_), Some(_)) => return Decision::Refuse,
    };
    let authority = req.uri().authority().map(|a| a.as_str());
    // RFC 9113 §8.3.1: `host` and `:authority` must agree; a pod routing by one must not
    // see a request authorized by the other.
    if let (Some(a), Some(h)) = (authority, host_header) {
        if !a.eq_ignore_ascii_case(h) {
            return Decision::Refuse;
        }
    }
    let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(target) = split_target(raw, method) else {
        return Decision::Refuse;
    };
    if target.authority.is_some() {
        return Decision::Refuse;
    }
    let Ok(path) = norm.normalize(target.path, mode) else {
        return Decision::Refuse;
    };
    let view = RequestView {
        method,
        path,
        host: authority.or(host_header),
        headers: super::HeaderFields::H2(req.headers()),
    };
    if let RequestVerdict::Deny = authz.authorize(&view) {
        return Decision::Deny;
    }
    if path == target.path {
        return Decision::Allow(None);
    }
    match rewrite(req.uri(), path, target.query) {
        Some(uri) => Decision::Allow(Some(uri)),
        None => Decision::Refuse,
    }
}

/// `uri` with the normalized `path` (and the query as sent).
fn rewrite(uri: &Uri, path: &str, query: Option<&str>) -> Option<Uri> {
    let pq = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    }
    .ok()?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).ok()
}

/// Answers a stream with `status` and a short plain-text body (nothing on error: the stream
/// or connection is already gone).
fn answer(mut respond: SendResponse<Bytes>, status: StatusCode, body: &'static [u8]) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if !body.is_empty() {
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    if let Ok(mut send) = respond.send_response(resp, body.is_empty()) {
        if !body.is_empty() {
            let _ = send.send_data(Bytes::from_static(body), true);
        }
    }
}

/// A failed half of a forwarded stream: which side broke it (a broken sending side has
/// already reset or closed its stream; only a broken receiving side needs passing on).
enum PipeError {
    Recv(h2::Error),
    Send,
}

/// Carries one allowed stream to the upstream and its response back.
async fn forward(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    upstream: SendRequest<Bytes>,
) {
    let (mut parts, mut body) = req.into_parts();
    if parts.uri.authority().is_none() {
        // No `:authority` (Host only): h2 forwards such a request as from HTTP/1.x.
        parts.version = Version::HTTP_11;
    }
    let end = body.is_end_stream();
    let mut upstream = match upstream.ready().await {
        Ok(u) => u,
        Err(_) => return answer(respond, StatusCode::BAD_GATEWAY, b""),
    };
    let (response, mut up_send) = match upstream.send_request(Request::from_parts(parts, ()), end) {
        Ok(r) => r,
        Err(_) => return answer(respond, StatusCode::BAD_GATEWAY, b""),
    };
    let upload = async {
        if end {
            return;
        }
        // A refused body (`PipeError::Send`): the upstream's response (or reset) says why.
        pipe_or_reset(&mut body, &mut up_send, Reason::CANCEL).await;
    };
    let download = async {
        let resp = match response.await {
            Ok(r) => r,
            Err(e) => {
                match e.reason() {
                    Some(reason) if e.is_remote() => respond.send_reset(reason),
                    _ => answer(respond, StatusCode::BAD_GATEWAY, b""),
                }
                return;
            }
        };
        let (parts, mut up_body) = resp.into_parts();
        let end = up_body.is_end_stream();
        let mut send = match respond.send_response(Response::from_parts(parts, ()), end) {
            Ok(s) => s,
            Err(_) => return,
        };
        if end {
            return;
        }
        pipe_or_reset(&mut up_body, &mut send, Reason::INTERNAL_ERROR).await;
    };
    tokio::join!(upload, download);
}

/// [`pipe`]; when `recv` breaks, `send` is reset with its reason (`otherwise` without one).
async fn pipe_or_reset(recv: &mut RecvStream, send: &mut SendStream<Bytes>, otherwise: Reason) {
    if let Err(PipeError::Recv(e)) = pipe(recv, send).await {
        send.send_reset(e.reason().unwrap_or(otherwise));
    }
}

/// Copies data then trailers from `recv` to `send`, releasing `recv`'s window only as `send`
/// takes the data (so a slow reader slows the writer down).
async fn pipe(recv: &mut RecvStream, send: &mut SendStream<Bytes>) -> Result<(), PipeError> {
    while let Some(data) = recv.data().await {
        let mut data = data.map_err(PipeError::Recv)?;
        let n = data.len();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(_)) => return Err(PipeError::Send),
                None => return Err(PipeError::Send),
            };
            if cap == 0 {
                continue;
            }
            let part = data.split_to(cap.min(data.len()));
            send.send_data(part, false).map_err(|_| PipeError::Send)?;
        }
        recv.flow_control()
            .release_capacity(n)
            .map_err(PipeError::Recv)?;
    }
    match recv.trailers().await.map_err(PipeError::Recv)? {
        Some(trailers) => send.send_trailers(trailers).map_err(|_| PipeError::Send),
        None => send
            .send_data(Bytes::new(), true)
            .map_err(|_| PipeError::Send),
    }
}
