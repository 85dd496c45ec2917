//! Optimisers with the exact PyTorch semantics the paper's code relies on, and AdamW state that
//! can be saved and restored.
//!
//! Invariants:
//! - [`AdamW`] is `torch.optim.AdamW` (decoupled weight decay `θ ← θ − lr·wd·θ`, bias-corrected
//!   moments, `eps` added to `√v̂`); [`Sgd`] is `torch.optim.SGD` with momentum and *coupled*
//!   weight decay (`g ← g + wd·θ`; the momentum buffer is `g` on the first step, then
//!   `μ·buf + g`; no dampening, no Nesterov), as BalancedSubnet uses it (candle-nn's SGD has no
//!   momentum). Both are pinned to steps worked by hand from PyTorch's formulas (tests below).
//! - Both update only the variables they were given, in place, and skip variables that received
//!   no gradient in a step (as PyTorch does for parameters whose `.grad` is `None`).
//! - The slice steps (`step_slices`) update f32 CPU variables in one pass each, in parallel over
//!   variables, bit for bit as the tensor steps do (pinned); other devices and dtypes go through
//!   the tensor expressions. A gradient of the wrong length is an error.
//! - State is kept detached from the autograd graph (regression test:
//!   `state_does_not_retain_the_graph`).
//! - [`AdamW::save`] and [`AdamW::load`] round-trip the moments and the step count, so a resumed
//!   run takes the same next step as an uninterrupted one (`adamw_state_round_trips`); missing
//!   or mis-shaped state is an error naming the file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use crate::error::{Error, Result};
use crate::models::weights::{read_safetensors, write_safetensors};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// `torch.optim.AdamW` over named variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var, Tensor, Tensor)>,
    step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let vars = vars
            .into_iter()
            .map(|(n, v)| {
                let m = v.as_tensor().zeros_like()?;
                let s = v.as_tensor().zeros_like()?;
                Ok((n, v, m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            vars,
            step: 0,
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let c1 = 1.0 / (1.0 - p.beta1.powi(t));
        let c2 = 1.0 / (1.0 - p.beta2.powi(t));
        for (_, var, m, v) in self.vars.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // candle leaves a variable's gradient attached to the forward graph; keeping it in
            // the moments would retain every step's activations.
            let g = g.detach();
            Self::update(p, (c1, c2), var, m, v, &g)?;
        }
        Ok(())
    }

    /// One step with plain f32 gradients: `grad(name)` is the gradient of the variable of that
    /// name, row-major in its shape (`None` skips it). f32 CPU variables are updated in one
    /// pass per variable, in parallel, with exactly the f32 arithmetic of [`AdamW::step`]'s
    /// tensor expressions (candle's `t * c` is `t·c + 0`, `t + c` is `t·1 + c`); others go
    /// through those expressions.
    pub fn step_slices<'g>(
        &mut self,
        grad: impl Fn(&str) -> Option<&'g [f32]> + Sync,
    ) -> Result<()> {
        use rayon::prelude::*;
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let c1 = 1.0 / (1.0 - p.beta1.powi(t));
        let c2 = 1.0 / (1.0 - p.beta2.powi(t));
        self.vars
            .par_iter_mut()
            .try_for_each(|(name, var, m, v)| -> Result<()> {
                let Some(g) = grad(name) else {
                    return Ok(());
                };
                if g.len() != var.elem_count() {
                    return Err(Error::invalid(
                        "gradient",
                        format!("{name}: {} values for {:?}", g.len(), var.dims()),
                    ));
                }
                if !(var.device().is_cpu() && var.dtype() == DType::F32) {
                    let g = Tensor::from_slice(g, var.dims(), var.device())?;
                    return Self::update(p, (c1, c2), var, m, v, &g);
                }
                let f = |x: f64| x as f32;
                let (b1, ob1, b2, ob2) =
                    (f(p.beta1), f(1.0 - p.beta1), f(p.beta2), f(1.0 - p.beta2));
                let (c1, c2, eps, lr) = (f(c1), f(c2), f(p.eps), f(p.lr));
                let decay = f(1.0 - p.lr * p.weight_decay);
                // In place, in three passes (the moments, then θ reading both).
                m.inplace_op1(&InPlace(|m: &mut [f32]| {
                    for (m, &g) in m.iter_mut().zip(g) {
                        *m = (*m * b1 + 0.0) + (g * ob1 + 0.0);
                    }
                }))?;
                v.inplace_op1(&InPlace(|v: &mut [f32]| {
                    for (v, &g) in v.iter_mut().zip(g) {
                        *v = (*v * b2 + 0.0) + ((g * g) * ob2 + 0.0);
                    }
                }))?;
                var.as_tensor().inplace_op3(
                    &*m,
                    &*v,
                    &InPlace3(|th: &mut [f32], m: &[f32], v: &[f32]| {
                        for ((th, &m), &v) in th.iter_mut().zip(m).zip(v) {
                            let update = (m * c1 + 0.0) / ((v * c2 + 0.0).sqrt() * 1.0 + eps);
                            *th = (*th * decay + 0.0) - (update * lr + 0.0);
                        }
                    }),
                )?;
                Ok(())
            })
    }

    /// One variable's update through tensor expressions.
    fn update(
        p: AdamWParams,
        (c1, c2): (f64, f64),
        var: &Var,
        m: &mut Tensor,
        v: &mut Tensor,
        g: &Tensor,
    ) -> Result<()> {
        *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
        *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
        let update = ((&*m * c1)? / ((&*v * c2)?.sqrt()? + p.eps)?)?;
        let theta = ((var.as_tensor() * (1.0 - p.lr * p.weight_decay))? - (update * p.lr)?)?;
        var.set(&theta)?;
        Ok(())
    }

    /// Backward pass of `loss` and one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// Saves moments and the step count to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.vars.len() + 1);
        for (n, _, m, v) in &self.vars {
            out.push((format!("m.{n}"), m.clone()));
            out.push((format!("v.{n}"), v.clone()));
        }
        // f64 keeps every u64 step count below 2^53 exact.
        out.push((
            "step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        ));
        write_safetensors(&out, DType::F32, path)
    }

    /// Restores state written by [`AdamW::save`] for the same variables.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let file = path.display().to_string();
        let dev = self.vars.first().map(|(_, v, _, _)| v.device().clone());
        let dev = dev.unwrap_or(candle_core::Device::Cpu);
        let mut map: HashMap<String, Tensor> = read_safetensors(path, DType::F32, &dev)?;
        let missing = |n: &str| Error::Weights {
            file: file.clone(),
            message: format!("missing optimiser state {n}"),
        };
        for (n, var, m, v) in self.vars.iter_mut() {
            let mk = format!("m.{n}");
            let vk = format!("v.{n}");
            let new_m = map.remove(&mk).ok_or_else(|| missing(&mk))?;
            let new_v = map.remove(&vk).ok_or_else(|| missing(&vk))?;
            if new_m.dims() != var.dims() || new_v.dims() != var.dims() {
                return Err(Error::Weights {
                    file: file.clone(),
                    message: format!("optimiser state for {n} has the wrong shape"),
                });
            }
            *m = new_m.to_dtype(var.dtype())?;
            *v = new_v.to_dtype(var.dtype())?;
        }
        let step = map.remove("step").ok_or_else(|| missing("step"))?;
        self.step = step.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// An in-place f32 CPU op on one contiguous tensor (how [`AdamW::step_slices`] updates without
/// allocating).
struct InPlace<F>(F);

/// The slice of a contiguous f32 CPU storage that `layout` covers.
fn contiguous<'a>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let (CpuStorage::F32(d), Some((a, b))) = (s, layout.contiguous_offsets()) else {
        candle_core::bail!("expected a contiguous f32 tensor");
    };
    Ok(&d[a..b])
}

