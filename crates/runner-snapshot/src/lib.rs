//! Snapshots of a model's device-resident state: the tensors exactly as the model holds
//! them after load (converted dtypes and all), in one versioned file that restores with a
//! few large sequential reads instead of parsing and converting weights again.
//!
//! File layout (little-endian):
//!
//! ```text
//! [0, 4096)        preamble: magic "RUNRSNAP", format version, the offsets and lengths of
//!                  the data, header and manifest, and an xxh3 checksum of the preamble,
//!                  header and manifest together
//! [4096, …)        data: one arena per dtype, each 4 KiB-aligned, tensors 256 B-aligned
//!                  inside it; every 16 MiB chunk of an arena has its own xxh3 checksum
//! after the data   header (JSON: format version, compatibility key) and manifest (JSON:
//!                  arenas with chunk checksums, tensors with name, dtype, shape, arena,
//!                  offset)
//! ```
//!
//! The preamble is written last, after everything it points to is on disk, into a
//! temporary file that is fsynced and then renamed: a crash or a full disk never leaves a
//! file that passes validation, and two writers never mix their bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

#[cfg(feature = "cuda")]
mod cuda_restore;
pub mod direct;
mod mapped;

pub use mapped::{allocator_installed, live_mappings, Mapping, SnapshotAllocator};

/// The system's page size (at least 4 KiB).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

// The unit tests run the mapped restore too.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: SnapshotAllocator = SnapshotAllocator;

#[cfg(not(target_endian = "little"))]
compile_error!("runner snapshots are little-endian; this target is not");

pub const MAGIC: &[u8; 8] = b"RUNRSNAP";
pub const FORMAT_VERSION: u32 = 1;
/// The preamble takes the first 4 KiB, so the data starts aligned.
const PREAMBLE_BYTES: u64 = 4096;
const PREAMBLE_USED: usize = 48;
pub const ARENA_ALIGN: u64 = 4096;
pub const TENSOR_ALIGN: u64 = 256;
/// Size of the data chunks that carry their own checksum.
pub const CHUNK_BYTES: u64 = 16 << 20;
/// Header and manifest are small; anything larger is corruption, not a model.
const MAX_METADATA_BYTES: u64 = 256 << 20;

/// What must match for a snapshot to be used: anything else means a cold load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatKey {
    pub runner_version: String,
    pub candle_version: String,
    /// Digest of the model directory's spec (cog.yaml, configs) and its weights' identity.
    pub model_digest: String,
    pub architecture: String,
    /// `cpu` or `cuda`.
    pub device_kind: String,
    pub gpu_name: Option<String>,
    pub compute_capability: Option<String>,
    pub driver_version: Option<String>,
    /// How the model converts weights at load (e.g. `f32`, `bf16`).
    pub dtype_policy: String,
}

impl CompatKey {
    /// The first field that differs, as `(field, in the snapshot, expected)`.
    pub fn first_mismatch(&self, expected: &CompatKey) -> Option<(&'static str, String, String)> {
        let fields: [(&'static str, String, String); 9] = [
            (
                "runner version",
                self.runner_version.clone(),
                expected.runner_version.clone(),
            ),
            (
                "candle version",
                self.candle_version.clone(),
                expected.candle_version.clone(),
            ),
            (
                "architecture",
                self.architecture.clone(),
                expected.architecture.clone(),
            ),
            (
                "model (spec and weights)",
                self.model_digest.clone(),
                expected.model_digest.clone(),
            ),
            (
                "device kind",
                self.device_kind.clone(),
                expected.device_kind.clone(),
            ),
            (
                "GPU",
                format!("{:?}", self.gpu_name),
                format!("{:?}", expected.gpu_name),
            ),
            (
                "compute capability",
                format!("{:?}", self.compute_capability),
                format!("{:?}", expected.compute_capability),
            ),
            (
                "driver version",
                format!("{:?}", self.driver_version),
                format!("{:?}", expected.driver_version),
            ),
            (
                "dtype policy",
                self.dtype_policy.clone(),
                expected.dtype_policy.clone(),
            ),
        ];
        fields.into_iter().find(|(_, a, b)| a != b)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    pub key: CompatKey,
    pub tensor_count: usize,
    pub data_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arena {
    pub dtype: String,
    /// Offset from the start of the data region.
    pub offset: u64,
    pub bytes: u64,
    pub chunk_bytes: u64,
    pub chunk_checksums: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub arena: usize,
    /// Byte offset inside the arena.
    pub offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub arenas: Vec<Arena>,
    pub tensors: Vec<TensorEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: is a directory, not a snapshot file; give the file's path (or remove the directory)")]
    IsDirectory { path: PathBuf },
    #[error("{path}: not a runner snapshot (bad magic bytes)")]
    NotASnapshot { path: PathBuf },
    #[error("{path}: snapshot format version {found}, this runner reads version {supported}; take a new snapshot with `runner snapshot`")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: corrupt snapshot: {what}; take a new one with `runner snapshot`")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: snapshot was taken for another {field}: it has {found}, this model needs {expected}; take a new one with `runner snapshot`")]
    Incompatible {
        path: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error(
        "{path}: the disk is full; no snapshot was written (free {needed} bytes and try again)"
    )]
    DiskFull { path: PathBuf, needed: u64 },
    #[error("snapshot tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn align(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "u8" => DType::U8,
        "u32" => DType::U32,
        "i64" => DType::I64,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        "f64" => DType::F64,
        _ => return None,
    })
}

/// A contiguous tensor's bytes (little-endian hosts), copied once, straight from its own
/// range of its storage: on the CPU from memory, on a GPU to the host (a restored tensor is
/// a view into its arena, and neither the arena nor a device copy of the view moves). `None`
/// for a layout with strides, or a dtype snapshots do not store.
fn contiguous_bytes(t: &Tensor) -> candle_core::Result<Option<Vec<u8>>> {
    let (storage, layout) = t.storage_and_layout();
    let Some((from, to)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    if !matches!(
        t.dtype(),
        DType::U8 | DType::U32 | DType::I64 | DType::F32 | DType::F64 | DType::BF16 | DType::F16
    ) {
        return Ok(None);
    }
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            fn bytes_of<T>(values: &[T]) -> Vec<u8> {
                // SAFETY: plain numbers (no padding, every bit pattern valid), read as bytes.
                unsafe {
                    std::slice::from_raw_parts(
                        values.as_ptr().cast::<u8>(),
                        std::mem::size_of_val(values),
                    )
                }
                .to_vec()
            }
            Ok(Some(match t.dtype() {
                DType::U8 => bytes_of(&cpu.as_slice::<u8>()?[from..to]),
                DType::U32 => bytes_of(&cpu.as_slice::<u32>()?[from..to]),
                DType::I64 => bytes_of(&cpu.as_slice::<i64>()?[from..to]),
                DType::F32 => bytes_of(&cpu.as_slice::<f32>()?[from..to]),
                DType::F64 => bytes_of(&cpu.as_slice::<f64>()?[from..to]),
                DType::BF16 => bytes_of(&cpu.as_slice::<half::bf16>()?[from..to]),
                DType::F16 => bytes_of(&cpu.as_slice::<half::f16>()?[from..to]),
                _ => return Ok(None),
            }))
        }
        #[cfg(feature = "cuda")]
        candle_core::Storage::Cuda(cuda) => {
            let Device::Cuda(device) = t.device() else {
                return Ok(None);
            };
            let stream = device.cuda_stream();
            let mut out = vec![0u8; (to - from) * t.dtype().size_in_bytes()];
            macro_rules! copy_range {
                ($ty:ty) => {{
                    let slice = cuda.as_cuda_slice::<$ty>()?;
                    let range = slice.slice(from..to);
                    // SAFETY: the same device memory, read as bytes.
                    let bytes = unsafe { range.transmute::<u8>(out.len()) }
                        .ok_or_else(|| candle_core::Error::Msg("a view past its storage".into()))?;
                    stream
                        .memcpy_dtoh(&bytes, out.as_mut_slice())
                        .map_err(|e| {
                            candle_core::Error::Msg(format!("copying to the host: {e}"))
                        })?;
                }};
            }
            match t.dtype() {
                DType::U8 => copy_range!(u8),
                DType::U32 => copy_range!(u32),
                DType::I64 => copy_range!(i64),
                DType::F32 => copy_range!(f32),
                DType::F64 => copy_range!(f64),
                DType::BF16 => copy_range!(half::bf16),
                DType::F16 => copy_range!(half::f16),
                _ => return Ok(None),
            }
            stream
                .synchronize()
                .map_err(|e| candle_core::Error::Msg(format!("copying to the host: {e}")))?;
            Ok(Some(out))
        }
        #[allow(unreachable_patterns)]
        _ => Ok(None),
    }
}

