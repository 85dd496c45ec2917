//! Audit jobs through the API (`/v1/audits`): an uploaded dataset and a server-side file are
//! audited in the background with the same verdicts as `/v1/audit`, summed by definition and
//! group, paged, and cancellable; bad input is refused naming it, and nothing is left behind.

use std::path::Path;

use super::*;
use lethe::audit::jobs::{AuditJobs, JobsConfig};

fn jobs_state(data: &Path, allowed: Option<&Path>, max_upload: u64) -> web::Data<AppState> {
    let served = Served::new(bundled(), None).unwrap();
    let st = AppState::new(
        served,
        EngineConfig::default(),
        open_auth(),
        Limits::default(),
    );
    let jobs = AuditJobs::open(
        JobsConfig {
            data_dir: data.to_path_buf(),
            threads: 1,
            allowed_dir: allowed.map(Path::to_path_buf),
            max_upload_bytes: max_upload,
        },
        st.live.clone(),
        st.metrics.clone(),
    )
    .unwrap();
    let st = web::Data::new(st.with_audits(jobs));
    st.audits.as_ref().unwrap().start();
    st
}

/// The bundled model's noised rows (the ones its card audits) as JSONL, with a `half` field.
fn noised_rows() -> (String, usize, u64) {
    let dir = lethe::loader::bundled_model_dir();
    let card = lethe::tinymem::train::Card::read(&dir).unwrap();
    let ds = card.dataset().unwrap();
    let rows = ds.eligible_noised_rows(50, 100);
    let memorized = card
        .history
        .last()
        .unwrap()
        .eval
        .clone()
        .unwrap()
        .memorized
        .unwrap();
    let text: String = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({"ids": r.ids, "clean_ids": r.clean_ids, "half": i % 2, "role": "noised"})
                .to_string()
                + "\n"
        })
        .collect();
    (text, rows.len(), memorized as u64)
}

async fn upload<S, B>(app: &S, query: &str, body: &str) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    send(
        app,
        "POST",
        &format!("/v1/audits{query}"),
        Some(body.as_bytes().to_vec()),
        &[("content-type", "application/jsonl")],
    )
    .await
}

