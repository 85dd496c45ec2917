//! Training-time regularizers (spec §4.7), the paper's first class of mitigation: spectral-norm
//! regularization, loss truncation and example-tied dropout, each a [`Regularizer`] in
//! [`super::train::TrainConfig`] that `lethe tinymem train` applies on the hand-written pass.
//!
//! Invariants:
//! - Spectral norm adds `(λ/2)·Σ σ_max` over every weight matrix but LayerNorms, embeddings, the
//!   head and biases: `σ = uᵀWv` after one power-iteration step per optimiser step from
//!   persistent `u` vectors started from Gaussian noise, its gradient `u vᵀ` (through `W` only).
//!   The attention's packed projection is split into `3·n_head` blocks and its output
//!   projection into `n_head` blocks along the output dimension (the reference's column blocks
//!   of GPT-2's `[in, out]` `Conv1D`), each with its own `σ`.
//! - Loss truncation keeps the last `window` (10,000) per-sample losses; from the `window`-th
//!   sample on it recomputes the `(1 − dropc)` percentile (linear interpolation, numpy's default)
//!   every `window` samples, and a sample whose loss is at or above it gets weight 0 in the
//!   batch's mean. Until then every sample counts. The per-sample losses that decide a batch's
//!   mask come from a forward pass before the step's forward and backward.
//! - Example-tied dropout multiplies each example's MLP activations (every block, after the
//!   nonlinearity) by a mask fixed for that example: the first `⌊p_fixed·I⌋` neurons always on,
//!   each other neuron on with probability `p_mem`, drawn from a PRNG seeded by the training
//!   seed and the example's index. The model evaluated and written drops the memorization
//!   neurons and scales the fixed ones by `(p_fixed + p_mem)/p_fixed`, folded into the MLP's
//!   output projection, so the checkpoint is a plain GPT-2 / GPT-NeoX.
//! - Settings are validated before training; a regularizer needs the hand-written pass (f32 on
//!   the CPU), and a regularized run cannot be resumed (its state is not checkpointed): both are
//!   errors naming the setting, never a panic.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::train::{apply_grads, StepReport, StepWorkspace};
use crate::error::{Error, Result};
use crate::models::pass::{run, HandWrittenPass, MlpGradWorkspace, TrainGrads, Want};
use crate::models::Model;
use crate::optim::AdamW;

/// A training-time regularizer and its hyper-parameters (spec §4.7).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Regularizer {
    /// `(λ/2)·Σ σ_max` added to the loss (the paper's grid: λ ∈ {0.001, 0.01, 0.1}).
    SpectralNorm { lambda: f64 },
    /// Samples at or above the `(1 − dropc)` loss percentile are dropped (dropc ∈ {0.01, 0.05,
    /// 0.1}); the percentile is recomputed every `window` samples over the last `window`.
    LossTruncation { dropc: f64, window: usize },
    /// Per-example neuron masks: `p_fixed` always-on neurons, `p_mem` of the rest per example.
    ExampleTiedDropout { p_fixed: f64, p_mem: f64 },
}

