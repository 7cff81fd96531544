//! End-to-end over real TCP on 127.0.0.1: client → [`serve`] → a small upstream written here.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::timeout,
};

use super::*;

const T: Duration = Duration::from_secs(10);

/// Denies `/deny` and paths under `/deny/`; with `flip` set, denies everything. Keeps the
/// (path, host) of every request it was asked about.
#[derive(Default)]
struct Policy {
    flip: AtomicBool,
    calls: AtomicUsize,
    seen: std::sync::Mutex<Vec<(String, Option<String>)>>,
}

impl Policy {
    fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Authorize for Policy {
    fn authorize(&self, req: &RequestView<'_>) -> RequestVerdict {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen
            .lock()
            .unwrap()
            .push((req.path.to_owned(), req.host.map(str::to_owned)));
        if self.flip.load(Ordering::SeqCst) || req.path.starts_with("/deny") {
            RequestVerdict::Deny
        } else {
            RequestVerdict::Allow
        }
    }
}

struct Proxy {
    addr: SocketAddr,
    connects: Arc<AtomicUsize>,
    done: JoinHandle<Result<L7Stats, L7Error>>,
}

/// Serves one client connection with `authz`, the upstream at `upstream`.
async fn proxy(authz: Arc<Policy>, upstream: SocketAddr) -> Proxy {
    proxy_with(authz, upstream, L7Limits::default()).await
}

async fn proxy_with(authz: Arc<Policy>, upstream: SocketAddr, limits: L7Limits) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connects);
    let done = tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let connect = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            TcpStream::connect(upstream)
        };
        serve(client, connect, &*authz, &limits).await
    });
    Proxy {
        addr,
        connects,
        done,
    }
}

// ---------------------------------------------------------------- HTTP/1.1 upstream + client

/// A small HTTP/1.1 server: answers `200` with `path=P body=B` (B the request body), except
/// `/chunked` (chunked response), `/close` (close-delimited) and `HEAD` (length, no body).
async fn h1_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(req) = read_message(&mut s, &mut buf, true, false).await {
                    let body = String::from_utf8_lossy(&req.body).into_owned();
                    let text = format!("path={} body={body}", req.start);
                    let out = match (req.method.as_str(), req.start.as_str()) {
                        ("HEAD", _) => "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_owned(),
                        (_, "/chunked") => format!(
                            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                             3\r\nabc\r\n{:x}\r\n{text}\r\n0\r\nx-trailer: 1\r\n\r\n",
                            text.len()
                        ),
                        (_, "/close") => {
                            format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{text}")
                        }
                        _ => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                            text.len()
                        ),
                    };
                    s.write_all(out.as_bytes()).await.unwrap();
                    if req.start == "/close" {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An upstream for one connection: reads the first request head (the body, if any, left
/// unread, some of it maybe in the buffer), then hands the stream, the buffer and the head to
/// `then`.
async fn one_shot_upstream<F, Fut>(then: F) -> SocketAddr
where
    F: FnOnce(TcpStream, Vec<u8>, Message) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let req = read_message(&mut s, &mut buf, true, true).await.unwrap();
        then(s, buf, req).await;
    });
    addr
}

