//! `--device auto|cpu|cuda[:N]`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
#[cfg(feature = "cuda")]
use runner_spec::cuda_arch::GpuArch;
use runner_spec::cuda_arch::KernelTargets;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when runner was built with CUDA and a GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid device {0:?}: use auto, cpu, cuda or cuda:N")]
    Invalid(String),
    #[error("--device {0}: this runner was built without CUDA; rebuild with `cargo build --release --features cuda` or use --device cpu")]
    NoCudaSupport(DeviceSpec),
    #[error("--device {spec}: cannot open the GPU: {reason}")]
    Unavailable { spec: DeviceSpec, reason: String },
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Invalid(s.to_string())),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `auto` takes CUDA device 0 when it opens, else the CPU (saying why).
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if !cfg!(feature = "cuda") || !cuda_driver_present() {
                    return Ok(Device::Cpu);
                }
                open_cuda(0).or_else(|(reason, gpu_opened)| {
                    // No GPU here (the toolkit's stub for a driver, no device): the CPU,
                    // said at info level. A GPU that is there but cannot be used (a
                    // library missing, an old driver, no memory) is worth a warning.
                    if !gpu_opened && no_gpu_here() {
                        tracing::info!("--device auto: the CPU, because {reason}");
                    } else {
                        tracing::warn!("--device auto: the CPU, because {reason}");
                    }
                    Ok(Device::Cpu)
                })
            }
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::NoCudaSupport(self));
                }
                open_cuda(n).map_err(|(reason, _)| DeviceError::Unavailable { spec: self, reason })
            }
        }
    }
}

/// Opens CUDA device `n`; where it cannot, why in words, and whether the driver had let the
/// device open (candle's own failure) or refused before that ([`cuda_unavailable`]).
fn open_cuda(n: usize) -> Result<Device, (String, bool)> {
    let started = std::time::Instant::now();
    // Held until candle has the same (primary) context: dropping the last reference would
    // tear it down.
    #[cfg(feature = "cuda")]
    let early = early_context(n);
    #[cfg(feature = "cuda")]
    let early_took = early.as_ref().map(|e| e.took);
    #[cfg(not(feature = "cuda"))]
    let early_took = None;
    // cudarc panics where a library is missing, and reports the driver's refusals as bare
    // codes: say what is wrong, and what to do.
    if let Some(reason) = cuda_unavailable(n) {
        return Err((reason, false));
    }
    let checked = started.elapsed();
    let device = Device::new_cuda(n).map_err(|e| (driver_error_words(&e.to_string()), true))?;
    without_event_tracking_if_asked(&device);
    let _ = OPEN_TIMES.set((checked, started.elapsed(), early_took));
    #[cfg(feature = "cuda")]
    drop(early);
    Ok(device)
}

/// How long the first CUDA device took to open: the libraries and the driver's checks
/// (waiting for cuBLAS to load where it loads on a thread of its own), then in all; and how
/// long `beside-init`'s thread took to create the context it opened with (`None`: the
/// device made its own).
type OpenTimes = (
    std::time::Duration,
    std::time::Duration,
    Option<std::time::Duration>,
);
static OPEN_TIMES: std::sync::OnceLock<OpenTimes> = std::sync::OnceLock::new();

/// Where the CUDA device's opening went, for the setup log (CUDA only): "CUDA device opened
/// in 0.155s: libraries and the driver's checks 0.081s, context 0.052s, cuBLAS handle
/// 0.015s, cuRAND 0.001s".
pub fn open_times() -> Option<String> {
    let (checked, total, early_took) = *OPEN_TIMES.get()?;
    #[cfg(feature = "cuda")]
    let candle = candle_core::cuda_backend::last_device_creation()
        .map(|t| {
            format!(
                ", context {:.3}s, cuBLAS handle {:.3}s, cuRAND {:.3}s",
                t.context.as_secs_f64(),
                t.cublas.as_secs_f64(),
                t.curand.as_secs_f64()
            )
        })
        .unwrap_or_default();
    #[cfg(not(feature = "cuda"))]
    let candle = String::new();
    let early = early_took
        .map(|took| {
            format!(
                " (its context made beside the libraries' loading, in {:.3}s from the start of the command)",
                took.as_secs_f64()
            )
        })
        .unwrap_or_default();
    Some(format!(
        "CUDA device opened in {:.3}s: libraries and the driver's checks {:.3}s{candle}{early}",
        total.as_secs_f64(),
        checked.as_secs_f64()
    ))
}

