//! gRPC through the worker with real `grpcio` (from PyPI, installed into a virtualenv
//! under the target directory on first run): a `grpcio` server as the app of a
//! `grpc` circuit and a `grpcio` client driving unary, server-streaming and
//! bidirectional (ping-pong, so nothing can be buffered whole) calls, 16 MiB messages
//! both ways, a deadline exceeded, a cancellation that reaches the app, the
//! `UNAVAILABLE` status with the request ID when the app is down, and a long stream
//! each way (1 GiB in 1 MiB messages) at constant worker memory.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{Worker, WorkerOpts};

/// The virtualenv with grpcio, made once (`appproxy_test_support::python`).
fn grpc_venv() -> PathBuf {
    appproxy_test_support::python::venv(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "grpc-venv",
        &["grpcio"],
    )
}

const SERVER: &str = r#"
import sys, time, grpc
from concurrent import futures
MAX = 64 << 20
cancel_file = sys.argv[1]
def unary(req, ctx):
    md = dict(ctx.invocation_metadata())
    return b"echo:" + md.get("x-backend-request-id", "").encode() + b":" + req
def big(req, ctx):
    return b"z" * int(req)
def length(req, ctx):
    return str(len(req)).encode()
def stream(req, ctx):
    for i in range(int(req)):
        yield b"msg%d" % i
def bidi(it, ctx):
    for m in it:
        yield b"re:" + m
def flood(req, ctx):
    count, size = (int(x) for x in req.split(b":"))
    msg = b"f" * size
    for _ in range(count):
        yield msg
def sink(it, ctx):
    n = 0
    for m in it:
        n += len(m)
    return str(n).encode()
def slow(req, ctx):
    time.sleep(float(req))
    return b"late"
def wait(req, ctx):
    while ctx.is_active():
        time.sleep(0.02)
    with open(cancel_file, "w") as f:
        f.write("cancelled")
    return b""
