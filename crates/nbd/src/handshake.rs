//! The handshake: greeting, client flags, option requests and option replies.

use crate::consts::*;
use crate::transmission::TransmissionFlags;
use crate::wire::{exact, len_usize, Reader};
use crate::NbdError;

/// The server's handshake flags (16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeFlags(pub u16);

impl HandshakeFlags {
    /// What a Bulkhead server sends: `FIXED_NEWSTYLE | NO_ZEROES`.
    pub const BULKHEAD: HandshakeFlags = HandshakeFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);

    pub fn contains(self, bit: u16) -> bool {
        self.0 & bit == bit
    }
}

/// The newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerGreeting {
    pub flags: HandshakeFlags,
}

impl ServerGreeting {
    pub const LEN: usize = 18;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&self.flags.0.to_be_bytes());
        out
    }

    /// Parses the 18-byte greeting; only a fixed-newstyle server is accepted.
    pub fn parse(buf: &[u8]) -> Result<Self, NbdError> {
        let mut r = exact(buf, Self::LEN, "server greeting")?;
        let magic = r.u64()?;
        if magic != NBDMAGIC {
            return Err(NbdError::BadMagic {
                what: "server greeting",
                got: magic,
            });
        }
        let opt = r.u64()?;
        if opt != IHAVEOPT {
            return Err(NbdError::BadMagic {
                what: "server greeting (oldstyle or unknown)",
                got: opt,
            });
        }
        let flags = HandshakeFlags(r.u16()?);
        if !flags.contains(FLAG_FIXED_NEWSTYLE) {
            return Err(NbdError::NotFixedNewstyle(flags.0));
        }
        Ok(ServerGreeting { flags })
    }
}

/// The client's flags (32 bits), sent right after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    pub const LEN: usize = 4;
    /// What the Bulkhead client sends: `FIXED_NEWSTYLE | NO_ZEROES`.
    pub const BULKHEAD: ClientFlags = ClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    pub fn contains(self, bit: u32) -> bool {
        self.0 & bit == bit
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        self.0.to_be_bytes()
    }

    /// Parses the client flags; a bit this side does not know is refused (the spec tells the
    /// server to drop such a client).
    pub fn parse(buf: &[u8]) -> Result<Self, NbdError> {
        let mut r = exact(buf, Self::LEN, "client flags")?;
        let v = r.u32()?;
        if v & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::UnknownClientFlags(v));
        }
        Ok(ClientFlags(v))
    }
}

/// The 16-byte header of an option request: `IHAVEOPT`, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Parses the header; `length` must be at most `cap` (check before buffering the data).
    pub fn parse(buf: &[u8], cap: u32) -> Result<Self, NbdError> {
        let mut r = exact(buf, Self::LEN, "option header")?;
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic {
                what: "option header",
                got: magic,
            });
        }
        let option = r.u32()?;
        let length = r.u32()?;
        if length > cap {
            return Err(NbdError::TooLong {
                what: "option data",
                got: length.into(),
                cap: cap.into(),
            });
        }
        Ok(OptionHeader { option, length })
    }

    /// The announced data length as a buffer size.
    pub fn data_len(&self) -> usize {
        len_usize(self.length)
    }
}

/// An export name: UTF-8, at most [`MAX_STRING`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExportName(String);

