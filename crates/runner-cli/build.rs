//! With `--features cuda`: link CUDA's runtime (cudart) into the binary. candle's compiled
//! GGUF kernels call it, and candle-kernels asks for the shared `libcudart.so.13`, which would
//! then have to be present for the binary to start at all (`runner --help` and
//! `--device cpu` included). The static archive comes first on the link line and defines every
//! symbol, so the linker (`--as-needed`) drops the shared one. nvcc links cudart this way by
//! default; cuBLAS carries its own copy too.
fn main() {
    const ROOT_VARS: [&str; 4] = [
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_TOOLKIT_ROOT_DIR",
    ];
    println!("cargo:rerun-if-changed=build.rs");
    for var in ROOT_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let roots = ROOT_VARS
        .iter()
        .filter_map(std::env::var_os)
        .map(std::path::PathBuf::from)
        .chain([std::path::PathBuf::from("/usr/local/cuda")]);
    let dir = roots
        .flat_map(|root| [root.join("lib64"), root.join("lib")])
        .find(|dir| dir.join("libcudart_static.a").is_file());
    match dir {
        Some(dir) => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-lib=static:+whole-archive,-bundle=cudart_static");
            // What libcudart_static.a itself needs.
            println!("cargo:rustc-link-lib=dylib=rt");
            println!("cargo:rustc-link-lib=dylib=dl");
            println!("cargo:rustc-link-lib=dylib=pthread");
        }
        None => println!(
            "cargo:warning=libcudart_static.a not found under CUDA_ROOT/CUDA_PATH/CUDA_HOME: the binary will need libcudart.so.13 to start"
        ),
    }
}
