//! One unlearning method with its settings, run once on a model: what `lethe unlearn --method`
//! runs (besides the takedown controller and `--search`), what `lethe tinymem compare` sweeps,
//! and what a takedown runs under `lethe serve --unlearn-method` (then held to the same gates
//! as the controller's candidates, `pipeline::run`).
//!
//! Invariants:
//! - [`MethodSpec::run`] never mutates the input model; the result shares nothing mutable
//!   with it. Every method's own invariants hold (their modules say them).
//! - A neuron-level method's attribution does not depend on the ratio: with an
//!   [`Attributions`] cache it is computed once per method and settings, and each later run
//!   ranks it again (its reported seconds include the attribution's).
//! - `weights_zeroed` counts every parameter entry the method set to zero (biases included
//!   where the method zeroes them); fine-tuning zeroes none.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use super::durable::durable;
use super::finetune::{fine_tune, FtData};
use super::greedy::{greedy, GreedyConfig};
use super::neurons::{ablate, neuron_attribution, top_neurons, NeuronConfig, NeuronMethod};
use super::sou::{sou, SouConfig};
use super::{balanced_subnet, BalancedSubnetConfig, JobControl, Method, Outcome};
use crate::audit::AuditItem;
use crate::error::{Error, Result};
use crate::models::Model;

/// A method and its settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodSpec {
    /// Subnet or BalancedSubnet, in paper or balanced mode (spec §4.1–4.3).
    Masked(BalancedSubnetConfig),
    /// Durable, or Durable-agg (`aggregate`) (spec §4.5).
    Durable {
        ratio: f64,
        aggregate: bool,
        batch_size: usize,
    },
    Greedy(GreedyConfig),
    Sou(SouConfig),
    /// Zero-out, Activations, Slimming or HardConcrete (spec §4.5–4.6).
    Neuron {
        neuron: NeuronMethod,
        config: NeuronConfig,
    },
    /// A fine-tuning baseline (spec §4.8); needs the model's directory (its card).
    FineTune {
        data: FtData,
        epochs: usize,
    },
}

/// What the method needs besides the model.
pub struct MethodData<'a> {
    pub forget: &'a [Vec<u32>],
    pub retain: &'a [Vec<u32>],
    /// The forget sequences' audits (balanced mode checks them).
    pub items: &'a [AuditItem],
    /// The model's directory (fine-tuning reads its card and optimiser state).
    pub dir: Option<&'a Path>,
}

/// What a method produced.
pub struct MethodRun {
    pub outcome: Outcome,
    pub weights_zeroed: usize,
    /// Something the report should say (fine-tuning: where the optimiser state came from).
    pub note: Option<String>,
}

/// Neuron attributions already computed, by method and settings (ratio aside), with the steps
/// and seconds they took.
#[derive(Default)]
pub struct Attributions(Mutex<HashMap<String, Attribution>>);

/// Per block, each neuron's attribution; the steps and seconds it took.
type Attribution = (Vec<Vec<f32>>, usize, f64);

