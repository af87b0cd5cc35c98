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

    // runner's change (vendor/README.md): CUDA_COMPUTE_CAP may list several GPUs, a
    // portable build: PTX for the lowest, machine code for each.
    let portable = portable_archs();

    // Build for PTX
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let ptx_path = out_dir.join("ptx.rs");
    let mut ptx_builder = KernelBuilder::new()
        .source_dir("src") // Scan src/ for .cu files
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"]) // Exclude statically compiled kernels from ptx build
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");
    if let Some(archs) = &portable {
        ptx_builder = ptx_builder.compute_cap(archs[0].base);
    }
    let bindings = ptx_builder.build_ptx()?;

    bindings.write(&ptx_path)?;
    // runner's change (vendor/README.md).
    let linked_archs: Vec<cudaforge::GpuArch> = match &portable {
        Some(archs) => archs.clone(),
        None => cudaforge::detect_compute_cap().ok().into_iter().collect(),
    };
    assemble_cubins(&out_dir, &linked_archs, portable.is_some());

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

    // runner's change: a portable build links machine code for every listed GPU and PTX
    // for the lowest, which newer GPUs compile.
    if let Some(archs) = &portable {
        moe_builder = moe_builder.compute_cap(archs[0].base);
        for arch in &archs[1..] {
            moe_builder = moe_builder.arg(&arch.to_gencode_arg());
        }
        let ptx = archs[0].to_nvcc_arch().replace("sm_", "compute_");
        moe_builder = moe_builder.arg(&format!("-gencode=arch={ptx},code={ptx}"));
    }

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = match &portable {
        Some(archs) => archs[0].base,
        None => cudaforge::detect_compute_cap()
            .map(|arch| arch.base())
            .unwrap_or(80),
    };
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

/// runner's change (vendor/README.md): `CUDA_COMPUTE_CAP` holding a list ("80,86,89,90")
/// asks for a portable build; `None` for one value (or none), which cudaforge reads itself.
fn portable_archs() -> Option<Vec<cudaforge::GpuArch>> {
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let list = env::var("CUDA_COMPUTE_CAP").ok()?;
    if !list.contains(',') {
        return None;
    }
    let mut archs: Vec<cudaforge::GpuArch> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            cudaforge::GpuArch::parse(a).unwrap_or_else(|e| {
                panic!("CUDA_COMPUTE_CAP={list:?}: {a:?} is not a compute capability ({e}); write it as 80,86,89,90")
            })
        })
        .collect();
    archs.sort_by_key(|a| a.base);
    archs.dedup_by_key(|a| a.base);
    Some(archs)
}

