//! The console: a bounded ring of the guest's serial output, read by cursor.
//!
//! The ring never grows past its capacity: when the guest writes faster than the owner reads,
//! the oldest bytes fall out and are counted as lost. Cursors are absolute byte offsets into
//! the console stream, so a reader can tell exactly what it missed.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Default ring capacity: 256 KiB per VM.
pub const DEFAULT_CAPACITY: usize = 256 * 1024;

#[derive(Debug)]
struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
    /// Absolute offset of `buf[0]` in the stream.
    start: u64,
    echo: bool,
}

/// A cloneable handle to one VM's console.
#[derive(Clone, Debug)]
pub struct Console {
    ring: Arc<Mutex<Ring>>,
}

/// A read from the ring.
#[derive(Debug, PartialEq, Eq)]
pub struct ConsoleChunk {
    pub data: Vec<u8>,
    pub next: u64,
    pub lost: u64,
}

impl Console {
    /// A console with `cap` bytes of history; `echo` also copies output to stdout (standalone).
    pub fn new(cap: usize, echo: bool) -> Self {
        Console {
            ring: Arc::new(Mutex::new(Ring {
                buf: VecDeque::with_capacity(cap.min(64 * 1024)),
                cap: cap.max(1),
                start: 0,
                echo,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends guest output.
    pub fn push(&self, bytes: &[u8]) {
        let mut r = self.lock();
        if r.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        for b in bytes {
            if r.buf.len() == r.cap {
                r.buf.pop_front();
                r.start += 1;
            }
            r.buf.push_back(*b);
        }
    }

    /// Reads up to `max` bytes from `cursor`.
    pub fn read(&self, cursor: u64, max: usize) -> ConsoleChunk {
        let r = self.lock();
        let end = r.start + r.buf.len() as u64;
        let from = cursor.clamp(r.start, end);
        let lost = from - cursor.min(from);
        let skip = usize::try_from(from - r.start).unwrap_or(usize::MAX);
        let data: Vec<u8> = r.buf.iter().skip(skip).take(max).copied().collect();
        ConsoleChunk {
            next: from + data.len() as u64,
            data,
            lost,
        }
    }

    /// Total bytes ever written and bytes dropped from the ring.
    pub fn totals(&self) -> (u64, u64) {
        let r = self.lock();
        (r.start + r.buf.len() as u64, r.start)
    }

    /// The ring for a live update: the absolute offset of its first byte and its bytes.
    pub fn snapshot(&self) -> (u64, Vec<u8>) {
        let r = self.lock();
        (r.start, r.buf.iter().copied().collect())
    }

    /// Replaces the ring with a snapshot taken by [`Console::snapshot`] in the old process, so
    /// readers' cursors go on where they were (at most the capacity is kept).
    pub fn restore(&self, start: u64, data: &[u8]) {
        let mut r = self.lock();
        let skip = data.len().saturating_sub(r.cap);
        r.buf.clear();
        r.buf.extend(data.iter().skip(skip));
        r.start = start.saturating_add(skip as u64);
    }

    /// Whether `needle` appears in what the ring still holds.
    pub fn contains(&self, needle: &[u8]) -> bool {
        let r = self.lock();
        let (a, b) = r.buf.as_slices();
        let mut all = Vec::with_capacity(a.len() + b.len());
        all.extend_from_slice(a);
        all.extend_from_slice(b);
        !needle.is_empty() && all.windows(needle.len()).any(|w| w == needle)
    }
}

/// The writer vm-superio's UART writes into.
pub struct ConsoleWriter(pub Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_by_cursor_and_counts_losses() {
        let c = Console::new(8, false);
        c.push(b"hello");
        assert_eq!(
            c.read(0, 100),
            ConsoleChunk {
                data: b"hello".to_vec(),
                next: 5,
                lost: 0
            }
        );
        c.push(b" world!");
        // 12 bytes written into an 8-byte ring: bytes 0..4 are gone.
        let chunk = c.read(0, 100);
        assert_eq!(chunk.data, b"o world!".to_vec());
        assert_eq!((chunk.next, chunk.lost), (12, 4));
        assert_eq!(c.read(12, 100).data, Vec::<u8>::new());
        assert_eq!(c.read(999, 100).next, 12);
        assert_eq!(c.read(5, 3).data, b" wo".to_vec());
        assert_eq!(c.totals(), (12, 4));
    }
}