/// The CUDA libraries candle uses, by cudarc's names (libcublas brings libcublasLt). cudarc
/// opens each the first time it is used (`vendor/README.md`).
#[cfg(feature = "cuda")]
const CUDA_LIBRARIES: [(&str, &str, &str); 3] = [
    ("cuda", "the NVIDIA driver's CUDA library", "libcuda.so.1"),
    ("cublas", "cuBLAS (CUDA 13)", "libcublas.so.13"),
    ("curand", "cuRAND (CUDA 13)", "libcurand.so.10"),
];

/// Opens CUDA library `i` of [`CUDA_LIBRARIES`] once per process: the file name it was
/// found under, or every name tried. Names are tried in cudarc's order, so the file is the
/// one cudarc opens later, and the handle is kept: cudarc's own open then finds it loaded.
#[cfg(feature = "cuda")]
fn open_cuda_library(i: usize) -> &'static Result<String, Vec<String>> {
    static OPENED: [std::sync::OnceLock<Result<String, Vec<String>>>; 3] =
        [const { std::sync::OnceLock::new() }; 3];
    OPENED[i].get_or_init(|| {
        let names = candle_core::cuda_backend::cudarc::get_lib_name_candidates(CUDA_LIBRARIES[i].0);
        for name in &names {
            let Ok(c_name) = std::ffi::CString::new(name.as_str()) else {
                continue;
            };
            // SAFETY: dlopen with a valid C string; the handle is never closed, so the
            // library stays loaded for cudarc.
            let handle =
                unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
            if !handle.is_null() {
                return Ok(name.clone());
            }
        }
        Err(names)
    })
}

/// Whether the NVIDIA driver's library can be opened: a CUDA build on a machine without it
/// serves on the CPU under `--device auto`.
pub fn cuda_driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        open_cuda_library(0).is_ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// What is missing for CUDA, in words, or `None` when every library opens.
pub fn missing_cuda_libraries() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        let missing: Vec<String> = (0..CUDA_LIBRARIES.len())
            .filter_map(|i| {
                open_cuda_library(i).as_ref().err().map(|tried| {
                    let (_, what, file) = CUDA_LIBRARIES[i];
                    format!(
                        "{what} is not found ({file}, or any of the {} names cudarc tries)",
                        tried.len()
                    )
                })
            })
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "{}; install the NVIDIA driver and CUDA 13's cuBLAS and cuRAND (for example `pip install nvidia-cublas nvidia-curand`) and put the folders holding their libraries on LD_LIBRARY_PATH, or use --device cpu",
                missing.join("; ")
            )
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// `RUNNER_CUDA_EVENT_TRACKING=off` (opt-in, unmeasured on a GPU so far): cudarc gives every
/// device allocation two CUDA events by default (created and destroyed with it: four driver
/// calls for each tensor an operation makes) that order its uses across streams, but only
/// while a second stream exists. runner's model runs on candle's one stream, and the
/// restore's copy stream is synchronized before its tensors are handed over, so the events
/// order nothing here. Set before the first tensor: only allocations made after it go
/// without.
fn without_event_tracking_if_asked(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if std::env::var("RUNNER_CUDA_EVENT_TRACKING").is_ok_and(|v| v == "off") {
            // SAFETY: see above: every use of a tensor on another stream (the restore's
            // copies) is ordered by an explicit synchronize before the tensor is used.
            unsafe { cuda.disable_event_tracking() };
            tracing::debug!(target: "runner::setup", "cudarc's event tracking is off");
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Why CUDA device `n` cannot be used, in words (what is wrong, and what to do), or `None`
/// when the libraries open, the driver initialises and the device exists. Asked before
/// candle opens the device, which would panic (a missing library) or print a bare driver
/// code (`CUDA_ERROR_STUB_LIBRARY`). `cuInit` here is the one candle would call anyway.
pub fn cuda_unavailable(n: usize) -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        if let Some(missing) = missing_cuda_libraries() {
            return Some(missing);
        }
        if let Err(e) = result::init() {
            return Some(driver_refusal(e.0 as i32, &format!("{:?}", e.0)));
        }
        let count = match result::device::get_count() {
            Ok(count) => count.max(0) as usize,
            Err(e) => return Some(driver_refusal(e.0 as i32, &format!("{:?}", e.0))),
        };
        if n >= count {
            let have = match count {
                0 => "none".to_string(),
                1 => "one, cuda:0".to_string(),
                _ => format!("{count}, cuda:0 to cuda:{}", count - 1),
            };
            return Some(format!(
                "there is no GPU {n}: the NVIDIA driver sees {have}{}; pick one of those with --device cuda:N",
                visible_devices_note()
            ));
        }
        kernels_refuse(n)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = n;
        None
    }
}

