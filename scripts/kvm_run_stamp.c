/* LD_PRELOAD shim used by scripts/bench_hypervisor.py to time every peer the same way: the
 * CLOCK_MONOTONIC time at which the process first calls ioctl(fd, KVM_RUN, 0), i.e. the moment its
 * VMM hands vCPU 0 to KVM and the next instruction executed is the guest's. The stamp is taken in
 * the libc `ioctl` wrapper, before the real call, and stored (decimal nanoseconds) in the file
 * named by $KVM_RUN_STAMP. The file is created and mapped MAP_SHARED when the shim loads, so taking
 * the stamp makes no system call at all: it works under a VMM's own seccomp filter (Bulkhead's
 * vCPU threads may not open files) and survives the process being killed. Works for any dynamically linked VMM that enters KVM through libc's
 * ioctl (Bulkhead, QEMU, a glibc build of Firecracker); a static binary ignores LD_PRELOAD and
 * leaves no stamp, which the bench reports as "not measured".
 *
 *   cc -shared -fPIC -O2 -o kvm_run_stamp.so scripts/kvm_run_stamp.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define KVM_RUN_REQ 0xAE80UL

static int (*real_ioctl)(int, unsigned long, ...);
static char *stamp; /* 32 bytes of the shared mapping, or NULL */
static atomic_int stamped;

__attribute__((constructor)) static void init(void) {
    real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    const char *path = getenv("KVM_RUN_STAMP");
    if (!path)
        return;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (ftruncate(fd, 32) == 0) {
        void *m = mmap(NULL, 32, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED)
            stamp = m;
    }
    close(fd);
}

int ioctl(int fd, unsigned long req, ...) {
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (req == KVM_RUN_REQ && stamp && !atomic_exchange(&stamped, 1)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: no system call */
        snprintf(stamp, 32, "%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    }
    if (!real_ioctl)
        real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    return real_ioctl(fd, req, arg);
}
