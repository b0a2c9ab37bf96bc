//! Usage reports over real HTTP: `/folder/usage`, `/folder/used-bytes` and
//! `GET /quota-scope` do not walk a big folder per request. Concurrent reports share
//! one walk, a young figure serves the next report, a write through the API shows
//! at once, and every walk is counted at `/metrics`.

mod storage_common;

use appproxy_test_support::http::request;
use appproxy_test_support::prom::Exposition;
use storage_common::{create_folder, Proxy, VFID};

const QSID: &str = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

/// A sample of `/metrics` (the exposition checked whole).
fn metric(p: &Proxy, name: &str, labels: &str) -> u64 {
    let r = request(p.manager, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let e = Exposition::parse(&text);
    e.check();
    e.value(name, labels)
        .unwrap_or_else(|| panic!("no {name}{{{labels}}} in {text}")) as u64
}

fn folder_walks(p: &Proxy) -> u64 {
    metric(p, "storage_proxy_usage_walks_total", "report=\"folder\"")
}

fn quota_walks(p: &Proxy) -> u64 {
    metric(p, "storage_proxy_quota_walks_total", "")
}

fn folder() -> serde_json::Value {
    serde_json::json!({"volume": "local", "vfid": VFID})
}

/// `(file_count, used_bytes)` of `/folder/usage` (GET), checked against
/// `/folder/used-bytes`.
fn usage(p: &Proxy) -> (u64, u64) {
    let r = p.manager_method("GET", "/folder/usage", folder());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let figures = (
        j["file_count"].as_u64().expect("file_count"),
        j["used_bytes"].as_u64().expect("used_bytes"),
    );
    let r = p.manager_method("GET", "/folder/used-bytes", folder());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["used_bytes"].as_u64(), Some(figures.1));
    figures
}

/// `n` empty files and one of `bytes`, put in the vfolder behind the proxy's back
/// (as a shell in a container would), over 100 directories.
fn fill(p: &Proxy, n: usize, bytes: usize) {
    let vf = p.vfolder_path();
    for d in 0..100 {
        std::fs::create_dir_all(vf.join(format!("d{d}"))).expect("dir");
    }
    for i in 0..n {
        std::fs::File::create(vf.join(format!("d{}/e{i}", i % 100))).expect("file");
    }
    std::fs::write(vf.join("data.bin"), vec![7u8; bytes]).expect("file");
}

/// `n` concurrent requests (released together) of `path`; their bodies.
fn concurrently(
    p: &Proxy,
    n: usize,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> Vec<serde_json::Value> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let (barrier, body) = (&barrier, body.clone());
                s.spawn(move || {
                    barrier.wait();
                    let r = p.manager_method(method, path, body);
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    r.json()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request"))
            .collect()
    })
}

/// Sixteen managers asking for the usage of a folder of 60 000 files at once cause
/// one walk, and the figure then serves the next reports while it is young.
#[test]
fn concurrent_usage_reports_of_a_big_folder_share_one_walk() {
    const FILES: usize = 60_000;
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_folder(&p);
    fill(&p, FILES, 1234);
    let before = folder_walks(&p);
    assert_eq!(before, 0);
    for j in concurrently(&p, 16, "GET", "/folder/usage", folder()) {
        assert_eq!(j["file_count"], (FILES + 1) as u64, "{j}");
        assert_eq!(j["used_bytes"], 1234, "{j}");
    }
    assert_eq!(folder_walks(&p), 1, "{}", p.log());
    // POST /folder/usage and /folder/used-bytes report the same figure: no walk.
    let r = p.manager("/folder/usage", folder(), None);
    assert_eq!(r.json()["file_count"], (FILES + 1) as u64);
    assert_eq!(usage(&p), ((FILES + 1) as u64, 1234));
    assert_eq!(folder_walks(&p), 1);
    assert!(metric(&p, "storage_proxy_usage_walk_duration_seconds_count", "") >= 1);
}

/// With `quota_usage_max_age_secs = 0` no figure is served twice, yet reports that
/// come while a walk runs take its result instead of walking again.
#[test]
fn without_a_cache_concurrent_reports_still_share_a_walk() {
    const FILES: usize = 60_000;
    const N: usize = 16;
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    create_folder(&p);
    fill(&p, FILES, 10);
    for j in concurrently(&p, N, "GET", "/folder/used-bytes", folder()) {
        assert_eq!(j["used_bytes"], 10, "{j}");
    }
    let shared = folder_walks(&p);
    assert!(
        (1..N as u64 / 2).contains(&shared),
        "{shared} walks for {N} reports"
    );
    // One at a time, each report walks: what a shell wrote shows at once.
    std::fs::write(p.vfolder_path().join("more.bin"), [1u8; 5]).expect("file");
    assert_eq!(usage(&p), ((FILES + 2) as u64, 15));
    assert_eq!(folder_walks(&p), shared + 2, "usage and used-bytes");
}

