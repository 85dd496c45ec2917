//! The model runtime: the two architectures lethe serves (GPT-2 and GPT-NeoX) behind one
//! [`Model`] type, with their configs, the caller's KV cache and checkpoint I/O.
//!
//! Invariants every architecture keeps:
//! - `forward(&self, ..)` never mutates the model; the KV cache is the caller's ([`KvCache`]), so
//!   one `Arc<Model>` serves many requests and is swapped atomically as a whole.
//! - Parameters use Hugging Face's names and layouts (GPT-2 `Conv1D` as `[in, out]`, GPT-NeoX
//!   `Linear` as `[out, in]`), so a checkpoint written by transformers loads unchanged and one
//!   written by lethe loads in transformers. Logits, greedy continuations and scores match
//!   transformers on the fixtures (`tests/parity.rs`, |Δlogit| ≤ 1e-4).
//! - One function, whichever path runs it: a one-token step with a cache and no MLP override
//!   may take a hand-written decode step (`gpt2::decode`, `gpt_neox::decode`; f32 on the CPU),
//!   everything else the ops of [`ops`]; their tests pin them to each other to float rounding,
//!   and a cached decode equals full recomputation (`tests/model_invariants.rs`).
//! - Inputs a decode step cannot take (not one token per row, ids or positions out of range, a
//!   mask of another shape) fall through to the candle path, so a bad input gets the same error
//!   whichever path would have run.
//! - The two MLP weight matrices of every block can be replaced at call time by tensors the caller
//!   supplies ([`MlpWeights`]); BalancedSubnet trains a mask over exactly these through the same
//!   forward that serves inference. An override with the wrong number of layers is an error.
//! - Building a model fixes the process's thread count once, unless it is set already
//!   (`runtime::ensure_threads`: `RAYON_NUM_THREADS` and the global rayon pool).

pub mod cache;
pub(crate) mod cpu;
pub mod fused;
pub mod gpt2;
pub mod gpt_neox;
pub mod ops;
pub mod pass;
pub mod weights;

use candle_core::{DType, Device, Result as CResult, Tensor};
use serde::Deserialize;

pub use cache::KvCache;
pub use weights::{Params, Weights};

use crate::error::{Error, Result};

/// Values per scale in [`Model::fake_quantized`].
pub const QUANT_BLOCK: usize = 32;

/// The architectures lethe implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Gpt2,
    GptNeoX,
}

impl Architecture {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Gpt2 => "gpt2",
            Self::GptNeoX => "gpt_neox",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Facts about a model that callers need, whatever its architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    /// Maximum number of positions (prompt + generated tokens).
    pub context_length: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// A parsed, validated `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt2(gpt2::Config),
    GptNeoX(gpt_neox::Config),
}

impl ModelConfig {
    /// Parses `config.json` text; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Probe {
            model_type: Option<String>,
        }
        let probe: Probe =
            serde_json::from_str(text).map_err(|e| Error::config(file, e.to_string()))?;
        match probe.model_type.as_deref() {
            Some("gpt2") => Ok(Self::Gpt2(gpt2::Config::from_json(text, file)?)),
            Some("gpt_neox") => Ok(Self::GptNeoX(gpt_neox::Config::from_json(text, file)?)),
            Some(other) => Err(Error::UnsupportedArchitecture(other.to_string())),
            None => Err(Error::config(file, "missing \"model_type\"")),
        }
    }

    pub fn spec(&self) -> ModelSpec {
        match self {
            Self::Gpt2(c) => c.spec(),
            Self::GptNeoX(c) => c.spec(),
        }
    }

    /// The `config.json` text Hugging Face transformers reads for this config.
    pub fn to_hf_json(&self) -> serde_json::Value {
        match self {
            Self::Gpt2(c) => c.to_hf_json(),
            Self::GptNeoX(c) => c.to_hf_json(),
        }
    }
}

/// One forward call's inputs: token ids, their position ids, and the attention mask.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// `[B, T]` u32 token ids.
    pub ids: Tensor,
    /// `[B, T]` u32 position ids.
    pub positions: Tensor,
    /// `[B, 1, T, S]` additive mask (0 = attend, −∞ = masked) over the `S = cached + T` keys, or
    /// `None` for unpadded rows that continue at the same offset (plain causal attention).
    pub mask: Option<Tensor>,
}

