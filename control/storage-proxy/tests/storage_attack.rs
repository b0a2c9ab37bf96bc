//! The storage-proxy against a vfolder user who also has a shell in a container
//! mounting the vfolder (special files in the staging area, trees deeper than any
//! stack or descriptor budget, directories wider than the descriptor limit, names
//! longer than a zip header can say) and against a client holding a valid token;
//! and paths through a relative symlink while renames happen elsewhere on the host.
//! Symlink swaps are covered by `storage_containment.rs`.

mod storage_common;

use appproxy_test_support::net::ReadUninterrupted;
use storage_common::{create_folder, incompressible, Proxy, VFID};

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use rustix::fs::{Mode, OFlags};

/// Lowers the proxy's descriptor limit to `n` (soft and hard).
fn lower_nofile(p: &Proxy, n: u64) {
    let limit = rustix::process::Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    rustix::process::prlimit(
        Some(rustix::process::Pid::from_child(&p.child)),
        rustix::process::Resource::Nofile,
        limit,
    )
    .expect("lower the proxy's RLIMIT_NOFILE");
}

fn open_dir(p: &Path) -> OwnedFd {
    rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).expect("open dir")
}

/// Makes a chain of `depth` directories named `name` under `top` (by descriptor: the
/// path is far longer than `PATH_MAX`) and writes `file` with `data` at the bottom.
fn chain(top: &Path, name: &str, depth: usize, file: &str, data: &[u8]) {
    let mut cur = open_dir(top);
    for _ in 0..depth {
        rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)).expect("mkdir");
        cur = rustix::fs::openat(
            &cur,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .expect("open level");
    }
    let f = rustix::fs::openat(
        &cur,
        file,
        OFlags::WRONLY | OFlags::CREATE,
        Mode::from_raw_mode(0o644),
    )
    .expect("bottom file");
    std::fs::File::from(f).write_all(data).expect("write");
}

/// Removes everything under `top` without recursion (a deep tree overflows the
/// stack of `std::fs::remove_dir_all`, which the temporary directory's drop uses):
/// down to a leaf, remove its entries, back up by `..`, repeat.
fn flatten_remove(top: &Path) {
    let top_fd = open_dir(top);
    let mut cur = rustix::fs::openat(
        &top_fd,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .expect("top");
    let mut depth = 0usize;
    loop {
        let mut sub = None;
        for e in rustix::fs::Dir::read_from(&cur).expect("read").flatten() {
            let name = e.file_name().to_owned();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            if e.file_type() == rustix::fs::FileType::Directory {
                sub = Some(name);
                break;
            }
            rustix::fs::unlinkat(&cur, name.as_c_str(), rustix::fs::AtFlags::empty())
                .expect("unlink");
        }
        if let Some(name) = sub {
            cur = rustix::fs::openat(
                &cur,
                name.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .expect("down");
            depth += 1;
            continue;
        }
        if depth == 0 {
            return;
        }
        let up = rustix::fs::openat(
            &cur,
            "..",
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .expect("up");
        // Find this directory's name in its parent by identity.
        let me = rustix::fs::fstat(&cur).expect("stat");
        let name = rustix::fs::Dir::read_from(&up)
            .expect("read")
            .flatten()
            .find(|e| {
                e.ino() == me.st_ino as u64
                    && e.file_name().to_bytes() != b"."
                    && e.file_name().to_bytes() != b".."
            })
            .map(|e| e.file_name().to_owned())
            .expect("own name");
        rustix::fs::unlinkat(&up, name.as_c_str(), rustix::fs::AtFlags::REMOVEDIR).expect("rmdir");
        cur = up;
        depth -= 1;
    }
}

/// Empties the proxy's volume without recursion when dropped (before the proxy's
/// temporary directory).
struct Flatten(std::path::PathBuf);

impl Drop for Flatten {
    fn drop(&mut self) {
        flatten_remove(&self.0);
    }
}

/// Whether the proxy still answers.
fn alive(p: &Proxy) -> bool {
    appproxy_test_support::http::request_within(
        p.manager,
        "GET",
        "/status",
        &[],
        b"",
        Duration::from_secs(10),
    )
    .is_some_and(|r| r.status == 200)
}

/// Python's zipfile: checks every CRC and prints the names, one a line.
fn zip_names(zip: &[u8], dir: &Path) -> Result<Vec<String>, String> {
    let path = dir.join("attack.zip");
    std::fs::write(&path, zip).expect("zip");
    let out = storage_common::python(
        "import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nfor n in z.namelist(): print(repr(n))",
        &path,
    )?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// A FIFO put in place of an upload's staging file (the session ID is in the token
/// the user holds) must not park the PATCH forever on `open` of the FIFO: the PATCH
/// is answered, and the session is not left locked as "in progress".
#[test]
fn a_fifo_in_place_of_the_staging_file_never_blocks_a_patch() {
    let p = Proxy::start("");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "f.bin", "size": 4}),
    );
    let staging = p.vfolder_path().join(".upload");
    let session = std::fs::read_dir(&staging)
        .expect("staging")
        .flatten()
        .map(|e| e.file_name())
        .next()
        .expect("a staging file");
    let dir = open_dir(&staging);
    rustix::fs::unlinkat(&dir, session.as_os_str(), rustix::fs::AtFlags::empty()).expect("rm");
    rustix::fs::mknodat(
        &dir,
        session.as_os_str(),
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .expect("mkfifo");
    for _ in 0..2 {
        // Answered within 20 s, not parked on the FIFO.
        let r = p.tus_patch(&token, "0", b"data");
        assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = p.tus_head(&token);
    assert_eq!(r.status, 404);
    // A socket file in its place is refused the same way.
    rustix::fs::unlinkat(&dir, session.as_os_str(), rustix::fs::AtFlags::empty()).expect("rm");
    // (Bound at a short path and moved in: a socket's path is limited to 108 bytes.)
    let short = p.dir.path().join("s");
    let sock = std::os::unix::net::UnixListener::bind(&short).expect("socket");
    std::fs::rename(&short, staging.join(&session)).expect("move the socket in");
    let r = p.tus_patch(&token, "0", b"data");
    assert_eq!(r.status, 404);
    drop(sock);
    assert!(alive(&p));
}

/// FIFOs and sockets elsewhere in the vfolder: a download, a fetch and an archive
/// answer at once (404 or left out), never wait for a writer.
#[test]
fn fifos_and_sockets_in_the_vfolder_never_block_reads() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("d")).expect("d");
    std::fs::write(vf.join("d/plain.txt"), "plain").expect("plain");
    let dir = open_dir(&vf.join("d"));
    rustix::fs::mknodat(
        &dir,
        "pipe",
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .expect("mkfifo");
    let _sock = std::os::unix::net::UnixListener::bind(vf.join("d/sock")).expect("socket");
    for name in ["d/pipe", "d/sock"] {
        let token = p.token(
            "/folder/file/download",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": name}),
        );
        let r = p.client_get(&format!("/download?token={token}"), Duration::from_secs(20));
        assert_eq!(r.status, 404, "{name}");
        assert_eq!(r.json()["code"], "file-not-found");
        let body = serde_json::json!({"volume": "local", "vfid": VFID, "relpath": name});
        let r = appproxy_test_support::http::request_within(
            p.manager,
            "POST",
            "/folder/file/fetch",
            &[
                ("X-BackendAI-Storage-Auth-Token", storage_common::TOKEN),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
            Duration::from_secs(20),
        )
        .expect("answered");
        assert_eq!(r.status, 404, "{name}");
    }
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "d"}),
    );
    let r = p.client_get(
        &format!("/download?token={token}&archive=true"),
        Duration::from_secs(20),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'plain.txt'"]
    );
}

/// A tree almost as deep as a walk goes (4,000 levels; `fsx::WALK_LEVELS` is
/// 4,096 below the walk's top, and a quota scope's walk starts 3 levels above the
/// vfolder: deeper than a path can name, than the descriptor limit; a user can make
/// one from a shell, one `mkdir` and `cd` at a time): usage, the quota check, clone
/// and a recursive delete walk it all, count the file at the bottom, and the
/// process survives. A chain deeper than a walk goes (a walk holds some 350 bytes a level: 100,000 levels
/// were 30 MB a walk, times every walk at once) is refused cleanly, naming the
/// limit: usage and the quota admission answer 503 `usage-unmeasured` (never an
/// upload admitted on a count of the levels above), a clone is refused, an archive
/// cut off; a recursive delete removes it. Before, every walk went down the whole
/// chain.
#[test]
fn a_tree_4000_deep_is_measured_cloned_and_deleted_a_deeper_one_refused() {
    // The kernel's work per level grows with the depth: on a loaded machine each
    // walk of this tree takes up to a minute in a debug build.
    const DEEP_WAIT: Duration = Duration::from_secs(300);
    let p = Proxy::start("");
    create_folder(&p);
    let _flatten = Flatten(p.dir.path().join("vol"));
    let vf = p.vfolder_path();
    chain(&vf, "d", 4_000, "bottom.bin", &[7u8; 1000]);
    let r = p.manager_within(
        "/folder/usage",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        DEEP_WAIT,
    );
    assert!(
        alive(&p),
        "the proxy died measuring a deep tree: {}",
        p.log()
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["used_bytes"], 1000, "the bottom file is counted");
    // The quota check walks the scope: the bottom file's bytes count there too.
    let r = p.manager_within(
        "/quota-scope",
        serde_json::json!({"volume": "local", "qsid": "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", "options": {"limit_bytes": 1500}}),
        DEEP_WAIT,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["used_bytes"], 1000);
    let r = p.manager_within(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "x.bin", "size": 600}),
        DEEP_WAIT,
    );
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let r = p.manager_within(
        "/quota-scope",
        serde_json::json!({"volume": "local", "qsid": "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", "options": {"limit_bytes": 100_000}}),
        DEEP_WAIT,
    );
    assert_eq!(r.status, 200);
    // A clone copies it all.
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000c10e";
    let r = p.manager_within(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        DEEP_WAIT,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let deadline = std::time::Instant::now() + DEEP_WAIT;
    loop {
        assert!(alive(&p), "the proxy died cloning a deep tree: {}", p.log());
        let done = p
            .log_json()
            .iter()
            .any(|v| v["message"] == "bgtask done" || v["message"] == "bgtask failed");
        if done {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "clone never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = p.manager_within(
        "/folder/usage",
        serde_json::json!({"volume": "local", "vfid": dst}),
        DEEP_WAIT,
    );
    assert_eq!(r.json()["used_bytes"], 1000, "{}", p.log());
    // A recursive delete removes it all.
    let r = p.manager_within(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["d"], "recursive": true}),
        DEEP_WAIT,
    );
    assert!(
        alive(&p),
        "the proxy died deleting a deep tree: {}",
        p.log()
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!vf.join("d").exists());
    // One level deeper than a walk goes.
    chain(&vf, "e", 4_097, "bottom.bin", &[7u8; 1000]);
    let unmeasured = |r: &appproxy_test_support::http::Resp| {
        r.status == 503
            && r.json()["code"] == "usage-unmeasured"
            && String::from_utf8_lossy(&r.body).contains("4096 directory levels")
    };
    // A limit on the scope, so that an upload needs a measurement.
    let r = p.manager_within(
        "/quota-scope",
        serde_json::json!({"volume": "local", "qsid": "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", "options": {"limit_bytes": 1500}}),
        DEEP_WAIT,
    );
    assert!(
        r.status == 200 || unmeasured(&r),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000c10f";
    for (path, body) in [
        (
            "/folder/usage",
            serde_json::json!({"volume": "local", "vfid": VFID}),
        ),
        (
            "/folder/file/upload",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "x.bin", "size": 600}),
        ),
        (
            "/folder/clone",
            serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        ),
    ] {
        let r = p.manager_within(path, body, DEEP_WAIT);
        assert!(
            unmeasured(&r),
            "{path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
    );
    let (whole, _) = get_raw(&p, &format!("/download?token={token}&archive=true"));
    assert!(
        !whole,
        "no whole-looking archive without the bottom of the chain"
    );
    assert!(
        p.log_json()
            .iter()
            .any(|l| l["message"] == "archive stream failed"
                && l.to_string().contains("4096 directory levels")),
        "{}",
        p.log()
    );
    assert!(alive(&p), "{}", p.log());
    let r = p.manager_within(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["e"], "recursive": true}),
        DEEP_WAIT,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!vf.join("e").exists());
}

/// A directory with more subdirectories than the process may hold descriptors: the
/// archive holds every one of them (none silently left out), and the walk never
/// holds a descriptor per pending subdirectory.
#[test]
fn an_archive_of_a_directory_wider_than_the_descriptor_limit_is_complete() {
    let p = Proxy::start("");
    create_folder(&p);
    // The proxy's descriptor limit lowered to 1024, so that a tree wider than it
    // stays small.
    lower_nofile(&p, 1024);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("wide")).expect("wide");
    let dir = open_dir(&vf.join("wide"));
    let n = 1500;
    for i in 0..n {
        rustix::fs::mkdirat(&dir, format!("{i:05}"), Mode::from_raw_mode(0o755)).expect("mkdir");
    }
    let sub = rustix::fs::openat(
        &dir,
        "01499",
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .expect("last");
    let f = rustix::fs::openat(
        &sub,
        "last.txt",
        OFlags::WRONLY | OFlags::CREATE,
        Mode::from_raw_mode(0o644),
    )
    .expect("file");
    std::fs::File::from(f).write_all(b"last").expect("write");
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "wide"}),
    );
    let r = p.client_get(
        &format!("/download?token={token}&archive=true"),
        Duration::from_secs(120),
    );
    assert_eq!(r.status, 200);
    let names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    assert_eq!(names.len(), n, "every subdirectory is in the archive");
    assert!(names.contains(&"'01499/last.txt'".to_owned()));
    assert!(names.contains(&"'00000/'".to_owned()));
}

/// Entry names longer than a zip header's 16-bit length field (a deep tree of long
/// names) are left out, never written with a truncated length that would make the
/// rest of the name read as archive structure; the archive stays valid.
#[test]
fn archive_names_longer_than_a_zip_header_can_say_are_left_out() {
    let p = Proxy::start("");
    create_folder(&p);
    let _flatten = Flatten(p.dir.path().join("vol"));
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("t")).expect("t");
    std::fs::write(vf.join("t/short.txt"), "short").expect("short");
    let long = "L".repeat(250);
    // 270 levels of 251 bytes: about 67 800 bytes of name at the bottom.
    chain(&vf.join("t"), &long, 270, "deep.txt", b"deep");
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "t"}),
    );
    let r = p.client_get(
        &format!("/download?token={token}&archive=true"),
        Duration::from_secs(60),
    );
    assert_eq!(r.status, 200);
    let names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    assert!(names.contains(&"'short.txt'".to_owned()), "{names:?}");
    assert!(
        names.iter().all(|n| n.len() <= 65_535 + 2),
        "no name past the header's limit"
    );
    assert!(
        names.iter().all(|n| n
            .trim_matches('\'')
            .split('/')
            .all(|c| c.is_empty() || c == "short.txt" || c == long || c == "deep.txt")),
        "every name is made of real components only"
    );
}

/// A client that starts an archive download and stops reading: the archive's writer
/// (a blocking thread; a few hundred such clients would take every one of them)
/// waits `stall_timeout_secs` at most, then the response is cut off, never finished
/// later as if nothing happened. A client that reads is served the whole archive.
#[test]
fn an_archive_whose_client_stops_reading_is_cut_off() {
    let p = Proxy::start("stall_timeout_secs = 1\n");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("big")).expect("big");
    // 48 MiB of incompressible bytes (stored, not deflated): far more than the
    // socket buffers and the body channel hold.
    let noise = incompressible(48 << 20);
    std::fs::write(vf.join("big/noise.bin"), &noise).expect("noise");
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "big"}),
    );
    let path = format!("/download?token={token}&archive=true");
    let mut s = TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    // Not reading: the writer fills every buffer and waits, until it gives up.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.log().contains("the client took no bytes") {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer waits for ever: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(raw.starts_with(b"HTTP/1.1 200"));
    assert!(
        !raw.ends_with(b"\r\n0\r\n\r\n"),
        "the cut-off archive never ends like a whole one"
    );
    assert!(raw.len() < noise.len(), "{} bytes", raw.len());
    // A reading client gets it all.
    let r = p.client_get(&path, Duration::from_secs(60));
    assert_eq!(r.status, 200);
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'noise.bin'"]
    );
}

