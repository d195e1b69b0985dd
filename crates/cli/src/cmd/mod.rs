//! One module per subcommand group.

pub mod audit;
pub mod ca;
pub mod deploy;
pub mod ec2;
pub mod release;
pub mod token;
pub mod up;

/// Every failure of a subcommand. `code()` is stable and printed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("[{code}] {0}", code = .0.code())]
    Pki(#[from] bulkhead_tokens::pki::PkiError),
    #[error("{0}")]
    State(#[from] bulkhead_tokens::statedir::StateError),
    #[error("[{code}] refused: {0}", code = .0.code())]
    Mint(#[from] bulkhead_tokens::MintError),
    #[error("[bad_argument] {0}")]
    BadArgument(String),
    #[error("[audit_broken] {path}: {source} (first broken record: line {line})", line = .source.line())]
    AuditBroken {
        path: String,
        source: bulkhead_audit::VerifyError,
    },
    #[error("[io_error] {0}: {1}")]
    Io(String, std::io::Error),
    #[error("[{code}] {0}", code = .0.code())]
    Rot(#[from] bulkhead_rot::RotError),
}

/// A Bulkhead binary installed next to this one (`make build` puts them together).
pub fn sibling_binary(name: &str) -> Result<std::path::PathBuf, CliError> {
    let me = std::env::current_exe().map_err(|e| CliError::Io("current_exe".into(), e))?;
    me.parent()
        .map(|d| d.join(name))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            CliError::BadArgument(format!(
                "{name} not found next to bulkhead; run `make build`"
            ))
        })
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::BadArgument(_) => 2,
            _ => 1,
        }
    }
}
