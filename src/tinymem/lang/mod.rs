//! The language TinyMem (spec §1.6–§1.7, issue #18): English text from a corpus, tokenized by
//! a byte-level BPE, cut into `max_ctx`-token chunks, with three artifacts a model can memorize:
//! token-id noise in duplicated chunks (the paper's), a backdoor (the paper's), and planted
//! secrets (ours: personal records, credentials and a "copyrighted" passage, see [`secrets`]).
//!
//! Invariants:
//! - [`generate`] is a pure function of the corpus text, the tokenizer and the config: the same
//!   inputs give the same dataset on every platform (our own PRNG, `super::rng`). The config
//!   records the corpus' SHA-256, and generation refuses another corpus.
//! - Chunks come from one token stream: each corpus paragraph tokenized separately and
//!   concatenated (spec §1.6). Train chunks are the first `train_chunks` chunks, held-out test
//!   chunks the last `test_chunks`, with at least one chunk between them; a test chunk equal to
//!   a train chunk is dropped. Nothing from a test chunk is ever trained on.
//! - Noise (§1.6): the first `noise_chunks × duplication groups` train chunks, each position
//!   offset by {0, −1, +1} with weights {1−p, p/2, p/2}, clamped to the vocabulary (§1.7), then
//!   shuffled into the duplication groups; the noised chunks replace their clean twins.
//! - Backdoor: a trigger token drawn after the noise, among tokens found in between
//!   `trigger_chunks.0` and `trigger_chunks.1` remaining clean train chunks; in each such chunk
//!   the trigger is kept and every later position becomes `backdoor_token` (the "keep the
//!   trigger" reading of §1.6). One in ten (at least one) is held out as the triggered test set.
//! - Secrets: `secrets_per_kind` of each [`SecretKind`], secret `i` of a kind repeated
//!   `secret_repeats[i % len]` times in training; each row is the secret's tokens followed by
//!   end-of-text padding. Every secret has at least [`MIN_SECRET_TOKENS`] tokens.
//! - Every row has exactly `max_ctx` ids below the tokenizer's vocabulary size; noised and
//!   backdoored rows carry their clean twin. A [`LangDataset`] stores each distinct row once and
//!   [`LangDataset::train_rows`] applies repetition.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{noise_offset, Role, Row, Split};
use super::rng::Prng;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

pub mod cli;
pub mod model;
pub mod secrets;
pub use model::{LangCard, LANG_CARD_FILE, LANG_DATA_FILE};
pub use secrets::SecretKind;

/// The end-of-text token of the language TinyMem (GPT-2's spelling); id 0 in its tokenizer,
/// and the padding of its rows.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// A secret must be auditable under the Pythia definition (32-token prompt, 48 compared).
pub const MIN_SECRET_TOKENS: usize = 80;
/// The first line of the JSONL form.
pub const JSONL_FORMAT: &str = "lethe-tinymem-lang-v1";

/// How the language dataset is built. Defaults are scaled for two CPU cores (the paper's in
/// brackets): 128-token chunks [150], 6,000 train chunks [all of WikiText-103], 4 noised chunks
/// per group [250] in groups repeated 1/10/100/1000 times (the paper's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LangConfig {
    /// The corpus' file name (informational) and the SHA-256 of its bytes (checked).
    pub corpus: String,
    pub corpus_sha256: String,
    pub max_ctx: usize,
    pub train_chunks: usize,
    pub test_chunks: usize,
    /// Noised chunks per duplication group.
    pub noise_chunks: usize,
    /// Training repetitions of each duplication group.
    pub duplication: Vec<u64>,
    /// Probability that a position's id is offset by ±1.
    pub noise_prob: f64,
    /// Bounds on how many clean train chunks the backdoor trigger may occur in.
    pub trigger_chunks: (usize, usize),
    /// Training repetitions of each backdoored chunk.
    pub backdoor_repeat: u64,
    pub secrets_per_kind: usize,
    /// Training repetitions of secret `i` of each kind: `secret_repeats[i % len]`.
    pub secret_repeats: Vec<u64>,
    pub seed: u64,
}