/// Special files a user makes in a vfolder (a FIFO; a device node, which a container
/// with `CAP_MKNOD` can make on a volume mounted without `nodev`) are never opened:
/// opening some devices acts (a watchdog arms, a terminal becomes the controlling
/// one), whatever the proxy does with the descriptor afterwards. Inotify reports
/// every open of them; the regular file beside them shows that the watch works.
#[test]
fn special_files_in_a_vfolder_are_never_opened() {
    use rustix::fs::inotify;
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("s")).expect("s");
    std::fs::write(vf.join("s/plain.txt"), "plain").expect("plain");
    let dir = open_dir(&vf.join("s"));
    rustix::fs::mknodat(
        &dir,
        "pipe",
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .expect("mkfifo");
    // The null device's numbers (harmless to open), where this test may make nodes.
    let device = rustix::fs::mknodat(
        &dir,
        "null",
        rustix::fs::FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .is_ok();
    std::os::unix::fs::symlink("s/pipe", vf.join("link")).expect("inner link");
    let watch = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
        .expect("inotify");
    inotify::add_watch(&watch, vf.join("s"), inotify::WatchFlags::OPEN).expect("watch");
    let mut specials = vec!["s/pipe", "link"];
    if device {
        specials.push("s/null");
    }
    for name in &specials {
        let r = p.download(name, "", &[]);
        assert_eq!(
            r.status,
            404,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let r = p.manager(
            "/folder/file/fetch",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": name}),
            None,
        );
        assert_eq!(r.status, 404, "{name}");
    }
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": specials}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 404);
    let r = p.download("s", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'plain.txt'"]
    );
    // An upload's staging file replaced by the device node is not opened either.
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "up.bin", "size": 4}),
    );
    let staging = vf.join(".upload");
    let session = std::fs::read_dir(&staging)
        .expect("staging")
        .flatten()
        .map(|e| e.file_name())
        .next()
        .expect("a staging file");
    if device {
        let sdir = open_dir(&staging);
        rustix::fs::unlinkat(&sdir, session.as_os_str(), rustix::fs::AtFlags::empty()).expect("rm");
        rustix::fs::mknodat(
            &sdir,
            session.as_os_str(),
            rustix::fs::FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .expect("device node");
        inotify::add_watch(&watch, &staging, inotify::WatchFlags::OPEN).expect("watch");
        let r = p.tus_patch(&token, "0", b"data");
        assert_eq!(r.status, 404);
    }
    let session = session.to_string_lossy().into_owned();
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut events = inotify::Reader::new(&watch, &mut buf);
    let mut opened = Vec::new();
    while let Ok(e) = events.next() {
        if let Some(name) = e.file_name() {
            opened.push(name.to_string_lossy().into_owned());
        }
    }
    assert!(opened.iter().any(|n| n == "plain.txt"), "{opened:?}");
    assert!(
        !opened
            .iter()
            .any(|n| n == "pipe" || n == "null" || *n == session),
        "a special file was opened: {opened:?} (device node made: {device})"
    );
}

/// A recursive delete of a tree deeper than the levels a walk keeps descriptors of
/// climbs back by `..`; a user moving the deep part of the tree up to the vfolder's
/// top while the delete runs must not lead it up and out. Every level of the tree
/// holds a `zz-keep.txt` (listed after `d`, so still to delete when the walk comes
/// back up), and so do the vfolder's top and the directory above the vfolder, each
/// beside an empty `d`: a walk that climbed into the wrong directory would delete
/// those.
#[test]
fn a_deep_delete_never_climbs_out_of_a_tree_moved_under_it() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    let above = vf.parent().expect("above the vfolder").to_path_buf();
    for d in [&vf, &above] {
        std::fs::write(d.join("zz-keep.txt"), "keep").expect("keep");
    }
    let mut outcomes = std::collections::BTreeMap::<u16, usize>::new();
    for round in 0..10 {
        for d in [&vf, &above] {
            let _ = std::fs::create_dir(d.join("d"));
        }
        let tree = vf.join("t");
        let mut cur = tree.clone();
        for _ in 0..200 {
            std::fs::create_dir_all(&cur).expect("level");
            std::fs::write(cur.join("zz-keep.txt"), "x").expect("file");
            cur = cur.join("d");
        }
        // The walk deletes the bottom level's file first: once it is gone, the
        // walk is on its way back up, and the tree is cut at level 36 and its
        // lower part moved to the vfolder's top.
        let bottom = cur.parent().expect("bottom level").join("zz-keep.txt");
        let mover = {
            let from = tree.join(std::iter::repeat_n("d", 36).collect::<std::path::PathBuf>());
            let to = vf.join("moved");
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while bottom.exists() && std::time::Instant::now() < deadline {}
                std::fs::rename(&from, &to).is_ok()
            })
        };
        let r = p.manager(
            "/folder/file/delete",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["t"], "recursive": true}),
            None,
        );
        let moved = mover.join().expect("mover");
        *outcomes
            .entry(r.status + u16::from(moved) * 1000)
            .or_default() += 1;
        assert!(
            [200, 400, 404].contains(&r.status),
            "round {round}: {}",
            r.status
        );
        for d in [&vf, &above] {
            assert!(
                d.join("zz-keep.txt").exists() && d.join("d").exists(),
                "round {round}: an entry of {} deleted",
                d.display()
            );
        }
        let _ = std::fs::remove_dir_all(vf.join("t"));
        let _ = std::fs::remove_dir_all(vf.join("moved"));
    }
    // (Answers, plus 1000 when the tree was cut while the delete ran.)
    eprintln!("delete answers under the mover: {outcomes:?}");
}

/// A client with a valid token and hostile headers: a file name made to break out of
/// `Content-Disposition`, ranges that overflow, are negative, reversed or many, tus
/// offsets that are negative, overflow or disagree, a body past the declared size,
/// a PATCH after completion, a token of another kind. Every answer is a clean status
/// and no header is injected.
#[test]
fn hostile_headers_get_clean_answers() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    let name = "a\"b\r\nX-Injected: 1;\\.txt";
    std::fs::write(vf.join(name), b"0123456789").expect("file");
    let r = p.download(name, "", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"0123456789");
    assert!(r.header("x-injected").is_none());
    let cd = r.header("content-disposition").expect("disposition");
    assert!(
        cd.starts_with("attachment;filename=\"a_b__X-Injected:_1;_.txt\"; filename*=UTF-8''a%22b%0D%0AX-Injected%3A%201%3B%5C.txt"),
        "{cd}"
    );
    for (range, status, body) in [
        ("bytes=2-4", 206, &b"234"[..]),
        ("bytes=-3", 206, b"789"),
        ("bytes=8-18446744073709551615", 206, b"89"),
        ("bytes=-18446744073709551615", 206, b"0123456789"),
        ("bytes=0-0,2-2,4-4", 200, b"0123456789"),
        ("bytes=18446744073709551615-", 416, b""),
        // Past u64 too, a last-byte-pos is the end (RFC 9110 §14.1.2).
        ("bytes=0-18446744073709551616", 206, b"0123456789"),
        ("bytes=5-2", 416, b""),
        ("bytes=--1", 416, b""),
        ("bytes=-0", 416, b""),
    ] {
        let r = p.download(name, "", &[("Range", range)]);
        assert_eq!(r.status, status, "{range}");
        if status == 416 {
            assert_eq!(r.header("content-range"), Some("bytes */10"), "{range}");
        } else {
            assert_eq!(r.body, body, "{range}");
        }
    }
    let many = format!("bytes={}", vec!["0-0"; 1000].join(","));
    let r = p.download(name, "", &[("Range", &many)]);
    assert_eq!((r.status, r.body.len()), (200, 10));
    // tus.
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "up.bin", "size": 8}),
    );
    let patch = |offset: &str, body: &[u8]| p.tus_patch(&token, offset, body);
    assert_eq!(patch("-1", b"abcd").status, 400);
    // tus: a non-negative integer, digits only (Rust's parse took a sign).
    assert_eq!(patch("+0", b"abcd").status, 400);
    assert_eq!(patch("0x0", b"abcd").status, 400);
    assert_eq!(patch("", b"abcd").status, 400);
    assert_eq!(patch("18446744073709551615", b"abcd").status, 409);
    assert_eq!(patch("18446744073709551616", b"abcd").status, 400);
    assert_eq!(patch("4", b"abcd").status, 409);
    // Past the declared size: refused, nothing past it staged.
    assert_eq!(patch("0", b"0123456789").status, 413);
    assert!(!vf.join("up.bin").exists());
    let staged: u64 = std::fs::read_dir(vf.join(".upload"))
        .expect("staging")
        .flatten()
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum();
    assert!(staged <= 8, "{staged}");
    let offset = staged.to_string();
    let rest = &b"01234567"[staged as usize..];
    let r = patch(&offset, rest);
    assert_eq!(r.status, 204);
    assert_eq!(r.header("upload-offset"), Some("8"));
    assert_eq!(std::fs::read(vf.join("up.bin")).expect("done").len(), 8);
    // After completion the session takes nothing more: a PATCH at its end is
    // answered as the last one was, any other offset 409.
    assert_eq!(patch("8", b"").status, 204);
    assert_eq!(patch("0", b"x").status, 409);
    // A download token is not an upload token, and the reverse.
    let dl = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "up.bin"}),
    );
    let r = appproxy_test_support::http::request_within(
        p.client,
        "PATCH",
        &format!("/upload?token={dl}"),
        &[("Upload-Offset", "0")],
        b"x",
        Duration::from_secs(20),
    )
    .expect("answered");
    assert_eq!(r.status, 401);
    let r = p.client_get(&format!("/download?token={token}"), Duration::from_secs(20));
    assert_eq!(r.status, 401);
}

/// An archive of more listed files than the process may hold descriptors (a token
/// may list 10 000; the proxy's limit is lowered to 256 here): every file is in the
/// archive, opened one at a time as its turn comes, not all held open at once.
#[test]
fn an_archive_of_more_listed_files_than_descriptors_is_complete() {
    let p = Proxy::start("");
    create_folder(&p);
    lower_nofile(&p, 256);
    let vf = p.vfolder_path();
    let files: Vec<String> = (0..600).map(|i| format!("f{i:03}.txt")).collect();
    for f in &files {
        std::fs::write(vf.join(f), f).expect("file");
    }
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": files}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    assert_eq!(names.len(), 600);
    assert_eq!(names[599], "'f599.txt'");
    // A listed file that is missing is still a 404 before anything is streamed.
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["f000.txt", "nope.txt"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 404);
}

/// A listed file removed after the archive's answer began, before its turn, is left
/// out: the archive still ends whole (before, it was cut at that entry).
#[test]
fn a_listed_file_removed_before_its_turn_is_left_out() {
    use std::io::{Read as _, Write as _};
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    // 16 MiB that do not compress (stored): far more than the socket buffers hold
    // while the client does not read.
    let big = incompressible(16 << 20);
    std::fs::write(vf.join("big.bin"), &big).expect("big");
    std::fs::write(vf.join("small.txt"), b"small").expect("small");
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["big.bin", "small.txt"]}),
    );
    let mut s = TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "GET /download-archive?token={token} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = vec![0u8; 4096];
    s.read_exact(&mut raw).expect("the archive starts");
    std::fs::remove_file(vf.join("small.txt")).expect("remove");
    s.read_to_end(&mut raw).expect("the rest");
    let r = appproxy_test_support::http::parse(&raw, false);
    assert_eq!(r.status, 200);
    let names = zip_names(&r.body, p.dir.path()).expect("a whole, valid zip");
    assert_eq!(names, vec!["'big.bin'".to_owned()]);
}

/// A tus PATCH whose body stops coming (a client gone quiet, a half-open
/// connection) ends after `stall_timeout_secs` with 408, keeping what arrived, and
/// releases the session: the upload resumes from HEAD's offset instead of getting
/// 409 for as long as the dead connection stays open.
#[test]
fn a_stalled_patch_body_never_keeps_the_session_locked() {
    let p = Proxy::start("stall_timeout_secs = 1\n");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "s.bin", "size": 8}),
    );
    let mut quiet = TcpStream::connect(p.client).expect("connect");
    quiet
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        quiet,
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: test\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nContent-Length: 8\r\n\r\n0123"
    )
    .expect("send");
    // Half the body, then nothing: the answer comes without the rest.
    let mut raw = Vec::new();
    let _ = quiet.read_to_end(&mut raw);
    let r = appproxy_test_support::http::parse(&raw, false);
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "request-timeout");
    assert_eq!(
        r.json()["type"],
        "https://api.backend.ai/probs/storage/request-timeout"
    );
    assert_eq!(
        r.json()["title"],
        "no byte of the body came for 1 s: what arrived is kept, resume from HEAD's offset"
    );
    let head = p.tus_head(&token);
    assert_eq!(head.header("upload-offset"), Some("4"));
    let r = p.tus_patch(&token, "4", b"4567");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("s.bin")).expect("complete"),
        b"01234567"
    );
}

/// A tus PATCH whose body trickles (a byte every 300 ms, never long enough apart
/// for the stall timeout) is cut when it falls below `min_body_rate` (1,000 B/s
/// here, with the stall timeout's 2 s of waiting banked), keeping what arrived.
/// Before, only the stall timeout bounded a PATCH: a byte every 59 s held the
/// session, and its whole quota reservation, for as long as the client liked.
#[test]
fn a_trickling_patch_body_is_cut_at_the_rate_floor() {
    let p = Proxy::start("stall_timeout_secs = 2\nmin_body_rate = 1000\n");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "t.bin", "size": 100}),
    );
    let (r, sent) = p.trickled_patch(&token, 100, Duration::from_millis(300));
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "request-timeout");
    assert_eq!(
        r.json()["title"],
        "the body came slower than 1000 bytes/s: what arrived is kept, resume from HEAD's offset"
    );
    assert!(sent < 100, "cut before the whole body came: {sent}");
    // Every byte sent before the answer was written, and the upload resumes.
    let head = p.tus_head(&token);
    assert_eq!(
        head.header("upload-offset"),
        Some(sent.to_string().as_str())
    );
    let r = p.tus_patch(&token, &sent.to_string(), &vec![b't'; 100 - sent]);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("t.bin")).expect("complete"),
        vec![b't'; 100]
    );
    p.log_holding("the body came slower than 1000 bytes/s");
}

/// Slow and silent clients on both APIs: a request head that never completes, a
/// keep-alive connection that sends nothing more, a file download whose client
/// stops reading. Each connection is closed after `header_read_timeout_secs` or
/// `idle_timeout_secs` instead of being held for ever.
#[test]
fn slow_and_silent_connections_are_closed() {
    let p = Proxy::start("header_read_timeout_secs = 1\nidle_timeout_secs = 2\n");
    create_folder(&p);
    // Ends within 30 s (the test's bound; the server's are 1 and 2 s): true when
    // the server closed the connection.
    let closed = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read_uninterrupted(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    };
    for addr in [p.manager, p.client] {
        let mut head = TcpStream::connect(addr).expect("connect");
        head.write_all(b"GET /status HTTP/1.1\r\nHost: test\r\n")
            .expect("half a head");
        assert!(closed(&mut head), "{addr}: an unfinished head is cut off");
        let mut idle = TcpStream::connect(addr).expect("connect");
        idle.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .expect("request");
        assert!(
            closed(&mut idle),
            "{addr}: an idle keep-alive connection is closed"
        );
    }
    // A download whose client stops reading (the file is far larger than the
    // socket buffers): closed once no byte has moved for the idle timeout.
    let vf = p.vfolder_path();
    let f = std::fs::File::create(vf.join("big.bin")).expect("big");
    f.set_len(256 << 20).expect("sparse 256 MiB");
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "big.bin"}),
    );
    let mut s = TcpStream::connect(p.client).expect("connect");
    write!(
        s,
        "GET /download?token={token} HTTP/1.1\r\nHost: test\r\n\r\n"
    )
    .expect("send");
    let mut first = [0u8; 1024];
    s.read_exact(&mut first).expect("the download starts");
    // Not reading for a while: the server stops being able to write, then closes.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let log_says = || p.log().contains("idle connection closed");
    while !log_says() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled download is held: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.len() < 256 << 20, "cut off, not served whole");
}

/// A vfolder user names files with backslashes (legal on Linux): `..\..\x.bat`
/// inside a directory `a\b`. Windows extractors take a backslash in an entry name
/// as a path separator, so a project member who downloaded the folder on Windows
/// would have written `x.bat` outside the directory they extracted to. Entry names
/// carry `_` for a backslash, in walked directories and in listed paths alike; a
/// name that is not UTF-8 is written with U+FFFD, as the UTF-8 flag promises.
#[test]
fn archive_entry_names_never_carry_a_backslash() {
    use std::os::unix::ffi::OsStrExt as _;
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir_all(vf.join("w").join("a\\b")).expect("dirs");
    std::fs::write(vf.join("w").join("a\\b").join("..\\..\\x.bat"), b"evil").expect("file");
    std::fs::write(
        vf.join("w")
            .join(std::ffi::OsStr::from_bytes(b"bad\xffname")),
        b"x",
    )
    .expect("file");
    // The directory walked (a directory with entries has none of its own).
    let r = p.download("w", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    let mut names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    names.sort();
    assert_eq!(names, ["'a_b/.._.._x.bat'", "'bad\u{fffd}name'"]);
    // Paths listed in a token.
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["w/a\\b"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200);
    let names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    assert_eq!(names, ["'w/a_b/.._.._x.bat'"], "{names:?}");
    assert!(p.log().contains("archive entry name had a backslash"));
}

/// Python's zipfile reads every entry (checking its CRC and that its local header
/// carries the name the central directory does): `{name: content}`, after checking
/// that no two entries share a name and no file's name is also a directory's.
fn zip_contents(zip: &[u8], dir: &Path) -> std::collections::BTreeMap<String, String> {
    let path = dir.join("names.zip");
    std::fs::write(&path, zip).expect("zip");
    let script = concat!(
        "import sys,zipfile,json\n",
        "z=zipfile.ZipFile(sys.argv[1])\n",
        "names=z.namelist()\n",
        "assert len(set(names))==len(names), names\n",
        "files=[n for n in names if not n.endswith('/')]\n",
        "assert not [f for f in files for n in names if n.startswith(f+'/')], names\n",
        "print(json.dumps({n: z.read(n).decode('utf-8') for n in files}))",
    );
    let out = storage_common::python(script, &path).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).expect("names and contents")
}

