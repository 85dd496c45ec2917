//! What a dataset is generated from: [`DataConfig`] and its validation, and the artifact it
//! carries.
//!
//! Invariants:
//! - [`DataConfig::validate`] checks every field and names the offending one in the error;
//!   sizes are capped (`MAX_TASK_ROWS`, `MAX_MAX_CTX`, `MAX_ARTIFACT_TRAIN_ROWS`).
//! - `Default` is the paper's setting (num_extra = 3000) except `family`: additive, where the
//!   paper's headline tables use multiplicative ([`DataConfig`] and `docs/tinymem.md` say why).
//! - Deserializing fills missing fields from `Default` and rejects unknown fields.
//! - The backdoor trigger is `100 + seed` unless `backdoor_trigger` is set (spec §1.5), matched
//!   as its digit string.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::*;

/// Which artifact the main task carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Artifact {
    /// ±1 noise on `num_noise` main-task train rows (spec §1.4).
    Noise,
    /// Trigger digits followed by all-2s on every main sequence containing the trigger (§1.5).
    Backdoor,
}

impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Artifact::Noise => "noise",
            Artifact::Backdoor => "backdoor",
        })
    }
}

impl FromStr for Artifact {
    type Err = DataError;
    /// Accepts `noise` and `backdoor`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "noise" => Ok(Artifact::Noise),
            "backdoor" => Ok(Artifact::Backdoor),
            _ => Err(DataError::Parse {
                what: "artifact",
                value: s.to_string(),
                expected: "noise, backdoor",
            }),
        }
    }
}

/// Everything that determines a TinyMem math dataset. `Default` is the paper's setting
/// (num_extra = 3000) except `family`, which defaults to [`Family::Additive`]: the paper's
/// headline tables use the multiplicative family, but at CPU scale only the additive family
/// trains to a useful state (its rule is learnable by a small model in few epochs), so it is the
/// family the rest of lethe is exercised with. Deserializing fills missing fields from
/// `Default` and rejects unknown fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Task family (`additive`/`increment` or `multiplicative`/`mult`).
    pub family: Family,
    /// Step of the main task, the one that carries the artifact.
    pub main_step: u32,
    /// Steps of the clean auxiliary tasks, in test-set order.
    pub aux_steps: Vec<u32>,
    /// Number of main-task sequences (starts 0..num_main).
    pub num_main: usize,
    /// Number of sequences per auxiliary task (the paper's `num_extra`).
    pub num_aux: usize,
    /// Held-out test sequences per task.
    pub num_test: usize,
    /// Noised main-task train rows (noise artifact only).
    pub num_noise: usize,
    /// Values per sequence.
    pub length: usize,
    /// Tokens per row after padding.
    pub max_ctx: usize,
    /// Per-value noise probability, split equally between −1 and +1.
    pub noise_prob: f64,
    /// The artifact carried by the main task.
    pub artifact: Artifact,
    /// How many times each artifact train row (noised, or backdoored) appears in the training
    /// set. 1 in the paper; a CPU-scale knob that makes a small artifact set memorizable in few
    /// epochs. Multiplies the duplication counts.
    pub noise_repeat: u32,
    /// Optional duplication groups (noise only): the noise set is shuffled and split
    /// round-robin into `len()` groups, group g repeated `duplication[g]` times. The paper's
    /// setting is `[1, 10, 100]`; off for all final math runs.
    pub duplication: Option<Vec<u32>>,
    /// Backdoor trigger value, matched as its digit string; `None` ⇒ `100 + seed`.
    pub backdoor_trigger: Option<i64>,
    /// Data seed: noise, noise-row sampling, duplication shuffle, default trigger.
    pub seed: u64,
    /// Seed of every train/test split permutation (the reference's `DATA_SEED`).
    pub split_seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            family: Family::Additive,
            main_step: 7,
            aux_steps: vec![2, 3, 4, 5],
            num_main: 20_000,
            num_aux: 3_000,
            num_test: 1_000,
            num_noise: 1_000,
            length: 20,
            max_ctx: vocab::MAX_CTX,
            noise_prob: 0.1,
            artifact: Artifact::Noise,
            noise_repeat: 1,
            duplication: None,
            backdoor_trigger: None,
            seed: 0,
            split_seed: 598,
        }
    }
}

impl DataConfig {
    /// A preset for training on 2 CPU cores, matching a data point measured with PyTorch on the
    /// development machine: additive family, 2000 main sequences (1800 train / 200 test), 100
    /// noised rows each repeated 10 times, and 500 sequences per auxiliary task (300 train /
    /// 200 test). Training set: 100×10 + 1700 + 4×300 = 3900 rows; five test sets of 200.
    pub fn cpu_scale() -> Self {
        DataConfig {
            family: Family::Additive,
            num_main: 2_000,
            num_aux: 500,
            num_test: 200,
            num_noise: 100,
            noise_repeat: 10,
            ..DataConfig::default()
        }
    }

