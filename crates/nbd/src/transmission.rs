//! The transmission phase: 28-byte requests and 16-byte simple replies.

use crate::consts::*;
use crate::wire::{exact, len_usize};
use crate::NbdError;

/// An export's transmission flags (16 bits), from `NBD_INFO_EXPORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    pub fn contains(self, bit: u16) -> bool {
        self.0 & bit == bit
    }
    pub fn read_only(self) -> bool {
        self.contains(FLAG_HAS_FLAGS | FLAG_READ_ONLY)
    }
    pub fn flush(self) -> bool {
        self.contains(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)
    }
    pub fn trim(self) -> bool {
        self.contains(FLAG_HAS_FLAGS | FLAG_SEND_TRIM)
    }
    pub fn write_zeroes(self) -> bool {
        self.contains(FLAG_HAS_FLAGS | FLAG_SEND_WRITE_ZEROES)
    }
    pub fn fua(self) -> bool {
        self.contains(FLAG_HAS_FLAGS | FLAG_SEND_FUA)
    }
}

/// A request's command flags (16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    pub fn contains(self, bit: u16) -> bool {
        self.0 & bit == bit
    }
}

/// The request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    /// A type this crate does not speak; a server answers `EINVAL`.
    Other(u16),
}

impl Command {
    pub fn from_code(c: u16) -> Self {
        match c {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disconnect,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            o => Command::Other(o),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disconnect => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::Other(o) => o,
        }
    }
}

/// The opaque 64-bit value a client puts in a request and the server echoes in its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

/// An error value of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
    /// A value the spec does not define (a client treats it as `EINVAL`).
    Other(u32),
}

impl Errno {
    pub fn from_code(c: u32) -> Option<Self> {
        Some(match c {
            0 => return None,
            EPERM => Errno::Perm,
            EIO => Errno::Io,
            ENOMEM => Errno::NoMem,
            EINVAL => Errno::Inval,
            ENOSPC => Errno::NoSpc,
            EOVERFLOW => Errno::Overflow,
            ENOTSUP => Errno::NotSup,
            ESHUTDOWN => Errno::Shutdown,
            o => Errno::Other(o),
        })
    }

    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => EPERM,
            Errno::Io => EIO,
            Errno::NoMem => ENOMEM,
            Errno::Inval => EINVAL,
            Errno::NoSpc => ENOSPC,
            Errno::Overflow => EOVERFLOW,
            Errno::NotSup => ENOTSUP,
            Errno::Shutdown => ESHUTDOWN,
            Errno::Other(o) => o,
        }
    }
}

/// A transmission request header (28 bytes); a WRITE's `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: CommandFlags,
    pub command: Command,
    pub cookie: Cookie,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const LEN: usize = 28;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.0.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.0.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Parses the 28-byte header. The payload length is not trusted here: call
    /// [`Request::validate`] before buffering a WRITE's data.
    pub fn parse(buf: &[u8]) -> Result<Self, NbdError> {
        let mut r = exact(buf, Self::LEN, "request")?;
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadMagic {
                what: "request",
                got: magic.into(),
            });
        }
        Ok(Request {
            flags: CommandFlags(r.u16()?),
            command: Command::from_code(r.u16()?),
            cookie: Cookie(r.u64()?),
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    /// How many payload bytes follow this header on the wire (a WRITE's length, else 0).
    pub fn payload_len(&self) -> usize {
        match self.command {
            Command::Write => len_usize(self.length),
            _ => 0,
        }
    }

    /// A server's checks before acting: known command and flags, range inside the export,
    /// READ/WRITE no longer than `max_payload`. The `Err` is the error to reply with; for a
    /// WRITE whose length exceeds `max_payload` the server must not read the payload and should
    /// drop the connection instead.
    pub fn validate(&self, export_size: u64, max_payload: u32) -> Result<(), Errno> {
        if self.flags.0 & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 {
            return Err(Errno::Inval);
        }
        match self.command {
            Command::Read | Command::Write if self.length > max_payload => Err(Errno::Overflow),
            Command::Read
            | Command::Write
            | Command::Trim
            | Command::Cache
            | Command::WriteZeroes => {
                let end = self
                    .offset
                    .checked_add(u64::from(self.length))
                    .ok_or(Errno::Inval)?;
                if end > export_size {
                    Err(match self.command {
                        Command::Read | Command::Cache => Errno::Inval,
                        _ => Errno::NoSpc,
                    })
                } else {
                    Ok(())
                }
            }
            Command::Flush | Command::Disconnect => Ok(()),
            Command::Other(_) => Err(Errno::Inval),
        }
    }
}

/// A simple reply (16 bytes); a successful READ's `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: Option<Errno>,
    pub cookie: Cookie,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.map_or(0, Errno::code).to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.0.to_be_bytes());
        out
    }

    /// Parses the 16-byte header. A structured-reply magic is its own error (never negotiated).
    pub fn parse(buf: &[u8]) -> Result<Self, NbdError> {
        let mut r = exact(buf, Self::LEN, "simple reply")?;
        let magic = r.u32()?;
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(NbdError::StructuredReply);
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::BadMagic {
                what: "simple reply",
                got: magic.into(),
            });
        }
        Ok(SimpleReply {
            error: Errno::from_code(r.u32()?),
            cookie: Cookie(r.u64()?),
        })
    }
}
