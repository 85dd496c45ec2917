//! The deployment configs in `docker/` against the code they deploy: every metric a Grafana
//! panel or an alert rule names is one lethe exports (`Metrics::catalog`, not a hand list),
//! promtool accepts the Prometheus files, a real Prometheus loaded with the compose config
//! scrapes a real lethe, and every flag and `LETHE_…` variable set by the Dockerfile, the
//! compose file and the Kubernetes manifests is one `lethe serve` accepts (the real clap
//! command parses them).
//!
//! promtool and prometheus come from Debian's `prometheus` package; the tests that need them
//! skip with a message when they are missing, unless `LETHE_REQUIRE_PROMTOOL` is set (CI).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory;
use serde::Deserialize;
use serde_json::{json, Value};

use lethe::metrics::{MetricType, Metrics};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every document of a (multi-document) YAML file, as JSON values.
fn yaml_docs(rel: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(rel))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one YAML document expected");
    docs.remove(0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

fn arr(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}"))
}

fn strings(v: &Value) -> Vec<String> {
    arr(v).iter().map(|x| s(x).to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Metric names in PromQL

/// Labels Prometheus itself attaches to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// What lethe exports: name -> (type, label names).
fn exported() -> BTreeMap<String, (MetricType, Vec<String>)> {
    Metrics::new()
        .catalog()
        .into_iter()
        .map(|(n, t, l)| (n, (t, l)))
        .collect()
}

/// The labels of the series `name` selects, or why lethe has no such series.
fn series_labels(
    exported: &BTreeMap<String, (MetricType, Vec<String>)>,
    name: &str,
) -> Result<Vec<String>, String> {
    if let Some((ty, labels)) = exported.get(name) {
        if *ty == MetricType::HISTOGRAM {
            return Err(format!(
                "{name} is a histogram: select {name}_bucket, _count or _sum"
            ));
        }
        return Ok(labels.clone());
    }
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some((ty, labels)) = name.strip_suffix(suffix).and_then(|b| exported.get(b)) {
            let mut labels = labels.clone();
            match (ty, suffix) {
                (MetricType::HISTOGRAM, "_bucket") => labels.push("le".into()),
                (MetricType::HISTOGRAM | MetricType::SUMMARY, "_count" | "_sum") => {}
                _ => return Err(format!("{name}: lethe's {ty:?} has no {suffix} series")),
            }
            return Ok(labels);
        }
    }
    Err(format!("{name} is not a metric lethe exports"))
}

/// What a PromQL expression refers to: `lethe_…` metric names with the label names of their
/// selectors, and the label names in `by`/`without`/`on`/`ignoring`/`group_*` clauses.
#[derive(Debug, Default)]
struct Refs {
    metrics: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

fn promql_refs(expr: &str) -> Refs {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let skip_string = |mut i: usize| {
        let q = b[i];
        i += 1;
        while i < b.len() && b[i] != q {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        i + 1
    };
    let mut refs = Refs::default();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(i);
        } else if c.is_ascii_digit() {
            // numbers and durations (0.99, 5m, 1e3)
            while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b'$' {
            let start = i;
            i += 1;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let j = skip_ws(i);
            if word.starts_with("lethe_") {
                let mut labels = Vec::new();
                if j < b.len() && b[j] == b'{' {
                    // name op "value" [, name op "value"]* }
                    let mut k = j + 1;
                    loop {
                        k = skip_ws(k);
                        if k < b.len() && b[k] == b',' {
                            k += 1;
                            continue;
                        }
                        if k >= b.len() || b[k] == b'}' {
                            break;
                        }
                        let l0 = k;
                        while k < b.len() && ident(b[k]) {
                            k += 1;
                        }
                        assert!(k > l0, "cannot parse the selector in {expr:?}");
                        labels.push(expr[l0..k].to_string());
                        k = skip_ws(k);
                        while k < b.len() && matches!(b[k], b'=' | b'!' | b'~') {
                            k += 1;
                        }
                        k = skip_string(skip_ws(k));
                    }
                    i = k + 1;
                }
                refs.metrics.push((word.to_string(), labels));
            } else if matches!(
                word,
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) && j < b.len()
                && b[j] == b'('
            {
                let end = j + expr[j..].find(')').expect("closed label list");
                refs.grouping.extend(
                    expr[j + 1..end]
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
                i = end + 1;
            }
        } else {
            i += 1;
        }
    }
    refs
}

/// Problems with one expression (and the `{{label}}` placeholders of its legend): metrics
/// lethe does not export, and labels none of its metrics carry.
fn check_expr(
    exported: &BTreeMap<String, (MetricType, Vec<String>)>,
    context: &str,
    expr: &str,
    legend: &str,
    used: &mut BTreeSet<String>,
) -> Vec<String> {
    let refs = promql_refs(expr);
    let mut problems = Vec::new();
    if refs.metrics.is_empty() && !expr.contains("up{") && !expr.contains("up ") {
        problems.push(format!("{context}: {expr:?} names no lethe metric"));
    }
    let mut known: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    for (name, selector_labels) in &refs.metrics {
        match series_labels(exported, name) {
            Ok(labels) => {
                for l in selector_labels {
                    if !labels.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                        problems.push(format!("{context}: {name} has no label {l:?}"));
                    }
                }
                known.extend(labels);
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suf| name.strip_suffix(suf).filter(|b| exported.contains_key(*b)))
                    .unwrap_or(name);
                used.insert(base.to_string());
            }
            Err(e) => problems.push(format!("{context}: {e}")),
        }
    }
    let mut placeholders = Vec::new();
    let mut rest = legend;
    while let Some(start) = rest.find("{{") {
        let end = rest[start..].find("}}").expect("closed placeholder") + start;
        placeholders.push(rest[start + 2..end].trim().to_string());
        rest = &rest[end + 2..];
    }
    for l in refs.grouping.iter().chain(&placeholders) {
        if !known.contains(l) {
            problems.push(format!(
                "{context}: label {l:?} is on none of {expr:?}'s series"
            ));
        }
    }
    problems
}

#[test]
fn promql_refs_finds_metrics_selectors_and_groupings() {
    let r = promql_refs(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(lethe_request_duration_seconds_bucket{route="/v1/x}", method!~"P.*"}[$__rate_interval]))) / lethe_queue_depth"#,
    );
    assert_eq!(
        r.metrics,
        [
            (
                "lethe_request_duration_seconds_bucket".to_string(),
                vec!["route".to_string(), "method".to_string()]
            ),
            ("lethe_queue_depth".to_string(), vec![])
        ]
    );
    assert_eq!(r.grouping, ["le", "route"]);
    let ex = exported();
    let mut used = BTreeSet::new();
    assert!(check_expr(&ex, "t", "rate(lethe_batch_size_sum[5m])", "", &mut used).is_empty());
    assert_eq!(used, BTreeSet::from(["lethe_batch_size".to_string()]));
    for bad in [
        "lethe_nonexistent_total",
        "lethe_request_duration_seconds",
        "lethe_queue_depth_bucket",
        r#"lethe_takedowns{status="failed"}"#,
        "sum by (nope) (lethe_takedowns)",
    ] {
        assert!(
            !check_expr(&ex, "t", bad, "", &mut used).is_empty(),
            "{bad} passed"
        );
    }
    assert!(!check_expr(&ex, "t", "lethe_takedowns", "{{version}}", &mut used).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Grafana and alert rules

/// Every panel of a dashboard, rows' nested panels included.
fn all_panels(panels: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in panels.as_array().into_iter().flatten() {
        out.push(p);
        out.extend(all_panels(&p["panels"]));
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("docker/grafana/dashboards/lethe.json")).unwrap()
}

/// (context, expr, legend) of every query on the dashboard.
fn dashboard_queries(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in all_panels(&d["panels"]) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {:?}", p["title"]),
                t["expr"].as_str().unwrap_or_default().to_string(),
                t["legendFormat"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            out.push((
                format!("variable {:?}", v["name"]),
                q.unwrap_or_default().to_string(),
                String::new(),
            ));
        }
    }
    out
}

