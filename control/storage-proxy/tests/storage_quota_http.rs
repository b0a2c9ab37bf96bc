//! The storage-proxy's quota as a reservation (concurrent sessions never pass the
//! limit; a lowered limit stops a PATCH; expiry releases; clones check the
//! destination; one walk of a scope serves many checks, and what a walk counts),
//! HTTP caching and resumable-download validators (RFC 9110), and extractor
//! rejections as the product's JSON error with the request ID.

mod storage_common;

use appproxy_test_support::http::request;
use storage_common::{create_folder, Proxy, TOKEN, VFID};

const QSID: &str = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

fn create_with_limit(p: &Proxy, limit: u64) {
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": VFID, "options": {"initial_max_size_for_quota_scope": limit}}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
}

fn set_limit(p: &Proxy, limit: u64) {
    let r = p.manager_method(
        "PATCH",
        "/quota-scope",
        serde_json::json!({"volume": "local", "qsid": QSID, "options": {"limit_bytes": limit}}),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
}

fn upload_token(p: &Proxy, relpath: &str, size: usize) -> appproxy_test_support::http::Resp {
    p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath, "size": size}),
        None,
    )
}

/// An upload session's token, its reservation taken.
fn session(p: &Proxy, relpath: &str, size: usize) -> String {
    let r = upload_token(p, relpath, size);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["token"].as_str().expect("token").to_owned()
}

fn patch(p: &Proxy, token: &str, offset: usize, data: &[u8]) -> appproxy_test_support::http::Resp {
    request(
        p.client,
        "PATCH",
        &format!("/upload?token={token}"),
        &[("Upload-Offset", &offset.to_string())],
        data,
    )
}