/// A young figure is never served after a change through the API: uploads, deletes
/// (also as a background task), renames and moves over a file each have the next
/// report walk again, and it is exact.
#[test]
fn usage_reports_follow_every_write_through_the_api() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_folder(&p);
    assert_eq!(usage(&p), (0, 0));
    assert_eq!(p.upload("a.bin", &[1u8; 1000]).status, 204);
    assert_eq!(usage(&p), (1, 1000));
    let walks = folder_walks(&p);
    assert_eq!(usage(&p), (1, 1000));
    assert_eq!(folder_walks(&p), walks, "a young figure serves again");
    // Behind the proxy's back: not seen while the figure is young (the bound).
    std::fs::write(p.vfolder_path().join("shell.bin"), [0u8; 50]).expect("file");
    assert_eq!(usage(&p), (1, 1000));
    // Through the API: seen at once.
    assert_eq!(p.upload("b.bin", &[2u8; 300]).status, 204);
    assert_eq!(usage(&p), (3, 1350));
    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["a.bin"]}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(usage(&p), (2, 350));
    // A rename that replaces a file.
    let r = p.manager(
        "/folder/file/rename",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "shell.bin", "new_name": "b.bin"}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(usage(&p), (1, 50));
    // A move that replaces a file (the one replaced was written behind the proxy's
    // back, after the figure).
    std::fs::write(p.vfolder_path().join("shell.bin"), [0u8; 10]).expect("file");
    assert_eq!(usage(&p), (1, 50));
    let r = p.manager(
        "/folder/file/move",
        serde_json::json!({"volume": "local", "vfid": VFID, "src_relpath": "shell.bin", "dst_relpath": "b.bin"}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(usage(&p), (1, 10));
    std::fs::remove_file(p.vfolder_path().join("b.bin")).expect("unlink");
    // A delete as a background task: its end is a change too.
    assert_eq!(p.upload("c.bin", &[3u8; 70]).status, 204);
    assert_eq!(usage(&p), (1, 70));
    let r = p.manager(
        "/folder/file/delete-async",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["c.bin"]}),
        None,
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    // A hang guard, not a timing assertion: the task runs in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while p.vfolder_path().join("c.bin").exists() {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The task's end (the file gone, then the change) may fall between the two
    // reports `usage` compares: polled on one, then both compared once it is over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let j = p.manager_method("GET", "/folder/usage", folder()).json();
        if (j["file_count"].as_u64(), j["used_bytes"].as_u64()) == (Some(0), Some(0)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(usage(&p), (0, 0));
}

/// A clone's destination reported while it was empty (before the clone) shows the
/// copy once the clone is done.
#[test]
fn a_clone_destination_reports_its_copy() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    create_folder(&p);
    assert_eq!(p.upload("a.bin", &[1u8; 400]).status, 204);
    let dst = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000c10e";
    let dst_body = serde_json::json!({"volume": "local", "vfid": dst});
    // The destination does not exist yet: 404, nothing remembered.
    let r = p.manager_method("GET", "/folder/usage", dst_body.clone());
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": VFID, "dst_vfid": dst}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A hang guard: the copy runs in the background; a report made while it runs
    // may see part of it, the first after its end sees all of it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = p.manager_method("GET", "/folder/usage", dst_body.clone());
        if r.status == 200 && r.json()["used_bytes"] == 400 {
            assert_eq!(r.json()["file_count"], 1);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn scope() -> serde_json::Value {
    serde_json::json!({"volume": "local", "qsid": QSID})
}

/// Sixteen concurrent `GET /quota-scope` of a scope of 60 000 files cause one walk
/// of it (the quota's measurement, which then serves the uploads' checks too);
/// the report is that measurement (hard links once) with the reservations beside
/// it, an upload in progress counted once, as reserved.
#[test]
fn concurrent_quota_scope_reports_share_the_quota_measurement() {
    const FILES: usize = 60_000;
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": VFID, "options": {"initial_max_size_for_quota_scope": 100_000}}),
        None,
    );
    assert_eq!(r.status, 204);
    fill(&p, FILES, 2000);
    std::fs::hard_link(
        p.vfolder_path().join("data.bin"),
        p.vfolder_path().join("data-link.bin"),
    )
    .expect("hard link");
    assert_eq!(quota_walks(&p), 0);
    for j in concurrently(&p, 16, "GET", "/quota-scope", scope()) {
        assert_eq!(j["used_bytes"], 2000, "{j}");
        assert_eq!(j["reserved_bytes"], 0, "{j}");
        assert_eq!(j["limit_bytes"], 100_000, "{j}");
    }
    assert_eq!(quota_walks(&p), 1, "{}", p.log());
    // An upload in progress: its whole size counts as reserved, its staged bytes
    // among them (not also as used); the session's check took the same
    // measurement (no walk).
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "up.bin", "size": 700}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    assert_eq!(p.tus_patch(&token, "0", &[4u8; 300]).status, 204);
    let q = p.manager_method("GET", "/quota-scope", scope()).json();
    assert_eq!(
        (&q["used_bytes"], &q["reserved_bytes"]),
        (&2000.into(), &700.into()),
        "{q}"
    );
    // Completed: the bytes move from reserved to used, in the report at once.
    assert_eq!(p.tus_patch(&token, "300", &[4u8; 400]).status, 204);
    let q = p.manager_method("GET", "/quota-scope", scope()).json();
    assert_eq!(
        (&q["used_bytes"], &q["reserved_bytes"]),
        (&2700.into(), &0.into()),
        "{q}"
    );
    assert_eq!(quota_walks(&p), 1, "{}", p.log());
    // A delete through the API: the next report measures again and shows the room.
    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["up.bin", "data.bin"]}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let q = p.manager_method("GET", "/quota-scope", scope()).json();
    assert_eq!(q["used_bytes"], 2000, "the other link stays: {q}");
    assert_eq!(quota_walks(&p), 2, "{}", p.log());
    let q = p.manager_method("GET", "/quota-scope", scope()).json();
    assert_eq!(q["used_bytes"], 2000, "{q}");
    assert_eq!(quota_walks(&p), 2, "{}", p.log());
}

