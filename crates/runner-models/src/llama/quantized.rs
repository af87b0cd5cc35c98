//! candle-transformers 0.11.1's quantized Llama (`quantized_llama.rs`, Apache-2.0/MIT),
//! trimmed to dense Llama models, with two changes:
//! - On the CPU, Q4_1 and Q8_0 matrices are multiplied by runner's own kernels,
//!   [`PackedMatrix`] (AVX-512 VNNI or AVX2 register tiles; candle 0.11 runs Q4_1 with
//!   scalar code, a tenth of llama.cpp's speed on this model).
//! - The rotary tables cover the model's whole context (candle fixes them at 4096).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

use super::native;
use super::packed::{Kernel, PackedMatrix};
use crate::load::LoadContext;

/// Projections that read the same input, as one matrix whose output is split: one
/// multiplication (and one quantization of the input) instead of several per layer.
#[derive(Debug, Clone)]
struct Fused {
    matrix: QMatMul,
    /// Output columns of each projection, in order.
    widths: Vec<usize>,
}

impl Fused {
    /// Concatenates the rows of same-typed quantized matrices (row-major blocks, so the
    /// bytes simply follow each other); each output is the same dot product as before.
    fn new(parts: &[Arc<QTensor>], device: &Device) -> Result<Self> {
        let dtype = parts[0].dtype();
        let (_, k) = parts[0].shape().dims2()?;
        let mut widths = Vec::with_capacity(parts.len());
        let mut bytes = Vec::new();
        for p in parts {
            widths.push(p.shape().dims2()?.0);
            bytes.extend_from_slice(&p.data()?);
        }
        let rows: usize = widths.iter().sum();
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, dtype)?;
        Ok(Self {
            matrix: matrix(Arc::new(QTensor::new(storage, (rows, k))?))?,
            widths,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        let all = self.matrix.forward(xs)?;
        let mut start = 0;
        let mut outs = Vec::with_capacity(self.widths.len());
        for &w in &self.widths {
            outs.push(all.narrow(candle_core::D::Minus1, start, w)?.contiguous()?);
            start += w;
        }
        Ok(outs)
    }
}

/// Separate projections, or one fused matrix when their types allow it.
#[derive(Debug, Clone)]
enum Projections {
    Fused(Fused),
    Separate(Vec<QMatMul>),
}

impl Projections {
    fn new(parts: Vec<Arc<QTensor>>, device: &Device) -> Result<Self> {
        // Only where runner's own kernels run (the CPU), which compute every output the
        // same way whatever the width. candle picks kernels (and so float order) by shape
        // for other types, so fusing them would change results; CUDA is unmeasured.
        let k = |p: &Arc<QTensor>| p.shape().dims2().map(|(_, k)| k).ok();
        let fusable = device.is_cpu()
            && own_kernel(parts[0].dtype())
            && parts
                .iter()
                .all(|p| p.dtype() == parts[0].dtype() && k(p).is_some() && k(p) == k(&parts[0]));
        if fusable {
            return Ok(Self::Fused(Fused::new(&parts, device)?));
        }
        Ok(Self::Separate(
            parts.into_iter().map(matrix).collect::<Result<_>>()?,
        ))
    }

    fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused(f) => f.forward(xs),
            Self::Separate(ms) => ms.iter().map(|m| m.forward(xs)).collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate, up
    gate_up: Projections,
    down: QMatMul,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up.forward(xs)?;
        self.down
            .forward(&(candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    /// q, k, v
    qkv: Projections,
    wo: QMatMul,
    attention_norm: RmsNorm,
    mlp: Mlp,
    ffn_norm: RmsNorm,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    /// K and V of the positions seen so far, in buffers with room to grow (so a token
    /// appends in place instead of copying the whole cache), and how many are filled.
    kv_cache: Option<(Tensor, Tensor, usize)>,
}

impl Layer {
    /// Appends this step's K and V at `index_pos` and returns views of the whole cache.
    fn append_to_cache(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        index_pos: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, heads, seq_len, d) = k.dims4()?;
        let filled = match &self.kv_cache {
            Some((_, _, filled)) if index_pos > 0 => *filled,
            _ => 0,
        };
        let needed = filled + seq_len;
        let capacity = self
            .kv_cache
            .as_ref()
            .map_or(0, |(kb, _, _)| kb.dim(2).unwrap_or(0));
        if filled == 0 || needed > capacity {
            let new_capacity = needed.max(capacity * 2).max(256);
            let kb = Tensor::zeros((b, heads, new_capacity, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, heads, new_capacity, d), v.dtype(), v.device())?;
            if filled > 0 {
                let (ok, ov, _) = self.kv_cache.as_ref().expect("a filled cache");
                kb.slice_set(&ok.narrow(2, 0, filled)?.contiguous()?, 2, 0)?;
                vb.slice_set(&ov.narrow(2, 0, filled)?.contiguous()?, 2, 0)?;
            }
            self.kv_cache = Some((kb, vb, filled));
        }
        let (kb, vb, _) = self.kv_cache.take().expect("a cache");
        kb.slice_set(&k.contiguous()?, 2, filled)?;
        vb.slice_set(&v.contiguous()?, 2, filled)?;
        let views = (kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?);
        self.kv_cache = Some((kb, vb, needed));
        Ok(views)
    }

    fn rotary(&self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_, _, seq_len, _) = x.dims4()?;
        let cos = self.cos.narrow(0, index_pos, seq_len)?;
        let sin = self.sin.narrow(0, index_pos, seq_len)?;
        // GGUF Llama weights are permuted for the interleaved ("NORM") rotary convention.
        candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
    }

