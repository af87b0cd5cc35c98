//! The AVX-512 VNNI kernel: `vpdpbusd` on 64 byte pairs per instruction, in register tiles
//! of up to 4 activation rows × 4 weight columns.

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{
    for_each_strip, pair_bytes, sum_lanes, write_tile, Activations, PackedMatrix, BLOCK,
    PREFETCH_AHEAD, STRIP, TILE_COLS, TILE_ROWS,
};

impl PackedMatrix {
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn matmul_avx512(&self, m: usize, lhs: &[f32], dst: &mut [f32]) {
        let acts = quantize_rows(lhs, m, self.blocks, self.pairs, self.dtype);
        let dst_addr = dst.as_mut_ptr() as usize;
        // Fewer rows than a tile read the packed weights directly: no scratch.
        let scratch_pairs = if m < TILE_ROWS { 0 } else { self.pairs };
        for_each_strip(
            self,
            m,
            || Scratch::new(scratch_pairs),
            |scratch, strip| {
                // SAFETY: each strip writes only its own columns of dst, in bounds.
                unsafe { self.strip_avx512(strip, m, &acts, dst_addr as *mut f32, scratch) }
            },
        );
    }

    /// Columns `16 × strip ..` for every row: the tiles, then (Q4_1) the minimums' sum.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn strip_avx512(
        &self,
        strip: usize,
        m: usize,
        acts: &Activations,
        dst: *mut f32,
        scratch: &mut Scratch,
    ) {
        let n = self.n;
        let first = strip * STRIP;
        let width = STRIP.min(n - first);
        let q4 = self.dtype == GgmlDType::Q4_1;
        for tile_first in (first..first + width).step_by(TILE_COLS) {
            let cols = TILE_COLS.min(first + width - tile_first);
            let tile_index = tile_first / TILE_COLS;
            let mut row = 0;
            if m < TILE_ROWS {
                // Generation (one row): unpacking into scratch would cost more than the
                // products it feeds, so the tile reads the packed weights itself.
                let mut out = [[0f32; TILE_COLS]; TILE_ROWS];
                match (m, q4) {
                    (1, true) => self.tile_packed::<1, true>(tile_index, acts, &mut out),
                    (1, false) => self.tile_packed::<1, false>(tile_index, acts, &mut out),
                    (2, true) => self.tile_packed::<2, true>(tile_index, acts, &mut out),
                    (2, false) => self.tile_packed::<2, false>(tile_index, acts, &mut out),
                    (_, true) => self.tile_packed::<3, true>(tile_index, acts, &mut out),
                    (_, false) => self.tile_packed::<3, false>(tile_index, acts, &mut out),
                }
                write_tile(&out, dst, n, 0, m, tile_first, cols);
                continue;
            }
            self.unpack_tile(tile_index, scratch);
            while row < m {
                let rows = TILE_ROWS.min(m - row);
                let mut out = [[0f32; TILE_COLS]; TILE_ROWS];
                match (rows, q4) {
                    (4, true) => tile::<4, true>(self.pairs, scratch, acts, row, &mut out),
                    (4, false) => tile::<4, false>(self.pairs, scratch, acts, row, &mut out),
                    (3, true) => tile::<3, true>(self.pairs, scratch, acts, row, &mut out),
                    (3, false) => tile::<3, false>(self.pairs, scratch, acts, row, &mut out),
                    (2, true) => tile::<2, true>(self.pairs, scratch, acts, row, &mut out),
                    (2, false) => tile::<2, false>(self.pairs, scratch, acts, row, &mut out),
                    (_, true) => tile::<1, true>(self.pairs, scratch, acts, row, &mut out),
                    (_, false) => tile::<1, false>(self.pairs, scratch, acts, row, &mut out),
                }
                write_tile(&out, dst, n, row, rows, tile_first, cols);
                row += rows;
            }
        }
        if !q4 {
            return;
        }
        // Σ_b min × d8 × Σq for the strip's 16 columns at once.
        let n_padded = n.div_ceil(STRIP) * STRIP;
        let mask: __mmask16 = if width == STRIP {
            0xFFFF
        } else {
            (1u16 << width) - 1
        };
        for row in 0..m {
            let mut sum = _mm512_setzero_ps();
            let sums = acts.sums.as_ptr().add(row * self.pairs * 2);
            for b in 0..self.blocks {
                let mins = self.mins_t.as_ptr().add(b * n_padded + first);
                let mins = _mm512_cvtph_ps(_mm256_loadu_si256(mins as *const __m256i));
                sum = _mm512_fmadd_ps(mins, _mm512_set1_ps(*sums.add(b)), sum);
            }
            let out = dst.add(row * n + first);
            let before = _mm512_maskz_loadu_ps(mask, out);
            _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(before, sum));
        }
    }

    /// `R` (< 4) activation rows × one 4-column tile, straight from the packed weights:
    /// what [`tile`] computes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_packed<const R: usize, const Q4: bool>(
        &self,
        tile_index: usize,
        acts: &Activations,
        out: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        let pairs = self.pairs;
        let pair_bytes = if Q4 { 32 } else { 64 };
        let zero = _mm512_setzero_si512();
        let spread = scale_spreads();
        let mut acc = [[_mm512_setzero_ps(); TILE_COLS]; R];
        let packed = self
            .packed
            .as_ptr()
            .add(tile_index * pairs * TILE_COLS * pair_bytes);
        let scales = self.scales.as_ptr().add(tile_index * pairs * TILE_COLS * 2);
        for p in 0..pairs {
            // The tiles a thread reads follow each other in memory: fetch ahead of the
            // hardware prefetcher, which stops at each 4 KiB page.
            let ahead = packed.wrapping_add((p * TILE_COLS) * pair_bytes + PREFETCH_AHEAD);
            for line in (0..TILE_COLS * pair_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
            }
            let mut w = [zero; TILE_COLS];
            for (c, w) in w.iter_mut().enumerate() {
                *w = pair_values(packed.add((p * TILE_COLS + c) * pair_bytes), Q4);
            }
            let eight = tile_scales(scales, p);
            let ws = spread.map(|s| _mm512_permutexvar_ps(s, eight));
            accumulate_pair::<R, Q4>(&mut acc, &w, &ws, acts, 0, pairs, p);
        }
        reduce_tile(&acc, out);
    }

    /// Expands one tile into `scratch`: 64 `u` bytes and 16 scale lanes per column and pair.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn unpack_tile(&self, tile_index: usize, scratch: &mut Scratch) {
        let pairs = self.pairs;
        let pair_bytes = pair_bytes(self.dtype);
        let q4 = self.dtype == GgmlDType::Q4_1;
        let spread = scale_spreads();
        let packed = self
            .packed
            .as_ptr()
            .add(tile_index * pairs * TILE_COLS * pair_bytes);
        let scales = self.scales.as_ptr().add(tile_index * pairs * TILE_COLS * 2);
        for p in 0..pairs {
            let eight = tile_scales(scales, p);
            for (c, spread) in spread.iter().enumerate() {
                let values = pair_values(packed.add((p * TILE_COLS + c) * pair_bytes), q4);
                let at = (c * pairs + p) * 16;
                _mm512_storeu_si512(
                    scratch.values.as_mut_ptr().add(at * 4) as *mut __m512i,
                    values,
                );
                _mm512_storeu_ps(
                    scratch.scales.as_mut_ptr().add(at),
                    _mm512_permutexvar_ps(*spread, eight),
                );
            }
        }
    }
}

