//! Q4_1 and Q8_0 matrix products with AVX-512 VNNI, as a candle `QuantizedType`.
//!
//! Both weight types are written as `scale × u + min` with `u` an unsigned byte: Q4_1 is
//! that already (`u` = the nibble), Q8_0 is `d × (u − 128)`. The activations are quantized
//! per 32-value block to signed bytes (`d8 × q`), as llama.cpp and candle do, so one output is
//!
//! `Σ_blocks scale × d8 × Σ(u × q)  +  Σ_blocks min × d8 × Σq`.
//!
//! The integer sums run in `vpdpbusd` (u8 × i8, 64 pairs per instruction, two blocks per
//! register), in register tiles of up to 4 activation rows × 4 weight columns, so each load
//! feeds several products. For Q8_0 the `−128 Σq` goes into the integer sum (exact); for Q4_1
//! the minimums' sum is a small float matrix product over 16 columns at a time.
//!
//! Generation reads every weight once per token, so the layout is built for streaming: at
//! load the blocks are repacked so that each 4-column tile is one contiguous run (the `u` of
//! two blocks per 32 or 64 bytes, then the tile's f16 scales), no larger than the GGUF's.
//!
//! The float sums are in a different order than candle's scalar code (and llama.cpp's), so
//! results differ from both in the last bits; `tests` bounds the error against exact
//! arithmetic on the same quantized values.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QStorage, QuantizedType};
use candle_core::{CpuStorage, Device, Result};
use half::f16;
use rayon::prelude::*;

/// Values per quantization block (Q4_1, Q8_0, Q8_1).
const BLOCK: usize = 32;
/// Columns per parallel work item: one register of minimums.
const STRIP: usize = 16;
/// Weight columns per register tile.
const TILE_COLS: usize = 4;
/// Activation rows per register tile.
const TILE_ROWS: usize = 4;
/// How far ahead of the weights being read generation prefetches, in bytes.
const PREFETCH_AHEAD: usize = 4096;

pub struct VnniMatrix {
    dtype: GgmlDType,
    /// Output columns (rows of the weight matrix).
    n: usize,
    /// Blocks per weight row, and block pairs (the last pair padded with a zero block).
    blocks: usize,
    pairs: usize,
    /// Per tile of 4 columns, per pair, per column: the `u` of both blocks. Q4_1: 32 bytes,
    /// the first block's value `j` in the low nibble of byte `j`, the second block's in the
    /// high nibble. Q8_0: 64 bytes, `q + 128`. Columns past `n` are zeros.
    packed: Vec<u8>,
    /// Per tile, per pair, per column: both blocks' scales (8 values, 16 bytes).
    scales: Vec<f16>,
    /// Q4_1 only: per block (`2 × pairs`), per column (padded to a multiple of 16): the
    /// minimum.
    mins_t: Vec<f16>,
    /// candle's own storage of the same blocks, rebuilt on first use, for the operations
    /// other than `matmul_t` (nothing on the generation path uses them).
    original: OnceLock<Box<dyn QuantizedType>>,
}

