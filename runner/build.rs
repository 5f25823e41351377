//! Bake libtorch's `lib/` (found by needle-ops' build script) into the rpath of `needle` and the
//! test binaries, so they run without `LD_LIBRARY_PATH`; and link `libtorch_cuda` explicitly:
//! nothing references it by symbol, so the linker would drop it and torch would never see a
//! GPU. It loads fine on a machine without one.

fn main() {
    let lib = std::env::var("DEP_NEEDLE_LIBTORCH_LIB").expect("set by needle-ops' build script");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch_cuda");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
