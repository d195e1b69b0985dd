//! The transmission-phase reply stream: decrypted bytes from the storage node in, completed
//! replies out. Pure (no I/O), so it is fuzzed on its own (`fuzz/fuzz_targets/nbd_replies.rs`).

use bulkhead_nbd::{Cookie, Errno, NbdError, SimpleReply};

/// Most bytes buffered: one reply header and the largest read payload, plus one socket read.
pub const RX_CAP: usize =
    SimpleReply::LEN + bulkhead_nbd::consts::MAX_PAYLOAD as usize + (64 << 10);

/// One complete reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub cookie: Cookie,
    /// A read's payload (exactly its length), empty for other commands; or the server's error.
    pub result: Result<Vec<u8>, Errno>,
}

/// Buffers the stream and cuts it into replies.
#[derive(Debug, Default)]
pub struct ReplyStream {
    rx: Vec<u8>,
}

impl ReplyStream {
    /// Appends bytes read from the connection. Refuses to grow past [`RX_CAP`] (a server that
    /// sends more than any reply in flight can need is broken).
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        let total = self.rx.len().saturating_add(bytes.len());
        if total > RX_CAP {
            return Err(NbdError::TooLong {
                what: "buffered replies",
                got: u64::try_from(total).unwrap_or(u64::MAX),
                cap: RX_CAP as u64,
            });
        }
        self.rx.extend_from_slice(bytes);
        Ok(())
    }

    /// Forgets everything buffered (the connection was dropped).
    pub fn clear(&mut self) {
        self.rx.clear();
    }

    /// The next complete reply, `Ok(None)` if more bytes are needed. `inflight(cookie)` says
    /// whether the cookie is in flight and, if so, how many payload bytes a successful reply
    /// carries (a read's length, 0 otherwise). A bad magic, a structured reply or a cookie not
    /// in flight is an error: the stream cannot be read any further.
    pub fn next(
        &mut self,
        inflight: impl Fn(Cookie) -> Option<usize>,
    ) -> Result<Option<Reply>, NbdError> {
        let Some(head) = self.rx.get(..SimpleReply::LEN) else {
            return Ok(None);
        };
        let reply = SimpleReply::parse(head)?;
        let Some(payload) = inflight(reply.cookie) else {
            return Err(NbdError::BadMagic {
                what: "reply cookie not in flight",
                got: reply.cookie.0,
            });
        };
        if let Some(errno) = reply.error {
            self.rx.drain(..SimpleReply::LEN);
            return Ok(Some(Reply {
                cookie: reply.cookie,
                result: Err(errno),
            }));
        }
        let need = SimpleReply::LEN.saturating_add(payload);
        let Some(data) = self.rx.get(SimpleReply::LEN..need) else {
            return Ok(None);
        };
        let data = data.to_vec();
        self.rx.drain(..need);
        Ok(Some(Reply {
            cookie: reply.cookie,
            result: Ok(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cookie: u64, error: Option<Errno>) -> Vec<u8> {
        SimpleReply {
            error,
            cookie: Cookie(cookie),
        }
        .encode()
        .to_vec()
    }

    fn lens(c: Cookie) -> Option<usize> {
        match c.0 {
            1 => Some(8),
            2 => Some(0),
            _ => None,
        }
    }

    #[test]
    fn read_payload_waits_for_every_byte_then_completes() {
        let mut s = ReplyStream::default();
        let mut bytes = header(1, None);
        bytes.extend_from_slice(b"abcdefgh");
        bytes.extend_from_slice(&header(2, None));
        for b in bytes.chunks(5).take(4) {
            s.push(b).expect("push");
        }
        // 20 of 24 bytes of the first reply so far.
        assert_eq!(s.next(lens), Ok(None));
        for b in bytes.chunks(5).skip(4) {
            s.push(b).expect("push");
        }
        assert_eq!(
            s.next(lens),
            Ok(Some(Reply {
                cookie: Cookie(1),
                result: Ok(b"abcdefgh".to_vec())
            }))
        );
        assert_eq!(
            s.next(lens),
            Ok(Some(Reply {
                cookie: Cookie(2),
                result: Ok(Vec::new())
            }))
        );
        assert_eq!(s.next(lens), Ok(None));
    }

    #[test]
    fn error_reply_has_no_payload() {
        let mut s = ReplyStream::default();
        let mut bytes = header(1, Some(Errno::Io));
        bytes.extend_from_slice(&header(2, None));
        s.push(&bytes).expect("push");
        assert_eq!(
            s.next(lens).map(|r| r.map(|r| r.result)),
            Ok(Some(Err(Errno::Io)))
        );
        assert_eq!(
            s.next(lens).map(|r| r.map(|r| r.cookie)),
            Ok(Some(Cookie(2)))
        );
    }

    #[test]
    fn unknown_cookie_bad_magic_structured_and_flooding_are_errors() {
        let mut s = ReplyStream::default();
        s.push(&header(9, None)).expect("push");
        assert!(matches!(s.next(lens), Err(NbdError::BadMagic { .. })));
        let mut s = ReplyStream::default();
        s.push(&[0xAB; 16]).expect("push");
        assert!(matches!(s.next(lens), Err(NbdError::BadMagic { .. })));
        let mut s = ReplyStream::default();
        let mut st = bulkhead_nbd::consts::STRUCTURED_REPLY_MAGIC
            .to_be_bytes()
            .to_vec();
        st.extend_from_slice(&[0; 12]);
        s.push(&st).expect("push");
        assert_eq!(s.next(lens), Err(NbdError::StructuredReply));
        let mut s = ReplyStream::default();
        assert!(s.push(&vec![0; RX_CAP + 1]).is_err());
    }
}
