//! The Python tests of the ComfyUI extension (`extension/tests`, stdlib `unittest`, no ComfyUI or torch), run
//! by `cargo test` so the one test command covers them too.

use std::process::Command;

#[test]
fn the_extensions_python_tests_pass() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "extension/tests", "-t", "extension"])
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 runs (the extension's tests need Python 3.9 or newer)");
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the extension's Python tests failed:\n{report}");
    // `unittest` ends with `Ran N tests` and `OK`; zero tests found would also exit 0 on older Pythons.
    let ran = report.lines().find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse::<u32>().ok());
    assert!(ran.is_some_and(|n| n > 0), "no tests ran:\n{report}");
    assert!(report.lines().any(|l| l.starts_with("OK")), "{report}");
}