/// One tensor a snapshot writes: its dtype, its shape and, when its turn comes, its bytes.
/// A [`Tensor`] is one; a recording can also put off making the bytes until they are
/// written, so that no copy of them is held meanwhile.
pub trait SnapshotSource {
    fn dtype(&self) -> DType;
    fn dims(&self) -> Vec<usize>;
    /// The bytes as a snapshot stores them (little-endian, row-major), on the host.
    fn bytes(&self, name: &str) -> Result<Vec<u8>, SnapshotError>;
    fn byte_len(&self) -> u64 {
        (self.dims().iter().product::<usize>() * self.dtype().size_in_bytes()) as u64
    }
}

impl SnapshotSource for Tensor {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
    fn dims(&self) -> Vec<usize> {
        Tensor::dims(self).to_vec()
    }
    fn bytes(&self, name: &str) -> Result<Vec<u8>, SnapshotError> {
        tensor_bytes(name, self)
    }
}

/// A tensor's bytes as a snapshot stores them (little-endian, row-major), copied to the
/// host.
pub fn tensor_bytes(name: &str, t: &Tensor) -> Result<Vec<u8>, SnapshotError> {
    let err = |e: candle_core::Error| SnapshotError::Tensor {
        name: name.to_string(),
        message: e.to_string(),
    };
    // A strided tensor is made contiguous on its own device first (candle's `to_device`
    // would copy its whole storage, and a restored tensor is a view into its dtype's arena:
    // that moved 402 x 1.24 GB to the host for a Q8_0 Llama's `--verify` on an H200).
    let own;
    let t = if t.is_contiguous() {
        t
    } else {
        own = t.force_contiguous().map_err(err)?;
        &own
    };
    contiguous_bytes(t)
        .map_err(err)?
        .ok_or_else(|| SnapshotError::Tensor {
            name: name.to_string(),
            message: format!("dtype {:?} cannot be snapshotted yet", t.dtype()),
        })
}

/// What writing a snapshot did.
#[derive(Debug, Clone)]
pub struct WriteReport {
    pub path: PathBuf,
    pub tensors: usize,
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub elapsed: Duration,
}

/// Writes a snapshot of `tensors` to `path`, atomically (temporary file, fsync, rename).
pub fn write<S: SnapshotSource>(
    path: &Path,
    key: &CompatKey,
    tensors: &[(String, S)],
) -> Result<WriteReport, SnapshotError> {
    write_with_progress(path, key, tensors, None)
}

/// Counts the bytes that pass through to a writer.
struct CountingWriter<'a, W> {
    inner: W,
    progress: Option<&'a Progress>,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(p) = self.progress {
            p(n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Seek> Seek for CountingWriter<'_, W> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// [`write`], telling `progress` the bytes written as they go.
pub fn write_with_progress<S: SnapshotSource>(
    path: &Path,
    key: &CompatKey,
    tensors: &[(String, S)],
    progress: Option<Progress>,
) -> Result<WriteReport, SnapshotError> {
    let started = Instant::now();
    if path.is_dir() {
        return Err(SnapshotError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir, "cannot create the snapshot's folder"))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale_temporaries(dir, &file_name);
    // A name no other writer uses: concurrent writers each rename a complete file.
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let file = File::create(&tmp).map_err(io(&tmp, "cannot create"))?;
        let mut counted = CountingWriter {
            inner: file,
            progress: progress.as_ref(),
        };
        let (header, file_bytes) = write_to(&mut counted, &tmp, key, tensors)?;
        let file = counted.inner;
        file.sync_all().map_err(io(&tmp, "cannot flush to disk"))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io(path, "cannot move the snapshot into place"))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(WriteReport {
            path: path.to_path_buf(),
            tensors: header.tensor_count,
            data_bytes: header.data_bytes,
            file_bytes,
            elapsed: started.elapsed(),
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| match e {
        SnapshotError::Io { source, .. } if is_disk_full(&source) => SnapshotError::DiskFull {
            path: path.to_path_buf(),
            needed: tensors.iter().map(|(_, t)| t.byte_len()).sum(),
        },
        other => other,
    })
}

/// Removes the temporary files that writers of `file_name` killed mid-write left in `dir`
/// (`.NAME.tmp-PID-RANDOM` whose process is gone), so repeated crashes do not fill the
/// disk. A live writer's file is left alone; so is anything else.
fn remove_stale_temporaries(dir: &Path, file_name: &str) {
    let prefix = format!(".{file_name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.map_while(Result::ok) {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}, left by a snapshot writer that was killed",
                    entry.path().display()
                ),
                Err(e) => tracing::debug!("cannot remove {}: {e}", entry.path().display()),
            }
        }
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