impl VnniMatrix {
    /// Whether this CPU runs the kernel.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether the kernel handles this weight type.
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
    }

    /// From the raw blocks of an `n × k` matrix (`k` a multiple of 32), as a GGUF holds them.
    pub fn from_bytes(dtype: GgmlDType, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let block_bytes = match dtype {
            GgmlDType::Q4_1 => 20,
            GgmlDType::Q8_0 => 34,
            other => candle_core::bail!("the AVX-512 kernel does not handle {other:?}"),
        };
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * (k / BLOCK) * block_bytes {
            candle_core::bail!(
                "{dtype:?} matrix of {n} × {k}: {} bytes does not match",
                bytes.len()
            );
        }
        let blocks = k / BLOCK;
        let pairs = blocks.div_ceil(2);
        let tiles = n.div_ceil(TILE_COLS);
        let n_padded = n.div_ceil(STRIP) * STRIP;
        let pair_bytes = pair_bytes(dtype);
        let mut packed = vec![0u8; tiles * pairs * TILE_COLS * pair_bytes];
        let mut scales = vec![f16::ZERO; tiles * pairs * TILE_COLS * 2];
        let mut mins_t = if dtype == GgmlDType::Q4_1 {
            vec![f16::ZERO; pairs * 2 * n_padded]
        } else {
            Vec::new()
        };
        let f16_at = |at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]);
        for col in 0..n {
            for b in 0..blocks {
                let at = (col * blocks + b) * block_bytes;
                let (slot, second) = (slot(col, b / 2, pairs), b % 2);
                let out = &mut packed[slot * pair_bytes..][..pair_bytes];
                scales[slot * 2 + second] = f16_at(at);
                if dtype == GgmlDType::Q4_1 {
                    mins_t[b * n_padded + col] = f16_at(at + 2);
                    let qs = &bytes[at + 4..at + 20];
                    for j in 0..BLOCK {
                        let u = if j < 16 {
                            qs[j] & 0x0F
                        } else {
                            qs[j - 16] >> 4
                        };
                        out[j] |= u << (4 * second);
                    }
                } else {
                    for j in 0..BLOCK {
                        let q = bytes[at + 2 + j] as i8;
                        out[second * BLOCK + j] = (q as i16 + 128) as u8;
                    }
                }
            }
        }
        Ok(Self {
            dtype,
            n,
            blocks,
            pairs,
            packed,
            scales,
            mins_t,
            original: OnceLock::new(),
        })
    }

    /// Output columns.
    pub fn columns(&self) -> usize {
        self.n
    }

    /// `dst (m × n) = lhs (m × k) × selfᵀ`.
    pub fn product(&self, m: usize, lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        self.matmul_t((m, self.blocks * BLOCK, self.n), lhs, dst)
    }

    /// Weight row `col` in f32 (an embedding lookup), as candle dequantizes it.
    pub fn dequantize_row(&self, col: usize, out: &mut [f32]) {
        let pair_bytes = pair_bytes(self.dtype);
        let n_padded = self.n.div_ceil(STRIP) * STRIP;
        for b in 0..self.blocks.min(out.len() / BLOCK) {
            let (slot, second) = (slot(col, b / 2, self.pairs), b % 2);
            let packed = &self.packed[slot * pair_bytes..][..pair_bytes];
            let scale = self.scales[slot * 2 + second].to_f32();
            let out = &mut out[b * BLOCK..][..BLOCK];
            if self.dtype == GgmlDType::Q4_1 {
                let min = self.mins_t[b * n_padded + col].to_f32();
                for (j, o) in out.iter_mut().enumerate() {
                    *o = ((packed[j] >> (4 * second)) & 0x0F) as f32 * scale + min;
                }
            } else {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = (packed[second * BLOCK + j] as i16 - 128) as f32 * scale;
                }
            }
        }
    }

    /// The blocks in GGUF layout again (exactly: every field round-trips).
    fn original_bytes(&self) -> Vec<u8> {
        let pair_bytes = pair_bytes(self.dtype);
        let n_padded = self.n.div_ceil(STRIP) * STRIP;
        let mut out = Vec::with_capacity(self.n * self.blocks * 34);
        for col in 0..self.n {
            for b in 0..self.blocks {
                let (slot, second) = (slot(col, b / 2, self.pairs), b % 2);
                let packed = &self.packed[slot * pair_bytes..][..pair_bytes];
                out.extend_from_slice(&self.scales[slot * 2 + second].to_le_bytes());
                if self.dtype == GgmlDType::Q4_1 {
                    out.extend_from_slice(&self.mins_t[b * n_padded + col].to_le_bytes());
                    for j in 0..16 {
                        let low = (packed[j] >> (4 * second)) & 0x0F;
                        let high = (packed[j + 16] >> (4 * second)) & 0x0F;
                        out.push(low | (high << 4));
                    }
                } else {
                    for j in 0..BLOCK {
                        out.push((packed[second * BLOCK + j] as i16 - 128) as i8 as u8);
                    }
                }
            }
        }
        out
    }

    /// candle's storage of these blocks, built from them.
    fn rebuilt_original(&self) -> Box<dyn QuantizedType> {
        match QStorage::from_data(Cow::Owned(self.original_bytes()), &Device::Cpu, self.dtype) {
            Ok(QStorage::Cpu(storage)) => storage,
            // The bytes are the GGUF blocks this matrix was built from.
            _ => unreachable!("candle rebuilds CPU storage from well-formed blocks"),
        }
    }

    fn original(&self) -> &dyn QuantizedType {
        self.original
            .get_or_init(|| self.rebuilt_original())
            .as_ref()
    }
}

/// Where column `col`'s pair `pair` sits, counted in pair-sized slots.
fn slot(col: usize, pair: usize, pairs: usize) -> usize {
    ((col / TILE_COLS) * pairs + pair) * TILE_COLS + col % TILE_COLS
}

fn pair_bytes(dtype: GgmlDType) -> usize {
    if dtype == GgmlDType::Q4_1 {
        32
    } else {
        64
    }
}