/// Why GPU `n` cannot run this build's kernels at all (candle's PTX targets another GPU
/// family, or the GPU predates bf16): found here, before anything loads, instead of at the first kernel launch as a
/// bare `CUDA_ERROR_NO_BINARY_FOR_GPU`. A GPU that runs all but the quantized matrix
/// kernels opens with a warning.
#[cfg(feature = "cuda")]
fn kernels_refuse(n: usize) -> Option<String> {
    use runner_spec::cuda_arch::Support;
    let targets = kernel_targets()?;
    let (name, Some(cc)) = name_and_capability(n) else {
        return None;
    };
    let gpu = match name {
        Some(name) => format!("GPU {n} ({name})"),
        None => format!("GPU {n}"),
    };
    if let Some(why) = runner_spec::cuda_arch::too_old(&gpu, cc) {
        return Some(format!("{why}; use --device cpu"));
    }
    match targets.support(cc) {
        Support::Full => None,
        Support::None => targets.refusal(&gpu, cc),
        Support::WithoutQuantizedKernels => {
            if let Some(why) = targets.refusal(&gpu, cc) {
                tracing::warn!("{why}");
            }
            None
        }
    }
}

/// Whether the driver says this machine has no GPU at all: its library is the toolkit's
/// stub, or it sees no device.
fn no_gpu_here() -> bool {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        open_cuda_library(0).is_err()
            || matches!(result::init(), Err(e) if matches!(e.0 as i32, 34 | 100))
    }
    #[cfg(not(feature = "cuda"))]
    {
        true
    }
}

/// ` (CUDA_VISIBLE_DEVICES="…" hides the others)` where that variable is set.
#[cfg(feature = "cuda")]
fn visible_devices_note() -> String {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v:?} hides the others)"))
        .unwrap_or_default()
}

/// The driver's refusal `code` (named `name`) in words: what it means on a machine that is
/// meant to have a GPU, and what to do about it.
#[cfg(feature = "cuda")]
fn driver_refusal(code: i32, name: &str) -> String {
    let what = match code {
        34 => format!(
            "{} is the CUDA toolkit's link stub, not the NVIDIA driver's library: this machine has no NVIDIA driver, or the stub's folder comes before the driver's on LD_LIBRARY_PATH; install the driver (check with nvidia-smi) or take the stubs folder off LD_LIBRARY_PATH, or use --device cpu",
            cuda_driver_library_path().unwrap_or_else(|| "libcuda.so.1".into())
        ),
        35 => format!(
            "the NVIDIA driver{} is older than CUDA 13 needs (580 or newer): update the driver, or use --device cpu",
            driver_version().map(|v| format!(" (which supports CUDA {v})")).unwrap_or_default()
        ),
        100 => format!(
            "the NVIDIA driver sees no GPU{}: check nvidia-smi; in a container, start it with the GPU (docker run --gpus all); or use --device cpu",
            visible_devices_note()
        ),
        2 => "the GPU has no memory left for a CUDA context: other processes hold it (nvidia-smi lists them)".into(),
        46 | 802 => "the GPU is not available: it is busy in exclusive-process mode, lost, or (on NVSwitch machines) waiting for nvidia-fabricmanager; see nvidia-smi -q".into(),
        304 | 800 => "the operating system refused access to the GPU: check the permissions of /dev/nvidia* (the user must be allowed to open them)".into(),
        803 => "the NVIDIA driver's library does not match its kernel module (a driver update without a reboot?): reboot, or reinstall the driver".into(),
        804 => "CUDA's forward-compatibility library is in use on a GPU that does not support it: take the compat folder off LD_LIBRARY_PATH, or update the driver".into(),
        _ => return format!("the CUDA driver refused ({name})"),
    };
    format!("{what} ({name})")
}

