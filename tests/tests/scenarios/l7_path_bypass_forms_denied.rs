//! The path forms that used to slip past path policies reach nothing they should
//! not, with a backend that normalizes paths itself: Python's `http.server` serving a
//! directory with `admin/secret.txt` and `public/x.txt` (which, without the mesh, serves the
//! secret for seven of these forms). Across nodes (b1 on n2, decided by n2's agent) and on
//! the same node (c1 on n1, decided by n1's agent), over HTTP/1.1 (Python, port 8080) and h2c
//! (`mesh-testpod http-serve`, port 8081), with the agents' default normalization
//! (`DECODE_AND_MERGE_SLASHES`):
//! - under a DENY on `["/admin", "/admin/*"]` every form is answered `403` and the secret
//!   never appears in a response; the pod only ever receives normalized paths;
//! - under an ALLOW of only `["/public/*"]` no form is allowed, `/public/x.txt` still is;
//! - absolute-form (`GET http://b1/admin/secret.txt`) is denied, and an allowed one reaches the
//!   pod in origin-form; `%00` and a lower-case method are answered `400`.

use std::{path::Path, process::Command};

use mesh_tests::{
    require_privileges, wait_for, Agent, Host, HttpRun, Pod, Proc, Server, DEFAULT_TIMEOUT,
};
use serde_json::Value;

use super::policy_common::{apply, docs, policy, wait_line};
use crate::cluster;

/// The bypass forms, then the same aimed at the secret file itself.
const FORMS: &[&str] = &[
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/.%2e/admin",
    "/./admin",
    "//admin",
    "/public/..%2fadmin",
    "/admin%2fx",
    "/public/..\\admin",
    "/%61dmin",
    "/public/../admin/secret.txt",
    "/public/%2e%2e/admin/secret.txt",
    "/public/.%2e/admin/secret.txt",
    "/./admin/secret.txt",
    "//admin/secret.txt",
    "/public/..%2fadmin/secret.txt",
    "/admin%2fsecret.txt",
    "/public/..\\admin/secret.txt",
    "/%61dmin/secret.txt",
    "/public/..%5Cadmin/secret.txt",
    "/%2E%2E/admin/./secret.txt",
    "/public/x/..//..//admin/secret.txt",
];

const PUBLIC: &str = "public file\n";
const HTTP1_PORT: u16 = 8080;
const H2C_PORT: u16 = 8081;

/// A normalizing HTTP/1.1 backend: Python's `http.server` on a directory, logging one JSON
/// line per request (`{"event":"request","line","code"}`).
const SERVER_PY: &str = r#"
import functools, http.server, json, sys

root, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_request(self, code="-", size="-"):
        print(json.dumps({"event": "request", "line": self.requestline, "code": str(code)}), flush=True)

    def log_message(self, fmt, *args):
        pass

server = http.server.ThreadingHTTPServer((host, port), functools.partial(Handler, directory=root))
print(json.dumps({"event": "listening"}), flush=True)
server.serve_forever()
"#;

struct Backend {
    proc: Proc,
}

impl Backend {
    /// Serves `root` on `pod`'s IPv4 address, port [`HTTP1_PORT`].
    #[track_caller]
    fn start(pod: &Pod, root: &Path, secret: &str) -> Self {
        std::fs::create_dir_all(root.join("admin")).expect("mkdir admin");
        std::fs::create_dir_all(root.join("public")).expect("mkdir public");
        std::fs::write(root.join("admin/secret.txt"), secret).expect("write secret");
        std::fs::write(root.join("public/x.txt"), PUBLIC).expect("write public");
        let script = root.join("server.py");
        std::fs::write(&script, SERVER_PY).expect("write server.py");
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let mut cmd = Command::new(python);
        cmd.arg(&script)
            .arg(root)
            .arg(pod.ip4().to_string())
            .arg(HTTP1_PORT.to_string());
        let mut backend = Backend {
            proc: pod.spawn(cmd, "python-http"),
        };
        wait_for(DEFAULT_TIMEOUT, "python http.server listening", || {
            assert!(
                backend.proc.is_running(),
                "python http.server exited: {}",
                backend.proc.stderr()
            );
            backend
                .events()
                .iter()
                .any(|v| v["event"] == "listening")
                .then_some(())
        });
        backend
    }

    fn events(&self) -> Vec<Value> {
        self.proc
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The request lines the backend received.
    fn request_lines(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter(|v| v["event"] == "request")
            .filter_map(|v| v["line"].as_str().map(str::to_owned))
            .collect()
    }
}

/// What each destination pod runs.
struct Dst<'a> {
    pod: &'a Pod,
    backend: Backend,
    h2c: Server,
    decider: &'a Agent,
}

