//! Which GPUs each cloud offers, what fits a model, and what a second costs.

use crate::Target;

/// One GPU as a cloud names it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    /// The name `--gpu` takes (Modal's spelling).
    pub name: &'static str,
    pub memory_gb: f64,
    /// Replicate's hardware SKU, where Replicate offers it.
    pub replicate_sku: Option<&'static str>,
    /// Whether Modal offers it.
    pub on_modal: bool,
    /// NVIDIA's compute capability (major, minor): which builds of runner's CUDA kernels
    /// run on it (`runner_spec::cuda_arch`).
    pub compute_capability: (u32, u32),
}

/// Smallest first, so the first that fits is the cheapest class that fits.
#[rustfmt::skip]
pub const GPUS: &[Gpu] = &[
    Gpu { name: "T4", memory_gb: 16.0, replicate_sku: Some("gpu-t4"), on_modal: true, compute_capability: (7, 5) },
    Gpu { name: "L4", memory_gb: 24.0, replicate_sku: None, on_modal: true, compute_capability: (8, 9) },
    Gpu { name: "A10G", memory_gb: 24.0, replicate_sku: None, on_modal: true, compute_capability: (8, 6) },
    Gpu { name: "A100-40GB", memory_gb: 40.0, replicate_sku: None, on_modal: true, compute_capability: (8, 0) },
    Gpu { name: "L40S", memory_gb: 48.0, replicate_sku: Some("gpu-l40s"), on_modal: true, compute_capability: (8, 9) },
    Gpu { name: "A100-80GB", memory_gb: 80.0, replicate_sku: Some("gpu-a100-large"), on_modal: true, compute_capability: (8, 0) },
    Gpu { name: "H100", memory_gb: 80.0, replicate_sku: Some("gpu-h100"), on_modal: true, compute_capability: (9, 0) },
    Gpu { name: "H200", memory_gb: 141.0, replicate_sku: None, on_modal: true, compute_capability: (9, 0) },
    Gpu { name: "B200", memory_gb: 180.0, replicate_sku: None, on_modal: true, compute_capability: (10, 0) },
];

/// Replicate's SKU for CPU-only models.
pub const REPLICATE_CPU_SKU: &str = "cpu";

/// GPU memory a model needs: its weights with 20% for activations and buffers, plus room
/// for the CUDA context and kernels.
pub fn required_gb(weights_bytes: u64) -> f64 {
    weights_bytes as f64 * 1.2 / 1e9 + HEADROOM_GB
}

/// The CUDA context, cuBLAS workspaces and candle's kernels.
pub const HEADROOM_GB: f64 = 2.0;

pub fn offered(target: Target) -> impl Iterator<Item = &'static Gpu> {
    GPUS.iter().filter(move |g| match target {
        Target::Replicate => g.replicate_sku.is_some(),
        Target::Modal => g.on_modal,
    })
}

/// The GPU named `name` (case-insensitive) if `target` offers it.
pub fn find(target: Target, name: &str) -> Option<&'static Gpu> {
    offered(target).find(|g| g.name.eq_ignore_ascii_case(name))
}

/// The smallest GPU `target` offers that holds `weights_bytes` and whose compute capability
/// `runs` accepts.
pub fn smallest_fitting(
    target: Target,
    weights_bytes: u64,
    runs: impl Fn(&Gpu) -> bool,
) -> Option<&'static Gpu> {
    let need = required_gb(weights_bytes);
    offered(target).find(|g| g.memory_gb >= need && runs(g))
}

/// A published per-second price.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub target: Target,
    pub gpu: &'static str,
    pub usd_per_second: f64,
    pub source: &'static str,
}

/// When the prices below were recorded from the sources they name.
pub const PRICES_RECORDED: &str = "2026-11-28";

/// Per-second prices as the clouds published them in 2026. Only these are recorded; other
/// GPUs show "not recorded" rather than a guess.
#[rustfmt::skip]
pub const PRICES: &[Price] = &[
    Price { target: Target::Replicate, gpu: "H100", usd_per_second: 0.001525, source: "https://replicate.com/pricing" },
    Price { target: Target::Replicate, gpu: "A100-80GB", usd_per_second: 0.001400, source: "https://replicate.com/pricing" },
    Price { target: Target::Modal, gpu: "H100", usd_per_second: 0.001097, source: "https://modal.com/pricing" },
    Price { target: Target::Modal, gpu: "A100-80GB", usd_per_second: 0.000694, source: "https://modal.com/pricing" },
];

pub fn price(target: Target, gpu: &str) -> Option<&'static Price> {
    PRICES.iter().find(|p| p.target == target && p.gpu == gpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_gpu_that_holds_the_weights_is_chosen() {
        // 90 MB of weights fit anywhere: the smallest offered.
        assert_eq!(
            smallest_fitting(Target::Modal, 90_000_000, |_| true)
                .unwrap()
                .name,
            "T4"
        );
        assert_eq!(
            smallest_fitting(Target::Replicate, 90_000_000, |_| true)
                .unwrap()
                .name,
            "T4"
        );
        // 16 GB × 1.2 + 2 = 21.2 GB: L4 on Modal, L40S on Replicate (no 24 GB class there).
        assert_eq!(
            smallest_fitting(Target::Modal, 16_000_000_000, |_| true)
                .unwrap()
                .name,
            "L4"
        );
        assert_eq!(
            smallest_fitting(Target::Replicate, 16_000_000_000, |_| true)
                .unwrap()
                .name,
            "L40S"
        );
        // 70 GB × 1.2 + 2 = 86 GB: H200 on Modal, nothing on Replicate.
        assert_eq!(
            smallest_fitting(Target::Modal, 70_000_000_000, |_| true)
                .unwrap()
                .name,
            "H200"
        );
        assert!(smallest_fitting(Target::Replicate, 70_000_000_000, |_| true).is_none());
        // A build whose kernels run on compute capability 9.0 only: the smallest of those.
        let hopper = |g: &Gpu| g.compute_capability == (9, 0);
        assert_eq!(
            smallest_fitting(Target::Modal, 90_000_000, hopper)
                .unwrap()
                .name,
            "H100"
        );
    }

    #[test]
    fn gpu_names_are_checked_per_target() {
        assert_eq!(
            find(Target::Replicate, "h100").unwrap().replicate_sku,
            Some("gpu-h100")
        );
        assert!(find(Target::Replicate, "L4").is_none());
        assert!(find(Target::Modal, "L4").is_some());
        assert!(find(Target::Modal, "V100").is_none());
    }

    #[test]
    fn every_price_names_an_offered_gpu() {
        for p in PRICES {
            assert!(find(p.target, p.gpu).is_some(), "{p:?}");
        }
    }
}