#[test]
fn concurrent_sessions_never_pass_the_limit() {
    const LIMIT: usize = 10_000;
    const SIZE: usize = 1_000;
    let p = Proxy::start("");
    create_with_limit(&p, LIMIT as u64);
    let ok = std::sync::atomic::AtomicUsize::new(0);
    let refused = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..6 {
            let (p, ok, refused) = (&p, &ok, &refused);
            s.spawn(move || {
                for i in 0..5 {
                    let r = upload_token(p, &format!("f-{t}-{i}.bin"), SIZE);
                    if r.status == 413 {
                        assert_eq!(r.json()["code"], "quota-exceeded");
                        assert!(r.json()["request_id"].is_string());
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let token = r.json()["token"].as_str().expect("token").to_owned();
                    let r = patch(p, &token, 0, &[1u8; SIZE]);
                    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    // Each accepted session holds SIZE bytes, first reserved, then committed: exactly
    // LIMIT / SIZE of the 30 fit, whatever the interleaving.
    assert_eq!(ok.load(std::sync::atomic::Ordering::Relaxed), LIMIT / SIZE);
    assert_eq!(
        refused.load(std::sync::atomic::Ordering::Relaxed),
        30 - LIMIT / SIZE
    );
    let r = p.manager(
        "/quota-scope",
        serde_json::json!({"volume": "local", "qsid": QSID}),
        None,
    );
    assert_eq!(r.json()["used_bytes"], LIMIT as u64);
    assert_eq!(r.json()["reserved_bytes"], 0, "completion released them");
}

#[test]
fn reservations_hold_across_sessions_and_a_lowered_limit_stops_a_patch() {
    let p = Proxy::start("");
    create_with_limit(&p, 1_000);
    // Two sessions that each fit but together do not: the second is refused.
    let a = upload_token(&p, "a.bin", 600);
    assert_eq!(a.status, 200);
    let r = upload_token(&p, "b.bin", 600);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let a = a.json()["token"].as_str().expect("token").to_owned();
    // Part of the upload, then the limit is lowered under the reservation: the next
    // PATCH is refused with the quota error and nothing more is written.
    assert_eq!(patch(&p, &a, 0, &[0u8; 100]).status, 204);
    set_limit(&p, 500);
    let r = patch(&p, &a, 100, &[0u8; 500]);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "quota-exceeded");
    assert!(!p.vfolder_path().join("a.bin").exists());
    let r = request(p.client, "HEAD", &format!("/upload?token={a}"), &[], b"");
    assert_eq!(r.header("upload-offset"), Some("100"));
    // The refusal let the reservation go: its 100 staged bytes count as committed.
    let q = quota_scope(&p);
    assert_eq!(q["used_bytes"], 100, "{q}");
    assert_eq!(q["reserved_bytes"], 0, "{q}");
    assert_eq!(upload_token(&p, "c.bin", 401).status, 413);
    // Raised again, the same session finishes.
    set_limit(&p, 1_000);
    assert_eq!(patch(&p, &a, 100, &[0u8; 500]).status, 204);
    assert_eq!(
        std::fs::metadata(p.vfolder_path().join("a.bin"))
            .expect("a")
            .len(),
        600
    );
    // A clone into the same scope would pass the limit: refused, nothing created.
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000c10e";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        None,
    );
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(!p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/000000000000000000000000c10e")
        .exists());
    // Into a scope with exactly enough room it goes through, and then the scope is
    // full: its bytes were reserved while copying and are committed after.
    let other_qs = serde_json::json!({"volume": "local", "qsid": "project:0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e", "options": {"limit_bytes": 600}});
    assert_eq!(
        p.manager("/quota-scope", other_qs.clone(), None).status,
        200
    );
    let other = "project:0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e/0000000000000000000000000000c10e";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": other}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let q = p
            .manager_method("GET", "/quota-scope", other_qs.clone())
            .json();
        if q["reserved_bytes"] == 0 {
            assert_eq!(q["used_bytes"], 600, "{q}");
            break;
        }
        assert_eq!(q["reserved_bytes"], 600, "{q}");
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": other, "relpath": "one-more.bin", "size": 1}),
        None,
    );
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn quota_scope_routes_follow_the_original() {
    let p = Proxy::start("");
    let qs = serde_json::json!({"volume": "local", "qsid": "project:0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"});
    let r = p.manager_method("GET", "/quota-scope", qs.clone());
    assert_eq!(r.status, 404, "a missing scope");
    assert!(r.json()["request_id"].is_string());
    let mut create = qs.clone();
    create["options"] = serde_json::json!({"limit_bytes": 4096});
    let r = p.manager("/quota-scope", create, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = p.manager_method("GET", "/quota-scope", qs.clone());
    assert_eq!(r.json()["limit_bytes"], 4096, "POST keeps the limit");
    assert_eq!(r.json()["used_bytes"], 0);
    let r = p.manager_method("DELETE", "/quota-scope/quota", qs.clone());
    assert_eq!(r.status, 204);
    let r = p.manager_method("GET", "/quota-scope", qs);
    assert!(r.json()["limit_bytes"].is_null());
}

#[test]
fn downloads_carry_validators_and_honour_preconditions() {
    let p = Proxy::start("");
    create_folder(&p);
    let v1: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(p.upload("doc.bin", &v1).status, 204);
    let r = p.download("doc.bin", "", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let etag = r.header("etag").expect("etag").to_owned();
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong: {etag}"
    );
    let modified = r.header("last-modified").expect("last-modified").to_owned();
    assert!(modified.ends_with(" GMT"), "{modified}");
    // If-None-Match and If-Modified-Since: 304 with the validators, no body.
    let r = p.download("doc.bin", "", &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let r = p.download("doc.bin", "", &[("If-None-Match", "\"other\", W/\"x\"")]);
    assert_eq!(r.status, 200);
    let r = p.download("doc.bin", "", &[("If-Modified-Since", &modified)]);
    assert_eq!(r.status, 304);
    let r = p.download(
        "doc.bin",
        "",
        &[("If-Modified-Since", "Sat, 01 Jan 2000 00:00:00 GMT")],
    );
    assert_eq!(r.status, 200);
    // If-None-Match wins over If-Modified-Since.
    let r = p.download(
        "doc.bin",
        "",
        &[
            ("If-None-Match", "\"other\""),
            ("If-Modified-Since", &modified),
        ],
    );
    assert_eq!(r.status, 200);
    // If-Range: the current validator gives the range, a stale one the whole file.
    let r = p.download(
        "doc.bin",
        "",
        &[("Range", "bytes=10-19"), ("If-Range", &etag)],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &v1[10..20]);
    let r = p.download(
        "doc.bin",
        "",
        &[("Range", "bytes=10-19"), ("If-Range", &modified)],
    );
    assert_eq!(r.status, 200, "a date never proves the file unchanged");
    assert_eq!(r.body, v1);
    // A new version of the file: the old validator no longer matches, so a resumed
    // download gets the whole new file instead of splicing two versions.
    let v2: Vec<u8> = v1.iter().rev().copied().collect();
    assert_eq!(p.upload("doc.bin", &v2).status, 204);
    let r = p.download(
        "doc.bin",
        "",
        &[("Range", "bytes=10-19"), ("If-Range", &etag)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v2);
    let new_etag = r.header("etag").expect("etag").to_owned();
    assert_ne!(new_etag, etag);
    let r = p.download(
        "doc.bin",
        "",
        &[("Range", "bytes=10-19"), ("If-Range", "W/\"weak\"")],
    );
    assert_eq!(r.status, 200, "a weak validator never matches If-Range");
    // If-Match: a stale tag fails the precondition.
    let r = p.download("doc.bin", "", &[("If-Match", &etag)]);
    assert_eq!(r.status, 412);
    assert_eq!(r.json()["code"], "precondition-failed");
    assert!(r.json()["request_id"].is_string());
    let r = p.download("doc.bin", "", &[("Range", "bytes=20000-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */10000"));
    assert_eq!(r.json()["code"], "range-not-satisfiable");
    let r = p.download("doc.bin", "", &[("If-Match", &new_etag)]);
    assert_eq!(r.status, 200);
    let r = p.download(
        "doc.bin",
        "",
        &[("If-Unmodified-Since", "Sat, 01 Jan 2000 00:00:00 GMT")],
    );
    assert_eq!(r.status, 412);
}

#[test]
fn extractor_rejections_are_json_errors_with_the_request_id() {
    let p = Proxy::start("");
    create_folder(&p);
    let send = |path: &str, ctype: &str, body: &[u8]| {
        request(
            p.manager,
            "POST",
            path,
            &[
                ("X-BackendAI-Storage-Auth-Token", TOKEN),
                ("Content-Type", ctype),
                ("X-Backend-Request-ID", "bad-input-1"),
            ],
            body,
        )
    };
    for (what, r, status) in [
        (
            "bad JSON",
            send("/folder/file/list", "application/json", b"{not json"),
            400,
        ),
        (
            "wrong type",
            send(
                "/folder/file/list",
                "application/json",
                br#"{"volume": 1, "vfid": []}"#,
            ),
            422,
        ),
        (
            "missing content type",
            send("/folder/file/list", "text/plain", b"{}"),
            415,
        ),
        (
            "too large",
            send("/folder/file/list", "application/json", &[b' '; 3 << 20]),
            413,
        ),
        (
            "no route",
            send("/no/such/route", "application/json", b"{}"),
            404,
        ),
    ] {
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let j = r.json();
        assert_eq!(j["request_id"], "bad-input-1", "{what}: {j}");
        assert!(
            j["error"].is_string() && j["code"].is_string(),
            "{what}: {j}"
        );
        assert_eq!(r.header("x-backend-request-id"), Some("bad-input-1"));
    }
    let r = request(p.client, "DELETE", "/upload", &[], b"");
    assert_eq!(r.status, 405);
    assert!(r.json()["request_id"].is_string());
}

#[test]
fn an_expired_session_releases_its_reservation() {
    let p = Proxy::start("upload_expire_secs = 1\ncleanup_interval_secs = 1\n");
    create_with_limit(&p, 1_000);
    assert_eq!(upload_token(&p, "a.bin", 800).status, 200);
    assert_eq!(
        upload_token(&p, "b.bin", 800).status,
        413,
        "a's bytes are held"
    );
    let qs = serde_json::json!({"volume": "local", "qsid": QSID});
    assert_eq!(
        p.manager_method("GET", "/quota-scope", qs.clone()).json()["reserved_bytes"],
        800
    );
    // The cleanup removes a's idle staging file and releases what it held.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while p.manager_method("GET", "/quota-scope", qs.clone()).json()["reserved_bytes"] != 0 {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(upload_token(&p, "b.bin", 800).status, 200);
}

/// `/metrics` shows each scope's limit beside its usage, under the same labels, and
/// follows a changed or removed limit.
#[test]
fn quota_metrics_show_limits_beside_usage_per_scope() {
    use appproxy_test_support::prom::Exposition;
    let p = Proxy::start("");
    create_with_limit(&p, 50_000);
    assert_eq!(p.upload("x.bin", &[1u8; 1000]).status, 204);
    // Usage is as last measured: the next reservation (a new session) measures it.
    assert_eq!(upload_token(&p, "y.bin", 10).status, 200);
    let project = "project:0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e";
    let r = p.manager(
        "/quota-scope",
        serde_json::json!({"volume": "local", "qsid": project, "options": {"limit_bytes": 4096}}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let user = "volume=\"local\",scope=\"3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b\"";
    let proj = "volume=\"local\",scope=\"0b1c2d3e4f5a4b6c8d7e9f0a1b2c3d4e\"";
    let scrape = || {
        let r = request(p.manager, "GET", "/metrics", &[], b"");
        assert_eq!(r.status, 200);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let e = Exposition::parse(&text);
        e.check();
        (text, e)
    };
    let limit = "storage_proxy_quota_scope_limit_bytes";
    let used = "storage_proxy_quota_scope_used_bytes";
    let (text, e) = scrape();
    assert_eq!(e.value(limit, user), Some(50_000.0), "{text}");
    assert!(e.value(used, user) >= Some(1000.0), "{text}");
    assert_eq!(e.value(limit, proj), Some(4096.0), "{text}");
    // A changed limit shows at once; a removed one leaves no series.
    set_limit(&p, 70_000);
    let (text, e) = scrape();
    assert_eq!(e.value(limit, user), Some(70_000.0), "{text}");
    let qs = serde_json::json!({"volume": "local", "qsid": QSID});
    assert_eq!(
        p.manager_method("DELETE", "/quota-scope/quota", qs).status,
        204
    );
    let (text, e) = scrape();
    assert_eq!(e.value(limit, user), None, "{text}");
    assert!(e.value(used, user).is_some(), "usage stays: {text}");
    assert_eq!(e.value(limit, proj), Some(4096.0), "{text}");
}

/// `storage_proxy_quota_walks_total`: walks measuring a scope's committed bytes.
fn walks(p: &Proxy) -> u64 {
    use appproxy_test_support::prom::Exposition;
    let r = request(p.manager, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let e = Exposition::parse(&text);
    e.value("storage_proxy_quota_walks_total", "")
        .unwrap_or_else(|| panic!("no walk counter in {text}")) as u64
}

/// A scope full of files a user's shell left there is walked once, not once per
/// PATCH: concurrent uploads in many PATCHes share one measurement, and the limit
/// still holds exactly across them (the bytes each completion puts in place are
/// added to the measurement in the step that releases its reservation).
#[test]
fn patches_share_one_measurement_and_concurrent_uploads_still_fit_the_limit() {
    const LIMIT: usize = 10_000;
    const BEFORE: usize = 1_000;
    const SIZE: usize = 900;
    const PIECE: usize = 100;
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, LIMIT as u64);
    let vf = p.vfolder_path();
    for i in 0..2_000 {
        std::fs::File::create(vf.join(format!("empty-{i}"))).expect("empty file");
    }
    std::fs::write(vf.join("before.bin"), vec![3u8; BEFORE]).expect("file");
    let before = walks(&p);
    let ok = std::sync::atomic::AtomicUsize::new(0);
    let refused = std::sync::atomic::AtomicUsize::new(0);
    let patches = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (p, ok, refused, patches) = (&p, &ok, &refused, &patches);
            s.spawn(move || {
                for i in 0..3 {
                    let r = upload_token(p, &format!("f-{t}-{i}.bin"), SIZE);
                    if r.status == 413 {
                        assert_eq!(r.json()["code"], "quota-exceeded");
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let token = r.json()["token"].as_str().expect("token").to_owned();
                    for offset in (0..SIZE).step_by(PIECE) {
                        let r = patch(p, &token, offset, &[1u8; PIECE]);
                        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
                        patches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let fit = (LIMIT - BEFORE) / SIZE;
    assert_eq!(ok.load(std::sync::atomic::Ordering::Relaxed), fit);
    assert_eq!(refused.load(std::sync::atomic::Ordering::Relaxed), 12 - fit);
    assert_eq!(
        patches.load(std::sync::atomic::Ordering::Relaxed),
        fit * SIZE / PIECE
    );
    // 12 session checks and 90 PATCH checks, one walk (the first check's; the
    // others that came meanwhile waited for it).
    assert_eq!(walks(&p) - before, 1, "{}", p.log());
    // The measurement followed the completions: the scope is full.
    let r = upload_token(&p, "one-more.bin", 1);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let q = p
        .manager_method(
            "GET",
            "/quota-scope",
            serde_json::json!({"volume": "local", "qsid": QSID}),
        )
        .json();
    assert_eq!(q["used_bytes"], (BEFORE + fit * SIZE) as u64, "{q}");
    assert_eq!(q["reserved_bytes"], 0, "{q}");
}

/// Bytes written behind the proxy's back (from a container) do not count while the
/// measurement is younger than `quota_usage_max_age_secs`; the first check after
/// that walks again and sees them.
#[test]
fn usage_written_behind_the_proxys_back_counts_once_the_measurement_is_older_than_the_bound() {
    use std::time::{Duration, Instant};
    const BOUND: Duration = Duration::from_secs(3);
    let p = Proxy::start("quota_usage_max_age_secs = 3\n");
    create_with_limit(&p, 10_000);
    let measured_after = Instant::now();
    let a = session(&p, "a.bin", 1_000);
    let measured = walks(&p);
    std::fs::write(p.vfolder_path().join("outside.bin"), vec![0u8; 9_500]).expect("file");
    // Within the bound the measurement (0 bytes committed) stands.
    let r = patch(&p, &a, 0, &[0u8; 100]);
    if measured_after.elapsed() < BOUND {
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(walks(&p), measured);
    }
    // Past it, the next check measures again: 9 500 + 1 000 reserved > 10 000.
    std::thread::sleep(
        (measured_after + BOUND + Duration::from_millis(200))
            .saturating_duration_since(Instant::now()),
    );
    let r = request(p.client, "HEAD", &format!("/upload?token={a}"), &[], b"");
    let offset: usize = r
        .header("upload-offset")
        .and_then(|v| v.parse().ok())
        .expect("offset");
    let r = patch(&p, &a, offset, &[0u8; 100]);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "quota-exceeded");
    let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
    assert!(title.contains("9500 of 10000"), "{title}");
    assert_eq!(walks(&p), measured + 1);
}

/// A file with several hard links in a scope (in one vfolder or two) counts once,
/// by device and inode, as `du` counts it; the vfolder's own usage counts names, as
/// the original does.
#[test]
fn a_file_hard_linked_in_a_scope_counts_once() {
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    create_with_limit(&p, 10_000);
    let vf = p.vfolder_path();
    let other = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000beef";
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": other}),
        None,
    );
    assert_eq!(r.status, 204);
    let other_path = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/000000000000000000000000beef");
    std::fs::write(vf.join("data.bin"), vec![1u8; 6_000]).expect("file");
    std::fs::create_dir(vf.join("sub")).expect("sub");
    for link in [
        vf.join("data-link.bin"),
        vf.join("sub/again.bin"),
        other_path.join("shared.bin"),
    ] {
        std::fs::hard_link(vf.join("data.bin"), link).expect("hard link");
    }
    // 6 000 once, not 24 000: 3 000 more fit.
    let r = upload_token(&p, "b.bin", 3_000);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = upload_token(&p, "c.bin", 1_001);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
    assert!(title.contains("9000 of 10000"), "{title}");
    let q = p
        .manager_method(
            "GET",
            "/quota-scope",
            serde_json::json!({"volume": "local", "qsid": QSID}),
        )
        .json();
    assert_eq!(q["used_bytes"], 6_000, "{q}");
    let r = p.manager(
        "/folder/usage",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        None,
    );
    assert_eq!(r.json()["used_bytes"], 18_000, "three names");
}

/// Only each vfolder's own `.upload` is left out of committed bytes: a directory of
/// that name deeper down is the user's, and its bytes count.
#[test]
fn a_directory_named_upload_below_the_vfolder_top_counts() {
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    create_with_limit(&p, 10_000);
    let hidden = p.vfolder_path().join("sub/.upload");
    std::fs::create_dir_all(&hidden).expect("dir");
    std::fs::write(hidden.join("kept.bin"), vec![1u8; 6_000]).expect("file");
    let r = upload_token(&p, "b.bin", 4_001);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
    assert!(title.contains("6000 of 10000"), "{title}");
    let r = p.manager(
        "/folder/usage",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        None,
    );
    assert_eq!(r.json()["used_bytes"], 6_000);
    assert_eq!(upload_token(&p, "c.bin", 4_000).status, 200);
}

/// A delete through the manager API frees its room for the next check at once,
/// however young the measurement (the check measures again).
#[test]
fn a_delete_through_the_api_frees_room_at_once() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 10_000);
    assert_eq!(p.upload("big.bin", &[5u8; 8_000]).status, 204);
    let r = upload_token(&p, "next.bin", 3_000);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let measured = walks(&p);
    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["big.bin"]}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(upload_token(&p, "next.bin", 3_000).status, 200);
    assert_eq!(walks(&p), measured + 1);
}

/// The periodic sync pass measures a scope no check measured (its walk counted like
/// a check's), and `/metrics` shows the figure.
#[test]
fn the_sync_pass_measures_scopes_no_check_did() {
    use appproxy_test_support::prom::Exposition;
    use std::time::{Duration, Instant};
    let p = Proxy::start("cleanup_interval_secs = 1\n");
    create_with_limit(&p, 10_000);
    std::fs::write(p.vfolder_path().join("shell.bin"), vec![0u8; 4_321]).expect("file");
    let user = "volume=\"local\",scope=\"3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b\"";
    // A hang guard, not a timing assertion: the pass runs every second.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = request(p.manager, "GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let e = Exposition::parse(&text);
        if e.value("storage_proxy_quota_scope_used_bytes", user) == Some(4_321.0) {
            assert!(
                e.value("storage_proxy_quota_walks_total", "") >= Some(1.0),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{text}\n{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The measurement serves the next check: 4 321 + 5 680 > 10 000.
    let r = upload_token(&p, "big.bin", 5_680);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
}

fn quota_scope(p: &Proxy) -> serde_json::Value {
    let r = p.manager_method(
        "GET",
        "/quota-scope",
        serde_json::json!({"volume": "local", "qsid": QSID}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn folder_used_bytes(p: &Proxy) -> serde_json::Value {
    let r = p.manager(
        "/folder/usage",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["used_bytes"].clone()
}

/// Bytes a shell user writes straight into the vfolder's staging area belong to no
/// upload in progress: they count against the quota (and in the usage reports) like
/// any other file, whatever their name, a session-like one included.
#[test]
fn bytes_written_into_the_staging_area_count_against_the_quota() {
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    create_with_limit(&p, 10_000);
    let staging = p.vfolder_path().join(".upload");
    std::fs::create_dir_all(staging.join("sub")).expect("staging");
    std::fs::write(staging.join("hidden.bin"), vec![1u8; 5_000]).expect("file");
    std::fs::write(staging.join("sub/deeper.bin"), vec![1u8; 500]).expect("file");
    // Named like a session's staged file, but no session of this proxy has it.
    std::fs::write(
        staging.join("0123456789abcdef0123456789abcdef"),
        vec![1u8; 1_500],
    )
    .expect("file");
    // 7 000 used: an upload that would fit without them is refused.
    let r = upload_token(&p, "b.bin", 3_001);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "quota-exceeded");
    let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
    assert!(title.contains("7000 of 10000"), "{title}");
    assert_eq!(quota_scope(&p)["used_bytes"], 7_000);
    assert_eq!(folder_used_bytes(&p), 7_000);
    // Exactly the room left still goes through, whole.
    let token = session(&p, "b.bin", 3_000);
    assert_eq!(patch(&p, &token, 0, &[2u8; 3_000]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(
        (q["used_bytes"].clone(), q["reserved_bytes"].clone()),
        (10_000.into(), 0.into())
    );
    assert_eq!(upload_token(&p, "c.bin", 1).status, 413);
}

/// The staged file of an upload in progress is held by its reservation: counted
/// once, not also as committed bytes, while what a shell put beside it counts. An
/// upload of exactly the room left goes through; one byte more does not.
#[test]
fn a_live_upload_is_counted_once_beside_bytes_hidden_in_staging() {
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    create_with_limit(&p, 10_000);
    // A session of 4 000 bytes, 1 500 of them staged.
    let a = session(&p, "a.bin", 4_000);
    assert_eq!(patch(&p, &a, 0, &[1u8; 1_500]).status, 204);
    std::fs::write(
        p.vfolder_path().join(".upload/hidden.bin"),
        vec![1u8; 2_000],
    )
    .expect("file");
    // The scope holds the 2 000 hidden bytes; the 1 500 staged ones are among the
    // 4 000 reserved, so 4 000 are left.
    let q = quota_scope(&p);
    assert_eq!(q["used_bytes"], 2_000, "{q}");
    assert_eq!(q["reserved_bytes"], 4_000, "{q}");
    assert_eq!(
        folder_used_bytes(&p),
        2_000,
        "a live upload's staged file is not in it"
    );
    assert_eq!(upload_token(&p, "b.bin", 4_001).status, 413);
    let b = session(&p, "b.bin", 4_000);
    // Both finish, each check measuring the scope again: exactly full.
    assert_eq!(patch(&p, &b, 0, &[2u8; 4_000]).status, 204);
    assert_eq!(patch(&p, &a, 1_500, &[1u8; 2_500]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(q["used_bytes"], 10_000, "{q}");
    assert_eq!(q["reserved_bytes"], 0, "{q}");
    assert_eq!(folder_used_bytes(&p), 10_000);
}

/// `GET /quota-scope` counted a live upload's staged bytes twice: in `used_bytes`
/// (a look at the staging areas) and in `reserved_bytes` (the reservation holding
/// them), so a 61-byte session with 60 written on a 100-byte limit showed 121 of
/// 100 taken while the quota's check, which counts them once, admitted another
/// 39. Now they count once, in `reserved_bytes` until the upload completes and in
/// `used_bytes` from then on: used plus reserved is what the check compares with
/// the limit.
#[test]
fn a_live_upload_is_reported_once_as_reserved() {
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    create_with_limit(&p, 100);
    let a = session(&p, "a.bin", 61);
    assert_eq!(patch(&p, &a, 0, &[1u8; 60]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(
        (&q["used_bytes"], &q["reserved_bytes"], &q["limit_bytes"]),
        (&0.into(), &61.into(), &100.into()),
        "{q}"
    );
    // What the report leaves is what the check admits: 39 bytes, not one more.
    assert_eq!(upload_token(&p, "b.bin", 40).status, 413);
    let r = upload_token(&p, "b.bin", 39);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let q = quota_scope(&p);
    assert_eq!(
        (&q["used_bytes"], &q["reserved_bytes"]),
        (&0.into(), &100.into()),
        "{q}"
    );
    // Completed, its bytes move from reserved to used.
    assert_eq!(patch(&p, &a, 60, &[1u8; 1]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(
        (&q["used_bytes"], &q["reserved_bytes"]),
        (&61.into(), &39.into()),
        "{q}"
    );
}

/// A restart forgets the reservations: a session's staged file then counts as
/// committed, until the session resumes and reserves again, when its reservation
/// holds it (not counted twice): the upload still finishes at exactly the limit.
#[test]
fn a_session_resumed_after_a_restart_is_not_counted_twice() {
    let mut p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 10_000);
    let a = session(&p, "a.bin", 10_000);
    assert_eq!(patch(&p, &a, 0, &[1u8; 6_000]).status, 204);
    p.restart();
    // No reservation now: the staged bytes are committed ones.
    let q = quota_scope(&p);
    assert_eq!(
        (q["used_bytes"].clone(), q["reserved_bytes"].clone()),
        (6_000.into(), 0.into())
    );
    assert_eq!(upload_token(&p, "b.bin", 4_001).status, 413);
    // The session resumes: reserved whole again, its staged bytes held by it
    // (counted there only).
    assert_eq!(patch(&p, &a, 6_000, &[1u8; 3_000]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(
        (q["used_bytes"].clone(), q["reserved_bytes"].clone()),
        (0.into(), 10_000.into())
    );
    assert_eq!(upload_token(&p, "b.bin", 1).status, 413);
    assert_eq!(patch(&p, &a, 9_000, &[1u8; 1_000]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(
        (q["used_bytes"].clone(), q["reserved_bytes"].clone()),
        (10_000.into(), 0.into())
    );
    assert_eq!(
        std::fs::metadata(p.vfolder_path().join("a.bin"))
            .expect("a")
            .len(),
        10_000
    );
}

/// The manager API refuses the staging area (`.upload` at the vfolder's root) as a
/// source or destination of a move, a rename, a mkdir or a delete, also when a path
/// reaches it through a symlink; a `.upload` deeper down, and names that only begin
/// like it, are ordinary.
#[test]
fn the_api_refuses_the_staging_area_as_source_or_destination() {
    let p = Proxy::start("");
    create_with_limit(&p, 100_000);
    assert_eq!(p.upload("a.bin", &[1u8; 100]).status, 204);
    let vf = p.vfolder_path();
    assert!(vf.join(".upload").is_dir(), "the upload made it");
    std::fs::write(vf.join(".upload/staged.bin"), [2u8; 10]).expect("file");
    std::os::unix::fs::symlink(".upload", vf.join("link")).expect("link");
    let call = |path: &str, body: serde_json::Value| {
        let mut body = body;
        body["volume"] = "local".into();
        body["vfid"] = VFID.into();
        p.manager(path, body, None)
    };
    let refused = |r: appproxy_test_support::http::Resp| {
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            r.json()["code"],
            "invalid-api-params",
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
        assert!(title.contains("staging area"), "{title}");
    };
    let mv = |src: &str, dst: &str| {
        call(
            "/folder/file/move",
            serde_json::json!({"src_relpath": src, "dst_relpath": dst}),
        )
    };
    refused(mv("a.bin", ".upload/a.bin"));
    refused(mv("a.bin", "./.upload/0123456789abcdef0123456789abcdef"));
    refused(mv("a.bin", ".upload"));
    refused(mv(".upload/staged.bin", "out.bin"));
    refused(mv(".upload", "elsewhere"));
    refused(mv("a.bin", "link/a.bin"));
    refused(mv("link/staged.bin", "out.bin"));
    let rename = |relpath: &str, new_name: &str| {
        call(
            "/folder/file/rename",
            serde_json::json!({"relpath": relpath, "new_name": new_name}),
        )
    };
    refused(rename("a.bin", ".upload"));
    refused(rename(".upload", "mine"));
    refused(rename(".upload/staged.bin", "x.bin"));
    refused(rename("link/staged.bin", "x.bin"));
    refused(call(
        "/folder/file/delete",
        serde_json::json!({"relpaths": [".upload/staged.bin"]}),
    ));
    refused(call(
        "/folder/file/delete",
        serde_json::json!({"relpaths": [".upload"], "recursive": true}),
    ));
    let r = call(
        "/folder/file/delete",
        serde_json::json!({"relpaths": ["link/staged.bin"]}),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let r = call(
        "/folder/file/mkdir",
        serde_json::json!({"relpath": ".upload/d", "parents": true}),
    );
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let msg = r.json()["results"]["failed"][0]["msg"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(msg.contains("staging area"), "{msg}");
    // An upload whose destination reaches the staging area through the symlink is
    // refused when it completes.
    let r = p.upload("link/x.bin", b"data");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(!vf.join(".upload/x.bin").exists());
    // Nothing moved.
    assert_eq!(std::fs::read(vf.join("a.bin")).expect("a").len(), 100);
    assert_eq!(
        std::fs::read(vf.join(".upload/staged.bin"))
            .expect("staged")
            .len(),
        10
    );
    assert!(!vf.join(".upload/a.bin").exists() && !vf.join(".upload/d").exists());
    // Ordinary names: a `.upload` below the top, `.uploads`, `.upload.bak`.
    let r = call(
        "/folder/file/mkdir",
        serde_json::json!({"relpath": ["sub/.upload", ".uploads"], "parents": true}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(mv("a.bin", "sub/.upload/a.bin").status, 204);
    assert_eq!(mv("sub/.upload/a.bin", ".uploads/a.bin").status, 204);
    assert_eq!(rename(".uploads/a.bin", ".upload.bak").status, 204);
    assert_eq!(
        std::fs::read(vf.join(".uploads/.upload.bak"))
            .expect("moved")
            .len(),
        100
    );
    let r = call(
        "/folder/file/delete",
        serde_json::json!({"relpaths": ["sub/.upload"], "recursive": true}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// A rename, a move or an upload that replaces a file frees the room of the file
/// it replaced for the next check and report at once, however young the
/// measurement, as a delete does (the check measures again). Before, the replaced
/// file stayed counted until the measurement was `quota_usage_max_age_secs` old.
#[test]
fn a_file_replaced_through_the_api_frees_its_room_at_once() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 10_000);
    let call = |path: &str, body: serde_json::Value| {
        let mut body = body;
        body["volume"] = "local".into();
        body["vfid"] = VFID.into();
        let r = p.manager(path, body, None);
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    };
    // A rename over a file.
    assert_eq!(p.upload("big.bin", &[5u8; 8_000]).status, 204);
    assert_eq!(p.upload("small.bin", &[1u8; 100]).status, 204);
    assert_eq!(quota_scope(&p)["used_bytes"], 8_100);
    assert_eq!(upload_token(&p, "next.bin", 3_000).status, 413);
    call(
        "/folder/file/rename",
        serde_json::json!({"relpath": "small.bin", "new_name": "big.bin"}),
    );
    assert_eq!(quota_scope(&p)["used_bytes"], 100);
    // A move over a file.
    assert_eq!(p.upload("d/big.bin", &[5u8; 8_000]).status, 204);
    assert_eq!(quota_scope(&p)["used_bytes"], 8_100);
    call(
        "/folder/file/move",
        serde_json::json!({"src_relpath": "big.bin", "dst_relpath": "d/big.bin"}),
    );
    assert_eq!(quota_scope(&p)["used_bytes"], 100);
    // Uploads over a file: the older file's bytes go, the new ones count.
    assert_eq!(p.upload("d/big.bin", &[6u8; 8_000]).status, 204);
    assert_eq!(quota_scope(&p)["used_bytes"], 8_000);
    assert_eq!(p.upload("d/big.bin", &[7u8; 50]).status, 204);
    assert_eq!(quota_scope(&p)["used_bytes"], 50);
    // Exactly the room left fits, one byte more does not.
    assert_eq!(upload_token(&p, "next.bin", 9_951).status, 413);
    let r = upload_token(&p, "next.bin", 9_950);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// A finished clone counts what it copied: a symlink in the source (whose target's
/// length the source counts, as `st_size`) is not copied and adds nothing to the
/// destination. Before, the clone added the size it reserved, symlinks included,
/// and the scope stayed overcounted until the next walk.
#[test]
fn a_finished_clone_counts_the_bytes_it_copied() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 100_000);
    // Made before the scope is first measured (by the upload's check).
    std::os::unix::fs::symlink("x".repeat(3_000), p.vfolder_path().join("l")).expect("link");
    assert_eq!(p.upload("a.bin", &[1u8; 400]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(q["used_bytes"], 3_400, "{q}");
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000c10e";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A hang guard, not a timing assertion: the copy runs in the background and
    // releases its reservation when it ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let q = loop {
        let q = quota_scope(&p);
        if q["reserved_bytes"] == 0 {
            break q;
        }
        assert!(std::time::Instant::now() < deadline, "{q}\n{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(q["used_bytes"], 3_800, "{q}");
    let copy = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/000000000000000000000000c10e");
    assert_eq!(
        std::fs::read(copy.join("a.bin")).expect("copied").len(),
        400
    );
    assert!(std::fs::symlink_metadata(copy.join("l")).is_err());
}

/// A clone copies no more than it measured and reserved: a source file grown
/// (sparse, in an instant) right after the clone started is not copied past the
/// measured size, so the destination never holds more than its reservation. Before,
/// the copy took each file to its end of file when it reached it: a 64 MiB
/// destination file on a 1 MiB reservation. The clone that stopped leaves nothing:
/// its partial copy is removed (before, it stayed, holding the scope's room).
#[test]
fn a_clone_copies_no_more_than_it_reserved_when_the_source_grows() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 16 << 20);
    let src = p.vfolder_path();
    // Enough small files that the copy takes a moment, then a subdirectory (walked
    // after them) holding an empty file.
    for i in 0..2_000 {
        std::fs::write(src.join(format!("f{i:05}")), [b'x'; 512]).expect("file");
    }
    std::fs::create_dir(src.join("zz")).expect("zz");
    std::fs::write(src.join("zz/big"), b"").expect("big");
    let measured = 2_000 * 512;
    // The growth must land while the copy runs: a copy that won the race (ended
    // first) is tried again on a new destination.
    for attempt in 0..5u32 {
        let big = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("zz/big"))
            .expect("big");
        big.set_len(0).expect("shrink");
        let dst = format!(
            "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/00000000000000000000000000{attempt:02}c10e"
        );
        let r = p.manager(
            "/folder/clone",
            serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
            None,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let task = r.json()["bgtask_id"].as_str().expect("id").to_owned();
        // Measured and reserved; the copy runs in the background: the source grows now.
        big.set_len(64 << 20).expect("grow");
        // A hang guard, not a timing assertion: the copy releases its reservation
        // when it ends, and logs how it ended.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let outcome = loop {
            let ended = p.log_json().into_iter().find(|l| {
                l["bgtask_id"] == task.as_str()
                    && (l["message"] == "bgtask done" || l["message"] == "bgtask failed")
            });
            if let (Some(l), true) = (ended, quota_scope(&p)["reserved_bytes"] == 0) {
                break l["message"].as_str().expect("message").to_owned();
            }
            assert!(std::time::Instant::now() < deadline, "{}", p.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let copy = p.dir.path().join(format!(
            "vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/0000000000000000000000{attempt:02}c10e"
        ));
        if outcome == "bgtask done" {
            // Copied whole before the growth: no more than was measured.
            let big_copy = std::fs::metadata(copy.join("zz/big"))
                .expect("copied")
                .len();
            assert_eq!(
                big_copy, 0,
                "{big_copy} bytes copied on a reservation of {measured}"
            );
            continue;
        }
        assert!(
            p.log().contains("the source grew while it was cloned"),
            "{}",
            p.log()
        );
        assert!(
            !copy.exists(),
            "the stopped clone's partial copy is left: {:?}",
            std::fs::read_dir(&copy).map(|d| d.count())
        );
        // The scope holds the source alone again once measured.
        assert_eq!(
            quota_scope(&p)["used_bytes"],
            measured + (64 << 20),
            "{}",
            p.log()
        );
        return;
    }
    panic!("every copy ended before its source grew");
}

/// A clone keeps a sparse file's holes: only its data is copied, at the same
/// offsets, and the copy has the source's size. A 1 GiB file holding 64 KiB of data
/// in the middle and at its very end, and a 256 MiB file that is all hole
/// (`truncate -s`, no disk, instant), copy as the same bytes taking well under a few
/// MiB of disk; their apparent sizes still count in the scope, as the originals'
/// do. Before, every clone wrote the holes out as zeros: 1.25 GiB written and
/// allocated for files that took none.
#[test]
fn a_clone_keeps_a_sparse_files_holes() {
    use std::os::unix::fs::{FileExt as _, MetadataExt as _};
    const GIB: u64 = 1 << 30;
    const DATA: u64 = 64 << 10;
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 8 * GIB);
    let src = p.vfolder_path();
    let pattern: Vec<u8> = (0..DATA).map(|i| (i * 7 + i / 251) as u8).collect();
    let sparse = std::fs::File::create(src.join("sparse")).expect("sparse");
    sparse.set_len(GIB).expect("size");
    let ranges = [GIB / 2 + 12_345, GIB - DATA];
    for at in ranges {
        sparse.write_all_at(&pattern, at).expect("data");
    }
    drop(sparse);
    let hole = std::fs::File::create(src.join("hole")).expect("hole");
    hole.set_len(GIB / 4).expect("size");
    // Whether the file system under the test's directory keeps and reports holes
    // (tmpfs, ext4, xfs, btrfs do): an all-hole file has no data to seek to. Where
    // it does not, the clone copies through its fallback (every byte as data) and
    // only sizes and bytes are compared: the source itself takes its full size
    // there, and so does any copy of it.
    let holes = matches!(
        rustix::fs::seek(&hole, rustix::fs::SeekFrom::Data(0)),
        Err(rustix::io::Errno::NXIO)
    ) && std::fs::metadata(src.join("sparse"))
        .expect("meta")
        .blocks()
        * 512
        < 4 << 20;
    drop(hole);
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/00000000000000000000000000005a5e";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let task = r.json()["bgtask_id"].as_str().expect("id").to_owned();
    // A hang guard, not a timing assertion.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let outcome = loop {
        let ended = p.log_json().into_iter().find(|l| {
            l["bgtask_id"] == task.as_str()
                && (l["message"] == "bgtask done" || l["message"] == "bgtask failed")
        });
        if let (Some(l), true) = (ended, quota_scope(&p)["reserved_bytes"] == 0) {
            break l["message"].as_str().expect("message").to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(outcome, "bgtask done", "{}", p.log());
    let copy = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/0000000000000000000000005a5e");
    for (name, size) in [("sparse", GIB), ("hole", GIB / 4)] {
        let meta = std::fs::metadata(copy.join(name)).expect("copied");
        assert_eq!(meta.len(), size, "{name}");
        if holes {
            assert!(
                meta.blocks() * 512 < 4 << 20,
                "{name}: {} bytes allocated for a copy of a file taking {}",
                meta.blocks() * 512,
                std::fs::metadata(src.join(name)).expect("meta").blocks() * 512
            );
        }
    }
    let sparse = std::fs::File::open(copy.join("sparse")).expect("copy");
    let mut buf = vec![0u8; DATA as usize];
    for at in ranges {
        sparse.read_exact_at(&mut buf, at).expect("read");
        assert!(buf == pattern, "the data at {at} differs");
    }
    // Samples of the holes, the edges of the data included.
    let hole = std::fs::File::open(copy.join("hole")).expect("copy");
    let mut zero = vec![0u8; 4096];
    for (f, at) in [
        (&sparse, 0),
        (&sparse, GIB / 4),
        (&sparse, ranges[0] - 4096),
        (&sparse, ranges[0] + DATA),
        (&sparse, ranges[1] - 4096),
        (&hole, 0),
        (&hole, GIB / 8 + 1),
        (&hole, GIB / 4 - 4096),
    ] {
        f.read_exact_at(&mut zero, at).expect("read");
        assert!(zero.iter().all(|&b| b == 0), "a hole at {at} holds data");
    }
    // The copies count their apparent sizes, as the originals do.
    assert_eq!(quota_scope(&p)["used_bytes"], 2 * (GIB + GIB / 4));
}

/// Deleting a vfolder with an upload in progress frees what the upload's
/// reservation held at once (its staged file is gone with the folder): a new
/// upload of the room fits. Before, the reservation held the scope's room until it
/// expired as idle (`upload_expire_secs`, a day by default).
#[test]
fn deleting_a_vfolder_frees_the_reservations_of_its_uploads() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 10_000);
    let token = session(&p, "a.bin", 8_000);
    assert_eq!(patch(&p, &token, 0, &[1u8; 1_000]).status, 204);
    assert_eq!(quota_scope(&p)["reserved_bytes"], 8_000);
    let r = p.manager(
        "/folder/delete",
        serde_json::json!({"volume": "local", "vfid": VFID}),
        None,
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    // A hang guard, not a timing assertion: the delete runs in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while quota_scope(&p)["reserved_bytes"] != 0 {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!p.vfolder_path().exists());
    assert_eq!(quota_scope(&p)["used_bytes"], 0);
    create_folder(&p);
    let r = upload_token(&p, "b.bin", 10_000);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// An upload whose staged file goes while its PATCH runs — its vfolder deleted
/// through the API, or the file removed from a shell in the vfolder — lets its
/// reservation go when the PATCH ends: a new upload of the room fits at once.
/// Before, the deletion passed over the session its PATCH held, the PATCH failed
/// (404), and the reservation held the scope's room until the token expired (an
/// hour), every other upload of the scope refused meanwhile (an outside tester's
/// find).
#[test]
fn an_upload_whose_staged_file_goes_during_its_patch_lets_its_reservation_go() {
    use std::io::Write as _;
    for how in ["the vfolder deleted", "the staged file removed"] {
        let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
        create_with_limit(&p, 10_000);
        let token = session(&p, "a.bin", 8_000);
        let mut running = patch_begun(&p, &token, 8_000, 1_000);
        assert_eq!(quota_scope(&p)["reserved_bytes"], 8_000, "{how}");
        if how == "the vfolder deleted" {
            let r = p.manager(
                "/folder/delete",
                serde_json::json!({"volume": "local", "vfid": VFID}),
                None,
            );
            assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while p.vfolder_path().exists() {
                assert!(std::time::Instant::now() < deadline, "{}", p.log());
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        } else {
            let staging = p.vfolder_path().join(".upload");
            for entry in std::fs::read_dir(&staging).expect("staging area") {
                std::fs::remove_file(entry.expect("entry").path()).expect("rm");
            }
        }
        // Its PATCH runs: the reservation is its own still.
        assert_eq!(quota_scope(&p)["reserved_bytes"], 8_000, "{how}");
        running.write_all(&[7u8; 7_000]).expect("the rest");
        let answer = read_until_closed(&mut running);
        assert!(
            !answer.starts_with(b"HTTP/1.1 204"),
            "{how}: {}",
            String::from_utf8_lossy(&answer)
        );
        // A hang guard, not a timing assertion.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while quota_scope(&p)["reserved_bytes"] != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{how}: still reserved {}; {}",
                quota_scope(&p),
                p.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(p.tus_head(&token).status, 404, "{how}");
        if how == "the vfolder deleted" {
            create_folder(&p);
        }
        let r = upload_token(&p, "b.bin", 10_000);
        assert_eq!(r.status, 200, "{how}: {}", String::from_utf8_lossy(&r.body));
    }
}

/// A staged file replaced between PATCHes by something that is no file (from a
/// shell in the vfolder: a directory, a symlink out of the vfolder, a FIFO) ends
/// the upload: the next PATCH is told 404, touches nothing, and lets the
/// reservation go, as a staged file removed does. Before, the reservation held the
/// scope's room until the token expired (an outside verifier's find).
#[test]
fn an_upload_whose_staged_file_is_replaced_by_no_file_lets_its_reservation_go() {
    let outside = tempfile::tempdir().expect("tempdir");
    for swap in ["a directory", "a symlink out", "a FIFO"] {
        let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
        create_with_limit(&p, 10_000);
        let token = session(&p, "a.bin", 8_000);
        assert_eq!(patch(&p, &token, 0, &[1u8; 1_000]).status, 204);
        // The first PATCH's own look at its staged file (as it ends, on the
        // blocking pool) is let pass before the swap: it would see the swap too.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let staged = swap_staged(&p, swap, outside.path());
        let r = patch(&p, &token, 1_000, &[1u8; 1_000]);
        assert_eq!(
            r.status,
            404,
            "{swap}: {}",
            String::from_utf8_lossy(&r.body)
        );
        // A hang guard, not a timing assertion: the look runs as the PATCH ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while quota_scope(&p)["reserved_bytes"] != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{swap}: still reserved {}; {}",
                quota_scope(&p),
                p.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            std::fs::symlink_metadata(&staged).is_ok(),
            "{swap}: removed"
        );
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("outside").count(),
            0,
            "{swap}: written through"
        );
        // Room the released 8,000 held (what is in the staged file's place, a
        // symlink's few bytes, counts as the user's).
        let r = upload_token(&p, "b.bin", 9_000);
        assert_eq!(
            r.status,
            200,
            "{swap}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

/// A staged file replaced while its PATCH runs (from a shell in the vfolder: by a
/// directory, a symlink out of the vfolder, another file) is never put in place:
/// the PATCH that wrote the file now unnamed answers 409, nothing is at the
/// destination, nothing outside the vfolder is touched (a symlink's target), and
/// the reservation is released. Before, whatever had the session's
/// name was renamed into place and answered 204, the bytes written lost and counted
/// (an outside verifier's find).
#[test]
fn a_staged_file_replaced_during_its_patch_is_never_put_in_place() {
    use std::io::Write as _;
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("kept.txt"), b"outside").expect("outside file");
    for swap in ["a directory", "a symlink out", "another file"] {
        let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
        create_with_limit(&p, 10_000);
        let token = session(&p, "swapped.bin", 8_000);
        let mut running = patch_begun(&p, &token, 8_000, 1_000);
        swap_staged(&p, swap, outside.path());
        running.write_all(&[7u8; 7_000]).expect("the rest");
        let answer = String::from_utf8_lossy(&read_until_closed(&mut running)).into_owned();
        assert!(answer.starts_with("HTTP/1.1 409"), "{swap}: {answer}");
        assert!(answer.contains("was replaced"), "{swap}: {answer}");
        assert!(
            std::fs::symlink_metadata(p.vfolder_path().join("swapped.bin")).is_err(),
            "{swap}: something was put in place"
        );
        assert_eq!(
            std::fs::read(outside.path().join("kept.txt")).expect("outside"),
            b"outside"
        );
        assert_eq!(quota_scope(&p)["reserved_bytes"], 0, "{swap}");
        let r = upload_token(&p, "b.bin", 10_000);
        assert_eq!(
            r.status,
            200,
            "{swap}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

/// A limit set on a scope has its first check measure the scope again: what an
/// upload wrote while the scope had none (no reservation held it) counts at once.
/// Before, the check took the measurement made before those bytes, and a session
/// the staged bytes left no room for was accepted.
#[test]
fn a_limit_set_counts_what_uploads_wrote_while_there_was_none() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_folder(&p);
    assert_eq!(quota_scope(&p)["used_bytes"], 0);
    let a = session(&p, "a.bin", 1_000);
    assert_eq!(patch(&p, &a, 0, &[1u8; 900]).status, 204);
    set_limit(&p, 1_000);
    let r = upload_token(&p, "b.bin", 500);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(quota_scope(&p)["used_bytes"], 900);
    // The session resumes under the limit, its staged bytes counted once.
    assert_eq!(patch(&p, &a, 900, &[1u8; 100]).status, 204);
    let q = quota_scope(&p);
    assert_eq!(
        (q["used_bytes"].clone(), q["reserved_bytes"].clone()),
        (1_000.into(), 0.into())
    );
    assert_eq!(upload_token(&p, "c.bin", 1).status, 413);
}

/// In a scope without a limit an upload's PATCHes write bytes no reservation holds:
/// `GET /quota-scope` (and `/metrics`) count them at once, however young the
/// measurement, and the completed file once. Before, they showed only once the
/// measurement was `quota_usage_max_age_secs` old.
#[test]
fn bytes_a_patch_writes_without_a_reservation_show_in_the_scope_report_at_once() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_folder(&p);
    assert_eq!(quota_scope(&p)["used_bytes"], 0);
    let a = session(&p, "a.bin", 1_000);
    for (offset, used) in [(0, 300), (300, 600)] {
        assert_eq!(patch(&p, &a, offset, &[1u8; 300]).status, 204);
        let q = quota_scope(&p);
        assert_eq!(
            (q["used_bytes"].clone(), q["reserved_bytes"].clone()),
            (used.into(), 0.into()),
            "{q}"
        );
    }
    assert_eq!(patch(&p, &a, 600, &[1u8; 400]).status, 204);
    assert_eq!(quota_scope(&p)["used_bytes"], 1_000);
    assert_eq!(walks(&p), 1, "one walk: the first report");
    // Measured again, the figure is the same.
    set_limit(&p, 5_000);
    assert_eq!(quota_scope(&p)["used_bytes"], 1_000);
}

/// The expired-upload cleanup removes a staging file by its name and released the
/// reservation of the session of that name, wherever the file was. The session ID
/// is in the upload token its user holds, so a user who can write in another
/// vfolder's staging area (a shell in a container mounting it) put a file of that
/// name there with an old mtime: the cleanup removed it and released the session's
/// reservation while its PATCH was still writing, and a second session took the
/// same room: the two uploads completed past the limit. A session whose PATCH runs
/// keeps its reservation (and a file of its name stays until the PATCH ends), and
/// only a reservation of the scope where the file was is released.
#[test]
fn a_file_named_after_a_live_session_elsewhere_never_releases_its_reservation() {
    use std::io::Write as _;
    let p = Proxy::start(
        "upload_expire_secs = 3600\ncleanup_interval_secs = 1\nquota_usage_max_age_secs = 3600\n",
    );
    create_with_limit(&p, 1_000);
    // A second vfolder of the same scope, where the user has a shell.
    let other = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0123456789abcdef0123456789abcdef";
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": other}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let token = session(&p, "a.bin", 1_000);
    let session = std::fs::read_dir(p.vfolder_path().join(".upload"))
        .expect("staging")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("the staged file");
    // A PATCH of the whole upload, its first 100 bytes sent, the rest to come.
    let mut s = patch_begun(&p, &token, 1_000, 100);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // The decoy: a file of the session's name, old, in the other vfolder's
    // staging area.
    let staging = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/01/23/456789abcdef0123456789abcdef/.upload");
    std::fs::create_dir(&staging).expect("staging area");
    let decoy = std::fs::File::create(staging.join(&session)).expect("decoy");
    decoy
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7_200))
        .expect("old mtime");
    drop(decoy);
    // Two cleanup passes that began after it.
    let passes = |p: &Proxy| p.log().matches("expired-upload cleanup pass").count();
    let seen = passes(&p);
    while passes(&p) < seen + 2 {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(quota_scope(&p)["reserved_bytes"], 1_000, "still held");
    // What the staged file holds so far counts once its reservation is gone: a
    // session of the rest of the room was accepted before.
    let r = upload_token(&p, "b.bin", 900);
    assert_eq!(
        r.status,
        413,
        "the room is the running upload's: {}",
        String::from_utf8_lossy(&r.body)
    );
    // The upload completes; the scope holds what its limit allows.
    s.write_all(&[7u8; 900]).expect("the rest");
    let raw = read_until_closed(&mut s);
    assert!(
        raw.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(
        std::fs::read(p.vfolder_path().join("a.bin")).expect("done"),
        [7u8; 1_000]
    );
    let qs = quota_scope(&p);
    assert_eq!(
        (qs["used_bytes"].as_u64(), qs["reserved_bytes"].as_u64()),
        (Some(1_000), Some(0)),
        "{qs}"
    );
    // The decoy goes with the next passes, once no PATCH of its name runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while staging.join(&session).exists() {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// An upload session's token expires after `session_expire_secs` (an hour by
/// default) and no PATCH can use its reservation after that (a session's token is
/// never made again), but the reservation was held until idle for
/// `upload_expire_secs` (a day): an upload abandoned part way (a closed browser)
/// kept the rest of its size from every other upload of the scope for a day. It is
/// let go once the token has expired and no PATCH runs; what the staged file holds
/// counts as committed from then on.
#[test]
fn a_reservation_is_let_go_once_its_token_has_expired() {
    let p = Proxy::start(
        "session_expire_secs = 3\nupload_expire_secs = 3600\ncleanup_interval_secs = 1\n",
    );
    create_with_limit(&p, 1_000);
    let token = session(&p, "a.bin", 800);
    assert_eq!(patch(&p, &token, 0, &[1u8; 100]).status, 204);
    assert_eq!(quota_scope(&p)["reserved_bytes"], 800);
    assert_eq!(
        upload_token(&p, "b.bin", 800).status,
        413,
        "a's room is held"
    );
    // A hang guard, not a timing assertion: the token expires after 3 s and the
    // cleanup runs every second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while quota_scope(&p)["reserved_bytes"] != 0 {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(patch(&p, &token, 100, &[1u8; 100]).status, 401, "expired");
    // What a's staged file holds counts; the rest of its room is free.
    assert_eq!(quota_scope(&p)["used_bytes"], 100);
    assert_eq!(upload_token(&p, "b.bin", 901).status, 413);
    assert_eq!(upload_token(&p, "b.bin", 900).status, 200);
}

/// A PATCH still running when its token expires ends then (401, as any use of an
/// expired token), and the reservation is let go. Before, a PATCH whose body came
/// a byte at a time, never slow enough for the stall timeout, kept the session's
/// whole reservation after its token expired: every other upload of the scope got
/// 413 for as long as the client went on.
#[test]
fn a_patch_never_outlives_its_token() {
    let p = Proxy::start(
        "session_expire_secs = 3\nstall_timeout_secs = 5\nmin_body_rate = 0\nupload_expire_secs = 3600\ncleanup_interval_secs = 1\n",
    );
    create_with_limit(&p, 1_000);
    let token = session(&p, "a.bin", 900);
    // A byte a second, to 900 bytes: 15 minutes, were the PATCH not cut.
    let (r, sent) = p.trickled_patch(&token, 900, std::time::Duration::from_secs(1));
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "invalid-token");
    assert!(sent < 900, "cut at the token's expiry: {sent}");
    // A hang guard, not a timing assertion: the cleanup runs every second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while quota_scope(&p)["reserved_bytes"] != 0 {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(upload_token(&p, "b.bin", 900).status, 200, "{}", p.log());
    p.log_holding("upload token expired during the body");
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

/// Whether a manager answer is the refusal of a usage that could not be measured.
fn unmeasured(r: &appproxy_test_support::http::Resp) -> bool {
    r.status == 503 && r.json()["code"] == "usage-unmeasured"
}

/// A user makes a directory of their vfolder unreadable from a container (`chmod
/// 000`, the proxy running as a service user bound by file permissions): the
/// measurement could not open it. It skipped it and stored what it had counted as
/// the scope's committed bytes, and an upload session was admitted on that smaller
/// figure (the 20 000 bytes in it hidden from a 10 000-byte limit); the usage
/// reports said the same partial figure. Now a measurement that did not see the
/// whole tree is never stored or used: the session is refused with 503
/// `usage-unmeasured` naming the directory, so are the reports, and it is logged.
#[test]
fn a_directory_the_measurement_cannot_open_refuses_uploads_instead_of_hiding_its_bytes() {
    use std::os::unix::fs::PermissionsExt as _;
    let p = Proxy::start_bound_by_permissions("quota_usage_max_age_secs = 0\n");
    create_with_limit(&p, 10_000);
    let hidden = p.vfolder_path().join("hidden");
    std::fs::create_dir(&hidden).expect("dir");
    std::fs::write(hidden.join("big.bin"), vec![1u8; 20_000]).expect("file");
    let r = upload_token(&p, "a.bin", 1_000);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let restore = Mode(hidden.clone(), 0o755);
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let r = upload_token(&p, "b.bin", 1_000);
    assert!(
        unmeasured(&r),
        "a session admitted or refused otherwise: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
    assert!(title.contains("hidden"), "{title}");
    assert!(r.json()["request_id"].is_string());
    let folder = serde_json::json!({"volume": "local", "vfid": VFID});
    let reports = [
        p.manager("/folder/usage", folder.clone(), None),
        p.manager_method("GET", "/folder/used-bytes", folder.clone()),
        p.manager_method(
            "GET",
            "/quota-scope",
            serde_json::json!({"volume": "local", "qsid": QSID}),
        ),
    ];
    for r in &reports {
        assert!(
            unmeasured(r),
            "a partial figure reported: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(p.log().contains("could not be measured"), "{}", p.log());
    // Readable again, the directory counts.
    drop(restore);
    let r = upload_token(&p, "c.bin", 1_000);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(folder_used_bytes(&p), 20_000);
}

/// Below 32 levels a walk climbs back up by `..` and stops when a directory moved
/// meanwhile: a user who keeps swapping two directories deep down
/// (`renameat2(RENAME_EXCHANGE)`) from a shell had about half the measurements
/// stop there, and what they had counted (nothing of `zzz/`, visited after) was
/// stored as the scope's committed bytes: sessions were admitted past the limit,
/// and `/folder/used-bytes` reported the partial figure. Now such a walk is tried
/// again (a few times at most) and, if it never completes, nothing is stored or
/// reported: a check or a report answers 503 `usage-unmeasured` instead.
#[test]
fn a_measurement_a_racing_rename_cut_short_is_never_used() {
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    create_with_limit(&p, 1 << 20);
    let v = p.vfolder_path();
    std::fs::create_dir(v.join("zzz")).expect("zzz");
    std::fs::File::create(v.join("zzz/big.bin"))
        .and_then(|f| f.set_len(8 << 20))
        .expect("8 MiB, sparse");
    let chain: std::path::PathBuf = std::iter::once("aaa")
        .chain(std::iter::repeat_n("d", 40))
        .collect();
    let chain = v.join(chain);
    std::fs::create_dir_all(chain.join("x")).expect("chain");
    std::fs::create_dir_all(v.join("alt/y")).expect("alt");
    for i in 0..300 {
        std::fs::write(chain.join(format!("x/f{i}")), b"").expect("f");
        std::fs::write(v.join(format!("alt/y/g{i}")), b"").expect("g");
    }
    let flipper = storage_common::Flipper::start(chain.join("x"), v.join("alt/y"));
    let folder = serde_json::json!({"volume": "local", "vfid": VFID});
    for i in 0..40 {
        let r = upload_token(&p, &format!("up{i}.bin"), 1_000);
        assert!(
            r.status == 413 || unmeasured(&r),
            "session {i} admitted on a partial measurement: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let r = p.manager_method("GET", "/folder/used-bytes", folder.clone());
        assert!(
            unmeasured(&r) || (r.status == 200 && r.json()["used_bytes"].as_u64() >= Some(8 << 20)),
            "report {i}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(flipper.stop() > 0, "the directories were swapped");
}

/// Deleting a vfolder released the reservation of every live session of the scope
/// whose ID named a file in that vfolder's staging area, whichever vfolder the
/// session was in and whether its PATCH was running: the session ID is in the
/// upload token, so a user with a shell in vfolder A named a file in A's staging
/// area after their session in B, had A deleted, and a second session took the
/// room B's upload still held (the two completed past the limit). Only the
/// reservations of sessions of the deleted vfolder are let go now, by the rule the
/// expired-upload cleanup follows (and never one whose PATCH runs).
#[test]
fn deleting_a_vfolder_releases_only_the_reservations_of_its_own_uploads() {
    use std::io::Write as _;
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_with_limit(&p, 1_000);
    let other = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0123456789abcdef0123456789abcdef";
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": other}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let token = |relpath: &str, size: usize| session(&p, relpath, size);
    let busy = token("busy.bin", 600);
    let idle = token("idle.bin", 400);
    let sessions: Vec<std::ffi::OsString> = std::fs::read_dir(p.vfolder_path().join(".upload"))
        .expect("staging")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(sessions.len(), 2);
    // The busy session's PATCH: its first 100 bytes sent, the rest to come.
    let mut s = patch_begun(&p, &busy, 600, 100);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Files named after both sessions in the other vfolder's staging area, which is
    // then deleted.
    let other_path = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/01/23/456789abcdef0123456789abcdef");
    std::fs::create_dir(other_path.join(".upload")).expect("staging area");
    for s in &sessions {
        std::fs::write(other_path.join(".upload").join(s), b"").expect("decoy");
    }
    let r = p.manager(
        "/folder/delete",
        serde_json::json!({"volume": "local", "vfid": other}),
        None,
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    // A hang guard, not a timing assertion: the delete runs in the background.
    while !p.log().contains("bgtask done") {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!other_path.exists());
    assert_eq!(quota_scope(&p)["reserved_bytes"], 1_000, "both still held");
    let r = upload_token(&p, "third.bin", 100);
    assert_eq!(
        r.status,
        413,
        "the room is the two uploads': {}",
        String::from_utf8_lossy(&r.body)
    );
    // Both complete; the scope holds what its limit allows.
    s.write_all(&[7u8; 500]).expect("the rest");
    let raw = read_until_closed(&mut s);
    assert!(
        raw.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(patch(&p, &idle, 0, &[8u8; 400]).status, 204);
    let qs = quota_scope(&p);
    assert_eq!(
        (qs["used_bytes"].as_u64(), qs["reserved_bytes"].as_u64()),
        (Some(1_000), Some(0)),
        "{qs}"
    );
}

/// A file whose modification time is past year 9999 (a user sets it with `touch -d
/// @400000000000` on tmpfs, btrfs or XFS with big timestamps) made a download panic
/// while formatting `Last-Modified`: the client got its connection closed and no
/// answer. A time HTTP cannot carry (past 9999, or before 1970) is now left out:
/// no `Last-Modified`, and the date preconditions, which have no date to compare
/// with, are ignored (RFC 9110 §13.1.3, §13.1.4); a date `If-Range` never matches.
#[test]
fn a_file_dated_past_year_9999_or_before_1970_is_served_without_last_modified() {
    use std::time::{Duration, UNIX_EPOCH};
    let shm = std::path::Path::new("/dev/shm");
    // A tmpfs: its times go past year 9999 (ext4's do not).
    assert!(shm.is_dir(), "this test needs /dev/shm, a tmpfs");
    let p = Proxy::start_in(shm, "");
    create_folder(&p);
    let dated = [
        (
            "future.bin",
            UNIX_EPOCH + Duration::from_secs(400_000_000_000),
        ),
        ("past.bin", UNIX_EPOCH - Duration::from_secs(100_000)),
    ];
    for (name, when) in dated {
        let f = std::fs::File::create(p.vfolder_path().join(name)).expect("file");
        std::io::Write::write_all(&mut &f, b"data").expect("write");
        f.set_modified(when).expect("mtime");
    }
    for (name, _) in dated {
        let r = p.download(name, "", &[]);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"data"[..]), "{name}");
        assert_eq!(r.header("last-modified"), None, "{name}");
        let etag = r.header("etag").expect("etag").to_owned();
        let r = p.download(name, "", &[("If-None-Match", "*")]);
        assert_eq!(r.status, 304, "{name}");
        assert_eq!(r.header("last-modified"), None, "{name}");
        assert_eq!(r.header("etag"), Some(etag.as_str()), "{name}");
        let r = p.download(name, "", &[("If-Match", "\"other\"")]);
        assert_eq!(r.status, 412, "{name}");
        assert_eq!(r.header("last-modified"), None, "{name}");
        let r = p.download(name, "", &[("Range", "bytes=0-1")]);
        assert_eq!((r.status, r.body.as_slice()), (206, &b"da"[..]), "{name}");
        // Date preconditions without a date to compare with: ignored.
        for h in ["If-Modified-Since", "If-Unmodified-Since"] {
            for date in [
                "Thu, 01 Jan 1970 00:00:00 GMT",
                "Sat, 01 Jan 2000 00:00:00 GMT",
                "Fri, 31 Dec 9999 23:59:59 GMT",
            ] {
                let r = p.download(name, "", &[(h, date)]);
                assert_eq!(r.status, 200, "{name} {h}: {date}");
            }
        }
        let r = p.download(
            name,
            "",
            &[
                ("Range", "bytes=0-1"),
                ("If-Range", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ],
        );
        assert_eq!((r.status, r.body.as_slice()), (200, &b"data"[..]), "{name}");
    }
    assert!(!p.log().contains("panicked"), "{}", p.log());
}

/// What `s` receives until its peer closes it (or it fails).
/// Swaps the test vfolder's one staged file, as a user with a shell in the vfolder
/// can, for `how`: "a directory", "a symlink out" (to `outside`), "a FIFO", or
/// another file. Its path.
fn swap_staged(p: &Proxy, how: &str, outside: &std::path::Path) -> std::path::PathBuf {
    let staged = std::fs::read_dir(p.vfolder_path().join(".upload"))
        .expect("staging area")
        .next()
        .expect("a staged file")
        .expect("entry")
        .path();
    std::fs::remove_file(&staged).expect("unlink");
    match how {
        "a directory" => std::fs::create_dir(&staged).expect("dir"),
        "a symlink out" => std::os::unix::fs::symlink(outside, &staged).expect("link"),
        "a FIFO" => rustix::fs::mknodat(
            rustix::fs::CWD,
            &staged,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo"),
        _ => std::fs::write(&staged, b"someone else's").expect("file"),
    }
    staged
}

fn read_until_closed(s: &mut std::net::TcpStream) -> Vec<u8> {
    use appproxy_test_support::net::ReadUninterrupted as _;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read_uninterrupted(&mut buf) {
            Ok(0) | Err(_) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// A PATCH of a whole upload of `total` bytes with its first `sent` bytes (7s) sent
/// and stored (the session's offset says so), the rest to come on the connection.
fn patch_begun(p: &Proxy, token: &str, total: usize, sent: usize) -> std::net::TcpStream {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(p.client).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "PATCH /upload?token={token} HTTP/1.1\r\nHost: t\r\nUpload-Offset: 0\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
    )
    .expect("head");
    s.write_all(&vec![7u8; sent]).expect("first part");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let offset = sent.to_string();
    while p.tus_head(token).header("upload-offset") != Some(offset.as_str()) {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s
}

/// A path with a component longer than 255 bytes (86 Hangul syllables and `.csv`),
/// which no file system takes, is refused when the upload session is asked for: 400
/// saying why, nothing reserved or staged. Other routes refuse such a path (or a
/// new name) alike; 255 bytes are taken. Before, the session was made, reserved its
/// size, took the whole body and then failed at completion with "File name too
/// long" on every try, holding its reservation until it expired.
#[test]
fn a_file_name_longer_than_255_bytes_is_refused_before_anything_is_reserved() {
    let p = Proxy::start("");
    create_with_limit(&p, 1 << 30);
    let long = format!("{}.csv", "가".repeat(90));
    assert_eq!(long.len(), 274);
    let refused = |what: &str, r: &appproxy_test_support::http::Resp| {
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{what}: {text}");
        assert!(text.contains("274 bytes long"), "{what}: {text}");
    };
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": format!("dir/{long}"), "size": 5 << 20}),
        None,
    );
    refused("upload", &r);
    assert_eq!(quota_scope(&p)["reserved_bytes"], 0);
    let staged = std::fs::read_dir(p.vfolder_path().join(".upload"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0, "nothing staged");
    let r = p.manager(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": format!("{long}/x")}),
        None,
    );
    refused("download", &r);
    std::fs::write(p.vfolder_path().join("a.txt"), b"a").expect("file");
    let r = p.manager(
        "/folder/file/rename",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "a.txt", "new_name": long}),
        None,
    );
    refused("rename", &r);
    // 255 bytes are a file name.
    let fits = format!("{}.c", "가".repeat(84));
    assert_eq!(fits.len(), 254);
    let fits = format!("{fits}x");
    assert_eq!(p.upload(&fits, b"12345").status, 204);
    assert_eq!(
        std::fs::read(p.vfolder_path().join(&fits)).expect("uploaded"),
        b"12345"
    );
}

/// `If-Range` with the `Last-Modified` date of a first response, after the file was
/// rewritten within that same second (same size, same date): the whole new file
/// (200), never its tail after the old file's head. A date cannot prove the file
/// unchanged; the ETag form tells the versions apart and still resumes. Before, the
/// date matched and the client spliced two versions.
#[test]
fn an_if_range_date_never_resumes_a_file_rewritten_within_its_second() {
    let p = Proxy::start("");
    create_folder(&p);
    let path = p.vfolder_path().join("data.bin");
    let second = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    std::fs::write(&path, [b'A'; 100]).expect("v1");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("v1");
    f.set_modified(second + std::time::Duration::from_millis(100))
        .expect("mtime");
    drop(f);
    let r = p.download("data.bin", "", &[("Range", "bytes=0-49")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, [b'A'; 50]);
    let modified = r.header("last-modified").expect("last-modified").to_owned();
    let etag = r.header("etag").expect("etag").to_owned();
    // Rewritten in place within the same second.
    std::fs::write(&path, [b'B'; 100]).expect("v2");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("v2");
    f.set_modified(second + std::time::Duration::from_millis(700))
        .expect("mtime");
    drop(f);
    let r = p.download(
        "data.bin",
        "",
        &[("Range", "bytes=50-"), ("If-Range", &modified)],
    );
    assert_eq!(r.header("last-modified"), Some(modified.as_str()));
    assert_eq!(r.status, 200, "the whole file, not a range of the new one");
    assert_eq!(r.body, [b'B'; 100]);
    assert_ne!(r.header("etag"), Some(etag.as_str()));
    // The ETag form resumes the version it names.
    let etag = r.header("etag").expect("etag").to_owned();
    let r = p.download(
        "data.bin",
        "",
        &[("Range", "bytes=50-"), ("If-Range", &etag)],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, [b'B'; 50]);
}

/// Found in the third attack round: an upload whose destination is an existing
/// directory, or lies under a regular file, was accepted (200, its size reserved),
/// took the whole body and failed at completion (400 "Is a directory" / "Not a
/// directory") on every retry, its reservation holding the scope's room until the
/// token expired (an hour): other uploads of the scope got 413. Such a destination
/// is refused when the session is made now, before anything is reserved or staged.
#[test]
fn an_upload_onto_a_directory_or_under_a_file_is_refused_before_anything_is_reserved() {
    let p = Proxy::start("");
    create_with_limit(&p, 1000);
    let vf = p.vfolder_path();
    std::fs::create_dir_all(vf.join("data/inner")).expect("data");
    std::fs::write(vf.join("notes"), b"x").expect("notes");
    std::os::unix::fs::symlink("notes", vf.join("to-notes")).expect("link");
    for dest in [
        "data",
        "data/inner",
        "notes/sub.bin",
        "to-notes/sub.bin",
        "notes/a/b/c.bin",
    ] {
        let r = p.manager(
            "/folder/file/upload",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": dest, "size": 600}),
            None,
        );
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{dest}: {text}");
        assert!(text.contains("directory"), "{dest}: {text}");
        assert_eq!(quota_scope(&p)["reserved_bytes"], 0, "{dest}");
    }
    let staged = std::fs::read_dir(vf.join(".upload"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0, "nothing staged");
    // A file in a directory, a new directory, a symlink replaced: taken as before.
    assert_eq!(p.upload("data/new.bin", b"12345").status, 204);
    assert_eq!(p.upload("fresh/dir/new.bin", b"12345").status, 204);
    std::os::unix::fs::symlink("data", vf.join("to-data")).expect("link");
    assert_eq!(p.upload("to-data", b"12345").status, 204);
    assert_eq!(std::fs::read(vf.join("to-data")).expect("file"), b"12345");
    assert!(vf.join("data/inner").is_dir());
}

/// A destination that becomes a directory after its session was made (or whose
/// parent becomes a file) cannot be seen when the session is made: its completion
/// fails, as it would on every retry. The staged upload is removed and its
/// reservation released at once, so the scope's room comes back (before, it was
/// held until the token expired, and another upload of the scope got 413); a
/// later PATCH of the session gets 404.
#[test]
fn an_upload_that_can_never_complete_releases_its_reservation_at_once() {
    // Every check measures: the test removes files behind the proxy's back.
    let p = Proxy::start("quota_usage_max_age_secs = 0");
    create_with_limit(&p, 1000);
    let vf = p.vfolder_path();
    for (dest, block) in [("later", "later"), ("sub/x.bin", "sub")] {
        let token = p.token(
            "/folder/file/upload",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": dest, "size": 600}),
        );
        assert_eq!(quota_scope(&p)["reserved_bytes"], 600, "{dest}");
        // The user makes the destination a directory, or its parent a file.
        if dest == block {
            std::fs::create_dir(vf.join(block)).expect("dir");
        } else {
            std::fs::write(vf.join(block), b"x").expect("file");
        }
        let r = p.tus_patch(&token, "0", &[b'A'; 600]);
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{dest}: {text}");
        assert_eq!(
            quota_scope(&p)["reserved_bytes"],
            0,
            "{dest}: released at once"
        );
        // The refusal's own message and the note, once each (before, the message
        // was wrapped in a second refusal: "Invalid API parameters: Invalid API
        // parameters: …", "filesystem error: filesystem error: …").
        let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
        let note = "; the upload was discarded and its reservation released";
        assert_eq!(title.matches(note).count(), 1, "{dest}: {title}");
        assert!(title.ends_with(note), "{dest}: {title}");
        for prefix in ["Invalid API parameters: ", "filesystem error: "] {
            assert!(title.matches(prefix).count() <= 1, "{dest}: {title}");
        }
        let staged = std::fs::read_dir(vf.join(".upload"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(staged, 0, "{dest}: the staged upload is removed");
        assert_eq!(p.tus_patch(&token, "600", b"").status, 404, "{dest}: gone");
        // The scope's room is back: another 600-byte upload is taken.
        assert_eq!(p.upload("other.bin", &[b'B'; 600]).status, 204, "{dest}");
        std::fs::remove_file(vf.join("other.bin")).expect("other");
        if dest == block {
            std::fs::remove_dir(vf.join(block)).expect("dir");
        } else {
            std::fs::remove_file(vf.join(block)).expect("file");
        }
    }
}
