//! `bulkhead audit verify`.

use std::path::PathBuf;

use bulkhead_audit::{Anchor, CheckpointKey, VerifyOptions};
use clap::Subcommand;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; print the head; exit non-zero at the first broken link.
    ///
    /// With `--cert`, every checkpoint must be signed by that certificate's key (the daemon's
    /// TLS certificate) and the log must end with a checkpoint: an edited, rewritten or
    /// partly cut tail fails. With `--head SEQ:HASH` (a head seen before, e.g. what the control
    /// plane pulled) or `--min-checkpoint N`, a tail cut back to an earlier checkpoint fails too.
    Verify {
        path: PathBuf,
        /// PEM certificate of the daemon that writes the log.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// A head seen before: `SEQ:SHA256HEX` of a record that must still be there, unchanged.
        #[arg(long)]
        head: Option<String>,
        /// The last checkpoint number must be at least this.
        #[arg(long)]
        min_checkpoint: Option<u64>,
    },
}

pub fn run(c: AuditCommand) -> Result<(), CliError> {
    match c {
        AuditCommand::Verify {
            path,
            cert,
            head,
            min_checkpoint,
        } => {
            let key = match &cert {
                Some(p) => {
                    let pem = std::fs::read(p)
                        .map_err(|e| CliError::BadArgument(format!("{}: {e}", p.display())))?;
                    Some(
                        CheckpointKey::from_cert_pem(&pem)
                            .map_err(|e| CliError::BadArgument(format!("{}: {e}", p.display())))?,
                    )
                }
                None => None,
            };
            let anchor = match &head {
                Some(h) => Some(Anchor::parse(h).ok_or_else(|| {
                    CliError::BadArgument(format!("--head wants SEQ:SHA256HEX, got {h:?}"))
                })?),
                None => None,
            };
            let signed = key.is_some();
            let opts = VerifyOptions {
                key,
                anchor,
                min_checkpoint,
            };
            match bulkhead_audit::verify_with(&path, &opts) {
                Ok(head) => {
                    println!(
                        "{} records, chain intact{}, head {}:{}, checkpoint {}",
                        head.records,
                        if signed {
                            ", every checkpoint signed"
                        } else {
                            ""
                        },
                        head.records,
                        head.last_hash,
                        head.checkpoint
                    );
                    Ok(())
                }
                Err(source) => Err(CliError::AuditBroken {
                    path: path.display().to_string(),
                    source,
                }),
            }
        }
    }
}
