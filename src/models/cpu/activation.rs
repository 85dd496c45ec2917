//! The MLP activations' forward and derivative on plain slices, for the hand-written passes:
//! every [`Activation`] a supported `config.json` can name (ReLU for TinyMem, the exact GELU for
//! GPT-NeoX and GPT-2 checkpoints, its tanh approximation, SiLU).
//!
//! Invariants: each `*_bwd` multiplies an upstream gradient, in place, by the derivative of its
//! forward at the saved pre-activation, with candle's conventions (ReLU passes the gradient at
//! exactly 0, as candle's backward does), so a hand-written pass matches autograd; the tests
//! pin both against candle's autograd. Single-threaded, branch-free loops that vectorise.

use super::vmath::{erf, exp_neg, gelu_erf_in_place};
use crate::models::ops::Activation;

/// √(2/π), and the cubic coefficient of the tanh-approximated GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `out = act(pre)`.
#[inline(always)]
pub(crate) fn forward(act: Activation, pre: &[f32], out: &mut [f32]) {
    match act {
        Activation::Relu => out.iter_mut().zip(pre).for_each(|(o, &x)| *o = x.max(0.0)),
        Activation::Gelu => {
            out.copy_from_slice(pre);
            gelu_erf_in_place(out);
        }
        Activation::GeluTanh => out.iter_mut().zip(pre).for_each(|(o, &x)| {
            *o = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh())
        }),
        Activation::Silu => out
            .iter_mut()
            .zip(pre)
            .for_each(|(o, &x)| *o = x / (1.0 + (-x).exp())),
    }
}

/// `g ⊙= act′(pre)`.
#[inline(always)]
pub(crate) fn backward(act: Activation, pre: &[f32], g: &mut [f32]) {
    match act {
        // A select, not a branch: the sign of x is a coin flip.
        Activation::Relu => g
            .iter_mut()
            .zip(pre)
            .for_each(|(d, &x)| *d = if x >= 0.0 { *d } else { 0.0 }),
        // d/dx x·Φ(x) = Φ(x) + x·φ(x).
        Activation::Gelu => g.iter_mut().zip(pre).for_each(|(d, &x)| {
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp_neg(-0.5 * x * x);
            *d *= cdf + x * pdf;
        }),
        // With u = √(2/π)(x + c·x³): ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3c·x²).
        Activation::GeluTanh => g.iter_mut().zip(pre).for_each(|(d, &x)| {
            let th = (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh();
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
            *d *= 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
        }),
        // σ(x)(1 + x(1 − σ(x))).
        Activation::Silu => g.iter_mut().zip(pre).for_each(|(d, &x)| {
            let s = 1.0 / (1.0 + (-x).exp());
            *d *= s * (1.0 + x * (1.0 - s));
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn forward_and_derivative_match_candles_autograd() {
        let x = (crate::test_util::rand(&[257], 1) * 4.0).unwrap();
        let r = crate::test_util::rand(&[257], 2);
        let xs: Vec<f32> = x.to_vec1().unwrap();
        let rs: Vec<f32> = r.to_vec1().unwrap();
        for act in [
            Activation::Relu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
        ] {
            let v = Var::from_tensor(&x).unwrap();
            let y = match act {
                Activation::Relu => v.as_tensor().relu().unwrap(),
                Activation::Gelu => v.as_tensor().gelu_erf().unwrap(),
                Activation::GeluTanh => v.as_tensor().gelu().unwrap(),
                Activation::Silu => v.as_tensor().silu().unwrap(),
            };
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let want_dx: Vec<f32> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
            let want_y: Vec<f32> = y.to_vec1().unwrap();
            let mut out = vec![0f32; xs.len()];
            forward(act, &xs, &mut out);
            let mut dx = rs.clone();
            backward(act, &xs, &mut dx);
            for i in 0..xs.len() {
                assert!((out[i] - want_y[i]).abs() < 1e-5, "{act:?} y({})", xs[i]);
                assert!(
                    (dx[i] - want_dx[i]).abs() < 1e-5,
                    "{act:?} dy/dx({})",
                    xs[i]
                );
            }
        }
        // ReLU passes the gradient at exactly 0, like candle.
        let mut g = [3.0f32];
        backward(Activation::Relu, &[0.0], &mut g);
        assert_eq!(g, [3.0]);
    }
}
