//! Loading a Linux kernel, initrd and command line, and writing the boot protocol structures.
//!
//! Two paths: an ELF `vmlinux` with a PVH entry note (the fast path: the guest starts in 32-bit
//! protected mode at its PVH entry with `hvm_start_info` in %ebx) and a bzImage (64-bit boot
//! protocol: long mode, identity-mapped page tables, `boot_params` in %rsi).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::image::IntoRam;
use crate::layout::*;
use crate::memory::GuestRam;
use crate::Error;

/// How the vCPU 0 must be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start info.
    Pvh { entry: GuestAddress },
    /// Linux 64-bit boot protocol: long mode, `%rsi` = zero page.
    Linux64 { entry: GuestAddress },
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// What was loaded where.
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    /// First guest address past the kernel's image (its bss included, for an ELF).
    pub kernel_end: u64,
}

/// Opens `path` for reading if it is a regular file. Anything else is refused with
/// `InvalidInput`: a pipe or a /proc file has no size to place it by (it would load as empty),
/// and opening a FIFO without `O_NONBLOCK` waits for a writer forever. `O_NONBLOCK` changes
/// nothing for a regular file.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Loads `kernel` into guest memory, trying PVH ELF first and bzImage second.
pub fn load_kernel(ram: &GuestRam, kernel: &Path) -> Result<LoadedKernel, Error> {
    let f = open_regular(kernel).map_err(|e| Error::KernelFile(kernel.to_owned(), e))?;
    let mut f = IntoRam::new(f, ram);
    match Elf::load(
        &ram.mem,
        None,
        &mut f,
        Some(GuestAddress(HIGH_MEMORY_START)),
    ) {
        Ok(res) => match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                entry: EntryPoint::Pvh { entry },
                setup_header: None,
                kernel_end: res.kernel_end,
            }),
            // A 64-bit ELF without a PVH note: enter at e_entry in long mode.
            _ => Ok(LoadedKernel {
                entry: EntryPoint::Linux64 {
                    entry: res.kernel_load,
                },
                setup_header: None,
                kernel_end: res.kernel_end,
            }),
        },
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            let res = BzImage::load(
                &ram.mem,
                None,
                &mut f,
                Some(GuestAddress(HIGH_MEMORY_START)),
            )
            .map_err(|e| Error::NotAKernel(e.to_string()))?;
            let entry = res
                .kernel_load
                .checked_add(0x200)
                .ok_or(Error::NotAKernel("entry overflows".into()))?;
            Ok(LoadedKernel {
                entry: EntryPoint::Linux64 { entry },
                setup_header: res.setup_header,
                kernel_end: res.kernel_end,
            })
        }
        Err(e) => Err(Error::NotAKernel(e.to_string())),
    }
}

/// Copies the initrd to the top of low RAM (page-aligned). Returns (address, size).
///
/// It is written while the kernel loads on another thread: whether the two overlap is known
/// only once both are loaded, see [`check_initrd_clear_of_kernel`].
pub fn load_initrd(ram: &GuestRam, initrd: &Path) -> Result<(GuestAddress, usize), Error> {
    let file_err = |e| Error::InitrdFile(initrd.to_owned(), e);
    let f = open_regular(initrd).map_err(file_err)?;
    let size = f.metadata().map_err(file_err)?.len();
    let size = usize::try_from(size).map_err(|_| Error::InitrdTooLarge { size: usize::MAX })?;
    if size == 0 {
        // /proc files are regular files that report 0 bytes whatever they hold.
        return Err(file_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty (or a file that does not report its size)",
        )));
    }
    let top = ram.low_end();
    let addr = top
        .checked_sub(size as u64)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= HIGH_MEMORY_START + (16 << 20))
        .ok_or(Error::InitrdTooLarge { size })?;
    // Straight from the file into guest memory (through the memfd, crate::image): no copy in
    // between. A file that shrinks under us is an error, never a partly loaded initrd.
    ram.mem
        .read_exact_volatile_from(GuestAddress(addr), &mut IntoRam::new(f, ram), size)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => file_err(io),
            vm_memory::GuestMemoryError::PartialBuffer { .. } => {
                file_err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
            }
            _ => Error::InitrdTooLarge { size },
        })?;
    Ok((GuestAddress(addr), size))
}

/// Refuses an initrd that starts below the end of the kernel: the two were written at the same
/// time (crate::vm), so guest memory where they overlap holds either's bytes.
pub fn check_initrd_clear_of_kernel(
    loaded: &LoadedKernel,
    initrd: Option<(GuestAddress, usize)>,
) -> Result<(), Error> {
    match initrd {
        Some((start, _)) if start.raw_value() < loaded.kernel_end => {
            Err(Error::InitrdOverlapsKernel {
                kernel_end: loaded.kernel_end,
                initrd_start: start.raw_value(),
            })
        }
        _ => Ok(()),
    }
}

/// Writes the command line to guest memory.
pub fn load_command_line(ram: &GuestRam, cmdline: &str) -> Result<(), Error> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|_| Error::Cmdline)?;
    cl.insert_str(cmdline).map_err(|_| Error::Cmdline)?;
    load_cmdline(&ram.mem, GuestAddress(CMDLINE_START), &cl).map_err(|_| Error::Cmdline)
}

/// The RAM ranges reported to the guest: low memory up to the EBDA, then from 1 MiB.
fn ram_ranges(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    for (i, (gpa, size, _)) in ram.regions.iter().enumerate() {
        let (start, len) = if i == 0 {
            (
                HIGH_MEMORY_START,
                (*size as u64).saturating_sub(HIGH_MEMORY_START),
            )
        } else {
            (gpa.raw_value(), *size as u64)
        };
        v.push((start, len, E820_RAM));
    }
    v
}

