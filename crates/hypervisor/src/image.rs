//! Copying the kernel and initrd into guest memory through the memfd's write path.
//!
//! Reading a file straight into the guest mapping takes a page fault for every 4 KiB page of the
//! shared memfd mapping, and each fault allocates and zeroes the page before `read` overwrites
//! it. Writing the same bytes into the memfd with `pwrite` allocates the pages without zeroing
//! them and without touching this process's page tables: on the development host the 8.5 MiB
//! kernel loads in about two thirds of the time (docs/status.md, issue 18). The guest sees the
//! same bytes either way: the mapping and the memfd are one object.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt as _;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemoryBackend, ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::memory::GuestRam;

/// Bytes copied per `read` + `pwrite` pair.
const CHUNK: usize = 512 * 1024;

/// A file whose reads into guest memory go to the memfd behind it (see the module docs); any
/// other read goes to the file as usual.
pub struct IntoRam<'a> {
    file: File,
    ram: &'a GuestRam,
    buf: Vec<u8>,
}

impl<'a> IntoRam<'a> {
    pub fn new(file: File, ram: &'a GuestRam) -> Self {
        IntoRam {
            file,
            ram,
            buf: Vec::new(),
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
    /// at the end of the file.
    fn copy(&mut self, off: u64, len: usize) -> std::io::Result<usize> {
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
        let mut f = tempfile_in_tmp();
        f.write_all(bytes).expect("write");
        f.seek(SeekFrom::Start(0)).expect("rewind");
        f
    }

    fn tempfile_in_tmp() -> File {
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
        let data: Vec<u8> = (0..CHUNK * 2 + 4097).map(|i| (i * 7 % 251) as u8).collect();
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