fn deny_admin(app: &str) -> String {
    policy(
        "default",
        &format!("deny-admin-{app}"),
        Some(app),
        "DENY",
        false,
        "  rules:\n  - to:\n    - operation: {paths: [\"/admin\", \"/admin/*\"]}\n",
    )
}

fn allow_public(app: &str) -> String {
    policy(
        "default",
        &format!("allow-public-{app}"),
        Some(app),
        "ALLOW",
        false,
        "  rules:\n  - to:\n    - operation: {paths: [\"/public/*\"]}\n",
    )
}

/// Every form over HTTP/1.1 (one keep-alive connection: denials keep it open) and h2c (one
/// stream each): all `403`, the secret nowhere, the h2c pod saw none of them.
#[track_caller]
fn forms_denied(src: &Pod, dst: &Dst<'_>, secret: &str, phase: &str) {
    let name = dst.pod.name();
    let requests: Vec<String> = FORMS.iter().map(|f| format!("GET {f}")).collect();
    let requests: Vec<&str> = requests.iter().map(String::as_str).collect();
    let run = src.http1(dst.pod.addr4(HTTP1_PORT), &requests, false);
    assert!(run.error.is_none(), "{phase} {name}: {run:?}");
    check_all_denied(&run, secret, &format!("{phase} {name} http/1.1"));
    assert!(
        run.open,
        "{phase} {name}: denials keep the connection: {run:?}"
    );

    let seen_before = dst.h2c.http_requests().len();
    let run = src.h2c(dst.pod.addr4(H2C_PORT), &requests);
    assert!(run.error.is_none(), "{phase} {name} h2c: {run:?}");
    check_all_denied(&run, secret, &format!("{phase} {name} h2c"));
    assert_eq!(
        dst.h2c.http_requests().len(),
        seen_before,
        "{phase} {name}: a denied h2c form reached the pod: {:?}",
        dst.h2c.http_requests()
    );
}

#[track_caller]
fn check_all_denied(run: &HttpRun, secret: &str, what: &str) {
    assert_eq!(run.responses.len(), FORMS.len(), "{what}: {run:?}");
    for (i, form) in FORMS.iter().enumerate() {
        let r = run.response(i);
        assert!(r.is_rbac_denied(), "{what}: {form} was not denied: {r:?}");
    }
    assert!(
        !run.output.stdout.contains(secret),
        "{what}: the secret left the pod: {run:?}"
    );
}

/// The requests that still must work, and what the pods receive for them.
#[track_caller]
fn allowed_and_normalized(src: &Pod, dst: &Dst<'_>, phase: &str) {
    let name = dst.pod.name();
    let lines_before = dst.backend.request_lines().len();
    let run = src.http1(
        dst.pod.addr4(HTTP1_PORT),
        &["GET /public/x.txt", "GET /public/./y/../x.txt?v=/../admin"],
        false,
    );
    assert_eq!(
        run.statuses(),
        [(200, PUBLIC.to_owned()), (200, PUBLIC.to_owned())],
        "{phase} {name}: {run:?}"
    );
    let lines = dst.backend.request_lines().split_off(lines_before);
    assert_eq!(
        lines,
        [
            "GET /public/x.txt HTTP/1.1",
            "GET /public/x.txt?v=/../admin HTTP/1.1"
        ],
        "{phase} {name}: the pod gets the normalized path, the query as sent"
    );

    let seen_before = dst.h2c.http_requests().len();
    let run = src.h2c(
        dst.pod.addr4(H2C_PORT),
        &["GET /public/x.txt", "GET /public/%2e/y/..//x.txt?q=%2e%2e"],
    );
    assert_eq!(run.responses.len(), 2, "{phase} {name} h2c: {run:?}");
    for i in 0..2 {
        assert_eq!(
            run.response(i).status,
            Some(200),
            "{phase} {name} h2c: {run:?}"
        );
    }
    let seen: Vec<String> = dst.h2c.http_requests()[seen_before..]
        .iter()
        .map(|v| v["path"].as_str().unwrap_or("?").to_owned())
        .collect();
    let mut seen = seen;
    seen.sort();
    assert_eq!(
        seen,
        ["/public/x.txt", "/public/x.txt?q=%2e%2e"],
        "{phase} {name} h2c: the pod gets the normalized path"
    );
}