/// Entry names safe and unique on every common platform: `:` (a drive letter, an
/// NTFS stream) and control characters become `_` as a backslash does; names that
/// collide once made safe (or invalid UTF-8 names made U+FFFD) are numbered, the
/// name that needed no change keeping it, so no extractor overwrites one file with
/// another or meets a file where a directory goes; unicode and spaces stay.
#[test]
fn archive_entry_names_are_safe_and_unique_on_every_platform() {
    use std::os::unix::ffi::OsStrExt as _;
    let p = Proxy::start("");
    create_folder(&p);
    let w = p.vfolder_path().join("w");
    std::fs::create_dir_all(w.join("C:")).expect("dir");
    std::fs::create_dir_all(w.join("d\\x")).expect("dir");
    for (name, content) in [
        (&b"a\\b.txt"[..], "backslash"),
        (b"a_b.txt", "plain"),
        (b"C:/x.txt", "drive"),
        (b"time 12:30.log", "colon"),
        (b"line\nbreak.txt", "newline"),
        (b"esc\x1b[31m.txt", "escape"),
        ("c1\u{85}.txt".as_bytes(), "c1"),
        ("ünï cøde file.txt".as_bytes(), "unicode"),
        (b"d_x", "file"),
        (b"d\\x/f", "in the directory"),
        (b"bad\xfename", "fe"),
        (b"bad\xffname", "ff"),
    ] {
        std::fs::write(w.join(std::ffi::OsStr::from_bytes(name)), content).expect("file");
    }
    let r = p.download("w", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    let got = zip_contents(&r.body, p.dir.path());
    let want: std::collections::BTreeMap<String, String> = [
        ("a_b.txt", "plain"),
        ("a_b (1).txt", "backslash"),
        ("C_/x.txt", "drive"),
        ("time 12_30.log", "colon"),
        ("line_break.txt", "newline"),
        ("esc_[31m.txt", "escape"),
        ("c1_.txt", "c1"),
        ("ünï cøde file.txt", "unicode"),
        ("d_x", "file"),
        ("d_x (1)/f", "in the directory"),
        ("bad\u{fffd}name", "fe"),
        ("bad\u{fffd}name (1)", "ff"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(got, want);
    // Paths listed in a token: the first keeps its name, a path colliding once made
    // safe is numbered, a path listed again is archived once, a parent met again
    // is merged.
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["w/a_b.txt", "w/a\\b.txt", "w/a_b.txt", "w/C:"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200);
    let got = zip_contents(&r.body, p.dir.path());
    let want: std::collections::BTreeMap<String, String> = [
        ("w/a_b.txt", "plain"),
        ("w/a_b (1).txt", "backslash"),
        ("w/C_/x.txt", "drive"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(got, want);
    assert!(p.log().contains("already given to another entry"));
}

/// An empty directory met more than once in one archive (listed twice, listed and
/// under a listed parent, under a parent listed twice) is one directory entry: a
/// path listed again or inside another listed path is archived by that one alone,
/// and a directory met again is merged. Two entries of one name make an extractor
/// overwrite, ask or fail, and a reader that checks names refuses the archive.
#[test]
fn an_empty_directory_met_twice_is_one_entry() {
    let p = Proxy::start("");
    create_folder(&p);
    let w = p.vfolder_path().join("w");
    std::fs::create_dir_all(w.join("e")).expect("dir");
    std::fs::create_dir_all(w.join("f/empty")).expect("dir");
    std::fs::write(w.join("f/x.txt"), "x").expect("file");
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["w/e", "w/e/", "w", "w/f/empty", "w"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    names.sort();
    assert_eq!(
        names,
        ["'w/e/'", "'w/f/empty/'", "'w/f/x.txt'"],
        "one entry a name"
    );
}

/// A name made safe (bytes that are not UTF-8 become U+FFFD, three bytes each) or
/// numbered (` (1)`) can grow past the 255 bytes a file name may have on the
/// common file systems, and an entry with such a name cannot be extracted
/// anywhere (Python's `extractall` stops there, the rest of the archive with it):
/// each part of an entry name is cut to 255 bytes (at a character), numbered names
/// included, and every entry extracts.
#[test]
fn archive_entry_names_made_safe_or_numbered_stay_extractable() {
    use std::os::unix::ffi::OsStrExt as _;
    let p = Proxy::start("");
    create_folder(&p);
    let w = p.vfolder_path().join("w");
    std::fs::create_dir_all(&w).expect("w");
    let l254 = "L".repeat(254);
    let mut names: Vec<Vec<u8>> = vec![
        format!("{l254}_").into_bytes(),
        format!("{l254}:").into_bytes(),
        format!("{l254}\\").into_bytes(),
        vec![0xff; 255],
        vec![0xfe; 255],
        [&b"x"[..], &[0xff; 200], b".txt"].concat(),
        format!("{}.{}", "a".repeat(3), "e".repeat(251)).into_bytes(),
        format!("{}:{}", "a".repeat(3), "e".repeat(251)).into_bytes(),
    ];
    names.push(format!("{}é", "M".repeat(253)).into_bytes());
    names.push([&"M".repeat(253).into_bytes()[..], &[0xc3]].concat());
    for (i, n) in names.iter().enumerate() {
        std::fs::write(w.join(std::ffi::OsStr::from_bytes(n)), format!("{i}")).expect("file");
    }
    std::fs::create_dir(w.join(std::ffi::OsStr::from_bytes(&[0xfd; 255]))).expect("dir");
    std::fs::write(
        w.join(std::ffi::OsStr::from_bytes(&[0xfd; 255])).join("in"),
        "in",
    )
    .expect("file in dir");
    let r = p.download("w", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    let path = p.dir.path().join("long.zip");
    std::fs::write(&path, &r.body).expect("zip");
    let out = storage_common::python(
        concat!(
            "import sys,zipfile,tempfile,os\n",
            "z=zipfile.ZipFile(sys.argv[1])\n",
            "names=z.namelist()\n",
            "assert len(set(names))==len(names), names\n",
            "long=[n for n in names for c in n.split('/') if len(c.encode())>255]\n",
            "assert not long, long\n",
            "d=tempfile.mkdtemp()\n",
            "z.extractall(d)\n",
            "got=sorted(open(os.path.join(dp,f)).read() for dp,_,fs in os.walk(d) for f in fs)\n",
            "print(' '.join(got))",
        ),
        &path,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.trim(), "0 1 2 3 4 5 6 7 8 9 in");
}

/// What a vfolder user's shell does to one name while an archive is made: any kind
/// of entry in its place (a file, a directory with a file, a FIFO, symlinks to the
/// outside secret, its directory and `/`), or none.
fn churn_one(dir: &Path, name: &std::ffi::OsStr, op: u64, out: &Path) {
    let at = dir.join(name);
    match std::fs::symlink_metadata(&at) {
        Ok(m) if m.is_dir() => drop(std::fs::remove_dir_all(&at)),
        Ok(_) => drop(std::fs::remove_file(&at)),
        Err(_) => {}
    }
    match op % 7 {
        0 => {}
        1 => drop(std::fs::write(&at, "inside")),
        2 => {
            if std::fs::create_dir(&at).is_ok() {
                drop(std::fs::write(at.join("f"), "inside"));
            }
        }
        3 => drop(std::os::unix::fs::symlink(out.join("secret.txt"), &at)),
        4 => drop(std::os::unix::fs::symlink(out, &at)),
        5 => drop(std::os::unix::fs::symlink("/", &at)),
        _ => drop(rustix::fs::mknodat(
            rustix::fs::CWD,
            &at,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )),
    }
}

/// Archives of a directory whose entries a shell churns while they are made: in the
/// window between a directory's two readings (its names reserved, then archived)
/// and while big files stream, names that collide once made safe (or with the
/// numbered form of another) appear, vanish and change kind (file, directory,
/// FIFO, symlinks out of the vfolder), and a subtree is swapped for a symlink to
/// the outside directory. Every archive is whole and valid, its names unique (no
/// file where a directory goes), every file in it one the vfolder holds (or held:
/// one caught as it is written is short), and the outside secret never in it.
#[test]
fn an_archive_of_a_churning_directory_is_whole_unique_and_contained() {
    use std::os::unix::ffi::OsStrExt as _;
    const SECRET: &[u8] = b"OUTSIDE-SECRET-never-in-an-archive";
    let p = Proxy::start("");
    create_folder(&p);
    let out = p.dir.path().join("outside");
    std::fs::create_dir_all(&out).expect("outside");
    std::fs::write(out.join("secret.txt"), SECRET).expect("secret");
    let vf = p.vfolder_path();
    let c = vf.join("c");
    std::fs::create_dir_all(c.join("d/e")).expect("tree");
    // Big files first in each directory's order keep the writer busy while the
    // names after them (and the directories below) change.
    let big = incompressible(1 << 20);
    for d in ["c", "c/d", "c/d/e"] {
        std::fs::write(vf.join(d).join("0-big.bin"), &big).expect("big");
    }
    std::os::unix::fs::symlink(&out, c.join("dlink")).expect("link");
    let long = "L".repeat(255);
    let long_colon = format!("{}:", "L".repeat(254));
    let names: Vec<std::ffi::OsString> = [
        &b"x_y"[..],
        b"x:y",
        b"x\\y",
        b"x_y (1)",
        b"x_y (2)",
        b"X_Y",
        b"x\xffy",
        b"x\xfey",
        "x\u{fffd}y".as_bytes(),
        b"..y",
        long.as_bytes(),
        long_colon.as_bytes(),
        "L".repeat(254).as_bytes(),
    ]
    .iter()
    .map(|n| std::ffi::OsStr::from_bytes(n).to_owned())
    .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let script = concat!(
        "import sys,zipfile\n",
        "z=zipfile.ZipFile(sys.argv[1])\n",
        "assert z.testzip() is None\n",
        "names=z.namelist()\n",
        "assert len(set(names))==len(names), names\n",
        "dirs={n[:i] for n in names for i in range(len(n)) if n[i]=='/'}\n",
        "assert not [n for n in names if not n.endswith('/') and n in dirs], names\n",
        "for n in names:\n",
        "    if not n.endswith('/'):\n",
        "        b=z.read(n)\n",
        "        assert b'inside'.startswith(b) or len(b)==1<<20, (n,b[:40])\n",
        "print(len(names))",
    );
    std::thread::scope(|s| {
        let churner = s.spawn(|| {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut n = 0u64;
            // The directories themselves, wherever the swap puts them: never the
            // outside directory through `d` while it is the symlink.
            let held: Vec<OwnedFd> = [c.clone(), c.join("d"), c.join("d/e")]
                .iter()
                .map(|d| open_dir(d))
                .collect();
            let dirs: Vec<std::path::PathBuf> = held
                .iter()
                .map(|fd| format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd)).into())
                .collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let dir = &dirs[(x % 3) as usize];
                let name = &names[((x >> 8) % names.len() as u64) as usize];
                churn_one(dir, name, x >> 24, &out);
                // Now and then the whole subtree `d` trades places with a symlink
                // to the outside directory.
                if (x >> 40) % 16 == 0 {
                    let _ = rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        c.join("d"),
                        rustix::fs::CWD,
                        c.join("dlink"),
                        rustix::fs::RenameFlags::EXCHANGE,
                    );
                }
                n += 1;
            }
            n
        });
        // Stops the churner however the downloads end (a failed assertion too).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let halt = Stop(&stop);
        for i in 0..40 {
            let r = p.download("c", "&archive=true", &[]);
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            assert!(
                !r.body.windows(SECRET.len()).any(|w| w == SECRET),
                "the outside secret is in archive {i}"
            );
            let path = p.dir.path().join("churn.zip");
            std::fs::write(&path, &r.body).expect("zip");
            storage_common::python(script, &path)
                .unwrap_or_else(|e| panic!("archive {i} is not whole and valid: {e}"));
        }
        drop(halt);
        assert!(churner.join().expect("churner") > 0);
    });
    assert!(alive(&p), "{}", p.log());
    let outside: Vec<_> = std::fs::read_dir(&out)
        .expect("outside")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(outside, ["secret.txt"]);
    assert_eq!(
        std::fs::read(out.join("secret.txt")).expect("secret"),
        SECRET
    );
}

/// Sends `GET path` and reads until the response head is in (a few body bytes may
/// come with it), then stops reading: a client slow to take what it asked for.
/// A vfolder with `big/` (32 MiB that does not compress: far more than the socket
/// buffers and the body channel hold, so a writer whose client does not read
/// waits) and `little/a.txt`; the archive download paths of both.
fn big_and_little(p: &Proxy) -> (String, String) {
    create_folder(p);
    let vf = p.vfolder_path();
    std::fs::create_dir_all(vf.join("big")).expect("big");
    std::fs::write(vf.join("big/noise.bin"), incompressible(32 << 20)).expect("noise");
    std::fs::create_dir_all(vf.join("little")).expect("little");
    std::fs::write(vf.join("little/a.txt"), b"a").expect("a");
    let token = |relpath: &str| {
        p.token(
            "/folder/file/download",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath}),
        )
    };
    (
        format!("/download?token={}&archive=true", token("big")),
        format!("/download?token={}&archive=true", token("little")),
    )
}

/// `GET path` from the client API, asked again every `every` while it is answered
/// 503 (no archive slot free yet) until `until`: the last answer.
fn get_until_served(
    p: &Proxy,
    path: &str,
    until: std::time::Instant,
    every: Duration,
) -> appproxy_test_support::http::Resp {
    loop {
        let r = p.client_get(path, Duration::from_secs(20));
        if r.status != 503 || std::time::Instant::now() > until {
            return r;
        }
        std::thread::sleep(every);
    }
}

fn slow_client(p: &Proxy, from: std::net::Ipv4Addr, path: &str) -> (TcpStream, String) {
    let mut s = appproxy_test_support::net::connect_from(from, p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read_uninterrupted(&mut buf).expect("a head");
        assert!(n > 0, "closed before a head");
        got.extend_from_slice(&buf[..n]);
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
    (s, String::from_utf8_lossy(&got[..end]).into_owned())
}

/// An archive is written on a blocking thread that waits while its client is slow
/// to take bytes (up to `stall_timeout_secs` per chunk, for as long as the client
/// takes some), and tokio's blocking pool (512 threads) serves every file operation
/// of both APIs. A token holder opening a few hundred archive downloads and reading
/// them slowly held every thread: every download, upload and manager call waited
/// behind them. At most `max_archive_streams` archives stream at once; past that an
/// archive (of a directory or `/download-archive`) is answered 503 at once, JSON
/// with `Retry-After`, while files, uploads and manager calls go on; a slot is free
/// again once its client is gone.
#[test]
fn archives_past_the_cap_are_refused_so_slow_clients_never_hold_every_thread() {
    let p = Proxy::start("max_archive_streams = 2\nstall_timeout_secs = 600\n");
    let (big, little) = big_and_little(&p);
    std::fs::write(p.vfolder_path().join("file.txt"), b"file").expect("file");
    let listed = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "virtual_folder_id": VFID, "files": ["little/a.txt"]}),
    );
    // (From two addresses: one alone gets half the slots, see
    // `one_address_cannot_take_every_archive_slot`.)
    let started = std::time::Instant::now();
    let mut slow: Vec<TcpStream> = [[127, 0, 0, 2], [127, 0, 0, 3]]
        .into_iter()
        .map(|from| {
            let (s, head) = slow_client(&p, from.into(), &big);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        })
        .collect();
    // A third archive, of either kind, is refused at once (while the slow ones
    // have not kept their writers waiting long enough to be cut to make room:
    // `a_slow_archive_makes_room_for_another_once_past_the_grace`).
    for path in [little.clone(), format!("/download-archive?token={listed}")] {
        let r = p.client_get(&path, Duration::from_secs(20));
        if started.elapsed() >= appproxy_storage_proxy::archive_slots::WAITING {
            continue;
        }
        assert_eq!(
            r.status,
            503,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], "busy");
        assert!(
            r.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("max_archive_streams")),
            "{}",
            r.json()
        );
        assert_eq!(r.header("retry-after"), Some("5"));
    }
    // Everything else goes on.
    let r = p.download("file.txt", "", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"file"[..]));
    assert_eq!(p.upload("up.txt", b"up").status, 204);
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
        None,
    );
    assert_eq!(r.status, 200);
    // One slow client goes: its slot is free again once its writer sees it gone.
    drop(slow.pop());
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let r = get_until_served(&p, &little, until, Duration::from_millis(100));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'a.txt'"]
    );
    drop(slow);
}

/// A client that takes an archive's bytes slowly (found from outside: 256 KiB every
/// 5 s, under the stall timeout every time) held its slot for as long as the
/// archive lasts, and a few addresses doing so refused every other user's archive
/// with 503 for as long as they liked. With every slot taken, a new archive now
/// cuts the stream whose client has kept its writer waiting longest (past a bound,
/// and at least half its life) and takes its slot; before that bound the new
/// archive is refused as before.
#[test]
fn a_slow_archive_makes_room_for_another_once_past_the_grace() {
    use appproxy_storage_proxy::archive_slots::{WAITED, WAITING};
    let p = Proxy::start("max_archive_streams = 2\nstall_timeout_secs = 600\n");
    let (big, little) = big_and_little(&p);
    let started = std::time::Instant::now();
    let slow: Vec<TcpStream> = [[127, 0, 0, 2], [127, 0, 0, 3]]
        .into_iter()
        .map(|from| {
            let (s, head) = slow_client(&p, from.into(), &big);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        })
        .collect();
    let r = p.client_get(&little, Duration::from_secs(20));
    // (Answered before any could have kept its writer waiting that long.)
    if started.elapsed() < WAITING {
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    }
    // Once the slow streams (nothing taken since the socket buffers filled) have
    // kept their writers waiting that long (bounded: the total's rule takes any
    // past `WAITED`), the next archive is served.
    std::thread::sleep(WAITING.saturating_sub(started.elapsed()));
    let r = get_until_served(
        &p,
        &little,
        started + WAITED * 2,
        Duration::from_millis(500),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'a.txt'"]
    );
    let log = p.log();
    assert_eq!(
        log.matches(
            "an archive stream whose client kept it waiting was cut to make room for another"
        )
        .count(),
        1,
        "{log}"
    );
    drop(slow);
}