impl Inputs {
    /// Unpadded rows of equal length whose first token sits at position `past`, which must equal
    /// the number of positions already in the cache (0 without one).
    pub fn causal(ids: &Tensor, past: usize) -> CResult<Self> {
        let (b, t) = ids.dims2()?;
        let pos: Vec<u32> = (0..b)
            .flat_map(|_| (past..past + t).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(pos, (b, t), ids.device())?;
        Ok(Self {
            ids: ids.clone(),
            positions,
            mask: None,
        })
    }
}

/// A one-token decode step's inputs read out for the hand-written decode steps
/// (`gpt2/decode.rs`, `gpt_neox/decode.rs`).
pub(crate) struct StepInputs {
    /// Rows in the batch.
    pub b: usize,
    /// Keys each row attends to: the cached positions plus this one.
    pub s: usize,
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// The additive mask `[1 | b, 1, 1, s]` as rows, when there is one.
    mask: Option<Vec<f32>>,
    mask_rows: usize,
}

impl StepInputs {
    /// `inputs` as a one-token step of at most `max_rows` rows over `cached` positions, or
    /// `None` for inputs a decode step leaves to the candle path: not one token per row, ids
    /// or positions outside `vocab` / `positions`, a mask of another shape or not f32 on the
    /// CPU (the candle path then reports them with its own errors).
    pub fn read(
        inputs: &Inputs,
        cached: usize,
        (vocab, positions, max_rows): (usize, usize, usize),
    ) -> CResult<Option<Self>> {
        let b = match inputs.ids.dims() {
            &[b, 1] if (1..=max_rows).contains(&b) && inputs.positions.dims() == [b, 1] => b,
            _ => return Ok(None),
        };
        let s = cached + 1;
        let mask_rows = match &inputs.mask {
            None => 0,
            Some(m) => match m.dims() {
                &[mb, 1, 1, ms] if (mb == 1 || mb == b) && ms == s && fused::supported(&[m]) => mb,
                _ => return Ok(None),
            },
        };
        let ids = inputs.ids.flatten_all()?.to_vec1::<u32>()?;
        let pos = inputs.positions.flatten_all()?.to_vec1::<u32>()?;
        if ids.iter().any(|&i| i as usize >= vocab) || pos.iter().any(|&p| p as usize >= positions)
        {
            return Ok(None);
        }
        let mask = match &inputs.mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Some(Self {
            b,
            s,
            ids,
            positions: pos,
            mask,
            mask_rows,
        }))
    }

    /// Row `r`'s additive mask over the `s` keys, if there is a mask.
    pub fn mask_row(&self, r: usize) -> Option<&[f32]> {
        let m = self.mask.as_deref()?;
        let at = if self.mask_rows == 1 { 0 } else { r * self.s };
        Some(&m[at..at + self.s])
    }
}

/// Rows `ids` (`[B, T]`) of an embedding `table`, flattened to `[B·T, H]` in the compute
/// `dtype` (a table held in half precision is widened row by row, never as a whole).
pub(crate) fn embed(table: &Tensor, ids: &Tensor, dtype: DType) -> CResult<Tensor> {
    let rows = table.index_select(&ids.flatten_all()?, 0)?;
    if rows.dtype() == dtype {
        Ok(rows)
    } else {
        rows.to_dtype(dtype)
    }
}

/// Builds the causal mask `[1, 1, T, past + T]` for unpadded rows, or `None` when `T == 1`.
pub(crate) fn causal_mask(
    t: usize,
    past: usize,
    dtype: DType,
    dev: &Device,
) -> CResult<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
    let s = past + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(data, (1, 1, t, s), dev)?.to_dtype(dtype)?,
    ))
}

/// Replacement MLP weights, one `(input projection, output projection)` pair per block, each in
/// the checkpoint's own layout (GPT-2 `c_fc`/`c_proj` `[in, out]`; GPT-NeoX
/// `dense_h_to_4h`/`dense_4h_to_h` `[out, in]`).
#[derive(Debug, Clone)]
pub struct MlpWeights(pub Vec<(Tensor, Tensor)>);

/// A loaded model of either architecture.
#[derive(Debug, Clone)]
pub enum Model {
    Gpt2(gpt2::Gpt2),
    GptNeoX(gpt_neox::GptNeoX),
}