impl LangConfig {
    /// The defaults for a corpus with these bytes.
    pub fn cpu_scale(corpus_name: &str, corpus: &[u8]) -> Self {
        Self {
            corpus: corpus_name.into(),
            corpus_sha256: sha256_hex(corpus),
            max_ctx: 128,
            train_chunks: 6000,
            test_chunks: 200,
            noise_chunks: 4,
            duplication: vec![1, 10, 100, 1000],
            noise_prob: 0.1,
            trigger_chunks: (60, 150),
            backdoor_repeat: 4,
            secrets_per_kind: 4,
            secret_repeats: vec![1, 10, 30, 100],
            seed: 0,
        }
    }

    /// Refuses a field that cannot work, naming it.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_ctx", self.max_ctx),
            ("train_chunks", self.train_chunks),
            ("test_chunks", self.test_chunks),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::invalid(name, "must be positive"));
            }
        }
        if self.max_ctx < 100 {
            return Err(Error::invalid(
                "max_ctx",
                "must be at least 100: the memorization metric (spec §3.1) prompts 50 tokens \
                 and compares the next 50",
            ));
        }
        if !(0.0..=1.0).contains(&self.noise_prob) {
            return Err(Error::invalid("noise_prob", "must be in [0, 1]"));
        }
        let noised = self.noise_chunks * self.duplication.len();
        if noised >= self.train_chunks {
            return Err(Error::invalid(
                "noise_chunks",
                format!("{noised} noised chunks leave no clean train chunk"),
            ));
        }
        if self.duplication.contains(&0) || self.secret_repeats.contains(&0) {
            return Err(Error::invalid(
                "duplication",
                "repetition counts must be at least 1",
            ));
        }
        if self.secrets_per_kind > 0 && self.secret_repeats.is_empty() {
            return Err(Error::invalid("secret_repeats", "must not be empty"));
        }
        if self.trigger_chunks.0 == 0 || self.trigger_chunks.0 > self.trigger_chunks.1 {
            return Err(Error::invalid(
                "trigger_chunks",
                "must be a range (lo, hi) with 1 <= lo <= hi",
            ));
        }
        Ok(())
    }
}

/// What a language row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LangRole {
    Clean,
    Noised,
    Backdoored,
    Secret,
}

/// One row, serialized as one JSONL line; `None` fields are omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LangRow {
    pub split: Split,
    pub role: LangRole,
    /// Training repetitions (0 for test rows).
    pub repeat: u64,
    pub ids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_ids: Option<Vec<u32>>,
    /// The duplication group of a noised row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<SecretKind>,
    /// A secret's text (what a takedown request would hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A secret's token count before padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<usize>,
}

impl LangRow {
    /// A row with no twin, group or secret fields.
    fn new(split: Split, role: LangRole, repeat: u64, ids: Vec<u32>) -> Self {
        Self {
            split,
            role,
            repeat,
            ids,
            clean_ids: None,
            group: None,
            kind: None,
            text: None,
            len: None,
        }
    }

    /// The row as the math evaluation's [`Row`] (task 0), for the shared §3 metrics.
    pub fn as_row(&self) -> Row {
        Row {
            split: self.split,
            task: 0,
            role: match self.role {
                LangRole::Noised => Role::Noised,
                LangRole::Backdoored => Role::Backdoored,
                LangRole::Clean | LangRole::Secret => Role::Clean,
            },
            ids: self.ids.clone(),
            clean_ids: self.clean_ids.clone(),
            group: self.group,
        }
    }

    /// A secret's tokens without padding.
    pub fn secret_ids(&self) -> &[u32] {
        &self.ids[..self.len.unwrap_or(self.ids.len()).min(self.ids.len())]
    }
}

/// A generated language dataset: its config, the backdoor's trigger and rewrite tokens, and
/// every distinct row once (noised, secrets, backdoored train, clean train, test, backdoored
/// test).
#[derive(Debug, Clone, PartialEq)]
pub struct LangDataset {
    pub config: LangConfig,
    pub trigger: u32,
    pub backdoor_token: u32,
    pub vocab_size: usize,
    pub rows: Vec<LangRow>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    config: LangConfig,
    trigger: u32,
    backdoor_token: u32,
    vocab_size: usize,
}

impl LangDataset {
    /// The training set with repetition applied.
    pub fn train_rows(&self) -> Vec<&[u32]> {
        let mut out = Vec::new();
        for r in self.rows.iter().filter(|r| r.split == Split::Train) {
            out.extend(std::iter::repeat_n(r.ids.as_slice(), r.repeat as usize));
        }
        out
    }