/// The newest CUDA version the driver supports (`13.0`), where the driver answers.
#[cfg(feature = "cuda")]
fn driver_version() -> Option<String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut version: std::os::raw::c_int = 0;
    // SAFETY: the driver writes one integer through the pointer.
    let ok = unsafe { sys::cuDriverGetVersion(&mut version) } == sys::CUresult::CUDA_SUCCESS;
    ok.then(|| format!("{}.{}", version / 1000, (version % 1000) / 10))
}

/// Where the driver's library that was opened lies on disk, for messages about it.
#[cfg(feature = "cuda")]
fn cuda_driver_library_path() -> Option<String> {
    let name = std::ffi::CString::new(open_cuda_library(0).as_ref().ok()?.as_str()).ok()?;
    // SAFETY: RTLD_NOLOAD only looks up a library this process has open (and takes one
    // more reference, never dropped, as the library stays loaded anyway); dladdr reads
    // the loader's tables for an address inside it.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let symbol = libc::dlsym(handle, c"cuInit".as_ptr());
        let mut info: libc::Dl_info = std::mem::zeroed();
        if symbol.is_null() || libc::dladdr(symbol, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// candle's CUDA error text, with its backtrace (present under `RUST_BACKTRACE`) cut off:
/// the first line says what failed.
fn driver_error_words(error: &str) -> String {
    error.lines().next().unwrap_or(error).trim().to_string()
}

/// How the CUDA libraries are opened (`RUNNER_CUDA_PRELOAD`).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Preload {
    /// The default: on a thread of their own as the command starts; the device's
    /// initialisation waits for them.
    Beside,
    /// `beside-init`: the driver initialises and creates the GPU's context on a thread of
    /// its own while cuBLAS loads on another (unmeasured on a GPU so far).
    BesideInit,
    /// `off`: inside the device's initialisation, one after the other.
    Off,
}

#[cfg(feature = "cuda")]
fn preload_mode() -> Preload {
    match std::env::var("RUNNER_CUDA_PRELOAD").as_deref() {
        Ok("off") => Preload::Off,
        Ok("beside-init") => Preload::BesideInit,
        _ => Preload::Beside,
    }
}

/// What `RUNNER_CUDA_PRELOAD=beside-init`'s driver thread did: GPU `gpu`'s primary context
/// (held until candle retains the same one: dropping the last reference would tear it
/// down), and how long creating it took.
#[cfg(feature = "cuda")]
struct EarlyContext {
    gpu: usize,
    context: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>>,
    took: std::time::Duration,
}

#[cfg(feature = "cuda")]
static EARLY_CONTEXT: std::sync::Mutex<Option<std::thread::JoinHandle<EarlyContext>>> =
    std::sync::Mutex::new(None);

/// The context `beside-init` created for GPU `n` (waiting for its thread), and how long that
/// took; `None` in the other modes, for another GPU, or where the driver refused (the
/// checks after say why).
#[cfg(feature = "cuda")]
fn early_context(n: usize) -> Option<EarlyContext> {
    let handle = EARLY_CONTEXT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()?;
    handle
        .join()
        .ok()
        .filter(|early| early.gpu == n && early.context.is_some())
}

/// Opens the CUDA libraries on a thread of their own, for a command about to open GPU
/// `gpu`: cuBLAS's library constructors take 71–83 ms (and 147 MB) on the 2-core VM.
/// Opening the device waits for them ([`missing_cuda_libraries`]). Does nothing without
/// CUDA; a missing library is reported when the device opens.
///
/// While a `dlopen` runs, glibc holds its loader lock, and a Rust thread's first
/// thread-local with a destructor (`__cxa_thread_atexit_impl`) waits for it: runner's main
/// thread waited out the whole load before it listened (2-core VM, stop 33). On the H200 each
/// start's "process start" was 0.09 s with the preload and 0.010 s with it off, most likely
/// the same wait, so by default the load overlaps little. `beside-init` puts the one slow
/// step that needs no Rust thread-locals beside it: a thread of its own resolves the
/// driver's functions and initialises it first, then starts the libraries' thread and
/// creates GPU `gpu`'s primary context (0.13 s on the H200) while cuBLAS loads (unmeasured
/// on a GPU so far; the GPU script compares it). `off` loads the libraries inside the
/// device's initialisation (0.014 s slower in all than the default on the H200).
pub fn preload_cuda_libraries(gpu: usize) {
    #[cfg(feature = "cuda")]
    match preload_mode() {
        Preload::Off => {}
        Preload::Beside => {
            std::thread::spawn(open_the_libraries);
        }
        Preload::BesideInit => {
            let handle = std::thread::spawn(move || {
                use candle_core::cuda_backend::cudarc::driver::{result, CudaContext};
                let started = std::time::Instant::now();
                // cudarc opens the driver's library and resolves its functions (dlopen and
                // dlsym take the loader lock) and the driver initialises, before cuBLAS's
                // load holds that lock.
                let driver_ready = open_cuda_library(0).is_ok() && result::init().is_ok();
                let libraries = std::thread::spawn(open_the_libraries);
                let context = driver_ready.then(|| CudaContext::new(gpu).ok()).flatten();
                let took = started.elapsed();
                let _ = libraries.join();
                EarlyContext { gpu, context, took }
            });
            *EARLY_CONTEXT.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = gpu;
}

#[cfg(feature = "cuda")]
fn open_the_libraries() {
    let started = std::time::Instant::now();
    for i in 0..CUDA_LIBRARIES.len() {
        let _ = open_cuda_library(i);
    }
    tracing::debug!(
        target: "runner::setup",
        "CUDA libraries opened in {:.3}s",
        started.elapsed().as_secs_f64()
    );
}

/// A short name for a device, for logs and the ready line.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// What identifies a GPU for snapshot compatibility.
#[derive(Debug, Clone, Default)]
pub struct GpuIdentity {
    pub name: Option<String>,
    pub compute_capability: Option<String>,
    pub driver_version: Option<String>,
}

/// The GPU behind a device (all `None` on the CPU). On CUDA the name is the device's
/// ordinal and the compute capability and driver come from the CUDA driver (read on an
/// H200 by `runner doctor`, 2026-11-30).
pub fn gpu_identity(device: &Device) -> GpuIdentity {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_identity(cuda),
        Device::Cpu => GpuIdentity::default(),
        #[allow(unreachable_patterns)]
        other => GpuIdentity {
            name: Some(describe(other)),
            ..Default::default()
        },
    }
}

/// How candle's CUDA kernels reach a GPU in this build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCode {
    /// The GPU loads them as machine code made for it at build time: its driver compiles
    /// nothing at start, and the kernel cache is not needed.
    pub machine_code: bool,
    /// The compute capabilities this build holds machine code for ("9.0", "8.0, 8.6"), if any.
    pub built_for: Option<String>,
}

impl fmt::Display for KernelCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.machine_code, &self.built_for) {
            (true, Some(cc)) => write!(f, "machine code built for compute capability {cc}"),
            (_, Some(cc)) => write!(
                f,
                "PTX, which the driver compiles on first use (this build has machine code for compute capability {cc} only, or RUNNER_CUDA_KERNELS=ptx)"
            ),
            (_, None) => write!(
                f,
                "PTX, which the driver compiles on first use (this build has no machine code: ptxas was missing when it was built, or RUNNER_KERNELS_CUBIN=off)"
            ),
        }
    }
}

