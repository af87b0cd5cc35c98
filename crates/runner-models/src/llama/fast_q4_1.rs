//! Q4_1 × Q8_1 matrix multiplication with AVX2, as a candle `QuantizedType`.
//!
//! candle 0.11 multiplies Q4_1 weights with scalar code. Here each block's integer dot
//! product (32 four-bit weights × 32 eight-bit activations) runs in AVX2; integer sums are
//! exact in any order, and the per-block float accumulation is candle's expression in
//! candle's order, so every output is bit-identical to candle's scalar `vec_dot`. Work is
//! split over column strips, so a strip's weights stay in L1 while every row passes.
//! Everything but `matmul_t` is delegated to candle's own Q4_1 storage.

use std::borrow::Cow;

use candle_core::quantized::k_quants::{BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QuantizedType};
use candle_core::{CpuStorage, Device, Result};
use half::f16;
use rayon::prelude::*;

/// candle's `BlockQ4_1`, field for field (`#[repr(C)]`, 20 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct Q4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// candle's `BlockQ8_1` (`#[repr(C)]`, 36 bytes): `s` is `d` × the sum of `qs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Q8_1 {
    d: f16,
    s: f16,
    qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<Q4_1>() == 20);
const _: () = assert!(std::mem::size_of::<Q8_1>() == 36);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

/// Columns per parallel work item.
const STRIP: usize = 8;

pub struct FastQ4_1 {
    /// candle's own Q4_1 storage, for everything but the matmul.
    inner: Box<dyn QuantizedType>,
    /// Each block's `d` and `m` as f32, converted once instead of in every dot product.
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl FastQ4_1 {
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// From the raw Q4_1 blocks of a tensor.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = match QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, GgmlDType::Q4_1)?
        {
            QStorage::Cpu(inner) => inner,
            _ => candle_core::bail!("Q4_1 storage on the CPU expected"),
        };
        let mut fast = Self {
            inner,
            scales: Vec::new(),
            mins: Vec::new(),
        };
        fast.scales = fast.blocks().iter().map(|b| b.d.to_f32()).collect();
        fast.mins = fast.blocks().iter().map(|b| b.m.to_f32()).collect();
        Ok(fast)
    }

    fn blocks(&self) -> &[Q4_1] {
        let count = self.inner.storage_size_in_bytes() / std::mem::size_of::<Q4_1>();
        // SAFETY: the inner storage is a Vec<BlockQ4_1>, laid out as Q4_1 (asserted sizes,
        // repr(C) on both), alive as long as self.
        unsafe { std::slice::from_raw_parts(self.inner.as_ptr() as *const Q4_1, count) }
    }
}

/// One weight row: its blocks and their f32 scales and minimums.
struct WeightRow<'a> {
    blocks: &'a [Q4_1],
    scales: &'a [f32],
    mins: &'a [f32],
}

/// One activation row: its blocks and their f32 `d` and `s`.
struct ActRow<'a> {
    blocks: &'a [Q8_1],
    scales: &'a [f32],
    sums: &'a [f32],
}

/// The dot product of one weight row with one activation row, as candle computes it:
/// `sumf += sumi as f32 * d4 * d8 + m4 * s8`, block after block.
#[inline]
fn dot(w: &WeightRow, a: &ActRow) -> f32 {
    let mut sumf = 0f32;
    let n = w.blocks.len();
    let mut b = 0;
    #[cfg(target_arch = "x86_64")]
    while b + 8 <= n {
        let mut terms = [0f32; 8];
        // SAFETY: AVX2 is present (FastQ4_1::available); b + 8 <= n for every slice.
        unsafe { block_terms_8(w, a, b, &mut terms) };
        for t in terms {
            sumf += t;
        }
        b += 8;
    }
    while b < n {
        let sumi = block_sum(&w.blocks[b], &a.blocks[b]);
        sumf += sumi as f32 * w.scales[b] * a.scales[b] + w.mins[b] * a.sums[b];
        b += 1;
    }
    sumf
}

