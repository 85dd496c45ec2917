//! `lethe audit`: audit the sequences of a JSONL file for verbatim regurgitation.
//!
//! Each input line is one of `{"text": "…"}`, `{"ids": […]}` (split into a `k`-token prompt
//! and `n`-token target by the definition), `{"ids": […], "clean_ids": […]}` (a TinyMem noise
//! row: prompt from the clean row, target from the noised one), or
//! `{"prompt_ids": […], "target_ids": […]}` (optionally with `"ids"`, the whole sequence that
//! unlearning trains on). A TinyMem data header line (`{"format": …}`) and blank lines are
//! skipped.
//!
//! `lethe audit FILE` runs the same audit job as `POST /v1/audits` ([`super::jobs`]): the rows
//! are checked, audited in chunks under each `--definition` with a progress bar on stderr, and
//! summed by definition and by each `--group-by` field.
//!
//! Invariants:
//! - Every line is parsed (under every definition) before any auditing; a bad line is refused
//!   with an error naming the file and line (1-based).
//! - Output goes to stdout: one JSON result per data row (`row`, `line`, the group values and a
//!   verdict per definition), then one line `{"summary": …, "job": …}`; the summary equals the
//!   server's for the same file, definitions and weights.
//! - With `--data-dir DIR` the job is kept in `DIR/audits.sqlite3`: a run killed midway and
//!   started again with the same file and options resumes where it stopped. Without it the job
//!   lives in a temporary directory removed at exit.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::jobs::{run::run_job, run::RunEnd, scan, JobSpec, JobState, JobStore};
use super::{AuditRow, Definition, Parsed};
use crate::engine::served::Served;
use crate::loader::ModelArgs;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// tinymem (50/50), pythia (32/48), pythia-40, carlini (50/50) or k=K,n=N; repeat it to audit
    /// under several (default: pythia for GPT-NeoX, tinymem for GPT-2).
    #[arg(long)]
    pub definition: Vec<Definition>,
    /// An input field to break the summary down by (e.g. a duplication count); repeatable.
    #[arg(long)]
    pub group_by: Vec<String>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Keep the job here (`audits.sqlite3`) so that a run stopped midway resumes when started
    /// again with the same file and options.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// JSONL input (a file: a job resumes from it, so stdin is not accepted).
    pub file: PathBuf,
}

/// Reads a JSONL file of audit rows (see the module docs); `-` is stdin. Errors name the line.
pub fn read_rows(
    file: &std::path::Path,
    def: Definition,
    tk: &Tokenizer,
) -> anyhow::Result<Vec<Parsed>> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let where_ = || format!("{} line {}", file.display(), i + 1);
        let line = line.with_context(where_)?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(where_)?;
        if v.get("format").is_some() {
            continue;
        }
        let row: AuditRow = serde_json::from_value(v).with_context(where_)?;
        rows.push(row.parse(def, tk).with_context(where_)?);
    }
    Ok(rows)
}

pub fn run(a: AuditArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    let served = Served::new(lm, None).context("hashing the model files into a version id")?;
    let spec = JobSpec {
        definitions: a.definition.clone(),
        group_by: a.group_by.clone(),
        batch_size: a.batch_size,
        risk: None,
    }
    .validated(served.model.spec().architecture)?;
    if a.file.as_os_str() == "-" {
        anyhow::bail!(
            "lethe audit reads a file, not stdin (\"-\"): an audit job resumes from its file; save the rows first"
        );
    }
    let file = a
        .file
        .canonicalize()
        .with_context(|| format!("opening {}", a.file.display()))?;
    let _tmp;
    let dir = match &a.data_dir {
        Some(d) => d.clone(),
        None => {
            let d =
                std::env::temp_dir().join(format!("lethe-audit-{}", crate::util::random_hex(8)));
            // Private from the start, as the store wants its directory (no warning to tighten).
            let mut b = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(&d)
                .with_context(|| format!("creating {}", d.display()))?;
            _tmp = RemoveOnDrop(d.clone());
            d
        }
    };
    let store = JobStore::open(&dir).with_context(|| format!("--data-dir {}", dir.display()))?;
    store.requeue_interrupted()?;
    let scanned = scan(
        &file,
        &spec,
        &served.tokenizer,
        served.model.spec().context_length,
    )?;
    let job = match store.find_unfinished(&file, &scanned.sha256, &spec)? {
        Some(j) => {
            eprintln!(
                "lethe: resuming {} at row {} of {}",
                j.id, j.rows_done, j.rows_total
            );
            j
        }
        None => store.create(super::jobs::store::NewJob {
            dataset: file.clone(),
            uploaded: false,
            dataset_sha256: scanned.sha256,
            spec: spec.clone(),
            rows_total: scanned.rows,
        })?,
    };
    let job = store
        .claim_job(&job.id)?
        .context("the job was claimed by another process")?;
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(job.rows_total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "audit [{bar:30}] {pos}/{len} rows {per_sec} eta {eta}",
            )?
            .progress_chars("=> "),
        );
        b
    };
    let end = run_job(&store, &job, &served, &|| false, &mut |j| {
        bar.set_position(j.rows_done)
    });
    bar.finish_and_clear();
    match end {
        Ok(RunEnd::Completed) => {}
        Ok(other) => anyhow::bail!("audit job {} ended {other:?}", job.id),
        Err(e) => {
            store.finish(&job.id, JobState::Failed, Some(&e.to_string()))?;
            return Err(e.into());
        }
    }
    let done = store.get(&job.id)?.context("the job vanished")?;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    let mut after = None;
    loop {
        let page = store.results(&job.id, after, 1000, false)?;
        let Some(last) = page.last() else { break };
        after = Some(last.row);
        for r in &page {
            writeln!(w, "{}", serde_json::to_string(r)?)?;
        }
    }
    writeln!(
        w,
        "{}",
        serde_json::json!({
            "summary": done.summary,
            "job": {"id": done.id, "version": done.version, "seconds": done.seconds,
                    "definitions": spec.definitions, "group_by": spec.group_by},
        })
    )?;
    w.flush()?;
    Ok(())
}

/// A directory removed when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
