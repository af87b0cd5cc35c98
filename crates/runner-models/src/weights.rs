//! Safetensors weights, checked before use.
//!
//! Every file's header is read and checked against the file's size before anything is
//! mapped, so a truncated or corrupt download is reported by file and tensor instead of
//! surfacing as a crash or a wrong answer. Loading goes through [`CheckedWeights`], a
//! candle `VarBuilder` backend that names the file and tensor in every error: missing
//! tensors, wrong shapes and non-float dtypes.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use runner_spec::WeightsLayout;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },
    #[error("{0}")]
    Missing(String),
}

fn file_err(file: &Path, message: impl Into<String>) -> WeightsError {
    WeightsError::File {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub offsets: (u64, u64),
    /// Where the data section starts in the file.
    pub data_start: u64,
}

/// Header limit: safetensors headers are small; a huge length means a corrupt file.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// Reads and checks a safetensors header against the file: every tensor's bytes must lie
/// inside the file and match its dtype and shape.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>, WeightsError> {
    let mut file =
        std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    let size = file
        .metadata()
        .map_err(|e| file_err(path, e.to_string()))?
        .len();
    let redo = "re-download or re-copy the file";
    if size < 8 {
        return Err(file_err(
            path,
            format!("truncated: {size} bytes, too short to be a safetensors file; {redo}"),
        ));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| file_err(path, e.to_string()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(file_err(
            path,
            format!("not a safetensors file (header length {header_len} is implausible); {redo}"),
        ));
    }
    if 8 + header_len > size {
        return Err(file_err(
            path,
            format!(
                "truncated: the header needs {} bytes but the file has {size}; {redo}",
                8 + header_len
            ),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| file_err(path, e.to_string()))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| file_err(path, format!("corrupt safetensors header ({e}); {redo}")))?;
    let Some(entries) = json.as_object() else {
        return Err(file_err(
            path,
            format!("corrupt safetensors header (not a JSON object); {redo}"),
        ));
    };
    let data_len = size - 8 - header_len;
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| file_err(path, format!("tensor `{name}`: {what}; {redo}"));
        let dtype = entry["dtype"]
            .as_str()
            .ok_or_else(|| bad("no dtype in header"))?
            .to_string();
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape in header"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offsets = entry["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("no data_offsets"))?;
        let (begin, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
            (Some(b), Some(e)) if b <= e => (b, e),
            _ => return Err(bad("data_offsets are not an increasing pair")),
        };
        if end > data_len {
            return Err(file_err(
                path,
                format!(
                    "truncated: tensor `{name}` ends at byte {end} of the data section, but the file holds only {data_len} data bytes ({size} bytes in all); {redo}"
                ),
            ));
        }
        let elem = dtype_size(&dtype).ok_or_else(|| bad(&format!("unsupported dtype {dtype}")))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        if numel.and_then(|n| n.checked_mul(elem)) != Some(end - begin) {
            return Err(bad(&format!(
                "{} bytes for shape {shape:?} of {dtype}",
                end - begin
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                offsets: (begin, end),
                data_start: 8 + header_len,
            },
        );
    }
    Ok(tensors)
}

/// Checked, memory-mapped safetensors weights: one file or a sharded set.
pub struct CheckedWeights {
    tensors: HashMap<String, (PathBuf, TensorInfo)>,
    files: Vec<PathBuf>,
    mmaped: MmapedSafetensors,
    progress: Option<crate::load::Progress>,
    /// Large CPU tensors stored in the dtype the model wants are mapped, not copied.
    map_on_cpu: bool,
}

/// Tensors at least this large are mapped (each gets its own mapping, so a tensor the model
/// only reads to build another one is unmapped when it is dropped).
const MAP_AT_LEAST: u64 = 1 << 20;

impl CheckedWeights {
    /// Opens the safetensors weights of a layout: through `*.safetensors.index.json` when
    /// present, else every `.safetensors` file.
    pub fn open(layout: &WeightsLayout) -> Result<Self, WeightsError> {
        let files: Vec<PathBuf> = match &layout.safetensors_index {
            Some(index) => shards_of(index)?,
            None => layout.safetensors.clone(),
        };
        if files.is_empty() {
            return Err(WeightsError::Missing(
                "no .safetensors weights found: list the folder holding model.safetensors in cog.yaml's `weights:` (source.uri)".into(),
            ));
        }
        let mut tensors = HashMap::new();
        for file in &files {
            for (name, info) in read_header(file)? {
                if let Some((other, _)) = tensors.insert(name.clone(), (file.clone(), info)) {
                    return Err(file_err(
                        file,
                        format!(
                            "tensor `{name}` is also in {}; keep one copy",
                            other.display()
                        ),
                    ));
                }
            }
        }
        if let Some(index) = &layout.safetensors_index {
            for (name, shard) in index_map(index)? {
                match tensors.get(&name) {
                    Some((file, _)) if file.file_name().is_some_and(|f| f.to_string_lossy() == shard) => {}
                    _ => {
                        return Err(file_err(
                            index,
                            format!("lists tensor `{name}` in {shard}, but that shard does not hold it; the shards and the index do not match"),
                        ))
                    }
                }
            }
        }
        // SAFETY: the files are mapped read-only; runner never writes weights while serving.
        let mmaped = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| WeightsError::Missing(format!("cannot map weights: {e}")))?;
        Ok(CheckedWeights {
            tensors,
            files,
            mmaped,
            progress: None,
            map_on_cpu: runner_snapshot::allocator_installed()
                && std::env::var("RUNNER_LOAD_CPU").map_or(true, |v| v != "copy"),
        })
    }

    /// Reports each tensor's stored bytes as it is loaded.
    pub fn set_progress(&mut self, progress: crate::load::Progress) {
        self.progress = Some(progress);
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|(_, i)| i)
    }

    /// Every tensor's name and header entry, across the shards.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(n, (_, i))| (n.as_str(), i))
    }

    /// A VarBuilder over these weights, converting to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn index_map(index: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let text =
        std::fs::read_to_string(index).map_err(|e| file_err(index, format!("cannot read: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_err(index, format!("not valid JSON: {e}")))?;
    let map = json["weight_map"].as_object().ok_or_else(|| {
        file_err(
            index,
            "no `weight_map` object; this is not a safetensors index",
        )
    })?;
    map.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_string()))
                .ok_or_else(|| file_err(index, format!("`weight_map.{k}` is not a file name")))
        })
        .collect()
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<String> = index_map(index)?.into_values().collect();
    shards.sort();
    shards.dedup();
    shards
        .into_iter()
        .map(|s| {
            if s.contains('/') || s.contains("..") {
                return Err(file_err(
                    index,
                    format!("shard name {s:?} must be a file name beside the index"),
                ));
            }
            let p = dir.join(&s);
            if p.is_file() {
                Ok(p)
            } else {
                Err(file_err(
                    index,
                    format!(
                        "names shard {s}, which is missing from {}; fetch every shard",
                        dir.display()
                    ),
                ))
            }
        })
        .collect()
}

