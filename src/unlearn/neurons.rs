//! Neuron-level unlearning (spec §4.5 Zero-out, §4.6): every MLP neuron of every block gets an
//! attribution for how much it carries the forget set, then the `⌊ratio·I⌋` highest of each
//! block are silenced by zeroing their input weights and bias (GPT-2: column `i` of `c_fc` and
//! `c_fc.bias[i]`; GPT-NeoX: row `i` of `dense_h_to_4h` and its bias). Every activation the
//! loader accepts maps 0 to 0, so a silenced neuron outputs nothing.
//!
//! The attributions, one per [`NeuronMethod`]:
//! - **Zero-out**: the mean forget-set loss with the neuron's activation dropped, minus the
//!   loss of the unedited model (the reference kept only the probed neuron instead, spec §6.9).
//! - **Activations**: `|mean activation| · ‖out-projection weights of the neuron‖₂`, the mean
//!   over forget rows and positions `P − 1 … T − 2` taken before the absolute value.
//! - **Slimming**: a coefficient per neuron, starting at 1 and clipped to `[0, 1]`, multiplies
//!   its activation; Adam (lr 0.1) minimises the forget-set LM loss plus `l1 · mean|c|` (the
//!   mean over every neuron of the model); the attribution is the final coefficient.
//! - **HardConcrete**: an L0 gate per neuron (log-α from N(0, 0.01²), β = 2/3, stretch
//!   (−0.1, 1.1)), sampled afresh at every step; Adam (lr 0.1) minimises the forget-set LM loss
//!   plus `l1 · mean σ(log α − β·ln(0.1/1.1))` (over every neuron); the attribution is
//!   `σ(log α)`.
//!
//! Invariants:
//! - Layers are indexed by number, never by matching names (spec §6.8), and every size comes
//!   from the config.
//! - The gate methods zero their gradients before every batch (the reference accumulated them
//!   over an epoch, spec §6.11) and train every epoch in full (its `stop_loss` exit is dropped).
//! - A gate multiplies the neuron's activation through its out-projection weights, so its
//!   gradient is `Σ_j W[i, j] · ∂L/∂W_eff[i, j]` from the hand-written pass's MLP gradients: no
//!   autograd graph. These methods need that pass (f32 weights on the CPU) and say so
//!   otherwise.
//! - The input model is never mutated; bad settings and an empty forget set are refused before
//!   any work with an error naming the field; [`JobControl::cancel`] stops a run between two
//!   steps (or two probed neurons) with [`Error::Cancelled`]. Gate sampling is seeded.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{JobControl, Padded};
use crate::error::{Error, Result};
use crate::models::pass::forward::{mlp_activation_sums, row_losses};
use crate::models::pass::{HandWrittenPass, MlpGradWorkspace};
use crate::models::Model;
use crate::optim::{AdamW, AdamWParams};

/// Which attribution chooses the neurons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NeuronMethod {
    ZeroOut,
    Activations,
    Slimming,
    HardConcrete,
    IntegratedGradients,
}

/// Neuron-level settings; defaults are the reference's (batch 64, Adam lr 0.1, L1 weight 1000,
/// TinyMem's 50-token prompt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NeuronConfig {
    /// Fraction of each block's neurons silenced: `⌊ratio·I⌋` per block.
    pub ratio: f64,
    /// Slimming and HardConcrete: passes over the forget set.
    pub epochs: usize,
    pub batch_size: usize,
    /// Slimming and HardConcrete: Adam's learning rate.
    pub lr: f64,
    /// Slimming and HardConcrete: weight of the sparsity penalty.
    pub l1: f64,
    /// Activations and Integrated Gradients: prompt length `P` (positions `P − 1 … T − 2` are
    /// averaged).
    pub prompt_len: usize,
    /// Integrated Gradients: values of the activation's scale, evenly over `[0, 1]`.
    pub ig_steps: usize,
    pub seed: u64,
}

impl Default for NeuronConfig {
    fn default() -> Self {
        Self {
            ratio: 0.01,
            epochs: 10,
            batch_size: 64,
            lr: 0.1,
            l1: 1000.0,
            prompt_len: 50,
            ig_steps: 20,
            seed: 0,
        }
    }
}

