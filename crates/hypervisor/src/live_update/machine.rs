//! Reading the machine state out of one process's KVM VM and devices, and setting it into
//! another's: the KVM side (vCPUs, irqchip, PIT, kvm-clock) and the VMM's own devices.
//!
//! Orders follow what KVM needs: a vCPU's pending port or MMIO read is completed before its
//! registers are read (one `KVM_RUN` with `immediate_exit` set, which returns `EINTR` without
//! entering the guest); on restore the LAPIC is set before the MSRs (a TSC-deadline written
//! before `KVM_SET_LAPIC` is lost) and the vCPU events last.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use super::state::{
    CardKind, CardState, ConsoleState, KvmVmState, MachineConfig, MachineState, VcpuState,
};
use crate::cpu::MSR_NEVER_SET;
use crate::devices::pci::PciDevice;
use crate::devices::vhost_blk::VhostUserBlk;
use crate::devices::vhost_net::VhostUserNet;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio_pci::VirtioPciDevice;
use crate::vm::Vm;
use crate::{lock, Error};

/// How long the main thread waits for the parked vCPUs to hand in their state.
const CAPTURE_WAIT: Duration = Duration::from_secs(2);
/// The xsave area `KVM_GET_XSAVE`/`KVM_SET_XSAVE` move; a host whose KVM needs more (AMX)
/// cannot be live-updated by this build.
const XSAVE_BYTES: i32 = 4096;

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// The MSRs KVM lists as worth saving for a vCPU.
pub(crate) fn saved_msrs(kvm_fd: &Kvm) -> Result<Vec<u32>, Error> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads `list` through `op` (KVM_GET_MSRS or KVM_SET_MSRS), which stops at the first MSR it
/// refuses: that one is skipped and the rest tried again. Returns the entries done.
fn msrs_in_turn(
    mut entries: Vec<kvm_msr_entry>,
    mut op: impl FnMut(&mut Msrs) -> Result<usize, kvm_ioctls::Error>,
    what: &'static str,
) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut done = Vec::with_capacity(entries.len());
    while !entries.is_empty() {
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| Error::Kvm(what, kvm_ioctls::Error::new(libc::E2BIG)))?;
        let n = op(&mut msrs).map_err(kvm(what))?.min(entries.len());
        done.extend_from_slice(msrs.as_slice().get(..n).unwrap_or(&[]));
        if let Some(skipped) = entries.get(n) {
            tracing::debug!(
                msr = format_args!("{:#x}", skipped.index),
                what,
                "MSR skipped"
            );
        }
        entries.drain(..(n + 1).min(entries.len()));
    }
    Ok(done)
}

/// One vCPU's state, read by its own thread while it is parked.
pub(crate) fn capture_vcpu(vcpu: &mut VcpuFd, msr_list: &[u32]) -> Result<VcpuState, Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => return Err(Error::Kvm("KVM_RUN (immediate exit)", e)),
        // The completed access wants another exit (a string I/O): not at a clean stop.
        Ok(()) => {
            return Err(Error::Kvm(
                "KVM_RUN (immediate exit)",
                kvm_ioctls::Error::new(libc::EBUSY),
            ))
        }
    }
    let entries = msr_list
        .iter()
        .map(|i| kvm_msr_entry {
            index: *i,
            ..Default::default()
        })
        .collect();
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = Box::new(vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?);
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let msrs = msrs_in_turn(entries, |m| vcpu.get_msrs(m), "KVM_GET_MSRS")?
        .iter()
        .map(|e| (e.index, e.data))
        .collect();
    let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        events,
        msrs,
    })
}

