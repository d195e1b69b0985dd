//! The machine state a live update hands over: a versioned, self-checking blob and its one
//! parser, [`MachineState::parse`].
//!
//! ```text
//! +------+---------+-------+----------+------------------+------------------------------+
//! | BHLU | version | flags | body_len | SHA-256(body)    | body (sections, fixed order) |
//! | 4 B  | u16 LE  | u16 0 | u32 LE   | 32 B             | body_len bytes               |
//! +------+---------+-------+----------+------------------+------------------------------+
//! ```
//!
//! The header is checked first (magic, then version, then the length against
//! [`MAX_STATE`] and against the bytes present, then the digest), so a truncated, corrupted or
//! unknown-version blob is refused with its own [`StateError`] before any field is read. The
//! body is read with bounds on every count; KVM structures travel as their exact `repr(C)`
//! bytes (`zerocopy`, no `unsafe`) and KVM validates them again when they are set. Guest
//! memory is not in the blob: it is the memfd, handed over beside it.
//!
//! Versions: 1 ends with the MSI routes. 2 (what this build writes) appends the *card section*:
//! every vhost-user card (block or net) in a hot-plug slot, with its PCI configuration space,
//! virtio-pci common configuration, MSI-X table, vector assignment and the vhost-user
//! connection's negotiated state ([`CardState`]). The card's file descriptors (its vhost-user
//! connection, each queue's kick and call eventfd) are not in the blob: they ride beside it
//! over SCM_RIGHTS, `1 + 2 × queues` per card, in card order ([`CardState::fd_count`]). This
//! build reads both versions; a version-1 blob has no cards.

use bulkhead_channel::StateRefusal;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use sha2::{Digest, Sha256};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::devices::virtio::QueueRegs;

/// First bytes of every state blob.
pub const MAGIC: [u8; 4] = *b"BHLU";
/// The state format this build writes. A build that changes the body bumps it and keeps
/// reading the versions before it ([`STATE_VERSION_V1`]).
pub const STATE_VERSION: u16 = 2;
/// The first format (no card section), still read.
pub const STATE_VERSION_V1: u16 = 1;
/// Magic, version, flags, body length, digest.
pub const HEADER_LEN: usize = 4 + 2 + 2 + 4 + 32;
/// Largest body accepted (254 vCPUs of ~6 KiB, the console ring, devices).
pub const MAX_STATE: usize = 4 << 20;
/// Most vCPUs, MSRs per vCPU, root ports, virtio-mmio slots, queues per device, MSI routes and
/// console bytes a blob may hold.
pub const MAX_VCPUS: usize = 254;
pub const MAX_MSRS: usize = 512;
pub const MAX_PORTS: usize = 32;
pub const MAX_MMIO_SLOTS: usize = 32;
pub const MAX_QUEUES: usize = 64;
pub const MAX_ROUTES: usize = 1024;
pub const MAX_CONSOLE: usize = crate::console::DEFAULT_CAPACITY;
/// The 16550's receive FIFO.
pub const MAX_SERIAL_FIFO: usize = 64;
/// Most cards (one per root port), bytes of a card's id, MSI-X vectors of a card, and bytes of
/// its device configuration.
pub const MAX_CARDS: usize = MAX_PORTS;
pub const MAX_CARD_ID: usize = 64;
pub const MAX_VECTORS: usize = 65;
pub const MAX_DEVICE_CONFIG: usize = 256;
/// virtio device types a card may be.
pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Why a blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("state blob truncated: {got} bytes, need {want}")]
    Truncated { got: usize, want: usize },
    #[error("not a state blob (bad magic)")]
    BadMagic,
    #[error("state format version {got} is not one this build reads ({STATE_VERSION_V1}..={STATE_VERSION})")]
    UnknownVersion { got: u16 },
    #[error("state header flags {0:#x} are not zero")]
    Flags(u16),
    #[error("state body of {len} bytes exceeds {MAX_STATE}")]
    TooLarge { len: usize },
    #[error("{extra} bytes after the state body")]
    Trailing { extra: usize },
    #[error("state digest does not match its body")]
    Digest,
    #[error("state body is malformed at {0}")]
    Malformed(&'static str),
    #[error("card {card} of the state is malformed at {at}")]
    BadCard { card: usize, at: &'static str },
}

impl StateError {
    /// The refusal code that goes back to the old hypervisor (and on to the controller).
    pub fn refusal(&self) -> StateRefusal {
        match self {
            StateError::Truncated { .. } => StateRefusal::Truncated,
            StateError::UnknownVersion { .. } => StateRefusal::UnknownVersion,
            StateError::BadMagic
            | StateError::Flags(_)
            | StateError::TooLarge { .. }
            | StateError::Trailing { .. }
            | StateError::Digest => StateRefusal::Corrupted,
            StateError::Malformed(_) | StateError::BadCard { .. } => StateRefusal::Malformed,
        }
    }
}

/// The shape of the VM (must match what the new process built from the hand-over's hello).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    pub memory_mib: u64,
    pub vcpus: u8,
    pub threads_per_core: u8,
}

