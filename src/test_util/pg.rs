//! A real PostgreSQL server for tests: a fresh cluster in a temporary directory, listening on
//! loopback only, stopped (immediately) when dropped. Debian's `postgresql` package provides the
//! binaries; `.ci/run` installs it when missing. As root, the cluster runs as the `postgres`
//! user (initdb refuses root). [`PgServer::start`] returns `None` (the test prints that it
//! skipped) when the binaries are missing, unless `LETHE_REQUIRE_POSTGRES` is set, as `.ci/run`
//! sets it: then a missing PostgreSQL fails the test, naming what to install.

use std::path::PathBuf;
use std::process::Command;

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl PgServer {
    /// Starts a new cluster, or `None` when PostgreSQL is not installed and not required (module
    /// docs); panics (naming the step and its output) when a step fails.
    pub fn start() -> Option<PgServer> {
        let Some(bin) = bindir() else {
            let what = "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
                        `apt-get install postgresql` (.ci/run does it)";
            assert!(
                std::env::var_os("LETHE_REQUIRE_POSTGRES").is_none(),
                "{what}; LETHE_REQUIRE_POSTGRES is set"
            );
            eprintln!("skipped: {what}");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("lethe-pg-")
            .tempdir()
            .unwrap();
        let as_postgres = is_root();
        if as_postgres {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success(), "chown of the cluster directory failed");
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = PgServer {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = s.dir.path().join("data");
        s.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "lethe",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            s.port,
            s.dir.path().display()
        );
        let log = s.dir.path().join("log");
        s.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        Some(s)
    }

    /// `tool` from the cluster's binaries, as the `postgres` user when lethe's tests run as root.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A URL for the database `db` (as the superuser `lethe`).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://lethe@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub fn new_database(&self, name: &str) -> String {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        self.url(name)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"])
            .output();
    }
}
