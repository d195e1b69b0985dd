//! Helpers shared by the net card's namespace tests: running commands, inside a namespace, and
//! checking a tool is installed.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs a command, returns its output (never panics on failure to spawn: reported in stderr).
pub fn run(args: &[&str]) -> Output {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => o,
        Err(e) => Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
            stdout: Vec::new(),
            stderr: format!("spawn {args:?}: {e}").into_bytes(),
        },
    }
}

/// Runs a command that must succeed.
pub fn ok(args: &[&str]) {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs a command inside network namespace `ns`.
pub fn in_ns(ns: &str, args: &[&str]) -> Output {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    run(&["sh", "-c", &format!("command -v {tool}")])
        .status
        .success()
}
