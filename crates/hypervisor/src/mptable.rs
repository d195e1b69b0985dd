//! An Intel MultiProcessor Specification 1.4 table, the smallest way to tell a guest without
//! ACPI about its CPUs, its IOAPIC and how ISA interrupts are wired.
//!
//! The table is built as little-endian bytes (no packed structs, no unsafe) and placed in the
//! EBDA, where Linux scans for the `_MP_` floating pointer.
//!
//! Beside it goes an empty PCI IRQ routing table (`$PIR`, the PCI BIOS's) at the first address
//! Linux looks for one. It routes nothing (interrupts come from the MP table's IOAPIC and from
//! MSI); it is there so the guest finds a table at once: without one, Linux's
//! `pcibios_irq_init` scans 0xF0000-0xFFFFF for `$PIR` in 16-byte steps and then for `$IRT`
//! byte by byte, about 0.43 million instructions, each one emulated on a software KVM (measured:
//! docs/status.md, issue 18).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_ADDR, BIOS_AREA_START, EBDA_START, IOAPIC_ADDR};
use crate::Error;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_TYPE_INT: u8 = 0;
const MP_IRQ_TYPE_NMI: u8 = 1;
const MP_IRQ_TYPE_EXTINT: u8 = 3;
const IOAPIC_PINS: u8 = 24;
/// The most vCPUs one table describes (APIC ids are 8 bits; the IOAPIC takes the next id).
pub const MAX_CPUS: u8 = 254;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the table bytes for `cpus` CPUs placed at `base` (floating pointer first).
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::VcpuCount(u32::from(cpus)));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x0600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // One ISA bus, id 0.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_IRQ_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT (the PIC), LINT1 = NMI, on every local APIC.
    entries.extend_from_slice(&[4, MP_IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let table_addr = base + 16;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(
        &u16::try_from(table_len)
            .map_err(|_| Error::MemoryLayout)?
            .to_le_bytes(),
    );
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"BULKHEAD");
    table.extend_from_slice(b"BULKHEADVMM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table
    table.extend_from_slice(&0u16.to_le_bytes()); // oem size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(
        &u32::try_from(table_addr)
            .map_err(|_| Error::MemoryLayout)?
            .to_le_bytes(),
    );
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// "$PIR", version 1.0, and the length of a routing table without slot entries.
const PIRQ_SIGNATURE: &[u8; 4] = b"$PIR";
const PIRQ_VERSION: u16 = 0x0100;
const PIRQ_HEADER_LEN: u16 = 32;

/// An empty PCI IRQ routing table (PCI BIOS specification 2.1, "$PIR"): the 32-byte header
/// with no slot entries, no exclusive IRQs and no named interrupt router, checksummed.
pub fn build_pirq() -> Vec<u8> {
    let mut t = Vec::with_capacity(usize::from(PIRQ_HEADER_LEN));
    t.extend_from_slice(PIRQ_SIGNATURE);
    t.extend_from_slice(&PIRQ_VERSION.to_le_bytes());
    t.extend_from_slice(&PIRQ_HEADER_LEN.to_le_bytes());
    t.extend_from_slice(&[0, 0]); // router bus, devfn
    t.extend_from_slice(&0u16.to_le_bytes()); // exclusive IRQs
    t.extend_from_slice(&0u32.to_le_bytes()); // router vendor and device: none named
    t.extend_from_slice(&0u32.to_le_bytes()); // miniport data
    t.extend_from_slice(&[0; 11]); // reserved
    t.push(0); // checksum, below
    let sum = checksum(&t);
    if let Some(last) = t.last_mut() {
        *last = sum;
    }
    t
}

/// Writes the MP table for `cpus` CPUs into the EBDA and the empty PCI IRQ routing table at
/// the start of the BIOS area.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| Error::MemoryLayout)?;
    mem.write_slice(&build_pirq(), GuestAddress(BIOS_AREA_START))
        .map_err(|_| Error::MemoryLayout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_counts_match() {
        for cpus in [1u8, 2, 4, 64] {
            let b = build(cpus, EBDA_START).expect("table");
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let t = &b[16..];
            assert_eq!(&t[..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([t[4], t[5]]));
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
        }
    }

    #[test]
    fn pirq_table_is_one_linux_accepts() {
        // What Linux's pirq_check_routing_table() demands: signature, version 1.0, a size that
        // is a multiple of 16 and at least the header, and bytes that sum to zero.
        let t = build_pirq();
        assert_eq!(&t[..4], b"$PIR");
        assert_eq!(u16::from_le_bytes([t[4], t[5]]), 0x0100);
        let size = usize::from(u16::from_le_bytes([t[6], t[7]]));
        assert_eq!(size, t.len());
        assert_eq!(size % 16, 0);
        assert!(size >= 32);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        // No router named: Linux keeps its default router and, with an IOAPIC, drops the table.
        assert_eq!(&t[12..16], &[0, 0, 0, 0]);
    }

    #[test]
    fn both_tables_land_where_linux_looks_first() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        write(&mem, 1).expect("write");
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(EBDA_START))
            .expect("read");
        assert_eq!(&mp, b"_MP_");
        let mut pir = [0u8; 32];
        mem.read_slice(&mut pir, GuestAddress(0xf_0000))
            .expect("read");
        assert_eq!(pir.to_vec(), build_pirq());
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(255, EBDA_START).is_err());
    }
}