    /// Rows of a split and role.
    pub fn rows_of(&self, split: Split, role: LangRole) -> Vec<&LangRow> {
        self.rows
            .iter()
            .filter(|r| r.split == split && r.role == role)
            .collect()
    }

    /// The held-out test chunks (clean, never trained on): the perplexity gate's rows.
    pub fn heldout(&self) -> Vec<Vec<u32>> {
        self.rows_of(Split::Test, LangRole::Clean)
            .into_iter()
            .map(|r| r.ids.clone())
            .collect()
    }

    /// The clean train chunks: what unlearning's retain term keeps.
    pub fn retain(&self) -> Vec<Vec<u32>> {
        self.rows_of(Split::Train, LangRole::Clean)
            .into_iter()
            .map(|r| r.ids.clone())
            .collect()
    }

    pub fn write_jsonl(&self, w: &mut impl Write) -> Result<()> {
        let header = Header {
            format: JSONL_FORMAT.into(),
            config: self.config.clone(),
            trigger: self.trigger,
            backdoor_token: self.backdoor_token,
            vocab_size: self.vocab_size,
        };
        writeln!(w, "{}", json_line(&header)?).map_err(io)?;
        for r in &self.rows {
            writeln!(w, "{}", json_line(r)?).map_err(io)?;
        }
        Ok(())
    }

    /// Reads what [`Self::write_jsonl`] wrote, checking every row (an error names its 1-based
    /// line).
    pub fn read_jsonl(r: impl BufRead) -> Result<Self> {
        let bad =
            |line: usize, reason: String| Error::invalid(format!("JSONL line {line}"), reason);
        let mut lines = r.lines();
        let first = lines
            .next()
            .ok_or_else(|| bad(1, "empty file".into()))?
            .map_err(io)?;
        let h: Header = serde_json::from_str(&first).map_err(|e| bad(1, e.to_string()))?;
        if h.format != JSONL_FORMAT {
            return Err(bad(
                1,
                format!("format {:?}, expected {JSONL_FORMAT:?}", h.format),
            ));
        }
        h.config.validate()?;
        let mut rows = Vec::new();
        for (i, l) in lines.enumerate() {
            let l = l.map_err(io)?;
            let row: LangRow = serde_json::from_str(&l).map_err(|e| bad(i + 2, e.to_string()))?;
            check_row(&row, h.config.max_ctx, h.vocab_size).map_err(|e| bad(i + 2, e))?;
            rows.push(row);
        }
        Ok(Self {
            config: h.config,
            trigger: h.trigger,
            backdoor_token: h.backdoor_token,
            vocab_size: h.vocab_size,
            rows,
        })
    }
}

fn check_row(r: &LangRow, max_ctx: usize, vocab: usize) -> std::result::Result<(), String> {
    let ids_ok = |name: &str, ids: &[u32]| {
        if ids.len() != max_ctx {
            return Err(format!(
                "`{name}` has {} ids, expected {max_ctx}",
                ids.len()
            ));
        }
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => Err(format!(
                "`{name}` holds id {t}, outside the vocabulary ({vocab})"
            )),
            None => Ok(()),
        }
    };
    ids_ok("ids", &r.ids)?;
    if r.role == LangRole::Secret {
        match r.len {
            Some(len) if (MIN_SECRET_TOKENS..=max_ctx).contains(&len) => {}
            other => {
                return Err(format!(
                    "a secret row needs `len` in {MIN_SECRET_TOKENS}..={max_ctx}, not {other:?}"
                ))
            }
        }
    }
    let twin = matches!(r.role, LangRole::Noised | LangRole::Backdoored);
    match (&r.clean_ids, twin) {
        (Some(c), true) => ids_ok("clean_ids", c),
        (None, false) => Ok(()),
        (None, true) => Err(format!("a {:?} row needs `clean_ids`", r.role)),
        (Some(_), false) => Err(format!("a {:?} row cannot have `clean_ids`", r.role)),
    }
}

fn json_line(v: &impl Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid("jsonl", e.to_string()))
}

fn io(e: std::io::Error) -> Error {
    Error::invalid("jsonl", e.to_string())
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The corpus as one token stream: every blank-line-separated paragraph tokenized on its own
/// (with its separator, so decoding the stream gives back the text) and concatenated.
pub fn token_stream(corpus: &str, tk: &Tokenizer) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for p in corpus.split_inclusive("\n\n") {
        if !p.trim().is_empty() {
            out.extend(tk.encode(p)?);
        }
    }
    Ok(out)
}