/// The compute capabilities this build holds candle's kernels as machine code for (`None`
/// without CUDA, or where ptxas was missing at build time).
pub fn kernels_built_for() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        let ccs: Vec<String> = candle_core::cuda_backend::kernels::CUBIN_ARCHS
            .iter()
            .filter_map(|n| GpuArch::parse(n))
            .map(|a| format!("{}.{}", a.major, a.minor))
            .collect();
        if !ccs.is_empty() {
            return Some(ccs.join(", "));
        }
    }
    None
}

/// How candle's kernels reach `device`'s GPU: `None` off CUDA.
pub fn kernel_code(device: &Device) -> Option<KernelCode> {
    match device {
        #[cfg(feature = "cuda")]
        // The same decision candle's loader makes (vendor/candle-core, `RUNNER_CUDA_KERNELS`).
        Device::Cuda(cuda) => Some(KernelCode {
            machine_code: cuda.takes_machine_code(),
            built_for: kernels_built_for(),
        }),
        _ => {
            let _ = device;
            None
        }
    }
}

/// How candle's kernel modules have loaded so far in this process (CUDA only): a line for
/// the setup log that shows whether the GPU ran machine code or the driver compiled PTX.
pub fn kernel_loads(device: &Device) -> Option<String> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let loads = candle_core::cuda_backend::kernel_module_loads();
            let mut line = format!(
                "candle's CUDA kernels: {} modules loaded as machine code, {} from PTX, in {:.3}s",
                loads.from_cubin,
                loads.from_ptx,
                loads.loading.as_secs_f64()
            );
            if loads.cubins_refused > 0 {
                line.push_str(&format!(
                    " ({} whose machine code the driver refused: {})",
                    loads.cubins_refused,
                    loads.first_refusal.as_deref().unwrap_or("no reason given")
                ));
            }
            Some(line)
        }
        _ => {
            let _ = device;
            None
        }
    }
}

