//! `lethe audit`: audit the sequences of a JSONL file for verbatim regurgitation.
//!
//! Each input line is one of `{"text": "…"}`, `{"ids": […]}` (split into a `k`-token prompt
//! and `n`-token target by the definition), `{"ids": […], "clean_ids": […]}` (a TinyMem noise
//! row: prompt from the clean row, target from the noised one), or
//! `{"prompt_ids": […], "target_ids": […]}` (optionally with `"ids"`, the whole sequence that
//! unlearning trains on). A TinyMem data header line (`{"format": …}`) and blank lines are
//! skipped.
//!
//! Invariants:
//! - Every line is parsed before any decoding; a bad line is refused with an error naming the
//!   file and line (1-based).
//! - Output goes to stdout: one JSON result per input row (with its `index`), then one summary
//!   line naming the definition.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{audit, AuditItem, AuditRow, Definition, Parsed};
use crate::loader::ModelArgs;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// tinymem (50/50), pythia (32/48), pythia-40, carlini (50/50) or k=K,n=N (default: pythia
    /// for GPT-NeoX, tinymem for GPT-2).
    #[arg(long)]
    pub definition: Option<Definition>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// JSONL input ("-" for stdin).
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
    let def = a
        .definition
        .unwrap_or_else(|| Definition::default_for(lm.model.spec().architecture));
    let items: Vec<AuditItem> = read_rows(&a.file, def, &lm.tokenizer)?
        .into_iter()
        .map(|p| p.item)
        .collect();
    let (results, summary) = audit(&lm.model, Some(&lm.tokenizer), &items, a.batch_size)?;
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for (i, r) in results.iter().enumerate() {
        let mut v = serde_json::to_value(r)?;
        v["index"] = i.into();
        writeln!(w, "{v}")?;
    }
    writeln!(
        w,
        "{}",
        serde_json::json!({"summary": summary, "definition": def})
    )?;
    Ok(())
}
