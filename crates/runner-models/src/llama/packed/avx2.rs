//! The AVX2 kernel, for x86 CPUs without AVX-512 VNNI (AMD before Zen 4, Intel's client
//! CPUs since Alder Lake, older Xeons): `vpmaddubsw` (u8 × i8, summed in pairs to i16) and
//! `vpmaddwd` (to i32), 32 byte pairs per instruction.
//!
//! Its results are bit-identical to the AVX-512 kernel's, so a model gives the same tokens
//! on either CPU: each i32 lane sums the same four products as a `vpdpbusd` lane, a
//! block's eight lanes are scaled and accumulated apart from the other block's (AVX-512's
//! lanes 0..8 and 8..16), and the lanes are summed in [`sum_lanes`]'s order.
//!
//! `vpmaddubsw` saturates at ±32767: out of reach for Q4_1 (15 × 127 × 2), within reach of
//! Q8_0's `q + 128` (255 × 127 × 2). So Q8_0 goes the way llama.cpp's does, as
//! `|q_w| × (q × sign q_w)`: at most 128 × 127 × 2.
//!
//! Two accumulators per row and column (one per block) fill AVX2's 16 registers quickly:
//! prompts run register tiles of 4 rows × 1 column (a tile's scratch holds 4 columns; 4 × 1,
//! 1 × 4, 2 × 2 and 2 × 1 measured within 10 % of each other), generation's single row takes
//! all 4 columns at once.

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{
    for_each_strip, pair_bytes, sum_lanes, write_tile, Activations, PackedMatrix, BLOCK,
    PREFETCH_AHEAD, STRIP, TILE_COLS, TILE_ROWS,
};

/// Activation rows per register tile on prompts.
const ROWS: usize = 4;
/// Columns per register tile on prompts.
const COLS: usize = 1;

