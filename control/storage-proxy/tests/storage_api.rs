//! The original storage-proxy's remaining manager routes (usage by GET, used bytes,
//! filesystem usage, mount path, metadata, fetch, archive-download tokens and the
//! client's `/download-archive`, hardware info, performance metric, the deprecated
//! per-vfolder quota), `mode` on folder creation, 410 for deleting a vfolder that is
//! gone, and the Prometheus `/metrics`.

mod storage_common;

use appproxy_test_support::http::request;
use storage_common::{create_folder, Proxy, TOKEN, VFID};

fn body(extra: serde_json::Value) -> serde_json::Value {
    let mut b = serde_json::json!({"volume": "local", "vfid": VFID});
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    b
}

#[test]
fn usage_mount_metadata_and_volume_routes() {
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::create_dir_all(p.vfolder_path().join("d")).expect("d");
    std::fs::write(p.vfolder_path().join("d/a.bin"), vec![1u8; 300]).expect("a");
    std::fs::write(p.vfolder_path().join("b.bin"), vec![1u8; 200]).expect("b");
    let r = p.manager_method("GET", "/folder/usage", body(serde_json::json!({})));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        (
            r.json()["file_count"].as_u64(),
            r.json()["used_bytes"].as_u64()
        ),
        (Some(2), Some(500))
    );
    let r = p.manager_method("GET", "/folder/used-bytes", body(serde_json::json!({})));
    assert_eq!(r.json()["used_bytes"], 500);
    let r = p.manager_method(
        "GET",
        "/folder/fs-usage",
        serde_json::json!({"volume": "local"}),
    );
    let cap = r.json()["capacity_bytes"].as_u64().expect("capacity");
    let used = r.json()["used_bytes"].as_u64().expect("used");
    assert!(cap > 0 && used <= cap);
    let r = p.manager_method("GET", "/folder/mount", body(serde_json::json!({})));
    assert_eq!(
        r.json()["path"].as_str().map(std::path::PathBuf::from),
        Some(std::fs::canonicalize(p.vfolder_path()).expect("canon"))
    );
    let r = p.manager_method(
        "GET",
        "/folder/mount",
        body(serde_json::json!({"subpath": "d"})),
    );
    assert!(r.json()["path"].as_str().is_some_and(|s| s.ends_with("/d")));
    for bad in ["../..", "missing"] {
        let r = p.manager_method(
            "GET",
            "/folder/mount",
            body(serde_json::json!({"subpath": bad})),
        );
        assert!([400, 404].contains(&r.status), "{bad}: {}", r.status);
    }
    std::os::unix::fs::symlink("d", p.vfolder_path().join("link")).expect("link");
    let r = p.manager_method(
        "GET",
        "/folder/mount",
        body(serde_json::json!({"subpath": "link"})),
    );
    assert_eq!(r.status, 400, "a mount path never goes through a symlink");
    for method in ["GET", "POST"] {
        let r = p.manager_method(
            method,
            "/folder/metadata",
            body(serde_json::json!({"payload": ""})),
        );
        assert_eq!(r.json()["status"], "ok");
    }
    let r = p.manager_method(
        "GET",
        "/volume/hwinfo",
        serde_json::json!({"volume": "local"}),
    );
    assert_eq!(r.json()["status"], "healthy");
    let r = p.manager_method(
        "GET",
        "/volume/performance-metric",
        serde_json::json!({"volume": "local"}),
    );
    assert_eq!(r.json()["metric"]["iops_read"], -1);
    let r = p.manager_method(
        "GET",
        "/volume/hwinfo",
        serde_json::json!({"volume": "nope"}),
    );
    assert_eq!(r.status, 400);
    let r = p.manager_method("PATCH", "/volume/quota", body(serde_json::json!({})));
    assert_eq!(r.status, 400, "deprecated in the original");
}

