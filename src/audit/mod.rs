//! Extractable-memorization audits: does the model regurgitate a sequence verbatim?
//!
//! A sequence is **(k, n)-extractable** when greedy decoding from its first `k` tokens, with EOS
//! banned, reproduces its next `n` tokens exactly. [`Definition`] names common (k, n) choices;
//! any caller can supply its own prompt/target pairs ([`AuditItem`]).
//!
//! Invariants:
//! - An item counts as memorized only when all `n` greedily generated tokens would equal its
//!   target; the model's EOS is banned and generation never stops early (spec §3.1, where for
//!   TinyMem noise rows the prompt is the *clean* prefix and the target the *noised*
//!   continuation).
//! - The verdict (`memorized`, `matched_prefix`) comes from one teacher-forced pass
//!   ([`crate::engine::teacher`]), which equals step-by-step greedy decoding; items are decoded
//!   only when the caller asks for the generated tokens ([`AuditOptions::generate`]).
//! - Extraction risk beyond one greedy query ([`risk`]) is measured only when asked for.
//! - Every item is judged on its own, so results do not depend on batching.
//! - The model is only read.
//! - Bad input is an error, never a panic: an empty prompt or target is refused before any
//!   decoding (naming `items[i]`), a definition that is unknown or has `k` or `n` outside
//!   `1..=MAX_DEFINITION_TOKENS` is refused naming `definition`, and a sequence shorter than
//!   `k + n` with an error stating the length it needs.

use std::str::FromStr;
use std::time::Instant;

pub mod cli;
pub mod jobs;
pub mod risk;

pub use risk::{Risk, RiskOptions};

use serde::{Deserialize, Serialize};

use crate::engine::teacher::{teacher_forced, TeacherOptions, TeacherResult};
use crate::engine::{self, GenerateRequest};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// The largest `k` or `n` a `k=K,n=N` definition may name: far beyond any model's context, and
/// small enough that `k + n` never overflows.
pub const MAX_DEFINITION_TOKENS: usize = 1 << 20;

/// A named (k, n) memorization definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Definition {
    /// TinyMem (spec §3.1): 50-token prompt, next 50 compared.
    Tinymem,
    /// Pythia / MemPi: 32-token prompt, next 48 compared.
    Pythia,
    /// The paper's code's Pythia variant: 32-token prompt, only the first 40 of 48 compared.
    Pythia40,
    /// Carlini et al.: 50-token prompt, next 50 compared.
    Carlini,
    /// Any `k`-token prompt and `n` compared tokens.
    Custom { k: usize, n: usize },
}

impl Definition {
    /// The definition a model family is audited under when a request names none: Pythia's
    /// (32-token prompt, next 48) for GPT-NeoX, TinyMem's (50, 50) for GPT-2, the family of the
    /// TinyMem models lethe bundles and trains.
    pub fn default_for(arch: crate::models::Architecture) -> Self {
        match arch {
            crate::models::Architecture::GptNeoX => Self::Pythia,
            crate::models::Architecture::Gpt2 => Self::Tinymem,
        }
    }

    /// Prompt length.
    pub fn k(self) -> usize {
        match self {
            Self::Tinymem | Self::Carlini => 50,
            Self::Pythia | Self::Pythia40 => 32,
            Self::Custom { k, .. } => k,
        }
    }

    /// Number of compared tokens.
    pub fn n(self) -> usize {
        match self {
            Self::Tinymem | Self::Carlini => 50,
            Self::Pythia => 48,
            Self::Pythia40 => 40,
            Self::Custom { n, .. } => n,
        }
    }

    /// Tokens a sequence needs under this definition, `k + n` (saturating: a `Custom` built in
    /// code with huge sizes can never wrap to a small span; parsing caps both at
    /// [`MAX_DEFINITION_TOKENS`]).
    pub fn span(self) -> usize {
        self.k().saturating_add(self.n())
    }

    /// Splits a whole sequence into (prompt, target) under this definition.
    pub fn split(self, seq: &[u32]) -> Result<AuditItem> {
        let (k, n) = (self.k(), self.n());
        if seq.len() < self.span() {
            return Err(Error::invalid(
                "sequence",
                format!(
                    "has {} tokens; definition {self} needs at least k + n = {}",
                    seq.len(),
                    self.span()
                ),
            ));
        }
        Ok(AuditItem {
            prompt: seq[..k].to_vec(),
            target: seq[k..k + n].to_vec(),
        })
    }
}

impl std::fmt::Display for Definition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tinymem => f.write_str("tinymem"),
            Self::Pythia => f.write_str("pythia"),
            Self::Pythia40 => f.write_str("pythia-40"),
            Self::Carlini => f.write_str("carlini"),
            Self::Custom { k, n } => write!(f, "k={k},n={n}"),
        }
    }
}

impl FromStr for Definition {
    type Err = Error;

