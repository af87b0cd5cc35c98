//! candle:llama's forward pass on x86 CPUs with AVX-512 VNNI or AVX2, on plain `f32` buffers.
//!
//! Generating one token runs about 25 small tensor operations per layer; through candle each
//! allocates its result and dispatches on its own, which cost more than the matrix products
//! of a 135M model (measured: a third of a token's time). Here a layer is the same
//! arithmetic written out: RMS norm, the fused q/k/v product, interleaved rotary embedding,
//! a growing KV cache, grouped-query attention, the output product, the residual, RMS norm,
//! the fused gate/up product, SiLU × up, the down product. Matrix products are
//! [`PackedMatrix`]'s; attention and the row-wise steps are split over rows and heads with rayon
//! when a prompt makes them large.
//!
//! The arithmetic is candle's, operation for operation (the same formulas, in f32), with
//! sums in a different order, so results agree with candle's path to rounding; the GGUF
//! reference tests hold on either path.

use std::sync::Arc;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::packed::{sum_512, sum_lanes};
use super::packed::{Kernel, PackedMatrix};

/// One transformer block's weights.
pub struct Layer {
    pub attention_norm: Vec<f32>,
    /// q, k and v rows stacked: `(heads + 2 × kv_heads) × head_dim` outputs.
    pub qkv: PackedMatrix,
    pub output: PackedMatrix,
    pub ffn_norm: Vec<f32>,
    /// gate and up rows stacked: `2 × hidden` outputs.
    pub gate_up: PackedMatrix,
    pub down: PackedMatrix,
}

/// The model's weights, shared by every session.
pub struct Weights {
    /// What every matrix multiplies with, and the vector steps run on (one the CPU has).
    pub kernel: Kernel,
    /// Token embeddings, also the output projection when `output` is `None` (tied).
    pub embeddings: PackedMatrix,
    pub output: Option<PackedMatrix>,
    pub norm: Vec<f32>,
    pub layers: Vec<Layer>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub embedding_length: usize,
    pub ffn_length: usize,
    pub vocab: usize,
    pub eps: f32,
    /// Per position, per rotated pair: cos and sin (the model's whole context).
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// K and V of the positions seen so far: per position, per KV head, `head_dim` values.
#[derive(Clone, Default)]
struct Cache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// A session: the shared weights and this prediction's KV cache.
#[derive(Clone)]
pub struct Model {
    weights: Arc<Weights>,
    caches: Vec<Cache>,
}

/// Rows × columns above which a row-wise step is split over threads.
const PARALLEL_WORK: usize = 1 << 15;

impl Model {
    pub fn new(weights: Weights) -> Self {
        let caches = vec![Cache::default(); weights.layers.len()];
        Self {
            weights: Arc::new(weights),
            caches,
        }
    }

    /// A new session holding a copy of this one's first `positions` positions.
    pub fn prefix(&self, positions: usize) -> Model {
        let kv_width = self.weights.kv_heads * self.weights.head_dim;
        let end = positions * kv_width;
        Model {
            weights: Arc::clone(&self.weights),
            caches: self
                .caches
                .iter()
                .map(|c| Cache {
                    k: c.k[..end.min(c.k.len())].to_vec(),
                    v: c.v[..end.min(c.v.len())].to_vec(),
                })
                .collect(),
        }
    }

    /// How many positions the session's KV cache holds.
    pub fn positions(&self) -> usize {
        let kv_width = self.weights.kv_heads * self.weights.head_dim;
        self.caches.first().map_or(0, |c| c.k.len() / kv_width)
    }

    /// Bytes one position takes in the KV cache (keys and values of every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        let w = &self.weights;
        w.layers.len() * 2 * w.kv_heads * w.head_dim * std::mem::size_of::<f32>()
    }

    pub fn kernel(&self) -> Kernel {
        self.weights.kernel
    }

    pub fn vocab(&self) -> usize {
        self.weights.vocab
    }

    /// Feeds `tokens` at `position` (0 starts over); the last position's logits.
    pub fn forward(&mut self, tokens: &[u32], position: usize) -> candle_core::Result<Vec<f32>> {
        // On one of rayon's threads: a token's ~120 parallel matrix products then start from
        // a pool thread (the others join while still spinning) instead of each handing work
        // to the pool from outside and sleeping until it is done (two context switches each).
        rayon::scope(|_| self.forward_on_pool(tokens, position))
    }

