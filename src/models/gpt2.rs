//! GPT-2 as TinyMem uses it (Hugging Face `GPT2LMHeadModel`): its config, its parameters and
//! its forward pass.
//!
//! Invariants:
//! - The architecture is transformers': learned positional embeddings, pre-LayerNorm blocks
//!   (optionally scaled by `1/(layer + 1)` in attention), a final LayerNorm, and a tied or untied
//!   LM head. Linear layers are `Conv1D`s whose weights are stored `[in, out]` under
//!   transformers' names (`transformer.h.{i}.mlp.c_fc.weight`, ...). Checkpoints without the
//!   `transformer.` prefix (the original OpenAI conversion) load too; lethe always writes it.
//! - [`Config::from_json`] rejects what the forward pass cannot run (an unknown activation, no
//!   `n_positions`, a zero size, `n_embd` not divisible by `n_head`, a non-positive epsilon)
//!   with an error naming the file; `reorder_and_upcast_attn` is accepted and ignored.
//! - Every parameter is taken through [`Params`] with the shape the config implies: a missing
//!   tensor or another shape is an error naming it (`tests/loading_errors.rs`).
//! - `forward_hidden` takes the row-group decode step (`decode`) for one new token per row with
//!   a cache, no MLP override, f32 weights on the CPU and small blocks; without a cache,
//!   attention is one fused kernel over the packed `qkv` (`ops::self_attention`); otherwise the
//!   ops of [`ops`]. All compute the same function to float rounding (`decode`'s tests;
//!   `tests/parity.rs` against transformers).
//! - The training and unlearning passes without candle's autograd live in `grad` (f32 CPU
//!   weights, ReLU MLPs).

use candle_core::{DType, Device, Result as CResult, Tensor};
use candle_nn::Init;
use serde::Deserialize;

use super::ops::{self, Activation};
use super::{causal_mask, Inputs, KvCache, MlpWeights, ModelSpec, Params};
use crate::error::{Error, Result};

mod decode;
mod grad;

/// GPT-2 hyper-parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub activation: Activation,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// `config.json` as transformers writes it for GPT-2.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    reorder_and_upcast_attn: bool,
    #[serde(default = "default_init")]
    initializer_range: f64,
    bos_token_id: Option<super::TokenId>,
    eos_token_id: Option<super::TokenId>,
    pad_token_id: Option<super::TokenId>,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_init() -> f64 {
    0.02
}
fn yes() -> bool {
    true
}

impl Config {
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let hf: HfConfig =
            serde_json::from_str(text).map_err(|e| Error::config(file, e.to_string()))?;
        let bad = |m: String| Error::config(file, m);
        let activation = Activation::from_hf(&hf.activation_function).ok_or_else(|| {
            bad(format!(
                "unsupported activation_function {:?}",
                hf.activation_function
            ))
        })?;
        let n_positions = hf
            .n_positions
            .or(hf.n_ctx)
            .ok_or_else(|| bad("missing n_positions".into()))?;
        if hf.reorder_and_upcast_attn {
            // Only changes numerics in half precision; lethe computes attention in f32 on CPU.
            tracing::debug!("reorder_and_upcast_attn is set; attention already runs in f32");
        }
        let cfg = Self {
            vocab_size: hf.vocab_size,
            n_positions,
            n_embd: hf.n_embd,
            n_layer: hf.n_layer,
            n_head: hf.n_head,
            n_inner: hf.n_inner.unwrap_or(4 * hf.n_embd),
            activation,
            layer_norm_epsilon: hf.layer_norm_epsilon,
            tie_word_embeddings: hf.tie_word_embeddings,
            scale_attn_weights: hf.scale_attn_weights,
            scale_attn_by_inverse_layer_idx: hf.scale_attn_by_inverse_layer_idx,
            initializer_range: hf.initializer_range,
            bos_token_id: hf.bos_token_id.and_then(|t| t.first()),
            eos_token_id: hf.eos_token_id.and_then(|t| t.first()),
            pad_token_id: hf.pad_token_id.and_then(|t| t.first()),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.n_inner),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd ({}) is not divisible by n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon <= 0.0 {
            return Err("layer_norm_epsilon must be positive".into());
        }
        Ok(())
    }

    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            architecture: super::Architecture::Gpt2,
            vocab_size: self.vocab_size,
            hidden_size: self.n_embd,
            num_layers: self.n_layer,
            num_heads: self.n_head,
            intermediate_size: self.n_inner,
            context_length: self.n_positions,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id,
            pad_token_id: self.pad_token_id,
        }
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": self.activation.hf_name(),
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "initializer_range": self.initializer_range,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        })
    }
}

