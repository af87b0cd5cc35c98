//! Q4_1 and Q8_0 matrix products with x86 SIMD, as a candle `QuantizedType`: AVX-512 VNNI
//! where the CPU has it ([`avx512`]), AVX2 otherwise ([`avx2`], with AVX-VNNI's `vpdpbusd`
//! where there is one). All give bit-identical results.
//!
//! Both weight types are written as `scale × u + min` with `u` an unsigned byte: Q4_1 is
//! that already (`u` = the nibble), Q8_0 is `d × (u − 128)`. The activations are quantized
//! per 32-value block to signed bytes (`d8 × q`), as llama.cpp and candle do, so one output is
//!
//! `Σ_blocks scale × d8 × Σ(u × q)  +  Σ_blocks min × d8 × Σq`.
//!
//! The integer sums run in `vpdpbusd` (u8 × i8, 64 pairs per instruction, two blocks per
//! register) or, with AVX2, `vpmaddubsw` + `vpmaddwd` (32 pairs), in register tiles of
//! several activation rows × 4 weight columns, so each load feeds several products. The Q4_1
//! minimums' sum is a small float matrix product over 16 columns at a time.
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
use candle_core::{CpuStorage, Device, Result, Storage, Tensor, WithDType};
use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(super) use avx512::sum_512;

/// Values per quantization block (Q4_1, Q8_0, Q8_1).
const BLOCK: usize = 32;
/// Columns per parallel work item: one register of minimums.
const STRIP: usize = 16;
/// Weight columns per register tile.
const TILE_COLS: usize = 4;
/// Activation rows per register tile, at most.
const TILE_ROWS: usize = 4;
/// How far ahead of the weights being read generation prefetches, in bytes.
const PREFETCH_AHEAD: usize = 4096;

/// The SIMD code a [`PackedMatrix`] multiplies with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F/BW/VNNI: Intel Xeons since Cascade Lake, AMD since Zen 4.
    Avx512Vnni,
    /// The AVX2 kernel with AVX-VNNI's 256-bit `vpdpbusd` for the integer sums: Intel's
    /// client CPUs since Alder Lake, which have no AVX-512.
    AvxVnni,
    /// AVX2, FMA and F16C: every x86-64 CPU of the last decade (Haswell, Zen 1 on).
    Avx2,
}

impl Kernel {
    /// Whether this CPU has the instructions.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Self::Avx512Vnni => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
                Self::AvxVnni => Self::Avx2.runs_here() && is_x86_feature_detected!("avxvnni"),
                Self::Avx2 => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Every kernel this CPU runs, best first.
    pub fn all_here() -> Vec<Self> {
        [Self::Avx512Vnni, Self::AvxVnni, Self::Avx2]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// The best kernel this CPU runs, or `None` (candle's own code then).
    /// `RUNNER_CPU_KERNEL=avxvnni`, `=avx2` or `=none` picks a lesser one, to measure or test
    /// it on a bigger CPU; a kernel the CPU lacks is never picked.
    pub fn detect() -> Option<Self> {
        static CHOSEN: OnceLock<Option<Kernel>> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Self::all_here().first().copied();
            match std::env::var("RUNNER_CPU_KERNEL").ok().as_deref() {
                None | Some("" | "auto") => best,
                Some("none") => None,
                Some("avx2") if Self::Avx2.runs_here() => Some(Self::Avx2),
                Some("avxvnni") if Self::AvxVnni.runs_here() => Some(Self::AvxVnni),
                Some("avx512") if Self::Avx512Vnni.runs_here() => Some(Self::Avx512Vnni),
                Some(other) => {
                    tracing::warn!(
                        "RUNNER_CPU_KERNEL={other}: not one this CPU runs (auto, avx512, \
                         avxvnni, avx2, none); using {best:?}"
                    );
                    best
                }
            }
        })
    }
}

