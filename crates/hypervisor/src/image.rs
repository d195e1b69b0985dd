//! Copying the kernel and initrd into guest memory through the memfd's write path.
//!
//! Reading a file straight into the guest mapping takes a page fault for every 4 KiB page of the
//! shared memfd mapping, and each fault allocates and zeroes the page before `read` overwrites
//! it. Writing the same bytes into the memfd allocates the pages without zeroing them and
//! without touching this process's page tables: on the development host the 8.5 MiB kernel
//! loads in about two thirds of the time (docs/status.md, issue 18). The bytes go from the
//! file's page cache into the memfd by `splice` through a pipe, one copy, where `read` +
//! `pwrite` made two (through a buffer of ours); a file that cannot be spliced takes the
//! `read` + `pwrite` path. The guest sees the same bytes either way: the mapping and the memfd
//! are one object.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::FileExt as _;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemoryBackend, ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::memory::GuestRam;

/// Bytes copied per `read` + `pwrite` pair.
const CHUNK: usize = 512 * 1024;

/// The pipe size asked for when splicing (`F_SETPIPE_SZ`; the default unprivileged maximum).
/// Refused, the pipe keeps its default 64 KiB and only the number of calls grows.
const PIPE_BYTES: usize = 1024 * 1024;

/// The two ends of a pipe that carries file pages into the memfd.
struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes moved per `splice` into the pipe.
    capacity: usize,
}

impl SplicePipe {
    fn new() -> std::io::Result<Self> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a writable array of two ints, what pipe2 fills on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = libc::c_int::try_from(PIPE_BYTES).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ on a pipe we own take and return an int.
        let capacity = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let capacity = usize::try_from(capacity).unwrap_or(0).max(4096);
        Ok(SplicePipe {
            read,
            write,
            capacity,
        })
    }
}

/// `splice` that retries on EINTR; `Ok(0)` is the end of the input.
fn splice(
    from: i32,
    from_off: Option<&mut i64>,
    to: i32,
    to_off: Option<&mut i64>,
    len: usize,
) -> std::io::Result<usize> {
    let from_off = from_off.map_or(std::ptr::null_mut(), std::ptr::from_mut);
    let to_off = to_off.map_or(std::ptr::null_mut(), std::ptr::from_mut);
    loop {
        // SAFETY: both fds are open for the call's duration (borrowed from owners held by the
        // caller); each offset is null or points at an i64 the caller lent us mutably.
        let n = unsafe { libc::splice(from, from_off, to, to_off, len, libc::SPLICE_F_MOVE) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// A file whose reads into guest memory go to the memfd behind it (see the module docs); any
/// other read goes to the file as usual.
pub struct IntoRam<'a> {
    file: File,
    ram: &'a GuestRam,
    buf: Vec<u8>,
    /// Made at the first copy; `None` after the file (or the kernel) refused to splice, and
    /// every copy after that takes `read` + `pwrite`.
    pipe: Option<SplicePipe>,
    splice_refused: bool,
}

impl<'a> IntoRam<'a> {
    pub fn new(file: File, ram: &'a GuestRam) -> Self {
        IntoRam {
            file,
            ram,
            buf: Vec::new(),
            pipe: None,
            splice_refused: false,
        }
    }

    /// The memfd offset of host address `host` when `len` bytes from it lie in one region.
    fn memfd_offset(&self, host: usize, len: usize) -> Option<u64> {
        self.ram.regions.iter().find_map(|(gpa, size, off)| {
            let base = self.ram.mem.get_host_address(*gpa).ok()? as usize;
            let rel = host.checked_sub(base)?;
            (rel.checked_add(len)? <= *size).then(|| off + rel as u64)
        })
    }

    /// Copies up to `len` bytes from the file's position into the memfd at `off`; fewer only
    /// at the end of the file. Splices when it can, else reads and writes.
    fn copy(&mut self, off: u64, len: usize) -> std::io::Result<usize> {
        if !self.splice_refused && self.pipe.is_none() {
            // No pipe (e.g. out of descriptors): copy as before splicing existed.
            match SplicePipe::new() {
                Ok(pipe) => self.pipe = Some(pipe),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe to splice through; copying with read + pwrite");
                    self.splice_refused = true;
                }
            }
        }
        if !self.splice_refused {
            match self.splice_copy(off, len) {
                Ok(n) => return Ok(n),
                // Nothing was moved: the file (or this kernel) does not splice.
                Err((0, e)) if splice_unsupported(&e) => {
                    tracing::debug!(error = %e, "splice refused; copying with read + pwrite");
                    self.splice_refused = true;
                    self.pipe = None;
                }
                Err((_, e)) => return Err(e),
            }
        }
        self.read_write_copy(off, len)
    }

    /// [`IntoRam::copy`] by `splice`: file → pipe → memfd at `off`. On error, also how many
    /// bytes it had taken from the file (0: the file position is where it was).
    fn splice_copy(&mut self, off: u64, len: usize) -> Result<usize, (usize, std::io::Error)> {
        if self.pipe.is_none() {
            self.pipe = Some(SplicePipe::new().map_err(|e| (0, e))?);
        }
        let Some(pipe) = self.pipe.as_ref() else {
            return Ok(0);
        };
        let too_far = || (0, std::io::Error::from(std::io::ErrorKind::InvalidInput));
        let mut to_off = i64::try_from(off).map_err(|_| too_far())?;
        let (file, memfd) = (self.file.as_raw_fd(), self.ram.memfd.as_raw_fd());
        let mut done = 0;
        while done < len {
            let want = (len - done).min(pipe.capacity);
            let got =
                splice(file, None, pipe.write.as_raw_fd(), None, want).map_err(|e| (done, e))?;
            if got == 0 {
                break;
            }
            let mut drained = 0;
            while drained < got {
                let n = splice(
                    pipe.read.as_raw_fd(),
                    None,
                    memfd,
                    Some(&mut to_off),
                    got - drained,
                )
                .map_err(|e| (done + got, e))?;
                if n == 0 {
                    // The memfd took nothing: the pipe still holds bytes, so this copy fails.
                    return Err((done + got, std::io::ErrorKind::WriteZero.into()));
                }
                drained += n;
            }
            done += got;
        }
        Ok(done)
    }

    /// [`IntoRam::copy`] through a buffer: `read` from the file, `pwrite` into the memfd.
    fn read_write_copy(&mut self, off: u64, len: usize) -> std::io::Result<usize> {
        if self.buf.len() < CHUNK {
            self.buf.resize(CHUNK, 0);
        }
        let mut done = 0;
        while done < len {
            let want = (len - done).min(CHUNK);
            let mut got = 0;
            while got < want {
                match self.file.read(&mut self.buf[got..want]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.ram
                .memfd
                .write_all_at(&self.buf[..got], off + done as u64)?;
            done += got;
            if got < want {
                break;
            }
        }
        Ok(done)
    }
}

/// Whether `e` from a first `splice` means "this pair of files cannot be spliced".
fn splice_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF | libc::EPERM)
    )
}

