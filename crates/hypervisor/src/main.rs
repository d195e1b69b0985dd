//! `bulkhead-hypervisor`: run one VM, standalone (development) or under the controller.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_hypervisor::sandbox::{self, ThreadRole};
use bulkhead_hypervisor::vm::{ExitReason, Vm, VmConfig};
use bulkhead_hypervisor::{live_update, server, Error};
use clap::{Args, Parser, Subcommand};

/// Default kernel arguments for the test guest on this kind of machine (see guest/README.md).
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

#[derive(Parser)]
#[command(
    name = "bulkhead-hypervisor",
    version,
    about = "Bulkhead's minimal KVM hypervisor"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest with its console on stdout; exit when it powers off.
    Run {
        #[command(flatten)]
        vm: VmArgs,
        /// vhost-user block backend socket to attach (repeatable); `PATH` or `PATH,ro`.
        #[arg(long = "block")]
        blocks: Vec<String>,
        /// vhost-user net backend (net card) socket to attach (repeatable); the card decides
        /// the MAC. The guest sees the cards as eth0, eth1, ... in this order.
        #[arg(long = "net")]
        nets: Vec<PathBuf>,
    },
    /// Serve the private command channel inherited as fd N (used by the controller).
    Serve {
        #[command(flatten)]
        vm: VmArgs,
        #[arg(long)]
        channel_fd: i32,
        /// Read the guest command line from inherited fd N (a pipe) instead of `--cmdline`, so
        /// the customer's user data in it never shows in `/proc/PID/cmdline`.
        #[arg(long)]
        cmdline_fd: Option<i32>,
    },
    /// Live update, the new process's side: take over a running VM from the hypervisor at the
    /// other end of the inherited hand-over socket (fd M), then serve the private command
    /// channel inherited as fd N. The VM's shape and memory come from the old process.
    Incoming {
        #[arg(long)]
        channel_fd: i32,
        #[arg(long)]
        handover_fd: i32,
        /// Drop to this uid:gid once the VM is built (when started as root).
        #[arg(long)]
        run_as: Option<String>,
    },
    /// Check that this binary can run guests on this host: its seccomp filters load, /dev/kvm
    /// opens with the expected API, a VM with an in-kernel irqchip, PIT and one vCPU can be
    /// created, and the capabilities the hypervisor relies on are there. Exit 0 or 1. Run by
    /// the controller on a new release before any guest moves to it.
    SelfTest,
}

#[derive(Args)]
struct VmArgs {
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Threads per core reported to the guest (vCPUs must be a multiple).
    #[arg(long, default_value_t = 1)]
    threads_per_core: u8,
    /// Host CPUs to pin vCPU threads to, e.g. `2,3`.
    #[arg(long, value_delimiter = ',')]
    pin: Option<Vec<usize>>,
    /// Drop to this uid:gid after set-up (when started as root).
    #[arg(long)]
    run_as: Option<String>,
}

impl VmArgs {
    fn config(&self, echo: bool) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            threads_per_core: self.threads_per_core,
            echo_console: echo,
            pin: self.pin.clone(),
        }
    }
    fn run_as(&self) -> Result<Option<(u32, u32)>, Error> {
        parse_run_as(self.run_as.as_deref())
    }
}

fn parse_run_as(s: Option<&str>) -> Result<Option<(u32, u32)>, Error> {
    let Some(s) = s else {
        return Ok(None);
    };
    let bad = || Error::Sandbox(format!("--run-as wants UID:GID, got {s:?}"));
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok(Some((
        u.parse().map_err(|_| bad())?,
        g.parse().map_err(|_| bad())?,
    )))
}

fn run(vm_args: VmArgs, blocks: Vec<String>, nets: Vec<PathBuf>) -> Result<ExitReason, Error> {
    // Nothing inherited survives except stdio; everything the VM needs is opened below.
    sandbox::close_other_fds(&[])?;
    let mut vm = Vm::new(vm_args.config(true))?;
    for (i, spec) in blocks.iter().enumerate() {
        let (path, ro) = match spec.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (spec.as_str(), false),
        };
        let stream = UnixStream::connect(path).map_err(Error::DiskSocket)?;
        vm.attach_block(&format!("blk{i}"), stream, ro)?;
    }
    for (i, path) in nets.iter().enumerate() {
        let stream = UnixStream::connect(path).map_err(Error::NetSocket)?;
        vm.attach_net(&format!("net{i}"), stream)?;
    }
    sandbox::harden_process(vm_args.run_as()?)?;
    // The main thread's filter goes on before the vCPUs start (as under `serve`): they inherit
    // it beneath their own, and once they run this thread has nothing left to do but wait, so
    // vCPU 0's first KVM_RUN does not share a CPU with the filter's compilation.
    sandbox::apply_thread_filter(ThreadRole::Main)?;
    vm.start()?;
    Ok(vm.wait())
}

