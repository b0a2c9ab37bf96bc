//! `[worker] proxy_protocol` behind a real HAProxy in `mode tcp` (the second
//! implementation of the protocol, started by the test on free ports and killed at the
//! end): `send-proxy` (v1), `send-proxy-v2`, and `send-proxy-v2` with extensions
//! (`proxy-v2-options`: CRC32C, unique ID, authority), from an IPv4 client on another
//! loopback address, from an IPv6 client on `[::1]`, and from an IPv4 client of a
//! dual-stack bind (relayed as an IPv4-mapped address). The app is told of the client
//! HAProxy relays, whatever its source port; HAProxy's own health checks
//! (`check-send-proxy`: v1 naming HAProxy's own connection, v2 `LOCAL`) reach the app
//! as the balancer's requests and keep the server up. A client HAProxy cannot
//! describe (one on a UNIX socket: v1 `UNKNOWN`, v2 `LOCAL`) is served as the
//! balancer's address, its own forwarding headers not believed.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, free_port, metric, Client, Upstream, Worker, WorkerOpts};

/// The HAProxy binary (`haproxy` on the path, or Debian's `/usr/sbin/haproxy`).
fn haproxy_bin() -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join("haproxy");
        if p.is_file() {
            return p;
        }
    }
    panic!("haproxy is not installed (the CI installs it: .ci/run TEST_PACKAGES)");
}

/// One frontend/backend pair: its name, its port, the `server` line's options.
struct Front {
    name: &'static str,
    port: u16,
    /// A second port, listened on dual-stack (`[::]:PORT v4v6`) when IPv6 is there.
    dual_port: u16,
    server_options: &'static str,
}

