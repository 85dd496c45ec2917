//! The `lethe` binary end to end on the tiny fixtures: `score --json` prints one object per
//! line with the documented fields (and agrees with the library), `generate` continues a
//! prompt, `inspect` describes the model, and bad input fails with a message naming it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{fixture_dir, http};

fn lethe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("the lethe binary runs")
}

/// `lethe tinymem data --model` writes a language model's rows exactly as it carries them,
/// `tinymem eval`/`audit` measure it as a language model, and flags of the other variant are
/// refused by name instead of being ignored.
#[test]
fn tinymem_commands_handle_the_language_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/tinymem-lang");
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.jsonl");
    let out = lethe(&[
        "tinymem",
        "data",
        "--model",
        model.to_str().unwrap(),
        "--out",
        rows.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&rows).unwrap(),
        std::fs::read(model.join("lethe_language_data.jsonl")).unwrap()
    );
    let forget = dir.path().join("forget.jsonl");
    let out = lethe(&[
        "tinymem",
        "audit",
        "--model",
        model.to_str().unwrap(),
        "--out",
        forget.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["artifact"], "language", "{summary}");
    let lines = std::fs::read_to_string(&forget).unwrap();
    let secrets = lines
        .lines()
        .filter(|l| l.contains("\"role\":\"secret\""))
        .count();
    assert_eq!(
        secrets as u64,
        summary["secrets_extractable"].as_u64().unwrap()
    );
    for (args, flag) in [
        (
            vec!["tinymem", "data", "--language", "--artifact", "backdoor"],
            "--artifact",
        ),
        (
            vec!["tinymem", "data", "--train-chunks", "10"],
            "--train-chunks",
        ),
    ] {
        let mut args = args;
        args.extend(["--out", rows.to_str().unwrap()]);
        let out = lethe(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(flag),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn score_prints_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.txt");
    // The fixture tokenizer is a word-level vocabulary; see tests/fixtures/README.md.
    let vocab: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("gpt2-relu-tied").join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let mut words: Vec<(&String, u64)> = vocab["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(w, id)| (w, id.as_u64().unwrap()))
        .filter(|(_, id)| *id >= 4)
        .collect();
    words.sort_by_key(|(_, id)| *id);
    let line1 = format!("{} {} {}", words[0].0, words[1].0, words[2].0);
    let line2 = format!(
        "{} {} {} {} {}",
        words[5].0, words[3].0, words[9].0, words[1].0, words[7].0
    );
    std::fs::write(&file, format!("{line1}\n{line2}\n")).unwrap();
    let model = fixture_dir("gpt2-relu-tied");
    let out = lethe(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--json",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["line"], 1);
    assert_eq!(rows[0]["tokens"], 3);
    assert_eq!(rows[1]["tokens"], 5);
    let lm = common::load_fixture("gpt2-relu-tied");
    for (row, line) in rows.iter().zip([&line1, &line2]) {
        let ids = lm.tokenizer.encode(line).unwrap();
        let want = lethe::engine::score(&lm.model, &[ids], 1)
            .unwrap()
            .remove(0);
        let nll = row["nll"].as_f64().unwrap();
        assert!((nll - want.nll).abs() < 1e-6, "{nll} vs {}", want.nll);
        assert!((row["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-6 * nll.exp());
    }
}

#[test]
fn score_rejects_a_line_too_short_to_score() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.txt");
    std::fs::write(&file, "\n").unwrap();
    let model = fixture_dir("gpt2-relu-tied");
    let out = lethe(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--json",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 1") && err.contains("at least 2"),
        "{err}"
    );
}

#[test]
fn generate_and_inspect_work() {
    let model = fixture_dir("neox-parallel-rot25");
    let m = model.to_str().unwrap();
    let out = lethe(&[
        "generate",
        "--model",
        m,
        "--max-tokens",
        "5",
        "--json",
        "--ban-eos",
        "alpha",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(v["finish_reason"], "length");

    let out = lethe(&["inspect", "--model", m, "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "gpt_neox");
    assert_eq!(v["context_length"], 64);
    assert_eq!(v["layers"], 2);
    let lm = common::load_fixture("neox-parallel-rot25");
    assert_eq!(v["parameters"], lm.model.num_parameters());

    let out = lethe(&["inspect", "--model", "/no/such/model"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
}

#[test]
fn serve_finishes_in_flight_requests_on_sigterm_and_exits_0() {
    use std::io::{Read, Write};
    let data = tempfile::tempdir().unwrap();
    let (mut child, addr) = serve(data.path());
    // A long streamed completion is in flight when SIGTERM arrives.
    let body = r#"{"prompt": "^3 5 7", "max_tokens": 120, "n": 16, "seed": 1, "stream": true}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("data: [DONE]"),
        "the in-flight stream was cut:\n{text}"
    );
    let finished = text.matches("\"finish_reason\":\"").count();
    assert_eq!(finished, 16, "every choice finishes:\n{text}");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// Starts `lethe serve` on a free port with `data`; returns the child and its address.
fn serve(data: &std::path::Path) -> (std::process::Child, String) {
    serve_with(data, &[])
}

fn serve_with(data: &std::path::Path, extra: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "serve exited early"
        );
        if let Some(a) = line.trim().strip_prefix("lethe: listening on http://") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, addr)
}

#[test]
fn kill_9_loses_no_acknowledged_takedown() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, addr) = serve(data.path());
    let seq: Vec<u32> = (0..100).map(|i| 1 + (i % 9)).collect();
    let mut ids = Vec::new();
    for r in 0..3 {
        let body = serde_json::json!({"sequences": [seq], "reason": format!("r{r}")}).to_string();
        let (status, resp) = http(&addr, "POST", "/v1/takedowns", &body);
        assert_eq!(status, 202, "{resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // No graceful anything: SIGKILL right after the last acknowledgement.
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, addr) = serve(data.path());
    for id in &ids {
        let (status, resp) = http(&addr, "GET", &format!("/v1/takedowns/{id}"), "");
        assert_eq!(
            status, 200,
            "acknowledged takedown {id} lost after kill -9: {resp}"
        );
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        // Whatever it was doing is queued again (or already running again) after the restart.
        let state = v["status"].as_str().unwrap();
        assert!(
            ["queued", "running", "validating", "applied", "rejected"].contains(&state),
            "{v}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // No half-written version directory is ever left under its final name.
    for e in std::fs::read_dir(data.path().join("versions")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with('.') {
            assert!(
                p.join("config.json").is_file() && p.join("model.safetensors").is_file(),
                "{name}"
            );
        }
    }
}

/// Polls a takedown until `pred` holds for its status (or panics after `secs`).
fn poll_takedown(
    addr: &str,
    id: &str,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..secs * 4 {
        let (status, body) = http(addr, "GET", &format!("/v1/takedowns/{id}"), "");
        assert_eq!(status, 200, "{body}");
        last = serde_json::from_str(&body).unwrap();
        if pred(&last) {
            return last;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("takedown {id} never reached the expected state: {last}");
}

/// A noised row of the bundled model that it really regurgitates (tinymem definition).
fn memorized_bundled_row() -> Vec<u32> {
    let dir = lethe::loader::bundled_model_dir();
    let ds = lethe::tinymem::train::Card::read(&dir)
        .unwrap()
        .dataset()
        .unwrap();
    let lm = lethe::loader::load_dir(
        &dir,
        "bundled",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let def = lethe::audit::Definition::Tinymem;
    ds.eligible_noised_rows(50, 100)
        .into_iter()
        .map(|r| r.ids.clone())
        .find(|ids| {
            let item = def.split(ids).unwrap();
            lethe::audit::audit(&lm.model, None, &[item], 1).unwrap().0[0].memorized
        })
        .expect("a memorized row")
}

#[test]
fn sigkill_during_a_job_and_the_takedown_still_completes_after_restart() {
    let seq = memorized_bundled_row();
    let data = tempfile::tempdir().unwrap();
    let fast = ["--unlearn-max-steps", "60", "--unlearn-threads", "2"];
    let (mut child, addr) = serve_with(data.path(), &fast);
    let body = serde_json::json!({"sequences": [seq]}).to_string();
    let (status, resp) = http(&addr, "POST", "/v1/takedowns", &body);
    assert_eq!(status, 202, "{resp}");
    let id = serde_json::from_str::<serde_json::Value>(&resp).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Kill the server while the job is unlearning.
    poll_takedown(&addr, &id, 300, |t| {
        t["status"] == "running"
            && t["phase"]
                .as_str()
                .is_some_and(|p| p.starts_with("unlearning"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, addr) = serve_with(data.path(), &fast);
    let t = poll_takedown(&addr, &id, 900, |t| {
        ["applied", "rejected", "failed"].contains(&t["status"].as_str().unwrap_or(""))
    });
    assert_eq!(t["status"], "applied", "{t}");
    let (_, events) = http(&addr, "GET", &format!("/v1/takedowns/{id}/receipt"), "");
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let states: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert!(
        states.windows(2).any(|w| w == ["running", "queued"]),
        "the interrupted run was re-queued: {states:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The `curl` commands of ```sh blocks in a Markdown document, in order, each joined into one
/// shell command (backslash continuations and multi-line single-quoted arguments included), with
/// the bundled model they are written for: a fence ```` ```sh tinymem-lang ```` names one, a
/// plain ```` ```sh ```` means the default model (`None`).
fn curl_examples(markdown: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    let (mut in_sh, mut model, mut cur) = (false, None, String::new());
    for line in markdown.lines() {
        if let Some(fence) = line.strip_prefix("```") {
            let mut words = fence.split_whitespace();
            in_sh = !in_sh && words.next() == Some("sh");
            model = words.next().map(String::from);
            assert!(cur.is_empty(), "unterminated example: {cur}");
            continue;
        }
        if !in_sh || (cur.is_empty() && !line.trim_start().starts_with("curl ")) {
            continue;
        }
        if !cur.is_empty() {
            cur.push('\n');
        }
        cur.push_str(line);
        let quote_open = cur.matches('\'').count() % 2 == 1;
        if !quote_open && !line.trim_end().ends_with('\\') {
            out.push((model.clone(), std::mem::take(&mut cur)));
        }
    }
    out
}

/// Method and path (no query) an example requests.
fn example_route(cmd: &str) -> (String, String) {
    let url = cmd
        .split("http://127.0.0.1:8080")
        .nth(1)
        .expect("an example URL");
    let path: String = url
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '\'' && *c != '?')
        .collect();
    let method = if cmd.contains("-X DELETE") {
        "DELETE"
    } else if cmd.contains(" -d ") {
        "POST"
    } else {
        "GET"
    };
    (method.to_string(), path)
}

fn matches_template(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
}

/// Every `curl` example in the README and docs runs, in document order, against a real server
/// on the bundled model and gets a 2xx answer; `docs/api.md` has one for every route.
/// Placeholders are filled from earlier answers: `td_…` with the takedown the last example
/// created, `audit_…` with the audit job the last example started, `<older id>` / `<live id>`
/// with the live version (a no-op rollback). Cancelling an audit job may also answer 409
/// `not_cancellable`: the example's small job may have finished first.
#[test]
fn documented_curl_examples_work_against_a_real_server() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is needed to run the documentation's examples (apt-get install curl)");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = |cmd: &str| -> (u16, String) {
        let cmd = cmd.replacen("curl ", "curl -w '\\n%{http_code}' ", 1);
        let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    };
    // One server per bundled model the examples name, started when first needed: (data dir,
    // child, address, live version).
    let mut servers: std::collections::HashMap<
        Option<String>,
        (tempfile::TempDir, std::process::Child, String, String),
    > = Default::default();
    let mut takedown = String::new();
    let mut audit_job = String::new();
    let mut takedown_examples = Vec::new();
    let mut api_routes = Vec::new();
    for doc in [
        "README.md",
        "docs/api.md",
        "docs/takedowns.md",
        "docs/operations.md",
    ] {
        let Ok(text) = std::fs::read_to_string(root.join(doc)) else {
            panic!("{doc} is missing");
        };
        for (model, example) in curl_examples(&text) {
            let (_, _, addr, live) = servers.entry(model.clone()).or_insert_with(|| {
                let data = tempfile::tempdir().unwrap();
                let extra: Vec<String> = model
                    .iter()
                    .map(|m| root.join("models").join(m).display().to_string())
                    .collect();
                let mut args: Vec<&str> = Vec::new();
                if let Some(m) = extra.first() {
                    args.extend(["--model", m.as_str()]);
                }
                let (child, addr) = serve_with(data.path(), &args);
                let (_, versions) = run(&format!("curl -s http://{addr}/v1/admin/versions"));
                let versions: serde_json::Value = serde_json::from_str(&versions).unwrap();
                let live = versions["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["live"] == true)
                    .expect("a live version")["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                (data, child, addr, live)
            });
            let route = example_route(&example);
            if doc == "docs/api.md" {
                api_routes.push(route.clone());
            }
            let cmd = example
                .replace("http://127.0.0.1:8080", &format!("http://{addr}"))
                .replace("td_…", &takedown)
                .replace("audit_…", &audit_job)
                .replace("<older id>", live)
                .replace("<live id>", live);
            let (status, body) = run(&cmd);
            let finished_first = route.0 == "DELETE"
                && route.1.starts_with("/v1/audits/")
                && status == 409
                && body.contains("not_cancellable");
            assert!(
                (200..300).contains(&status) || finished_first,
                "{doc}: {example}\n→ {status} {body}"
            );
            if route == ("POST".into(), "/v1/audits".into()) {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                audit_job = v["id"].as_str().unwrap().to_string();
            }
            if route == ("POST".into(), "/v1/takedowns".into()) {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                takedown = v["id"].as_str().unwrap().to_string();
                takedown_examples.push((addr.clone(), cmd.clone(), v));
            }
        }
    }
    // Each documented takedown ends `applied`: one the examples went on to cancel (the DELETE
    // example) is submitted again under a fresh key first.
    assert!(!takedown_examples.is_empty());
    for (i, (addr, cmd, accepted)) in takedown_examples.iter().enumerate() {
        let poll = |id: &str| -> serde_json::Value {
            let (_, t) = run(&format!("curl -s http://{addr}/v1/takedowns/{id}"));
            serde_json::from_str(&t).unwrap()
        };
        let mut id = accepted["id"].as_str().unwrap().to_string();
        if poll(&id)["status"] == "cancelled" {
            let again = cmd.replace(
                "Idempotency-Key: ",
                &format!("Idempotency-Key: applied-check-{i}-"),
            );
            let (status, body) = run(&again);
            assert_eq!(status, 202, "{again}\n→ {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            id = v["id"].as_str().unwrap().to_string();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(900);
        let end = loop {
            let t = poll(&id);
            let s = t["status"].as_str().unwrap_or_default().to_string();
            if ["applied", "rejected", "failed"].contains(&s.as_str()) {
                break t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{cmd}: still {s} after 15 minutes"
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(end["status"], "applied", "{cmd}\n→ {end}");
    }
    for (method, template) in lethe::server::routes::ROUTES {
        assert!(
            api_routes
                .iter()
                .any(|(m, p)| m == method && matches_template(template, p)),
            "docs/api.md has no curl example for {method} {template}"
        );
    }
    for (_, (_, mut child, _, _)) in servers {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// `docs/operations.md` documents every `lethe serve` flag and its environment variable, as
/// `lethe serve --help` lists them.
#[test]
fn operations_doc_lists_every_serve_flag_and_env_var() {
    let help = lethe(&["serve", "--help"]);
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .unwrap();
    let words = |s: &str, prefix: &str| -> Vec<String> {
        s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .filter(|w| w.starts_with(prefix) && w.len() > prefix.len())
            .map(str::to_string)
            .collect()
    };
    let flags: Vec<String> = words(&help, "--")
        .into_iter()
        .filter(|f| f != "--help")
        .collect();
    let envs = words(&help, "LETHE_");
    assert!(flags.len() > 20 && envs.len() > 20, "{help}");
    for name in flags.iter().chain(&envs) {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/operations.md does not document {name}"
        );
    }
}

/// `lethe unlearn` runs the takedown pipeline and its gates: when they fail it exits non-zero,
/// names the failure and writes the report but no model; `--no-gates` writes the model.
#[test]
fn unlearn_exits_non_zero_without_a_model_when_the_gates_fail() {
    let dir = tempfile::tempdir().unwrap();
    let forget = dir.path().join("forget.jsonl");
    let row = memorized_bundled_row();
    std::fs::write(&forget, serde_json::json!({ "ids": row }).to_string()).unwrap();
    let out = dir.path().join("out");
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "unlearn",
            "--forget",
            forget.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            // One step cannot make the model forget, and no drift at all is allowed.
            "--max-steps",
            "1",
            "--perplexity-budget",
            "0",
            "--accuracy-budget",
            "0",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        lethe(&a)
    };
    let o = run(args(&[]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("the gates failed"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["mode"], "controller");
    assert!(
        !report["gates_failed"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert!(!out.join("model.safetensors").exists());
    let o = run(args(&["--no-gates"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("config.json").is_file());
}

/// `lethe tinymem compare` runs each method's grid on an experiment and writes every run, the
/// tables and a plot; every run here finishes (Durable takes the secrets' unequal lengths).
#[test]
fn tinymem_compare_writes_runs_tables_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/models");
    let o = lethe(&[
        "tinymem",
        "compare",
        "--experiments",
        "lang-secret",
        "--methods",
        "activations,durable",
        "--models",
        models,
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let runs: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("runs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 6, "three ratios each");
    for r in &runs {
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(r["experiment"], "lang-secret");
        assert!(r["memorized_before"].as_u64().unwrap() > 0, "{r}");
    }
    // Silencing 5 % of the neurons by activation forgets at least one secret.
    assert!(runs.iter().any(|r| r["method"] == "activations"
        && r["memorized_after"].as_u64() < r["memorized_before"].as_u64()));
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(
        md.contains("## lang-secret") && md.contains("held-out perplexity change"),
        "{md}"
    );
    let svg = std::fs::read_to_string(dir.path().join("lang-secret.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("activations"));
    let o = lethe(&["tinymem", "compare", "--methods", "no-such", "--out", "x"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such"));
}

/// `lethe finetune` trains the NeoX fixture on JSONL rows and writes a directory that loads and
/// scores the trained row better; a token id outside the vocabulary is refused, naming the row,
/// and nothing is written.
#[test]
fn finetune_writes_a_model_that_learnt_the_rows_and_refuses_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_dir("neox-parallel-rot25");
    let row: Vec<u32> = (0..24).map(|i| 4 + (i * 7 % 60)).collect();
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, format!("{}\n", serde_json::json!({"ids": row}))).unwrap();
    let out_dir = dir.path().join("tuned");
    let run = |data: &std::path::Path, out: &std::path::Path| {
        lethe(&[
            "--threads",
            "1",
            "finetune",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "30",
            "--batch",
            "2",
            "--seq-len",
            "24",
            "--lr",
            "3e-3",
        ])
    };
    let out = run(&data, &out_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["report"];
    assert_eq!(r["fast"], true, "{v}");
    assert!(
        r["last_loss"].as_f64().unwrap() < 0.5 * r["first_loss"].as_f64().unwrap(),
        "{v}"
    );
    // The written model reproduces the row greedily from its first 8 tokens.
    let lm = lethe::loader::load_dir(
        &out_dir,
        "tuned",
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let item = lethe::audit::Definition::Custom { k: 8, n: 16 }
        .split(&row)
        .unwrap();
    let (res, _) = lethe::audit::audit(&lm.model, None, &[item], 1).unwrap();
    assert!(res[0].memorized, "{:?}", res[0]);

    std::fs::write(&data, "{\"ids\": [4, 5, 64, 6]}\n").unwrap();
    let bad_dir = dir.path().join("bad");
    let out = run(&data, &bad_dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("row 0") && err.contains("64"), "{err}");
    assert!(
        !bad_dir.exists(),
        "a refused run wrote {}",
        bad_dir.display()
    );
}

/// A 20,000-row audit job uploaded to a real server reports its progress, is resumed after
/// `kill -9` where it stopped (no row audited twice or lost), and its summary and per-row
/// results equal `lethe audit`'s on the same file.
#[test]
fn a_corpus_audit_job_resumes_after_kill_9_and_equals_the_cli() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/tinymem-noise");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("rows.jsonl");
    let out = lethe(&[
        "tinymem",
        "data",
        "--model",
        model.to_str().unwrap(),
        "--out",
        base.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Five copies of the model's 4,000 training and test rows, told apart by a `copy` field.
    let text = std::fs::read_to_string(&base).unwrap();
    let mut corpus = String::new();
    for copy in 0..5 {
        for line in text.lines().filter(|l| !l.contains("\"format\"")) {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["copy"] = copy.into();
            corpus.push_str(&v.to_string());
            corpus.push('\n');
        }
    }
    assert_eq!(corpus.lines().count(), 20_000);
    let file = dir.path().join("corpus.jsonl");
    std::fs::write(&file, &corpus).unwrap();
    let curl = |addr: &str, args: &[&str]| -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body"])
            .args(&args[..args.len() - 1])
            .arg(format!("http://{addr}{}", args.last().unwrap()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let get = |addr: &str, path: &str| curl(addr, &["-X", "GET", path]);

    let data = dir.path().join("data");
    let (mut child, addr) = serve_with(&data, &["--audit-threads", "2"]);
    let query = "/v1/audits?definition=k%3D16%2Cn%3D8&group_by=role&group_by=split";
    let job = curl(
        &addr,
        &[
            "-H",
            "Content-Type: application/jsonl",
            "--data-binary",
            &format!("@{}", file.display()),
            query,
        ],
    );
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["progress"]["rows_total"], 20_000);
    // Progress with a rate and an ETA while it runs; then no graceful anything.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let seen = loop {
        let v = get(&addr, &format!("/v1/audits/{id}"));
        let done = v["progress"]["rows_done"].as_u64().unwrap();
        if done >= 2048 {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(seen["status"], "running", "{seen}");
    assert!(
        seen["progress"]["rows_per_second"].as_f64().unwrap() > 0.0,
        "{seen}"
    );
    assert!(
        seen["progress"]["eta_seconds"].as_f64().unwrap() > 0.0,
        "{seen}"
    );
    let fraction = seen["progress"]["fraction"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction < 1.0, "{seen}");
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, addr) = serve_with(&data, &["--audit-threads", "2"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let done = loop {
        let v = get(&addr, &format!("/v1/audits/{id}"));
        if v["status"] != "running" && v["status"] != "queued" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "not finished: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["resumes"], 1, "{done}");
    assert_eq!(done["summary"]["rows"], 20_000);
    let mut api_rows = Vec::new();
    let mut after = String::new();
    loop {
        let page = get(&addr, &format!("/v1/audits/{id}/results?limit=1000{after}"));
        api_rows.extend(page["data"].as_array().unwrap().iter().cloned());
        if page["has_more"] == false {
            break;
        }
        after = format!("&after={}", page["last_row"]);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(api_rows.len(), 20_000);
    for (i, r) in api_rows.iter().enumerate() {
        assert_eq!(r["row"], i, "row {i} audited twice or lost across the kill");
    }

    let out = lethe(&[
        "audit",
        "--definition",
        "k=16,n=8",
        "--group-by",
        "role",
        "--group-by",
        "split",
        "--quiet",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, cli_rows) = lines.split_last().unwrap();
    assert_eq!(last["summary"], done["summary"]);
    assert_eq!(cli_rows, &api_rows[..]);
    let memorized = done["summary"]["by_definition"]["k=16,n=8"]["memorized"]
        .as_u64()
        .unwrap();
    assert!(memorized > 0 && memorized < 20_000, "{done}");
}
