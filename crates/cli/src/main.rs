//! `bulkhead`: the command-line tool. A thin dispatcher; each subcommand group lives in its own
//! module under `cmd/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(name = "bulkhead", about = "Bulkhead command-line tool", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificate authority: create, issue, rotate.
    #[command(subcommand)]
    Ca(cmd::ca::CaCommand),
    /// Token service: mint and revoke bearer tokens.
    #[command(subcommand)]
    Token(cmd::token::TokenCommand),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
    /// Signed releases: keygen, root, create, sign, verify.
    #[command(subcommand)]
    Release(cmd::release::ReleaseCommand),
    /// Deploy a signed release in waves (simulated swtpm fleet).
    Deploy(cmd::deploy::DeployArgs),
    /// Start a local cluster: KMS, N hosts (controllers), control plane.
    Up(cmd::up::UpArgs),
    /// The customer API, spelled like `aws ec2` (run-instances, attach-volume, ...).
    Ec2(cmd::ec2::Ec2Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ca(c) => cmd::ca::run(c),
        Command::Token(c) => cmd::token::run(c),
        Command::Audit(c) => cmd::audit::run(c),
        Command::Release(c) => cmd::release::run(c),
        Command::Deploy(c) => cmd::deploy::run(c),
        Command::Up(c) => cmd::up::run(c),
        Command::Ec2(c) => cmd::ec2::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