/// One of a matrix's arrays: built at load, or a restored snapshot tensor's memory (mapped
/// from the snapshot file on the CPU, nothing copied).
enum Data<T> {
    Built(Vec<T>),
    Restored {
        /// Keeps the memory alive.
        _tensor: Tensor,
        ptr: *const T,
        len: usize,
    },
}

// SAFETY: `Restored` points into the CPU storage of the tensor it holds, which lives as long
// as that handle and is only ever read (candle writes a tensor's storage in place only
// through operations runner never applies to weights); `Tensor` is Send + Sync.
unsafe impl<T: Send> Send for Data<T> {}
unsafe impl<T: Sync> Sync for Data<T> {}

impl<T> std::ops::Deref for Data<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Self::Built(v) => v,
            // SAFETY: see the Send/Sync impls: `len` values at `ptr`, alive and unchanged.
            Self::Restored { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl<T: WithDType> Data<T> {
    /// A contiguous CPU tensor of `T`, flattened.
    fn restored(tensor: &Tensor, name: &str) -> Result<Self> {
        let tensor = tensor.flatten_all()?;
        if tensor.dtype() != T::DTYPE || !tensor.device().is_cpu() {
            candle_core::bail!(
                "snapshot tensor `{name}`: {:?} on {:?}, expected {:?} on the CPU",
                tensor.dtype(),
                tensor.device(),
                T::DTYPE
            );
        }
        let (ptr, len) = {
            let (storage, layout) = tensor.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("snapshot tensor `{name}` is not in CPU memory");
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("snapshot tensor `{name}` is not contiguous");
            };
            let all = cpu.as_slice::<T>()?;
            let values = &all[start..end];
            (values.as_ptr(), values.len())
        };
        Ok(Self::Restored {
            _tensor: tensor,
            ptr,
            len,
        })
    }

    /// The values as a tensor that shares their memory: values built at load move into
    /// the tensor's storage (nothing is copied) and this points into it from then on.
    fn shared_tensor(&mut self, name: &str) -> Result<Tensor> {
        if let Self::Restored { _tensor, .. } = self {
            return Ok(_tensor.clone());
        }
        let Self::Built(values) = std::mem::replace(self, Self::Built(Vec::new())) else {
            unreachable!("restored data returned above");
        };
        let len = values.len();
        let tensor = Tensor::from_vec(values, len, &Device::Cpu)?;
        *self = Self::restored(&tensor, name)?;
        Ok(tensor)
    }
}

pub struct PackedMatrix {
    dtype: GgmlDType,
    /// What `matmul_t` runs; `None`: candle's code on [`Self::original`].
    kernel: Option<Kernel>,
    /// Output columns (rows of the weight matrix).
    n: usize,
    /// Blocks per weight row, and block pairs (the last pair padded with a zero block).
    blocks: usize,
    pairs: usize,
    /// Per tile of 4 columns, per pair, per column: the `u` of both blocks. Q4_1: 32 bytes,
    /// the first block's value `j` in the low nibble of byte `j`, the second block's in the
    /// high nibble. Q8_0: 64 bytes, `q + 128`. Columns past `n` are zeros.
    packed: Data<u8>,
    /// Per tile, per pair, per column: both blocks' scales (8 values, 16 bytes).
    scales: Data<f16>,
    /// Q4_1 only: per block (`2 × pairs`), per column (padded to a multiple of 16): the
    /// minimum.
    mins_t: Data<f16>,
    /// candle's own storage of the same blocks, rebuilt on first use, for the operations
    /// other than `matmul_t` (nothing on the generation path uses them).
    original: OnceLock<Box<dyn QuantizedType>>,
}

