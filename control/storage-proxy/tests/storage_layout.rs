//! The on-disk layout of a volume is the platform's (Backend.AI's vfs backend:
//! `QuotaScopeID.pathname` and `mangle_vfpath`): a scoped vfolder at
//! `<root>/<scope UUID hex>/<xx>/<yy>/<rest>` (no `user-` or `project-` prefix), an
//! old-style one (a vfid with no quota scope) directly at `<root>/<xx>/<yy>/<rest>`.
//! A volume laid out by the platform, by hand here, is served as it is: read,
//! listed, downloaded, uploaded to (tus), measured and deleted through the API.
//! Before, the proxy looked for `<root>/user-<hex>/…` and `<root>/legacy/…`: every
//! existing vfolder was missing.

mod storage_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appproxy_test_support::http::{request, Resp};
use storage_common::Proxy;

/// The scope's UUID, as the manager names it, and as the platform names its
/// directory.
const SCOPE: &str = "9e1d2c3b-4a59-4687-8796-a5b4c3d2e1f0";
const SCOPE_HEX: &str = "9e1d2c3b4a5946878796a5b4c3d2e1f0";
/// A vfolder of the scope and an old-style vfolder (no scope); both under `ab/cd`.
const SCOPED: &str = "abcd11111111111111111111111111aa";
const OLD: &str = "abcd22222222222222222222222222bb";

fn scoped_vfid() -> String {
    format!("user:{SCOPE}/{SCOPED}")
}

fn vol(p: &Proxy) -> PathBuf {
    std::fs::canonicalize(p.dir.path().join("vol")).expect("the volume")
}

/// Where the platform keeps the two vfolders.
fn scoped_dir(p: &Proxy) -> PathBuf {
    vol(p).join(SCOPE_HEX).join("ab/cd").join(&SCOPED[4..])
}

fn old_dir(p: &Proxy) -> PathBuf {
    vol(p).join("ab/cd").join(&OLD[4..])
}

/// Lays the two vfolders out by hand, as the platform has them on disk.
fn lay_out(p: &Proxy) {
    std::fs::create_dir_all(scoped_dir(p).join("data")).expect("scoped vfolder");
    std::fs::write(scoped_dir(p).join("data/hello.txt"), "hello").expect("file");
    std::fs::write(scoped_dir(p).join("top.bin"), vec![1u8; 1000]).expect("file");
    std::fs::create_dir_all(old_dir(p)).expect("old-style vfolder");
    std::fs::write(old_dir(p).join("old.txt"), "old-style").expect("file");
}

fn ok(r: &Resp, what: &str) {
    assert!(
        (200..300).contains(&r.status),
        "{what}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
}

fn names(p: &Proxy, vfid: &str, relpath: &str) -> Vec<String> {
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": vfid, "relpath": relpath}),
        None,
    );
    ok(&r, "list");
    let mut n: Vec<String> = r.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["name"].as_str().map(str::to_owned))
        .collect();
    n.sort();
    n
}

fn download(p: &Proxy, vfid: &str, relpath: &str) -> Vec<u8> {
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": vfid, "relpath": relpath}),
    );
    let r = request(
        p.client,
        "GET",
        &format!("/download?token={token}"),
        &[],
        b"",
    );
    ok(&r, "download");
    r.body
}

/// A tus upload in one PATCH; returns the session creation's answer when refused.
fn upload(p: &Proxy, vfid: &str, relpath: &str, data: &[u8]) -> Resp {
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": vfid, "relpath": relpath, "size": data.len()}),
        None,
    );
    if r.status != 200 {
        return r;
    }
    let token = r.json()["token"].as_str().expect("token").to_owned();
    p.tus_patch(&token, "0", data)
}

fn used(p: &Proxy, path: &str, body: serde_json::Value) -> u64 {
    let r = p.manager_method("GET", path, body);
    ok(&r, path);
    r.json()["used_bytes"].as_u64().expect("used_bytes")
}

fn root_names(p: &Proxy) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(vol(p))
        .expect("the volume")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