impl Model {
    /// A model of `config` with weights from the architecture's own initialiser, detached (no
    /// training graph): what benchmarks on random weights and tests run.
    pub fn random(config: &ModelConfig, device: &Device) -> Result<Self> {
        Self::new(config, &Weights::init(DType::F32, device))?.detached("random")
    }

    /// An untracked copy sharing this model's storage (no training graph behind its tensors),
    /// named `origin`: it runs the inference kernels.
    pub fn detached(&self, origin: &str) -> Result<Self> {
        let map = self
            .named_tensors()
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        Self::new(&self.config(), &Weights::from_tensors(map, origin))
    }

    /// An untracked copy of this model, named `origin`, with the parameters in `edits`
    /// (checkpoint name → row-major f32 values of the parameter's shape) replaced, each kept in
    /// its own dtype and device: how every weight edit (Greedy, SOU, Durable, neuron ablation,
    /// example-tied dropout's evaluation weights) builds its result. A name the model does not
    /// have, or values of another size, is an error naming it.
    pub fn with_edits(
        &self,
        origin: &str,
        edits: impl IntoIterator<Item = (String, Vec<f32>)>,
    ) -> Result<Self> {
        let mut map: std::collections::HashMap<String, Tensor> = self
            .named_tensors()
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        for (name, values) in edits {
            let Some(old) = map.get(&name) else {
                return Err(Error::invalid("edit", format!("the model has no {name}")));
            };
            if values.len() != old.elem_count() {
                return Err(Error::invalid(
                    "edit",
                    format!(
                        "{} values for {name}, which has {}",
                        values.len(),
                        old.elem_count()
                    ),
                ));
            }
            let new = Tensor::from_vec(values, old.dims(), &Device::Cpu)?
                .to_dtype(old.dtype())?
                .to_device(old.device())?;
            map.insert(name, new);
        }
        Self::new(&self.config(), &Weights::from_tensors(map, origin))
    }

    /// A trainable copy: every parameter a variable (a copy of this model's, seeded with `seed`
    /// for anything the builder initialises), with the weights that hold them.
    pub fn trainable_copy(&self, seed: u64) -> Result<(Self, Weights)> {
        let map = self
            .named_tensors()
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        let weights = Weights::vars_from_tensors(map, seed)?;
        Ok((Self::new(&self.config(), &weights)?, weights))
    }

    /// Parameter `name`'s values as row-major f32 on the CPU (`None`: no such parameter).
    pub fn param_values(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some((_, t)) = self.named_tensors().iter().find(|(n, _)| n == name) else {
            return Ok(None);
        };
        Ok(Some(
            t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
        ))
    }