/// Most bytes read from `--cmdline-fd`.
const MAX_CMDLINE_FD_BYTES: u64 = 64 * 1024;

/// Reads the guest command line from an inherited pipe and closes it.
fn read_cmdline_fd(fd: i32) -> Result<String, Error> {
    use std::io::Read as _;
    use std::os::fd::FromRawFd as _;
    if fd < 3 {
        return Err(Error::CmdlineFd(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an inherited fd",
        )));
    }
    // SAFETY: the parent passed `fd` to us for this purpose alone and nothing else in this
    // process uses it; `File` takes ownership and closes it when dropped.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut s = String::new();
    f.take(MAX_CMDLINE_FD_BYTES)
        .read_to_string(&mut s)
        .map_err(Error::CmdlineFd)?;
    Ok(s)
}

fn serve(mut vm_args: VmArgs, channel_fd: i32, cmdline_fd: Option<i32>) -> Result<(), Error> {
    if let Some(fd) = cmdline_fd {
        vm_args.cmdline = read_cmdline_fd(fd)?;
    }
    sandbox::close_other_fds(&[channel_fd])?;
    let channel = server::channel_from_fd(channel_fd).map_err(Error::ChannelFd)?;
    let mut vm = Vm::new(vm_args.config(false))?;
    sandbox::harden_process(vm_args.run_as()?)?;
    sandbox::apply_thread_filter(ThreadRole::Main)?;
    server::serve(&mut vm, channel);
    Ok(())
}

fn incoming(channel_fd: i32, handover_fd: i32, run_as: Option<String>) -> Result<(), Error> {
    let run_as = parse_run_as(run_as.as_deref())?;
    sandbox::close_other_fds(&[channel_fd, handover_fd])?;
    let channel = server::channel_from_fd(channel_fd).map_err(Error::ChannelFd)?;
    let handover = live_update::handover_from_fd(handover_fd).map_err(Error::ChannelFd)?;
    let mut vm = live_update::incoming(&handover, run_as)?;
    drop(handover);
    // The vCPU threads installed their own filters; the main thread's comes after them.
    sandbox::apply_thread_filter(ThreadRole::Main)?;
    server::serve(&mut vm, channel);
    Ok(())
}

/// `--self-test`, run by the host's measured start before it takes customer work: the
/// sandbox filters of every thread role compile for this kernel's architecture.
fn self_test() -> ExitCode {
    match bulkhead_harden::self_test(sandbox::FILTERS) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-hypervisor: self-test failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The KVM capabilities every VM this hypervisor builds relies on.
const REQUIRED_CAPS: &[(kvm_ioctls::Cap, &str)] = &[
    (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
    (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
    (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (kvm_ioctls::Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (kvm_ioctls::Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// `bulkhead-hypervisor self-test`: see [`Cmd::SelfTest`].
fn release_self_test() -> ExitCode {
    let fail = |what: &str| {
        eprintln!("bulkhead-hypervisor: self-test failed: {what}");
        ExitCode::FAILURE
    };
    if let Err(e) = bulkhead_harden::self_test(sandbox::FILTERS) {
        return fail(&format!("seccomp filters: {e}"));
    }
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => return fail(&format!("open /dev/kvm: {e}")),
    };
    if kvm.get_api_version() != 12 {
        return fail("KVM API version is not 12");
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return fail(&format!("{name} missing"));
        }
    }
    let vm = match kvm.create_vm() {
        Ok(v) => v,
        Err(e) => return fail(&format!("KVM_CREATE_VM: {e}")),
    };
    if let Err(e) = vm.create_irq_chip() {
        return fail(&format!("KVM_CREATE_IRQCHIP: {e}"));
    }
    if let Err(e) = vm.create_vcpu(0) {
        return fail(&format!("KVM_CREATE_VCPU: {e}"));
    }
    println!(
        "bulkhead-hypervisor {}: self-test ok",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--self-test") {
        return self_test();
    }
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "warn");
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run { vm, blocks, nets } => run(vm, blocks, nets).map(|r| match r {
            ExitReason::GuestReset | ExitReason::Commanded => ExitCode::SUCCESS,
            other => {
                eprintln!("bulkhead-hypervisor: guest stopped: {other:?}");
                ExitCode::from(3)
            }
        }),
        Cmd::Serve {
            vm,
            channel_fd,
            cmdline_fd,
        } => serve(vm, channel_fd, cmdline_fd).map(|_| ExitCode::SUCCESS),
        Cmd::Incoming {
            channel_fd,
            handover_fd,
            run_as,
        } => incoming(channel_fd, handover_fd, run_as).map(|_| ExitCode::SUCCESS),
        Cmd::SelfTest => Ok(release_self_test()),
    };
    bulkhead_daemon::exit_code("bulkhead-hypervisor", result)
}