/// Writes the whole file into `out`; the preamble goes last.
pub fn write_to<W: Write + Seek, S: SnapshotSource>(
    out: &mut W,
    path: &Path,
    key: &CompatKey,
    tensors: &[(String, S)],
) -> Result<(Header, u64), SnapshotError> {
    // Arenas by dtype, tensors in the order given within each.
    let mut by_dtype: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    for (i, (_, t)) in tensors.iter().enumerate() {
        by_dtype.entry(dtype_name(t.dtype())).or_default().push(i);
    }
    let mut entries: Vec<Option<TensorEntry>> = vec![None; tensors.len()];
    let mut arenas = Vec::new();
    let mut arena_start = 0u64;
    for (dtype, members) in &by_dtype {
        let mut offset = 0u64;
        for &i in members {
            let (name, t) = &tensors[i];
            entries[i] = Some(TensorEntry {
                name: name.clone(),
                dtype: dtype.to_string(),
                shape: t.dims(),
                arena: arenas.len(),
                offset,
            });
            offset = align(offset + t.byte_len(), TENSOR_ALIGN);
        }
        let bytes = align(offset, ARENA_ALIGN);
        arenas.push(Arena {
            dtype: dtype.to_string(),
            offset: arena_start,
            bytes,
            chunk_bytes: CHUNK_BYTES,
            chunk_checksums: Vec::new(),
        });
        arena_start += bytes;
    }
    let data_bytes = arena_start;

    out.seek(SeekFrom::Start(0))
        .map_err(io(path, "cannot seek"))?;
    out.write_all(&[0u8; PREAMBLE_BYTES as usize])
        .map_err(io(path, "cannot write"))?;
    // Stream each arena in chunks, hashing as they go: one tensor in memory at a time.
    for (a, (_, members)) in arenas.iter_mut().zip(&by_dtype) {
        let mut hasher = ChunkHasher::new(a.chunk_bytes);
        let mut written = 0u64;
        for &i in members {
            let entry = entries[i].as_ref().expect("laid out above");
            let pad = entry.offset - written;
            hasher.write(out, &vec![0u8; pad as usize], path)?;
            let (name, source) = &tensors[i];
            let bytes = source.bytes(name)?;
            if bytes.len() as u64 != source.byte_len() {
                // A deferred source must make what it announced: the layout is fixed.
                return Err(SnapshotError::Tensor {
                    name: name.clone(),
                    message: format!(
                        "made {} bytes, announced {} ({:?} {:?})",
                        bytes.len(),
                        source.byte_len(),
                        source.dtype(),
                        source.dims()
                    ),
                });
            }
            hasher.write(out, &bytes, path)?;
            written = entry.offset + bytes.len() as u64;
        }
        hasher.write(out, &vec![0u8; (a.bytes - written) as usize], path)?;
        a.chunk_checksums = hasher.finish();
    }
    let header = Header {
        format_version: FORMAT_VERSION,
        key: key.clone(),
        tensor_count: tensors.len(),
        data_bytes,
    };
    let manifest = Manifest {
        arenas,
        tensors: entries
            .into_iter()
            .map(|e| e.expect("every tensor laid out"))
            .collect(),
    };
    let header_json = serde_json::to_vec(&header).expect("serializable");
    let manifest_json = serde_json::to_vec(&manifest).expect("serializable");
    out.write_all(&header_json)
        .map_err(io(path, "cannot write"))?;
    out.write_all(&manifest_json)
        .map_err(io(path, "cannot write"))?;
    let preamble = preamble(data_bytes, &header_json, &manifest_json);
    out.seek(SeekFrom::Start(0))
        .map_err(io(path, "cannot seek"))?;
    out.write_all(&preamble).map_err(io(path, "cannot write"))?;
    out.flush().map_err(io(path, "cannot write"))?;
    let file_bytes =
        PREAMBLE_BYTES + data_bytes + header_json.len() as u64 + manifest_json.len() as u64;
    Ok((header, file_bytes))
}

/// The used part of the preamble, its checksum over header and manifest included.
fn preamble(data_bytes: u64, header_json: &[u8], manifest_json: &[u8]) -> Vec<u8> {
    let mut preamble = Vec::with_capacity(PREAMBLE_USED + 8);
    preamble.extend_from_slice(MAGIC);
    preamble.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    preamble.extend_from_slice(&0u32.to_le_bytes());
    preamble.extend_from_slice(&PREAMBLE_BYTES.to_le_bytes());
    preamble.extend_from_slice(&data_bytes.to_le_bytes());
    preamble.extend_from_slice(&(header_json.len() as u64).to_le_bytes());
    preamble.extend_from_slice(&(manifest_json.len() as u64).to_le_bytes());
    debug_assert_eq!(preamble.len(), PREAMBLE_USED);
    let checksum = meta_checksum(&preamble, header_json, manifest_json);
    preamble.extend_from_slice(&checksum.to_le_bytes());
    preamble
}

/// A whole snapshot file around arbitrary header and manifest JSON and data, with a valid
/// preamble and checksum: what a crafted (rather than damaged) snapshot looks like. For
/// the fuzz target, which would otherwise stop at the checksum almost every time.
#[doc(hidden)]
pub fn seal(header_json: &[u8], manifest_json: &[u8], data: &[u8]) -> Vec<u8> {
    let mut file = preamble(data.len() as u64, header_json, manifest_json);
    file.resize(PREAMBLE_BYTES as usize, 0);
    file.extend_from_slice(data);
    file.extend_from_slice(header_json);
    file.extend_from_slice(manifest_json);
    file
}

fn meta_checksum(preamble: &[u8], header: &[u8], manifest: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&preamble[..PREAMBLE_USED]);
    h.update(header);
    h.update(manifest);
    h.digest()
}

/// Writes bytes and keeps one checksum per fixed-size chunk.
struct ChunkHasher {
    chunk: u64,
    filled: u64,
    hasher: xxhash_rust::xxh3::Xxh3,
    sums: Vec<u64>,
}

impl ChunkHasher {
    fn new(chunk: u64) -> Self {
        Self {
            chunk,
            filled: 0,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            sums: Vec::new(),
        }
    }
    fn write<W: Write>(
        &mut self,
        out: &mut W,
        mut bytes: &[u8],
        path: &Path,
    ) -> Result<(), SnapshotError> {
        out.write_all(bytes).map_err(io(path, "cannot write"))?;
        while !bytes.is_empty() {
            let take = ((self.chunk - self.filled) as usize).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.filled += take as u64;
            bytes = &bytes[take..];
            if self.filled == self.chunk {
                self.sums.push(self.hasher.digest());
                self.hasher.reset();
                self.filled = 0;
            }
        }
        Ok(())
    }
    fn finish(mut self) -> Vec<u64> {
        if self.filled > 0 {
            self.sums.push(self.hasher.digest());
        }
        self.sums
    }
}