impl ExportName {
    pub fn new(name: &str) -> Result<Self, NbdError> {
        Self::from_bytes(name.as_bytes())
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, NbdError> {
        if b.len() > MAX_STRING {
            return Err(NbdError::TooLong {
                what: "export name",
                got: u64::try_from(b.len()).unwrap_or(u64::MAX),
                cap: MAX_STRING as u64,
            });
        }
        let s = std::str::from_utf8(b).map_err(|_| NbdError::NameNotUtf8)?;
        Ok(ExportName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn len_u32(&self) -> u32 {
        // At most MAX_STRING (4096) bytes: checked in `from_bytes`.
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }
}

impl std::fmt::Display for ExportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An information type a client asks for in `NBD_OPT_INFO`/`NBD_OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoType {
    Export,
    Name,
    Description,
    BlockSize,
    Other(u16),
}

impl InfoType {
    pub fn from_code(c: u16) -> Self {
        match c {
            INFO_EXPORT => InfoType::Export,
            INFO_NAME => InfoType::Name,
            INFO_DESCRIPTION => InfoType::Description,
            INFO_BLOCK_SIZE => InfoType::BlockSize,
            o => InfoType::Other(o),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            InfoType::Export => INFO_EXPORT,
            InfoType::Name => INFO_NAME,
            InfoType::Description => INFO_DESCRIPTION,
            InfoType::BlockSize => INFO_BLOCK_SIZE,
            InfoType::Other(o) => o,
        }
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the information asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: ExportName,
    pub requests: Vec<InfoType>,
}

impl InfoRequest {
    fn parse(data: &[u8]) -> Result<Self, NbdError> {
        let mut r = Reader::new(data, "info request");
        let name_len = len_usize(r.u32()?);
        if name_len > MAX_STRING {
            return Err(NbdError::TooLong {
                what: "export name",
                got: u64::try_from(name_len).unwrap_or(u64::MAX),
                cap: MAX_STRING as u64,
            });
        }
        let name = ExportName::from_bytes(r.bytes(name_len)?)?;
        let n = r.u16()?;
        // Each request is two bytes: check the count against what is there before allocating.
        let want = usize::from(n).saturating_mul(2);
        if r.remaining() != want {
            return Err(NbdError::Length {
                what: "info request list",
                got: r.remaining(),
                want,
            });
        }
        let mut requests = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            requests.push(InfoType::from_code(r.u16()?));
        }
        r.finish()?;
        Ok(InfoRequest { name, requests })
    }

    fn encode_data(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.0.len() + 2 * self.requests.len());
        out.extend_from_slice(&self.name.len_u32().to_be_bytes());
        out.extend_from_slice(self.name.0.as_bytes());
        // More than 65535 requests is not representable; an encoder of ours never builds one.
        let n = u16::try_from(self.requests.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        for t in self.requests.iter().take(usize::from(n)) {
            out.extend_from_slice(&t.code().to_be_bytes());
        }
        out
    }
}

/// An option request, parsed from its header's option number and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(ExportName),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    /// An option this crate does not speak; the server answers `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

impl ClientOption {
    /// Parses the data of an option whose header was already parsed (and capped).
    pub fn parse(header: &OptionHeader, data: &[u8]) -> Result<Self, NbdError> {
        if data.len() != header.data_len() {
            return Err(NbdError::Length {
                what: "option data",
                got: data.len(),
                want: header.data_len(),
            });
        }
        let no_data = |o: ClientOption| {
            if data.is_empty() {
                Ok(o)
            } else {
                Err(NbdError::UnexpectedData(header.option))
            }
        };
        match header.option {
            OPT_EXPORT_NAME => Ok(ClientOption::ExportName(ExportName::from_bytes(data)?)),
            OPT_ABORT => no_data(ClientOption::Abort),
            OPT_LIST => no_data(ClientOption::List),
            OPT_STARTTLS => no_data(ClientOption::StartTls),
            OPT_INFO => Ok(ClientOption::Info(InfoRequest::parse(data)?)),
            OPT_GO => Ok(ClientOption::Go(InfoRequest::parse(data)?)),
            OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
            other => Ok(ClientOption::Unknown(other)),
        }
    }

    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::Unknown(o) => *o,
        }
    }

    /// The whole request: header and data.
    pub fn encode(&self) -> Vec<u8> {
        let data = match self {
            ClientOption::ExportName(n) => n.0.as_bytes().to_vec(),
            ClientOption::Info(i) | ClientOption::Go(i) => i.encode_data(),
            _ => Vec::new(),
        };
        let header = OptionHeader {
            option: self.code(),
            length: u32::try_from(data.len()).unwrap_or(u32::MAX),
        };
        let mut out = Vec::with_capacity(OptionHeader::LEN + data.len());
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&data);
        out
    }
}

/// An `NBD_REP_ERR_*` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionError {
    Unsup,
    Policy,
    Invalid,
    Platform,
    TlsReqd,
    Unknown,
    Shutdown,
    BlockSizeReqd,
    TooBig,
    /// Any other value with the error bit set.
    Other(u32),
}