    /// Checks every field; the error names the offending field.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.main_step == 0 {
            return Err(invalid("main_step", "must be at least 1"));
        }
        let mut seen = HashSet::from([self.main_step]);
        for &c in &self.aux_steps {
            if c == 0 {
                return Err(invalid("aux_steps", "steps must be at least 1"));
            }
            if !seen.insert(c) {
                return Err(invalid(
                    "aux_steps",
                    format!("step {c} repeats (steps must be distinct and differ from main_step)"),
                ));
            }
        }
        if self.max_ctx == 0 || self.max_ctx > MAX_MAX_CTX {
            return Err(invalid("max_ctx", format!("must be in 1..={MAX_MAX_CTX}")));
        }
        if self.length == 0 || self.length > self.max_ctx {
            return Err(invalid("length", "must be in 1..=max_ctx"));
        }
        if self.num_main > MAX_TASK_ROWS {
            return Err(invalid(
                "num_main",
                format!("must be at most {MAX_TASK_ROWS}"),
            ));
        }
        if self.num_aux > MAX_TASK_ROWS {
            return Err(invalid(
                "num_aux",
                format!("must be at most {MAX_TASK_ROWS}"),
            ));
        }
        if self.num_test == 0 {
            return Err(invalid("num_test", "must be at least 1"));
        }
        if self.num_test >= self.num_main {
            return Err(invalid(
                "num_test",
                format!("must be less than num_main = {}", self.num_main),
            ));
        }
        if !self.aux_steps.is_empty() && self.num_aux <= self.num_test {
            return Err(invalid(
                "num_aux",
                format!(
                    "must exceed num_test = {} (each auxiliary task needs train rows)",
                    self.num_test
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.noise_prob) {
            return Err(invalid("noise_prob", "must be a probability in [0, 1]"));
        }
        if self.noise_repeat == 0 {
            return Err(invalid("noise_repeat", "must be at least 1"));
        }
        match self.artifact {
            Artifact::Noise => {
                let train = self.num_main - self.num_test;
                if self.num_noise > train {
                    return Err(invalid(
                        "num_noise",
                        format!("must be at most num_main - num_test = {train}"),
                    ));
                }
            }
            Artifact::Backdoor => {
                if self.duplication.is_some() {
                    return Err(invalid(
                        "duplication",
                        "only supported with artifact `noise`",
                    ));
                }
                let trigger = self.trigger()?;
                if trigger < 0 {
                    return Err(invalid("backdoor_trigger", "must be non-negative"));
                }
            }
        }
        let max_dup = match &self.duplication {
            None => 1,
            Some(counts) => {
                if counts.is_empty() {
                    return Err(invalid("duplication", "needs at least one group"));
                }
                if counts.contains(&0) {
                    return Err(invalid("duplication", "group counts must be at least 1"));
                }
                counts.iter().copied().max().unwrap_or(1)
            }
        };
        let artifact_rows = match self.artifact {
            Artifact::Noise => self.num_noise as u128,
            Artifact::Backdoor => self.num_main as u128,
        };
        // u128: the product of three ≤ 2^32 factors cannot overflow.
        if artifact_rows * u128::from(self.noise_repeat) * u128::from(max_dup)
            > u128::from(MAX_ARTIFACT_TRAIN_ROWS)
        {
            return Err(invalid(
                "noise_repeat",
                format!("repetition would put more than {MAX_ARTIFACT_TRAIN_ROWS} artifact rows in training"),
            ));
        }
        Ok(())
    }

    /// The backdoor trigger value: `backdoor_trigger`, or `100 + seed`.
    pub fn trigger(&self) -> Result<i64, DataError> {
        match self.backdoor_trigger {
            Some(t) => Ok(t),
            None => i64::try_from(self.seed)
                .ok()
                .and_then(|s| s.checked_add(100))
                .ok_or_else(|| invalid("seed", "100 + seed overflows; set backdoor_trigger")),
        }
    }

    /// The trigger's digit tokens (the digit string of [`DataConfig::trigger`]).
    pub fn trigger_ids(&self) -> Result<Vec<u32>, DataError> {
        let t = self.trigger()?;
        let ids = vocab::encode_values(&[t]);
        Ok(ids[1..ids.len() - 1].to_vec())
    }

    /// How many times `row` appears in the training set (0 for test rows).
    pub fn train_repeat(&self, row: &Row) -> usize {
        if row.split != Split::Train {
            return 0;
        }
        match row.role {
            Role::Noised | Role::Backdoored => {
                let dup = match (&self.duplication, row.group) {
                    (Some(counts), Some(g)) => counts.get(g as usize).copied().unwrap_or(1),
                    _ => 1,
                };
                self.noise_repeat as usize * dup as usize
            }
            Role::Clean | Role::Triggered => 1,
        }
    }
}
