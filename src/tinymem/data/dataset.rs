//! Rows and datasets: splits, roles, the training-set view with repetition, and the JSONL form.
//!
//! Invariants:
//! - A [`Dataset`] holds each distinct row once; [`Dataset::train_rows`] applies repetition,
//!   and the JSONL form records it in its header's config, not in the rows.
//! - [`Dataset::read_jsonl`] reads back what [`Dataset::write_jsonl`] wrote. It validates the
//!   header's format and config and every row (`max_ctx` tokens below the vocabulary size, a
//!   `clean_ids` twin on noised and backdoored rows only, duplication groups the config has) and
//!   refuses a bad line with an error naming it (1-based), never a panic.
//! - [`Dataset::test_sets`] lists the test sets in the paper's order (spec §1.3, §1.5).

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use super::super::vocab::VOCAB_SIZE;
use super::*;

/// Which split a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A clean task sequence.
    Clean,
    /// A noised main-task train row; `clean_ids` is its clean twin.
    Noised,
    /// A backdoored main-task row (train, or the held-out triggered test); `clean_ids` is its
    /// clean version.
    Backdoored,
    /// The clean version of a backdoored *test* row (the last backdoor test set).
    Triggered,
}

/// One padded sequence of the dataset. Serialized as one JSONL line, e.g.
/// `{"split":"train","task":7,"role":"noised","ids":[…],"clean_ids":[…]}`; `None` fields are
/// omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub split: Split,
    /// The task's step c.
    pub task: u32,
    pub role: Role,
    /// Token ids, padded to `max_ctx`.
    pub ids: Vec<u32>,
    /// The clean twin, on noised and backdoored rows only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_ids: Option<Vec<u32>>,
    /// Duplication group of a noised row, when duplication is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
}

impl Row {
    pub(super) fn clean(split: Split, task: u32, ids: Vec<u32>) -> Row {
        Row {
            split,
            task,
            role: Role::Clean,
            ids,
            clean_ids: None,
            group: None,
        }
    }

    /// Checks the row against the dataset's config; returns a description of the problem.
    fn check(&self, cfg: &DataConfig) -> Result<(), String> {
        let check_ids = |name: &str, ids: &[u32]| {
            if ids.len() != cfg.max_ctx {
                return Err(format!(
                    "`{name}` has {} tokens, expected max_ctx = {}",
                    ids.len(),
                    cfg.max_ctx
                ));
            }
            match ids.iter().find(|&&t| t as usize >= VOCAB_SIZE) {
                Some(t) => Err(format!("`{name}` holds token {t}, outside the vocabulary")),
                None => Ok(()),
            }
        };
        check_ids("ids", &self.ids)?;
        let needs_twin = matches!(self.role, Role::Noised | Role::Backdoored);
        match (&self.clean_ids, needs_twin) {
            (Some(c), true) => check_ids("clean_ids", c)?,
            (None, false) => {}
            (None, true) => return Err(format!("a {:?} row needs `clean_ids`", self.role)),
            (Some(_), false) => {
                return Err(format!("a {:?} row cannot have `clean_ids`", self.role))
            }
        }
        if let Some(g) = self.group {
            let groups = cfg.duplication.as_ref().map_or(0, Vec::len);
            if self.role != Role::Noised || g as usize >= groups {
                return Err(format!(
                    "group {g} is not a duplication group of this config"
                ));
            }
        }
        Ok(())
    }
}

/// A generated TinyMem dataset: its config and every distinct row once, in the order
/// artifact train rows, clean main train, auxiliary train (in `aux_steps` order), main test,
/// auxiliary tests, then (backdoor only) backdoored test rows and their clean versions.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub config: DataConfig,
    pub rows: Vec<Row>,
}

/// First line of the JSONL form.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Header {
    format: String,
    config: DataConfig,
}

pub(super) const JSONL_FORMAT: &str = "lethe-tinymem-math-v1";

impl Dataset {
    /// The training set as the paper builds it, with repetition applied: artifact train rows
    /// (noised or backdoored, each `noise_repeat` × its duplication count times, consecutively),
    /// then clean main train rows, then auxiliary train rows. Order carries no meaning beyond
    /// that; training reshuffles every epoch.
    pub fn train_rows(&self) -> Vec<&Row> {
        let mut out = Vec::new();
        for row in &self.rows {
            let n = self.config.train_repeat(row);
            out.extend(std::iter::repeat_n(row, n));
        }
        out
    }