impl OptionError {
    pub fn code(self) -> u32 {
        match self {
            OptionError::Unsup => REP_ERR_UNSUP,
            OptionError::Policy => REP_ERR_POLICY,
            OptionError::Invalid => REP_ERR_INVALID,
            OptionError::Platform => REP_ERR_PLATFORM,
            OptionError::TlsReqd => REP_ERR_TLS_REQD,
            OptionError::Unknown => REP_ERR_UNKNOWN,
            OptionError::Shutdown => REP_ERR_SHUTDOWN,
            OptionError::BlockSizeReqd => REP_ERR_BLOCK_SIZE_REQD,
            OptionError::TooBig => REP_ERR_TOO_BIG,
            OptionError::Other(c) => c | REP_FLAG_ERROR,
        }
    }

    /// A stable short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            OptionError::Unsup => "unsup",
            OptionError::Policy => "policy",
            OptionError::Invalid => "invalid",
            OptionError::Platform => "platform",
            OptionError::TlsReqd => "tls_reqd",
            OptionError::Unknown => "unknown",
            OptionError::Shutdown => "shutdown",
            OptionError::BlockSizeReqd => "block_size_reqd",
            OptionError::TooBig => "too_big",
            OptionError::Other(_) => "other",
        }
    }
}

/// The type field of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyType {
    Ack,
    Server,
    Info,
    MetaContext,
    Error(OptionError),
    /// A non-error type this crate does not know.
    Other(u32),
}

impl ReplyType {
    pub fn from_code(c: u32) -> Self {
        match c {
            REP_ACK => ReplyType::Ack,
            REP_SERVER => ReplyType::Server,
            REP_INFO => ReplyType::Info,
            REP_META_CONTEXT => ReplyType::MetaContext,
            REP_ERR_UNSUP => ReplyType::Error(OptionError::Unsup),
            REP_ERR_POLICY => ReplyType::Error(OptionError::Policy),
            REP_ERR_INVALID => ReplyType::Error(OptionError::Invalid),
            REP_ERR_PLATFORM => ReplyType::Error(OptionError::Platform),
            REP_ERR_TLS_REQD => ReplyType::Error(OptionError::TlsReqd),
            REP_ERR_UNKNOWN => ReplyType::Error(OptionError::Unknown),
            REP_ERR_SHUTDOWN => ReplyType::Error(OptionError::Shutdown),
            REP_ERR_BLOCK_SIZE_REQD => ReplyType::Error(OptionError::BlockSizeReqd),
            REP_ERR_TOO_BIG => ReplyType::Error(OptionError::TooBig),
            c if c & REP_FLAG_ERROR != 0 => ReplyType::Error(OptionError::Other(c)),
            c => ReplyType::Other(c),
        }
    }

    pub fn code(self) -> u32 {
        match self {
            ReplyType::Ack => REP_ACK,
            ReplyType::Server => REP_SERVER,
            ReplyType::Info => REP_INFO,
            ReplyType::MetaContext => REP_META_CONTEXT,
            ReplyType::Error(e) => e.code(),
            ReplyType::Other(c) => c,
        }
    }
}

/// The 20-byte header of an option reply: magic, option, reply type, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: ReplyType,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.reply.code().to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Parses the header; `length` must be at most `cap` (check before buffering the data).
    pub fn parse(buf: &[u8], cap: u32) -> Result<Self, NbdError> {
        let mut r = exact(buf, Self::LEN, "option reply header")?;
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(NbdError::BadMagic {
                what: "option reply header",
                got: magic,
            });
        }
        let option = r.u32()?;
        let reply = ReplyType::from_code(r.u32()?);
        let length = r.u32()?;
        if length > cap {
            return Err(NbdError::TooLong {
                what: "option reply data",
                got: length.into(),
                cap: cap.into(),
            });
        }
        Ok(OptionReplyHeader {
            option,
            reply,
            length,
        })
    }

    pub fn data_len(&self) -> usize {
        len_usize(self.length)
    }
}

/// The data of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: the export's size in bytes and its transmission flags.
    Export {
        size: u64,
        flags: TransmissionFlags,
    },
    Name(ExportName),
    Description(ExportName),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An information type this crate does not know (its data is not kept).
    Other(u16),
}