/// Under a descriptor limit of 1024 (systemd's default soft limit), thirty slow
/// archive downloads of a deep tree (each holding about 37 descriptors: the walk's
/// open levels, the file, a temporary file, the socket) used up the proxy's
/// descriptors: listings answered 404, downloads 400, archives 500. Archive slots
/// are fitted to the limit (half of what the reserve leaves, 37 descriptors each:
/// 12 here) and the connection caps below what they leave; past the slots an
/// archive is refused 503, and listings, downloads and uploads go on.
#[test]
fn slow_archives_never_take_the_descriptors_everything_else_needs() {
    let p = Proxy::start_under(
        &["prlimit", "--nofile=1024:1024", "--"],
        "stall_timeout_secs = 600
max_archive_streams_per_address = 64
",
    );
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("deep")).expect("deep");
    // A client that does not read stalls the writer at the bottom, every level
    // above it held.
    chain(
        &vf.join("deep"),
        "d",
        40,
        "noise.bin",
        &incompressible(16 << 20),
    );
    let _flatten = Flatten(vf.join("deep"));
    std::fs::write(vf.join("file.txt"), b"file").expect("file");
    let deep = format!(
        "/download?token={}&archive=true",
        p.token(
            "/folder/file/download",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "deep"}),
        )
    );
    let slots = (1024 - 128) / 2 / 37;
    let mut slow = Vec::new();
    for i in 0..slots + 1 {
        let from = std::net::Ipv4Addr::new(127, 0, 1, 2 + i as u8);
        if i < slots {
            let (s, head) = slow_client(&p, from, &deep);
            assert!(head.starts_with("HTTP/1.1 200"), "archive {i}: {head}");
            slow.push(s);
        } else {
            let r = p.client_get(&deep, Duration::from_secs(20));
            assert_eq!(
                r.status,
                503,
                "archive {i} past the fitted slots: {:?}",
                String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
            );
            assert_eq!(r.json()["code"], "busy");
        }
    }
    // Everything else goes on while the slow archives hold their descriptors.
    for _ in 0..20 {
        let r = p.manager(
            "/folder/file/list",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
            None,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let r = p.download("file.txt", "", &[]);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"file"[..]));
    }
    assert_eq!(p.upload("up.txt", b"up").status, 204);
    assert!(alive(&p));
    drop(slow);
    let log = std::fs::read_to_string(p.dir.path().join("storage.log")).expect("log");
    assert!(
        log.contains("max_archive_streams lowered to fit the descriptor limit"),
        "the lowered setting is logged"
    );
}

/// The archive cap keeps threads for everyone, but one token holder could take
/// every slot by opening archives from one address and reading them slowly: every
/// other user's archive was refused until they finished. Once half the slots are
/// taken, an address that holds its share (`max_archive_streams_per_address`, one in
/// 8 by default) is refused, with a message naming the setting, while other
/// addresses still get theirs; set to the cap, the share is off.
#[test]
fn one_address_cannot_take_every_archive_slot() {
    // A request from `from` is refused: 503 `busy` naming the setting that refused.
    let refused = |p: &Proxy, from: std::net::Ipv4Addr, path: &str, setting: &str| {
        let s = appproxy_test_support::net::connect_from(from, p.client).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut s = appproxy_test_support::net::Uninterrupted(s);
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut answer = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut answer).expect("answer");
        let answer = String::from_utf8_lossy(&answer[..answer.len().min(1024)]);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains(&format!("({setting})")) && answer.contains("\"busy\""),
            "{setting}: {answer}"
        );
    };
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let p = Proxy::start("max_archive_streams = 8\nstall_timeout_secs = 600\n");
    let (big, little) = big_and_little(&p);
    // One address gets half the slots, then no more.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|i| {
            let (s, head) = slow_client(&p, attacker, &big);
            assert!(head.starts_with("HTTP/1.1 200"), "slow archive {i}: {head}");
            s
        })
        .collect();
    refused(
        &p,
        attacker,
        &big,
        "[storage] max_archive_streams_per_address",
    );
    // Others get their share: one each, while the slots are crowded.
    for other in [3, 4] {
        let from = std::net::Ipv4Addr::new(127, 0, 0, other);
        let (s, head) = slow_client(&p, from, &big);
        assert!(head.starts_with("HTTP/1.1 200"), "127.0.0.{other}: {head}");
        held.push(s);
        refused(&p, from, &big, "[storage] max_archive_streams_per_address");
    }
    // And a user's own archive is served whole.
    let r = p.client_get(&little, Duration::from_secs(20));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'a.txt'"]
    );
    drop(held);
    drop(p);

    // The share off (a proxy in front: every client has its address): the cap alone.
    let p = Proxy::start(
        "max_archive_streams = 4\nmax_archive_streams_per_address = 4\nstall_timeout_secs = 600\n",
    );
    let (big, _) = big_and_little(&p);
    let held: Vec<TcpStream> = (0..4)
        .map(|i| {
            let (s, head) = slow_client(&p, attacker, &big);
            assert!(head.starts_with("HTTP/1.1 200"), "slow archive {i}: {head}");
            s
        })
        .collect();
    refused(&p, attacker, &big, "[storage] max_archive_streams");
    drop(held);
}

/// The proxy's peak resident memory (`VmHWM`), in KiB.
fn peak_kib(p: &Proxy) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", p.child.id()))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A proxy whose folder holds `wide/`: `n` empty files (`f000000`, …) and `z.txt`
/// (5 bytes). Also gives the folder's path. Its listings carry up to a million
/// entries (`scandir_limit`), so that a listing of them all can be measured.
fn folder_of_empty_files(n: usize) -> (Proxy, std::path::PathBuf) {
    let p = Proxy::start("scandir_limit = 1000000");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("wide")).expect("wide");
    for i in 0..n {
        std::fs::File::create(vf.join(format!("wide/f{i:06}"))).expect("file");
    }
    std::fs::write(vf.join("wide/z.txt"), b"12345").expect("z");
    (p, vf)
}

/// A user with a shell fills one directory with empty files (tens of thousands a
/// second; they hold no bytes, so no quota counts them) and opens it in the
/// folder explorer. `list` built a JSON value tree of every entry before writing
/// the answer: about 2.5 KB of the proxy's memory per entry (300 000 entries, 770
/// MB per request; four at once took the proxy to 3 GB). It writes each item as it
/// goes: what stays is the sorted listing and the answer's text, a few hundred
/// bytes an entry. The answer is unchanged (same fields, same order).
#[test]
fn listing_a_directory_of_many_empty_files_costs_a_few_hundred_bytes_an_entry() {
    const N: usize = 60_000;
    let (p, vf) = folder_of_empty_files(N);
    std::os::unix::fs::symlink("z.txt", vf.join("wide/zz")).expect("link");
    std::fs::create_dir(vf.join("wide/zzz")).expect("dir");
    let list = || {
        p.manager_within(
            "/folder/file/list",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "wide"}),
            Duration::from_secs(300),
        )
    };
    let before = peak_kib(&p);
    let r = list();
    let grew = peak_kib(&p).saturating_sub(before);
    eprintln!("peak memory grew by {grew} KiB listing {N} entries");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let items = r.json()["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), N + 3);
    assert_eq!(items[0]["name"], "f000000");
    assert_eq!(items[N - 1]["name"], format!("f{:06}", N - 1));
    let tail: Vec<_> = items[N..]
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_owned(),
                i["type"].as_str().unwrap_or_default().to_owned(),
                i["symlink_target"].clone(),
                i["stat"]["size"].clone(),
            )
        })
        .collect();
    assert_eq!(
        tail[0],
        (
            "z.txt".into(),
            "FILE".into(),
            serde_json::Value::Null,
            5.into()
        )
    );
    assert_eq!(tail[1].0, "zz");
    assert_eq!(tail[1].1, "SYMLINK");
    assert_eq!(tail[1].2, "z.txt");
    assert_eq!(tail[2].1, "DIRECTORY");
    for key in ["created", "mode", "modified", "size"] {
        assert!(items[0]["stat"].get(key).is_some(), "{key}: {}", items[0]);
    }
    // The answer's text alone is about 170 bytes an entry; the value tree took 2.5 KB.
    assert!(
        grew < (N as u64 * 1_000) >> 10,
        "the proxy's peak memory grew by {grew} KiB for {N} entries"
    );
    // The body keeps the fields in the order it always had.
    let text = String::from_utf8_lossy(&r.body);
    let first = text.find("{\"name\":\"f000000\"").expect("the first item");
    assert!(
        text[first..].starts_with("{\"name\":\"f000000\",\"stat\":{\"created\":"),
        "{}",
        &text[first..first + 200]
    );
}

/// The proxy's resident memory now (`VmRSS`), in KiB.
fn rss_kib(p: &Proxy) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", p.child.id()))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Found in the third attack round: JSON writes a control character as `\u00XX`
/// (six bytes), and a user with a shell can make symlinks whose names (255 bytes)
/// and targets (4,095 bytes) are nothing else, or empty files so named (no quota
/// counts them): about 26 KB of answer an entry, and the answer was built whole in
/// one buffer (20,000 such symlinks: a 525 MB answer, a 1.04 GB peak). The answer is
/// streamed now: a reader that stops holds the writer back, the proxy's memory
/// stays bounded while tens of MB go out, and the answer is the same JSON, byte for
/// byte, it always was (serde's compact form of the same items, in the same order).
#[test]
fn a_listing_of_control_character_names_streams_in_bounded_memory() {
    use std::os::unix::ffi::OsStrExt as _;
    const LINKS: usize = 2_000;
    const FILES: usize = 2_000;
    let p = Proxy::start("scandir_limit = 4000");
    create_folder(&p);
    let vf = p.vfolder_path();
    let d = vf.join("d");
    std::fs::create_dir(&d).expect("d");
    let target = std::ffi::OsStr::from_bytes(&[1u8; 4095]);
    let mut names = Vec::new();
    for i in 0..LINKS {
        let mut name = format!("l{i:05}").into_bytes();
        name.resize(255, 2);
        std::os::unix::fs::symlink(target, d.join(std::ffi::OsStr::from_bytes(&name)))
            .expect("symlink");
        names.push(name);
    }
    for i in 0..FILES {
        let mut name = format!("f{i:05}").into_bytes();
        name.resize(255, 0x1b);
        std::fs::File::create(d.join(std::ffi::OsStr::from_bytes(&name))).expect("file");
        names.push(name);
    }
    names.sort();
    let before = peak_kib(&p);
    let rss_before = rss_kib(&p);
    let body = serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "d"}).to_string();
    let mut s = TcpStream::connect(p.manager).expect("connect");
    write!(
        s,
        "POST /folder/file/list HTTP/1.1\r\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        storage_common::TOKEN,
        body.len()
    )
    .expect("send");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    // The reader takes 256 KiB and stops for a while: the writer is held back.
    let mut raw = vec![0u8; 256 << 10];
    s.read_exact(&mut raw).expect("the answer's start");
    std::thread::sleep(Duration::from_secs(2));
    let paused = rss_kib(&p).saturating_sub(rss_before);
    s.read_to_end(&mut raw).expect("the answer");
    let grew = peak_kib(&p).saturating_sub(before);
    let r = appproxy_test_support::http::parse(&raw, false);
    eprintln!(
        "answer {} bytes; the proxy's memory grew by {paused} KiB while its reader paused, its peak by {grew} KiB",
        r.body.len()
    );
    assert_eq!(
        r.status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.body.len() > 50_000_000, "{} bytes", r.body.len());
    assert!(
        paused < 16 << 10,
        "grew by {paused} KiB while the reader paused"
    );
    assert!(
        grew < 24 << 10,
        "the peak grew by {grew} KiB for {} bytes",
        r.body.len()
    );
    // The same entries, in order, names and targets whole.
    let parsed: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    let items = parsed["items"].as_array().expect("items");
    assert_eq!(items.len(), LINKS + FILES);
    let target = String::from_utf8(vec![1u8; 4095]).expect("text");
    for (item, name) in items.iter().zip(&names) {
        assert_eq!(
            item["name"].as_str().map(str::as_bytes),
            Some(name.as_slice())
        );
        if name[0] == b'l' {
            assert_eq!(item["type"], "SYMLINK");
            assert_eq!(item["symlink_target"].as_str(), Some(target.as_str()));
        } else {
            assert_eq!(item["type"], "FILE");
            assert_eq!(item["symlink_target"], serde_json::Value::Null);
            assert_eq!(item["stat"]["size"], 0);
        }
    }
    // Byte for byte the compact JSON of those items (every key of an item and of
    // its `stat` is written in sorted order, as serde_json's map keeps them).
    assert!(
        serde_json::to_vec(&parsed).expect("JSON") == r.body,
        "the answer is serde_json's compact form"
    );
    // And a small directory answers whole, with its length, as it always did.
    std::fs::create_dir(vf.join("small")).expect("small");
    std::fs::write(vf.join("small/a.txt"), b"abc").expect("a");
    std::os::unix::fs::symlink("a.txt", vf.join("small/b")).expect("b");
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "small"}),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length").map(str::to_owned),
        Some(r.body.len().to_string())
    );
    let parsed: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert!(serde_json::to_vec(&parsed).expect("JSON") == r.body);
    assert_eq!(parsed["items"][1]["symlink_target"], "a.txt");
}

/// A vfolder user can set the set-user-ID, set-group-ID and sticky bits on their
/// own files. The archive wrote each file's mode whole in its central directory
/// entry, and extractors that restore modes (libarchive's bsdtar run as root does
/// by default, `unzip -K`) make the extracted program set-user-ID to whoever
/// extracts it (a zip names no owner: the files are the extractor's), root
/// included. Entries carry the type and `rwx` bits only, as a clone copies them.
#[test]
fn archive_entries_never_carry_set_id_or_sticky_bits() {
    use std::os::unix::fs::PermissionsExt as _;
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("tools")).expect("tools");
    for (name, mode) in [
        ("suid", 0o4755),
        ("sgid", 0o2750),
        ("sticky", 0o1644),
        ("plain", 0o640),
    ] {
        std::fs::write(vf.join("tools").join(name), b"#!/bin/sh\nid\n").expect("file");
        std::fs::set_permissions(
            vf.join("tools").join(name),
            std::fs::Permissions::from_mode(mode),
        )
        .expect("chmod");
    }
    let modes = |zip: &[u8]| {
        let path = p.dir.path().join("modes.zip");
        std::fs::write(&path, zip).expect("zip");
        storage_common::python(
            "import sys,zipfile\nfor i in zipfile.ZipFile(sys.argv[1]).infolist(): print(i.filename, oct(i.external_attr >> 16))",
            &path,
        )
        .expect("a valid zip")
    };
    let want =
        "tools/plain 0o100640\ntools/sgid 0o100750\ntools/sticky 0o100644\ntools/suid 0o100755\n";
    let r = p.download("tools", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        modes(&r.body).replace("tools/", ""),
        want.replace("tools/", "")
    );
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "virtual_folder_id": VFID, "files": ["tools"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200);
    assert_eq!(modes(&r.body), want);
}

/// The same directory of empty files, walked: measured (`/folder/usage`) and
/// deleted. Each walk listed a directory whole before visiting it, about 110 bytes
/// of the proxy's memory per entry held for the walk (300 000 entries, some 33 MB
/// per walk, as many walks at once as requests). The walks now visit files as the
/// directory is read and keep only its subdirectories: the files cost nothing.
#[test]
fn walking_a_directory_of_many_empty_files_holds_none_of_them() {
    const N: usize = 300_000;
    let (p, vf) = folder_of_empty_files(N);
    std::fs::create_dir(vf.join("wide/sub")).expect("sub");
    std::fs::write(vf.join("wide/sub/y.txt"), b"123").expect("y");
    let before = peak_kib(&p);
    let r = p.manager_within(
        "/folder/usage",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        Duration::from_secs(300),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["used_bytes"], 8, "every file is counted");
    assert_eq!(r.json()["file_count"], N as u64 + 2, "{}", r.json());
    let r = p.manager_within(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["wide"], "recursive": true}),
        Duration::from_secs(300),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!vf.join("wide").exists(), "deleted whole");
    let grew = peak_kib(&p).saturating_sub(before);
    eprintln!("peak memory grew by {grew} KiB walking {N} entries twice");
    // Listed whole, the directory alone took some 33 MB.
    assert!(
        grew < (N as u64 * 20) >> 10,
        "the proxy's peak memory grew by {grew} KiB for {N} entries"
    );
}