#[test]
fn fetch_archive_tokens_and_metrics() {
    let p = Proxy::start("");
    create_folder(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir_all(vf.join("logs/empty")).expect("tree");
    std::fs::write(vf.join("logs/task.log"), "line 1\nline 2\n").expect("log");
    std::fs::write(vf.join("top.txt"), "top").expect("top");
    let r = p.manager(
        "/folder/file/fetch",
        body(serde_json::json!({"relpath": "logs/task.log"})),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"line 1\nline 2\n");
    let r = p.manager(
        "/folder/file/fetch",
        body(serde_json::json!({"relpath": "logs/none.log"})),
        None,
    );
    assert_eq!(r.status, 404);
    let r = p.manager(
        "/folder/file/fetch",
        body(serde_json::json!({"relpath": "../../x"})),
        None,
    );
    assert_eq!(r.status, 400);

    let r = p.manager(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "virtual_folder_id": VFID, "files": ["logs", "top.txt"], "filename": "bundle.zip"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r
        .header("content-disposition")
        .is_some_and(|v| v.contains("bundle.zip")));
    let zip = p.dir.path().join("bundle.zip");
    std::fs::write(&zip, &r.body).expect("zip");
    let out = storage_common::python(
        "import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nprint('|'.join(sorted(z.namelist())))",
        &zip,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.trim(),
        "logs/empty/|logs/task.log|top.txt",
        "empty directories are kept"
    );
    // A name holding a path is offered by its last component only.
    for (asked, offered) in [
        ("../../evil.zip", "evil.zip"),
        ("a\\b.zip", "b.zip"),
        ("..", "archive.zip"),
        ("dir/", "archive.zip"),
    ] {
        let r = p.manager(
            "/folder/file/archive-download-token",
            serde_json::json!({"volume": "local", "virtual_folder_id": VFID, "files": ["top.txt"], "filename": asked}),
            None,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let token = r.json()["token"].as_str().expect("token").to_owned();
        let r = p.download_archive(&token);
        assert_eq!(r.status, 200, "{asked}");
        let disposition = r.header("content-disposition").expect("disposition");
        assert!(
            disposition.starts_with(&format!("attachment;filename=\"{offered}\";")),
            "{asked}: {disposition}"
        );
        assert!(!disposition.contains("%2F"), "{asked}: {disposition}");
    }
    // A download token is not an archive token, and escapes are refused.
    let r = request(p.client, "GET", "/download-archive?token=forged", &[], b"");
    assert_eq!(r.status, 401);
    let r = p.manager(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "virtual_folder_id": VFID, "files": ["../x"]}),
        None,
    );
    assert_eq!(r.status, 400);

    // Metrics: no token needed, Prometheus text, the counters moved.
    assert_eq!(p.upload("m.bin", b"12345").status, 204);
    let r = request(p.manager, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    assert_eq!(value("storage_proxy_upload_bytes_total"), 5);
    assert_eq!(value("storage_proxy_uploads_completed_total"), 1);
    assert!(value("storage_proxy_downloads_total") >= 1);
    assert!(value("storage_proxy_escapes_refused_total") >= 2);
    assert_eq!(value("storage_proxy_quota_reserved_bytes"), 0);
}

#[test]
fn create_honours_mode_and_delete_of_a_missing_vfolder_is_gone() {
    let p = Proxy::start("");
    let mode = created_with(&p, 0o750);
    assert_eq!(mode & 0o7777, 0o750 & !umask());
    // An existing vfolder keeps its mode (the original's `makedirs` with
    // `exist_ok`); before, each create `fchmod`ed it anew.
    assert_eq!(created_with(&p, 0o700) & 0o7777, mode & 0o7777);
    let r = p.manager("/folder/delete", body(serde_json::json!({})), None);
    assert_eq!(r.status, 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while p.vfolder_path().exists() {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = p.manager("/folder/delete", body(serde_json::json!({})), None);
    assert_eq!(r.status, 410, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["request_id"].is_string());
}

/// The umask this process (and so the proxy it starts) has: what a directory made
/// with every permission bit asked for gets left out.
fn umask() -> u32 {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().expect("tempdir");
    let probe = dir.path().join("probe");
    std::fs::DirBuilder::new()
        .mode(0o777)
        .create(&probe)
        .expect("probe");
    let mode = std::fs::metadata(&probe)
        .expect("probe")
        .permissions()
        .mode();
    0o777 & !mode
}

/// `/folder/create` with `mode`: the vfolder's mode after it.
fn created_with(p: &Proxy, mode: u32) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    let r = p.manager(
        "/folder/create",
        body(serde_json::json!({ "mode": mode })),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    std::fs::metadata(p.vfolder_path())
        .expect("vfolder")
        .permissions()
        .mode()
}

/// A vfolder asked for with every mode bit is made through the umask, with no
/// set-user-ID or set-group-ID bit. Before, `mode` was applied with `fchmod`, past
/// the umask: `0o7777` gave a world-writable, set-ID, sticky vfolder.
#[test]
fn a_vfolders_mode_goes_through_the_umask() {
    let p = Proxy::start("");
    let mode = created_with(&p, 0o7777);
    // No set-ID bit; the sticky bit is kept, as the original's `makedirs` keeps it.
    assert_eq!(mode & 0o7777, 0o1777 & !umask(), "{mode:o}");
}

/// Puts a directory's mode back when dropped (a test that fails part way still
/// leaves a tree its temporary directory's removal can read).
struct Mode(std::path::PathBuf, u32);

impl Drop for Mode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(self.1));
    }
}

