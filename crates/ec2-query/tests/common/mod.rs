//! Finds a python3 that has botocore (the AWS SDK for Python's core, unmodified from PyPI),
//! installing it with pip when absent, as `scripts/install-deps.sh` does.

use std::path::{Path, PathBuf};
use std::process::Command;

fn has_botocore(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import botocore"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `Some("python3")` when botocore can be imported (after installing it if need be); `None`
/// after a loud skip (a failure under `BULKHEAD_REQUIRE_ALL=1`).
pub fn python_with_botocore() -> Option<&'static str> {
    let python = "python3";
    if !has_botocore(python) {
        for extra in [&[][..], &["--break-system-packages"][..]] {
            let _ = Command::new(python)
                .args(["-m", "pip", "install", "--quiet", "botocore"])
                .args(extra)
                .status();
            if has_botocore(python) {
                break;
            }
        }
    }
    if has_botocore(python) {
        Some(python)
    } else {
        bulkhead_testkit::skip_or_fail(
            "python3 with botocore is not available (pip install botocore failed)",
        );
        None
    }
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Runs `tests/py/<name>` with `args` and `stdin`, returns its stdout parsed as JSON; panics
/// with its stderr on failure.
pub fn run_json(python: &str, name: &str, args: &[&str], stdin: &[u8]) -> serde_json::Value {
    use std::io::Write;
    let mut child = Command::new(python)
        .arg(script(name))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python3");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(stdin)
        .expect("write to python");
    let out = child.wait_with_output().expect("python3 ran");
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("script prints JSON")
}
