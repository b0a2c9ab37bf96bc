//! WebSocket load tools of the harness, run as subprocesses so they can be pinned:
//! an echo app, an echo load client (messages/s and latency), and an idle-session
//! holder for the memory-per-connection scenario. Hand-written on blocking sockets:
//! independent of the worker's own WebSocket code.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha1::Digest as _;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Raises the soft descriptor limit as far as allowed (root: to 1M).
pub fn raise_nofile() {
    appproxy_shared::nofile::raise(1 << 20, true);
}

/// Answers a WebSocket handshake on `stream`; returns the reader for frames.
fn accept(stream: &TcpStream) -> std::io::Result<BufReader<TcpStream>> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut key = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.trim().eq_ignore_ascii_case("sec-websocket-key") {
                key = Some(v.trim().to_owned());
            }
        }
    }
    let key = key.ok_or_else(|| std::io::Error::other("no Sec-WebSocket-Key"))?;
    let accept = base64::engine::general_purpose::STANDARD
        .encode(sha1::Sha1::digest(format!("{key}{GUID}").as_bytes()));
    let mut w = stream;
    write!(
        w,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )?;
    Ok(reader)
}

/// Reads one frame; returns (opcode, payload unmasked).
fn read_frame(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        r.read_exact(&mut b)?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    let mask = if h[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        r.read_exact(&mut m)?;
        Some(m)
    } else {
        None
    };
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Ok((h[0] & 0x0f, payload))
}

fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if payload.len() < 126 {
        f.push(m | payload.len() as u8);
    } else {
        f.push(m | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// The echo app: every data frame is sent back (thread per connection).
pub fn echo_app(port: u16) -> std::io::Result<()> {
    raise_nofile();
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let Ok(mut reader) = accept(&stream) else {
                return;
            };
            let mut w = &stream;
            while let Ok((op, payload)) = read_frame(&mut reader) {
                if op == 0x8 {
                    let _ = w.write_all(&frame(0x8, &payload, None));
                    break;
                }
                if (op == 0x1 || op == 0x2) && w.write_all(&frame(op, &payload, None)).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// The idle-session app: completes handshakes and keeps the sockets, nothing else.
pub fn idle_app(port: u16) -> std::io::Result<()> {
    raise_nofile();
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let mut held = Vec::new();
    for stream in listener.incoming().flatten() {
        if accept(&stream).is_ok() {
            held.push(stream);
        }
    }
    Ok(())
}

/// How long a load client waits for any one answer before it counts an error and
/// gives up on that session: a target that stops answering never hangs the harness.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

fn client_handshake(addr: SocketAddr) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = TcpStream::connect_timeout(&addr, ANSWER_DEADLINE)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(ANSWER_DEADLINE))?;
    stream.set_write_timeout(Some(ANSWER_DEADLINE))?;
    let mut w = &stream;
    write!(
        w,
        "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 101") {
        return Err(std::io::Error::other(format!(
            "handshake refused: {status}"
        )));
    }
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    Ok((stream, reader))
}

/// Echo load: `conns` sessions each send a 64-byte text message and wait for its echo,
/// for `secs`. Prints `BENCH messages=… duration_us=… p50=… p99=… p999=… errors=…`.
pub fn echo_load(addr: SocketAddr, conns: usize, secs: u64) -> std::io::Result<()> {
    raise_nofile();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::with_capacity(1 << 20)));
    let mut threads = Vec::new();
    let started = Instant::now();
    for _ in 0..conns {
        let (stop, count, errors, latencies) = (
            stop.clone(),
            count.clone(),
            errors.clone(),
            latencies.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let Ok((stream, mut reader)) = client_handshake(addr) else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let msg = frame(0x1, &[b'm'; 64], Some([1, 2, 3, 4]));
            let mut local = Vec::with_capacity(1 << 16);
            let mut w = &stream;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if w.write_all(&msg).is_err() || read_frame(&mut reader).is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                local.push(t.elapsed().as_micros() as u32);
                count.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut all) = latencies.lock() {
                all.extend_from_slice(&local);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for t in threads {
        let _ = t.join();
    }
    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "BENCH requests={} duration_us={} errors={} p50={} p99={} p999={}",
        count.load(Ordering::Relaxed),
        elapsed.as_micros(),
        errors.load(Ordering::Relaxed),
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
    Ok(())
}

/// Opens `n` WebSocket sessions through `addr`, prints `READY`, then holds them until
/// standard input closes.
pub fn idle_client(addr: SocketAddr, n: usize) -> std::io::Result<()> {
    raise_nofile();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(client_handshake(addr)?);
    }
    println!("READY {}", held.len());
    std::io::stdout().flush()?;
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
    Ok(())
}

/// An SSE app: every request gets an endless `text/event-stream`, one 100-byte event
/// per write, as fast as the connection takes them.
pub fn sse_app(port: u16) -> std::io::Result<()> {
    raise_nofile();
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let mut reader = BufReader::new(match stream.try_clone() {
                Ok(s) => s,
                Err(_) => return,
            });
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let mut w = &stream;
            if w
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
                .is_err()
            {
                return;
            }
            let event = format!("data: {}\n\n", "e".repeat(92));
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            while w.write_all(chunk.as_bytes()).is_ok() {}
        });
    }
    Ok(())
}

/// SSE load: `conns` clients each read one endless event stream for `secs`; prints
/// `BENCH requests=<events> …` (latency is not measured for streams: zeros).
pub fn sse_load(addr: SocketAddr, conns: usize, secs: u64) -> std::io::Result<()> {
    raise_nofile();
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..conns {
        let (stop, events, errors) = (stop.clone(), events.clone(), errors.clone());
        threads.push(std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(addr) else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            if s.write_all(
                b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
            )
            .is_err()
            {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            let mut tail: Vec<u8> = Vec::new();
            let needle = b"data: ";
            while !stop.load(Ordering::Relaxed) {
                let n = match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        continue
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                };
                // Count event starts; `tail` (the previous read's last bytes plus this
                // read's first ones, each shorter than the needle) catches the ones
                // split across two reads, and cannot hold one wholly inside either.
                tail.extend_from_slice(&buf[..n.min(needle.len() - 1)]);
                let mut count = tail.windows(needle.len()).filter(|w| w == needle).count() as u64;
                count += buf[..n]
                    .windows(needle.len())
                    .filter(|w| w == needle)
                    .count() as u64;
                events.fetch_add(count, Ordering::Relaxed);
                let keep = n.min(needle.len() - 1);
                tail.clear();
                tail.extend_from_slice(&buf[n - keep..n]);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for t in threads {
        let _ = t.join();
    }
    println!(
        "BENCH requests={} duration_us={} errors={} p50=0 p99=0 p999=0",
        events.load(Ordering::Relaxed),
        elapsed.as_micros(),
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}