    fn attention(&mut self, x: &Tensor, mask: Option<&Tensor>, index_pos: usize) -> Result<Tensor> {
        let (b_sz, seq_len, n_embd) = x.dims3()?;
        let mut qkv = self.qkv.forward(x)?.into_iter();
        let (q, k, v) = match (qkv.next(), qkv.next(), qkv.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => candle_core::bail!("q, k and v projections expected"),
        };
        let q = q
            .reshape((b_sz, seq_len, self.n_head, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b_sz, seq_len, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b_sz, seq_len, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.rotary(&q, index_pos)?;
        let k = self.rotary(&k, index_pos)?;
        let (k, v) = self.append_to_cache(&k, &v, index_pos)?;
        let n_rep = self.n_head / self.n_kv_head;
        let scale = (self.head_dim as f64).sqrt();
        let y = if seq_len == 1 {
            // Decoding: each KV head's query heads as rows of one matrix, so K and V are
            // read in place instead of repeated per query head.
            let q = q.reshape((b_sz, self.n_kv_head, n_rep, self.head_dim))?;
            let att = (q.matmul(&k.t()?)? / scale)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            att.matmul(&v)?
                .reshape((b_sz, self.n_head, 1, self.head_dim))?
        } else {
            let k = candle_transformers::utils::repeat_kv(k, n_rep)?;
            let v = candle_transformers::utils::repeat_kv(v, n_rep)?;
            let att = (q.matmul(&k.t()?)? / scale)?;
            let att = match mask {
                None => att,
                Some(mask) => {
                    let mask = mask.broadcast_as(att.shape())?;
                    mask.where_cond(&self.neg_inf.broadcast_as(mask.shape().dims())?, &att)?
                }
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            att.matmul(&v.contiguous()?)?
        };
        let y = y.transpose(1, 2)?.reshape(&[b_sz, seq_len, n_embd])?;
        self.wo.forward(&y)
    }
}

/// A dense Llama from a GGUF, with its KV cache (clone it for a fresh cache: the weights
/// are shared): on CPUs with AVX-512 VNNI runner's own forward pass, else candle's.
#[derive(Clone)]
pub enum ModelWeights {
    Candle(CandleWeights),
    Native(native::Model),
}

impl std::fmt::Debug for ModelWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Candle(_) => f.write_str("ModelWeights::Candle"),
            Self::Native(_) => f.write_str("ModelWeights::Native"),
        }
    }
}

impl ModelWeights {
    /// Runner's own forward pass where it runs (CPU with AVX-512 VNNI or AVX2, Q4_1/Q8_0
    /// matrices) unless `RUNNER_LLAMA_CPU=candle`; candle's otherwise.
    ///
    /// `ctx` (a model load's context) makes the load snapshot-aware: recording keeps the
    /// native weights as they are held (packed matrices, norms), and a restore takes them
    /// from the snapshot instead of reading and repacking the GGUF's tensors. Only runner's
    /// own forward pass has a snapshot form.
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        context: usize,
        ctx: Option<&LoadContext>,
        file: Option<&std::fs::File>,
    ) -> Result<Self> {
        let native = chosen_kernel();
        let source = Source {
            ctx,
            file,
            bytes: None,
        };
        Self::load(ct, reader, device, context, native, source)
    }

    /// A model held in memory as GGUF data (tensor offsets into `data`): quantized at load
    /// ([`super::isq`]). Runner's own forward pass packs its matrices straight from `data`;
    /// on a snapshot restore `data` is empty and nothing is read from it.
    pub fn from_gguf_data(
        ct: gguf_file::Content,
        data: &[u8],
        device: &Device,
        context: usize,
        ctx: Option<&LoadContext>,
    ) -> Result<Self> {
        let native = chosen_kernel();
        let source = Source {
            ctx,
            file: None,
            bytes: (!data.is_empty()).then_some(data),
        };
        Self::load(
            ct,
            &mut std::io::Cursor::new(data),
            device,
            context,
            native,
            source,
        )
    }

    /// `native`: the kernel runner's own forward pass multiplies with, where the model
    /// suits it; `None` (or a kernel this CPU lacks): candle's forward pass.
    pub fn from_gguf_with<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        context: usize,
        native: Option<Kernel>,
    ) -> Result<Self> {
        Self::load(ct, reader, device, context, native, Source::default())
    }

    fn load<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        context: usize,
        native: Option<Kernel>,
        source: Source,
    ) -> Result<Self> {
        let ctx = source.ctx;
        let native = native.filter(|k| device.is_cpu() && k.runs_here());
        if let Some(kernel) = native {
            if let Some(weights) = native_weights(&ct, reader, context, kernel, source)? {
                return Ok(Self::Native(native::Model::new(weights)));
            }
        }
        let why = if !device.is_cpu() {
            "on a GPU"
        } else if native.is_none() {
            "RUNNER_LLAMA_CPU=candle, RUNNER_CPU_KERNEL=none, or a CPU without AVX2"
        } else {
            "a weight type or architecture runner's forward pass does not handle"
        };
        Ok(Self::Candle(CandleWeights::from_gguf_in(
            ct, reader, device, context, ctx, why,
        )?))
    }

    /// The kernel runner's own forward pass runs with; `None` on candle's.
    pub fn native_kernel(&self) -> Option<Kernel> {
        match self {
            Self::Native(m) => Some(m.kernel()),
            Self::Candle(_) => None,
        }
    }

    /// Feeds `x` (1 × seq_len token ids) at `index_pos`; the last position's logits (1 × vocab).
    pub fn forward(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        match self {
            Self::Candle(m) => m.forward(x, index_pos),
            Self::Native(m) => {
                let ids = x.to_vec2::<u32>()?;
                let tokens = ids.first().map(Vec::as_slice).unwrap_or_default();
                let logits = m.forward(tokens, index_pos)?;
                let vocab = m.vocab();
                Tensor::from_vec(logits, (1, vocab), &Device::Cpu)
            }
        }
    }
}

/// Runner's own kernel for this CPU, unless `RUNNER_LLAMA_CPU=candle` asks for candle's
/// forward pass.
fn chosen_kernel() -> Option<Kernel> {
    let candle = std::env::var("RUNNER_LLAMA_CPU").is_ok_and(|v| v == "candle");
    if candle {
        None
    } else {
        Kernel::detect()
    }
}

/// Where a load's tensors come from besides the GGUF reader.
#[derive(Clone, Copy, Default)]
pub struct Source<'a, 'b> {
    /// The model load's context: snapshot recording or restoring, progress.
    pub ctx: Option<&'a LoadContext<'b>>,
    /// The GGUF file: runner's own forward pass maps it and packs its matrices straight
    /// from the mapping instead of reading each tensor into a buffer first (candle's path
    /// and a restore do not map it).
    pub file: Option<&'a std::fs::File>,
    /// The GGUF's tensor data already in memory (offsets as in the file), used as the
    /// mapping of `file` would be.
    pub bytes: Option<&'a [u8]>,
}