/// A user with a shell fills their vfolder's staging area (`.upload`, which they
/// can write to) with entries: empty files, symlinks; no quota counts them. The
/// expired-upload cleanup listed it whole, a `stat` and some 340 bytes of the
/// proxy's memory an entry, sorted, at every pass (300 000 entries: 100 MiB more
/// at the peak, every `cleanup_interval_secs`), and removed any old regular file
/// there, whatever its name. It now reads the staging area as a stream and looks
/// only at session names (32 hex digits): the others cost no `stat`, hold nothing
/// and are left alone, and the expired session beside them is still removed.
#[test]
fn the_cleanup_streams_a_staging_area_full_of_junk() {
    const N: usize = 200_000;
    const FILES: usize = 1_000;
    let p = Proxy::start("upload_expire_secs = 1\ncleanup_interval_secs = 1\n");
    create_folder(&p);
    let staging = p.vfolder_path().join(".upload");
    std::fs::create_dir(&staging).expect("staging");
    let before = peak_kib(&p);
    // Symlinks (the cleanup never removed those) so that every pass meets them all.
    for i in 0..N {
        std::os::unix::fs::symlink("nowhere", staging.join(format!("junk-{i:06}"))).expect("junk");
    }
    for i in 0..FILES {
        std::fs::File::create(staging.join(format!("file-{i:06}"))).expect("junk file");
    }
    // An old file of the user's, not named as a session: not the cleanup's.
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::create(staging.join("notes.txt"))
        .and_then(|f| f.set_modified(old))
        .expect("old file");
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "x.bin", "size": 10}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The session's staged file: the one name of 32 hex digits there.
    let session = std::fs::read_dir(&staging)
        .expect("staging")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .expect("the session's staged file");
    let staged = staging.join(&session);
    assert!(staged.is_file(), "the session's staged file");
    // Passes go on every second; the one that removes the session has read the
    // whole staging area.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while staged.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired upload was never removed: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let grew = peak_kib(&p).saturating_sub(before);
    eprintln!("peak memory grew by {grew} KiB over cleanup passes of {N} entries");
    assert!(staging.join("notes.txt").exists(), "the user's file stays");
    assert_eq!(
        std::fs::read_dir(&staging).expect("staging").count(),
        N + FILES + 1,
        "the junk stays"
    );
    // Listed whole, the staging area alone took some 65 MB at each pass.
    assert!(
        grew < (N as u64 * 20) >> 10,
        "the proxy's peak memory grew by {grew} KiB for {N} entries"
    );
}

/// The same directory of empty files, downloaded as a zip. The archive held, for
/// its whole life, each entry's central directory record (its name included) and
/// its name's slot, the listing of the directory being archived, and at the end the
/// whole central directory in one buffer: about 290 bytes of the proxy's memory
/// per entry (300 000 entries, 85 MB per archive, as many archives at once as
/// `[storage] max_archive_streams`). The records now go to an unlinked temporary
/// file as they are made and are streamed back from it, and each directory is
/// read twice (its names reserved, then walked) rather than held: what stays is
/// one 64-bit word per plain file name (see `zip::Names`), some 19 bytes an entry.
#[test]
fn an_archive_of_many_empty_files_holds_none_of_them() {
    const N: usize = 300_000;
    let (p, vf) = folder_of_empty_files(N);
    std::fs::create_dir_all(vf.join("wide/sub/empty")).expect("sub");
    std::fs::write(vf.join("wide/sub/y.txt"), b"123").expect("y");
    let archive = |relpath: &str| {
        let r = p.manager(
            "/folder/file/download",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath}),
            None,
        );
        let token = r.json()["token"].as_str().expect("token").to_owned();
        p.client_get(
            &format!("/download?token={token}&archive=true"),
            Duration::from_secs(300),
        )
    };
    // A first, small archive: what any archive costs once (its thread, its
    // allocator arena) is not counted by entry.
    assert_eq!(archive("wide/sub").status, 200);
    let before = peak_kib(&p);
    let r = archive("wide");
    let grew = peak_kib(&p).saturating_sub(before);
    eprintln!("peak memory grew by {grew} KiB archiving {N} entries");
    assert_eq!(r.status, 200);
    let path = p.dir.path().join("wide.zip");
    std::fs::write(&path, &r.body).expect("zip");
    let out = storage_common::python(
        concat!(
            "import sys,zipfile\n",
            "z=zipfile.ZipFile(sys.argv[1])\n",
            "assert z.testzip() is None\n",
            "names=z.namelist()\n",
            "assert len(set(names))==len(names)\n",
            "print(len(names))\n",
            "print(sum(1 for n in names if n.startswith('f') and len(n)==7))\n",
            "print('|'.join(sorted(n for n in names if not n.startswith('f'))))\n",
            "print(z.read('z.txt').decode(), z.read('sub/y.txt').decode())",
        ),
        &path,
    )
    .expect("a valid zip");
    assert_eq!(
        out,
        format!("{}\n{N}\nsub/empty/|sub/y.txt|z.txt\n12345 123\n", N + 3)
    );
    // A central directory record alone is 53 bytes here (46 and the name), the
    // listing 110 more: neither may stay by entry. The names' tables take 9 bytes a
    // slot, at most 7/8 full and a power of two (300 000 names: 16 tables of 32 768
    // slots, 4.5 MiB, 15.7 bytes an entry), one of them doubling at a time, beside
    // the archive's own buffers (a few 64 KiB chunks).
    assert!(
        grew < (N as u64 * 24) >> 10,
        "the proxy's peak memory grew by {grew} KiB for {N} entries"
    );
}

/// The descriptors the proxy holds open.
fn open_fds(p: &Proxy) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
        .expect("fd dir")
        .count()
}

/// An archive's central directory goes to a temporary file as it is made. Where
/// none can be made (`TMPDIR` missing, full or read-only), the archive fails before
/// its first byte: the client must get an error status saying so (it used to get
/// its connection closed without a word, or a 200 cut off), the log must say why,
/// and the archive must give back its slot, its thread and its descriptors: the
/// next one fails for the same reason, not as busy, and files are still served.
#[test]
fn an_archive_without_a_temporary_file_is_refused_and_keeps_nothing() {
    let missing = tempfile::tempdir().expect("tempdir");
    let tmpdir = missing.path().join("gone");
    let p = Proxy::start_with_env(
        "max_archive_streams = 1",
        "",
        &[("TMPDIR", tmpdir.to_str().expect("utf-8"))],
    );
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("d")).expect("d");
    for i in 0..20 {
        std::fs::write(vf.join(format!("d/f{i}.txt")), vec![b'x'; 1000 + i]).expect("file");
    }
    let by_token = || p.download("d", "&archive=true", &[]);
    let listed = || {
        let token = p.token(
            "/folder/file/archive-download-token",
            serde_json::json!({"volume": "local", "virtual_folder_id": VFID, "files": ["d/f1.txt", "d"]}),
        );
        p.download_archive(&token)
    };
    let check = |what: &str, r: appproxy_test_support::http::Resp| {
        assert_eq!(
            r.status,
            500,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let body = r.json();
        assert_eq!(body["code"], "archive-failed", "{what}: {body}");
        let title = body["title"].as_str().unwrap_or_default();
        assert!(
            title.contains("no temporary file for the archive's central directory"),
            "{what}: the answer does not say why: {title}"
        );
    };
    // One archive first, so that what any archive costs once (a blocking thread
    // kept for reuse) is not counted.
    check("first", by_token());
    let before = open_fds(&p);
    for round in 0..3 {
        check(&format!("round {round}, a directory"), by_token());
        check(&format!("round {round}, a list"), listed());
    }
    let log = p.log();
    assert!(
        log.contains("no temporary file for the archive's central directory"),
        "the log does not say why: {log}"
    );
    // Blocking threads end on their own schedule: give them a moment.
    let mut now = open_fds(&p);
    for _ in 0..50 {
        if now <= before {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        now = open_fds(&p);
    }
    assert!(
        now <= before,
        "descriptors grew from {before} to {now} over six failed archives"
    );
    let r = p.download("d/f3.txt", "", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, vec![b'x'; 1003]);
}

/// A user names a thousand files so that each must be renamed (a backslash) or
/// numbered (a second name made the same one): an archive logs the first 16 one by
/// one and counts the rest on one line, so that downloading it again and again
/// cannot flood the log with a line an entry.
#[test]
fn an_archive_of_many_renamed_entries_logs_a_few_and_counts_the_rest() {
    const N: usize = 500;
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("odd")).expect("odd");
    for i in 0..N {
        // `a\i` is written `a_i`; `b:i` and `b\i` both become `b_i`: one is numbered.
        std::fs::write(vf.join(format!("odd/a\\{i}")), b"a").expect("a");
        std::fs::write(vf.join(format!("odd/b:{i}")), b"b").expect("b");
        std::fs::write(vf.join(format!("odd/b\\{i}")), b"b").expect("b");
    }
    let r = p.download("odd", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    let path = p.dir.path().join("odd.zip");
    std::fs::write(&path, &r.body).expect("zip");
    let names = storage_common::python(
        "import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nn=z.namelist()\nassert len(set(n))==len(n)\nprint(len(n))",
        &path,
    )
    .expect("a valid zip");
    assert_eq!(names.trim(), (3 * N).to_string());
    let lines = p.log_json();
    let one_by_one = lines
        .iter()
        .filter(|l| {
            l["message"].as_str().is_some_and(|m| {
                m.starts_with("archive entry name had a backslash")
                    || m.starts_with("archive entry name already given")
            })
        })
        .count();
    assert_eq!(one_by_one, 16, "entries logged one by one");
    let summary: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("archive entries renamed, numbered or left out"))
        })
        .collect();
    assert_eq!(summary.len(), 1, "one summary line");
    // The `a\i` renamed; of each `b` pair, one renamed (it won `b_i`) and one
    // numbered (`b_i (1)`).
    let s = summary[0];
    assert_eq!(
        (
            s["renamed"].as_u64(),
            s["numbered"].as_u64(),
            s["left_out"].as_u64()
        ),
        (Some(2 * N as u64), Some(N as u64), Some(0)),
        "{s}"
    );
    assert_eq!(s["not_logged"].as_u64(), Some(3 * N as u64 - 16), "{s}");
    let streamed = lines
        .iter()
        .find(|l| l["message"] == "archive streamed")
        .expect("the archive's last line");
    assert_eq!(streamed["renamed"], s["renamed"], "{streamed}");
}

/// Renames `a` and `b` back and forth in `dir` until `stop` is set: what any user
/// does in their own directory, and what moves the kernel's global `rename_lock`.
fn renamer(
    dir: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::fs::create_dir_all(&dir).expect("renamer dir");
    std::fs::write(dir.join("a"), b"").expect("renamer file");
    std::thread::spawn(move || {
        let fd = open_dir(&dir);
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if rustix::fs::renameat(&fd, "a", &fd, "b").is_ok()
                && rustix::fs::renameat(&fd, "b", &fd, "a").is_ok()
            {
                n += 2;
            }
        }
        n
    })
}

/// A path through a relative symlink (`results/latest -> ../runs/42`) resolves
/// through `..`, which `openat2` with `RESOLVE_BENEATH` fails with `EAGAIN` whenever
/// a rename anywhere on the host happened meanwhile: downloads and listings through
/// it succeed all the same while another directory on the same filesystem is being
/// renamed in without pause.
#[test]
fn paths_through_a_relative_symlink_resolve_while_the_host_renames() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir_all(vf.join("runs/42")).expect("runs");
    std::fs::write(vf.join("runs/42/model.bin"), b"model").expect("model");
    std::fs::create_dir(vf.join("results")).expect("results");
    std::os::unix::fs::symlink("../runs/42", vf.join("results/latest")).expect("symlink");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = renamer(p.dir.path().join("elsewhere"), stop.clone());
    let mut failed = Vec::new();
    for i in 0..300 {
        let r = if i % 2 == 0 {
            p.download("results/latest/model.bin", "", &[])
        } else {
            p.manager(
                "/folder/file/list",
                serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "results/latest"}),
                None,
            )
        };
        if r.status != 200 {
            failed.push((r.status, String::from_utf8_lossy(&r.body).into_owned()));
        } else if i % 2 == 0 {
            assert_eq!(r.body, b"model");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let renames = thread.join().expect("renamer");
    assert!(renames > 0, "the renamer ran");
    assert!(
        failed.is_empty(),
        "{} of 300 failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

/// The staging file replaced by a hard link to a file outside the vfolder (the
/// session ID is in the token the user holds): the PATCH is refused and writes
/// nothing, the outside file keeps its content. Before, the PATCH appended the
/// upload's bytes to it (the file type was checked, not its other names).
#[test]
fn a_hard_link_in_place_of_the_staging_file_is_never_written() {
    let p = Proxy::start("");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "x.txt", "size": 100}),
    );
    let staging = p.vfolder_path().join(".upload");
    let session = std::fs::read_dir(&staging)
        .expect("staging")
        .flatten()
        .map(|e| e.file_name())
        .next()
        .expect("a staging file");
    let outside = p.dir.path().join("outside.txt");
    std::fs::write(&outside, b"line1\n").expect("outside file");
    std::fs::remove_file(staging.join(&session)).expect("rm the staged file");
    std::fs::hard_link(&outside, staging.join(&session)).expect("hard link");
    let r = p.tus_patch(&token, "6", b"APPENDED\n");
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("hard link"), "{body}");
    assert_eq!(std::fs::read(&outside).expect("outside file"), b"line1\n");
    assert!(alive(&p));
}

/// A write lease on a file (`fcntl(F_SETLEASE, F_WRLCK)`, which a file's owner may
/// take from a shell), held by a Python process until dropped: every open of the
/// file for reading with `O_NONBLOCK`, the proxy's, fails with `EWOULDBLOCK` until
/// the holder lets go (or `lease-break-time`, 45 s by default, passes). The holder
/// ignores the `SIGIO` that tells it to.
struct Lease(std::process::Child);

impl Lease {
    fn take(path: &Path) -> Self {
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg("import fcntl,os,signal,sys\nsignal.signal(signal.SIGIO, signal.SIG_IGN)\nfd=os.open(sys.argv[1], os.O_WRONLY)\nfcntl.fcntl(fd, 1024, fcntl.F_WRLCK)\nprint('held', flush=True)\nsys.stdin.read()")
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("held");
        assert_eq!(line.trim(), "held", "the lease is taken");
        Self(child)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on the client API read raw to its end: whether it was answered 200 and
/// ended as a whole body does (the last chunk), and the answer.
fn get_raw(p: &Proxy, path: &str) -> (bool, Vec<u8>) {
    let mut s = TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let whole = raw.starts_with(b"HTTP/1.1 200") && raw.ends_with(b"\r\n0\r\n\r\n");
    (whole, raw)
}

/// A file or directory a clone or an archive cannot open for any reason but being
/// gone (a lease held on a file, a directory the proxy may not read) fails the
/// clone (its partial copy removed) and cuts the archive off as an error: never a
/// clone reported done or a whole-looking zip without it. Before, both left it out
/// silently: a clone "done" with 4 of 5 files, a valid zip lacking one.
#[test]
fn what_cannot_be_opened_fails_a_clone_and_cuts_an_archive() {
    use std::os::unix::fs::PermissionsExt as _;
    let p = Proxy::start_bound_by_permissions("");
    create_folder(&p);
    let vf = p.vfolder_path();
    for i in 0..5 {
        std::fs::write(vf.join(format!("file{i}.dat")), [b'x'; 1000]).expect("file");
    }
    // The clone.
    let lease = Lease::take(&vf.join("file2.dat"));
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/000000000000000000000000000c10e0";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let task = r.json()["bgtask_id"].as_str().expect("id").to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let ended = p.log_json().into_iter().find(|l| {
            l["bgtask_id"] == task.as_str()
                && (l["message"] == "bgtask done" || l["message"] == "bgtask failed")
        });
        if let Some(l) = ended {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ended["message"], "bgtask failed", "{ended}");
    assert!(
        ended.to_string().contains("file2.dat"),
        "the failure names the file: {ended}"
    );
    let copy = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00")
        .join(&dst[dst.len() - 28..]);
    assert!(!copy.exists(), "the failed clone's partial copy is removed");
    assert!(copy.parent().is_some_and(Path::exists), "{}", p.log());
    drop(lease);
    // The archive of the folder: file0 and file1 are sent before file2's turn.
    let lease = Lease::take(&vf.join("file2.dat"));
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
    );
    let (whole, raw) = get_raw(&p, &format!("/download?token={token}&archive=true"));
    assert!(
        !whole,
        "no whole-looking archive without file2.dat: {}",
        String::from_utf8_lossy(&raw[..raw.len().min(200)])
    );
    assert!(
        p.log_json().iter().any(|l| l["message"] == "archive stream failed"
            && l.to_string().contains("file2.dat")),
        "{}",
        p.log()
    );
    drop(lease);
    // Unleased, the folder archives whole.
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
    );
    let r = p.client_get(
        &format!("/download?token={token}&archive=true"),
        Duration::from_secs(60),
    );
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip").len(),
        5
    );
    // A subdirectory the proxy may not read.
    std::fs::create_dir(vf.join("locked")).expect("locked");
    std::fs::write(vf.join("locked/inside.txt"), b"inside").expect("inside");
    std::fs::set_permissions(vf.join("locked"), std::fs::Permissions::from_mode(0o000))
        .expect("chmod");
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
    );
    let (whole, _) = get_raw(&p, &format!("/download?token={token}&archive=true"));
    std::fs::set_permissions(vf.join("locked"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod back");
    assert!(!whole, "no whole-looking archive without locked/");
    assert!(
        p.log_json()
            .iter()
            .any(|l| l["message"] == "archive stream failed" && l.to_string().contains("locked")),
        "{}",
        p.log()
    );
}

/// An archive token listing one directory many times, paths inside it, and the same
/// directory through a symlink (`self -> .`): each file is archived once. The token
/// lists each path once and none inside another; a token signed before that rule
/// (its list as given) is archived by the same rule when it streams. Before, a
/// token listing a directory of 1 000 files 10 000 times streamed 10 million
/// entries.
#[test]
fn an_archive_token_listing_a_directory_many_times_archives_it_once() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("d")).expect("d");
    for i in 0..20 {
        std::fs::write(vf.join(format!("d/f{i:02}")), b"x").expect("file");
    }
    std::os::unix::fs::symlink(".", vf.join("self")).expect("self");
    let mut files = vec!["d"; 1000];
    files.extend(["./d/", "d/f01", "self/d", "self/d/f02", "d//f03"]);
    let r = p.manager(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": files}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let claims = token.split('.').nth(1).expect("claims").to_owned();
    let expected: Vec<String> = (0..20).map(|i| format!("'d/f{i:02}'")).collect();
    let names = |token: &str| {
        let r = p.download_archive(token);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let mut names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
        names.sort();
        names
    };
    let got = names(&token);
    assert!(
        got == expected,
        "{} entries: {:?}",
        got.len(),
        &got[..got.len().min(30)]
    );
    // Listed once each, none inside another: `d` and `self/d` (which only the
    // kernel knows to be `d`).
    assert!(
        claims.len() < 400,
        "the token lists each path once: {} bytes of claims",
        claims.len()
    );
    // A token signed with the list as given, as tokens were before.
    let exp = appproxy_shared::jwt::now_epoch() as u64 + 600;
    let old = appproxy_shared::jwt::sign_hs256(
        &serde_json::json!({"operation": "download", "volume": "local", "virtual_folder_id": VFID, "files": files, "filename": null, "exp": exp}),
        "session-key",
    );
    let got = names(&old);
    assert!(
        got == expected,
        "{} entries: {:?}",
        got.len(),
        &got[..got.len().min(30)]
    );
}