h = grpc.method_handlers_generic_handler("test.Svc", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Big": grpc.unary_unary_rpc_method_handler(big),
    "Len": grpc.unary_unary_rpc_method_handler(length),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
    "Flood": grpc.unary_stream_rpc_method_handler(flood),
    "Sink": grpc.stream_unary_rpc_method_handler(sink),
    "Wait": grpc.unary_unary_rpc_method_handler(wait),
})
server = grpc.server(futures.ThreadPoolExecutor(16), options=[
    ("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)])
server.add_generic_rpc_handlers((h,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

const CLIENT: &str = r#"
import sys, json, time, queue, os, grpc
target, mode, cancel_file = sys.argv[1], sys.argv[2], sys.argv[3]
MAX = 64 << 20
ch = grpc.insecure_channel(target, options=[
    ("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)])
out = {}
given = "2b3c5a0e-8f4d-4c9b-a1e2-3f4a5b6c7d8e"
if mode == "dead":
    try:
        ch.unary_unary("/test.Svc/Unary")(b"x", timeout=20)
    except grpc.RpcError as e:
        out["code"] = e.code().name
        out["details"] = e.details()
        out["initial"] = dict(e.initial_metadata() or ())
        out["trailing"] = dict(e.trailing_metadata() or ())
    print(json.dumps(out))
    sys.exit(0)
if mode.startswith("flood:") or mode.startswith("sink:"):
    kind, count, size = mode.split(":")
    count, size = int(count), int(size)
    if kind == "flood":
        n = m = 0
        for msg in ch.unary_stream("/test.Svc/Flood")(b"%d:%d" % (count, size), timeout=600):
            n += len(msg)
            m += 1
        out["bytes"], out["messages"] = n, m
    else:
        msg = b"s" * size
        def gen():
            for _ in range(count):
                yield msg
        out["bytes"] = int(ch.stream_unary("/test.Svc/Sink")(gen(), timeout=600))
    print(json.dumps(out))
    sys.exit(0)
resp, call = ch.unary_unary("/test.Svc/Unary").with_call(
    b"hi", metadata=[("x-request-id", given)], timeout=20)
out["unary"] = resp.decode()
out["unary_id"] = dict(call.initial_metadata()).get("x-backend-request-id")
out["big_len"] = len(ch.unary_unary("/test.Svc/Big")(str(16 << 20).encode(), timeout=60))
out["upload_len"] = int(ch.unary_unary("/test.Svc/Len")(b"q" * (16 << 20), timeout=60))
out["stream"] = [m.decode() for m in ch.unary_stream("/test.Svc/Stream")(b"50", timeout=20)]
q = queue.Queue()
def gen():
    while True:
        m = q.get()
        if m is None:
            return
        yield m
it = ch.stream_stream("/test.Svc/Bidi")(gen(), timeout=20)
replies = []
for i in range(20):
    q.put(b"m%d" % i)
    replies.append(next(it).decode())
q.put(None)
out["bidi"] = replies
try:
    ch.unary_unary("/test.Svc/Slow")(b"5", timeout=0.5)
    out["deadline"] = "none"
except grpc.RpcError as e:
    out["deadline"] = e.code().name
fut = ch.unary_unary("/test.Svc/Wait").future(b"", timeout=30)
time.sleep(0.5)
fut.cancel()
deadline = time.time() + 10
while time.time() < deadline and not os.path.exists(cancel_file):
    time.sleep(0.05)
out["cancel_seen_by_app"] = os.path.exists(cancel_file)
print(json.dumps(out))
"#;

struct App {
    child: Child,
    addr: SocketAddr,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_app(venv: &Path, dir: &Path) -> App {
    let script = dir.join("server.py");
    std::fs::write(&script, SERVER).expect("write server");
    let mut child = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(dir.join("cancelled"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the grpcio server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the server's port");
    let port: u16 = line.trim().parse().expect("a port");
    App {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

fn run_client(venv: &Path, dir: &Path, target: &str, mode: &str) -> serde_json::Value {
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT).expect("write client");
    let out = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(target)
        .arg(mode)
        .arg(dir.join("cancelled"))
        .output()
        .expect("run the grpcio client");
    assert!(
        out.status.success(),
        "grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A worker with a `grpc` circuit, its app, and the virtualenv and directory the
/// grpcio scripts run from. The fields drop in order: the worker, then the app.
struct Grpc {
    w: Worker,
    _app: Option<App>,
    dir: tempfile::TempDir,
    venv: PathBuf,
}

impl Grpc {
    /// A worker in front of the grpcio app (`app_up`) or of a port nothing listens on.
    fn start(app_up: bool) -> Self {
        let venv = grpc_venv();
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app_up.then(|| start_app(&venv, dir.path()));
        let upstream = app.as_ref().map_or_else(
            || SocketAddr::from(([127, 0, 0, 1], appproxy_test_support::free_port())),
            |app| app.addr,
        );
        let w = Worker::start(WorkerOpts {
            upstreams: vec![upstream],
            circuit_extra: "protocol = \"grpc\"".into(),
            ..Default::default()
        });
        Self {
            w,
            _app: app,
            dir,
            venv,
        }
    }

    /// Runs the grpcio client in `mode` against the worker; returns what it printed.
    fn client(&self, mode: &str) -> serde_json::Value {
        let target = format!("127.0.0.1:{}", self.w.port);
        run_client(&self.venv, self.dir.path(), &target, mode)
    }
}

#[test]
fn grpcio_calls_through_a_grpc_circuit() {
    let g = Grpc::start(true);
    let w = &g.w;
    let before = w.peak_rss_kib();
    let out = g.client("calls");
    let given = "2b3c5a0e-8f4d-4c9b-a1e2-3f4a5b6c7d8e";
    // The app got the request ID the client sent, and the client got it back.
    assert_eq!(out["unary"], format!("echo:{given}:hi"), "{out}");
    assert_eq!(out["unary_id"], given, "{out}");
    assert_eq!(out["big_len"], 16 << 20, "{out}");
    assert_eq!(out["upload_len"], 16 << 20, "{out}");
    let stream: Vec<String> = (0..50).map(|i| format!("msg{i}")).collect();
    assert_eq!(out["stream"], serde_json::json!(stream), "{out}");
    let bidi: Vec<String> = (0..20).map(|i| format!("re:m{i}")).collect();
    assert_eq!(out["bidi"], serde_json::json!(bidi), "{out}");
    assert_eq!(out["deadline"], "DEADLINE_EXCEEDED", "{out}");
    assert_eq!(out["cancel_seen_by_app"], true, "{out}");
    let line = w.wait_access_line(given);
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/test.Svc/Unary");
    // 16 MiB each way went through windows of 256 KiB: the worker never held a
    // message whole.
    let rss = w.peak_rss_kib();
    eprintln!("worker peak RSS {before} KiB before, {rss} KiB after 16 MiB each way");
    assert!(
        rss < before + 8 * 1024,
        "worker peak RSS grew from {before} to {rss} KiB"
    );
}

#[test]
fn grpcio_sees_unavailable_with_the_request_id_when_the_app_is_down() {
    let g = Grpc::start(false);
    let w = &g.w;
    let out = g.client("dead");
    assert_eq!(out["code"], "UNAVAILABLE", "{out}");
    let id = out["trailing"]["x-backend-request-id"]
        .as_str()
        .or_else(|| out["initial"]["x-backend-request-id"].as_str())
        .expect("the request ID in the answer")
        .to_owned();
    assert!(
        out["details"].as_str().is_some_and(|d| d.contains(&id)),
        "{out}"
    );
    assert_eq!(w.wait_access_line(&id)["status"], 502);
}

/// MiB streamed each way by the constant-memory test (1 GiB: about 20 s each way
/// through a debug build on a shared 2-CPU machine).
const STREAM_MIB: usize = 1024;

#[test]
fn a_gibibyte_grpc_stream_each_way_passes_at_constant_memory() {
    let g = Grpc::start(true);
    let w = &g.w;
    // One small call first, so the connections, pools and buffers of the first stream
    // are in the baseline.
    let warm = g.client("flood:1:1048576");
    assert_eq!(warm["bytes"], 1 << 20, "{warm}");
    let before = w.peak_rss_kib();
    // Server streaming: STREAM_MIB messages of 1 MiB from the app to the client.
    let down = g.client(&format!("flood:{STREAM_MIB}:1048576"));
    assert_eq!(down["messages"], STREAM_MIB, "{down}");
    assert_eq!(down["bytes"], STREAM_MIB << 20, "{down}");
    let after_down = w.peak_rss_kib();
    // Client streaming: as much from the client to the app.
    let up = g.client(&format!("sink:{STREAM_MIB}:1048576"));
    assert_eq!(up["bytes"], STREAM_MIB << 20, "{up}");
    let after_up = w.peak_rss_kib();
    eprintln!(
        "worker peak RSS {before} KiB before, {after_down} KiB after {STREAM_MIB} MiB down, {after_up} KiB after {STREAM_MIB} MiB up"
    );
    // Each stream holds at most its window plus the send buffer: the worker's peak
    // memory does not grow with the stream.
    assert!(
        after_up < before + 16 * 1024,
        "worker peak RSS grew from {before} to {after_up} KiB over {STREAM_MIB} MiB each way"
    );
}