/// One column's pair of blocks at `src` as 64 `u` bytes: Q4_1's 32 packed bytes split into
/// low nibbles (first block) and high nibbles (second), or Q8_0's 64 bytes as they are.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn pair_values(src: *const u8, q4: bool) -> __m512i {
    if q4 {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let x = _mm256_loadu_si256(src as *const __m256i);
        let low = _mm256_and_si256(x, low_nibbles);
        let high = _mm256_and_si256(_mm256_srli_epi16(x, 4), low_nibbles);
        _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1)
    } else {
        _mm512_loadu_si512(src as *const __m512i)
    }
}

/// A tile's eight scales (4 columns × 2 blocks) of pair `p`, as f32 in the low lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile_scales(scales: *const f16, p: usize) -> __m512 {
    _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(
        scales.add(p * TILE_COLS * 2) as *const __m128i,
    )))
}

/// For each column `c` of a tile: the permutation that spreads its two scales (positions
/// `2c` and `2c + 1` of the tile's eight) over lanes 0..8 and 8..16.
#[target_feature(enable = "avx512f")]
fn scale_spreads() -> [__m512i; TILE_COLS] {
    [0, 1, 2, 3].map(|c| {
        let (a, b) = (2 * c, 2 * c + 1);
        _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
    })
}

/// One work item's expanded weight tile, reused across its strips.
struct Scratch {
    values: Vec<u8>,
    scales: Vec<f32>,
}

impl Scratch {
    fn new(pairs: usize) -> Self {
        Self {
            values: vec![0; TILE_COLS * pairs * 64],
            scales: vec![0.0; TILE_COLS * pairs * 16],
        }
    }
}

/// `R` activation rows from `row` × the 4 columns in `scratch`: Σ_b scale × d8 × Σ(u × q)
/// (for Q8_0, with `u − 128`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize, const Q4: bool>(
    pairs: usize,
    scratch: &Scratch,
    acts: &Activations,
    row: usize,
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    let mut acc = [[_mm512_setzero_ps(); TILE_COLS]; R];
    let zero = _mm512_setzero_si512();
    let values = scratch.values.as_ptr();
    let scales = scratch.scales.as_ptr();
    for p in 0..pairs {
        let mut w = [zero; TILE_COLS];
        let mut ws = [_mm512_setzero_ps(); TILE_COLS];
        for c in 0..TILE_COLS {
            w[c] = _mm512_loadu_si512(values.add((c * pairs + p) * 64) as *const __m512i);
            ws[c] = _mm512_loadu_ps(scales.add((c * pairs + p) * 16));
        }
        accumulate_pair::<R, Q4>(&mut acc, &w, &ws, acts, row, pairs, p);
    }
    reduce_tile(&acc, out);
}

