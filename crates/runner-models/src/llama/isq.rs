//! Quantization at load: a Llama in safetensors (f32, bf16 or f16, Hugging Face's layout)
//! quantized to a GGML type while it loads, then served exactly as a GGUF of that type would
//! be (runner's own CPU kernels for Q4_1 and Q8_0, candle's quantized kernels otherwise,
//! CUDA included).
//!
//! Asked for with `RUNNER_QUANTIZE=q8_0` in cog.yaml's `environment`, or `--quantize` on
//! the command line (which overrides it; `--quantize off` turns it off). As llama.cpp does,
//! the token embeddings and the output projection stay at 8 bits (Q8_0) whatever the type
//! asked for, and norms stay f32. The tensors are
//! renamed to llama.cpp's names and the q/k projections permuted into its rotary layout,
//! so the GGUF code paths take them unchanged. Quantizing costs CPU time on every cold
//! load; a snapshot keeps the quantized (and, on the CPU, repacked) matrices, so a restore
//! skips it.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, TensorInfo, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::llama as full;
use rayon::prelude::*;
use runner_spec::{ModelDir, WeightsLayout};

use crate::weights::CheckedWeights;
use crate::{LoadContext, LoadError};

/// The cog.yaml `environment` entry (and environment variable) that asks for it.
pub const ENV: &str = "RUNNER_QUANTIZE";

