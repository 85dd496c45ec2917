//! The `lethe` binary end to end on the tiny fixtures: `score --json` prints one object per
//! line with the documented fields (and agrees with the library), `generate` continues a
//! prompt, `inspect` describes the model, and bad input fails with a message naming it.

mod common;

use std::process::Command;

use common::fixture_dir;

fn lethe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("the lethe binary runs")
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
    use std::io::{BufRead, BufReader, Read, Write};
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
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
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        rest
    });
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
    let log = drain.join().unwrap();
    assert!(status.success(), "exit status {status:?}; stderr:\n{log}");
}