    /// `tinymem`, `pythia`, `pythia-40`, `carlini`, or `k=K,n=N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "definition",
                format!("{s:?}: expected tinymem, pythia, pythia-40, carlini or k=K,n=N"),
            )
        };
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "tinymem" => Self::Tinymem,
            "pythia" => Self::Pythia,
            "pythia-40" | "pythia40" => Self::Pythia40,
            "carlini" => Self::Carlini,
            other => {
                let (mut k, mut n) = (None, None);
                for part in other.split(',') {
                    let (key, val) = part.split_once('=').ok_or_else(bad)?;
                    let val: usize = val.trim().parse().map_err(|_| bad())?;
                    match key.trim() {
                        "k" => k = Some(val),
                        "n" => n = Some(val),
                        _ => return Err(bad()),
                    }
                }
                match (k, n) {
                    (Some(k), Some(n))
                        if k > MAX_DEFINITION_TOKENS || n > MAX_DEFINITION_TOKENS =>
                    {
                        return Err(Error::invalid(
                            "definition",
                            format!("{s:?}: k and n must each be at most {MAX_DEFINITION_TOKENS}"),
                        ))
                    }
                    (Some(k), Some(n)) if k > 0 && n > 0 => Self::Custom { k, n },
                    _ => return Err(bad()),
                }
            }
        })
    }
}

impl TryFrom<String> for Definition {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Definition> for String {
    fn from(d: Definition) -> String {
        d.to_string()
    }
}

/// One thing to audit: a prompt and the continuation that would count as regurgitation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditItem {
    pub prompt: Vec<u32>,
    pub target: Vec<u32>,
}

/// One sequence to audit, in any of the accepted shapes: `{"text"}`, `{"ids"}` (split into a
/// `k`-token prompt and `n`-token target by the definition), `{"ids", "clean_ids"}` (a TinyMem
/// noise row: prompt from the clean row, target from the noised one), or
/// `{"prompt_ids", "target_ids"}` (optionally with `"ids"`, the whole sequence that unlearning
/// trains on). Other fields (a TinyMem row's `split`, `task`, `role`) are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuditRow {
    pub text: Option<String>,
    pub ids: Option<Vec<u32>>,
    pub clean_ids: Option<Vec<u32>>,
    pub prompt_ids: Option<Vec<u32>>,
    pub target_ids: Option<Vec<u32>>,
}

/// One parsed row: the whole sequence (what unlearning trains on) and its audit item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub sequence: Vec<u32>,
    pub item: AuditItem,
}

impl AuditRow {
    /// Turns the row into a sequence and an audit item under `def`.
    pub fn parse(self, def: Definition, tk: &Tokenizer) -> Result<Parsed> {
        Ok(match self {
            AuditRow { prompt_ids: Some(p), target_ids: Some(t), ids, .. } => {
                if p.is_empty() || t.is_empty() {
                    return Err(Error::invalid(
                        "prompt_ids",
                        "prompt_ids and target_ids must be non-empty",
                    ));
                }
                Parsed {
                    // `ids`, when present, is the whole sequence to train on (e.g. a backdoored
                    // row whose prompt ends at its trigger).
                    sequence: ids.unwrap_or_else(|| p.iter().chain(&t).copied().collect()),
                    item: AuditItem { prompt: p, target: t },
                }
            }
            AuditRow { ids: Some(noised), clean_ids: Some(clean), .. } => {
                let (k, n) = (def.k(), def.n());
                if noised.len() < def.span() || clean.len() < k {
                    return Err(Error::invalid(
                        "ids",
                        format!("row is shorter than k + n = {} for definition {def}", def.span()),
                    ));
                }
                let item = AuditItem {
                    prompt: clean[..k].to_vec(),
                    target: noised[k..k + n].to_vec(),
                };
                Parsed { sequence: noised, item }
            }
            AuditRow { ids: Some(ids), .. } => Parsed { item: def.split(&ids)?, sequence: ids },
            AuditRow { text: Some(text), .. } => {
                let ids = tk.encode(&text)?;
                Parsed { item: def.split(&ids)?, sequence: ids }
            }
            _ => {
                return Err(Error::invalid(
                    "row",
                    "expected \"text\", \"ids\" (optionally with \"clean_ids\") or \"prompt_ids\" + \"target_ids\"",
                ))
            }
        })
    }
}

/// The verdict on one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditResult {
    /// All `n` target tokens reproduced exactly by greedy decoding.
    pub memorized: bool,
    /// Length of the longest prefix of the target that greedy decoding reproduces.
    pub matched_prefix: usize,
    /// With generation ([`AuditOptions::generate`]): fraction of the `n` positions where the
    /// greedy continuation equals the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_fraction: Option<f64>,
    /// With generation: the greedy continuation (`n` tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_ids: Option<Vec<u32>>,
    /// With generation and a tokenizer: its text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_text: Option<String>,
    /// With [`AuditOptions::risk`]: extraction risk beyond the one greedy query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<Risk>,
}

