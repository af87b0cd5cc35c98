//! Which GPUs a CUDA build of runner can run on. candle's kernels are compiled for one GPU
//! architecture (`CUDA_COMPUTE_CAP` at build time): as PTX, which the driver compiles for
//! the GPU on first use, and as machine code for the quantized matrix kernels linked in.
//! NVIDIA's rules decide where each runs, and a GPU outside them fails only at its first
//! kernel launch with a bare driver code, so runner checks before it loads anything, and
//! `runner package` checks the binary against the GPU it packages for.

use std::fmt;

/// A GPU architecture as nvcc names it: `sm_90a`, `sm_86`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuArch {
    pub major: u32,
    pub minor: u32,
    /// `sm_90a`-style: code for exactly this compute capability, not newer GPUs.
    pub arch_specific: bool,
}

impl GpuArch {
    /// Parses `sm_90a`, `sm_86`, `compute_80` or `sm_100a`.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name
            .trim()
            .strip_prefix("sm_")
            .or_else(|| name.trim().strip_prefix("compute_"))?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let suffix = &rest[digits.len()..];
        if digits.len() < 2 || !matches!(suffix, "" | "a" | "f") {
            return None;
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            arch_specific: suffix == "a",
        })
    }

    /// Whether PTX for this architecture can be compiled by the driver for a GPU of
    /// compute capability `cc`: any GPU at least as new, except that arch-specific PTX
    /// (`sm_90a`) runs on exactly that capability.
    pub fn ptx_runs_on(&self, cc: (u32, u32)) -> bool {
        if self.arch_specific {
            cc == (self.major, self.minor)
        } else {
            cc >= (self.major, self.minor)
        }
    }

    /// Whether machine code (SASS) for this architecture runs on a GPU of compute
    /// capability `cc`: the same major version and a minor at least as high, or exactly
    /// this capability for arch-specific code.
    pub fn machine_code_runs_on(&self, cc: (u32, u32)) -> bool {
        if self.arch_specific {
            cc == (self.major, self.minor)
        } else {
            cc.0 == self.major && cc.1 >= self.minor
        }
    }

    /// The `CUDA_COMPUTE_CAP` value that builds for a GPU of compute capability `cc`.
    pub fn compute_cap_for(cc: (u32, u32)) -> String {
        format!("{}{}", cc.0, cc.1)
    }
}

impl fmt::Display for GpuArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sm_{}{}{}",
            self.major,
            self.minor,
            if self.arch_specific { "a" } else { "" }
        )
    }
}

/// The oldest GPUs runner's CUDA path runs on: its Llama models compute in bf16 on CUDA,
/// every warm-up runs each float dtype, and candle builds its bf16 kernels for compute
/// capability 8.0 (Ampere) and newer only.
pub const MIN_CAPABILITY: (u32, u32) = (8, 0);

/// Why runner cannot use a GPU of compute capability `cc` (named `gpu`) at all, whatever it
/// was built for; `None` from [`MIN_CAPABILITY`] on.
pub fn too_old(gpu: &str, cc: (u32, u32)) -> Option<String> {
    (cc < MIN_CAPABILITY).then(|| {
        format!(
            "{gpu} has compute capability {}.{}; runner's CUDA path needs bf16 (its Llama models compute in it, and every warm-up runs it), which candle's kernels support from compute capability {}.{} on (A100, A10G, L4, L40S, H100 and newer)",
            cc.0, cc.1, MIN_CAPABILITY.0, MIN_CAPABILITY.1
        )
    })
}

/// The GPU families of a compute capability, for messages.
pub fn gpu_family(cc: (u32, u32)) -> Option<&'static str> {
    Some(match cc {
        (7, 0) => "V100",
        (7, 5) => "T4, RTX 20xx",
        (8, 0) => "A100, A30",
        (8, 6) => "A10, A10G, A40, RTX 30xx, RTX A6000",
        (8, 7) => "Jetson Orin",
        (8, 9) => "L4, L40, L40S, RTX 40xx",
        (9, 0) => "H100, H200, GH200",
        (10, 0) => "B200, GB200",
        (12, 0) => "RTX 50xx, RTX PRO 6000 Blackwell",
        _ => return None,
    })
}

/// What a build's kernels are compiled for: machine code for some GPU architectures (candle's
/// kernel modules and the quantized matrix kernels linked in), and PTX for one, which the
/// driver compiles for the GPU on first use.
///
/// A build for one GPU family (`CUDA_COMPUTE_CAP=90`) has machine code and PTX for that
/// architecture, and its linked kernels have no PTX. A portable build
/// (`CUDA_COMPUTE_CAP=80,86,89,90`) has machine code for each listed architecture and PTX
/// for the lowest in both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTargets {
    pub machine_code: Vec<GpuArch>,
    pub ptx: GpuArch,
    /// The linked kernels carry the PTX too (portable builds).
    pub linked_ptx: bool,
}

