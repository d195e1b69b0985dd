//! Port-I/O devices: the COM1 UART and the i8042 reset line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::{Console, ConsoleWriter};

/// COM1 base port and width.
pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
/// i8042 data and command/status ports.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// Writing this to the i8042 command port pulses the CPU reset line.
pub const I8042_CMD_RESET: u8 = 0xfe;

/// An irqfd-backed interrupt line for the UART.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a port access meant for the VM.
#[derive(Debug, PartialEq, Eq)]
pub enum PioOutcome {
    Handled,
    /// The guest asked for a reset: with `reboot=k` this is how Linux powers off here.
    Reset,
}

/// All port-I/O devices of one VM.
pub struct PioBus {
    serial: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>,
    pub unknown_accesses: Arc<AtomicU64>,
}

impl PioBus {
    pub fn new(console: Console, serial_irq: EventFd) -> Self {
        PioBus {
            serial: Serial::new(IrqLine(serial_irq), ConsoleWriter(console)),
            unknown_accesses: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The eventfd the UART raises its interrupt on.
    pub fn serial_irq(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// The UART's registers and receive FIFO (live update).
    pub fn serial_regs(&self) -> crate::live_update::state::SerialRegs {
        let s = self.serial.state();
        crate::live_update::state::SerialRegs {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
        }
    }

    /// Rebuilds the UART from the registers the old process had (live update), raising its
    /// interrupt on `irq` and writing into `console`. `None` if the FIFO is too long.
    pub fn restore_serial(
        &mut self,
        regs: &crate::live_update::state::SerialRegs,
        irq: EventFd,
        console: Console,
    ) -> Option<()> {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = regs.regs;
        let state = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: regs.fifo.clone(),
        };
        self.serial = Serial::from_state(
            &state,
            IrqLine(irq),
            vm_superio::serial::NoEvents,
            ConsoleWriter(console),
        )
        .ok()?;
        Some(())
    }

    /// A guest `in` instruction: fills `data`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) && data.len() == 1 {
            data[0] = self.serial.read(offset(port));
            return;
        }
        match port {
            // i8042: no output buffer, not busy; ready for a command.
            I8042_DATA | I8042_COMMAND => data.fill(0),
            _ => {
                self.unknown_accesses.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff)
            }
        }
    }

    /// A guest `out` instruction.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PioOutcome {
        if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) && data.len() == 1 {
            if let Err(e) = self.serial.write(offset(port), data[0]) {
                tracing::warn!(error = ?e, "serial write failed");
            }
            return PioOutcome::Handled;
        }
        if port == I8042_COMMAND && data.first() == Some(&I8042_CMD_RESET) {
            return PioOutcome::Reset;
        }
        if port != I8042_COMMAND && port != I8042_DATA {
            self.unknown_accesses.fetch_add(1, Ordering::Relaxed);
        }
        PioOutcome::Handled
    }
}

fn offset(port: u16) -> u8 {
    u8::try_from(port - COM1_BASE).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_output_reaches_the_console_and_reset_is_seen() {
        let console = Console::new(1024, false);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut bus = PioBus::new(console.clone(), irq);
        for b in b"hi" {
            assert_eq!(bus.write(COM1_BASE, &[*b]), PioOutcome::Handled);
        }
        assert!(console.contains(b"hi"));
        assert_eq!(bus.write(I8042_COMMAND, &[0xfe]), PioOutcome::Reset);
        // Garbage on unknown ports is counted, never fatal.
        let mut d = [0u8; 4];
        bus.read(0x1234, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(bus.write(0x80, &[1, 2, 3]), PioOutcome::Handled);
        // A multi-byte access to the UART is ignored.
        assert_eq!(bus.write(COM1_BASE, &[1, 2]), PioOutcome::Handled);
    }
}