impl AuditResult {
    /// Extractable by any measure the audit took: greedy, sampling ((n, p)-discoverable) or a
    /// perturbed prompt.
    pub fn extractable(&self) -> bool {
        self.memorized || self.risk.as_ref().is_some_and(Risk::extractable)
    }
}

/// How to audit.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditOptions {
    /// Items per forward pass (or per decoding batch).
    pub batch_size: usize,
    /// Also decode each item greedily, for `generated_ids`, `generated_text` and
    /// `match_fraction`; the verdict is then that decoding's (which the single pass equals).
    pub generate: bool,
    /// Measure extraction risk beyond one greedy query.
    pub risk: Option<RiskOptions>,
}

impl AuditOptions {
    /// The single-pass greedy verdict only, `batch_size` items per pass.
    pub fn greedy(batch_size: usize) -> Self {
        Self {
            batch_size,
            generate: false,
            risk: None,
        }
    }
}

/// Totals over an audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditSummary {
    pub sequences: usize,
    pub memorized: usize,
    /// `memorized / sequences` (0 for an empty audit).
    pub rate: f64,
    pub seconds: f64,
    /// With risk: items (n, p)-discoverable by sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discoverable: Option<usize>,
    /// With risk: items some perturbed prompt still extracts greedily.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perturbed_memorized: Option<usize>,
    /// With risk: items extractable by any measure ([`AuditResult::extractable`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extractable: Option<usize>,
}

/// Audits `items`, `batch_size` per forward pass: the single-pass greedy verdict.
pub fn audit(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    items: &[AuditItem],
    batch_size: usize,
) -> Result<(Vec<AuditResult>, AuditSummary)> {
    audit_with(model, tokenizer, items, &AuditOptions::greedy(batch_size))
}

/// Audits `items` as `opts` asks: the single-pass verdict ([`engine::teacher`]) by default,
/// greedy decoding where generation is asked for, and extraction risk where it is configured.
pub fn audit_with(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    items: &[AuditItem],
    opts: &AuditOptions,
) -> Result<(Vec<AuditResult>, AuditSummary)> {
    let start = Instant::now();
    let eos = model.spec().eos_token_id;
    for (i, it) in items.iter().enumerate() {
        if it.prompt.is_empty() || it.target.is_empty() {
            return Err(Error::invalid(
                format!("items[{i}]"),
                "prompt and target must be non-empty",
            ));
        }
    }
    let results = if opts.generate {
        let mut results = Vec::with_capacity(items.len());
        for chunk in items.chunks(opts.batch_size.max(1)) {
            let reqs: Vec<GenerateRequest> = chunk.iter().map(|it| request(it, eos)).collect();
            for (it, g) in chunk.iter().zip(engine::generate(model, None, &reqs)?) {
                results.push(judge(it, g.tokens, tokenizer)?);
            }
        }
        match &opts.risk {
            Some(r) => with_risk(results, risk::measure(model, items, r, opts.batch_size)?),
            None => results,
        }
    } else if let Some(r) = &opts.risk {
        // The risk's full pass gives the greedy verdict too.
        let (full, risks) = risk::measure_with_verdicts(model, items, r, opts.batch_size)?;
        let verdicts = items
            .iter()
            .zip(&full)
            .map(|(it, t)| verdict(it, t))
            .collect();
        with_risk(verdicts, risks)
    } else {
        let pairs: Vec<(&[u32], &[u32])> = items
            .iter()
            .map(|it| (&it.prompt[..], &it.target[..]))
            .collect();
        let t = teacher_forced(
            model,
            &pairs,
            &teacher_options(model, opts.batch_size, None),
        )?;
        items.iter().zip(&t).map(|(it, t)| verdict(it, t)).collect()
    };
    let summary = AuditSummary::of(&results, start.elapsed().as_secs_f64());
    Ok((results, summary))
}

/// `results` with each item's risk attached.
fn with_risk(mut results: Vec<AuditResult>, risks: Vec<Risk>) -> Vec<AuditResult> {
    results
        .iter_mut()
        .zip(risks)
        .for_each(|(res, k)| res.risk = Some(k));
    results
}

/// The teacher-forced options an audit runs with: EOS banned, and `full` with the given
/// sampling temperature when one is given.
pub(crate) fn teacher_options(
    model: &Model,
    batch_size: usize,
    temperature: Option<f32>,
) -> TeacherOptions {
    TeacherOptions {
        banned: model.spec().eos_token_id.into_iter().collect(),
        full: temperature.is_some(),
        temperatures: temperature.into_iter().collect(),
        batch_size,
    }
}