#[derive(Debug, Clone)]
struct Norm {
    w: Tensor,
    b: Tensor,
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: Norm,
    c_attn_w: Tensor,
    c_attn_b: Tensor,
    attn_proj_w: Tensor,
    attn_proj_b: Tensor,
    ln_2: Norm,
    c_fc_w: Tensor,
    c_fc_b: Tensor,
    mlp_proj_w: Tensor,
    mlp_proj_b: Tensor,
}

/// A GPT-2 language model.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    cfg: Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Tensor,
    named: Vec<(String, Tensor)>,
}

impl Gpt2 {
    pub fn new(cfg: Config, params: &mut Params) -> Result<Self> {
        let prefix = if params.source().contains("wte.weight")
            && !params.source().contains("transformer.wte.weight")
        {
            ""
        } else {
            "transformer."
        };
        let (h, inner, std) = (cfg.n_embd, cfg.n_inner, cfg.initializer_range);
        let normal = Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        // transformers scales the residual projections' init by 1/sqrt(2 * n_layer).
        let proj_init = Init::Randn {
            mean: 0.0,
            stdev: std / (2.0 * cfg.n_layer as f64).sqrt(),
        };
        let zero = Init::Const(0.0);
        let one = Init::Const(1.0);
        let mut take = |name: String, shape: &[usize], init: Init| -> Result<(String, Tensor)> {
            let t = params.take(&format!("{prefix}{name}"), shape, init)?;
            Ok((format!("transformer.{name}"), t))
        };
        let mut named = Vec::new();
        let mut get = |name: String, shape: &[usize], init: Init| -> Result<Tensor> {
            let (n, t) = take(name, shape, init)?;
            named.push((n, t.clone()));
            Ok(t)
        };
        let wte = get("wte.weight".into(), &[cfg.vocab_size, h], normal)?;
        let wpe = get("wpe.weight".into(), &[cfg.n_positions, h], normal)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}.");
            blocks.push(Block {
                ln_1: Norm {
                    w: get(format!("{p}ln_1.weight"), &[h], one)?,
                    b: get(format!("{p}ln_1.bias"), &[h], zero)?,
                },
                c_attn_w: get(format!("{p}attn.c_attn.weight"), &[h, 3 * h], normal)?,
                c_attn_b: get(format!("{p}attn.c_attn.bias"), &[3 * h], zero)?,
                attn_proj_w: get(format!("{p}attn.c_proj.weight"), &[h, h], proj_init)?,
                attn_proj_b: get(format!("{p}attn.c_proj.bias"), &[h], zero)?,
                ln_2: Norm {
                    w: get(format!("{p}ln_2.weight"), &[h], one)?,
                    b: get(format!("{p}ln_2.bias"), &[h], zero)?,
                },
                c_fc_w: get(format!("{p}mlp.c_fc.weight"), &[h, inner], normal)?,
                c_fc_b: get(format!("{p}mlp.c_fc.bias"), &[inner], zero)?,
                mlp_proj_w: get(format!("{p}mlp.c_proj.weight"), &[inner, h], proj_init)?,
                mlp_proj_b: get(format!("{p}mlp.c_proj.bias"), &[h], zero)?,
            });
        }
        let ln_f = Norm {
            w: get("ln_f.weight".into(), &[h], one)?,
            b: get("ln_f.bias".into(), &[h], zero)?,
        };
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            let t = params.take("lm_head.weight", &[cfg.vocab_size, h], normal)?;
            named.push(("lm_head.weight".into(), t.clone()));
            t
        };
        Ok(Self {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            named,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// The compute dtype (the final LayerNorm's; the matrices may be held in half precision).
    pub fn dtype(&self) -> DType {
        self.ln_f.w.dtype()
    }

    pub fn named_tensors(&self) -> &[(String, Tensor)] {
        &self.named
    }

    pub fn mlp_weights(&self) -> MlpWeights {
        MlpWeights(
            self.blocks
                .iter()
                .map(|b| (b.c_fc_w.clone(), b.mlp_proj_w.clone()))
                .collect(),
        )
    }

    pub fn mlp_weight_names(&self) -> Vec<(String, String)> {
        (0..self.cfg.n_layer)
            .map(|i| {
                (
                    format!("transformer.h.{i}.mlp.c_fc.weight"),
                    format!("transformer.h.{i}.mlp.c_proj.weight"),
                )
            })
            .collect()
    }

    pub fn forward_hidden(
        &self,
        inputs: &Inputs,
        mut cache: Option<&mut KvCache>,
        mlp: Option<&MlpWeights>,
    ) -> CResult<Tensor> {
        if let (Some(c), None) = (cache.as_deref_mut(), mlp) {
            if let Some(hidden) = self.decode_step(inputs, c)? {
                return Ok(hidden);
            }
        }
        let (b, t) = inputs.ids.dims2()?;
        let (h, nh) = (self.cfg.n_embd, self.cfg.n_head);
        let hd = h / nh;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let tok = crate::models::embed(&self.wte, &inputs.ids, self.dtype())?;
        let pos = crate::models::embed(&self.wpe, &inputs.positions, self.dtype())?;
        let mut x = (tok + pos)?.reshape((b, t, h))?;
        let built_mask;
        let mask = match &inputs.mask {
            Some(m) => Some(m),
            None => {
                built_mask = causal_mask(t, past, x.dtype(), x.device())?;
                built_mask.as_ref()
            }
        };
        let eps = self.cfg.layer_norm_epsilon;
        for (i, blk) in self.blocks.iter().enumerate() {
            let a_in = ops::layer_norm(&x, &blk.ln_1.w, &blk.ln_1.b, eps)?;
            let qkv = ops::dense(&a_in, &blk.c_attn_w, Some(&blk.c_attn_b), false)?;
            let mut scale = if self.cfg.scale_attn_weights {
                1.0 / (hd as f64).sqrt()
            } else {
                1.0
            };
            if self.cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            let att = match cache.as_deref_mut() {
                // Training, unlearning and scoring: one fused kernel on the packed projection.
                None => ops::self_attention(&qkv, nh, scale, mask)?,
                Some(c) => {
                    let heads = |j: usize| -> CResult<Tensor> {
                        qkv.narrow(2, j * h, h)?
                            .reshape((b, t, nh, hd))?
                            .transpose(1, 2)?
                            .contiguous()
                    };
                    let (k, v) = c.append(i, &heads(1)?, &heads(2)?)?;
                    let q = ops::prescale_query(&heads(0)?, scale)?;
                    let att = ops::attention(&q, &k, &v, mask)?;
                    att.transpose(1, 2)?.reshape((b, t, h))?
                }
            };
            x = (x + ops::dense(&att, &blk.attn_proj_w, Some(&blk.attn_proj_b), false)?)?;

            let m_in = ops::layer_norm(&x, &blk.ln_2.w, &blk.ln_2.b, eps)?;
            let (fc_w, proj_w) = match mlp {
                Some(m) => (&m.0[i].0, &m.0[i].1),
                None => (&blk.c_fc_w, &blk.mlp_proj_w),
            };
            let m = ops::dense(&m_in, fc_w, Some(&blk.c_fc_b), false)?;
            let m = self.cfg.activation.apply(&m)?;
            x = (x + ops::dense(&m, proj_w, Some(&blk.mlp_proj_b), false)?)?;
        }
        ops::layer_norm(&x, &self.ln_f.w, &self.ln_f.b, eps)
    }

    /// The LM head, `[V, H]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        ops::dense(hidden, &self.lm_head, None, true)
    }
}