/// Activation rows quantized to signed bytes per 32-value block.
struct Activations {
    /// Per row, per pair: 64 values (the padding block is zeros).
    values: Vec<i8>,
    /// Per row, per pair: 16 lanes, the first block's `d8` eight times, then the second's.
    scales: Vec<f32>,
    /// Per row, per block (`2 × pairs`): `d8 × Σq`.
    sums: Vec<f32>,
    /// For Q8_0 weights (`u = q + 128`): per row, per pair, the 16 lanes of `−128 Σq` that
    /// `vpdpbusd` starts from, so its sums are `Σ(q_w × q)`. Empty for Q4_1.
    corrections: Vec<i32>,
}

impl QuantizedType for VnniMatrix {
    fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    fn matmul_t(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> Result<()> {
        if k != self.blocks * BLOCK || n != self.n || lhs.len() < m * k || dst.len() < m * n {
            candle_core::bail!(
                "{:?} matmul: shapes ({m}, {k}, {n}) against a {} × {} matrix",
                self.dtype,
                self.n,
                self.blocks * BLOCK
            );
        }
        #[cfg(target_arch = "x86_64")]
        if Self::available() {
            // SAFETY: the CPU has AVX-512 F/BW/VNNI; shapes checked above.
            unsafe { self.matmul_avx512(m, lhs, dst) };
            return Ok(());
        }
        self.original().matmul_t((m, k, n), lhs, dst)
    }

    fn matmul_t_f16(&self, mkn: (usize, usize, usize), lhs: &[f16], dst: &mut [f16]) -> Result<()> {
        self.original().matmul_t_f16(mkn, lhs, dst)
    }
    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
        self.original().embedding(ids, rows, hidden)
    }
    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        self.original().dequantize(elem_count)
    }
    fn storage_size_in_bytes(&self) -> usize {
        self.n
            * self.blocks
            * if self.dtype == GgmlDType::Q4_1 {
                20
            } else {
                34
            }
    }
    fn as_ptr(&self) -> *const u8 {
        self.original().as_ptr()
    }
    fn block_size(&self) -> usize {
        BLOCK
    }
    fn from_float(&mut self, xs: &[f32]) {
        // Quantize through candle's storage, then repack: this matrix follows the new values.
        let mut original = self.rebuilt_original();
        original.from_float(xs);
        self.replace_with(original);
    }
    fn from_float_imatrix(&mut self, xs: &[f32], imatrix_weights: &[f32], n_per_row: usize) {
        let mut original = self.rebuilt_original();
        original.from_float_imatrix(xs, imatrix_weights, n_per_row);
        self.replace_with(original);
    }
    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

