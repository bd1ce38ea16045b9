//! comfy-bridge binary.
fn main() {}
