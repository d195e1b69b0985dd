//! Block card update → I/O resumed (issue 14), with its peer, in one run (`make bench` via
//! `scripts/bench-card-update.sh`; `cargo bench -p bulkhead-hypervisor --bench card_update`).
//! Prints a markdown section on stdout. No guest kernel: a driver thread (benches/card_update/
//! driver.rs) keeps random 4 KiB writes and reads in flight on a virtqueue in memfd guest memory
//! and checks every read against what was written.
//!
//! * Bulkhead: a keyed block card (AES-256-XTS, ephemeral key) on a volume file is replaced
//!   [`UPDATES`] times by a new card process, the way the controller's `update_card_vm` does it:
//!   `TakeOver` to the new card and `HandOver` to the old one, each with one end of a
//!   socketpair riding beside the frame; `HandedOver` / `Attached{encrypted}`; then the
//!   device's rings move as the hypervisor's `Vm::replace_block` moves them: the hypervisor's
//!   own `VhostUserBlk` (`connect` to the new card, `stop_for_replace` on the old, `resume_at`
//!   on the new at the old card's ring bases); the old card must then exit 0.
//! * Peer: qemu-storage-daemon exporting the same volume file over vhost-user-blk is restarted
//!   (SIGTERM, a new process on the same socket) and the same device reconnects the way
//!   `Vm::replace_block` treats a backend that cannot stop its rings: `resume_at` at the used
//!   indexes, so the requests that were in flight are taken again by the new process.
//!
//! For both, the stall is the longest gap between two consecutive completed requests that
//! overlaps the update (the I/O stall a guest would see).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "card_update/driver.rs"]
mod driver;
#[path = "card_update/peer.rs"]
mod peer;
#[path = "shared/percentile.rs"]
mod percentile;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_card_proto::{
    self as proto, AttachSpec, ControlRequest, ControlResponse, CryptoSectorSize, KeySource,
    VolumeId,
};
use bulkhead_hypervisor::devices::vhost_blk::VhostUserBlk;
use bulkhead_hypervisor::devices::virtio::{Activation, QueueRegs, VirtioDevice};
use bulkhead_hypervisor::memory::GuestRam;
use percentile::pct;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const UPDATES: usize = 20;
const VOLUME_MIB: u64 = 64;
/// I/O before and after each update (the rates compare these windows).
const WINDOW: Duration = Duration::from_millis(300);
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// One update as measured.
struct Update {
    /// The update's span in the driver's clock: first control request (card) or SIGTERM
    /// (qsd) to the rings running on the new backend.
    from: Duration,
    to: Duration,
    /// `HandOver` round trip, as the controller times it (card only).
    handover: Option<Duration>,
    /// Ring move: connect + stop old rings + new backend takes them.
    replace: Duration,
}

struct Run {
    updates: Vec<Update>,
    rec: driver::Record,
    before_iops: Vec<f64>,
    after_iops: Vec<f64>,
}

