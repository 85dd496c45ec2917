//! Plain-slice access to candle tensors on the CPU, for kernels that do their own loops.
//!
//! Invariants: a view never copies a contiguous tensor and never writes; a strided tensor is
//! gathered into logical (row-major) order by [`data`]/[`with_f32`], or handed over with its
//! layout by [`with_f32_storage`]. Non-CPU storage and (for [`View::slice`]) non-contiguous
//! tensors are errors, never panics. A [`View`] holds candle's storage read lock until dropped.

use std::borrow::Cow;

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor, WithDType};

/// The elements of a CPU storage seen through `layout`, in logical (row-major) order: borrowed
/// when the layout is contiguous, gathered otherwise.
pub(crate) fn data<'a, T: WithDType>(s: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [T]>> {
    let all = s.as_slice::<T>()?;
    Ok(match layout.contiguous_offsets() {
        Some((a, b)) => Cow::Borrowed(&all[a..b]),
        None => Cow::Owned(gather_strided(all, layout)),
    })
}

fn gather_strided<T: Copy>(all: &[T], layout: &Layout) -> Vec<T> {
    let dims = layout.dims();
    let strides = layout.stride();
    let n = layout.shape().elem_count();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    let mut off = layout.start_offset();
    for _ in 0..n {
        out.push(all[off]);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
    out
}

pub(crate) fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => bail!("lethe's CPU kernels run on the CPU only"),
    }
}

/// Runs `f` on the logical f32 elements of `t` (a CPU tensor).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_slice::<f32, R>(t, f)
}

/// Runs `f` on the logical elements of `t` (a CPU tensor of element type `T`; another dtype
/// is an error).
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let d = data::<T>(cpu(&guard)?, layout)?;
    f(&d)
}

/// A read view of a contiguous f32 CPU tensor (`G` is candle's storage read guard), for
/// hand-written passes that hold every weight as a plain slice at once.
pub(crate) struct View<'a, G> {
    guard: G,
    layout: &'a Layout,
}

/// [`View`] of `t`; the read guard is held until the view is dropped.
pub(crate) fn view(t: &Tensor) -> View<'_, impl std::ops::Deref<Target = Storage> + '_> {
    let (guard, layout) = t.storage_and_layout();
    View { guard, layout }
}

impl<G: std::ops::Deref<Target = Storage>> View<'_, G> {
    /// The tensor's elements; an error when it is not a contiguous f32 CPU tensor.
    pub(crate) fn slice(&self) -> Result<&[f32]> {
        let Storage::Cpu(c) = &*self.guard else {
            bail!("expected a tensor on the CPU");
        };
        let Some((a, b)) = self.layout.contiguous_offsets() else {
            bail!("expected a contiguous tensor");
        };
        Ok(&c.as_slice::<f32>()?[a..b])
    }
}

/// Runs `f` on the whole f32 storage of `t` (a CPU tensor) and its layout, for kernels that read
/// a strided view in place.
pub(crate) fn with_f32_storage<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], &Layout) -> Result<R>,
) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    f(cpu(&guard)?.as_slice::<f32>()?, layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_tensors_are_gathered_in_logical_order_and_views_refuse_them() {
        let t = Tensor::arange(0f32, 12.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let tt = t.t().unwrap();
        let gathered = with_f32(&tt, |xs| Ok(xs.to_vec())).unwrap();
        assert_eq!(
            gathered,
            tt.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            view(&t).slice().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(view(&tt).slice().is_err());
        let narrowed = t.narrow(1, 1, 2).unwrap();
        with_f32_storage(&narrowed, |all, layout| {
            assert_eq!(all.len(), 12);
            assert_eq!(layout.start_offset(), 1);
            Ok(())
        })
        .unwrap();
    }
}
