//! Containment of the storage-proxy under attack from inside a vfolder: a user who
//! can create symlinks swaps directories for symlinks to an outside canary while
//! requests run (uploads' final PATCH, downloads, deletes, archives, the `.upload`
//! staging directory, the expired-upload cleanup), and random API-call sequences run
//! against concurrent swaps. Nothing outside the volume may be read, written or
//! deleted. Also the durability fence of an upload's completing rename (traced with
//! strace attached to the running proxy).

mod storage_common;

use appproxy_test_support::http::request;
use storage_common::{create_folder, snapshot, Flipper, Proxy, VFID};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CANARY: &[u8] = b"OUTSIDE-CANARY-must-never-be-served";

/// The outside canary directory (next to the volume, not in it), with a secret, a
/// victim for deletes and a subdirectory.
fn canary(p: &Proxy) -> PathBuf {
    // Short files are stored in zips, never deflated: the canary's bytes show as they
    // are in any archive that includes it.
    assert!(CANARY.len() < 64);
    let out = p.dir.path().join("outside");
    std::fs::create_dir_all(out.join("sub")).expect("outside");
    std::fs::write(out.join("secret.txt"), CANARY).expect("secret");
    std::fs::write(out.join("victim.txt"), CANARY).expect("victim");
    std::fs::write(out.join("sub/deep.txt"), CANARY).expect("deep");
    out
}

/// `<dir>/<name>` a real directory holding `secret.txt` ("inside") and
/// `<dir>/<name>alt` a symlink to `out`; returns a descriptor of the real directory
/// (stable while the two are swapped).
fn flip_pair(dir: &Path, name: &str, out: &Path) -> std::os::fd::OwnedFd {
    let real = dir.join(name);
    std::fs::create_dir_all(&real).expect("real dir");
    std::fs::write(real.join("secret.txt"), b"inside").expect("inner secret");
    std::os::unix::fs::symlink(out, dir.join(format!("{name}alt"))).expect("symlink");
    rustix::fs::open(
        &real,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open real dir")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs `f(thread, i)` for `per` iterations on each of `threads` threads.
fn hammer(threads: usize, per: usize, f: impl Fn(usize, usize) + Sync) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                for i in 0..per {
                    f(t, i);
                }
            });
        }
    });
}