#[test]
fn the_dashboard_shows_only_exported_metrics_from_the_provisioned_datasource() {
    let ex = exported();
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    let sources = yaml("docker/grafana/provisioning/datasources/prometheus.yml");
    let ds = &arr(&sources["datasources"])[0];
    assert_eq!(ds["type"], "prometheus");
    let uid = s(&ds["uid"]);
    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    let panels = all_panels(&d["panels"]);
    for p in &panels {
        let title = &p["title"];
        assert!(ids.insert(p["id"].as_u64().unwrap()), "panel ids repeat");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if targets.is_empty() {
            problems.push(format!("panel {title} has no target"));
        }
        for t in targets {
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!("panel {title}: a target without expr"));
            }
            let tds = if t["datasource"].is_null() {
                &p["datasource"]
            } else {
                &t["datasource"]
            };
            if tds["uid"] != uid {
                problems.push(format!("panel {title}: datasource {tds} is not {uid:?}"));
            }
        }
    }
    let mut used = BTreeSet::new();
    for (context, expr, legend) in dashboard_queries(&d) {
        problems.extend(check_expr(&ex, &context, &expr, &legend, &mut used));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // What the dashboard is for (issue #7).
    for m in [
        "lethe_request_duration_seconds",
        "lethe_generated_tokens_total",
        "lethe_queue_depth",
        "lethe_requests_in_flight",
        "lethe_time_to_first_token_seconds",
        "lethe_memorization_ratio",
        "lethe_perplexity_drift_ratio",
        "lethe_perplexity",
        "lethe_takedowns",
        "lethe_unlearn_job_progress_ratio",
        "lethe_unlearn_job_duration_seconds",
        "lethe_model_info",
        "lethe_guard_blocks_total",
        "lethe_model_swap_duration_seconds",
    ] {
        assert!(used.contains(m), "no panel shows {m}");
    }
    // The provider serves the folder compose mounts the dashboards into.
    let providers = yaml("docker/grafana/provisioning/dashboards/lethe.yml");
    let path = s(&arr(&providers["providers"])[0]["options"]["path"]).to_string();
    let compose = yaml("docker/compose.yaml");
    let mounts = strings(&compose["services"]["grafana"]["volumes"]);
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with(&format!("./grafana/dashboards:{path}"))),
        "{mounts:?} do not mount the dashboards at {path}"
    );
}

