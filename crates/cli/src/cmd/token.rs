//! `bulkhead token mint|revoke` against the dev-mode token service (key and policy in a state
//! directory).

use std::io::Write;
use std::path::PathBuf;

use bulkhead_tokens::clock::parse_duration;
use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::{MintRequest, Operation, ResourcePattern};
use clap::Subcommand;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token for CALLER (bound to DIR/CALLER.pem) if the policy grants it; print it.
    Mint {
        #[arg(long)]
        dev_dir: PathBuf,
        #[arg(long)]
        caller: String,
        /// Audience: one host name, or several separated by commas.
        #[arg(long)]
        host: String,
        /// Operations, comma-separated (e.g. DescribeHost,GetHealth).
        #[arg(long)]
        ops: String,
        /// Resource patterns, comma-separated (default: the granting group's whole set).
        #[arg(long)]
        resources: Option<String>,
        #[arg(long, default_value = "5m")]
        ttl: String,
        /// Print the claims as JSON on stderr.
        #[arg(long)]
        verbose: bool,
    },
    /// Add a token's id to DIR/revoked.txt; controllers pick it up on their next request.
    Revoke {
        #[arg(long)]
        dev_dir: PathBuf,
        /// The token to revoke.
        #[arg(long, conflicts_with = "id")]
        token: Option<String>,
        /// A token id to revoke.
        #[arg(long)]
        id: Option<String>,
    },
}

fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty())
}

pub fn run(c: TokenCommand) -> Result<(), CliError> {
    match c {
        TokenCommand::Mint {
            dev_dir,
            caller,
            host,
            ops,
            resources,
            ttl,
            verbose,
        } => {
            let dir = StateDir::new(dev_dir);
            let (identity, _) = dir.ca().identity(&caller)?;
            if identity.name != caller {
                return Err(CliError::Mint(
                    bulkhead_tokens::MintError::CertificateMismatch,
                ));
            }
            let operations = split(&ops)
                .map(|o| {
                    Operation::from_name(o)
                        .ok_or_else(|| CliError::BadArgument(format!("unknown operation {o}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let resources = resources
                .map(|r| {
                    split(&r)
                        .map(|x| {
                            ResourcePattern::parse(x)
                                .map_err(|e| CliError::BadArgument(format!("{x}: {e}")))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let ttl = parse_duration(&ttl).map_err(|e| CliError::BadArgument(e.to_string()))?;
            let svc = dir.token_service()?;
            let (token, claims) = svc.mint(&MintRequest {
                caller: identity,
                hosts: split(&host).map(str::to_string).collect(),
                operations,
                resources,
                ttl,
            })?;
            if verbose {
                eprintln!(
                    "{}",
                    serde_json::json!({
                        "token_id": claims.token_id,
                        "caller": claims.caller,
                        "role": claims.role.name(),
                        "group": claims.group,
                        "audience": claims.audience,
                        "operations": claims.operations.iter().map(|o| o.name()).collect::<Vec<_>>(),
                        "resources": claims.resources.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                        "expires": claims.expires,
                    })
                );
            }
            println!("{token}");
        }
        TokenCommand::Revoke { dev_dir, token, id } => {
            let dir = StateDir::new(dev_dir);
            let id = match (token, id) {
                (Some(t), _) => {
                    let (_, claims) = dir.verifier()?.decode(t.trim()).map_err(|e| {
                        CliError::BadArgument(format!("token does not verify: {}", e.code()))
                    })?;
                    claims.token_id
                }
                (None, Some(id)) if id.bytes().all(|b| b.is_ascii_hexdigit()) && !id.is_empty() => {
                    id.to_ascii_lowercase()
                }
                _ => return Err(CliError::BadArgument("give --token or a hex --id".into())),
            };
            let path = dir.revoked();
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .map_err(|e| CliError::Io(path.display().to_string(), e))?;
            writeln!(f, "{id}")
                .and_then(|()| f.sync_all())
                .map_err(|e| CliError::Io(path.display().to_string(), e))?;
            println!("revoked {id}");
        }
    }
    Ok(())
}