struct Message {
    /// Request: the method; response: the status code.
    method: String,
    /// Request: the path; response: empty.
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one message (test-side, buffered whole). `None` on a clean EOF before it.
async fn read_message(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    request: bool,
    no_body: bool,
) -> Option<Message> {
    let mut chunk = [0u8; 4096];
    let (len, method, start, headers) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let parsed = if request {
            let mut r = httparse::Request::new(&mut hs);
            match r.parse(buf).unwrap() {
                httparse::Status::Complete(n) => Some((
                    n,
                    r.method.unwrap().to_owned(),
                    r.path.unwrap().to_owned(),
                    r.headers,
                )),
                httparse::Status::Partial => None,
            }
        } else {
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(buf).unwrap() {
                httparse::Status::Complete(n) => {
                    Some((n, r.code.unwrap().to_string(), String::new(), r.headers))
                }
                httparse::Status::Partial => None,
            }
        };
        if let Some((n, m, p, h)) = parsed {
            let h = h
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect::<Vec<_>>();
            break (n, m, p, h);
        }
        let n = s.read(&mut chunk).await.unwrap();
        if n == 0 {
            assert!(buf.is_empty(), "eof inside a head");
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    buf.drain(..len);
    let mut msg = Message {
        method,
        start,
        headers,
        body: Vec::new(),
    };
    let status_no_body = !request && matches!(msg.method.as_str(), "204" | "304" | "100");
    if no_body || status_no_body {
        return Some(msg);
    }
    if msg.header("transfer-encoding").is_some() {
        loop {
            let (used, size) = loop {
                if let Ok(httparse::Status::Complete(r)) = httparse::parse_chunk_size(buf) {
                    break r;
                }
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "eof inside chunked body");
                buf.extend_from_slice(&chunk[..n]);
            };
            buf.drain(..used);
            let need = if size == 0 { 0 } else { size as usize + 2 };
            while buf.len() < need || (size == 0 && !buf.windows(2).any(|w| w == b"\r\n")) {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "eof inside chunked body");
                buf.extend_from_slice(&chunk[..n]);
            }
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    let mut hs = [httparse::EMPTY_HEADER; 8];
                    if let Ok(httparse::Status::Complete((n, _))) =
                        httparse::parse_headers(buf, &mut hs)
                    {
                        buf.drain(..n);
                        return Some(msg);
                    }
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0);
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            msg.body.extend_from_slice(&buf[..size as usize]);
            assert_eq!(&buf[size as usize..need], b"\r\n");
            buf.drain(..need);
        }
    } else if let Some(len) = msg.header("content-length") {
        let len: usize = len.trim().parse().unwrap();
        while buf.len() < len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "eof inside body");
            buf.extend_from_slice(&chunk[..n]);
        }
        msg.body = buf.drain(..len).collect();
    } else if !request {
        s.read_to_end(buf).await.unwrap();
        msg.body = std::mem::take(buf);
    }
    Some(msg)
}

fn assert_denied(m: &Message) {
    assert_eq!(m.method, "403");
    assert_eq!(m.header("content-type"), Some("text/plain"));
    assert_eq!(m.header("content-length"), Some("19"));
    assert_eq!(m.body, b"RBAC: access denied");
}

impl Proxy {
    /// How the proxied connection ended.
    async fn outcome(&mut self) -> Result<L7Stats, L7Error> {
        timeout(T, &mut self.done).await.unwrap().unwrap()
    }

    fn connects(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }
}

/// Closes the client (of either protocol) and returns the proxy's counts.
async fn finish<C>(mut p: Proxy, client: C) -> L7Stats {
    drop(client);
    p.outcome().await.unwrap()
}

/// An HTTP/1.x client connection, with the bytes it has read and not yet parsed.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(p: &Proxy) -> Self {
        Self {
            s: TcpStream::connect(p.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn response(&mut self) -> Message {
        timeout(T, read_message(&mut self.s, &mut self.buf, false, false))
            .await
            .unwrap()
            .expect("a response")
    }

    /// A response head, its body (if any) left unread: the answer to `HEAD`, or a `101`.
    async fn response_head(&mut self) -> Message {
        timeout(T, read_message(&mut self.s, &mut self.buf, false, true))
            .await
            .unwrap()
            .expect("a response")
    }

    /// Everything until the proxy closes the connection.
    async fn read_to_end(&mut self) -> std::io::Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.buf);
        timeout(T, self.s.read_to_end(&mut out)).await.unwrap()?;
        Ok(out)
    }
}

/// A fresh [`h1_upstream`], a proxy in front of it deciding with `authz`, and a client of it.
async fn h1_setup(authz: Arc<Policy>) -> (Proxy, Client) {
    let p = proxy(authz, h1_upstream().await).await;
    let c = Client::connect(&p).await;
    (p, c)
}