fn alert_rules() -> Vec<Value> {
    let rules = yaml("docker/prometheus/alerts.yml");
    arr(&rules["groups"])
        .iter()
        .flat_map(|g| arr(&g["rules"]).clone())
        .collect()
}

#[test]
fn alert_rules_name_only_exported_metrics_and_carry_severity_and_text() {
    let ex = exported();
    let rules = alert_rules();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut names = BTreeSet::new();
    for r in &rules {
        let name = s(&r["alert"]);
        assert!(names.insert(name.to_string()), "{name} repeats");
        problems.extend(check_expr(
            &ex,
            &format!("alert {name}"),
            s(&r["expr"]),
            "",
            &mut used,
        ));
        let sev = r["labels"]["severity"].as_str().unwrap_or_default();
        if !["critical", "warning", "info"].contains(&sev) {
            problems.push(format!("alert {name}: severity {sev:?}"));
        }
        for a in ["summary", "description"] {
            if r["annotations"][a].as_str().is_none_or(str::is_empty) {
                problems.push(format!("alert {name}: no {a}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for m in [
        "lethe_perplexity_drift_ratio",
        "lethe_memorization_ratio",
        "lethe_takedowns",
    ] {
        assert!(used.contains(m), "no alert on {m}");
    }
    // The drift alert's threshold is `lethe serve`'s --perplexity-budget default.
    let cmd = serve_command();
    let budget = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some("perplexity-budget"))
        .unwrap()
        .get_default_values()[0]
        .to_string_lossy()
        .parse::<f64>()
        .unwrap();
    let drift = rules
        .iter()
        .find(|r| s(&r["expr"]).contains("lethe_perplexity_drift_ratio"))
        .unwrap();
    let threshold: f64 = s(&drift["expr"])
        .rsplit_once('>')
        .unwrap()
        .1
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        threshold, budget,
        "drift alert threshold vs --perplexity-budget"
    );
}

// ---------------------------------------------------------------------------------------------
// promtool and a real Prometheus

fn required() -> bool {
    std::env::var_os("LETHE_REQUIRE_PROMTOOL").is_some()
}

/// Runs `prog args`; `None` (with a message) when it is not installed and not required.
fn tool(prog: &str, args: &[&str]) -> Option<Output> {
    match Command::new(prog).args(args).output() {
        Ok(out) => Some(out),
        Err(e) if required() => {
            panic!("{prog} is required (LETHE_REQUIRE_PROMTOOL) but failed to start: {e}")
        }
        Err(e) => {
            eprintln!("{prog} not run: {e}");
            None
        }
    }
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_config_the_rules_their_tests_and_the_dashboard_queries() {
    let dir = repo().join("docker/prometheus");
    let p = |f: &str| dir.join(f).display().to_string();
    for args in [
        vec!["check", "config", &*p("prometheus.yml")],
        vec!["check", "rules", &*p("alerts.yml")],
        vec!["test", "rules", &*p("alerts_test.yml")],
    ] {
        let Some(out) = tool("promtool", &args) else {
            return;
        };
        assert_ok(&format!("promtool {}", args.join(" ")), &out);
    }
    // The dashboard's queries parse as PromQL: each becomes a recording rule.
    let rules: Vec<Value> = dashboard_queries(&dashboard())
        .into_iter()
        .enumerate()
        .map(|(i, (_, expr, _))| {
            json!({"record": format!("dashboard:query_{i}"), "expr": expr.replace("$__rate_interval", "5m")})
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dashboard_rules.yml");
    let doc = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
    let out = tool("promtool", &["check", "rules", file.to_str().unwrap()]).unwrap();
    assert_ok("promtool check rules (dashboard queries)", &out);
}

/// A child process killed (and reaped) when dropped, even when the test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn url_encode(q: &str) -> String {
    q.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (c as char).to_string()
            }
            _ => format!("%{c:02X}"),
        })
        .collect()
}

/// GET `path` from Prometheus; `None` while it does not accept connections yet. HTTP/1.0, so
/// the answer is never chunked (`common::http` does not undo chunking).
fn prom_get(addr: &str, path: &str) -> Option<(u16, Value)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1);
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// The result of an instant query, once it is non-empty (polled until `deadline`).
fn query_until(addr: &str, q: &str, deadline: Instant, log: &Path) -> Vec<Value> {
    loop {
        let path = format!("/api/v1/query?query={}", url_encode(q));
        if let Some((200, v)) = prom_get(addr, &path) {
            assert_eq!(v["status"], "success", "{q}: {v}");
            let result = arr(&v["data"]["result"]).clone();
            if !result.is_empty() {
                return result;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus returned nothing for {q} in time; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[actix_web::test]
async fn a_real_prometheus_with_the_compose_config_scrapes_lethe_and_loads_the_alerts() {
    if tool("prometheus", &["--version"]).is_none() {
        return;
    }
    let st = super::state();
    let version = st.served().version.clone();
    let server = {
        let st = st.clone();
        actix_web::HttpServer::new(move || super::make_app(st.clone()))
    }
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let lethe_addr = server.addrs()[0].to_string();
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);

    // The compose config with the target and intervals rewritten; everything else as shipped.
    let mut config = yaml("docker/prometheus/prometheus.yml");
    config["global"]["scrape_interval"] = json!("1s");
    config["global"]["evaluation_interval"] = json!("1s");
    let job = arr(&config["scrape_configs"])
        .iter()
        .position(|j| j["job_name"] == "lethe")
        .expect("a scrape job named lethe");
    config["scrape_configs"][job]["static_configs"] = json!([{ "targets": [lethe_addr] }]);
    let tmp = tempfile::tempdir().unwrap();
    let config_file = tmp.path().join("prometheus.yml");
    std::fs::write(&config_file, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    for f in strings(&config["rule_files"]) {
        std::fs::copy(
            repo().join("docker/prometheus").join(&f),
            tmp.path().join(&f),
        )
        .unwrap();
    }
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let log = tmp.path().join("prometheus.log");
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    let rule_names: BTreeSet<String> = alert_rules()
        .iter()
        .map(|r| s(&r["alert"]).to_string())
        .collect();
    let (model_info, requests, up, loaded) = tokio::task::spawn_blocking(move || {
        let (status, body) = super::common::http(
            &lethe_addr,
            "POST",
            "/v1/completions",
            &json!({"prompt": super::PROMPT, "max_tokens": 4}).to_string(),
        );
        assert_eq!(status, 200, "{body}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let model_info = query_until(&prom_addr, "lethe_model_info", deadline, &log);
        let requests = query_until(
            &prom_addr,
            r#"lethe_request_duration_seconds_count{route="/v1/completions"}"#,
            deadline,
            &log,
        );
        let up = query_until(&prom_addr, r#"up{job="lethe"}"#, deadline, &log);
        let ready = query_until(&prom_addr, "lethe_ready", deadline, &log);
        assert_eq!(ready[0]["value"][1], "1", "{ready:?}");
        // Every alert rule is loaded and has been evaluated without error.
        let loaded = loop {
            let (_, v) = prom_get(&prom_addr, "/api/v1/rules?type=alert").unwrap();
            let rules: Vec<Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| arr(&g["rules"]).clone())
                .collect();
            let evaluated: BTreeMap<String, String> = rules
                .iter()
                .map(|r| (s(&r["name"]).to_string(), s(&r["health"]).to_string()))
                .collect();
            if evaluated.len() == rule_names.len() && evaluated.values().all(|h| h == "ok") {
                break evaluated;
            }
            assert!(
                Instant::now() < deadline,
                "rules not all loaded and healthy: {v}"
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        (model_info, requests, up, loaded)
    })
    .await
    .unwrap();
    handle.stop(true).await;

    assert_eq!(model_info.len(), 1, "{model_info:?}");
    let m = &model_info[0]["metric"];
    assert_eq!(m["version"], version.as_str(), "{m}");
    assert_eq!(m["architecture"], "gpt2", "{m}");
    assert_eq!(m["job"], "lethe", "{m}");
    assert_eq!(model_info[0]["value"][1], "1");
    let r = &requests[0]["metric"];
    assert_eq!(
        (&r["method"], &r["status"]),
        (&json!("POST"), &json!("200"))
    );
    assert!(
        requests[0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= 1.0
    );
    assert_eq!(up[0]["value"][1], "1", "{up:?}");
    let names: BTreeSet<String> = loaded.keys().cloned().collect();
    let expected: BTreeSet<String> = alert_rules()
        .iter()
        .map(|r| s(&r["alert"]).to_string())
        .collect();
    assert_eq!(names, expected);
}

// ---------------------------------------------------------------------------------------------
// Flags and LETHE_… variables against the real command line

/// `lethe serve` as clap builds it (global flags included).
fn serve_command() -> clap::Command {
    let mut cmd = lethe::cli::Cli::command();
    cmd.build();
    cmd.find_subcommand("serve").unwrap().clone()
}

/// `LETHE_…` variables lethe reads outside clap (the bundled models' folder, src/loader.rs).
const NON_FLAG_ENV: [&str; 1] = ["LETHE_MODELS_DIR"];

/// Parses `lethe <args>` with `env` given as the flags they stand for; every `LETHE_…`
/// variable must be a flag's or one of [`NON_FLAG_ENV`]. Returns (bind, data dir).
fn parse_serve(args: &[String], env: &BTreeMap<String, String>) -> (String, String) {
    let p = try_parse_serve(args, env).unwrap_or_else(|e| panic!("{e}"));
    (p.bind, p.data_dir)
}

/// What a `lethe serve` command line sets.
struct Serve {
    bind: String,
    data_dir: String,
    database_url: Option<String>,
    versions_url: Option<String>,
}

fn try_parse_serve(args: &[String], env: &BTreeMap<String, String>) -> Result<Serve, String> {
    let cmd = serve_command();
    let by_env: BTreeMap<String, String> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().into_owned(),
                a.get_long()?.to_string(),
            ))
        })
        .collect();
    if args.first().map(String::as_str) != Some("serve") {
        return Err(format!("{args:?} does not run lethe serve"));
    }
    let mut argv = vec!["lethe".to_string()];
    argv.extend(args.iter().cloned());
    for (k, v) in env.iter().filter(|(k, _)| k.starts_with("LETHE_")) {
        if NON_FLAG_ENV.contains(&k.as_str()) {
            continue;
        }
        let long = by_env
            .get(k)
            .ok_or_else(|| format!("{k} is not a variable lethe serve reads"))?;
        argv.push(format!("--{long}={v}"));
    }
    let matches = lethe::cli::Cli::command()
        .try_get_matches_from(&argv)
        .map_err(|e| format!("lethe rejects {argv:?}: {e}"))?;
    let serve = matches.subcommand_matches("serve").unwrap();
    let get = |id: &str| serve.get_one::<String>(id).unwrap().clone();
    let data_dir = serve
        .get_one::<PathBuf>("data_dir")
        .unwrap()
        .display()
        .to_string();
    Ok(Serve {
        bind: get("bind"),
        data_dir,
        database_url: serve.get_one::<String>("database_url").cloned(),
        versions_url: serve.get_one::<String>("versions_url").cloned(),
    })
}

fn port_of(bind: &str) -> u16 {
    bind.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn parse_serve_rejects_unknown_flags_and_variables() {
    let args = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let none = BTreeMap::new();
    let (bind, dir) = parse_serve(&args(&["serve", "--bind", "0.0.0.0:9"]), &none);
    assert_eq!((bind.as_str(), dir.as_str()), ("0.0.0.0:9", "lethe-data"));
    for (a, e) in [
        (vec!["serve", "--no-such-flag"], vec![]),
        (vec!["serve"], vec![("LETHE_NO_SUCH_VAR", "1")]),
        (vec!["serve"], vec![("LETHE_MAX_BATCH_SIZE", "many")]),
    ] {
        let env: BTreeMap<String, String> = e
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let a = args(&a);
        assert!(try_parse_serve(&a, &env).is_err(), "{a:?} {env:?} accepted");
    }
}

/// A Dockerfile's instructions: (instruction, rest of line), continuations joined.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => cur.push_str(head),
            None => {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    lines
        .iter()
        .map(|l| {
            let (i, rest) = l.split_once(char::is_whitespace).unwrap();
            (i.to_uppercase(), rest.trim().to_string())
        })
        .collect()
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not a JSON list ({e}): {text}"))
}

/// `K=V K2="V 2"` pairs of an ENV instruction.
fn env_pairs(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (k, v) = rest.split_once('=').expect("ENV K=V");
        let (value, tail) = match v.strip_prefix('"') {
            Some(q) => {
                let end = q.find('"').unwrap();
                (&q[..end], &q[end + 1..])
            }
            None => v.split_once(char::is_whitespace).unwrap_or((v, "")),
        };
        out.push((k.trim().to_string(), value.to_string()));
        rest = tail.trim();
    }
    out
}

#[test]
fn the_dockerfile_runs_lethe_serve_with_flags_it_accepts() {
    let text = read("docker/Dockerfile");
    assert!(
        text.contains("cargo build --release --locked"),
        "the image builds with CI's and the README's command"
    );
    let instructions = dockerfile_instructions(&text);
    let last_from = instructions.iter().rposition(|(i, _)| i == "FROM").unwrap();
    let stage = &instructions[last_from..];
    let all = |name: &str| -> Vec<String> {
        stage
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, r)| r.clone())
            .collect()
    };
    let one = |name: &str| -> String {
        let v = all(name);
        assert_eq!(v.len(), 1, "one {name} in the final stage: {v:?}");
        v[0].clone()
    };
    let env: BTreeMap<String, String> = all("ENV").iter().flat_map(|e| env_pairs(e)).collect();
    assert_eq!(json_list(&one("ENTRYPOINT")), ["lethe"]);
    let (bind, data_dir) = parse_serve(&json_list(&one("CMD")), &env);
    assert_eq!(one("EXPOSE"), port_of(&bind).to_string());
    assert!(bind.starts_with("0.0.0.0:"), "{bind}");
    assert_eq!(json_list(&one("VOLUME")), [data_dir.as_str()]);
    let health = one("HEALTHCHECK");
    assert!(
        health.contains(&format!("127.0.0.1:{}/livez", port_of(&bind))),
        "{health}"
    );
    let user = one("USER");
    assert!(
        user.split(':')
            .all(|p| p.parse::<u32>().is_ok_and(|u| u > 0)),
        "USER must be a numeric non-root uid:gid for runAsNonRoot: {user}"
    );
    // The binary in /usr/local/bin finds the models in ../share/lethe/models (src/loader.rs).
    let copies = all("COPY");
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with("--from=") && c.ends_with(" /usr/local/bin/lethe")),
        "{copies:?}"
    );
    assert!(
        env.contains_key("LETHE_MODELS_DIR")
            || copies
                .iter()
                .any(|c| c == "models /usr/local/share/lethe/models"),
        "{copies:?}"
    );
    // Everything copied from the context exists and is not excluded by .dockerignore.
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    for (_, rest) in instructions.iter().filter(|(i, _)| i == "COPY") {
        let parts: Vec<&str> = rest.split_whitespace().collect();
        if parts[0].starts_with("--from") {
            continue;
        }
        for src in &parts[..parts.len() - 1] {
            assert!(repo().join(src).exists(), "COPY {src}: missing");
            assert!(
                !ignore
                    .iter()
                    .any(|p| src == p || src.starts_with(&format!("{p}/"))),
                "COPY {src} is excluded by .dockerignore"
            );
        }
    }
    // The uid is the one the Kubernetes Deployment runs as.
    let k8s = k8s_objects();
    let pod = &k8s["Deployment"][0]["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"]["runAsUser"].as_u64(),
        Some(user.split(':').next().unwrap().parse().unwrap())
    );
}

