//! HTTP modes of `mesh-testpod`: a server that answers every HTTP/1.1 request (keep-alive) and
//! every h2c stream (prior knowledge, detected by the preface on the same port) with `200` and
//! a body naming the pod, method, path and host; clients for HTTP/1.1 (sequential or
//! pipelined, on one connection), h2c (concurrent streams on one connection) and raw bytes.
//!
//! Every client prints one JSON line per response and a final `{"event":"done",…}` line.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};

use super::emit;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest head either side accepts.
const MAX_HEAD: usize = 64 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The body every answer carries: `<pod> <METHOD> <path> host=<host>`, then ` body=<n>` when
/// the request had a body.
fn answer_body(name: &str, method: &str, path: &str, host: &str, body_len: usize) -> String {
    let mut s = format!("{name} {method} {path} host={host}");
    if body_len > 0 {
        s.push_str(&format!(" body={body_len}"));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Server

pub fn serve(listen: &[SocketAddr], name: &str) -> std::process::ExitCode {
    runtime().block_on(async {
        let mut tasks = Vec::new();
        for addr in listen {
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("mesh-testpod: bind {addr}: {e}");
                    return std::process::ExitCode::from(1);
                }
            };
            emit(&json!({"event": "listening", "local": addr.to_string()}));
            let name = name.to_owned();
            tasks.push(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let name = name.clone();
                            tokio::spawn(async move {
                                if let Err(e) = connection(stream, peer, &name).await {
                                    eprintln!("mesh-testpod: connection from {peer}: {e}");
                                }
                            });
                        }
                        Err(e) => {
                            eprintln!("mesh-testpod: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        std::process::ExitCode::from(1)
    })
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, name: &str) -> Result<(), String> {
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    emit(&json!({"event": "accepted", "local": local.to_string(), "peer": peer.to_string()}));
    let mut buf = Vec::with_capacity(4096);
    // Detect h2c prior knowledge: the preface, or anything that diverges from it.
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return http1_server(stream, buf, name).await;
        }
        if n == H2_PREFACE.len() {
            let io = Prefixed {
                prefix: Bytes::from(buf),
                inner: stream,
            };
            return h2c_server(io, name).await;
        }
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
            .await
            .map_err(|_| "idle".to_owned())?
            .map_err(|e| e.to_string())?;
        if got == 0 {
            emit(&json!({"event": "closed", "peer": peer.to_string(), "requests": 0}));
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// A parsed head: first line split in three, headers lowercased by name.
struct Head {
    line: [String; 3],
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Result<Option<usize>, String> {
        self.header("content-length")
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| format!("bad content-length {v:?}"))
            })
            .transpose()
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }
}

/// Buffered reads from a stream for head/body parsing.
struct Reader<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + Unpin> Reader<S> {
    /// Reads more; `Ok(false)` on EOF.
    async fn fill(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.io.read(&mut chunk).await.map_err(|e| e.to_string())?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next head; `Ok(None)` on a clean EOF before any byte of it.
    async fn head(&mut self) -> Result<Option<Head>, String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = text.split("\r\n");
                let first = lines.next().unwrap_or_default();
                let mut parts = first.splitn(3, ' ');
                let line = [(); 3].map(|()| parts.next().unwrap_or_default().to_owned());
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                return Ok(Some(Head { line, headers }));
            }
            if self.buf.len() > MAX_HEAD {
                return Err("head too large".into());
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err("closed in the middle of a head".into())
                };
            }
        }
    }

    async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(l);
            }
            if !self.fill().await? {
                return Err("closed in the middle of a chunked body".into());
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err("closed in the middle of a body".into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The body after `head`: chunked, content-length, or (`to_eof`) until the peer closes.
    async fn body(&mut self, head: &Head, to_eof: bool) -> Result<Vec<u8>, String> {
        if head.chunked() {
            let mut body = Vec::new();
            loop {
                let size_line = self.line().await?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| format!("bad chunk size {size_line:?}"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !self.line().await?.is_empty() {}
                    return Ok(body);
                }
                body.extend(self.exact(size).await?);
                if !self.line().await?.is_empty() {
                    return Err("chunk not followed by CRLF".into());
                }
            }
        }
        if let Some(n) = head.content_length()? {
            return self.exact(n).await;
        }
        if to_eof {
            while self.fill().await? {}
            return Ok(std::mem::take(&mut self.buf));
        }
        Ok(Vec::new())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn http1_server(stream: TcpStream, buf: Vec<u8>, name: &str) -> Result<(), String> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut r = Reader { io: stream, buf };
    let mut served = 0u64;
    loop {
        let head = match tokio::time::timeout(Duration::from_secs(60), r.head()).await {
            Err(_) => return Err("idle".into()),
            Ok(Err(e)) => {
                let _ = r
                    .io
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                emit(&json!({"event": "bad request", "peer": peer, "error": e}));
                return Ok(());
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(h))) => h,
        };
        let body = r.body(&head, false).await?;
        let [method, path, _version] = &head.line;
        let host = head.header("host").unwrap_or("-").to_owned();
        emit(
            &json!({"event": "request", "proto": "http/1.1", "peer": peer, "method": method,
                     "path": path, "host": host, "body_len": body.len()}),
        );
        served += 1;
        let text = answer_body(name, method, path, &host, body.len());
        let close = head.closes();
        // A HEAD response announces the body's length but carries none.
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{}",
            text.len(),
            if close { "connection: close\r\n" } else { "" },
            if method.eq_ignore_ascii_case("HEAD") {
                ""
            } else {
                &text
            }
        );
        r.io.write_all(response.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        if close {
            break;
        }
    }
    let _ = r.io.shutdown().await;
    emit(&json!({"event": "closed", "peer": peer, "requests": served}));
    Ok(())
}

async fn h2c_server(io: Prefixed<TcpStream>, name: &str) -> Result<(), String> {
    let peer = io
        .inner
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut conn = h2::server::handshake(io).await.map_err(|e| e.to_string())?;
    let mut served = 0u64;
    while let Some(next) = conn.accept().await {
        let (req, mut respond) = next.map_err(|e| e.to_string())?;
        served += 1;
        let name = name.to_owned();
        let peer = peer.clone();
        tokio::spawn(async move {
            let (parts, mut body) = req.into_parts();
            let mut len = 0usize;
            while let Some(chunk) = body.data().await {
                let Ok(chunk) = chunk else { return };
                len += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let host = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| {
                    parts
                        .headers
                        .get("host")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "-".into());
            let method = parts.method.as_str();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            emit(
                &json!({"event": "request", "proto": "h2c", "peer": peer, "method": method,
                         "path": path, "host": host, "body_len": len}),
            );
            let text = answer_body(&name, method, path, &host, len);
            let response = http::Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .body(())
                .expect("response");
            if let Ok(mut send) = respond.send_response(response, false) {
                let _ = send.send_data(Bytes::from(text), true);
            }
        });
    }
    emit(&json!({"event": "closed", "peer": peer, "requests": served}));
    Ok(())
}

/// A stream that first replays bytes already read from it.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One request of a client: `METHOD PATH [HOST] [+body=TEXT] [+chunked=TEXT]
/// [+header=NAME:VALUE]… [+h:NAME=VALUE]…` (both add a header field).
#[derive(Clone, Debug)]
pub struct RequestSpec {
    method: String,
    path: String,
    host: Option<String>,
    body: Option<(String, bool)>,
    /// Extra header fields, sent as given (after `host` in HTTP/1.1).
    headers: Vec<(String, String)>,
}

impl std::str::FromStr for RequestSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut words = s.split_whitespace();
        let method = words.next().ok_or("empty request")?.to_owned();
        let path = words.next().ok_or("request without a path")?.to_owned();
        let mut spec = RequestSpec {
            method,
            path,
            host: None,
            body: None,
            headers: Vec::new(),
        };
        for w in words {
            if let Some(h) = w.strip_prefix("+h:") {
                let (name, value) = h.split_once('=').ok_or("+h: without '='")?;
                spec.headers.push((name.to_owned(), value.to_owned()));
                continue;
            }
            if let Some(h) = w.strip_prefix("+header=") {
                let (n, v) = h.split_once(':').ok_or("+header= needs NAME:VALUE")?;
                spec.headers.push((n.to_owned(), v.to_owned()));
            } else if let Some(b) = w.strip_prefix("+body=") {
                spec.body = Some((b.to_owned(), false));
            } else if let Some(b) = w.strip_prefix("+chunked=") {
                spec.body = Some((b.to_owned(), true));
            } else if spec.host.is_none() {
                spec.host = Some(w.to_owned());
            } else {
                return Err(format!("unexpected {w:?} in request {s:?}"));
            }
        }
        Ok(spec)
    }
}

