//! One PCI function's configuration space, with per-bit write masks: what the root ports and
//! every PCI device model share. No device logic lives here.

/// Size of a conventional configuration space.
pub const CONFIG_SIZE: usize = 256;

/// One function's configuration space with per-bit write masks.
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    /// Bits the guest may write.
    wmask: [u8; CONFIG_SIZE],
    /// Bits a guest write of 1 clears (status registers).
    w1c: [u8; CONFIG_SIZE],
}

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            w1c: [0; CONFIG_SIZE],
        }
    }
}

impl ConfigSpace {
    /// Reads `data.len()` bytes at `off`; bytes past the end read as all ones.
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = off
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A guest write: only writable bits change; write-one-to-clear bits clear.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(o) = off.checked_add(i).filter(|o| *o < CONFIG_SIZE) else {
                return;
            };
            let (cur, wm, wc) = (self.bytes[o], self.wmask[o], self.w1c[o]);
            self.bytes[o] = ((cur & !wm) | (v & wm)) & !(v & wc);
        }
    }

    /// Every byte as the guest reads it (live update; the masks are the model's, rebuilt).
    pub fn bytes(&self) -> [u8; CONFIG_SIZE] {
        self.bytes
    }

    /// Puts back the bytes [`ConfigSpace::bytes`] gave in the old process.
    pub fn restore_bytes(&mut self, bytes: &[u8; CONFIG_SIZE]) {
        self.bytes = *bytes;
    }

    pub fn u8_at(&self, off: usize) -> u8 {
        self.bytes.get(off).copied().unwrap_or(0)
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.u8_at(off), self.u8_at(off + 1)])
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.u8_at(off),
            self.u8_at(off + 1),
            self.u8_at(off + 2),
            self.u8_at(off + 3),
        ])
    }

    /// Sets a value the VMM owns (not subject to masks).
    pub fn set(&mut self, off: usize, v: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(off..off + v.len()) {
            dst.copy_from_slice(v);
        }
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.set(off, &v.to_le_bytes());
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.set(off, &v.to_le_bytes());
    }
    /// Marks bits writable by the guest.
    pub fn writable(&mut self, off: usize, mask: &[u8]) {
        if let Some(dst) = self.wmask.get_mut(off..off + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }
    /// Marks bits write-one-to-clear.
    pub fn clear_on_write(&mut self, off: usize, mask: &[u8]) {
        if let Some(dst) = self.w1c.get_mut(off..off + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// The common type-0/type-1 header fields.
    pub fn header(&mut self, vendor: u16, device: u16, class: u32, revision: u8, header: u8) {
        self.set_u16(0x00, vendor);
        self.set_u16(0x02, device);
        // Command: I/O, memory, bus master, parity, SERR#, INTx disable.
        self.writable(0x04, &[0x47, 0x05]);
        // Status: capabilities list.
        self.set_u16(0x06, 0x0010);
        self.set_u32(0x08, (class << 8) | u32::from(revision));
        self.set(0x0e, &[header]);
        self.writable(0x3c, &[0xff]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_write_one_to_clear() {
        let mut c = ConfigSpace::default();
        c.set_u16(0x10, 0x00f0);
        c.writable(0x10, &[0x0f]);
        c.write(0x10, &[0xff, 0xff]);
        assert_eq!(c.u16_at(0x10), 0x00ff, "only writable bits change");
        c.set_u16(0x20, 0x0109);
        c.clear_on_write(0x20, &[0x08, 0x01]);
        c.write(0x20, &[0x08, 0x00]);
        assert_eq!(c.u16_at(0x20), 0x0101, "1 clears a w1c bit, 0 leaves it");
        let mut out = [0u8; 4];
        c.read(254, &mut out);
        assert_eq!(out[2..], [0xff, 0xff], "past the end reads all ones");
    }
}