/// VM-wide KVM state: kvm-clock, PIT, both PICs and the IOAPIC.
#[derive(Clone)]
pub struct KvmVmState {
    pub clock: kvm_clock_data,
    pub pit: kvm_pit_state2,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// One vCPU's KVM state.
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    /// (index, value) of every MSR KVM lists as saved.
    pub msrs: Vec<(u32, u64)>,
}

/// The 16550's registers and receive FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SerialRegs {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    pub fifo: Vec<u8>,
}

/// The console ring: absolute offset of its first byte, and what it still holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleState {
    pub start: u64,
    pub data: Vec<u8>,
}

/// A root port: configuration space, slot presence and a pulled card's husk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortState {
    pub cfg: [u8; 256],
    pub present: bool,
    pub husk: Option<(u64, u64)>,
}

/// The PCI side: configuration address latch, host bridge and root ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciState {
    pub address: u32,
    pub host: [u8; 256],
    pub ports: Vec<PortState>,
    pub rotor: u32,
}

/// An in-VMM virtio device on virtio-mmio: transport registers and queue positions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub irq_status: u32,
    pub active: bool,
    pub queues: Vec<QueueRegs>,
    /// (next available, next used) of each ready queue of an active device.
    pub positions: Vec<(u16, u16)>,
}

/// What kind of card sits in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardKind {
    Block,
    Net,
}

impl CardKind {
    fn code(self) -> u8 {
        match self {
            CardKind::Block => 1,
            CardKind::Net => 2,
        }
    }
    fn of_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(CardKind::Block),
            2 => Some(CardKind::Net),
            _ => None,
        }
    }
    /// The virtio device type of this kind of card.
    pub fn device_type(self) -> u32 {
        match self {
            CardKind::Block => VIRTIO_ID_BLOCK,
            CardKind::Net => VIRTIO_ID_NET,
        }
    }
}

/// One MSI-X table entry. (The pending-bit array has no state of its own here: the model never
/// holds a masked vector's message back, so it always reads zero.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixEntryState {
    pub address: u64,
    pub data: u32,
    pub masked: bool,
}

/// The vhost-user connection as the handshake and the last activation left it. Nothing of it
/// is sent to the card again: the new process takes over the connection as it stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VhostUserState {
    /// The virtio feature bits the card offered at the handshake.
    pub backend_features: u64,
    /// The protocol features both sides agreed (`None`: no protocol-feature extension).
    pub protocol: Option<u64>,
    /// The feature bits last sent with SET_FEATURES (0: none since the handshake).
    pub acked_features: u64,
    /// How many vrings the card runs (handed over at the last activation, not stopped since).
    pub active_queues: u32,
    /// Whether rings may have been handed to the card since the last reset.
    pub started: bool,
}