/// Adds pair `p` of activation rows `row..row + R` times the tile's 4 columns (`u` in `w`,
/// scales spread in `ws`) to `acc`: `vpdpbusd` (from `−128 Σq` for Q8_0), then
/// `scale × d8 ×` the sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_pair<const R: usize, const Q4: bool>(
    acc: &mut [[__m512; TILE_COLS]; R],
    w: &[__m512i; TILE_COLS],
    ws: &[__m512; TILE_COLS],
    acts: &Activations,
    row: usize,
    pairs: usize,
    p: usize,
) {
    for (r, acc) in acc.iter_mut().enumerate() {
        let at = ((row + r) * pairs + p) * 16;
        let a = _mm512_loadu_si512(acts.values.as_ptr().add(at * 4) as *const __m512i);
        let d8 = _mm512_loadu_ps(acts.scales.as_ptr().add(at));
        let start = if Q4 {
            _mm512_setzero_si512()
        } else {
            _mm512_loadu_si512(acts.corrections.as_ptr().add(at) as *const __m512i)
        };
        for c in 0..TILE_COLS {
            let sums = _mm512_dpbusd_epi32(start, w[c], a);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(ws[c], d8), acc[c]);
        }
    }
}

/// Each accumulator's 16 lanes summed into `out`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce_tile<const R: usize>(
    acc: &[[__m512; TILE_COLS]; R],
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    for r in 0..R {
        for c in 0..TILE_COLS {
            out[r][c] = sum_512(acc[r][c]);
        }
    }
}

/// `v`'s 16 lanes summed in [`sum_lanes`]'s order.
#[target_feature(enable = "avx512f")]
#[inline]
pub(in crate::llama) unsafe fn sum_512(v: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    sum_lanes(_mm512_castps512_ps256(v), hi)
}

/// Quantizes each row per 32-value block as candle's and llama.cpp's Q8 code does:
/// `d8 = max|x| / 127` (kept as f16), `q = round(x / d8)` half away from zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantize_rows(
    lhs: &[f32],
    m: usize,
    blocks: usize,
    pairs: usize,
    weights: GgmlDType,
) -> Activations {
    let k = blocks * BLOCK;
    let mut acts = Activations {
        values: vec![0; m * pairs * 64],
        scales: vec![0.0; m * pairs * 16],
        sums: vec![0.0; m * pairs * 2],
        corrections: Vec::new(),
    };
    let sign_bit = _mm512_set1_epi32(i32::MIN);
    let one = _mm512_set1_ps(1.0);
    let half = _mm512_set1_ps(0.5);
    for row in 0..m {
        for b in 0..blocks {
            let x = lhs.as_ptr().add(row * k + b * BLOCK);
            let x0 = _mm512_loadu_ps(x);
            let x1 = _mm512_loadu_ps(x.add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            let d = amax / 127.0;
            let inverse = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let round = |x: __m512| {
                let v = _mm512_mul_ps(x, inverse);
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                let away =
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(v, t)), half);
                let signed_one = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_castps_si512(one),
                    _mm512_and_si512(_mm512_castps_si512(v), sign_bit),
                ));
                _mm512_cvtps_epi32(_mm512_mask_add_ps(t, away, t, signed_one))
            };
            let (q0, q1) = (round(x0), round(x1));
            let out = acts.values.as_mut_ptr().add(row * pairs * 64 + b * BLOCK);
            _mm_storeu_si128(out as *mut __m128i, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(out.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
            let d8 = f16::from_f32(d).to_f32();
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            acts.sums[row * pairs * 2 + b] = d8 * sum as f32;
            let lanes = &mut acts.scales[row * pairs * 16 + (b / 2) * 16 + (b % 2) * 8..][..8];
            lanes.fill(d8);
        }
    }
    if weights == GgmlDType::Q8_0 {
        // −128 × the sum of each lane's four activations: vpdpbusd with 128 as the weight.
        let weight_128 = _mm512_set1_epi8(-128);
        acts.corrections = vec![0; m * pairs * 16];
        for at in (0..m * pairs * 16).step_by(16) {
            let a = _mm512_loadu_si512(acts.values.as_ptr().add(at * 4) as *const __m512i);
            let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weight_128, a);
            _mm512_storeu_si512(
                acts.corrections.as_mut_ptr().add(at) as *mut __m512i,
                _mm512_sub_epi32(_mm512_setzero_si512(), lanes),
            );
        }
    }
    acts
}