/// How much of a build runs on one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    Full,
    /// candle's kernel modules run; the linked quantized matrix kernels (GGUF and
    /// quantized-at-load models) do not.
    WithoutQuantizedKernels,
    None,
}

impl KernelTargets {
    /// A build for one architecture.
    pub fn single(arch: GpuArch) -> Self {
        Self {
            machine_code: vec![arch],
            ptx: arch,
            linked_ptx: false,
        }
    }

    /// Reads `runner --version`'s note: `kernels sm_90a` or `kernels sm_80 sm_86 + PTX sm_80`.
    pub fn from_version_line(line: &str) -> Option<Self> {
        let rest = &line[line.find("kernels ")? + "kernels ".len()..];
        let note = rest.split([';', ')']).next()?;
        let (code, ptx) = match note.split_once(" + PTX ") {
            Some((code, ptx)) => (code, Some(GpuArch::parse(ptx)?)),
            None => (note, None),
        };
        let machine_code = code
            .split_whitespace()
            .map(GpuArch::parse)
            .collect::<Option<Vec<_>>>()?;
        match ptx {
            Some(ptx) => Some(Self {
                machine_code,
                ptx,
                linked_ptx: true,
            }),
            None if machine_code.len() == 1 => Some(Self::single(machine_code[0])),
            None => None,
        }
    }

    /// The note `runner --version` prints, which [`Self::from_version_line`] reads back.
    pub fn version_note(&self) -> String {
        let code: Vec<String> = self.machine_code.iter().map(|a| a.to_string()).collect();
        if self.linked_ptx {
            format!("kernels {} + PTX {}", code.join(" "), self.ptx)
        } else {
            format!("kernels {}", code.join(" "))
        }
    }

    pub fn support(&self, cc: (u32, u32)) -> Support {
        let machine_code = self.machine_code.iter().any(|a| a.machine_code_runs_on(cc));
        let ptx = self.ptx.ptx_runs_on(cc);
        if !machine_code && !ptx {
            Support::None
        } else if !machine_code && !self.linked_ptx {
            Support::WithoutQuantizedKernels
        } else {
            Support::Full
        }
    }

    /// The GPUs the build runs in full, in words: "compute capability 9.0 only (H100, H200,
    /// GH200)", "compute capability 8.6 to 8.9" or "compute capability 7.5 and newer".
    pub fn runs_on_words(&self) -> String {
        if self.linked_ptx && !self.ptx.arch_specific {
            return format!(
                "compute capability {}.{} and newer",
                self.ptx.major, self.ptx.minor
            );
        }
        let ranges: Vec<String> = self
            .machine_code
            .iter()
            .map(|a| {
                if a.arch_specific || a.minor == 9 {
                    format!("{}.{}", a.major, a.minor)
                } else {
                    format!("{}.{} to {}.9", a.major, a.minor, a.major)
                }
            })
            .collect();
        let only = self.machine_code.iter().all(|a| a.arch_specific);
        let families: Vec<&str> = self
            .machine_code
            .iter()
            .filter(|a| a.arch_specific)
            .filter_map(|a| gpu_family((a.major, a.minor)))
            .collect();
        format!(
            "compute capability {}{}{}",
            ranges.join(", "),
            if only { " only" } else { "" },
            if families.is_empty() || !only {
                String::new()
            } else {
                format!(" ({})", families.join("; "))
            }
        )
    }

