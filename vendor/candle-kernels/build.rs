use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::{Path, PathBuf};

const CUTILE_FEATURE: &str = "CARGO_FEATURE_CUTILE";

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    // Build for PTX
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let ptx_path = out_dir.join("ptx.rs");
    let bindings = KernelBuilder::new()
        .source_dir("src") // Scan src/ for .cu files
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"]) // Exclude statically compiled kernels from ptx build
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;

    bindings.write(&ptx_path)?;
    // runner's change (vendor/README.md).
    let linked_arch = cudaforge::detect_compute_cap()
        .ok()
        .map(|arch| arch.to_nvcc_arch());
    assemble_cubins(&out_dir, linked_arch.as_deref());

    let mut moe_sources = vec![
        "src/moe/moe_gguf.cu",
        "src/moe/moe_wmma.cu",
        "src/moe/moe_wmma_gguf.cu",
        "src/mmvq_gguf.cu",
        "src/mmq_gguf/mmq_quantize.cu",
        "src/mmq_gguf/mmq_instance_q4_0.cu",
        "src/mmq_gguf/mmq_instance_q4_1.cu",
        "src/mmq_gguf/mmq_instance_q5_0.cu",
        "src/mmq_gguf/mmq_instance_q5_1.cu",
        "src/mmq_gguf/mmq_instance_q8_0.cu",
        "src/mmq_gguf/mmq_instance_q2_k.cu",
        "src/mmq_gguf/mmq_instance_q3_k.cu",
        "src/mmq_gguf/mmq_instance_q4_k.cu",
        "src/mmq_gguf/mmq_instance_q5_k.cu",
        "src/mmq_gguf/mmq_instance_q6_k.cu",
    ];
    if env::var_os(CUTILE_FEATURE).is_some() {
        moe_sources.push("src/moe/moe_align.cu");
    }

    let mut moe_builder = KernelBuilder::default()
        .source_files(moe_sources)
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    if compute_cap < 80 {
        moe_builder = moe_builder.arg("-DNO_BF16_KERNEL");
    }

    let mut is_target_msvc = false;
    if let Ok(target) = std::env::var("TARGET") {
        if target.contains("msvc") {
            is_target_msvc = true;
            moe_builder = moe_builder.arg("-D_USE_MATH_DEFINES");
        }
    }

    if !is_target_msvc {
        moe_builder = moe_builder.arg("-Xcompiler").arg("-fPIC");
    }

    moe_builder.build_lib(out_dir.join("libmoe.a"))?;
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    println!("cargo:rustc-link-lib=dylib=cudart");
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=stdc++");
    }
    Ok(())
}