/// Polls a job until it is over.
async fn finished<S, B>(app: &S, id: &str) -> Value
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = get(app, &format!("/v1/audits/{id}")).await.json();
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {v}");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn audit_jobs_run_in_the_background_page_their_results_and_agree_with_v1_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let allowed = tmp.path().join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let (rows, n, memorized) = noised_rows();
    std::fs::write(allowed.join("rows.jsonl"), &rows).unwrap();
    let data = tmp.path().join("data");
    let st = jobs_state(&data, Some(&allowed), 1 << 20);
    let app = at::init_service(make_app(st.clone())).await;

    let r = upload(
        &app,
        "?definition=tinymem&group_by=half&batch_size=16",
        &rows,
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let job = r.json();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.headers.get(header::LOCATION).unwrap(),
        &format!("/v1/audits/{id}")
    );
    assert_eq!(job["progress"]["rows_total"], n);
    assert_eq!(job["dataset"]["uploaded"], true);
    let done = finished(&app, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"]["rows_done"], n);
    assert_eq!(done["progress"]["eta_seconds"], 0.0);
    let s = &done["summary"]["by_definition"]["tinymem"];
    // The card's own count: the same 24 of 59 the synchronous audit finds.
    assert_eq!(s["memorized"], memorized, "{done}");
    assert_eq!(s["sequences"], n);
    let halves = &s["by_group"]["half"];
    assert_eq!(
        halves["0"]["sequences"].as_u64().unwrap() + halves["1"]["sequences"].as_u64().unwrap(),
        n as u64
    );
    assert_eq!(
        halves["0"]["memorized"].as_u64().unwrap() + halves["1"]["memorized"].as_u64().unwrap(),
        memorized
    );

    // Row by row, the verdicts of `/v1/audit` on the same rows.
    let seqs: Vec<Value> = rows
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| json!({"ids": v["ids"], "clean_ids": v["clean_ids"]}))
        .collect();
    let sync = post(
        &app,
        "/v1/audit",
        json!({"sequences": seqs, "definition": "tinymem"}),
    )
    .await
    .json();
    let page1 = get(&app, &format!("/v1/audits/{id}/results?limit=25"))
        .await
        .json();
    assert_eq!(page1["data"].as_array().unwrap().len(), 25);
    assert_eq!(
        (page1["has_more"].clone(), page1["last_row"].clone()),
        (json!(true), json!(24))
    );
    let page2 = get(
        &app,
        &format!("/v1/audits/{id}/results?after=24&limit=1000"),
    )
    .await
    .json();
    assert_eq!(page2["has_more"], false);
    let all: Vec<Value> = page1["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["data"].as_array().unwrap())
        .cloned()
        .collect();
    assert_eq!(all.len(), n);
    for (i, row) in all.iter().enumerate() {
        assert_eq!(
            (row["row"].as_u64(), row["line"].as_u64()),
            (Some(i as u64), Some(i as u64 + 1))
        );
        let got = &row["results"]["tinymem"];
        assert_eq!(got["memorized"], sync["results"][i]["memorized"], "row {i}");
        assert_eq!(
            got["matched_prefix"], sync["results"][i]["matched_prefix"],
            "row {i}"
        );
        assert_eq!(row["groups"]["half"], (i % 2).to_string());
    }
    let hits = get(
        &app,
        &format!("/v1/audits/{id}/results?memorized=true&limit=1000"),
    )
    .await
    .json();
    assert_eq!(hits["data"].as_array().unwrap().len() as u64, memorized);

    // The same rows as a server-side file: the same summary.
    let r = post(
        &app,
        "/v1/audits",
        json!({"file": "rows.jsonl", "group_by": ["half"], "batch_size": 64}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let file_job = finished(&app, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(file_job["summary"], done["summary"]);
    assert_eq!(
        file_job["dataset"]["file"],
        allowed
            .join("rows.jsonl")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()
    );

    // A finished job cannot be cancelled; a queued or running one can, and takes no more rows.
    let e = send(&app, "DELETE", &format!("/v1/audits/{id}"), None, &[])
        .await
        .error(409);
    assert_eq!(e["code"], "not_cancellable");
    let big: String = rows.repeat(20);
    let r = upload(&app, "", &big).await;
    assert_eq!(r.status, 202);
    let big_id = r.json()["id"].as_str().unwrap().to_string();
    let c = send(&app, "DELETE", &format!("/v1/audits/{big_id}"), None, &[]).await;
    assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
    assert_eq!(c.json()["status"], "cancelled");
    let after = finished(&app, &big_id).await;
    assert_eq!(after["status"], "cancelled");
    assert!(
        after["progress"]["rows_done"].as_u64().unwrap() < 20 * n as u64,
        "{after}"
    );

    // Bad input names the problem and leaves no upload behind.
    let uploads = || std::fs::read_dir(data.join("audits")).unwrap().count();
    let before = uploads();
    let e = upload(
        &app,
        "",
        &format!(
            "{}{{\"ids\": [1, 2]}}\n",
            &rows[..rows.find('\n').unwrap() + 1]
        ),
    )
    .await
    .error(400);
    assert!(e["param"].as_str().unwrap().contains("body line 2"), "{e}");
    let e = upload(&app, "?definition=k%3D0", &rows).await.error(400);
    assert_eq!(e["param"], "definition");
    let e = upload(&app, "?colour=red", &rows).await.error(400);
    assert_eq!(e["param"], "colour");
    let e = upload(&app, "", &"x".repeat((1 << 20) + 1))
        .await
        .error(413);
    assert!(e["message"].as_str().unwrap().contains("limit"), "{e}");
    assert_eq!(uploads(), before);
    for (body, param) in [
        (json!({"file": "../rows.jsonl"}), "file"),
        (json!({"file": "missing.jsonl"}), "file"),
        (
            json!({"file": "rows.jsonl", "group_by": [""]}),
            "group_by[0]",
        ),
        (json!({"file": "rows.jsonl", "batch_size": 0}), "batch_size"),
        (
            json!({"file": "rows.jsonl", "definitions": ["k=200,n=1"]}),
            "rows.jsonl line 1",
        ),
    ] {
        let e = post(&app, "/v1/audits", body.clone()).await.error(400);
        assert!(e["param"].as_str().unwrap().contains(param), "{body}: {e}");
    }
    let e = get(&app, "/v1/audits/audit_none").await.error(404);
    assert_eq!(e["code"], "audit_job_not_found");
    get(&app, "/v1/audits/audit_none/results").await.error(404);
    get(&app, &format!("/v1/audits/{id}/results?after=x"))
        .await
        .error(400);
    // The job gauges and the rows counter.
    let metrics = String::from_utf8(get(&app, "/metrics").await.body.to_vec()).unwrap();
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!(sample("lethe_audit_jobs{state=\"completed\"}"), 2.0);
    assert_eq!(sample("lethe_audit_jobs{state=\"cancelled\"}"), 1.0);
    assert!(sample("lethe_audit_job_rows_total") >= 2.0 * n as f64);
    let list = get(&app, "/v1/audits?limit=2").await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    st.audits.as_ref().unwrap().shutdown();

    // Without the service, the routes say so.
    let plain = at::init_service(make_app(state())).await;
    get(&plain, "/v1/audits").await.error(503);
}
