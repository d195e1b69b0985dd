//! `bulkhead-daemon`: what every Bulkhead binary does first and last.
//!
//! [`init_logging`] sends `tracing` output to stderr (stdout carries each daemon's one-line
//! JSON events, e.g. `ready`), filtered by the binary's own environment variable or `RUST_LOG`,
//! with the binary's default level otherwise. [`exit`] turns the result of a daemon's `run` into
//! its exit code, printing a fatal error once, prefixed with the binary's name. With the
//! `runtime` feature, [`runtime`] builds the tokio runtime every async daemon and CLI runs on.

use std::fmt::Display;
use std::process::ExitCode;

/// Exit code of a daemon that could not start or stopped on an error.
pub const FATAL: u8 = 2;

/// Logs to stderr. The filter comes from `env_var` (e.g. `BULKHEAD_LOG`), else `RUST_LOG`,
/// else `default` (e.g. `"info"`). Colours only on a terminal.
pub fn init_logging(env_var: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(env_var)
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A second call (tests linking several mains) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .try_init();
}

/// The exit code for `result`; an error is printed as `name: error` on stderr.
pub fn exit<E: Display>(name: &str, result: Result<(), E>) -> ExitCode {
    exit_code(name, result.map(|()| ExitCode::SUCCESS))
}

/// Like [`exit`] for a binary whose success has its own codes (e.g. the launcher's "refused",
/// the hypervisor's "guest stopped"): `Ok(code)` is returned as it is; an error is printed as
/// `name: error` and exits with [`FATAL`].
pub fn exit_code<E: Display>(name: &str, result: Result<ExitCode, E>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("{name}: {e}");
        ExitCode::from(FATAL)
    })
}

/// The runtime of the async daemons and CLIs: multi-threaded with two workers (the hosts this
/// runs on have few cores to spare next to the guests), I/O and timers enabled.
#[cfg(feature = "runtime")]
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit::<String>("x", Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit("x", Err("boom")), ExitCode::from(FATAL));
        assert_eq!(
            exit_code::<String>("x", Ok(ExitCode::from(3))),
            ExitCode::from(3)
        );
        assert_eq!(exit_code("x", Err("boom")), ExitCode::from(FATAL));
        init_logging("BULKHEAD_TEST_LOG", "info");
        init_logging("BULKHEAD_TEST_LOG", "info");
    }

    #[cfg(feature = "runtime")]
    #[test]
    fn runtime_runs_a_task_with_timers() {
        let rt = runtime().expect("runtime");
        let got = rt.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            tokio::spawn(async { 7 }).await
        });
        assert_eq!(got.expect("task"), 7);
    }
}
