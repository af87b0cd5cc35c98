//! The BERT encoder on the CPU without a tensor framework in the way: one pass over plain
//! f32 buffers per layer, weights transposed once at load, the four projections per layer
//! as three matrix products (query, key and value fused), and attention, layer norm and
//! GELU as straight loops spread over the cores with rayon.
//!
//! candle's `BertModel` computes the same thing, but on short sentences its per-operation
//! costs (an allocation and a thread hand-off for each of ~20 operations per layer) cost
//! more than the arithmetic. The CUDA path keeps candle's model. Same weights, same
//! formulas as Hugging Face's BertModel; the tests compare both against
//! sentence-transformers' vectors.

use candle_core::{DType, Storage, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

use crate::LoadContext;

/// An f32 weight kept as the contiguous CPU tensor that owns it (the cold load's buffer, or
/// a snapshot's mapping) and read as a slice. Keeping the tensor rather than a copy is what
/// lets a snapshot hold the prepared (transposed, fused) forms and a restore use them as
/// they are.
struct Weight {
    /// Owns the memory `ptr` points into; never written to.
    _tensor: Tensor,
    ptr: *const f32,
    len: usize,
}

// SAFETY: the weight is read-only, and the tensor that owns its memory is Send and Sync.
unsafe impl Send for Weight {}
unsafe impl Sync for Weight {}

/// `f` on the values of a contiguous f32 tensor on the CPU.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("runner's CPU BERT encoder needs its weights on the CPU");
    };
    let start = layout.start_offset();
    Ok(f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]))
}

impl Weight {
    fn new(t: Tensor) -> candle_core::Result<Self> {
        let t = t.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
        let (ptr, len) = with_cpu_f32(&t, |own| (own.as_ptr(), own.len()))?;
        Ok(Self {
            _tensor: t,
            ptr,
            len,
        })
    }
}

impl std::ops::Deref for Weight {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `ptr` and `len` describe the contiguous f32 storage of `_tensor`, which
        // lives as long as `self` and which nothing writes to or reallocates.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Linear layer: weight stored transposed, (in, out) row-major, for the matrix product.
struct Linear {
    weight_t: Weight,
    bias: Weight,
    inputs: usize,
    outputs: usize,
}

struct LayerNorm {
    weight: Weight,
    bias: Weight,
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct CpuBert {
    word: Weight,
    position: Weight,
    token_type: Weight,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    vocab: usize,
    max_positions: usize,
    eps: f32,
    act: HiddenAct,
}

fn values(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Weight> {
    Weight::new(vb.get(shape, name)?)
}

/// `w` (rows × cols) transposed into a new (cols × rows) f32 tensor, tile by tile: candle's
/// `t()?.contiguous()` copies element by element through a strided index, which took
/// two fifths of MiniLM's cold start.
fn transposed(w: Tensor) -> candle_core::Result<Tensor> {
    const TILE: usize = 32;
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    let (rows, cols) = w.dims2()?;
    let mut out = vec![0f32; rows * cols];
    with_cpu_f32(&w, |src| {
        for r0 in (0..rows).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let row = &src[r * cols..(r + 1) * cols];
                    for c in c0..(c0 + TILE).min(cols) {
                        out[c * rows + r] = row[c];
                    }
                }
            }
        }
    })?;
    Tensor::from_vec(out, (cols, rows), w.device())
}

/// The name a prepared tensor is saved under in a snapshot.
fn prepared_name(vb: &VarBuilder, what: &str) -> String {
    format!("runner.cpu-bert.{}.{what}", vb.prefix())
}

fn linear(
    vb: &VarBuilder,
    inputs: usize,
    outputs: usize,
    ctx: &LoadContext,
) -> candle_core::Result<Linear> {
    let weight_t = ctx.prepared(&prepared_name(vb, "weight_t"), || {
        transposed(vb.get((outputs, inputs), "weight")?)
    })?;
    Ok(Linear {
        weight_t: Weight::new(weight_t)?,
        bias: values(vb, &[outputs], "bias")?,
        inputs,
        outputs,
    })
}