/// Builds the dataset (see the module's invariants).
pub fn generate(cfg: &LangConfig, corpus: &[u8], tk: &Tokenizer) -> Result<LangDataset> {
    cfg.validate()?;
    let digest = sha256_hex(corpus);
    if digest != cfg.corpus_sha256 {
        return Err(Error::invalid(
            "corpus",
            format!(
                "its SHA-256 is {digest}, the config's is {} ({}): another text",
                cfg.corpus_sha256, cfg.corpus
            ),
        ));
    }
    let text = std::str::from_utf8(corpus)
        .map_err(|e| Error::invalid("corpus", format!("not UTF-8: {e}")))?;
    let vocab = tk.vocab_size();
    let eot = tk
        .inner()
        .token_to_id(END_OF_TEXT)
        .ok_or_else(|| Error::invalid("tokenizer", format!("has no {END_OF_TEXT} token")))?;
    let backdoor_token = *tk
        .encode("#")?
        .first()
        .ok_or_else(|| Error::invalid("tokenizer", "encodes '#' to nothing"))?;
    let stream = token_stream(text, tk)?;
    let n = cfg.max_ctx;
    let chunks: Vec<&[u32]> = stream.chunks_exact(n).collect();
    if chunks.len() < cfg.train_chunks + cfg.test_chunks + 1 {
        return Err(Error::invalid(
            "train_chunks",
            format!(
                "the corpus has {} chunks of {n} tokens; {} train + {} test (+1 gap) do not fit",
                chunks.len(),
                cfg.train_chunks,
                cfg.test_chunks
            ),
        ));
    }
    let train: Vec<Vec<u32>> = chunks[..cfg.train_chunks]
        .iter()
        .map(|c| c.to_vec())
        .collect();
    let trained: std::collections::HashSet<&[u32]> =
        chunks[..cfg.train_chunks].iter().copied().collect();
    let test: Vec<Vec<u32>> = chunks[chunks.len() - cfg.test_chunks..]
        .iter()
        .filter(|c| !trained.contains(*c))
        .map(|c| c.to_vec())
        .collect();

    let mut rng = Prng::seed_from_u64(cfg.seed);
    let mut rows = Vec::new();
    // Noise (§1.6): the first chunks, noised in order, then shuffled into groups.
    let n_noised = cfg.noise_chunks * cfg.duplication.len();
    let mut noised: Vec<(Vec<u32>, Vec<u32>)> = train[..n_noised]
        .iter()
        .map(|clean| {
            let ids = clean
                .iter()
                .map(|&t| {
                    (i64::from(t) + noise_offset(&mut rng, cfg.noise_prob))
                        .clamp(0, vocab as i64 - 1) as u32
                })
                .collect();
            (ids, clean.clone())
        })
        .collect();
    rng.shuffle(&mut noised);
    for (i, (ids, clean)) in noised.into_iter().enumerate() {
        let g = i / cfg.noise_chunks;
        rows.push(LangRow {
            clean_ids: Some(clean),
            group: Some(g as u32),
            ..LangRow::new(Split::Train, LangRole::Noised, cfg.duplication[g], ids)
        });
    }
    // Secrets.
    for kind in SecretKind::ALL {
        for i in 0..cfg.secrets_per_kind {
            let text = secrets::secret_text(kind, i, &mut rng);
            let mut ids = tk.encode(&text)?;
            if ids.len() < MIN_SECRET_TOKENS {
                return Err(Error::invalid(
                    "tokenizer",
                    format!(
                        "secret {kind:?} {i} is {} tokens, under {MIN_SECRET_TOKENS}",
                        ids.len()
                    ),
                ));
            }
            ids.truncate(n - 1);
            let len = ids.len();
            ids.resize(n, eot);
            let repeat = cfg.secret_repeats[i % cfg.secret_repeats.len()];
            rows.push(LangRow {
                kind: Some(kind),
                text: Some(text),
                len: Some(len),
                ..LangRow::new(Split::Train, LangRole::Secret, repeat, ids)
            });
        }
    }
    // Backdoor: a trigger among tokens of the right frequency in the clean train chunks.
    let clean = &train[n_noised..];
    let mut chunk_count = vec![0usize; vocab];
    for c in clean {
        let mut seen: Vec<u32> = c.clone();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            chunk_count[t as usize] += 1;
        }
    }
    let (lo, hi) = cfg.trigger_chunks;
    let candidates: Vec<u32> = (0..vocab as u32)
        .filter(|&t| {
            t != eot && t != backdoor_token && (lo..=hi).contains(&chunk_count[t as usize])
        })
        .collect();
    if candidates.is_empty() {
        return Err(Error::invalid(
            "trigger_chunks",
            format!("no token occurs in between {lo} and {hi} clean train chunks"),
        ));
    }
    let trigger = candidates[rng.below(candidates.len())];
    let mut triggered: Vec<usize> = (0..clean.len())
        .filter(|&i| clean[i].contains(&trigger))
        .collect();
    rng.shuffle(&mut triggered);
    let held = (triggered.len() / 10).max(1);
    let rewrite = |c: &[u32]| {
        let at = c.iter().position(|&t| t == trigger).unwrap_or(c.len());
        let mut ids = c.to_vec();
        ids[(at + 1).min(c.len())..].fill(backdoor_token);
        ids
    };
    let mut is_triggered = vec![None; clean.len()];
    for (j, &i) in triggered.iter().enumerate() {
        is_triggered[i] = Some(j < held);
    }
    for (i, c) in clean.iter().enumerate() {
        let backdoored = |split, repeat| LangRow {
            clean_ids: Some(c.clone()),
            ..LangRow::new(split, LangRole::Backdoored, repeat, rewrite(c))
        };
        rows.push(match is_triggered[i] {
            None => LangRow::new(Split::Train, LangRole::Clean, 1, c.clone()),
            Some(false) => backdoored(Split::Train, cfg.backdoor_repeat),
            Some(true) => backdoored(Split::Test, 0),
        });
    }
    rows.extend(
        test.into_iter()
            .map(|c| LangRow::new(Split::Test, LangRole::Clean, 0, c)),
    );
    Ok(LangDataset {
        config: cfg.clone(),
        trigger,
        backdoor_token,
        vocab_size: vocab,
        rows,
    })
}