impl MethodSpec {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Masked(c) => match c.method {
                Method::Subnet => "subnet",
                Method::BalancedSubnet => "balanced-subnet",
            },
            Self::Durable {
                aggregate: false, ..
            } => "durable",
            Self::Durable {
                aggregate: true, ..
            } => "durable-agg",
            Self::Greedy(_) => "greedy",
            Self::Sou(_) => "sou",
            Self::Neuron { neuron, .. } => match neuron {
                NeuronMethod::ZeroOut => "zero-out",
                NeuronMethod::Activations => "activations",
                NeuronMethod::Slimming => "slimming",
                NeuronMethod::HardConcrete => "hard-concrete",
                NeuronMethod::IntegratedGradients => "integrated-gradients",
            },
            Self::FineTune { data, .. } => data.name(),
        }
    }

    /// The ratio the method was given (0 for fine-tuning).
    pub fn ratio(&self) -> f64 {
        match self {
            Self::Masked(c) => c.ratio,
            Self::Durable { ratio, .. } => *ratio,
            Self::Greedy(c) => c.ratio,
            Self::Sou(c) => c.ratio,
            Self::Neuron { config, .. } => config.ratio,
            Self::FineTune { .. } => 0.0,
        }
    }

    /// Passes over the data (1 where the method has no epochs).
    pub fn epochs(&self) -> usize {
        match self {
            Self::Masked(c) => c.epochs,
            Self::Neuron { config, .. } => config.epochs,
            Self::FineTune { epochs, .. } => *epochs,
            _ => 1,
        }
    }

    /// Runs the method on `model`.
    pub fn run(
        &self,
        model: &Model,
        data: &MethodData,
        cache: Option<&Attributions>,
        ctl: &JobControl,
    ) -> Result<MethodRun> {
        let zeros_of = |m: &Model| -> Result<Vec<(usize, usize)>> {
            m.mlp_weights()
                .0
                .iter()
                .map(|(a, b)| Ok((zero_count(a)?, zero_count(b)?)))
                .collect()
        };
        let before = zeros_of(model)?;
        // Entries the method zeroed per MLP matrix: zeros after minus zeros before.
        let new_zeros = |m: &Model| -> Result<Vec<(usize, usize)>> {
            Ok(zeros_of(m)?
                .iter()
                .zip(&before)
                .map(|(a, b)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)))
                .collect())
        };
        let outcome = |model: Model, steps, seconds| -> Result<Outcome> {
            Ok(Outcome {
                mlp: model.mlp_weights(),
                zeros_per_matrix: new_zeros(&model)?,
                model,
                steps,
                seconds,
                stopped_early: false,
            })
        };
        Ok(match self {
            Self::Masked(cfg) => {
                let out = balanced_subnet(model, data.forget, data.retain, data.items, cfg, ctl)?;
                let weights_zeroed = out.zeros_per_matrix.iter().map(|(a, b)| a + b).sum();
                MethodRun {
                    outcome: out,
                    weights_zeroed,
                    note: None,
                }
            }
            Self::Durable {
                ratio,
                aggregate,
                batch_size,
            } => {
                let d = durable(model, data.forget, *ratio, *batch_size, *aggregate)?;
                let steps = data.forget.len().div_ceil((*batch_size).max(1));
                MethodRun {
                    weights_zeroed: d.zeros.iter().map(|(_, z)| z).sum(),
                    outcome: outcome(d.model, steps, d.seconds)?,
                    note: None,
                }
            }
            Self::Greedy(cfg) => {
                let g = greedy(model, data.forget, data.retain, cfg, ctl)?;
                MethodRun {
                    weights_zeroed: g.zeroed.len(),
                    outcome: outcome(g.model, g.iterations, g.seconds)?,
                    note: None,
                }
            }
            Self::Sou(cfg) => {
                let d = sou(model, data.forget, cfg, ctl)?;
                MethodRun {
                    weights_zeroed: d.zeros.iter().map(|(_, z)| z).sum(),
                    outcome: outcome(d.model, cfg.samples, d.seconds)?,
                    note: None,
                }
            }
            Self::Neuron { neuron, config } => {
                let key = format!(
                    "{neuron:?} {:?}",
                    NeuronConfig {
                        ratio: 0.0,
                        ..config.clone()
                    }
                );
                let cached = cache
                    .and_then(|c| c.0.lock().ok())
                    .and_then(|c| c.get(&key).cloned());
                let (attribution, steps, seconds) = match cached {
                    Some(a) => a,
                    None => {
                        let t = std::time::Instant::now();
                        let (a, steps) =
                            neuron_attribution(model, data.forget, *neuron, config, ctl)?;
                        let entry = (a, steps, t.elapsed().as_secs_f64());
                        if let Some(mut c) = cache.and_then(|c| c.0.lock().ok()) {
                            c.insert(key, entry.clone());
                        }
                        entry
                    }
                };
                let t = std::time::Instant::now();
                let ablated = top_neurons(&attribution, config.ratio);
                let edited = ablate(model, &ablated)?;
                let h = model.spec().hidden_size;
                MethodRun {
                    weights_zeroed: ablated.iter().map(|c| c.len() * (h + 1)).sum(),
                    outcome: outcome(edited, steps, seconds + t.elapsed().as_secs_f64())?,
                    note: None,
                }
            }
            Self::FineTune {
                data: which,
                epochs,
            } => {
                let dir = data.dir.ok_or_else(|| {
                    Error::invalid(
                        "method",
                        format!(
                            "{} retrains on the model's card data and needs its directory",
                            which.name()
                        ),
                    )
                })?;
                let f = fine_tune(model, dir, *which, *epochs)?;
                let note = format!(
                    "{}: {} rows, {epochs} epochs, {} steps, AdamW state {}",
                    which.name(),
                    f.rows,
                    f.steps,
                    if f.optimizer_resumed {
                        "resumed from optimizer.safetensors"
                    } else {
                        "started from zero (the directory has no optimizer.safetensors)"
                    }
                );
                MethodRun {
                    weights_zeroed: 0,
                    outcome: Outcome {
                        mlp: f.model.mlp_weights(),
                        zeros_per_matrix: vec![(0, 0); model.spec().num_layers],
                        model: f.model,
                        steps: f.steps,
                        seconds: f.seconds,
                        stopped_early: false,
                    },
                    note: Some(note),
                }
            }
        })
    }
}

/// Entries of `t` that are exactly 0.
fn zero_count(t: &candle_core::Tensor) -> Result<usize> {
    let v: Vec<f32> = t
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(v.iter().filter(|&&x| x == 0.0).count())
}
