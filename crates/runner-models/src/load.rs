//! Where an architecture's tensors come from at load: checked safetensors files, or the
//! tensors of a snapshot (already converted, already on the device). Loading from files
//! can also record every tensor the model takes, as the model holds it, for a snapshot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use runner_spec::WeightsLayout;

use crate::weights::{CheckedWeights, WeightsError};
use crate::SetupLog;

/// Tensors taken by a model during load, in the order it took them.
pub type Recorded = Arc<Mutex<Vec<(String, RecordedTensor)>>>;

/// Makes a recorded tensor's bytes (as a snapshot stores them) when the snapshot is written.
pub type MakeBytes = Arc<dyn Fn() -> candle_core::Result<Vec<u8>> + Send + Sync>;

/// One tensor of a recording: held (it shares the model's memory), or made only when the
/// snapshot is written, from what the model holds, where holding a copy meanwhile would
/// double the model's memory (quantized blocks that exist only in the device's form).
#[derive(Clone)]
pub enum RecordedTensor {
    Held(Tensor),
    Deferred {
        dtype: DType,
        dims: Vec<usize>,
        make: MakeBytes,
    },
}

impl RecordedTensor {
    /// The tensor itself: held, or made now (on the CPU).
    pub fn tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Held(t) => Ok(t.clone()),
            Self::Deferred { dtype, dims, make } => {
                Tensor::from_raw_buffer(&make()?, *dtype, dims, &Device::Cpu)
            }
        }
    }
}

impl runner_snapshot::SnapshotSource for RecordedTensor {
    fn dtype(&self) -> DType {
        match self {
            Self::Held(t) => t.dtype(),
            Self::Deferred { dtype, .. } => *dtype,
        }
    }
    fn dims(&self) -> Vec<usize> {
        match self {
            Self::Held(t) => t.dims().to_vec(),
            Self::Deferred { dims, .. } => dims.clone(),
        }
    }
    fn bytes(&self, name: &str) -> Result<Vec<u8>, runner_snapshot::SnapshotError> {
        match self {
            Self::Held(t) => runner_snapshot::tensor_bytes(name, t),
            Self::Deferred { make, .. } => {
                make().map_err(|e| runner_snapshot::SnapshotError::Tensor {
                    name: name.to_string(),
                    message: e.to_string(),
                })
            }
        }
    }
}

/// Told the number of bytes each time weights are read (for a progress bar).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// A snapshot restore running on a thread of its own: its tensors, or why it failed.
pub type RestoreJob = JoinHandle<Result<Vec<(String, Tensor)>, String>>;

/// A snapshot's tensors, restored or still being restored: the model starts building
/// (reading its configuration, parsing its tokenizer) while the restore runs, and waits for
/// the tensors when it first asks for one.
struct Restoring {
    job: Mutex<Option<RestoreJob>>,
    tensors: OnceLock<Result<HashMap<String, Tensor>, String>>,
}

impl Restoring {
    fn ready(tensors: Vec<(String, Tensor)>) -> Self {
        Self {
            job: Mutex::new(None),
            tensors: OnceLock::from(Ok(tensors.into_iter().collect())),
        }
    }
    fn running(job: RestoreJob) -> Self {
        Self {
            job: Mutex::new(Some(job)),
            tensors: OnceLock::new(),
        }
    }
    /// Waits for the restore, once; every later call answers at once.
    fn tensors(&self) -> Result<&HashMap<String, Tensor>, &str> {
        self.tensors
            .get_or_init(|| {
                let job = self.job.lock().unwrap_or_else(|e| e.into_inner()).take();
                match job.map(JoinHandle::join) {
                    Some(Ok(restored)) => restored.map(|t| t.into_iter().collect()),
                    Some(Err(_)) => Err("the snapshot restore panicked".to_string()),
                    None => Err("the snapshot restore was already waited for".to_string()),
                }
            })
            .as_ref()
            .map_err(String::as_str)
    }
}

/// What an architecture's `load` gets besides the model directory and the device.
pub struct LoadContext<'a> {
    log: SetupLog<'a>,
    restored: Option<Restoring>,
    recorder: Option<Recorded>,
    progress: Option<Progress>,
    python: Option<std::path::PathBuf>,
    /// A Python worker already started (it imported the predictor to describe it), to set
    /// up instead of starting another.
    python_started: std::sync::Mutex<Option<crate::python::Started>>,
    /// Quantization at load asked for on the command line (`--quantize`), which overrides
    /// the model directory's own `RUNNER_QUANTIZE`.
    quantize: Option<String>,
}

