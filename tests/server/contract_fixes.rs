//! Issue #14, the API contract: the server and `api/openapi.yaml` agree on the inputs contract
//! fuzzing found them disagreeing on, query values are percent-decoded, characters outside the
//! vocabulary are named instead of dropped, and a huge number at any numeric field is a 400
//! naming the field. Every response is validated against the contract by [`send`].

use std::path::Path;

use super::*;

/// A server with takedowns under `dir`; the worker is not started (nothing is unlearned).
fn takedowns_state(dir: &Path) -> web::Data<AppState> {
    super::takedowns::takedown_state(dir, false, |_| {})
}

/// Whether `body` is valid for the request schema of `POST path` in the contract.
fn contract_accepts(path: &str, body: &Value) -> bool {
    let pointer = format!(
        "/paths/{}/post/requestBody/content/application~1json/schema",
        path.replace('/', "~1")
    );
    contract().is_valid(&pointer, body)
}

/// A 400 naming `param`, with a message saying more than the field's name.
fn assert_names(r: &Resp, param: &str, what: &str) -> String {
    let e = r.error(400);
    assert_eq!(e["param"], param, "{what}: {e}");
    assert_eq!(e["type"], "invalid_request_error", "{what}: {e}");
    e["message"].as_str().unwrap().to_string()
}

#[actix_web::test]
async fn characters_outside_the_vocabulary_are_named_with_their_position() {
    let app = at::init_service(make_app(state())).await;
    // Was 200 with `"tokens": []`: the character vanished.
    let r = post(&app, "/v1/tokenize", json!({"prompt": "Ú"})).await;
    let m = assert_names(&r, "prompt", "tokenize Ú");
    assert!(m.contains("'Ú'") && m.contains("position 0"), "{m}");
    let r = post(&app, "/v1/tokenize", json!({"prompt": "^12 -5 7"})).await;
    let m = assert_names(&r, "prompt", "tokenize minus");
    assert!(m.contains("'-'") && m.contains("position 4"), "{m}");
    // Text in the vocabulary still tokenizes, and "" is zero tokens.
    let r = post(&app, "/v1/tokenize", json!({"prompt": "^1 2$"})).await;
    assert_eq!(r.json()["tokens"], json!([10, 1, 12, 2, 11]));
    let r = post(&app, "/v1/tokenize", json!({"prompt": ""})).await;
    assert_eq!(r.json()["count"], 0);
    // Completions and audits share the path: the prompt is refused, not shortened.
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": "^1840 1847 x", "max_tokens": 1}),
    )
    .await;
    let m = assert_names(&r, "prompt", "completions");
    assert!(m.contains("'x'") && m.contains("position 11"), "{m}");
    // In a list of prompts, the one at fault is named.
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": ["^1 2", "^3 x"], "max_tokens": 1}),
    )
    .await;
    let m = assert_names(&r, "prompt[1]", "completions list");
    assert!(m.contains("'x'") && m.contains("position 3"), "{m}");
    let long = PROMPT.to_string() + " 1910 1917 1924 1931 1938";
    for (seq, param) in [
        (json!(format!("{long}é")), "sequences[0]"),
        (json!({"text": format!("{long}\n")}), "sequences[0].text"),
    ] {
        let r = post(
            &app,
            "/v1/audit",
            json!({"definition": "k=10,n=5", "sequences": [seq]}),
        )
        .await;
        let m = assert_names(&r, param, "audit");
        assert!(m.contains("position 75"), "{m}");
    }
}

#[actix_web::test]
async fn takedown_list_queries_are_percent_decoded_and_bad_ones_name_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let app = at::init_service(make_app(takedowns_state(dir.path()))).await;
    let seq = PROMPT.to_string() + " 1910 1917 1924 1931 1939";
    let r = post(
        &app,
        "/v1/takedowns",
        json!({"sequences": [seq], "definition": "k=10,n=5"}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    // `app%6Cied` is `applied`: was a 400 "unknown state".
    let r = get(&app, "/v1/takedowns?status=app%6Cied").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["data"], json!([]));
    let r = get(&app, "/v1/takedowns?status=%71ueued&limit=%31").await;
    assert_eq!(r.json()["data"][0]["id"], id.as_str());
    let r = get(&app, &format!("/v1/takedowns?after={id}")).await;
    assert_eq!(r.json()["data"], json!([]));
    let r = get(&app, &format!("/v1/takedowns/{id}?include=sequence%73")).await;
    assert_eq!(r.json()["sequences"][0].as_array().unwrap().len(), 75);
    // `after=` answered 404, which the contract does not list for this route.
    for (q, param) in [
        ("after=", "after"),
        ("after=td_nothing", "after"),
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=1e300", "limit"),
        ("limit=18446744073709551615", "limit"),
        ("limit=18446744073709551616", "limit"),
        ("status=app%6Cie", "status"),
        ("status=queued&status=failed", "status"),
        ("bogus=1", "bogus"),
    ] {
        let r = get(&app, &format!("/v1/takedowns?{q}")).await;
        assert_names(&r, param, q);
    }
    let r = get(&app, &format!("/v1/takedowns/{id}?include=everything")).await;
    assert_names(&r, "include", "include");
}