/// A vhost-user card in a hot-plug slot (state format 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardState {
    /// The root port it sits in (that port reports a card present).
    pub port: u8,
    /// The id the controller attached it under.
    pub id: String,
    pub kind: CardKind,
    /// Block only: the guest sees the disk read-only.
    pub read_only: bool,
    /// The card's PCI configuration space (BAR0 as the guest placed it, command register,
    /// MSI-X control).
    pub cfg: [u8; 256],
    /// Whether the guest has read the configuration space.
    pub touched: bool,
    /// The virtio-pci common configuration: status, feature selects, acked features, queue
    /// select, configuration generation, ISR, queue sizes and addresses and enables, and
    /// whether the device is active (`positions` is always empty: the card keeps those).
    pub core: MmioState,
    pub msix: Vec<MsixEntryState>,
    pub msix_config: u16,
    /// The MSI-X vector of each queue (0xffff: none).
    pub queue_vectors: Vec<u16>,
    /// The first of the GSIs the card's vectors are routed through.
    pub gsi_base: u32,
    pub vhost: VhostUserState,
    /// The device configuration as the card reported it at the handshake (and the guest reads).
    pub device_config: Vec<u8>,
}

impl CardState {
    /// How many file descriptors ride beside the blob for this card: the vhost-user
    /// connection, then each queue's kick eventfd, then each queue's call eventfd.
    pub fn fd_count(&self) -> usize {
        1 + 2 * self.core.queues.len()
    }
}

/// Everything a new hypervisor needs, besides guest memory, to go on running the guest.
pub struct MachineState {
    /// The format version this state was read as (capture makes [`STATE_VERSION`]); a
    /// version-1 state has no cards.
    pub version: u16,
    pub config: MachineConfig,
    /// CLOCK_MONOTONIC when the old process began stopping the vCPUs.
    pub paused_at_ns: u64,
    /// Whether the guest was running (else the parent had paused it: it stays paused).
    pub running: bool,
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialRegs,
    pub console: ConsoleState,
    pub pci: PciState,
    pub mmio: Vec<Option<MmioState>>,
    /// (gsi, MSI address, MSI data) of every MSI route, and the next free GSI.
    pub msi_routes: Vec<(u32, u64, u32)>,
    pub next_gsi: u32,
    /// The cards in hot-plug slots (format 2; empty in format 1).
    pub cards: Vec<CardState>,
}

/// Appends little-endian fields.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn raw<T: IntoBytes + Immutable + ?Sized>(&mut self, v: &T) {
        self.0.extend_from_slice(v.as_bytes());
    }
    /// A count (the reader bounds it) as u32.
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
}

/// Reads fields with a bound check on every one.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, at: &'static str) -> Result<&'a [u8], StateError> {
        if self.rest.len() < n {
            return Err(StateError::Malformed(at));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, at: &'static str) -> Result<[u8; N], StateError> {
        self.take(N, at)?
            .try_into()
            .map_err(|_| StateError::Malformed(at))
    }
    fn u8(&mut self, at: &'static str) -> Result<u8, StateError> {
        Ok(self.array::<1>(at)?[0])
    }
    fn u16(&mut self, at: &'static str) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array(at)?))
    }
    fn u32(&mut self, at: &'static str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array(at)?))
    }
    fn u64(&mut self, at: &'static str) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array(at)?))
    }
    fn bool(&mut self, at: &'static str) -> Result<bool, StateError> {
        match self.u8(at)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StateError::Malformed(at)),
        }
    }
    fn raw<T: FromBytes>(&mut self, at: &'static str) -> Result<T, StateError> {
        let b = self.take(std::mem::size_of::<T>(), at)?;
        T::read_from_bytes(b).map_err(|_| StateError::Malformed(at))
    }
    /// A count no larger than `max`.
    fn len(&mut self, max: usize, at: &'static str) -> Result<usize, StateError> {
        let n = usize::try_from(self.u32(at)?).map_err(|_| StateError::Malformed(at))?;
        if n > max {
            return Err(StateError::Malformed(at));
        }
        Ok(n)
    }
    fn bytes(&mut self, max: usize, at: &'static str) -> Result<Vec<u8>, StateError> {
        let n = self.len(max, at)?;
        Ok(self.take(n, at)?.to_vec())
    }
}