impl<'a> LoadContext<'a> {
    /// A cold load from the model directory's weights.
    pub fn new(log: SetupLog<'a>) -> Self {
        Self {
            log,
            restored: None,
            recorder: None,
            progress: None,
            python: None,
            python_started: Default::default(),
            quantize: None,
        }
    }
    /// A load from a snapshot's tensors instead of the weights files.
    pub fn restored(log: SetupLog<'a>, tensors: Vec<(String, Tensor)>) -> Self {
        Self {
            log,
            restored: Some(Restoring::ready(tensors)),
            recorder: None,
            progress: None,
            python: None,
            python_started: Default::default(),
            quantize: None,
        }
    }
    /// A load from a snapshot whose restore is still running on `job`'s thread.
    pub fn restoring(log: SetupLog<'a>, job: RestoreJob) -> Self {
        Self {
            log,
            restored: Some(Restoring::running(job)),
            recorder: None,
            progress: None,
            python: None,
            python_started: Default::default(),
            quantize: None,
        }
    }
    /// Waits for the snapshot restore (if the model never asked for a tensor) and says
    /// whether it succeeded: a failed restore is the error to report, whatever the model's
    /// load made of it.
    pub fn finish_restore(&self) -> Result<(), String> {
        match &self.restored {
            Some(r) => r.tensors().map(|_| ()).map_err(str::to_string),
            None => Ok(()),
        }
    }
    /// A cold load that records every tensor the model takes into `recorder`.
    pub fn recording(log: SetupLog<'a>, recorder: Recorded) -> Self {
        Self {
            log,
            restored: None,
            recorder: Some(recorder),
            progress: None,
            python: None,
            python_started: Default::default(),
            quantize: None,
        }
    }
    /// Reports weight bytes read to `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }
    /// Tells the progress report that `bytes` more were read (for loaders that read
    /// files themselves, such as GGUF).
    pub fn advance(&self, bytes: u64) {
        if let Some(p) = &self.progress {
            p(bytes);
        }
    }
    pub fn progress(&self) -> Option<&Progress> {
        self.progress.as_ref()
    }
    /// The interpreter for Python predictors (`--python`).
    pub fn with_python(mut self, python: Option<std::path::PathBuf>) -> Self {
        self.python = python;
        self
    }
    /// Quantization at load from the command line (`--quantize`).
    pub fn with_quantize(mut self, quantize: Option<String>) -> Self {
        self.quantize = quantize;
        self
    }
    pub fn quantize(&self) -> Option<&str> {
        self.quantize.as_deref()
    }
    pub fn python(&self) -> Option<&std::path::Path> {
        self.python.as_deref()
    }
    /// The Python worker that described the predictor, for the load to set up.
    pub fn with_python_started(mut self, started: Option<crate::python::Started>) -> Self {
        self.python_started = std::sync::Mutex::new(started);
        self
    }
    pub(crate) fn take_python_started(&self) -> Option<crate::python::Started> {
        self.python_started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
    pub fn log(&self, line: &str) {
        (self.log)(line)
    }
    pub fn is_restore(&self) -> bool {
        self.restored.is_some()
    }
    /// Whether the tensors the model takes are being recorded for a snapshot.
    pub fn is_recording(&self) -> bool {
        self.recorder.is_some()
    }

    /// A tensor the model derives from its weights at load (transposed, fused, converted):
    /// from a snapshot it is taken as saved, so a restore skips the work; on a cold load it
    /// is made, and a recording keeps it in place of the weights it was made from, so the
    /// snapshot holds what the model holds. `name` must not be a weight's name.
    pub fn prepared(
        &self,
        name: &str,
        make: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let Some(restoring) = &self.restored {
            let tensors = restoring.tensors().map_err(candle_core::Error::msg)?;
            if let Some(t) = tensors.get(name) {
                return Ok(t.clone());
            }
        }
        let Some(recorder) = &self.recorder else {
            return make();
        };
        let taken_before: std::collections::HashSet<String> = recorder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let t = make()?;
        let mut recorded = recorder.lock().unwrap_or_else(|e| e.into_inner());
        // The weights taken only to make this tensor are not needed again.
        recorded.retain(|(n, _)| taken_before.contains(n));
        recorded.push((name.to_string(), RecordedTensor::Held(t.clone())));
        Ok(t)
    }

    /// Records a tensor the model holds in a form of its own (`dtype`, `dims`), whose bytes
    /// `make` makes only when the snapshot is written; no copy is held until then. Nothing
    /// happens unless recording.
    pub fn record_deferred(&self, name: &str, dtype: DType, dims: Vec<usize>, make: MakeBytes) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let mut recorded = recorder.lock().unwrap_or_else(|e| e.into_inner());
        recorded.retain(|(n, _)| n != name);
        recorded.push((
            name.to_string(),
            RecordedTensor::Deferred { dtype, dims, make },
        ));
    }