/// The GGML types runner quantizes to, by the names llama.cpp gives them.
pub const TYPES: &[(&str, GgmlDType)] = &[
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

fn other(e: impl std::fmt::Display) -> LoadError {
    LoadError::Other(e.to_string())
}

fn type_names() -> String {
    TYPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A quantization type by name (`q8_0`, `Q4_K`, …); `Ok(None)` for `off`, `none` or empty.
pub fn parse(name: &str) -> Result<Option<(&'static str, GgmlDType)>, String> {
    let wanted = name.trim().to_ascii_lowercase();
    if matches!(wanted.as_str(), "" | "off" | "none") {
        return Ok(None);
    }
    TYPES
        .iter()
        .find(|(n, _)| *n == wanted || n.replace('_', "") == wanted)
        .map(|&(n, t)| Some((n, t)))
        .ok_or_else(|| {
            format!(
                "unknown quantization type {name:?}: choose one of {}, or off",
                type_names()
            )
        })
}

/// The quantization this load asks for: `explicit` (the command line) first, else the
/// model directory's cog.yaml `environment`. Errors name where the bad value came from.
pub fn choice(
    dir: &ModelDir,
    explicit: Option<&str>,
) -> Result<Option<(&'static str, GgmlDType)>, LoadError> {
    match explicit {
        Some(v) => parse(v).map_err(|e| other(format!("--quantize / {ENV}: {e}"))),
        None => match dir.config.environment.get(ENV) {
            Some(v) => parse(v).map_err(|e| {
                other(format!(
                    "{}: environment {ENV}={v}: {e}",
                    dir.config.path.display()
                ))
            }),
            None => Ok(None),
        },
    }
}

/// The model as an in-memory GGUF: its metadata and tensor table, and the quantized data
/// (empty on a snapshot restore, whose matrices come from the snapshot instead).
pub struct QuantizedGguf {
    pub content: gguf_file::Content,
    pub data: Vec<u8>,
    /// Bytes of the source tensors read, and of the quantized data.
    pub source_bytes: u64,
    pub quantized_bytes: u64,
}

/// One tensor to write: llama.cpp's name, Hugging Face's, the shape both agree on, and
/// whether it is a matrix (quantized) or a norm (kept as f32).
struct Planned {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    matrix: bool,
    /// The token embeddings and the output projection: kept at 8 bits, as llama.cpp keeps
    /// them above the type asked for (the logits come straight out of them).
    vocabulary: bool,
    /// Attention heads when the rows must be permuted into llama.cpp's rotary layout.
    permute_heads: Option<usize>,
}

/// Checks `config` and the weights' shapes, and quantizes every matrix to `dtype` (norms stay
/// f32), on all cores. On a restore only the tensor table is built.
pub fn quantize(
    weights: &CheckedWeights,
    config: &full::LlamaConfig,
    (type_name, dtype): (&str, GgmlDType),
    ctx: &LoadContext,
) -> Result<QuantizedGguf, LoadError> {
    let refuse = |why: String| other(format!("{ENV}={type_name}: {why}"));
    if config.rope_scaling.is_some() {
        return Err(refuse(
            "config.json has `rope_scaling` (Llama 3.1-style rotary scaling), which the quantized Llama does not apply; serve these weights unquantized".into(),
        ));
    }
    let hidden = config.hidden_size;
    let heads = config.num_attention_heads;
    let kv_heads = config.num_key_value_heads();
    if heads == 0
        || kv_heads == 0
        || !hidden.is_multiple_of(heads)
        || !heads.is_multiple_of(kv_heads)
    {
        return Err(refuse(format!(
            "config.json has {heads} attention heads, {kv_heads} key/value heads and hidden size {hidden}; the heads must divide the hidden size and the key/value heads the heads"
        )));
    }
    let head_dim = hidden / heads;
    if !head_dim.is_multiple_of(2) {
        return Err(refuse(format!(
            "head dimension {head_dim} is odd; rotary embeddings need it even"
        )));
    }
    let ffn = config.intermediate_size;
    let vocab = config.vocab_size;
    let mut plan = vec![Planned {
        gguf: "token_embd.weight".into(),
        hf: "model.embed_tokens.weight".into(),
        shape: vec![vocab, hidden],
        matrix: true,
        vocabulary: true,
        permute_heads: None,
    }];
    let norm = |gguf: String, hf: String| Planned {
        gguf,
        hf,
        shape: vec![hidden],
        matrix: false,
        vocabulary: false,
        permute_heads: None,
    };
    for i in 0..config.num_hidden_layers {
        let layer = |gguf: &str, hf: &str, shape: [usize; 2], permute_heads| Planned {
            gguf: format!("blk.{i}.{gguf}.weight"),
            hf: format!("model.layers.{i}.{hf}.weight"),
            shape: shape.to_vec(),
            matrix: true,
            vocabulary: false,
            permute_heads,
        };
        plan.push(norm(
            format!("blk.{i}.attn_norm.weight"),
            format!("model.layers.{i}.input_layernorm.weight"),
        ));
        plan.push(layer(
            "attn_q",
            "self_attn.q_proj",
            [heads * head_dim, hidden],
            Some(heads),
        ));
        plan.push(layer(
            "attn_k",
            "self_attn.k_proj",
            [kv_heads * head_dim, hidden],
            Some(kv_heads),
        ));
        plan.push(layer(
            "attn_v",
            "self_attn.v_proj",
            [kv_heads * head_dim, hidden],
            None,
        ));
        plan.push(layer(
            "attn_output",
            "self_attn.o_proj",
            [hidden, heads * head_dim],
            None,
        ));
        plan.push(norm(
            format!("blk.{i}.ffn_norm.weight"),
            format!("model.layers.{i}.post_attention_layernorm.weight"),
        ));
        plan.push(layer("ffn_gate", "mlp.gate_proj", [ffn, hidden], None));
        plan.push(layer("ffn_up", "mlp.up_proj", [ffn, hidden], None));
        plan.push(layer("ffn_down", "mlp.down_proj", [hidden, ffn], None));
    }
    plan.push(norm(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
    ));
    if !config.tie_word_embeddings.unwrap_or(false) {
        plan.push(Planned {
            gguf: "output.weight".into(),
            hf: "lm_head.weight".into(),
            shape: vec![vocab, hidden],
            matrix: true,
            vocabulary: true,
            permute_heads: None,
        });
    }

    let mut source_bytes = 0u64;
    for p in &plan {
        let info = weights.info(&p.hf).ok_or_else(|| {
            other(format!(
                "the safetensors weights have no `{}`, which a Llama with {} layers needs",
                p.hf, config.num_hidden_layers
            ))
        })?;
        if info.shape != p.shape {
            return Err(other(format!(
                "tensor `{}` has shape {:?}, but config.json implies {:?}; the weights and config.json do not match",
                p.hf, info.shape, p.shape
            )));
        }
        source_bytes += info.offsets.1.saturating_sub(info.offsets.0);
        let row = p.shape[p.shape.len() - 1];
        if p.matrix && !row.is_multiple_of(stored_type(p, dtype).block_size()) {
            return Err(refuse(format!(
                "tensor `{}` has rows of {row} values, and {type_name} quantizes blocks of {}; choose a type with blocks of 32 (q4_0, q4_1, q5_0, q5_1, q8_0)",
                p.hf,
                dtype.block_size()
            )));
        }
    }

    let u32_value = |n: usize| GgufValue::U32(n as u32);
    let metadata: HashMap<String, GgufValue> = [
        ("general.architecture", GgufValue::String("llama".into())),
        ("llama.block_count", u32_value(config.num_hidden_layers)),
        ("llama.embedding_length", u32_value(hidden)),
        ("llama.feed_forward_length", u32_value(ffn)),
        ("llama.attention.head_count", u32_value(heads)),
        ("llama.attention.head_count_kv", u32_value(kv_heads)),
        ("llama.rope.dimension_count", u32_value(head_dim)),
        (
            "llama.context_length",
            u32_value(config.max_position_embeddings),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(config.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", GgufValue::F32(config.rope_theta)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let mut tensor_infos = HashMap::new();
    let mut data = Vec::new();
    if !ctx.is_restore() {
        let stored: u64 = plan
            .iter()
            .map(|p| {
                let t = stored_type(p, dtype);
                let n: usize = p.shape.iter().product();
                (n / t.block_size() * t.type_size()) as u64
            })
            .sum();
        data.reserve(stored as usize);
    }
    for p in &plan {
        let t = stored_type(p, dtype);
        let offset = data.len() as u64;
        if !ctx.is_restore() {
            // In the dtype it is stored in (mapped, not copied, where it can be): the
            // conversion to f32 happens piece by piece on all cores as it is quantized.
            let stored = match weights.info(&p.hf).map(|i| i.dtype.as_str()) {
                Some("BF16") => DType::BF16,
                Some("F16") => DType::F16,
                _ => DType::F32,
            };
            let source = weights
                .get_unchecked(&p.hf, stored, &Device::Cpu)
                .map_err(|e| other(format!("tensor `{}`: {e}", p.hf)))?;
            let source = match p.permute_heads {
                Some(h) => permute(&source, h),
                None => Ok(source),
            }
            .map_err(|e| other(format!("tensor `{}`: {e}", p.hf)))?;
            let n: usize = p.shape.iter().product();
            let start = data.len();
            data.resize(start + n / t.block_size() * t.type_size(), 0);
            quantize_rows_into(&source, t, &mut data[start..])
                .map_err(|e| other(format!("cannot quantize `{}`: {e}", p.hf)))?;
            // GGUF's alignment, so the table reads as a GGUF file's would.
            data.resize(data.len().next_multiple_of(32), 0);
        }
        tensor_infos.insert(
            p.gguf.clone(),
            TensorInfo {
                ggml_dtype: t,
                shape: candle_core::Shape::from_dims(&p.shape),
                offset,
            },
        );
    }
    let quantized_bytes = data.len() as u64;
    Ok(QuantizedGguf {
        content: gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos,
            tensor_data_offset: 0,
        },
        data,
        source_bytes,
        quantized_bytes,
    })
}

/// What the model takes in device memory once quantized to `dtype` (the name of a type in
/// [`TYPES`]): every matrix in its stored type, norms in f32, and on a GPU the token
/// embeddings dequantized to f32 besides (candle's quantized Llama looks them up that way).
/// Read from the safetensors headers alone; `None` if they cannot be read.
pub fn device_bytes(layout: &WeightsLayout, dtype: &str, on_gpu: bool) -> Option<u64> {
    let (_, dtype) = parse(dtype).ok()??;
    let weights = CheckedWeights::open(layout).ok()?;
    let mut total = 0u64;
    for (name, info) in weights.tensors() {
        let n: usize = info.shape.iter().product();
        let vocabulary = name.contains("embed_tokens") || name.starts_with("lm_head");
        let stored = match (info.shape.len(), vocabulary) {
            (2, true) if dtype != GgmlDType::Q8_0 => GgmlDType::Q8_0,
            (2, _) => dtype,
            _ => GgmlDType::F32,
        };
        total += (n / stored.block_size() * stored.type_size()) as u64;
        if vocabulary && on_gpu && name.contains("embed_tokens") {
            total += n as u64 * 4;
        }
    }
    Some(total)
}

/// The type a tensor is stored in: norms in f32, the vocabulary matrices in Q8_0 unless
/// the type asked for is at least as precise, every other matrix in the type asked for.
fn stored_type(p: &Planned, asked: GgmlDType) -> GgmlDType {
    match (p.matrix, p.vocabulary) {
        (false, _) => GgmlDType::F32,
        (true, true) if asked != GgmlDType::Q8_0 => GgmlDType::Q8_0,
        (true, _) => asked,
    }
}

/// Hugging Face's q/k rows into llama.cpp's rotary layout (the inverse of
/// [`super::convert::unpermute`]): `(heads, 2, d/2, in)` stored as `(heads, d/2, 2, in)`.
pub fn permute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// `t` (f32, bf16 or f16 on the CPU) quantized to `dtype` into `out`, which must hold exactly
/// the quantized bytes: the bytes one `QTensor::quantize` of the whole tensor in f32 gives
/// (blocks never span rows). Each piece of rows is converted to f32 and quantized on its own
/// core, straight into its place in `out`.
pub fn quantize_rows_into(t: &Tensor, dtype: GgmlDType, out: &mut [u8]) -> candle_core::Result<()> {
    use half::slice::HalfFloatSliceExt;
    let t = t.contiguous()?;
    let elements = t.elem_count();
    let rows = if t.rank() <= 1 { 1 } else { t.dim(0)? };
    let columns = elements / rows.max(1);
    if !columns.is_multiple_of(dtype.block_size()) {
        candle_core::bail!("rows of {columns} values do not split into {dtype:?} blocks");
    }
    let row_bytes = columns / dtype.block_size() * dtype.type_size();
    if out.len() != rows * row_bytes {
        candle_core::bail!("{} bytes for {rows} rows of {row_bytes}", out.len());
    }
    let pieces = rayon::current_num_threads().max(1) * 4;
    let per = rows.div_ceil(pieces).max(1);
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("quantization at load reads tensors in CPU memory");
    };
    let at = layout.start_offset();
    // Values [from, to) of the tensor, as f32, into `f` (resized to fit).
    let to_f32 = |from: usize, to: usize, f: &mut Vec<f32>| -> candle_core::Result<()> {
        let (from, to) = (at + from, at + to);
        f.resize(to - from, 0.0);
        match cpu {
            candle_core::CpuStorage::F32(v) => f.copy_from_slice(&v[from..to]),
            candle_core::CpuStorage::BF16(v) => v[from..to].convert_to_f32_slice(f),
            candle_core::CpuStorage::F16(v) => v[from..to].convert_to_f32_slice(f),
            _ => candle_core::bail!("cannot quantize {:?} values", t.dtype()),
        }
        Ok(())
    };
    thread_local! {
        /// Each core's f32 piece, kept between pieces: a fresh multi-megabyte buffer each
        /// time would be mapped, faulted in and cleared by the kernel every time.
        static PIECE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    out.par_chunks_mut(per * row_bytes)
        .enumerate()
        .try_for_each(|(i, chunk)| {
            let first = i * per;
            let count = chunk.len() / row_bytes;
            let (from, to) = (first * columns, (first + count) * columns);
            if dtype == GgmlDType::Q8_0 {
                return PIECE.with_borrow_mut(|values| {
                    to_f32(from, to, values)?;
                    quantize_q8_0(values, chunk);
                    Ok(())
                });
            }
            let mut values = Vec::new();
            to_f32(from, to, &mut values)?;
            // A tensor of its own: `QTensor::quantize` reads a view's whole storage.
            let part = Tensor::from_vec(values, (count, columns), &Device::Cpu)?;
            chunk.copy_from_slice(&QTensor::quantize(&part, dtype)?.data()?);
            Ok(())
        })
}

/// Q8_0 blocks of `xs` into `out` (34 bytes per 32 values: an f16 scale, then 32 signed
/// bytes), bit for bit what candle's (and llama.cpp's reference) quantizer writes. candle's
/// rounds each value through a `roundf` call; compiled for AVX2 the same rounding runs as
/// vector instructions, several times faster.
fn quantize_q8_0(xs: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { quantize_q8_0_avx2(xs, out) };
        return;
    }
    quantize_q8_0_blocks(xs, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_0_avx2(xs: &[f32], out: &mut [u8]) {
    quantize_q8_0_blocks(xs, out);
}

#[inline(always)]
fn quantize_q8_0_blocks(xs: &[f32], out: &mut [u8]) {
    for (x, block) in xs.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let mut q = [0u8; 32];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * id).round() as i8 as u8;
        }
        block[2..].copy_from_slice(&q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantize_rows(t: &Tensor, dtype: GgmlDType) -> candle_core::Result<Vec<u8>> {
        let mut out = vec![0u8; t.elem_count() / dtype.block_size() * dtype.type_size()];
        quantize_rows_into(t, dtype, &mut out)?;
        Ok(out)
    }

    #[test]
    fn names_parse_and_bad_ones_are_refused_with_the_choices() {
        assert_eq!(parse("q8_0").unwrap().unwrap().1, GgmlDType::Q8_0);
        assert_eq!(parse("Q4_K").unwrap().unwrap().1, GgmlDType::Q4K);
        assert_eq!(parse("q4k").unwrap().unwrap().1, GgmlDType::Q4K);
        assert!(parse("off").unwrap().is_none());
        assert!(parse("").unwrap().is_none());
        let e = parse("q3").unwrap_err();
        assert!(
            e.contains("q3") && e.contains("q8_0") && e.contains("off"),
            "{e}"
        );
    }

    /// Quantizing rows on all cores gives the bytes one whole-tensor quantization gives.
    #[test]
    fn row_split_quantization_equals_whole_tensor_quantization() {
        let t = Tensor::randn(0f32, 1.0, (97, 256), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::F32,
        ] {
            let whole = QTensor::quantize(&t, dtype)
                .unwrap()
                .data()
                .unwrap()
                .into_owned();
            assert_eq!(quantize_rows(&t, dtype).unwrap(), whole, "{dtype:?}");
            // bf16 and f16 weights: converted piece by piece, the same bytes as converting
            // the whole tensor first.
            for half in [DType::BF16, DType::F16] {
                let h = t.to_dtype(half).unwrap();
                let f = h.to_dtype(DType::F32).unwrap();
                let whole = QTensor::quantize(&f, dtype)
                    .unwrap()
                    .data()
                    .unwrap()
                    .into_owned();
                assert_eq!(
                    quantize_rows(&h, dtype).unwrap(),
                    whole,
                    "{dtype:?} {half:?}"
                );
            }
        }
        // Ties round away from zero, a zero block has scale 0, and the largest value maps
        // to ±127, exactly as candle's quantizer does.
        let mut edges = vec![0f32; 32];
        edges.extend([127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -126.5, 126.5]);
        edges.extend((0..24).map(|i| i as f32 * 3.3 - 40.0));
        edges.extend((0..32).map(|i| (i as f32 - 16.0) * 1e-30));
        let edges = Tensor::from_vec(edges, (3, 32), &Device::Cpu).unwrap();
        let want = QTensor::quantize(&edges, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        assert_eq!(quantize_rows(&edges, GgmlDType::Q8_0).unwrap(), want);
        // A view (rows 48..97) quantizes as that view, not as the storage under it.
        let view = t.narrow(0, 48, 49).unwrap();
        let rows = Tensor::from_vec(
            view.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (49, 256),
            &Device::Cpu,
        )
        .unwrap();
        let want = QTensor::quantize(&rows, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        assert_eq!(quantize_rows(&view, GgmlDType::Q8_0).unwrap(), want);
    }

    /// The permutation is the inverse of the one `runner convert` undoes.
    #[test]
    fn permute_inverts_convert_unpermute() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let back = super::super::convert::unpermute(&permute(&w, 2).unwrap(), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_ne!(
            permute(&w, 2).unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }

    /// A small Llama in f32 safetensors (2 layers of 64, vocabulary 128), as a model
    /// directory.
    fn tiny_llama(tie: bool) -> (tempfile::TempDir, ModelDir) {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("weights");
        std::fs::create_dir(&weights).unwrap();
        std::fs::write(
            dir.path().join("cog.yaml"),
            "model: local/tiny\nrun: \"candle:llama\"\nweights:\n  - name: tiny\n    target: /src/weights\n    source:\n      uri: ./weights\n",
        )
        .unwrap();
        let config = serde_json::json!({"hidden_size": 64, "intermediate_size": 128, "vocab_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
            "tie_word_embeddings": tie});
        std::fs::write(weights.join("config.json"), config.to_string()).unwrap();
        let values = |n: usize| {
            (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect::<Vec<_>>()
        };
        let mut tensors: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![128, 64]),
            ("model.norm.weight".into(), vec![64]),
        ];
        if !tie {
            tensors.push(("lm_head.weight".into(), vec![128, 64]));
        }
        for l in 0..2 {
            for (part, shape) in [
                ("input_layernorm", vec![64]),
                ("post_attention_layernorm", vec![64]),
                ("self_attn.q_proj", vec![64, 64]),
                ("self_attn.k_proj", vec![32, 64]),
                ("self_attn.v_proj", vec![32, 64]),
                ("self_attn.o_proj", vec![64, 64]),
                ("mlp.gate_proj", vec![128, 64]),
                ("mlp.up_proj", vec![128, 64]),
                ("mlp.down_proj", vec![64, 128]),
            ] {
                tensors.push((format!("model.layers.{l}.{part}.weight"), shape));
            }
        }
        let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone(), values(s.iter().product())))
            .collect();
        crate::weights::write_f32_safetensors(&weights.join("model.safetensors"), &tensors)
            .unwrap();
        let model = ModelDir::open(dir.path()).unwrap();
        (dir, model)
    }

    fn weights(model: &ModelDir) -> CheckedWeights {
        CheckedWeights::open(&model.weights).unwrap()
    }

    fn config(model: &ModelDir) -> full::LlamaConfig {
        crate::weights::read_json_config(&model.weights, "config.json", "llama")
            .unwrap()
            .1
    }

    /// The device memory a quantized model takes is known from the headers before any
    /// quantizing, to the padding between tensors; vocabulary matrices stay Q8_0.
    #[test]
    fn the_quantized_size_is_known_before_quantizing() {
        for tie in [false, true] {
            let (_dir, model) = tiny_llama(tie);
            let log = |_: &str| {};
            let ctx = LoadContext::new(&log);
            for name in ["q8_0", "q4_1", "q5_0"] {
                let q = quantize(
                    &weights(&model),
                    &config(&model),
                    parse(name).unwrap().unwrap(),
                    &ctx,
                )
                .unwrap();
                let estimate = device_bytes(&model.weights, name, false).unwrap();
                let tensors = q.content.tensor_infos.len() as u64;
                assert!(
                    q.quantized_bytes >= estimate && q.quantized_bytes - estimate < 32 * tensors,
                    "{name}: {} quantized, {estimate} estimated",
                    q.quantized_bytes
                );
                let embeddings = &q.content.tensor_infos["token_embd.weight"];
                assert_eq!(embeddings.ggml_dtype, GgmlDType::Q8_0, "{name}");
                assert_eq!(q.content.tensor_infos.contains_key("output.weight"), !tie);
                // On a GPU the embeddings are also held dequantized.
                assert_eq!(
                    device_bytes(&model.weights, name, true).unwrap(),
                    estimate + 128 * 64 * 4
                );
            }
        }
    }

    /// A restore builds the tensor table only: nothing is read or quantized.
    #[test]
    fn a_restore_builds_the_table_without_quantizing() {
        let (_dir, model) = tiny_llama(false);
        let log = |_: &str| {};
        let ctx = LoadContext::restored(&log, Vec::new());
        let q = quantize(
            &weights(&model),
            &config(&model),
            parse("q4_1").unwrap().unwrap(),
            &ctx,
        )
        .unwrap();
        assert!(q.data.is_empty());
        assert_eq!(q.content.tensor_infos.len(), 3 + 2 * 9);
        assert_eq!(
            q.content.tensor_infos["blk.1.attn_k.weight"].ggml_dtype,
            GgmlDType::Q4_1
        );
    }

    /// Weights that do not match config.json are refused before anything is quantized,
    /// naming the tensor: one missing, one of another shape, a head count that does not
    /// divide the width.
    #[test]
    fn mismatched_weights_are_refused_by_name() {
        let (dir, model) = tiny_llama(false);
        let log = |_: &str| {};
        let ctx = LoadContext::new(&log);
        let q8 = parse("q8_0").unwrap().unwrap();
        let refusal = |config: &full::LlamaConfig| {
            quantize(&weights(&model), config, q8, &ctx)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let mut config = config(&model);
        config.num_hidden_layers = 3;
        let e = refusal(&config);
        assert!(
            e.contains("model.layers.2.") && e.contains("3 layers"),
            "{e}"
        );
        let mut config = self::config(&model);
        config.intermediate_size = 96;
        let e = refusal(&config);
        assert!(
            e.contains("mlp.gate_proj") && e.contains("[128, 64]") && e.contains("[96, 64]"),
            "{e}"
        );
        let mut config = self::config(&model);
        config.num_attention_heads = 5;
        let e = refusal(&config);
        assert!(e.contains("5 attention heads"), "{e}");
        drop(dir);
    }
}