/// Device memory in use and in total, in bytes, where the device reports it (CUDA: the
/// driver's view of the whole GPU, other processes included; read on an H200,
/// 2026-11-30). `None` on the CPU.
pub fn memory_in_use(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(((total - free) as u64, total as u64))
        }
        _ => None,
    }
}

/// Memory this process may still take on `device`, in bytes, where that can be told: on
/// CUDA the GPU's free memory; on the CPU the smaller of the kernel's `MemAvailable` and
/// what this process's memory cgroup (v1 or v2, and every cgroup above it) still allows.
pub fn available_memory(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, _) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(free as u64)
        }
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
            let available = meminfo
                .as_deref()
                .and_then(|m| kib_field(m, "MemAvailable:"));
            [available, cgroup_room()].into_iter().flatten().min()
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// What the memory cgroups this process is in still allow (limit minus usage), tightest
/// first; `None` without a limit. The process's cgroup and each one above it count.
fn cgroup_room() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut tightest: Option<u64> = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        // v2: "0::/path" with memory.max / memory.current; v1: "N:memory:/path".
        let (root, limit_file, usage_file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                "/sys/fs/cgroup/memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(format!("{root}{path}"));
        loop {
            let read = |f: &str| -> Option<u64> {
                std::fs::read_to_string(dir.join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            if let (Some(limit), Some(usage)) = (read(limit_file), read(usage_file)) {
                // v1 writes "no limit" as a huge number (and v2 as "max", which does not parse).
                if limit < 1 << 60 {
                    let room = limit.saturating_sub(usage);
                    tightest = Some(tightest.map_or(room, |t| t.min(room)));
                }
            }
            if dir.as_os_str().len() <= root.len() || !dir.pop() {
                break;
            }
        }
    }
    tightest
}

/// Refuses to load `needed` bytes of weights that cannot fit in what `device` has left:
/// a clear setup failure instead of the OOM killer halfway through the load (and a
/// supervisor restarting into the same death).
pub fn check_fits(device: &Device, needed: u64, what: &str) -> Result<(), String> {
    let Some(available) = available_memory(device) else {
        return Ok(());
    };
    if needed > available {
        let gb = |b: u64| b as f64 / 1e9;
        return Err(format!(
            "out of memory: {what} need {:.2} GB but only {:.2} GB is free on {} (memory limits of this process's cgroup included); free memory, raise the limit, or use a larger device",
            gb(needed),
            gb(available),
            describe(device)
        ));
    }
    Ok(())
}

/// The most memory this process has had resident so far, in bytes (Linux: VmHWM).
pub fn process_peak_resident_bytes() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmHWM:",
    )
}