impl VnniMatrix {
    fn replace_with(&mut self, original: Box<dyn QuantizedType>) {
        // SAFETY: as_ptr/storage_size_in_bytes describe candle's live block vector.
        let bytes = unsafe {
            std::slice::from_raw_parts(original.as_ptr(), original.storage_size_in_bytes())
        };
        if let Ok(fresh) = Self::from_bytes(self.dtype, bytes, self.n, self.blocks * BLOCK) {
            *self = fresh;
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl VnniMatrix {
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn matmul_avx512(&self, m: usize, lhs: &[f32], dst: &mut [f32]) {
        let acts = quantize_rows(lhs, m, self.blocks, self.pairs, self.dtype);
        let n = self.n;
        let strips = n.div_ceil(STRIP);
        let dst_addr = dst.as_mut_ptr() as usize;
        let job = |scratch: &mut Scratch, strip: usize| {
            // SAFETY: each strip writes only its own columns of dst, in bounds.
            unsafe { self.strip_avx512(strip, m, &acts, dst_addr as *mut f32, scratch) }
        };
        // Fewer rows than a tile read the packed weights directly: no scratch.
        let scratch_pairs = if m < TILE_ROWS { 0 } else { self.pairs };
        if strips == 1 || m * n * self.blocks < 1 << 16 {
            let mut scratch = Scratch::new(scratch_pairs);
            (0..strips).for_each(|s| job(&mut scratch, s));
        } else {
            (0..strips)
                .into_par_iter()
                .for_each_init(|| Scratch::new(scratch_pairs), job);
        }
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
        use std::arch::x86_64::*;
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
        use std::arch::x86_64::*;
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
        use std::arch::x86_64::*;
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn pair_values(src: *const u8, q4: bool) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile_scales(scales: *const f16, p: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(
        scales.add(p * TILE_COLS * 2) as *const __m128i,
    )))
}

/// Stores a tile's sums (`rows` × `cols` of them) into `dst` at (`row`, `col`).
#[cfg(target_arch = "x86_64")]
unsafe fn write_tile(
    out: &[[f32; TILE_COLS]; TILE_ROWS],
    dst: *mut f32,
    n: usize,
    row: usize,
    rows: usize,
    col: usize,
    cols: usize,
) {
    for (r, sums) in out.iter().enumerate().take(rows) {
        for (c, &sum) in sums.iter().enumerate().take(cols) {
            *dst.add((row + r) * n + col + c) = sum;
        }
    }
}

/// For each column `c` of a tile: the permutation that spreads its two scales (positions
/// `2c` and `2c + 1` of the tile's eight) over lanes 0..8 and 8..16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scale_spreads() -> [std::arch::x86_64::__m512i; TILE_COLS] {
    use std::arch::x86_64::*;
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize, const Q4: bool>(
    pairs: usize,
    scratch: &Scratch,
    acts: &Activations,
    row: usize,
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    use std::arch::x86_64::*;
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_pair<const R: usize, const Q4: bool>(
    acc: &mut [[std::arch::x86_64::__m512; TILE_COLS]; R],
    w: &[std::arch::x86_64::__m512i; TILE_COLS],
    ws: &[std::arch::x86_64::__m512; TILE_COLS],
    acts: &Activations,
    row: usize,
    pairs: usize,
    p: usize,
) {
    use std::arch::x86_64::*;
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce_tile<const R: usize>(
    acc: &[[std::arch::x86_64::__m512; TILE_COLS]; R],
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    use std::arch::x86_64::*;
    for r in 0..R {
        for c in 0..TILE_COLS {
            out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
        }
    }
}

/// Quantizes each row per 32-value block as candle's and llama.cpp's Q8 code does:
/// `d8 = max|x| / 127` (kept as f16), `q = round(x / d8)` half away from zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantize_rows(
    lhs: &[f32],
    m: usize,
    blocks: usize,
    pairs: usize,
    weights: GgmlDType,
) -> Activations {
    use std::arch::x86_64::*;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Module, Tensor};

    /// Exact arithmetic (f64) on the same quantized weights and activations.
    fn exact(w: &QTensor, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let weights: Vec<f32> = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            let mut q = vec![0f64; k];
            for b in 0..k / BLOCK {
                let xs = &x[r * k + b * BLOCK..][..BLOCK];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                let d16 = f16::from_f32(d).to_f32() as f64;
                for j in 0..BLOCK {
                    q[b * BLOCK + j] = (xs[j] * inv).round() as f64 * d16;
                }
            }
            for c in 0..n {
                out[r * n + c] = (0..k).map(|i| weights[c * k + i] as f64 * q[i]).sum();
            }
        }
        out
    }

    #[test]
    fn products_match_exact_arithmetic_on_the_quantized_values() {
        if !VnniMatrix::available() {
            eprintln!("no AVX-512 VNNI here: the kernel is not exercised");
            return;
        }
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for &(m, k, n) in &[
                (1, 32, 1),
                (1, 96, 17),
                (2, 576, 5),
                (3, 64, 33),
                (4, 576, 16),
                (5, 96, 20),
                (9, 1536, 37),
            ] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let want = exact(&q, &xs, m, k, n);
                let fast = VnniMatrix::from_bytes(dtype, &q.data().unwrap(), n, k).unwrap();
                assert_eq!(&*q.data().unwrap(), fast.original_bytes().as_slice());
                let fast = QTensor::new(QStorage::Cpu(Box::new(fast)), (n, k)).unwrap();
                let got: Vec<f32> = QMatMul::from_qtensor(fast)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    // f32 sums of k products of magnitude ~1: a few ulps of √k.
                    let tolerance = 2e-6 * (k as f64).sqrt() * (1.0 + e.abs());
                    assert!(
                        (g as f64 - e).abs() <= tolerance,
                        "{dtype:?} ({m},{k},{n}) output {i}: {g} vs exact {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn candles_other_operations_see_the_original_blocks() {
        let (n, k) = (7, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let fast = VnniMatrix::from_bytes(dtype, &q.data().unwrap(), n, k).unwrap();
            let fast = QTensor::new(QStorage::Cpu(Box::new(fast)), (n, k)).unwrap();
            assert_eq!(fast.data().unwrap(), q.data().unwrap());
            let deq = |t: &QTensor| -> Vec<f32> {
                t.dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(deq(&fast), deq(&q));
        }
        assert!(VnniMatrix::from_bytes(GgmlDType::Q4_1, &[0; 19], 1, 32).is_err());
        assert!(VnniMatrix::from_bytes(GgmlDType::Q4K, &[0; 144], 1, 256).is_err());
    }
}
