"""What this machine does fast, measured: CPU model and ISA, bf16 instructions, matmul rates per
dtype, the cores and the memory this process may use.

Why measure: torch emulates bf16 on CPUs without bf16 dot-product instructions, so bf16 autocast
*runs* everywhere; on an AVX2-only CPU it runs ~100x slower than fp32 (0.9 vs 87 GFLOP/s measured on
an AMD EPYC), on an AVX512-BF16 one ~2x faster. "It runs" says nothing about speed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

# The probe multiplies at the shapes of a small Llama's projections (tokens x hidden x intermediate).
PROBE_SHAPE = (512, 576, 1536)
# On a CPU without bf16 instructions the emulated bf16 path is measured on a small product only, to
# quote its rate in the reason without spending seconds on it.
SLOW_PROBE_SHAPE = (64, 576, 576)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    capability: str  # torch's ISA level for its CPU kernels: DEFAULT, AVX2, AVX512, ...
    avx512_bf16: bool
    amx: bool

    @property
    def bf16_instructions(self) -> bool:
        return self.avx512_bf16 or self.amx

    @property
    def isa(self) -> str:
        extras = [name for name, on in (("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx)) if on]
        return "+".join([self.capability, *extras])


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    import torch

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        model = platform.processor() or model
    return CpuInfo(
        model=model,
        capability=str(torch.backends.cpu.get_cpu_capability()),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        amx=bool(torch.cpu._is_amx_tile_supported()),
    )


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (`cpu.max`) or v1 (`cfs_quota_us`) quota, None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def available_memory_bytes() -> int:
    """Memory this process can still take: MemAvailable, capped by a cgroup limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        import psutil  # not on Linux: psutil comes with accelerate

        available = psutil.virtual_memory().available
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                available = min(available, int(limit) - int(Path(usage_file).read_text()))
            break
        except (OSError, ValueError):
            continue
    return max(0, available)


def configure_threads() -> int:
    """torch threads = the cores this process may use (not the host's count), unless the user set
    OMP_NUM_THREADS; returns the count. Warns when the load average says the cores are shared."""
    import torch

    cores = usable_cores()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores)
    warn_if_cores_shared(cores)
    return torch.get_num_threads()


_warned_shared = False


def _looks_busy(cores: int) -> bool:
    try:
        return os.getloadavg()[0] >= cores + 0.5
    except (AttributeError, OSError):
        return False


def warn_if_cores_shared(cores: int) -> None:
    global _warned_shared
    if _looks_busy(cores) and not _warned_shared:
        _warned_shared = True
        load = os.getloadavg()[0]
        from llamaforge.console import warn

        warn(
            f"the cores look shared (load average {load:.1f} on {cores} usable cores): two torch jobs on the "
            "same cores slow each other several-fold; timings taken now are not representative"
        )


def matmul_flops(dtype_name: str, shape: tuple[int, int, int] = PROBE_SHAPE, seconds: float = 0.15) -> float:
    """Best-of-bursts rate (FLOP/s) of an (m x k) @ (k x n) product in `dtype_name` on the CPU: the best
    short burst, so that other processes on a shared machine bias it less than a long mean would."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up: kernel selection, thread pool
    flops, best = 2.0 * m * k * n, 0.0
    deadline = time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, flops / max(time.perf_counter() - start, 1e-9))
    return best


def peak_flops(dtype_name: str, seconds: float = 1.0) -> float:
    """The CPU's matmul peak in a dtype, best of short bursts of 1024^3 products (for MFU)."""
    return matmul_flops(dtype_name, (1024, 1024, 1024), seconds)


@dataclass(frozen=True)
class PrecisionProbe:
    """Measured matmul rates (GFLOP/s) of bf16 and fp32 on this CPU."""

    cpu: str
    torch_version: str
    bf16_gflops: float
    fp32_gflops: float
    bf16_shape: tuple[int, int, int]
    fp32_shape: tuple[int, int, int]


def probe_cache_path(info: CpuInfo) -> Path:
    import torch

    home = Path(os.environ.get("LLAMAFORGE_HOME", Path.home() / ".cache" / "llamaforge")).expanduser()
    key = "".join(c if c.isalnum() else "-" for c in f"{info.model}-{info.isa}-torch{torch.__version__}")
    return home / "hardware" / f"{key}.json"