impl PackedMatrix {
    /// `vnni`: the integer sums by AVX-VNNI's `vpdpbusd` (256-bit, VEX) instead of
    /// `vpmaddubsw` + `vpmaddwd`; the same sums, so the same results.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matmul_avx2(&self, m: usize, lhs: &[f32], dst: &mut [f32], vnni: bool) {
        let acts = quantize_rows(lhs, m, self.blocks, self.pairs);
        let dst_addr = dst.as_mut_ptr() as usize;
        // A single row reads the packed weights directly: no scratch.
        let scratch_pairs = if m == 1 { 0 } else { self.pairs };
        for_each_strip(
            self,
            m,
            || Scratch::new(scratch_pairs),
            |scratch, strip| {
                let dst = dst_addr as *mut f32;
                // SAFETY: each strip writes only its own columns of dst, in bounds; `vnni`
                // only where the CPU has AVX-VNNI (`Kernel::AvxVnni`).
                unsafe {
                    if vnni {
                        self.strip_avxvnni(strip, m, &acts, dst, scratch)
                    } else {
                        self.strip_avx2(strip, m, &acts, dst, scratch)
                    }
                }
            },
        );
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn strip_avx2(
        &self,
        strip: usize,
        m: usize,
        acts: &Activations,
        dst: *mut f32,
        scratch: &mut Scratch,
    ) {
        self.strip::<false>(strip, m, acts, dst, scratch)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn strip_avxvnni(
        &self,
        strip: usize,
        m: usize,
        acts: &Activations,
        dst: *mut f32,
        scratch: &mut Scratch,
    ) {
        self.strip::<true>(strip, m, acts, dst, scratch)
    }

    /// Columns `16 × strip ..` for every row: the tiles, then (Q4_1) the minimums' sum.
    /// Everything below is inlined into [`Self::strip_avx2`] or [`Self::strip_avxvnni`], so
    /// it is compiled with that function's instructions and no others (no AVX-VNNI
    /// instruction can reach the plain AVX2 path).
    #[inline(always)]
    unsafe fn strip<const VNNI: bool>(
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
            let mut out = [[0f32; TILE_COLS]; TILE_ROWS];
            if m == 1 {
                // Generation: unpacking into scratch would cost more than the products it
                // feeds, so the tile reads the packed weights itself.
                if q4 {
                    self.tile_packed_avx2::<true, VNNI>(tile_index, acts, &mut out[0]);
                } else {
                    self.tile_packed_avx2::<false, VNNI>(tile_index, acts, &mut out[0]);
                }
                write_tile(&out, dst, n, 0, 1, tile_first, cols);
                continue;
            }
            self.unpack_tile_avx2(tile_index, scratch);
            let mut row = 0;
            while row < m {
                let rows = ROWS.min(m - row);
                for col in (0..TILE_COLS).step_by(COLS) {
                    let pairs = self.pairs;
                    if q4 {
                        tile_rows::<true, VNNI>(rows, pairs, scratch, acts, row, col, &mut out);
                    } else {
                        tile_rows::<false, VNNI>(rows, pairs, scratch, acts, row, col, &mut out);
                    }
                }
                write_tile(&out, dst, n, row, rows, tile_first, cols);
                row += rows;
            }
        }
        if !q4 {
            return;
        }
        // Σ_b min × d8 × Σq for the strip's 16 columns, 8 at a time: the AVX-512 kernel's
        // arithmetic, lane for lane.
        let n_padded = n.div_ceil(STRIP) * STRIP;
        for row in 0..m {
            let mut sum = [_mm256_setzero_ps(); 2];
            let sums = acts.sums.as_ptr().add(row * self.pairs * 2);
            for b in 0..self.blocks {
                let d8_sum = _mm256_set1_ps(*sums.add(b));
                for (half, sum) in sum.iter_mut().enumerate() {
                    let mins = self.mins_t.as_ptr().add(b * n_padded + first + 8 * half);
                    let mins = _mm256_cvtph_ps(_mm_loadu_si128(mins as *const __m128i));
                    *sum = _mm256_fmadd_ps(mins, d8_sum, *sum);
                }
            }
            let mut lanes = [0f32; STRIP];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), sum[1]);
            let out = dst.add(row * n + first);
            for (c, lane) in lanes.iter().enumerate().take(width) {
                *out.add(c) += lane;
            }
        }
    }

    /// One activation row × one 4-column tile, straight from the packed weights.
    #[inline(always)]
    unsafe fn tile_packed_avx2<const Q4: bool, const VNNI: bool>(
        &self,
        tile_index: usize,
        acts: &Activations,
        out: &mut [f32; TILE_COLS],
    ) {
        let pairs = self.pairs;
        let pair_bytes = if Q4 { 32 } else { 64 };
        let mut acc = [[[_mm256_setzero_ps(); 2]; 1]; TILE_COLS];
        let packed = self
            .packed
            .as_ptr()
            .add(tile_index * pairs * TILE_COLS * pair_bytes);
        let scales = self.scales.as_ptr().add(tile_index * pairs * TILE_COLS * 2);
        for p in 0..pairs {
            // As in the AVX-512 kernel: fetch ahead of the hardware prefetcher, which stops
            // at each 4 KiB page.
            let ahead = packed.wrapping_add((p * TILE_COLS) * pair_bytes + PREFETCH_AHEAD);
            for line in (0..TILE_COLS * pair_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
            }
            let mut eight = [0f32; 8];
            _mm256_storeu_ps(
                eight.as_mut_ptr(),
                _mm256_cvtph_ps(_mm_loadu_si128(
                    scales.add(p * TILE_COLS * 2) as *const __m128i
                )),
            );
            for (c, acc) in acc.iter_mut().enumerate() {
                let w = pair_values::<Q4>(packed.add((p * TILE_COLS + c) * pair_bytes));
                let ws = [
                    _mm256_set1_ps(eight[2 * c]),
                    _mm256_set1_ps(eight[2 * c + 1]),
                ];
                accumulate::<1, Q4, VNNI>(acc, w, ws, acts, 0, pairs, p);
            }
        }
        for (o, acc) in out.iter_mut().zip(&acc) {
            *o = sum_lanes(acc[0][0], acc[0][1]);
        }
    }

    /// Expands one tile into `scratch`: 64 weight bytes (as [`pair_values`] gives them) and
    /// both blocks' scales per column and pair.
    #[inline(always)]
    unsafe fn unpack_tile_avx2(&self, tile_index: usize, scratch: &mut Scratch) {
        let pairs = self.pairs;
        let pair_bytes = pair_bytes(self.dtype);
        let q4 = self.dtype == GgmlDType::Q4_1;
        let packed = self
            .packed
            .as_ptr()
            .add(tile_index * pairs * TILE_COLS * pair_bytes);
        let scales = self.scales.as_ptr().add(tile_index * pairs * TILE_COLS * 2);
        for p in 0..pairs {
            for c in 0..TILE_COLS {
                let slot = p * TILE_COLS + c;
                let src = packed.add(slot * pair_bytes);
                let w = if q4 {
                    pair_values::<true>(src)
                } else {
                    pair_values::<false>(src)
                };
                let at = c * pairs + p;
                let values = scratch.values.as_mut_ptr().add(at * 64) as *mut __m256i;
                _mm256_storeu_si256(values, w[0]);
                _mm256_storeu_si256(values.add(1), w[1]);
                scratch.scales[at * 2] = (*scales.add(slot * 2)).to_f32();
                scratch.scales[at * 2 + 1] = (*scales.add(slot * 2 + 1)).to_f32();
            }
        }
    }
}