#[actix_web::test]
async fn the_contract_and_the_server_agree_on_the_inputs_fuzzing_found() {
    let dir = tempfile::tempdir().unwrap();
    let app = at::init_service(make_app(takedowns_state(dir.path()))).await;
    // `null` for an optional field is the same as leaving it out, in the contract too.
    for (path, body) in [
        ("/v1/tokenize", json!({"prompt": "^1", "model": null})),
        ("/v1/detokenize", json!({"tokens": [1], "model": null})),
        (
            "/v1/completions",
            json!({"prompt": "^1", "model": null, "max_tokens": null, "n": null, "seed": null,
                   "temperature": null, "stream": null, "stream_options": null, "user": null}),
        ),
        (
            "/v1/audit",
            json!({"sequences": [vec![5u32; 100]], "definition": null, "model": null}),
        ),
    ] {
        assert!(contract_accepts(path, &body), "{path} {body}");
        let r = post(&app, path, body.clone()).await;
        assert_eq!(
            r.status,
            200,
            "{path} {body}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // Empty prompts and audit sequences: the contract says what the server does (400).
    for (path, body, param) in [
        ("/v1/completions", json!({"prompt": ""}), "prompt[0]"),
        (
            "/v1/completions",
            json!({"prompt": ["^1", ""]}),
            "prompt[1]",
        ),
        ("/v1/completions", json!({"prompt": [[1], []]}), "prompt[1]"),
        ("/v1/audit", json!({"sequences": [""]}), "sequences[0]"),
        ("/v1/audit", json!({"sequences": [[]]}), "sequences[0]"),
        ("/v1/audit", json!({"sequences": [{}]}), "sequences[0]"),
        ("/v1/takedowns", json!({"sequences": [""]}), "sequences"),
    ] {
        assert!(!contract_accepts(path, &body), "{path} {body}");
        assert_names(&post(&app, path, body.clone()).await, param, path);
    }
    // A float token id (JSON Schema counts 1.0 as an integer) or an id past the vocabulary: a
    // 400 naming the element, as the contract's TokenId says.
    for tokens in [json!([1000000001.0]), json!([1.0]), json!([1000000001])] {
        let r = post(&app, "/v1/detokenize", json!({"tokens": tokens})).await;
        let m = assert_names(&r, "tokens[0]", "detokenize");
        assert!(m.contains("not a token id"), "{m}");
    }
    // A takedown sequence shorter than k + n ("0" is one token): a 400 naming `sequences`.
    let r = post(&app, "/v1/takedowns", json!({"sequences": ["0"]})).await;
    let m = assert_names(&r, "sequences", "short takedown");
    assert!(m.contains("fewer than k + n"), "{m}");
}

#[actix_web::test]
async fn huge_numbers_at_every_numeric_field_are_a_400_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let app = at::init_service(make_app(takedowns_state(dir.path()))).await;
    let huge = [
        json!(18446744073709551615u64),
        json!(1e300),
        json!(-1),
        json!(18446744073709551616.0),
    ];
    let seq = json!(PROMPT.to_string() + " 1910 1917 1924 1931 1939");
    for h in &huge {
        let mut cases = vec![];
        for field in ["temperature", "top_p", "n", "logprobs", "max_tokens"] {
            let mut body = json!({"prompt": "^1 2", "max_tokens": 1});
            body[field] = h.clone();
            cases.push(("/v1/completions", body, field.to_string()));
        }
        if h != &json!(18446744073709551615u64) {
            // u64::MAX is a valid top_k (no restriction) and fits no seed.
            let mut body = json!({"prompt": "^1 2", "max_tokens": 1});
            body["top_k"] = h.clone();
            cases.push(("/v1/completions", body, "top_k".into()));
        }
        if h != &json!(-1) {
            let mut body = json!({"prompt": "^1 2", "max_tokens": 1});
            body["seed"] = h.clone();
            cases.push(("/v1/completions", body, "seed".into()));
        }
        cases.extend([
            (
                "/v1/completions",
                json!({"prompt": [1, h]}),
                "prompt[1]".to_string(),
            ),
            (
                "/v1/completions",
                json!({"prompt": [[1], [1, 2, h]]}),
                "prompt[1][2]".into(),
            ),
            (
                "/v1/detokenize",
                json!({"tokens": [1, h]}),
                "tokens[1]".into(),
            ),
            (
                "/v1/audit",
                json!({"sequences": [[1, 2, h]]}),
                "sequences[0][2]".into(),
            ),
            (
                "/v1/audit",
                json!({"sequences": [{"prompt_ids": [1], "target_ids": [h]}]}),
                "sequences[0].target_ids[0]".into(),
            ),
            (
                "/v1/takedowns",
                json!({"sequences": [[1, 2, h]]}),
                "sequences".into(),
            ),
        ]);
        for (path, body, param) in cases {
            // The bound of max_tokens is the model's context (less the prompt), which the
            // contract cannot state; every other bound is in it.
            if !(param == "max_tokens" && h != &json!(-1)) {
                assert!(!contract_accepts(path, &body), "{path} {body}");
            }
            let r = post(&app, path, body.clone()).await;
            assert_names(&r, &param, &format!("{path} {body}"));
        }
    }
    // Definitions whose k + n would overflow.
    for def in ["k=18446744073709551615,n=1", "k=1,n=18446744073709551616"] {
        for path in ["/v1/audit", "/v1/takedowns"] {
            let body = json!({"sequences": [seq], "definition": def});
            assert!(!contract_accepts(path, &body), "{path} {body}");
            assert_names(&post(&app, path, body).await, "definition", def);
        }
    }
}