def probe_cpu_precision(info: CpuInfo | None = None) -> PrecisionProbe:
    """bf16 vs fp32 matmul rates, cached per machine (CPU model, ISA, torch version) under
    $LLAMAFORGE_HOME/hardware/. Well under a second when not cached."""
    info = info or cpu_info()
    path = probe_cache_path(info)
    if path in _probes:
        return _probes[path]
    _probes[path] = probe = _read_or_measure(info, path)
    return probe


_probes: dict[Path, PrecisionProbe] = {}


def _read_or_measure(info: CpuInfo, path: Path) -> PrecisionProbe:
    import torch

    try:
        cached = json.loads(path.read_text())
        return PrecisionProbe(
            **{**cached, "bf16_shape": tuple(cached["bf16_shape"]), "fp32_shape": tuple(cached["fp32_shape"])}
        )
    except (OSError, ValueError, TypeError, KeyError):
        pass
    bf16_shape = PROBE_SHAPE if info.bf16_instructions else SLOW_PROBE_SHAPE
    probe = PrecisionProbe(
        cpu=info.model,
        torch_version=torch.__version__,
        bf16_gflops=round(matmul_flops("bf16", bf16_shape) / 1e9, 1),
        fp32_gflops=round(matmul_flops("fp32", PROBE_SHAPE) / 1e9, 1),
        bf16_shape=bf16_shape,
        fp32_shape=PROBE_SHAPE,
    )
    if _looks_busy(usable_cores()):
        return probe  # measured under contention: good enough to decide, not to keep
    try:  # a read-only home only costs the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(probe)))
        tmp.replace(path)
    except OSError:
        pass
    return probe


def process_rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- the CPU allocator

# glibc's malloc serves requests above a threshold with their own mmap, returned to the system on free.
# By default the threshold *rises* to the size of each such block freed (up to 32 MiB), so after the
# first step every activation of a small model (a few MiB each) comes from the heap, whose freed holes
# are kept: RSS grows from step to step (quickstart's worst micro-batch, SmolLM2-135M LoRA fp32 4 x 377
# tokens, AMD EPYC: 6.3 GB after one step, 9.0 GB after two, for ~3.3 GB of tensors).
# "step": malloc_trim after each step returns the free pages: 1.1 GB resident between steps, and the
#         growth stops (its pages fault in again in the next step: 6.0 vs 5.4 s of system time, noise).
# "eager": a fixed 64 KiB threshold maps and unmaps every activation (4.1 GB after one step, measured),
#         but every new tensor's pages fault in: 15.4 s vs 5.4 s of system time for 24 s of compute.
EAGER_MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_CONF")
_allocator: dict[str, object] = {"mode": "off"}


def _glibc():
    """The C library when it is glibc (its malloc tunables exist), else None (macOS, musl, Windows)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def configure_allocator(mode: str = "step") -> str:
    """Apply `train.release_memory` (step | eager | off) to this process; returns what was done.

    Left alone when the user tuned malloc already (MALLOC_* variables, a preloaded jemalloc/tcmalloc)
    or the C library is not glibc. The eager threshold is process-wide and stays for the process's life
    (glibc has no way back to its dynamic threshold)."""
    _allocator["mode"] = "off"
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "allocator: left as set (LD_PRELOAD; train.release_memory tunes glibc's malloc only)"
    if mode == "off":
        return "allocator: glibc defaults (train.release_memory off)"
    user = [name for name in _ALLOCATOR_ENV if name in os.environ]
    if user:
        return f"allocator: left as set ({', '.join(user)})"
    libc = _glibc()
    if libc is None:
        return "allocator: not glibc, left as is"
    if mode == "eager" and not libc.mallopt(_M_MMAP_THRESHOLD, EAGER_MMAP_THRESHOLD):
        return "allocator: glibc refused the mmap threshold, left as is"
    _allocator["mode"] = mode
    eager = f", blocks over {EAGER_MMAP_THRESHOLD >> 10} KiB mapped on their own" if mode == "eager" else ""
    return f"allocator: free pages returned after each step{eager}"


# jemalloc serves each size class from its own runs and returns freed pages after a decay, so the freed
# activations of one micro-batch are reused by the next instead of leaving holes in one heap.
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/opt/homebrew/lib/libjemalloc.2.dylib",
)
_PRELOADED_MARK = "LLAMAFORGE_ALLOCATOR_PRELOADED"


def find_jemalloc() -> str | None:
    """The shared jemalloc library on this machine (Debian/Ubuntu: `apt install libjemalloc2`), else None."""
    import ctypes.util

    for path in JEMALLOC_PATHS:
        if Path(path).is_file():
            return path
    return ctypes.util.find_library("jemalloc")  # a bare soname the dynamic loader resolves


def running_allocator() -> str:
    """The allocator this process runs on, for the planner's slack: "jemalloc" or "glibc"."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"