impl RequestSpec {
    fn http1_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path);
        if let Some(h) = &self.host {
            out.push_str(&format!("host: {h}\r\n"));
        }
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        match &self.body {
            None => out.push_str("\r\n"),
            Some((text, false)) => {
                out.push_str(&format!("content-length: {}\r\n\r\n{text}", text.len()));
            }
            Some((text, true)) => {
                // Two chunks (one if too short), a trailer-less end.
                out.push_str("transfer-encoding: chunked\r\n\r\n");
                let mid = text.len() / 2;
                for part in [&text[..mid], &text[mid..]] {
                    if !part.is_empty() {
                        out.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
                    }
                }
                out.push_str("0\r\n\r\n");
            }
        }
        out.into_bytes()
    }
}

fn micros(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

async fn connect(addr: SocketAddr, timeout: Duration) -> (Result<TcpStream, String>, u64) {
    let started = std::time::Instant::now();
    let r = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err("connect: timed out".to_owned()),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Ok(Ok(s)) => Ok(s),
    };
    (r, micros(started))
}

fn done(
    error: Option<String>,
    open: bool,
    responses: usize,
    connect_us: u64,
) -> std::process::ExitCode {
    let ok = error.is_none();
    emit(
        &json!({"event": "done", "error": error, "open": open, "responses": responses,
                 "connect_us": connect_us}),
    );
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

/// Whether the peer keeps the connection open: nothing (not even EOF) arrives within `wait`.
async fn still_open<S: AsyncRead + Unpin>(r: &mut Reader<S>, wait: Duration) -> bool {
    if !r.buf.is_empty() {
        return true;
    }
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, r.io.read(&mut b)).await,
        Err(_) | Ok(Ok(1))
    )
}