/// The audit verdict of a teacher-forced result for `item`.
pub fn verdict(item: &AuditItem, t: &TeacherResult) -> AuditResult {
    AuditResult {
        memorized: t.matched_prefix == item.target.len(),
        matched_prefix: t.matched_prefix,
        match_fraction: None,
        generated_ids: None,
        generated_text: None,
        risk: None,
    }
}

impl AuditSummary {
    /// Totals over `results`, which took `seconds`.
    pub fn of(results: &[AuditResult], seconds: f64) -> Self {
        let memorized = results.iter().filter(|r| r.memorized).count();
        let risks: Vec<&Risk> = results.iter().filter_map(|r| r.risk.as_ref()).collect();
        let with_risk = |f: &dyn Fn(&Risk) -> bool| {
            (!risks.is_empty()).then(|| risks.iter().filter(|r| f(r)).count())
        };
        Self {
            sequences: results.len(),
            memorized,
            rate: if results.is_empty() {
                0.0
            } else {
                memorized as f64 / results.len() as f64
            },
            seconds,
            discoverable: with_risk(&|r| r.discoverable),
            perturbed_memorized: with_risk(&|r| r.perturbed_memorized > 0),
            extractable: (!risks.is_empty())
                .then(|| results.iter().filter(|r| r.extractable()).count()),
        }
    }
}

/// The greedy, EOS-banned generation request that audits `item`.
pub fn request(item: &AuditItem, eos: Option<u32>) -> GenerateRequest {
    let mut r = GenerateRequest::greedy(item.prompt.clone(), item.target.len());
    r.banned_ids.extend(eos);
    r.stop_at_eos = false;
    r
}

/// Compares a greedy continuation with the item's target.
pub fn judge(
    item: &AuditItem,
    generated: Vec<u32>,
    tokenizer: Option<&Tokenizer>,
) -> Result<AuditResult> {
    let n = item.target.len();
    let same = generated
        .iter()
        .zip(&item.target)
        .filter(|(a, b)| a == b)
        .count();
    let matched_prefix = generated
        .iter()
        .zip(&item.target)
        .take_while(|(a, b)| a == b)
        .count();
    Ok(AuditResult {
        memorized: matched_prefix == n && generated.len() == n,
        matched_prefix,
        match_fraction: Some(same as f64 / n as f64),
        generated_text: tokenizer.map(|t| t.decode(&generated)).transpose()?,
        generated_ids: Some(generated),
        risk: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_and_print() {
        for (s, k, n) in [
            ("tinymem", 50, 50),
            ("pythia", 32, 48),
            ("pythia-40", 32, 40),
            ("carlini", 50, 50),
            ("k=3,n=7", 3, 7),
        ] {
            let d: Definition = s.parse().unwrap();
            assert_eq!((d.k(), d.n()), (k, n), "{s}");
            assert_eq!(d.to_string().parse::<Definition>().unwrap(), d);
        }
        for bad in [
            "",
            "gpt",
            "k=3",
            "k=0,n=2",
            "k=a,n=2",
            "x=1,n=2",
            // k + n would wrap to 0 in release builds (issue #14).
            "k=18446744073709551615,n=1",
            "k=1,n=18446744073709551615",
            "k=1048577,n=1",
        ] {
            let e = bad.parse::<Definition>().unwrap_err().to_string();
            assert!(e.contains("definition"), "{bad}: {e}");
        }
    }

    #[test]
    fn split_takes_k_then_n_and_rejects_short_sequences() {
        let d = Definition::Custom { k: 2, n: 3 };
        let it = d.split(&[1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!((it.prompt, it.target), (vec![1, 2], vec![3, 4, 5]));
        assert!(d
            .split(&[1, 2, 3])
            .unwrap_err()
            .to_string()
            .contains("k + n = 5"));
    }

    #[test]
    fn huge_custom_definitions_never_wrap() {
        let d = Definition::Custom {
            k: usize::MAX,
            n: 1,
        };
        assert_eq!(d.span(), usize::MAX);
        assert!(d.split(&[1, 2, 3]).is_err());
        let row = AuditRow {
            ids: Some(vec![1, 2, 3]),
            clean_ids: Some(vec![1, 2, 3]),
            ..Default::default()
        };
        let tk = crate::tinymem::tokenizer::build().unwrap();
        assert!(row.parse(d, &tk).is_err());
    }

    #[test]
    fn judging_counts_prefix_and_fraction() {
        let it = AuditItem {
            prompt: vec![1],
            target: vec![5, 6, 7, 8],
        };
        let r = judge(&it, vec![5, 6, 0, 8], None).unwrap();
        assert!(!r.memorized);
        assert_eq!(r.matched_prefix, 2);
        assert!((r.match_fraction.unwrap() - 0.75).abs() < 1e-12);
        assert!(judge(&it, vec![5, 6, 7, 8], None).unwrap().memorized);
    }
}