/// The per-block terms of blocks `b..b + 8`, each computed exactly as the scalar
/// expression (separate multiplies and adds, no fused multiply-add).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_terms_8(w: &WeightRow, a: &ActRow, b: usize, out: &mut [f32; 8]) {
    use std::arch::x86_64::*;
    let q = |i: usize| block_quads_avx2(&w.blocks[b + i], &a.blocks[b + i]);
    let ab = _mm256_hadd_epi32(q(0), q(1));
    let cd = _mm256_hadd_epi32(q(2), q(3));
    let ef = _mm256_hadd_epi32(q(4), q(5));
    let gh = _mm256_hadd_epi32(q(6), q(7));
    let abcd = _mm256_hadd_epi32(ab, cd);
    let efgh = _mm256_hadd_epi32(ef, gh);
    let sums = _mm256_add_epi32(
        _mm256_permute2x128_si256(abcd, efgh, 0x20),
        _mm256_permute2x128_si256(abcd, efgh, 0x31),
    );
    let sumi = _mm256_cvtepi32_ps(sums);
    let d4 = _mm256_loadu_ps(w.scales.as_ptr().add(b));
    let m4 = _mm256_loadu_ps(w.mins.as_ptr().add(b));
    let d8 = _mm256_loadu_ps(a.scales.as_ptr().add(b));
    let s8 = _mm256_loadu_ps(a.sums.as_ptr().add(b));
    let t = _mm256_add_ps(
        _mm256_mul_ps(_mm256_mul_ps(sumi, d4), d8),
        _mm256_mul_ps(m4, s8),
    );
    _mm256_storeu_ps(out.as_mut_ptr(), t);
}

/// The 8 partial sums (i32 lanes) of one block's integer dot product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_quads_avx2(x: &Q4_1, y: &Q8_1) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let packed = _mm_loadu_si128(x.qs.as_ptr() as *const __m128i);
    let low_mask = _mm_set1_epi8(0x0F);
    let low = _mm_and_si128(packed, low_mask);
    let high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
    // Low nibbles pair with activations 0..16, high nibbles with 16..32.
    let weights = _mm256_set_m128i(high, low);
    let acts = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
    // u8 × i8 pairs into i16 (at most 2 × 15 × 128: no saturation), then into i32.
    let pairs = _mm256_maddubs_epi16(weights, acts);
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

