//! `bulkhead ca init|issue|rotate`.

use std::path::PathBuf;

use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::Role;
use clap::Subcommand;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue NAME.pem / NAME.key signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["operator", "customer", "control-plane", "host"])]
        role: String,
    },
    /// Re-issue NAME with a fresh key and the same role (old tokens bound to it stop working).
    Rotate {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

pub fn run(c: CaCommand) -> Result<(), CliError> {
    match c {
        CaCommand::Init { dir } => {
            CaDir::new(&dir).init()?;
            println!("created CA in {}", dir.display());
        }
        CaCommand::Issue { dir, name, role } => {
            let role = Role::from_name(&role)
                .ok_or_else(|| CliError::BadArgument(format!("unknown role {role}")))?;
            let ca = CaDir::new(&dir);
            let id = ca.issue(&name, role, false)?;
            println!(
                "issued {} ({}) cert sha256 {}",
                ca.cert(&name).display(),
                id.role,
                id.cert_sha256
            );
        }
        CaCommand::Rotate { dir, name } => {
            let ca = CaDir::new(&dir);
            let id = ca.rotate(&name)?;
            println!(
                "rotated {} ({}) cert sha256 {}",
                ca.cert(&name).display(),
                id.role,
                id.cert_sha256
            );
        }
    }
    Ok(())
}