// ---------------------------------------------------------------- HTTP/1.1 tests

#[tokio::test]
async fn l7_http1_allowed_request_is_forwarded() {
    let (p, mut c) = h1_setup(Arc::default()).await;
    c.send(b"POST /api?x=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\n\r\nhello")
        .await;
    let r = c.response().await;
    assert_eq!(r.method, "200");
    assert_eq!(r.body, b"path=/api?x=1 body=hello");
    let stats = finish(p, c).await;
    assert_eq!(
        (stats.requests, stats.denied, stats.protocol),
        (1, 0, Protocol::Http1)
    );
    assert!(stats.bytes_in > 60 && stats.bytes_out > 40, "{stats:?}");
}

#[tokio::test]
async fn l7_http1_denied_gets_403_and_next_request_works() {
    let (p, mut c) = h1_setup(Arc::default()).await;
    // The denied request's body is discarded, so the next request parses.
    c.send(b"POST /deny HTTP/1.1\r\nhost: svc\r\ncontent-length: 4\r\n\r\nbody")
        .await;
    assert_denied(&c.response().await);
    c.send(b"GET /ok HTTP/1.1\r\nhost: svc\r\n\r\n").await;
    assert_eq!(c.response().await.body, b"path=/ok body=");
    let stats = finish(p, c).await;
    assert_eq!((stats.requests, stats.denied), (2, 1));
}

#[tokio::test]
async fn l7_http1_pipelined_requests_answered_in_order() {
    let (p, mut c) = h1_setup(Arc::default()).await;
    c.send(
        b"GET /a HTTP/1.1\r\nhost: s\r\n\r\n\
          POST /deny HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n\
          GET /c HTTP/1.1\r\nhost: s\r\n\r\n",
    )
    .await;
    assert_eq!(c.response().await.body, b"path=/a body=");
    assert_denied(&c.response().await);
    assert_eq!(c.response().await.body, b"path=/c body=");
    let stats = finish(p, c).await;
    assert_eq!((stats.requests, stats.denied), (3, 1));
}

