//! Big-endian cursor over untrusted bytes: every read is bounds-checked.

use crate::NbdError;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], NbdError> {
        if self.buf.len() < n {
            return Err(NbdError::Length {
                what: self.what,
                got: self.buf.len(),
                want: n,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], NbdError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, NbdError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, NbdError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, NbdError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), NbdError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(NbdError::Trailing {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

/// Checks that `buf` is exactly `want` bytes (fixed-size headers).
pub(crate) fn exact<'a>(
    buf: &'a [u8],
    want: usize,
    what: &'static str,
) -> Result<Reader<'a>, NbdError> {
    if buf.len() != want {
        return Err(NbdError::Length {
            what,
            got: buf.len(),
            want,
        });
    }
    Ok(Reader::new(buf, what))
}

/// A length that came off the wire, as `usize` (u32 always fits on the platforms we build for;
/// saturating keeps it panic-free and still caught by any cap).
pub(crate) fn len_usize(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
