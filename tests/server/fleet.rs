//! Fleet mode end to end: a real PostgreSQL on loopback, one shared version directory and three
//! `lethe serve` processes. A takedown sent to replica 1 is guarded on replica 3 within 1 s; the
//! replica running its job is SIGKILLed mid-unlearning and another finishes it; every surviving
//! replica serves the new version within 2 s of `applied`; completions sent to the survivors
//! all the while never fail.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::common::http;
use crate::pg::PgServer;
use crate::takedowns::memorized_rows;

struct Replica {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn start(db: &str, shared: &str, data: &std::path::Path) -> Replica {
        // The benchmark may run another build (`LETHE_FLEET_BENCH_BIN=target/release/lethe`).
        let bin = std::env::var("LETHE_FLEET_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_lethe").to_string());
        let mut child = Command::new(bin)
            .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(["--database-url", db, "--versions-url", shared])
            .args(["--unlearn-threads", "1", "--unlearn-max-steps", "400"])
            .args(["--audit-interval-seconds", "3600", "--http-workers", "2"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "a replica exited during start-up: {:?}",
                log.lock().unwrap()
            );
            if let Some(a) = line.trim().strip_prefix("lethe: listening on http://") {
                break a.to_string();
            }
            log.lock().unwrap().push(line);
        };
        let l = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Replica { child, addr, log }
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = http(&self.addr, "GET", path, "");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http(&self.addr, "GET", "/metrics", "");
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    fn version(&self) -> String {
        self.get("/readyz")["version"].as_str().unwrap().to_string()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn complete(addr: &str, prompt: &[u32]) -> (u16, Value) {
    let body = json!({"prompt": prompt, "max_tokens": 50, "temperature": 0}).to_string();
    let (status, resp) = http(addr, "POST", "/v1/completions", &body);
    (status, serde_json::from_str(&resp).unwrap_or(Value::Null))
}

fn wait_until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The index of the one replica reporting `lethe_fleet_worker 1` (waits up to 30 s for exactly
/// one).
fn the_worker(replicas: &[Replica]) -> usize {
    wait_until("exactly one replica holds the worker lock", 30, || {
        let w: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].metric("lethe_fleet_worker") == Some(1.0))
            .collect();
        (w.len() == 1).then(|| w[0])
    })
}

#[test]
fn three_replicas_guard_within_a_second_survive_the_workers_death_and_flip_together() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let db = pg.new_database("fleet");
    let dirs = tempfile::tempdir().unwrap();
    let shared = format!("file://{}", dirs.path().join("shared").display());
    let seqs = memorized_rows(3);
    assert_eq!(seqs.len(), 3);
    // Replica 1 starts first: it imports the base model, uploads it and sets it live; the
    // others find it in the store.
    let mut replicas = vec![Replica::start(&db, &shared, &dirs.path().join("r1"))];
    for name in ["r2", "r3"] {
        replicas.push(Replica::start(&db, &shared, &dirs.path().join(name)));
    }
    let v0 = replicas[0].version();
    for r in &replicas {
        assert_eq!(r.version(), v0, "every replica serves the root");
    }
    // Exactly one worker.
    let worker = the_worker(&replicas);
    // Before: replica 3 regurgitates the first sequence (so the guard check below can fail).
    let prompt = seqs[0][..50].to_vec();
    let (s, c) = complete(&replicas[2].addr, &prompt);
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["choices"][0]["finish_reason"], "length", "{c}");

    // A takedown sent to replica 1 ...
    let body = json!({"sequences": seqs, "reason": "fleet test"}).to_string();
    let (status, resp) = http(&replicas[0].addr, "POST", "/v1/takedowns", &body);
    assert_eq!(
        status,
        202,
        "{resp}\n{:#?}",
        replicas[0].log.lock().unwrap()
    );
    let accepted = Instant::now();
    let id = serde_json::from_str::<Value>(&resp).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // ... is guarded on replica 3 within 1 s: the first completion there that is cut.
    let guarded = wait_until("replica 3 guards the takedown", 5, || {
        let sent = accepted.elapsed();
        let (s, c) = complete(&replicas[2].addr, &prompt);
        assert_eq!(s, 200, "{c}");
        (c["choices"][0]["finish_reason"] == "content_filter").then_some(sent)
    });
    eprintln!("fleet: guarded on replica 3 by a request sent {guarded:?} after the 202");
    assert!(
        guarded <= Duration::from_secs(1),
        "guarded after {guarded:?}"
    );

    // Steady completion traffic to the two replicas that will survive, from now to the end.
    let survivors: Vec<String> = (0..3)
        .filter(|&i| i != worker)
        .map(|i| replicas[i].addr.clone())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let traffic: Vec<_> = survivors
        .iter()
        .cloned()
        .map(|addr| {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            let prompt = seqs[1][..20].to_vec();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let (s, c) = complete(&addr, &prompt);
                    sent.fetch_add(1, Ordering::SeqCst);
                    if s != 200 {
                        failed.lock().unwrap().push(format!("{addr}: {s} {c}"));
                    }
                }
            })
        })
        .collect();

    // The worker is killed (SIGKILL) while the job unlearns.
    wait_until("the job is unlearning", 300, || {
        let t = replicas[worker].get(&format!("/v1/takedowns/{id}"));
        (t["status"] == "running" && t["phase"] == "unlearning").then_some(())
    });
    let t = replicas[(worker + 1) % 3].get(&format!("/v1/takedowns/{id}"));
    assert_eq!(t["status"], "running", "killed mid-unlearning: {t}");
    replicas[worker].child.kill().unwrap();
    replicas[worker].child.wait().unwrap();
    let killed = Instant::now();
    let dead = replicas.remove(worker);
    // Another replica takes the lock and runs the interrupted job.
    let new_worker = wait_until("another replica becomes the worker", 30, || {
        (0..2).find(|&i| replicas[i].metric("lethe_fleet_worker") == Some(1.0))
    });
    let failover = killed.elapsed();
    eprintln!("fleet: worker fail-over in {failover:?}");
    let applied = wait_until("the takedown is applied", 900, || {
        let t = replicas[new_worker].get(&format!("/v1/takedowns/{id}"));
        assert!(
            !["rejected", "failed", "cancelled"].contains(&t["status"].as_str().unwrap_or("")),
            "{t}"
        );
        (t["status"] == "applied").then_some(t)
    });
    let seen_applied = unix_now();
    let v1 = applied["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v0);
    let receipt = replicas[new_worker].get(&format!("/v1/takedowns/{id}/receipt"));
    let events = receipt["events"].as_array().cloned().unwrap_or_default();
    let states: Vec<&str> = events.iter().filter_map(|e| e["state"].as_str()).collect();
    assert!(
        states.windows(2).any(|w| w == ["running", "queued"]),
        "the interrupted job was re-queued: {states:?}"
    );
    // Every survivor serves the new version within 2 s of `applied`.
    for r in &replicas {
        let lag = wait_until("the survivor serves the new version", 10, || {
            (r.version() == v1).then(|| unix_now() - seen_applied)
        });
        eprintln!(
            "fleet: {} serves {v1} {lag:.3} s after applied was seen",
            r.addr
        );
        assert!(lag <= 2.0, "{} took {lag} s", r.addr);
    }
    // Let the traffic run on the new version a moment, then stop it.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for t in traffic {
        t.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    let sent = sent.load(Ordering::SeqCst);
    eprintln!(
        "fleet: {sent} completions to the survivors, {} failed",
        failed.len()
    );
    assert!(sent > 10, "traffic ran ({sent})");
    assert!(failed.is_empty(), "{failed:?}");
    // The new weights no longer regurgitate: the audit on a survivor bypasses the guard.
    let a = http(
        &replicas[0].addr,
        "POST",
        "/v1/audit",
        &json!({"sequences": seqs}).to_string(),
    );
    let a: Value = serde_json::from_str(&a.1).unwrap();
    assert_eq!(a["summary"]["memorized"], 0, "{a}");
    assert_eq!(a["model_version"], v1.as_str());
    for r in &replicas {
        assert_eq!(r.metric("lethe_fleet_version_lag_seconds"), Some(0.0));
    }

    // A rollback on one replica propagates the same way: the other serves the root again
    // within 2 s.
    let body = json!({"to_version": v0, "expected_current": v1}).to_string();
    let (status, resp) = http(&replicas[0].addr, "POST", "/v1/admin/rollback", &body);
    assert_eq!(status, 200, "{resp}");
    let rolled = Instant::now();
    wait_until("the rollback reaches the other replica", 2, || {
        (replicas[1].version() == v0).then_some(())
    });
    eprintln!(
        "fleet: rollback on one replica served by the other after {:?}",
        rolled.elapsed()
    );

    // The store goes away: once a replica has not read it for --guard-staleness (5 s) it is
    // not ready, so a load balancer stops sending it traffic it might answer unguarded; it
    // still answers. The clock starts before the stop (pg_ctl may take a while on a loaded
    // machine), and what is checked is the replica's own account: the staleness it exports
    // is over the limit, and it keeps growing while the store stays down.
    for r in &replicas {
        assert_eq!(http(&r.addr, "GET", "/readyz", "").0, 200);
    }
    let gone = Instant::now();
    drop(pg);
    eprintln!("fleet: the database stopped in {:?}", gone.elapsed());
    for r in &replicas {
        let (status, body) = wait_until("not ready without the store", 15, || {
            let (status, body) = http(&r.addr, "GET", "/readyz", "");
            (status == 503).then_some((status, body))
        });
        assert!(body.contains("--guard-staleness"), "{status} {body}");
        assert_eq!(r.metric("lethe_ready"), Some(0.0));
        let stale = r.metric("lethe_fleet_store_staleness_seconds").unwrap();
        assert!(
            stale > 5.0,
            "not ready while the store was read {stale} s ago"
        );
    }
    eprintln!(
        "fleet: not ready {:?} after the database was told to stop",
        gone.elapsed()
    );
    let before = replicas[0]
        .metric("lethe_fleet_store_staleness_seconds")
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let after = replicas[0]
        .metric("lethe_fleet_store_staleness_seconds")
        .unwrap();
    assert!(
        after >= before + 0.5,
        "staleness stopped growing: {before} then {after}"
    );
    let (s, c) = complete(&replicas[0].addr, &seqs[2][..20]);
    assert_eq!(s, 200, "{c}");
    for r in &replicas {
        let log = r.log.lock().unwrap();
        assert!(!log.iter().any(|l| l.contains("panicked")), "{log:?}");
    }
    drop(dead);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The fleet benchmark (docs/benchmarks.md, "Fleet mode"): rounds of a takedown sent to one
/// replica, its worker SIGKILLed mid-unlearning and restarted, the new version followed by the
/// others. Reports the guard delay, the worker fail-over time and the version propagation lag
/// (each follower's `lethe_fleet_version_propagation_seconds`, from the store's pointer moving
/// to it serving the version). Run:
/// `LETHE_FLEET_BENCH_BIN=target/release/lethe cargo test --test server fleet::benchmark -- --ignored --nocapture`
#[test]
#[ignore = "a benchmark: minutes; run by the command in its doc comment"]
fn benchmark() {
    let rounds: usize = std::env::var("LETHE_FLEET_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let pg = PgServer::start().expect("PostgreSQL (Debian package postgresql)");
    let db = pg.new_database("fleet_bench");
    let dirs = tempfile::tempdir().unwrap();
    let shared = format!("file://{}", dirs.path().join("shared").display());
    let data = |i: usize| dirs.path().join(format!("r{i}"));
    let mut candidates = memorized_rows(64);
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start(&db, &shared, &data(i)))
        .collect();
    let (mut guard, mut failover, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // A sequence the live version still regurgitates (an earlier round's edit may have
        // removed its neighbours too).
        let audit = json!({"sequences": candidates}).to_string();
        let (_, a) = http(&replicas[0].addr, "POST", "/v1/audit", &audit);
        let a: Value = serde_json::from_str(&a).unwrap();
        let pick = arr_index(&a["results"], |r| r["memorized"] == true)
            .expect("a still-memorized candidate");
        let seq = candidates.remove(pick);
        let worker = the_worker(&replicas);
        let (to, watch) = ((worker + 1) % 3, (worker + 2) % 3);
        let sums: Vec<f64> = replicas
            .iter()
            .map(|r| {
                r.metric("lethe_fleet_version_propagation_seconds_sum")
                    .unwrap_or(0.0)
            })
            .collect();
        let body = json!({"sequences": [seq]}).to_string();
        let (status, resp) = http(&replicas[to].addr, "POST", "/v1/takedowns", &body);
        assert_eq!(status, 202, "{resp}");
        let accepted = Instant::now();
        let id = serde_json::from_str::<Value>(&resp).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let prompt = seq[..50].to_vec();
        let g = wait_until("guarded", 5, || {
            let (_, c) = complete(&replicas[watch].addr, &prompt);
            (c["choices"][0]["finish_reason"] == "content_filter").then(|| accepted.elapsed())
        });
        guard.push(g.as_secs_f64());
        wait_until("the job runs", 300, || {
            let t = replicas[worker].get(&format!("/v1/takedowns/{id}"));
            assert!(
                ["queued", "running"].contains(&t["status"].as_str().unwrap()),
                "{t}"
            );
            (t["status"] == "running").then_some(())
        });
        replicas[worker].child.kill().unwrap();
        replicas[worker].child.wait().unwrap();
        let killed = Instant::now();
        let next = wait_until("fail-over", 30, || {
            [to, watch]
                .into_iter()
                .find(|&i| replicas[i].metric("lethe_fleet_worker") == Some(1.0))
        });
        failover.push(killed.elapsed().as_secs_f64());
        let t = wait_until("applied", 900, || {
            let t = replicas[next].get(&format!("/v1/takedowns/{id}"));
            (t["status"] != "running" && t["status"] != "queued" && t["status"] != "validating")
                .then_some(t)
        });
        assert_eq!(t["status"], "applied", "{t}");
        let v = t["version"].as_str().unwrap().to_string();
        let follower = if next == to { watch } else { to };
        wait_until("followed", 30, || {
            (replicas[follower].version() == v).then_some(())
        });
        let l = replicas[follower]
            .metric("lethe_fleet_version_propagation_seconds_sum")
            .unwrap()
            - sums[follower];
        lag.push(l);
        eprintln!(
            "fleet bench round {round}: guard {:.3} s, fail-over {:.3} s, propagation {l:.3} s",
            g.as_secs_f64(),
            failover[round]
        );
        // The killed replica comes back on its own cache and follows the live version.
        let restarted = Replica::start(&db, &shared, &data(worker));
        assert_eq!(restarted.version(), v);
        replicas[worker] = restarted;
    }
    let max = |v: &[f64]| v.iter().cloned().fold(f64::MIN, f64::max);
    eprintln!(
        "fleet bench ({rounds} rounds): guard median {:.3} s max {:.3} s; fail-over median {:.3} s max {:.3} s; propagation median {:.3} s max {:.3} s",
        median(&mut guard.clone()),
        max(&guard),
        median(&mut failover.clone()),
        max(&failover),
        median(&mut lag.clone()),
        max(&lag)
    );
}

fn arr_index(v: &Value, f: impl Fn(&Value) -> bool) -> Option<usize> {
    v.as_array()?.iter().position(f)
}