    fn forward_on_pool(
        &mut self,
        tokens: &[u32],
        position: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let w = Arc::clone(&self.weights);
        let d = w.embedding_length;
        let t_len = tokens.len();
        if t_len == 0 {
            candle_core::bail!("no tokens to feed");
        }
        if position + t_len > w.cos.len() / (w.head_dim / 2) {
            candle_core::bail!(
                "positions {position}..{} are past the model's context",
                position + t_len
            );
        }
        // Feeding at `position` forgets whatever the cache held from there on.
        let kv_width = w.kv_heads * w.head_dim;
        for cache in &mut self.caches {
            if cache.k.len() < position * kv_width {
                candle_core::bail!(
                    "position {position} skips positions the cache has not seen ({})",
                    cache.k.len() / kv_width
                );
            }
            cache.k.truncate(position * kv_width);
            cache.v.truncate(position * kv_width);
        }
        let mut h = vec![0f32; t_len * d];
        for (row, &token) in h.chunks_mut(d).zip(tokens) {
            let known = w.embeddings.columns();
            if token as usize >= known {
                candle_core::bail!("token id {token} is past the embeddings ({known} tokens)");
            }
            w.embeddings.dequantize_row(token as usize, row);
        }
        let q_width = w.heads * w.head_dim;
        let qkv_width = q_width + 2 * kv_width;
        let mut normed = vec![0f32; t_len * d];
        let mut qkv = vec![0f32; t_len * qkv_width];
        let mut attended = vec![0f32; t_len * q_width];
        let mut projected = vec![0f32; t_len * d];
        let mut gate_up = vec![0f32; t_len * 2 * w.ffn_length];
        let mut activated = vec![0f32; t_len * w.ffn_length];
        for (layer, cache) in w.layers.iter().zip(&mut self.caches) {
            rms_norm_rows(&h, &layer.attention_norm, w.eps, &mut normed);
            layer.qkv.product(t_len, &normed, &mut qkv)?;
            // Rotary embedding on q and k, then k and v onto the cache.
            for_rows(&mut qkv, qkv_width, |t, row| {
                let pos = position + t;
                rotate(&mut row[..q_width + kv_width], &w, pos);
            });
            for row in qkv.chunks(qkv_width) {
                cache.k.extend_from_slice(&row[q_width..q_width + kv_width]);
                cache.v.extend_from_slice(&row[q_width + kv_width..]);
            }
            attention(&w, cache, &qkv, qkv_width, position, &mut attended);
            layer.output.product(t_len, &attended, &mut projected)?;
            add(&mut h, &projected);
            rms_norm_rows(&h, &layer.ffn_norm, w.eps, &mut normed);
            layer.gate_up.product(t_len, &normed, &mut gate_up)?;
            let f = w.ffn_length;
            let gate_up = &gate_up;
            for_rows(&mut activated, f, |t, row| {
                let (gate, up) = gate_up[t * 2 * f..(t + 1) * 2 * f].split_at(f);
                for ((out, &g), &u) in row.iter_mut().zip(gate).zip(up) {
                    *out = g / ((-g).exp() + 1.0) * u;
                }
            });
            layer.down.product(t_len, &activated, &mut projected)?;
            add(&mut h, &projected);
        }
        let last = &h[(t_len - 1) * d..];
        let mut normed_last = vec![0f32; d];
        rms_norm_rows(last, &w.norm, w.eps, &mut normed_last);
        let mut logits = vec![0f32; w.vocab];
        w.output
            .as_ref()
            .unwrap_or(&w.embeddings)
            .product(1, &normed_last, &mut logits)?;
        Ok(logits)
    }
}

/// Runs `f(row index, row)` over the rows of `data`, on all threads when there is enough.
fn for_rows(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if data.len() >= PARALLEL_WORK && data.len() > width {
        data.par_chunks_mut(width)
            .enumerate()
            .for_each(|(t, row)| f(t, row));
    } else {
        data.chunks_mut(width)
            .enumerate()
            .for_each(|(t, row)| f(t, row));
    }
}

/// candle's `RmsNorm`: `x / sqrt(mean(x²) + eps) × weight`, row by row.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    let norm_row = |row: &[f32], out: &mut [f32]| {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let scale = (sum2 / d as f32 + eps).sqrt();
        for ((o, &v), &a) in out.iter_mut().zip(row).zip(weight) {
            *o = v / scale * a;
        }
    };
    if x.len() >= PARALLEL_WORK {
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, r)| norm_row(r, o));
    } else {
        out.chunks_mut(d)
            .zip(x.chunks(d))
            .for_each(|(o, r)| norm_row(r, o));
    }
}