/// runner's change (vendor/README.md): machine code (cubins) for candle's kernel modules,
/// beside their PTX, for each GPU architecture in `archs`: the architecture the PTX targets
/// (its `.target`, from CUDA_COMPUTE_CAP) is assembled from the PTX by `ptxas`; in a
/// portable build the others are compiled from the sources by nvcc, so that each gets the
/// code its `__CUDA_ARCH__` selects. `cubin.rs` lists them by architecture; a GPU that one
/// of them runs on loads it, any other has its driver compile the PTX on first use (15-17 s
/// on an H200 whose kernel cache is empty). Where ptxas or nvcc fails, or with
/// RUNNER_KERNELS_CUBIN=off, a module has no cubin for that architecture.
///
/// `cubin.rs` also names the architecture of the PTX and those of the kernels linked in as
/// machine code (libmoe, built below for the same `archs`, with PTX in a portable build),
/// so that runner can tell before loading anything whether a GPU can run this build
/// (`runner_spec::cuda_arch`).
fn assemble_cubins(out_dir: &Path, archs: &[cudaforge::GpuArch], portable: bool) {
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
    let toolkit = cudaforge::CudaToolkit::detect().ok();
    let nvcc = toolkit.as_ref().map(|t| t.nvcc_path.clone());
    let ptxas = nvcc
        .as_ref()
        .and_then(|n| Some(n.parent()?.join("ptxas")))
        .filter(|p| p.is_file());
    let mut arch_names: Vec<String> = archs.iter().map(|a| a.to_nvcc_arch()).collect();
    if arch_names.is_empty() {
        arch_names.extend(target.as_ref().map(|(arch, _)| arch.clone()));
    }
    // (module, architecture): from the PTX with ptxas where the PTX targets it, else (in a
    // portable build) from the source with nvcc.
    let jobs: Vec<(usize, usize, bool)> = if off {
        Vec::new()
    } else {
        let mut jobs = Vec::new();
        for (a, name) in arch_names.iter().enumerate() {
            let from_ptx = target.as_ref().is_some_and(|(t, _)| t == name);
            if !from_ptx && !portable {
                continue;
            }
            for m in 0..modules.len() {
                jobs.push((m, a, from_ptx));
            }
        }
        jobs
    };
    if !off && ptxas.is_none() {
        println!(
            "cargo:warning=candle-kernels: no cubins (ptxas not found beside nvcc); the GPU's driver compiles the PTX on first use"
        );
    } else if !off && target.is_none() {
        println!(
            "cargo:warning=candle-kernels: no cubins from the PTX (the PTX files name no single target)"
        );
    }
    let cubin_path =
        |m: usize, a: usize| out_dir.join(format!("{}.{}.cubin", modules[m], arch_names[a]));
    let done: Vec<std::sync::atomic::AtomicBool> = jobs
        .iter()
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    if let (Some(ptxas), Some(nvcc)) = (&ptxas, &nvcc) {
        let threads = env::var("NUM_JOBS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads.min(jobs.len()) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(m, a, from_ptx)) = jobs.get(i) else {
                        break;
                    };
                    let ok = if from_ptx {
                        assemble(
                            ptxas,
                            &arch_names[a],
                            &out_dir.join(format!("{}.ptx", modules[m])),
                            &cubin_path(m, a),
                        )
                    } else {
                        compile(
                            nvcc,
                            &archs[a],
                            &PathBuf::from(format!("src/{}.cu", modules[m])),
                            &out_dir.join(format!("{}.ptx", modules[m])),
                            &cubin_path(m, a),
                        )
                    };
                    done[i].store(ok, std::sync::atomic::Ordering::Relaxed);
                });
            }
        });
    }
    let made = |m: usize, a: usize| {
        jobs.iter().zip(&done).any(|(&(jm, ja, _), d)| {
            jm == m && ja == a && d.load(std::sync::atomic::Ordering::Relaxed)
        })
    };
    let complete: Vec<&str> = (0..arch_names.len())
        .filter(|&a| !modules.is_empty() && (0..modules.len()).all(|m| made(m, a)))
        .map(|a| arch_names[a].as_str())
        .collect();
    let mut list = String::new();
    list.push_str(&format!(
        "/// The architectures every module below has machine code for.\npub const ARCHS: &[&str] = &{complete:?};\n"
    ));
    list.push_str(&format!(
        "/// The architecture the PTX was compiled for (its `.target`, e.g. `sm_90a`).\npub const PTX_TARGET: Option<&str> = {:?};\n",
        target.as_ref().map(|(arch, _)| arch.as_str())
    ));
    let linked: Vec<String> = archs.iter().map(|a| a.to_nvcc_arch()).collect();
    list.push_str(&format!(
        "/// The architectures of the kernels linked in as machine code (libmoe).\npub const LINKED_ARCHS: &[&str] = &{linked:?};\n/// Whether the linked kernels carry PTX too (a portable build).\npub const LINKED_PTX: bool = {portable};\n"
    ));
    for (m, module) in modules.iter().enumerate() {
        let name = module.to_uppercase().replace(['.', '-'], "_");
        let entries: Vec<String> = (0..arch_names.len())
            .filter(|&a| made(m, a))
            .map(|a| {
                format!(
                    "({:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{module}.{}.cubin\")))",
                    arch_names[a], arch_names[a]
                )
            })
            .collect();
        list.push_str(&format!(
            "pub const {name}: &[(&str, &[u8])] = &[{}];\n",
            entries.join(", ")
        ));
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

/// Whether `output` is newer than `input` (then there is nothing to redo).
fn up_to_date(output: &Path, input: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(output), modified(input)), (Some(made), Some(source)) if made >= source)
}

/// `ptxas -arch=ARCH -O3 PTX -o CUBIN`, skipped when the cubin is newer than the PTX.
fn assemble(ptxas: &Path, arch: &str, ptx: &Path, cubin: &Path) -> bool {
    if up_to_date(cubin, ptx) {
        return true;
    }
    let status = std::process::Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-O3")
        .arg(ptx)
        .arg("-o")
        .arg(cubin)
        .status();
    finished(status, cubin, ptx)
}

/// `nvcc --cubin -gencode=… SOURCE -o CUBIN` with the flags of the PTX build, skipped when
/// the cubin is newer than the module's PTX (which cudaforge rebuilds when the source or a
/// header changes) and build.rs.
fn compile(
    nvcc: &Path,
    arch: &cudaforge::GpuArch,
    source: &Path,
    ptx: &Path,
    cubin: &Path,
) -> bool {
    if up_to_date(cubin, ptx) && up_to_date(cubin, Path::new("build.rs")) {
        return true;
    }
    let status = std::process::Command::new(nvcc)
        .arg(arch.to_gencode_arg())
        .arg("--cubin")
        .args(["--default-stream", "per-thread"])
        .args(["--expt-relaxed-constexpr", "-std=c++17", "-O3"])
        .arg(source)
        .arg("-o")
        .arg(cubin)
        .status();
    finished(status, cubin, source)
}

fn finished(status: std::io::Result<std::process::ExitStatus>, cubin: &Path, from: &Path) -> bool {
    match status {
        Ok(s) if s.success() => true,
        other => {
            let _ = std::fs::remove_file(cubin);
            println!(
                "cargo:warning=candle-kernels: no machine code {} from {} ({other:?}); that module runs from its PTX there",
                cubin.display(),
                from.display()
            );
            false
        }
    }
}