/// HAProxy running on a config made for the test; killed on drop.
struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(worker: SocketAddr, fronts: &[Front], v6: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = dir.path().join("stats.sock");
        let mut cfg = format!(
            "global\n  stats socket {} level admin\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  timeout check 5s\n",
            stats.display()
        );
        for f in fronts {
            cfg.push_str(&format!(
                "\nfrontend fe_{n}\n  bind 127.0.0.1:{p}\n  bind unix@{dir}/{n}.sock\n{v6}  unique-id-format {n}-%ci-%cp\n  default_backend be_{n}\n\nbackend be_{n}\n  option httpchk GET /hc-{n}\n  http-check expect status 200\n  server w {worker} {o} check check-send-proxy inter 300ms fall 1 rise 1\n",
                n = f.name,
                p = f.port,
                dir = dir.path().display(),
                v6 = if v6 {
                    format!("  bind [::1]:{}\n  bind [::]:{} v4v6\n", f.port, f.dual_port)
                } else {
                    String::new()
                },
                o = f.server_options,
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).expect("write config");
        let check = Command::new(haproxy_bin())
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy refuses the config:\n{cfg}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log");
        let child = Command::new(haproxy_bin())
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start haproxy");
        let mut h = Self { child, dir };
        for f in fronts {
            h.wait_port(SocketAddr::from(([127, 0, 0, 1], f.port)));
            if v6 {
                h.wait_port(SocketAddr::from(([127, 0, 0, 1], f.dual_port)));
            }
        }
        // The stats socket may come after the ports (seen once under load).
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(h.dir.path().join("stats.sock")).is_err() {
            if let Ok(Some(status)) = h.child.try_wait() {
                panic!("haproxy exited ({status}):\n{}", h.log());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy never opened its stats socket:\n{}",
                h.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    fn wait_port(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("haproxy exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy never listened on {addr}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The UNIX socket frontend `fe_NAME` also listens on.
    fn unix_socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// A command on the stats socket, its answer.
    fn stats(&self, command: &str) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.path().join("stats.sock"))
            .expect("stats socket");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(format!("{command}\n").as_bytes())
            .expect("stats command");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// The check status of backend `be_NAME`'s server (`L7OK`, …) and whether it is
    /// up, from `show stat`'s CSV.
    fn server_state(&self, name: &str) -> (String, String) {
        let csv = self.stats("show stat");
        let mut lines = csv.lines();
        let head: Vec<&str> = lines
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |n: &str| head.iter().position(|h| *h == n).expect("stat column");
        let (px, sv, status, check) = (
            col("pxname"),
            col("svname"),
            col("status"),
            col("check_status"),
        );
        for line in lines {
            let f: Vec<&str> = line.split(',').collect();
            if f.get(px) == Some(&format!("be_{name}").as_str()) && f.get(sv) == Some(&"w") {
                return (f[status].to_owned(), f[check].to_owned());
            }
        }
        panic!("no server be_{name}/w in:\n{csv}");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this host can listen and connect on `[::1]`.
fn loopback_v6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Two requests on one connection through `via` from `from` (the default source
/// address when `None`): the first one's status.
fn through(via: SocketAddr, from: Option<Ipv4Addr>, path: &str) -> u16 {
    let mut c = match from {
        Some(ip) => Client::connect_from(ip, via),
        None => Client::connect(via),
    };
    let status = c.get(path, "").status;
    // A second request on the connection: the same client.
    assert_eq!(c.get(&format!("{path}/again"), "").status, 200);
    status
}

/// The last request the app saw for `path` (HAProxy's checks reach it meanwhile,
/// so the last request of all may be a check).
fn last_at(up: &Upstream, path: &str) -> common::Seen {
    let seen = up.seen.lock().expect("seen").clone();
    seen.into_iter()
        .rev()
        .find(|s| s.path == path)
        .unwrap_or_else(|| panic!("{path} did not reach the app"))
}

#[test]
fn haproxy_in_front_relays_each_client_and_its_checks_keep_the_server_up() {
    let up = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        worker_extra: "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\", \"::1\"]\n".into(),
        ..Default::default()
    });
    let fronts = [
        Front {
            name: "v1",
            port: free_port(),
            dual_port: free_port(),
            server_options: "send-proxy",
        },
        Front {
            name: "v2",
            port: free_port(),
            dual_port: free_port(),
            server_options: "send-proxy-v2",
        },
        Front {
            name: "v2tlv",
            port: free_port(),
            dual_port: free_port(),
            server_options: "send-proxy-v2 proxy-v2-options crc32c,unique-id,authority",
        },
    ];
    let v6 = loopback_v6();
    let h = Haproxy::start(w.addr(), &fronts, v6);

    // Every backend's check (an HTTP request after a v1 `UNKNOWN` or v2 `LOCAL`
    // header) reaches the app as the balancer's own request and passes.
    for f in &fronts {
        eventually(&format!("haproxy's check of be_{} passes", f.name), || {
            let (status, check) = h.server_state(f.name);
            status == "UP" && check == "L7OK"
        });
        let seen = up.seen.lock().expect("seen").clone();
        let check = seen
            .iter()
            .find(|s| s.path == format!("/hc-{}", f.name))
            .unwrap_or_else(|| panic!("no check of be_{} reached the app", f.name));
        assert_eq!(
            check.header("x-forwarded-for"),
            Some("127.0.0.1"),
            "{check:?}"
        );
    }

    // What is refused from here on (the start-up probes of the worker's and
    // HAProxy's ports are done by now).
    let refused = metric(&w, "appproxy_proxy_protocol_refused_total");
    for f in &fronts {
        // An IPv4 client on 127.0.0.5 (HAProxy connects from 127.0.0.1), twice, from
        // two source ports: the app is told of 127.0.0.5 every time.
        let via = SocketAddr::from(([127, 0, 0, 1], f.port));
        for round in 0..2 {
            let path = format!("/{}/v4/{round}", f.name);
            assert_eq!(through(via, Some(Ipv4Addr::new(127, 0, 0, 5)), &path), 200);
            for p in [path.clone(), format!("{path}/again")] {
                let s = last_at(&up, &p);
                assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.5"), "{s:?}");
            }
        }
        if v6 {
            let via: SocketAddr = format!("[::1]:{}", f.port).parse().expect("addr");
            let path = format!("/{}/v6", f.name);
            let mut c = Client::connect(via);
            assert_eq!(c.get(&path, "").status, 200);
            let s = last_at(&up, &path);
            assert_eq!(s.header("x-forwarded-for"), Some("::1"), "{s:?}");
            // An IPv4 client of the dual-stack port: relayed as an IPv4-mapped IPv6
            // address, it is the IPv4 client.
            let via = SocketAddr::from(([127, 0, 0, 1], f.dual_port));
            let path = format!("/{}/dual", f.name);
            assert_eq!(through(via, Some(Ipv4Addr::new(127, 0, 0, 6)), &path), 200);
            let s = last_at(&up, &format!("{path}/again"));
            assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.6"), "{s:?}");
        }
    }
    // A client on HAProxy's UNIX socket: relayed with a header naming no client. Its
    // X-Forwarded-For is not taken for the client's address.
    for f in &fronts {
        let mut s = std::os::unix::net::UnixStream::connect(h.unix_socket(f.name))
            .expect("haproxy's unix socket");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let path = format!("/{}/unix", f.name);
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.66\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("request");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        let seen = last_at(&up, &path);
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("127.0.0.1"),
            "{seen:?}"
        );
        assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"), "{seen:?}");
    }
    // Nothing HAProxy sent was refused, and the servers are still up.
    assert_eq!(
        metric(&w, "appproxy_proxy_protocol_refused_total"),
        refused,
        "{}",
        w.log_text()
    );
    for f in &fronts {
        assert_eq!(h.server_state(f.name).0, "UP", "{}", h.log());
    }
}
