//! `--device auto|cpu|cuda[:N]`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

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
    /// Opens the device.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    DeviceSpec::Cuda(0).open()
                } else {
                    Ok(Device::Cpu)
                }
            }
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::NoCudaSupport(self));
                }
                Device::new_cuda(n).map_err(|e| DeviceError::Unavailable {
                    spec: self,
                    reason: e.to_string(),
                })
            }
        }
    }
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
/// ordinal and the compute capability and driver come from the CUDA driver (unverified
/// on hardware so far).
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

/// Device memory in use and in total, in bytes, where the device reports it (CUDA: the
/// driver's view of the whole GPU, other processes included; unverified on hardware so
/// far). `None` on the CPU.
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

/// This process's resident memory in bytes (Linux: /proc/self/statm).
pub fn process_resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(feature = "cuda")]
fn cuda_identity(cuda: &candle_core::CudaDevice) -> GpuIdentity {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let ordinal = cuda.cuda_stream().context().ordinal();
    let dev = result::device::get(ordinal as i32).ok();
    let name = dev.and_then(|d| result::device::get_name(d).ok());
    let cc = dev.and_then(|d| {
        // SAFETY: plain attribute queries on a device handle the driver gave us.
        let major = unsafe {
            result::device::get_attribute(
                d,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
        }
        .ok()?;
        let minor = unsafe {
            result::device::get_attribute(
                d,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            )
        }
        .ok()?;
        Some(format!("{major}.{minor}"))
    });
    let mut version: std::os::raw::c_int = 0;
    // SAFETY: the driver writes one integer through the pointer.
    let ok = unsafe { sys::cuDriverGetVersion(&mut version) } == sys::CUresult::CUDA_SUCCESS;
    let driver = ok.then(|| format!("{}.{}", version / 1000, (version % 1000) / 10));
    GpuIdentity {
        name: Some(name.unwrap_or_else(|| format!("cuda:{ordinal}"))),
        compute_capability: cc,
        driver_version: driver,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn cuda_without_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("built without CUDA"), "{e}");
        assert!(matches!(DeviceSpec::Auto.open(), Ok(Device::Cpu)));
    }
}