/// runner's change (vendor/README.md): each module's PTX is also assembled by `ptxas` into
/// machine code (a cubin) for the GPU the PTX targets (its `.target`, from CUDA_COMPUTE_CAP),
/// and `cubin.rs` lists the cubins with that GPU's compute capability. A GPU of exactly that
/// capability loads the cubin; any other still has its driver compile the PTX on first use
/// (15-17 s on an H200 whose kernel cache is empty). Where ptxas is missing or fails, or
/// with RUNNER_KERNELS_CUBIN=off, a module has no cubin and runs from its PTX as before.
///
/// `cubin.rs` also names the architecture of the PTX and of the kernels linked in as
/// machine code (libmoe, built below for `linked_arch`), so that runner can tell before
/// loading anything whether a GPU can run this build (`runner_spec::cuda_arch`).
fn assemble_cubins(out_dir: &Path, linked_arch: Option<&str>) {
    println!("cargo::rerun-if-env-changed=RUNNER_KERNELS_CUBIN");
    let mut modules: Vec<String> = std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some(name.strip_suffix(".ptx")?.to_string())
        })
        .collect();
    modules.sort();
    let off = env::var("RUNNER_KERNELS_CUBIN").is_ok_and(|v| v == "off");
    let target = modules
        .iter()
        .map(|m| ptx_target(&out_dir.join(format!("{m}.ptx"))))
        .reduce(|a, b| if a == b { a } else { None })
        .flatten();
    let ptxas = cudaforge::CudaToolkit::detect()
        .ok()
        .and_then(|t| Some(t.nvcc_path.parent()?.join("ptxas")))
        .filter(|p| p.is_file());
    let assembled: Vec<bool> = match (&target, &ptxas) {
        (Some((arch, _)), Some(ptxas)) if !off => {
            let jobs = env::var("NUM_JOBS")
                .ok()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(1)
                .max(1);
            let next = std::sync::atomic::AtomicUsize::new(0);
            let done: Vec<std::sync::atomic::AtomicBool> = modules
                .iter()
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect();
            std::thread::scope(|scope| {
                for _ in 0..jobs.min(modules.len()) {
                    scope.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(m) = modules.get(i) else { break };
                        let ok = assemble(
                            ptxas,
                            arch,
                            &out_dir.join(format!("{m}.ptx")),
                            &out_dir.join(format!("{m}.cubin")),
                        );
                        done[i].store(ok, std::sync::atomic::Ordering::Relaxed);
                    });
                }
            });
            done.into_iter().map(|d| d.into_inner()).collect()
        }
        _ => {
            if !off {
                println!(
                    "cargo:warning=candle-kernels: no cubins ({}); the GPU's driver compiles the PTX on first use",
                    if target.is_none() { "the PTX files name no single target" } else { "ptxas not found beside nvcc" }
                );
            }
            vec![false; modules.len()]
        }
    };
    let mut list = String::new();
    let capability = target
        .clone()
        .filter(|_| assembled.iter().any(|&a| a))
        .map(|(_, cc)| cc);
    list.push_str(&format!(
        "/// The compute capability (major, minor) the cubins below are machine code for.\npub const COMPUTE_CAP: Option<(u32, u32)> = {capability:?};\n"
    ));
    list.push_str(&format!(
        "/// The architecture the PTX was compiled for (its `.target`, e.g. `sm_90a`).\npub const PTX_TARGET: Option<&str> = {:?};\n",
        target.as_ref().map(|(arch, _)| arch.as_str())
    ));
    list.push_str(&format!(
        "/// The architecture of the kernels linked in as machine code (libmoe).\npub const LINKED_TARGET: Option<&str> = {linked_arch:?};\n"
    ));
    for (m, ok) in modules.iter().zip(&assembled) {
        let name = m.to_uppercase().replace(['.', '-'], "_");
        if *ok {
            list.push_str(&format!(
                "pub const {name}: Option<&[u8]> = Some(include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{m}.cubin\")));\n"
            ));
        } else {
            list.push_str(&format!("pub const {name}: Option<&[u8]> = None;\n"));
        }
    }
    std::fs::write(out_dir.join("cubin.rs"), list).expect("writing cubin.rs");
}

/// The PTX file's `.target` (for example `sm_90a`) and the compute capability it names.
fn ptx_target(ptx: &Path) -> Option<(String, (u32, u32))> {
    let text = std::fs::read_to_string(ptx).ok()?;
    let arch = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(".target "))?
        .split(',')
        .next()?
        .trim()
        .to_string();
    let digits: String = arch
        .strip_prefix("sm_")?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let (major, minor) = digits.split_at(digits.len().checked_sub(1)?);
    Some((arch.clone(), (major.parse().ok()?, minor.parse().ok()?)))
}

/// `ptxas -arch=ARCH -O3 PTX -o CUBIN`, skipped when the cubin is newer than the PTX.
fn assemble(ptxas: &Path, arch: &str, ptx: &Path, cubin: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(made), Some(source)) = (modified(cubin), modified(ptx)) {
        if made >= source {
            return true;
        }
    }
    let status = std::process::Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-O3")
        .arg(ptx)
        .arg("-o")
        .arg(cubin)
        .status();
    match status {
        Ok(s) if s.success() => true,
        other => {
            let _ = std::fs::remove_file(cubin);
            println!(
                "cargo:warning=candle-kernels: ptxas could not assemble {} ({other:?}); it runs from its PTX",
                ptx.display()
            );
            false
        }
    }
}
