//! A page of memory for secrets: private anonymous mapping, mlock'd (never swapped),
//! `MADV_DONTDUMP` (absent from core dumps), `MADV_WIPEONFORK`, zeroized and unmapped on drop.

use zeroize::Zeroize;

/// Errors setting up a locked page.
#[derive(Debug, thiserror::Error)]
pub enum LockedSecretError {
    #[error("mmap of a secret page failed: {0}")]
    Map(#[source] std::io::Error),
    #[error("mlock of a secret page failed (RLIMIT_MEMLOCK too low?): {0}")]
    Lock(#[source] std::io::Error),
    #[error("madvise(MADV_DONTDUMP) of a secret page failed: {0}")]
    DontDump(#[source] std::io::Error),
}

const PAGE: usize = 4096;

/// `N` secret bytes at the start of their own locked page.
pub struct LockedSecret<const N: usize> {
    ptr: std::ptr::NonNull<[u8; N]>,
}

// SAFETY: the page is exclusively owned by this value; access goes through &self/&mut self.
unsafe impl<const N: usize> Send for LockedSecret<N> {}
// SAFETY: shared access only hands out `&[u8; N]`, which is Sync.
unsafe impl<const N: usize> Sync for LockedSecret<N> {}

impl<const N: usize> LockedSecret<N> {
    const FITS: () = assert!(N <= PAGE, "a LockedSecret must fit in one page");

    /// Maps, locks and marks a fresh zeroed page.
    pub fn new() -> Result<Self, LockedSecretError> {
        #[allow(clippy::let_unit_value)]
        let () = Self::FITS;
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(LockedSecretError::Map(std::io::Error::last_os_error()));
        }
        let Some(ptr) = std::ptr::NonNull::new(raw.cast::<[u8; N]>()) else {
            return Err(LockedSecretError::Map(std::io::Error::other(
                "null mapping",
            )));
        };
        // From here on `Drop` unmaps the page on every error path.
        let this = Self { ptr };
        // SAFETY: `raw` is a PAGE-sized mapping we own.
        if unsafe { libc::madvise(raw, PAGE, libc::MADV_DONTDUMP) } != 0 {
            return Err(LockedSecretError::DontDump(std::io::Error::last_os_error()));
        }
        // Best effort: a forked child sees zeros instead of the secret.
        // SAFETY: as above.
        let _ = unsafe { libc::madvise(raw, PAGE, libc::MADV_WIPEONFORK) };
        // SAFETY: as above.
        if unsafe { libc::mlock(raw, PAGE) } != 0 {
            return Err(LockedSecretError::Lock(std::io::Error::last_os_error()));
        }
        Ok(this)
    }
}

impl<const N: usize> AsRef<[u8; N]> for LockedSecret<N> {
    fn as_ref(&self) -> &[u8; N] {
        // SAFETY: `ptr` points to a live, page-aligned, zero-initialised mapping of PAGE >= N
        // bytes owned by `self` (checked in `new`); u8 has no invalid bit patterns.
        unsafe { self.ptr.as_ref() }
    }
}

impl<const N: usize> AsMut<[u8; N]> for LockedSecret<N> {
    fn as_mut(&mut self) -> &mut [u8; N] {
        // SAFETY: as in `as_ref`, and `&mut self` guarantees exclusive access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<const N: usize> Drop for LockedSecret<N> {
    fn drop(&mut self) {
        self.as_mut().zeroize();
        let raw = self.ptr.as_ptr().cast::<libc::c_void>();
        // SAFETY: `raw` is the PAGE-sized mapping created in `new` and not used after this.
        unsafe {
            libc::munlock(raw, PAGE);
            libc::munmap(raw, PAGE);
        }
    }
}

impl<const N: usize> std::fmt::Debug for LockedSecret<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedSecret<{N}>(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_page_is_zeroed_and_writable() {
        let mut s = LockedSecret::<64>::new().expect("locked page");
        assert_eq!(s.as_ref(), &[0u8; 64]);
        s.as_mut()[3] = 7;
        assert_eq!(s.as_ref()[3], 7);
        assert_eq!(format!("{s:?}"), "LockedSecret<64>(<redacted>)");
    }
}