/// Absolute-form, `%00` and lower-case methods (HTTP/1.1).
#[track_caller]
fn edges(src: &Pod, dst: &Dst<'_>, secret: &str) {
    let name = dst.pod.name();
    let addr = dst.pod.addr4(HTTP1_PORT);
    for target in [
        format!("http://{name}/admin/secret.txt"),
        format!("http://{name}/public/../admin/secret.txt"),
        format!("HTTP://{name}:8080//admin/secret.txt"),
    ] {
        let run = src.raw(
            addr,
            &format!("GET {target} HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n"),
        );
        let received = run.raw.as_ref().expect("raw result")["received"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            received.starts_with("HTTP/1.1 403 Forbidden\r\n") && !received.contains(secret),
            "{name}: absolute-form {target}: {received:?}"
        );
    }
    let lines_before = dst.backend.request_lines().len();
    let run = src.raw(
        addr,
        &format!(
            "GET http://{name}/public/x.txt HTTP/1.1\r\nhost: other\r\nconnection: close\r\n\r\n"
        ),
    );
    let received = run.raw.as_ref().expect("raw result")["received"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        received.starts_with("HTTP/1.1 200 OK\r\n") && received.ends_with(PUBLIC),
        "{name}: allowed absolute-form: {received:?}"
    );
    assert_eq!(
        dst.backend.request_lines().split_off(lines_before),
        ["GET /public/x.txt HTTP/1.1"],
        "{name}: absolute-form is forwarded in origin-form"
    );

    for request in [
        "GET /public/x.txt%00",
        "GET /public/x.txt%zz",
        "get /public/x.txt",
        "GET /admin%00/secret.txt",
    ] {
        let run = src.http1(addr, &[request], false);
        assert_eq!(
            run.responses.first().and_then(|r| r.status),
            Some(400),
            "{name}: {request}: {run:?}"
        );
        assert!(!run.output.stdout.contains(secret), "{run:?}");
    }
}

#[test]
fn l7_path_bypass_forms_denied() {
    require_privileges();
    let cluster = cluster()
        .nodes(2)
        .add_pod(0, "a1")
        .add_pod(0, "c1")
        .add_pod(1, "b1")
        .http_ports("b1", &[HTTP1_PORT, H2C_PORT])
        .http_ports("c1", &[HTTP1_PORT, H2C_PORT])
        .build();
    let agents = cluster.start_agents();
    for agent in &agents {
        let config = wait_line(agent, "configuration", "startup configuration", |_| true);
        assert_eq!(
            config["path_normalization"], "DECODE_AND_MERGE_SLASHES",
            "the default mode: {config}"
        );
    }
    let secret = format!("TOP-SECRET-{}", cluster.id());
    let [a1, b1, c1] = ["a1", "b1", "c1"].map(|n| cluster.pod(n));
    let dsts = [(b1, &agents[1]), (c1, &agents[0])].map(|(pod, decider)| Dst {
        pod,
        backend: Backend::start(
            pod,
            &cluster.tmp_dir().join(format!("www-{}", pod.name())),
            &secret,
        ),
        h2c: pod.serve_http(&[H2C_PORT]),
        decider,
    });

    apply(
        &cluster,
        &agents,
        "deny-admin",
        &docs(&[deny_admin("b1"), deny_admin("c1")]),
    );
    for dst in &dsts {
        forms_denied(a1, dst, &secret, "DENY /admin");
        allowed_and_normalized(a1, dst, "DENY /admin");
        edges(a1, dst, &secret);
        // The deciding agent logged the normalized path, with the DENY that matched it.
        let addr = dst.pod.addr4(HTTP1_PORT).to_string();
        let policy = format!("default/deny-admin-{}", dst.pod.name());
        wait_line(
            dst.decider,
            "connection denied",
            "l7 normalized path",
            |v| {
                v["layer"] == "l7"
                    && v["dst"] == addr.as_str()
                    && v["path"] == "/admin/secret.txt"
                    && v["policy"] == policy.as_str()
            },
        );
    }

    apply(
        &cluster,
        &agents,
        "allow-public",
        &docs(&[allow_public("b1"), allow_public("c1")]),
    );
    for dst in &dsts {
        forms_denied(a1, dst, &secret, "ALLOW /public/*");
        allowed_and_normalized(a1, dst, "ALLOW /public/*");
    }

    // Whatever happened, no request naming the admin area reached a backend.
    for dst in &dsts {
        let lines = dst.backend.request_lines();
        assert!(
            lines
                .iter()
                .all(|l| !l.contains("admin") || l.contains("?v=/../admin")),
            "{}: {lines:?}",
            dst.pod.name()
        );
        assert!(
            dst.h2c
                .http_requests()
                .iter()
                .all(|v| !v["path"].as_str().unwrap_or("").contains("admin")),
            "{}: {:?}",
            dst.pod.name(),
            dst.h2c.http_requests()
        );
    }
}