/// HTTP/1.1 on one connection: every request in turn (or all written first, `pipeline`), one
/// line per response (`index`, `status`, `body`, `connection` header), then `done` with
/// whether the server kept the connection open.
pub fn http1(
    addr: SocketAddr,
    requests: &[RequestSpec],
    pipeline: bool,
    timeout: Duration,
) -> std::process::ExitCode {
    runtime().block_on(async {
        let (stream, connect_us) = connect(addr, timeout).await;
        let stream = match stream {
            Ok(s) => s,
            Err(e) => return done(Some(e), false, 0, connect_us),
        };
        let mut r = Reader {
            io: stream,
            buf: Vec::new(),
        };
        let mut got = 0usize;
        if pipeline {
            let all: Vec<u8> = requests.iter().flat_map(RequestSpec::http1_bytes).collect();
            if let Err(e) = r.io.write_all(&all).await {
                return done(Some(format!("writing: {e}")), false, 0, connect_us);
            }
        }
        for (i, req) in requests.iter().enumerate() {
            if !pipeline {
                if let Err(e) = r.io.write_all(&req.http1_bytes()).await {
                    return done(
                        Some(format!("writing request {i}: {e}")),
                        false,
                        got,
                        connect_us,
                    );
                }
            }
            let response = tokio::time::timeout(timeout, async {
                let head = r.head().await?.ok_or("closed before a response")?;
                let close = head.closes();
                // HEAD, 1xx, 204 and 304 responses have no body whatever their headers say.
                let bodiless = req.method.eq_ignore_ascii_case("HEAD")
                    || matches!(head.line[1].as_bytes().first(), Some(b'1'))
                    || head.line[1] == "204"
                    || head.line[1] == "304";
                let body = if bodiless {
                    Vec::new()
                } else {
                    r.body(&head, close).await?
                };
                Ok::<_, String>((head, body))
            })
            .await
            .unwrap_or_else(|_| Err("timed out waiting for a response".into()));
            match response {
                Ok((head, body)) => {
                    got += 1;
                    emit(&json!({
                        "index": i,
                        "status": head.line[1].parse::<u16>().unwrap_or(0),
                        "body": String::from_utf8_lossy(&body),
                        "connection": head.header("connection"),
                    }));
                }
                Err(e) => return done(Some(format!("response {i}: {e}")), false, got, connect_us),
            }
        }
        let open = still_open(&mut r, Duration::from_millis(300)).await;
        done(None, open, got, connect_us)
    })
}