impl MachineState {
    /// The blob: header, digest and body.
    pub fn encode(&self) -> Vec<u8> {
        // Format 1 has no card section: a state with cards is always written as format 2.
        let version = if self.version == STATE_VERSION_V1 && self.cards.is_empty() {
            STATE_VERSION_V1
        } else {
            STATE_VERSION
        };
        let body = self.encode_body(version);
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&body));
        out.extend_from_slice(&body);
        out
    }

    fn encode_body(&self, version: u16) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.config.memory_mib);
        w.u8(self.config.vcpus);
        w.u8(self.config.threads_per_core);
        w.u64(self.paused_at_ns);
        w.bool(self.running);
        w.raw(&self.vm.clock);
        w.raw(&self.vm.pit);
        w.raw(&self.vm.pic_master);
        w.raw(&self.vm.pic_slave);
        w.raw(&self.vm.ioapic);
        w.len(self.vcpus.len());
        for v in &self.vcpus {
            w.raw(&v.mp_state);
            w.raw(&v.regs);
            w.raw(&v.sregs);
            w.raw(v.xsave.as_ref());
            w.raw(&v.xcrs);
            w.raw(&v.debugregs);
            w.raw(&v.lapic);
            w.raw(&v.events);
            w.len(v.msrs.len());
            for (i, d) in &v.msrs {
                w.u32(*i);
                w.u64(*d);
            }
        }
        w.raw(&self.serial.regs[..]);
        w.bytes(&self.serial.fifo);
        w.u64(self.console.start);
        w.bytes(&self.console.data);
        w.u32(self.pci.address);
        w.raw(&self.pci.host[..]);
        w.len(self.pci.ports.len());
        for p in &self.pci.ports {
            w.raw(&p.cfg[..]);
            w.bool(p.present);
            w.bool(p.husk.is_some());
            let (base, size) = p.husk.unwrap_or_default();
            w.u64(base);
            w.u64(size);
        }
        w.u32(self.pci.rotor);
        w.len(self.mmio.len());
        for slot in &self.mmio {
            w.bool(slot.is_some());
            let Some(m) = slot else { continue };
            encode_core(&mut w, m);
            w.len(m.positions.len());
            for (a, u) in &m.positions {
                w.u16(*a);
                w.u16(*u);
            }
        }
        w.len(self.msi_routes.len());
        for (gsi, addr, data) in &self.msi_routes {
            w.u32(*gsi);
            w.u64(*addr);
            w.u32(*data);
        }
        w.u32(self.next_gsi);
        if version >= 2 {
            w.len(self.cards.len());
            for c in &self.cards {
                encode_card(&mut w, c);
            }
        }
        w.0
    }

    /// The one parser for a state blob (see the module docs for the order of the checks).
    pub fn parse(blob: &[u8]) -> Result<MachineState, StateError> {
        let truncated = |want| StateError::Truncated {
            got: blob.len(),
            want,
        };
        let magic = blob.get(..4).ok_or(truncated(HEADER_LEN))?;
        if magic != MAGIC {
            return Err(StateError::BadMagic);
        }
        let header = blob.get(..HEADER_LEN).ok_or(truncated(HEADER_LEN))?;
        let mut h = Reader { rest: &header[4..] };
        let version = h.u16("version")?;
        if !(STATE_VERSION_V1..=STATE_VERSION).contains(&version) {
            return Err(StateError::UnknownVersion { got: version });
        }
        let flags = h.u16("flags")?;
        if flags != 0 {
            return Err(StateError::Flags(flags));
        }
        let len = usize::try_from(h.u32("length")?).map_err(|_| StateError::Malformed("length"))?;
        if len > MAX_STATE {
            return Err(StateError::TooLarge { len });
        }
        let digest = h.take(32, "digest")?;
        let body = &blob[HEADER_LEN..];
        if body.len() < len {
            return Err(truncated(HEADER_LEN + len));
        }
        if body.len() > len {
            return Err(StateError::Trailing {
                extra: body.len() - len,
            });
        }
        if Sha256::digest(body)[..] != digest[..] {
            return Err(StateError::Digest);
        }
        let mut r = Reader { rest: body };
        let state = Self::parse_body(&mut r, version)?;
        if !r.rest.is_empty() {
            return Err(StateError::Malformed("end of body"));
        }
        Ok(state)
    }

    fn parse_body(r: &mut Reader<'_>, version: u16) -> Result<MachineState, StateError> {
        let config = MachineConfig {
            memory_mib: r.u64("memory")?,
            vcpus: r.u8("vcpus")?,
            threads_per_core: r.u8("threads per core")?,
        };
        let paused_at_ns = r.u64("pause time")?;
        let running = r.bool("running")?;
        let vm = KvmVmState {
            clock: r.raw("clock")?,
            pit: r.raw("pit")?,
            pic_master: r.raw("pic master")?,
            pic_slave: r.raw("pic slave")?,
            ioapic: r.raw("ioapic")?,
        };
        let n = r.len(MAX_VCPUS, "vcpu count")?;
        if n != usize::from(config.vcpus) {
            return Err(StateError::Malformed("vcpu count"));
        }
        let mut vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            let mp_state = r.raw("mp state")?;
            let regs = r.raw("regs")?;
            let sregs = r.raw("sregs")?;
            let xsave = Box::new(r.raw::<kvm_xsave>("xsave")?);
            let xcrs = r.raw("xcrs")?;
            let debugregs = r.raw("debugregs")?;
            let lapic = r.raw("lapic")?;
            let events = r.raw("vcpu events")?;
            let m = r.len(MAX_MSRS, "msr count")?;
            let mut msrs = Vec::with_capacity(m);
            for _ in 0..m {
                msrs.push((r.u32("msr index")?, r.u64("msr value")?));
            }
            vcpus.push(VcpuState {
                mp_state,
                regs,
                sregs,
                xsave,
                xcrs,
                debugregs,
                lapic,
                events,
                msrs,
            });
        }
        let serial = SerialRegs {
            regs: r.array("serial registers")?,
            fifo: r.bytes(MAX_SERIAL_FIFO, "serial fifo")?,
        };
        let console = ConsoleState {
            start: r.u64("console start")?,
            data: r.bytes(MAX_CONSOLE, "console ring")?,
        };
        let address = r.u32("pci address")?;
        let host = r.array("host bridge")?;
        let n = r.len(MAX_PORTS, "port count")?;
        let mut ports = Vec::with_capacity(n);
        for _ in 0..n {
            let cfg = r.array("port config")?;
            let present = r.bool("port presence")?;
            let has_husk = r.bool("port husk")?;
            let husk = (r.u64("husk base")?, r.u64("husk size")?);
            if !has_husk && husk != (0, 0) {
                return Err(StateError::Malformed("port husk"));
            }
            ports.push(PortState {
                cfg,
                present,
                husk: has_husk.then_some(husk),
            });
        }
        let pci = PciState {
            address,
            host,
            ports,
            rotor: r.u32("pci rotor")?,
        };
        let n = r.len(MAX_MMIO_SLOTS, "mmio slot count")?;
        let mut mmio = Vec::with_capacity(n);
        for _ in 0..n {
            if !r.bool("mmio slot")? {
                mmio.push(None);
                continue;
            }
            let mut m = parse_core(r)?;
            let p = r.len(MAX_QUEUES, "position count")?;
            for _ in 0..p {
                m.positions
                    .push((r.u16("next avail")?, r.u16("next used")?));
            }
            mmio.push(Some(m));
        }
        let n = r.len(MAX_ROUTES, "route count")?;
        let mut msi_routes = Vec::with_capacity(n);
        for _ in 0..n {
            msi_routes.push((r.u32("gsi")?, r.u64("msi address")?, r.u32("msi data")?));
        }
        let next_gsi = r.u32("next gsi")?;
        let cards = if version >= 2 {
            parse_cards(r, &pci)?
        } else {
            Vec::new()
        };
        if version == STATE_VERSION_V1 && pci.ports.iter().any(|p| p.present) {
            // Format 1 never carried a card, so no slot of it can report one.
            return Err(StateError::Malformed("port presence"));
        }
        Ok(MachineState {
            version,
            config,
            paused_at_ns,
            running,
            vm,
            vcpus,
            serial,
            console,
            pci,
            mmio,
            msi_routes,
            next_gsi,
            cards,
        })
    }
}