/// A vfolder's user makes its root unreadable from a container (`chmod 000`, the
/// proxy running as a service user bound by file permissions). Every failure to
/// open a vfolder but an escape was taken for a missing vfolder: the delete was
/// answered 410 "already deleted" (the manager drops its record, the data stays),
/// the reports 404, and a clone into it went ahead. Now only a vfolder that is not
/// there is gone; one that cannot be opened is 500 `vfolder-unavailable`, and
/// nothing is deleted or cloned into it.
#[test]
fn a_vfolder_the_proxy_cannot_open_is_not_reported_gone() {
    use std::os::unix::fs::PermissionsExt as _;
    let p = Proxy::start_bound_by_permissions("");
    create_folder(&p);
    const SOURCE: &str =
        "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0a1b2c3d4e5f40718293a4b5c6d7e8f9";
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": SOURCE}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let root = p.vfolder_path();
    std::fs::write(root.join("data.bin"), [7u8; 1000]).expect("data");
    let restore = Mode(root.clone(), 0o755);
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let unavailable = |what: &str, r: &appproxy_test_support::http::Resp| {
        assert_eq!(
            (r.status, r.json()["code"].as_str()),
            (500, Some("vfolder-unavailable")),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.json()["request_id"].is_string(), "{what}");
    };
    let r = p.manager_method("GET", "/folder/used-bytes", body(serde_json::json!({})));
    unavailable("used-bytes", &r);
    let r = p.manager(
        "/folder/file/list",
        body(serde_json::json!({"relpath": "."})),
        None,
    );
    unavailable("list", &r);
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": SOURCE, "dst_vfid": VFID}),
        None,
    );
    unavailable("clone into it", &r);
    let r = p.manager("/folder/delete", body(serde_json::json!({})), None);
    unavailable("delete", &r);
    drop(restore);
    let names: Vec<_> = std::fs::read_dir(&root)
        .expect("the vfolder is still there")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert_eq!(names, ["data.bin"], "{}", p.log());
    assert_eq!(
        std::fs::read(root.join("data.bin")).expect("data"),
        [7u8; 1000]
    );
    // Readable again, it is the vfolder it was.
    let r = p.manager_method("GET", "/folder/used-bytes", body(serde_json::json!({})));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["used_bytes"], 1000);
}

