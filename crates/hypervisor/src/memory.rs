//! Guest memory: one anonymous memfd per VM, never a file on disk.
//!
//! The memfd is mapped shared (so a vhost-user backend can map the same pages when the block
//! card is attached) and marked `MADV_DONTDUMP` (guest memory never lands in a core dump of the
//! hypervisor) and `MADV_UNMERGEABLE` (KSM never merges a page of this VM with any other VM's).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::Error;

/// Guest physical memory of one VM and the memfd behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub memfd: File,
    /// (guest address, size, offset in memfd) of each region.
    pub regions: Vec<(GuestAddress, usize, u64)>,
}

/// Smallest guest the hypervisor will build; below this a Linux guest cannot boot.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest this build supports.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

fn check_size(mib: u64) -> Result<(), Error> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(Error::MemorySize {
            mib,
            min: MIN_MEMORY_MIB,
            max: MAX_MEMORY_MIB,
        });
    }
    Ok(())
}

impl GuestRam {
    /// Creates `mib` MiB of guest memory, split around the 32-bit MMIO gap.
    pub fn new(mib: u64) -> Result<Self, Error> {
        check_size(mib)?;
        let total = mib << 20;
        let name = c"bulkhead-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other inputs.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(Error::Memory(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(total).map_err(Error::Memory)?;
        // The size is fixed for the VM's life: nobody can shrink the file under a mapping.
        // SAFETY: F_ADD_SEALS on our own memfd with a plain integer argument.
        let rc = unsafe {
            libc::fcntl(
                memfd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(Error::Memory(std::io::Error::last_os_error()));
        }
        Self::map(mib, memfd)
    }

    /// Maps guest memory handed over by another hypervisor process (live update): the same
    /// memfd, `mib` MiB, sealed against growing and shrinking (checked), never copied.
    pub fn from_memfd(mib: u64, memfd: File) -> Result<Self, Error> {
        check_size(mib)?;
        let len = memfd.metadata().map_err(Error::Memory)?.len();
        // SAFETY: F_GET_SEALS on an fd we own, no pointer argument.
        let seals = unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_GET_SEALS) };
        let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if len != mib << 20 || seals < 0 || seals & need != need {
            return Err(Error::MemoryLayout);
        }
        Self::map(mib, memfd)
    }

    /// Maps `memfd` (`mib` MiB, size already set) as the guest's RAM.
    fn map(mib: u64, memfd: File) -> Result<Self, Error> {
        let total = mib << 20;
        let low = total.min(MMIO_GAP_START);
        let mut layout = vec![(GuestAddress(0), low, 0u64)];
        if total > MMIO_GAP_START {
            layout.push((
                GuestAddress(MMIO_GAP_END),
                total - MMIO_GAP_START,
                MMIO_GAP_START,
            ));
        }
        let mut regions = Vec::new();
        let mut out = Vec::new();
        for (gpa, size, off) in layout {
            let size = usize::try_from(size).map_err(|_| Error::MemorySize {
                mib,
                min: MIN_MEMORY_MIB,
                max: MAX_MEMORY_MIB,
            })?;
            let dup = memfd.try_clone().map_err(Error::Memory)?;
            let region = MmapRegion::from_file(FileOffset::new(dup, off), size)
                .map_err(|e| Error::Memory(std::io::Error::other(e.to_string())))?;
            // SAFETY: `region` maps exactly `size` bytes at `as_ptr()` for its lifetime; madvise
            // only changes dump/merge policy of that range, never its contents.
            unsafe {
                let p = region.as_ptr().cast::<libc::c_void>();
                if libc::madvise(p, size, libc::MADV_DONTDUMP) != 0 {
                    return Err(Error::Memory(std::io::Error::last_os_error()));
                }
                // MADV_UNMERGEABLE fails with EINVAL on kernels built without KSM; then no
                // page can be merged anyway.
                if libc::madvise(p, size, libc::MADV_UNMERGEABLE) != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        return Err(Error::Memory(e));
                    }
                }
            }
            out.push(GuestRegionMmap::new(region, gpa).ok_or(Error::MemoryLayout)?);
            regions.push((gpa, size, off));
        }
        let mem = GuestMemoryMmap::from_regions(out).map_err(|_| Error::MemoryLayout)?;
        Ok(GuestRam {
            mem,
            memfd,
            regions,
        })
    }

    /// End of RAM below the MMIO gap.
    pub fn low_end(&self) -> u64 {
        self.regions
            .first()
            .map(|(g, s, _)| g.0 + *s as u64)
            .unwrap_or(0)
    }
}