impl CheckedWeights {
    /// A large CPU tensor whose stored dtype is the one asked for, as a vector pointing
    /// into a private mapping of its bytes (no copy: pages come in from the page cache as
    /// they are read, so embedding rows no token uses never take memory). `None` means
    /// copy it: another device or dtype, a small tensor, no mapping slot, or
    /// `RUNNER_LOAD_CPU=copy`.
    fn mapped(&self, file: &Path, info: &TensorInfo, dtype: DType, dev: &Device) -> Option<Tensor> {
        let (begin, end) = info.offsets;
        if !self.map_on_cpu || !dev.is_cpu() || end - begin < MAP_AT_LEAST {
            return None;
        }
        let stored = match info.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            _ => return None,
        };
        if stored != dtype {
            return None;
        }
        let handle = std::fs::File::open(file).ok()?;
        let mapping =
            runner_snapshot::Mapping::new(&handle, info.data_start + begin, (end - begin) as usize)
                .ok()??;
        let n = info.shape.iter().product::<usize>();
        let shape = info.shape.as_slice();
        match dtype {
            DType::F32 => Tensor::from_vec(mapping.take_vec::<f32>(0, n)?, shape, dev).ok(),
            DType::F16 => Tensor::from_vec(mapping.take_vec::<half::f16>(0, n)?, shape, dev).ok(),
            DType::BF16 => Tensor::from_vec(mapping.take_vec::<half::bf16>(0, n)?, shape, dev).ok(),
            _ => None,
        }
    }
}

fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32" | "F64")
}

impl SimpleBackend for CheckedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some((file, info)) = self.tensors.get(name) else {
            candle_core::bail!("tensor `{name}` is missing from the weights ({}); the weights do not belong to this architecture or config.json", self.files_list());
        };
        if info.shape != s.dims() {
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, but the model's config.json expects {:?}; the weights and config.json do not match",
                file.display(),
                info.shape,
                s.dims()
            );
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((file, info)) = self.tensors.get(name) else {
            candle_core::bail!(
                "tensor `{name}` is missing from the weights ({})",
                self.files_list()
            );
        };
        if dtype.is_float() && !is_float(&info.dtype) {
            candle_core::bail!(
                "{}: tensor `{name}` has dtype {}, but the model needs floating-point weights (F32, F16, BF16 or F64)",
                file.display(),
                info.dtype
            );
        }
        let t = match self.mapped(file, info, dtype, dev) {
            Some(t) => t,
            None => self.mmaped.load(name, dev)?.to_dtype(dtype)?,
        };
        if let Some(p) = &self.progress {
            p(info.offsets.1.saturating_sub(info.offsets.0));
        }
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Reads a JSON config file that an architecture needs, naming it in errors.
pub fn read_json_config<T: serde::de::DeserializeOwned>(
    layout: &WeightsLayout,
    name: &str,
    architecture: &str,
) -> Result<(PathBuf, T), WeightsError> {
    let path = layout.file_named(name).ok_or_else(|| {
        WeightsError::Missing(format!("{name} not found among the weights files; candle:{architecture} needs it beside the safetensors weights"))
    })?;
    let text =
        std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let value = serde_json::from_str(&text)
        .map_err(|e| file_err(path, format!("invalid for candle:{architecture}: {e}")))?;
    Ok((path.to_path_buf(), value))
}