impl<F: Fn(&mut [f32])> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "in-place f32 update"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(d), Some((a, b))) = (s, layout.contiguous_offsets()) else {
            candle_core::bail!("expected a contiguous f32 tensor");
        };
        (self.0)(&mut d[a..b]);
        Ok(())
    }
}

/// [`InPlace`] reading one more tensor of the same shape.
struct InPlace2<F>(F);

impl<F: Fn(&mut [f32], &[f32])> InplaceOp2 for InPlace2<F> {
    fn name(&self) -> &'static str {
        "in-place f32 update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let x = contiguous(s2, l2)?;
        let (CpuStorage::F32(d), Some((a, b))) = (s1, l1.contiguous_offsets()) else {
            candle_core::bail!("expected a contiguous f32 tensor");
        };
        let d = &mut d[a..b];
        if x.len() != d.len() {
            candle_core::bail!("in-place update: shapes differ");
        }
        (self.0)(d, x);
        Ok(())
    }
}

/// [`InPlace`] reading two more tensors of the same shape.
struct InPlace3<F>(F);

impl<F: Fn(&mut [f32], &[f32], &[f32])> InplaceOp3 for InPlace3<F> {
    fn name(&self) -> &'static str {
        "in-place f32 update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (x, y) = (contiguous(s2, l2)?, contiguous(s3, l3)?);
        let (CpuStorage::F32(d), Some((a, b))) = (s1, l1.contiguous_offsets()) else {
            candle_core::bail!("expected a contiguous f32 tensor");
        };
        let d = &mut d[a..b];
        if x.len() != d.len() || y.len() != d.len() {
            candle_core::bail!("in-place update: shapes differ");
        }
        (self.0)(d, x, y);
        Ok(())
    }
}