/// An archive of a symlink to the vfolder itself (`self -> .`) leaves out the
/// staging area, as a download of the vfolder (or of `self`) does: another user's
/// partial upload is not in it. Before, `/download-archive` of `self` included
/// `.upload` and its staged files.
#[test]
fn an_archive_of_a_link_to_the_vfolder_leaves_out_the_staging_area() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::write(vf.join("a.txt"), b"a").expect("a");
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "secret.bin", "size": 100}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let upload = r.json()["token"].as_str().expect("token").to_owned();
    assert_eq!(p.tus_patch(&upload, "0", b"partial").status, 204);
    std::os::unix::fs::symlink(".", vf.join("self")).expect("self");
    let r = p.download("self", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'a.txt'"]
    );
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["self"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200);
    let names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    assert_eq!(names, ["'self/a.txt'"], "{names:?}");
}

/// `/folder/file/fetch` sends a file as long as it was when opened, as `/download`
/// does: a user who grows it while it is read (to 2^40 bytes, all hole) cannot make
/// the call endless, and one who cuts it short leaves an answer short of its
/// `Content-Length` (the connection closes), which never looks whole. Before, the
/// answer was chunked to the file's end: the first ran on past a gibibyte, the
/// second ended cleanly with the bytes left.
#[test]
fn a_fetched_file_changed_while_it_is_read_is_sent_as_measured() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    let mib = 1u64 << 20;
    for (name, len, change) in [
        ("grows.bin", 8 * mib, 1u64 << 40),
        ("shrinks.bin", 64 * mib, 2 * mib),
    ] {
        std::fs::write(vf.join(name), incompressible(len as usize)).expect("file");
        let body =
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": name}).to_string();
        let mut s = TcpStream::connect(p.manager).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        write!(
            s,
            "POST /folder/file/fetch HTTP/1.1\r\nHost: t\r\nX-BackendAI-Storage-Auth-Token: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            storage_common::TOKEN,
            body.len()
        )
        .expect("send");
        // The first mebibyte, then the change.
        let mut raw = vec![0u8; mib as usize];
        s.read_exact(&mut raw).expect("the first bytes");
        std::fs::OpenOptions::new()
            .write(true)
            .open(vf.join(name))
            .expect("open")
            .set_len(change)
            .expect("change the length");
        // To the close, or (without the bound) well past the length measured.
        let mut buf = vec![0u8; 1 << 16];
        while raw.len() < (len + 2 * mib) as usize {
            match s.read_uninterrupted(&mut buf) {
                Ok(n @ 1..) => raw.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let head_end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains(&format!("content-length: {len}\r\n")),
            "{name}: the length at open: {head}"
        );
        let got = (raw.len() - head_end) as u64;
        if change > len {
            assert_eq!(got, len, "{name}: exactly the bytes measured");
        } else {
            assert!(got < len, "{name}: {got} bytes, short of {len}");
        }
    }
}

/// The body `data` in chunked coding, one chunk per byte (`1\r\nx\r\n`).
fn one_byte_chunks(data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(data.len() * 6 + 5);
    for &b in data {
        body.extend_from_slice(b"1\r\n");
        body.push(b);
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// The storage-proxy's `/metrics` value of `name` (unlabeled), 0 when absent.
fn metric(p: &Proxy, name: &str) -> f64 {
    let r = appproxy_test_support::http::request(p.manager, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    appproxy_test_support::prom::Exposition::parse(&text)
        .value(name, "")
        .unwrap_or(0.0)
}

/// A tus upload token for `relpath` of `size` bytes.
fn upload_token(p: &Proxy, relpath: &str, size: usize) -> String {
    p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath, "size": size}),
    )
}

/// A tus PATCH's head at offset 0 with a chunked body.
fn chunked_patch_head(token: &str) -> String {
    format!(
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
}

/// The test vfolder made on `p`, `n` incompressible bytes and an upload token for
/// them at `relpath`.
fn chunky_session(p: &Proxy, relpath: &str, n: usize) -> (Vec<u8>, String) {
    create_folder(p);
    let data = incompressible(n);
    let token = upload_token(p, relpath, n);
    (data, token)
}

/// Sends a tus PATCH at offset 0 to the session of `token` on a new connection, its
/// body `data` in one-byte chunks, then the last chunk when `end`: the connection
/// (to read the answer from with [`chunked_answer`], or to drop, hanging up) and
/// whether every byte could be sent (not when the proxy answered and closed the
/// connection before the body's end).
fn send_one_byte_chunks(
    p: &Proxy,
    token: &str,
    data: &[u8],
    end: bool,
) -> (TcpStream, std::io::Result<()>) {
    let mut s = TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let sent = s
        .write_all(chunked_patch_head(token).as_bytes())
        .and_then(|()| s.write_all(&one_byte_chunks(data)))
        .and_then(|()| {
            if end {
                s.write_all(b"0\r\n\r\n")
            } else {
                Ok(())
            }
        });
    (s, sent)
}

/// The answer read from `s` to its end. A proxy that answers before the body's end
/// closes the connection with bytes of it unread, which resets the connection once
/// the answer came: the reset ends the answer then.
fn chunked_answer(mut s: TcpStream) -> (appproxy_test_support::http::Resp, String) {
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => {}
        Err(e) => panic!("the answer: {e} after {raw:?}"),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    (appproxy_test_support::http::parse(&raw, false), text)
}

/// A PATCH body of 200 000 one-byte chunks (the framing an attacker used to make
/// each byte cost a timer, a write and a trip through the blocking pool) is stored
/// byte for byte, answered 204 with its offset, and written in a handful of writes
/// of gathered frames, not one per chunk (`storage_proxy_upload_writes_total`).
#[test]
fn a_body_of_one_byte_chunks_is_gathered_into_few_writes() {
    let p = Proxy::start("");
    let n = 200_000;
    let (data, token) = chunky_session(&p, "chunky.bin", n);
    let writes_before = metric(&p, "storage_proxy_upload_writes_total");
    let (s, sent) = send_one_byte_chunks(&p, &token, &data, true);
    sent.expect("the body");
    let (r, raw) = chunked_answer(s);
    assert_eq!(r.status, 204, "{raw}");
    assert_eq!(r.header("Upload-Offset"), Some(n.to_string().as_str()));
    let stored = std::fs::read(p.vfolder_path().join("chunky.bin")).expect("the upload");
    assert!(stored == data, "the stored bytes differ from those sent");
    assert_eq!(metric(&p, "storage_proxy_upload_bytes_total"), n as f64);
    let writes = metric(&p, "storage_proxy_upload_writes_total") - writes_before;
    assert!(
        writes >= 1.0 && writes <= (n / 100) as f64,
        "{writes} writes for {n} one-byte chunks: the frames were not gathered"
    );
}

/// A client that hangs up in the middle of a body of one-byte chunks: every byte
/// that arrived is kept (tus), gathered into few writes; HEAD's offset is the bytes
/// on disk, and the upload resumes from it to the exact file.
#[test]
fn a_body_of_one_byte_chunks_cut_off_keeps_what_arrived() {
    use std::time::Instant;
    let p = Proxy::start("");
    let n = 300_000;
    let sent = 150_001;
    let (data, token) = chunky_session(&p, "cut.bin", n);
    let (s, all_sent) = send_one_byte_chunks(&p, &token, &data[..sent], false);
    all_sent.expect("chunks");
    drop(s);
    // The PATCH ends once the proxy has read what was sent (a hang guard, not a
    // timing assertion).
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(&p, "storage_proxy_upload_bytes_total") != sent as f64
        || metric(&p, "storage_proxy_uploads_in_progress") != 0.0
    {
        assert!(Instant::now() < deadline, "the cut PATCH never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let writes = metric(&p, "storage_proxy_upload_writes_total");
    assert!(
        writes >= 1.0 && writes <= (sent / 100) as f64,
        "{writes} writes for {sent} one-byte chunks: the frames were not gathered"
    );
    let head = p.tus_head(&token);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Upload-Offset"),
        Some(sent.to_string().as_str())
    );
    let offset = sent.to_string();
    let r = p.tus_patch(&token, &offset, &data[sent..]);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("Upload-Offset"), Some(n.to_string().as_str()));
    let stored = std::fs::read(p.vfolder_path().join("cut.bin")).expect("the upload");
    assert!(stored == data, "the stored bytes differ from those sent");
}

/// A tmpfs mounted on a directory for as long as it lives, unmounted when dropped
/// (a failing test's too), lazily: the proxy may still hold files in it.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`) on `dir`, made if missing. The
    /// tests run as root, here and in CI: a mount refused fails the test.
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("the mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs of {size} on {} as its volume, which needs root \
             (CAP_SYS_ADMIN): mount failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A write of the staged file that fails midway through a PATCH body (the volume
/// full: `ENOSPC`, after some gathered writes landed and halfway through one) ends
/// the PATCH with 507, saying what was kept; what landed is kept and counted as
/// every other end of the body counts it: HEAD's offset is the bytes on disk, and
/// the folder's usage, the scope's committed bytes (no reservation holds them: the
/// scope has no limit) and `storage_proxy_upload_bytes_total` count them. Once
/// there is room again the upload resumes from that offset to the exact file.
/// Before, the failed write returned at once (400 `filesystem-error`): none of
/// them counted the bytes on disk.
#[test]
fn a_write_that_fails_mid_body_keeps_and_counts_what_landed() {
    let mut p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    // The volume: a tmpfs of 1 MiB (256 pages), where the proxy finds it once
    // restarted. Declared after the proxy, it is unmounted before the proxy goes.
    let vol = p.dir.path().join("vol");
    let _tmpfs = Tmpfs::mount(&vol, "1m");
    p.restart();
    let n = 600_000;
    let (data, token) = chunky_session(&p, "full.bin", n);
    let folder = serde_json::json!({"volume": "local", "vfid": VFID});
    let scope = serde_json::json!({"volume": "local", "qsid": VFID.split('/').next()});
    let used = |path: &str, body: &serde_json::Value| {
        let r = p.manager_method("GET", path, body.clone());
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["used_bytes"].as_u64().expect("used_bytes")
    };
    // The figures the reports keep (for an hour) before the PATCH.
    assert_eq!(used("/folder/usage", &folder), 0);
    assert_eq!(used("/quota-scope", &scope), 0);
    // Outside the vfolder and its scope, as the host would: 147 pages, leaving 109
    // (446 464 bytes), not a whole number of 64 KiB writes.
    let ballast = vol.join("ballast");
    std::fs::write(&ballast, vec![7u8; 600_000]).expect("the ballast");
    let (s, _) = send_one_byte_chunks(&p, &token, &data, true);
    let (r, raw) = chunked_answer(s);

    let staged: Vec<_> = std::fs::read_dir(p.vfolder_path().join(".upload"))
        .expect("the staging area")
        .map(|e| e.expect("an entry").path())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let on_disk = std::fs::read(&staged[0]).expect("the staged file");
    let kept = on_disk.len();
    assert!(
        kept > 0 && kept < n && kept % (64 << 10) != 0,
        "{kept} bytes on disk: the volume did not fill midway through a write"
    );
    assert!(
        on_disk == data[..kept],
        "the staged bytes differ from those sent"
    );
    let head = p.tus_head(&token);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Upload-Offset"),
        Some(kept.to_string().as_str())
    );
    assert_eq!(
        metric(&p, "storage_proxy_upload_bytes_total"),
        kept as f64,
        "the bytes on disk in /metrics"
    );
    assert_eq!(
        used("/folder/usage", &folder),
        kept as u64,
        "the folder's usage"
    );
    assert_eq!(used("/folder/used-bytes", &folder), kept as u64);
    assert_eq!(
        used("/quota-scope", &scope),
        kept as u64,
        "the committed bytes"
    );
    assert_eq!(r.status, 507, "{raw}");
    assert_eq!(r.json()["code"], "insufficient-storage", "{raw}");
    let message = r.json()["error"].as_str().expect("a message").to_owned();
    for said in [
        format!("{kept} bytes of this PATCH"),
        format!("at offset {kept} of {n}"),
        "resume from HEAD's offset".to_owned(),
    ] {
        assert!(message.contains(&said), "{said:?} not in {message:?}");
    }

    // Any other write the full volume refuses is said so too (507, the system's
    // words and errno kept), not a 400 that blames the caller.
    let refused_full = |r: &appproxy_test_support::http::Resp| {
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 507, "{body}");
        assert_eq!(r.json()["code"], "insufficient-storage", "{body}");
        assert_eq!(r.json()["errno"], 28, "{body}");
    };
    let mut limited = scope.clone();
    limited["options"] = serde_json::json!({"limit_bytes": 1 << 30});
    refused_full(&p.manager("/quota-scope", limited, None));
    // A vfolder created with a limit for its new scope: refused whole, no vfolder
    // left behind unlimited (before, it stayed, and an upload of any size into it
    // was granted).
    let other = "user:0d0e0f10-1112-4314-9516-1718191a1b1c/00112233445566778899aabbccddeeff";
    refused_full(&p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": other, "options": {"initial_max_size_for_quota_scope": 1 << 20}}),
        None,
    ));
    assert!(
        !vol.join("0d0e0f101112431495161718191a1b1c/00/11/2233445566778899aabbccddeeff")
            .exists(),
        "a vfolder left behind"
    );

    // Room again: the upload resumes from HEAD's offset to the exact file.
    std::fs::remove_file(&ballast).expect("the ballast away");
    let r = p.tus_patch(&token, &kept.to_string(), &data[kept..]);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("Upload-Offset"), Some(n.to_string().as_str()));
    let stored = std::fs::read(p.vfolder_path().join("full.bin")).expect("the upload");
    assert!(stored == data, "the stored bytes differ from those sent");
    assert_eq!(metric(&p, "storage_proxy_upload_bytes_total"), n as f64);
    assert_eq!(used("/folder/usage", &folder), n as u64);
    assert_eq!(used("/quota-scope", &scope), n as u64);
}

/// A user fills their own staging area with files named as sessions and dated
/// back (`touch -d 2000-01-01`), at no cost in quota, before every cleanup pass:
/// each removal wrote a log line of its own (100,000 files: some 25 MB of log a
/// pass). A pass now logs its first 16 removals one by one and each staging
/// area's removals in one line with their count and bytes, and counts them at
/// `/metrics`.
#[test]
fn the_cleanup_logs_a_few_removals_and_sums_the_rest() {
    const N: u64 = 2_000;
    let p = Proxy::start("upload_expire_secs = 1\ncleanup_interval_secs = 1\n");
    create_folder(&p);
    // Made aside and put in place at once, so that one pass finds them all.
    let prep = p.vfolder_path().join(".upload-prep");
    std::fs::create_dir(&prep).expect("prep");
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800);
    let mut bytes = 0;
    for i in 0..N {
        let f = std::fs::File::create(prep.join(format!("{i:032x}"))).expect("staged");
        f.set_len(i % 7).expect("length");
        bytes += i % 7;
        f.set_modified(old).expect("dated back");
    }
    let staging = p.vfolder_path().join(".upload");
    std::fs::rename(&prep, &staging).expect("in place");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::fs::read_dir(&staging)
        .expect("staging")
        .next()
        .is_some()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired files were never removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let summary = "expired uploads removed from a staging area";
    p.log_holding(summary);
    let log = p.log_json();
    let apart = log
        .iter()
        .filter(|v| v["message"] == "expired upload removed")
        .count();
    let sums: Vec<&serde_json::Value> = log.iter().filter(|v| v["message"] == summary).collect();
    assert_eq!(apart, 16, "removals logged one by one");
    assert_eq!(sums.len(), 1, "one line for the staging area: {sums:?}");
    assert_eq!(sums[0]["removed"], N, "{}", sums[0]);
    assert_eq!(sums[0]["bytes"], bytes, "{}", sums[0]);
    assert_eq!(
        metric(&p, "storage_proxy_expired_uploads_removed_total"),
        N as f64
    );
}