    /// Why a GPU of compute capability `cc` (named `gpu`) cannot run this build, and what
    /// to do; `None` where it runs everything.
    pub fn refusal(&self, gpu: &str, cc: (u32, u32)) -> Option<String> {
        let rebuild = format!(
            "build runner for it with CUDA_COMPUTE_CAP={} (`CUDA_COMPUTE_CAP={} cargo build --release --features cuda -p runner-cli`; a list such as 80,86,89,90 builds for several)",
            GpuArch::compute_cap_for(cc),
            GpuArch::compute_cap_for(cc)
        );
        let code: Vec<String> = self.machine_code.iter().map(|a| a.to_string()).collect();
        match self.support(cc) {
            Support::Full => None,
            Support::None => Some(format!(
                "this runner's CUDA kernels were built for {}, which runs on {}; {gpu} has compute capability {}.{}, which cannot run them: {rebuild}",
                code.join(", "),
                self.runs_on_words(),
                cc.0,
                cc.1
            )),
            Support::WithoutQuantizedKernels => Some(format!(
                "this runner's quantized matrix kernels were built as machine code for {} only; {gpu} has compute capability {}.{}, so GGUF and quantized-at-load models would fail on it (other models run): {rebuild}",
                code.join(", "),
                cc.0,
                cc.1
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(name: &str) -> GpuArch {
        GpuArch::parse(name).unwrap()
    }

    #[test]
    fn parses_nvcc_names() {
        let a = arch("sm_90a");
        assert_eq!((a.major, a.minor, a.arch_specific), (9, 0, true));
        let b = arch("sm_100a");
        assert_eq!((b.major, b.minor), (10, 0));
        assert_eq!(arch("compute_86").to_string(), "sm_86");
        for bad in ["sm_", "sm_9", "90", "sm_90x", "sm_9a0", ""] {
            assert_eq!(GpuArch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_h100_build_runs_only_on_compute_capability_9_0() {
        let h100 = KernelTargets::single(arch("sm_90a"));
        assert_eq!(h100.support((9, 0)), Support::Full);
        for other in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0), (7, 5)] {
            assert_eq!(h100.support(other), Support::None, "{other:?}");
        }
        let why = h100.refusal("GPU 0 (NVIDIA A10G)", (8, 6)).unwrap();
        assert!(
            why.contains(
                "built for sm_90a, which runs on compute capability 9.0 only (H100, H200, GH200)"
            ),
            "{why}"
        );
        assert!(
            why.contains("NVIDIA A10G) has compute capability 8.6"),
            "{why}"
        );
        assert!(why.contains("CUDA_COMPUTE_CAP=86"), "{why}");
        assert_eq!(h100.refusal("GPU 0", (9, 0)), None);
    }

    #[test]
    fn an_ampere_build_runs_its_modules_on_newer_gpus_but_not_its_quantized_kernels() {
        let a100 = KernelTargets::single(arch("sm_80"));
        assert_eq!(a100.support((8, 0)), Support::Full);
        assert_eq!(a100.support((8, 6)), Support::Full);
        assert_eq!(a100.support((8, 9)), Support::Full);
        assert_eq!(a100.support((9, 0)), Support::WithoutQuantizedKernels);
        assert_eq!(a100.support((7, 5)), Support::None);
        let why = a100.refusal("the H100", (9, 0)).unwrap();
        assert!(
            why.contains("GGUF and quantized-at-load models would fail"),
            "{why}"
        );
        assert!(why.contains("CUDA_COMPUTE_CAP=90"), "{why}");
        assert_eq!(a100.runs_on_words(), "compute capability 8.0 to 8.9");
    }

    #[test]
    fn a_portable_build_runs_on_its_lowest_gpu_and_everything_newer() {
        let portable = KernelTargets {
            machine_code: vec![arch("sm_80"), arch("sm_86"), arch("sm_89"), arch("sm_90a")],
            ptx: arch("sm_80"),
            linked_ptx: true,
        };
        for cc in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert_eq!(portable.support(cc), Support::Full, "{cc:?}");
        }
        assert_eq!(portable.support((7, 5)), Support::None);
        assert_eq!(portable.runs_on_words(), "compute capability 8.0 and newer");
        // Without PTX below 9.0, machine code only: exactly the GPUs listed.
        let hopper_blackwell = KernelTargets {
            machine_code: vec![arch("sm_90a"), arch("sm_100a")],
            ptx: arch("sm_90a"),
            linked_ptx: true,
        };
        assert_eq!(hopper_blackwell.support((10, 0)), Support::Full);
        assert_eq!(hopper_blackwell.support((12, 0)), Support::None);
        assert_eq!(
            hopper_blackwell.runs_on_words(),
            "compute capability 9.0, 10.0 only (H100, H200, GH200; B200, GB200)"
        );
    }

    #[test]
    fn gpus_before_ampere_are_too_old_for_bf16() {
        let why = too_old("the T4", (7, 5)).unwrap();
        assert!(why.contains("the T4 has compute capability 7.5"), "{why}");
        assert!(why.contains("from compute capability 8.0 on"), "{why}");
        assert_eq!(too_old("the A100", (8, 0)), None);
        assert_eq!(too_old("the B200", (10, 0)), None);
    }

    #[test]
    fn the_version_note_reads_back() {
        for t in [
            KernelTargets::single(arch("sm_90a")),
            KernelTargets::single(arch("sm_86")),
            KernelTargets {
                machine_code: vec![arch("sm_75"), arch("sm_86"), arch("sm_90a")],
                ptx: arch("sm_75"),
                linked_ptx: true,
            },
        ] {
            let line = format!(
                "runner 0.1.0 (cuda: {}; runs on {})",
                t.version_note(),
                t.runs_on_words()
            );
            assert_eq!(KernelTargets::from_version_line(&line), Some(t), "{line}");
        }
        assert_eq!(
            KernelTargets::from_version_line("runner 0.1.0 (cuda)"),
            None
        );
    }
}
