//! Where an architecture's tensors come from at load: checked safetensors files, or the
//! tensors of a snapshot (already converted, already on the device). Loading from files
//! can also record every tensor the model takes, as the model holds it, for a snapshot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use runner_spec::WeightsLayout;

use crate::weights::{CheckedWeights, WeightsError};
use crate::SetupLog;

/// Tensors taken by a model during load, in the order it took them.
pub type Recorded = Arc<Mutex<Vec<(String, Tensor)>>>;

/// Told the number of bytes each time weights are read (for a progress bar).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// What an architecture's `load` gets besides the model directory and the device.
pub struct LoadContext<'a> {
    log: SetupLog<'a>,
    restored: Option<HashMap<String, Tensor>>,
    recorder: Option<Recorded>,
    progress: Option<Progress>,
    python: Option<std::path::PathBuf>,
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
        }
    }
    /// A load from a snapshot's tensors instead of the weights files.
    pub fn restored(log: SetupLog<'a>, tensors: Vec<(String, Tensor)>) -> Self {
        Self {
            log,
            restored: Some(tensors.into_iter().collect()),
            recorder: None,
            progress: None,
            python: None,
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
    pub fn python(&self) -> Option<&std::path::Path> {
        self.python.as_deref()
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
        if let Some(t) = self.restored.as_ref().and_then(|r| r.get(name)) {
            return Ok(t.clone());
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
        recorded.push((name.to_string(), t.clone()));
        Ok(t)
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
            Some(tensors) => Box::new(RestoredTensors(tensors.clone())),
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
        r.push((name.to_string(), t.clone()));
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