/// SGD hyper-parameters (PyTorch semantics; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdParams {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

/// `torch.optim.SGD(momentum, weight_decay)` without dampening or Nesterov.
pub struct Sgd {
    params: SgdParams,
    vars: Vec<(Var, Option<Tensor>)>,
}

impl Sgd {
    pub fn new(vars: Vec<Var>, params: SgdParams) -> Self {
        Self {
            params,
            vars: vars.into_iter().map(|v| (v, None)).collect(),
        }
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(|_, var| grads.get(var.as_tensor()).cloned())
    }

    /// One step with the gradients `grad(i, var)` gives for the `i`-th variable (in the order
    /// passed to [`Sgd::new`]); `None` skips that variable.
    pub fn step_with(&mut self, mut grad: impl FnMut(usize, &Var) -> Option<Tensor>) -> Result<()> {
        let p = self.params;
        for (i, (var, buf)) in self.vars.iter_mut().enumerate() {
            let Some(g) = grad(i, var) else {
                continue;
            };
            if var.device().is_cpu()
                && var.dtype() == DType::F32
                && g.dtype() == DType::F32
                && g.dims() == var.dims()
            {
                Self::step_cpu_f32(p, var, buf, &g)?;
                continue;
            }
            // Detached: see AdamW::step.
            let mut g = g.detach();
            if p.weight_decay != 0.0 {
                g = (g + (var.as_tensor() * p.weight_decay)?)?;
            }
            if p.momentum != 0.0 {
                let next = match buf.take() {
                    None => g,
                    Some(b) => ((b * p.momentum)? + g)?,
                };
                *buf = Some(next.clone());
                g = next;
            }
            var.set(&(var.as_tensor() - (g * p.lr)?)?)?;
        }
        Ok(())
    }

