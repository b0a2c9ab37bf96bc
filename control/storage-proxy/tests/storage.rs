//! The storage-proxy binary end to end: manager API, tus uploads, ranged downloads,
//! traversal refusals, background jobs under the initiating request's ID, cleanup
//! under its own IDs, and streaming with bounded memory.

mod storage_common;

use appproxy_test_support::http::request;
use appproxy_test_support::net::ReadUninterrupted;
use appproxy_test_support::prom::Exposition;
use storage_common::{create_folder, Proxy, TOKEN, VFID};

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn manager_auth_and_request_ids() {
    let p = Proxy::start("");
    let r = request(p.manager, "GET", "/status", &[], b"");
    assert_eq!(r.status, 200);
    let generated = r
        .header("x-backend-request-id")
        .expect("generated and echoed")
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok());
    let r = request(
        p.manager,
        "GET",
        "/volumes",
        &[("X-Backend-Request-ID", "mgr-1")],
        b"",
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["title"], "Forbidden (missing auth token)");
    assert_eq!(r.header("x-backend-request-id"), Some("mgr-1"));
    assert_eq!(r.json()["request_id"], "mgr-1");
    let r = request(
        p.manager,
        "GET",
        "/volumes",
        &[("X-BackendAI-Storage-Auth-Token", "wrong")],
        b"",
    );
    assert_eq!(r.json()["title"], "Forbidden (invalid auth token)");
    let r = request(
        p.manager,
        "GET",
        "/volumes",
        &[("X-BackendAI-Storage-Auth-Token", TOKEN)],
        b"",
    );
    assert_eq!(r.json()["volumes"][0]["name"], "local");
    // The token given twice is refused whatever either copy holds (before, the
    // secret followed by a wrong value passed).
    for pair in [[TOKEN, "wrong"], ["wrong", TOKEN], [TOKEN, TOKEN]] {
        let r = request(
            p.manager,
            "GET",
            "/volumes",
            &[
                ("X-BackendAI-Storage-Auth-Token", pair[0]),
                ("X-BackendAI-Storage-Auth-Token", pair[1]),
            ],
            b"",
        );
        assert_eq!(r.status, 400, "{pair:?}");
        assert!(
            String::from_utf8_lossy(&r.body).contains("X-BackendAI-Storage-Auth-Token"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // The tests' session key is 11 bytes: said at start.
    let log = p.log_holding("session_secret is under 16 bytes");
    assert!(log.contains("\"bytes\":11"), "{log}");
    // Direct client calls with no header get a generated ID too.
    let r = request(p.client, "GET", "/", &[], b"");
    assert!(r.header("x-backend-request-id").is_some());
}

#[test]
fn tus_upload_resume_and_ranged_download() {
    let p = Proxy::start("");
    create_folder(&p);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let token = p.token("/folder/file/upload", serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "dir/data.bin", "size": data.len()}));
    let url = format!("/upload?token={token}");
    let r = request(p.client, "OPTIONS", "/upload", &[], b"");
    assert_eq!(r.header("tus-resumable"), Some("1.0.0"));
    let r = request(p.client, "HEAD", &url, &[], b"");
    assert_eq!((r.status, r.header("upload-offset")), (200, Some("0")));
    // First part, then an interruption: the file is not visible yet.
    let r = request(
        p.client,
        "PATCH",
        &url,
        &[("Upload-Offset", "0"), ("Tus-Resumable", "1.0.0")],
        &data[..40_000],
    );
    assert_eq!((r.status, r.header("upload-offset")), (204, Some("40000")));
    assert!(
        !p.vfolder_path().join("dir/data.bin").exists(),
        "a partial upload is never visible"
    );
    let r = request(p.client, "HEAD", &url, &[], b"");
    assert_eq!(r.header("upload-offset"), Some("40000"));
    // A wrong offset is refused.
    let r = request(
        p.client,
        "PATCH",
        &url,
        &[("Upload-Offset", "10")],
        &data[10..20],
    );
    assert_eq!(r.status, 409);
    let r = request(p.client, "PATCH", &url, &[], &data[40_000..]);
    assert_eq!(r.status, 400, "Upload-Offset is required");
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("Upload-Offset is required")),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // One sent but malformed is said to be so, not missing.
    for (malformed, said) in [
        ("+40000", "decimal digits"),
        ("-0", "decimal digits"),
        ("0x0", "decimal digits"),
        ("4e4", "decimal digits"),
        ("18446744073709551616", "out of range"),
    ] {
        let r = request(
            p.client,
            "PATCH",
            &url,
            &[("Upload-Offset", malformed)],
            &data[40_000..],
        );
        assert_eq!(r.status, 400, "{malformed}");
        assert!(
            r.json()["error"].as_str().is_some_and(|e| e.contains(said)),
            "{malformed}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = request(
        p.client,
        "PATCH",
        &url,
        &[("Upload-Offset", "40000")],
        &data[40_000..],
    );
    assert_eq!((r.status, r.header("upload-offset")), (204, Some("100000")));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("dir/data.bin")).expect("complete file"),
        data
    );
    // A forged or expired token is refused.
    let r = request(p.client, "HEAD", "/upload?token=not-a-token", &[], b"");
    assert_eq!(r.status, 401);

    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "dir/data.bin"}),
    );
    let r = request(
        p.client,
        "GET",
        &format!("/download?token={token}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert!(r
        .header("content-disposition")
        .is_some_and(|v| v.contains("data.bin")));
    let r = request(
        p.client,
        "GET",
        &format!("/download?token={token}"),
        &[("Range", "bytes=100-199")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/100000"));
    assert_eq!(r.body, &data[100..200]);
    let r = request(
        p.client,
        "GET",
        &format!("/download?token={token}"),
        &[("Range", "bytes=200000-")],
        b"",
    );
    assert_eq!(r.status, 416);
    // The listing shows the file, not the staging area.
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
        None,
    );
    let listing = r.json();
    let names: Vec<&str> = listing["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, vec!["dir"]);
}

#[test]
fn path_escapes_are_refused_and_touch_nothing() {
    let p = Proxy::start("");
    create_folder(&p);
    let outside = p.dir.path().join("vol/outside-marker");
    for (path, body) in [
        (
            "/folder/file/list",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "../.."}),
        ),
        (
            "/folder/file/download",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "/etc/passwd"}),
        ),
        (
            "/folder/file/upload",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "../../outside-marker", "size": 1}),
        ),
        (
            "/folder/file/delete",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["ok.txt", "../x"]}),
        ),
        (
            "/folder/create",
            serde_json::json!({"volume": "local", "vfid": "user:../../etc"}),
        ),
        (
            "/folder/file/rename",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "a", "new_name": "../b"}),
        ),
    ] {
        let r = p.manager(path, body, None);
        assert_eq!(
            r.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = p.manager(
        "/folder/file/mkdir",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": ["good", "../bad"]}),
        None,
    );
    assert_eq!(r.status, 207);
    assert!(p.vfolder_path().join("good").is_dir());
    assert!(!outside.exists());
    // A symlink inside the folder that points outside is not followed.
    std::os::unix::fs::symlink(p.dir.path(), p.vfolder_path().join("escape")).expect("symlink");
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "escape"}),
        None,
    );
    assert_eq!(r.status, 400);
}

