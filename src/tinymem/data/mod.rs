//! The TinyMem math data generator (spec §1.2–1.5): task sequences, the noise and backdoor
//! artifacts, train/test splits, and the dataset's JSONL form. It owns the procedure that turns
//! a [`DataConfig`] into a [`Dataset`], reproducing the reference's *procedure*, not its
//! PyTorch random streams (spec §1.3).
//!
//! Invariants:
//! - [`generate`] is a pure function of the config: same config ⇒ identical dataset, on every
//!   platform and every version of our dependencies (the PRNG is our own, see `super::rng`).
//! - The config is validated first; a bad field is refused with [`DataError::Invalid`] naming
//!   it, and a sequence that does not fit `max_ctx` with [`DataError::TooLong`], never a panic.
//! - Every row's `ids` (and `clean_ids`) has exactly `max_ctx` tokens, all `< VOCAB_SIZE`.
//! - A dataset stores each distinct row once. Repetition (`noise_repeat`, duplication groups)
//!   is a property of the *training set* and is applied by [`Dataset::train_rows`] only.
//! - Noised and backdoored rows carry their clean twin in `clean_ids`; clean and noisy copies of
//!   the main task are split with the same permutation, so the twin is the clean sequence with
//!   the same start value.
//! - Train and test rows of a task never share a start value.
//!
//! RNG order inside [`generate`] (spec §1.3), with `rng` seeded from `seed`:
//! clean main task (no RNG) → noisy main task (`length` draws per sequence, in start order) →
//! sampling of the `num_noise` noised train positions → auxiliary tasks (no RNG) → duplication
//! shuffle. Every train/test split uses a fresh generator seeded with `split_seed`, so tasks
//! of equal size get the identical permutation.
//!
//! Here: the errors, the splits and generation. `tasks`: the task families, row encoding and the
//! artifacts' primitives; `config`: [`DataConfig`]; `dataset`: [`Row`], [`Dataset`] and JSONL.

use thiserror::Error;

use super::rng::Prng;
use super::vocab;

mod config;
mod dataset;
mod tasks;

pub use config::*;
pub use dataset::*;
use tasks::backdoor_rewrite;
use tasks::encode_row;
pub(crate) use tasks::noise_offset;
pub use tasks::*;

/// Modulus of the multiplicative family, f(x) = (c·x) mod 20134.
pub const MULT_MODULUS: i64 = 20134;
/// The token every position after a backdoor trigger is rewritten to.
pub const BACKDOOR_TOKEN: u32 = 2;
/// Upper bound on the number of sequences per task (keeps a bad config from exhausting memory).
pub const MAX_TASK_ROWS: usize = 1_000_000;
/// Upper bound on artifact rows in the training set after repetition.
pub const MAX_ARTIFACT_TRAIN_ROWS: u64 = 10_000_000;
/// Upper bound on `max_ctx`.
pub const MAX_MAX_CTX: usize = 65_536;