/// Query, key and value as one (in, 3·out) product: one pass over the activations.
fn fused_qkv(vb: &VarBuilder, hidden: usize, ctx: &LoadContext) -> candle_core::Result<Linear> {
    const PARTS: [&str; 3] = ["query", "key", "value"];
    let weight_t = ctx.prepared(&prepared_name(vb, "qkv.weight_t"), || {
        let parts = PARTS
            .iter()
            .map(|p| vb.pp(p).get((hidden, hidden), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        transposed(Tensor::cat(&parts, 0)?)
    })?;
    let bias = ctx.prepared(&prepared_name(vb, "qkv.bias"), || {
        let parts = PARTS
            .iter()
            .map(|p| vb.pp(p).get(hidden, "bias"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.to_dtype(DType::F32)
    })?;
    Ok(Linear {
        weight_t: Weight::new(weight_t)?,
        bias: Weight::new(bias)?,
        inputs: hidden,
        outputs: 3 * hidden,
    })
}

fn layer_norm(vb: &VarBuilder, size: usize) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm {
        weight: values(vb, &[size], "weight")?,
        bias: values(vb, &[size], "bias")?,
    })
}

impl CpuBert {
    /// Loads the encoder from the same tensor names candle's `BertModel` reads (with or
    /// without a `bert.` prefix).
    /// The transposed and fused weights it makes at load go through `ctx.prepared`, so a
    /// snapshot holds them and a restore takes them as they are.
    pub fn load(vb: VarBuilder, config: &Config, ctx: &LoadContext) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        if !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "hidden size {h} is not a multiple of {} attention heads",
                config.num_attention_heads
            );
        }
        let e = vb.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                Ok(Layer {
                    qkv: fused_qkv(&l.pp("attention.self"), h, ctx)?,
                    attention_out: linear(&l.pp("attention.output.dense"), h, h, ctx)?,
                    attention_norm: layer_norm(&l.pp("attention.output.LayerNorm"), h)?,
                    intermediate: linear(
                        &l.pp("intermediate.dense"),
                        h,
                        config.intermediate_size,
                        ctx,
                    )?,
                    output: linear(&l.pp("output.dense"), config.intermediate_size, h, ctx)?,
                    output_norm: layer_norm(&l.pp("output.LayerNorm"), h)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            word: values(&e.pp("word_embeddings"), &[config.vocab_size, h], "weight")?,
            position: values(
                &e.pp("position_embeddings"),
                &[config.max_position_embeddings, h],
                "weight",
            )?,
            token_type: values(
                &e.pp("token_type_embeddings"),
                &[config.type_vocab_size, h],
                "weight",
            )?,
            embeddings_norm: layer_norm(&e.pp("LayerNorm"), h)?,
            layers,
            hidden: h,
            heads: config.num_attention_heads,
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
            eps: config.layer_norm_eps as f32,
            act: config.hidden_act,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Final hidden states of several sequences laid end to end without padding: `ids`
    /// holds every sequence's tokens in turn and `lengths` their counts. Returns a
    /// (total tokens, hidden) buffer in the same order. Only attention needs to know where a
    /// sequence ends; every other step works token by token, so no work goes to padding and
    /// a sequence's states do not depend on the others.
    pub fn forward(&self, ids: &[u32], lengths: &[usize]) -> Result<Vec<f32>, String> {
        let h = self.hidden;
        let rows: usize = lengths.iter().sum();
        if rows != ids.len() {
            return Err(format!(
                "{} token ids for sequences of {rows} tokens in all",
                ids.len()
            ));
        }
        if let Some(&long) = lengths.iter().find(|&&l| l > self.max_positions) {
            return Err(format!(
                "{long} tokens; the model takes at most {}",
                self.max_positions
            ));
        }
        let mut x = vec![0f32; rows * h];
        let mut r = 0;
        for &len in lengths {
            for t in 0..len {
                let id = ids[r] as usize;
                if id >= self.vocab {
                    return Err(format!("token id {id} is outside the vocabulary"));
                }
                let row = &mut x[r * h..(r + 1) * h];
                let word = &self.word[id * h..(id + 1) * h];
                let pos = &self.position[t * h..(t + 1) * h];
                let typ = &self.token_type[..h];
                for i in 0..h {
                    row[i] = word[i] + pos[i] + typ[i];
                }
                r += 1;
            }
        }
        self.embeddings_norm.apply(&mut x, h, self.eps);
        let mut qkv = Vec::new();
        let mut context = vec![0f32; rows * h];
        let mut projected = Vec::new();
        let mut intermediate = Vec::new();
        for layer in &self.layers {
            layer.qkv.apply(&x, rows, &mut qkv);
            self.attention(&qkv, lengths, &mut context);
            layer.attention_out.apply(&context, rows, &mut projected);
            add_in_place(&mut projected, &x);
            layer.attention_norm.apply(&mut projected, h, self.eps);
            std::mem::swap(&mut x, &mut projected);
            layer.intermediate.apply(&x, rows, &mut intermediate);
            activate(&mut intermediate, self.act);
            layer.output.apply(&intermediate, rows, &mut projected);
            add_in_place(&mut projected, &x);
            layer.output_norm.apply(&mut projected, h, self.eps);
            std::mem::swap(&mut x, &mut projected);
        }
        Ok(x)
    }

    /// Scaled dot-product attention per (sequence, head), each sequence over its own tokens.
    fn attention(&self, qkv: &[f32], lengths: &[usize], context: &mut [f32]) {
        let h = self.hidden;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let heads = self.heads;
        // One task per sequence: it owns that sequence's rows of `context`.
        let mut parts = Vec::with_capacity(lengths.len());
        let (mut rest, mut first) = (context, 0);
        for &len in lengths {
            let (own, tail) = rest.split_at_mut(len * h);
            parts.push((own, first, len));
            rest = tail;
            first += len;
        }
        parts.into_par_iter().for_each(|(out, first, len)| {
            let mut scores = vec![0f32; len];
            for head in 0..heads {
                let col = head * d;
                for t in 0..len {
                    let row = (first + t) * 3 * h;
                    let q = &qkv[row + col..row + col + d];
                    let mut max = f32::NEG_INFINITY;
                    for (s, score) in scores.iter_mut().enumerate() {
                        let krow = (first + s) * 3 * h + h + col;
                        *score = dot(q, &qkv[krow..krow + d]) * scale;
                        max = max.max(*score);
                    }
                    let mut sum = 0f32;
                    for score in scores.iter_mut() {
                        *score = (*score - max).exp();
                        sum += *score;
                    }
                    let inv = 1.0 / sum;
                    let o = &mut out[t * h + col..t * h + col + d];
                    o.fill(0.0);
                    for (s, &p) in scores.iter().enumerate() {
                        let vrow = (first + s) * 3 * h + 2 * h + col;
                        let p = p * inv;
                        for (oi, vi) in o.iter_mut().zip(&qkv[vrow..vrow + d]) {
                            *oi += p * vi;
                        }
                    }
                }
            }
        });
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the compiler keeps them in one vector register.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// Rows per rayon task for the layer norms: big enough to amortise the hand-off.
const ROWS_PER_TASK: usize = 16;

/// Which SIMD GELU this CPU runs.
#[derive(Clone, Copy, PartialEq)]
enum SimdGelu {
    Avx512,
    Avx2,
    None,
}

fn simd_gelu() -> SimdGelu {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return SimdGelu::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return SimdGelu::Avx2;
        }
    }
    SimdGelu::None
}

fn activate(x: &mut [f32], act: HiddenAct) {
    let simd = simd_gelu();
    x.par_chunks_mut(4096).for_each(|chunk| match act {
        // SAFETY (both): the CPU has the instructions (`simd_gelu`).
        #[cfg(target_arch = "x86_64")]
        HiddenAct::Gelu if simd == SimdGelu::Avx512 => unsafe { gelu_avx512(chunk) },
        #[cfg(target_arch = "x86_64")]
        HiddenAct::Gelu if simd == SimdGelu::Avx2 => unsafe { gelu_avx2(chunk) },
        HiddenAct::Gelu => chunk.iter_mut().for_each(|v| *v = gelu(*v)),
        HiddenAct::GeluApproximate => chunk.iter_mut().for_each(|v| {
            let x = *v;
            *v = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh())
        }),
        HiddenAct::Relu => chunk.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}

/// GELU with the exact (erf) form.
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// [`gelu`] on 16 values at a time: the same erfc approximation, with `exp` evaluated as
/// `2^n × e^r` (`|r| ≤ ln 2 / 2`, a degree-6 polynomial, within 2 ulps). The scalar form's
/// `expf` calls were a fifth of the encoder's time under batched load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let split = x.len() / 16 * 16;
    let set = _mm512_set1_ps;
    for i in (0..split).step_by(16) {
        let p = x.as_mut_ptr().add(i);
        let v = _mm512_loadu_ps(p);
        let s = _mm512_mul_ps(v, set(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm512_abs_ps(s);
        let t = _mm512_div_ps(set(1.0), _mm512_fmadd_ps(set(0.5), z, set(1.0)));
        let mut poly = set(0.170_872_77);
        for c in [
            -0.822_152_2,
            1.488_515_9,
            -1.135_204,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_7,
        ] {
            poly = _mm512_fmadd_ps(poly, t, set(c));
        }
        // −z² − 1.2655122 + t × poly
        let y = _mm512_sub_ps(
            _mm512_fmadd_ps(t, poly, set(-1.265_512_2)),
            _mm512_mul_ps(z, z),
        );
        let erfc = _mm512_mul_ps(t, exp_avx512(y));
        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, _mm512_setzero_ps());
        let erf = _mm512_mask_sub_ps(_mm512_sub_ps(set(1.0), erfc), negative, erfc, set(1.0));
        let out = _mm512_mul_ps(_mm512_mul_ps(set(0.5), v), _mm512_add_ps(set(1.0), erf));
        _mm512_storeu_ps(p, out);
    }
    for v in &mut x[split..] {
        *v = gelu(*v);
    }
}

/// `e^y` for 16 values: `y = n ln 2 + r`, `e^r` by its Taylor polynomial to degree 6,
/// scaled by `2^n` (`vscalefps` goes to 0 below the smallest float, as `expf` does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp_avx512(y: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = _mm512_set1_ps;
    let y = _mm512_max_ps(y, set(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(y, set(std::f32::consts::LOG2_E)),
    );
    // Cody–Waite: ln 2 in two parts, so r keeps its low bits.
    let r = _mm512_fnmadd_ps(n, set(0.693_145_75), y);
    let r = _mm512_fnmadd_ps(n, set(1.428_606_8e-6), r);
    let mut p = set(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, set(c));
    }
    _mm512_scalef_ps(p, n)
}

/// [`gelu_avx512`] for CPUs with AVX2 and FMA: 8 values at a time, the same polynomials;
/// `2^n` built in the exponent bits, so `e^y` stops at `e^−87` (the smallest normal float)
/// where `expf` would go on into subnormals: below 1e−37, invisible next to the GELU's 0.5.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let split = x.len() / 8 * 8;
    let set = _mm256_set1_ps;
    let sign_bit = set(-0.0);
    for i in (0..split).step_by(8) {
        let p = x.as_mut_ptr().add(i);
        let v = _mm256_loadu_ps(p);
        let s = _mm256_mul_ps(v, set(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm256_andnot_ps(sign_bit, s);
        let t = _mm256_div_ps(set(1.0), _mm256_fmadd_ps(set(0.5), z, set(1.0)));
        let mut poly = set(0.170_872_77);
        for c in [
            -0.822_152_2,
            1.488_515_9,
            -1.135_204,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_7,
        ] {
            poly = _mm256_fmadd_ps(poly, t, set(c));
        }
        let y = _mm256_sub_ps(
            _mm256_fmadd_ps(t, poly, set(-1.265_512_2)),
            _mm256_mul_ps(z, z),
        );
        let erfc = _mm256_mul_ps(t, exp_avx2(y));
        let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(s, _mm256_setzero_ps());
        let erf = _mm256_blendv_ps(
            _mm256_sub_ps(set(1.0), erfc),
            _mm256_sub_ps(erfc, set(1.0)),
            negative,
        );
        let out = _mm256_mul_ps(_mm256_mul_ps(set(0.5), v), _mm256_add_ps(set(1.0), erf));
        _mm256_storeu_ps(p, out);
    }
    for v in &mut x[split..] {
        *v = gelu(*v);
    }
}

/// `e^y` for 8 values (`y ≤ 88`), as [`exp_avx512`] computes it, `2^n` from the exponent bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp_avx2(y: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = _mm256_set1_ps;
    let y = _mm256_max_ps(y, set(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        y,
        set(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, set(0.693_145_75), y);
    let r = _mm256_fnmadd_ps(n, set(1.428_606_8e-6), r);
    let mut p = set(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, set(c));
    }
    let two_to_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(p, two_to_n)
}

/// erf from the Numerical Recipes erfc approximation (fractional error below 1.2e-7 over
/// the whole line); in f32 the result is within a few f32 ulps, far inside the tolerance of
/// sentence-transformers' vectors.
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

impl Linear {
    /// out = input · W + b, for `rows` rows; `out` is resized to rows × outputs.
    fn apply(&self, input: &[f32], rows: usize, out: &mut Vec<f32>) {
        let (k, n) = (self.inputs, self.outputs);
        out.clear();
        out.reserve(rows * n);
        for _ in 0..rows {
            out.extend_from_slice(&self.bias);
        }
        let threads = rayon::current_num_threads();
        // Rows are split between the cores, each running its own single-threaded product:
        // no synchronisation inside the product, and each core keeps its rows in cache.
        let parts = if rows * n * k >= 1 << 18 {
            threads.min(rows.div_ceil(8))
        } else {
            1
        };
        let per_part = rows.div_ceil(parts.max(1));
        out.par_chunks_mut(per_part * n)
            .zip(input.par_chunks(per_part * k))
            .for_each(|(dst, src)| {
                let part_rows = src.len() / k;
                // SAFETY: `src` holds part_rows×k, `weight_t` k×n and `dst` part_rows×n f32
                // values, row-major as the strides say; `dst` does not alias the inputs.
                unsafe {
                    gemm::gemm(
                        part_rows,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        src.as_ptr(),
                        1,
                        k as isize,
                        self.weight_t.as_ptr(),
                        1,
                        n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
    }
}

impl LayerNorm {
    fn apply(&self, x: &mut [f32], width: usize, eps: f32) {
        x.par_chunks_mut(width * ROWS_PER_TASK).for_each(|rows| {
            for row in rows.chunks_mut(width) {
                let n = width as f32;
                let mean = row.iter().sum::<f32>() / n;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let inv = 1.0 / (var + eps).sqrt();
                for ((v, w), b) in row.iter_mut().zip(self.weight.iter()).zip(self.bias.iter()) {
                    *v = (*v - mean) * inv * w + b;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_gelu_matches_the_scalar_form() {
        // −12..12 in small steps, the extremes, and a tail shorter than 16.
        let mut xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 1e-3).collect();
        xs.extend([
            -100.0, -30.0, -9.5, 0.0, -0.0, 9.5, 30.0, 100.0, 1e-20, -1e-20,
        ]);
        xs.extend([0.25, -0.5, 3.0]);
        let check = |what: &str, simd: &[f32]| {
            for (x, got) in xs.iter().zip(simd) {
                let want = gelu(*x);
                assert!(
                    (got - want).abs() <= 2e-7 + 2e-6 * want.abs(),
                    "{what} gelu({x}): {got} vs {want}"
                );
            }
        };
        let mut exercised = 0;
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                let mut simd = xs.clone();
                // SAFETY: AVX-512 F is present.
                unsafe { gelu_avx512(&mut simd) };
                check("AVX-512", &simd);
                exercised += 1;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let mut simd = xs.clone();
                // SAFETY: AVX2 and FMA are present.
                unsafe { gelu_avx2(&mut simd) };
                check("AVX2", &simd);
                exercised += 1;
            }
        }
        if exercised == 0 {
            eprintln!("neither AVX-512 nor AVX2 here: no SIMD GELU is exercised");
        }
    }

    /// Time of one forward pass over 32 sentences of 12 tokens (a batch as the HTTP
    /// benchmark forms them): `cargo test --release -p runner-models --lib forward_time --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn forward_time() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/all-minilm-l6-v2/weights");
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        // SAFETY: the weights file is not modified while the test maps it.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap()
        };
        let bert = CpuBert::load(vb, &config, &LoadContext::new(&|_| {})).unwrap();
        let ids: Vec<u32> = (0..32 * 12)
            .map(|i| 1000 + (i * 37 % 20000) as u32)
            .collect();
        let lengths = vec![12; 32];
        bert.forward(&ids, &lengths).unwrap();
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = std::time::Instant::now();
            std::hint::black_box(bert.forward(&ids, &lengths).unwrap());
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "forward, 32 x 12 tokens: median {:.2} ms, min {:.2} ms",
            times[10], times[0]
        );
    }
    use candle_core::Device;
    use candle_transformers::models::bert::BertModel;

    /// runner's CPU encoder and candle's BertModel give the same hidden states for a padded
    /// batch of unequal sequences, at every real token (on MiniLM's real weights).
    #[test]
    fn cpu_encoder_matches_candle_bert_on_a_padded_batch() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/all-minilm-l6-v2/weights");
        let weights = dir.join("model.safetensors");
        assert!(
            weights.is_file(),
            "MiniLM weights are missing: run scripts/fetch-minilm.sh"
        );
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let device = Device::Cpu;
        // SAFETY: the weights file is not modified while the test maps it.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device).unwrap()
        };
        let ours = CpuBert::load(vb.clone(), &config, &LoadContext::new(&|_| {})).unwrap();
        let theirs = BertModel::load(vb, &config).unwrap();

        let sequences: [&[u32]; 3] = [
            &[101, 1996, 4937, 7719, 2648, 102],
            &[101, 1037, 2158, 2003, 2652, 2858, 1012, 2023, 102],
            &[101, 7592, 102],
        ];
        // Ours: the sequences end to end. candle's: padded to 9 with an attention mask.
        let ragged: Vec<u32> = sequences.concat();
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let hidden = ours.forward(&ragged, &lengths).unwrap();
        let len = 9;
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for s in sequences {
            ids.extend_from_slice(s);
            ids.resize(ids.len() + len - s.len(), 0);
            mask.extend(std::iter::repeat_n(1u32, s.len()));
            mask.resize(mask.len() + len - s.len(), 0);
        }
        let input_ids = Tensor::from_vec(ids, (3, len), &device).unwrap();
        let attention = Tensor::from_vec(mask, (3, len), &device).unwrap();
        let expected = theirs
            .forward(
                &input_ids,
                &input_ids.zeros_like().unwrap(),
                Some(&attention),
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let h = config.hidden_size;
        let mut worst = 0f32;
        let mut first = 0;
        for (b, s) in sequences.iter().enumerate() {
            for t in 0..s.len() {
                let (at, ours_at) = ((b * len + t) * h, (first + t) * h);
                for i in 0..h {
                    worst = worst.max((hidden[ours_at + i] - expected[at + i]).abs());
                }
            }
            first += s.len();
        }
        assert!(worst < 1e-4, "largest difference {worst}");

        // Out-of-range ids, over-long inputs and mismatched lengths are errors, not panics.
        assert!(ours.forward(&[999_999], &[1]).is_err());
        let long = vec![101u32; config.max_position_embeddings + 1];
        assert!(ours.forward(&long, &[long.len()]).is_err());
        assert!(ours.forward(&[101, 102], &[3]).is_err());
    }
}