#[tokio::test]
async fn l7_http1_chunked_request_and_response() {
    let (p, mut c) = h1_setup(Arc::default()).await;
    c.send(
        b"POST /chunked HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\n\r\n\
          4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body, b"abcpath=/chunked body=wikipedia");
    // Still usable after the trailers.
    c.send(b"GET /next HTTP/1.1\r\nhost: s\r\n\r\n").await;
    assert_eq!(c.response().await.body, b"path=/next body=");
    finish(p, c).await;
}

#[tokio::test]
async fn l7_http1_close_delimited_response() {
    let (mut p, mut c) = h1_setup(Arc::default()).await;
    c.send(b"GET /close HTTP/1.1\r\nhost: s\r\n\r\n").await;
    // Read to EOF: the proxy closes after a close-delimited body.
    assert_eq!(c.response().await.body, b"path=/close body=");
    let stats = p.outcome().await.unwrap();
    assert_eq!(stats.requests, 1);
}

#[tokio::test]
async fn l7_http1_head_response_has_no_body() {
    let (p, mut c) = h1_setup(Arc::default()).await;
    c.send(b"HEAD /h HTTP/1.1\r\nhost: s\r\n\r\nGET /g HTTP/1.1\r\nhost: s\r\n\r\n")
        .await;
    let r = c.response_head().await;
    assert_eq!(
        (r.method.as_str(), r.header("content-length")),
        ("200", Some("5"))
    );
    // The next response starts right after the HEAD response's head.
    assert_eq!(c.response().await.body, b"path=/g body=");
    finish(p, c).await;
}

#[tokio::test]
async fn l7_http1_length_with_transfer_encoding_is_400() {
    let (mut p, mut c) = h1_setup(Arc::default()).await;
    c.send(
        b"POST / HTTP/1.1\r\nhost: s\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    )
    .await;
    let out = c.read_to_end().await.unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 400 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let err = p.outcome().await.unwrap_err();
    assert!(matches!(err, L7Error::BadRequest { .. }), "{err}");
    assert_eq!(p.connects(), 0);
}

#[tokio::test]
async fn l7_not_http_is_refused_without_contacting_upstream() {
    let up = h1_upstream().await;
    let tls_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    for first in [
        tls_hello,
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"GET / FTP/1.0\r\n\r\n",
        b"\x00\x01garbage",
    ] {
        let policy = Arc::new(Policy::default());
        let mut p = proxy(Arc::clone(&policy), up).await;
        let mut c = Client::connect(&p).await;
        c.send(first).await;
        let out = c.read_to_end().await.unwrap_or_default();
        assert!(out.is_empty(), "nothing is answered");
        let err = p.outcome().await.unwrap_err();
        assert!(matches!(err, L7Error::NotHttp { .. }), "{err}");
        assert_eq!(p.connects(), 0);
        assert_eq!(policy.calls.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn l7_all_denied_connection_never_reaches_upstream() {
    let (p, mut c) = h1_setup(Arc::default()).await;
    for _ in 0..3 {
        c.send(b"GET /deny/x HTTP/1.1\r\nhost: s\r\n\r\n").await;
        assert_denied(&c.response().await);
    }
    let connects = Arc::clone(&p.connects);
    let stats = finish(p, c).await;
    assert_eq!((stats.requests, stats.denied), (3, 3));
    assert_eq!(connects.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn l7_decision_change_applies_to_next_request() {
    let policy = Arc::new(Policy::default());
    let (p, mut c) = h1_setup(Arc::clone(&policy)).await;
    c.send(b"GET /x HTTP/1.1\r\nhost: s\r\n\r\n").await;
    assert_eq!(c.response().await.method, "200");
    policy.flip.store(true, Ordering::SeqCst);
    c.send(b"GET /x HTTP/1.1\r\nhost: s\r\n\r\n").await;
    assert_denied(&c.response().await);
    policy.flip.store(false, Ordering::SeqCst);
    c.send(b"GET /x HTTP/1.1\r\nhost: s\r\n\r\n").await;
    assert_eq!(c.response().await.method, "200");
    let stats = finish(p, c).await;
    assert_eq!((stats.requests, stats.denied), (3, 1));
}

#[tokio::test]
async fn l7_http1_expect_continue_is_relayed() {
    // The upstream answers `100 Continue` before reading the body.
    let up = one_shot_upstream(|mut s, buf, req| async move {
        assert_eq!(req.header("expect"), Some("100-continue"));
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        let mut body = [0u8; 3];
        let have = buf.len();
        body[..have].copy_from_slice(&buf);
        s.read_exact(&mut body[have..]).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&body).await.unwrap();
    })
    .await;
    let p = proxy(Arc::default(), up).await;
    let mut c = Client::connect(&p).await;
    c.send(b"PUT /u HTTP/1.1\r\nhost: s\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
        .await;
    assert_eq!(c.response().await.method, "100");
    c.send(b"abc").await;
    let r = c.response().await;
    assert_eq!((r.method.as_str(), r.body.as_slice()), ("200", &b"abc"[..]));
    finish(p, c).await;
}

#[tokio::test]
async fn l7_http1_upgrade_switches_to_raw_bytes() {
    let up = one_shot_upstream(|mut s, _, req| async move {
        assert_eq!(req.header("upgrade"), Some("echo"));
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
    })
    .await;
    let mut p = proxy(Arc::default(), up).await;
    let mut c = Client::connect(&p).await;
    c.send(b"GET /ws HTTP/1.1\r\nhost: s\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await;
    assert_eq!(c.response_head().await.method, "101");
    // Not HTTP any more: raw bytes both ways.
    c.send(b"\x00raw ping").await;
    let mut back = [0u8; 9];
    timeout(T, c.s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x00raw ping");
    c.s.shutdown().await.unwrap();
    let stats = p.outcome().await.unwrap();
    assert_eq!(stats.requests, 1);
}

#[tokio::test]
async fn l7_http1_idle_keepalive_closes_quietly() {
    let limits = L7Limits {
        idle_timeout: Duration::from_millis(200),
        ..L7Limits::default()
    };
    let mut p = proxy_with(Arc::default(), h1_upstream().await, limits).await;
    let mut c = Client::connect(&p).await;
    c.send(b"GET /a HTTP/1.1\r\nhost: s\r\n\r\n").await;
    assert_eq!(c.response().await.method, "200");
    let rest = c.read_to_end().await.unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let stats = p.outcome().await.unwrap();
    assert_eq!(stats.requests, 1);
}

#[tokio::test]
async fn l7_http1_upstream_unreachable_is_502() {
    // A port with nothing listening.
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut p = proxy(Arc::default(), gone).await;
    let mut c = Client::connect(&p).await;
    c.send(b"GET / HTTP/1.1\r\nhost: s\r\n\r\n").await;
    let out = c.read_to_end().await.unwrap();
    assert!(out.starts_with(b"HTTP/1.1 502 "));
    let err = p.outcome().await.unwrap_err();
    assert!(matches!(err, L7Error::Connect { .. }), "{err}");
}
#[test]
fn classify_first_bytes() {
    assert_eq!(classify(b"").unwrap(), None);
    assert_eq!(classify(b"PRI * HTTP/2.0\r\n").unwrap(), None);
    assert_eq!(classify(H2_PREFACE).unwrap(), Some(Protocol::H2c));
    assert_eq!(classify(b"GET /x HT").unwrap(), None);
    assert_eq!(
        classify(b"GET /x HTTP/1.1\r\n").unwrap(),
        Some(Protocol::Http1)
    );
    assert_eq!(
        classify(b"DELETE /x HTTP/1.0\r\nhost").unwrap(),
        Some(Protocol::Http1)
    );
    for bad in [
        &b"\x16\x03\x01"[..],
        b"GET /x HTTP/2.0\r\n",
        b"hello world\r\n",
        b"\x00",
    ] {
        assert!(
            matches!(classify(bad), Err(L7Error::NotHttp { .. })),
            "{bad:?}"
        );
    }
}

// ---------------------------------------------------------------- h2c

/// An h2c upstream: answers each stream `200` with `x-path`, echoing the request body as it
/// arrives, then a trailer.
async fn h2_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(s).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let path = req.uri().path().to_owned();
                        let mut body = req.into_body();
                        let resp = Response::builder().header("x-path", path).body(()).unwrap();
                        let mut send = respond.send_response(resp, false).unwrap();
                        while let Some(data) = body.data().await {
                            let data = data.unwrap();
                            body.flow_control().release_capacity(data.len()).unwrap();
                            send.send_data(data, false).unwrap();
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("x-done", "1".parse().unwrap());
                        send.send_trailers(trailers).unwrap();
                    });
                }
            });
        }
    });
    addr
}

async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(s).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn h2_call(
    send: &h2::client::SendRequest<Bytes>,
    path: &str,
    body: Bytes,
) -> (
    StatusCode,
    http::HeaderMap,
    Vec<u8>,
    Option<http::HeaderMap>,
) {
    let mut send = send.clone().ready().await.unwrap();
    let req = Request::post(format!("http://svc.local{path}"))
        .body(())
        .unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    let upload = async move {
        let mut body = body;
        while !body.is_empty() {
            stream.reserve_capacity(body.len());
            let cap = std::future::poll_fn(|cx| stream.poll_capacity(cx))
                .await
                .unwrap()
                .unwrap();
            let part = body.split_to(cap.min(body.len()));
            stream.send_data(part, false).unwrap();
        }
        // The stream may already be closed by the response (denied): ignore.
        let _ = stream.send_data(Bytes::new(), true);
    };
    let download = async {
        let resp = resp.await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            body.flow_control().release_capacity(d.len()).unwrap();
            got.extend_from_slice(&d);
        }
        let trailers = body.trailers().await.unwrap();
        (status, headers, got, trailers)
    };
    let ((), out) = tokio::join!(upload, download);
    out
}

