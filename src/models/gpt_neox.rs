//! GPT-NeoX as Pythia uses it (Hugging Face `GPTNeoXForCausalLM`): its config, its parameters
//! and its forward pass.
//!
//! Invariants:
//! - The architecture is transformers': rotary embeddings on the first `rotary_pct` of each
//!   head's dimensions (the "rotate_half" convention, base `rotary_emb_base`, tables computed in
//!   f32), parallel (`x + attn(ln1 x) + mlp(ln2 x)`) or sequential residuals, a fused
//!   `query_key_value` projection laid out per head as `[q | k | v]`, and a separate `embed_out`
//!   head (unless tied). Linear weights are stored `[out, in]` under transformers' names.
//! - [`Config::from_json`] reads the old and new key spellings (`rotary_pct`,
//!   `partial_rotary_factor`, `rope_parameters`; `rotary_emb_base`, `rope_theta`) and rejects what
//!   the forward pass cannot run (rope scaling, a `rope_type` other than `default`, an unknown
//!   activation, a zero size, heads that do not divide the width, an odd number of rotary
//!   dimensions, a non-positive base or epsilon) with an error naming the file.
//! - Every parameter is taken through [`Params`] with the shape the config implies: a missing
//!   tensor or another shape is an error naming it (`tests/loading_errors.rs`).
//! - The compute dtype is whatever the loader converted the weights to (fp16/bf16 checkpoints
//!   are upcast by it); `rotary_pct` 0 runs with no rotation.
//! - `forward_hidden` takes the hand-written decode step (`decode`) for one new token per row
//!   with a cache, no MLP override, f32 weights on an AVX-512F CPU and at most 64 rows, and the
//!   ops of [`ops`] otherwise; both compute the same function to float rounding (`decode`'s
//!   tests; `tests/parity.rs` against transformers, an fp16 checkpoint included).

use candle_core::{DType, Device, Result as CResult, Tensor};
use candle_nn::Init;
use serde::Deserialize;

use super::ops::{self, Activation};
use super::{causal_mask, Inputs, KvCache, MlpWeights, ModelSpec, Params, TokenId};
use crate::error::{Error, Result};

mod decode;
mod grad;

/// GPT-NeoX hyper-parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub rotary_pct: f64,
    pub rotary_emb_base: f64,
    pub use_parallel_residual: bool,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_type: Option<String>,
}

/// `config.json` as transformers writes it for GPT-NeoX (old and new key spellings).
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: Option<usize>,
    max_position_embeddings: usize,
    rotary_pct: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rotary_emb_base: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "yes")]
    use_parallel_residual: bool,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "yes")]
    attention_bias: bool,
    #[serde(default = "default_init")]
    initializer_range: f64,
    bos_token_id: Option<TokenId>,
    eos_token_id: Option<TokenId>,
    pad_token_id: Option<TokenId>,
}

fn yes() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".into()
}
fn default_init() -> f64 {
    0.02
}