    /// One step with plain f32 gradients: `grad(i)` for the `i`-th variable, row-major in its
    /// shape (`None` skips it). f32 CPU variables and their momentum buffers are updated in
    /// place, in parallel over variables, with exactly the f32 arithmetic of
    /// [`Sgd::step_with`] (pinned bit for bit); others go through [`Sgd::step_with`]'s path.
    pub fn step_slices<'g>(
        &mut self,
        grad: impl Fn(usize) -> Option<&'g [f32]> + Sync,
    ) -> Result<()> {
        use rayon::prelude::*;
        let p = self.params;
        let (wd, mu, lr) = (p.weight_decay as f32, p.momentum as f32, p.lr as f32);
        let fallback = self
            .vars
            .par_iter_mut()
            .enumerate()
            .map(|(i, (var, buf))| -> Result<bool> {
                let Some(g) = grad(i) else {
                    return Ok(false);
                };
                if g.len() != var.elem_count() {
                    return Err(Error::invalid(
                        "gradient",
                        format!("variable {i}: {} values for {:?}", g.len(), var.dims()),
                    ));
                }
                if !(var.device().is_cpu() && var.dtype() == DType::F32) {
                    return Ok(true);
                }
                let theta = var.as_tensor();
                // g' = g + θ·wd (when decaying), as the tensor path computes it.
                let decay = p.weight_decay != 0.0;
                let decayed = |g: f32, t: f32| if decay { g + (t * wd + 0.0) } else { g };
                if p.momentum == 0.0 {
                    theta.inplace_op1(&InPlace(|th: &mut [f32]| {
                        for (t, &g) in th.iter_mut().zip(g) {
                            *t -= decayed(g, *t) * lr + 0.0;
                        }
                    }))?;
                    return Ok(false);
                }
                match buf {
                    None => {
                        // First step: the buffer is g'.
                        let th = theta.flatten_all()?.to_vec1::<f32>()?;
                        let first: Vec<f32> =
                            g.iter().zip(&th).map(|(&g, &t)| decayed(g, t)).collect();
                        *buf = Some(Tensor::from_vec(first, var.dims(), var.device())?);
                    }
                    Some(b) => {
                        b.inplace_op2(
                            theta,
                            &InPlace2(|b: &mut [f32], th: &[f32]| {
                                for ((b, &g), &t) in b.iter_mut().zip(g).zip(th) {
                                    *b = decayed(g, t) + (*b * mu + 0.0);
                                }
                            }),
                        )?;
                    }
                }
                let b = buf.as_ref().expect("set above");
                theta.inplace_op2(
                    b,
                    &InPlace2(|th: &mut [f32], b: &[f32]| {
                        for (t, &b) in th.iter_mut().zip(b) {
                            *t -= b * lr + 0.0;
                        }
                    }),
                )?;
                Ok(false)
            })
            .collect::<Result<Vec<bool>>>()?;
        if fallback.iter().any(|&f| f) {
            self.step_with(|i, var| {
                fallback[i]
                    .then(|| grad(i))
                    .flatten()
                    .and_then(|g| Tensor::from_slice(g, var.dims(), var.device()).ok())
            })?;
        }
        Ok(())
    }

    /// The same update on f32 CPU values in one pass, with the tensor path's exact f32
    /// arithmetic (candle's `t * c` is `t·c + 0`), instead of five whole-tensor ops each
    /// allocating its result.
    fn step_cpu_f32(p: SgdParams, var: &Var, buf: &mut Option<Tensor>, g: &Tensor) -> Result<()> {
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let (mut theta, mut g) = (flat(var.as_tensor())?, flat(g)?);
        let (wd, mu, lr) = (p.weight_decay as f32, p.momentum as f32, p.lr as f32);
        if p.weight_decay != 0.0 {
            g.iter_mut()
                .zip(&theta)
                .for_each(|(g, &t)| *g += t * wd + 0.0);
        }
        if p.momentum != 0.0 {
            if let Some(b) = buf.take() {
                g.iter_mut()
                    .zip(flat(&b)?)
                    .for_each(|(g, b)| *g += b * mu + 0.0);
            }
            *buf = Some(Tensor::from_vec(g.clone(), var.dims(), var.device())?);
        }
        theta
            .iter_mut()
            .zip(&g)
            .for_each(|(t, &g)| *t -= g * lr + 0.0);
        var.set(&Tensor::from_vec(theta, var.dims(), var.device())?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads_for(var: &Var, g: &[f32]) -> GradStore {
        // loss = sum(var * g) has gradient g.
        let gt = Tensor::new(g, &Device::Cpu).unwrap();
        (var.as_tensor() * gt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    #[test]
    fn adamw_matches_pytorch_arithmetic() {
        // Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
        // from θ = [1, -2] with gradients [0.5, -1] then [0.25, 2], worked by hand:
        // step 1: θ·(1 − 0.01) − 0.1·sign(g) = [0.89, -1.88]
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let p = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], p).unwrap();
        opt.step(&grads_for(&var, &[0.5, -1.0])).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.89).abs() < 1e-6 && (got[1] + 1.88).abs() < 1e-6,
            "{got:?}"
        );
        opt.step(&grads_for(&var, &[0.25, 2.0])).unwrap();
        // step 2, element 0: m = 0.9·0.05 + 0.025 = 0.07 → m̂ = 0.07/0.19;
        // v = 0.98·0.005 + 0.02·0.0625 = 0.00615 → v̂ = 0.00615/0.0396.
        let m_hat = 0.07f64 / 0.19;
        let v_hat = 0.00615f64 / (1.0 - 0.98f64 * 0.98);
        let want0 = 0.89 * (1.0 - 0.01) - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] as f64 - want0).abs() < 1e-5,
            "{} vs {want0}",
            got[0]
        );
    }

    #[test]
    fn adamw_slice_step_equals_the_tensor_step_bit_for_bit() {
        let p = AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let vals = |seed: u32| -> Vec<f32> {
            (0..257u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let a = Var::new(vals(1).as_slice(), &Device::Cpu).unwrap();
        let b = Var::new(vals(1).as_slice(), &Device::Cpu).unwrap();
        let mut ta = AdamW::new(vec![("w".into(), a.clone())], p).unwrap();
        let mut tb = AdamW::new(vec![("w".into(), b.clone())], p).unwrap();
        for step in 0..4 {
            let g: Vec<f32> = vals(10 + step).iter().map(|x| x * 1e-3).collect();
            ta.step(&grads_for(&a, &g)).unwrap();
            tb.step_slices(|n| (n == "w").then_some(g.as_slice()))
                .unwrap();
            let bits = |v: &Var| -> Vec<u32> {
                let t = v.as_tensor().to_vec1::<f32>().unwrap();
                t.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&a), bits(&b), "step {step}");
        }
        assert_eq!(tb.steps(), 4);
    }

    #[test]
    fn adamw_state_round_trips() {
        let p = AdamWParams {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let a = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("a".into(), a.clone())], p).unwrap();
        opt.step(&grads_for(&a, &[1.0, -1.0])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        opt.save(&dir.path().join("opt.safetensors")).unwrap();
        let b = Var::from_tensor(a.as_tensor()).unwrap();
        let mut resumed = AdamW::new(vec![("a".into(), b.clone())], p).unwrap();
        resumed.load(&dir.path().join("opt.safetensors")).unwrap();
        assert_eq!(resumed.steps(), 1);
        opt.step(&grads_for(&a, &[0.3, 0.7])).unwrap();
        resumed.step(&grads_for(&b, &[0.3, 0.7])).unwrap();
        assert_eq!(
            a.as_tensor().to_vec1::<f32>().unwrap(),
            b.as_tensor().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn state_does_not_retain_the_graph() {
        // A variable's gradient from candle's backward still references the forward graph; the
        // optimiser must not keep it (this leaked ~400 MB per TinyMem step).
        let w = Var::new(&[[0.5f32, -0.25], [1.0, 2.0]], &Device::Cpu).unwrap();
        let x = Var::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap();
        let p = AdamWParams {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut adam = AdamW::new(vec![("w".into(), w.clone())], p).unwrap();
        let mut sgd = Sgd::new(
            vec![w.clone()],
            SgdParams {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.0,
            },
        );
        let grads = x
            .as_tensor()
            .matmul(w.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        adam.step(&grads).unwrap();
        sgd.step(&grads).unwrap();
        for (_, _, m, v) in &adam.vars {
            assert!(!m.track_op() && !v.track_op());
        }
        for (_, buf) in &sgd.vars {
            assert!(!buf.as_ref().unwrap().track_op());
        }
    }

    #[test]
    fn sgd_cpu_pass_equals_the_tensor_ops_bit_for_bit() {
        let p = SgdParams {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
        };
        let vals = |seed: u32| -> Vec<f32> {
            (0..257u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let var = Var::new(vals(1).as_slice(), &Device::Cpu).unwrap();
        let mut opt = Sgd::new(vec![var.clone()], p);
        // The reference: the tensor expressions of the generic path.
        let mut theta = Tensor::new(vals(1).as_slice(), &Device::Cpu).unwrap();
        let mut buf: Option<Tensor> = None;
        for step in 0..3 {
            let g = Tensor::new(vals(10 + step).as_slice(), &Device::Cpu).unwrap();
            opt.step_with(|_, _| Some(g.clone())).unwrap();
            let g = (&g + (&theta * p.weight_decay).unwrap()).unwrap();
            let next = match buf.take() {
                None => g,
                Some(b) => ((b * p.momentum).unwrap() + g).unwrap(),
            };
            theta = (&theta - (&next * p.lr).unwrap()).unwrap();
            buf = Some(next);
            let got: Vec<u32> = var
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want: Vec<u32> = theta
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn sgd_slice_step_equals_the_tensor_step_bit_for_bit() {
        let vals = |seed: u32| -> Vec<f32> {
            (0..257u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        };
        for (momentum, weight_decay) in [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4), (0.0, 0.0)] {
            let p = SgdParams {
                lr: 0.1,
                momentum,
                weight_decay,
            };
            let a = Var::new(vals(1).as_slice(), &Device::Cpu).unwrap();
            let b = Var::new(vals(1).as_slice(), &Device::Cpu).unwrap();
            let mut ta = Sgd::new(vec![a.clone()], p);
            let mut tb = Sgd::new(vec![b.clone()], p);
            for step in 0..3 {
                let g = vals(10 + step);
                let gt = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                ta.step_with(|_, _| Some(gt.clone())).unwrap();
                tb.step_slices(|_| Some(g.as_slice())).unwrap();
                let bits = |v: &Var| -> Vec<u32> {
                    let t = v.as_tensor().to_vec1::<f32>().unwrap();
                    t.iter().map(|x| x.to_bits()).collect()
                };
                assert_eq!(bits(&a), bits(&b), "{p:?} step {step}");
            }
        }
    }

    #[test]
    fn sgd_momentum_and_coupled_decay_match_pytorch() {
        // torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.5) from θ = 1 with g = 1, twice:
        // step 1: g' = 1 + 0.5 = 1.5, buf = 1.5, θ = 1 − 0.15 = 0.85
        // step 2: g' = 1 + 0.425 = 1.425, buf = 1.35 + 1.425 = 2.775, θ = 0.85 − 0.2775 = 0.5725
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(
            vec![var.clone()],
            SgdParams {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.5,
            },
        );
        opt.step(&grads_for(&var, &[1.0])).unwrap();
        assert!((var.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.85).abs() < 1e-6);
        opt.step(&grads_for(&var, &[1.0])).unwrap();
        assert!((var.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.5725).abs() < 1e-6);
    }
}