    /// Builds the model from `weights` (a checkpoint, or fresh initialisation for training).
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        crate::runtime::ensure_threads();
        let mut params = Params::new(weights);
        Ok(match config {
            ModelConfig::Gpt2(c) => Self::Gpt2(gpt2::Gpt2::new(c.clone(), &mut params)?),
            ModelConfig::GptNeoX(c) => {
                Self::GptNeoX(gpt_neox::GptNeoX::new(c.clone(), &mut params)?)
            }
        })
    }

    pub fn config(&self) -> ModelConfig {
        match self {
            Self::Gpt2(m) => ModelConfig::Gpt2(m.config().clone()),
            Self::GptNeoX(m) => ModelConfig::GptNeoX(m.config().clone()),
        }
    }

    pub fn spec(&self) -> ModelSpec {
        self.config().spec()
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Gpt2(m) => m.device(),
            Self::GptNeoX(m) => m.device(),
        }
    }

    /// The compute dtype (f32 on CPU; see [`Model::weight_dtype`]).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Gpt2(m) => m.dtype(),
            Self::GptNeoX(m) => m.dtype(),
        }
    }

    /// The dtype the weight matrices are held in: the compute dtype, or bf16/f16 for a model
    /// loaded with a half-precision dtype (`lethe serve --dtype`).
    pub fn weight_dtype(&self) -> DType {
        match self {
            Self::Gpt2(m) => m.lm_head().dtype(),
            Self::GptNeoX(m) => m.lm_head().dtype(),
        }
    }

    /// This model with every matrix (rank ≥ 2) rounded as a `bits`-bit integer checkpoint would
    /// hold it: blocks of [`QUANT_BLOCK`] consecutive values along each row share one scale,
    /// their absolute maximum over `2^(bits−1) − 1` (127 for int8, 7 for int4), and each value
    /// is rounded to the nearest multiple of it (as llama.cpp's symmetric `Q8_0`/`Q4_0` blocks
    /// do, up to the block size). LayerNorms and biases keep their values. Forgetting that
    /// survives only in full precision comes back under such rounding, which is what the
    /// takedown gate's quantized audit checks.
    pub fn fake_quantized(&self, bits: u32) -> Result<Self> {
        if !(2..=16).contains(&bits) {
            return Err(Error::invalid("bits", format!("{bits}: must be in 2..=16")));
        }
        let levels = ((1u32 << (bits - 1)) - 1) as f32;
        let mut map = std::collections::HashMap::new();
        for (name, t) in self.named_tensors() {
            let t = if t.rank() >= 2 && t.dtype().is_float() {
                let row = *t.dims().last().unwrap_or(&1);
                let mut v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                for r in v.chunks_mut(row.max(1)) {
                    for blk in r.chunks_mut(QUANT_BLOCK) {
                        let max = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                        if max > 0.0 && max.is_finite() {
                            let scale = max / levels;
                            blk.iter_mut()
                                .for_each(|x| *x = (*x / scale).round() * scale);
                        }
                    }
                }
                Tensor::from_vec(v, t.dims(), t.device())?.to_dtype(t.dtype())?
            } else {
                t.clone()
            };
            map.insert(name.clone(), t);
        }
        Model::new(
            &self.config(),
            &Weights::from_tensors(map, "quantized weights"),
        )
    }

    /// This model's weights as a checkpoint stored in `stored` and loaded in `loaded` would
    /// hold them (each matrix rounded through both; LayerNorms and biases through `stored`
    /// only, as [`weights::read_safetensors`] keeps them f32 for half dtypes).
    pub fn rounded_as(&self, stored: DType, loaded: DType) -> Result<Self> {
        let mut map = std::collections::HashMap::new();
        for (name, t) in self.named_tensors() {
            let hold = if t.rank() < 2 { DType::F32 } else { loaded };
            let t = if t.dtype().is_float() {
                t.to_dtype(stored)?.to_dtype(hold)?
            } else {
                t.clone()
            };
            map.insert(name.clone(), t);
        }
        Model::new(
            &self.config(),
            &Weights::from_tensors(map, "rounded weights"),
        )
    }

    /// Runs the blocks and the final LayerNorm: hidden states `[B, T, H]`.
    ///
    /// `cache`, when given, must hold exactly the positions before `inputs` and is extended by
    /// them. `mlp`, when given, replaces every block's MLP weight matrices for this call.
    pub fn forward_hidden(
        &self,
        inputs: &Inputs,
        cache: Option<&mut KvCache>,
        mlp: Option<&MlpWeights>,
    ) -> CResult<Tensor> {
        if let Some(m) = mlp {
            if m.0.len() != self.spec().num_layers {
                candle_core::bail!(
                    "MLP override has {} layers, model has {}",
                    m.0.len(),
                    self.spec().num_layers
                );
            }
        }
        match self {
            Self::Gpt2(m) => m.forward_hidden(inputs, cache, mlp),
            Self::GptNeoX(m) => m.forward_hidden(inputs, cache, mlp),
        }
    }

    /// Projects hidden states `[.., H]` to vocabulary logits `[.., V]`.
    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        match self {
            Self::Gpt2(m) => m.logits(hidden),
            Self::GptNeoX(m) => m.logits(hidden),
        }
    }

    /// `log p(ids[b, t + 1] | ids[b, ..= t])` for `t < T − 1` from the hidden states of `ids`:
    /// `[B, T − 1]` f32. The head and the log-softmax run fused on the CPU, without
    /// materialising the logits (see `models/head.rs`).
    pub fn next_token_logprobs(&self, hidden: &Tensor, ids: &Tensor) -> CResult<Tensor> {
        let head = match self {
            Self::Gpt2(m) => m.lm_head(),
            Self::GptNeoX(m) => m.lm_head(),
        };
        cpu::head::next_token_logprobs(hidden, head, ids)
    }

    /// The final hidden states (after the last LayerNorm) at positions `from[r]..lens[r]` of
    /// each of `b` right-padded rows of `t` ids, rows in order: `[Σ (lens[r] − from[r]), H]`
    /// row-major f32. f32 weights on the CPU take the hand-written pass's forward
    /// (`pass::final_hidden`, which runs the last block for those positions only), everything
    /// else `forward_hidden`.
    pub fn final_hidden(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        lens: &[usize],
        from: &[usize],
    ) -> CResult<Vec<f32>> {
        use pass::HandWrittenPass;
        if from.len() != b || lens.len() != b || from.iter().zip(lens).any(|(f, l)| f > l || *l > t)
        {
            candle_core::bail!("final_hidden: rows, lengths and start positions do not fit");
        }
        match self {
            Self::Gpt2(m) if m.mlp_grads_supported() && t >= 2 => {
                pass::final_hidden(m, ids, (b, t), lens, from)
            }
            Self::GptNeoX(m) if m.mlp_grads_supported() && t >= 2 => {
                pass::final_hidden(m, ids, (b, t), lens, from)
            }
            _ => {
                let h = self.spec().hidden_size;
                let ids = Tensor::from_slice(ids, (b, t), self.device())?;
                let all: Vec<f32> = self
                    .forward_hidden(&Inputs::causal(&ids, 0)?, None, None)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                Ok((0..b)
                    .flat_map(|r| {
                        all[(r * t + from[r]) * h..(r * t + lens[r]) * h]
                            .iter()
                            .copied()
                    })
                    .collect())
            }
        }
    }

    /// Calls `f(i, logits)` with the vocabulary logits of each row `i` of `hidden` (`[m, H]`
    /// row-major f32 final hidden states), in parallel, without holding more than a block of
    /// rows' logits at once (`cpu::head::visit_logits`).
    pub fn visit_logits(&self, hidden: &[f32], f: impl Fn(usize, &[f32]) + Sync) -> CResult<()> {
        let head = match self {
            Self::Gpt2(m) => m.lm_head(),
            Self::GptNeoX(m) => m.lm_head(),
        };
        cpu::head::visit_logits(hidden, head, f)
    }

    /// `forward_hidden` followed by `logits`: `[B, T, V]`.
    pub fn forward(
        &self,
        inputs: &Inputs,
        cache: Option<&mut KvCache>,
        mlp: Option<&MlpWeights>,
    ) -> CResult<Tensor> {
        self.logits(&self.forward_hidden(inputs, cache, mlp)?)
    }

    /// The model's own MLP weight matrices, in the layout [`MlpWeights`] documents.
    pub fn mlp_weights(&self) -> MlpWeights {
        match self {
            Self::Gpt2(m) => m.mlp_weights(),
            Self::GptNeoX(m) => m.mlp_weights(),
        }
    }

    /// Checkpoint names of the MLP matrices, parallel to [`Model::mlp_weights`].
    pub fn mlp_weight_names(&self) -> Vec<(String, String)> {
        match self {
            Self::Gpt2(m) => m.mlp_weight_names(),
            Self::GptNeoX(m) => m.mlp_weight_names(),
        }
    }

    /// Whether MLP matrices are stored `[out, in]` (`nn.Linear`) rather than `[in, out]`.
    pub fn mlp_is_linear_layout(&self) -> bool {
        matches!(self, Self::GptNeoX(_))
    }

    /// Every parameter under its Hugging Face name, as a checkpoint stores it (a tied LM head is
    /// not repeated).
    pub fn named_tensors(&self) -> &[(String, Tensor)] {
        match self {
            Self::Gpt2(m) => m.named_tensors(),
            Self::GptNeoX(m) => m.named_tensors(),
        }
    }

    /// Total number of parameters (a tied head counted once).
    pub fn num_parameters(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// `other`'s weights held as `self`'s tensors plus `other`'s MLP matrices, when every other
    /// tensor of the two is equal bit for bit (a version that differs from `self` only in its
    /// MLP, as every unlearned version does, then costs no second copy of the rest); `None`
    /// when any other tensor differs in name, shape or value.
    pub fn sharing_all_but_mlp(&self, other: &Model) -> Result<Option<Self>> {
        let mlp: std::collections::HashSet<String> = self
            .mlp_weight_names()
            .into_iter()
            .flat_map(|(a, b)| [a, b])
            .collect();
        let (mine, theirs) = (self.named_tensors(), other.named_tensors());
        if mine.len() != theirs.len() || self.mlp_weight_names() != other.mlp_weight_names() {
            return Ok(None);
        }
        let values = |t: &Tensor| -> Result<Vec<u32>> {
            let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            Ok(v.into_iter().map(f32::to_bits).collect())
        };
        for ((n, a), (m, b)) in mine.iter().zip(theirs) {
            // A served model held in half precision is never shared into an f32 root.
            if n != m || a.dims() != b.dims() || a.dtype() != b.dtype() {
                return Ok(None);
            }
            if !mlp.contains(n) && values(a)? != values(b)? {
                return Ok(None);
            }
        }
        self.with_mlp_weights(&other.mlp_weights()).map(Some)
    }

    /// A new model sharing every tensor with `self` except the MLP matrices, replaced by `mlp`
    /// (used to publish unlearned weights without touching the live model).
    pub fn with_mlp_weights(&self, mlp: &MlpWeights) -> Result<Self> {
        let names = self.mlp_weight_names();
        if mlp.0.len() != names.len() {
            return Err(Error::invalid(
                "mlp",
                format!("{} layers given, model has {}", mlp.0.len(), names.len()),
            ));
        }
        let mut map: std::collections::HashMap<String, Tensor> =
            self.named_tensors().iter().cloned().collect();
        for ((n_in, n_out), (w_in, w_out)) in names.iter().zip(&mlp.0) {
            for (name, w) in [(n_in, w_in), (n_out, w_out)] {
                let old = &map[name];
                if old.dims() != w.dims() {
                    return Err(Error::invalid(
                        "mlp",
                        format!("{name}: shape {:?}, expected {:?}", w.dims(), old.dims()),
                    ));
                }
                map.insert(name.clone(), w.detach());
            }
        }
        Model::new(
            &self.config(),
            &Weights::from_tensors(map, "replacement MLP weights"),
        )
    }
}

