//! HBONE: TCP tunnelled in HTTP/2 `CONNECT` streams (Istio's wire format),
//! carried over mutual TLS between node agents on port 15008.
//!
//! This module is transport-agnostic (any `AsyncRead + AsyncWrite`): TLS is
//! layered below it by the callers, so the framing is tested on its own.

use std::{io, net::SocketAddr};

use bytes::Bytes;
use h2::{client::SendRequest, server::SendResponse, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

/// The HBONE port on every node agent.
pub const HBONE_PORT: u16 = 15008;
/// Largest header block accepted (HPACK accounting: name + value + 32 per field). Checked by
/// [`parse_connect`], so a larger one is refused `431` with a logged reason.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// The hard cap h2 enforces before a request reaches us (memory bound; above it h2 answers
/// `431` itself, without a log line of ours).
const H2_HEADER_LIST_CAP: u32 = 4 * MAX_HEADER_LIST_SIZE;
/// Concurrent tunnels per HBONE connection (the pool's stream limit).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONN_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 256 * 1024;

/// Errors of the HBONE layer.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("http/2: {0}")]
    H2(#[from] h2::Error),
    #[error("building request: {0}")]
    Http(#[from] http::Error),
    #[error("peer answered CONNECT with status {0}")]
    Status(StatusCode),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("tunnel closed by peer")]
    Closed,
}

/// Client-side h2 settings for HBONE connections.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .enable_push(false);
    b
}

/// Server-side h2 settings for HBONE connections.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(H2_HEADER_LIST_CAP)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_concurrent_reset_streams(64)
        .max_pending_accept_reset_streams(64);
    b
}

/// One tunnel: both halves of an h2 stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// The header carrying the original client's address (RFC 7239 `Forwarded: for="ip:port"`).
/// The receiving agent trusts it only as far as the mTLS identity allows: the address must be
/// one of a workload that has the verified identity.
pub const FORWARDED: &str = "forwarded";

/// Opens a tunnel to `authority` (the original destination `ip:port`) on an
/// established HBONE connection, naming the original client `source`; waits for the peer's
/// `200`.
pub async fn open(
    sender: &SendRequest<Bytes>,
    authority: SocketAddr,
    source: Option<SocketAddr>,
) -> Result<Tunnel, HboneError> {
    let mut sender = sender.clone().ready().await?;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string());
    if let Some(src) = source {
        req = req.header(FORWARDED, format!("for=\"{src}\""));
    }
    let req = req.body(())?;
    let (response, send) = sender.send_request(req, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status(response.status()));
    }
    Ok(Tunnel {
        send,
        recv: response.into_body(),
    })
}

/// What a server-side CONNECT asked for, once checked for form.
pub struct ConnectRequest {
    /// The original destination from `:authority`.
    pub authority: SocketAddr,
    /// The original client, from `Forwarded: for=…` (unverified: see [`FORWARDED`]).
    pub forwarded_for: Option<SocketAddr>,
    pub recv: RecvStream,
    pub respond: SendResponse<Bytes>,
}

/// Why a request is not a well-formed HBONE CONNECT.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("authority {0:?} is not ip:port")]
    Authority(String),
    #[error("header block of {size} bytes exceeds {MAX_HEADER_LIST_SIZE}")]
    HeadersTooLarge { size: usize },
}

/// Checks a request's form. On error the caller answers with
/// [`reject`] and the status from [`BadRequest::status`].
pub fn parse_connect(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Result<ConnectRequest, (BadRequest, SendResponse<Bytes>)> {
    // HPACK's accounting (RFC 7541 §4.1): name + value + 32 per field, pseudo-headers included.
    let pseudo = req.method().as_str().len() + req.uri().to_string().len() + 2 * (7 + 32);
    let size = pseudo
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum::<usize>();
    if size > MAX_HEADER_LIST_SIZE as usize {
        return Err((BadRequest::HeadersTooLarge { size }, respond));
    }
    if req.method() != Method::CONNECT {
        return Err((BadRequest::Method(req.method().to_string()), respond));
    }
    let auth = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let authority = match auth.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => a,
        _ => return Err((BadRequest::Authority(auth), respond)),
    };
    let forwarded_for = req
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for);
    Ok(ConnectRequest {
        authority,
        forwarded_for,
        recv: req.into_body(),
        respond,
    })
}

/// `for="ip:port"` (or `for=ip:port`, or `for="[v6]:port"`) from a `Forwarded` value; the
/// first element only. Anything else is ignored (treated as absent).
fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        v.trim().trim_matches('"').parse().ok()
    })
}

impl BadRequest {
    /// The HTTP status a malformed request is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Authority(_) => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

/// Answers a CONNECT with an error status and ends the stream.
pub fn reject(mut respond: SendResponse<Bytes>, status: StatusCode) {
    if let Ok(resp) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(resp, true);
    }
}

/// Accepts a CONNECT: answers `200` and returns the tunnel.
pub fn accept(req: ConnectRequest) -> Result<Tunnel, HboneError> {
    let ConnectRequest {
        recv, mut respond, ..
    } = req;
    let resp = Response::builder().status(StatusCode::OK).body(())?;
    let send = respond.send_response(resp, false)?;
    Ok(Tunnel { send, recv })
}

/// A tunnel as a byte stream (`AsyncRead + AsyncWrite`), for code that works on streams (the
/// L7 proxy). Reads release flow-control capacity as the data is consumed; writes wait for
/// capacity (back-pressure); shutdown sends END_STREAM (half-close).
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    eof: bool,
}