/// A virtio device's transport registers and queues: the same layout for a virtio-mmio slot
/// and a card's virtio-pci common configuration.
fn encode_core(w: &mut Writer, m: &MmioState) {
    for v in [
        m.device_type,
        m.status,
        m.device_features_sel,
        m.driver_features_sel,
    ] {
        w.u32(v);
    }
    w.u64(m.acked_features);
    for v in [m.queue_sel, m.config_generation, m.irq_status] {
        w.u32(v);
    }
    w.bool(m.active);
    w.len(m.queues.len());
    for q in &m.queues {
        encode_queue(w, q);
    }
}

/// The reader of [`encode_core`]'s layout (positions and vectors are the caller's).
fn parse_core(r: &mut Reader<'_>) -> Result<MmioState, StateError> {
    let mut m = MmioState {
        device_type: r.u32("device type")?,
        status: r.u32("device status")?,
        device_features_sel: r.u32("features select")?,
        driver_features_sel: r.u32("driver features select")?,
        acked_features: r.u64("acked features")?,
        queue_sel: r.u32("queue select")?,
        config_generation: r.u32("config generation")?,
        irq_status: r.u32("interrupt status")?,
        active: r.bool("active")?,
        ..Default::default()
    };
    let q = r.len(MAX_QUEUES, "queue count")?;
    for _ in 0..q {
        m.queues.push(QueueRegs {
            max_size: r.u16("queue max size")?,
            size: r.u16("queue size")?,
            ready: r.bool("queue ready")?,
            desc: r.u64("queue desc")?,
            avail: r.u64("queue avail")?,
            used: r.u64("queue used")?,
        });
    }
    Ok(m)
}