#[test]
fn clone_runs_under_the_initiating_request_id() {
    let p = Proxy::start("");
    create_folder(&p);
    for d in ["a/b/c", "d"] {
        std::fs::create_dir_all(p.vfolder_path().join(d)).expect("tree");
    }
    for f in ["a/1.txt", "a/b/2.txt", "a/b/c/3.txt", "d/4.txt", "5.txt"] {
        std::fs::write(p.vfolder_path().join(f), f).expect("file");
    }
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000beef";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_volume": null, "dst_vfid": dst}),
        Some("clone-req-1"),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-backend-request-id"), Some("clone-req-1"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let done: Vec<_> = p
            .log_json()
            .into_iter()
            .filter(|v| v["message"] == "bgtask done")
            .collect();
        if !done.is_empty() {
            break done;
        }
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(done[0]["items"], 5);
    let job_lines: Vec<_> = p
        .log_json()
        .into_iter()
        .filter(|v| {
            ["bgtask started", "bgtask done", "directory cloned"]
                .contains(&v["message"].as_str().unwrap_or(""))
        })
        .collect();
    assert!(job_lines.len() >= 6, "{job_lines:?}");
    assert!(
        job_lines.iter().all(|v| v["request_id"] == "clone-req-1"),
        "{job_lines:?}"
    );
    let cloned = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/000000000000000000000000beef");
    assert_eq!(
        std::fs::read_to_string(cloned.join("a/b/c/3.txt")).expect("cloned"),
        "a/b/c/3.txt"
    );
}