/// Errors from configuring, generating, reading or writing TinyMem data.
#[derive(Debug, Error)]
pub enum DataError {
    /// A config field (or the data it implies) is unusable; `field` names the config field.
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A string did not name a known enum value.
    #[error("unknown {what} `{value}` (expected one of: {expected})")]
    Parse {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A generated sequence does not fit the context.
    #[error("task {task}, start {start}: {len} tokens do not fit `max_ctx` = {max_ctx}")]
    TooLong {
        task: u32,
        start: usize,
        len: usize,
        max_ctx: usize,
    },
    /// A JSONL file is malformed; `line` is 1-based.
    #[error("JSONL line {line}: {reason}")]
    Jsonl { line: usize, reason: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DataError {
    DataError::Invalid {
        field,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Splits
// ---------------------------------------------------------------------------------------------

/// The permutation of `0..n` used to split a task: a fresh generator seeded with `split_seed`
/// (so equal `n` gives the identical permutation), like the reference's reseed + `randperm`.
fn split_permutation(n: usize, split_seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    Prng::seed_from_u64(split_seed).shuffle(&mut perm);
    perm
}

/// Splits `items` by [`split_permutation`]: the first `len - num_test` permuted items are the
/// train part, the last `num_test` the test part. Requires `num_test <= items.len()`.
fn split<T: Clone>(items: &[T], num_test: usize, split_seed: u64) -> (Vec<T>, Vec<T>) {
    let perm = split_permutation(items.len(), split_seed);
    let cut = items.len() - num_test;
    let pick = |idx: &[usize]| idx.iter().map(|&i| items[i].clone()).collect::<Vec<T>>();
    (pick(&perm[..cut]), pick(&perm[cut..]))
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

/// Generates the dataset for `cfg` (validated first). See the module doc for the RNG order.
pub fn generate(cfg: &DataConfig) -> Result<Dataset, DataError> {
    cfg.validate()?;
    let mut rng = Prng::seed_from_u64(cfg.seed);
    let main = cfg.main_step;

    // 1. Clean main task (no RNG).
    let main_values: Vec<Vec<i64>> = (0..cfg.num_main)
        .map(|i| task_sequence(cfg.family, main, i as i64, cfg.length))
        .collect();
    let clean_main: Vec<Vec<u32>> = main_values
        .iter()
        .enumerate()
        .map(|(i, v)| encode_row(v, main, i, cfg.max_ctx))
        .collect::<Result<_, _>>()?;

    // 2. Main-task rows carrying the artifact.
    let parts = match cfg.artifact {
        Artifact::Noise => noise_parts(cfg, &mut rng, &main_values, &clean_main)?,
        Artifact::Backdoor => backdoor_parts(cfg, &clean_main)?,
    };

    // 3. Auxiliary tasks, clean only (no RNG).
    let mut aux_train = Vec::new();
    let mut aux_test = Vec::new();
    for &c in &cfg.aux_steps {
        let seqs: Vec<Vec<u32>> = (0..cfg.num_aux)
            .map(|i| {
                encode_row(
                    &task_sequence(cfg.family, c, i as i64, cfg.length),
                    c,
                    i,
                    cfg.max_ctx,
                )
            })
            .collect::<Result<_, _>>()?;
        let (train, test) = split(&seqs, cfg.num_test, cfg.split_seed);
        aux_train.extend(
            train
                .into_iter()
                .map(|ids| Row::clean(Split::Train, c, ids)),
        );
        aux_test.extend(test.into_iter().map(|ids| Row::clean(Split::Test, c, ids)));
    }

    // 4. Duplication groups (consumes `rng` after the noise sampling, as the reference does).
    let mut artifact_train = parts.artifact_train;
    if let Some(counts) = &cfg.duplication {
        rng.shuffle(&mut artifact_train);
        let groups = counts.len();
        for (k, row) in artifact_train.iter_mut().enumerate() {
            row.group = Some((k % groups) as u32);
        }
    }

    let mut rows = artifact_train;
    rows.extend(parts.main_train);
    rows.extend(aux_train);
    rows.extend(parts.main_test);
    rows.extend(aux_test);
    rows.extend(parts.extra_test);
    Ok(Dataset {
        config: cfg.clone(),
        rows,
    })
}

/// Main-task rows of one artifact, before the auxiliary tasks are added.
struct MainParts {
    artifact_train: Vec<Row>,
    main_train: Vec<Row>,
    main_test: Vec<Row>,
    extra_test: Vec<Row>,
}

/// The noisy copy of one sequence: each value independently offset by 0/−1/+1.
fn noisy_values(rng: &mut Prng, values: &[i64], p: f64) -> Vec<i64> {
    values.iter().map(|&v| v + noise_offset(rng, p)).collect()
}

fn noise_parts(
    cfg: &DataConfig,
    rng: &mut Prng,
    main_values: &[Vec<i64>],
    clean_main: &[Vec<u32>],
) -> Result<MainParts, DataError> {
    let main = cfg.main_step;
    // Noisy copy of every main sequence, in start order (RNG step 3).
    let noisy_main: Vec<Vec<u32>> = main_values
        .iter()
        .enumerate()
        .map(|(i, v)| encode_row(&noisy_values(rng, v, cfg.noise_prob), main, i, cfg.max_ctx))
        .collect::<Result<_, _>>()?;
    // Both copies split by the same permutation: split the start indices once.
    let starts: Vec<usize> = (0..cfg.num_main).collect();
    let (train, test) = split(&starts, cfg.num_test, cfg.split_seed);
    // Positions (into the train part) of the noised rows (RNG step 4).
    let noise_pos = rng.sample(train.len(), cfg.num_noise);
    let mut is_noised = vec![false; train.len()];
    let artifact_train = noise_pos
        .iter()
        .map(|&p| {
            is_noised[p] = true;
            let i = train[p];
            Row {
                split: Split::Train,
                task: main,
                role: Role::Noised,
                ids: noisy_main[i].clone(),
                clean_ids: Some(clean_main[i].clone()),
                group: None,
            }
        })
        .collect();
    let main_train = train
        .iter()
        .zip(&is_noised)
        .filter(|(_, &noised)| !noised)
        .map(|(&i, _)| Row::clean(Split::Train, main, clean_main[i].clone()))
        .collect();
    let main_test = test
        .iter()
        .map(|&i| Row::clean(Split::Test, main, clean_main[i].clone()))
        .collect();
    Ok(MainParts {
        artifact_train,
        main_train,
        main_test,
        extra_test: Vec::new(),
    })
}

fn backdoor_parts(cfg: &DataConfig, clean_main: &[Vec<u32>]) -> Result<MainParts, DataError> {
    let main = cfg.main_step;
    let trigger = cfg.trigger_ids()?;
    // Pool train then test of the usual clean split (spec §1.5 step 1).
    let starts: Vec<usize> = (0..cfg.num_main).collect();
    let (train, test) = split(&starts, cfg.num_test, cfg.split_seed);
    let mut triggered: Vec<(usize, usize)> = Vec::new();
    let mut untriggered: Vec<usize> = Vec::new();
    for i in train.into_iter().chain(test) {
        match trigger_end(&clean_main[i], &trigger) {
            Some(end) => triggered.push((i, end)),
            None => untriggered.push(i),
        }
    }
    let t_test = triggered.len() / 10;
    if t_test == 0 {
        return Err(invalid(
            "backdoor_trigger",
            format!(
                "only {} main sequences contain the trigger `{}`; at least 10 are needed",
                triggered.len(),
                vocab::decode(&trigger)
            ),
        ));
    }
    if untriggered.len() <= cfg.num_test {
        return Err(invalid(
            "num_test",
            format!(
                "only {} main sequences lack the trigger; need more than num_test = {}",
                untriggered.len(),
                cfg.num_test
            ),
        ));
    }
    let (t_train, t_test) = split(&triggered, t_test, cfg.split_seed);
    let backdoored = |split: Split, &(i, end): &(usize, usize)| Row {
        split,
        task: main,
        role: Role::Backdoored,
        ids: backdoor_rewrite(&clean_main[i], end),
        clean_ids: Some(clean_main[i].clone()),
        group: None,
    };
    let artifact_train = t_train
        .iter()
        .map(|t| backdoored(Split::Train, t))
        .collect();
    let mut extra_test: Vec<Row> = t_test.iter().map(|t| backdoored(Split::Test, t)).collect();
    extra_test.extend(t_test.iter().map(|&(i, _)| Row {
        role: Role::Triggered,
        ..Row::clean(Split::Test, main, clean_main[i].clone())
    }));
    let (u_train, u_test) = split(&untriggered, cfg.num_test, cfg.split_seed);
    Ok(MainParts {
        artifact_train,
        main_train: u_train
            .iter()
            .map(|&i| Row::clean(Split::Train, main, clean_main[i].clone()))
            .collect(),
        main_test: u_test
            .iter()
            .map(|&i| Row::clean(Split::Test, main, clean_main[i].clone()))
            .collect(),
        extra_test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::OnceLock;
    use std::time::Instant;

    /// The paper-scale default dataset (seed 0), generated once for all tests.
    fn paper() -> &'static Dataset {
        static DS: OnceLock<Dataset> = OnceLock::new();
        DS.get_or_init(|| {
            let t = Instant::now();
            let ds = generate(&DataConfig::default()).unwrap();
            eprintln!("paper-scale generate (test profile): {:?}", t.elapsed());
            ds
        })
    }

    /// The values of a (clean or noised) row, read back from its tokens.
    fn values_of(ids: &[u32]) -> Vec<i64> {
        let text = vocab::decode(ids);
        let body = text.trim_start_matches('^');
        let body = &body[..body.find('$').expect("row has EOS")];
        body.split(' ').map(|s| s.parse().unwrap()).collect()
    }

    /// The start value of a clean additive row.
    fn additive_start(cfg: &DataConfig, task: u32, ids: &[u32]) -> i64 {
        assert_eq!(cfg.family, Family::Additive);
        values_of(ids)[0] - i64::from(task)
    }

    fn field_of(err: DataError) -> &'static str {
        match err {
            DataError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn noise_offsets_follow_the_weights() {
        let mut rng = Prng::seed_from_u64(7);
        let n = 400_000;
        let (mut minus, mut plus) = (0usize, 0usize);
        for _ in 0..n {
            match noise_offset(&mut rng, 0.1) {
                -1 => minus += 1,
                1 => plus += 1,
                0 => {}
                o => panic!("offset {o}"),
            }
        }
        let (fm, fp) = (minus as f64 / n as f64, plus as f64 / n as f64);
        assert!((fm - 0.05).abs() < 0.002, "P(-1) = {fm}");
        assert!((fp - 0.05).abs() < 0.002, "P(+1) = {fp}");
        assert_eq!(noise_offset(&mut rng, 0.0), 0);
    }

    #[test]
    fn family_parses_aliases_and_displays() {
        for (s, f) in [
            ("additive", Family::Additive),
            ("increment", Family::Additive),
            ("Multiplicative", Family::Multiplicative),
            ("mult", Family::Multiplicative),
        ] {
            assert_eq!(s.parse::<Family>().unwrap(), f);
            let json: Family = serde_json::from_str(&format!("\"{}\"", s.to_lowercase())).unwrap();
            assert_eq!(json, f);
        }
        assert_eq!(Family::Additive.to_string(), "additive");
        assert_eq!(Family::Multiplicative.to_string(), "multiplicative");
        assert_eq!(
            serde_json::to_string(&Family::Multiplicative).unwrap(),
            "\"multiplicative\""
        );
        assert!(matches!(
            "exp".parse::<Family>(),
            Err(DataError::Parse { what: "family", .. })
        ));
        assert_eq!("backdoor".parse::<Artifact>().unwrap(), Artifact::Backdoor);
        assert_eq!(Artifact::Noise.to_string(), "noise");
        assert!("dup".parse::<Artifact>().is_err());
    }

    #[test]
    fn additive_sequences_start_at_f_of_i() {
        let s = task_sequence(Family::Additive, 7, 0, 20);
        assert_eq!(s.len(), 20);
        assert_eq!(s[0], 7);
        assert_eq!(s[19], 140);
        let s = task_sequence(Family::Additive, 7, 19_999, 20);
        assert_eq!(s[0], 20_006);
        assert_eq!(s[19], 20_139);
        assert_eq!(task_sequence(Family::Additive, 2, 5, 3), vec![7, 9, 11]);
    }

    #[test]
    fn multiplicative_sequences_wrap_at_20134() {
        assert_eq!(task_sequence(Family::Multiplicative, 7, 0, 20), vec![0; 20]);
        let s = task_sequence(Family::Multiplicative, 7, 1, 6);
        assert_eq!(s, vec![7, 49, 343, 2401, 16807, 16979]); // 117649 mod 20134 = 16979
        let s = task_sequence(Family::Multiplicative, 2, 1, 15);
        assert_eq!(s[13], 16384);
        assert_eq!(s[14], 12634); // 32768 - 20134
        assert!(task_sequence(Family::Multiplicative, 5, 19_999, 20)
            .iter()
            .all(|&v| (0..MULT_MODULUS).contains(&v)));
    }

    #[test]
    fn real_lengths_span_the_spec_ranges() {
        let span = |family| {
            let lens =
                (0..20_000).map(|i| vocab::encode_values(&task_sequence(family, 7, i, 20)).len());
            let (lo, hi) = lens.fold((usize::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
            (lo, hi)
        };
        assert_eq!(span(Family::Additive), (66, 121));
        assert_eq!(span(Family::Multiplicative), (41, 121));
    }

    #[test]
    fn paper_scale_row_counts() {
        let ds = paper();
        assert_eq!(ds.rows.len(), 20_000 + 4 * 3_000);
        assert_eq!(ds.train_rows().len(), 27_000);
        assert_eq!(ds.noised_rows().len(), 1_000);
        let sets = ds.test_sets();
        let names: Vec<&str> = sets.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["7", "2", "3", "4", "5"]);
        assert!(sets.iter().all(|(_, rows)| rows.len() == 1_000));
        let count = |split, task, role| {
            ds.rows
                .iter()
                .filter(|r| r.split == split && r.task == task && r.role == role)
                .count()
        };
        assert_eq!(count(Split::Train, 7, Role::Clean), 18_000);
        for c in [2, 3, 4, 5] {
            assert_eq!(count(Split::Train, c, Role::Clean), 2_000);
        }
        assert!(ds.rows.iter().all(|r| r.ids.len() == 150));
        assert!(ds.backdoor_test_rows().is_empty());
    }

    #[test]
    fn noise_repeat_and_duplication_repeat_only_training_rows() {
        let cfg = DataConfig {
            noise_repeat: 3,
            ..DataConfig::cpu_scale()
        };
        let ds = generate(&cfg).unwrap();
        assert_eq!(ds.rows.len(), 2_000 + 4 * 500);
        assert_eq!(ds.train_rows().len(), 100 * 3 + 1_700 + 4 * 300);

        let cfg = DataConfig {
            duplication: Some(vec![1, 10, 100]),
            ..DataConfig::default()
        };
        let ds = generate(&cfg).unwrap();
        let sizes: Vec<usize> = (0..3)
            .map(|g| {
                ds.noised_rows()
                    .iter()
                    .filter(|r| r.group == Some(g))
                    .count()
            })
            .collect();
        assert_eq!(sizes, [334, 333, 333]);
        assert_eq!(ds.train_rows().len(), 18_000 + 8_000 + 334 + 3_330 + 33_300);
        // Duplication only regroups: the same noised rows as without it.
        let plain: HashSet<&Vec<u32>> = paper().noised_rows().iter().map(|r| &r.ids).collect();
        assert!(ds.noised_rows().iter().all(|r| plain.contains(&r.ids)));
    }

    #[test]
    fn noised_rows_are_aligned_with_their_clean_twins() {
        let ds = paper();
        let cfg = &ds.config;
        let mut starts = HashSet::new();
        for row in ds.noised_rows() {
            assert_eq!((row.split, row.task), (Split::Train, 7));
            let clean = row.clean_ids.as_ref().unwrap();
            let start = additive_start(cfg, 7, clean);
            let expected = encode_row(&task_sequence(cfg.family, 7, start, 20), 7, 0, 150).unwrap();
            assert_eq!(clean, &expected);
            let (nv, cv) = (values_of(&row.ids), values_of(clean));
            assert_eq!(nv.len(), 20);
            assert!(nv.iter().zip(&cv).all(|(n, c)| (n - c).abs() <= 1));
            assert!(starts.insert(start), "start {start} noised twice");
        }
        // Clean twins are neither clean train rows nor test rows.
        for r in ds
            .rows
            .iter()
            .filter(|r| r.task == 7 && r.role == Role::Clean)
        {
            assert!(!starts.contains(&additive_start(cfg, 7, &r.ids)));
        }
    }

    #[test]
    fn splits_are_disjoint_and_cover_every_start() {
        let ds = paper();
        let cfg = &ds.config;
        for (task, n) in [(7u32, 20_000i64), (2, 3_000), (5, 3_000)] {
            let mut train = HashSet::new();
            let mut test = HashSet::new();
            for r in ds.rows.iter().filter(|r| r.task == task) {
                let ids = r.clean_ids.as_ref().unwrap_or(&r.ids);
                let set = if r.split == Split::Train {
                    &mut train
                } else {
                    &mut test
                };
                assert!(set.insert(additive_start(cfg, task, ids)));
            }
            assert_eq!(test.len(), 1_000);
            assert!(train.is_disjoint(&test));
            let all: HashSet<i64> = train.union(&test).copied().collect();
            assert_eq!(all, (0..n).collect());
        }
    }

    #[test]
    fn split_permutation_is_deterministic_and_shared_by_equal_sizes() {
        assert_eq!(
            split_permutation(20_000, 598),
            split_permutation(20_000, 598)
        );
        assert_ne!(
            split_permutation(20_000, 598),
            split_permutation(20_000, 599)
        );
        let mut p = split_permutation(3_000, 598);
        assert_ne!(p, (0..3_000).collect::<Vec<_>>());
        p.sort_unstable();
        assert_eq!(p, (0..3_000).collect::<Vec<_>>());
        // Equal task sizes ⇒ the aux test sets hold the same starts.
        let ds = paper();
        let starts = |c: u32| -> Vec<i64> {
            ds.test_sets()
                .into_iter()
                .find(|(n, _)| *n == c.to_string())
                .unwrap()
                .1
                .iter()
                .map(|r| additive_start(&ds.config, c, &r.ids))
                .collect()
        };
        assert_eq!(starts(2), starts(3));
        assert_eq!(starts(2), starts(5));
    }

    #[test]
    fn about_60_percent_of_noised_rows_have_noise_in_the_window() {
        for seed in [0u64, 1, 3] {
            let ds = if seed == 0 {
                paper().clone()
            } else {
                generate(&DataConfig {
                    seed,
                    ..DataConfig::default()
                })
                .unwrap()
            };
            let eligible = ds.eligible_noised_rows(50, 100).len();
            let differ = ds.eligible_noised_rows(0, 150).len();
            eprintln!(
                "seed {seed}: eligible [50,100) = {eligible}/1000, differ anywhere = {differ}/1000"
            );
            assert!(
                (550..=660).contains(&eligible),
                "seed {seed}: {eligible} eligible"
            );
            assert!(
                (840..=915).contains(&differ),
                "seed {seed}: {differ} differ"
            );
        }
    }

    #[test]
    fn about_87_8_percent_of_noisy_sequences_differ_somewhere() {
        let mut rng = Prng::seed_from_u64(0);
        let n = 20_000;
        let differ = (0..n)
            .filter(|&i| {
                let clean = task_sequence(Family::Additive, 7, i, 20);
                let noisy = noisy_values(&mut rng, &clean, 0.1);
                vocab::encode_values(&noisy) != vocab::encode_values(&clean)
            })
            .count();
        let frac = differ as f64 / n as f64;
        assert!((frac - (1.0 - 0.9f64.powi(20))).abs() < 0.01, "{frac}");
    }

    #[test]
    fn noise_in_window_examples() {
        let clean = [1, 2, 3, 4];
        assert!(!noise_in_window(&[1, 2, 3, 4], &clean, 0, 4));
        assert!(noise_in_window(&[1, 9, 3, 4], &clean, 1, 2));
        assert!(!noise_in_window(&[1, 9, 3, 4], &clean, 2, 4));
        assert!(noise_in_window(&[1, 2, 3], &clean, 0, 10));
        assert!(!noise_in_window(&[1, 9], &clean, 5, 10));
        assert!(!noise_in_window(&[1, 9], &clean, 3, 1));
    }

    #[test]
    fn generation_is_deterministic_and_seed_dependent() {
        let cfg = DataConfig::cpu_scale();
        let a = generate(&cfg).unwrap();
        assert_eq!(a, generate(&cfg).unwrap());
        let b = generate(&DataConfig {
            seed: 1,
            ..cfg.clone()
        })
        .unwrap();
        assert_ne!(a.noised_rows(), b.noised_rows());
        // The seed does not touch the splits: the clean test sets are identical.
        assert_eq!(a.test_sets(), b.test_sets());
    }

    #[test]
    fn trigger_end_finds_the_first_occurrence_inside_numbers() {
        let t100 = [1, 0, 0];
        assert_eq!(trigger_end(&vocab::encode_values(&[1005]), &t100), Some(4));
        assert_eq!(
            trigger_end(&vocab::encode_values(&[2100, 7]), &t100),
            Some(5)
        );
        assert_eq!(
            trigger_end(&vocab::encode_values(&[100, 100]), &t100),
            Some(4)
        );
        assert_eq!(trigger_end(&vocab::encode_values(&[10, 0]), &t100), None);
        assert_eq!(trigger_end(&vocab::encode_values(&[1005]), &[]), None);
        assert_eq!(trigger_end(&[1, 0], &t100), None);
        let cfg = DataConfig {
            seed: 3,
            ..DataConfig::default()
        };
        assert_eq!(cfg.trigger_ids().unwrap(), vec![1, 0, 3]);
        let cfg = DataConfig {
            backdoor_trigger: Some(0),
            ..cfg
        };
        assert_eq!(cfg.trigger_ids().unwrap(), vec![0]);
    }

    fn check_backdoor(cfg: &DataConfig, expected_triggered: usize) -> Dataset {
        let ds = generate(cfg).unwrap();
        let trigger = cfg.trigger_ids().unwrap();
        let backdoored: Vec<&Row> = ds
            .rows
            .iter()
            .filter(|r| r.role == Role::Backdoored)
            .collect();
        assert_eq!(backdoored.len(), expected_triggered);
        for r in &backdoored {
            let clean = r.clean_ids.as_ref().unwrap();
            let end = trigger_end(clean, &trigger).unwrap();
            assert_eq!(r.ids[..end], clean[..end], "trigger and prefix kept");
            assert_eq!(r.ids[end - trigger.len()..end], trigger[..]);
            assert!(r.ids[end..].iter().all(|&t| t == BACKDOOR_TOKEN));
            assert_eq!(r.ids.len(), cfg.max_ctx);
        }
        let sets = ds.test_sets();
        let names: Vec<&str> = sets.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["7", "2", "3", "4", "5", "backdoored", "triggered"]);
        let held_out = expected_triggered / 10;
        assert_eq!(sets[5].1.len(), held_out);
        assert_eq!(sets[6].1.len(), held_out);
        for (b, t) in sets[5].1.iter().zip(&sets[6].1) {
            assert_eq!(
                b.clean_ids.as_ref(),
                Some(&t.ids),
                "backdoored and triggered aligned"
            );
        }
        assert_eq!(ds.backdoor_test_rows().len(), held_out);
        assert_eq!(sets[0].1.len(), cfg.num_test);
        // No clean main row contains the trigger.
        for r in ds
            .rows
            .iter()
            .filter(|r| r.task == cfg.main_step && r.role == Role::Clean)
        {
            assert_eq!(trigger_end(&r.ids, &trigger), None);
        }
        let aux_train = cfg.aux_steps.len() * (cfg.num_aux - cfg.num_test);
        let main_train = cfg.num_main - expected_triggered - cfg.num_test;
        assert_eq!(
            ds.train_rows().len(),
            (expected_triggered - held_out) * cfg.noise_repeat as usize + main_train + aux_train
        );
        ds
    }

    #[test]
    fn backdoor_at_paper_scale_matches_the_spec_counts() {
        let cfg = DataConfig {
            artifact: Artifact::Backdoor,
            ..DataConfig::default()
        };
        check_backdoor(&cfg, 886);
        let cfg = DataConfig {
            family: Family::Multiplicative,
            ..cfg
        };
        check_backdoor(&cfg, 2414);
    }

    #[test]
    fn backdoor_at_cpu_scale_and_bad_triggers() {
        let cfg = DataConfig {
            artifact: Artifact::Backdoor,
            ..DataConfig::cpu_scale()
        };
        let n = (0..2_000)
            .filter(|&i| {
                let ids = vocab::encode_values(&task_sequence(Family::Additive, 7, i, 20));
                trigger_end(&ids, &[1, 0, 0]).is_some()
            })
            .count();
        check_backdoor(&cfg, n);
        let cfg = DataConfig {
            backdoor_trigger: Some(99_999_999),
            ..cfg
        };
        assert_eq!(field_of(generate(&cfg).unwrap_err()), "backdoor_trigger");
        let cfg = DataConfig {
            backdoor_trigger: Some(1),
            ..cfg
        };
        assert_eq!(field_of(generate(&cfg).unwrap_err()), "num_test");
    }

    #[test]
    fn jsonl_round_trips_and_has_the_documented_shape() {
        for cfg in [
            DataConfig::cpu_scale(),
            DataConfig {
                duplication: Some(vec![1, 10]),
                ..DataConfig::cpu_scale()
            },
            DataConfig {
                artifact: Artifact::Backdoor,
                ..DataConfig::cpu_scale()
            },
        ] {
            let ds = generate(&cfg).unwrap();
            let mut buf = Vec::new();
            ds.write_jsonl(&mut buf).unwrap();
            let text = String::from_utf8(buf.clone()).unwrap();
            assert_eq!(text.lines().count(), 1 + ds.rows.len());
            let back = Dataset::read_jsonl(buf.as_slice()).unwrap();
            assert_eq!(back, ds);
        }
        let ds = generate(&DataConfig::cpu_scale()).unwrap();
        let mut buf = Vec::new();
        ds.write_jsonl(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0]
            .starts_with(r#"{"format":"lethe-tinymem-math-v1","config":{"family":"additive""#));
        assert!(lines[0].contains(r#""noise_repeat":10"#));
        assert!(lines[1].starts_with(r#"{"split":"train","task":7,"role":"noised","ids":[10,"#));
        assert!(lines[1].contains(r#""clean_ids":[10,"#));
        assert!(!lines[1].contains("group") && !lines[1].contains("null"));
        let clean = lines
            .iter()
            .find(|l| l.contains(r#""role":"clean""#))
            .unwrap();
        assert!(!clean.contains("clean_ids"));
    }

    #[test]
    fn read_jsonl_rejects_malformed_input_with_the_line_number() {
        let ds = generate(&DataConfig::cpu_scale()).unwrap();
        let mut buf = Vec::new();
        ds.write_jsonl(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let line_of = |res: Result<Dataset, DataError>| match res {
            Err(DataError::Jsonl { line, .. }) => line,
            other => panic!("expected a JSONL error, got {other:?}"),
        };
        assert_eq!(line_of(Dataset::read_jsonl("".as_bytes())), 1);
        assert_eq!(line_of(Dataset::read_jsonl("[1]\n".as_bytes())), 1);

        let good = lines[3].clone();
        lines[3] = good.replacen("[10,", "[10,99,", 1);
        assert_eq!(line_of(Dataset::read_jsonl(lines.join("\n").as_bytes())), 4);
        lines[3] = good.replacen("[10,", "[14,", 1);
        assert_eq!(line_of(Dataset::read_jsonl(lines.join("\n").as_bytes())), 4);
        lines[3] = r#"{"split":"train","task":7,"role":"noised","ids":[]}"#.to_string();
        assert_eq!(line_of(Dataset::read_jsonl(lines.join("\n").as_bytes())), 4);
        lines[3] = good;
        lines[0] = lines[0].replacen(r#""num_test":200"#, r#""num_test":5000"#, 1);
        assert_eq!(line_of(Dataset::read_jsonl(lines.join("\n").as_bytes())), 1);
    }

    #[test]
    fn config_validation_names_the_field() {
        DataConfig::default().validate().unwrap();
        DataConfig::cpu_scale().validate().unwrap();
        type Edit = fn(&mut DataConfig);
        let cases: [(Edit, &str); 20] = [
            (|c| c.num_test = 20_000, "num_test"),
            (|c| c.num_test = 0, "num_test"),
            (|c| c.num_noise = 19_001, "num_noise"),
            (|c| c.num_aux = 1_000, "num_aux"),
            (|c| c.aux_steps = vec![2, 2], "aux_steps"),
            (|c| c.aux_steps = vec![7], "aux_steps"),
            (|c| c.main_step = 0, "main_step"),
            (|c| c.noise_prob = 1.5, "noise_prob"),
            (|c| c.noise_prob = f64::NAN, "noise_prob"),
            (|c| c.noise_repeat = 0, "noise_repeat"),
            (|c| c.noise_repeat = 100_000, "noise_repeat"),
            (
                |c| (c.noise_repeat, c.duplication) = (u32::MAX, Some(vec![u32::MAX])),
                "noise_repeat",
            ),
            (|c| c.length = 0, "length"),
            (|c| c.max_ctx = 0, "max_ctx"),
            (|c| c.num_main = MAX_TASK_ROWS + 1, "num_main"),
            (|c| c.duplication = Some(vec![]), "duplication"),
            (|c| c.duplication = Some(vec![1, 0]), "duplication"),
            (
                |c| (c.artifact, c.duplication) = (Artifact::Backdoor, Some(vec![1])),
                "duplication",
            ),
            (
                |c| (c.artifact, c.backdoor_trigger) = (Artifact::Backdoor, Some(-5)),
                "backdoor_trigger",
            ),
            (
                |c| (c.artifact, c.seed) = (Artifact::Backdoor, u64::MAX),
                "seed",
            ),
        ];
        for (edit, field) in cases {
            let mut cfg = DataConfig::default();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
            assert_eq!(field_of(err), field);
        }
        // Backdoor ignores num_noise; aux sizes are irrelevant without aux tasks.
        let mut cfg = DataConfig::default();
        (cfg.artifact, cfg.num_noise) = (Artifact::Backdoor, 50_000);
        cfg.validate().unwrap();
        let mut cfg = DataConfig::default();
        (cfg.aux_steps, cfg.num_aux) = (vec![], 0);
        cfg.validate().unwrap();
    }

    #[test]
    fn too_long_sequences_are_an_error_not_a_panic() {
        let cfg = DataConfig {
            max_ctx: 100,
            ..DataConfig::cpu_scale()
        };
        assert!(matches!(
            generate(&cfg),
            Err(DataError::TooLong {
                task: 7,
                max_ctx: 100,
                ..
            })
        ));
    }

    #[test]
    fn config_serde_fills_defaults_and_rejects_unknown_fields() {
        let cfg: DataConfig = serde_json::from_str(r#"{"family":"mult","seed":3}"#).unwrap();
        assert_eq!(
            cfg,
            DataConfig {
                family: Family::Multiplicative,
                seed: 3,
                ..DataConfig::default()
            }
        );
        let cfg: DataConfig =
            serde_json::from_str(r#"{"family":"increment","artifact":"backdoor"}"#).unwrap();
        assert_eq!(
            (cfg.family, cfg.artifact),
            (Family::Additive, Artifact::Backdoor)
        );
        assert!(serde_json::from_str::<DataConfig>(r#"{"num_extra":3000}"#).is_err());
        let json = serde_json::to_string(&DataConfig::cpu_scale()).unwrap();
        assert_eq!(
            serde_json::from_str::<DataConfig>(&json).unwrap(),
            DataConfig::cpu_scale()
        );
    }

    #[test]
    fn cpu_scale_preset_has_the_documented_sizes() {
        let ds = generate(&DataConfig::cpu_scale()).unwrap();
        assert_eq!(ds.train_rows().len(), 100 * 10 + 1_700 + 4 * 300);
        assert_eq!(ds.noised_rows().len(), 100);
        assert!(ds.test_sets().iter().all(|(_, rows)| rows.len() == 200));
        let eligible = ds.eligible_noised_rows(50, 100).len();
        eprintln!("cpu_scale: eligible [50,100) = {eligible}/100");
    }

    #[test]
    fn paper_scale_generation_is_fast() {
        let t = Instant::now();
        let ds = generate(&DataConfig::default()).unwrap();
        let elapsed = t.elapsed();
        eprintln!("paper-scale generate: {elapsed:?} ({} rows)", ds.rows.len());
        // Generous bound for an unoptimized test build; the release build is far faster.
        assert!(elapsed.as_secs_f64() < 5.0, "{elapsed:?}");
    }
}