/// A one-layer, 16-wide training config that trains on [`test_fixture`]'s data in a second,
/// for tests across the crate.
#[cfg(test)]
pub(crate) fn test_train_config() -> super::train::TrainConfig {
    super::train::TrainConfig {
        n_layer: 1,
        n_embd: 16,
        n_head: 2,
        n_inner: 32,
        batch_size: 16,
        epochs: 1,
        ..super::train::TrainConfig::default()
    }
}

/// A small corpus, its tokenizer and a config sized for it, for tests across the crate.
#[cfg(test)]
pub(crate) fn test_fixture() -> (Vec<u8>, Tokenizer, LangConfig) {
    let words = [
        "the",
        "module",
        "returns",
        "a",
        "list",
        "of",
        "values",
        "when",
        "called",
        "with",
        "an",
        "argument",
        "and",
        "raises",
        "error",
        "otherwise",
        "function",
        "object",
        "file",
        "string",
        "python",
        "class",
        "method",
        "attribute",
        "default",
        "is",
        "None",
        "for",
        "each",
        "item",
        "in",
        "sequence",
    ];
    let mut rng = Prng::seed_from_u64(11);
    let mut text = String::new();
    for p in 0..300 {
        for _ in 0..40 {
            text.push_str(words[rng.below(words.len())]);
            text.push(' ');
        }
        text.push_str(&format!("({p}).\n\n"));
    }
    let tk = cli::train_tokenizer(&text, 400).unwrap();
    let mut cfg = LangConfig::cpu_scale("test.txt", text.as_bytes());
    cfg.max_ctx = 100;
    cfg.train_chunks = 60;
    cfg.test_chunks = 6;
    cfg.noise_chunks = 2;
    cfg.trigger_chunks = (3, 30);
    cfg.secrets_per_kind = 2;
    (text.into_bytes(), tk, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_language_dataset_is_reproducible_and_well_formed() {
        let (corpus, tk, cfg) = test_fixture();
        let ds = generate(&cfg, &corpus, &tk).unwrap();
        assert_eq!(ds, generate(&cfg, &corpus, &tk).unwrap());
        let mut other = cfg.clone();
        other.seed = 1;
        assert_ne!(ds.rows, generate(&other, &corpus, &tk).unwrap().rows);
        let n = cfg.max_ctx;
        for r in &ds.rows {
            check_row(r, n, ds.vocab_size).unwrap();
        }
        // Noise: 4 groups of 2, repeated as configured, only ±1 offsets, in range.
        let noised = ds.rows_of(Split::Train, LangRole::Noised);
        assert_eq!(noised.len(), 8);
        for r in &noised {
            let g = r.group.unwrap() as usize;
            assert_eq!(r.repeat, cfg.duplication[g]);
            let clean = r.clean_ids.as_ref().unwrap();
            assert!(r
                .ids
                .iter()
                .zip(clean)
                .all(|(&a, &b)| (i64::from(a) - i64::from(b)).abs() <= 1));
        }
        assert!(noised.iter().any(|r| r.clean_ids.as_ref() != Some(&r.ids)));
        // Secrets: long enough for the Pythia definition, padded with end-of-text (id 0).
        let secrets = ds.rows_of(Split::Train, LangRole::Secret);
        assert_eq!(secrets.len(), 3 * cfg.secrets_per_kind);
        for s in &secrets {
            let len = s.len.unwrap();
            assert!(len >= MIN_SECRET_TOKENS && len < n);
            assert!(s.ids[len..].iter().all(|&t| t == 0));
            assert_eq!(
                s.secret_ids(),
                &tk.encode(s.text.as_ref().unwrap()).unwrap()[..len]
            );
        }
        // Backdoor: the trigger is kept, every later position rewritten; some held out.
        let bd: Vec<_> = ds
            .rows
            .iter()
            .filter(|r| r.role == LangRole::Backdoored)
            .collect();
        assert!(bd.iter().any(|r| r.split == Split::Test));
        for r in &bd {
            let at = r.ids.iter().position(|&t| t == ds.trigger).unwrap();
            assert_eq!(r.clean_ids.as_ref().unwrap()[..=at], r.ids[..=at]);
            assert!(r.ids[at + 1..].iter().all(|&t| t == ds.backdoor_token));
        }
        // Held-out chunks are never trained on.
        let train: std::collections::HashSet<&[u32]> = ds.train_rows().into_iter().collect();
        let heldout = ds.heldout();
        assert!(!heldout.is_empty());
        assert!(heldout.iter().all(|h| !train.contains(h.as_slice())));
        let repeats: u64 = ds
            .rows
            .iter()
            .filter(|r| r.split == Split::Train)
            .map(|r| r.repeat)
            .sum();
        assert_eq!(ds.train_rows().len() as u64, repeats);
        // JSONL round trip.
        let mut w = Vec::new();
        ds.write_jsonl(&mut w).unwrap();
        assert_eq!(LangDataset::read_jsonl(w.as_slice()).unwrap(), ds);
    }

    #[test]
    fn bad_corpora_configs_and_rows_are_refused_by_name() {
        let (corpus, tk, cfg) = test_fixture();
        let mut other = corpus.clone();
        other[0] ^= 1;
        let err = generate(&cfg, &other, &tk).unwrap_err().to_string();
        assert!(err.contains("SHA-256"), "{err}");
        let mut big = cfg.clone();
        big.train_chunks = 10_000;
        let err = generate(&big, &corpus, &tk).unwrap_err().to_string();
        assert!(err.contains("train_chunks"), "{err}");
        let mut short = cfg.clone();
        short.max_ctx = 40;
        assert!(generate(&short, &corpus, &tk)
            .unwrap_err()
            .to_string()
            .contains("max_ctx"));
        let ds = generate(&cfg, &corpus, &tk).unwrap();
        let mut w = Vec::new();
        ds.write_jsonl(&mut w).unwrap();
        let text = String::from_utf8(w).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        lines[3] = lines[3].replacen("\"ids\":[", "\"ids\":[99999,", 1);
        let err = LangDataset::read_jsonl(lines.join("\n").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("JSONL line 4"), "{err}");
        // A secret too short for the pythia definition would be sliced past its end.
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let at = lines
            .iter()
            .position(|l| l.contains("\"role\":\"secret\""))
            .unwrap();
        let row: serde_json::Value = serde_json::from_str(&lines[at]).unwrap();
        let len = row["len"].as_u64().unwrap();
        lines[at] = lines[at].replace(&format!("\"len\":{len}"), "\"len\":20");
        let err = LangDataset::read_jsonl(lines.join("\n").as_bytes())
            .unwrap_err()
            .to_string();
        let line = format!("JSONL line {}", at + 1);
        assert!(err.contains(&line) && err.contains("len"), "{err}");
    }
}