/// An opened, validated snapshot (preamble, header and manifest checked; data not read).
#[derive(Debug)]
pub struct Snapshot {
    pub path: PathBuf,
    pub header: Header,
    pub manifest: Manifest,
    data_offset: u64,
    file: File,
    progress: ProgressHook,
}

/// The optional progress callback (no `Debug` of its own).
#[derive(Default)]
struct ProgressHook(Option<Progress>);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// Told the number of bytes each time data moves (for a progress bar); called from any
/// thread.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// A restore's tensors, with their manifest names, and what it did.
pub type Restored = (Vec<(String, Tensor)>, RestoreStats);

/// What a restore did, for phase timings and bandwidth.
#[derive(Debug, Clone, Copy)]
pub struct RestoreStats {
    pub data_bytes: u64,
    /// Reading (and checking) the data into host memory.
    pub read: Duration,
    /// Copying host memory to the device (zero on CPU).
    pub upload: Duration,
    pub total: Duration,
    /// Whether the data was read around the page cache (`O_DIRECT`; see [`direct`]).
    pub direct: bool,
    /// The share of the data that was in the page cache when the restore began, where the
    /// kernel said.
    pub resident: Option<f64>,
}

impl RestoreStats {
    pub fn gb_per_s(&self) -> f64 {
        self.data_bytes as f64 / self.total.as_secs_f64().max(1e-9) / 1e9
    }
}

