// Link-time settings for libtorch (see DEVELOPERS.md):
// - an rpath to libtorch's lib folder so the binary runs without LD_LIBRARY_PATH;
// - libtorch_cuda linked with --no-as-needed: nothing references it by symbol, so the linker
//   would drop it and tch would then report no CUDA device even on a GPU machine.
fn main() {
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
        if std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
        // The libtorch version this binary is linked against (pip's torch/version.py), for `doctor`.
        let version_py = std::path::Path::new(&lib_dir).join("../version.py");
        let version = std::fs::read_to_string(&version_py)
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_string()))
            })
            .unwrap_or_else(|| "unknown".into());
        println!("cargo:rustc-env=ADAMCU_LIBTORCH_VERSION={version}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
