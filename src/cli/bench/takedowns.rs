//! `lethe bench takedowns`: how often a takedown succeeds, how long it takes and what it costs,
//! on the bundled TinyMem noise model (or any TinyMem noise model), through the same pipeline
//! as `lethe serve`'s worker ([`crate::unlearn::pipeline::run`]).
//!
//! Requests are seeded random draws from the model's memorized sequences: the noised rows whose
//! own 50-token prefix makes the model regurgitate the next 50 tokens. Each size is run
//! `--requests` times in each form: the whole 150-token row (definition `tinymem`) and its first
//! 100 tokens (its 50-token prefix plus continuation, definition `k=50,n=50`). Then
//! `--sequential` takedowns of `--sequential-size` sequences are applied one after another on
//! one lineage, reporting the drift from the root after each.
//!
//! Invariants:
//! - Every run has `lethe serve`'s pipeline defaults, changed only by `--controller` (a JSON
//!   patch, validated before the first request; an unknown or bad field is refused).
//! - The same command on the same model draws the same sequences (`--seed`).
//! - Every independent request starts from the unedited model. A sequential takedown starts
//!   from the last applied one, is gated against its parent and the root, and (unless
//!   `--keep-zeros`) re-masks the root's weights with the earlier takedowns' sequences in its
//!   forget set, as the server does; a rejected one leaves the lineage unchanged.
//! - One JSON line per takedown goes to stdout; the summary (JSON, then a Markdown table for
//!   `docs/benchmarks.md`) to stderr. Nothing is written to disk.

use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::json;

use super::{at_least_one, median};
use crate::audit::{self, Definition};
use crate::loader::ModelArgs;
use crate::models::Model;
use crate::tinymem::train::Card;
use crate::unlearn::pipeline::{self, Datasets, Lineage, PipelineConfig, Target};
use crate::unlearn::quality::Quality;
use crate::unlearn::JobControl;

#[derive(Debug, Args)]
pub struct TakedownBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences per request.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,24")]
    pub sizes: Vec<usize>,
    /// Requests per size and form.
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    pub requests: usize,
    /// Forms: `rows` (whole rows, definition tinymem), `prefix` (50-token prefix plus the
    /// 50-token continuation, definition k=50,n=50).
    #[arg(long, value_delimiter = ',', default_value = "rows,prefix")]
    pub forms: Vec<String>,
    /// Sequential takedowns on one lineage (0: skip).
    #[arg(long, default_value_t = 10)]
    pub sequential: usize,
    /// Sequences per sequential takedown.
    #[arg(long, default_value_t = 5)]
    pub sequential_size: usize,
    /// Threads of the unlearning pool (as `lethe serve --unlearn-threads`).
    #[arg(long, default_value_t = 1)]
    pub unlearn_threads: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Controller settings to change, as JSON (e.g. `{"w": 0.8, "check_every": 10}`); the
    /// rest keep `lethe serve`'s defaults.
    #[arg(long)]
    pub controller: Option<String>,
    /// Sequential takedowns mask the parent's weights, keeping every earlier takedown's zeros
    /// for good, instead of re-masking the root's (what `lethe serve` does).
    #[arg(long)]
    pub keep_zeros: bool,
}

/// One takedown's outcome.
#[derive(Debug, Clone, Serialize)]
struct Run {
    kind: &'static str,
    size: usize,
    form: String,
    request: usize,
    applied: bool,
    seconds: f64,
    steps: u64,
    /// The ratio the controller added, and the fraction of each MLP matrix masked after.
    ratio: f64,
    total_ratio: f64,
    /// Seconds of the evaluation before unlearning and of each gate measurement.
    before_seconds: f64,
    gate_seconds: Vec<f64>,
    perplexity_drift: f64,
    accuracy_change: Option<f64>,
    /// Sequential runs: drift from the root after this takedown.
    #[serde(skip_serializing_if = "Option::is_none")]
    root_perplexity_drift: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root_accuracy_change: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejection: Option<String>,
}