/// A session's token and its staged file's path (the only session in the folder).
fn session(p: &Proxy, size: usize) -> (String, std::path::PathBuf) {
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "up.bin", "size": size}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_owned();
    let staged = std::fs::read_dir(p.vfolder_path().join(".upload"))
        .expect("staging area")
        .flatten()
        .map(|e| e.path())
        .next()
        .expect("staged file");
    (token, staged)
}

/// Polls `/folder/usage` until it reports `want` (a hang guard for a background
/// pass, not a timing assertion: it fails only when the figure never comes).
fn usage_becomes(p: &Proxy, want: (u64, u64)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let j = p.manager_method("GET", "/folder/usage", folder()).json();
        if (j["file_count"].as_u64(), j["used_bytes"].as_u64()) == (Some(want.0), Some(want.1)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {j}, not {want:?}\n{}",
            p.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(usage(p), want);
}

/// The expired-upload cleanup removing a staged file that counted in a folder's
/// usage (no reservation held it: a scope without a limit) is a change of the
/// folder: its next report walks again. Before, the removed file stayed in the
/// report until the figure was `quota_usage_max_age_secs` old.
#[test]
fn a_staged_file_removed_by_the_cleanup_leaves_the_usage_report() {
    let p = Proxy::start(
        "quota_usage_max_age_secs = 3600\nupload_expire_secs = 1\ncleanup_interval_secs = 1\n",
    );
    create_folder(&p);
    let (token, staged) = session(&p, 1_000);
    assert_eq!(p.tus_patch(&token, "0", &[1u8; 300]).status, 204);
    assert_eq!(usage(&p), (1, 300));
    usage_becomes(&p, (0, 0));
    assert!(!staged.exists());
}

/// A reservation let go as idle (its staged file kept, as a shell's `touch` keeps
/// it from the cleanup) gives the staged file back to the folder's usage: the next
/// report walks again. Before, the report left it out until the figure was old.
#[test]
fn a_reservation_let_go_as_idle_shows_its_staged_file_in_the_usage_report() {
    let p = Proxy::start(
        "quota_usage_max_age_secs = 3600\nupload_expire_secs = 1\ncleanup_interval_secs = 1\n",
    );
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": VFID, "options": {"initial_max_size_for_quota_scope": 100_000}}),
        None,
    );
    assert_eq!(r.status, 204);
    let (token, staged) = session(&p, 1_000);
    assert_eq!(p.tus_patch(&token, "0", &[1u8; 300]).status, 204);
    // Held by the live session's reservation: not in the folder's figure.
    assert_eq!(usage(&p), (0, 0));
    std::fs::File::options()
        .write(true)
        .open(&staged)
        .expect("staged")
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .expect("mtime");
    usage_becomes(&p, (1, 300));
    assert!(staged.exists());
}

/// A PATCH whose check lets the session's reservation go (the scope's limit was
/// removed) gives the staged file to the folder's usage, and in a scope without a
/// limit each PATCH's bytes show in the next report: both are writes through the
/// API. Before, the report kept leaving the staged file out.
#[test]
fn staged_bytes_no_reservation_holds_show_in_the_usage_report_after_each_patch() {
    let p = Proxy::start("quota_usage_max_age_secs = 3600\n");
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": VFID, "options": {"initial_max_size_for_quota_scope": 100_000}}),
        None,
    );
    assert_eq!(r.status, 204);
    let (token, _) = session(&p, 1_000);
    assert_eq!(p.tus_patch(&token, "0", &[1u8; 300]).status, 204);
    assert_eq!(usage(&p), (0, 0));
    let r = p.manager_method(
        "DELETE",
        "/quota-scope/quota",
        serde_json::json!({"volume": "local", "qsid": QSID}),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(p.tus_patch(&token, "300", &[1u8; 300]).status, 204);
    assert_eq!(usage(&p), (1, 600));
    assert_eq!(p.tus_patch(&token, "600", &[1u8; 300]).status, 204);
    assert_eq!(usage(&p), (1, 900));
    assert_eq!(p.tus_patch(&token, "900", &[1u8; 100]).status, 204);
    assert_eq!(usage(&p), (1, 1_000));
    assert!(p.vfolder_path().join("up.bin").exists());
}