    /// The VarBuilder a model builds itself from. From a snapshot, tensors are used as they
    /// are (a dtype or device conversion only happens if the model asks for another).
    pub fn var_builder(
        &self,
        layout: &WeightsLayout,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, WeightsError> {
        let backend: Box<dyn SimpleBackend> = match &self.restored {
            Some(restoring) => Box::new(RestoredTensors(
                restoring
                    .tensors()
                    .map_err(|e| WeightsError::Missing(format!("the snapshot: {e}")))?
                    .clone(),
            )),
            None => {
                let mut checked = CheckedWeights::open(layout)?;
                if let Some(p) = &self.progress {
                    checked.set_progress(Arc::clone(p));
                }
                match &self.recorder {
                    Some(r) => Box::new(Recording {
                        inner: checked,
                        recorded: Arc::clone(r),
                    }),
                    None => Box::new(checked),
                }
            }
        };
        Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
    }
}

struct Recording<B> {
    inner: B,
    recorded: Recorded,
}

impl<B: SimpleBackend> Recording<B> {
    fn keep(&self, name: &str, t: &Tensor) {
        let mut r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        // A tensor taken twice is kept once, as last taken.
        r.retain(|(n, _)| n != name);
        r.push((name.to_string(), RecordedTensor::Held(t.clone())));
    }
}

impl<B: SimpleBackend> SimpleBackend for Recording<B> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, name, h, dtype, dev)?;
        self.keep(name, &t);
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.keep(name, &t);
        Ok(t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

struct RestoredTensors(HashMap<String, Tensor>);

impl RestoredTensors {
    fn take(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(t) = self.0.get(name) else {
            candle_core::bail!("tensor `{name}` is missing from the snapshot; take a new snapshot with `runner snapshot`");
        };
        // Same dtype and device: both are no-ops that share the snapshot's memory.
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for RestoredTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.take(name, dtype, dev)?;
        if t.dims() != s.dims() {
            candle_core::bail!(
                "snapshot tensor `{name}` has shape {:?}, the model expects {:?}; take a new snapshot",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.take(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> WeightsLayout {
        WeightsLayout {
            files: vec![],
            safetensors: vec![],
            safetensors_index: None,
            gguf: vec![],
        }
    }

    #[test]
    fn a_running_restore_is_waited_for_when_a_tensor_is_first_asked_for() {
        let log = |_: &str| {};
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let job = std::thread::spawn(move || {
            rx.recv().unwrap(); // holds the restore until the test lets it finish
            let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).map_err(|e| e.to_string())?;
            Ok(vec![("w".to_string(), t)])
        });
        let ctx = LoadContext::restoring(&log, job);
        assert!(ctx.is_restore());
        tx.send(()).unwrap();
        let vb = ctx
            .var_builder(&layout(), DType::F32, &Device::Cpu)
            .unwrap();
        let w = vb.get(3, "w").unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        let made = ctx
            .prepared("w", || unreachable!("taken from the snapshot"))
            .unwrap();
        assert_eq!(made.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0]);
        assert!(ctx.finish_restore().is_ok());
    }

    #[test]
    fn a_failed_restore_is_the_error_everywhere() {
        let log = |_: &str| {};
        let job = std::thread::spawn(|| Err("chunk 3 of the bf16 arena fails its checksum".into()));
        let ctx = LoadContext::restoring(&log, job);
        let e = ctx
            .prepared("w", || unreachable!())
            .unwrap_err()
            .to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        let e = ctx
            .var_builder(&layout(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        assert!(ctx
            .finish_restore()
            .unwrap_err()
            .contains("fails its checksum"));
        // A model that never asks still learns it.
        let job = std::thread::spawn(|| Err("truncated".into()));
        let untouched = LoadContext::restoring(&log, job);
        assert_eq!(untouched.finish_restore().unwrap_err(), "truncated");
    }
}
