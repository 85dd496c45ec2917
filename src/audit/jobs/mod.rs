//! Audit jobs: a whole JSONL dataset audited in the background, durably, with progress, and
//! results kept per sequence (`POST /v1/audits`, `lethe audit`).
//!
//! A job audits every row of one dataset file under one or more [`Definition`]s with the
//! single-pass verdict ([`super::audit_with`]), and sums the verdicts by definition and by the
//! values of any `group_by` fields of the input rows (a duplication count, a split, a source).
//!
//! Invariants:
//! - A job is accepted only after every row of its dataset parsed under every definition
//!   ([`scan`]); the error names the file and line. The dataset's SHA-256 is recorded, and a job
//!   whose file changed since is failed rather than resumed on different rows.
//! - Rows are audited in file order in chunks of [`CHUNK_ROWS`]; a chunk's results, the job's
//!   progress and its running summary commit in one transaction ([`store`]). A crash or kill
//!   loses at most the chunk in flight, and the resumed job starts at the first row not
//!   committed, so its results and summary equal an uninterrupted run's.
//! - A job audits one version. The version is recorded when the job first starts; a job resumed
//!   after the live version changed starts again from its first row on the new version (its
//!   `restarts` counts this), so no summary mixes versions.
//! - The summary holds counts only, never timings, so the same dataset, definitions and weights
//!   give the same summary through the API and the CLI.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{AuditItem, AuditResult, AuditRow, Definition, RiskOptions};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

pub mod run;
pub mod store;

pub use run::{AuditJobs, JobsConfig};
pub use store::{AuditJob, JobState, JobStore, ResultRow};

/// Rows audited and committed together.
pub const CHUNK_ROWS: usize = 512;
/// The most `group_by` fields a job may name.
pub const MAX_GROUP_FIELDS: usize = 8;
/// The most definitions a job may name.
pub const MAX_DEFINITIONS: usize = 8;
/// Distinct values of one grouping field beyond which the rest are summed under
/// [`OTHER_GROUP`], so a field with a value per row cannot grow the summary without bound.
pub const MAX_GROUP_VALUES: usize = 1000;
/// The group that collects values beyond [`MAX_GROUP_VALUES`].
pub const OTHER_GROUP: &str = "(other)";

/// What a job audits its rows for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Every row is audited under each (default: the model's own definition).
    #[serde(default)]
    pub definitions: Vec<Definition>,
    /// Input fields whose values the summary is broken down by.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Sequences per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Also measure extraction risk beyond one greedy query ([`super::risk`]).
    #[serde(default)]
    pub risk: Option<RiskOptions>,
}

fn default_batch_size() -> usize {
    64
}

impl JobSpec {
    /// Checks the spec and fills the default definition for a model of `arch`.
    pub fn validated(mut self, arch: crate::models::Architecture) -> Result<Self> {
        if self.definitions.is_empty() {
            self.definitions.push(Definition::default_for(arch));
        }
        let mut unique: Vec<Definition> = Vec::with_capacity(self.definitions.len());
        for d in self.definitions {
            if !unique.contains(&d) {
                unique.push(d);
            }
        }
        self.definitions = unique;
        if self.definitions.len() > MAX_DEFINITIONS {
            return Err(Error::invalid(
                "definitions",
                format!("at most {MAX_DEFINITIONS} definitions per job"),
            ));
        }
        if self.group_by.len() > MAX_GROUP_FIELDS {
            return Err(Error::invalid(
                "group_by",
                format!("at most {MAX_GROUP_FIELDS} fields"),
            ));
        }
        if let Some(i) = self
            .group_by
            .iter()
            .position(|f| f.is_empty() || f.len() > 64)
        {
            return Err(Error::invalid(
                format!("group_by[{i}]"),
                "a field name has 1 to 64 characters",
            ));
        }
        if !(1..=1024).contains(&self.batch_size) {
            return Err(Error::invalid("batch_size", "must be between 1 and 1024"));
        }
        if let Some(r) = &self.risk {
            r.validate()?;
        }
        Ok(self)
    }
}

/// Counts over a set of rows under one definition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub sequences: u64,
    pub memorized: u64,
    /// `memorized / sequences` (0 when empty).
    pub rate: f64,
    /// With risk: extractable by any measure ([`AuditResult::extractable`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extractable: Option<u64>,
}

impl Tally {
    fn add(&mut self, r: &AuditResult) {
        self.sequences += 1;
        self.memorized += u64::from(r.memorized);
        if r.risk.is_some() {
            *self.extractable.get_or_insert(0) += u64::from(r.extractable());
        }
        self.rate = self.memorized as f64 / self.sequences as f64;
    }
}

/// One definition's totals and their breakdown by grouping field and value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DefinitionSummary {
    #[serde(flatten)]
    pub total: Tally,
    /// field → value → counts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_group: BTreeMap<String, BTreeMap<String, Tally>>,
}

