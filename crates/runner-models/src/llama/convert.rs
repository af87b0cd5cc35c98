//! GGUF → safetensors for any Llama GGUF: every tensor dequantized (f32 or bf16), renamed
//! to Hugging Face's names, q/k projections un-permuted back from llama.cpp's rotary
//! layout, and `config.json` (explicit `rope_theta`), `tokenizer.json` and
//! `tokenizer_config.json` (chat template) written beside them, with a `cog.yaml` that
//! serves the result as `candle:llama`. The output folder appears whole or not at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{open_gguf, tokenizer};
use crate::LoadError;

/// What a conversion wrote.
#[derive(Debug)]
pub struct Converted {
    pub dir: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
}

fn other(e: impl std::fmt::Display) -> LoadError {
    LoadError::Other(e.to_string())
}

/// llama.cpp's tensor names → Hugging Face's.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's q/k permutation (its converter interleaves each head's rotary
/// halves): `(heads, 2, d/2, in)` was stored as `(heads, d/2, 2, in)`.
pub fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, out / heads / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// Converts `gguf` into a model directory at `out` (`cog.yaml` + `weights/`).
/// `dtype` is `f32`, `bf16` or `f16`.
pub fn gguf_to_safetensors(gguf: &Path, out: &Path, dtype: &str) -> Result<Converted, LoadError> {
    let dtype = match dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other_dtype => {
            return Err(other(format!(
                "dtype {other_dtype}: choose f32, bf16 or f16"
            )))
        }
    };
    let (content, mut file) = open_gguf(gguf)?;
    let tok =
        tokenizer::from_gguf(&content).map_err(|e| other(format!("{}: {e}", gguf.display())))?;
    let u32_of = |key: &str| -> Result<u32, LoadError> {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_u32().ok())
            .ok_or_else(|| other(format!("{}: no `{key}` in its metadata", gguf.display())))
    };
    let heads = u32_of("llama.attention.head_count")? as usize;
    let kv_heads = u32_of("llama.attention.head_count_kv").unwrap_or(heads as u32) as usize;
    let layers = u32_of("llama.block_count")? as usize;
    let hidden = u32_of("llama.embedding_length")? as usize;
    let ffn = u32_of("llama.feed_forward_length")? as usize;
    let context = u32_of("llama.context_length").unwrap_or(2048) as usize;
    // GGUF stores these as f32; written through their shortest decimal (1e-5, not 9.99e-6).
    let f32_of = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_f32().ok())
            .and_then(|x| format!("{x}").parse::<f64>().ok())
    };
    let rope_theta = f32_of("llama.rope.freq_base").unwrap_or(10_000.0);
    let rms_eps = f32_of("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
    let chat_template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let bos = content
        .metadata
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.to_u32().ok());
    let eos = content
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok());

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let hf = hf_name(name).ok_or_else(|| {
            other(format!(
                "{}: tensor `{name}` has no counterpart in a Hugging Face Llama; this GGUF is not a plain Llama",
                gguf.display()
            ))
        })?;
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| other(format!("{}: tensor `{name}`: {e}", gguf.display())))?;
        let mut t = q.dequantize(&Device::Cpu).map_err(other)?;
        if name.ends_with("attn_q.weight") {
            t = unpermute(&t, heads).map_err(other)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute(&t, kv_heads).map_err(other)?;
        }
        tensors.insert(hf, t.to_dtype(dtype).map_err(other)?);
    }
    let vocab = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| other(format!("{}: no token_embd.weight", gguf.display())))?
        .dim(0)
        .map_err(other)?;
    let tied = !tensors.contains_key("lm_head.weight");

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "max_position_embeddings": context,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tied,
        "torch_dtype": match dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
        "vocab_size": vocab,
    });
    let token = |id: Option<u32>| {
        id.and_then(|i| tok.id_to_token(i))
            .map(Value::String)
            .unwrap_or(Value::Null)
    };
    let tokenizer_config = json!({
        "add_bos_token": false,
        "bos_token": token(bos),
        "chat_template": chat_template,
        "eos_token": token(eos),
        "model_max_length": context,
    });
    let name: String = gguf
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_else(|| "model".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cog_yaml = format!(
        "# {name}, converted from {} by `runner convert` ({dtype:?}).\nbuild:\n  python_version: \"3.11\"\nmodel: local/{name}\nrun: \"candle:llama\"\nweights:\n  - name: {name}\n    target: /src/weights\n    source:\n      uri: ./weights\n",
        gguf.file_name().unwrap_or_default().to_string_lossy()
    );

    // Built beside `out`, renamed into place once complete.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| other(format!("{}: {e}", parent.display())))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        out.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<u64, String> {
        let _ = std::fs::remove_dir_all(&staging);
        let weights = staging.join("weights");
        std::fs::create_dir_all(&weights).map_err(|e| e.to_string())?;
        let st = weights.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &st).map_err(|e| e.to_string())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o644));
        }
        let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON") + "\n";
        std::fs::write(weights.join("config.json"), pretty(&config)).map_err(|e| e.to_string())?;
        std::fs::write(
            weights.join("tokenizer_config.json"),
            pretty(&tokenizer_config),
        )
        .map_err(|e| e.to_string())?;
        tok.save(weights.join("tokenizer.json"), false)
            .map_err(|e| e.to_string())?;
        std::fs::write(staging.join("cog.yaml"), cog_yaml).map_err(|e| e.to_string())?;
        Ok(std::fs::metadata(&st).map_err(|e| e.to_string())?.len())
    })();
    let bytes = match result {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(other(format!("writing {}: {e}", out.display())));
        }
    };
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| other(format!("{}: {e}", out.display())))?;
    }
    std::fs::rename(&staging, out).map_err(|e| other(format!("{}: {e}", out.display())))?;
    Ok(Converted {
        dir: out.to_path_buf(),
        tensors: tensors.len(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(hf_name("output_norm.weight").unwrap(), "model.norm.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
        assert!(hf_name("blk.x.attn_q.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpps_permutation() {
        // llama.cpp: w.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(out, in).
        let heads = 3;
        let (out, inp) = (heads * 8, 5);
        let w = Tensor::arange(0f32, (out * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, out / heads / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
