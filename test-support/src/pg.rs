//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory,
//! `postgres` on a free loopback port with its socket in that directory, killed and
//! removed on drop. Uses the installed binaries (`PATH`, else
//! `/usr/lib/postgresql/<version>/bin`); as root, the server runs as the `postgres`
//! user, because PostgreSQL refuses to run as root.

use std::net::TcpStream;

use crate::free_port;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running throwaway server.
pub struct Pg {
    child: Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    user: Option<(u32, u32)>,
}

fn find_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in &on_path {
        if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
            return dir.clone();
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|b| b.join("initdb").is_file())
        .expect("PostgreSQL is not installed: the tests need initdb and postgres (apt-get install postgresql; .ci/run does)")
}

/// libfaketime's library, which moves a process's wall clock (`FAKETIME`).
fn faketime_library() -> PathBuf {
    faketime_file("libfaketime.so.1")
}

/// libfaketime's library for processes of several threads (a worker: `FAKETIME`,
/// with `FAKETIME_DONT_FAKE_MONOTONIC=1` so that only its wall clock moves).
pub fn faketime_library_mt() -> PathBuf {
    faketime_file("libfaketimeMT.so.1")
}

fn faketime_file(name: &str) -> PathBuf {
    let dirs = std::fs::read_dir("/usr/lib")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("faketime"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/lib/faketime"))
        .chain(dirs)
        .map(|d| d.join(name))
        .find(|lib| lib.is_file())
        .expect("libfaketime is not installed: a test moves a clock (apt-get install faketime; .ci/run does)")
}

/// (uid, gid) of the `postgres` user when we are root.
fn unprivileged() -> Option<(u32, u32)> {
    let euid = std::fs::metadata("/proc/self")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))?;
    if euid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root needs a postgres user (the postgresql package creates it)");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().ok()?, f[3].parse().ok()?))
}

impl Pg {
    /// Initialises and starts a server with a database `appproxy`.
    pub fn start() -> Self {
        Self::start_with_clock_ahead(0)
    }

    /// [`Pg::start`] with the server's wall clock `secs` ahead of the machine's
    /// (behind when negative), through libfaketime (`apt-get install faketime`;
    /// `.ci/run` does): a database host whose clock disagrees.
    pub fn start_with_clock_ahead(secs: i64) -> Self {
        let bin = find_bin();
        let user = unprivileged();
        let dir = tempfile::Builder::new()
            .prefix("appproxy-pg-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = user {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("log");
        let mut server = Command::new(bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
            ])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        if let Some((uid, gid)) = user {
            server.uid(uid).gid(gid);
        }
        if secs != 0 {
            server
                .env("LD_PRELOAD", faketime_library())
                .env("FAKETIME", format!("{secs:+}s"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = server.spawn().expect("start postgres");
        let pg = Pg {
            child,
            dir,
            bin,
            port,
            user,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && pg.try_psql("postgres", "SELECT 1").is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                pg.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pg.psql("postgres", "CREATE DATABASE appproxy");
        pg
    }

    /// `postgres://postgres@127.0.0.1:<port>/appproxy`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/appproxy", self.port)
    }

    /// A fresh database on this server; its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let psql = if self.bin.join("psql").is_file() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
            ])
            .arg(self.port.to_string())
            .args(["-d", db, "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `sql` on `db` with psql; its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
    }

    /// Runs `sql` on `db` in a session kept open (a transaction that holds its
    /// locks, say) until the returned [`Held`] is released or dropped.
    pub fn hold(&self, db: &str, sql: &str) -> Held {
        use std::io::{BufRead as _, Write as _};
        let psql = if self.bin.join("psql").is_file() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let mut child = Command::new(psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .args(["-d", db])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{sql};\nSELECT 'held';").expect("send to psql");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        while line.trim() != "held" {
            line.clear();
            let read = out.read_line(&mut line).expect("read psql");
            assert!(read > 0, "psql ended before {sql:?} held: {}", self.log());
        }
        Held {
            child,
            stdin: Some(stdin),
        }
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Where the server keeps its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The postmaster's process ID (its backends are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server and its backends frozen (SIGSTOP) until the guard is dropped
    /// (SIGCONT), however the test ends.
    pub fn freeze(&self) -> Frozen<'_> {
        self.signal("-STOP");
        Frozen(self)
    }

    /// Sends `sig` (`-STOP`, `-CONT`, …) to the server, then to each of its
    /// backends: the server first, so that it forks no new one meanwhile; a backend
    /// that ended since it was listed is no failure.
    pub fn signal(&self, sig: &str) {
        let root = self.pid();
        let kill = |pid: &str| {
            Command::new("kill")
                .arg(sig)
                .arg(pid)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(kill(&root.to_string()), "kill {sig} {root}");
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid …: the ppid is the second field after the comm.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(root) {
                kill(&entry.file_name().to_string_lossy());
            }
        }
    }

    /// Whether the server runs as another user (root started it).
    pub fn unprivileged(&self) -> bool {
        self.user.is_some()
    }
}

/// A server frozen by [`Pg::freeze`]; thawed when dropped.
pub struct Frozen<'a>(&'a Pg);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.signal("-CONT");
    }
}

/// A psql session kept open by [`Pg::hold`]; killed (its transaction rolled back)
/// when dropped.
pub struct Held {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Held {
    /// Commits the session's transaction and ends it.
    pub fn commit(mut self) {
        use std::io::Write as _;
        let mut stdin = self.stdin.take().expect("open session");
        writeln!(stdin, "COMMIT;").expect("send to psql");
        drop(stdin);
        let status = self.child.wait().expect("psql");
        assert!(status.success(), "psql: {status}");
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, the postmaster takes its backends along.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
