//! vCPU set-up: CPUID, MSRs, registers and the local APIC, all written explicitly.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EntryPoint;
use crate::layout::*;
use crate::Error;

/// What the guest is told about its topology: `cores` cores of `threads_per_core` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestTopology {
    pub threads_per_core: u8,
    pub cores: u8,
}

impl GuestTopology {
    /// Total vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.threads_per_core.saturating_mul(self.cores)
    }
    fn thread_shift(&self) -> u32 {
        u32::from(self.threads_per_core.max(1))
            .next_power_of_two()
            .trailing_zeros()
    }
    fn core_shift(&self) -> u32 {
        self.thread_shift()
            + u32::from(self.cores.max(1))
                .next_power_of_two()
                .trailing_zeros()
    }
    /// APIC id of vCPU `index`: thread bits below core bits.
    pub fn apic_id(&self, index: u8) -> u32 {
        let tpc = self.threads_per_core.max(1);
        let core = u32::from(index / tpc);
        let thread = u32::from(index % tpc);
        (core << self.thread_shift()) | thread
    }
}

// MSR indices.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_ARCH_CAPABILITIES: this machine's KVM rejects writes to it, so it is never set.
pub const MSR_NEVER_SET: u32 = 0x10a;

// CPUID bits.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_PCID: u32 = 1 << 17;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const LEAF7_EBX_FSGSBASE: u32 = 1 << 0;
const LEAF7_EBX_SMEP: u32 = 1 << 7;
const LEAF7_EBX_INVPCID: u32 = 1 << 10;
const LEAF7_ECX_UMIP: u32 = 1 << 2;
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
const INVARIANT_TSC: u32 = 1 << 8;

/// The CPUID a vCPU sees: the host's KVM-supported set, with topology written out.
pub fn build_cpuid(kvm: &Kvm, topo: GuestTopology, index: u8) -> Result<CpuId, Error> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let apic_id = topo.apic_id(index);
    let vcpus = u32::from(topo.vcpus());
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((vcpus & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // No TSC-deadline timer: the guest uses the LAPIC timer in one-shot mode, as
                // under QEMU's default CPU model. (On this machine's software KVM the deadline
                // timer floods a Linux 6.1 guest with ticks.)
                e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                e.ecx &= !LEAF1_ECX_PCID;
                if vcpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package and threads per cache.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    vcpus
                } else {
                    u32::from(topo.threads_per_core)
                };
                e.eax = (e.eax & 0x3ff)
                    | ((sharing.saturating_sub(1) & 0xfff) << 14)
                    | ((u32::from(topo.cores).saturating_sub(1) & 0x3f) << 26);
            }
            0xb | 0x1f => match e.index {
                0 => {
                    e.eax = topo.thread_shift();
                    e.ebx = u32::from(topo.threads_per_core);
                    e.ecx = 1 << 8; // level 0, type SMT
                    e.edx = apic_id;
                }
                1 => {
                    e.eax = topo.core_shift();
                    e.ebx = vcpus;
                    e.ecx = 1 | (2 << 8); // level 1, type core
                    e.edx = apic_id;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                    e.edx = apic_id;
                }
            },
            0x7 if e.index == 0 => {
                // A conservative CPU model, as QEMU's default: no PCID/INVPCID, FSGSBASE, SMEP,
                // UMIP or protection keys. (On this project's software KVM a Linux guest that
                // uses them hangs once user space starts; that KVM also ignores some CPUID
                // masks, so the test guest's command line clears them too: guest/cmdline.)
                e.ebx &= !(LEAF7_EBX_FSGSBASE | LEAF7_EBX_SMEP | LEAF7_EBX_INVPCID);
                e.ecx &= !(LEAF7_ECX_UMIP | LEAF7_ECX_PKU | LEAF7_ECX_OSPKE);
            }
            KVM_CPUID_FEATURES => {
                // No paravirtual features that work by hypercall (PV unhalt/kick, PV IPIs, PV
                // sched-yield): IPIs go through the emulated LAPIC. On this project's software
                // KVM a guest vCPU spins forever on the hypercall instruction.
                e.eax &=
                    !(KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
            }
            0x8000_0007 => {
                // No invariant-TSC claim: the guest keeps kvm-clock (stable across vCPU
                // migration and live update) instead of switching to the raw TSC.
                e.edx &= !INVARIANT_TSC;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSRs set at boot (never `MSR_NEVER_SET`).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
}

/// A GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = crate::bits::lo32(((entry >> 32) & 0x000f_0000) | (entry & 0xffff));
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if ((entry >> 47) & 1) == 0 { 1 } else { 0 },
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Writes the boot GDT (and page tables for a 64-bit entry) and sets the boot vCPU's registers.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), Error> {
    let long = matches!(entry, EntryPoint::Linux64 { .. });
    let code_flags = if long { 0xa09b } else { 0xc09b };
    let gdt = [
        0u64,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(|_| Error::MemoryLayout)?;
    }
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { entry } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.0;
            regs.rbx = PVH_INFO_START;
        }
        EntryPoint::Linux64 { entry } => {
            // Identity-map the first GiB with 2 MiB pages.
            mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
                .map_err(|_| Error::MemoryLayout)?;
            mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
                .map_err(|_| Error::MemoryLayout)?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
                    .map_err(|_| Error::MemoryLayout)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
    Ok(())
}

/// CPUID, MSRs, FPU and LAPIC set-up common to every vCPU.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, topo: GuestTopology, index: u8) -> Result<(), Error> {
    let cpuid = build_cpuid(kvm, topo, index)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| Error::Kvm("KVM_SET_MSRS", kvm_ioctls::Error::new(libc::E2BIG)))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(Error::MsrsRefused {
            set,
            want: entries.len(),
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
    // LINT0 = ExtINT (PIC), LINT1 = NMI.
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
    set_lvt(&mut lapic.regs, 0x350, 0x7);
    set_lvt(&mut lapic.regs, 0x360, 0x4);
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))?;
    Ok(())
}

fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let Some(slot) = regs.get_mut(offset..offset + 4) else {
        return;
    };
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(slot.iter()) {
        *d = *s as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (d, s) in slot.iter_mut().zip(v.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_put_threads_below_cores() {
        let t = GuestTopology {
            threads_per_core: 2,
            cores: 2,
        };
        assert_eq!(
            (0..4).map(|i| t.apic_id(i)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        let t = GuestTopology {
            threads_per_core: 1,
            cores: 3,
        };
        assert_eq!(
            (0..3).map(|i| t.apic_id(i)).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(t.thread_shift(), 0);
        assert_eq!(t.core_shift(), 2);
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.base, code.limit, code.type_, code.db, code.l, code.g),
            (0, 0xffff_ffff, 0xb, 1, 0, 1)
        );
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.l, code64.db), (1, 0));
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.type_, tss.selector), (0x67, 0xb, 24));
    }

    #[test]
    fn arch_capabilities_msr_is_never_set() {
        assert!(boot_msrs().iter().all(|m| m.index != MSR_NEVER_SET));
    }
}