/// A `/proc` file's "`key` N kB" line, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// This process's resident memory in bytes (Linux: /proc/self/statm).
pub fn process_resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Runs one small instance of each kind of operation runner's models use: casts, a matrix
/// product in each float dtype, element-wise and broadcast arithmetic, activations,
/// reductions, softmax, RMS norm, copies, indexing, selection, and a quantized product when
/// `quantized`. On CUDA that loads candle's kernel modules (from the kernel cache) and
/// initialises cuBLAS, which a model's first prediction otherwise waits for.
pub fn exercise_kernels(device: &Device, quantized: bool) -> candle_core::Result<()> {
    use candle_core::{DType, Module, Tensor, D};
    let base = (Tensor::arange(0f32, 512., device)?.reshape((8, 64))? * 0.01)?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = base.to_dtype(dtype)?;
        let product = x.matmul(&x.t()?)?;
        let sum = product.broadcast_add(&product.narrow(0, 0, 1)?)?;
        let activated = sum.relu()?.exp()?.tanh()?.gelu()?;
        candle_nn::ops::silu(&activated)?;
        candle_nn::ops::softmax_last_dim(&activated)?;
        candle_nn::ops::rms_norm(&x, &Tensor::ones(64, dtype, device)?, 1e-5)?;
        activated.sum_keepdim(D::Minus1)?.max_keepdim(0)?;
        activated.t()?.contiguous()?;
        activated.index_select(&Tensor::new(&[0u32, 3], device)?, 0)?;
        activated
            .ge(0.5)?
            .where_cond(&activated, &activated.zeros_like()?)?;
    }
    if quantized {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        let weights = Tensor::zeros((32, 256), DType::F32, &Device::Cpu)?;
        let product =
            QMatMul::from_qtensor(QTensor::quantize_onto(&weights, GgmlDType::Q4_1, device)?)?;
        product.forward(&Tensor::zeros((1, 256), DType::F32, device)?)?;
        product.forward(&Tensor::zeros((4, 256), DType::F32, device)?)?;
    }
    device.synchronize()
}

/// With `RUNNER_CUDA_PREWARM=on`, on CUDA: [`exercise_kernels`] on a thread of its own,
/// started right after the device opens, so the kernels load and cuBLAS starts while the
/// weights load or the snapshot restores. Join it before the warm-up: it returns how long
/// it took. Off by default until it is measured on a GPU (unverified so far).
pub fn prewarm(
    device: &Device,
    quantized: bool,
) -> Option<std::thread::JoinHandle<std::time::Duration>> {
    if !matches!(device, Device::Cuda(_))
        || !std::env::var("RUNNER_CUDA_PREWARM").is_ok_and(|v| v == "on")
    {
        return None;
    }
    let device = device.clone();
    Some(std::thread::spawn(move || {
        let started = std::time::Instant::now();
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &device {
            // A new thread has no current CUDA context until one is bound.
            let _ = cuda.cuda_stream().context().bind_to_thread();
        }
        if let Err(e) = exercise_kernels(&device, quantized) {
            // Only a head start: the warm-up loads whatever this did not.
            tracing::debug!(target: "runner::setup", "kernel pre-warm stopped: {e}");
        }
        started.elapsed()
    }))
}

