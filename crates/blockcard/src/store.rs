//! The backing store: a raw file or a block device, opened once at start-up (O_DIRECT where the
//! file system allows it), then only read/written through its fd; or an NBD export on a storage
//! node (`crate::nbd`), connected at start-up.

use crate::nbd::{NbdClient, NbdClientError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of bounce buffers (and of O_DIRECT I/O).
pub const IO_ALIGN: usize = 4096;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening backing store: {0}")]
    Open(#[source] std::io::Error),
    #[error("backing store is neither a regular file nor a block device")]
    NotFileOrDevice,
    #[error("backing store size: {0}")]
    Size(#[source] std::io::Error),
    #[error("backing store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("offset overflow")]
    Overflow,
    #[error("could not allocate an aligned buffer")]
    Alloc,
    #[error("network volume: {0}")]
    Nbd(#[from] NbdClientError),
}

/// Where a volume's (cipher)text lives.
pub enum Backing {
    /// A local raw file or block device.
    File(FileBacking),
    /// An NBD export on a storage node, over TLS.
    Nbd(Box<NbdClient>),
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::File(b) => b.fmt(f),
            Backing::Nbd(c) => write!(f, "Nbd({} bytes)", c.size_bytes()),
        }
    }
}

impl Backing {
    /// Opens a local file or block device (see [`FileBacking::open`]).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, StoreError> {
        Ok(Backing::File(FileBacking::open(path, read_only)?))
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        match self {
            Backing::File(b) => b.size_bytes(),
            Backing::Nbd(c) => c.size_bytes(),
        }
    }

    /// Whether the store refuses writes (an export the server marked read-only).
    pub fn read_only(&self) -> bool {
        match self {
            Backing::File(_) => false,
            Backing::Nbd(c) => c.flags().read_only(),
        }
    }

    /// Starts the store's own threads, if any (after the sandbox, so they inherit it).
    pub fn start(&self) -> Result<(), StoreError> {
        match self {
            Backing::File(_) => Ok(()),
            Backing::Nbd(c) => Ok(c.start()?),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        match self {
            Backing::File(b) => b.read_at(buf, offset),
            Backing::Nbd(c) => Ok(c.read_at(buf, offset)?),
        }
    }

    /// Writes all of `buf` at `offset`; for NBD, returns after the server's reply.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        match self {
            Backing::File(b) => b.write_at(buf, offset),
            Backing::Nbd(c) => Ok(c.write_at(buf, offset)?),
        }
    }

    /// Makes completed writes durable (fdatasync / NBD_CMD_FLUSH).
    pub fn flush(&self) -> Result<(), StoreError> {
        match self {
            Backing::File(b) => b.flush(),
            Backing::Nbd(c) => Ok(c.flush()?),
        }
    }

    /// Releases a byte range (hole punch, BLKDISCARD, NBD_CMD_TRIM if the export takes it).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match self {
            Backing::File(b) => b.discard(offset, len),
            Backing::Nbd(c) => Ok(c.trim(offset, len)?),
        }
    }

    /// Whether O_DIRECT is in effect (always false for NBD).
    pub fn is_direct(&self) -> bool {
        match self {
            Backing::File(b) => b.is_direct(),
            Backing::Nbd(_) => false,
        }
    }
}

/// An opened local file or block device.
#[derive(Debug)]
pub struct FileBacking {
    file: File,
    size_bytes: u64,
    direct: bool,
    block_device: bool,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;

impl FileBacking {
    /// Opens `path` (no symlink following), O_DIRECT if possible.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, StoreError> {
        let open = |direct: bool| {
            let mut flags = libc::O_CLOEXEC | libc::O_NOFOLLOW;
            if direct {
                flags |= libc::O_DIRECT;
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (open(false).map_err(StoreError::Open)?, false)
            }
            Err(e) => return Err(StoreError::Open(e)),
        };
        let meta = file.metadata().map_err(StoreError::Size)?;
        let ft = meta.file_type();
        let (size_bytes, block_device) = if ft.is_file() {
            (meta.len(), false)
        } else if ft.is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if rc != 0 {
                return Err(StoreError::Size(std::io::Error::last_os_error()));
            }
            (size, true)
        } else {
            return Err(StoreError::NotFileOrDevice);
        };
        Ok(Self {
            file,
            size_bytes,
            direct,
            block_device,
        })
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Whether O_DIRECT is in effect.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = buf.get_mut(done..).ok_or(StoreError::Overflow)?;
            let off = offset
                .checked_add(u64::try_from(done).map_err(|_| StoreError::Overflow)?)
                .ok_or(StoreError::Overflow)?;
            let off = libc::off_t::try_from(off).map_err(|_| StoreError::Overflow)?;
            // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes; the fd is open.
            let n = unsafe {
                libc::pread64(
                    self.file.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    off,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(StoreError::Io(e));
            }
            if n == 0 {
                // Past the end of a file that shrank: the rest reads as zeros.
                rest.fill(0);
                break;
            }
            done += usize::try_from(n).map_err(|_| StoreError::Overflow)?;
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = buf.get(done..).ok_or(StoreError::Overflow)?;
            let off = offset
                .checked_add(u64::try_from(done).map_err(|_| StoreError::Overflow)?)
                .ok_or(StoreError::Overflow)?;
            let off = libc::off_t::try_from(off).map_err(|_| StoreError::Overflow)?;
            // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes; the fd is open.
            let n = unsafe {
                libc::pwrite64(self.file.as_raw_fd(), rest.as_ptr().cast(), rest.len(), off)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(StoreError::Io(e));
            }
            if n == 0 {
                return Err(StoreError::Io(std::io::Error::from(
                    std::io::ErrorKind::WriteZero,
                )));
            }
            done += usize::try_from(n).map_err(|_| StoreError::Overflow)?;
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        // SAFETY: fdatasync on an open fd has no memory-safety preconditions.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
            return Err(StoreError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Releases a byte range (punch a hole in a file, BLKDISCARD on a device).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if self.block_device {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which points to
            // `range`.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
            if rc != 0 {
                return Err(StoreError::Io(std::io::Error::last_os_error()));
            }
            return Ok(());
        }
        let off = libc::off64_t::try_from(offset).map_err(|_| StoreError::Overflow)?;
        let n = libc::off64_t::try_from(len).map_err(|_| StoreError::Overflow)?;
        // SAFETY: fallocate on an open fd has no memory-safety preconditions.
        let rc = unsafe {
            libc::fallocate64(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc != 0 {
            return Err(StoreError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// A heap buffer aligned to [`IO_ALIGN`], for O_DIRECT and in-place encryption.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is exclusively owned; access goes through &self / &mut self.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (`len` > 0, multiple of IO_ALIGN).
    pub fn new(len: usize) -> Result<Self, StoreError> {
        if len == 0 || !len.is_multiple_of(IO_ALIGN) {
            return Err(StoreError::Alloc);
        }
        let layout =
            std::alloc::Layout::from_size_align(len, IO_ALIGN).map_err(|_| StoreError::Alloc)?;
        // SAFETY: layout has non-zero size (checked above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or(StoreError::Alloc)?;
        Ok(Self { ptr, len })
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (constructor refuses empty buffers).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // Bounce buffers held plaintext; clear them before returning them to the allocator.
        zeroize::Zeroize::zeroize(&mut **self);
        if let Ok(layout) = std::alloc::Layout::from_size_align(self.len, IO_ALIGN) {
            // SAFETY: allocated in `new` with this exact layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}