/// One column's pair of blocks at `src`, 32 bytes per block: Q4_1's nibbles (`u`, low
/// nibbles the first block, high the second), or Q8_0's `q` (signed again).
#[inline(always)]
unsafe fn pair_values<const Q4: bool>(src: *const u8) -> [__m256i; 2] {
    if Q4 {
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let x = _mm256_loadu_si256(src as *const __m256i);
        [
            _mm256_and_si256(x, low_nibbles),
            _mm256_and_si256(_mm256_srli_epi16(x, 4), low_nibbles),
        ]
    } else {
        let bias = _mm256_set1_epi8(-128);
        let src = src as *const __m256i;
        [
            _mm256_xor_si256(_mm256_loadu_si256(src), bias),
            _mm256_xor_si256(_mm256_loadu_si256(src.add(1)), bias),
        ]
    }
}

/// One work item's expanded weight tile, reused across its strips.
struct Scratch {
    values: Vec<u8>,
    /// Per column, per pair: both blocks' scales.
    scales: Vec<f32>,
}

impl Scratch {
    fn new(pairs: usize) -> Self {
        Self {
            values: vec![0; TILE_COLS * pairs * 64],
            scales: vec![0.0; TILE_COLS * pairs * 2],
        }
    }
}

/// [`tile`] for `rows` (1 to 4) activation rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<const Q4: bool, const VNNI: bool>(
    rows: usize,
    pairs: usize,
    scratch: &Scratch,
    acts: &Activations,
    row: usize,
    col: usize,
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    match rows {
        4 => tile::<4, Q4, VNNI>(pairs, scratch, acts, row, col, out),
        3 => tile::<3, Q4, VNNI>(pairs, scratch, acts, row, col, out),
        2 => tile::<2, Q4, VNNI>(pairs, scratch, acts, row, col, out),
        _ => tile::<1, Q4, VNNI>(pairs, scratch, acts, row, col, out),
    }
}

/// `R` activation rows from `row` × the tile's columns `col..col + COLS` in `scratch`, into
/// `out`.
#[inline(always)]
unsafe fn tile<const R: usize, const Q4: bool, const VNNI: bool>(
    pairs: usize,
    scratch: &Scratch,
    acts: &Activations,
    row: usize,
    col: usize,
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; R]; COLS];
    let values = scratch.values.as_ptr();
    let scales = scratch.scales.as_ptr();
    for p in 0..pairs {
        for (c, acc) in acc.iter_mut().enumerate() {
            let at = (col + c) * pairs + p;
            let src = values.add(at * 64) as *const __m256i;
            let w = [_mm256_loadu_si256(src), _mm256_loadu_si256(src.add(1))];
            let ws = [
                _mm256_broadcast_ss(&*scales.add(at * 2)),
                _mm256_broadcast_ss(&*scales.add(at * 2 + 1)),
            ];
            accumulate::<R, Q4, VNNI>(acc, w, ws, acts, row, pairs, p);
        }
    }
    for (c, acc) in acc.iter().enumerate() {
        for (r, acc) in acc.iter().enumerate() {
            out[r][col + c] = sum_lanes(acc[0], acc[1]);
        }
    }
}