fn gone_within(path: &Path, p: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} stays: {}",
            path.display(),
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Both vfolders of a volume laid out by the platform are found where it put them,
/// and everything the API does to them happens there: no `user-…` or `legacy`
/// directory is ever made.
#[test]
fn a_volume_laid_out_by_the_platform_is_served_where_it_lies() {
    let p = Proxy::start("quota_usage_max_age_secs = 0\n");
    lay_out(&p);
    let scoped = scoped_vfid();

    // Read and listed.
    assert_eq!(names(&p, &scoped, "."), ["data", "top.bin"]);
    assert_eq!(names(&p, &scoped, "data"), ["hello.txt"]);
    assert_eq!(names(&p, OLD, "."), ["old.txt"]);
    assert_eq!(download(&p, &scoped, "data/hello.txt"), b"hello");
    assert_eq!(download(&p, OLD, "old.txt"), b"old-style");

    // The mount path is the platform's.
    for (vfid, dir) in [(scoped.as_str(), scoped_dir(&p)), (OLD, old_dir(&p))] {
        let r = p.manager_method(
            "GET",
            "/folder/mount",
            serde_json::json!({"volume": "local", "vfid": vfid}),
        );
        ok(&r, "mount");
        assert_eq!(r.json()["path"], dir.display().to_string());
    }

    // Uploaded to (tus), in place.
    ok(&upload(&p, &scoped, "up/new.bin", &[2u8; 300]), "upload");
    ok(&upload(&p, OLD, "new.bin", &[3u8; 200]), "upload");
    assert_eq!(
        std::fs::read(scoped_dir(&p).join("up/new.bin")).expect("uploaded"),
        [2u8; 300]
    );
    assert_eq!(
        std::fs::read(old_dir(&p).join("new.bin")).expect("uploaded"),
        [3u8; 200]
    );

    // Usage of each vfolder (the staging areas are empty).
    let folder = |vfid: &str| serde_json::json!({"volume": "local", "vfid": vfid});
    assert_eq!(used(&p, "/folder/usage", folder(&scoped)), 5 + 1000 + 300);
    assert_eq!(used(&p, "/folder/usage", folder(OLD)), 9 + 200);

    // The scope's quota: its `.quota` is in the scope's directory, and it counts
    // the scope's vfolder, never the old-style one beside it.
    let qs = serde_json::json!({"volume": "local", "qsid": format!("user:{SCOPE}"), "options": {"limit_bytes": 1_000_000}});
    let r = p.manager("/quota-scope", qs, None);
    ok(&r, "quota-scope");
    assert!(vol(&p).join(SCOPE_HEX).join(".quota").is_file());
    assert!(!vol(&p).join(".quota").exists());
    let qs = serde_json::json!({"volume": "local", "qsid": format!("user:{SCOPE}")});
    assert_eq!(used(&p, "/quota-scope", qs), 5 + 1000 + 300);
    // A project scope of the same UUID is the same directory, as on the platform.
    let qs = serde_json::json!({"volume": "local", "qsid": format!("project:{SCOPE}")});
    assert_eq!(used(&p, "/quota-scope", qs), 5 + 1000 + 300);

    // Nothing was made at the root but what the platform has.
    assert_eq!(root_names(&p), [SCOPE_HEX, "ab"]);

    // Deleted: a file, then both vfolders.
    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": scoped, "relpaths": ["top.bin"]}),
        None,
    );
    ok(&r, "delete file");
    assert!(!scoped_dir(&p).join("top.bin").exists());
    for (vfid, dir) in [(scoped.as_str(), scoped_dir(&p)), (OLD, old_dir(&p))] {
        let r = p.manager("/folder/delete", folder(vfid), None);
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        gone_within(&dir, &p);
    }
    assert!(
        vol(&p).join(SCOPE_HEX).is_dir(),
        "the scope's directory stays"
    );
}

/// A vfolder made through the API lies where the platform would put it, and an
/// old-style vfolder has no quota scope: a limit asked for at its creation is set
/// nowhere (never on the volume root), and its uploads are never refused by quota,
/// as on the platform. A clone lands in the platform's place too.
#[test]
fn old_style_vfolders_are_under_the_root_and_unlimited() {
    let p = Proxy::start("");
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": OLD, "options": {"initial_max_size_for_quota_scope": 10}}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert!(old_dir(&p).is_dir(), "{:?}", root_names(&p));
    assert!(!vol(&p).join(".quota").exists(), "no limit on the root");
    ok(
        &upload(&p, OLD, "big.bin", &[9u8; 5000]),
        "upload past 10 bytes",
    );
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": scoped_vfid(), "options": {"initial_max_size_for_quota_scope": 100}}),
        None,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert!(scoped_dir(&p).is_dir(), "{:?}", root_names(&p));
    assert!(vol(&p).join(SCOPE_HEX).join(".quota").is_file());
    // The scope's limit holds for its vfolder.
    assert_eq!(
        upload(&p, &scoped_vfid(), "big.bin", &[9u8; 5000]).status,
        413
    );
    // A clone of the old-style vfolder into another old-style vfid.
    let dst = "ef0133333333333333333333333333cc";
    let r = p.manager(
        "/folder/clone",
        serde_json::json!({"src_volume": "local", "src_vfid": OLD, "dst_vfid": dst}),
        None,
    );
    ok(&r, "clone");
    let copy = vol(&p).join("ef/01").join(&dst[4..]).join("big.bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&copy).map_or(0, |m| m.len()) != 5000 {
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(root_names(&p), [SCOPE_HEX, "ab", "ef"]);
}

/// The expired-upload cleanup finds staged files of old-style vfolders (directly
/// under the root) and of scoped ones, and the usage sync measures the scope.
#[test]
fn cleanup_finds_the_staging_areas_of_both_kinds() {
    let p = Proxy::start("upload_expire_secs = 1\ncleanup_interval_secs = 1\n");
    lay_out(&p);
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let mut staged = Vec::new();
    for dir in [scoped_dir(&p), old_dir(&p)] {
        let staging = dir.join(".upload");
        std::fs::create_dir_all(&staging).expect("staging");
        let f = staging.join("0123456789abcdef0123456789abcdef");
        std::fs::write(&f, "x").expect("staged");
        std::fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|f| f.set_modified(old))
            .expect("age");
        staged.push(f);
    }
    for f in &staged {
        gone_within(f, &p);
    }
    // The usage sync measured the scope (its series is named by the scope's
    // directory), and nothing else.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = request(p.manager, "GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let series = format!("volume=\"local\",scope=\"{SCOPE_HEX}\"");
        if text.contains(&series) {
            assert!(!text.contains("scope=\"ab\""), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}\n{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}