    /// The test sets in the paper's order: main task (clean), then each auxiliary task in
    /// `aux_steps` order, named by their step (`"7"`, `"2"`, …); for backdoor data also
    /// `"backdoored"` (the held-out triggered test set, rewritten) and `"triggered"` (its clean
    /// version), row-aligned with each other.
    pub fn test_sets(&self) -> Vec<(String, Vec<&Row>)> {
        let cfg = &self.config;
        let clean_test = |task: u32| {
            self.rows
                .iter()
                .filter(|r| r.split == Split::Test && r.role == Role::Clean && r.task == task)
                .collect::<Vec<_>>()
        };
        let mut sets = vec![(cfg.main_step.to_string(), clean_test(cfg.main_step))];
        for &c in &cfg.aux_steps {
            sets.push((c.to_string(), clean_test(c)));
        }
        if cfg.artifact == Artifact::Backdoor {
            sets.push(("backdoored".to_string(), self.backdoor_test_rows()));
            let triggered = self
                .rows
                .iter()
                .filter(|r| r.role == Role::Triggered)
                .collect();
            sets.push(("triggered".to_string(), triggered));
        }
        sets
    }

    /// The noised rows (each once), with their clean twins in `clean_ids`.
    pub fn noised_rows(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.role == Role::Noised)
            .collect()
    }

    /// The noised rows whose noise falls inside token positions `[start, end)`: the
    /// denominator of the memorization metric (spec §3.1 uses [50, 100)).
    pub fn eligible_noised_rows(&self, start: usize, end: usize) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.role == Role::Noised)
            .filter(|r| {
                r.clean_ids
                    .as_ref()
                    .is_some_and(|c| noise_in_window(&r.ids, c, start, end))
            })
            .collect()
    }

    /// The held-out backdoored test rows (the backdoor memorization target, spec §3.2), with
    /// their clean versions in `clean_ids`.
    pub fn backdoor_test_rows(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.role == Role::Backdoored && r.split == Split::Test)
            .collect()
    }

    /// Writes the dataset as JSONL: a header line `{"format":…,"config":{…}}`, then each
    /// distinct row once (repetition is recorded in the config, not in the rows).
    pub fn write_jsonl<W: Write>(&self, w: &mut W) -> Result<(), DataError> {
        let header = Header {
            format: JSONL_FORMAT.to_string(),
            config: self.config.clone(),
        };
        serde_json::to_writer(&mut *w, &header).map_err(std::io::Error::from)?;
        w.write_all(b"\n")?;
        for row in &self.rows {
            serde_json::to_writer(&mut *w, row).map_err(std::io::Error::from)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    }

    /// Reads what [`Dataset::write_jsonl`] wrote, validating the config and every row.
    /// Blank lines are ignored.
    pub fn read_jsonl<R: BufRead>(r: R) -> Result<Dataset, DataError> {
        let mut config: Option<DataConfig> = None;
        let mut rows = Vec::new();
        for (k, line) in r.lines().enumerate() {
            let line = line?;
            let lineno = k + 1;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| DataError::Jsonl {
                line: lineno,
                reason,
            };
            match &config {
                None => {
                    let h: Header =
                        serde_json::from_str(&line).map_err(|e| bad(format!("header: {e}")))?;
                    if h.format != JSONL_FORMAT {
                        return Err(bad(format!(
                            "format `{}`, expected `{JSONL_FORMAT}`",
                            h.format
                        )));
                    }
                    h.config
                        .validate()
                        .map_err(|e| bad(format!("config: {e}")))?;
                    config = Some(h.config);
                }
                Some(cfg) => {
                    let row: Row = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
                    row.check(cfg).map_err(bad)?;
                    rows.push(row);
                }
            }
        }
        let config = config.ok_or(DataError::Jsonl {
            line: 1,
            reason: "empty file: missing header".to_string(),
        })?;
        Ok(Dataset { config, rows })
    }
}
