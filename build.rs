// Link-time settings for libtorch (see DEVELOPERS.md):
// - an rpath to libtorch's lib folder so the binary runs without LD_LIBRARY_PATH;
// - libtorch_cuda linked with --no-as-needed: nothing references it by symbol, so the linker
//   would drop it and tch would then report no CUDA device even on a GPU machine;
// - csrc/torch_shim.cpp, the few libtorch calls tch does not expose or reaches only through
//   deprecated ones (listed at its top), compiled against the same headers;
// - csrc/distributed.cpp, c10d's process groups: Gloo against Debian's libgloo-dev headers (the
//   wheel ships c10d's headers but not Gloo's), NCCL where a CUDA toolkit's headers are found.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/torch_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/distributed.cpp");
    println!("cargo:rerun-if-changed=csrc/shim_common.h");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    let lib = Path::new(&lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
    let cuda = lib.join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    // The libtorch version this binary is linked against (pip's torch/version.py), for `doctor`.
    let version = std::fs::read_to_string(lib.join("../version.py"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ADAMCU_LIBTORCH_VERSION={version}");
    // The libtorch folder this build links, for the tests (is it a CUDA wheel?).
    println!("cargo:rustc-env=ADAMCU_LIBTORCH_LIB={lib_dir}");

    let root = lib.parent().expect("libtorch lib dir has a parent");
    let mut build = cc::Build::new();
    let gloo = ["/usr/include", "/usr/local/include"]
        .into_iter()
        .find(|d| Path::new(d).join("gloo/rendezvous/store.h").exists());
    if gloo.is_none() {
        panic!(
            "Gloo's headers (gloo/rendezvous/store.h) are missing: install Debian's libgloo-dev \
             (`make sys-deps` does); c10d's ProcessGroupGloo header needs them"
        );
    }
    build
        .cpp(true)
        .file("csrc/torch_shim.cpp")
        .file("csrc/distributed.cpp")
        .define("USE_C10D_GLOO", None)
        .std("c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"));
    // CUDA runtime headers ship with pip's torch (nvidia/<cuXX>/include, or triton's copy).
    if let Some(cuda_include) = cuda.then(|| find_cuda_include(root)).flatten() {
        build.include(&cuda_include).define("ADAMCU_CUDA_STATS", None);
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    // ProcessGroupNCCL's header pulls in ATen's CUDA headers, which need more than the wheel's
    // runtime headers (crt/host_config.h and libcu++'s nv/target): a CUDA toolkit's, or pip's
    // nvidia-cuda-crt and nvidia-cuda-cccl (scripts/setup-libtorch.sh installs them). Without
    // them, the NCCL backend reports at run time that it was not built in.
    if let Some((toolkit, nccl)) = cuda.then(|| find_nccl_build(root)).flatten() {
        build.include(toolkit).include(nccl).define("USE_C10D_NCCL", None).define("ADAMCU_NCCL", None);
        println!("cargo:rustc-cfg=adamcu_nccl");
    }
    println!("cargo:rustc-check-cfg=cfg(adamcu_nccl)");
    build.compile("adamcu_torch_shim");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}

/// pip's CUDA include folders beside torch: nvidia/<package>/include.
fn pip_cuda_includes(site: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(site.join("nvidia")).into_iter().flatten().flatten().map(|e| e.path().join("include"))
}

fn find_cuda_include(torch_root: &Path) -> Option<PathBuf> {
    let site = torch_root.parent()?;
    pip_cuda_includes(site)
        .chain([site.join("triton/backends/nvidia/include")])
        .find(|p| p.join("cuda_runtime_api.h").exists() && p.join("crt/host_config.h").exists())
}

/// An include folder with every CUDA header ProcessGroupNCCL's needs (the runtime's, crt's and
/// libcu++'s nv/target): a CUDA toolkit's (`CUDA_HOME`, else /usr/local/cuda), or pip's
/// nvidia/<cuXX>/include beside torch once nvidia-cuda-crt and nvidia-cuda-cccl are in it; and
/// the NCCL headers pip's nvidia-nccl wheel ships beside torch.
fn find_nccl_build(torch_root: &Path) -> Option<(PathBuf, PathBuf)> {
    let home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
    let site = torch_root.parent()?;
    let toolkit = [Path::new(&home).join("include")].into_iter().chain(pip_cuda_includes(site)).find(|p| {
        ["nv/target", "cuda_runtime_api.h", "crt/host_config.h"].iter().all(|header| p.join(header).exists())
    })?;
    let nccl = site.join("nvidia/nccl/include");
    nccl.join("nccl.h").exists().then_some((toolkit, nccl))
}