/// The weights for runner's own forward pass, or `None` where it does not apply (another
/// weight type, a partial rotary embedding, a mixture of experts): candle's path then.
fn native_weights<R: std::io::Seek + std::io::Read>(
    ct: &gguf_file::Content,
    reader: &mut R,
    context: usize,
    kernel: Kernel,
    source: Source,
) -> Result<Option<native::Weights>> {
    let ctx = source.ctx;
    let md = |s: &str| match ct.metadata.get(s) {
        None => candle_core::bail!("cannot find {s} in the GGUF metadata"),
        Some(v) => Ok(v),
    };
    let info = |name: &str| ct.tensor_infos.get(name);
    let own = |name: &str| info(name).is_some_and(|i| PackedMatrix::supports(i.ggml_dtype));
    let block_count = md("llama.block_count")?.to_u32()? as usize;
    let expert_count = md("llama.expert_count")
        .and_then(|v| v.to_u32())
        .unwrap_or(0);
    let heads = md("llama.attention.head_count")?.to_u32()? as usize;
    let kv_heads = md("llama.attention.head_count_kv")?.to_u32()? as usize;
    let embedding_length = md("llama.embedding_length")?.to_u32()? as usize;
    let rope_dim = md("llama.rope.dimension_count")?.to_u32()? as usize;
    if heads == 0
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || !embedding_length.is_multiple_of(heads)
    {
        return Ok(None);
    }
    let head_dim = embedding_length / heads;
    let names = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    let all_own = (0..block_count)
        .all(|i| names.iter().all(|n| own(&format!("blk.{i}.{n}.weight"))))
        && own("token_embd.weight")
        && (info("output.weight").is_none() || own("output.weight"));
    if expert_count > 1 || rope_dim != head_dim || !head_dim.is_multiple_of(2) || !all_own {
        return Ok(None);
    }
    let eps = md("llama.attention.layer_norm_rms_epsilon")?.to_f32()?;
    let freq_base = md("llama.rope.freq_base")
        .and_then(|m| m.to_f32())
        .unwrap_or(10000f32);
    let cpu = Device::Cpu;
    let view = match source.file {
        Some(file) if !ctx.is_some_and(|c| c.is_restore()) => FileView::map(file),
        _ => None,
    };
    let mapped = view.as_ref().map(FileView::bytes).or(source.bytes);
    let matrices = |reader: &mut R, names: &[String]| -> Result<Option<PackedMatrix>> {
        if let Some(file) = mapped {
            // Rows straight from the mapping (open_gguf checked every tensor lies inside the
            // file; checked again here).
            let mut rows: Vec<&[u8]> = Vec::new();
            let mut kind: Option<(GgmlDType, usize)> = None;
            for name in names {
                let Some(i) = info(name) else {
                    candle_core::bail!("cannot find tensor {name} in the GGUF");
                };
                let (r, k) = i.shape.dims2()?;
                if kind.is_some_and(|kind| kind != (i.ggml_dtype, k)) {
                    return Ok(None);
                }
                kind = Some((i.ggml_dtype, k));
                let row_bytes = k / i.ggml_dtype.block_size() * i.ggml_dtype.type_size();
                let start = (ct.tensor_data_offset + i.offset) as usize;
                let Some(data) = file.get(start..start.saturating_add(r * row_bytes)) else {
                    candle_core::bail!("tensor {name} lies past the end of the GGUF");
                };
                if let Some(ctx) = ctx {
                    ctx.advance(data.len() as u64);
                }
                rows.extend(data.chunks_exact(row_bytes.max(1)));
            }
            let Some((dtype, k)) = kind else {
                return Ok(None);
            };
            return Ok(Some(
                PackedMatrix::from_rows(dtype, &rows, k)?.with_kernel(kernel),
            ));
        }
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            parts.push(ct.tensor(reader, name, &cpu)?);
        }
        let dtype = parts[0].dtype();
        let (_, k) = parts[0].shape().dims2()?;
        let mut rows = 0;
        let mut bytes = Vec::new();
        for p in &parts {
            let (r, pk) = p.shape().dims2()?;
            if p.dtype() != dtype || pk != k {
                return Ok(None);
            }
            rows += r;
            bytes.extend_from_slice(&p.data()?);
        }
        Ok(Some(
            PackedMatrix::from_bytes(dtype, &bytes, rows, k)?.with_kernel(kernel),
        ))
    };
    let vector = |reader: &mut R, name: &str| -> Result<Vec<f32>> {
        ct.tensor(reader, name, &cpu)?
            .dequantize(&cpu)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    // With a snapshot: each matrix and norm under its own key, taken from the snapshot on a
    // restore (the GGUF's tensors are not read), kept in it when recording.
    let restoring = ctx.filter(|c| c.is_restore());
    let recording = ctx.filter(|c| c.is_recording());
    let from_snapshot = |ctx: &LoadContext, key: &str| {
        ctx.prepared(key, || {
            candle_core::bail!(
                "tensor `{key}` is missing from the snapshot; take a new one with `runner snapshot`"
            )
        })
    };
    let matrix = |reader: &mut R, key: &str, names: &[String]| -> Result<Option<PackedMatrix>> {
        if let Some(ctx) = restoring {
            let part = |p: &str| from_snapshot(ctx, &format!("{key}.{p}"));
            let m = PackedMatrix::from_snapshot_parts(part)
                .map_err(|e| candle_core::Error::Msg(format!("{key}: {e}")))?;
            return Ok(Some(m.with_kernel(kernel)));
        }
        let mut m = matrices(reader, names)?;
        if let (Some(ctx), Some(m)) = (recording, m.as_mut()) {
            for (p, t) in m.share_snapshot_parts()? {
                ctx.prepared(&format!("{key}.{p}"), || Ok(t))?;
            }
        }
        Ok(m)
    };
    let norm = |reader: &mut R, key: &str, name: &str| -> Result<Vec<f32>> {
        let v = match restoring {
            Some(ctx) => from_snapshot(ctx, key)?.flatten_all()?.to_vec1::<f32>()?,
            None => vector(reader, name)?,
        };
        if v.len() != embedding_length {
            candle_core::bail!(
                "{name}: {} values, the model needs {embedding_length}",
                v.len()
            );
        }
        if let Some(ctx) = recording {
            ctx.prepared(key, || Tensor::from_slice(&v, v.len(), &cpu))?;
        }
        Ok(v)
    };
    // Shapes the forward pass relies on (a restored matrix is checked here, not only when the
    // GGUF was read).
    let fits = |m: &PackedMatrix, columns: usize, inner: usize| -> Result<bool> {
        let fits = m.columns() == columns && m.inner() == inner;
        if !fits && restoring.is_some() {
            candle_core::bail!(
                "snapshot matrix of {} × {}, the model needs {columns} × {inner}; take a new snapshot",
                m.columns(),
                m.inner()
            );
        }
        Ok(fits)
    };
    let mut layers = Vec::with_capacity(block_count);
    let mut ffn_length = 0;
    for i in 0..block_count {
        let n = |name: &str| format!("blk.{i}.{name}.weight");
        let key = |part: &str| format!("runner.llama.blk.{i}.{part}");
        let (Some(qkv), Some(output), Some(gate_up), Some(down)) = (
            matrix(
                reader,
                &key("qkv"),
                &[n("attn_q"), n("attn_k"), n("attn_v")],
            )?,
            matrix(reader, &key("attn_output"), &[n("attn_output")])?,
            matrix(reader, &key("gate_up"), &[n("ffn_gate"), n("ffn_up")])?,
            matrix(reader, &key("ffn_down"), &[n("ffn_down")])?,
        ) else {
            return Ok(None);
        };
        ffn_length = gate_up.columns() / 2;
        if !fits(&qkv, (heads + 2 * kv_heads) * head_dim, embedding_length)?
            || !fits(&output, embedding_length, heads * head_dim)?
            || !fits(&gate_up, 2 * ffn_length, embedding_length)?
            || !fits(&down, embedding_length, ffn_length)?
        {
            return Ok(None);
        }
        layers.push(native::Layer {
            attention_norm: norm(reader, &key("attn_norm"), &n("attn_norm"))?,
            qkv,
            output,
            ffn_norm: norm(reader, &key("ffn_norm"), &n("ffn_norm"))?,
            gate_up,
            down,
        });
    }
    let token_embd = ["token_embd.weight".to_string()];
    let Some(embeddings) = matrix(reader, "runner.llama.token_embd", &token_embd)? else {
        return Ok(None);
    };
    let output = match info("output.weight") {
        Some(_) => matrix(
            reader,
            "runner.llama.output",
            &["output.weight".to_string()],
        )?,
        None => None,
    };
    let vocab = output.as_ref().unwrap_or(&embeddings).columns();
    if !fits(&embeddings, embeddings.columns(), embedding_length)?
        || !output
            .as_ref()
            .map_or(Ok(true), |o| fits(o, vocab, embedding_length))?
    {
        return Ok(None);
    }
    // candle's tables: θ_i = base^(−2i/d), angle = position × θ_i, in f32.
    let half = head_dim / 2;
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / freq_base.powf(i as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(context * half);
    let mut sin = Vec::with_capacity(context * half);
    for pos in 0..context {
        for t in &theta {
            let angle = pos as f32 * t;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok(Some(native::Weights {
        kernel,
        embeddings,
        output,
        norm: norm(reader, "runner.llama.output_norm", "output_norm.weight")?,
        layers,
        heads,
        kv_heads,
        head_dim,
        embedding_length,
        ffn_length,
        vocab,
        eps,
        cos,
        sin,
    }))
}

/// candle's quantized Llama.
#[derive(Debug, Clone)]
pub struct CandleWeights {
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    masks: HashMap<(usize, usize), Tensor>,
}

fn rotary_tables(
    head_dim: usize,
    freq_base: f32,
    positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let theta: Vec<_> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / freq_base.powf(i as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx_theta = Tensor::arange(0, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx_theta.cos()?, idx_theta.sin()?))
}

/// Whether runner's own CPU kernel multiplies this weight type on this CPU.
fn own_kernel(dtype: GgmlDType) -> bool {
    Kernel::detect().is_some() && PackedMatrix::supports(dtype)
}

/// A matrix for `QMatMul`: on the CPU, Q4_1 and Q8_0 go through runner's kernels.
fn matrix(q: Arc<QTensor>) -> Result<QMatMul> {
    if q.device().is_cpu() && own_kernel(q.dtype()) {
        let shape = q.shape().clone();
        let (n, k) = shape.dims2()?;
        let fast = PackedMatrix::from_bytes(q.dtype(), &q.data()?, n, k)?;
        return QMatMul::from_qtensor(QTensor::new(QStorage::Cpu(Box::new(fast)), shape)?);
    }
    QMatMul::from_arc(q)
}

/// Whether [`matrix`] keeps `q` itself: not where runner's CPU kernels repack it, nor where
/// candle's `QMatMul` dequantizes it (float types, or `CANDLE_DEQUANTIZE_ALL[_F16]` set).
fn kept_as_loaded(q: &QTensor) -> bool {
    let set = |name| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
    let repacked = q.device().is_cpu() && own_kernel(q.dtype());
    let dequantized = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        || set("CANDLE_DEQUANTIZE_ALL")
        || set("CANDLE_DEQUANTIZE_ALL_F16");
    !repacked && !dequantized
}

/// Records a quantized tensor the model keeps, for a snapshot, without copying its blocks:
/// its `ggml` part (a few numbers) is held, and its `data` part is made from the tensor
/// itself when the snapshot is written. On a GPU the blocks exist only on the device, and a
/// host copy held meanwhile would be as large as the model.
fn record_shared(
    ctx: &LoadContext,
    ggml_key: &str,
    data_key: &str,
    q: &Arc<QTensor>,
) -> Result<()> {
    let ggml = qtensor_ggml(q)?;
    ctx.prepared(ggml_key, || Ok(ggml))?;
    let shared = Arc::clone(q);
    let padding = block_padding(q.shape().elem_count(), q.dtype());
    ctx.record_deferred(
        data_key,
        DType::U8,
        vec![q.storage_size_in_bytes() + padding],
        Arc::new(move || padded_blocks(&shared)),
    );
    Ok(())
}

impl CandleWeights {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        context: usize,
    ) -> Result<Self> {
        Self::from_gguf_in(ct, reader, device, context, None, "")
    }

    /// With a load's context: a snapshot restore takes every quantized tensor from the
    /// snapshot as it was held (the GGUF's tensors are not read), a recording keeps them.
    /// `why` says why candle's forward pass runs, for a snapshot of runner's own form.
    fn from_gguf_in<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        context: usize,
        ctx: Option<&LoadContext>,
        why: &str,
    ) -> Result<Self> {
        let md = |s: &str| match ct.metadata.get(s) {
            None => candle_core::bail!("cannot find {s} in the GGUF metadata"),
            Some(v) => Ok(v),
        };
        if md("llama.expert_count")
            .and_then(|v| v.to_u32())
            .unwrap_or(0)
            > 1
        {
            candle_core::bail!("mixture-of-experts Llama GGUFs are not supported by candle:llama");
        }
        let head_count = md("llama.attention.head_count")?.to_u32()? as usize;
        let head_count_kv = md("llama.attention.head_count_kv")?.to_u32()? as usize;
        let block_count = md("llama.block_count")?.to_u32()? as usize;
        let embedding_length = md("llama.embedding_length")?.to_u32()? as usize;
        let rope_dim = md("llama.rope.dimension_count")?.to_u32()? as usize;
        let rms_norm_eps = md("llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let rope_freq_base = md("llama.rope.freq_base")
            .and_then(|m| m.to_f32())
            .unwrap_or(10000f32);
        let (cos, sin) = rotary_tables(rope_dim, rope_freq_base, context, device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;

        let restoring = ctx.filter(|c| c.is_restore());
        let recording = ctx.filter(|c| c.is_recording());
        let build_started = std::time::Instant::now();
        let metadata = HostCopies::default();
        let mut restore_time = std::time::Duration::ZERO;
        let mut restored = 0usize;
        // `shared`: the model keeps this tensor, so a recording for a snapshot shares it
        // instead of holding a copy of its blocks (see `record_shared`); otherwise (norms,
        // the token embeddings when they are dequantized and dropped) it copies them.
        let mut tensor = |name: &str, shared: bool| -> Result<Arc<QTensor>> {
            let key = |part: &str| format!("runner.llama.q.{name}.{part}");
            if let Some(ctx) = restoring {
                let part = |p: &str| {
                    ctx.prepared(&key(p), || {
                        candle_core::bail!(
                            "tensor `{}` is missing from the snapshot: it holds another form of the weights (runner's own CPU form, or other weights), and this load runs candle's forward pass ({why}); take a new snapshot with the same settings",
                            key(p)
                        )
                    })
                };
                let started = std::time::Instant::now();
                let q = snapshot_qtensor_with(part, device, &metadata)
                    .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")));
                restore_time += started.elapsed();
                restored += 1;
                return q.map(Arc::new);
            }
            let q = Arc::new(ct.tensor(reader, name, device)?);
            // Where the model does not keep the blocks as they are (runner's CPU kernels
            // repack them, candle dequantizes float types), sharing would keep them alive
            // beside what the model made of them: a copy costs no more.
            let kept = shared && kept_as_loaded(&q);
            match recording {
                Some(ctx) if kept => record_shared(ctx, &key("ggml"), &key("data"), &q)?,
                Some(ctx) => {
                    for (p, t) in qtensor_parts(&q)? {
                        ctx.prepared(&key(p), || Ok(t))?;
                    }
                }
                None => {}
            }
            Ok(q)
        };
        // A tensor nothing else holds (not shared with a recording) back out of its `Arc`.
        let owned = |q: Arc<QTensor>| {
            Arc::try_unwrap(q)
                .map_err(|_| candle_core::Error::Msg("a quantized tensor taken twice".into()))
        };
        // Tied embeddings: no output.weight, the token embeddings project back (and so the
        // model keeps their quantized form).
        let tied = !ct.tensor_infos.contains_key("output.weight");
        let embeddings_q = tensor("token_embd.weight", tied)?;
        let dequantizing = std::time::Instant::now();
        let embeddings = embeddings_q.dequantize(device)?;
        let dequantized = dequantizing.elapsed();
        let norm =
            RmsNorm::from_qtensor(owned(tensor("output_norm.weight", false)?)?, rms_norm_eps)?;
        let output = match tied {
            false => tensor("output.weight", true)?,
            true => embeddings_q,
        };
        let mut layers = Vec::with_capacity(block_count);
        for i in 0..block_count {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}.weight"), true);
            let qkv = Projections::new(vec![t("attn_q")?, t("attn_k")?, t("attn_v")?], device)?;
            let wo = matrix(t("attn_output")?)?;
            let mut t =
                |name: &str| tensor(&format!("blk.{i}.{name}.weight"), false).and_then(owned);
            let attention_norm = RmsNorm::from_qtensor(t("attn_norm")?, rms_norm_eps)?;
            let ffn_norm = RmsNorm::from_qtensor(t("ffn_norm")?, rms_norm_eps)?;
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}.weight"), true);
            layers.push(Layer {
                qkv,
                wo,
                attention_norm,
                mlp: Mlp {
                    gate_up: Projections::new(vec![t("ffn_gate")?, t("ffn_up")?], device)?,
                    down: matrix(t("ffn_down")?)?,
                },
                ffn_norm,
                n_head: head_count,
                n_kv_head: head_count_kv,
                head_dim: embedding_length / head_count,
                cos: cos.clone(),
                sin: sin.clone(),
                neg_inf: neg_inf.clone(),
                kv_cache: None,
            });
        }
        let output = matrix(output)?;
        if let Some(ctx) = restoring.filter(|_| !device.is_cpu()) {
            // Where a restored start's "model build" goes on a GPU (each kernel module
            // loads as it is first used, inside these; the setup log's "candle's CUDA
            // kernels" line has their time).
            ctx.log(&format!(
                "llama: built from the snapshot in {:.3}s: {restored} quantized tensors taken from the restored arenas in {:.3}s (their metadata read to the host {} time(s)), the token embeddings dequantized in {:.3}s",
                build_started.elapsed().as_secs_f64(),
                restore_time.as_secs_f64(),
                metadata.reads.get(),
                dequantized.as_secs_f64()
            ));
        }
        Ok(Self {
            embeddings: Embedding::new(embeddings, embedding_length),
            layers,
            norm,
            output,
            masks: HashMap::new(),
        })
    }

    fn mask(&mut self, seq_len: usize, index_pos: usize, device: &Device) -> Result<Tensor> {
        let key = (seq_len, index_pos + seq_len);
        if let Some(mask) = self.masks.get(&key) {
            return Ok(mask.clone());
        }
        let mask = candle_transformers::utils::build_causal_mask(seq_len, index_pos, device)?;
        self.masks.insert(key, mask.clone());
        Ok(mask)
    }

    /// Feeds `x` (1 × seq_len token ids) at `index_pos`; the last position's logits.
    pub fn forward(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_, seq_len) = x.dims2()?;
        let mask = if seq_len == 1 {
            None
        } else {
            Some(self.mask(seq_len, index_pos, x.device())?)
        };
        let mut h = self.embeddings.forward(x)?;
        for layer in self.layers.iter_mut() {
            let residual = &h;
            let a =
                layer.attention(&layer.attention_norm.forward(&h)?, mask.as_ref(), index_pos)?;
            let h2 = (a + residual)?;
            let m = layer.mlp.forward(&layer.ffn_norm.forward(&h2)?)?;
            h = (m + h2)?;
        }
        let h = self.norm.forward(&h)?;
        self.output.forward(&h.i((.., seq_len - 1, ..))?)
    }
}