fn encode_queue(w: &mut Writer, q: &QueueRegs) {
    w.u16(q.max_size);
    w.u16(q.size);
    w.bool(q.ready);
    w.u64(q.desc);
    w.u64(q.avail);
    w.u64(q.used);
}

fn encode_card(w: &mut Writer, c: &CardState) {
    w.u8(c.port);
    w.bytes(c.id.as_bytes());
    w.u8(c.kind.code());
    w.bool(c.read_only);
    w.raw(&c.cfg[..]);
    w.bool(c.touched);
    encode_core(w, &c.core);
    w.len(c.msix.len());
    for e in &c.msix {
        w.u64(e.address);
        w.u32(e.data);
        w.bool(e.masked);
    }
    w.u16(c.msix_config);
    w.len(c.queue_vectors.len());
    for v in &c.queue_vectors {
        w.u16(*v);
    }
    w.u32(c.gsi_base);
    let v = &c.vhost;
    w.u64(v.backend_features);
    w.bool(v.protocol.is_some());
    w.u64(v.protocol.unwrap_or(0));
    w.u64(v.acked_features);
    w.u32(v.active_queues);
    w.bool(v.started);
    w.bytes(&c.device_config);
}

/// The card section (format 2): every field bounded, and each card checked against itself
/// and against the PCI state read before it (its port exists, reports a card, holds only it).
fn parse_cards(r: &mut Reader<'_>, pci: &PciState) -> Result<Vec<CardState>, StateError> {
    let n = r.len(MAX_CARDS, "card count")?;
    let mut cards: Vec<CardState> = Vec::with_capacity(n);
    for i in 0..n {
        let c = parse_card(r).map_err(|e| match e {
            StateError::Malformed(at) => StateError::BadCard { card: i, at },
            other => other,
        })?;
        let bad = |at| StateError::BadCard { card: i, at };
        let port = pci.ports.get(usize::from(c.port)).ok_or(bad("port"))?;
        if !port.present {
            return Err(bad("port presence"));
        }
        if cards.iter().any(|o| o.port == c.port) {
            return Err(bad("port taken twice"));
        }
        if cards.iter().any(|o| o.id == c.id) {
            return Err(bad("id taken twice"));
        }
        cards.push(c);
    }
    // A slot that reports a card must have one.
    for (i, p) in pci.ports.iter().enumerate() {
        if p.present && !cards.iter().any(|c| usize::from(c.port) == i) {
            return Err(StateError::Malformed("port presence"));
        }
    }
    Ok(cards)
}