/// A token id in `config.json`: a number, or a list whose first entry is used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenId {
    One(u32),
    Many(Vec<u32>),
}

impl TokenId {
    pub(crate) fn first(&self) -> Option<u32> {
        match self {
            Self::One(t) => Some(*t),
            Self::Many(v) => v.first().copied(),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn fake_quantized_weights_sit_on_each_blocks_grid_and_int4_moves_further() {
        let cfg = crate::test_util::gpt2_with(
            crate::models::ops::Activation::Relu,
            (40, 32, 48, 4),
            2,
            false,
            false,
        );
        let m = Model::random(&cfg, &Device::Cpu).unwrap();
        let (q8, q4) = (m.fake_quantized(8).unwrap(), m.fake_quantized(4).unwrap());
        let mut err = [0f64; 2];
        for ((name, a), ((_, b8), (_, b4))) in m
            .named_tensors()
            .iter()
            .zip(q8.named_tensors().iter().zip(q4.named_tensors()))
        {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            for (k, (b, levels)) in [(b8, 127f32), (b4, 7f32)].into_iter().enumerate() {
                let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                if m.named_tensors()
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap()
                    .1
                    .rank()
                    < 2
                {
                    assert_eq!(a, b, "{name} is kept");
                    continue;
                }
                let row = *m
                    .named_tensors()
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap()
                    .1
                    .dims()
                    .last()
                    .unwrap();
                for (ra, rb) in a.chunks(row).zip(b.chunks(row)) {
                    for (ba, bb) in ra.chunks(QUANT_BLOCK).zip(rb.chunks(QUANT_BLOCK)) {
                        let scale = ba.iter().fold(0f32, |m, x| m.max(x.abs())) / levels;
                        for (x, y) in ba.iter().zip(bb) {
                            assert!((x - y).abs() <= scale / 2.0 + 1e-6, "{name}: {x} -> {y}");
                            assert!(((y / scale).round() * scale - y).abs() < 1e-5);
                            err[k] += f64::from((x - y).abs());
                        }
                    }
                }
            }
        }
        assert!(err[1] > 5.0 * err[0], "{err:?}");
        assert!(m.fake_quantized(1).is_err() && m.fake_quantized(17).is_err());
    }
    use super::*;

    fn step(ids: &[u32], pos: u32, mask: Option<Tensor>) -> Inputs {
        let n = ids.len();
        Inputs {
            ids: Tensor::from_vec(ids.to_vec(), (n, 1), &Device::Cpu).unwrap(),
            positions: Tensor::from_vec(vec![pos; n], (n, 1), &Device::Cpu).unwrap(),
            mask,
        }
    }

    fn mask(rows: usize, s: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * s).map(|i| i as f32).collect();
        Tensor::from_vec(v, (rows, 1, 1, s), &Device::Cpu).unwrap()
    }

    /// What a decode step takes, and what it leaves to the candle path (and its errors).
    #[test]
    fn step_inputs_take_one_token_rows_in_range_with_a_fitting_mask() {
        let limits = (50, 64, 4);
        let read = |inputs: &Inputs| StepInputs::read(inputs, 3, limits).unwrap();
        let two_rows = read(&step(&[7, 8], 3, Some(mask(2, 4)))).expect("a plain step");
        assert_eq!((two_rows.b, two_rows.s), (2, 4));
        assert_eq!(
            (&two_rows.ids, &two_rows.positions),
            (&vec![7, 8], &vec![3, 3])
        );
        assert_eq!(two_rows.mask_row(1), Some(&[4.0f32, 5.0, 6.0, 7.0][..]));
        let shared = read(&step(&[7, 8], 3, Some(mask(1, 4)))).unwrap();
        assert_eq!(shared.mask_row(1), Some(&[0.0f32, 1.0, 2.0, 3.0][..]));
        assert_eq!(read(&step(&[7], 3, None)).unwrap().mask_row(0), None);
        for declined in [
            step(&[50], 3, None),
            step(&[1], 64, None),
            step(&[1], 3, Some(mask(1, 9))),
            step(&[1, 2], 3, Some(mask(3, 4))),
            step(&[1; 5], 3, None),
            Inputs::causal(&Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap(), 3).unwrap(),
        ] {
            assert!(read(&declined).is_none(), "{:?}", declined.ids.dims());
        }
    }

    /// A version that differs only in its MLP shares every other tensor; one whose other
    /// tensors differ (here the embedding) is not merged.
    #[test]
    fn sharing_all_but_mlp_only_merges_mlp_only_differences() {
        let cfg = crate::test_util::relu_gpt2((14, 64, 24, 3), 2, true, false);
        let live = Model::random(&cfg, &Device::Cpu).unwrap();
        let w = live.mlp_weights();
        let halved = MlpWeights(
            w.0.iter()
                .map(|(a, b)| ((a * 0.5).unwrap(), (b * 0.5).unwrap()))
                .collect(),
        );
        let version = live.with_mlp_weights(&halved).unwrap();
        // A fresh copy of the version (its own tensors, as loaded from disk).
        let copy = |m: &Model| {
            let map = m
                .named_tensors()
                .iter()
                .map(|(n, t)| (n.clone(), t.copy().unwrap()))
                .collect();
            Model::new(&m.config(), &Weights::from_tensors(map, "copy")).unwrap()
        };
        let shared = live.sharing_all_but_mlp(&copy(&version)).unwrap().unwrap();
        let mlp: Vec<String> = live
            .mlp_weight_names()
            .into_iter()
            .flat_map(|(a, b)| [a, b])
            .collect();
        for ((n, a), ((_, b), (_, v))) in shared
            .named_tensors()
            .iter()
            .zip(live.named_tensors().iter().zip(version.named_tensors()))
        {
            let same = |x: &Tensor, y: &Tensor| {
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(same(a, v), "{n}: not the version's values");
            assert_eq!(a.id() == b.id(), !mlp.contains(n), "{n}");
        }
        let map = version
            .named_tensors()
            .iter()
            .map(|(n, t)| {
                let t = if mlp.contains(n) {
                    t.clone()
                } else {
                    (t * 2.0).unwrap()
                };
                (n.clone(), t)
            })
            .collect();
        let other = Model::new(&cfg, &Weights::from_tensors(map, "other")).unwrap();
        assert!(live.sharing_all_but_mlp(&other).unwrap().is_none());
    }
}