/// `environment` of a compose service (map or list form).
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), String::from);
                (k.clone(), v)
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|e| {
                let (k, v) = s(e).split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `KEY=value` lines of an env file.
fn env_file(rel: &str) -> BTreeMap<String, String> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn compose_wires_lethe_prometheus_and_grafana_together() {
    let c = yaml("docker/compose.yaml");
    let services = &c["services"];
    let lethe = &services["lethe"];
    let build = &lethe["build"];
    let context = repo().join("docker").join(s(&build["context"]));
    assert!(context.join(s(&build["dockerfile"])).is_file());
    // The key comes from an untracked env file; its example documents it.
    let files = strings(&lethe["env_file"]);
    assert_eq!(files, ["lethe.env"]);
    assert!(read("docker/.gitignore").lines().any(|l| l == "lethe.env"));
    let mut env = env_file("docker/lethe.env.example");
    assert!(env.contains_key("LETHE_ADMIN_KEY"), "{env:?}");
    env.extend(compose_env(lethe));
    let (bind, data_dir) = parse_serve(&strings(&lethe["command"]), &env);
    let port = port_of(&bind);
    let volumes = strings(&lethe["volumes"]);
    let data = volumes
        .iter()
        .find_map(|v| v.strip_suffix(&format!(":{data_dir}")))
        .unwrap_or_else(|| panic!("no volume at {data_dir}: {volumes:?}"));
    assert!(c["volumes"].get(data).is_some(), "named volume {data}");
    assert!(
        strings(&lethe["ports"])
            .iter()
            .any(|p| p.ends_with(&format!(":{port}"))),
        "container port {port}"
    );
    let health = strings(&lethe["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains(&format!("127.0.0.1:{port}/livez")),
        "{health}"
    );

    // Prometheus: the config and its rule files mounted side by side; it scrapes lethe:PORT.
    let prom = &services["prometheus"];
    let config_path = strings(&prom["command"])
        .iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(String::from))
        .unwrap();
    let config_dir = Path::new(&config_path).parent().unwrap();
    let mounts: BTreeMap<String, String> = strings(&prom["volumes"])
        .iter()
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut it = v.split(':');
            (
                it.nth(1).unwrap().to_string(),
                v.split(':').next().unwrap().to_string(),
            )
        })
        .collect();
    let config = yaml("docker/prometheus/prometheus.yml");
    assert_eq!(mounts[&config_path], "./prometheus/prometheus.yml");
    for f in strings(&config["rule_files"]) {
        let target = config_dir.join(&f).display().to_string();
        assert_eq!(mounts[&target], format!("./prometheus/{f}"), "{f}");
    }
    for src in mounts.values().chain(
        strings(&services["grafana"]["volumes"])
            .iter()
            .filter(|v| v.starts_with("./")),
    ) {
        let src = src.split(':').next().unwrap();
        assert!(repo().join("docker").join(src).exists(), "{src}");
    }
    let job = arr(&config["scrape_configs"])
        .iter()
        .find(|j| j["job_name"] == "lethe")
        .unwrap();
    assert_eq!(
        strings(&job["static_configs"][0]["targets"]),
        [format!("lethe:{port}")]
    );
    assert_eq!(job["metrics_path"], "/metrics");

    // Grafana's datasource is the prometheus service.
    let sources = yaml("docker/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        arr(&sources["datasources"])[0]["url"],
        "http://prometheus:9090"
    );
    // The image compose builds is the one Kubernetes runs.
    let k8s = k8s_objects();
    let container = &k8s["Deployment"][0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], lethe["image"]);
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// Every object in docker/k8s, by kind.
fn k8s_objects() -> BTreeMap<String, Vec<Value>> {
    k8s_objects_in("docker/k8s")
}