#[inline]
fn block_sum(x: &Q4_1, y: &Q8_1) -> i32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: FastQ4_1 is only built when AVX2 is present (FastQ4_1::available).
    unsafe {
        block_sum_avx2(x, y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    block_sum_scalar(x, y)
}

#[allow(dead_code)]
fn block_sum_scalar(x: &Q4_1, y: &Q8_1) -> i32 {
    let mut sumi = 0i32;
    for j in 0..16 {
        let v0 = x.qs[j] as i32 & 0x0F;
        let v1 = x.qs[j] as i32 >> 4;
        sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + 16] as i32;
    }
    sumi
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_sum_avx2(x: &Q4_1, y: &Q8_1) -> i32 {
    use std::arch::x86_64::*;
    let quads = block_quads_avx2(x, y);
    let sum128 = _mm_add_epi32(
        _mm256_castsi256_si128(quads),
        _mm256_extracti128_si256(quads, 1),
    );
    let sum64 = _mm_add_epi32(sum128, _mm_unpackhi_epi64(sum128, sum128));
    let sum32 = _mm_add_epi32(sum64, _mm_shuffle_epi32(sum64, 1));
    _mm_cvtsi128_si32(sum32)
}

impl QuantizedType for FastQ4_1 {
    fn dtype(&self) -> GgmlDType {
        GgmlDType::Q4_1
    }

    fn matmul_t(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> Result<()> {
        if !k.is_multiple_of(32) || lhs.len() != m * k || dst.len() < m * n {
            candle_core::bail!("q4_1 matmul: bad shapes ({m}, {k}, {n})");
        }
        let kb = k / 32;
        let weights = self.blocks();
        if weights.len() != n * kb {
            candle_core::bail!("q4_1 matmul: {} blocks for ({k}, {n})", weights.len());
        }
        // Activations quantized by candle's own Q8_1 code, as its scalar path does.
        let mut quantized = vec![BlockQ8_1::zeros(); m * kb];
        for row in 0..m {
            BlockQ8_1::from_float(
                &lhs[row * k..(row + 1) * k],
                &mut quantized[row * kb..(row + 1) * kb],
            );
        }
        // SAFETY: BlockQ8_1 and Q8_1 have the same repr(C) layout (asserted sizes).
        let acts: &[Q8_1] = unsafe {
            std::slice::from_raw_parts(quantized.as_ptr() as *const Q8_1, quantized.len())
        };
        let act_scales: Vec<f32> = acts.iter().map(|a| a.d.to_f32()).collect();
        let act_sums: Vec<f32> = acts.iter().map(|a| a.s.to_f32()).collect();
        let dst_addr = dst.as_mut_ptr() as usize;
        (0..n.div_ceil(STRIP)).into_par_iter().for_each(|strip| {
            let dst = dst_addr as *mut f32;
            for col in strip * STRIP..((strip + 1) * STRIP).min(n) {
                let range = col * kb..(col + 1) * kb;
                let w = WeightRow {
                    blocks: &weights[range.clone()],
                    scales: &self.scales[range.clone()],
                    mins: &self.mins[range],
                };
                for row in 0..m {
                    let range = row * kb..(row + 1) * kb;
                    let a = ActRow {
                        blocks: &acts[range.clone()],
                        scales: &act_scales[range.clone()],
                        sums: &act_sums[range],
                    };
                    let value = dot(&w, &a);
                    // SAFETY: each (row, col) is written by exactly one work item, in bounds.
                    unsafe { *dst.add(row * n + col) = value };
                }
            }
        });
        Ok(())
    }

    fn matmul_t_f16(&self, mkn: (usize, usize, usize), lhs: &[f16], dst: &mut [f16]) -> Result<()> {
        self.inner.matmul_t_f16(mkn, lhs, dst)
    }
    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
        self.inner.embedding(ids, rows, hidden)
    }
    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        self.inner.dequantize(elem_count)
    }
    fn storage_size_in_bytes(&self) -> usize {
        self.inner.storage_size_in_bytes()
    }
    fn as_ptr(&self) -> *const u8 {
        self.inner.as_ptr()
    }
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn from_float(&mut self, xs: &[f32]) {
        self.inner.from_float(xs)
    }
    fn from_float_imatrix(&mut self, xs: &[f32], imatrix_weights: &[f32], n_per_row: usize) {
        self.inner
            .from_float_imatrix(xs, imatrix_weights, n_per_row)
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Module, Tensor};

    #[test]
    fn matches_candles_scalar_q4_1_bit_for_bit() {
        if !FastQ4_1::available() {
            return;
        }
        let (m, k, n) = (5, 576, 19); // 18 blocks a row: two runs of 8 and a remainder
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let candle = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let fast = FastQ4_1::from_bytes(&q.data().unwrap()).unwrap();
        let fast = QTensor::new(QStorage::Cpu(Box::new(fast)), (n, k)).unwrap();
        let ours = QMatMul::from_qtensor(fast).unwrap().forward(&x).unwrap();
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            candle.to_vec2::<f32>().unwrap()
        );
        // Decode shape (one row) too.
        let x1 = x.narrow(0, 0, 1).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let candle1 = QMatMul::from_qtensor(q).unwrap().forward(&x1).unwrap();
        let ours1 = QMatMul::from_qtensor(
            QTensor::new(
                QStorage::Cpu(Box::new(
                    FastQ4_1::from_bytes(
                        &QTensor::quantize(&w, GgmlDType::Q4_1)
                            .unwrap()
                            .data()
                            .unwrap(),
                    )
                    .unwrap(),
                )),
                (n, k),
            )
            .unwrap(),
        )
        .unwrap()
        .forward(&x1)
        .unwrap();
        assert_eq!(
            ours1.to_vec2::<f32>().unwrap(),
            candle1.to_vec2::<f32>().unwrap()
        );
        let _ = block_sum_scalar;
    }
}