pub fn run(a: TakedownBenchArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    let ds = Card::read(&lm.dir)
        .with_context(|| format!("{} is not a TinyMem model directory", lm.dir.display()))?
        .dataset()?;
    let pool = memorized_pool(&lm.model, &ds)?;
    if pool.is_empty() {
        bail!("the model regurgitates none of its noised rows from their own prefix");
    }
    eprintln!(
        "{} sequences are extractable from their own prefix",
        pool.len()
    );
    let data = Datasets::for_model(
        &lm.dir,
        None,
        None,
        Vec::new(),
        lm.model.spec().context_length,
    )?;
    let mut cfg = PipelineConfig::default();
    if let Some(j) = &a.controller {
        let mut v = serde_json::to_value(&cfg.controller)?;
        let patch: serde_json::Value = serde_json::from_str(j).context("--controller")?;
        for (k, x) in patch
            .as_object()
            .context("--controller: expected a JSON object")?
        {
            v[k] = x.clone();
        }
        cfg.controller = serde_json::from_value(v).context("--controller")?;
        cfg.controller.validate()?;
    }
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(a.unlearn_threads.max(1))
        .build()?;
    // The base model's quality, measured once, as `lethe serve` caches it per version (its
    // auditor measures the live version at start).
    let base_quality = threads.install(|| pipeline::measure(&lm.model, &data))?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut runs = Vec::new();
    for &size in &a.sizes {
        if size == 0 || size > pool.len() {
            bail!("--sizes: {size} is not in 1..={}", pool.len());
        }
        for form in &a.forms {
            for request in 0..a.requests {
                let targets = draw(&pool, size, form, &mut rng)?;
                let run = threads.install(|| {
                    let lineage = Lineage {
                        parent: Some(&base_quality),
                        ..Lineage::default()
                    };
                    one(
                        &lm.model,
                        &targets,
                        &data,
                        lineage,
                        &cfg,
                        "independent",
                        form,
                        request,
                    )
                })?;
                println!("{}", serde_json::to_string(&run.0)?);
                runs.push(run.0);
            }
        }
    }
    let mut lineage = lm.model.clone();
    let mut parent = base_quality.clone();
    let root = base_quality.clone();
    // What the lineage removed so far, as the server collects it from the applied versions.
    let mut earlier: Vec<Target> = Vec::new();
    for request in 0..a.sequential {
        let targets = draw(&pool, a.sequential_size.min(pool.len()), "rows", &mut rng)?;
        let known = Lineage {
            parent: Some(&parent),
            root: Some(&root),
            root_model: (!earlier.is_empty() && !a.keep_zeros).then_some(&lm.model),
            earlier: &earlier,
        };
        let (run, decision) = threads.install(|| {
            one(
                &lineage,
                &targets,
                &data,
                known,
                &cfg,
                "sequential",
                "rows",
                request,
            )
        })?;
        let root_base = &root;
        let mut run = run;
        if decision.passed {
            let after = &decision.report["after"];
            let ppl = after["perplexity"].as_f64().unwrap_or(f64::NAN);
            run.root_perplexity_drift = Some(ppl / root_base.quality.perplexity - 1.0);
            let q: Option<Quality> = serde_json::from_value(after.clone()).ok();
            run.root_accuracy_change =
                q.and_then(|q| root_base.quality.relative_accuracy_change(&q));
            lineage = decision.model;
            if let Some(q) = decision.quality {
                parent = q;
            }
            earlier.extend(targets);
        }
        println!("{}", serde_json::to_string(&run)?);
        runs.push(run);
    }
    let summary = summarize(&runs);
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("{}", markdown(&summary));
    Ok(())
}

/// The noised rows that the model regurgitates from their own 50-token prefix.
fn memorized_pool(
    model: &Model,
    ds: &crate::tinymem::data::Dataset,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let def = Definition::Tinymem;
    let rows: Vec<Vec<u32>> = ds
        .eligible_noised_rows(def.k(), def.span())
        .iter()
        .map(|r| r.ids.clone())
        .collect();
    let items = rows
        .iter()
        .map(|r| def.split(r))
        .collect::<crate::Result<Vec<_>>>()?;
    let (res, _) = audit::audit(model, None, &items, 64)?;
    Ok(rows
        .into_iter()
        .zip(res)
        .filter(|(_, r)| r.memorized)
        .map(|(row, _)| row)
        .collect())
}

