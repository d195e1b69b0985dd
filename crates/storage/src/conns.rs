//! Live NBD connections per volume, so that a grant to another host, a revoke or a delete
//! shuts them down at once (fencing).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bulkhead_storage_proto::{HostName, VolumeId};
use tokio::sync::oneshot;

struct Conn {
    id: u64,
    host: HostName,
    cut: oneshot::Sender<()>,
}

/// The registry.
#[derive(Default)]
pub struct Connections {
    by_volume: Mutex<HashMap<VolumeId, Vec<Conn>>>,
    next: AtomicU64,
}

/// Held by a connection's task; dropping it unregisters the connection.
pub struct ConnGuard {
    conns: Arc<Connections>,
    volume: VolumeId,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut m = self.conns.lock();
        if let Some(v) = m.get_mut(&self.volume) {
            v.retain(|c| c.id != self.id);
            if v.is_empty() {
                m.remove(&self.volume);
            }
        }
    }
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, HashMap<VolumeId, Vec<Conn>>> {
        match self.by_volume.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Registers a connection of `host` to `volume`. The receiver fires when it is cut.
    pub fn register(
        self: &Arc<Self>,
        volume: &VolumeId,
        host: &HostName,
    ) -> (ConnGuard, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().entry(volume.clone()).or_default().push(Conn {
            id,
            host: host.clone(),
            cut: tx,
        });
        (
            ConnGuard {
                conns: Arc::clone(self),
                volume: volume.clone(),
                id,
            },
            rx,
        )
    }

    /// Cuts every connection to `volume` except those of `keep`; returns how many.
    pub fn cut(&self, volume: &VolumeId, keep: Option<&HostName>) -> u32 {
        let mut m = self.lock();
        let Some(list) = m.remove(volume) else {
            return 0;
        };
        let (kept, cut): (Vec<Conn>, Vec<Conn>) =
            list.into_iter().partition(|c| Some(&c.host) == keep);
        if !kept.is_empty() {
            m.insert(volume.clone(), kept);
        }
        let n = u32::try_from(cut.len()).unwrap_or(u32::MAX);
        for c in cut {
            let _ = c.cut.send(());
        }
        n
    }

    /// Live connections to `volume`.
    pub fn count(&self, volume: &VolumeId) -> u32 {
        self.lock()
            .get(volume)
            .map_or(0, |v| u32::try_from(v.len()).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cut_spares_the_kept_host_and_guards_unregister() {
        let c = Arc::new(Connections::default());
        let v = VolumeId::new("vol-1").unwrap();
        let h1 = HostName::new("host-1").unwrap();
        let h2 = HostName::new("host-2").unwrap();
        let (g1, mut r1) = c.register(&v, &h1);
        let (_g2, mut r2) = c.register(&v, &h2);
        assert_eq!(c.count(&v), 2);
        assert_eq!(c.cut(&v, Some(&h2)), 1);
        assert!(r1.try_recv().is_ok());
        assert!(r2.try_recv().is_err());
        assert_eq!(c.count(&v), 1);
        drop(g1);
        assert_eq!(c.count(&v), 1);
        assert_eq!(c.cut(&v, None), 1);
        assert_eq!(c.count(&v), 0);
    }
}