/// A file's name without its directory (a failure's text names no temporary path).
fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn wait_connect(p: &Path) -> UnixStream {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = UnixStream::connect(p) {
            return s;
        }
        assert!(
            Instant::now() < until,
            "nothing listens on {}",
            file_name(p)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The guest side: memory, one queue, its ioeventfd and irqfd.
struct Guest {
    ram: Arc<GuestRam>,
    queues: Vec<QueueRegs>,
    kicks: Vec<EventFd>,
    irqs: Vec<Arc<EventFd>>,
    irq_status: Arc<std::sync::atomic::AtomicU32>,
    acked: u64,
}

impl Guest {
    fn new() -> Guest {
        let ram = Arc::new(GuestRam::new(64).expect("guest ram"));
        for a in [driver::AVAIL, driver::USED] {
            ram.mem.write_obj(0u32, GuestAddress(a)).expect("ring");
        }
        let q = driver::QUEUE_SIZE;
        Guest {
            ram,
            queues: vec![QueueRegs {
                max_size: q,
                size: q,
                ready: true,
                desc: driver::DESC,
                avail: driver::AVAIL,
                used: driver::USED,
            }],
            kicks: vec![EventFd::new(EFD_NONBLOCK).expect("kick")],
            irqs: vec![Arc::new(EventFd::new(EFD_NONBLOCK).expect("irq"))],
            irq_status: Arc::default(),
            acked: 0,
        }
    }
    fn act(&self) -> Activation<'_> {
        Activation {
            mem: &self.ram.mem,
            memfd_regions: &self.ram.regions,
            memfd: self.ram.memfd.as_raw_fd(),
            queues: &self.queues,
            acked_features: self.acked,
            irqs: &self.irqs,
            irq_status: &self.irq_status,
            kicks: &self.kicks,
        }
    }
    fn used_idx(&self) -> u16 {
        self.ram
            .mem
            .read_obj(GuestAddress(driver::USED + 2))
            .expect("used idx")
    }
    /// The device's first backend: handshake, features the guest acks, rings at 0.
    fn first(&mut self, s: UnixStream) -> VhostUserBlk {
        let mut dev = VhostUserBlk::connect(s, false, 1).expect("handshake");
        self.acked = dev.features() & (VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
        dev.activate(self.act()).expect("activate");
        dev
    }
    /// What `Vm::replace_block` does once it has the new backend's socket. `strict` (a card):
    /// the old backend must stop its rings and report exactly the used index (a card completes
    /// what it took before it stops). Not strict (the qsd peer, already gone): the used index.
    fn replace(&self, old: &mut VhostUserBlk, s: UnixStream, strict: bool) -> VhostUserBlk {
        let mut dev = VhostUserBlk::connect(s, false, 1).expect("new backend handshake");
        assert_eq!(
            dev.config().get(0..8),
            old.config().get(0..8),
            "capacity changed"
        );
        assert_eq!(
            self.acked & !dev.features(),
            0,
            "new backend lacks acked features"
        );
        let stopped = old.stop_for_replace();
        let used = vec![self.used_idx()];
        let bases = match stopped {
            Some(Ok(b)) if strict => {
                assert_eq!(b, used, "the old card's ring bases are not the used index");
                b
            }
            Some(Ok(b)) if b.len() == 1 => b,
            other => {
                let other = other.map(|r| r.map_err(|e| e.to_string()));
                assert!(!strict, "the old card did not stop its rings: {other:?}");
                used
            }
        };
        dev.resume_at(&self.act(), &bases)
            .expect("new backend takes the rings");
        dev
    }
    fn start_driver(
        &self,
        qd: u16,
        begin: Instant,
        stop: &Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<driver::Record> {
        let d = driver::Driver::new(
            self.ram.clone(),
            self.kicks[0].try_clone().expect("kick"),
            self.irqs[0].clone(),
            VOLUME_MIB * 256,
            qd,
        );
        let stop = stop.clone();
        std::thread::spawn(move || d.run(begin, stop))
    }
}

struct Card {
    child: Child,
    ctl: UnixStream,
    vhost: PathBuf,
}

/// Ends the process if the bench stops early (a failed check): no card or qsd outlives it.
impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_card(dir: &Path, bin: &Path, name: &str, img: &Path) -> Card {
    let ctl_path = dir.join(format!("{name}.ctl"));
    let vhost = dir.join(format!("{name}.sock"));
    let child = Command::new(bin)
        .arg("--control-socket")
        .arg(&ctl_path)
        .arg("--vhost-socket")
        .arg(&vhost)
        .arg("--backing")
        .arg(img)
        .args(["--queues", "1", "--uid", "65534", "--gid", "65534"])
        .env("BULKHEAD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"))
        .spawn()
        .expect("spawn bulkhead-blockcard");
    let ctl = wait_connect(&ctl_path);
    ctl.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    Card { child, ctl, vhost }
}

/// The old card's exit, which must follow its frontend leaving after a hand-over (bounded).
pub(crate) fn wait_exit(c: &mut Child) -> std::process::ExitStatus {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = c.try_wait().expect("wait") {
            return st;
        }
        assert!(Instant::now() < until, "the card did not exit within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn answer(c: &mut Card) -> ControlResponse {
    let b = proto::read_frame(&mut c.ctl)
        .expect("answer")
        .expect("a frame");
    ControlResponse::parse(&b).expect("parse")
}

fn send_with_end(c: &Card, req: &ControlRequest, end: &UnixStream) {
    let f = proto::frame(&req.encode()).expect("frame");
    bulkhead_hypervisor_client::send_packet(c.ctl.as_raw_fd(), &f, Some(end.as_raw_fd()))
        .expect("send with fd");
}

fn rate(c: &[Duration], from: Duration, to: Duration) -> f64 {
    let n = c.iter().filter(|&&t| t >= from && t < to).count();
    n as f64 / (to - from).as_secs_f64()
}

/// The longest gap between consecutive completions that overlaps `[from, to]`.
fn stall(c: &[Duration], from: Duration, to: Duration) -> Duration {
    c.windows(2)
        .filter(|w| w[1] >= from && w[0] <= to)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_else(|| {
            panic!(
                "no two completions around the update at {from:?}..{to:?}: the I/O did not resume"
            )
        })
}

fn finish(
    g: &Guest,
    stop: &Arc<AtomicBool>,
    t: std::thread::JoinHandle<driver::Record>,
    updates: Vec<Update>,
) -> Run {
    std::thread::sleep(WINDOW);
    stop.store(true, Ordering::Relaxed);
    let _ = g.kicks[0].write(1);
    let rec = t.join().expect("driver failed: see the panic above");
    let before_iops = updates
        .iter()
        .map(|u| rate(&rec.completions, u.from.saturating_sub(WINDOW), u.from))
        .collect();
    let after_iops = updates
        .iter()
        .map(|u| rate(&rec.completions, u.to, u.to + WINDOW))
        .collect();
    Run {
        updates,
        rec,
        before_iops,
        after_iops,
    }
}

fn card_run(dir: &Path, bin: &Path, img: &Path, qd: u16) -> Run {
    let mut g = Guest::new();
    let mut old = spawn_card(dir, bin, &format!("q{qd}-0"), img);
    let r = proto::call(
        &mut old.ctl,
        &ControlRequest::Attach(AttachSpec {
            volume_id: VolumeId::new("bench-vol").expect("id"),
            sector_size: CryptoSectorSize::S4096,
            key: KeySource::Ephemeral,
        }),
    )
    .expect("attach");
    assert!(
        matches!(
            r,
            ControlResponse::Attached {
                encrypted: true,
                ..
            }
        ),
        "attach: {r:?}"
    );
    let mut dev = g.first(wait_connect(&old.vhost));
    let begin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let t = g.start_driver(qd, begin, &stop);
    let mut updates = Vec::new();
    for i in 1..=UPDATES {
        if t.is_finished() {
            break; // The driver failed: `finish` reports why.
        }
        let mut new = spawn_card(dir, bin, &format!("q{qd}-{i}"), img);
        std::thread::sleep(WINDOW);
        let from = begin.elapsed();
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        send_with_end(&new, &ControlRequest::TakeOver, &theirs);
        drop(theirs);
        let t_hand = Instant::now();
        send_with_end(&old, &ControlRequest::HandOver, &ours);
        let handed = answer(&mut old);
        let handover = t_hand.elapsed();
        drop(ours);
        assert!(
            matches!(handed, ControlResponse::HandedOver),
            "HandOver: {handed:?}"
        );
        let taken = answer(&mut new);
        assert!(
            matches!(
                taken,
                ControlResponse::Attached {
                    encrypted: true,
                    ..
                }
            ),
            "TakeOver: {taken:?}"
        );
        let t_rep = Instant::now();
        let s = wait_connect(&new.vhost);
        let nd = g.replace(&mut dev, s, true);
        let replace = t_rep.elapsed();
        let to = begin.elapsed();
        drop(std::mem::replace(&mut dev, nd));
        let st = wait_exit(&mut old.child);
        assert!(st.success(), "old card exited {st} after the hand-over");
        old = new;
        updates.push(Update {
            from,
            to,
            handover: Some(handover),
            replace,
        });
    }
    let run = finish(&g, &stop, t, updates);
    drop(dev);
    let r = proto::call(&mut old.ctl, &ControlRequest::Detach).expect("detach");
    assert!(matches!(r, ControlResponse::Detached), "Detach: {r:?}");
    let st = wait_exit(&mut old.child);
    assert!(st.success(), "the last card exited {st} after Detach");
    drop(old);
    run
}

/// The 1-minute load average now.
fn load_1min() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().next().unwrap_or("?").to_string()
}

/// The CPU model as /proc/cpuinfo names it.
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or_else(|| "CPU model unknown".into(), |(_, m)| m.trim().to_string())
}

/// On a failure (a panic unwinding `main`), prints the last lines of the newest card and qsd
/// logs before the temporary directory holding them is removed.
struct LogTails(PathBuf);

impl Drop for LogTails {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        // The newest three: the backends of the run that failed.
        logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        for p in &logs[logs.len().saturating_sub(3)..] {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {} ---", file_name(p));
            for l in &lines[lines.len().saturating_sub(8)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stalls(r: &Run) -> Vec<f64> {
    r.updates
        .iter()
        .map(|u| ms(stall(&r.rec.completions, u.from, u.to)))
        .collect()
}

fn row(label: &str, v: &[f64]) -> String {
    format!(
        "| {label} | {:.1} ms | {:.1} ms | {:.1} ms |",
        pct(v, 50),
        pct(v, 99),
        pct(v, 100)
    )
}

fn main() {
    let exe = std::env::current_exe().expect("exe");
    let card = std::env::var_os("BULKHEAD_CARD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .join("bulkhead-blockcard")
        });
    assert!(
        card.is_file(),
        "{} not built in this target dir (cargo build --release -p bulkhead-blockcard)",
        file_name(&card)
    );
    let load = load_1min();
    let dir = tempfile::Builder::new()
        .prefix("bhcardupd")
        .tempdir()
        .expect("tmp");
    // Dropped before `dir`: on a failure, the logs' last lines reach stderr before they go.
    let _tails = LogTails(dir.path().to_path_buf());
    let img = dir.path().join("vol.img");
    std::fs::File::create(&img)
        .expect("img")
        .set_len(VOLUME_MIB << 20)
        .expect("size");
    let mut out = vec![
        "## Block card update → I/O resumed".to_string(),
        String::new(),
    ];
    let mut card_runs = Vec::new();
    for qd in [1u16, 32] {
        eprintln!("card-update bench: Bulkhead, QD {qd}");
        card_runs.push((qd, card_run(dir.path(), &card, &img, qd)));
    }
    // The card opens its backing O_DIRECT and falls back to buffered I/O if the file system
    // refuses: say which one was measured.
    let first_log = std::fs::read_to_string(dir.path().join("q1-0.log")).unwrap_or_default();
    let mode = if first_log.contains("direct=true") {
        "O_DIRECT"
    } else if first_log.contains("direct=false") {
        "buffered"
    } else {
        "not logged"
    };
    let have_qsd = peer::available();
    let mut qsd_runs = Vec::new();
    if have_qsd {
        for qd in [1u16, 32] {
            eprintln!("card-update bench: qemu-storage-daemon restart, QD {qd}");
            qsd_runs.push((qd, peer::qsd_run(dir.path(), &img, qd)));
        }
    }
    let load_end = load_1min();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    out.push(format!(
        "`scripts/bench-card-update.sh` (`cargo bench -p bulkhead-hypervisor --bench card_update`); \
         {cpus} CPUs available to the bench ({}); host 1-min load average {load} at start, \
         {load_end} at end. {UPDATES} updates per \
         run of a keyed block card (AES-256-XTS, 4 KiB crypto sectors) on a {VOLUME_MIB} MiB volume \
         file (card I/O mode as it logged it: {mode}), each to a new card process: `TakeOver`/`HandOver` over the card control sockets with a \
         socketpair, as the controller sends them, then the rings moved by the hypervisor's own \
         `VhostUserBlk` (`stop_for_replace` on the old card, `resume_at` on the new one, as \
         `Vm::replace_block` does). The I/O is random 4 KiB requests, half writes and half reads of \
         blocks written before, from a driver thread on a virtqueue in memfd guest memory (no guest \
         kernel); every read is checked against the last write to its block, and after each run every \
         block written is read back and checked. **Stall** = the longest gap between two consecutive \
         completed requests overlapping the update (the I/O pause a guest would see); \
         percentiles by nearest rank (of {UPDATES} updates, p50 is the 10th and p99 the largest).",
        cpu_model()
    ));
    out.push(String::new());
    out.push("| Bulkhead card update | p50 | p99 | max |".into());
    out.push("|---|---|---|---|".into());
    for (qd, r) in &card_runs {
        out.push(row(&format!("stall, QD {qd}"), &stalls(r)));
        let h: Vec<f64> = r
            .updates
            .iter()
            .filter_map(|u| u.handover.map(ms))
            .collect();
        out.push(row(
            &format!("`HandOver` round trip (key to the new card; I/O continues), QD {qd}"),
            &h,
        ));
        let m: Vec<f64> = r.updates.iter().map(|u| ms(u.replace)).collect();
        out.push(row(
            &format!("ring move (connect, stop old rings, new card takes them), QD {qd}"),
            &m,
        ));
    }
    out.push(String::new());
    out.push("The cards do not log a hand-over time; the `HandOver` round trip is timed here as the controller times it.".into());
    out.push(String::new());
    out.push("| run | requests checked (in run + read back after) | IOPS before (p50 of 300 ms windows) | IOPS after | stall p50 | stall p99 | stall max |".into());
    out.push("|---|---|---|---|---|---|---|".into());
    let mut line = |name: &str, qd: u16, r: &Run| {
        let s = stalls(r);
        out.push(format!(
            "| {name}, QD {qd} | {} + {} | {:.0} | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms |",
            r.rec.completions.len(),
            r.rec.final_checked,
            pct(&r.before_iops, 50),
            pct(&r.after_iops, 50),
            pct(&s, 50),
            pct(&s, 99),
            pct(&s, 100)
        ));
    };
    for (qd, r) in &card_runs {
        line("Bulkhead card update", *qd, r);
    }
    for (qd, r) in &qsd_runs {
        line("qsd restart (peer)", *qd, r);
    }
    out.push(String::new());
    if have_qsd {
        out.push("Peer: qemu-storage-daemon (cache.direct=on, aio=threads) exporting the same volume file \
            over vhost-user-blk, restarted (SIGTERM, new process on the same socket) under the same \
            driver; the same `VhostUserBlk` reconnects and `resume_at` the used index, so the requests \
            in flight are taken again by the new process (what `Vm::replace_block` does when the old \
            backend cannot stop its rings). Its stall includes the new process starting: nothing else \
            can serve the socket meanwhile.".into());
        out.push(String::new());
        for ((qd, c), (_, q)) in card_runs.iter().zip(&qsd_runs) {
            let (cs, qs) = (stalls(c), stalls(q));
            out.push(format!(
                "- QD {qd}: stall p50 ratio Bulkhead / qsd restart = {:.3}, p99 ratio = {:.3}.",
                pct(&cs, 50) / pct(&qs, 50),
                pct(&cs, 99) / pct(&qs, 99)
            ));
        }
    } else {
        out.push("Peer not measured: qemu-storage-daemon is not installed here.".into());
    }
    out.push(String::new());
    println!("{}", out.join("\n"));
}