#[cfg(feature = "cuda")]
fn cuda_identity(cuda: &candle_core::CudaDevice) -> GpuIdentity {
    let ordinal = cuda.cuda_stream().context().ordinal();
    let (name, cc) = name_and_capability(ordinal);
    GpuIdentity {
        name: Some(name.unwrap_or_else(|| format!("cuda:{ordinal}"))),
        compute_capability: cc.map(|(major, minor)| format!("{major}.{minor}")),
        driver_version: driver_version(),
    }
}

/// GPU `ordinal`'s name and compute capability as the driver reports them; asking needs
/// `cuInit`, not a context.
#[cfg(feature = "cuda")]
fn name_and_capability(ordinal: usize) -> (Option<String>, Option<(u32, u32)>) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Ok(dev) = result::device::get(ordinal as i32) else {
        return (None, None);
    };
    let attribute = |a| {
        // SAFETY: a plain attribute query on a device handle the driver gave us.
        unsafe { result::device::get_attribute(dev, a) }
            .ok()
            .and_then(|v| u32::try_from(v).ok())
    };
    let cc = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).zip(
        attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
    );
    (result::device::get_name(dev).ok(), cc)
}

/// What this build's candle kernels are compiled for (`None` without CUDA).
pub fn kernel_targets() -> Option<KernelTargets> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::kernels;
        let archs = |names: &[&str]| {
            names
                .iter()
                .map(|n| GpuArch::parse(n))
                .collect::<Option<Vec<_>>>()
        };
        let ptx = GpuArch::parse(kernels::PTX_TARGET?)?;
        // The linked kernels' machine code (from CUDA_COMPUTE_CAP) is what decides where the
        // build runs in full; the modules' cubins are the same list where ptxas ran.
        let machine_code = archs(kernels::LINKED_ARCHS)?;
        Some(KernelTargets {
            machine_code: if machine_code.is_empty() {
                vec![ptx]
            } else {
                machine_code
            },
            ptx,
            linked_ptx: kernels::LINKED_PTX,
        })
    }
    #[cfg(not(feature = "cuda"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_exercise_runs_every_operation_it_names() {
        // On the CPU it runs the same operations as on a GPU: shapes and dtypes check out.
        exercise_kernels(&Device::Cpu, true).unwrap();
        assert!(prewarm(&Device::Cpu, false).is_none(), "only on CUDA");
    }

    #[test]
    fn a_driver_error_keeps_its_first_line() {
        let with_backtrace = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")\n   0: candle_core::error::Error::bt\n             at src/error.rs:1";
        assert_eq!(
            driver_error_words(with_backtrace),
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_no_gpu_is_unavailable_for_a_reason() {
        // The reason is CUDA's to give: a CPU build says "built without CUDA" elsewhere.
        assert!(cuda_unavailable(0).is_none());
    }

    #[test]
    fn kernel_code_says_whether_the_driver_compiles_anything() {
        // Off CUDA there is nothing to say; a CPU build holds no machine code.
        assert_eq!(kernel_code(&Device::Cpu), None);
        assert_eq!(kernel_loads(&Device::Cpu), None);
        if !cfg!(feature = "cuda") {
            assert_eq!(kernels_built_for(), None);
        }
        let built_for = Some("9.0".to_string());
        let native = KernelCode {
            machine_code: true,
            built_for: built_for.clone(),
        };
        assert_eq!(
            native.to_string(),
            "machine code built for compute capability 9.0"
        );
        let other_gpu = KernelCode {
            machine_code: false,
            built_for,
        };
        assert!(other_gpu
            .to_string()
            .starts_with("PTX, which the driver compiles on first use (this build has machine code for compute capability 9.0 only"));
        let none = KernelCode {
            machine_code: false,
            built_for: None,
        };
        assert!(none.to_string().contains("ptxas was missing"));
    }

    #[test]
    fn parses() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_nothing_is_missing_and_nothing_is_loaded() {
        assert!(!cuda_driver_present());
        assert!(missing_cuda_libraries().is_none());
        assert_eq!(kernel_targets(), None);
        preload_cuda_libraries(0);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("built without CUDA"), "{e}");
        assert!(matches!(DeviceSpec::Auto.open(), Ok(Device::Cpu)));
    }
}