/// A job's summary: rows audited, and counts by definition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub rows: u64,
    pub by_definition: BTreeMap<String, DefinitionSummary>,
}

impl JobSummary {
    /// Adds one row's verdicts (one per definition, in `defs` order) with its group values.
    pub fn add(
        &mut self,
        defs: &[Definition],
        groups: &[(String, String)],
        verdicts: &[AuditResult],
    ) {
        self.rows += 1;
        for (d, r) in defs.iter().zip(verdicts) {
            let s = self.by_definition.entry(d.to_string()).or_default();
            s.total.add(r);
            for (field, value) in groups {
                let values = s.by_group.entry(field.clone()).or_default();
                let key = if values.contains_key(value) || values.len() < MAX_GROUP_VALUES {
                    value.clone()
                } else {
                    OTHER_GROUP.to_string()
                };
                values.entry(key).or_default().add(r);
            }
        }
    }
}

/// One data row of a dataset: its 1-based line, its group values, and its audit item under
/// each definition of the job.
#[derive(Debug, Clone)]
pub struct DataRow {
    pub line: u64,
    pub groups: Vec<(String, String)>,
    pub items: Vec<AuditItem>,
}

/// The value of a grouping field as a group key: strings as they are, other JSON as written,
/// `null` when the row lacks the field.
fn group_key(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "null".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Reads the data rows of a JSONL dataset (the rows `lethe audit` takes; blank lines and a
/// TinyMem header line are skipped) and hands them to `f` in order, starting after the first
/// `skip` data rows, which are counted but not parsed. Stops early when `f` returns `false`.
/// Errors name the file and line; a row whose prompt and target together pass `context`
/// tokens is one.
pub fn for_each_row(
    path: &Path,
    spec: &JobSpec,
    tk: &Tokenizer,
    context: usize,
    skip: u64,
    mut f: impl FnMut(DataRow) -> Result<bool>,
) -> Result<u64> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut rows = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let lineno = i as u64 + 1;
        let at =
            |message: String| Error::invalid(format!("{} line {lineno}", path.display()), message);
        let line = line.map_err(|e| at(format!("cannot read the line: {e}")))?;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        // Rows before `skip` are counted unparsed, unless the line could be a header: those are
        // parsed, so that skipping counts exactly the rows a full read counts.
        if rows < skip && !trimmed.contains("\"format\"") {
            rows += 1;
            continue;
        }
        let v: Value = serde_json::from_str(trimmed).map_err(|e| at(e.to_string()))?;
        if !v.is_object() {
            return Err(at("a row must be a JSON object".into()));
        }
        if v.get("format").is_some() {
            continue;
        }
        if rows < skip {
            rows += 1;
            continue;
        }
        let groups = spec
            .group_by
            .iter()
            .map(|g| (g.clone(), group_key(v.get(g))))
            .collect();
        let row: AuditRow = serde_json::from_value(v).map_err(|e| at(e.to_string()))?;
        let items = spec
            .definitions
            .iter()
            .map(|d| row.clone().parse(*d, tk).map(|p| p.item))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| at(e.to_string()))?;
        if let Some(it) = items
            .iter()
            .find(|it| it.prompt.len() + it.target.len() > context)
        {
            return Err(at(format!(
                "prompt and target have {} tokens; the model's context is {context}",
                it.prompt.len() + it.target.len()
            )));
        }
        rows += 1;
        if !f(DataRow {
            line: lineno,
            groups,
            items,
        })? {
            break;
        }
    }
    Ok(rows)
}

/// What [`scan`] found: the number of data rows and the file's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub rows: u64,
    pub sha256: String,
}

/// Parses every row of `path` under every definition of `spec` (the check before a job is
/// accepted) and hashes the file. A dataset without data rows is refused.
pub fn scan(path: &Path, spec: &JobSpec, tk: &Tokenizer, context: usize) -> Result<Scanned> {
    let rows = for_each_row(path, spec, tk, context, 0, |_| Ok(true))?;
    if rows == 0 {
        return Err(Error::invalid(
            "dataset",
            format!("{} has no data rows", path.display()),
        ));
    }
    Ok(Scanned {
        rows,
        sha256: sha256_file(path)?,
    })
}