impl Snapshot {
    /// Opens a snapshot and validates everything but the data chunks.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        if path.is_dir() {
            return Err(SnapshotError::IsDirectory {
                path: path.to_path_buf(),
            });
        }
        let file = File::open(path).map_err(io(path, "cannot open the snapshot"))?;
        let len = file.metadata().map_err(io(path, "cannot stat"))?.len();
        let corrupt = |what: String| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        if len < PREAMBLE_USED as u64 + 8 {
            return Err(corrupt(format!(
                "the file is {len} bytes, shorter than a snapshot's preamble"
            )));
        }
        let mut pre = [0u8; PREAMBLE_USED + 8];
        file.read_exact_at(&mut pre, 0)
            .map_err(io(path, "cannot read"))?;
        if &pre[0..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot {
                path: path.to_path_buf(),
            });
        }
        let u32_at = |i: usize| u32::from_le_bytes(pre[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(pre[i..i + 8].try_into().unwrap());
        let version = u32_at(8);
        let (data_offset, data_bytes, header_len, manifest_len) =
            (u64_at(16), u64_at(24), u64_at(32), u64_at(40));
        let checksum = u64_at(48);
        if data_offset != PREAMBLE_BYTES
            || header_len > MAX_METADATA_BYTES
            || manifest_len > MAX_METADATA_BYTES
        {
            if version != FORMAT_VERSION {
                return Err(SnapshotError::UnsupportedVersion {
                    path: path.to_path_buf(),
                    found: version,
                    supported: FORMAT_VERSION,
                });
            }
            return Err(corrupt("the preamble's offsets are impossible".into()));
        }
        let expected_len = data_offset
            .checked_add(data_bytes)
            .and_then(|x| x.checked_add(header_len))
            .and_then(|x| x.checked_add(manifest_len))
            .ok_or_else(|| corrupt("the preamble's sizes overflow".into()))?;
        if len != expected_len {
            return Err(corrupt(format!(
                "the file is {len} bytes but its preamble describes {expected_len} (truncated or appended to)"
            )));
        }
        let mut meta = vec![0u8; (header_len + manifest_len) as usize];
        file.read_exact_at(&mut meta, data_offset + data_bytes)
            .map_err(io(path, "cannot read"))?;
        let (header_json, manifest_json) = meta.split_at(header_len as usize);
        if meta_checksum(&pre, header_json, manifest_json) != checksum {
            if version != FORMAT_VERSION {
                return Err(SnapshotError::UnsupportedVersion {
                    path: path.to_path_buf(),
                    found: version,
                    supported: FORMAT_VERSION,
                });
            }
            return Err(corrupt(
                "the checksum of the preamble, header and manifest does not match".into(),
            ));
        }
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let header: Header =
            serde_json::from_slice(header_json).map_err(|e| corrupt(format!("header: {e}")))?;
        let manifest: Manifest =
            serde_json::from_slice(manifest_json).map_err(|e| corrupt(format!("manifest: {e}")))?;
        validate_layout(&header, &manifest, data_bytes).map_err(corrupt)?;
        Ok(Snapshot {
            progress: ProgressHook::default(),
            path: path.to_path_buf(),
            header,
            manifest,
            data_offset,
            file,
        })
    }

    /// Reports restored bytes to `progress` as they are read and checked.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = ProgressHook(Some(progress));
        self
    }

    fn advance(&self, bytes: usize) {
        if let Some(p) = &self.progress.0 {
            p(bytes as u64);
        }
    }

    /// Refuses a snapshot taken for another model, device or runner.
    pub fn check_compatible(&self, expected: &CompatKey) -> Result<(), SnapshotError> {
        match self.header.key.first_mismatch(expected) {
            None => Ok(()),
            Some((field, found, expected)) => Err(SnapshotError::Incompatible {
                path: self.path.clone(),
                field,
                found,
                expected,
            }),
        }
    }

    /// Restores every tensor onto `device` with large positional reads straight into its
    /// final memory, checking every data chunk on the way.
    ///
    /// On the CPU each tensor gets its own buffer: candle's CPU kernels treat a view into a
    /// larger buffer as the whole remaining buffer (a bf16 matmul on a view into a 0.5 GB
    /// arena measured 3.5x slower), so views would make restored models slow. On a GPU each
    /// arena is one device allocation with the tensors as views into it, filled through a
    /// ring of pinned buffers (`cuda_restore`), or with one pageable upload per arena when
    /// `RUNNER_CUDA_RESTORE=pageable`, or straight from the page-locked mapped file when
    /// `RUNNER_CUDA_RESTORE=mapped` (bit-identical on an H200, but slower than the ring there).
    ///
    /// Where the binary installed [`SnapshotAllocator`], the CPU tensors are not copied at
    /// all: each arena is mapped copy-on-write from the page cache and every tensor's
    /// storage points into the mapping (`mapped`); the checksum pass faults the pages in.
    /// `RUNNER_RESTORE_CPU=copy` (or a binary without the allocator) reads into fresh
    /// buffers instead. For that copying path, two ways to fault the fresh buffers in
    /// faster were measured slower on the 2-core VM (538 MB restore, against
    /// 1.71–1.90 GB/s): transparent huge pages (0.97–1.10 GB/s) and `MADV_POPULATE_WRITE`
    /// per reader thread before its read (1.35–1.40 GB/s). So its buffers keep ordinary
    /// pages, faulted in by the read itself.
    pub fn restore(&self, device: &Device) -> Result<Restored, SnapshotError> {
        self.restore_reading(device, direct::read_mode())
    }

    /// [`restore`](Self::restore) with the read mode given rather than taken from
    /// `RUNNER_RESTORE_READ`.
    pub fn restore_reading(
        &self,
        device: &Device,
        mode: direct::ReadMode,
    ) -> Result<Restored, SnapshotError> {
        let kind = if device.is_cpu() { "cpu" } else { "cuda" };
        let plan = direct::plan(
            &self.file,
            self.data_offset,
            self.header.data_bytes,
            kind,
            mode,
        );
        let direct_file = plan
            .direct
            .then(|| match direct::open_direct(&self.path) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::debug!(
                        "snapshot restore: no direct reads ({e}); reading through the page cache"
                    );
                    None
                }
            })
            .flatten();
        let restored = match device {
            Device::Cpu if cpu_restore_maps() => match &direct_file {
                Some(file) => match self.restore_direct(device, file)? {
                    Some(done) => Ok(done),
                    None => self.restore_mapped(device),
                },
                None => self.restore_mapped(device),
            },
            Device::Cpu => self.restore_per_tensor(device),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => match cuda_restore::restore_path() {
                cuda_restore::CudaRestorePath::Pinned => {
                    self.restore_arenas_pinned(cuda, direct_file.as_ref())
                }
                cuda_restore::CudaRestorePath::Mapped => self.restore_arenas_registered(cuda),
                cuda_restore::CudaRestorePath::Pageable => self.restore_arenas(device),
            },
            _ => self.restore_arenas(device),
        };
        let (tensors, stats) = restored?;
        if stats.direct {
            // The next start then finds the snapshot in memory.
            direct::warm_page_cache(&self.path, self.data_offset, self.header.data_bytes);
        }
        let stats = RestoreStats {
            resident: plan.resident,
            ..stats
        };
        Ok((tensors, stats))
    }

    /// The CPU restore for a snapshot the page cache does not hold: each arena read with
    /// `O_DIRECT` into fresh anonymous memory, 16 MiB chunks on several threads (the disk
    /// gets several requests at once), each chunk checked as it lands; tensors then take
    /// their buffers from that memory as they do from a mapping. `None` where the file
    /// system turned the direct reads down (the caller reads through the page cache).
    fn restore_direct(
        &self,
        device: &Device,
        direct: &File,
    ) -> Result<Option<Restored>, SnapshotError> {
        let started = Instant::now();
        let mut restored: Vec<Option<Tensor>> = vec![None; self.manifest.tensors.len()];
        for (a, arena) in self.manifest.arenas.iter().enumerate() {
            if arena.bytes == 0 {
                continue;
            }
            let memory = mapped::Mapping::anonymous(arena.bytes as usize).map_err(io(
                &self.path,
                "cannot allocate memory for the snapshot's data",
            ))?;
            let Some(memory) = memory else {
                return Ok(None); // every slot taken: the page-cache path copies instead
            };
            if !self.read_direct_parallel(a, arena, &memory, direct)? {
                return Ok(None);
            }
            self.hand_out(a, &memory, device, &mut restored)?;
        }
        let stats = RestoreStats {
            direct: true,
            ..self.stats(started)
        };
        Ok(Some((self.named(restored), stats)))
    }

    /// Fills `memory` with arena `index` by direct reads on several threads, checking each
    /// chunk; `false` where the file system refused a direct read.
    fn read_direct_parallel(
        &self,
        index: usize,
        arena: &Arena,
        memory: &mapped::Mapping,
        direct: &File,
    ) -> Result<bool, SnapshotError> {
        let chunk = arena.chunk_bytes as usize;
        let chunks = arena.chunk_checksums.len();
        // Reads wait on the disk more than on a core: more threads than cores keep
        // several requests in flight.
        let threads = std::thread::available_parallelism()
            .map(|n| n.get() * 2)
            .unwrap_or(2)
            .clamp(4, 16)
            .min(chunks.max(1));
        let base = self.data_offset + arena.offset;
        let (ptr, capacity) = (memory.as_mut_ptr() as usize, memory.capacity());
        let next = AtomicUsize::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let work = || -> Result<bool, SnapshotError> {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks || stop.load(Ordering::Relaxed) {
                    return Ok(true);
                }
                let start = c * chunk;
                let len = chunk.min(arena.bytes as usize - start);
                let room = len
                    .next_multiple_of(direct::DIRECT_ALIGN)
                    .min(capacity - start);
                // SAFETY: chunks are disjoint ranges of the anonymous mapping, each written
                // by the one thread that took its index; nothing else reads them until the
                // threads are joined.
                let dst = unsafe { std::slice::from_raw_parts_mut((ptr + start) as *mut u8, room) };
                let outcome = match direct::read_direct(direct, dst, len, base + start as u64) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
                    Err(e) => Err(io(&self.path, "cannot read the snapshot's data")(e)),
                    Ok(()) if xxh3_64(&dst[..len]) != arena.chunk_checksums[c] => {
                        Err(self.chunk_error(index, c))
                    }
                    Ok(()) => {
                        self.advance(len);
                        continue;
                    }
                };
                stop.store(true, Ordering::Relaxed);
                return outcome;
            }
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
            let mut all = work();
            for h in handles {
                let theirs = h.join().expect("a reader thread panicked");
                all = match (all, theirs) {
                    (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                    (Ok(a), Ok(b)) => Ok(a && b),
                };
            }
            all
        })
    }

    /// Gives the tensors of arena `index` their buffers inside `memory` (a mapping of the
    /// arena's bytes, already checked).
    fn hand_out(
        &self,
        index: usize,
        memory: &mapped::Mapping,
        device: &Device,
        restored: &mut [Option<Tensor>],
    ) -> Result<(), SnapshotError> {
        for (i, entry) in self.manifest.tensors.iter().enumerate() {
            if entry.arena != index {
                continue;
            }
            let dtype = parse_dtype(&entry.dtype).expect("validated");
            let numel: usize = entry.shape.iter().product();
            let at = entry.offset as usize;
            let len = numel * dtype.size_in_bytes();
            let t = match ArenaBuffer::mapped(memory, dtype, at, numel) {
                Some(buf) => buf,
                None => {
                    // Empty, or not handed out: an ordinary buffer with the same bytes.
                    let mut buf = ArenaBuffer::new(dtype, len);
                    buf.bytes_mut()
                        .copy_from_slice(&memory.bytes()[at..at + len]);
                    buf
                }
            }
            .into_tensor_of(entry, device)?;
            restored[i] = Some(t);
        }
        Ok(())
    }

    /// The CPU restore without a copy: see [`mapped`](crate::mapped).
    fn restore_mapped(&self, device: &Device) -> Result<Restored, SnapshotError> {
        let started = Instant::now();
        let mut restored: Vec<Option<Tensor>> = vec![None; self.manifest.tensors.len()];
        for (a, arena) in self.manifest.arenas.iter().enumerate() {
            if arena.bytes == 0 {
                continue;
            }
            let offset = self.data_offset + arena.offset;
            let mapping = mapped::Mapping::new(&self.file, offset, arena.bytes as usize)
                .map_err(io(&self.path, "cannot map the snapshot's data"))?;
            let Some(mapping) = mapping else {
                // Every mapping slot is taken: the whole snapshot is copied instead.
                let (tensors, _) = self.restore_per_tensor(device)?;
                tracing::debug!("snapshot restore: no mapping slot left, copied instead");
                return Ok((tensors, self.stats(started)));
            };
            self.verify_parallel(a, arena, mapping.bytes())?;
            self.hand_out(a, &mapping, device, &mut restored)?;
        }
        Ok((self.named(restored), self.stats(started)))
    }

    /// The restored tensors with their manifest names, in manifest order.
    fn named(&self, restored: Vec<Option<Tensor>>) -> Vec<(String, Tensor)> {
        self.manifest
            .tensors
            .iter()
            .zip(restored)
            .map(|(e, t)| (e.name.clone(), t.expect("every tensor sits in an arena")))
            .collect()
    }

    /// A host-only restore's figures (nothing to upload).
    fn stats(&self, started: Instant) -> RestoreStats {
        let total = started.elapsed();
        RestoreStats {
            data_bytes: self.header.data_bytes,
            read: total,
            upload: Duration::ZERO,
            total,
            direct: false,
            resident: None,
        }
    }

    /// Checks every data chunk of an arena already in memory (mapped), the chunks spread
    /// over the cores: reading them is also what faults a mapping's pages in.
    fn verify_parallel(
        &self,
        index: usize,
        arena: &Arena,
        bytes: &[u8],
    ) -> Result<(), SnapshotError> {
        let chunk = arena.chunk_bytes as usize;
        let chunks = arena.chunk_checksums.len();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8)
            .min(chunks.max(1));
        let next = AtomicUsize::new(0);
        let failed = AtomicUsize::new(usize::MAX);
        let work = || loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks || failed.load(Ordering::Relaxed) != usize::MAX {
                return;
            }
            let start = c * chunk;
            let end = (start + chunk).min(bytes.len());
            if xxh3_64(&bytes[start..end]) != arena.chunk_checksums[c] {
                failed.fetch_min(c, Ordering::Relaxed);
                return;
            }
            self.advance(end - start);
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
        match failed.into_inner() {
            usize::MAX => Ok(()),
            c => Err(self.chunk_error(index, c)),
        }
    }

    fn restore_per_tensor(&self, device: &Device) -> Result<Restored, SnapshotError> {
        let started = Instant::now();
        let mut restored: Vec<Option<Tensor>> = vec![None; self.manifest.tensors.len()];
        let mut scratch = Vec::new();
        for (a, arena) in self.manifest.arenas.iter().enumerate() {
            let base = self.data_offset + arena.offset;
            let mut verifier = ChunkVerifier::new(self, a, arena);
            let mut members: Vec<usize> = (0..self.manifest.tensors.len())
                .filter(|&i| self.manifest.tensors[i].arena == a)
                .collect();
            members.sort_by_key(|&i| self.manifest.tensors[i].offset);
            let mut pos = 0u64;
            let mut read_gap =
                |from: u64, to: u64, verifier: &mut ChunkVerifier| -> Result<(), SnapshotError> {
                    if to > from {
                        scratch.resize((to - from) as usize, 0);
                        self.file
                            .read_exact_at(&mut scratch, base + from)
                            .map_err(io(&self.path, "cannot read the snapshot's data"))?;
                        verifier.update(&scratch)?;
                    }
                    Ok(())
                };
            for i in members {
                let entry = &self.manifest.tensors[i];
                if entry.offset < pos {
                    return Err(SnapshotError::Corrupt {
                        path: self.path.clone(),
                        what: format!("tensor `{}` overlaps the one before it", entry.name),
                    });
                }
                read_gap(pos, entry.offset, &mut verifier)?;
                let dtype = parse_dtype(&entry.dtype).expect("validated");
                let numel: usize = entry.shape.iter().product();
                let mut buf = ArenaBuffer::new(dtype, numel * dtype.size_in_bytes());
                let bytes = buf.bytes_mut();
                self.read_parallel(bytes, base + entry.offset)?;
                verifier.update(bytes)?;
                pos = entry.offset + bytes.len() as u64;
                restored[i] = Some(buf.into_tensor_of(entry, device)?);
            }
            read_gap(pos, arena.bytes, &mut verifier)?;
            verifier.finish()?;
        }
        Ok((self.named(restored), self.stats(started)))
    }

    fn restore_arenas(&self, device: &Device) -> Result<Restored, SnapshotError> {
        let started = Instant::now();
        let mut host = Vec::with_capacity(self.manifest.arenas.len());
        for (i, arena) in self.manifest.arenas.iter().enumerate() {
            let dtype = parse_dtype(&arena.dtype).expect("validated");
            let mut buf = ArenaBuffer::new(dtype, arena.bytes as usize);
            self.read_arena(i, arena, buf.bytes_mut())?;
            host.push(buf);
        }
        let read = started.elapsed();
        let upload_started = Instant::now();
        let mut arenas = Vec::with_capacity(host.len());
        for (buf, arena) in host.into_iter().zip(&self.manifest.arenas) {
            let t = buf.into_tensor(device).map_err(|e| SnapshotError::Tensor {
                name: format!("arena {}", arena.dtype),
                message: e.to_string(),
            })?;
            arenas.push(t);
        }
        if let Device::Cuda(_) = device {
            device.synchronize().map_err(|e| SnapshotError::Tensor {
                name: "device".into(),
                message: e.to_string(),
            })?;
        }
        let upload = upload_started.elapsed();
        let tensors = self.views(&arenas)?;
        let stats = RestoreStats {
            data_bytes: self.header.data_bytes,
            read,
            upload,
            total: started.elapsed(),
            direct: false,
            resident: None,
        };
        Ok((tensors, stats))
    }

    /// The manifest's tensors as views into their restored arenas.
    fn views(&self, arenas: &[Tensor]) -> Result<Vec<(String, Tensor)>, SnapshotError> {
        let mut tensors = Vec::with_capacity(self.manifest.tensors.len());
        for entry in &self.manifest.tensors {
            let arena = &arenas[entry.arena];
            let elem = arena.dtype().size_in_bytes() as u64;
            let numel: usize = entry.shape.iter().product();
            let t = arena
                .narrow(0, (entry.offset / elem) as usize, numel)
                .and_then(|t| t.reshape(entry.shape.as_slice()))
                .map_err(|e| SnapshotError::Tensor {
                    name: entry.name.clone(),
                    message: e.to_string(),
                })?;
            tensors.push((entry.name.clone(), t));
        }
        Ok(tensors)
    }

    /// The error for a data chunk that fails its checksum.
    fn chunk_error(&self, index: usize, chunk: usize) -> SnapshotError {
        let arena = &self.manifest.arenas[index];
        let base = self.data_offset + arena.offset;
        let start = chunk as u64 * arena.chunk_bytes;
        let end = (start + arena.chunk_bytes).min(arena.bytes);
        SnapshotError::Corrupt {
            path: self.path.clone(),
            what: format!(
                "data chunk {chunk} of arena {index} ({}, file bytes {}..{}) fails its checksum",
                arena.dtype,
                base + start,
                base + end
            ),
        }
    }

    /// Fills `dst` from `offset`, large buffers split across a few threads: first-touch page
    /// faults (the kernel zeroing fresh memory) and the copy from the page cache then run
    /// on every core instead of one.
    fn read_parallel(&self, dst: &mut [u8], offset: u64) -> Result<(), SnapshotError> {
        const PIECE: usize = 8 << 20;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8)
            .min(dst.len().div_ceil(PIECE));
        if threads <= 1 {
            return self
                .file
                .read_exact_at(dst, offset)
                .map_err(io(&self.path, "cannot read the snapshot's data"));
        }
        let per = dst.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = dst
                .chunks_mut(per)
                .enumerate()
                .map(|(i, part)| {
                    let at = offset + (i * per) as u64;
                    scope.spawn(move || self.file.read_exact_at(part, at))
                })
                .collect();
            for h in handles {
                h.join()
                    .expect("a reader thread panicked")
                    .map_err(io(&self.path, "cannot read the snapshot's data"))?;
            }
            Ok(())
        })
    }

    fn read_arena(&self, index: usize, arena: &Arena, dst: &mut [u8]) -> Result<(), SnapshotError> {
        let base = self.data_offset + arena.offset;
        for (c, expected) in arena.chunk_checksums.iter().enumerate() {
            let start = c as u64 * arena.chunk_bytes;
            let end = (start + arena.chunk_bytes).min(arena.bytes);
            let chunk = &mut dst[start as usize..end as usize];
            self.file
                .read_exact_at(chunk, base + start)
                .map_err(io(&self.path, "cannot read the snapshot's data"))?;
            self.advance(chunk.len());
            if xxh3_64(chunk) != *expected {
                return Err(self.chunk_error(index, c));
            }
        }
        Ok(())
    }
}

