//! The README's main job as a newcomer runs it: the worker binary on copies of
//! `deploy/single-node.toml` and its coordinator's config (their ports moved to free
//! ones, nothing else changed), then the very command its start-up hint prints
//! (`deploy/demo-circuit.sh …`). The demo succeeds, and its request ID is on the
//! access line of every hop of the flow: the manager's two calls, the worker's
//! `/setup` and the request through the new circuit. A demo whose app does not
//! answer with a success fails (it used to print its success line over a 502).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The worker process, killed when dropped.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Waits until `path`'s text satisfies `found`, returning the text.
fn wait_for(path: &Path, what: &str, found: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if found(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {what} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_printed_demo_command_works_and_its_id_is_on_every_hop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = appproxy_test_support::free_range(8);
    let port = |i: u16| (base + i).to_string();
    let moved = |text: String| {
        text.replace("10200", &port(0))
            .replace("10201", &port(1))
            .replace("10202", &port(2))
            .replace("[10205, 10300]", &format!("[{}, {}]", port(3), port(7)))
    };
    for name in ["single-node.toml", "coordinator.single-node.toml"] {
        let text = std::fs::read_to_string(repo().join("deploy").join(name)).expect("sample");
        std::fs::write(dir.path().join(name), moved(text)).expect("copy");
    }
    let (out, err) = (dir.path().join("out.log"), dir.path().join("err.log"));
    let _node = Node(
        Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
            .arg("--config")
            .arg(dir.path().join("single-node.toml"))
            .stdout(std::fs::File::create(&out).expect("out"))
            .stderr(std::fs::File::create(&err).expect("err"))
            .spawn()
            .expect("start the worker"),
    );
    let hint = wait_for(&err, "start-up hint", |t| {
        t.lines()
            .any(|l| l.trim_start().starts_with("deploy/demo-circuit.sh "))
    });
    let command: Vec<String> = hint
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("deploy/demo-circuit.sh "))
        .expect("the command")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        command[0],
        format!("http://127.0.0.1:{}", port(0)),
        "{hint}"
    );
    assert_eq!(command[2], format!("127.0.0.1:{}", port(2)), "{hint}");
    let demo = |args: &[String]| {
        Command::new("bash")
            .arg("deploy/demo-circuit.sh")
            .args(args)
            .current_dir(repo())
            .output()
            .expect("bash and curl must be installed (.ci/run installs curl)")
    };
    let ran = demo(&command);
    let said = String::from_utf8_lossy(&ran.stdout).into_owned();
    assert!(
        ran.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(said.contains("HTTP/1.1 200"), "{said}");
    let id = said
        .lines()
        .find_map(|l| l.strip_prefix("request ID: "))
        .expect("the demo names its ID")
        .trim()
        .to_owned();
    // Every hop's access line, under the demo's ID.
    let hops = ["/v2/conf", "/v2/proxy/auth", "/setup", "/health"];
    let on_every_hop = |text: &str| {
        let paths: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access" && v["request_id"] == id.as_str())
            .filter_map(|v| v["path"].as_str().map(str::to_owned))
            .collect();
        hops.iter().all(|h| paths.iter().any(|p| p == h))
    };
    wait_for(
        &out,
        "access line of each hop under the demo's ID",
        on_every_hop,
    );
    // An app that does not answer: the script says so and fails.
    let mut dead = command.clone();
    dead[2] = format!("127.0.0.1:{}", appproxy_test_support::free_port());
    let ran = demo(&dead);
    let said = String::from_utf8_lossy(&ran.stdout);
    assert!(!ran.status.success(), "{said}");
    assert!(said.contains("HTTP/1.1 502"), "{said}");
}

/// Every worker config in `deploy/` is one the worker takes as it is (what a
/// newcomer copies first; each holds comments on what to change).
#[test]
fn every_sample_worker_config_passes_its_check() {
    for name in [
        "single-node.toml",
        "worker.standalone.toml",
        "worker.managed.toml",
        "worker.secured.toml",
        "worker.cluster.toml",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
            .arg("--check-config")
            .arg("--config")
            .arg(repo().join("deploy").join(name))
            .output()
            .expect("run the worker");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {said}");
        assert!(said.contains("config ok"), "{name}: {said}");
    }
}