/// After uploads, downloads and a background task, `/metrics` has `# HELP` and
/// `# TYPE` on every family, the transfer histograms count every PATCH and download
/// with the bytes moved, tasks are counted by state, and quota usage is per scope.
#[test]
fn metrics_histograms_add_up_to_the_transfers() {
    use appproxy_test_support::prom::Exposition;
    use std::time::{Duration, Instant};
    let p = Proxy::start("");
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": VFID, "options": {"initial_max_size_for_quota_scope": 100000}}),
        None,
    );
    assert_eq!(r.status, 204);
    std::fs::write(p.vfolder_path().join("used.bin"), vec![0u8; 600]).expect("file");
    assert_eq!(p.upload("a.bin", b"12345").status, 204);
    assert_eq!(p.upload("b.bin", &[7u8; 3000]).status, 204);
    let mut downloaded = 0;
    for (file, len) in [("a.bin", 5), ("b.bin", 3000), ("used.bin", 600)] {
        let r = p.download(file, "", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), len);
        downloaded += len as u64;
    }
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000cafe";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // A download is counted when the server drops its body, and the task when it
    // ends (finished, then no longer running, as its guard drops after): wait for
    // all of it (a hang guard, not a timing assertion).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, e) = loop {
        let r = request(p.manager, "GET", "/metrics", &[], b"");
        assert_eq!(r.status, 200);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let e = Exposition::parse(&text);
        let downloads = e.value("storage_proxy_download_duration_seconds_count", "");
        let done = e.value(
            "storage_proxy_bgtasks_finished_total",
            "task=\"clone_vfolder\",state=\"done\"",
        );
        let running = e.value("storage_proxy_bgtasks_running", "");
        if downloads == Some(3.0) && done == Some(1.0) && running == Some(0.0) {
            break (text, e);
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let counts = e.check();
    let count = |f: &str| counts.get(&(f.to_owned(), String::new())).copied();
    assert_eq!(
        count("storage_proxy_upload_patch_size_bytes"),
        Some(2),
        "{text}"
    );
    assert_eq!(
        count("storage_proxy_upload_patch_duration_seconds"),
        Some(2)
    );
    assert_eq!(count("storage_proxy_download_size_bytes"), Some(3));
    assert_eq!(count("storage_proxy_download_duration_seconds"), Some(3));
    assert_eq!(
        e.value("storage_proxy_upload_patch_size_bytes_sum", ""),
        Some(3005.0)
    );
    assert_eq!(
        e.value(
            "storage_proxy_upload_patch_size_bytes_bucket",
            "le=\"4096\""
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        e.value("storage_proxy_download_size_bytes_sum", ""),
        Some(downloaded as f64)
    );
    assert_eq!(
        e.value("storage_proxy_download_bytes_total", ""),
        Some(downloaded as f64)
    );
    assert_eq!(
        e.value("storage_proxy_downloads_in_progress", ""),
        Some(0.0)
    );
    assert_eq!(e.value("storage_proxy_uploads_in_progress", ""), Some(0.0));
    assert_eq!(e.value("storage_proxy_bgtasks_running", ""), Some(0.0));
    // Every storage-proxy family the control-plane dashboard queries is exported.
    let queried = appproxy_test_support::prom::dashboard_families("storage_proxy_");
    assert!(queried.len() >= 8, "{queried:?}");
    for family in queried {
        assert!(e.kinds.contains_key(&family), "{family} in {text}");
    }
    let scope = e
        .samples
        .iter()
        .find(|s| {
            s.name == "storage_proxy_quota_scope_used_bytes"
                && s.labels.starts_with("volume=\"local\",scope=\"")
                && s.labels.contains("3f2b8c1e")
        })
        .unwrap_or_else(|| panic!("a quota scope sample in {text}"));
    assert!(scope.value >= 600.0, "{text}");
}

/// A PATCH whose body is still arriving is an upload in progress at `/metrics`; it
/// leaves the gauge when it completes, and its bytes are counted.
#[test]
fn uploads_in_progress_count_a_patch_while_its_body_arrives() {
    use std::io::{Read as _, Write as _};
    use std::time::{Duration, Instant};
    let p = Proxy::start("");
    storage_common::create_folder(&p);
    let size = 2000usize;
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "slow.bin", "size": size}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let gauge = || {
        let r = request(p.manager, "GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let e = appproxy_test_support::prom::Exposition::parse(&text);
        (
            e.value("storage_proxy_uploads_in_progress", "")
                .unwrap_or_else(|| panic!("no gauge in {text}")),
            e.value("storage_proxy_upload_bytes_total", "")
                .unwrap_or(-1.0),
        )
    };
    assert_eq!(gauge().0, 0.0);
    let mut s = std::net::TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(
        format!(
            "PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("head");
    s.write_all(&[5u8; 1000]).expect("first half");
    let deadline = Instant::now() + Duration::from_secs(20);
    while gauge().0 != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the PATCH never showed in progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.write_all(&[5u8; 1000]).expect("second half");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (active, bytes) = gauge();
        if active == 0.0 {
            assert_eq!(bytes, size as f64);
            break;
        }
        assert!(Instant::now() < deadline, "the PATCH never left the gauge");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The binary refuses a bad file at start-up (exit status 2) with the file, the key
/// path and what was expected on stderr.
#[test]
fn the_binary_refuses_a_bad_config_naming_the_file_the_key_and_the_fix() {
    appproxy_test_support::config::assert_binary_refuses(
        env!("CARGO_BIN_EXE_appproxy-storage-proxy"),
        "[storage]\nmanager_bind = \"127.0.0.1:65536\"\n",
        &["storage.manager_bind", "line 2", "socket address"],
    );
    // A blank signing key is refused: anyone could sign session tokens with it.
    appproxy_test_support::config::assert_binary_refuses(
        env!("CARGO_BIN_EXE_appproxy-storage-proxy"),
        "[storage]\nmanager_bind = \"192.0.2.1:1\"\nclient_bind = \"192.0.2.1:2\"\n[secrets]\nmanager_token = \"t\"\nsession_secret = \"\\t\"\n[[volumes]]\nname = \"local\"\npath = \"/tmp\"\n",
        &["session_secret", "not blank"],
    );
}

/// A storage-proxy whose stdout is a pipe nobody reads (a container's log driver that
/// stalled) goes on answering: its log lines are handed to a writer thread, not
/// written by the runtime's threads. Before, those threads blocked in `write` once
/// the pipe's 64 KiB were full, and the APIs stopped answering. Read again, the lines
/// come out whole and in order; with the pipe closed, requests are still answered and
/// the lines that could not be written are counted.
#[test]
fn a_stdout_nobody_reads_never_stalls_the_apis() {
    let (p, stdout) = Proxy::start_piped();
    appproxy_test_support::stalled_stdout::never_stalls(
        stdout,
        |id| {
            appproxy_test_support::http::request_within(
                p.manager,
                "GET",
                "/volumes",
                &[
                    ("X-BackendAI-Storage-Auth-Token", TOKEN),
                    ("X-Backend-Request-ID", id),
                ],
                b"",
                std::time::Duration::from_secs(10),
            )
            .is_some_and(|r| r.status == 200)
        },
        || {
            let r = request(p.manager, "GET", "/metrics", &[], b"");
            appproxy_test_support::prom::Exposition::parse(&String::from_utf8_lossy(&r.body))
                .value("appproxy_log_lines_dropped_total", "")
                .expect("appproxy_log_lines_dropped_total") as u64
        },
    );
}

/// An entry a listing should carry: its name, its type and its symlink's target.
type Listed<'a> = (Vec<u8>, &'a str, Option<&'a [u8]>);

/// `bytes` as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Linux names are bytes, and a user with a shell makes names and symlink targets
/// that are not UTF-8. The original reads them with Python's `surrogateescape`,
/// each byte that is not valid UTF-8 a lone surrogate `\udcXX` in its JSON: a
/// listing carries them so, losslessly, and a name so listed is told apart from
/// every other. Before, each such byte was replaced by U+FFFD: `a\xff.txt`,
/// `a\xfe.txt` and a file really named `a\u{fffd}.txt` were listed as three items
/// of one name, and a delete of that name removed the last whatever the user
/// meant. A request cannot name them (strict JSON, which the proxy reads, has no
/// lone surrogates): it is refused whole, nothing touched; a directory holding
/// them is deleted whole.
#[test]
fn names_that_are_not_utf8_are_listed_losslessly_and_apart() {
    use std::os::unix::ffi::OsStrExt as _;
    let p = Proxy::start("");
    create_folder(&p);
    let d = p.vfolder_path().join("d");
    std::fs::create_dir(&d).expect("d");
    let os = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_owned();
    let target: &[u8] = b"t\x80\xed\xa0\x80x\xe2\x82";
    let mut expected: Vec<Listed> = Vec::new();
    for name in [
        &b"a\xff.txt"[..],
        b"a\xfe.txt",
        "a\u{fffd}.txt".as_bytes(),
        b"\xc3",
    ] {
        std::fs::write(d.join(os(name)), name).expect("file");
        expected.push((name.to_vec(), "FILE", None));
    }
    std::os::unix::fs::symlink(os(target), d.join(os(b"l\xe9"))).expect("symlink");
    expected.push((b"l\xe9".to_vec(), "SYMLINK", Some(target)));
    std::fs::create_dir(d.join(os(b"sub\xff"))).expect("dir");
    std::fs::write(d.join(os(b"sub\xff")).join(os(b"in\xff")), b"x").expect("inner");
    expected.push((b"sub\xff".to_vec(), "DIRECTORY", None));
    expected.sort();

    let r = p.manager(
        "/folder/file/list",
        body(serde_json::json!({"relpath": "d"})),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Read as the original's manager reads it (Python), each name given back as
    // the bytes it stands for.
    let answer = p.dir.path().join("answer.json");
    std::fs::write(&answer, &r.body).expect("answer");
    let read = storage_common::python(
        "import json, os, sys\nfor i in json.load(open(sys.argv[1], 'rb'))['items']:\n    t = i['symlink_target']\n    print(os.fsencode(i['name']).hex(), i['type'], '-' if t is None else os.fsencode(t).hex())",
        &answer,
    )
    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)));
    let want: Vec<String> = expected
        .iter()
        .map(|(n, t, l)| format!("{} {t} {}", hex(n), l.map_or("-".into(), hex)))
        .collect();
    assert_eq!(read.lines().collect::<Vec<_>>(), want, "{read}");

    // What a name is listed as names it in a request (see
    // `names_that_are_not_utf8_are_reached_by_the_names_listed`); a request naming
    // one never reaches the file U+FFFD would stand for.
    let r = p.manager_raw(
        "/folder/file/delete",
        format!("{{\"volume\":\"local\",\"vfid\":\"{VFID}\",\"relpaths\":[\"d/a\\udcff.txt\"]}}")
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(d.join(os(b"a\xff.txt")).symlink_metadata().is_err());
    expected.retain(|(n, _, _)| n != b"a\xff.txt");
    for (name, _, _) in &expected {
        assert!(d.join(os(name)).symlink_metadata().is_ok(), "{}", hex(name));
    }
    // The name U+FFFD stands in is that file's alone.
    let r = p.manager(
        "/folder/file/delete",
        body(serde_json::json!({"relpaths": ["d/a\u{fffd}.txt"]})),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!d.join("a\u{fffd}.txt").exists());
    assert!(d.join(os(b"a\xfe.txt")).exists());
    let r = p.manager(
        "/folder/file/delete",
        body(serde_json::json!({"relpaths": ["d"], "recursive": true})),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(d.symlink_metadata().is_err(), "d is deleted whole");
}

/// Every request naming a path takes the name a listing gives an entry whose name
/// is not UTF-8 (`\udcXX` for each such byte, PEP 383, as the original reads and
/// writes names): it can be downloaded, renamed, moved, deleted, made, uploaded to
/// and archived. An escape that stands for no byte, and a body that is not UTF-8,
/// are refused whole, nothing touched.
#[test]
fn names_that_are_not_utf8_are_reached_by_the_names_listed() {
    use std::os::unix::ffi::OsStrExt as _;
    let p = Proxy::start("");
    create_folder(&p);
    let root = p.vfolder_path();
    let os = |b: &[u8]| root.join(std::ffi::OsStr::from_bytes(b));
    std::fs::create_dir(os(b"d")).expect("d");
    std::fs::write(os(b"d/a\xff.txt"), b"ff").expect("a\\xff");
    std::fs::write(os(b"d/a\xfe.txt"), b"fe").expect("a\\xfe");
    std::fs::write(os("d/a\u{fffd}.txt".as_bytes()), b"fffd").expect("a U+FFFD");
    std::fs::create_dir(os(b"d/sub\xff")).expect("sub");
    std::fs::write(os(b"d/sub\xff/in\xff"), b"in").expect("in");
    let call = |path: &str, fields: &str| {
        let raw = format!("{{\"volume\":\"local\",\"vfid\":\"{VFID}\",{fields}}}");
        p.manager_raw(path, raw.as_bytes())
    };
    let untouched = || {
        for name in [
            &b"d/a\xff.txt"[..],
            b"d/a\xfe.txt",
            "d/a\u{fffd}.txt".as_bytes(),
            b"d/sub\xff/in\xff",
        ] {
            assert!(os(name).exists(), "{}", String::from_utf8_lossy(name));
        }
    };

    // Escapes that name no byte (ASCII, a surrogate outside \udc80-\udcff, a
    // lone high surrogate) are refused as any field of the wrong kind is (422);
    // raw bytes that are not UTF-8 (one that a listing escapes, and a raw
    // surrogate's own bytes) are no JSON (400). Nothing is deleted.
    for fields in [
        r#""relpaths":["d/a\udc41"]"#,
        r#""relpaths":["d/a\udc00"]"#,
        r#""relpaths":["d/a\ud800.txt"]"#,
    ] {
        let r = call("/folder/file/delete", fields);
        assert_eq!(
            r.status,
            422,
            "{fields}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(String::from_utf8_lossy(&r.body).contains("names no byte"));
    }
    // A request whose one path field holds `raw` as it is, inside the JSON text.
    let raw_call = |route: &str, field: &str, raw: &[u8]| {
        let mut body =
            format!("{{\"volume\":\"local\",\"vfid\":\"{VFID}\",\"{field}\":[\"").into_bytes();
        body.extend_from_slice(raw);
        body.extend_from_slice(b"\"]}");
        p.manager_raw(route, &body)
    };
    for raw in [&b"d/a\xff.txt"[..], b"d/a\xed\xb3\xbf.txt"] {
        let r = raw_call("/folder/file/delete", "relpaths", raw);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        assert!(String::from_utf8_lossy(&r.body).contains("not UTF-8"));
    }
    // Raw control characters, which JSON carries only as escapes: 400, as in any
    // other field, where a path read as bytes took them.
    for raw in [&b"d/ctl\nname"[..], b"d/ctl\x1fname"] {
        let r = raw_call("/folder/file/mkdir", "relpath", raw);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    }
    untouched();
    assert_eq!(
        std::fs::read_dir(os(b"d")).expect("d").count(),
        4,
        "nothing made"
    );

    // A path longer than the proxy makes one (4095 bytes) is refused when an upload
    // token is asked for, and a download token whose URL the client API would
    // refuse (414) when it is asked for: a name that is not UTF-8 takes about four
    // characters a byte in a token. 60 levels of 250 such bytes (15,059 bytes).
    // Both before anything is reserved.
    let level = "\\udcff".repeat(250);
    let long = vec![level.as_str(); 60].join("/");
    for (route, size, said) in [
        (
            "/folder/file/upload",
            ",\"size\":1",
            "the path is 15059 bytes long, more than the 4095 bytes a path may have",
        ),
        ("/folder/file/download", "", "name a shorter path"),
    ] {
        let r = call(route, &format!("\"relpath\":\"{long}\"{size}"));
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(
            r.status,
            400,
            "{route}: {}",
            text.get(..300).unwrap_or(&text)
        );
        assert!(text.contains(said), "{text}");
    }
    let staged = std::fs::read_dir(root.join(".upload")).map_or(0, Iterator::count);
    assert_eq!(staged, 0, "nothing staged, nothing reserved");
    // The longest path of bytes that are not UTF-8 (about four characters a byte
    // in a token) gets a token whose URL the client API takes.
    let longest = vec![level.as_str(); 16].join("/");
    let r = call(
        "/folder/file/upload",
        &format!("\"relpath\":\"{longest}\",\"size\":1"),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let head = request(
        p.client,
        "HEAD",
        &format!("/upload?token={token}"),
        &[],
        b"",
    );
    assert_eq!(head.status, 200, "the token's URL is taken");

    // A download of the listed name gets that file, not another of its lossy name.
    let r = call("/folder/file/download", r#""relpath":"d/a\udcfe.txt""#);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let got = request(
        p.client,
        "GET",
        &format!("/download?token={token}"),
        &[],
        b"",
    );
    assert_eq!((got.status, got.body.as_slice()), (200, &b"fe"[..]));

    // Renamed and moved, source and destination named so.
    let r = call(
        "/folder/file/rename",
        r#""relpath":"d/a\udcfe.txt","new_name":"b\udcfe\udcfd""#,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(std::fs::read(os(b"d/b\xfe\xfd")).expect("renamed"), b"fe");
    let r = call(
        "/folder/file/move",
        r#""src_relpath":"d/sub\udcff/in\udcff","dst_relpath":"d/out\udcff""#,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(std::fs::read(os(b"d/out\xff")).expect("moved"), b"in");
    // A new name with an escaped `/` beside a name's byte is still no plain name.
    let r = call(
        "/folder/file/rename",
        r#""relpath":"d/out\udcff","new_name":"x\udcff\u002f..""#,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));

    // Made, and each made path given back as it was named.
    let r = call(
        "/folder/file/mkdir",
        r#""relpath":["d/m\udcff","d/m\udcff/n"],"parents":true"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(os(b"d/m\xff/n").is_dir());
    let text = String::from_utf8(r.body.clone()).expect("an answer in UTF-8");
    assert!(
        text.contains(r#""item":"d/m\udcff""#) && text.contains(r#""item":"d/m\udcff/n""#),
        "{text}"
    );
    let r = call("/folder/file/mkdir", r#""relpath":"d/m\udcff""#);
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains(r#""item":"d/m\udcff""#));

    // Uploaded to, through a tus session whose token carries the name's bytes.
    let r = call(
        "/folder/file/upload",
        r#""relpath":"d/m\udcff/up\udcfe.bin","size":3"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    assert_eq!(p.tus_patch(&token, "0", b"up!").status, 204);
    assert_eq!(
        std::fs::read(os(b"d/m\xff/up\xfe.bin")).expect("uploaded"),
        b"up!"
    );

    // Archived: the zip holds the file named (its entry name made readable).
    let r = call(
        "/folder/file/archive-download-token",
        r#""files":["d/b\udcfe\udcfd"]"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let zip = p.download_archive(r.json()["token"].as_str().expect("token"));
    assert_eq!(zip.status, 200, "{}", String::from_utf8_lossy(&zip.body));
    let archive = p.dir.path().join("a.zip");
    std::fs::write(&archive, &zip.body).expect("zip");
    let inside = storage_common::python(
        "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nprint([z.read(n).decode() for n in z.namelist()])",
        &archive,
    )
    .expect("a zip");
    assert_eq!(inside.trim(), "['fe']");

    // Deleted: only the entry named, not the one whose name is U+FFFD.
    let r = call(
        "/folder/file/delete",
        r#""relpaths":["d/a\udcff.txt","d/b\udcfe\udcfd"]"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!os(b"d/a\xff.txt").exists() && !os(b"d/b\xfe\xfd").exists());
    assert_eq!(
        std::fs::read(os("d/a\u{fffd}.txt".as_bytes())).expect("kept"),
        b"fffd"
    );
}

/// A filesystem error carries the original's fields beside the problem's: `msg`
/// (the system's words), `errno`, and `paths`, empty (the original named host
/// paths, never told here). Before, only the problem's fields came: a manager
/// reading the original's `msg` and `errno` found nothing.
#[test]
fn a_filesystem_error_carries_the_originals_msg_and_errno() {
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::create_dir_all(p.vfolder_path().join("d")).expect("d");
    // A directory moved into itself: EINVAL from the kernel.
    let r = p.manager(
        "/folder/file/move",
        body(serde_json::json!({"src_relpath": "d", "dst_relpath": "d/inner"})),
        None,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["code"], "filesystem-error", "{v}");
    assert_eq!(v["errno"], 22, "{v}");
    assert_eq!(v["msg"], "Invalid argument", "{v}");
    assert_eq!(v["paths"], serde_json::json!([]), "{v}");
    assert!(v["request_id"].is_string(), "{v}");
    let host = p.vfolder_path().display().to_string();
    assert!(
        !String::from_utf8_lossy(&r.body).contains(&host),
        "a host path told: {v}"
    );
    // A file missing is one too, told by its status (404 `file-not-found`).
    let r = p.manager(
        "/folder/file/move",
        body(serde_json::json!({"src_relpath": "missing", "dst_relpath": "x"})),
        None,
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["errno"], 2, "{}", r.json());
    // A refusal that is no filesystem error has none of them.
    let r = p.manager(
        "/folder/file/move",
        body(serde_json::json!({"src_relpath": "../../etc", "dst_relpath": "x"})),
        None,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "invalid-api-params", "{}", r.json());
    assert!(r.json().get("errno").is_none(), "{}", r.json());
}

/// A host path outside any vfolder (the original's `unmanaged_path`) is never
/// served, and a rename, move or delete of the vfolder itself (`.`) is the
/// caller's mistake, said so. Before, `unmanaged_path` was passed over and the
/// token served `relpath` with a 200, and `.` was a `filesystem-error` with no
/// `errno` (an outside tester's find).
#[test]
fn unmanaged_paths_and_the_vfolder_itself_are_refused_as_the_callers_mistakes() {
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::write(p.vfolder_path().join("a.txt"), "a").expect("file");
    let r = p.manager(
        "/folder/file/download",
        body(serde_json::json!({"relpath": "a.txt", "unmanaged_path": "/etc/passwd"})),
        None,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "invalid-api-params");
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("unmanaged_path")),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = p.manager(
        "/folder/file/download",
        body(serde_json::json!({"relpath": "a.txt", "unmanaged_path": null})),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for (path, args) in [
        (
            "/folder/file/rename",
            serde_json::json!({"relpath": ".", "new_name": "b"}),
        ),
        (
            "/folder/file/move",
            serde_json::json!({"src_relpath": ".", "dst_relpath": "b"}),
        ),
        (
            "/folder/file/move",
            serde_json::json!({"src_relpath": "a.txt", "dst_relpath": "."}),
        ),
    ] {
        let r = p.manager(path, body(args.clone()), None);
        assert_eq!(
            r.status,
            400,
            "{path} {args}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], "invalid-api-params", "{path} {args}");
        assert!(r.json().get("errno").is_none(), "{path} {args}");
    }
    assert!(p.vfolder_path().join("a.txt").is_file());
}
