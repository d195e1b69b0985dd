//! The guest physical address map (x86_64), in one place.

/// Where the PVH `hvm_start_info` goes.
pub const PVH_INFO_START: u64 = 0x6000;
/// Module list (initrd) right after the start info.
pub const MODLIST_START: u64 = 0x6040;
/// The e820-style memory map table.
pub const MEMMAP_START: u64 = 0x7000;
/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Identity page tables for a 64-bit bzImage entry (PML4, PDPTE, PDE).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Initial stack for the 64-bit bzImage entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Linux boot_params ("zero page") for bzImage.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM ends here in the e820 map; the MP table lives in it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy BIOS area (0xF0000-0xFFFFF, reserved in the e820 map): the empty PCI IRQ
/// routing table goes here, the first address Linux searches.
pub const BIOS_AREA_START: u64 = 0xf_0000;
/// First byte of "high" memory (1 MiB): kernels load here.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap holding device windows, IOAPIC and LAPIC.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows: one 4 KiB page per slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Number of virtio-mmio slots (the rng; block devices go on PCI).
pub const VIRTIO_SLOTS: u32 = 4;
/// PCIe root ports, one hot-plug slot (one block device) each.
pub const HOTPLUG_SLOTS: u8 = 4;
/// First IRQ line given to virtio-mmio devices (0-4 are PIT/keyboard/cascade/COM2/COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// IOAPIC and LAPIC (fixed by the architecture).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// TSS address KVM needs on Intel (three pages just below 4 GiB, inside the gap).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
