//! Link-time settings for libtorch.
//!
//! - An rpath to `$LIBTORCH/lib`, so `target/*/brittle` runs without `LD_LIBRARY_PATH`.
//! - With `BRITTLE_CUDA=1`, links `libtorch_cuda` with `--no-as-needed` (tch-rs issue 980: the linker
//!   otherwise drops it, and CUDA stays invisible). Off by default: the slim venv has no cuDNN/cuBLAS,
//!   which `libtorch_cuda` needs at load time.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=BRITTLE_CUDA");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
        if std::env::var("BRITTLE_CUDA").as_deref() == Ok("1") {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-L{libtorch}/lib");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