impl PackedMatrix {
    /// Whether the kernel handles this weight type.
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
    }

    /// From the raw blocks of an `n × k` matrix (`k` a multiple of 32), as a GGUF holds them;
    /// multiplied with [`Kernel::detect`]'s kernel.
    pub fn from_bytes(dtype: GgmlDType, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let row_bytes = k / BLOCK * block_bytes(dtype)?;
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * row_bytes {
            candle_core::bail!(
                "{dtype:?} matrix of {n} × {k}: {} bytes does not match",
                bytes.len()
            );
        }
        let rows: Vec<&[u8]> = bytes.chunks_exact(row_bytes.max(1)).take(n).collect();
        Self::from_rows(dtype, &rows, k)
    }

    /// From each weight row's raw blocks (`k` values per row, a multiple of 32): rows of
    /// several tensors (q, k and v) make one matrix without being copied together first.
    /// Tiles are packed in parallel.
    pub fn from_rows(dtype: GgmlDType, rows: &[&[u8]], k: usize) -> Result<Self> {
        let block_bytes = block_bytes(dtype)?;
        let n = rows.len();
        if !k.is_multiple_of(BLOCK) || rows.iter().any(|r| r.len() != k / BLOCK * block_bytes) {
            candle_core::bail!("{dtype:?} matrix of {n} × {k}: a row's bytes do not match");
        }
        let blocks = k / BLOCK;
        let pairs = blocks.div_ceil(2);
        let tiles = n.div_ceil(TILE_COLS);
        let n_padded = n.div_ceil(STRIP) * STRIP;
        let pair_bytes = pair_bytes(dtype);
        let q4 = dtype == GgmlDType::Q4_1;
        let mut packed = vec![0u8; tiles * pairs * TILE_COLS * pair_bytes];
        let mut scales = vec![f16::ZERO; tiles * pairs * TILE_COLS * 2];
        let f16_at = |row: &[u8], at: usize| f16::from_le_bytes([row[at], row[at + 1]]);
        let pack_tile = |tile: usize, packed: &mut [u8], scales: &mut [f16]| {
            for (c, row) in rows
                .iter()
                .skip(tile * TILE_COLS)
                .take(TILE_COLS)
                .enumerate()
            {
                for (b, block) in row.chunks_exact(block_bytes).enumerate() {
                    // This tile's slot of column c, pair b / 2.
                    let (slot, second) = ((b / 2) * TILE_COLS + c, b % 2);
                    let out = &mut packed[slot * pair_bytes..][..pair_bytes];
                    scales[slot * 2 + second] = f16_at(block, 0);
                    if q4 {
                        let qs = &block[4..20];
                        let shift = 4 * second;
                        let (low, high) = out.split_at_mut(16);
                        for j in 0..16 {
                            low[j] |= (qs[j] & 0x0F) << shift;
                            high[j] |= (qs[j] >> 4) << shift;
                        }
                    } else {
                        // q as a byte, plus 128: its sign bit flipped.
                        let out = &mut out[second * BLOCK..][..BLOCK];
                        for (o, q) in out.iter_mut().zip(&block[2..2 + BLOCK]) {
                            *o = q ^ 0x80;
                        }
                    }
                }
            }
        };
        let tile_bytes = pairs * TILE_COLS * pair_bytes;
        let tile_scales = pairs * TILE_COLS * 2;
        if n * k < 1 << 16 {
            packed
                .chunks_mut(tile_bytes)
                .zip(scales.chunks_mut(tile_scales))
                .enumerate()
                .for_each(|(t, (p, s))| pack_tile(t, p, s));
        } else {
            packed
                .par_chunks_mut(tile_bytes)
                .zip(scales.par_chunks_mut(tile_scales))
                .enumerate()
                .for_each(|(t, (p, s))| pack_tile(t, p, s));
        }
        let mut mins_t = if q4 {
            vec![f16::ZERO; pairs * 2 * n_padded]
        } else {
            Vec::new()
        };
        if q4 {
            mins_t
                .par_chunks_mut(n_padded)
                .take(blocks)
                .enumerate()
                .for_each(|(b, mins)| {
                    for (m, row) in mins.iter_mut().zip(rows) {
                        *m = f16_at(row, b * block_bytes + 2);
                    }
                });
        }
        Ok(Self {
            dtype,
            kernel: Kernel::detect(),
            n,
            blocks,
            pairs,
            packed: Data::Built(packed),
            scales: Data::Built(scales),
            mins_t: Data::Built(mins_t),
            original: OnceLock::new(),
        })
    }

    /// The arrays a snapshot keeps, by part name: the matrix as it is held, so a restore
    /// skips the repacking.
    /// The matrix as snapshot parts (`shape`, `packed`, `scales` and, for Q4_1, `mins`)
    /// sharing its memory: what a recording for a snapshot keeps while the model runs costs
    /// nothing (the arrays move into tensors' storage; the kernels read the same bytes at the
    /// same addresses).
    pub fn share_snapshot_parts(&mut self) -> Result<Vec<(&'static str, Tensor)>> {
        let code = if self.dtype == GgmlDType::Q4_1 { 0 } else { 1 };
        let shape = [code, self.n as u32, self.blocks as u32];
        let mut parts = vec![
            ("shape", Tensor::new(&shape, &Device::Cpu)?),
            ("packed", self.packed.shared_tensor("packed")?),
            ("scales", self.scales.shared_tensor("scales")?),
        ];
        if self.dtype == GgmlDType::Q4_1 {
            parts.push(("mins", self.mins_t.shared_tensor("mins")?));
        }
        Ok(parts)
    }

    /// A matrix from [`Self::share_snapshot_parts`]' tensors (`part` gives each by name), using
    /// their memory as it is. Every array's length is checked against the shape, so the
    /// kernels never read past one.
    pub fn from_snapshot_parts(part: impl Fn(&str) -> Result<Tensor>) -> Result<Self> {
        let shape: Vec<u32> = part("shape")?.flatten_all()?.to_vec1()?;
        let &[code, n, blocks] = shape.as_slice() else {
            candle_core::bail!("snapshot matrix shape {shape:?}: expected 3 values");
        };
        let dtype = match code {
            0 => GgmlDType::Q4_1,
            1 => GgmlDType::Q8_0,
            other => candle_core::bail!("snapshot matrix of unknown type {other}"),
        };
        let (n, blocks) = (n as usize, blocks as usize);
        let pairs = blocks.div_ceil(2);
        let tiles = n.div_ceil(TILE_COLS);
        let n_padded = n.div_ceil(STRIP) * STRIP;
        let packed = Data::restored(&part("packed")?, "packed")?;
        let scales = Data::restored(&part("scales")?, "scales")?;
        let mins_t = if dtype == GgmlDType::Q4_1 {
            Data::restored(&part("mins")?, "mins")?
        } else {
            Data::Built(Vec::new())
        };
        let expected = [
            (
                "packed",
                packed.len(),
                tiles * pairs * TILE_COLS * pair_bytes(dtype),
            ),
            ("scales", scales.len(), tiles * pairs * TILE_COLS * 2),
            (
                "mins",
                mins_t.len(),
                if dtype == GgmlDType::Q4_1 {
                    pairs * 2 * n_padded
                } else {
                    0
                },
            ),
        ];
        for (what, got, want) in expected {
            if got != want || n == 0 || blocks == 0 {
                candle_core::bail!(
                    "snapshot {dtype:?} matrix of {n} × {}: {what} holds {got} values, expected {want}",
                    blocks * BLOCK
                );
            }
        }
        Ok(Self {
            dtype,
            kernel: Kernel::detect(),
            n,
            blocks,
            pairs,
            packed,
            scales,
            mins_t,
            original: OnceLock::new(),
        })
    }

    /// The same matrix multiplied with `kernel` (one this CPU runs; otherwise unchanged).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        if kernel.runs_here() {
            self.kernel = Some(kernel);
        }
        self
    }

    pub fn kernel(&self) -> Option<Kernel> {
        self.kernel
    }

    /// Output columns.
    pub fn columns(&self) -> usize {
        self.n
    }

    /// Values per input row (`k`).
    pub fn inner(&self) -> usize {
        self.blocks * BLOCK
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

/// Runs `job(scratch, strip)` for each of a matrix's 16-column strips (each writes only its
/// own columns): on this thread when the product is small (waking the pool costs more), else
/// over rayon with one scratch per worker.
#[cfg(target_arch = "x86_64")]
fn for_each_strip<S>(
    matrix: &PackedMatrix,
    m: usize,
    new_scratch: impl Fn() -> S + Send + Sync,
    job: impl Fn(&mut S, usize) + Send + Sync,
) {
    let strips = matrix.n.div_ceil(STRIP);
    if strips == 1 || m * matrix.n * matrix.blocks < 1 << 16 {
        let mut scratch = new_scratch();
        (0..strips).for_each(|s| job(&mut scratch, s));
    } else {
        (0..strips).into_par_iter().for_each_init(new_scratch, job);
    }
}

/// Bytes per block of 32 values as a GGUF stores them.
fn block_bytes(dtype: GgmlDType) -> Result<usize> {
    Ok(match dtype {
        GgmlDType::Q4_1 => 20,
        GgmlDType::Q8_0 => 34,
        other => candle_core::bail!("runner's CPU kernels do not handle {other:?}"),
    })
}

fn pair_bytes(dtype: GgmlDType) -> usize {
    if dtype == GgmlDType::Q4_1 {
        32
    } else {
        64
    }
}

/// The sum of 16 lanes, `lo` (0..8) and `hi` (8..16), in one fixed order: lane `i` plus
/// lane `i + 8`, then the halves of what is left, and so on. Both kernels reduce this way
/// (AVX-512's own reduction may reassociate), so their results are bit-identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(super) unsafe fn sum_lanes(
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm256_add_ps(lo, hi);
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps::<1>(x, x)))
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