def allocator_in_use(choice: str) -> str:
    """The allocator `llamaforge train` would run on with `train.allocator` = choice: the one preloaded
    already, else jemalloc when `preload_allocator(choice)` would preload it, else "glibc"."""
    import sys

    preload = os.environ.get("LD_PRELOAD", "")
    if preload or choice == "system" or sys.platform != "linux" or os.environ.get(_PRELOADED_MARK):
        return running_allocator()
    return "jemalloc" if find_jemalloc() else "glibc"


def preload_allocator(choice: str, *, may_reexec: bool = True) -> str:
    """Apply `train.allocator` (auto | jemalloc | system) before any work: when jemalloc is wanted and
    not yet loaded, re-execute this very command once with it in LD_PRELOAD (this call then does not
    return). Returns the line to print about the allocator in use. Raises ConfigError when `jemalloc`
    was asked for explicitly and is missing (auto falls back to the C library's malloc).

    `may_reexec` is False when the command runs inside a caller's process (the CLI's `main(argv)`
    called from Python): replacing that process would end the caller, so it keeps its allocator."""
    import sys

    from llamaforge.errors import ConfigError

    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        why = "re-executed with it" if os.environ.get(_PRELOADED_MARK) else "LD_PRELOAD"
        return f"allocator: {os.path.basename(preload.split(':')[0])} ({why})"
    if choice == "system":
        return "allocator: the C library's malloc (train.allocator system)"
    if sys.platform != "linux":
        if choice == "jemalloc":
            raise ConfigError("train.allocator=jemalloc: preloading it is supported on Linux only")
        return "allocator: the C library's malloc (jemalloc is preloaded on Linux only)"
    if os.environ.get(_PRELOADED_MARK):  # preloaded, yet not loaded: never loop
        return "allocator: the C library's malloc (the jemalloc preload did not take)"
    lib = find_jemalloc()
    if lib is not None and not may_reexec:
        if choice == "jemalloc":
            raise ConfigError(
                "train.allocator=jemalloc needs `llamaforge train` as its own process (it re-executes "
                "itself with the library preloaded); called from Python, preload it yourself (LD_PRELOAD)"
            )
        return "allocator: the C library's malloc (called from Python: jemalloc is preloaded by the CLI only)"
    if lib is None:
        if choice == "jemalloc":
            raise ConfigError(
                "train.allocator=jemalloc but no libjemalloc was found (Debian/Ubuntu: apt install "
                "libjemalloc2); use train.allocator=auto to fall back to the C library's malloc"
            )
        return (
            "allocator: the C library's malloc (no libjemalloc found; apt install libjemalloc2 lowers "
            "the peak memory of training)"
        )
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (lib, preload) if p), **{_PRELOADED_MARK: "1"})
    print(
        f"allocator: re-running with {lib} preloaded (train.allocator {choice}: it keeps less freed "
        "memory resident than glibc's heap)",
        flush=True,
    )
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    raise AssertionError("unreachable")  # pragma: no cover


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc malloc_trim) after a phase that allocated
    much and kept little (an optimizer step, evaluation, generation), when configure_allocator turned
    it on. Returns whether memory was released."""
    libc = _glibc() if _allocator["mode"] != "off" else None
    return bool(libc.malloc_trim(0)) if libc is not None else False


def process_peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