#[test]
fn cleanup_removes_expired_uploads_under_its_own_ids() {
    let p = Proxy::start("upload_expire_secs = 1\ncleanup_interval_secs = 1\n");
    create_folder(&p);
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "x.bin", "size": 10}),
        Some("upload-req"),
    );
    assert_eq!(r.status, 200);
    let staging = p.vfolder_path().join(".upload");
    assert_eq!(std::fs::read_dir(&staging).expect("staging").count(), 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&staging).expect("staging").count() > 0 {
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The removal's line follows the file's unlink, and the pass's own line follows
    // its removals: wait for both (bounded). The pass's ID and every other pass's are
    // read from one copy of the log, so a pass logged meanwhile is counted on both sides.
    let (id, passes, count) = loop {
        let log = p.log_json();
        let removed = log
            .iter()
            .find(|v| v["message"] == "expired upload removed")
            .map(|v| {
                v["request_id"]
                    .as_str()
                    .expect("cleanup has an ID")
                    .to_owned()
            });
        let lines: Vec<_> = log
            .iter()
            .filter(|v| v["message"] == "expired-upload cleanup pass")
            .collect();
        let passes: std::collections::HashSet<String> = lines
            .iter()
            .filter_map(|v| v["request_id"].as_str().map(str::to_owned))
            .collect();
        if let Some(id) = removed.filter(|id| passes.contains(id)) {
            break (id, passes, lines.len());
        }
        assert!(
            Instant::now() < deadline,
            "no removal and its pass: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(id, "upload-req");
    assert_eq!(passes.len(), count, "each pass has an ID of its own");
}

/// Two processes sharing a volume (two nodes behind one address): a PATCH running
/// in one holds the upload from a PATCH sent through the other (409), as a second
/// PATCH through the same process is held. Before, each process held its own
/// uploads only: a tus client retrying through the other node had its PATCH
/// served, the file put in place, and the first PATCH's bytes then went on into
/// the placed file (3,000 bytes for an upload of 2,000; an outside tester's find).
#[test]
fn a_patch_running_in_one_process_holds_the_upload_from_another_sharing_the_volume() {
    let p = Proxy::start("");
    create_folder(&p);
    let other = p.beside();
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "two.bin", "size": 2000}),
    );
    // A vfolder user (read-only, even) holding a `flock` on the staged file
    // holds up nothing: the lock is the proxy's own, outside the vfolder.
    let session = p.tus_head(&token);
    assert_eq!(session.status, 200);
    let staged: Vec<_> = std::fs::read_dir(p.vfolder_path().join(".upload"))
        .expect("staging")
        .flatten()
        .collect();
    assert_eq!(staged.len(), 1);
    let user = std::fs::File::open(staged[0].path()).expect("the staged file, read-only");
    rustix::fs::flock(&user, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .expect("the user's lock");
    let mut slow = TcpStream::connect(p.client).expect("connect");
    write!(slow, "PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nContent-Length: 2000\r\n\r\n").expect("head");
    slow.write_all(&[b'A'; 1000]).expect("the first half");
    // The other process sees the first half on disk (a retrying client's HEAD).
    let deadline = Instant::now() + Duration::from_secs(20);
    while other.tus_head(&token).header("Upload-Offset") != Some("1000") {
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = other.tus_patch(&token, "1000", &[b'B'; 1000]);
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        String::from_utf8_lossy(&r.body).contains("another PATCH to this upload is in progress"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        !p.vfolder_path().join("two.bin").exists(),
        "nothing in place yet"
    );
    // The first PATCH ends the upload, exactly its bytes.
    slow.write_all(&[b'a'; 1000]).expect("the second half");
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = slow.read_uninterrupted(&mut buf).expect("response");
        assert!(n > 0, "{}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    assert!(
        raw.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let stored = std::fs::read(p.vfolder_path().join("two.bin")).expect("the upload");
    assert_eq!(stored.len(), 2000);
    assert!(stored[..1000].iter().all(|&b| b == b'A') && stored[1000..].iter().all(|&b| b == b'a'));
    // Completed, the other process has nothing left to write to.
    let r = other.tus_patch(&token, "1000", &[b'B'; 1000]);
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(p.vfolder_path().join("two.bin")).expect("the upload"),
        stored
    );
    drop(user);
    // The lock is no file of the vfolder's, and is gone with its PATCH.
    let locks = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/.appproxy-upload-locks");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&locks)
            .expect("the volume's lock directory")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&locks).expect("locks").next().is_some() {
        assert!(Instant::now() < deadline, "a lock file left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn concurrent_patches_are_refused_and_large_files_stream() {
    const SIZE: usize = 256 << 20;
    let p = Proxy::start("max_upload_size = 1073741824\n");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "big.bin", "size": SIZE}),
    );
    // A PATCH in flight holds the upload: a second one gets 409.
    let mut slow = TcpStream::connect(p.client).expect("connect");
    write!(slow, "PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nContent-Length: {SIZE}\r\n\r\n").expect("head");
    let block = vec![7u8; 1 << 20];
    slow.write_all(&block).expect("first MiB");
    // Wait (bounded) until the proxy counts the first PATCH in progress.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = request(p.manager, "GET", "/metrics", &[], b"");
        let metrics = Exposition::parse(&String::from_utf8_lossy(&r.body));
        if metrics.value("storage_proxy_uploads_in_progress", "") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first PATCH was never in progress: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = request(
        p.client,
        "PATCH",
        &format!("/upload?token={token}"),
        &[("Upload-Offset", "0")],
        b"x",
    );
    assert_eq!(r.status, 409);
    for _ in 1..(SIZE >> 20) {
        slow.write_all(&block).expect("upload");
    }
    let mut raw = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = slow.read_uninterrupted(&mut buf).expect("response");
        assert!(n > 0);
        raw.extend_from_slice(&buf[..n]);
    }
    assert!(
        raw.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // Download it back and check the memory of the process.
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "big.bin"}),
    );
    let mut s = TcpStream::connect(p.client).expect("connect");
    write!(
        s,
        "GET /download?token={token} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .expect("get");
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read_uninterrupted(&mut buf).expect("download");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(total > SIZE, "head and body: {total}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).expect("status");
    let peak: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB for 256 MiB each way");
}

#[test]
fn directory_downloads_are_valid_zip_archives() {
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::create_dir_all(p.vfolder_path().join("models/sub")).expect("tree");
    std::fs::write(p.vfolder_path().join("models/a.txt"), "alpha").expect("file");
    std::fs::write(
        p.vfolder_path().join("models/sub/b.bin"),
        vec![9u8; 200_000],
    )
    .expect("file");
    std::fs::write(p.vfolder_path().join("models/sub/üñí.txt"), "unicode").expect("file");
    // 2021-06-01 12:34:56 UTC: each entry carries its file's time (before, every
    // one was dated 1980-01-01 00:00).
    std::fs::File::options()
        .write(true)
        .open(p.vfolder_path().join("models/a.txt"))
        .expect("file")
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_622_550_896))
        .expect("mtime");
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "models"}),
    );
    let r = request(
        p.client,
        "GET",
        &format!("/download?token={token}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 400, "a directory needs archive=true");
    let r = request(
        p.client,
        "GET",
        &format!("/download?token={token}&archive=true"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/zip"));
    let zip = p.dir.path().join("out.zip");
    std::fs::write(&zip, &r.body).expect("zip");
    // An independent reader (Python's zipfile) checks every CRC and lists the names.
    let text = storage_common::python(
        "import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nprint('|'.join(sorted(z.namelist())))\nprint(len(z.read('sub/b.bin')))\nprint(z.getinfo('a.txt').date_time)",
        &zip,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("a.txt|sub/b.bin|sub/üñí.txt"));
    assert_eq!(lines.next(), Some("200000"));
    assert_eq!(lines.next(), Some("(2021, 6, 1, 12, 34, 56)"));
}

#[test]
fn quota_is_enforced_and_delete_async_keeps_the_request_id() {
    let p = Proxy::start("");
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": VFID, "options": {"initial_max_size_for_quota_scope": 1000}}),
        None,
    );
    assert_eq!(r.status, 204);
    std::fs::write(p.vfolder_path().join("used.bin"), vec![0u8; 600]).expect("file");
    let qs =
        serde_json::json!({"volume": "local", "qsid": "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"});
    let r = p.manager("/quota-scope", qs.clone(), None);
    assert_eq!(
        (
            r.json()["used_bytes"].as_u64(),
            r.json()["limit_bytes"].as_u64()
        ),
        (Some(600), Some(1000))
    );
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "more.bin", "size": 500}),
        None,
    );
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["type"],
        "https://api.backend.ai/probs/storage/quota-exceeded"
    );
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "more.bin", "size": 300}),
        None,
    );
    assert_eq!(r.status, 200);
    let mut raise = qs.clone();
    raise["options"] = serde_json::json!({"limit_bytes": 10_000});
    let r = request(
        p.manager,
        "PATCH",
        "/quota-scope",
        &[
            ("X-BackendAI-Storage-Auth-Token", TOKEN),
            ("Content-Type", "application/json"),
        ],
        raise.to_string().as_bytes(),
    );
    assert_eq!(r.status, 204);
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "more.bin", "size": 500}),
        None,
    );
    assert_eq!(r.status, 200);

    std::fs::create_dir_all(p.vfolder_path().join("tree/deep")).expect("tree");
    std::fs::write(p.vfolder_path().join("tree/deep/x"), "x").expect("file");
    let r = p.manager(
        "/folder/file/delete-async",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["tree"], "recursive": true}),
        Some("delete-req-1"),
    );
    assert_eq!(r.status, 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.vfolder_path().join("tree").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines: Vec<_> = p
            .log_json()
            .into_iter()
            .filter(|v| v["task"] == "delete_files")
            .collect();
        if lines.iter().any(|v| v["message"] == "bgtask done") {
            assert!(
                lines.iter().all(|v| v["request_id"] == "delete-req-1"),
                "{lines:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A bgtask's events carry the request that started it, and none is lost to a
/// Redis restarted since the proxy connected: the first event after a restart met
/// the stale connection (a broken pipe) and was dropped, never sent again (a short
/// task's `bgtask_done`, and the manager never learned the task ended).
#[test]
fn bgtask_events_carry_the_initiating_request_id() {
    let mut redis = appproxy_test_support::redis::Redis::start();
    let url = redis.url();
    let p = Proxy::start_with("", &format!("[redis]\nurl = \"{url}\"\n"));
    create_folder(&p);
    redis.restart();
    let mut conn = events_of(&url);
    let mut sub = conn.as_pubsub();
    sub.subscribe("events_all").expect("subscribe");
    sub.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let r = clone_with_a_file(&p, "cafe", "evt-req-1");
    let task = r.json()["bgtask_id"].as_str().expect("id").to_owned();
    let mut names = Vec::new();
    loop {
        let msg = sub.get_message().expect("an event");
        let text: String = msg.get_payload().expect("text");
        let envelope: serde_json::Value = serde_json::from_str(&text).expect("envelope");
        let payload: serde_json::Value =
            serde_json::from_str(envelope["payload"].as_str().expect("payload is JSON text"))
                .expect("json");
        let meta: serde_json::Value = serde_json::from_str(
            envelope["metadata"]
                .as_str()
                .expect("metadata is JSON text"),
        )
        .expect("json");
        assert_eq!(envelope["source"], "storage-proxy");
        assert_eq!(payload["task_id"], task.as_str());
        assert_eq!(meta["request_id"], "evt-req-1");
        let name = envelope["name"].as_str().expect("name").to_owned();
        names.push(name.clone());
        if name == "bgtask_done" {
            break;
        }
    }
    assert_eq!(names, vec!["bgtask_updated", "bgtask_done"]);
}

/// A Redis frozen when the proxy starts keeps neither its APIs from serving nor a
/// stop from stopping: the event bus is connected in the background, and events go
/// out once it answers. Before, the proxy waited for it before its listeners,
/// silent and deaf to `SIGTERM` (for ever; 473 s with no Redis at all), and every
/// vfolder operation was down for events that are optional (an outside tester's
/// find).
#[test]
fn a_redis_frozen_at_start_holds_up_neither_serving_nor_stopping() {
    let redis = appproxy_test_support::redis::Redis::start();
    let url = redis.url();
    redis.pause();
    let p = Proxy::start_with("", &format!("[redis]\nurl = \"{url}\"\n"));
    create_folder(&p);
    let event_bus = "event bus connected";
    assert!(
        !p.log().contains(event_bus),
        "connected to a frozen Redis: {}",
        p.log()
    );
    // Stopped while Redis is still frozen: it stops at once, not when Redis answers.
    let q = Proxy::start_with("", &format!("[redis]\nurl = \"{url}\"\n"));
    let pid = q.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut q = q;
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "no exit on SIGTERM: {}", q.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Once Redis answers, the bus is connected and events go out.
    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.log().contains(event_bus) {
        assert!(Instant::now() < deadline, "not connected: {}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut conn = events_of(&url);
    let mut sub = conn.as_pubsub();
    sub.subscribe("events_all").expect("subscribe");
    sub.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    clone_with_a_file(&p, "beef", "evt-after-resume");
    let msg = sub.get_message().expect("an event");
    let text: String = msg.get_payload().expect("text");
    assert!(text.contains("evt-after-resume"), "{text}");
}

/// Redis answers cut short for a while (a balancer resetting connections
/// mid-answer) stop events only while they last. Before, a reconnection whose
/// handshake met an answer cut short (its retries spent within the window) kept
/// that failure, and no event went out again until the proxy was restarted.
#[test]
fn events_go_out_again_once_redis_answers_whole() {
    let redis = appproxy_test_support::redis::Redis::start();
    let relay = appproxy_test_support::relay::Relay::start(([127, 0, 0, 1], redis.port).into());
    // A database other than 0: the handshake selects it.
    let p = Proxy::start_with(
        "",
        &format!("[redis]\nurl = \"redis://{}/3\"\n", relay.addr),
    );
    create_folder(&p);
    p.log_holding("event bus connected");
    relay.cut(true);
    let cut_since = Instant::now();
    // Events meanwhile are not published (logged), for longer than the client
    // library's own reconnection retries last.
    let mut n = 0;
    while cut_since.elapsed() < Duration::from_secs(10) {
        n += 1;
        clone_with_a_file(&p, &format!("c{n}"), &format!("evt-cut-{n}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(p.log().contains("event not published"), "{}", p.log());
    relay.cut(false);
    let mut conn = events_of(&redis.url());
    let mut sub = conn.as_pubsub();
    sub.subscribe("events_all").expect("subscribe");
    sub.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        n += 1;
        let id = format!("evt-whole-{n}");
        clone_with_a_file(&p, &format!("d{n}"), &id);
        let heard = sub
            .get_message()
            .ok()
            .and_then(|m| m.get_payload::<String>().ok());
        if heard.is_some_and(|text| text.contains("evt-whole-")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event went out once Redis answered whole again: {}",
            p.log()
        );
    }
}

/// A connection to the Redis at `url`, to subscribe to the proxy's events on.
fn events_of(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).expect("client");
    client.get_connection().expect("connection")
}

/// Puts a file in the test's vfolder and clones it (a bgtask, with events) into a
/// new one whose ID ends in `last` (hex), under `request_id`: the clone's answer.
fn clone_with_a_file(p: &Proxy, last: &str, request_id: &str) -> appproxy_test_support::http::Resp {
    std::fs::write(p.vfolder_path().join("f.txt"), "x").expect("file");
    let dst = format!("user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/{last:0>32}");
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        Some(request_id),
    );
    assert_eq!(r.status, 200);
    r
}

/// An upload token is checked against `max_upload_size` when it is used, as when
/// it was issued: one issued before the limit was lowered (or by another issuer
/// sharing the secret) uploads nothing past it. Before, a 5,000-byte token was
/// written whole to a proxy whose limit was 1,000 (an outside tester's find).
#[test]
fn an_upload_token_past_the_size_limit_is_refused_at_use() {
    let mut p = Proxy::start("max_upload_size = 5000\n");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "big.bin", "size": 5000}),
    );
    let config = p.dir.path().join("storage.toml");
    let lowered = std::fs::read_to_string(&config)
        .expect("config")
        .replace("max_upload_size = 5000", "max_upload_size = 1000");
    std::fs::write(&config, lowered).expect("config");
    p.restart();
    let r = p.tus_patch(&token, "0", &[7u8; 5000]);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(!p.vfolder_path().join("big.bin").exists());
    let r = p.tus_head(&token);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    // A token within the limit still uploads.
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "small.bin", "size": 1000}),
    );
    let r = p.tus_patch(&token, "0", &[7u8; 1000]);
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn expired_session_tokens_are_refused() {
    let p = Proxy::start("");
    create_folder(&p);
    let expired = appproxy_shared::jwt::sign_hs256(
        &serde_json::json!({"op": "download", "volume": "local", "vfid": VFID, "relpath": "x", "exp": 1}),
        "session-key",
    );
    let r = request(
        p.client,
        "GET",
        &format!("/download?token={expired}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 401);
    let upload = appproxy_shared::jwt::sign_hs256(
        &serde_json::json!({"op": "upload", "volume": "local", "vfid": VFID, "relpath": "x", "size": 1, "session": "0123456789abcdef0123456789abcdef", "exp": 1}),
        "session-key",
    );
    let r = request(
        p.client,
        "HEAD",
        &format!("/upload?token={upload}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 401);
    // A download token is not an upload token.
    let download = appproxy_shared::jwt::sign_hs256(
        &serde_json::json!({"op": "download", "volume": "local", "vfid": VFID, "relpath": "x", "size": 1, "session": "0123456789abcdef0123456789abcdef"}),
        "session-key",
    );
    let r = request(
        p.client,
        "HEAD",
        &format!("/upload?token={download}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 401);
}

/// RFC 9110 §14.1.2: a last-byte-pos past the end means the end, however large
/// (even past 2^64: it was answered 416, as an unparsable number), a suffix longer
/// than the file means the whole file, and the range unit is case-insensitive
/// (`BYTES=` was ignored: 200 with the whole file). A first-byte-pos past the end
/// is still unsatisfiable.
#[test]
fn over_large_range_positions_mean_the_end_of_the_file() {
    let p = Proxy::start("");
    create_folder(&p);
    let data: Vec<u8> = (0..1_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(p.vfolder_path().join("f.bin"), &data).expect("file");
    let cases: [(&str, u16, &str, std::ops::Range<usize>); 7] = [
        (
            "bytes=0-99999999999999999999",
            206,
            "bytes 0-999/1000",
            0..1000,
        ),
        (
            "bytes=-99999999999999999999",
            206,
            "bytes 0-999/1000",
            0..1000,
        ),
        (
            "bytes=10-18446744073709551616",
            206,
            "bytes 10-999/1000",
            10..1000,
        ),
        (
            "bytes=0-18446744073709551615",
            206,
            "bytes 0-999/1000",
            0..1000,
        ),
        ("BYTES=0-1", 206, "bytes 0-1/1000", 0..2),
        ("Bytes=-5", 206, "bytes 995-999/1000", 995..1000),
        ("bytes=99999999999999999999-", 416, "bytes */1000", 0..0),
    ];
    for (range, status, content_range, body) in cases {
        let r = p.download("f.bin", "", &[("Range", range)]);
        assert_eq!(r.status, status, "{range}");
        assert_eq!(r.header("content-range"), Some(content_range), "{range}");
        if status == 206 {
            assert_eq!(r.body, &data[body], "{range}");
        }
    }
}

/// An empty `dst_dir` on a tus `HEAD` or `PATCH` is the vfolder's root, as the
/// original's path join makes it; it was joined as `/<relpath>` and refused as an
/// escape (400).
#[test]
fn an_empty_dst_dir_is_the_vfolder_root() {
    let p = Proxy::start("");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "x.bin", "size": 3}),
    );
    let url = format!("/upload?token={token}&dst_dir=");
    let r = request(p.client, "HEAD", &url, &[], b"");
    assert_eq!((r.status, r.header("upload-offset")), (200, Some("0")));
    let r = request(p.client, "PATCH", &url, &[("Upload-Offset", "0")], b"abc");
    assert_eq!(
        (r.status, r.header("upload-offset")),
        (204, Some("3")),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        std::fs::read(p.vfolder_path().join("x.bin")).expect("x.bin"),
        b"abc"
    );
    // `/` is still absolute, refused as before.
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "y.bin", "size": 3}),
    );
    let r = request(
        p.client,
        "HEAD",
        &format!("/upload?token={token}&dst_dir=/"),
        &[],
        b"",
    );
    assert_eq!(r.status, 400);
}

/// A `dst_dir` that makes the destination longer than a path may be (4095 bytes)
/// is refused before anything is made. Before, a 65 KB `dst_dir` of `a/a/a/…` made
/// 32,577 nested directories (127 MB of blocks, counted in no quota) for one empty
/// upload, and every upload token was good for as many.
#[test]
fn a_dst_dir_longer_than_a_path_makes_nothing() {
    let p = Proxy::start("");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "z.bin", "size": 0}),
    );
    let deep = "a/".repeat(32_000);
    let r = request(
        p.client,
        "PATCH",
        &format!("/upload?token={token}&dst_dir={deep}"),
        &[("Upload-Offset", "0")],
        b"",
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        String::from_utf8_lossy(&r.body).contains("more than the 4095 bytes a path may have"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(!p.vfolder_path().join("a").exists(), "no directory made");
    // Within the limit, the directories are made as before.
    let within = "a/".repeat(1_000);
    let r = request(
        p.client,
        "PATCH",
        &format!("/upload?token={token}&dst_dir={within}"),
        &[("Upload-Offset", "0")],
        b"",
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert!(p.vfolder_path().join(within).join("z.bin").is_file());
}

/// A query naming bytes that are not UTF-8 (`dst_dir=%FF`) is refused (400),
/// nothing made: decoded lossily, as it was, `%FF` named `U+FFFD`, and the upload
/// landed in a directory of that name, made for it, rather than the one meant. A
/// UTF-8 name, escaped, is taken as before.
#[test]
fn a_query_that_is_not_utf8_is_refused() {
    let p = Proxy::start("");
    create_folder(&p);
    for (dst_dir, status) in [
        ("%FF", 400),
        ("d%2Fa%FF", 400),
        ("%ED%B3%BF", 400),
        ("%C0%AE%C0%AE", 400),
        ("d%C3%A9", 204),
    ] {
        let token = p.token(
            "/folder/file/upload",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "u.txt", "size": 3}),
        );
        let url = format!("/upload?token={token}&dst_dir={dst_dir}");
        let r = request(p.client, "PATCH", &url, &[("Upload-Offset", "0")], b"abc");
        assert_eq!(
            r.status,
            status,
            "{dst_dir}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let mut made: Vec<String> = std::fs::read_dir(p.vfolder_path())
        .expect("vfolder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".upload")
        .collect();
    made.sort();
    assert_eq!(made, ["dé"], "nothing else was made");
    assert_eq!(
        std::fs::read(p.vfolder_path().join("dé/u.txt")).expect("u.txt"),
        b"abc"
    );
}

/// The cleanup pass opens a vfolder's staging area by name and never lists the
/// vfolder itself (a user can fill it with millions of entries, which a listing
/// would hold in memory at each pass): here the proxy may enter the vfolder but
/// not read it (`chmod 111`, the proxy bound by file permissions), and the expired
/// upload is still removed.
#[test]
fn cleanup_finds_expired_uploads_without_listing_the_vfolder() {
    use std::os::unix::fs::PermissionsExt as _;
    let p =
        Proxy::start_bound_by_permissions("upload_expire_secs = 1\ncleanup_interval_secs = 1\n");
    create_folder(&p);
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "x.bin", "size": 10}),
        None,
    );
    assert_eq!(r.status, 200);
    let root = p.vfolder_path();
    let staging = root.join(".upload");
    assert_eq!(std::fs::read_dir(&staging).expect("staging").count(), 1);
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o111)).expect("chmod");
    let deadline = Instant::now() + Duration::from_secs(20);
    let gone = loop {
        if std::fs::read_dir(&staging).expect("staging").count() == 0 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod back");
    assert!(gone, "the expired upload was not removed: {}", p.log());
}