/// The SHA-256 of a file's bytes, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::util::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Tokenizer {
        crate::test_util::bundled().tokenizer
    }

    fn spec(defs: &[&str], group_by: &[&str]) -> JobSpec {
        JobSpec {
            definitions: defs.iter().map(|d| d.parse().unwrap()).collect(),
            group_by: group_by.iter().map(|s| s.to_string()).collect(),
            batch_size: 8,
            risk: None,
        }
    }

    #[test]
    fn rows_are_read_in_order_with_groups_and_skipped_cheaply() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"format\":\"x\"}\n{\"ids\":[1,2,3,4],\"dup\":10}\n\n{\"ids\":[5,6,7,8],\"split\":\"a\"}\n{\"ids\":[9,9,9,9],\"dup\":1}\n",
        )
        .unwrap();
        let s = spec(&["k=2,n=2", "k=1,n=3"], &["dup"]);
        let tk = tiny_tokenizer();
        let mut seen = Vec::new();
        let n = for_each_row(&p, &s, &tk, 1024, 1, |r| {
            seen.push(r);
            Ok(true)
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].line, 4);
        assert_eq!(
            seen[0].groups,
            vec![("dup".to_string(), "null".to_string())]
        );
        assert_eq!(seen[1].groups[0].1, "1");
        assert_eq!(seen[1].items[0].prompt, vec![9, 9]);
        assert_eq!(seen[1].items[1].target, vec![9, 9, 9]);
        assert_eq!(scan(&p, &s, &tk, 1024).unwrap().rows, 3);
        let e = scan(&p, &s, &tk, 3).unwrap_err();
        assert!(e.to_string().contains("context is 3"), "{e}");
    }

    #[test]
    fn skipping_counts_rows_as_a_full_read_does_with_a_header_midway() {
        // Two data files concatenated: the second header sits between data rows.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"format\":\"x\"}\n{\"ids\":[1,1,1,1]}\n{\"format\":\"x\"}\n{\"ids\":[2,2,2,2]}\n{\"ids\":[3,3,3,3]}\n",
        )
        .unwrap();
        let s = spec(&["k=2,n=2"], &[]);
        let tk = tiny_tokenizer();
        for skip in 0..3u64 {
            let mut first = None;
            let n = for_each_row(&p, &s, &tk, 1024, skip, |r| {
                first.get_or_insert(r.items[0].prompt[0]);
                Ok(true)
            })
            .unwrap();
            assert_eq!(n, 3, "skip {skip}");
            assert_eq!(first, Some(skip as u32 + 1), "skip {skip}");
        }
    }

    #[test]
    fn a_bad_row_is_refused_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"ids\":[1,2,3,4]}\n{\"ids\":[1,2]}\n").unwrap();
        let e = scan(&p, &spec(&["k=2,n=2"], &[]), &tiny_tokenizer(), 1024).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        std::fs::write(&p, "[1]\n").unwrap();
        let e = scan(&p, &spec(&["k=2,n=2"], &[]), &tiny_tokenizer(), 1024).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        let e = scan(&p, &spec(&["k=2,n=2"], &[]), &tiny_tokenizer(), 1024).unwrap_err();
        assert!(e.to_string().contains("no data rows"), "{e}");
    }

    #[test]
    fn summaries_count_by_definition_and_group_and_cap_distinct_values() {
        let defs: Vec<Definition> = vec!["k=1,n=1".parse().unwrap()];
        let yes = AuditResult {
            memorized: true,
            matched_prefix: 1,
            match_fraction: None,
            generated_ids: None,
            generated_text: None,
            risk: None,
        };
        let no = AuditResult {
            memorized: false,
            matched_prefix: 0,
            ..yes.clone()
        };
        let mut s = JobSummary::default();
        s.add(
            &defs,
            &[("dup".into(), "10".into())],
            std::slice::from_ref(&yes),
        );
        s.add(
            &defs,
            &[("dup".into(), "10".into())],
            std::slice::from_ref(&no),
        );
        s.add(
            &defs,
            &[("dup".into(), "1".into())],
            std::slice::from_ref(&no),
        );
        let d = &s.by_definition["k=1,n=1"];
        assert_eq!((s.rows, d.total.sequences, d.total.memorized), (3, 3, 1));
        assert_eq!(d.by_group["dup"]["10"].rate, 0.5);
        assert_eq!(d.by_group["dup"]["1"].memorized, 0);
        for i in 0..MAX_GROUP_VALUES + 5 {
            s.add(
                &defs,
                &[("id".into(), i.to_string())],
                std::slice::from_ref(&yes),
            );
        }
        let ids = &s.by_definition["k=1,n=1"].by_group["id"];
        assert_eq!(ids.len(), MAX_GROUP_VALUES + 1);
        assert_eq!(ids[OTHER_GROUP].sequences, 5);
    }

    #[test]
    fn specs_are_checked_and_get_the_default_definition() {
        let s = spec(&[], &[])
            .validated(crate::models::Architecture::Gpt2)
            .unwrap();
        assert_eq!(s.definitions, vec![Definition::Tinymem]);
        let mut bad = spec(&["tinymem"], &[""]);
        let e = bad
            .clone()
            .validated(crate::models::Architecture::Gpt2)
            .unwrap_err();
        assert!(e.to_string().contains("group_by[0]"), "{e}");
        bad.group_by.clear();
        bad.batch_size = 0;
        let e = bad
            .validated(crate::models::Architecture::Gpt2)
            .unwrap_err();
        assert!(e.to_string().contains("batch_size"), "{e}");
    }
}
