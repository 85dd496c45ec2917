//! The key/value cache of a batch of sequences, owned by the caller rather than the model, so
//! that one immutable, shared model (`Arc<Model>`) serves many generations at once and can be
//! swapped as a whole.
//!
//! Invariants:
//! - Every layer holds exactly [`KvCache::len`] positions; the last layer to append advances it,
//!   so one forward call extends every layer by the same positions.
//! - Storage per layer is a preallocated `[batch, heads, capacity, head_dim]` buffer written in
//!   place; capacity at least doubles when full, so appending costs amortised O(new positions),
//!   not O(sequence). [`KvCache::append`] returns views of it, narrowed to the filled positions.
//! - Row operations keep every layer consistent: [`KvCache::select_rows`] keeps (and orders)
//!   rows, [`KvCache::trim_front`] drops leading positions of every row, [`KvCache::merge`]
//!   stacks another cache's rows after these, left-padding the shorter with zeros (the caller
//!   masks them). Merging caches of different layer counts or trimming more than `len` is an
//!   error.
//! - It is an inference structure: never used under autograd (training and unlearning run full
//!   sequences without one).

use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Per-layer key/value buffers for a batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            capacity: 0,
        }
    }

    /// Number of cached positions (the same in every layer).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v: [B, H, T, D]` for `layer` and returns all cached keys and values,
    /// `[B, H, len + T, D]`. The last layer to append advances [`KvCache::len`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        let start = self.len;
        let needed = start + t;
        if needed > self.capacity {
            let new_cap = needed.max(self.capacity * 2).max(16);
            for entry in self.layers.iter_mut().flatten() {
                entry.k = grow(&entry.k, new_cap, start)?;
                entry.v = grow(&entry.v, new_cap, start)?;
            }
            self.capacity = new_cap;
        }
        let entry = match &mut self.layers[layer] {
            Some(e) => e,
            slot @ None => {
                let shape = (b, h, self.capacity, d);
                slot.insert(LayerKv {
                    k: Tensor::zeros(shape, k.dtype(), k.device())?,
                    v: Tensor::zeros(shape, v.dtype(), v.device())?,
                })
            }
        };
        entry.k.slice_set(&k.contiguous()?, 2, start)?;
        entry.v.slice_set(&v.contiguous()?, 2, start)?;
        let out = (entry.k.narrow(2, 0, needed)?, entry.v.narrow(2, 0, needed)?);
        if layer + 1 == self.layers.len() {
            self.len = needed;
        }
        Ok(out)
    }

    /// Keeps only the batch rows in `rows` (in that order), e.g. to drop finished sequences.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for entry in self.layers.iter_mut().flatten() {
            entry.k = entry.k.index_select(rows, 0)?.contiguous()?;
            entry.v = entry.v.index_select(rows, 0)?.contiguous()?;
        }
        Ok(())
    }

    /// Drops the first `n` cached positions of every row (e.g. left padding that no row needs
    /// any more). Callers keep per-row position ids, so the remaining keys keep their meaning.
    pub fn trim_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n > self.len {
            candle_core::bail!("cannot trim {n} of {} cached positions", self.len);
        }
        let keep = self.len - n;
        for entry in self.layers.iter_mut().flatten() {
            entry.k = entry.k.narrow(2, n, keep)?.contiguous()?;
            entry.v = entry.v.narrow(2, n, keep)?.contiguous()?;
        }
        self.len = keep;
        self.capacity = keep;
        Ok(())
    }

    /// Stacks `other`'s rows after this cache's rows. The shorter cache is left-padded with
    /// zeros to the longer one's length; the caller masks those padding positions.
    pub fn merge(&mut self, other: &KvCache) -> Result<()> {
        if self.layers.len() != other.layers.len() {
            candle_core::bail!(
                "cannot merge caches of {} and {} layers",
                self.layers.len(),
                other.layers.len()
            );
        }
        if other.layers.iter().all(Option::is_none) {
            return Ok(());
        }
        if self.layers.iter().all(Option::is_none) {
            *self = other.clone();
            return Ok(());
        }
        let len = self.len.max(other.len);
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            let (Some(a), Some(b)) = (mine.as_mut(), theirs.as_ref()) else {
                candle_core::bail!("cannot merge caches with different filled layers");
            };
            a.k = Tensor::cat(
                &[
                    &left_pad(&a.k, self.len, len)?,
                    &left_pad(&b.k, other.len, len)?,
                ],
                0,
            )?;
            a.v = Tensor::cat(
                &[
                    &left_pad(&a.v, self.len, len)?,
                    &left_pad(&b.v, other.len, len)?,
                ],
                0,
            )?;
        }
        self.len = len;
        self.capacity = len;
        Ok(())
    }
}

/// The first `used` positions of `t`, left-padded with zeros to `len` positions.
fn left_pad(t: &Tensor, used: usize, len: usize) -> Result<Tensor> {
    let (b, h, _, d) = t.dims4()?;
    let used_part = t.narrow(2, 0, used)?;
    if used == len {
        return used_part.contiguous();
    }
    let pad = Tensor::zeros((b, h, len - used, d), t.dtype(), t.device())?;
    Tensor::cat(&[&pad, &used_part], 2)
}

/// Copies the first `used` positions of `t` into a buffer of `capacity` positions.
fn grow(t: &Tensor, capacity: usize, used: usize) -> Result<Tensor> {
    let (b, h, _, d) = t.dims4()?;
    let bigger = Tensor::zeros((b, h, capacity, d), t.dtype(), t.device())?;
    if used > 0 {
        bigger.slice_set(&t.narrow(2, 0, used)?.contiguous()?, 2, 0)?;
    }
    Ok(bigger)
}