/// Adds pair `p` of activation rows `row..row + R` times one column (`w` as
/// [`pair_values`] gives it, its blocks' scales broadcast in `ws`) to that column's
/// accumulators, a pair per block: per lane, `fma(Σ of 4 products, scale × d8, acc)`.
#[inline(always)]
unsafe fn accumulate<const R: usize, const Q4: bool, const VNNI: bool>(
    acc: &mut [[__m256; 2]; R],
    w: [__m256i; 2],
    ws: [__m256; 2],
    acts: &Activations,
    row: usize,
    pairs: usize,
    p: usize,
) {
    let ones = _mm256_set1_epi16(1);
    // Q8_0: |q_w| as the unsigned operand (−128 reads as 128), its sign moved onto q.
    let u = if Q4 {
        w
    } else {
        [_mm256_sign_epi8(w[0], w[0]), _mm256_sign_epi8(w[1], w[1])]
    };
    for (r, acc) in acc.iter_mut().enumerate() {
        let at = (row + r) * pairs + p;
        let a = acts.values.as_ptr().add(at * 64) as *const __m256i;
        let d8 = acts.scales.as_ptr().add(at * 2);
        for block in 0..2 {
            let mut a = _mm256_loadu_si256(a.add(block));
            if !Q4 {
                a = _mm256_sign_epi8(a, w[block]);
            }
            // Four products per i32 lane either way (a `vpdpbusd` lane's four).
            let sums = if VNNI {
                _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u[block], a)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(u[block], a), ones)
            };
            let scale = _mm256_mul_ps(ws[block], _mm256_broadcast_ss(&*d8.add(block)));
            acc[block] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[block]);
        }
    }
}

/// Quantizes each row per 32-value block exactly as the AVX-512 kernel (and candle's and
/// llama.cpp's Q8 code) does: `d8 = max|x| / 127` (kept as f16), `q = round(x / d8)` half
/// away from zero.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_rows(lhs: &[f32], m: usize, blocks: usize, pairs: usize) -> Activations {
    let k = blocks * BLOCK;
    let mut acts = Activations {
        values: vec![0; m * pairs * 64],
        scales: vec![0.0; m * pairs * 2],
        sums: vec![0.0; m * pairs * 2],
        corrections: Vec::new(),
    };
    let sign_bit = _mm256_set1_ps(-0.0);
    let one = _mm256_set1_ps(1.0);
    let half = _mm256_set1_ps(0.5);
    // After the two packs, 4-byte groups sit in the order 0 4 1 5 2 6 3 7.
    let unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for row in 0..m {
        for b in 0..blocks {
            let x = lhs.as_ptr().add(row * k + b * BLOCK);
            let xs = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(x.add(i)));
            let amax = xs.iter().fold(_mm256_setzero_ps(), |m, &v| {
                _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, v))
            });
            let amax = {
                let x = _mm_max_ps(
                    _mm256_castps256_ps128(amax),
                    _mm256_extractf128_ps::<1>(amax),
                );
                let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
                _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps::<1>(x, x)))
            };
            let d = amax / 127.0;
            let inverse = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q = xs.map(|x| {
                let v = _mm256_mul_ps(x, inverse);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                let away = _mm256_cmp_ps::<_CMP_GE_OQ>(
                    _mm256_andnot_ps(sign_bit, _mm256_sub_ps(v, t)),
                    half,
                );
                let signed_one = _mm256_or_ps(one, _mm256_and_ps(v, sign_bit));
                _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, signed_one)))
            });
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, unshuffle);
            let out = acts.values.as_mut_ptr().add(row * pairs * 64 + b * BLOCK);
            _mm256_storeu_si256(out as *mut __m256i, bytes);
            let total =
                _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let total = {
                let x = _mm_add_epi32(
                    _mm256_castsi256_si128(total),
                    _mm256_extracti128_si256::<1>(total),
                );
                let x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
                _mm_cvtsi128_si32(_mm_add_epi32(x, _mm_shuffle_epi32::<1>(x)))
            };
            let d8 = f16::from_f32(d).to_f32();
            acts.sums[row * pairs * 2 + b] = d8 * total as f32;
            acts.scales[row * pairs * 2 + b] = d8;
        }
    }
    acts
}