/// GGML's own type numbers, which a snapshot's `ggml` part records.
const GGML_TYPES: &[(u32, GgmlDType)] = &[
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

/// A quantized tensor as snapshot parts: `ggml` (its GGML type number, then its dims) and
/// `data` (its blocks as bytes, exactly as the device holds them, then the zeros candle's
/// CUDA kernels read past them: [`block_padding`]).
pub fn qtensor_parts(q: &QTensor) -> Result<[(&'static str, Tensor); 2]> {
    let ggml = qtensor_ggml(q)?;
    let data = padded_blocks(q)?;
    let bytes = Tensor::from_slice(&data, data.len(), &Device::Cpu)?;
    Ok([("ggml", ggml), ("data", bytes)])
}

/// Values past a quantized matrix's last row that candle's CUDA matrix kernels read
/// (`MATRIX_ROW_PADDING` in candle-core's `quantized/cuda.rs`), as zeros.
const MATRIX_ROW_PADDING: usize = 512;
#[cfg(feature = "cuda")]
const _: () = assert!(MATRIX_ROW_PADDING == candle_core::quantized::cuda::MATRIX_ROW_PADDING);

/// The zero bytes a snapshot stores after a quantized tensor's blocks: what candle's CUDA
/// storage allocates past them ([`MATRIX_ROW_PADDING`] values' worth of blocks). With them
/// in the snapshot, a CUDA restore can hand the restored bytes to the model as they lie
/// (`RUNNER_CUDA_QUANTIZED_RESTORE=in-place`) instead of copying them into new storage.
fn block_padding(elements: usize, dtype: GgmlDType) -> usize {
    let blocks = |n: usize| n.div_ceil(dtype.block_size()) * dtype.type_size();
    blocks(elements + MATRIX_ROW_PADDING) - blocks(elements)
}

/// A quantized tensor's blocks followed by its [`block_padding`].
fn padded_blocks(q: &QTensor) -> Result<Vec<u8>> {
    let blocks = q.data()?;
    let len = blocks.len() + block_padding(q.shape().elem_count(), q.dtype());
    // Exactly as large: growing a copy of the blocks would double its capacity.
    let mut data = Vec::with_capacity(len);
    data.extend_from_slice(&blocks);
    data.resize(len, 0);
    Ok(data)
}

/// How a CUDA restore gives candle the restored quantized blocks
/// (`RUNNER_CUDA_QUANTIZED_RESTORE`): `copy` (the default until a GPU has measured the
/// other) copies them on the device into storage of their own, so for a moment they are
/// held twice; `in-place` lets the storage borrow them where they were restored.
pub fn quantized_restore_in_place() -> bool {
    std::env::var("RUNNER_CUDA_QUANTIZED_RESTORE").as_deref() == Ok("in-place")
}

/// The `ggml` part of [`qtensor_parts`]: the tensor's GGML type number, then its dims.
fn qtensor_ggml(q: &QTensor) -> Result<Tensor> {
    let Some(&(code, _)) = GGML_TYPES.iter().find(|(_, t)| *t == q.dtype()) else {
        candle_core::bail!("no snapshot form for {:?} tensors", q.dtype());
    };
    let mut ggml = vec![code];
    ggml.extend(q.shape().dims().iter().map(|&d| d as u32));
    Tensor::new(ggml.as_slice(), &Device::Cpu)
}

/// Host copies of the restored arenas that small metadata tensors (the `ggml` parts) are
/// views into. candle's `to_vec1` copies a GPU tensor's whole storage and waits for the
/// stream, so reading each of a Llama's ~200 `ggml` parts that way cost ~200 synchronous
/// copies of the same arena: it is copied once per build here instead.
#[derive(Default)]
struct HostCopies {
    /// The arena last copied: its device address and length, and its values.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    arena: std::cell::RefCell<Option<(u64, usize, Vec<u32>)>>,
    /// How many times an arena was copied to the host.
    reads: std::cell::Cell<usize>,
}

impl HostCopies {
    /// `t`'s values (a rank-1 u32 tensor), from the host copy of its arena on a GPU.
    fn u32_values(&self, t: &Tensor) -> Result<Vec<u32>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = t.device() {
            use candle_core::backend::BackendStorage;
            use candle_core::cuda_backend::cudarc::driver::DevicePtr;
            let (guard, layout) = t.storage_and_layout();
            let candle_core::Storage::Cuda(storage) = &*guard else {
                candle_core::bail!("a CUDA tensor without CUDA storage");
            };
            let Some((from, to)) = layout.contiguous_offsets() else {
                drop(guard);
                return t.to_vec1();
            };
            let slice = storage.as_cuda_slice::<u32>()?;
            let address = slice.device_ptr(&cuda.cuda_stream()).0;
            let mut arena = self.arena.borrow_mut();
            if !matches!(&*arena, Some((a, n, _)) if *a == address && *n == slice.len()) {
                let candle_core::CpuStorage::U32(values) = storage.to_cpu_storage()? else {
                    candle_core::bail!("snapshot metadata is not u32");
                };
                self.reads.set(self.reads.get() + 1);
                *arena = Some((address, slice.len(), values));
            }
            let values = &arena.as_ref().expect("filled above").2;
            return Ok(values[from..to].to_vec());
        }
        t.to_vec1()
    }
}

/// The quantized tensor [`qtensor_parts`] made, on `device`. The data's length is checked
/// against the type and dims, so no kernel reads past it. On CUDA the blocks are copied
/// from the restored arena on the device; nothing goes through the host.
pub fn snapshot_qtensor(part: impl Fn(&str) -> Result<Tensor>, device: &Device) -> Result<QTensor> {
    snapshot_qtensor_with(part, device, &HostCopies::default())
}

/// [`snapshot_qtensor`], reading the `ggml` part through `metadata`'s host copies.
fn snapshot_qtensor_with(
    part: impl Fn(&str) -> Result<Tensor>,
    device: &Device,
    metadata: &HostCopies,
) -> Result<QTensor> {
    let ggml: Vec<u32> = metadata.u32_values(&part("ggml")?.flatten_all()?)?;
    let Some((&code, dims)) = ggml.split_first() else {
        candle_core::bail!("snapshot tensor with an empty `ggml` part");
    };
    let Some(&(_, dtype)) = GGML_TYPES.iter().find(|(c, _)| *c == code) else {
        candle_core::bail!("snapshot tensor of unknown GGML type {code}");
    };
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let Some(elements) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
        candle_core::bail!("snapshot tensor of dims {dims:?}: too many values");
    };
    let data = part("data")?;
    let want = elements / dtype.block_size() * dtype.type_size();
    // Snapshots since stop 35 store the blocks' padding after them; older ones do not.
    let padded = want + block_padding(elements, dtype);
    if dims.is_empty()
        || !elements.is_multiple_of(dtype.block_size())
        || data.dtype() != DType::U8
        || (data.elem_count() != want && data.elem_count() != padded)
    {
        candle_core::bail!(
            "snapshot {dtype:?} tensor of dims {dims:?}: {} {:?} values, expected {want} bytes (or {padded} with their padding)",
            data.elem_count(),
            data.dtype()
        );
    }
    let storage = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) if data.elem_count() == padded && quantized_restore_in_place() => {
            QStorage::Cuda(cuda_qstorage_in_place(cuda, &data, want, dtype)?)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => QStorage::Cuda(cuda_qstorage(cuda, &data, elements, want, dtype)?),
        _ => {
            // One copy, out of the restored memory (a mapping of the snapshot on the CPU;
            // tensors there are 256-byte aligned, as the blocks' fields need).
            let data = data.to_device(&Device::Cpu)?;
            let (storage, layout) = data.storage_and_layout();
            let candle_core::Storage::Cpu(candle_core::CpuStorage::U8(bytes)) = &*storage else {
                candle_core::bail!("restored snapshot data is not bytes in CPU memory");
            };
            let at = layout.start_offset();
            QStorage::from_data(
                std::borrow::Cow::Borrowed(&bytes[at..at + want]),
                device,
                dtype,
            )?
        }
    };
    QTensor::new(storage, dims)
}