/// Activation rows quantized to signed bytes per 32-value block.
struct Activations {
    /// Per row, per pair: 64 values (the padding block is zeros).
    values: Vec<i8>,
    /// Per row, per pair, the blocks' `d8`. AVX-512: 16 lanes, the first block's eight
    /// times, then the second's. AVX2: the two values.
    scales: Vec<f32>,
    /// Per row, per block (`2 × pairs`): `d8 × Σq`.
    sums: Vec<f32>,
    /// AVX-512 with Q8_0 weights (`u = q + 128`): per row, per pair, the 16 lanes of
    /// `−128 Σq` that `vpdpbusd` starts from, so its sums are `Σ(q_w × q)`. Otherwise empty.
    corrections: Vec<i32>,
}

impl QuantizedType for PackedMatrix {
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
        match self.kernel {
            // SAFETY (both): `kernel` is only set where the CPU runs it; shapes checked above.
            #[cfg(target_arch = "x86_64")]
            Some(Kernel::Avx512Vnni) => unsafe { self.matmul_avx512(m, lhs, dst) },
            #[cfg(target_arch = "x86_64")]
            Some(Kernel::AvxVnni) => unsafe { self.matmul_avx2(m, lhs, dst, true) },
            #[cfg(target_arch = "x86_64")]
            Some(Kernel::Avx2) => unsafe { self.matmul_avx2(m, lhs, dst, false) },
            _ => return self.original().matmul_t((m, k, n), lhs, dst),
        }
        Ok(())
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

impl PackedMatrix {
    fn replace_with(&mut self, original: Box<dyn QuantizedType>) {
        // SAFETY: as_ptr/storage_size_in_bytes describe candle's live block vector.
        let bytes = unsafe {
            std::slice::from_raw_parts(original.as_ptr(), original.storage_size_in_bytes())
        };
        if let Ok(mut fresh) = Self::from_bytes(self.dtype, bytes, self.n, self.blocks * BLOCK) {
            fresh.kernel = self.kernel;
            *self = fresh;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Module, Tensor};
    use std::collections::HashMap;

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

    /// `m × k` activations times the quantized `n × k` weights with `kernel`, through candle.
    fn product(kernel: Kernel, q: &QTensor, x: &Tensor) -> Vec<f32> {
        let (n, k) = q.shape().dims2().unwrap();
        let fast = PackedMatrix::from_bytes(q.dtype(), &q.data().unwrap(), n, k)
            .unwrap()
            .with_kernel(kernel);
        assert_eq!(fast.kernel(), Some(kernel));
        assert_eq!(&*q.data().unwrap(), fast.original_bytes().as_slice());
        let fast = QTensor::new(QStorage::Cpu(Box::new(fast)), (n, k)).unwrap();
        QMatMul::from_qtensor(fast)
            .unwrap()
            .forward(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], k: usize) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &e)) in got.iter().zip(want).enumerate() {
            // f32 sums of k products of magnitude ~1: a few ulps of √k.
            let tolerance = 2e-6 * (k as f64).sqrt() * (1.0 + e.abs());
            assert!(
                (g as f64 - e).abs() <= tolerance,
                "{what} output {i}: {g} vs exact {e}"
            );
        }
    }

    /// Each kernel against exact arithmetic, and the kernels against each other: bit for bit,
    /// so a model gives the same tokens on any of them.
    #[test]
    fn products_match_exact_arithmetic_on_the_quantized_values() {
        let kernels = Kernel::all_here();
        if kernels.is_empty() {
            eprintln!("neither AVX-512 VNNI nor AVX2 here: no kernel is exercised");
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
                (7, 160, 9),
                (9, 1536, 37),
                (6, 576, 200),
                (1, 1536, 600),
            ] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let want = exact(&q, &xs, m, k, n);
                let mut first: Option<(Kernel, Vec<f32>)> = None;
                for &kernel in &kernels {
                    let got = product(kernel, &q, &x);
                    let what = format!("{kernel:?} {dtype:?} ({m},{k},{n})");
                    assert_close(&what, &got, &want, k);
                    match &first {
                        None => first = Some((kernel, got)),
                        Some((other, theirs)) => {
                            let bits =
                                |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&got), bits(theirs), "{what} against {other:?}");
                        }
                    }
                }
            }
        }
    }

    /// A matrix rebuilt from its snapshot parts multiplies bit for bit as the original; parts
    /// of the wrong size or type are refused, never read past.
    #[test]
    fn snapshot_parts_round_trip_and_bad_ones_are_refused() {
        let (m, k, n) = (3, 96, 21);
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let mut built = PackedMatrix::from_bytes(dtype, &q.data().unwrap(), n, k).unwrap();
            let mut before = vec![0f32; m * n];
            built.product(m, &xs, &mut before).unwrap();
            let packed_at = built.packed.as_ptr();
            let parts: HashMap<&str, Tensor> =
                built.share_snapshot_parts().unwrap().into_iter().collect();
            // The parts are the matrix's own memory, moved into tensors, not a copy of it.
            assert!(matches!(built.packed, Data::Restored { .. }));
            assert_eq!(built.packed.as_ptr(), packed_at);
            let part_at = {
                let (storage, _) = parts["packed"].storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    panic!("on the CPU")
                };
                cpu.as_slice::<u8>().unwrap().as_ptr()
            };
            assert_eq!(part_at, packed_at);
            fn get<'a>(
                parts: &'a HashMap<&'static str, Tensor>,
            ) -> impl Fn(&str) -> Result<Tensor> + 'a {
                move |p: &str| {
                    parts
                        .get(p)
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg(format!("no {p}")))
                }
            }
            let rebuilt = PackedMatrix::from_snapshot_parts(get(&parts)).unwrap();
            assert!(matches!(rebuilt.packed, Data::Restored { .. }));
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            built.product(m, &xs, &mut a).unwrap();
            rebuilt.product(m, &xs, &mut b).unwrap();
            assert_eq!(a, before, "{dtype:?}");
            assert_eq!(a, b, "{dtype:?}");
            assert_eq!(rebuilt.original_bytes(), built.original_bytes());

            let mut short = parts.clone();
            let packed = &parts["packed"];
            short.insert(
                "packed",
                packed.narrow(0, 0, packed.dim(0).unwrap() - 1).unwrap(),
            );
            let e = PackedMatrix::from_snapshot_parts(get(&short))
                .err()
                .unwrap();
            assert!(e.to_string().contains("packed holds"), "{e}");
            let mut wrong_type = parts.clone();
            wrong_type.insert(
                "scales",
                parts["scales"].to_dtype(candle_core::DType::F32).unwrap(),
            );
            assert!(PackedMatrix::from_snapshot_parts(get(&wrong_type)).is_err());
            let mut unknown = parts.clone();
            unknown.insert(
                "shape",
                Tensor::new(&[7u32, n as u32, 3], &Device::Cpu).unwrap(),
            );
            let e = PackedMatrix::from_snapshot_parts(get(&unknown))
                .err()
                .unwrap();
            assert!(e.to_string().contains("unknown type"), "{e}");
        }
    }

    /// The largest products each kernel can meet: Q8_0 weights of −128 (no quantizer writes
    /// them, a GGUF may hold them) and 127 against activations of ±127, where 16-bit pair
    /// sums saturate unless the kernel avoids them; Q4_1 nibbles of 15.
    #[test]
    fn extreme_weights_do_not_saturate() {
        let (m, k, n) = (3, 64, 8);
        let x: Vec<f32> = (0..m * k)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let one = f16::ONE.to_le_bytes();
        let mut q8 = Vec::new();
        let mut q4 = Vec::new();
        for col in 0..n * k / BLOCK {
            q8.extend_from_slice(&one);
            let value = if col % 2 == 0 { 0x80u8 } else { 0x7F };
            q8.extend(std::iter::repeat_n(value, BLOCK));
            q4.extend_from_slice(&one);
            q4.extend_from_slice(&f16::from_f32(-8.0).to_le_bytes());
            q4.extend(std::iter::repeat_n(0xFFu8, BLOCK / 2));
        }
        for kernel in Kernel::all_here() {
            for (dtype, bytes) in [(GgmlDType::Q8_0, &q8), (GgmlDType::Q4_1, &q4)] {
                let q = QTensor::new(
                    QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype).unwrap(),
                    (n, k),
                )
                .unwrap();
                let got = product(kernel, &q, &x);
                let what = format!("{kernel:?} {dtype:?}");
                assert_close(&what, &got, &exact(&q, &xs, m, k, n), k);
            }
        }
    }

    #[test]
    fn candles_other_operations_see_the_original_blocks() {
        let (n, k) = (7, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let fast = PackedMatrix::from_bytes(dtype, &q.data().unwrap(), n, k).unwrap();
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
        assert!(PackedMatrix::from_bytes(GgmlDType::Q4_1, &[0; 19], 1, 32).is_err());
        assert!(PackedMatrix::from_bytes(GgmlDType::Q4K, &[0; 144], 1, 256).is_err());
    }
}
/// Not a test: the kernels' speed on this CPU, for tuning (debug assertions slow the dev
/// profile several times over, so use release):
/// `cargo test --release --workspace --lib kernel_speed -- --ignored --nocapture`
#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore]
    fn kernel_speed() {
        use candle_core::quantized::QTensor;
        use candle_core::Tensor;
        for (m, k, n) in [(256usize, 576usize, 3072usize), (1, 576, 3072)] {
            for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut dst = vec![0f32; m * n];
                for kernel in Kernel::all_here() {
                    let p = PackedMatrix::from_bytes(dtype, &q.data().unwrap(), n, k)
                        .unwrap()
                        .with_kernel(kernel);
                    let reps = if m == 1 { 2000 } else { 20 };
                    p.product(m, &x, &mut dst).unwrap();
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        p.product(m, &x, &mut dst).unwrap();
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    eprintln!(
                        "{kernel:?} {dtype:?} m={m}: {:.3} ms, {:.1} GMAC/s",
                        s * 1e3,
                        (m * k * n) as f64 / s / 1e9
                    );
                }
            }
        }
    }
}
