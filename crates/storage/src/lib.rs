//! `bulkhead-storage`: the storage node. It serves volume ciphertext (hosts' block cards
//! encrypt before anything leaves a host) over standard NBD with TLS 1.3 and host
//! certificates, using existing engines through one supervised qemu-storage-daemon child: a
//! raw sparse file per volume, or a Ceph RBD image. The control plane creates, grants,
//! revokes and deletes volumes over a mutual-TLS control API; a grant names the one host that
//! may open a volume and a generation, and moving it fences every other host at once.
//!
//! Modules: [`table`] (the durable volume table and its parser), [`engine`] + [`qmp`]
//! (qemu-storage-daemon), [`node`] (the operations, behind one lock), [`control`] (the HTTP
//! surface), [`nbd_server`] (the NBD listener), [`conns`] (live connections, for fencing),
//! [`tls`], [`sandbox`].

pub mod conns;
pub mod control;
pub mod engine;
pub mod nbd_server;
pub mod node;
pub mod qmp;
pub mod sandbox;
pub mod table;
pub mod tls;