#[test]
fn final_patch_never_writes_through_a_swapped_directory() {
    let p = Proxy::start("");
    create_folder(&p);
    let out = canary(&p);
    let before = snapshot(&out);
    let vf = p.vfolder_path();
    let _inner = flip_pair(&vf, "flip", &out);
    let flipper = Flipper::start(vf.join("flip"), vf.join("flipalt"));
    let landed = std::sync::atomic::AtomicUsize::new(0);
    hammer(4, 40, |t, i| {
        let r = p.upload(&format!("flip/new/{t}-{i}.txt"), b"payload");
        assert!(
            [204, 400].contains(&r.status),
            "{}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if r.status == 204 {
            landed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    assert!(flipper.stop() > 0);
    assert_eq!(snapshot(&out), before, "nothing written or created outside");
    // Every completed upload is inside the vfolder, in the real directory (whichever
    // of the two names it has now).
    let real = if vf.join("flip").is_symlink() {
        vf.join("flipalt")
    } else {
        vf.join("flip")
    };
    assert_eq!(
        std::fs::read_dir(real.join("new")).map_or(0, |rd| rd.count()),
        landed.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn downloads_never_serve_through_a_swapped_directory() {
    let p = Proxy::start("");
    create_folder(&p);
    let out = canary(&p);
    let vf = p.vfolder_path();
    let _inner = flip_pair(&vf, "flip", &out);
    let flipper = Flipper::start(vf.join("flip"), vf.join("flipalt"));
    let served = std::sync::atomic::AtomicUsize::new(0);
    hammer(4, 150, |_, _| {
        let r = p.download("flip/secret.txt", "", &[]);
        assert!(!contains(&r.body, CANARY), "the outside file was served");
        match r.status {
            200 => {
                assert_eq!(r.body, b"inside");
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            400 | 404 => assert!(r.json()["request_id"].is_string()),
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
        }
    });
    assert!(flipper.stop() > 0);
    // A symlink to the outside is refused outright.
    let r = p.download("flipalt/secret.txt", "", &[]);
    let r2 = p.download("flip/secret.txt", "", &[]);
    assert!(
        [r.status, r2.status].contains(&400),
        "{} {}",
        r.status,
        r2.status
    );
    assert!(!contains(&r.body, CANARY) && !contains(&r2.body, CANARY));
}

#[test]
fn deletes_never_reach_through_a_swapped_directory() {
    let p = Proxy::start("");
    create_folder(&p);
    let out = canary(&p);
    let before = snapshot(&out);
    let vf = p.vfolder_path();
    let inner = flip_pair(&vf, "flip", &out);
    let flipper = Flipper::start(vf.join("flip"), vf.join("flipalt"));
    hammer(2, 150, |_, _| {
        // Recreate the inner victim through the real directory's descriptor.
        if let Ok(fd) = rustix::fs::openat(
            &inner,
            "victim.txt",
            rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
            rustix::fs::Mode::from_raw_mode(0o644),
        ) {
            drop(fd);
        }
        for (relpaths, recursive) in [
            (serde_json::json!(["flip/victim.txt"]), false),
            (serde_json::json!(["flip/sub"]), true),
        ] {
            let r = p.manager(
                "/folder/file/delete",
                serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": relpaths, "recursive": recursive}),
                None,
            );
            assert!(
                [200, 400, 404].contains(&r.status),
                "{}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    });
    assert!(flipper.stop() > 0);
    assert_eq!(snapshot(&out), before, "nothing outside deleted");
    // A recursive delete of a tree holding a swapping child removes the link, not
    // what it points at.
    std::fs::create_dir_all(vf.join("tree")).expect("tree");
    let _inner2 = flip_pair(&vf.join("tree"), "x", &out);
    let flipper = Flipper::start(vf.join("tree/x"), vf.join("tree/xalt"));
    let r = p.manager(
        "/folder/file/delete",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["tree"], "recursive": true}),
        None,
    );
    flipper.stop();
    assert!([200, 400, 404].contains(&r.status), "{}", r.status);
    assert_eq!(snapshot(&out), before, "nothing outside deleted");
}

#[test]
fn archives_never_include_files_through_a_swapped_directory() {
    let p = Proxy::start("");
    create_folder(&p);
    let out = canary(&p);
    let vf = p.vfolder_path();
    std::fs::create_dir_all(vf.join("arch")).expect("arch");
    std::fs::write(vf.join("arch/a.txt"), "inside-a").expect("a");
    let _inner = flip_pair(&vf.join("arch"), "sub", &out);
    let flipper = Flipper::start(vf.join("arch/sub"), vf.join("arch/subalt"));
    hammer(2, 60, |_, _| {
        let r = p.download("arch", "&archive=true", &[]);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(!contains(&r.body, CANARY), "an outside file was archived");
        assert!(contains(&r.body, b"inside-a"));
    });
    assert!(flipper.stop() > 0);
    // A whole-vfolder archive with a static outward link leaves it out too.
    std::os::unix::fs::symlink(&out, vf.join("static-link")).expect("link");
    let r = p.download(".", "&archive=true", &[]);
    assert_eq!(r.status, 200);
    assert!(!contains(&r.body, CANARY));
    // Listed as the link it is, never followed.
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "."}),
        None,
    );
    let listing = r.json();
    let link = listing["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["name"] == "static-link"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(link["type"], "SYMLINK", "{listing}");
    assert_eq!(link["symlink_target"], out.display().to_string());
}

#[test]
fn a_symlinked_staging_directory_is_never_written_through() {
    let p = Proxy::start("");
    create_folder(&p);
    let out = canary(&p);
    let before = snapshot(&out);
    let vf = p.vfolder_path();
    // A static link: session creation is refused and nothing is staged outside.
    std::os::unix::fs::symlink(&out, vf.join(".upload")).expect("link");
    let r = p.upload("x.bin", b"data");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let r = p.upload(".upload/0123456789abcdef0123456789abcdef", b"data");
    assert_eq!(r.status, 400, "the staging area is never a destination");
    assert_eq!(
        r.json()["code"],
        "invalid-api-params",
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(snapshot(&out), before);
    // A staging directory swapped back and forth while sessions are created and
    // written: stages and writes only ever land inside.
    std::fs::remove_file(vf.join(".upload")).expect("unlink");
    std::fs::create_dir(vf.join(".upload")).expect("staging");
    std::os::unix::fs::symlink(&out, vf.join(".uploadalt")).expect("link");
    let flipper = Flipper::start(vf.join(".upload"), vf.join(".uploadalt"));
    hammer(4, 40, |t, i| {
        let r = p.upload(&format!("up-{t}-{i}.bin"), b"staged-bytes");
        assert!(
            [204, 400, 404].contains(&r.status),
            "{}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    });
    assert!(flipper.stop() > 0);
    assert_eq!(snapshot(&out), before, "nothing staged or written outside");
}

#[test]
fn cleanup_never_deletes_through_a_symlinked_staging_directory() {
    let p = Proxy::start("upload_expire_secs = 1\ncleanup_interval_secs = 1\n");
    create_folder(&p);
    let out = canary(&p);
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    for f in ["secret.txt", "victim.txt"] {
        std::fs::File::options()
            .write(true)
            .open(out.join(f))
            .and_then(|f| f.set_modified(old))
            .expect("age the canary");
    }
    let before = snapshot(&out);
    std::os::unix::fs::symlink(&out, p.vfolder_path().join(".upload")).expect("link");
    // A second vfolder with a real, expired staging file shows the passes run.
    let other = "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/0000000000000000000000000000f00d";
    let r = p.manager(
        "/folder/create",
        serde_json::json!({"volume": "local", "vfid": other}),
        None,
    );
    assert_eq!(r.status, 204);
    let staging = p
        .dir
        .path()
        .join("vol/3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b/00/00/000000000000000000000000f00d/.upload");
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::write(staging.join("0123456789abcdef0123456789abcdef"), "x").expect("staged");
    std::fs::File::options()
        .write(true)
        .open(staging.join("0123456789abcdef0123456789abcdef"))
        .and_then(|f| f.set_modified(old))
        .expect("age");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let passes = p
            .log_json()
            .iter()
            .filter(|v| v["message"] == "expired-upload cleanup pass")
            .count();
        if passes >= 3 && std::fs::read_dir(&staging).map_or(0, |d| d.count()) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(snapshot(&out), before, "nothing outside deleted");
}

/// One API call of the random sequences.
#[derive(Debug, Clone)]
enum Op {
    List(usize),
    Download(usize),
    Archive(usize),
    Upload(usize),
    Delete(usize, bool),
    Mkdir(usize),
    Rename(usize, usize),
    Move(usize, usize),
    Usage,
}

const PATHS: [&str; 12] = [
    "flip",
    "flip/secret.txt",
    "flip/new",
    "flip/new/f.txt",
    "flipalt",
    "flipalt/secret.txt",
    "in",
    "in/f.txt",
    ".upload",
    "x.txt",
    ".",
    "in/flip/secret.txt",
];

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let i = 0..PATHS.len();
    prop_oneof![
        i.clone().prop_map(Op::List),
        i.clone().prop_map(Op::Download),
        i.clone().prop_map(Op::Archive),
        i.clone().prop_map(Op::Upload),
        (i.clone(), any::<bool>()).prop_map(|(a, r)| Op::Delete(a, r)),
        i.clone().prop_map(Op::Mkdir),
        (i.clone(), i.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        (i.clone(), i).prop_map(|(a, b)| Op::Move(a, b)),
        Just(Op::Usage),
    ]
}

/// Rebuilds the vfolder's contents: two swapping pairs and some plain files.
fn reset(vf: &Path, out: &Path) {
    if let Ok(rd) = std::fs::read_dir(vf) {
        for e in rd.flatten() {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    drop(flip_pair(vf, "flip", out));
    std::fs::create_dir_all(vf.join("in")).expect("in");
    std::fs::write(vf.join("in/f.txt"), "in-f").expect("f");
    drop(flip_pair(&vf.join("in"), "flip", out));
}

#[test]
fn random_api_sequences_with_concurrent_swaps_never_touch_the_outside() {
    use proptest::test_runner::{Config, TestRunner};
    let p = Proxy::start("");
    create_folder(&p);
    let out = canary(&p);
    let before = snapshot(&out);
    let vf = p.vfolder_path();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..20), |ops| {
        reset(&vf, &out);
        let flippers = [
            Flipper::start(vf.join("flip"), vf.join("flipalt")),
            Flipper::start(vf.join("in/flip"), vf.join("in/flipalt")),
        ];
        for op in &ops {
            let body = |extra: serde_json::Value| {
                let mut b = serde_json::json!({"volume": "local", "vfid": VFID});
                if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
                    b.extend(e.clone());
                }
                b
            };
            let r = match op {
                Op::List(a) => p.manager(
                    "/folder/file/list",
                    body(serde_json::json!({"relpath": PATHS[*a]})),
                    None,
                ),
                Op::Download(a) => p.download(PATHS[*a], "", &[]),
                Op::Archive(a) => p.download(PATHS[*a], "&archive=true", &[]),
                Op::Upload(a) => p.upload(PATHS[*a], b"uploaded"),
                Op::Delete(a, recursive) => p.manager(
                    "/folder/file/delete",
                    body(serde_json::json!({"relpaths": [PATHS[*a]], "recursive": recursive})),
                    None,
                ),
                Op::Mkdir(a) => p.manager(
                    "/folder/file/mkdir",
                    body(serde_json::json!({"relpath": PATHS[*a], "parents": true, "exist_ok": true})),
                    None,
                ),
                Op::Rename(a, b) => p.manager(
                    "/folder/file/rename",
                    body(serde_json::json!({"relpath": PATHS[*a], "new_name": format!("r{b}")})),
                    None,
                ),
                Op::Move(a, b) => p.manager(
                    "/folder/file/move",
                    body(serde_json::json!({"src_relpath": PATHS[*a], "dst_relpath": PATHS[*b]})),
                    None,
                ),
                Op::Usage => p.manager("/folder/usage", body(serde_json::json!({})), None),
            };
            proptest::prop_assert!(
                !contains(&r.body, CANARY),
                "{op:?} served the outside canary"
            );
            // A usage whose walk met a directory swapped for a symlink (its
            // contents moved where the walk does not look) on every try cannot
            // be measured: 503, never a partial figure.
            let unmeasured = matches!(op, Op::Usage)
                && r.status == 503
                && serde_json::from_slice::<serde_json::Value>(&r.body)
                    .is_ok_and(|j| j["code"] == "usage-unmeasured");
            proptest::prop_assert!(r.status < 500 || unmeasured, "{op:?}: {}", r.status);
            // (A partial mkdir answers 422 with its per-path results.)
            if r.status >= 400 && r.status != 422 {
                let j: serde_json::Value =
                    serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
                proptest::prop_assert!(j["request_id"].is_string(), "{op:?}: {j}");
            }
        }
        drop(flippers);
        proptest::prop_assert_eq!(&snapshot(&out), &before, "the outside changed");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", p.log());
    }
    // The list of the vfolder root never shows the staging area.
    let r = request(p.manager, "GET", "/status", &[], b"");
    assert_eq!(r.status, 200);
}

/// The completing rename of an upload comes after an `fsync` of the staged file and
/// of the staging directory, and is followed by an `fsync` of the destination
/// directory: the system calls are traced with strace attached to the running proxy.
#[test]
fn the_completing_rename_is_fenced_by_fsyncs() {
    use std::io::BufRead as _;
    let p = Proxy::start("");
    create_folder(&p);
    let trace = p.dir.path().join("trace.txt");
    let mut strace = std::process::Command::new("strace")
        .args([
            "-f",
            "-y",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&trace)
        .arg("-p")
        .arg(p.child.id().to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace (needed to observe fsync) is installed");
    // Wait (bounded) for strace to say it attached before uploading.
    let stderr = strace.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("attached") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("strace attached to the proxy");
    let r = p.upload("d/e/synced.bin", b"durable bytes");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // The syscalls happened before the 204 went out; read the trace until they are
    // all written (bounded), then stop strace (the proxy is detached, not killed).
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        if (text.contains("synced.bin") && text.contains("/d/e>) = 0")) || Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = strace.kill();
    let _ = strace.wait();
    let lines: Vec<&str> = text.lines().collect();
    let find = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let rename = find(&|l| l.contains("rename") && l.contains("synced.bin") && l.contains("= 0"))
        .unwrap_or_else(|| panic!("no rename in the trace:\n{text}"));
    let staged_sync = find(&|l| {
        (l.contains("fsync(") || l.contains("fdatasync("))
            && l.contains("/.upload/")
            && l.contains("= 0")
    })
    .unwrap_or_else(|| panic!("no fsync of the staged file:\n{text}"));
    let dir_sync = find(&|l| l.contains("fsync(") && l.contains("/.upload>)") && l.contains("= 0"))
        .unwrap_or_else(|| panic!("no fsync of the staging directory:\n{text}"));
    let dest_sync = lines
        .iter()
        .skip(rename)
        .position(|l| l.contains("fsync(") && l.contains("/d/e>)") && l.contains("= 0"));
    assert!(staged_sync < rename && dir_sync < rename, "{text}");
    assert!(
        dest_sync.is_some(),
        "no fsync of the destination after the rename:\n{text}"
    );
}

/// The entries of a vfolder's staging area that are not staged files of sessions
/// (32 hex digits): what the API put there that it must not have.
fn staging_extras(vf: &Path) -> Vec<String> {
    snapshot(&vf.join(".upload"))
        .into_keys()
        .filter(|k| !(k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit())))
        .collect()
}

/// Everything that creates a path through the manager or client API refuses one
/// that reaches the staging area (`.upload` at the vfolder's root, or anything
/// under it) through a symlink a user made, however deep, with the same 400 as
/// the name itself: `mkdir` (with and without parents), an upload's session and its
/// completion (a link made after the session), and moves, renames and deletes of
/// entries below a directory of the staging area. Symlinks that stay elsewhere in
/// the vfolder still work. Before, only the staging area's own entries were
/// refused through a link, and `mkdir` and an upload's missing parents went
/// through it.
#[test]
fn paths_created_through_a_symlink_never_reach_the_staging_area() {
    let p = Proxy::start("");
    create_folder(&p);
    assert_eq!(p.upload("a.bin", &[1u8; 100]).status, 204);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join(".upload/sub")).expect("sub");
    std::fs::write(vf.join(".upload/sub/f.bin"), b"user").expect("f");
    std::os::unix::fs::symlink(".upload", vf.join("link")).expect("link");
    std::os::unix::fs::symlink(".upload/sub", vf.join("deep")).expect("link");
    std::os::unix::fs::symlink(".", vf.join("here")).expect("link");
    std::fs::create_dir(vf.join("real")).expect("real");
    std::os::unix::fs::symlink("real", vf.join("inner")).expect("link");
    let extras = staging_extras(&vf);
    let call = |path: &str, body: serde_json::Value| {
        let mut body = body;
        body["volume"] = "local".into();
        body["vfid"] = VFID.into();
        p.manager(path, body, None)
    };
    let refused = |r: appproxy_test_support::http::Resp| {
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["code"], "invalid-api-params");
        let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
        assert!(title.contains("staging area"), "{title}");
    };
    for (path, parents, exist_ok) in [
        ("link/d", false, false),
        ("link/d", true, false),
        ("link/sub/d", false, false),
        ("link/sub/d/e", true, false),
        ("deep/x/y", true, true),
        ("deep/e", false, true),
        ("here/.upload", false, true),
        ("here/.upload/z", true, true),
        ("link", true, true),
        ("deep", false, true),
    ] {
        let r = call(
            "/folder/file/mkdir",
            serde_json::json!({"relpath": path, "parents": parents, "exist_ok": exist_ok}),
        );
        assert_eq!(
            r.status,
            422,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = r.json()["results"]["failed"][0]["msg"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(msg.contains("staging area"), "{path}: {msg}");
    }
    // Sessions: refused when they are created.
    for path in [
        "link/sub/new.bin",
        "deep/new.bin",
        "here/.upload",
        "deep/x/y.bin",
    ] {
        refused(call(
            "/folder/file/upload",
            serde_json::json!({"relpath": path, "size": 4}),
        ));
    }
    // Completion: the link is made after the session was created.
    let token = |relpath: &str| {
        p.token(
            "/folder/file/upload",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": relpath, "size": 4}),
        )
    };
    let later = token("later/x.bin");
    let later2 = token("later2/new/x.bin");
    std::os::unix::fs::symlink(".upload/sub", vf.join("later")).expect("link");
    std::os::unix::fs::symlink(".upload", vf.join("later2")).expect("link");
    refused(p.tus_patch(&later, "0", b"data"));
    refused(p.tus_patch(&later2, "0", b"data"));
    // Moves, renames and deletes below a directory of the staging area.
    let mv = |src: &str, dst: &str| {
        call(
            "/folder/file/move",
            serde_json::json!({"src_relpath": src, "dst_relpath": dst}),
        )
    };
    refused(mv("a.bin", "link/sub/a.bin"));
    refused(mv("a.bin", "deep/a.bin"));
    refused(mv("deep/f.bin", "out.bin"));
    refused(mv("link/sub/f.bin", "out.bin"));
    refused(call(
        "/folder/file/rename",
        serde_json::json!({"relpath": "deep/f.bin", "new_name": "g.bin"}),
    ));
    let r = call(
        "/folder/file/delete",
        serde_json::json!({"relpaths": ["deep/f.bin"]}),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    // Nothing was created, moved or removed in the staging area.
    assert_eq!(staging_extras(&vf), extras);
    assert_eq!(
        std::fs::read(vf.join(".upload/sub/f.bin")).expect("f"),
        b"user"
    );
    assert_eq!(std::fs::read(vf.join("a.bin")).expect("a").len(), 100);
    // Links elsewhere in the vfolder work as before.
    let r = call(
        "/folder/file/mkdir",
        serde_json::json!({"relpath": ["inner/x/y", "here/z"], "parents": true}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(vf.join("real/x/y").is_dir() && vf.join("z").is_dir());
    assert_eq!(p.upload("inner/x/up.bin", b"data").status, 204);
    assert_eq!(mv("a.bin", "inner/a.bin").status, 204);
    assert_eq!(
        std::fs::read(vf.join("real/x/up.bin")).expect("up"),
        b"data"
    );
    assert!(vf.join("real/a.bin").is_file());
}

/// A directory swapped for a symlink to the staging area while `mkdir` with parents
/// and uploads into it run: nothing is ever created in the staging area, whichever
/// the path named at each instant (each level is checked on the descriptor it is
/// created in). Before, about every other call landed in the staging area.
#[test]
fn a_directory_swapped_for_the_staging_area_never_leads_creation_there() {
    let p = Proxy::start("");
    create_folder(&p);
    assert_eq!(p.upload("a.bin", b"data").status, 204);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join("flip")).expect("real dir");
    std::os::unix::fs::symlink(".upload", vf.join("flipalt")).expect("link");
    let flipper = Flipper::start(vf.join("flip"), vf.join("flipalt"));
    hammer(4, 30, |t, i| {
        let r = p.manager(
            "/folder/file/mkdir",
            serde_json::json!({"volume": "local", "vfid": VFID, "relpath": format!("flip/n-{t}-{i}/d"), "parents": true}),
            None,
        );
        assert!(
            [200, 422].contains(&r.status),
            "{}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let r = p.upload(&format!("flip/u-{t}-{i}/x.bin"), b"data");
        assert!(
            [204, 400].contains(&r.status),
            "{}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    });
    assert!(flipper.stop() > 0);
    assert_eq!(staging_extras(&vf), Vec::<String>::new());
}

/// A delete listing a path that reaches the staging area through a symlink is
/// refused as a whole before anything is deleted, with the staging area's 400 (as
/// a path naming `.upload` is), also as a background task. Before, the paths
/// listed ahead of it were deleted, and the refusal was a filesystem error (or a
/// background task that failed after a 202).
#[test]
fn a_delete_reaching_the_staging_area_is_refused_before_anything_goes() {
    let p = Proxy::start("");
    create_folder(&p);
    assert_eq!(p.upload("a.bin", b"data").status, 204);
    let vf = p.vfolder_path();
    std::fs::create_dir(vf.join(".upload/sub")).expect("sub");
    std::fs::write(vf.join(".upload/sub/f.bin"), b"user").expect("f");
    std::os::unix::fs::symlink(".upload/sub", vf.join("deep")).expect("link");
    for route in ["/folder/file/delete", "/folder/file/delete-async"] {
        let r = p.manager(
            route,
            serde_json::json!({"volume": "local", "vfid": VFID, "relpaths": ["a.bin", "deep/f.bin"]}),
            None,
        );
        assert_eq!(
            r.status,
            400,
            "{route}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], "invalid-api-params", "{route}");
        let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
        assert!(title.contains("staging area"), "{route}: {title}");
        assert!(vf.join("a.bin").is_file(), "{route}: nothing deleted");
        assert!(vf.join(".upload/sub/f.bin").is_file());
    }
}

/// Every read route refuses the staging area (`.upload` at the vfolder's root,
/// where other users' uploads in progress are) with the write routes' 400, however
/// a path reaches it: by name, through a symlink to it or to a staged file, through
/// `d/up -> ../.upload`, through `here -> .`; `list`, a download's token and the
/// download itself (a token signed before this rule, or whose path became a
/// symlink to the staging area after it was issued), a directory's archive,
/// an archive's token and `/download-archive`, `fetch` and `mount`. Nothing
/// answered carries the partial upload's bytes. An archive of a directory holding
/// a symlink to the staging area does not follow it, and paths elsewhere (through
/// links too) read as before. Before, every one of these read routes served it: a
/// listing named the sessions, downloads and `fetch` sent the partial upload, the
/// archives zipped it, `mount` handed out its host path.
/// Another user's upload, under way with `bytes` of it staged: the name of its
/// staged file in the vfolder's `.upload`.
fn stage_a_partial_upload(p: &Proxy, bytes: &[u8]) -> String {
    let r = p.manager(
        "/folder/file/upload",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "private.bin", "size": 100}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let upload = r.json()["token"].as_str().expect("token").to_owned();
    assert_eq!(p.tus_patch(&upload, "0", bytes).status, 204);
    std::fs::read_dir(p.vfolder_path().join(".upload"))
        .expect("staging area")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() == 32)
        .expect("the staged file")
}

#[test]
fn the_read_routes_refuse_the_staging_area_however_it_is_reached() {
    const VICTIM: &[u8] = b"VICTIM-PARTIAL-UPLOAD";
    let p = Proxy::start("");
    create_folder(&p);
    let session = stage_a_partial_upload(&p, VICTIM);
    let vf = p.vfolder_path();
    std::fs::write(vf.join("a.txt"), b"mine").expect("a");
    std::fs::create_dir_all(vf.join("d/.upload")).expect("d");
    std::fs::write(vf.join("d/f.txt"), b"in d").expect("f");
    std::fs::write(vf.join("d/.upload/g.txt"), b"ordinary").expect("g");
    std::os::unix::fs::symlink(".upload", vf.join("link")).expect("link");
    std::os::unix::fs::symlink(format!(".upload/{session}"), vf.join("staged")).expect("link");
    std::os::unix::fs::symlink("../.upload", vf.join("d/up")).expect("link");
    std::os::unix::fs::symlink(".", vf.join("here")).expect("link");
    std::os::unix::fs::symlink("staged", vf.join("chain")).expect("link");
    let refused = |what: &str, r: &appproxy_test_support::http::Resp| {
        assert!(
            !contains(&r.body, VICTIM) && !contains(&r.body, session.as_bytes()),
            "{what}: served the staging area: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.status,
            400,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], "invalid-api-params", "{what}");
        let title = r.json()["title"].as_str().unwrap_or_default().to_owned();
        assert!(title.contains("staging area"), "{what}: {title}");
    };
    let staged = format!(".upload/{session}");
    let through_link = format!("link/{session}");
    let through_d = format!("d/up/{session}");
    let through_here = format!("here/.upload/{session}");
    let files = [
        staged.as_str(),
        through_link.as_str(),
        through_d.as_str(),
        through_here.as_str(),
        "staged",
        "chain",
    ];
    let dirs = [".upload", "link", "d/up", "here/.upload", "./.upload/"];
    let exp = appproxy_shared::jwt::now_epoch() as u64 + 600;
    // A download token signed as the proxy signed them before (for any path).
    let old_download = |relpath: &str| {
        appproxy_shared::jwt::sign_hs256(
            &serde_json::json!({"op": "download", "volume": "local", "vfid": VFID, "relpath": relpath, "exp": exp}),
            "session-key",
        )
    };
    let old_archive = |files: &[&str]| {
        appproxy_shared::jwt::sign_hs256(
            &serde_json::json!({"operation": "download", "volume": "local", "virtual_folder_id": VFID, "files": files, "filename": null, "exp": exp}),
            "session-key",
        )
    };
    let wait = Duration::from_secs(60);
    let get = |path: &str| {
        appproxy_test_support::http::request_within(p.client, "GET", path, &[], b"", wait)
            .unwrap_or_else(|| panic!("GET {path}: no answer within {wait:?}"))
    };
    for path in dirs.iter().chain(files.iter()) {
        let what = |route: &str| format!("{route} {path}");
        refused(
            &what("list"),
            &p.manager(
                "/folder/file/list",
                serde_json::json!({"volume": "local", "vfid": VFID, "relpath": path}),
                None,
            ),
        );
        refused(
            &what("download token"),
            &p.manager(
                "/folder/file/download",
                serde_json::json!({"volume": "local", "vfid": VFID, "relpath": path}),
                None,
            ),
        );
        let token = old_download(path);
        refused(&what("download"), &get(&format!("/download?token={token}")));
        refused(
            &what("download archive=true"),
            &get(&format!("/download?token={token}&archive=true")),
        );
        for listed in [vec![*path], vec!["a.txt", *path]] {
            refused(
                &what("archive token"),
                &p.manager(
                    "/folder/file/archive-download-token",
                    serde_json::json!({"volume": "local", "vfid": VFID, "files": listed}),
                    None,
                ),
            );
            refused(
                &what("download-archive"),
                &p.download_archive(&old_archive(&listed)),
            );
        }
        refused(
            &what("fetch"),
            &p.manager(
                "/folder/file/fetch",
                serde_json::json!({"volume": "local", "vfid": VFID, "relpath": path}),
                None,
            ),
        );
    }
    // `mount` follows no symlink at all: the staging area by name, and below it.
    for subpath in [".upload", "./.upload"] {
        refused(
            &format!("mount {subpath}"),
            &p.manager_method(
                "GET",
                "/folder/mount",
                serde_json::json!({"volume": "local", "vfid": VFID, "subpath": subpath}),
            ),
        );
    }
    std::fs::create_dir(vf.join(".upload/sub")).expect("sub");
    refused(
        "mount .upload/sub",
        &p.manager_method(
            "GET",
            "/folder/mount",
            serde_json::json!({"volume": "local", "vfid": VFID, "subpath": ".upload/sub"}),
        ),
    );
    // Tokens issued while the path was ordinary, the path a symlink to the staging
    // area when the token is used.
    std::fs::write(vf.join("swap"), b"was ordinary").expect("swap");
    std::fs::create_dir(vf.join("swapdir")).expect("swapdir");
    let file_token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "swap"}),
    );
    let dir_token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "swapdir"}),
    );
    let archive_token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["a.txt", "swapdir"]}),
    );
    std::fs::remove_file(vf.join("swap")).expect("swap");
    std::os::unix::fs::symlink(format!(".upload/{session}"), vf.join("swap")).expect("link");
    std::fs::remove_dir(vf.join("swapdir")).expect("swapdir");
    std::os::unix::fs::symlink(".upload", vf.join("swapdir")).expect("link");
    refused(
        "download of a path swapped after its token",
        &get(&format!("/download?token={file_token}")),
    );
    refused(
        "archive of a directory swapped after its token",
        &get(&format!("/download?token={dir_token}&archive=true")),
    );
    refused(
        "download-archive of a directory swapped after its token",
        &p.download_archive(&archive_token),
    );
    // Elsewhere, through links too, reads work as before.
    let r = p.download("here/a.txt", "", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"mine"[..]));
    let r = p.download("d/.upload/g.txt", "", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ordinary"[..]));
    let r = p.manager(
        "/folder/file/list",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "d"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = p.manager(
        "/folder/file/fetch",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "d/f.txt"}),
        None,
    );
    assert_eq!((r.status, r.body.as_slice()), (200, &b"in d"[..]));
    let r = p.manager_method(
        "GET",
        "/folder/mount",
        serde_json::json!({"volume": "local", "vfid": VFID, "subpath": "d/.upload"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // An archive of a directory holding a symlink to the staging area, and of the
    // vfolder through `here`: the link is not followed, the staging area left out.
    for (path, expected) in [
        ("d", vec!["'.upload/g.txt'", "'f.txt'"]),
        ("here", vec!["'a.txt'", "'d/.upload/g.txt'", "'d/f.txt'"]),
    ] {
        let r = p.download(path, "&archive=true", &[]);
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!contains(&r.body, VICTIM), "{path}");
        let mut names = zip_names(&r.body, p.dir.path());
        names.sort();
        assert_eq!(names, expected, "{path}");
    }
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["d", "here/a.txt"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!contains(&r.body, VICTIM));
    let mut names = zip_names(&r.body, p.dir.path());
    names.sort();
    assert_eq!(names, ["'d/.upload/g.txt'", "'d/f.txt'", "'here/a.txt'"]);
    // The victim's upload completes as if nothing happened.
    assert_eq!(
        std::fs::read(vf.join(".upload").join(&session)).expect("staged"),
        VICTIM
    );
}

/// Python's zipfile: checks every CRC and lists the names (`repr`), one a line.
fn zip_names(zip: &[u8], dir: &Path) -> Vec<String> {
    let path = dir.join("read.zip");
    std::fs::write(&path, zip).expect("zip");
    storage_common::python(
        "import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nfor n in z.namelist(): print(repr(n))",
        &path,
    )
    .expect("a valid zip")
    .lines()
    .map(str::to_owned)
    .collect()
}

/// A path an archive token lists is checked before the answer begins and opened
/// only when its turn comes: one swapped for a symlink to the staging area in
/// between (here while the client holds the writer back within the file listed
/// before it) is left out, logged, and the archive ends whole without the staging
/// area's files. Without the check at its turn, the archive zipped another user's
/// partial upload.
#[test]
fn a_listed_path_swapped_for_the_staging_area_before_its_turn_is_left_out() {
    use std::io::Read as _;
    const VICTIM: &[u8] = b"VICTIM-PARTIAL-UPLOAD";
    let p = Proxy::start("");
    create_folder(&p);
    stage_a_partial_upload(&p, VICTIM);
    let vf = p.vfolder_path();
    // 8 MiB that do not compress: more than the socket and the body channel hold,
    // so the writer waits within it for the client.
    let big = storage_common::incompressible(8 << 20);
    std::fs::write(vf.join("big.bin"), &big).expect("big");
    std::fs::create_dir(vf.join("later")).expect("later");
    std::fs::write(vf.join("later/x.txt"), b"later").expect("x");
    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["big.bin", "later"]}),
    );
    let (mut s, mut raw) =
        storage_common::get_until(&p, &format!("/download-archive?token={token}"), b"big.bin");
    std::fs::remove_dir_all(vf.join("later")).expect("rm later");
    std::os::unix::fs::symlink(".upload", vf.join("later")).expect("link");
    let pos = storage_common::proxy_offset(&p, &vf.join("big.bin")).expect("the proxy reads it");
    assert!(
        pos < big.len() as u64,
        "the writer read big.bin whole before the swap (offset {pos}): more buffering than the test allows for"
    );
    s.read_to_end(&mut raw).expect("the rest of the archive");
    let r = appproxy_test_support::http::parse(&raw, false);
    assert_eq!(r.status, 200);
    assert!(
        !contains(&r.body, VICTIM),
        "the archive carries the staged upload"
    );
    assert_eq!(zip_names(&r.body, p.dir.path()), ["'big.bin'"]);
    assert!(
        p.log_json().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("reaches the staging area"))
            && l.to_string().contains("later")),
        "{}",
        p.log()
    );
}
