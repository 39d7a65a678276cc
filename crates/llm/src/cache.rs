//! The KV cache: keys and values of past positions, per layer, in preallocated buffers.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Keys and values of past positions, per layer, in buffers `[batch, capacity, kv_heads,
/// head_dim]` of which the first [`KvCache::len`] positions are filled. A step writes its new
/// keys and values after them (in place on the CPU backend) and attends to a view of the filled
/// part, instead of concatenating the whole cache anew; a full buffer doubles.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<Option<LayerCache<B>>>,
    /// Positions the buffers are first made with (at least the prompt's).
    reserve: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct LayerCache<B: Backend> {
    pub(crate) keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers hold `positions` (prompt and new tokens) before they first grow.
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        Self { layers: vec![None; num_layers], reserve: positions }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions the buffers hold before they grow.
    pub fn capacity(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(self.reserve, |l| l.keys.dims()[1])
    }

    /// Keeps only the batch rows `rows` (in that order) and drops the first `drop_front`
    /// positions of every row: sequences leave a running batch, and the padding that only they
    /// needed goes with them. The buffers keep their room for new positions.
    ///
    /// # Panics
    /// When a row index is out of range or `drop_front` exceeds [`KvCache::len`] (a caller's bug).
    pub fn retain(&mut self, rows: &[usize], drop_front: usize) {
        for layer in self.layers.iter_mut().flatten() {
            let [b, capacity, h, d] = layer.keys.dims();
            assert!(drop_front <= layer.len && rows.iter().all(|&r| r < b), "retain: rows {rows:?} of {b}");
            if drop_front == 0 && rows.iter().copied().eq(0..b) {
                continue;
            }
            let device = layer.keys.device();
            let index = Tensor::<B, 1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]),
                &device,
            );
            let len = layer.len - drop_front;
            let keep = |buffer: &Tensor<B, 4>| {
                let filled = buffer.clone().slice([0..b, drop_front..layer.len]).select(0, index.clone());
                let room = llava_kernels::kv::zeros([rows.len(), capacity - drop_front, h, d], &device, buffer.dtype());
                llava_kernels::kv::assign_positions(room, 0, filled)
            };
            (layer.keys, layer.values) = (keep(&layer.keys), keep(&layer.values));
            layer.len = len;
        }
    }

    /// Stacks the rows of `self` and then `other` into one cache, aligned at their last position:
    /// the shorter one is padded at the front (with zeros the caller's attention mask must hide),
    /// and the buffers get room for `room` more positions. A cache without rows yet is `other`.
    ///
    /// # Panics
    /// When the two caches have different numbers of layers (a caller's bug).
    pub fn stack(self, other: Self, room: usize) -> Self {
        assert_eq!(self.layers.len(), other.layers.len(), "stack: caches of different models");
        let len = self.len().max(other.len());
        let layers = self
            .layers
            .into_iter()
            .zip(other.layers)
            .map(|pair| match pair {
                (Some(a), Some(b)) => {
                    let [_, _, h, d] = a.keys.dims();
                    let device = a.keys.device();
                    let rows = a.keys.dims()[0] + b.keys.dims()[0];
                    let aligned = |layer: &LayerCache<B>, buffer: &Tensor<B, 4>| {
                        let n = buffer.dims()[0];
                        let filled = buffer.clone().slice([0..n, 0..layer.len]);
                        match len - layer.len {
                            0 => filled,
                            pad => Tensor::cat(
                                vec![llava_kernels::kv::zeros([n, pad, h, d], &device, buffer.dtype()), filled],
                                1,
                            ),
                        }
                    };
                    let both = |x: &Tensor<B, 4>, y: &Tensor<B, 4>| {
                        let stacked = Tensor::cat(vec![aligned(&a, x), aligned(&b, y)], 0);
                        let buffer = llava_kernels::kv::zeros([rows, len + room, h, d], &device, x.dtype());
                        llava_kernels::kv::assign_positions(buffer, 0, stacked)
                    };
                    Some(LayerCache { keys: both(&a.keys, &b.keys), values: both(&a.values, &b.values), len })
                }
                (a, b) => a.or(b),
            })
            .collect();
        Self { layers, reserve: self.reserve.max(other.reserve) }
    }

    /// Appends layer `i`'s new keys and values `[batch, new, kv_heads, head_dim]` and returns
    /// all of its keys and values so far (views of the buffers).
    pub(crate) fn append(
        &mut self, i: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, h, d] = keys.dims();
        let (device, dtype) = (keys.device(), keys.dtype());
        let buffer = |positions: usize| llava_kernels::kv::zeros([b, positions, h, d], &device, dtype);
        // Taken out of the cache, so that the buffers have no other holder and are written in place.
        let LayerCache { keys: mut k_buf, values: mut v_buf, len } = self.layers[i].take().unwrap_or_else(|| {
            LayerCache { keys: buffer(self.reserve.max(s)), values: buffer(self.reserve.max(s)), len: 0 }
        });
        let capacity = k_buf.dims()[1];
        if len + s > capacity {
            // Double (amortised O(1) per position); the filled part moves to the new buffers.
            let grown = (2 * capacity).max(len + s);
            let grow =
                |old: Tensor<B, 4>| llava_kernels::kv::assign_positions(buffer(grown), 0, old.slice([0..b, 0..len]));
            (k_buf, v_buf) = (grow(k_buf), grow(v_buf));
        }
        let keys = llava_kernels::kv::assign_positions(k_buf, len, keys);
        let values = llava_kernels::kv::assign_positions(v_buf, len, values);
        let views = (keys.clone().slice([0..b, 0..len + s]), values.clone().slice([0..b, 0..len + s]));
        self.layers[i] = Some(LayerCache { keys, values, len: len + s });
        views
    }
}