/// What a neuron-level run did.
pub struct NeuronOutcome {
    pub model: Model,
    /// `[block][neuron]`.
    pub attribution: Vec<Vec<f32>>,
    /// The silenced neurons of each block, ascending.
    pub ablated: Vec<Vec<usize>>,
    /// Optimiser steps (gate methods) or forward passes (Zero-out, Activations).
    pub steps: usize,
    pub seconds: f64,
}

/// HardConcrete's temperature and stretch limits (Louizos et al., as the reference).
const BETA: f64 = 2.0 / 3.0;
const GAMMA: f64 = -0.1;
const ZETA: f64 = 1.1;

/// Runs `method` on `forget` and silences the top neurons of every block.
pub fn neuron_unlearn(
    model: &Model,
    forget: &[Vec<u32>],
    method: NeuronMethod,
    cfg: &NeuronConfig,
    ctl: &JobControl,
) -> Result<NeuronOutcome> {
    let start = Instant::now();
    let (attribution, steps) = neuron_attribution(model, forget, method, cfg, ctl)?;
    let ablated = top_neurons(&attribution, cfg.ratio);
    let model = ablate(model, &ablated)?;
    Ok(NeuronOutcome {
        model,
        attribution,
        ablated,
        steps,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Every neuron's attribution under `method` (`[block][neuron]`) and the steps it took; what
/// [`neuron_unlearn`] ranks (it does not depend on `cfg.ratio`, so a sweep over ratios can
/// compute it once, as the reference cached it).
pub fn neuron_attribution(
    model: &Model,
    forget: &[Vec<u32>],
    method: NeuronMethod,
    cfg: &NeuronConfig,
    ctl: &JobControl,
) -> Result<(Vec<Vec<f32>>, usize)> {
    validate(model, forget, method, cfg)?;
    match model {
        Model::Gpt2(m) if m.mlp_grads_supported() => attribute(m, model, forget, method, cfg, ctl),
        Model::GptNeoX(m) if m.mlp_grads_supported() => {
            attribute(m, model, forget, method, cfg, ctl)
        }
        _ => Err(Error::invalid(
            "model",
            "neuron-level methods run on the hand-written pass: f32 weights on the CPU \
             (load with --dtype f32 --device cpu)",
        )),
    }
}

fn validate(
    model: &Model,
    forget: &[Vec<u32>],
    method: NeuronMethod,
    cfg: &NeuronConfig,
) -> Result<()> {
    if !(0.0..1.0).contains(&cfg.ratio) {
        return Err(Error::invalid("ratio", "must be in [0, 1)"));
    }
    if cfg.batch_size == 0 {
        return Err(Error::invalid("batch_size", "must be positive"));
    }
    if matches!(method, NeuronMethod::Slimming | NeuronMethod::HardConcrete) {
        if cfg.epochs == 0 {
            return Err(Error::invalid("epochs", "must be positive"));
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::invalid("lr", "must be a positive number"));
        }
        if !(cfg.l1.is_finite() && cfg.l1 >= 0.0) {
            return Err(Error::invalid("l1", "must be a non-negative number"));
        }
    }
    if matches!(
        method,
        NeuronMethod::Activations | NeuronMethod::IntegratedGradients
    ) && cfg.prompt_len == 0
    {
        return Err(Error::invalid("prompt_len", "must be positive"));
    }
    if forget.is_empty() {
        return Err(Error::invalid("forget", "the forget set is empty"));
    }
    super::check_rows("forget", forget, model.spec().context_length)?;
    Ok(())
}

/// Where neuron `i`'s weights sit in a block's MLP matrices.
#[derive(Clone, Copy)]
struct Layout {
    h: usize,
    inner: usize,
    /// `nn.Linear` (`[out, in]`, GPT-NeoX) rather than `Conv1D` (`[in, out]`, GPT-2).
    linear: bool,
}

impl Layout {
    fn of(model: &Model) -> Self {
        let s = model.spec();
        Self {
            h: s.hidden_size,
            inner: s.intermediate_size,
            linear: model.mlp_is_linear_layout(),
        }
    }

    /// Index of neuron `i`'s `j`-th input weight in the in-projection.
    fn input(self, i: usize, j: usize) -> usize {
        if self.linear {
            i * self.h + j
        } else {
            j * self.inner + i
        }
    }

    /// Index of neuron `i`'s `j`-th output weight in the out-projection.
    fn output(self, i: usize, j: usize) -> usize {
        if self.linear {
            j * self.inner + i
        } else {
            i * self.h + j
        }
    }

    /// `Σ_j a[out(i, j)] · b[out(i, j)]` for every neuron `i`.
    fn per_neuron_dot(self, a: &[f32], b: &[f32]) -> Vec<f32> {
        (0..self.inner)
            .map(|i| {
                (0..self.h)
                    .map(|j| a[self.output(i, j)] * b[self.output(i, j)])
                    .sum()
            })
            .collect()
    }
}

/// The forget set as right-padded batches.
fn batches(forget: &[Vec<u32>], batch_size: usize) -> Vec<Padded> {
    forget
        .chunks(batch_size)
        .map(|rows| Padded::rows(rows.iter().map(Vec::as_slice)))
        .collect()
}

/// The model's MLP matrices as plain f32 vectors, one `(in, out)` pair per block.
pub(crate) fn mlp_vectors(model: &Model) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    model
        .mlp_weights()
        .0
        .iter()
        .map(|(a, b)| Ok((flat(a)?, flat(b)?)))
        .collect()
}

fn attribute<P: HandWrittenPass>(
    pass: &P,
    model: &Model,
    forget: &[Vec<u32>],
    method: NeuronMethod,
    cfg: &NeuronConfig,
    ctl: &JobControl,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let lay = Layout::of(model);
    let base = mlp_vectors(model)?;
    let data = batches(forget, cfg.batch_size);
    match method {
        NeuronMethod::ZeroOut => zero_out(pass, &base, lay, &data, ctl),
        NeuronMethod::Activations => activations(pass, &base, lay, &data, cfg.prompt_len),
        NeuronMethod::IntegratedGradients => super::ig::integrated_gradients(
            pass,
            (base.len(), lay.inner),
            forget,
            cfg.prompt_len,
            cfg.ig_steps,
            ctl,
        ),
        NeuronMethod::Slimming | NeuronMethod::HardConcrete => {
            train_gates(pass, &base, lay, &data, method, cfg, ctl)
        }
    }
}

/// Zero-out: per block and neuron, the forget set's mean loss with that neuron's activation
/// dropped (its out-projection weights zeroed) minus the unedited mean loss.
fn zero_out<P: HandWrittenPass>(
    pass: &P,
    base: &[(Vec<f32>, Vec<f32>)],
    lay: Layout,
    data: &[Padded],
    ctl: &JobControl,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut ws = MlpGradWorkspace::default();
    let rows: usize = data.iter().map(|p| p.bt.0).sum();
    let mut passes = 0;
    let mut mean_loss = |mlp: &[(Vec<f32>, Vec<f32>)]| -> Result<f64> {
        let mut total = 0.0;
        for p in data {
            total += row_losses(pass, &p.ids, p.bt, &p.lens, mlp, &mut ws)?
                .iter()
                .sum::<f64>();
            passes += 1;
        }
        Ok(total / rows as f64)
    };
    let original = mean_loss(base)?;
    let mut probe = base.to_vec();
    let mut attribution = vec![vec![0f32; lay.inner]; base.len()];
    for (l, attr) in attribution.iter_mut().enumerate() {
        for (i, a) in attr.iter_mut().enumerate() {
            if ctl.is_cancelled() {
                return Err(Error::Cancelled);
            }
            for j in 0..lay.h {
                probe[l].1[lay.output(i, j)] = 0.0;
            }
            *a = (mean_loss(&probe)? - original) as f32;
            for j in 0..lay.h {
                probe[l].1[lay.output(i, j)] = base[l].1[lay.output(i, j)];
            }
        }
    }
    Ok((attribution, passes))
}

/// Activations: `|mean activation over rows and positions P − 1 … T − 2| · ‖out weights‖₂`.
fn activations<P: HandWrittenPass>(
    pass: &P,
    base: &[(Vec<f32>, Vec<f32>)],
    lay: Layout,
    data: &[Padded],
    prompt_len: usize,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let nl = base.len();
    let mut sums = vec![0f64; nl * lay.inner];
    let mut count = 0usize;
    for Padded { ids, bt, lens } in data {
        let from: Vec<usize> = lens.iter().map(|&l| (prompt_len - 1).min(l)).collect();
        let s = mlp_activation_sums(pass, ids, *bt, lens, &from)?;
        for row in s.chunks_exact(nl * lay.inner) {
            sums.iter_mut()
                .zip(row)
                .for_each(|(o, &a)| *o += f64::from(a));
        }
        count += lens
            .iter()
            .zip(&from)
            .map(|(&l, &f)| l.saturating_sub(1).saturating_sub(f))
            .sum::<usize>();
    }
    if count == 0 {
        return Err(Error::invalid(
            "forget",
            format!("no sequence is longer than the prompt ({prompt_len} tokens)"),
        ));
    }
    let attribution = (0..nl)
        .map(|l| {
            let out = &base[l].1;
            let norms = lay.per_neuron_dot(out, out);
            (0..lay.inner)
                .map(|i| {
                    let mean = sums[l * lay.inner + i] / count as f64;
                    (mean.abs() * f64::from(norms[i]).sqrt()) as f32
                })
                .collect()
        })
        .collect();
    Ok((attribution, data.len()))
}

/// Slimming and HardConcrete: gates on every neuron's activation trained on the forget set.
fn train_gates<P: HandWrittenPass>(
    pass: &P,
    base: &[(Vec<f32>, Vec<f32>)],
    lay: Layout,
    data: &[Padded],
    method: NeuronMethod,
    cfg: &NeuronConfig,
    ctl: &JobControl,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let hc = method == NeuronMethod::HardConcrete;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let init: Vec<Vec<f32>> = if hc {
        // N(0, 0.01²) by Box–Muller.
        let mut normal = || {
            let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
            (0.01 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        };
        (0..base.len())
            .map(|_| (0..lay.inner).map(|_| normal()).collect())
            .collect()
    } else {
        vec![vec![1.0; lay.inner]; base.len()]
    };
    let vars: Vec<(String, Var)> = init
        .into_iter()
        .enumerate()
        .map(|(l, v)| {
            Ok((
                format!("gate.{l}"),
                Var::from_vec(v, lay.inner, &Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            lr: cfg.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let shift = BETA * (-GAMMA / ZETA).ln();
    // The penalty is a mean over every neuron of the model.
    let penalty_scale = cfg.l1 / (lay.inner * base.len()) as f64;
    let mut eff = base.to_vec();
    let mut ws = MlpGradWorkspace::default();
    let mut steps = 0;
    for _ in 0..cfg.epochs {
        for Padded { ids, bt, lens } in data {
            if ctl.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let params: Vec<Vec<f32>> = vars
                .iter()
                .map(|(_, v)| Ok(v.as_tensor().to_vec1::<f32>()?))
                .collect::<Result<_>>()?;
            // The gate values and ∂gate/∂param.
            let mut gates = Vec::with_capacity(params.len());
            let mut dgate = Vec::with_capacity(params.len());
            for p in &params {
                if hc {
                    let (z, dz): (Vec<f32>, Vec<f32>) = p
                        .iter()
                        .map(|&la| hard_concrete(f64::from(la), rng.random_range(1e-6..1.0 - 1e-6)))
                        .unzip();
                    gates.push(z);
                    dgate.push(dz);
                } else {
                    gates.push(p.clone());
                    dgate.push(vec![1.0; p.len()]);
                }
            }
            for (l, z) in gates.iter().enumerate() {
                for (i, &g) in z.iter().enumerate() {
                    for j in 0..lay.h {
                        let k = lay.output(i, j);
                        eff[l].1[k] = base[l].1[k] * g;
                    }
                }
            }
            let row_weight = vec![1.0 / bt.0 as f32; bt.0];
            let out = pass.mlp_grads(ids, *bt, lens, &row_weight, &eff, &mut ws)?;
            if !out.loss.is_finite() {
                return Err(Error::invalid(
                    "lr",
                    format!("the gate training diverged (loss {})", out.loss),
                ));
            }
            let grads: Vec<Vec<f32>> = (0..base.len())
                .map(|l| {
                    let dz = lay.per_neuron_dot(&base[l].1, out.grads[l].1);
                    (0..lay.inner)
                        .map(|i| {
                            let p = f64::from(params[l][i]);
                            let reg = if hc {
                                let s = sigmoid(p - shift);
                                penalty_scale * s * (1.0 - s)
                            } else if p > 0.0 {
                                penalty_scale
                            } else {
                                0.0
                            };
                            dz[i] * dgate[l][i] + reg as f32
                        })
                        .collect()
                })
                .collect();
            let index: HashMap<&str, usize> = vars
                .iter()
                .enumerate()
                .map(|(l, (n, _))| (n.as_str(), l))
                .collect();
            opt.step_slices(|name| index.get(name).map(|&l| grads[l].as_slice()))?;
            if !hc {
                for (_, v) in &vars {
                    v.set(&v.as_tensor().clamp(0f32, 1f32)?)?;
                }
            }
            steps += 1;
        }
    }
    let attribution = vars
        .iter()
        .map(|(_, v)| {
            let p = v.as_tensor().to_vec1::<f32>()?;
            Ok(if hc {
                p.iter().map(|&x| sigmoid(f64::from(x)) as f32).collect()
            } else {
                p.iter().map(|x| x.clamp(0.0, 1.0)).collect()
            })
        })
        .collect::<Result<_>>()?;
    Ok((attribution, steps))
}

/// A hard-concrete gate sampled with uniform noise `u`: `(z, ∂z/∂log α)`, where
/// `s = σ((ln u − ln(1 − u) + log α)/β)` and `z = clamp(s·(ζ − γ) + γ, 0, 1)`.
fn hard_concrete(log_alpha: f64, u: f64) -> (f32, f32) {
    let s = sigmoid(((u.ln() - (1.0 - u).ln()) + log_alpha) / BETA);
    let stretched = s * (ZETA - GAMMA) + GAMMA;
    let slope = if stretched > 0.0 && stretched < 1.0 {
        (ZETA - GAMMA) * s * (1.0 - s) / BETA
    } else {
        0.0
    };
    (stretched.clamp(0.0, 1.0) as f32, slope as f32)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The `⌊ratio·I⌋` highest-attributed neurons of each block (ties: the lower index), ascending.
pub fn top_neurons(attribution: &[Vec<f32>], ratio: f64) -> Vec<Vec<usize>> {
    attribution
        .iter()
        .map(|a| {
            let k = ((a.len() as f64 * ratio).floor() as usize).min(a.len());
            let mut idx: Vec<usize> = (0..a.len()).collect();
            idx.sort_by(|&x, &y| a[y].total_cmp(&a[x]).then(x.cmp(&y)));
            let mut top = idx[..k].to_vec();
            top.sort_unstable();
            top
        })
        .collect()
}

/// `model` with each listed neuron of each block silenced: its input weights and bias zeroed.
pub fn ablate(model: &Model, neurons: &[Vec<usize>]) -> Result<Model> {
    let lay = Layout::of(model);
    let names = model.mlp_weight_names();
    if neurons.len() != names.len() || neurons.iter().flatten().any(|&i| i >= lay.inner) {
        return Err(Error::invalid(
            "neurons",
            format!(
                "{} blocks of neuron indices for a model of {} blocks of {}",
                neurons.len(),
                names.len(),
                lay.inner
            ),
        ));
    }
    let mut edits = Vec::new();
    for ((fc, _), chosen) in names.iter().zip(neurons) {
        if chosen.is_empty() {
            continue;
        }
        let mut w = model.param_values(fc)?.expect("an MLP weight of the model");
        for &i in chosen {
            for j in 0..lay.h {
                w[lay.input(i, j)] = 0.0;
            }
        }
        edits.push((fc.clone(), w));
        let bias = fc.trim_end_matches(".weight").to_string() + ".bias";
        if let Some(mut b) = model.param_values(&bias)? {
            for &i in chosen {
                b[i] = 0.0;
            }
            edits.push((bias, b));
        }
    }
    model.with_edits("neuron ablation", edits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ops, Inputs};
    use crate::test_util::{memorizing, Memorizing};

    fn run(method: NeuronMethod, ratio: f64, epochs: usize) -> (Memorizing, NeuronOutcome) {
        run_with(method, ratio, epochs, NeuronConfig::default().l1)
    }

    fn run_with(
        method: NeuronMethod,
        ratio: f64,
        epochs: usize,
        l1: f64,
    ) -> (Memorizing, NeuronOutcome) {
        let m = memorizing();
        let cfg = NeuronConfig {
            ratio,
            epochs,
            l1,
            prompt_len: 8,
            ..NeuronConfig::default()
        };
        let out = neuron_unlearn(&m.model, &m.forget, method, &cfg, &JobControl::new()).unwrap();
        (m, out)
    }

    fn mean_loss(model: &Model, rows: &[Vec<u32>]) -> f64 {
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap();
        let logits = model
            .forward(&Inputs::causal(&ids, 0).unwrap(), None, None)
            .unwrap();
        f64::from(
            ops::lm_loss(&logits, &ids)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    }

    /// The chosen neurons' input weights and bias are zero; every other entry is unchanged.
    fn assert_exactly_silenced(before: &Model, after: &Model, ablated: &[Vec<usize>]) {
        let lay = Layout::of(before);
        let (b, a) = (mlp_vectors(before).unwrap(), mlp_vectors(after).unwrap());
        for (l, chosen) in ablated.iter().enumerate() {
            for i in 0..lay.inner {
                for j in 0..lay.h {
                    let k = lay.input(i, j);
                    let want = if chosen.contains(&i) { 0.0 } else { b[l].0[k] };
                    assert_eq!(a[l].0[k], want, "block {l} neuron {i}");
                }
            }
            assert_eq!(a[l].1, b[l].1, "out-projection of block {l} untouched");
        }
    }

    #[test]
    fn zero_out_scores_each_neuron_by_the_loss_of_dropping_it_and_zeroes_exactly_those_chosen() {
        let (m, out) = run(NeuronMethod::ZeroOut, 0.25, 1);
        assert!(out.ablated.iter().all(|a| a.len() == 16));
        assert_exactly_silenced(&m.model, &out.model, &out.ablated);
        // Dropping the top neuron (silencing it) raises the forget loss by its attribution.
        let base = mean_loss(&m.model, &m.forget);
        for l in 0..2 {
            let top = top_neurons(&out.attribution, 1.0 / 64.0)[l][0];
            let mut one = vec![Vec::new(); 2];
            one[l] = vec![top];
            let dropped = mean_loss(&ablate(&m.model, &one).unwrap(), &m.forget);
            let a = f64::from(out.attribution[l][top]);
            assert!(
                a > 0.0 && ((dropped - base) - a).abs() < 1e-4 * (1.0 + a),
                "{l}: {a} vs {}",
                dropped - base
            );
        }
        assert_eq!(
            out.steps,
            1 + 2 * 64,
            "one pass per neuron plus the baseline"
        );
        assert!(Memorizing::extractable(&out.model, &m.forget) < 4);
    }

    #[test]
    fn integrated_gradients_silences_the_neurons_that_carry_the_memorized_tokens() {
        let (m, out) = run(NeuronMethod::IntegratedGradients, 0.25, 1);
        assert!(out.ablated.iter().all(|a| a.len() == 16));
        assert_exactly_silenced(&m.model, &out.model, &out.ablated);
        // The chosen neurons are the largest attributions of their block.
        for (attr, chosen) in out.attribution.iter().zip(&out.ablated) {
            let least = chosen
                .iter()
                .map(|&i| attr[i])
                .fold(f32::INFINITY, f32::min);
            let others = (0..attr.len()).filter(|i| !chosen.contains(i));
            assert!(others.map(|i| attr[i]).all(|a| a <= least));
        }
        // One activation pass and one patched pass per block, for each of the 4 rows.
        assert_eq!(out.steps, 4 * 3);
        assert!(Memorizing::extractable(&out.model, &m.forget) < 4);
    }

    #[test]
    fn activation_sums_cover_positions_from_the_prompt_to_the_second_last() {
        let m = memorizing();
        let Model::Gpt2(g) = &m.model else {
            unreachable!()
        };
        let row = &m.forget[0];
        let sums = |len: usize, from: usize| {
            mlp_activation_sums(g, &row[..len], (1, len), &[len], &[from]).unwrap()
        };
        // Positions 0..5 plus 5..22 are positions 0..22 (a position's activation does not
        // depend on later tokens, so the row cut after position 5 has the same ones).
        let (head, tail, all) = (sums(6, 0), sums(24, 5), sums(24, 0));
        for ((h, t), a) in head.iter().zip(&tail).zip(&all) {
            assert!(
                (h + t - a).abs() < 1e-4 * (1.0 + a.abs()),
                "{h} + {t} vs {a}"
            );
        }
        assert!(all.iter().all(|&x| x >= 0.0), "ReLU activations");
        assert!(all.iter().any(|&x| x > 0.0));
        // A row padded in a batch beside a longer one sums the same.
        let padded: Vec<u32> = row[..12]
            .iter()
            .chain(&[0; 12])
            .chain(row)
            .copied()
            .collect();
        let two = mlp_activation_sums(g, &padded, (2, 24), &[12, 24], &[7, 7]).unwrap();
        let alone = sums(12, 7);
        for (p, a) in two[..alone.len()].iter().zip(&alone) {
            assert!((p - a).abs() < 1e-4 * (1.0 + a.abs()));
        }
        // The attribution is |mean| · ‖out weights‖ over positions P − 1 … T − 2.
        let (m, out) = run(NeuronMethod::Activations, 0.25, 1);
        let lay = Layout::of(&m.model);
        let base = mlp_vectors(&m.model).unwrap();
        let mut total = vec![0f64; 2 * 64];
        for r in &m.forget {
            let s = mlp_activation_sums(g, r, (1, 24), &[24], &[7]).unwrap();
            total
                .iter_mut()
                .zip(&s)
                .for_each(|(t, &x)| *t += f64::from(x));
        }
        let count = (4 * (24 - 1 - 7)) as f64;
        for l in 0..2 {
            let norms = lay.per_neuron_dot(&base[l].1, &base[l].1);
            for i in 0..64 {
                let want = (total[l * 64 + i] / count).abs() * f64::from(norms[i]).sqrt();
                let got = f64::from(out.attribution[l][i]);
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want),
                    "{l}/{i}: {got} vs {want}"
                );
            }
        }
        assert_exactly_silenced(&m.model, &out.model, &out.ablated);
        assert!(Memorizing::extractable(&out.model, &m.forget) < 4);
    }

    #[test]
    fn slimming_keeps_coefficients_in_the_unit_interval_and_the_penalty_shrinks_them() {
        // At the reference's weight (1000) the penalty beats every coefficient's LM gradient on
        // this model and closes them all: the attribution ties and the lowest indices go.
        let (_, out) = run(NeuronMethod::Slimming, 0.25, 20);
        assert_eq!(out.steps, 20, "one batch of 4 rows per epoch");
        assert!(out.attribution.concat().iter().all(|&c| c == 0.0));
        assert_eq!(out.ablated[0], (0..16).collect::<Vec<_>>());
        // At 10 the coefficients the forget set needs stay open, and those are silenced.
        let (m, out) = run_with(NeuronMethod::Slimming, 0.25, 20, 10.0);
        let flat: Vec<f32> = out.attribution.concat();
        assert!(flat.iter().all(|c| (0.0..=1.0).contains(c)));
        let open = flat.iter().filter(|&&c| c > 0.0).count();
        assert!(
            open > 0 && open < flat.len(),
            "{open} of {} open",
            flat.len()
        );
        for (l, chosen) in out.ablated.iter().enumerate() {
            let least = chosen
                .iter()
                .map(|&i| out.attribution[l][i])
                .fold(1.0, f32::min);
            assert!(out.attribution[l]
                .iter()
                .enumerate()
                .all(|(i, &c)| chosen.contains(&i) || c <= least));
        }
        assert_exactly_silenced(&m.model, &out.model, &out.ablated);
        assert!(Memorizing::extractable(&out.model, &m.forget) < 4);
    }

    #[test]
    fn hard_concrete_gates_are_sampled_and_the_l0_penalty_closes_them() {
        // The same log α gives different gates under different noise, and the slope is the
        // derivative of the gate (a finite difference where the gate is inside (0, 1)).
        let (a, _) = hard_concrete(0.3, 0.2);
        let (b, _) = hard_concrete(0.3, 0.7);
        assert!(a != b && (0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&b));
        let (z, dz) = hard_concrete(0.1, 0.45);
        let (z2, _) = hard_concrete(0.1 + 1e-3, 0.45);
        assert!(z > 0.0 && z < 1.0);
        assert!(
            (f64::from(z2 - z) / 1e-3 - f64::from(dz)).abs() < 1e-2,
            "{dz}"
        );
        assert_eq!(hard_concrete(-20.0, 0.5), (0.0, 0.0), "clamped shut");
        assert_eq!(hard_concrete(20.0, 0.5), (1.0, 0.0), "clamped open");
        let (m, out) = run(NeuronMethod::HardConcrete, 0.25, 20);
        let flat: Vec<f32> = out.attribution.concat();
        let mean = flat.iter().sum::<f32>() / flat.len() as f32;
        // σ(log α) starts at ≈ 0.5 (log α ~ N(0, 0.01²)); the penalty closes most gates.
        assert!(mean < 0.4, "mean gate {mean}");
        assert!(flat.iter().cloned().fold(0.0, f32::max) > mean);
        assert_exactly_silenced(&m.model, &out.model, &out.ablated);
        assert!(Memorizing::extractable(&out.model, &m.forget) < 4);
    }

    /// GPT-NeoX's `[out, in]` layout: Zero-out's attribution of a neuron is the loss of the
    /// model [`ablate`] silences it in, and ablation zeroes that neuron's row and bias only.
    #[test]
    fn neox_neurons_are_found_in_the_linear_layout() {
        let config = crate::test_util::neox(
            (14, 64, 32, 4, 48),
            2,
            0.25,
            true,
            crate::models::ops::Activation::Gelu,
            true,
            false,
        );
        let model = Model::random(&config, &Device::Cpu).unwrap();
        let forget = crate::test_util::rows(3, |_| 12, 5);
        let cfg = NeuronConfig {
            ratio: 0.1,
            ..NeuronConfig::default()
        };
        let out = neuron_unlearn(
            &model,
            &forget,
            NeuronMethod::ZeroOut,
            &cfg,
            &JobControl::new(),
        )
        .unwrap();
        assert!(out.ablated.iter().all(|a| a.len() == 4));
        assert_exactly_silenced(&model, &out.model, &out.ablated);
        let base = mean_loss(&model, &forget);
        let i = out.ablated[1][0];
        let dropped = mean_loss(&ablate(&model, &[vec![], vec![i]]).unwrap(), &forget);
        let a = f64::from(out.attribution[1][i]);
        assert!(
            ((dropped - base) - a).abs() < 1e-4 * (1.0 + a.abs()),
            "{a} vs {}",
            dropped - base
        );
        let bias = mlp_bias(&out.model, 1);
        assert!(out.ablated[1].iter().all(|&i| bias[i] == 0.0));
    }

    fn mlp_bias(model: &Model, layer: usize) -> Vec<f32> {
        let name = model.mlp_weight_names()[layer]
            .0
            .replace(".weight", ".bias");
        let t = &model
            .named_tensors()
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        t.to_vec1().unwrap()
    }

    #[test]
    fn bad_settings_are_refused_by_name_before_any_work() {
        let m = memorizing();
        let ctl = JobControl::new();
        let bad = |cfg: NeuronConfig, method, forget: &[Vec<u32>]| match neuron_unlearn(
            &m.model, forget, method, &cfg, &ctl,
        ) {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{:?}", other.map(|o| o.steps)),
        };
        let d = NeuronConfig::default;
        assert_eq!(
            bad(
                NeuronConfig { ratio: 1.0, ..d() },
                NeuronMethod::ZeroOut,
                &m.forget
            ),
            "ratio"
        );
        assert_eq!(
            bad(
                NeuronConfig { epochs: 0, ..d() },
                NeuronMethod::Slimming,
                &m.forget
            ),
            "epochs"
        );
        assert_eq!(
            bad(
                NeuronConfig {
                    l1: f64::NAN,
                    ..d()
                },
                NeuronMethod::HardConcrete,
                &m.forget
            ),
            "l1"
        );
        assert_eq!(bad(d(), NeuronMethod::Activations, &[]), "forget");
        assert_eq!(
            bad(d(), NeuronMethod::Activations, &[vec![1; 33]]),
            "forget"
        );
        let ctl = JobControl::new();
        ctl.cancel();
        assert!(matches!(
            neuron_unlearn(&m.model, &m.forget, NeuronMethod::ZeroOut, &d(), &ctl),
            Err(Error::Cancelled)
        ));
    }
}
