//! Links the `comfy-bridge` binary with the functions it runs while idle first and together, in the order
//! `link/idle.order` gives (written by `link/idle-order`; see there why it matters for memory).
//!
//! Only for release builds on x86_64 Linux where rustc links with its own lld (the default since Rust 1.90):
//! GNU ld does not know `--symbol-ordering-file`, and a linker of the user's choosing is left alone. A
//! function the file names that is not in the binary is skipped without a word, so the build never fails
//! over a stale file.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=link/idle.order");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let chosen_linker = !var("RUSTC_LINKER").is_empty() || var("CARGO_ENCODED_RUSTFLAGS").contains("link");
    if var("TARGET") != "x86_64-unknown-linux-gnu" || var("PROFILE") != "release" || chosen_linker {
        return;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().ok().filter(|o| o.status.success());
    let Some(sysroot) = sysroot.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) else { return };
    let lld = Path::new(&sysroot).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld/ld.lld");
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("link/idle.order");
    if !lld.exists() || !order.exists() || !rustc_at_least(&rustc, 90) {
        return;
    }
    println!("cargo:rustc-link-arg-bin=comfy-bridge=-Wl,--symbol-ordering-file={}", order.display());
    println!("cargo:rustc-link-arg-bin=comfy-bridge=-Wl,--no-warn-symbol-ordering");
}

/// Whether `rustc --version` is 1.`minor` or later.
fn rustc_at_least(rustc: &str, minor: u32) -> bool {
    let Ok(out) = Command::new(rustc).arg("--version").output() else { return false };
    let version = String::from_utf8_lossy(&out.stdout);
    let found = version.split_whitespace().nth(1).and_then(|v| v.split('.').nth(1)).and_then(|m| m.parse().ok());
    found.is_some_and(|m: u32| m >= minor)
}
