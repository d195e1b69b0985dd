//! The peer of the card-update bench: qemu-storage-daemon exporting the same volume file over
//! vhost-user-blk, restarted (SIGTERM, a new process on the same socket) under the same driver
//! and the same `VhostUserBlk`, which `resume_at` the used index (what `Vm::replace_block` does
//! when the old backend cannot stop its rings).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{finish, wait_connect, Guest, Run, Update, UPDATES, WINDOW};

/// How long a qemu-storage-daemon may take to exit after SIGTERM before it is killed and the
/// bench fails.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// A qemu-storage-daemon process, ended on drop.
struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether qemu-storage-daemon runs here.
pub fn available() -> bool {
    Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn spawn_qsd(dir: &Path, img: &Path, sock: &Path) -> Qsd {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("qsd.log"))
        .expect("qsd.log");
    Qsd(Command::new("qemu-storage-daemon")
        .arg("--blockdev").arg(format!("driver=file,node-name=file0,filename={},cache.direct=on,aio=threads", img.display()))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export").arg(format!("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=1,logical-block-size=4096", sock.display()))
        .stdin(Stdio::null()).stdout(Stdio::null()).stderr(log)
        .spawn().expect("spawn qemu-storage-daemon"))
}

/// SIGTERM, then up to [`TERM_GRACE`] for the process to exit; past that it is killed and the
/// bench fails (a restart that cannot end the old process is no restart).
fn stop(q: &mut Qsd) {
    let pid = i32::try_from(q.0.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid (not yet waited for) with a plain signal number.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let until = Instant::now() + TERM_GRACE;
    while q
        .0
        .try_wait()
        .expect("wait for qemu-storage-daemon")
        .is_none()
    {
        if Instant::now() >= until {
            let _ = q.0.kill();
            let _ = q.0.wait();
            panic!("qemu-storage-daemon did not exit within {TERM_GRACE:?} of SIGTERM (killed)");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn qsd_run(dir: &Path, img: &Path, qd: u16) -> Run {
    let sock = dir.join("qsd.sock");
    let mut g = Guest::new();
    let mut qsd = spawn_qsd(dir, img, &sock);
    let mut dev = g.first(wait_connect(&sock));
    let begin = Instant::now();
    let stop_io = Arc::new(AtomicBool::new(false));
    let t = g.start_driver(qd, begin, &stop_io);
    let mut updates = Vec::new();
    for _ in 0..UPDATES {
        if t.is_finished() {
            break; // The driver failed: `finish` reports why.
        }
        std::thread::sleep(WINDOW);
        let from = begin.elapsed();
        stop(&mut qsd);
        let t_rep = Instant::now();
        qsd = spawn_qsd(dir, img, &sock);
        let nd = g.replace(&mut dev, wait_connect(&sock), false);
        let replace = t_rep.elapsed();
        let to = begin.elapsed();
        drop(std::mem::replace(&mut dev, nd));
        updates.push(Update {
            from,
            to,
            handover: None,
            replace,
        });
    }
    let run = finish(&g, &stop_io, t, updates);
    drop(dev);
    drop(qsd);
    run
}