/// Runs `use_it` with the device address where the restored view `data` (one contiguous
/// range of its arena) starts, and `cuda`'s stream, while the view's storage is held.
#[cfg(feature = "cuda")]
fn with_restored_address<T>(
    cuda: &candle_core::CudaDevice,
    data: &Tensor,
    use_it: impl FnOnce(u64, &candle_core::cuda_backend::cudarc::driver::CudaStream) -> Result<T>,
) -> Result<T> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (source, layout) = data.storage_and_layout();
    let candle_core::Storage::Cuda(source) = &*source else {
        candle_core::bail!("restored snapshot data is not on the GPU");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("restored snapshot data is not one contiguous range");
    }
    let stream = cuda.cuda_stream();
    let slice = source.as_cuda_slice::<u8>()?;
    let (base, _guard) = slice.device_ptr(&stream);
    use_it(base + layout.start_offset() as u64, &stream)
}

/// A device copy of restored blocks into candle's own (padded) quantized storage, on the
/// device's stream, so the kernels that use it are ordered after it.
#[cfg(feature = "cuda")]
fn cuda_qstorage(
    cuda: &candle_core::CudaDevice,
    data: &Tensor,
    elements: usize,
    bytes: usize,
    dtype: GgmlDType,
) -> Result<candle_core::quantized::cuda::QCudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let storage = candle_core::quantized::cuda::QCudaStorage::zeros(cuda, elements, dtype)?;
    let data = data.to_device(&Device::Cuda(cuda.clone()))?;
    let to = storage.device_ptr()? as u64;
    with_restored_address(cuda, &data, |from, stream| {
        // SAFETY: `from` holds `bytes` restored bytes and `to` is a fresh allocation of at
        // least `bytes`; both live until the stream has run the copy (the view's storage is
        // held meanwhile, and `storage` is returned to the caller).
        unsafe { result::memcpy_dtod_async(to, from, bytes, stream.cu_stream()) }.map_err(|e| {
            candle_core::Error::Msg(format!("cannot copy restored blocks on the GPU: {e}"))
        })
    })?;
    Ok(storage)
}