fn validate_layout(header: &Header, manifest: &Manifest, data_bytes: u64) -> Result<(), String> {
    if header.data_bytes != data_bytes {
        return Err("the header's data size disagrees with the preamble".into());
    }
    if header.tensor_count != manifest.tensors.len() {
        return Err("the header's tensor count disagrees with the manifest".into());
    }
    let mut end = 0u64;
    for (i, a) in manifest.arenas.iter().enumerate() {
        let dtype = parse_dtype(&a.dtype)
            .ok_or_else(|| format!("arena {i} has unknown dtype {:?}", a.dtype))?;
        if a.offset != end
            || !a.offset.is_multiple_of(ARENA_ALIGN)
            || !a.bytes.is_multiple_of(ARENA_ALIGN)
        {
            return Err(format!("arena {i} is misplaced"));
        }
        if a.chunk_bytes == 0 || a.chunk_checksums.len() as u64 != a.bytes.div_ceil(a.chunk_bytes) {
            return Err(format!(
                "arena {i} has {} chunk checksums for {} bytes",
                a.chunk_checksums.len(),
                a.bytes
            ));
        }
        if !(a.bytes as usize).is_multiple_of(dtype.size_in_bytes()) {
            return Err(format!(
                "arena {i} is not a whole number of {:?} elements",
                a.dtype
            ));
        }
        end = a
            .offset
            .checked_add(a.bytes)
            .ok_or("arena sizes overflow")?;
    }
    if end != data_bytes {
        return Err("the arenas do not cover the data region".into());
    }
    for t in &manifest.tensors {
        let a = manifest.arenas.get(t.arena).ok_or_else(|| {
            format!(
                "tensor `{}` names arena {}, which does not exist",
                t.name, t.arena
            )
        })?;
        if a.dtype != t.dtype {
            return Err(format!(
                "tensor `{}` is {} but sits in the {} arena",
                t.name, t.dtype, a.dtype
            ));
        }
        let elem = parse_dtype(&t.dtype)
            .expect("checked with its arena")
            .size_in_bytes() as u64;
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| format!("tensor `{}` has an impossible shape", t.name))?;
        let bytes = numel.checked_mul(elem).ok_or("tensor size overflows")?;
        if !t.offset.is_multiple_of(TENSOR_ALIGN)
            || t.offset.checked_add(bytes).is_none_or(|e| e > a.bytes)
        {
            return Err(format!("tensor `{}` lies outside its arena", t.name));
        }
    }
    // No two tensors may share bytes (on the CPU each owns its memory).
    let mut spans: Vec<(usize, u64, u64, &str)> = manifest
        .tensors
        .iter()
        .map(|t| {
            let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
            let elem = parse_dtype(&t.dtype).expect("checked").size_in_bytes() as u64;
            (t.arena, t.offset, t.offset + numel * elem, t.name.as_str())
        })
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((a1, _, end1, _), (a2, start2, _, name)) = (pair[0], pair[1]);
        if a1 == a2 && start2 < end1 {
            return Err(format!("tensor `{name}` overlaps the one before it"));
        }
    }
    Ok(())
}