/// A user makes many subdirectories with long names in one directory at no cost
/// in quota; every walk of it (an archive, a usage measurement, a clone) held all
/// their names (300,000 of 255 bytes: some 53 MB an archive, 32 archives from one
/// address took the proxy from 7.6 MB to 1.72 GB), then was held to a share of
/// `[storage] max_walk_names_bytes` and refused past it (503 `walk-limit`, for
/// ever). A walk now holds no names (one batch of entries, a position per level):
/// a directory wider than the old share (16 KiB here, the setting still accepted)
/// is archived with every entry, measured and cloned through the API.
#[test]
fn a_directory_wider_than_a_walks_old_share_is_archived_measured_and_cloned() {
    let p = Proxy::start("max_walk_names_bytes = 65536\nquota_usage_max_age_secs = 3600\n");
    create_folder(&p);
    let wide = p.vfolder_path().join("wide");
    // 300 names of 100 bytes: 30,000 bytes, past the old 16 KiB share; a nested
    // level past it too.
    let mut want = Vec::new();
    for i in 0..300 {
        let d = wide.join(format!("{i:0>100}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        if i == 7 {
            std::fs::write(d.join("f.txt"), b"x").expect("file");
            want.push(format!("'{i:0>100}/f.txt'"));
        } else if i % 20 == 0 {
            std::fs::create_dir(d.join("inner")).expect("inner");
            std::fs::write(d.join("inner").join("g.txt"), b"0123456789").expect("file");
            want.push(format!("'{i:0>100}/inner/g.txt'"));
        } else {
            want.push(format!("'{i:0>100}/'"));
        }
    }
    for j in 0..250 {
        std::fs::create_dir(
            wide.join(format!("{:0>100}", 20))
                .join(format!("{j:0>100}")),
        )
        .expect("mkdir");
        want.push(format!("'{:0>100}/{j:0>100}/'", 20));
    }
    std::fs::write(wide.join("top.txt"), b"top").expect("file");
    want.push("'top.txt'".to_owned());
    want.sort();
    let bytes = 1 + 15 * 10 + 3;

    let r = p.download("wide", "&archive=true", &[]);
    assert_eq!(
        r.status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
    );
    let mut got = zip_names(&r.body, p.dir.path()).expect("a whole zip");
    got.sort();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "every file and empty directory, once");

    let usage = serde_json::json!({"volume": "local", "vfid": VFID});
    let r = p.manager("/folder/usage", usage, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["used_bytes"],
        bytes,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        r.json()["file_count"],
        17,
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000c10e";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        p.wait_bgtask(Duration::from_secs(60)),
        "the clone failed: {}",
        p.log()
    );
    let r = p.manager(
        "/folder/usage",
        serde_json::json!({"volume": "local", "vfid": dst}),
        None,
    );
    assert_eq!(r.json()["used_bytes"], bytes, "{}", p.log());
    let copy = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/000000000000000000000000c10e")
        .join("wide");
    let subdirs = std::fs::read_dir(&copy)
        .expect("the copy")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
        .count();
    assert_eq!(subdirs, 300, "every subdirectory copied");
    let nested = std::fs::read_dir(copy.join(format!("{:0>100}", 20)))
        .expect("the nested copy")
        .count();
    assert_eq!(nested, 251);
}

/// A directory with more subdirectories than a walk once held the names of (its
/// share of `[storage] max_walk_names_bytes`) is measured, and deleted through
/// the API by a path and with its vfolder: a delete reads a batch of entries at a
/// time and holds no names. Before, its delete was a walk and was refused (503
/// `walk-limit`) for ever: what a user made could not be deleted. Afterwards the
/// usage and the quota scope count what is left.
#[test]
fn a_directory_wider_than_a_walks_share_is_deleted_through_the_api() {
    // A share of 16 KiB: 300 names of 100 bytes pass it about twice.
    let p = Proxy::start("max_walk_names_bytes = 65536\nquota_usage_max_age_secs = 3600\n");
    create_folder(&p);
    let wide = p.vfolder_path().join("wide");
    let make_wide = |wide: &Path| {
        for i in 0..300 {
            let d = wide.join(format!("{i:0>100}"));
            std::fs::create_dir_all(d.join("inner")).expect("mkdir");
            std::fs::write(d.join("f.txt"), b"0123456789").expect("file");
            if i % 50 == 0 {
                // A nested level wider than the share too.
                for j in 0..250 {
                    std::fs::create_dir(d.join("inner").join(format!("{j:0>100}"))).expect("mkdir");
                }
            }
        }
        std::os::unix::fs::symlink("/etc/hostname", wide.join("out")).expect("link");
    };
    make_wide(&wide);
    std::fs::write(p.vfolder_path().join("keep.txt"), b"keep!").expect("file");
    let usage = serde_json::json!({"volume": "local", "vfid": VFID});
    let r = p.manager("/folder/usage", usage.clone(), None);
    assert_eq!(
        r.status,
        200,
        "past a walk's old share: {}",
        String::from_utf8_lossy(&r.body)
    );
    // The files, the link (its target's path) and keep.txt.
    assert_eq!(r.json()["used_bytes"], 300 * 10 + 13 + 5);

    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["wide"], "recursive": true}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!wide.exists());
    assert!(Path::new("/etc/hostname").exists());
    let r = p.manager("/folder/usage", usage, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["used_bytes"],
        5,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let scope =
        serde_json::json!({"volume": "local", "qsid": "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"});
    let r = p.manager_method("GET", "/quota-scope", scope.clone());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["used_bytes"],
        5,
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    // The vfolder, with such a directory in it, is deleted whole.
    make_wide(&wide);
    let r = p.manager(
        "/folder/delete",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        None,
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    // A hang guard, not a timing assertion: the delete runs in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while p.vfolder_path().exists() {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.log().contains("bgtask done"), "{}", p.log());
    let r = p.manager_method("GET", "/quota-scope", scope);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["used_bytes"],
        0,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

/// Walks held names from one shared budget (`[storage] max_walk_names_bytes`),
/// and one walk stalled in a wide directory (an archive whose client reads
/// nothing) made others fail. They hold none now: while such an archive is
/// stalled, a usage walk of the same directory is answered at once, and the
/// archive then goes on to its end, whole.
#[test]
fn a_stalled_archive_of_a_wide_directory_holds_back_no_other_walk() {
    let p = Proxy::start("max_walk_names_bytes = 20480\nmax_walk_names_bytes_per_walk = 16384\n");
    create_folder(&p);
    let wide = p.vfolder_path().join("wide");
    // 200 names of 100 bytes: some 21 KiB held by each walk of it before.
    for i in 0..200 {
        std::fs::create_dir_all(wide.join(format!("{i:0>100}"))).expect("mkdir");
    }
    let big = incompressible(16 << 20);
    std::fs::write(wide.join(format!("{:0>100}", 0)).join("big.bin"), &big).expect("file");
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "wide"}),
    );
    let (mut s, mut raw) = storage_common::get_until(
        &p,
        &format!("/download?archive=true&token={token}"),
        b"big.bin",
    );
    let usage = serde_json::json!({"volume": "local", "vfid": VFID});
    let r = p.manager("/folder/usage", usage, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["used_bytes"], 16 << 20);
    s.read_to_end(&mut raw).expect("the rest of the archive");
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| raw[at + 4..].to_vec())
        .expect("a head");
    let entries = zip_names(&dechunk(&body), p.dir.path()).expect("a whole zip");
    assert_eq!(entries.len(), 200, "the file and 199 empty directories");
}

/// The body of a chunked answer (`Transfer-Encoding: chunked`), whole: its last
/// chunk must be there.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk's size line");
        let size = std::str::from_utf8(&body[..line])
            .ok()
            .and_then(|t| usize::from_str_radix(t.split(';').next().unwrap_or(""), 16).ok())
            .expect("a chunk size");
        body = &body[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// A write past the largest size a file may have (`EFBIG`: here the proxy's
/// `RLIMIT_FSIZE`, set by `prlimit`) was answered 500, as if the proxy had failed,
/// or, unless whatever started the proxy ignored `SIGXFSZ`, ended the proxy; it is
/// the file's limit: 413 `file-too-large`, naming the limit, the bytes written
/// before it kept, the proxy going on.
#[test]
fn a_write_past_the_file_size_limit_is_413_naming_the_limit() {
    let p = Proxy::start_under(&["prlimit", "--fsize=1048576", "--"], "");
    create_folder(&p);
    // Past the limit by less than the sockets buffer: the whole body is sent
    // before the answer (the proxy stops reading at the failed write).
    let data = incompressible((1 << 20) + (32 << 10));
    let r = p.upload("big.bin", &data);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "file-too-large", "{}", r.json());
    let msg = r.json()["title"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains("RLIMIT_FSIZE = "), "{msg}");
    assert!(msg.contains("are kept"), "{msg}");
    assert!(alive(&p), "the proxy outlived the write: {}", p.log());
    assert!(!p.vfolder_path().join("big.bin").exists());
}

/// Sends a tus PATCH to the session of `token` on a new connection: its head at
/// offset 0 with the framing fields `framing` (`Transfer-Encoding: chunked\r\n`,
/// `Content-Length: 101\r\n`), then `body` as it is, then, when `shut`, the end of
/// the connection's sending side. Returns the answer (see [`chunked_answer`]).
fn raw_patch(
    p: &Proxy,
    token: &str,
    framing: &str,
    body: &[u8],
    shut: bool,
) -> (appproxy_test_support::http::Resp, String) {
    let mut s = TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nConnection: close\r\n{framing}\r\n"
    )
    .expect("head");
    s.write_all(body).expect("body");
    if shut {
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    chunked_answer(s)
}

/// `data` as one chunk of a chunked body (no last chunk).
fn one_chunk(data: &[u8]) -> Vec<u8> {
    let mut body = format!("{:x}\r\n", data.len()).into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(b"\r\n");
    body
}

/// The staging area's entries (the staged files of uploads not complete).
fn staged_files(p: &Proxy) -> usize {
    std::fs::read_dir(p.vfolder_path().join(".upload")).map_or(0, |d| d.count())
}

/// The answer `r` to a PATCH whose body was cut after every byte of its upload
/// arrived: `status` and `code` (what cut it), the title saying the upload is
/// complete; `relpath` holds `data`, nothing is staged.
fn assert_completed_despite(
    p: &Proxy,
    r: &appproxy_test_support::http::Resp,
    text: &str,
    (status, code): (u16, &str),
    relpath: &str,
    data: &[u8],
) {
    assert_eq!(r.status, status, "{text}");
    assert_eq!(r.json()["code"], code, "{text}");
    let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
    assert!(
        title.ends_with(&format!(
            "; yet all {} bytes of the upload had arrived: it is complete and in place",
            data.len()
        )),
        "{title}"
    );
    let stored = std::fs::read(p.vfolder_path().join(relpath));
    assert!(
        stored.as_deref().ok() == Some(data),
        "{relpath} is not in place: {:?}",
        stored.map(|s| s.len())
    );
    assert_eq!(staged_files(p), 0, "the staged file is left");
}

/// A chunked PATCH body whose chunks fill the upload exactly and then bring one
/// more: the chunk past `Upload-Length` is not written (413: the client sent more
/// than the token allows), and the upload, every byte of it on disk, is completed
/// and put in place; HEAD says so. Before, the 413 was answered before the
/// completion: the upload stayed staged at its full offset, HEAD said it was done
/// (a tus client resuming sent nothing more), and it never reached its destination.
#[test]
fn a_chunk_past_the_length_after_every_byte_still_completes_the_upload() {
    let p = Proxy::start("");
    let (data, token) = chunky_session(&p, "over.bin", 100);
    let mut body = one_chunk(&data);
    body.extend_from_slice(&one_chunk(b"extra"));
    body.extend_from_slice(b"0\r\n\r\n");
    let (r, text) = raw_patch(&p, &token, "Transfer-Encoding: chunked\r\n", &body, false);
    assert_completed_despite(&p, &r, &text, (413, "too-large"), "over.bin", &data);
    let head = p.tus_head(&token);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("upload-offset"), Some("100"));
    assert_eq!(head.header("upload-length"), Some("100"));
}

/// A PATCH announcing one byte more than the upload lacks (`Content-Length: 101`
/// for 100), sending the 100, then nothing: the body stalls (408), and the upload,
/// every byte on disk, is completed and put in place. Before, it stayed staged at
/// its full offset, never put in place.
#[test]
fn a_body_stalled_after_every_byte_still_completes_the_upload() {
    let p = Proxy::start("stall_timeout_secs = 1\n");
    let (data, token) = chunky_session(&p, "stalled.bin", 100);
    let (r, text) = raw_patch(&p, &token, "Content-Length: 101\r\n", &data, false);
    assert_completed_despite(
        &p,
        &r,
        &text,
        (408, "request-timeout"),
        "stalled.bin",
        &data,
    );
    let head = p.tus_head(&token);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("upload-offset"), Some("100"));
}

/// A `HEAD` while a `PATCH` holds every byte of the upload but has not ended (its
/// body stalled one byte short of its `Content-Length`) is told to ask again: 423
/// `locked` with `Retry-After`, the answer tus clients retry. Reporting the upload
/// complete would be early (it is not in place yet), and the `HEAD`'s own attempt
/// to complete it met the `PATCH`'s lease: 409, which a tus client takes for an
/// upload gone, and begins again.
#[test]
fn a_head_while_a_patch_finishes_is_told_to_ask_again() {
    let p = Proxy::start("stall_timeout_secs = 5\n");
    let (data, token) = chunky_session(&p, "finishing.bin", 100);
    let mut s = TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nConnection: close\r\nContent-Length: 101\r\n\r\n"
    )
    .expect("head");
    s.write_all(&data).expect("body");
    // Until the bytes are on disk, HEAD says how many; then it is locked.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let locked = loop {
        let head = p.tus_head(&token);
        if head.status != 200 {
            break head;
        }
        assert_ne!(
            head.header("upload-offset"),
            Some("100"),
            "complete too early"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no lock while the PATCH runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        locked.status,
        423,
        "{}",
        String::from_utf8_lossy(&locked.body)
    );
    assert_eq!(locked.header("retry-after"), Some("1"));
    // The PATCH ends at its stall, the upload in place; HEAD says so.
    let (r, text) = chunked_answer(s);
    assert_completed_despite(
        &p,
        &r,
        &text,
        (408, "request-timeout"),
        "finishing.bin",
        &data,
    );
    let head = p.tus_head(&token);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("upload-offset"), Some("100"));
}

/// A chunked PATCH body whose chunks bring every byte of the upload, but not its
/// last chunk, while the token expires: the PATCH ends at the expiry (401), and
/// the upload, every byte on disk, is completed and put in place. Before, it
/// stayed staged, never put in place, and was cleaned up later.
#[test]
fn a_token_expiring_after_every_byte_still_completes_the_upload() {
    // Long enough for the body to begin before the expiry on a loaded machine.
    let p = Proxy::start("session_expire_secs = 5\nstall_timeout_secs = 60\nmin_body_rate = 0\n");
    let (data, token) = chunky_session(&p, "expired.bin", 100);
    let (r, text) = raw_patch(
        &p,
        &token,
        "Transfer-Encoding: chunked\r\n",
        &one_chunk(&data),
        false,
    );
    assert_completed_despite(&p, &r, &text, (401, "invalid-token"), "expired.bin", &data);
}

/// PATCH bodies whose framing hyper refuses, or that end before their
/// `Content-Length` (the client's FIN), are answered 400 `bad-framing` naming what
/// was wrong; the bytes before the fault are kept (HEAD's offset), and the upload
/// resumes from there to the exact file. Before, the fault was taken for the
/// body's end: 204.
#[test]
fn a_malformed_or_truncated_patch_body_is_refused_keeping_what_came_before() {
    let p = Proxy::start("");
    create_folder(&p);
    let chunked = "Transfer-Encoding: chunked\r\n";
    let mut extension = b"3;".to_vec();
    extension.extend_from_slice(&[b'e'; 100_000]);
    extension.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
    // What each case is, its framing fields, its body, whether the client then
    // ends its sending side, what the refusal names, the bytes kept.
    type Case = (
        &'static str,
        &'static str,
        Vec<u8>,
        bool,
        &'static str,
        usize,
    );
    let cases: [Case; 5] = [
        (
            "bare LF",
            chunked,
            b"3\nabc\n0\n\n".to_vec(),
            false,
            "chunk size",
            0,
        ),
        (
            "a size not hex",
            chunked,
            b"3\r\nabc\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
            false,
            "chunk size",
            3,
        ),
        (
            "data past its size",
            chunked,
            b"3\r\nabcdef\r\n0\r\n\r\n".to_vec(),
            false,
            "chunk",
            3,
        ),
        (
            "an extension of 100 KB",
            chunked,
            extension,
            false,
            "extension",
            0,
        ),
        (
            "a Content-Length body cut by the client's FIN",
            "Content-Length: 50\r\n",
            b"abcdefghijklmnopqrst".to_vec(),
            true,
            "",
            20,
        ),
    ];
    for (i, (case, framing, body, shut, names, kept)) in cases.into_iter().enumerate() {
        let relpath = format!("bad{i}.bin");
        let token = upload_token(&p, &relpath, 100);
        let (r, text) = raw_patch(&p, &token, framing, &body, shut);
        assert_eq!(r.status, 400, "{case}: {text}");
        assert_eq!(r.json()["code"], "bad-framing", "{case}: {text}");
        let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
        assert!(
            title.starts_with("the request body could not be read (") && title.contains(names),
            "{case}: {title}"
        );
        let head = p.tus_head(&token);
        assert_eq!(
            head.header("upload-offset"),
            Some(kept.to_string().as_str()),
            "{case}"
        );
        // What was kept is the start of the body: the upload resumes to the file.
        let data = incompressible(100);
        let staged = std::fs::read_dir(p.vfolder_path().join(".upload"))
            .expect("staging")
            .flatten()
            .map(|e| std::fs::read(e.path()).expect("staged"))
            .next()
            .expect("the staged file");
        assert_eq!(staged.len(), kept, "{case}");
        let r = p.tus_patch(&token, &kept.to_string(), &data[kept..]);
        assert_eq!(
            r.status,
            204,
            "{case}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let mut want = staged;
        want.extend_from_slice(&data[kept..]);
        assert!(
            std::fs::read(p.vfolder_path().join(&relpath)).ok() == Some(want),
            "{case}: the stored file differs"
        );
    }
}

/// A client that lost the answer to its last PATCH asks HEAD where its upload
/// stands: while its token is valid HEAD answers the upload's size as its offset
/// (as the original did, its offset record kept 24 h), and a PATCH at that offset
/// is answered 204 again; one at another offset gets 409, one bringing bytes 413,
/// the file untouched. Before, both got 404: a tus client raised, and the user
/// uploaded the file again.
#[test]
fn a_completed_upload_answers_head_and_a_patch_at_its_end() {
    let p = Proxy::start("");
    let (data, token) = chunky_session(&p, "done.bin", 100);
    let r = p.tus_patch(&token, "0", &data);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    for _ in 0..2 {
        let head = p.tus_head(&token);
        assert_eq!(head.status, 200);
        assert_eq!(head.header("upload-offset"), Some("100"));
        assert_eq!(head.header("upload-length"), Some("100"));
        assert_eq!(head.header("tus-resumable"), Some("1.0.0"));
        let r = p.tus_patch(&token, "100", b"");
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("upload-offset"), Some("100"));
    }
    let r = p.tus_patch(&token, "0", &data);
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let r = p.tus_patch(&token, "100", b"more");
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(std::fs::read(p.vfolder_path().join("done.bin")).ok() == Some(data));
    assert_eq!(staged_files(&p), 0);
}

