//! `runner serve --save-snapshot`: after a cold load, the server writes the snapshot the
//! next start restores, in the background once it is ready. So a model directory without
//! a snapshot, or with one an upgrade made stale (another runner, driver or weights), gets
//! a fresh one from its first start instead of waiting for someone to run `runner snapshot`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Engine, SnapshotMode};

/// Where a background snapshot save stands; `/health-check` shows it as
/// `runner.snapshot_save`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum SnapshotSave {
    /// Being written to `path`.
    Saving {
        path: PathBuf,
    },
    Saved {
        path: PathBuf,
        bytes: u64,
        seconds: f64,
    },
    Failed {
        path: PathBuf,
        error: String,
    },
}

impl SnapshotSave {
    /// `saving`, `saved` or `failed`.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Saving { .. } => "saving",
            Self::Saved { .. } => "saved",
            Self::Failed { .. } => "failed",
        }
    }
}

impl Engine {
    /// What became of the snapshot this server saves after its cold load, if it saves one.
    pub fn snapshot_save(&self) -> Option<SnapshotSave> {
        self.save
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits up to `limit` for a background snapshot save to end; `false` if one is still
    /// being written (exiting then leaves only its temporary file, which the next writer
    /// of that snapshot removes).
    pub fn wait_for_snapshot_save(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut thread = self.save.thread.lock().unwrap_or_else(|e| e.into_inner());
        while thread.as_ref().is_some_and(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(t) = thread.take() {
            let _ = t.join();
        }
        true
    }

    /// Right after a successful setup: with [`crate::SnapshotOptions::save`], a model that
    /// loaded cold from its weights has its snapshot written on a background thread (at a
    /// lower CPU priority than the predictions). A failure (a read-only directory, a full
    /// disk) is a warning; the server goes on serving.
    pub(crate) fn start_snapshot_save(self: &Arc<Self>) {
        if !self.snapshot_options.save {
            return;
        }
        let Some(loaded) = self.loaded() else {
            return;
        };
        if loaded.weights_source == "snapshot" || loaded.weights_source == "none" {
            return;
        }
        if self.architecture.name == runner_models::PYTHON.name {
            tracing::info!(
                target: "runner::setup",
                "--save-snapshot: a Python predictor's state lives in its worker process; there is no snapshot to save"
            );
            return;
        }
        let path = match &self.snapshot_options.mode {
            SnapshotMode::Path(path) => path.clone(),
            SnapshotMode::Auto => match self.device.get() {
                Some(device) => self.default_snapshot_path(crate::device_kind(device)),
                None => return,
            },
            // Refused when the engine was made.
            SnapshotMode::Off => return,
        };
        self.set_save_status(SnapshotSave::Saving { path: path.clone() });
        tracing::info!(
            target: "runner::setup",
            "saving a snapshot for the next start in the background: {}",
            path.display()
        );
        let engine = Arc::clone(self);
        let target = path.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshot-save".into())
            .spawn(move || {
                lower_this_threads_priority();
                let status = match engine.write_snapshot(Some(&path)) {
                    Ok(report) => {
                        tracing::info!(
                            target: "runner::setup",
                            "snapshot saved: {} tensors ({:.1} MB) in {:.2}s to {}; the next start restores it",
                            report.tensors,
                            report.data_bytes as f64 / 1e6,
                            report.elapsed.as_secs_f64(),
                            report.path.display()
                        );
                        SnapshotSave::Saved {
                            path: report.path,
                            bytes: report.file_bytes,
                            seconds: report.elapsed.as_secs_f64(),
                        }
                    }
                    Err(error) => {
                        tracing::warn!(
                            target: "runner::setup",
                            "could not save a snapshot to {}: {error}; serving goes on, and the next start loads cold too (free space, make the folder writable, or pass --snapshot PATH)",
                            path.display()
                        );
                        SnapshotSave::Failed { path, error }
                    }
                };
                // The recorded tensors were kept only for this; a tensor the model no
                // longer holds can go now.
                engine.forget_recorded();
                engine.set_save_status(status);
            });
        match spawned {
            Ok(thread) => {
                *self.save.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
            }
            Err(e) => {
                let error = format!("cannot start a thread to write it: {e}");
                tracing::warn!(target: "runner::setup", "could not save a snapshot: {error}");
                self.set_save_status(SnapshotSave::Failed {
                    path: target,
                    error,
                });
            }
        }
    }

    fn set_save_status(&self, status: SnapshotSave) {
        *self.save.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }
}

/// The engine's side of a background save: its status and its thread.
#[derive(Default)]
pub(crate) struct SaveState {
    status: std::sync::Mutex<Option<SnapshotSave>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Writing a snapshot is background work: on Linux a thread has a nice value of its own,
/// so predictions keep the cores first.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read and set this thread's scheduling value.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
