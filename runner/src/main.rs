//! The `needle` binary. Everything is in the library; `lib.rs` opens with a map of it.

fn main() {
    needle_runner::main()
}