/// Restored blocks, with their padding, handed to candle's quantized storage where they lie
/// in the restored arena: no allocation and no copy, and the arena stays allocated while
/// the model holds any of them (`RUNNER_CUDA_QUANTIZED_RESTORE=in-place`; unverified on a
/// GPU).
#[cfg(feature = "cuda")]
fn cuda_qstorage_in_place(
    cuda: &candle_core::CudaDevice,
    data: &Tensor,
    bytes: usize,
    dtype: GgmlDType,
) -> Result<candle_core::quantized::cuda::QCudaStorage> {
    let data = data.to_device(&Device::Cuda(cuda.clone()))?;
    let address = with_restored_address(cuda, &data, |address, _| Ok(address))?;
    let padded = data.elem_count();
    // SAFETY: `address..address + padded` is the view's range of its arena, on `cuda`'s
    // context: the restore wrote it and synchronized its stream before the model saw it,
    // nothing writes it after, and `data` (kept alive by the storage) keeps the arena.
    unsafe {
        candle_core::quantized::cuda::QCudaStorage::from_borrowed_blocks(
            cuda,
            address,
            bytes,
            padded,
            dtype,
            Arc::new(data),
        )
    }
}

/// A read-only mapping of a whole file, for the span of a load: the GGUF's tensors are
/// packed straight from the page cache instead of being read into buffers first. As with
/// any mapped load, rewriting the file in place meanwhile would fault the process.
struct FileView {
    ptr: *mut libc::c_void,
    len: usize,
}