impl Regularizer {
    /// The name `lethe tinymem compare` reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SpectralNorm { .. } => "spectral-norm",
            Self::LossTruncation { .. } => "loss-truncation",
            Self::ExampleTiedDropout { .. } => "example-tied-dropout",
        }
    }

    /// The hyper-parameter the paper sweeps (λ, dropc or p_mem).
    pub fn strength(&self) -> f64 {
        match *self {
            Self::SpectralNorm { lambda } => lambda,
            Self::LossTruncation { dropc, .. } => dropc,
            Self::ExampleTiedDropout { p_mem, .. } => p_mem,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::SpectralNorm { lambda } if !(lambda.is_finite() && lambda > 0.0) => Err(
                Error::invalid("spectral_norm", "λ must be a positive number"),
            ),
            Self::LossTruncation { dropc, .. } if !(dropc > 0.0 && dropc < 1.0) => {
                Err(Error::invalid("loss_truncation", "dropc must be in (0, 1)"))
            }
            Self::LossTruncation { window: 0, .. } => {
                Err(Error::invalid("truncation_window", "must be positive"))
            }
            Self::ExampleTiedDropout { p_fixed, p_mem }
                if !(p_fixed > 0.0 && p_fixed < 1.0 && p_mem > 0.0 && p_mem <= 1.0) =>
            {
                Err(Error::invalid(
                    "example_tied_dropout",
                    "p_fixed must be in (0, 1) and p_mem in (0, 1]",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A regularizer's state during one training run.
pub struct Regularize {
    kind: Regularizer,
    state: State,
}

enum State {
    Spectral(Vec<SpectralBlock>),
    Truncation(LossBuffer),
    Dropout(NeuronMasks),
}

impl Regularize {
    /// The state of `kind` for training `model` (sizes from the model, noise from `seed`).
    pub fn new(kind: Regularizer, model: &Model, seed: u64) -> Result<Self> {
        kind.validate()?;
        let fast = match model {
            Model::Gpt2(m) => m.mlp_grads_supported(),
            Model::GptNeoX(m) => m.mlp_grads_supported(),
        };
        if !fast {
            return Err(Error::invalid(
                "regularizer",
                "regularized training runs on the hand-written pass: f32 weights on the CPU",
            ));
        }
        let state = match kind {
            Regularizer::SpectralNorm { .. } => State::Spectral(spectral_blocks(model, seed)?),
            Regularizer::LossTruncation { dropc, window } => {
                State::Truncation(LossBuffer::new(dropc, window))
            }
            Regularizer::ExampleTiedDropout { p_fixed, p_mem } => {
                let inner = model.spec().intermediate_size;
                State::Dropout(NeuronMasks {
                    inner,
                    fixed: (p_fixed * inner as f64).floor() as usize,
                    p_mem,
                    scale: ((p_fixed + p_mem) / p_fixed) as f32,
                    seed,
                })
            }
        };
        Ok(Self { kind, state })
    }

    pub fn kind(&self) -> Regularizer {
        self.kind
    }

    /// One regularized training step on `ids` (`[b, t]`, no padding), whose rows are training
    /// examples `examples` (indices into the training set): the gradient of the regularized
    /// loss, then one step of `opt`. The reported loss is the batch's plain LM loss.
    pub fn step(
        &mut self,
        model: &Model,
        opt: &mut AdamW,
        ids: &[u32],
        bt: (usize, usize),
        examples: &[usize],
        ws: &mut StepWorkspace,
    ) -> Result<StepReport> {
        if examples.len() != bt.0 {
            return Err(Error::invalid(
                "examples",
                format!("{} example indices for {} rows", examples.len(), bt.0),
            ));
        }
        let t0 = Instant::now();
        let out = match model {
            Model::Gpt2(m) => self.grads(m, ids, bt, examples, &mut ws.grad)?,
            Model::GptNeoX(m) => self.grads(m, ids, bt, examples, &mut ws.grad)?,
        };
        let mut extra: HashMap<usize, Vec<f32>> = HashMap::new();
        if let (Regularizer::SpectralNorm { lambda }, State::Spectral(blocks)) =
            (self.kind, &mut self.state)
        {
            // Each weight is read once per step, however many blocks it is cut into.
            let mut weights: HashMap<usize, Vec<f32>> = HashMap::new();
            for blk in blocks.iter_mut() {
                let w = match weights.entry(blk.param) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        let name = &model.named_tensors()[blk.param].0;
                        e.insert(model.param_values(name)?.expect("a parameter of the model"))
                    }
                };
                let g = extra
                    .entry(blk.param)
                    .or_insert_with(|| out.grads[blk.param].to_vec());
                blk.power_step(w);
                blk.add_grad(g, (lambda / 2.0) as f32);
            }
        }
        let grad = |i: usize| extra.get(&i).map_or(out.grads[i], Vec::as_slice);
        apply_grads(model, opt, grad, out.loss, t0)
    }

    /// The regularized loss's LM part and every parameter's gradient of it.
    fn grads<'w, M: HandWrittenPass>(
        &mut self,
        pass: &M,
        ids: &[u32],
        (b, t): (usize, usize),
        examples: &[usize],
        ws: &'w mut MlpGradWorkspace,
    ) -> Result<TrainGrads<'w>> {
        Ok(match &mut self.state {
            State::Spectral(_) => pass.train_grads(ids, (b, t), ws)?,
            State::Dropout(masks) => pass.dropped_grads(ids, (b, t), &masks.train(examples), ws)?,
            State::Truncation(buffer) => {
                let lens = vec![t; b];
                let mut weight = vec![1.0 / b as f32; b];
                if let Some(threshold) = buffer.threshold {
                    let none = vec![0.0; b];
                    let (_, losses) =
                        run(pass, ids, (b, t), &lens, &none, None, Want::Forward, ws)?;
                    for (w, l) in weight.iter_mut().zip(losses) {
                        if l >= threshold {
                            *w = 0.0;
                        }
                    }
                }
                let mut out = pass.weighted_grads(ids, (b, t), &lens, &weight, ws)?;
                buffer.push(&out.row_loss);
                out.loss = out.row_loss.iter().sum::<f64>() / b as f64;
                out
            }
        })
    }

    /// The model as the regularizer evaluates it, untracked: example-tied dropout's evaluation
    /// weights, otherwise `model` itself.
    pub fn evaluated(&self, model: &Model) -> Result<Model> {
        match &self.state {
            State::Dropout(masks) => masks.fold(model),
            _ => model.detached("training snapshot"),
        }
    }

    /// Loss truncation's current threshold (`None` before `window` samples, or another
    /// regularizer).
    pub fn truncation_threshold(&self) -> Option<f64> {
        match &self.state {
            State::Truncation(b) => b.threshold,
            _ => None,
        }
    }
}

/// One spectral-norm block: rows `block·rows..(block + 1)·rows` of parameter `param`'s
/// `[out, in]` view, and its power-iteration vector `u` (`rows` long).
struct SpectralBlock {
    param: usize,
    /// Whether the parameter is stored `[out, in]` (GPT-NeoX) rather than `[in, out]`.
    linear: bool,
    out: usize,
    inp: usize,
    row0: usize,
    u: Vec<f32>,
    v: Vec<f32>,
}

impl SpectralBlock {
    /// Element `(o, i)` of the block's `[rows, in]` view of `w`.
    fn at(&self, o: usize, i: usize) -> usize {
        let o = self.row0 + o;
        if self.linear {
            o * self.inp + i
        } else {
            i * self.out + o
        }
    }

    /// One power-iteration step on the weights `w`: `v ← Mᵀu/‖·‖`, `u ← Mv/‖·‖`; returns
    /// `σ = uᵀMv`.
    fn power_step(&mut self, w: &[f32]) -> f64 {
        let (rows, inp) = (self.u.len(), self.inp);
        let mut v = vec![0.0f64; inp];
        for o in 0..rows {
            let uo = f64::from(self.u[o]);
            for (i, vi) in v.iter_mut().enumerate() {
                *vi += f64::from(w[self.at(o, i)]) * uo;
            }
        }
        normalize(&mut v);
        let mut u: Vec<f64> = (0..rows)
            .map(|o| (0..inp).map(|i| f64::from(w[self.at(o, i)]) * v[i]).sum())
            .collect();
        let sigma = normalize(&mut u);
        self.u = u.iter().map(|&x| x as f32).collect();
        self.v = v.iter().map(|&x| x as f32).collect();
        sigma
    }

    /// Adds `scale · u vᵀ` (`∂σ/∂W` with `u`, `v` held) into the parameter's gradient `g`.
    fn add_grad(&self, g: &mut [f32], scale: f32) {
        for (o, &uo) in self.u.iter().enumerate() {
            for (i, &vi) in self.v.iter().enumerate() {
                g[self.at(o, i)] += scale * uo * vi;
            }
        }
    }
}

/// Scales `x` to unit length; returns its length before.
fn normalize(x: &mut [f64]) -> f64 {
    let n = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    if n > 0.0 {
        x.iter_mut().for_each(|v| *v /= n);
    }
    n
}

/// The spectral-norm blocks of every regularized weight of `model` (see the module's
/// invariants), their `u` drawn from N(0, 1) seeded by `seed`.
fn spectral_blocks(model: &Model, seed: u64) -> Result<Vec<SpectralBlock>> {
    let spec = model.spec();
    let heads = spec.num_heads;
    let linear = model.mlp_is_linear_layout();
    let split = |name: &str| -> Option<usize> {
        if name.ends_with("attn.c_attn.weight")
            || name.ends_with("attention.query_key_value.weight")
        {
            Some(3 * heads)
        } else if name.ends_with("attn.c_proj.weight") || name.ends_with("attention.dense.weight") {
            Some(heads)
        } else if name.ends_with("mlp.c_fc.weight")
            || name.ends_with("mlp.c_proj.weight")
            || name.ends_with("mlp.dense_h_to_4h.weight")
            || name.ends_with("mlp.dense_4h_to_h.weight")
        {
            Some(1)
        } else {
            None
        }
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EC7_0A11);
    let mut blocks = Vec::new();
    for (param, (name, t)) in model.named_tensors().iter().enumerate() {
        let Some(n) = split(name) else { continue };
        let &[a, b] = t.dims() else {
            return Err(Error::invalid("weights", format!("{name} is not a matrix")));
        };
        let (out, inp) = if linear { (a, b) } else { (b, a) };
        if !out.is_multiple_of(n) {
            return Err(Error::invalid(
                "weights",
                format!("{name}: {out} outputs do not split into {n} blocks"),
            ));
        }
        for k in 0..n {
            let mut u: Vec<f64> = (0..out / n).map(|_| gaussian(&mut rng)).collect();
            normalize(&mut u);
            blocks.push(SpectralBlock {
                param,
                linear,
                out,
                inp,
                row0: k * out / n,
                u: u.iter().map(|&x| x as f32).collect(),
                v: vec![0.0; inp],
            });
        }
    }
    Ok(blocks)
}

/// A draw from N(0, 1) (Box–Muller).
fn gaussian(rng: &mut StdRng) -> f64 {
    let (a, b): (f64, f64) = (rng.random(), rng.random());
    (-2.0 * (1.0 - a).ln()).sqrt() * (std::f64::consts::TAU * b).cos()
}

/// Loss truncation's buffer of recent per-sample losses.
struct LossBuffer {
    dropc: f64,
    window: usize,
    losses: Vec<f64>,
    /// Samples seen; the next one goes to `losses[seen % window]`.
    seen: usize,
    threshold: Option<f64>,
}

impl LossBuffer {
    fn new(dropc: f64, window: usize) -> Self {
        Self {
            dropc,
            window,
            losses: Vec::with_capacity(window),
            seen: 0,
            threshold: None,
        }
    }

    /// Records a batch's per-sample losses; every `window` samples, the threshold is the
    /// `(1 − dropc)` percentile of the last `window`.
    fn push(&mut self, batch: &[f64]) {
        for &l in batch {
            if self.losses.len() < self.window {
                self.losses.push(l);
            } else {
                self.losses[self.seen % self.window] = l;
            }
            self.seen += 1;
            if self.seen.is_multiple_of(self.window) {
                self.threshold = Some(percentile(&self.losses, 1.0 - self.dropc));
            }
        }
    }
}

/// The `q`-quantile of `x` with linear interpolation between order statistics (numpy's
/// default).
fn percentile(x: &[f64], q: f64) -> f64 {
    let mut s = x.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    match s.get(lo + 1) {
        Some(&hi) => s[lo] + frac * (hi - s[lo]),
        None => s[lo],
    }
}

/// Example-tied dropout's masks.
struct NeuronMasks {
    inner: usize,
    /// The always-on ("generalization") neurons are `0..fixed`.
    fixed: usize,
    p_mem: f64,
    /// The fixed neurons' evaluation scale, `(p_fixed + p_mem)/p_fixed`.
    scale: f32,
    seed: u64,
}

impl NeuronMasks {
    /// Example `e`'s training mask (`inner` values of 0 or 1).
    fn of(&self, e: usize) -> Vec<f32> {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (e as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        (0..self.inner)
            .map(|j| {
                let on = j < self.fixed || rng.random::<f64>() < self.p_mem;
                if on {
                    1.0
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The masks of `examples`, `[b, inner]` row-major.
    fn train(&self, examples: &[usize]) -> Vec<f32> {
        examples.iter().flat_map(|&e| self.of(e)).collect()
    }

    /// `model` with the evaluation mask folded into each MLP output projection: input neuron
    /// `j` scaled by `scale` (fixed) or 0 (memorization).
    fn fold(&self, model: &Model) -> Result<Model> {
        let linear = model.mlp_is_linear_layout();
        let mut edits = Vec::new();
        for (_, proj) in model.mlp_weight_names() {
            let mut w = model
                .param_values(&proj)?
                .expect("an MLP weight of the model");
            let h = w.len() / self.inner;
            for j in 0..self.inner {
                let s = if j < self.fixed { self.scale } else { 0.0 };
                for o in 0..h {
                    // `[inner, h]` (GPT-2) or `[h, inner]` (GPT-NeoX).
                    let k = if linear {
                        o * self.inner + j
                    } else {
                        j * h + o
                    };
                    w[k] *= s;
                }
            }
            edits.push((proj, w));
        }
        model.with_edits("example-tied dropout (evaluation weights)", edits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Weights;
    use crate::test_util::rel_l2;
    use candle_core::{DType, Device};

    fn tiny(linear: bool, seed: u64) -> Model {
        let cfg = if linear {
            crate::test_util::neox(
                (11, 16, 16, 2, 32),
                2,
                0.25,
                true,
                crate::models::ops::Activation::Gelu,
                true,
                false,
            )
        } else {
            crate::test_util::relu_gpt2((11, 16, 16, 2), 2, true, false)
        };
        let w = Weights::init_seeded(seed, DType::F32, &Device::Cpu);
        Model::new(&cfg, &w).unwrap().detached("test").unwrap()
    }

    fn ids(seed: u64, n: usize) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..11u32)).collect()
    }

    /// The largest singular value of the `[rows, cols]` matrix `m`, by 500 power iterations
    /// on `MᵀM` in f64.
    fn top_singular(m: &[Vec<f64>]) -> f64 {
        let cols = m[0].len();
        let mut v = vec![1.0; cols];
        let mut s = 0.0;
        for _ in 0..500 {
            let mv: Vec<f64> = m
                .iter()
                .map(|r| r.iter().zip(&v).map(|(a, b)| a * b).sum())
                .collect();
            let mut w = vec![0.0; cols];
            for (r, x) in m.iter().zip(&mv) {
                w.iter_mut().zip(r).for_each(|(w, a)| *w += a * x);
            }
            s = normalize(&mut w).sqrt();
            v = w;
        }
        s
    }

    #[test]
    fn spectral_blocks_converge_to_each_blocks_top_singular_value() {
        for linear in [false, true] {
            let model = tiny(linear, 3);
            let mut blocks = spectral_blocks(&model, 0).unwrap();
            // Per layer: 3·heads + heads + 1 + 1 blocks.
            assert_eq!(blocks.len(), 2 * (3 * 2 + 2 + 2), "linear {linear}");
            for blk in &mut blocks {
                let (name, t) = &model.named_tensors()[blk.param];
                assert!(!name.contains("ln") && !name.ends_with("bias") && !name.contains("wte"));
                let w = model.param_values(name).unwrap().unwrap();
                let mut sigma = 0.0;
                for _ in 0..200 {
                    sigma = blk.power_step(&w);
                }
                // The block cut independently from the tensor: output rows row0.. of the
                // `[out, in]` view.
                let t = if linear { t.clone() } else { t.t().unwrap() };
                let rows = blk.u.len();
                let m: Vec<Vec<f64>> = t
                    .narrow(0, blk.row0, rows)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                let want = top_singular(&m);
                assert!(
                    (sigma - want).abs() <= 1e-3 * want,
                    "{name} block at {}: σ {sigma} vs {want}",
                    blk.row0
                );
            }
        }
    }

    #[test]
    fn spectral_norm_training_shrinks_the_spectral_norms() {
        let sigma_sum = |m: &Model| -> f64 {
            let mut blocks = spectral_blocks(m, 1).unwrap();
            blocks
                .iter_mut()
                .map(|b| {
                    let w = m
                        .param_values(&m.named_tensors()[b.param].0)
                        .unwrap()
                        .unwrap();
                    (0..100).map(|_| b.power_step(&w)).last().unwrap()
                })
                .sum()
        };
        let train = |reg: Option<Regularizer>| {
            let w = Weights::init_seeded(5, DType::F32, &Device::Cpu);
            let cfg = crate::test_util::relu_gpt2((11, 16, 16, 2), 2, true, false);
            let model = Model::new(&cfg, &w).unwrap();
            let vars = super::super::train::named_vars(&model, &w).unwrap();
            let mut opt = AdamW::new(
                vars,
                crate::optim::AdamWParams {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.98,
                    eps: 1e-8,
                    weight_decay: 0.0,
                },
            )
            .unwrap();
            let mut r = reg.map(|k| Regularize::new(k, &model, 0).unwrap());
            let mut ws = StepWorkspace::default();
            for step in 0..30 {
                let x = ids(step, 4 * 12);
                match &mut r {
                    Some(r) => r.step(&model, &mut opt, &x, (4, 12), &[0, 1, 2, 3], &mut ws),
                    None => super::super::train::train_step(&model, &mut opt, &x, (4, 12), &mut ws),
                }
                .unwrap();
            }
            sigma_sum(&model.detached("t").unwrap())
        };
        let (plain, reg) = (
            train(None),
            train(Some(Regularizer::SpectralNorm { lambda: 1.0 })),
        );
        assert!(reg < 0.9 * plain, "Σσ {reg} regularized vs {plain} plain");
    }

    #[test]
    fn the_truncation_threshold_is_the_windows_percentile_recomputed_every_window() {
        let mut b = LossBuffer::new(0.25, 4);
        b.push(&[1.0, 2.0, 3.0]);
        assert_eq!(b.threshold, None, "not before a whole window");
        b.push(&[4.0]);
        // The 0.75 quantile of 1..4: position 2.25 → 3.25.
        assert_eq!(b.threshold, Some(3.25));
        b.push(&[10.0, 10.0, 10.0]);
        assert_eq!(b.threshold, Some(3.25), "kept until the next whole window");
        b.push(&[0.0]);
        // The last four: 10, 10, 10, 0 → sorted 0, 10, 10, 10; position 2.25 → 10.
        assert_eq!(b.threshold, Some(10.0));
        assert_eq!(percentile(&[5.0], 0.9), 5.0);
    }

    #[test]
    fn truncation_drops_the_samples_at_or_above_the_threshold_from_the_step() {
        let model = tiny(false, 2);
        let Model::Gpt2(pass) = &model else {
            unreachable!()
        };
        let (b, t) = (4, 10);
        let x = ids(9, b * t);
        let mut r = Regularize::new(
            Regularizer::LossTruncation {
                dropc: 0.5,
                window: 4,
            },
            &model,
            0,
        )
        .unwrap();
        let mut ws = MlpGradWorkspace::default();
        // The first window: every sample counts, as the plain step.
        let plain: Vec<Vec<f32>> = pass
            .train_grads(&x, (b, t), &mut ws)
            .unwrap()
            .grads
            .iter()
            .map(|g| g.to_vec())
            .collect();
        let first: Vec<Vec<f32>> = r
            .grads(pass, &x, (b, t), &[0, 1, 2, 3], &mut ws)
            .unwrap()
            .grads
            .iter()
            .map(|g| g.to_vec())
            .collect();
        assert_eq!(first, plain);
        let thr = r.truncation_threshold().expect("a whole window seen");
        // Now the rows at or above the median loss weigh 0.
        let lens = vec![t; b];
        let losses = pass
            .weighted_grads(&x, (b, t), &lens, &[0.0; 4], &mut ws)
            .unwrap()
            .row_loss;
        let kept: Vec<f32> = losses
            .iter()
            .map(|&l| if l >= thr { 0.0 } else { 0.25 })
            .collect();
        assert_eq!(kept.iter().filter(|&&w| w == 0.0).count(), 2);
        let want: Vec<Vec<f32>> = pass
            .weighted_grads(&x, (b, t), &lens, &kept, &mut ws)
            .unwrap()
            .grads
            .iter()
            .map(|g| g.to_vec())
            .collect();
        let got = r.grads(pass, &x, (b, t), &[0, 1, 2, 3], &mut ws).unwrap();
        let mean = losses.iter().sum::<f64>() / 4.0;
        assert!(
            (got.loss - mean).abs() < 1e-9,
            "the reported loss is the plain mean"
        );
        for (g, w) in got.grads.iter().zip(&want) {
            assert_eq!(g, &w.as_slice());
        }
    }

    #[test]
    fn example_tied_masks_are_fixed_per_example_with_the_fixed_neurons_on() {
        let m = NeuronMasks {
            inner: 1000,
            fixed: 200,
            p_mem: 0.1,
            scale: 1.5,
            seed: 7,
        };
        let (a, b) = (m.of(3), m.of(4));
        assert_eq!(a, m.of(3), "the same example, the same mask");
        assert_ne!(a, b);
        assert!(a[..200].iter().all(|&x| x == 1.0));
        let on = a[200..].iter().filter(|&&x| x == 1.0).count();
        assert!(
            (50..=110).contains(&on),
            "{on} of 800 memorization neurons on"
        );
        assert!(a.iter().all(|&x| x == 0.0 || x == 1.0));
        assert_eq!(m.train(&[4, 3]), [b, a].concat());
    }

    #[test]
    fn dropped_gradients_are_those_of_the_model_with_each_rows_mask_folded_in() {
        // Multiplying a row's activations by its mask equals scaling the output projection's
        // input neurons by it: the loss and every gradient but the output projection's agree
        // with the folded model's, and the output projection's is the mask times the folded
        // one's. Both layouts.
        for linear in [false, true] {
            let model = tiny(linear, 4);
            let inner = model.spec().intermediate_size;
            let (b, t) = (3, 9);
            let x = ids(11, b * t);
            let masks = NeuronMasks {
                inner,
                fixed: inner / 4,
                p_mem: 0.5,
                scale: 1.0,
                seed: 1,
            };
            let mut ws = MlpGradWorkspace::default();
            let grads_of = |m: &Model, rows: &[u32], bt, mask: Option<&[f32]>, ws: &mut _| {
                let out = match (m, mask) {
                    (Model::Gpt2(p), Some(k)) => p.dropped_grads(rows, bt, k, ws),
                    (Model::Gpt2(p), None) => p.train_grads(rows, bt, ws),
                    (Model::GptNeoX(p), Some(k)) => p.dropped_grads(rows, bt, k, ws),
                    (Model::GptNeoX(p), None) => p.train_grads(rows, bt, ws),
                }
                .unwrap();
                (
                    out.loss,
                    out.grads.iter().map(|g| g.to_vec()).collect::<Vec<_>>(),
                )
            };
            let all = masks.train(&[0, 1, 2]);
            let (loss, grads) = grads_of(&model, &x, (b, t), Some(&all), &mut ws);
            let (mut loss_sum, mut sum): (f64, Vec<Vec<f32>>) =
                (0.0, grads.iter().map(|g| vec![0.0; g.len()]).collect());
            let projs: Vec<String> = model.mlp_weight_names().into_iter().map(|p| p.1).collect();
            for r in 0..b {
                let mask = masks.of(r);
                // The folded model of row r: the output projection's inputs scaled by its mask.
                let mut edits = Vec::new();
                for p in &projs {
                    let mut w = model.param_values(p).unwrap().unwrap();
                    let h = w.len() / inner;
                    for (j, &mj) in mask.iter().enumerate() {
                        for o in 0..h {
                            let k = if linear { o * inner + j } else { j * h + o };
                            w[k] *= mj;
                        }
                    }
                    edits.push((p.clone(), w));
                }
                let folded = model.with_edits("folded", edits).unwrap();
                let row = &x[r * t..(r + 1) * t];
                let (l, g) = grads_of(&folded, row, (1, t), None, &mut ws);
                loss_sum += l / b as f64;
                for (k, (s, g)) in sum.iter_mut().zip(g).enumerate() {
                    let name = &model.named_tensors()[k].0;
                    let proj = projs.contains(name);
                    let h = (g.len() / inner).max(1);
                    for (i, (s, g)) in s.iter_mut().zip(g).enumerate() {
                        let scale = match (proj, linear) {
                            (false, _) => 1.0,
                            (true, true) => mask[i % inner],
                            (true, false) => mask[i / h],
                        };
                        *s += g / b as f32 * scale;
                    }
                }
            }
            assert!(
                (loss - loss_sum).abs() <= 1e-5 * loss,
                "{loss} vs {loss_sum}"
            );
            for (k, (g, s)) in grads.iter().zip(&sum).enumerate() {
                let e = rel_l2(g, s);
                assert!(
                    e <= 1e-4,
                    "{} (linear {linear}): relative L2 {e}",
                    model.named_tensors()[k].0
                );
            }
        }
    }

    #[test]
    fn example_tied_evaluation_drops_memorization_neurons_and_scales_the_fixed_ones() {
        for linear in [false, true] {
            let model = tiny(linear, 6);
            let r = Regularize::new(
                Regularizer::ExampleTiedDropout {
                    p_fixed: 0.25,
                    p_mem: 0.125,
                },
                &model,
                0,
            )
            .unwrap();
            let folded = r.evaluated(&model).unwrap();
            let inner = model.spec().intermediate_size;
            for (name, t) in model.named_tensors() {
                let (a, b) = (
                    model.param_values(name).unwrap().unwrap(),
                    folded.param_values(name).unwrap().unwrap(),
                );
                let proj = model.mlp_weight_names().iter().any(|p| &p.1 == name);
                if !proj {
                    assert_eq!(a, b, "{name} unchanged");
                    continue;
                }
                let h = t.elem_count() / inner;
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    let j = if linear { i % inner } else { i / h };
                    let want = if j < inner / 4 { a * 1.5 } else { 0.0 };
                    assert_eq!(*b, want, "{name}[{i}] (neuron {j})");
                }
            }
        }
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let model = tiny(false, 0);
        for (r, field) in [
            (Regularizer::SpectralNorm { lambda: 0.0 }, "spectral_norm"),
            (
                Regularizer::LossTruncation {
                    dropc: 1.0,
                    window: 10,
                },
                "loss_truncation",
            ),
            (
                Regularizer::LossTruncation {
                    dropc: 0.1,
                    window: 0,
                },
                "truncation_window",
            ),
            (
                Regularizer::ExampleTiedDropout {
                    p_fixed: 0.0,
                    p_mem: 0.1,
                },
                "example_tied_dropout",
            ),
        ] {
            assert!(matches!(
                Regularize::new(r, &model, 0),
                Err(Error::InvalidInput { field: f, .. }) if f == field
            ));
        }
    }
}