/// Checks an arena's bytes chunk by chunk as they stream past, in file order.
struct ChunkVerifier<'a> {
    snapshot: &'a Snapshot,
    index: usize,
    arena: &'a Arena,
    chunk: usize,
    filled: u64,
    hasher: xxhash_rust::xxh3::Xxh3,
}

impl<'a> ChunkVerifier<'a> {
    fn new(snapshot: &'a Snapshot, index: usize, arena: &'a Arena) -> Self {
        Self {
            snapshot,
            index,
            arena,
            chunk: 0,
            filled: 0,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
        }
    }
    fn update(&mut self, mut bytes: &[u8]) -> Result<(), SnapshotError> {
        self.snapshot.advance(bytes.len());
        while !bytes.is_empty() {
            let take = ((self.arena.chunk_bytes - self.filled) as usize).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.filled += take as u64;
            bytes = &bytes[take..];
            if self.filled == self.arena.chunk_bytes {
                self.check()?;
            }
        }
        Ok(())
    }
    fn check(&mut self) -> Result<(), SnapshotError> {
        let expected = self.arena.chunk_checksums.get(self.chunk).copied();
        if expected != Some(self.hasher.digest()) {
            let start = self.snapshot.data_offset
                + self.arena.offset
                + self.chunk as u64 * self.arena.chunk_bytes;
            return Err(SnapshotError::Corrupt {
                path: self.snapshot.path.clone(),
                what: format!(
                    "data chunk {} of arena {} ({}, file bytes {}..{}) fails its checksum",
                    self.chunk,
                    self.index,
                    self.arena.dtype,
                    start,
                    start + self.filled
                ),
            });
        }
        self.chunk += 1;
        self.filled = 0;
        self.hasher.reset();
        Ok(())
    }
    fn finish(mut self) -> Result<(), SnapshotError> {
        if self.filled > 0 {
            self.check()?;
        }
        if self.chunk != self.arena.chunk_checksums.len() {
            return Err(SnapshotError::Corrupt {
                path: self.snapshot.path.clone(),
                what: format!("arena {} was not read to its end", self.index),
            });
        }
        Ok(())
    }
}