/// A fresh [`h2_upstream`], a proxy in front of it deciding with `authz`, and an h2c client.
async fn h2_setup(authz: Arc<Policy>) -> (Proxy, h2::client::SendRequest<Bytes>) {
    let p = proxy(authz, h2_upstream().await).await;
    let send = h2_client(p.addr).await;
    (p, send)
}

#[tokio::test]
async fn l7_h2c_concurrent_streams_one_denied() {
    let (p, send) = h2_setup(Arc::default()).await;
    let (denied, allowed) = tokio::join!(
        h2_call(&send, "/deny/me", Bytes::from_static(b"nope")),
        h2_call(&send, "/ok?q=1", Bytes::from_static(b"hello")),
    );
    assert_eq!(denied.0, StatusCode::FORBIDDEN);
    assert_eq!(denied.1.get("content-type").unwrap(), "text/plain");
    assert_eq!(denied.2, b"RBAC: access denied");
    assert_eq!(allowed.0, StatusCode::OK);
    assert_eq!(allowed.1.get("x-path").unwrap(), "/ok");
    assert_eq!(allowed.2, b"hello");
    assert_eq!(allowed.3.unwrap().get("x-done").unwrap(), "1");
    let connects = Arc::clone(&p.connects);
    let stats = finish(p, send).await;
    assert_eq!(
        (stats.requests, stats.denied, stats.protocol),
        (2, 1, Protocol::H2c)
    );
    assert_eq!(connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn l7_h2c_body_larger_than_window_streams() {
    let (p, send) = h2_setup(Arc::default()).await;
    // Many times the stream and connection windows, each way.
    let body: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (status, _, got, _) = timeout(T, h2_call(&send, "/big", Bytes::from(body.clone())))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.len(), body.len());
    assert!(got == body);
    let stats = finish(p, send).await;
    assert!(stats.bytes_in > body.len() as u64 && stats.bytes_out > body.len() as u64);
}

#[tokio::test]
async fn l7_h2c_decision_change_and_all_denied() {
    let policy = Arc::new(Policy::default());
    policy.flip.store(true, Ordering::SeqCst);
    let (p, send) = h2_setup(Arc::clone(&policy)).await;
    let (status, ..) = h2_call(&send, "/x", Bytes::new()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(p.connects(), 0, "denied streams never connect");
    policy.flip.store(false, Ordering::SeqCst);
    let (status, ..) = h2_call(&send, "/x", Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    let stats = finish(p, send).await;
    assert_eq!((stats.requests, stats.denied), (2, 1));
}

// ---------------------------------------------------------------- normalization and edges

/// The bypass forms of issue 9 with `/deny` standing for the protected area: each is denied
/// (the policy saw the normalized path), and the allowed requests reach the upstream with the
/// normalized path and the query as sent.
#[tokio::test]
async fn l7_http1_matches_and_forwards_the_normalized_path() {
    let policy = Arc::new(Policy::default());
    let (p, mut c) = h1_setup(Arc::clone(&policy)).await;
    for denied in [
        "/ok/../deny",
        "/ok/%2e%2e/deny",
        "/ok/.%2e/deny",
        "/./deny",
        "//deny",
        "/ok/..%2fdeny",
        "/deny%2fx",
        "/ok/..\\deny",
        "/%64eny",
        "/ok/%2E%2E/%64%65%6e%79/x",
    ] {
        c.send(format!("GET {denied} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
            .await;
        assert_denied(&c.response().await);
    }
    assert_eq!(p.connects(), 0, "no denied form reached the upstream");
    for (sent, forwarded) in [
        ("/x/../ok?q=/../%2e%2e", "/ok?q=/../%2e%2e"),
        ("//ok//a/./b/", "/ok/a/b/"),
        ("/%6Fk%2Fa", "/ok/a"),
        ("/ok/%7e%25", "/ok/~%25"),
        ("/ok;x/../y", "/y"),
    ] {
        c.send(format!("GET {sent} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(r.method, "200", "{sent}");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("path={forwarded} body="),
            "{sent}"
        );
    }
    let seen: Vec<String> = policy.seen().into_iter().map(|(p, _)| p).collect();
    assert_eq!(seen[0], "/deny");
    assert_eq!(
        seen[10], "/ok",
        "the policy sees the path without its query"
    );
    finish(p, c.s).await;
}

/// `GET http://host/… HTTP/1.1`: the policy sees the URL's authority (not `Host`) and the
/// normalized path; the pod gets origin-form with `Host` set to that authority.
#[tokio::test]
async fn l7_http1_absolute_form_is_split_before_matching() {
    let policy = Arc::new(Policy::default());
    let (p, mut c) = h1_setup(Arc::clone(&policy)).await;
    c.send(b"GET http://b1.example/deny HTTP/1.1\r\nhost: other\r\n\r\n")
        .await;
    assert_denied(&c.response().await);
    c.send(b"GET HTTP://b1.example:8080 HTTP/1.1\r\n\r\n").await;
    assert_eq!(c.response().await.method, "200");
    finish(p, c.s).await;
    assert_eq!(
        policy.seen(),
        [
            ("/deny".to_owned(), Some("b1.example".to_owned())),
            ("/".to_owned(), Some("b1.example:8080".to_owned())),
        ]
    );

    // What the pod receives.
    let upstream = one_shot_upstream(|mut s, _, req| async move {
        assert_eq!(req.start, "/ok?q=1");
        let hosts: Vec<_> = req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.clone())
            .collect();
        assert_eq!(hosts, ["b1.example"]);
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
    })
    .await;
    let p = proxy(Arc::default(), upstream).await;
    let mut c = Client::connect(&p).await;
    c.send(b"GET http://b1.example/a/../ok?q=1 HTTP/1.1\r\nhost: other\r\nx: 1\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.method.as_str(), r.body.as_slice()), ("200", &b"ok"[..]));
}

/// Heads that cannot be normalized or framed safely: `400`, connection closed, upstream never
/// contacted.
#[tokio::test]
async fn l7_http1_unsafe_heads_are_400() {
    let heads: &[&[u8]] = &[
        b"GET /ok%00 HTTP/1.1\r\n\r\n",
        b"GET /ok/%00/../x HTTP/1.1\r\n\r\n",
        b"GET /ok%zz HTTP/1.1\r\n\r\n",
        b"GET /ok%4 HTTP/1.1\r\n\r\n",
        b"GET /ok#frag HTTP/1.1\r\n\r\n",
        b"get /ok HTTP/1.1\r\n\r\n",
        b"Get /ok HTTP/1.1\r\n\r\n",
        b"GET * HTTP/1.1\r\n\r\n",
        b"GET b1:80 HTTP/1.1\r\n\r\n",
        b"GET ok HTTP/1.1\r\n\r\n",
        b"GET ftp://b1/ok HTTP/1.1\r\n\r\n",
        b"GET http://u@b1/ok HTTP/1.1\r\n\r\n",
        b"GET http:///ok HTTP/1.1\r\n\r\n",
        b"POST /ok HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
    ];
    for head in heads {
        let (p, mut c) = h1_setup(Arc::default()).await;
        c.send(head).await;
        let r = c.response().await;
        assert_eq!(r.method, "400", "{}", String::from_utf8_lossy(head));
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(p.connects(), 0, "{}", String::from_utf8_lossy(head));
    }
    // `OPTIONS *` is the one valid asterisk-form.
    let (p, mut c) = h1_setup(Arc::default()).await;
    c.send(b"OPTIONS * HTTP/1.1\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(String::from_utf8_lossy(&r.body), "path=* body=");
    finish(p, c.s).await;
}

/// A malformed chunk after an allowed head: the client gets `400` (not a bare EOF), and the
/// upstream connection is closed.
#[tokio::test]
async fn l7_http1_bad_chunk_after_allowed_head_is_400() {
    let (p, mut c) = h1_setup(Arc::default()).await;
    c.send(b"POST /ok HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.method, "400");
    assert_eq!(p.connects(), 1);
    let mut p = p;
    assert!(matches!(p.outcome().await, Err(L7Error::BadRequest { .. })));
}

/// Framing and routing fields in a request's trailers: `400`; in a response's: dropped.
#[tokio::test]
async fn l7_http1_forbidden_trailers() {
    for trailer in [
        "host: evil",
        "Content-Length: 5",
        "transfer-encoding: chunked",
    ] {
        let (p, mut c) = h1_setup(Arc::default()).await;
        c.send(
            format!(
                "POST /ok HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n{trailer}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(c.response().await.method, "400", "{trailer}");
        drop(p);
    }
    // Allowed trailers pass.
    let (p, mut c) = h1_setup(Arc::default()).await;
    c.send(
        b"POST /ok HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(String::from_utf8_lossy(&r.body), "path=/ok body=abc");
    finish(p, c.s).await;

    let upstream = one_shot_upstream(|mut s, _, _| async move {
        s.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
              2\r\nok\r\n0\r\nx-ok: 1\r\ncontent-length: 99\r\nHost: evil\r\n\r\n",
        )
        .await
        .unwrap();
    })
    .await;
    let p = proxy(Arc::default(), upstream).await;
    let mut c = Client::connect(&p).await;
    c.send(b"GET /ok HTTP/1.1\r\n\r\n").await;
    let raw = String::from_utf8(c.read_to_end().await.unwrap()).unwrap();
    assert!(raw.ends_with("2\r\nok\r\n0\r\nx-ok: 1\r\n\r\n"), "{raw:?}");
}

/// An h2c request with an arbitrary method, `:path` and headers.
async fn h2_request(
    send: &h2::client::SendRequest<Bytes>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap) {
    let mut send = send.clone().ready().await.unwrap();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://svc.local{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
    match timeout(T, resp).await.unwrap() {
        Ok(resp) => (resp.status(), resp.headers().clone()),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

#[tokio::test]
async fn l7_h2c_matches_and_forwards_the_normalized_path() {
    let policy = Arc::new(Policy::default());
    let (p, send) = h2_setup(Arc::clone(&policy)).await;
    for denied in [
        "/ok/../deny",
        "/ok/%2e%2e/deny",
        "/ok/.%2e/deny",
        "/./deny",
        "//deny",
        "/ok/..%2fdeny",
        "/deny%2Fx",
        "/ok/..%5cdeny",
        "/%64eny",
    ] {
        let (status, _) = h2_request(&send, "GET", denied, &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{denied}");
    }
    assert_eq!(p.connects(), 0);
    for (sent, forwarded) in [
        ("/x/../ok?q=%2e%2e", "/ok"),
        ("//ok//a/./b/", "/ok/a/b/"),
        ("/%6Fk%2Fa", "/ok/a"),
    ] {
        let (status, headers) = h2_request(&send, "GET", sent, &[]).await;
        assert_eq!(status, StatusCode::OK, "{sent}");
        assert_eq!(headers.get("x-path").unwrap(), forwarded, "{sent}");
    }
    assert_eq!(
        policy.seen()[9],
        ("/ok".to_owned(), Some("svc.local".to_owned()))
    );
    finish(p, send).await;
}

#[tokio::test]
async fn l7_h2c_unsafe_requests_are_400() {
    let (p, send) = h2_setup(Arc::default()).await;
    for (method, path, headers) in [
        ("GET", "/ok%00", &[][..]),
        ("GET", "/ok%zz", &[]),
        ("get", "/ok", &[]),
        ("GET", "/ok", &[("host", "other.local")]),
    ] {
        let (status, _) = h2_request(&send, method, path, headers).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {headers:?}"
        );
    }
    assert_eq!(p.connects(), 0);
    let (status, _) = h2_request(&send, "GET", "/ok", &[("host", "SVC.local")]).await;
    assert_eq!(status, StatusCode::OK, "a host that agrees with :authority");
    finish(p, send).await;
}
