//! `bulkhead audit verify`.

use std::path::PathBuf;

use clap::Subcommand;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; print the record count; exit non-zero at the first broken link.
    Verify { path: PathBuf },
}

pub fn run(c: AuditCommand) -> Result<(), CliError> {
    match c {
        AuditCommand::Verify { path } => match bulkhead_audit::verify(&path) {
            Ok(head) => {
                println!(
                    "{} records, chain intact, head {}",
                    head.records, head.last_hash
                );
                Ok(())
            }
            Err(source) => Err(CliError::AuditBroken {
                path: path.display().to_string(),
                source,
            }),
        },
    }
}