/// h2c (prior knowledge) on one connection: every request as its own stream, all at once; one
/// line per response (`index`, `status`, `body`), in request order.
pub fn h2c(
    addr: SocketAddr,
    requests: &[RequestSpec],
    timeout: Duration,
) -> std::process::ExitCode {
    runtime().block_on(async {
        let (stream, connect_us) = connect(addr, timeout).await;
        let stream = match stream {
            Ok(s) => s,
            Err(e) => return done(Some(e), false, 0, connect_us),
        };
        let handshake = tokio::time::timeout(timeout, h2::client::handshake(stream)).await;
        let (send, conn) = match handshake {
            Err(_) => return done(Some("h2 handshake timed out".into()), false, 0, connect_us),
            Ok(Err(e)) => return done(Some(format!("h2 handshake: {e}")), false, 0, connect_us),
            Ok(Ok(v)) => v,
        };
        let driver = tokio::spawn(conn);
        let mut send = send;
        let mut pending = Vec::new();
        for (i, req) in requests.iter().enumerate() {
            send = match send.ready().await {
                Ok(s) => s,
                Err(e) => return done(Some(format!("h2 ready: {e}")), false, 0, connect_us),
            };
            let host = req.host.clone().unwrap_or_else(|| addr.to_string());
            let uri = format!("http://{host}{}", req.path);
            let mut builder = http::Request::builder().method(req.method.as_str()).uri(uri);
            for (n, v) in &req.headers {
                builder = builder.header(n.as_str(), v.as_str());
            }
            let request = match builder.body(()) {
                Ok(r) => r,
                Err(e) => return done(Some(format!("request {i}: {e}")), false, 0, connect_us),
            };
            let end = req.body.is_none();
            match send.send_request(request, end) {
                Ok((response, mut body)) => {
                    if let Some((text, _)) = &req.body {
                        let _ = body.send_data(Bytes::from(text.clone()), true);
                    }
                    pending.push(response);
                }
                Err(e) => return done(Some(format!("request {i}: {e}")), false, 0, connect_us),
            }
        }
        let mut got = 0usize;
        let mut failed = None;
        for (i, response) in pending.into_iter().enumerate() {
            let result = tokio::time::timeout(timeout, async {
                let response = response.await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let mut body = response.into_body();
                let mut bytes = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.map_err(|e| e.to_string())?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    bytes.extend_from_slice(&chunk);
                }
                Ok::<_, String>((status, bytes))
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match result {
                Ok((status, body)) => {
                    got += 1;
                    emit(&json!({"index": i, "status": status, "body": String::from_utf8_lossy(&body)}));
                }
                Err(e) => {
                    emit(&json!({"index": i, "error": e}));
                    failed.get_or_insert(format!("response {i}: {e}"));
                }
            }
        }
        let open = !driver.is_finished();
        driver.abort();
        done(failed, open, got, connect_us)
    })
}

/// Sends `bytes`, then reads until the server closes (or `timeout`): `done` with `open` false
/// when it closed, and what it answered (`received`, lossy UTF-8).
pub fn raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> std::process::ExitCode {
    runtime().block_on(async {
        let (stream, connect_us) = connect(addr, timeout).await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => return done(Some(e), false, 0, connect_us),
        };
        if let Err(e) = stream.write_all(bytes).await {
            return done(Some(format!("writing: {e}")), false, 0, connect_us);
        }
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        let how = loop {
            match tokio::time::timeout(timeout, stream.read(&mut chunk)).await {
                Err(_) => break "open",
                Ok(Ok(0)) => break "eof",
                Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) => break "reset",
            }
        };
        emit(&json!({"event": "raw", "how": how, "received": String::from_utf8_lossy(&received)}));
        done(None, how == "open", 0, connect_us)
    })
}