/// A zeroed vector of a 16-bit float type from the allocator's zeroed pages (no
/// element-by-element fill: restore buffers are gigabytes).
fn zeroed_halves<T: Copy>(n: usize) -> Vec<T> {
    assert_eq!(std::mem::size_of::<T>(), 2);
    assert_eq!(std::mem::align_of::<T>(), 2);
    let mut raw = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: T is bf16 or f16, `repr(transparent)` over u16 (size and alignment checked
    // above), so the allocation's layout is the same and all-zero bits are valid values.
    unsafe { Vec::from_raw_parts(raw.as_mut_ptr() as *mut T, raw.len(), raw.capacity()) }
}

/// Whether a CPU restore maps the snapshot instead of copying it: only where the binary
/// installed [`SnapshotAllocator`], and not with `RUNNER_RESTORE_CPU=copy`.
fn cpu_restore_maps() -> bool {
    std::env::var("RUNNER_RESTORE_CPU").map_or(true, |v| v != "copy") && allocator_installed()
}

/// A typed host buffer for one arena, so the tensor takes it over without a copy.
enum ArenaBuffer {
    U8(Vec<u8>),
    U32(Vec<u32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl ArenaBuffer {
    fn new(dtype: DType, bytes: usize) -> Self {
        let n = bytes / dtype.size_in_bytes();
        match dtype {
            DType::U8 => Self::U8(vec![0; n]),
            DType::U32 => Self::U32(vec![0; n]),
            DType::I64 => Self::I64(vec![0; n]),
            DType::F32 => Self::F32(vec![0.0; n]),
            DType::F64 => Self::F64(vec![0.0; n]),
            DType::BF16 => Self::BF16(zeroed_halves(n)),
            DType::F16 => Self::F16(zeroed_halves(n)),
            other => unreachable!("validated dtype {other:?}"),
        }
    }
    /// `numel` values of `dtype` at `offset` inside a mapping, without a copy; `None` for
    /// an empty tensor or where the allocator did not hand the mapping out.
    fn mapped(
        mapping: &mapped::Mapping,
        dtype: DType,
        offset: usize,
        numel: usize,
    ) -> Option<Self> {
        Some(match dtype {
            DType::U8 => Self::U8(mapping.take_vec(offset, numel)?),
            DType::U32 => Self::U32(mapping.take_vec(offset, numel)?),
            DType::I64 => Self::I64(mapping.take_vec(offset, numel)?),
            DType::F32 => Self::F32(mapping.take_vec(offset, numel)?),
            DType::F64 => Self::F64(mapping.take_vec(offset, numel)?),
            DType::BF16 => Self::BF16(mapping.take_vec(offset, numel)?),
            DType::F16 => Self::F16(mapping.take_vec(offset, numel)?),
            _ => return None,
        })
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::U8(v) => v,
            Self::U32(v) => bytemuck::cast_slice_mut(v),
            Self::I64(v) => bytemuck::cast_slice_mut(v),
            Self::F32(v) => bytemuck::cast_slice_mut(v),
            Self::F64(v) => bytemuck::cast_slice_mut(v),
            // SAFETY: bf16 and f16 are `repr(transparent)` over u16: any bytes are valid.
            Self::BF16(v) => unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 2)
            },
            Self::F16(v) => unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 2)
            },
        }
    }
    /// The tensor a manifest entry describes, its shape and name in any error.
    fn into_tensor_of(self, entry: &TensorEntry, device: &Device) -> Result<Tensor, SnapshotError> {
        self.into_tensor(device)
            .and_then(|t| t.reshape(entry.shape.as_slice()))
            .map_err(|e| SnapshotError::Tensor {
                name: entry.name.clone(),
                message: e.to_string(),
            })
    }
    fn into_tensor(self, device: &Device) -> candle_core::Result<Tensor> {
        macro_rules! t {
            ($v:expr) => {{
                let n = $v.len();
                // On the CPU the vector becomes the tensor's storage; on a GPU it is one copy.
                Tensor::from_vec($v, n, device)
            }};
        }
        match self {
            Self::U8(v) => t!(v),
            Self::U32(v) => t!(v),
            Self::I64(v) => t!(v),
            Self::F32(v) => t!(v),
            Self::F64(v) => t!(v),
            Self::BF16(v) => t!(v),
            Self::F16(v) => t!(v),
        }
    }
}

/// The GPU's pinned host-to-device copy bandwidth in bytes per second (the ceiling for a
/// CUDA restore); `None` on the CPU or in a build without CUDA.
pub fn pinned_h2d_bandwidth(device: &Device) -> Option<Result<f64, SnapshotError>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => Some(cuda_restore::pinned_h2d_bandwidth(cuda)),
        _ => None,
    }
}

/// A digest of a model's files that changes when any of them does, without reading
/// gigabytes of weights: small files (configs, tokenizers) are hashed whole; large ones by
/// path, size, modification time, their first MiB and (for safetensors) their header.
pub fn fingerprint(files: &[PathBuf]) -> std::io::Result<String> {
    const WHOLE: u64 = 16 << 20;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for path in files {
        let meta = std::fs::metadata(path)?;
        h.update(path.to_string_lossy().as_bytes());
        h.update(&meta.len().to_le_bytes());
        if meta.len() <= WHOLE {
            h.update(&std::fs::read(path)?);
            continue;
        }
        if let Ok(modified) = meta.modified() {
            let t = modified
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            h.update(&t.as_nanos().to_le_bytes());
        }
        let file = File::open(path)?;
        let mut head = vec![0u8; 1 << 20];
        file.read_exact_at(&mut head, 0)?;
        h.update(&head);
        if path.extension().is_some_and(|e| e == "safetensors") {
            let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            if n < WHOLE && 8 + n <= meta.len() {
                let mut header = vec![0u8; n as usize];
                file.read_exact_at(&mut header, 8)?;
                h.update(&header);
            }
        }
    }
    Ok(format!("{:016x}", h.digest()))
}

#[cfg(test)]
mod tests;