/// Writes `hvm_start_info`, its memory map and module list (PVH boot).
pub fn write_pvh_info(
    ram: &GuestRam,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, usize)>,
) -> Result<(), Error> {
    let _ = cmdline_len;
    let memmap: Vec<hvm_memmap_table_entry> = ram_ranges(ram)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len()).map_err(|_| Error::MemoryLayout)?,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((addr, size)) = initrd {
        modules.push(hvm_modlist_entry {
            paddr: addr.raw_value(),
            size: size as u64,
            ..Default::default()
        });
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_START;
    }
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(&params, &ram.mem)
        .map_err(|e| Error::BootParams(e.to_string()))
}

/// Writes the Linux zero page (bzImage / 64-bit boot protocol).
pub fn write_linux_boot_params(
    ram: &GuestRam,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, usize)>,
) -> Result<(), Error> {
    let mut bp = boot_params::default();
    if let Some(hdr) = setup_header {
        bp.hdr = hdr;
    }
    bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    bp.hdr.header = KERNEL_HDR_MAGIC;
    bp.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).map_err(|_| Error::Cmdline)?;
    bp.hdr.cmdline_size = u32::try_from(cmdline_len).map_err(|_| Error::Cmdline)?;
    bp.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image =
            u32::try_from(addr.raw_value()).map_err(|_| Error::InitrdTooLarge { size })?;
        bp.hdr.ramdisk_size = u32::try_from(size).map_err(|_| Error::InitrdTooLarge { size })?;
    }
    let ranges = ram_ranges(ram);
    for (i, (addr, size, type_)) in ranges.iter().enumerate() {
        let slot = bp.e820_table.get_mut(i).ok_or(Error::MemoryLayout)?;
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    bp.e820_entries = u8::try_from(ranges.len()).map_err(|_| Error::MemoryLayout)?;
    let params = BootParams::new::<boot_params>(&bp, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(&params, &ram.mem)
        .map_err(|e| Error::BootParams(e.to_string()))
}

/// Whether `addr..addr+len` is backed by guest RAM.
pub fn in_ram(ram: &GuestRam, addr: u64, len: usize) -> bool {
    ram.mem.check_range(GuestAddress(addr), len)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A minimal x86-64 ELF: one PT_LOAD of 16 bytes at 16 MiB whose bss reaches `memsz`.
    fn tiny_vmlinux(memsz: u64) -> tempfile::NamedTempFile {
        let (ehdr, phdr) = (64u64, 56u16);
        let mut elf = vec![0u8; 64];
        elf[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&(16 * MIB).to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&ehdr.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes());
        elf[54..56].copy_from_slice(&phdr.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let data_at = ehdr + u64::from(phdr);
        for v in [1u32, 5] {
            elf.extend_from_slice(&v.to_le_bytes()); // PT_LOAD, R+X
        }
        for v in [data_at, 16 * MIB, 16 * MIB, 16, memsz, 0x1000] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        elf.extend_from_slice(&[0xf4; 16]); // hlt
        file_of(&elf)
    }

    fn file_of(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        f
    }

    #[test]
    fn an_initrd_that_reaches_into_the_kernel_is_refused() {
        let kernel = tiny_vmlinux(8 * MIB);
        let initrd = file_of(&vec![0x5a; 10 << 20]);
        // 32 MiB: the 10 MiB initrd goes at 22 MiB, above the old 17 MiB floor but inside the
        // kernel's 16..24 MiB.
        let ram = GuestRam::new(32).expect("guest ram");
        let loaded = load_kernel(&ram, kernel.path()).expect("kernel");
        assert_eq!(loaded.kernel_end, 24 * MIB);
        let placed = load_initrd(&ram, initrd.path()).expect("initrd");
        assert_eq!(placed.0, GuestAddress(22 * MIB));
        match check_initrd_clear_of_kernel(&loaded, Some(placed)) {
            Err(Error::InitrdOverlapsKernel {
                kernel_end,
                initrd_start,
            }) => assert_eq!((kernel_end, initrd_start), (24 * MIB, 22 * MIB)),
            other => panic!("{other:?}"),
        }
        // 64 MiB: the initrd sits at 54 MiB, clear of the kernel.
        let ram = GuestRam::new(64).expect("guest ram");
        let loaded = load_kernel(&ram, kernel.path()).expect("kernel");
        let placed = load_initrd(&ram, initrd.path()).expect("initrd");
        assert_eq!(placed.0, GuestAddress(54 * MIB));
        check_initrd_clear_of_kernel(&loaded, Some(placed)).expect("no overlap");
        check_initrd_clear_of_kernel(&loaded, None).expect("no initrd");
    }

    fn assert_invalid_input(r: Result<(GuestAddress, usize), Error>) {
        match r {
            Err(Error::InitrdFile(_, e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_initrd_that_is_not_a_regular_file_is_refused() {
        let ram = GuestRam::new(32).expect("guest ram");
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("initrd");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: `c` is a NUL-terminated path; mkfifo reads nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once (no writer is waited for) with a typed refusal.
        assert_invalid_input(load_initrd(&ram, &fifo));
        // A /proc file is a regular file that says it is empty.
        assert_invalid_input(load_initrd(&ram, Path::new("/proc/self/status")));
        assert_invalid_input(load_initrd(&ram, dir.path()));
        match load_kernel(&ram, &fifo) {
            Err(Error::KernelFile(_, e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput),
            other => panic!("{:?}", other.map(|k| k.entry)),
        }
    }
}
