//! `lethe audit`: audit the sequences of a JSONL file for verbatim regurgitation.
//!
//! Each input line is one of `{"text": "…"}`, `{"ids": […]}` (split into a `k`-token prompt
//! and `n`-token target by the definition), `{"ids": […], "clean_ids": […]}` (a TinyMem noise
//! row: prompt from the clean row, target from the noised one), or
//! `{"prompt_ids": […], "target_ids": […]}` (optionally with `"ids"`, the whole sequence that
//! unlearning trains on). A TinyMem data header line (`{"format": …}`) is
//! skipped. Output: one JSON result per input row, then one summary line.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use super::{audit, AuditItem, Definition};
use crate::cli::ModelArgs;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// tinymem (50/50), pythia (32/48), pythia-40, carlini (50/50) or k=K,n=N.
    #[arg(long, default_value = "tinymem")]
    pub definition: Definition,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// JSONL input ("-" for stdin).
    pub file: PathBuf,
}

/// One input line. Other fields (e.g. a TinyMem row's `split`, `task`, `role`) are ignored; a
/// line with none of the recognised combinations is an error naming the line.
#[derive(Debug, Deserialize)]
struct Line {
    text: Option<String>,
    ids: Option<Vec<u32>>,
    clean_ids: Option<Vec<u32>>,
    prompt_ids: Option<Vec<u32>>,
    target_ids: Option<Vec<u32>>,
}

/// One parsed input row: the whole sequence (what unlearning trains on) and its audit item.
pub struct Parsed {
    pub sequence: Vec<u32>,
    pub item: AuditItem,
}

/// Turns one parsed line into a sequence and an audit item.
fn parse(line: Line, def: Definition, tk: &Tokenizer) -> anyhow::Result<Parsed> {
    Ok(match line {
        Line { prompt_ids: Some(p), target_ids: Some(t), ids, .. } => Parsed {
            // `ids`, when present, is the whole sequence to train on (e.g. a backdoored row
            // whose prompt ends at its trigger).
            sequence: ids.unwrap_or_else(|| p.iter().chain(&t).copied().collect()),
            item: AuditItem { prompt: p, target: t },
        },
        Line { ids: Some(noised), clean_ids: Some(clean), .. } => {
            let (k, n) = (def.k(), def.n());
            if noised.len() < k + n || clean.len() < k {
                bail!("row is shorter than k + n = {}", k + n);
            }
            let item = AuditItem {
                prompt: clean[..k].to_vec(),
                target: noised[k..k + n].to_vec(),
            };
            Parsed { sequence: noised, item }
        }
        Line { ids: Some(ids), .. } => Parsed { item: def.split(&ids)?, sequence: ids },
        Line { text: Some(text), .. } => {
            let ids = tk.encode(&text)?;
            Parsed { item: def.split(&ids)?, sequence: ids }
        }
        _ => bail!("expected \"text\", \"ids\" (optionally with \"clean_ids\") or \"prompt_ids\" + \"target_ids\""),
    })
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
        let parsed: Line = serde_json::from_value(v).with_context(where_)?;
        rows.push(parse(parsed, def, tk).with_context(where_)?);
    }
    Ok(rows)
}

pub fn run(a: AuditArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    let items: Vec<AuditItem> = read_rows(&a.file, a.definition, &lm.tokenizer)?
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
        serde_json::json!({"summary": summary, "definition": a.definition})
    )?;
    Ok(())
}