impl Read for IntoRam<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for IntoRam<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for IntoRam<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let host = buf.ptr_guard_mut().as_ptr() as usize;
        // This writes behind vm-memory's back, so `buf`'s dirty bitmap is not marked. Harmless:
        // GuestRam is built with the no-op bitmap `()` (dirty pages are tracked by KVM's log,
        // not vm-memory's); a real bitmap would need `buf.bitmap().mark_dirty(0, n)` here.
        match self.memfd_offset(host, buf.len()) {
            Some(off) => self
                .copy(off, buf.len())
                .map_err(VolatileMemoryError::IOError),
            None => self.file.read_volatile(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;

    fn temp_file(bytes: &[u8]) -> File {
        let mut f = memfd_file();
        f.write_all(bytes).expect("write");
        f.seek(SeekFrom::Start(0)).expect("rewind");
        f
    }

    fn memfd_file() -> File {
        let name = c"image-test";
        // SAFETY: `name` is NUL-terminated; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    #[test]
    fn bytes_land_in_guest_memory_through_the_memfd() {
        let ram = GuestRam::new(32).expect("guest ram");
        // More than one chunk, not a multiple of a page, a pattern that shows misplacement.
        let data: Vec<u8> = (0..CHUNK * 2 + 4097)
            .map(|i| u8::try_from(i * 7 % 251).expect("below 251"))
            .collect();
        let mut src = IntoRam::new(temp_file(&data), &ram);
        let at = GuestAddress(0x10_0123);
        ram.mem
            .read_exact_volatile_from(at, &mut src, data.len())
            .expect("guest memory");
        let mut back = vec![0u8; data.len()];
        ram.mem.read_slice(&mut back, at).expect("guest memory");
        assert_eq!(back, data);
        // Nothing written around it.
        let mut edge = [0xffu8; 2];
        ram.mem
            .read_slice(&mut edge[..1], GuestAddress(0x10_0122))
            .expect("guest memory");
        ram.mem
            .read_slice(&mut edge[1..], at.unchecked_add(data.len() as u64))
            .expect("guest memory");
        assert_eq!(edge, [0, 0]);
    }

    fn host_of(ram: &GuestRam, gpa: u64) -> usize {
        ram.mem
            .get_host_address(GuestAddress(gpa))
            .expect("guest address") as usize
    }

    #[test]
    fn memfd_offsets_follow_the_regions_around_the_mmio_gap() {
        use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
        // 4 GiB: 3 GiB below the gap, 1 GiB above it at memfd offset 3 GiB. The memfd is sparse
        // and nothing is touched, so this costs address space only.
        let ram = GuestRam::new(4096).expect("guest ram");
        assert_eq!(ram.regions.len(), 2);
        let src = IntoRam::new(memfd_file(), &ram);
        let off = |gpa, len| src.memfd_offset(host_of(&ram, gpa), len);
        assert_eq!(off(0, 1), Some(0));
        assert_eq!(off(0x10_0123, 4096), Some(0x10_0123));
        // Up to the last byte below the gap, and not one byte over it.
        assert_eq!(off(MMIO_GAP_START - 8, 8), Some(MMIO_GAP_START - 8));
        assert_eq!(off(MMIO_GAP_START - 8, 9), None);
        // Above the gap: guest address 4 GiB is memfd offset 3 GiB.
        assert_eq!(off(MMIO_GAP_END, 1), Some(MMIO_GAP_START));
        assert_eq!(
            off(MMIO_GAP_END + 0x5000, 10),
            Some(MMIO_GAP_START + 0x5000)
        );
        assert_eq!(off(MMIO_GAP_END + (1 << 30) - 1, 1), Some((4 << 30) - 1));
        assert_eq!(off(MMIO_GAP_END + (1 << 30) - 1, 2), None);
        // Memory that is not guest RAM is never written through the memfd.
        let elsewhere = [0u8; 16];
        assert_eq!(src.memfd_offset(elsewhere.as_ptr() as usize, 16), None);
    }

    #[test]
    fn a_load_above_the_mmio_gap_lands_at_its_memfd_offset() {
        use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
        let ram = GuestRam::new(4096).expect("guest ram");
        let data: Vec<u8> = (0..CHUNK + 333)
            .map(|i| u8::try_from(i * 13 % 253).expect("below 253"))
            .collect();
        let mut src = IntoRam::new(temp_file(&data), &ram);
        ram.mem
            .read_exact_volatile_from(GuestAddress(MMIO_GAP_END), &mut src, data.len())
            .expect("guest memory");
        let mut back = vec![0u8; data.len()];
        ram.memfd
            .read_exact_at(&mut back, MMIO_GAP_START)
            .expect("memfd");
        assert_eq!(back, data);
        // Nothing below it in the memfd (the last byte of low memory).
        let mut below = [0xffu8];
        ram.memfd
            .read_exact_at(&mut below, MMIO_GAP_START - 1)
            .expect("memfd");
        assert_eq!(below, [0]);
    }

    #[test]
    fn the_read_and_pwrite_path_lands_the_same_bytes() {
        let ram = GuestRam::new(32).expect("guest ram");
        let data: Vec<u8> = (0..CHUNK + 4097)
            .map(|i| u8::try_from(i * 11 % 241).expect("below 241"))
            .collect();
        let mut src = IntoRam::new(temp_file(&data), &ram);
        // As after a file that refused to splice.
        src.splice_refused = true;
        let at = GuestAddress(0x30_0456);
        ram.mem
            .read_exact_volatile_from(at, &mut src, data.len())
            .expect("guest memory");
        assert!(src.pipe.is_none());
        let mut back = vec![0u8; data.len()];
        ram.mem.read_slice(&mut back, at).expect("guest memory");
        assert_eq!(back, data);
    }

    #[test]
    fn a_spliceable_file_goes_through_the_pipe() {
        let ram = GuestRam::new(32).expect("guest ram");
        let mut src = IntoRam::new(temp_file(&[9u8; 5000]), &ram);
        let at = GuestAddress(0x20_0000);
        ram.mem
            .read_exact_volatile_from(at, &mut src, 5000)
            .expect("guest memory");
        assert!(
            !src.splice_refused && src.pipe.is_some(),
            "a memfd source splices"
        );
        let mut back = vec![0u8; 5000];
        ram.mem.read_slice(&mut back, at).expect("guest memory");
        assert_eq!(back, vec![9u8; 5000]);
        // What a refusal looks like: a bad fd is one (EBADF), an I/O error is not.
        let e = splice(-1, None, src.ram.memfd.as_raw_fd(), None, 1).expect_err("bad fd");
        assert!(splice_unsupported(&e), "{e:?}");
        assert!(!splice_unsupported(&std::io::Error::from_raw_os_error(
            libc::EIO
        )));
    }

    #[test]
    fn a_short_file_is_a_short_read_not_garbage() {
        let ram = GuestRam::new(32).expect("guest ram");
        let mut src = IntoRam::new(temp_file(&[1, 2, 3]), &ram);
        let err = ram
            .mem
            .read_exact_volatile_from(GuestAddress(0x20_0000), &mut src, 10)
            .expect_err("a short file fails");
        assert!(
            matches!(
                err,
                vm_memory::GuestMemoryError::PartialBuffer { completed: 3, .. }
            ),
            "{err:?}"
        );
    }
}