fn restore_vcpu(vcpu: &VcpuFd, st: &VcpuState) -> Result<(), Error> {
    vcpu.set_mp_state(st.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&st.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&st.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: the kernel reads at most `size_of::<kvm_xsave>()` (4096) bytes from `st.xsave`,
    // which is that big: `Vm::restore` checked that KVM's xsave size is no larger.
    unsafe { vcpu.set_xsave(&st.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&st.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&st.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&st.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = st
        .msrs
        .iter()
        .filter(|(i, _)| *i != MSR_NEVER_SET)
        .map(|(index, data)| kvm_msr_entry {
            index: *index,
            data: *data,
            ..Default::default()
        })
        .collect();
    let want = entries.len();
    let set = msrs_in_turn(entries, |m| vcpu.set_msrs(m), "KVM_SET_MSRS")?.len();
    if set != want {
        tracing::warn!(set, want, "KVM refused some MSRs of the handed-over state");
    }
    vcpu.set_vcpu_events(&st.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

fn capture_kvm_vm(vm: &VmFd) -> Result<KvmVmState, Error> {
    Ok(KvmVmState {
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

fn restore_kvm_vm(vm: &VmFd, st: &KvmVmState) -> Result<(), Error> {
    vm.set_pit2(&st.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // With KVM_CLOCK_REALTIME the kernel moves kvm-clock on by the time since it was read: the
    // guest's clock sees the pause instead of hiding it.
    let mut clock = st.clock;
    clock.flags &= KVM_CLOCK_REALTIME;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for (chip, id) in [
        (&st.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&st.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&st.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        let mut c = *chip;
        c.chip_id = id;
        vm.set_irqchip(&c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Why the old process could not produce the state.
#[derive(Debug)]
pub(crate) enum CaptureError {
    /// A card cannot be handed over now: it is being pulled, its backend is dead, or its
    /// rings are being stopped.
    Cards,
    /// KVM refused a read, or a vCPU did not answer.
    Kvm(Error),
}

/// An eventfd received over SCM_RIGHTS.
fn eventfd_of(f: File) -> EventFd {
    // SAFETY: the fd came over SCM_RIGHTS and `f` owned it alone; ownership moves to the
    // EventFd. KVM checks it is an eventfd when it is registered (KVM_IOEVENTFD, KVM_IRQFD).
    unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
}

impl Vm {
    /// See [`crate::devices::pci::PciBus::release_calls`].
    pub(crate) fn release_card_calls(&self) -> Result<(), Error> {
        lock(&self.shared.pci).release_calls()
    }

    /// See [`crate::devices::pci::PciBus::rebind_calls`].
    pub(crate) fn rebind_card_calls(&self) {
        lock(&self.shared.pci).rebind_calls();
    }

    /// Asks every vCPU for its state the next time it is parked (at once for a parked one).
    /// Made before pausing a running one-vCPU guest, so that its thread reads its state on the
    /// same wake-up that parks it (one scheduling round, not two); see `hand_over`.
    pub(crate) fn request_capture(&self) {
        for slot in lock(&self.shared.captured).iter_mut() {
            *slot = None;
        }
        let mut st = lock(&self.shared.run);
        st.capture_gen = st.capture_gen.wrapping_add(1);
        st.captured = 0;
        self.shared.cv.notify_all();
    }

    /// Reads the whole machine state once the vCPUs are parked (paused). With `requested`
    /// ([`Vm::request_capture`] made before the pause, one vCPU) it waits for the vCPU's own
    /// read and then reads the in-kernel irqchip, PIT and clock. Otherwise it reads those first
    /// and then asks the vCPUs: an interrupt the irqchip delivers in between is then found
    /// twice (pending in the IOAPIC/PIC copy and in the LAPIC), never lost.
    pub(crate) fn capture(
        &self,
        paused_at_ns: u64,
        running: bool,
        requested: bool,
    ) -> Result<(MachineState, Vec<Vec<RawFd>>), CaptureError> {
        let n = usize::from(self.config.vcpus);
        let vm_first = if requested {
            None
        } else {
            let s = capture_kvm_vm(&self.vm_fd).map_err(CaptureError::Kvm)?;
            self.request_capture();
            Some(s)
        };
        {
            let mut st = lock(&self.shared.run);
            let deadline = Instant::now() + CAPTURE_WAIT;
            while st.captured < n {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(CaptureError::Kvm(Error::Thread(std::io::Error::other(
                        "a vCPU did not hand in its state",
                    ))));
                }
                st = self
                    .shared
                    .cv
                    .wait_timeout(st, left)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        let mut vcpus = Vec::with_capacity(n);
        for slot in lock(&self.shared.captured).iter_mut() {
            match slot.take() {
                Some(Ok(v)) => vcpus.push(v),
                Some(Err(e)) => return Err(CaptureError::Kvm(e)),
                None => {
                    return Err(CaptureError::Kvm(Error::Thread(std::io::Error::other(
                        "a vCPU state is missing",
                    ))))
                }
            }
        }
        let vm = match vm_first {
            Some(s) => s,
            None => capture_kvm_vm(&self.vm_fd).map_err(CaptureError::Kvm)?,
        };
        let (pci, cards) = lock(&self.shared.pci).state().ok_or(CaptureError::Cards)?;
        let (cards, card_fds): (Vec<CardState>, Vec<Vec<RawFd>>) = cards.into_iter().unzip();
        let serial = lock(&self.shared.pio).serial_regs();
        let (start, data) = self.console.snapshot();
        let mmio = lock(&self.shared.slots)
            .iter()
            .map(|s| s.as_ref().map(|t| t.core.state()))
            .collect();
        let (msi_routes, next_gsi) = self.shared.router.routes();
        let st = MachineState {
            version: super::state::STATE_VERSION,
            config: MachineConfig {
                memory_mib: self.config.memory_mib,
                vcpus: self.config.vcpus,
                threads_per_core: self.config.threads_per_core.max(1),
            },
            paused_at_ns,
            running,
            vm,
            vcpus,
            serial,
            console: ConsoleState { start, data },
            pci,
            mmio,
            msi_routes,
            next_gsi,
            cards,
        };
        Ok((st, card_fds))
    }

    /// Builds the card a previous process handed over: its device taken over on the same
    /// vhost-user connection (nothing sent to the card), the same eventfds, wired into this
    /// process's VM. `files` are the card's fds in [`CardState::fd_count`] order.
    fn adopt_card(&self, c: &CardState, files: Vec<File>) -> Result<VirtioPciDevice, Error> {
        let nq = c.core.queues.len();
        if files.len() != c.fd_count() {
            return Err(Error::WrongDeviceKind);
        }
        let mut files = files.into_iter();
        let conn = files.next().ok_or(Error::WrongDeviceKind)?;
        let conn = crate::server::channel_from_fd(conn.into_raw_fd()).map_err(Error::EventFd)?;
        let kicks: Vec<EventFd> = files.by_ref().take(nq).map(eventfd_of).collect();
        let calls: Vec<Arc<EventFd>> = files.map(|f| Arc::new(eventfd_of(f))).collect();
        let queues = u16::try_from(nq).map_err(|_| Error::TooManyQueues)?;
        let device: Box<dyn VirtioDevice> = match c.kind {
            CardKind::Block => Box::new(VhostUserBlk::adopt(
                conn,
                &c.vhost,
                &c.device_config,
                queues,
                c.read_only,
            )?),
            CardKind::Net => Box::new(VhostUserNet::adopt(conn, &c.vhost, &c.device_config)?),
        };
        VirtioPciDevice::adopt(
            c,
            device,
            kicks,
            calls,
            self.shared.router.as_ref(),
            self.shared.bad_guest.clone(),
        )
    }

    /// Sets a handed-over state into this (incoming, not yet started) VM.
    /// `card_fds` holds each card's fds, in the order of `st.cards`.
    pub(crate) fn restore(
        &mut self,
        st: &MachineState,
        card_fds: Vec<Vec<File>>,
    ) -> Result<(), Error> {
        let xsave = self.kvm.check_extension_int(Cap::Xsave2);
        if xsave > XSAVE_BYTES {
            return Err(Error::Kvm(
                "KVM_CAP_XSAVE2",
                kvm_ioctls::Error::new(libc::E2BIG),
            ));
        }
        restore_kvm_vm(&self.vm_fd, &st.vm)?;
        for (i, vcpu) in &self.pending_vcpus {
            let s = st
                .vcpus
                .get(usize::from(*i))
                .ok_or(Error::VcpuCount(u32::from(*i)))?;
            restore_vcpu(vcpu, s)?;
        }
        self.console.restore(st.console.start, &st.console.data);
        // The UART interrupts through the same irqfd (a duplicate of it) as before.
        {
            let mut pio = lock(&self.shared.pio);
            let irq = pio.serial_irq().try_clone().map_err(Error::EventFd)?;
            pio.restore_serial(&st.serial, irq, self.console.clone())
                .ok_or(Error::MemoryLayout)?;
        }
        if card_fds.len() != st.cards.len() {
            return Err(Error::WrongDeviceKind);
        }
        let mut cards: Vec<(usize, Box<dyn PciDevice>)> = Vec::with_capacity(st.cards.len());
        for (c, files) in st.cards.iter().zip(card_fds) {
            let card = self.adopt_card(c, files)?;
            tracing::info!(device = %c.id, kind = ?c.kind, port = c.port, active = c.core.active, "card taken over");
            cards.push((usize::from(c.port), Box::new(card)));
        }
        lock(&self.shared.pci)
            .restore(&st.pci, cards)
            .ok_or(Error::WrongDeviceKind)?;
        {
            let ram = &self.shared.ram;
            let mut slots = lock(&self.shared.slots);
            if slots.len() != st.mmio.len() {
                return Err(Error::WrongDeviceKind);
            }
            for (slot, s) in slots.iter_mut().zip(&st.mmio) {
                match (slot, s) {
                    (None, None) => {}
                    (Some(t), Some(s)) => {
                        let irqs: Vec<Arc<vmm_sys_util::eventfd::EventFd>> =
                            vec![t.irq.clone(); t.core.queues.len()];
                        if !t.core.restore(s, ram, &irqs) {
                            return Err(Error::WrongDeviceKind);
                        }
                    }
                    _ => return Err(Error::WrongDeviceKind),
                }
            }
        }
        self.shared
            .router
            .restore_routes(&st.msi_routes, st.next_gsi)?;
        Ok(())
    }
}
