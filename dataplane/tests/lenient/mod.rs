//! A lenient recording app for the hostile suites: it reads requests the way a
//! forgiving server does (nginx-style: a bare LF ends a line, a line that is empty
//! once its CR is dropped ends the trailer section, chunk extensions are skipped), so
//! whatever framing the worker lets through shows up here as an extra request. Every
//! request is recorded with the exact bytes the app read for it; scripted paths answer
//! with interim responses and malformed chunked bodies.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the lenient app read it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which accepted connection carried it (0-based).
    pub conn: usize,
    pub method: String,
    pub path: String,
    /// The request line's version token.
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// Every byte the app read for this request (head and body framing).
    pub raw: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The lenient app on a thread.
pub struct LenientApp {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl LenientApp {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (seen.clone(), connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn = c.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, conn, s);
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
            stop,
        }
    }

    /// Everything recorded so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Whether any request for `path` reached the app.
    pub fn saw_path(&self, path: &str) -> bool {
        self.seen().iter().any(|s| s.path == path)
    }

    /// The recorded request for `path` (the last one).
    pub fn request(&self, path: &str) -> Seen {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("no request for {path} reached the app"))
    }
}

impl Drop for LenientApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads one line up to LF (a bare LF is accepted), keeping the raw bytes; returns
/// the line without its line end, or `None` at end of stream.
fn line(r: &mut impl BufRead, raw: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf)? == 0 {
        return Ok(None);
    }
    raw.extend_from_slice(&buf);
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn serve(stream: TcpStream, conn: usize, seen: Arc<Mutex<Vec<Seen>>>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    loop {
        let mut raw = Vec::new();
        let request_line = loop {
            match line(&mut r, &mut raw)? {
                None => return Ok(()),
                // Lenient: empty lines before a request are skipped.
                Some(l) if l.is_empty() => continue,
                Some(l) => break l,
            }
        };
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let version = parts.next().unwrap_or("").to_owned();
        let mut headers = Vec::new();
        while let Some(l) = line(&mut r, &mut raw)? {
            if l.is_empty() {
                break;
            }
            if let Some((n, v)) = l.split_once(':') {
                headers.push((n.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        let mut trailers = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                let Some(size_line) = line(&mut r, &mut raw)? else {
                    return Ok(());
                };
                let digits = size_line
                    .split(|c: char| c == ';' || c.is_whitespace())
                    .next()
                    .unwrap_or("");
                let Ok(size) = usize::from_str_radix(digits, 16) else {
                    return Ok(());
                };
                if size == 0 {
                    // Trailers until a line that is empty once CR is dropped.
                    while let Some(t) = line(&mut r, &mut raw)? {
                        if t.is_empty() {
                            break;
                        }
                        if let Some((n, v)) = t.split_once(':') {
                            trailers.push((n.trim().to_owned(), v.trim().to_owned()));
                        }
                    }
                    break;
                }
                let mut chunk = vec![0; size];
                r.read_exact(&mut chunk)?;
                raw.extend_from_slice(&chunk);
                body.extend_from_slice(&chunk);
                line(&mut r, &mut raw)?;
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let mut chunk = vec![0; n];
            r.read_exact(&mut chunk)?;
            raw.extend_from_slice(&chunk);
            body = chunk;
        }
        seen.lock().expect("seen").push(Seen {
            conn,
            method: method.clone(),
            path: path.clone(),
            version,
            headers: headers.clone(),
            body: body.clone(),
            trailers,
            raw,
        });
        let route = path.split('?').next().unwrap_or("");
        let query: HashMap<&str, &str> = path
            .split_once('?')
            .map(|(_, q)| q.split('&').filter_map(|kv| kv.split_once('=')).collect())
            .unwrap_or_default();
        let n: usize = query.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
        match route {
            "/smuggled" => {
                // What an attacker wants the next user of this connection to get.
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nX-Attacker: yes\r\nContent-Length: 8\r\n\r\npoisoned",
                )?;
            }
            "/interim" => {
                // n interim responses, then the final one. Each also tries to plant
                // the worker's permit cookie and request IDs of its own (under the
                // primary name and both aliases).
                for _ in 0..n {
                    w.write_all(
                        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nSet-Cookie: appproxy_permit=planted; Path=/\r\nX-Backend-Request-ID: spoofed-by-app\r\nX-Request-ID: spoofed-by-app\r\nX-BackendAI-RequestID: spoofed-by-app\r\n\r\n",
                    )?;
                }
                w.write_all(b"HTTP/1.1 200 OK\r\nX-Request-ID: spoofed-by-app\r\nx-backendai-requestid: spoofed-by-app\r\nContent-Length: 5\r\n\r\nfinal")?;
            }
            "/interim-then-close" => {
                // An interim head, then the app's end.
                w.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")?;
                return Ok(());
            }
            "/interim-then-bad-chunk" => {
                // An interim head, then a final one whose chunked body is broken
                // before its first byte.
                w.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")?;
                w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")?;
                return Ok(());
            }
            "/obs-reason" => {
                w.write_all(b"HTTP/1.1 200 O\xfbK\r\nContent-Length: 2\r\n\r\nok")?;
            }
            "/bad-chunk" => {
                w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")?;
                return Ok(());
            }
            "/trailer-lf" => {
                w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\nHTTP/1.1 200 OK\r\n\r\n")?;
                return Ok(());
            }
            "/chunked-trailers" => {
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n",
                )?;
                w.write_all(b"5;ext=\"quoted\"\r\nhello\r\n000006\r\n world\r\n")?;
                w.write_all(b"0\r\nX-Sum: 42\r\nContent-Length: 99\r\nSet-Cookie: a=b\r\nHost: evil\r\n\r\n")?;
            }
            _ => {
                let body = format!(
                    "{{\"path\":{path:?},\"conn\":{conn},\"body_len\":{}}}",
                    body.len()
                );
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
            }
        }
        w.flush()?;
    }
}