/// Writes f32 tensors as a safetensors file (used by generated test models).
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
) -> Result<(), WeightsError> {
    let device = Device::Cpu;
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape, data)| {
            Tensor::from_vec(data.clone(), shape.as_slice(), &device).map(|t| (name.to_string(), t))
        })
        .collect::<candle_core::Result<_>>()
        .map_err(|e| file_err(path, e.to_string()))?;
    candle_core::safetensors::save(&map, path)
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_of(files: Vec<PathBuf>) -> WeightsLayout {
        WeightsLayout {
            safetensors: files.clone(),
            files,
            safetensors_index: None,
            gguf: vec![],
        }
    }

    #[test]
    fn truncated_file_names_file_and_tensor() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        write_f32_safetensors(
            &p,
            &[
                ("a", vec![4, 4], vec![1.0; 16]),
                ("b", vec![2], vec![2.0; 2]),
            ],
        )
        .unwrap();
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        let e = CheckedWeights::open(&layout_of(vec![p.clone()]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated") && e.contains("tensor `"),
            "{e}"
        );
        std::fs::write(&p, &full[..5]).unwrap();
        let e = CheckedWeights::open(&layout_of(vec![p.clone()]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = CheckedWeights::open(&layout_of(vec![p]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
    }

    #[test]
    fn shape_dtype_and_missing_tensor_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        let ints = Tensor::new(&[1i64, 2], &Device::Cpu).unwrap();
        let floats = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("w".to_string(), floats), ("ids".to_string(), ints)]),
            &p,
        )
        .unwrap();
        let vb = CheckedWeights::open(&layout_of(vec![p]))
            .unwrap()
            .var_builder(DType::F32, &Device::Cpu);
        assert!(vb.get((2, 3), "w").is_ok());
        let e = vb.get((3, 2), "w").unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("`w`") && e.contains("[2, 3]"),
            "{e}"
        );
        let e = vb.get(2, "ids").unwrap_err().to_string();
        assert!(e.contains("`ids`") && e.contains("I64"), "{e}");
        let e = vb.get(2, "nope").unwrap_err().to_string();
        assert!(e.contains("`nope` is missing"), "{e}");
    }

    #[test]
    fn sharded_index_is_checked() {
        let d = tempfile::tempdir().unwrap();
        write_f32_safetensors(
            &d.path().join("a.safetensors"),
            &[("x", vec![2], vec![1.0, 2.0])],
        )
        .unwrap();
        let index = d.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#,
        )
        .unwrap();
        let layout = WeightsLayout {
            files: vec![],
            safetensors: vec![],
            safetensors_index: Some(index.clone()),
            gguf: vec![],
        };
        let e = CheckedWeights::open(&layout).err().unwrap().to_string();
        assert!(e.contains("b.safetensors") && e.contains("missing"), "{e}");
        write_f32_safetensors(
            &d.path().join("b.safetensors"),
            &[("z", vec![1], vec![1.0])],
        )
        .unwrap();
        let e = CheckedWeights::open(&layout).err().unwrap().to_string();
        assert!(e.contains("`y`"), "{e}");
        std::fs::write(
            &index,
            r#"{"weight_map": {"x": "a.safetensors", "z": "b.safetensors"}}"#,
        )
        .unwrap();
        let w = CheckedWeights::open(&layout).unwrap();
        assert_eq!(w.files().len(), 2);
    }

    /// A deterministic mutation sweep over a real safetensors file (a fuzzer's worth of
    /// damage, replayable in `cargo test`): flipped bits and overwritten words in the length
    /// prefix and the JSON header, and truncations anywhere. Opening and loading every
    /// tensor must never panic; whatever loads has the shape its header declares.
    #[test]
    fn damaged_headers_never_panic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        write_f32_safetensors(
            &p,
            &[
                ("layer.0.weight", vec![8, 16], vec![0.5; 128]),
                ("layer.0.bias", vec![8], vec![0.25; 8]),
                ("head.weight", vec![4, 8], vec![1.5; 32]),
            ],
        )
        .unwrap();
        let good = std::fs::read(&p).unwrap();
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        // A fixed seed, so a failure replays exactly.
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x2545_F491_4F6C_DD1D);
        let mut next = move || rand::Rng::random::<u64>(&mut rng);
        let damaged = d.path().join("damaged.safetensors");
        let mut refused = 0;
        for round in 0..2000 {
            let mut bytes = good.clone();
            let kind = next() % 4;
            match kind {
                0 => {
                    for _ in 0..=next() % 3 {
                        let at = (next() % header_end as u64) as usize;
                        bytes[at] ^= 1 << (next() % 8);
                    }
                }
                1 => bytes.truncate((next() % bytes.len() as u64) as usize),
                2 => {
                    let word = match next() % 3 {
                        0 => u64::MAX,
                        1 => 0,
                        _ => next() % (4 * good.len() as u64),
                    };
                    bytes[..8].copy_from_slice(&word.to_le_bytes());
                }
                _ => {
                    // A JSON number or bracket replaced by another character.
                    let at = 8 + (next() % (header_end as u64 - 8)) as usize;
                    bytes[at] = b"0123456789[]{},:\"-e."[(next() % 18) as usize];
                }
            }
            std::fs::write(&damaged, &bytes).unwrap();
            let outcome = std::panic::catch_unwind(|| {
                let weights = CheckedWeights::open(&layout_of(vec![damaged.clone()]))?;
                let declared: Vec<(String, Vec<usize>)> =
                    ["layer.0.weight", "layer.0.bias", "head.weight"]
                        .iter()
                        .filter_map(|n| weights.info(n).map(|i| (n.to_string(), i.shape.clone())))
                        .collect();
                let vb = weights.var_builder(DType::F32, &Device::Cpu);
                let mut loaded = Vec::new();
                for (name, shape) in declared {
                    if let Ok(t) = vb.get(shape.clone(), &name) {
                        loaded.push((t.dims().to_vec(), shape));
                    }
                }
                Ok::<_, WeightsError>(loaded)
            });
            match outcome {
                Err(_) => panic!("round {round} (mutation kind {kind}) panicked"),
                Ok(Err(_)) => refused += 1,
                Ok(Ok(loaded)) => {
                    for (got, declared) in loaded {
                        assert_eq!(got, declared, "round {round}");
                    }
                }
            }
        }
        assert!(
            refused > 1000,
            "only {refused} of 2000 damaged files refused"
        );
    }
}