/// An empty upload is complete before any byte: the first HEAD puts the empty file
/// in place and answers the full offset, 0 (a tus client then sends nothing), and a
/// PATCH at 0 without a body completes one as well; either way the upload then
/// answers as any completed one (HEAD 200, a PATCH at its end 204, bytes past it
/// 413) and nothing stays staged.
#[test]
fn an_empty_upload_is_completed_by_its_first_head_or_patch() {
    let p = Proxy::start("");
    let (_, by_head) = chunky_session(&p, "empty-head.bin", 0);
    let head = p.tus_head(&by_head);
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(&head.body));
    assert_eq!(head.header("upload-offset"), Some("0"));
    assert_eq!(head.header("upload-length"), Some("0"));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("empty-head.bin")).ok(),
        Some(Vec::new())
    );
    let r = p.tus_patch(&by_head, "0", b"");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let r = p.tus_patch(&by_head, "0", b"x");
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let (_, by_patch) = chunky_session(&p, "empty-patch.bin", 0);
    let r = p.tus_patch(&by_patch, "0", b"");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("upload-offset"), Some("0"));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("empty-patch.bin")).ok(),
        Some(Vec::new())
    );
    let head = p.tus_head(&by_patch);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("upload-offset"), Some("0"));
    assert_eq!(staged_files(&p), 0);
}

/// An upload whose every byte is staged but whose completion failed (its
/// destination's directory not writable to the proxy: kept for a retry) is never
/// reported complete by HEAD while it is not in place: HEAD tries the completion
/// itself, answering its error, and once it can, completes it and answers the
/// full offset. Before, HEAD answered the full offset at once: a tus client took
/// the upload for done, and it was never put in place.
#[test]
fn head_never_reports_complete_an_upload_not_in_place() {
    use std::os::unix::fs::PermissionsExt as _;
    let p = Proxy::start_bound_by_permissions("");
    let (data, token) = chunky_session(&p, "ro/late.bin", 100);
    let ro = p.vfolder_path().join("ro");
    std::fs::create_dir(&ro).expect("dir");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let r = p.tus_patch(&token, "0", &data);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(staged_files(&p), 1, "kept for a retry");
    let head = p.tus_head(&token);
    assert!(
        !(head.status == 200 && head.header("upload-offset") == Some("100")),
        "HEAD reports complete an upload not in place: {} {:?}",
        head.status,
        head.header("upload-offset")
    );
    assert!(!ro.join("late.bin").exists());
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let head = p.tus_head(&token);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("upload-offset"), Some("100"));
    assert!(std::fs::read(ro.join("late.bin")).ok() == Some(data));
    assert_eq!(staged_files(&p), 0);
}

/// Makes in `dir` a directory `a` of `files` one-byte files `f0…` and the links
/// `l1`…`l{links}`, each `l_k -> a/../a/../…/l_{k-1}` (4 KB of `a/..`), `l1` leading
/// to `a`: a path `l{links}/f0` is legal and stays in the vfolder, but the kernel
/// walks some 2,000 components a link to resolve it.
fn costly_links(dir: &Path, links: usize, files: usize) {
    std::fs::create_dir_all(dir.join("a")).expect("a");
    for i in 0..files {
        std::fs::write(dir.join(format!("a/f{i}")), b"x").expect("f");
    }
    let pad = format!("a/..{}", "/a/..".repeat(799));
    for k in 1..=links {
        let target = if k == 1 {
            format!("{pad}/a")
        } else {
            format!("{pad}/l{}", k - 1)
        };
        std::os::unix::fs::symlink(target, dir.join(format!("l{k}"))).expect("link");
    }
}

/// Paths through a user's nested links cost the kernel some 10 ms each to resolve;
/// an archive token listing hundreds of them cost seconds of CPU to issue and again
/// at every download (38 CPU-seconds for 4,000 paths). A request's resolutions
/// through links are bounded (`fsx::RESOLVE_BUDGET`): past it, 400 naming the
/// limit, at once. The same links in a few paths, and many paths through a plain
/// link, still work.
#[test]
fn paths_through_costly_links_are_refused_past_the_resolution_budget() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    costly_links(&vf.join("ch"), 38, 1500);
    std::os::unix::fs::symlink("ch/l38", vf.join("L")).expect("L");
    std::os::unix::fs::symlink("ch/a", vf.join("plain")).expect("plain");
    let many: Vec<String> = (0..1500).map(|i| format!("L/f{i}")).collect();
    let started = std::time::Instant::now();
    let r = p.manager(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": many}),
        None,
    );
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 400, "{body}");
    assert!(body.contains("path resolution budget"), "{body}");
    assert!(body.contains("request_id"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // A delete of as many paths through them: refused alike, nothing deleted.
    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": many[..1000]}),
        None,
    );
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 400, "{body}");
    assert!(body.contains("path resolution budget"), "{body}");
    assert!(vf.join("ch/a/f1499").exists());
    // A few paths through the same links: within the budget, archived.
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["L/f0", "L/f1"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let names = zip_names(&r.body, p.dir.path()).expect("a valid zip");
    assert_eq!(names, vec!["'L/f0'".to_owned(), "'L/f1'".to_owned()]);
    // Every file through a plain link: cheap, archived whole.
    let plain: Vec<String> = (0..600).map(|i| format!("plain/f{i}")).collect();
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": plain}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(zip_names(&r.body, p.dir.path()).expect("zip").len(), 600);
}

/// A shell in the vfolder appends to an upload's staged file (its name is the
/// session ID) while a PATCH writes it: the staged file is then not the upload's
/// `Upload-Length`. Before, it was put in place anyway (10 MiB of the shell's
/// bytes between the client's) and answered 204; now 409 naming the cause, nothing
/// put in place, the upload discarded.
#[test]
fn a_staged_file_grown_during_its_patch_is_never_put_in_place() {
    let p = Proxy::start("");
    create_folder(&p);
    let size = 200_000usize;
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "grown.bin", "size": size}),
    );
    let staging = p.vfolder_path().join(".upload");
    let session = std::fs::read_dir(&staging)
        .expect("staging")
        .flatten()
        .map(|e| e.file_name())
        .next()
        .expect("a staging file");
    let staged = staging.join(&session);
    let mut s = TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: test\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    .expect("head");
    s.write_all(&vec![b'P'; size / 2]).expect("first half");
    // Once the first half is on disk, the shell adds its bytes.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&staged).map_or(0, |m| m.len()) < (size / 2) as u64 {
        assert!(std::time::Instant::now() < until, "the first half landed");
        std::thread::sleep(Duration::from_millis(10));
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&staged)
            .expect("staged");
        f.write_all(&vec![b'S'; 1 << 20]).expect("append");
    }
    s.write_all(&vec![b'P'; size / 2]).expect("second half");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("the answer");
    let r = appproxy_test_support::http::parse(&raw, false);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 409, "{body}");
    assert!(body.contains("changed by someone else"), "{body}");
    assert!(body.contains("request_id"), "{body}");
    assert!(!p.vfolder_path().join("grown.bin").exists(), "put in place");
    assert!(!staged.exists(), "the upload was discarded");
    assert!(alive(&p));
}

/// Fields and parameters that may be given once are refused when given twice
/// (400 JSON naming them), not served by one copy while a front proxy or log
/// reads the other; a tus PATCH declaring another protocol version is 412 with
/// `Tus-Version`, one declaring another body type 415. A PATCH as tus clients send
/// it, and one with neither field (as the original takes), are served.
#[test]
fn duplicated_fields_and_tus_preconditions_are_refused() {
    use appproxy_test_support::http::request;
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::write(p.vfolder_path().join("f.txt"), b"hello world\n").expect("f");
    let dl = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "f.txt"}),
    );
    let refused = |r: appproxy_test_support::http::Resp, status: u16, names: &str| {
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, status, "{names}: {body}");
        assert!(body.contains(names), "{names}: {body}");
        assert!(body.contains("request_id"), "{body}");
        r
    };
    let path = format!("/download?token={dl}");
    let r = request(
        p.client,
        "GET",
        &path,
        &[("Range", "bytes=0-1"), ("Range", "bytes=3-4")],
        b"",
    );
    refused(r, 400, "Range");
    let r = request(p.client, "GET", &path, &[("Range", "bytes=0-1")], b"");
    assert_eq!(r.status, 206);
    let r = request(
        p.client,
        "GET",
        &format!("/download?token=junk&token={dl}"),
        &[],
        b"",
    );
    refused(r, 400, "token");

    let up = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "u.bin", "size": 10}),
    );
    let path = format!("/upload?token={up}");
    let tus = [
        ("Tus-Resumable", "1.0.0"),
        ("Content-Type", "application/offset+octet-stream"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        tus.iter().chain(extra).copied().collect()
    };
    let r = request(
        p.client,
        "PATCH",
        &path,
        &with(&[("Upload-Offset", "0"), ("Upload-Offset", "5")]),
        b"01",
    );
    refused(r, 400, "Upload-Offset");
    let r = request(
        p.client,
        "PATCH",
        &path,
        &[
            ("Tus-Resumable", "0.2.2"),
            ("Content-Type", "application/offset+octet-stream"),
            ("Upload-Offset", "0"),
        ],
        b"01",
    );
    let r = refused(r, 412, "Tus-Resumable");
    assert_eq!(r.header("tus-version"), Some("1.0.0"));
    // A HEAD declaring another version is refused alike (tus 1.0: every request
    // but OPTIONS); before, it was answered 200.
    let r = request(p.client, "HEAD", &path, &[("Tus-Resumable", "0.2.2")], b"");
    assert_eq!(r.status, 412);
    assert_eq!(r.header("tus-version"), Some("1.0.0"));
    let r = request(p.client, "HEAD", &path, &tus[..1], b"");
    assert_eq!(r.status, 200);
    let r = request(
        p.client,
        "PATCH",
        &path,
        &[
            ("Tus-Resumable", "1.0.0"),
            ("Content-Type", "text/plain"),
            ("Upload-Offset", "0"),
        ],
        b"01",
    );
    let r = refused(r, 415, "Content-Type");
    // Every answer at /upload carries tus's headers, its errors too (a browser's
    // tus client reads none without CORS's): before, a 415, 409, 404 or 401 had
    // none.
    let tus_headed = |r: &appproxy_test_support::http::Resp| {
        assert_eq!(r.header("tus-resumable"), Some("1.0.0"), "{}", r.status);
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("*"),
            "{}",
            r.status
        );
    };
    tus_headed(&r);
    let wrong_offset = request(
        p.client,
        "PATCH",
        &path,
        &with(&[("Upload-Offset", "3")]),
        b"3",
    );
    assert_eq!(wrong_offset.status, 409);
    tus_headed(&wrong_offset);
    for (method, status) in [("PATCH", 401), ("HEAD", 401)] {
        let r = request(
            p.client,
            method,
            "/upload?token=junk",
            &with(&[("Upload-Offset", "0")]),
            b"",
        );
        assert_eq!(r.status, status, "{method}");
        tus_headed(&r);
    }
    // Nothing was written by the refused ones.
    let r = request(
        p.client,
        "PATCH",
        &path,
        &with(&[("Upload-Offset", "0")]),
        b"01234",
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("upload-offset"), Some("5"));
    let r = request(
        p.client,
        "PATCH",
        &path,
        &[("Upload-Offset", "5")],
        b"56789",
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("u.bin")).expect("placed"),
        b"0123456789"
    );
}

/// A staged file the proxy cannot reach for a reason other than its absence — its
/// mode taken away from a shell in the vfolder, or the staging area's (as a volume
/// gone read-only or failing does) — is answered 500 with the system's words, the
/// upload kept; once it can be reached again, the upload resumes where it stood.
/// Before, every such failure was a 404 "File not found", which a tus client takes
/// for an upload gone for good: a volume read-only for a while failed every upload
/// in progress (an outside tester's find).
#[test]
fn a_staged_file_out_of_reach_is_a_server_error_and_the_upload_resumes() {
    use std::os::unix::fs::PermissionsExt as _;
    let p = Proxy::start_bound_by_permissions("");
    create_folder(&p);
    let token = upload_token(&p, "resumed.txt", 5);
    assert_eq!(p.tus_patch(&token, "0", b"ab").status, 204, "{}", p.log());
    let staging = p.vfolder_path().join(".upload");
    let staged: Vec<_> = std::fs::read_dir(&staging)
        .expect("staging area")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    let out_of_reach = |r: &appproxy_test_support::http::Resp, what: &str| {
        assert_eq!(
            r.status,
            500,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let body = r.json();
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("could not be reached") && e.contains("denied")),
            "{what}: {body}"
        );
        assert!(body["request_id"].is_string(), "{what}: {body}");
    };
    // A HEAD's answer has no body: its status says it.
    let head_out_of_reach = |r: &appproxy_test_support::http::Resp, what: &str| {
        assert_eq!(r.status, 500, "{what}: {}", p.log());
    };
    // The staged file's mode taken away: the PATCH cannot open it.
    chmod(&staged[0], 0o000);
    out_of_reach(&p.tus_patch(&token, "2", b"cd"), "PATCH, file mode 000");
    let head = p.tus_head(&token);
    assert_eq!(head.status, 200, "HEAD looks without opening");
    assert_eq!(head.header("upload-offset"), Some("2"));
    chmod(&staged[0], 0o644);
    // The staging area's: neither HEAD nor PATCH can look into it.
    chmod(&staging, 0o000);
    head_out_of_reach(&p.tus_head(&token), "HEAD, staging area mode 000");
    out_of_reach(
        &p.tus_patch(&token, "2", b"cd"),
        "PATCH, staging area mode 000",
    );
    chmod(&staging, 0o755);
    // Nothing was lost: the upload resumes and completes.
    let head = p.tus_head(&token);
    assert_eq!(head.header("upload-offset"), Some("2"), "{}", p.log());
    let r = p.tus_patch(&token, "2", b"cde");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("resumed.txt")).expect("in place"),
        b"abcde"
    );
}

/// A `/download-archive` token listing the vfolder itself (`.`, or an empty path:
/// the issuer here refuses both, another sharing the secret may not) is refused as
/// at issue: 400, no archive begun. Before, it was honoured and every entry named
/// from the root (`/a.txt`), which the zip format forbids and a naive extractor
/// writes at the filesystem's root (an outside tester's find).
#[test]
fn an_archive_token_listing_the_vfolder_itself_is_refused() {
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::write(p.vfolder_path().join("a.txt"), b"a").expect("a");
    let exp = appproxy_shared::jwt::now_epoch() as u64 + 600;
    for files in [
        serde_json::json!(["."]),
        serde_json::json!([""]),
        serde_json::json!(["a.txt", "."]),
    ] {
        let token = appproxy_shared::jwt::sign_hs256(
            &serde_json::json!({"operation": "download", "volume": "local", "virtual_folder_id": VFID, "files": files, "exp": exp}),
            "session-key",
        );
        let r = p.client_get(
            &format!("/download-archive?token={token}"),
            Duration::from_secs(20),
        );
        assert_eq!(
            r.status,
            400,
            "{files}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("the vfolder itself")),
            "{files}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // A token of the file alone is served.
    let token = appproxy_shared::jwt::sign_hs256(
        &serde_json::json!({"operation": "download", "volume": "local", "virtual_folder_id": VFID, "files": ["a.txt"], "exp": exp}),
        "session-key",
    );
    let r = p.client_get(
        &format!("/download-archive?token={token}"),
        Duration::from_secs(20),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        zip_names(&r.body, p.dir.path()).expect("a valid zip"),
        ["'a.txt'"]
    );
}