/// Every object in the manifests directly in `rel` (a directory of the repository), by kind;
/// each carries its file's name as `_file`.
fn k8s_objects_in(rel: &str) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join(rel)).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            for doc in yaml_docs(&format!("{rel}/{name}")) {
                let kind = s(&doc["kind"]).to_string();
                let mut doc = doc;
                doc["_file"] = json!(name);
                out.entry(kind).or_default().push(doc);
            }
        }
    }
    out
}

/// kustomization.yaml lists every manifest of its directory but the Secret example.
fn assert_kustomization_lists_every_manifest(k: &BTreeMap<String, Vec<Value>>) {
    let listed: BTreeSet<String> = strings(&k["Kustomization"][0]["resources"])
        .into_iter()
        .collect();
    let files: BTreeSet<String> = k
        .values()
        .flatten()
        .map(|o| s(&o["_file"]).to_string())
        .filter(|f| f != "kustomization.yaml" && f != "secret.example.yaml")
        .collect();
    assert_eq!(listed, files);
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().unwrap();
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn the_kubernetes_manifests_fit_lethe_and_each_other() {
    let k = k8s_objects();
    let one = |kind: &str| -> &Value {
        let v = k.get(kind).unwrap_or_else(|| panic!("no {kind}"));
        assert_eq!(v.len(), 1, "one {kind}");
        &v[0]
    };
    let kust = one("Kustomization");
    assert_kustomization_lists_every_manifest(&k);
    let ns = s(&kust["namespace"]);
    assert_eq!(one("Namespace")["metadata"]["name"], ns);

    let dep = one("Deployment");
    let spec = &dep["spec"];
    assert_eq!(spec["replicas"], 1, "one unlearning worker per lineage");
    assert_eq!(spec["strategy"]["type"], "Recreate");
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(labels_match(&spec["selector"]["matchLabels"], pod_labels));
    let pod = &spec["template"]["spec"];
    let containers = arr(&pod["containers"]);
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(s(&c["image"]).starts_with("lethe"));

    // Flags and variables lethe accepts; secrets stand in as placeholders.
    let secret = one("Secret");
    let mut env = BTreeMap::new();
    for e in arr(&c["env"]) {
        let name = s(&e["name"]).to_string();
        let value = match e["valueFrom"]["secretKeyRef"].as_object() {
            Some(r) => {
                assert_eq!(r["name"], secret["metadata"]["name"], "{name}");
                let key = s(&r["key"]);
                assert!(
                    secret["stringData"].get(key).is_some() || secret["data"].get(key).is_some(),
                    "{name}: the Secret has no key {key}"
                );
                "placeholder-from-secret".to_string()
            }
            None => s(&e["value"]).to_string(),
        };
        env.insert(name, value);
    }
    assert!(
        arr(&c["env"])
            .iter()
            .any(|e| e["name"] == "LETHE_ADMIN_KEY" && e["valueFrom"]["secretKeyRef"].is_object()),
        "the admin key comes from a Secret"
    );
    let (bind, data_dir) = parse_serve(&strings(&c["args"]), &env);
    assert!(bind.starts_with("0.0.0.0:"), "{bind}");
    let port = port_of(&bind);
    let http = arr(&c["ports"])
        .iter()
        .find(|p| p["name"] == "http")
        .expect("a port named http");
    assert_eq!(http["containerPort"], port);

    // Probes: startup and liveness on /livez, readiness on /readyz, all on the http port.
    for (probe, path) in [
        ("startupProbe", "/livez"),
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
    ] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"], path, "{probe}");
        assert!(g["port"] == "http" || g["port"] == port, "{probe}: {g}");
    }
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());

    // Non-root, read-only root file system, no capabilities.
    let sc = &c["securityContext"];
    assert!(pod["securityContext"]["runAsNonRoot"] == true || sc["runAsNonRoot"] == true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(strings(&sc["capabilities"]["drop"]).contains(&"ALL".to_string()));

    // The data dir is the PVC.
    let pvc = one("PersistentVolumeClaim");
    assert!(strings(&pvc["spec"]["accessModes"]).contains(&"ReadWriteOnce".to_string()));
    let mount = arr(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == data_dir.as_str())
        .unwrap_or_else(|| panic!("nothing mounted at --data-dir {data_dir}"));
    let volume = arr(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(
        volume["persistentVolumeClaim"]["claimName"],
        pvc["metadata"]["name"]
    );
    // A read-only root needs every other path lethe writes on a volume: HF_HOME included.
    if let Some(hf) = env.get("HF_HOME") {
        assert!(hf.starts_with(&data_dir), "HF_HOME {hf} is not on a volume");
    }

    // The Service selects the pod and names its port http; the ServiceMonitor selects the
    // Service and scrapes that port's /metrics.
    let svc = one("Service");
    assert!(labels_match(&svc["spec"]["selector"], pod_labels));
    let sp = arr(&svc["spec"]["ports"])
        .iter()
        .find(|p| p["name"] == "http")
        .expect("a Service port named http");
    assert!(sp["targetPort"] == "http" || sp["targetPort"] == port);
    let sm = one("ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(labels_match(
        &sm["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"]
    ));
    let ep = &arr(&sm["spec"]["endpoints"])[0];
    assert_eq!(ep["port"], sp["name"]);
    assert_eq!(ep["path"], "/metrics");
    // Prometheus Operator names the job after the Service, as the alert rules expect.
    assert_eq!(svc["metadata"]["name"], "lethe");
    assert!(alert_rules()
        .iter()
        .any(|r| s(&r["expr"]).contains(r#"up{job="lethe"}"#)));
}

// ---------------------------------------------------------------------------------------------
// Fleet mode (docker/compose.fleet.yaml, docker/k8s/fleet)

#[test]
fn the_fleet_compose_file_runs_replicas_on_one_database_and_one_version_volume() {
    let c = yaml("docker/compose.fleet.yaml");
    let services = c["services"].as_object().unwrap();
    let replicas: Vec<&String> = services
        .keys()
        .filter(|k| k.starts_with("lethe-"))
        .collect();
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    assert!(read("docker/.gitignore").lines().any(|l| l == "fleet.env"));
    let (mut caches, mut stores, mut targets) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
    for name in &replicas {
        let r = &services[name.as_str()];
        assert_eq!(
            strings(&r["env_file"]),
            ["lethe.env", "fleet.env"],
            "{name}"
        );
        let mut env = env_file("docker/lethe.env.example");
        env.extend(env_file("docker/fleet.env.example"));
        env.extend(compose_env(r));
        let p = try_parse_serve(&strings(&r["command"]), &env).unwrap_or_else(|e| panic!("{e}"));
        let db = p.database_url.expect("--database-url");
        assert!(db.contains("@postgres:5432/"), "{name}: {db}");
        let versions = p.versions_url.expect("--versions-url");
        let dir = versions
            .strip_prefix("file://")
            .expect("a file:// version store");
        let volumes = strings(&r["volumes"]);
        let at = |path: &str| {
            volumes
                .iter()
                .find_map(|v| v.strip_suffix(&format!(":{path}")).map(String::from))
                .unwrap_or_else(|| panic!("{name}: no volume at {path}: {volumes:?}"))
        };
        stores.insert(at(dir));
        caches.insert(at(&p.data_dir));
        assert!(
            r["depends_on"]["postgres"]["condition"] == "service_healthy",
            "{name}"
        );
        targets.push(format!("{name}:{}", port_of(&p.bind)));
    }
    assert_eq!(stores.len(), 1, "one shared version volume: {stores:?}");
    assert_eq!(caches.len(), 3, "a cache per replica: {caches:?}");
    for v in stores.iter().chain(&caches) {
        assert!(c["volumes"].get(v).is_some(), "named volume {v}");
    }
    // The database's password is the one in the URL (both from fleet.env).
    let fleet_env = env_file("docker/fleet.env.example");
    let pg = &services["postgres"];
    assert_eq!(strings(&pg["env_file"]), ["fleet.env"]);
    let user = s(&pg["environment"]["POSTGRES_USER"]);
    let db = s(&pg["environment"]["POSTGRES_DB"]);
    assert_eq!(
        fleet_env["LETHE_DATABASE_URL"],
        format!(
            "postgres://{user}:{}@postgres:5432/{db}",
            fleet_env["POSTGRES_PASSWORD"]
        )
    );
    // Prometheus scrapes every replica.
    let prom = &services["prometheus"];
    assert!(strings(&prom["volumes"])
        .contains(&"./prometheus/prometheus.fleet.yml:/etc/prometheus/prometheus.yml:ro".into()));
    let config = yaml("docker/prometheus/prometheus.fleet.yml");
    let job = &arr(&config["scrape_configs"])[0];
    assert_eq!(strings(&job["static_configs"][0]["targets"]), targets);
    if let Some(out) = tool(
        "promtool",
        &[
            "check",
            "config",
            &repo()
                .join("docker/prometheus/prometheus.fleet.yml")
                .display()
                .to_string(),
        ],
    ) {
        assert_ok("promtool check config prometheus.fleet.yml", &out);
    }
}

#[test]
fn the_fleet_kubernetes_manifests_run_n_replicas_on_the_shared_database_and_volume() {
    let k = k8s_objects_in("docker/k8s/fleet");
    let one = |kind: &str| -> &Value { &k[kind][0] };
    assert_kustomization_lists_every_manifest(&k);
    let spec = &one("Deployment")["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2, "several replicas");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &spec["template"]["spec"];
    let c = &arr(&pod["containers"])[0];
    let mut env = BTreeMap::new();
    for e in arr(&c["env"]) {
        let name = s(&e["name"]).to_string();
        let value = match e["valueFrom"]["secretKeyRef"].as_object() {
            Some(r) if name == "LETHE_DATABASE_URL" => {
                // The URL comes from the lethe-db Secret whose example holds key `url`.
                let secret = one("Secret");
                assert_eq!(r["name"], secret["metadata"]["name"]);
                s(&secret["stringData"][s(&r["key"])]).to_string()
            }
            Some(_) => "placeholder-from-secret".to_string(),
            None => s(&e["value"]).to_string(),
        };
        env.insert(name, value);
    }
    let p = try_parse_serve(&strings(&c["args"]), &env).unwrap_or_else(|e| panic!("{e}"));
    assert!(p.database_url.is_some_and(|u| u.starts_with("postgres://")));
    let versions = p.versions_url.expect("--versions-url");
    let mount = |path: &str| {
        let m = arr(&c["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        arr(&pod["volumes"])
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap()
            .clone()
    };
    // The version store is the ReadWriteMany claim; the data dir a per-pod cache.
    let shared = mount(versions.strip_prefix("file://").unwrap());
    let pvc = one("PersistentVolumeClaim");
    assert_eq!(
        shared["persistentVolumeClaim"]["claimName"],
        pvc["metadata"]["name"]
    );
    assert!(strings(&pvc["spec"]["accessModes"]).contains(&"ReadWriteMany".to_string()));
    assert!(mount(&p.data_dir)["emptyDir"].is_object());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
}