/// Fills the test's vfolder with `n` one-byte files in directories of 1,000, for a
/// clone that runs long enough to be cut off.
fn many_files(p: &Proxy, n: usize) {
    for i in 0..n {
        let dir = p.vfolder_path().join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).expect("dir");
        }
        std::fs::write(dir.join(format!("f{i}")), "x").expect("file");
    }
}

/// The directory the clone destination `last` (see [`clone_with_a_file`]) is made
/// in, and its own path there.
fn clone_dst(p: &Proxy, last: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let hex = format!("{last:0>32}");
    let parent = p.dir.path().join(format!(
        "vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/{}/{}",
        &hex[..2],
        &hex[2..4]
    ));
    let own = parent.join(&hex[4..]);
    (parent, own)
}

/// A clone's copy not yet in place, in `parent` (a name `.<dst>.clone-<hex>`).
fn clone_copies(parent: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(parent)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".clone-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (a hang guard) until a clone's copy is being made in `parent`.
fn copy_under_way(p: &Proxy, parent: &std::path::Path) -> std::path::PathBuf {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(copy) = clone_copies(parent).pop() {
            return copy;
        }
        assert!(Instant::now() < deadline, "no copy under way: {}", p.log());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Files under `dir`, counted.
fn files_under(dir: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            if e.file_type().expect("type").is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// A stop during a clone ends it: the task is told cancelled (`bgtask_cancelled`,
/// as the original's task manager tells a task cut by its shutdown), the copy
/// stops and no vfolder is left half copied, and the proxy exits; started again, a
/// clone to the same vfolder runs whole. Before, the stop waited for the whole copy
/// (34 s for 150,000 files, past any unit's stop timeout, which then killed it
/// part way) and told nothing: the manager never learned the task ended (an
/// outside tester's find).
#[test]
fn a_clone_cut_off_by_a_stop_is_told_cancelled_and_leaves_no_vfolder() {
    let redis = appproxy_test_support::redis::Redis::start();
    let url = redis.url();
    let mut p = Proxy::start_with("", &format!("[redis]\nurl = \"{url}\"\n"));
    create_folder(&p);
    many_files(&p, 40_000);
    let mut conn = events_of(&url);
    let mut sub = conn.as_pubsub();
    sub.subscribe("events_all").expect("subscribe");
    sub.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let (parent, dst) = clone_dst(&p, "c10e");
    let r = clone_with_a_file(&p, "c10e", "clone-cut-off");
    let task = r.json()["bgtask_id"].as_str().expect("id").to_owned();
    copy_under_way(&p, &parent);
    let pid = p.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "no exit on SIGTERM: {}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut names = Vec::new();
    while names.last().map(String::as_str) != Some("bgtask_cancelled") {
        let Ok(msg) = sub.get_message() else {
            panic!("no end told for the task: {names:?}; {}", p.log())
        };
        let text: String = msg.get_payload().expect("text");
        let envelope: serde_json::Value = serde_json::from_str(&text).expect("envelope");
        let payload: serde_json::Value =
            serde_json::from_str(envelope["payload"].as_str().expect("payload")).expect("json");
        assert_eq!(payload["task_id"], task.as_str());
        names.push(envelope["name"].as_str().expect("name").to_owned());
        assert!(
            !names.iter().any(|n| n == "bgtask_done"),
            "the clone ran to its end before the stop: {names:?}"
        );
    }
    assert_eq!(names, ["bgtask_updated", "bgtask_cancelled"]);
    assert!(
        std::fs::symlink_metadata(&dst).is_err(),
        "a vfolder left at the destination: {} files",
        files_under(&dst)
    );
    assert!(p.log().contains("bgtask cancelled"), "{}", p.log());
    // Started again: the clone to the same vfolder runs whole.
    p.restart();
    let r = clone_with_a_file(&p, "c10e", "clone-again");
    assert_eq!(r.status, 200);
    assert!(p.wait_bgtask(Duration::from_secs(120)), "{}", p.log());
    assert_eq!(files_under(&dst), 40_001);
}

/// A clone killed part way (`SIGKILL`, the host down) leaves no vfolder half copied:
/// the copy is made under a hidden name beside the destination and put in place
/// whole; a clone to it again runs whole, and the cleanup removes the copy left
/// behind once untouched for hours. Before, the copy was made in place: the
/// partial vfolder was served and counted, and a clone to it again was refused
/// "destination vfolder exists" (an outside tester's find).
#[test]
fn a_clone_killed_part_way_leaves_no_vfolder_and_its_copy_is_swept() {
    let mut p = Proxy::start("cleanup_interval_secs = 1\n");
    create_folder(&p);
    many_files(&p, 40_000);
    let (parent, dst) = clone_dst(&p, "c11e");
    std::fs::write(p.vfolder_path().join("f.txt"), "x").expect("file");
    let used = |p: &Proxy| {
        let r = p.manager_method(
            "GET",
            "/quota-scope",
            serde_json::json!({"volume": "local", "qsid": "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["used_bytes"].as_u64().expect("used_bytes")
    };
    clone_with_a_file(&p, "c11e", "clone-killed");
    let copy = copy_under_way(&p, &parent);
    p.restart();
    assert!(
        std::fs::symlink_metadata(&dst).is_err(),
        "a vfolder left at the destination: {} files",
        files_under(&dst)
    );
    assert!(copy.is_dir(), "the copy cut off is kept for hours");
    // Garbage of the proxy's, not the scope's committed bytes: the source's 40,001
    // one-byte files alone (measured afresh after the restart).
    assert_eq!(used(&p), 40_001, "the copy left behind counts in the scope");
    // Not yet old: the cleanup leaves it (a clone of another process may be
    // making it).
    let r = clone_with_a_file(&p, "c11e", "clone-again");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(p.wait_bgtask(Duration::from_secs(120)), "{}", p.log());
    assert_eq!(files_under(&dst), 40_001);
    assert!(copy.is_dir(), "{}", p.log());
    // Untouched for seven hours: removed by the next cleanup pass.
    let seven_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7 * 3600);
    std::fs::File::open(&copy)
        .expect("the copy")
        .set_modified(seven_hours_ago)
        .expect("mtime");
    let deadline = Instant::now() + Duration::from_secs(60);
    while copy.exists() {
        assert!(Instant::now() < deadline, "never swept: {}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    p.log_holding("a clone's copy left by a clone cut off removed");
    assert_eq!(files_under(&dst), 40_001, "the clone in place untouched");
    assert!(clone_copies(&parent).is_empty());
}

/// A second stop signal while the proxy drains (an upload's body still arriving)
/// ends it at once. Before, the handlers stayed installed with nothing watching
/// them: a second SIGTERM, SIGINT or SIGQUIT was swallowed, and only SIGKILL ended
/// a drain held up (an outside tester's find).
#[test]
fn a_second_stop_signal_ends_the_drain() {
    let mut p = Proxy::start("");
    create_folder(&p);
    let token = p.token(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "slow.bin", "size": 1000}),
    );
    let mut s = TcpStream::connect(p.client).expect("connect");
    write!(
        s,
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: test\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nContent-Length: 1000\r\n\r\nabc"
    )
    .expect("head");
    // Its body still arriving when the stop comes: the drain waits for it.
    std::thread::sleep(Duration::from_millis(300));
    let pid = p.child.id().to_string();
    for _ in 0..2 {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "no exit: {}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        p.log().contains("a second stop signal: exiting now"),
        "{}",
        p.log()
    );
    drop(s);
}