impl FileView {
    /// `None` when the file cannot be mapped (the reader path is used then).
    fn map(file: &std::fs::File) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh read-only private mapping of an open file; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Self { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `ptr`, mapped until drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for FileView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`; nothing borrowed from it outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quantized tensor's snapshot parts give back the same blocks; parts that do not
    /// describe them (another length, an unknown type, no dims, dims that overflow) are
    /// refused instead of handed to a kernel.
    #[test]
    fn qtensor_snapshot_parts_round_trip_and_bad_ones_are_refused() {
        let w = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::F32] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let parts: HashMap<&str, Tensor> = qtensor_parts(&q).unwrap().into_iter().collect();
            let back = snapshot_qtensor(|p| Ok(parts[p].clone()), &Device::Cpu).unwrap();
            assert_eq!(back.dtype(), dtype);
            assert_eq!(back.shape().dims(), &[8, 64]);
            assert_eq!(back.data().unwrap(), q.data().unwrap(), "{dtype:?}");
        }
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let parts: HashMap<&str, Tensor> = qtensor_parts(&q).unwrap().into_iter().collect();
        let with = |ggml: &[u32], data: Tensor| {
            let ggml = Tensor::new(ggml, &Device::Cpu).unwrap();
            snapshot_qtensor(
                |p| {
                    Ok(if p == "ggml" {
                        ggml.clone()
                    } else {
                        data.clone()
                    })
                },
                &Device::Cpu,
            )
            .map(|_| ())
            .unwrap_err()
            .to_string()
        };
        let data = parts["data"].clone();
        let short = data.narrow(0, 0, data.elem_count() - 1).unwrap();
        assert!(with(&[8, 8, 64], short).contains("expected 544 bytes"));
        assert!(with(&[99, 8, 64], data.clone()).contains("unknown GGML type 99"));
        assert!(with(&[], data.clone()).contains("empty"));
        assert!(with(&[8, u32::MAX, u32::MAX, u32::MAX], data.clone()).contains("too many"));
        assert!(with(&[8, 8, 60], data).contains("expected"));
    }

    /// Snapshots store each tensor's blocks followed by the zeros candle's CUDA storage puts
    /// after them (so a CUDA restore can use them in place), and still read the older form
    /// without them.
    #[test]
    fn qtensor_snapshot_parts_carry_the_kernels_padding_and_older_parts_still_load() {
        let w = Tensor::randn(0f32, 1.0, (4, 512), &Device::Cpu).unwrap();
        // Q8_0: 512 values' worth of 32-value blocks of 34 bytes; Q4_K: 2 blocks of 256
        // values in 144 bytes; F32 (norms): 512 values of 4 bytes.
        for (dtype, padding) in [
            (GgmlDType::Q8_0, 544),
            (GgmlDType::Q4K, 288),
            (GgmlDType::F32, 2048),
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let blocks = q.data().unwrap().into_owned();
            let parts: HashMap<&str, Tensor> = qtensor_parts(&q).unwrap().into_iter().collect();
            let data: Vec<u8> = parts["data"].to_vec1().unwrap();
            assert_eq!(data.len(), blocks.len() + padding, "{dtype:?}");
            assert_eq!(&data[..blocks.len()], &blocks[..], "{dtype:?}");
            assert!(data[blocks.len()..].iter().all(|&b| b == 0), "{dtype:?}");
            let older = Tensor::from_slice(&blocks, blocks.len(), &Device::Cpu).unwrap();
            for data in [parts["data"].clone(), older] {
                let back = snapshot_qtensor(
                    |p| {
                        Ok(if p == "ggml" {
                            parts["ggml"].clone()
                        } else {
                            data.clone()
                        })
                    },
                    &Device::Cpu,
                )
                .unwrap();
                assert_eq!(back.data().unwrap(), blocks, "{dtype:?}");
            }
        }
    }

    #[test]
    fn fused_projections_equal_separate_ones() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 64), &dev).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let k = if dtype == GgmlDType::Q4K { 256 } else { 64 };
            let x = if k == 64 {
                x.clone()
            } else {
                Tensor::randn(0f32, 1.0, (3, k), &dev).unwrap()
            };
            let weights: Vec<Tensor> = [8usize, 4, 4]
                .iter()
                .map(|&n| Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap())
                .collect();
            let quantized = || -> Vec<Arc<QTensor>> {
                weights
                    .iter()
                    .map(|w| Arc::new(QTensor::quantize(w, dtype).unwrap()))
                    .collect()
            };
            let fused = Projections::new(quantized(), &dev).unwrap();
            // Only runner's kernels' types are fused; others keep candle's own kernels.
            assert_eq!(matches!(fused, Projections::Fused(_)), own_kernel(dtype));
            let separate = Projections::Separate(
                quantized()
                    .into_iter()
                    .map(|q| matrix(q).unwrap())
                    .collect(),
            );
            for (a, b) in fused
                .forward(&x)
                .unwrap()
                .iter()
                .zip(separate.forward(&x).unwrap())
            {
                assert_eq!(
                    a.to_vec2::<f32>().unwrap(),
                    b.to_vec2::<f32>().unwrap(),
                    "{dtype:?}"
                );
            }
        }
    }
}