impl TunnelStream {
    pub fn new(tunnel: Tunnel) -> Self {
        Self {
            send: tunnel.send,
            recv: tunnel.recv,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("http/2 i/o"))
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.eof = true,
                Poll::Ready(Some(Ok(data))) => self.pending = data,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        match self.send.poll_capacity(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(h2_io(e))),
            Poll::Ready(Some(Ok(0))) => {
                // Capacity released and re-requested: wait for the next window update.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Ok(n))) => {
                let n = n.min(buf.len());
                match self
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(e) => Poll::Ready(Err(h2_io(e))),
                }
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(self.send.send_data(Bytes::new(), true).map_err(h2_io))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::copy::{bidirectional, Counters, Far};
    use tokio::io::{duplex, AsyncReadExt};
    use tokio::{io::AsyncWriteExt, net::TcpStream};

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// Client and server h2 over an in-memory pipe; the server echoes each
    /// tunnel's bytes back prefixed with the authority it was asked for.
    async fn hbone_pair() -> SendRequest<Bytes> {
        let (c, s) = duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = server_builder().handshake::<_, Bytes>(s).await.unwrap();
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let req = match parse_connect(req, respond) {
                        Ok(r) => r,
                        Err((bad, respond)) => return reject(respond, bad.status()),
                    };
                    let who = format!("{}|", req.authority);
                    let tunnel = accept(req).unwrap();
                    let (mut a, mut b) = tcp_pair().await;
                    tokio::spawn(async move {
                        b.write_all(who.as_bytes()).await.unwrap();
                        let mut got = Vec::new();
                        let mut rd_buf = [0u8; 4096];
                        loop {
                            let n = b.read(&mut rd_buf).await.unwrap();
                            if n == 0 {
                                break;
                            }
                            got.extend_from_slice(&rd_buf[..n]);
                        }
                        b.write_all(&got).await.unwrap();
                        b.shutdown().await.unwrap();
                    });
                    let _ = bidirectional(&mut a, Far::Tunnel(tunnel), &Counters::default()).await;
                });
            }
        });
        let (send, conn) = client_builder().handshake(c).await.unwrap();
        tokio::spawn(conn);
        send
    }

    #[tokio::test]
    async fn tunnel_carries_bytes_and_half_close() {
        let send = hbone_pair().await;
        let tunnel = open(&send, "10.2.0.2:8080".parse().unwrap(), None)
            .await
            .unwrap();
        let (mut app, mut proxy_side) = tcp_pair().await;
        let pumping = tokio::spawn(async move {
            let counts = Counters::default();
            let r = bidirectional(&mut proxy_side, Far::Tunnel(tunnel), &counts).await;
            (r, counts)
        });
        let payload = vec![7u8; 300_000];
        app.write_all(&payload).await.unwrap();
        app.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        let prefix = b"10.2.0.2:8080|";
        assert_eq!(&back[..prefix.len()], prefix);
        assert_eq!(&back[prefix.len()..], &payload[..]);
        let (r, c) = pumping.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(c.sent(), payload.len() as u64);
        assert_eq!(c.received(), (payload.len() + prefix.len()) as u64);
    }

    #[tokio::test]
    async fn many_tunnels_share_one_connection_without_crosstalk() {
        let send = hbone_pair().await;
        let mut tasks = Vec::new();
        for i in 0..50u16 {
            let send = send.clone();
            tasks.push(tokio::spawn(async move {
                let dst: SocketAddr = format!("10.2.0.{}:{}", i % 5 + 2, 8000 + i)
                    .parse()
                    .unwrap();
                let tunnel = open(&send, dst, Some("10.1.0.9:4000".parse().unwrap()))
                    .await
                    .unwrap();
                let (mut app, mut proxy_side) = tcp_pair().await;
                tokio::spawn(async move {
                    let counts = Counters::default();
                    bidirectional(&mut proxy_side, Far::Tunnel(tunnel), &counts).await
                });
                let msg = format!("hello {i}");
                app.write_all(msg.as_bytes()).await.unwrap();
                app.shutdown().await.unwrap();
                let mut back = String::new();
                app.read_to_string(&mut back).await.unwrap();
                assert_eq!(back, format!("{dst}|{msg}"));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn tunnel_stream_is_a_byte_stream_with_half_close() {
        let send = hbone_pair().await;
        let tunnel = open(&send, "10.2.0.4:80".parse().unwrap(), None)
            .await
            .unwrap();
        let mut stream = TunnelStream::new(tunnel);
        let payload = vec![3u8; 200_000];
        stream.write_all(&payload).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        let prefix = b"10.2.0.4:80|";
        assert_eq!(&back[..prefix.len()], prefix);
        assert_eq!(&back[prefix.len()..], &payload[..]);
    }

    #[test]
    fn forwarded_for_is_parsed_strictly() {
        assert_eq!(
            parse_forwarded_for("for=\"10.1.0.2:4000\""),
            "10.1.0.2:4000".parse().ok()
        );
        assert_eq!(
            parse_forwarded_for("For=\"[fd00:1::2]:80\";proto=http"),
            "[fd00:1::2]:80".parse().ok()
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for("by=1.2.3.4:5"), None);
    }

    #[test]
    fn malformed_requests_are_classified() {
        assert_eq!(
            BadRequest::Method("GET".into()).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            BadRequest::Authority("x".into()).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            BadRequest::HeadersTooLarge { size: 20_000 }.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
}
