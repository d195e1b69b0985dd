//! The NBD protocol (`doc/proto.md` of the NBD project) as typed, bounded encoders and parsers,
//! for both ends: the block card (client) and the storage node (server). No I/O: callers read a
//! fixed-size header, parse it (every length is checked against a cap before the caller buffers
//! the data it announces), then hand the data to the matching parser.
//!
//! Spoken subset: the fixed newstyle handshake with `NO_ZEROES`, `NBD_OPT_STARTTLS`,
//! `NBD_OPT_GO`/`NBD_OPT_INFO` with `NBD_INFO_EXPORT`/`NAME`/`DESCRIPTION`/`BLOCK_SIZE`,
//! `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_EXPORT_NAME`, and simple replies in transmission.
//! Structured replies are recognised (so a server that sends one un-asked is a typed error) but
//! never negotiated.

pub mod consts;
pub mod fuzzing;
mod handshake;
mod transmission;
mod wire;

pub use handshake::{
    ClientFlags, ClientOption, ExportName, ExportNameReply, HandshakeFlags, InfoReply, InfoRequest,
    InfoType, OptionError, OptionHeader, OptionReply, OptionReplyHeader, ReplyType, ServerEntry,
    ServerGreeting,
};
pub use transmission::{
    Command, CommandFlags, Cookie, Errno, Request, SimpleReply, TransmissionFlags,
};

/// Everything that can be wrong with NBD bytes. Matchable; no string payloads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error("{what}: {got} bytes, want {want}")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{what}: bad magic {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    #[error("{what}: announced length {got} exceeds the cap {cap}")]
    TooLong {
        what: &'static str,
        got: u64,
        cap: u64,
    },
    #[error("{what}: {extra} trailing bytes")]
    Trailing { what: &'static str, extra: usize },
    #[error("server greeting lacks FIXED_NEWSTYLE (flags {0:#06x})")]
    NotFixedNewstyle(u16),
    #[error("client flags {0:#x} carry bits this server does not know")]
    UnknownClientFlags(u32),
    #[error("export name is not UTF-8")]
    NameNotUtf8,
    #[error("option {0} carries data but takes none")]
    UnexpectedData(u32),
    #[error("a structured reply arrived but was never negotiated")]
    StructuredReply,
}

impl NbdError {
    /// A stable short name for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            NbdError::Length { .. } => "length",
            NbdError::BadMagic { .. } => "bad_magic",
            NbdError::TooLong { .. } => "too_long",
            NbdError::Trailing { .. } => "trailing",
            NbdError::NotFixedNewstyle(_) => "not_fixed_newstyle",
            NbdError::UnknownClientFlags(_) => "unknown_client_flags",
            NbdError::NameNotUtf8 => "name_not_utf8",
            NbdError::UnexpectedData(_) => "unexpected_data",
            NbdError::StructuredReply => "structured_reply",
        }
    }
}

#[cfg(test)]
mod tests;
