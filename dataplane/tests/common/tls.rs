//! TLS test support: a throwaway PKI made with the `openssl` CLI (a root CA, an
//! intermediate, ECDSA and RSA leaves for `localhost`, a wildcard leaf, keys in
//! PKCS#8, PKCS#1 and SEC1), worker config lines that turn `tls_listen` on, and a
//! rustls client (an implementation independent of the worker's record handling),
//! and a driver for `openssl s_client` whose output a test can wait on.
#![allow(dead_code)]

use appproxy_test_support::net::ReadUninterrupted;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// The files of the test PKI.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A leaf signed by `ca` for `san`, with a key of `newkey` (`ec` or `rsa:2048`).
fn leaf(dir: &Path, name: &str, cn: &str, san: &str, ca: &str, newkey: &str) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let pem = format!("{name}.pem");
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"),
    )
    .expect("ext");
    let mut args = vec!["req", "-newkey", newkey];
    if newkey == "ec" {
        args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
    }
    args.extend(["-nodes", "-keyout", &key, "-out", &csr, "-subj"]);
    let subj = format!("/CN={cn}");
    args.push(&subj);
    openssl(dir, &args);
    let ca_pem = format!("{ca}.pem");
    let ca_key = format!("{ca}.key");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "30",
            "-extfile",
            &ext,
        ],
    );
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=appproxy test root",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        // An intermediate, so the served chain has two certificates.
        std::fs::write(
            d.join("int.ext"),
            "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        .expect("ext");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "int.key",
                "-out",
                "int.csr",
                "-subj",
                "/CN=appproxy test intermediate",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "int.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "int.pem",
                "-days",
                "30",
                "-extfile",
                "int.ext",
            ],
        );
        // ECDSA leaf (PKCS#8 key) behind the intermediate: served as a chain.
        leaf(
            d,
            "ec",
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
            "int",
            "ec",
        );
        let chain = [
            std::fs::read(d.join("ec.pem")).expect("leaf"),
            std::fs::read(d.join("int.pem")).expect("int"),
        ]
        .concat();
        std::fs::write(d.join("ec-chain.pem"), chain).expect("chain");
        // The same key in SEC1 form.
        openssl(d, &["ec", "-in", "ec.key", "-out", "ec-sec1.key"]);
        // RSA leaf straight under the root, its key in PKCS#1 form.
        leaf(
            d,
            "rsa",
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
            "ca",
            "rsa:2048",
        );
        openssl(
            d,
            &[
                "rsa",
                "-in",
                "rsa.key",
                "-traditional",
                "-out",
                "rsa-pkcs1.key",
            ],
        );
        // A wildcard leaf for SNI.
        leaf(d, "wild", "*.apps.test", "DNS:*.apps.test", "ca", "ec");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[worker]` lines serving the ECDSA chain (and the wildcard pair by SNI).
    pub fn worker_lines(&self) -> String {
        format!(
            "tls_listen = true\ntls_cert = \"{}\"\ntls_privkey = \"{}\"\ntls_sni_certs = [{{ cert = \"{}\", privkey = \"{}\" }}]\n",
            self.path("ec-chain.pem").display(),
            self.path("ec.key").display(),
            self.path("wild.pem").display(),
            self.path("wild.key").display(),
        )
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path("ca.pem")).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add root");
        }
        roots
    }

    /// A client trusting the test root, offering `versions` and `alpn`.
    pub fn client(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<ClientConfig> {
        let mut c =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(self.roots())
                .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }

    /// The default client: TLS 1.3 and 1.2, ALPN http/1.1.
    pub fn default_client(&self) -> Arc<ClientConfig> {
        self.client(
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            &[b"http/1.1"],
        )
    }
}

/// A TLS client connection over TCP.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake (an error when the server refuses).
pub fn connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    tcp.set_nodelay(true)?;
    handshake(tcp, config, name)
}

/// Completes the handshake on a connection already open.
pub fn handshake(
    tcp: TcpStream,
    config: &Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream> {
    let server = ServerName::try_from(name.to_owned()).expect("name");
    let conn = ClientConnection::new(config.clone(), server).expect("client");
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// A response read by the test's own small parser (Content-Length bodies).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a GET and reads its response on `s` (keep-alive); `Host: localhost` unless
/// `extra` names one.
pub fn get(s: &mut BufReader<TlsStream>, path: &str, extra: &str) -> Resp {
    let host = if extra.to_ascii_lowercase().contains("host:") {
        ""
    } else {
        "Host: localhost\r\n"
    };
    s.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\n{host}{extra}\r\n").as_bytes())
        .expect("send");
    s.get_mut().flush().expect("flush");
    read_response(s)
}

pub fn read_response(s: &mut BufReader<TlsStream>) -> Resp {
    let mut line = String::new();
    s.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        s.read_line(&mut h).expect("header");
        if h == "\r\n" || h.is_empty() {
            break;
        }
        let (n, v) = h.trim_end().split_once(':').expect("header line");
        headers.push((n.to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).expect("body");
    Resp {
        status,
        headers,
        body,
    }
}

/// A running `openssl s_client`: its stdin, and its stdout and stderr as they arrive,
/// so a test can wait for what it printed instead of sleeping.
pub struct SClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

/// Appends everything `from` yields to `to` until end of stream.
fn drain(mut from: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let to: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = to.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read_uninterrupted(&mut buf) {
            sink.lock().expect("output").extend_from_slice(&buf[..n]);
        }
    });
    (to, reader)
}

impl SClient {
    /// Starts `openssl s_client -connect 127.0.0.1:port` with `args`.
    pub fn spawn(port: u16, args: &[&str]) -> Self {
        let mut child = Command::new("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("s_client");
        let stdin = child.stdin.take();
        let (stdout, out_reader) = drain(child.stdout.take().expect("stdout"));
        let (stderr, err_reader) = drain(child.stderr.take().expect("stderr"));
        Self {
            child,
            stdin,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// Writes `bytes` to its stdin; an error means it has already gone.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
        stdin.write_all(bytes)?;
        stdin.flush()
    }

    /// Closes its stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// What it printed so far: stdout, then stderr.
    pub fn output(&self) -> (String, String) {
        let text = |b: &Arc<Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&b.lock().expect("output")).into_owned()
        };
        (text(&self.stdout), text(&self.stderr))
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_some()
    }

    /// Polls (within 20 s) until `done` holds for what it printed so far (stdout,
    /// stderr) or it has exited (the caller's checks of the output then say what
    /// went wrong); panics naming `what`, with the output, if neither happens.
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let exited = self.exited();
            let (out, err) = self.output();
            if exited || done(&out, &err) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "s_client never showed {what}:\n{out}\n{err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes its stdin, waits (within 20 s) for it to exit and returns everything it
    /// printed: stdout, stderr. Panics with the output if it does not exit.
    pub fn finish(mut self) -> (String, String) {
        self.close_stdin();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.exited() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let (out, err) = self.output();
                panic!("s_client did not finish within 20 s:\n{out}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for reader in self.readers.drain(..) {
            reader.join().expect("reader");
        }
        self.output()
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