impl Config {
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let hf: HfConfig =
            serde_json::from_str(text).map_err(|e| Error::config(file, e.to_string()))?;
        let bad = |m: String| Error::config(file, m);
        let activation = Activation::from_hf(&hf.hidden_act)
            .ok_or_else(|| bad(format!("unsupported hidden_act {:?}", hf.hidden_act)))?;
        let rp = hf.rope_parameters.as_ref();
        if let Some(kind) = rp.and_then(|r| r.rope_type.as_deref()) {
            if kind != "default" {
                return Err(bad(format!("unsupported rope_type {kind:?}")));
            }
        }
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad("rope_scaling is not supported".into()));
        }
        let cfg = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            intermediate_size: hf.intermediate_size.unwrap_or(4 * hf.hidden_size),
            max_position_embeddings: hf.max_position_embeddings,
            rotary_pct: hf
                .rotary_pct
                .or(hf.partial_rotary_factor)
                .or(rp.and_then(|r| r.partial_rotary_factor))
                .unwrap_or(0.25),
            rotary_emb_base: hf
                .rotary_emb_base
                .or(hf.rope_theta)
                .or(rp.and_then(|r| r.rope_theta))
                .unwrap_or(10000.0),
            use_parallel_residual: hf.use_parallel_residual,
            layer_norm_eps: hf.layer_norm_eps,
            activation,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias: hf.attention_bias,
            initializer_range: hf.initializer_range,
            bos_token_id: hf.bos_token_id.and_then(|t| t.first()),
            eos_token_id: hf.eos_token_id.and_then(|t| t.first()),
            pad_token_id: hf.pad_token_id.and_then(|t| t.first()),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of leading dimensions of each head that are rotated (as transformers computes it).
    pub fn rotary_ndims(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(0.0..=1.0).contains(&self.rotary_pct) {
            return Err(format!("rotary_pct {} is outside [0, 1]", self.rotary_pct));
        }
        if !self.rotary_ndims().is_multiple_of(2) {
            return Err(format!(
                "rotary_pct {} gives an odd number of rotary dimensions ({})",
                self.rotary_pct,
                self.rotary_ndims()
            ));
        }
        if self.rotary_emb_base.is_nan() || self.rotary_emb_base <= 0.0 {
            return Err("rotary_emb_base must be positive".into());
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err("layer_norm_eps must be positive".into());
        }
        Ok(())
    }

    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            architecture: super::Architecture::GptNeoX,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            context_length: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id,
            pad_token_id: self.pad_token_id,
        }
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "use_parallel_residual": self.use_parallel_residual,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.activation.hf_name(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "initializer_range": self.initializer_range,
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
struct Layer {
    input_ln: Norm,
    post_attn_ln: Norm,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    dense_w: Tensor,
    dense_b: Option<Tensor>,
    h_to_4h_w: Tensor,
    h_to_4h_b: Tensor,
    four_h_to_h_w: Tensor,
    four_h_to_h_b: Tensor,
}

/// A GPT-NeoX language model.
#[derive(Debug, Clone)]
pub struct GptNeoX {
    cfg: Config,
    embed_in: Tensor,
    layers: Vec<Layer>,
    final_ln: Norm,
    embed_out: Tensor,
    /// `[max_positions, rotary_ndims / 2]` cosine and sine tables.
    cos: Tensor,
    sin: Tensor,
    named: Vec<(String, Tensor)>,
}

impl GptNeoX {
    pub fn new(cfg: Config, params: &mut Params) -> Result<Self> {
        let (h, inner, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let normal = Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let zero = Init::Const(0.0);
        let one = Init::Const(1.0);
        let mut named = Vec::new();
        let mut get = |name: String, shape: &[usize], init: Init| -> Result<Tensor> {
            let t = params.take(&name, shape, init)?;
            named.push((name, t.clone()));
            Ok(t)
        };
        let embed_in = get("gpt_neox.embed_in.weight".into(), &[v, h], normal)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}.");
            let mut bias = |name: String, n: usize| -> Result<Option<Tensor>> {
                if cfg.attention_bias {
                    get(name, &[n], zero).map(Some)
                } else {
                    Ok(None)
                }
            };
            let qkv_b = bias(format!("{p}attention.query_key_value.bias"), 3 * h)?;
            let dense_b = bias(format!("{p}attention.dense.bias"), h)?;
            layers.push(Layer {
                input_ln: Norm {
                    w: get(format!("{p}input_layernorm.weight"), &[h], one)?,
                    b: get(format!("{p}input_layernorm.bias"), &[h], zero)?,
                },
                post_attn_ln: Norm {
                    w: get(format!("{p}post_attention_layernorm.weight"), &[h], one)?,
                    b: get(format!("{p}post_attention_layernorm.bias"), &[h], zero)?,
                },
                qkv_w: get(
                    format!("{p}attention.query_key_value.weight"),
                    &[3 * h, h],
                    normal,
                )?,
                qkv_b,
                dense_w: get(format!("{p}attention.dense.weight"), &[h, h], normal)?,
                dense_b,
                h_to_4h_w: get(format!("{p}mlp.dense_h_to_4h.weight"), &[inner, h], normal)?,
                h_to_4h_b: get(format!("{p}mlp.dense_h_to_4h.bias"), &[inner], zero)?,
                four_h_to_h_w: get(format!("{p}mlp.dense_4h_to_h.weight"), &[h, inner], normal)?,
                four_h_to_h_b: get(format!("{p}mlp.dense_4h_to_h.bias"), &[h], zero)?,
            });
        }
        let final_ln = Norm {
            w: get("gpt_neox.final_layer_norm.weight".into(), &[h], one)?,
            b: get("gpt_neox.final_layer_norm.bias".into(), &[h], zero)?,
        };
        let embed_out = if cfg.tie_word_embeddings {
            embed_in.clone()
        } else {
            get("embed_out.weight".into(), &[v, h], normal)?
        };
        let (cos, sin) = rotary_tables(&cfg, final_ln.w.dtype(), embed_in.device())?;
        Ok(Self {
            cfg,
            embed_in,
            layers,
            final_ln,
            embed_out,
            cos,
            sin,
            named,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed_in.device()
    }

    /// The compute dtype (the final LayerNorm's; the matrices may be held in half precision).
    pub fn dtype(&self) -> DType {
        self.final_ln.w.dtype()
    }

    pub fn named_tensors(&self) -> &[(String, Tensor)] {
        &self.named
    }

    pub fn mlp_weights(&self) -> MlpWeights {
        MlpWeights(
            self.layers
                .iter()
                .map(|l| (l.h_to_4h_w.clone(), l.four_h_to_h_w.clone()))
                .collect(),
        )
    }

    pub fn mlp_weight_names(&self) -> Vec<(String, String)> {
        (0..self.cfg.num_hidden_layers)
            .map(|i| {
                (
                    format!("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight"),
                    format!("gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight"),
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
        let h = self.cfg.hidden_size;
        let nh = self.cfg.num_attention_heads;
        let hd = self.cfg.head_dim();
        let rd = self.cfg.rotary_ndims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let mut x =
            crate::models::embed(&self.embed_in, &inputs.ids, self.dtype())?.reshape((b, t, h))?;
        let built_mask;
        let mask = match &inputs.mask {
            Some(m) => Some(m),
            None => {
                built_mask = causal_mask(t, past, x.dtype(), x.device())?;
                built_mask.as_ref()
            }
        };
        let pos = inputs.positions.flatten_all()?;
        // With no rotary dimensions (rotary_pct 0) the tables are unused.
        let table = |tab: &Tensor| -> CResult<Tensor> {
            if rd == 0 {
                return Ok(tab.clone());
            }
            tab.index_select(&pos, 0)?.reshape((b, t, rd / 2))
        };
        let (cos, sin) = (table(&self.cos)?, table(&self.sin)?);
        let eps = self.cfg.layer_norm_eps;
        for (i, l) in self.layers.iter().enumerate() {
            let a_in = ops::layer_norm(&x, &l.input_ln.w, &l.input_ln.b, eps)?;
            let qkv = ops::dense(&a_in, &l.qkv_w, l.qkv_b.as_ref(), true)?;
            // [B, T, nh, 3 * hd] -> per head [q | k | v].
            let qkv = qkv.reshape((b, t, nh, 3 * hd))?;
            let part = |j: usize| -> CResult<Tensor> {
                qkv.narrow(3, j * hd, hd)?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let (q, k) = if rd > 0 {
                (
                    self.rotate(&q, &cos, &sin, rd)?,
                    self.rotate(&k, &cos, &sin, rd)?,
                )
            } else {
                (q, k)
            };
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(i, &k, &v)?,
                None => (k, v),
            };
            let att = ops::attention(&q, &k, &v, mask)?;
            let att = att.transpose(1, 2)?.reshape((b, t, h))?;
            let att = ops::dense(&att, &l.dense_w, l.dense_b.as_ref(), true)?;

            let (w_in, w_out) = match mlp {
                Some(m) => (&m.0[i].0, &m.0[i].1),
                None => (&l.h_to_4h_w, &l.four_h_to_h_w),
            };
            let mlp_fn = |y: &Tensor| -> CResult<Tensor> {
                let m = ops::dense(y, w_in, Some(&l.h_to_4h_b), true)?;
                let m = self.cfg.activation.apply(&m)?;
                ops::dense(&m, w_out, Some(&l.four_h_to_h_b), true)
            };
            if self.cfg.use_parallel_residual {
                let m_in = ops::layer_norm(&x, &l.post_attn_ln.w, &l.post_attn_ln.b, eps)?;
                x = ((x + att)? + mlp_fn(&m_in)?)?;
            } else {
                x = (x + att)?;
                let m_in = ops::layer_norm(&x, &l.post_attn_ln.w, &l.post_attn_ln.b, eps)?;
                x = (&x + mlp_fn(&m_in)?)?;
            }
        }
        ops::layer_norm(&x, &self.final_ln.w, &self.final_ln.b, eps)
    }

    /// Rotates the first `rd` dimensions of `x: [B, nh, T, hd]`, passing the rest through.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, rd: usize) -> CResult<Tensor> {
        let hd = x.dim(3)?;
        if rd == hd {
            return ops::rope(x, cos, sin);
        }
        let rot = ops::rope(&x.narrow(3, 0, rd)?, cos, sin)?;
        Tensor::cat(&[&rot, &x.narrow(3, rd, hd - rd)?], 3)
    }

    /// The LM head, `[V, H]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.embed_out
    }

    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        ops::dense(hidden, &self.embed_out, None, true)
    }
}

/// Precomputes `cos`/`sin` of `position * inv_freq` in f32, as transformers does.
fn rotary_tables(cfg: &Config, dtype: DType, dev: &Device) -> CResult<(Tensor, Tensor)> {
    let rd = cfg.rotary_ndims();
    let half = (rd / 2).max(1);
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (cfg.rotary_emb_base as f32).powf((2 * i) as f32 / rd.max(1) as f32))
        .collect();
    let n = cfg.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (n, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}