fn parse_card(r: &mut Reader<'_>) -> Result<CardState, StateError> {
    let port = r.u8("card port")?;
    let id_bytes = r.bytes(MAX_CARD_ID, "card id")?;
    let id_ok = !id_bytes.is_empty()
        && id_bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if !id_ok {
        return Err(StateError::Malformed("card id"));
    }
    let id = String::from_utf8(id_bytes).map_err(|_| StateError::Malformed("card id"))?;
    let kind = CardKind::of_code(r.u8("card kind")?).ok_or(StateError::Malformed("card kind"))?;
    let read_only = r.bool("card read-only")?;
    if read_only && kind != CardKind::Block {
        return Err(StateError::Malformed("card read-only"));
    }
    let cfg = r.array("card config space")?;
    let touched = r.bool("card touched")?;
    let core = parse_core(r)?;
    if core.device_type != kind.device_type() {
        return Err(StateError::Malformed("card device type"));
    }
    let nq = core.queues.len();
    if nq == 0 {
        return Err(StateError::Malformed("card queue count"));
    }
    let nv = r.len(MAX_VECTORS, "card vector count")?;
    if nv != (nq + 1).min(MAX_VECTORS) {
        return Err(StateError::Malformed("card vector count"));
    }
    let mut msix = Vec::with_capacity(nv);
    for _ in 0..nv {
        msix.push(MsixEntryState {
            address: r.u64("card msi-x address")?,
            data: r.u32("card msi-x data")?,
            masked: r.bool("card msi-x mask")?,
        });
    }
    let msix_config = r.u16("card config vector")?;
    let n = r.len(MAX_QUEUES, "card queue vector count")?;
    if n != nq {
        return Err(StateError::Malformed("card queue vector count"));
    }
    let mut queue_vectors = Vec::with_capacity(n);
    for _ in 0..n {
        queue_vectors.push(r.u16("card queue vector")?);
    }
    let in_table = |v: u16| v == 0xffff || usize::from(v) < nv;
    if !in_table(msix_config) || !queue_vectors.iter().all(|v| in_table(*v)) {
        return Err(StateError::Malformed("card vector"));
    }
    let gsi_base = r.u32("card gsi base")?;
    let backend_features = r.u64("card backend features")?;
    let has_protocol = r.bool("card protocol")?;
    let protocol = r.u64("card protocol features")?;
    if !has_protocol && protocol != 0 {
        return Err(StateError::Malformed("card protocol features"));
    }
    let vhost = VhostUserState {
        backend_features,
        protocol: has_protocol.then_some(protocol),
        acked_features: r.u64("card vhost acked features")?,
        active_queues: r.u32("card active queues")?,
        started: r.bool("card started")?,
    };
    if usize::try_from(vhost.active_queues).map_or(true, |a| a > nq) {
        return Err(StateError::Malformed("card active queues"));
    }
    let device_config = r.bytes(MAX_DEVICE_CONFIG, "card device config")?;
    Ok(CardState {
        port,
        id,
        kind,
        read_only,
        cfg,
        touched,
        core,
        msix,
        msix_config,
        queue_vectors,
        gsi_base,
        vhost,
        device_config,
    })
}

#[cfg(test)]
#[path = "state_tests.rs"]
pub(crate) mod tests;
