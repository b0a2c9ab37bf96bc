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

/// A single node started as the README says, from copies of the samples in `dir`
/// with their ports moved to free ones: the process, its log (stdout) and the demo
/// command its start-up hint prints.
fn start_single_node(dir: &Path) -> (Node, PathBuf, Vec<String>) {
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
        std::fs::write(dir.join(name), moved(text)).expect("copy");
    }
    let (out, err) = (dir.join("out.log"), dir.join("err.log"));
    let node = Node(
        Command::new(env!("CARGO_BIN_EXE_appproxy-worker"))
            .arg("--config")
            .arg(dir.join("single-node.toml"))
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
    (node, out, command)
}

/// Runs `deploy/demo-circuit.sh` with `args` from the repository's root.
fn demo(args: &[String]) -> std::process::Output {
    Command::new("bash")
        .arg("deploy/demo-circuit.sh")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("bash and curl must be installed (.ci/run installs curl)")
}

#[test]
fn the_printed_demo_command_works_and_its_id_is_on_every_hop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_node, out, command) = start_single_node(dir.path());
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

/// A reload (SIGHUP, the systemd unit's `ExecReload`, the way a managed worker's
/// certificates are renewed) keeps the circuits the coordinator deployed: the file
/// of a managed worker lists none, and taking its circuits for the whole set closed
/// every app of the node, for good.
#[test]
fn a_reload_keeps_the_coordinators_circuits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, out, command) = start_single_node(dir.path());
    let ran = demo(&command);
    let said = String::from_utf8_lossy(&ran.stdout).into_owned();
    assert!(ran.status.success(), "{said}");
    let app_url = said
        .lines()
        .find_map(|l| l.strip_prefix("app URL:"))
        .expect("the demo names the app's URL")
        .trim()
        .to_owned();
    // Without the permit: the circuit answers (401), so it is there.
    let status = || {
        let o = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .arg(&app_url)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(status(), "401");
    let killed = Command::new("kill")
        .args(["-HUP", &node.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let reloaded = |text: &str| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("reload"))
            })
    };
    wait_for(&out, "the reload's line", reloaded);
    // Whatever a reload would deploy has reached the cores by the next turn of each;
    // the circuit answers on, several times over a second.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            status(),
            "401",
            "{}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
    }
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
