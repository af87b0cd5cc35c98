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

/// What a build's kernels are compiled for: candle's kernel modules (PTX) and the
/// quantized matrix kernels linked in as machine code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelTargets {
    pub modules: GpuArch,
    pub linked: Option<GpuArch>,
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
    /// Reads `runner --version`'s note, `kernels sm_90a` or `kernels sm_80 (quantized sm_80)`.
    pub fn from_version_line(line: &str) -> Option<Self> {
        let rest = &line[line.find("kernels ")? + "kernels ".len()..];
        let modules = GpuArch::parse(rest.split([' ', ')', ',', ';']).next()?)?;
        let linked = match rest.find("quantized ") {
            Some(at) => Some(GpuArch::parse(
                rest[at + "quantized ".len()..]
                    .split([' ', ')', ',', ';'])
                    .next()?,
            )?),
            None => Some(modules),
        };
        Some(Self { modules, linked })
    }

    /// The note `runner --version` prints, which [`Self::from_version_line`] reads back.
    pub fn version_note(&self) -> String {
        match self.linked {
            Some(linked) if linked != self.modules => {
                format!("kernels {} (quantized {linked})", self.modules)
            }
            _ => format!("kernels {}", self.modules),
        }
    }

    pub fn support(&self, cc: (u32, u32)) -> Support {
        if !self.modules.ptx_runs_on(cc) {
            Support::None
        } else if self.linked.is_some_and(|l| !l.machine_code_runs_on(cc)) {
            Support::WithoutQuantizedKernels
        } else {
            Support::Full
        }
    }

    /// The GPUs the build runs on in full, in words: "compute capability 9.0 only (H100,
    /// H200, GH200)" or "compute capability 8.6 to 8.9 (…)".
    pub fn runs_on_words(&self) -> String {
        let m = self.modules;
        let exact = m.arch_specific || self.linked.is_some_and(|l| l.arch_specific);
        let family = |cc| {
            gpu_family(cc)
                .map(|f| format!(" ({f})"))
                .unwrap_or_default()
        };
        if exact {
            format!(
                "compute capability {}.{} only{}",
                m.major,
                m.minor,
                family((m.major, m.minor))
            )
        } else if self.linked.is_some() {
            format!(
                "compute capability {}.{} to {}.9",
                m.major, m.minor, m.major
            )
        } else {
            format!("compute capability {}.{} and newer", m.major, m.minor)
        }
    }

    /// Why a GPU of compute capability `cc` (named `gpu`) cannot run this build, and what
    /// to do; `None` where it runs everything.
    pub fn refusal(&self, gpu: &str, cc: (u32, u32)) -> Option<String> {
        let rebuild = format!(
            "build runner for it with CUDA_COMPUTE_CAP={} (`CUDA_COMPUTE_CAP={} cargo build --release --features cuda -p runner-cli`)",
            GpuArch::compute_cap_for(cc),
            GpuArch::compute_cap_for(cc)
        );
        match self.support(cc) {
            Support::Full => None,
            Support::None => Some(format!(
                "this runner's CUDA kernels were built for {}, which runs on {}; {gpu} has compute capability {}.{}, which cannot run them: {rebuild}",
                self.modules,
                self.runs_on_words(),
                cc.0,
                cc.1
            )),
            Support::WithoutQuantizedKernels => Some(format!(
                "this runner's quantized matrix kernels were built as machine code for {} only; {gpu} has compute capability {}.{}, so GGUF and quantized-at-load models would fail on it (other models run): {rebuild}",
                self.linked.map(|l| l.to_string()).unwrap_or_default(),
                cc.0,
                cc.1
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(modules: &str) -> KernelTargets {
        KernelTargets {
            modules: GpuArch::parse(modules).unwrap(),
            linked: GpuArch::parse(modules),
        }
    }

    #[test]
    fn parses_nvcc_names() {
        let a = GpuArch::parse("sm_90a").unwrap();
        assert_eq!((a.major, a.minor, a.arch_specific), (9, 0, true));
        let b = GpuArch::parse("sm_100a").unwrap();
        assert_eq!((b.major, b.minor), (10, 0));
        assert_eq!(GpuArch::parse("compute_86").unwrap().to_string(), "sm_86");
        for bad in ["sm_", "sm_9", "90", "sm_90x", "sm_9a0", ""] {
            assert_eq!(GpuArch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_h100_build_runs_only_on_compute_capability_9_0() {
        let h100 = targets("sm_90a");
        assert_eq!(h100.support((9, 0)), Support::Full);
        for other in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0), (7, 5)] {
            assert_eq!(h100.support(other), Support::None, "{other:?}");
        }
        let why = h100.refusal("GPU 0 (NVIDIA A10G)", (8, 6)).unwrap();
        assert!(
            why.contains("compute capability 9.0 only (H100, H200, GH200)"),
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
        let a100 = targets("sm_80");
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
    fn the_version_note_reads_back() {
        for t in [
            targets("sm_90a"),
            targets("sm_86"),
            KernelTargets {
                modules: GpuArch::parse("sm_80").unwrap(),
                linked: GpuArch::parse("sm_86"),
            },
        ] {
            let line = format!("runner 0.1.0 (cuda: {})", t.version_note());
            assert_eq!(KernelTargets::from_version_line(&line), Some(t), "{line}");
        }
        assert_eq!(
            KernelTargets::from_version_line("runner 0.1.0 (cuda)"),
            None
        );
    }
}