/// Interleaved ("NORM") rotary embedding of every head in `heads` at `pos`.
fn rotate(heads: &mut [f32], w: &Weights, pos: usize) {
    let half = w.head_dim / 2;
    let (cos, sin) = (&w.cos[pos * half..][..half], &w.sin[pos * half..][..half]);
    for head in heads.chunks_mut(w.head_dim) {
        for i in 0..half {
            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = x0 * cos[i] - x1 * sin[i];
            head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

fn add(h: &mut [f32], delta: &[f32]) {
    for (a, b) in h.iter_mut().zip(delta) {
        *a += b;
    }
}

/// Causal grouped-query attention of the new rows' queries over the cache.
fn attention(
    w: &Weights,
    cache: &Cache,
    qkv: &[f32],
    qkv_width: usize,
    position: usize,
    out: &mut [f32],
) {
    let hd = w.head_dim;
    let kv_width = w.kv_heads * hd;
    let group = w.heads / w.kv_heads;
    let scale = (hd as f64).sqrt() as f32;
    let t_len = qkv.len() / qkv_width;
    let seen = position + t_len;
    // One item per (row, KV head): its group of query heads against positions
    // 0..=position + row, so each cached K and V row is read once per group.
    let item = |index: usize, out: &mut [f32]| {
        let (t, kv) = (index / w.kv_heads, index % w.kv_heads);
        let visible = position + t + 1;
        let queries = &qkv[t * qkv_width + kv * group * hd..][..group * hd];
        let (keys, values) = (&cache.k[kv * hd..], &cache.v[kv * hd..]);
        let mut scores = vec![0f32; group * visible];
        scores_into(w.kernel, queries, hd, keys, kv_width, scale, &mut scores);
        let mut sums = vec![0f32; group];
        for (row, sum) in scores.chunks_mut(visible).zip(&mut sums) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                *sum += *s;
            }
        }
        weighted_values(w.kernel, &scores, &sums, values, kv_width, out);
    };
    if t_len > 1 && t_len * w.heads * seen * hd >= PARALLEL_WORK * 2 {
        out.par_chunks_mut(group * hd)
            .enumerate()
            .for_each(|(i, o)| item(i, o));
    } else {
        out.chunks_mut(group * hd)
            .enumerate()
            .for_each(|(i, o)| item(i, o));
    }
}

/// `scores[g × visible + j] = q_g · k_j / scale` for the `group` queries (`hd` values each)
/// and the keys `k_j = keys[j × stride ..][..hd]`, `visible = scores.len() / group`.
///
/// Both kernels sum a dot product in 16 lanes, then in [`sum_lanes`]'s order, so their
/// results are bit-identical.
fn scores_into(
    kernel: Kernel,
    queries: &[f32],
    hd: usize,
    keys: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let group = queries.len() / hd;
    let visible = scores.len() / group;
    assert!(visible == 0 || keys.len() >= (visible - 1) * stride + hd);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(16) {
        // SAFETY (both): `Weights::kernel` is one this CPU runs; every key and query read is
        // in bounds (asserted above; `hd` divides the queries).
        match kernel {
            Kernel::Avx512Vnni => unsafe {
                scores_avx512(queries, hd, keys, stride, scale, scores)
            },
            Kernel::AvxVnni | Kernel::Avx2 => unsafe {
                scores_avx2(queries, hd, keys, stride, scale, scores)
            },
        }
        return;
    }
    let _ = kernel;
    for j in 0..visible {
        let k = &keys[j * stride..][..hd];
        for (g, q) in queries.chunks(hd).enumerate() {
            scores[g * visible + j] = q.iter().zip(k).map(|(x, y)| x * y).sum::<f32>() / scale;
        }
    }
}

/// `out_g = Σ_j (scores[g × visible + j] / sums[g]) × v_j` with `v_j = values[j × stride ..]`:
/// the softmax-weighted values of each query head. Per output value, one multiply-add per
/// position, in position order, whatever the kernel.
fn weighted_values(
    kernel: Kernel,
    scores: &[f32],
    sums: &[f32],
    values: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let group = sums.len();
    let hd = out.len() / group;
    let visible = scores.len() / group;
    assert!(visible == 0 || values.len() >= (visible - 1) * stride + hd);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(16) {
        // SAFETY (both): as in `scores_into`.
        match kernel {
            Kernel::Avx512Vnni => unsafe { values_avx512(scores, sums, values, stride, out) },
            Kernel::AvxVnni | Kernel::Avx2 => unsafe {
                values_avx2(scores, sums, values, stride, out)
            },
        }
        return;
    }
    let _ = kernel;
    out.fill(0.0);
    for j in 0..visible {
        let v = &values[j * stride..][..hd];
        for (g, o) in out.chunks_mut(hd).enumerate() {
            let p = scores[g * visible + j] / sums[g];
            for (o, v) in o.iter_mut().zip(v) {
                *o = p.mul_add(*v, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(
    queries: &[f32],
    hd: usize,
    keys: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let group = queries.len() / hd;
    let visible = scores.len() / group;
    for j in 0..visible {
        let k = keys.as_ptr().add(j * stride);
        for g in 0..group {
            let q = queries.as_ptr().add(g * hd);
            let mut acc = _mm512_setzero_ps();
            for i in (0..hd).step_by(16) {
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(i)), _mm512_loadu_ps(k.add(i)), acc);
            }
            scores[g * visible + j] = sum_512(acc) / scale;
        }
    }
}

/// [`scores_avx512`]'s arithmetic, lane for lane: 16 lanes in two registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(
    queries: &[f32],
    hd: usize,
    keys: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let group = queries.len() / hd;
    let visible = scores.len() / group;
    for j in 0..visible {
        let k = keys.as_ptr().add(j * stride);
        for g in 0..group {
            let q = queries.as_ptr().add(g * hd);
            let mut acc = [_mm256_setzero_ps(); 2];
            for i in (0..hd).step_by(16) {
                for (half, acc) in acc.iter_mut().enumerate() {
                    let at = i + 8 * half;
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(q.add(at)),
                        _mm256_loadu_ps(k.add(at)),
                        *acc,
                    );
                }
            }
            scores[g * visible + j] = sum_lanes(acc[0], acc[1]) / scale;
        }
    }
}

/// Up to 64 output values of one head kept in registers over every position.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_avx512(
    scores: &[f32],
    sums: &[f32],
    values: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let hd = out.len() / sums.len();
    for chunk in (0..hd).step_by(64) {
        let v = values.as_ptr().add(chunk);
        match (hd - chunk).min(64) / 16 {
            4 => values_chunk_avx512::<4>(scores, sums, v, stride, hd, chunk, out),
            3 => values_chunk_avx512::<3>(scores, sums, v, stride, hd, chunk, out),
            2 => values_chunk_avx512::<2>(scores, sums, v, stride, hd, chunk, out),
            _ => values_chunk_avx512::<1>(scores, sums, v, stride, hd, chunk, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values_chunk_avx512<const N: usize>(
    scores: &[f32],
    sums: &[f32],
    v: *const f32,
    stride: usize,
    hd: usize,
    chunk: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let visible = scores.len() / sums.len();
    for (g, &sum) in sums.iter().enumerate() {
        let mut acc = [_mm512_setzero_ps(); N];
        for j in 0..visible {
            let p = _mm512_set1_ps(scores[g * visible + j] / sum);
            let row = v.add(j * stride);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(p, _mm512_loadu_ps(row.add(16 * i)), *acc);
            }
        }
        let o = out.as_mut_ptr().add(g * hd + chunk);
        for (i, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.add(16 * i), *acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn values_avx2(
    scores: &[f32],
    sums: &[f32],
    values: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let hd = out.len() / sums.len();
    for chunk in (0..hd).step_by(64) {
        let v = values.as_ptr().add(chunk);
        match (hd - chunk).min(64) / 8 {
            8 => values_chunk_avx2::<8>(scores, sums, v, stride, hd, chunk, out),
            6 => values_chunk_avx2::<6>(scores, sums, v, stride, hd, chunk, out),
            4 => values_chunk_avx2::<4>(scores, sums, v, stride, hd, chunk, out),
            _ => values_chunk_avx2::<2>(scores, sums, v, stride, hd, chunk, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn values_chunk_avx2<const N: usize>(
    scores: &[f32],
    sums: &[f32],
    v: *const f32,
    stride: usize,
    hd: usize,
    chunk: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let visible = scores.len() / sums.len();
    for (g, &sum) in sums.iter().enumerate() {
        let mut acc = [_mm256_setzero_ps(); N];
        for j in 0..visible {
            let p = _mm256_set1_ps(scores[g * visible + j] / sum);
            let row = v.add(j * stride);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(row.add(8 * i)), *acc);
            }
        }
        let o = out.as_mut_ptr().add(g * hd + chunk);
        for (i, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(8 * i), *acc);
        }
    }
}