/// `size` distinct sequences of `pool` in `form`.
fn draw(
    pool: &[Vec<u32>],
    size: usize,
    form: &str,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<Target>> {
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    idx.shuffle(rng);
    idx.truncate(size);
    let (def, len) = match form {
        "rows" => (Definition::Tinymem, usize::MAX),
        "prefix" => (Definition::Custom { k: 50, n: 50 }, 100),
        other => bail!("--forms: {other:?} is not rows or prefix"),
    };
    idx.iter()
        .enumerate()
        .map(|(i, &p)| {
            let seq: Vec<u32> = pool[p].iter().copied().take(len).collect();
            let item = def.split(&seq)?;
            Ok(Target::new(format!("pool[{p}]"), i, seq, item))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn one(
    model: &Model,
    targets: &[Target],
    data: &Datasets,
    lineage: Lineage,
    cfg: &PipelineConfig,
    kind: &'static str,
    form: &str,
    request: usize,
) -> anyhow::Result<(Run, pipeline::Decision)> {
    let t0 = Instant::now();
    let d = pipeline::run(
        model,
        None,
        targets,
        data,
        lineage,
        cfg,
        &JobControl::new(),
        &|_| {},
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    let before: Quality = serde_json::from_value(d.report["before"].clone())?;
    let (drift, acc) = match d.report.get("after").filter(|v| !v.is_null()) {
        Some(after) => {
            let q: Quality = serde_json::from_value(after.clone())?;
            (
                q.perplexity / before.perplexity - 1.0,
                before.relative_accuracy_change(&q),
            )
        }
        None => (f64::NAN, None),
    };
    let run = Run {
        kind,
        size: targets.len(),
        form: form.to_string(),
        request,
        applied: d.passed,
        seconds,
        steps: d.report["steps"].as_u64().unwrap_or(0),
        ratio: d.report["ratio"].as_f64().unwrap_or(f64::NAN),
        total_ratio: d.report["total_ratio"].as_f64().unwrap_or(f64::NAN),
        before_seconds: d.report["before_seconds"].as_f64().unwrap_or(f64::NAN),
        gate_seconds: serde_json::from_value(d.report["gate_seconds"].clone()).unwrap_or_default(),
        perplexity_drift: drift,
        accuracy_change: acc,
        root_perplexity_drift: None,
        root_accuracy_change: None,
        rejection: d.rejection.clone(),
    };
    Ok((run, d))
}

fn p90(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * 0.9).ceil() as usize).clamp(1, v.len()) - 1]
}

fn summarize(runs: &[Run]) -> serde_json::Value {
    let mut groups: Vec<(&str, usize, String)> = Vec::new();
    for r in runs {
        let key = (
            r.kind,
            r.size,
            if r.kind == "sequential" {
                "rows".into()
            } else {
                r.form.clone()
            },
        );
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    let rows: Vec<serde_json::Value> = groups
        .iter()
        .map(|(kind, size, form)| {
            let g: Vec<&Run> = runs
                .iter()
                .filter(|r| r.kind == *kind && r.size == *size && (r.kind == "sequential" || r.form == *form))
                .collect();
            let applied: Vec<&&Run> = g.iter().filter(|r| r.applied).collect();
            let secs: Vec<f64> = g.iter().map(|r| r.seconds).collect();
            let drift: Vec<f64> = applied.iter().map(|r| r.perplexity_drift).collect();
            let acc: Vec<f64> = applied.iter().filter_map(|r| r.accuracy_change).collect();
            let worst = |v: &[f64], hi: bool| {
                v.iter().copied().fold(f64::NAN, |a, b| {
                    if a.is_nan() || (hi && b > a) || (!hi && b < a) {
                        b
                    } else {
                        a
                    }
                })
            };
            json!({
                "kind": kind, "size": size, "form": form, "requests": g.len(),
                "applied": applied.len(),
                "success_rate": applied.len() as f64 / g.len().max(1) as f64,
                "seconds_median": median(secs.clone()), "seconds_p90": p90(&secs),
                "perplexity_drift_median": median(drift.clone()), "perplexity_drift_max": worst(&drift, true),
                "accuracy_change_median": median(acc.clone()), "accuracy_change_min": worst(&acc, false),
                "root_perplexity_drift_last": g.iter().rev().find_map(|r| r.root_perplexity_drift),
                "root_accuracy_change_last": g.iter().rev().find_map(|r| r.root_accuracy_change),
            })
        })
        .collect();
    json!({ "groups": rows })
}

fn markdown(summary: &serde_json::Value) -> String {
    let mut s = String::from(
        "| requests | sequences | form | applied | wall s (median / p90) | perplexity drift (median / max) | accuracy change (median / min) |\n|---|---|---|---|---|---|---|\n",
    );
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("–".into(), |x| format!("{:+.2} %", x * 100.0))
    };
    for g in summary["groups"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} {} | {} | {} | {}/{} | {:.1} / {:.1} | {} / {} | {} / {} |\n",
            g["requests"],
            g["kind"].as_str().unwrap_or(""),
            g["size"],
            g["form"].as_str().unwrap_or(""),
            g["applied"],
            g["requests"],
            g["seconds_median"].as_f64().unwrap_or(f64::NAN),
            g["seconds_p90"].as_f64().unwrap_or(f64::NAN),
            pct(&g["perplexity_drift_median"]),
            pct(&g["perplexity_drift_max"]),
            pct(&g["accuracy_change_median"]),
            pct(&g["accuracy_change_min"]),
        ));
    }
    s
}