impl InfoReply {
    pub fn parse(data: &[u8]) -> Result<Self, NbdError> {
        let mut r = Reader::new(data, "info reply");
        let t = r.u16()?;
        let out = match t {
            INFO_EXPORT => InfoReply::Export {
                size: r.u64()?,
                flags: TransmissionFlags(r.u16()?),
            },
            INFO_NAME => InfoReply::Name(ExportName::from_bytes(r.rest())?),
            INFO_DESCRIPTION => InfoReply::Description(ExportName::from_bytes(r.rest())?),
            INFO_BLOCK_SIZE => InfoReply::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            other => {
                r.rest();
                InfoReply::Other(other)
            }
        };
        r.finish()?;
        Ok(out)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            InfoReply::Export { size, flags } => {
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.0.to_be_bytes());
            }
            InfoReply::Name(n) => {
                out.extend_from_slice(&INFO_NAME.to_be_bytes());
                out.extend_from_slice(n.0.as_bytes());
            }
            InfoReply::Description(n) => {
                out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                out.extend_from_slice(n.0.as_bytes());
            }
            InfoReply::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&min.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&max.to_be_bytes());
            }
            InfoReply::Other(t) => out.extend_from_slice(&t.to_be_bytes()),
        }
        out
    }
}

/// The data of an `NBD_REP_SERVER` reply (one export of `NBD_OPT_LIST`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: ExportName,
}

impl ServerEntry {
    pub fn parse(data: &[u8]) -> Result<Self, NbdError> {
        let mut r = Reader::new(data, "server entry");
        let n = len_usize(r.u32()?);
        if n > MAX_STRING {
            return Err(NbdError::TooLong {
                what: "export name",
                got: u64::try_from(n).unwrap_or(u64::MAX),
                cap: MAX_STRING as u64,
            });
        }
        let name = ExportName::from_bytes(r.bytes(n)?)?;
        // The rest is a free-form description; it is not kept.
        r.rest();
        Ok(ServerEntry { name })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.0.len());
        out.extend_from_slice(&self.name.len_u32().to_be_bytes());
        out.extend_from_slice(self.name.0.as_bytes());
        out
    }
}

/// A whole option reply, for the server to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: ReplyType,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn ack(option: u32) -> Self {
        OptionReply {
            option,
            reply: ReplyType::Ack,
            data: Vec::new(),
        }
    }

    pub fn info(option: u32, info: &InfoReply) -> Self {
        OptionReply {
            option,
            reply: ReplyType::Info,
            data: info.encode(),
        }
    }

    pub fn server(entry: &ServerEntry) -> Self {
        OptionReply {
            option: OPT_LIST,
            reply: ReplyType::Server,
            data: entry.encode(),
        }
    }

    /// An error reply; the data is empty (a message would be for humans, and could leak).
    pub fn error(option: u32, err: OptionError) -> Self {
        OptionReply {
            option,
            reply: ReplyType::Error(err),
            data: Vec::new(),
        }
    }

    pub fn header(&self) -> OptionReplyHeader {
        OptionReplyHeader {
            option: self.option,
            reply: self.reply,
            length: u32::try_from(self.data.len()).unwrap_or(u32::MAX),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(OptionReplyHeader::LEN + self.data.len());
        out.extend_from_slice(&self.header().encode());
        out.extend_from_slice(&self.data);
        out
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME` (no option reply header): size, transmission
/// flags, and 124 zero bytes unless both sides agreed on `NO_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: TransmissionFlags,
}

impl ExportNameReply {
    pub const LEN: usize = 10;
    pub const ZEROES: usize = 124;

    pub fn encode(&self, no_zeroes: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + Self::ZEROES);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        if !no_zeroes {
            out.resize(Self::LEN + Self::ZEROES, 0);
        }
        out
    }

    /// Parses the first 10 bytes (the caller reads and drops the zeroes if any).
    pub fn parse(buf: &[u8]) -> Result<Self, NbdError> {
        let mut r = exact(buf, Self::LEN, "export name reply")?;
        Ok(ExportNameReply {
            size: r.u64()?,
            flags: TransmissionFlags(r.u16()?),
        })
    }
}
