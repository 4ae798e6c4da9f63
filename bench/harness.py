"""The one benchmark harness every fastlin bench uses (bench/bench.py, bench/test_bench.py, and the
GPU bench): interleaved timing of several contenders, and the hardware limits measured in the same run.

Timing (``measure``):
  * every contender is warmed up first (compilation, thread pools, caches of the allocator);
  * then ``repeats`` rounds; each round times every contender once, in an order rotated by one each
    round (A B C, B C A, C A B, ...), so slow drift of a shared machine hits all of them alike and
    none always runs right after the same neighbour;
  * a contender is a callable ``run(round_index)``: the index lets it rotate between several copies
    of its inputs where the cache would otherwise flatter it (``rotation_count``);
  * on CUDA each timed run is bracketed by CUDA events after a synchronize (the host launch cost is
    included, as the user pays it); on the CPU by ``time.perf_counter``;
  * the result per contender is ``Stats``: median, min, max of the timed runs, and all the samples.

Limits (``Limits``), measured in the same process right before the contenders run:
  * read bandwidth: the fastest of a few honest streaming reads over buffers far larger than the
    last-level cache, all threads (``torch.sum`` / ``torch.amax`` of a float32 buffer, ``torch.sum``
    of the case's own x): bytes / median time. The fastest of the first timings and, when it is
    another buffer, the read of x are both timed again in the interleaved rounds and the faster
    there counts (on a VM two large buffers can read up to ~15% apart, by where their pages landed
    or by the neighbours' load at the time, and the contenders read x). The name of the winner is
    reported, and the read of x beside it;
  * GEMM rate: a square float32 matmul (and one in the case's dtype if it is not float32), flops
    / median time, the fastest one.
  * ``limit_seconds(bytes_read, flops)`` = max(bytes / bandwidth, flops / gemm_rate): no
    implementation that reads those bytes and does those flops can beat it on this machine.

Memory (``peak_extra_memory``): the peak memory a callable needs beyond what exists before it.
  * CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before (the caching allocator sees every tensor; kernels must not cudaMalloc behind its back).
  * CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the
    resident set before. It sees every allocation, torch's and the C++ kernels' own, once touched.
    glibc would hide temporaries by re-using freed heap memory, so run it in a process started with
    MALLOC_MMAP_THRESHOLD_=65536 (``memory_probe_env()``): every block of 64 KiB or more is then a
    fresh mapping, given back on free. Smaller blocks can still come from the heap unseen, so the
    resolution is about 64 KiB per live allocation (plus page rounding).

Use from another bench (e.g. a GPU one):

    from bench.harness import Contender, Limits, measure, format_table
    lim = Limits.measure(device="cuda", sample=x)     # picks the fastest read and GEMM, in this run
    stats = measure([Contender("stock", run_stock), Contender("fastlin", run_fastlin), *lim.probes()],
                    repeats=10, warmup=3, device="cuda")  # run(r) does `steps` training steps
    lim.update(stats)                                 # bandwidth / GEMM rate from the same rounds
    limit = lim.limit_seconds(bytes_read=steps * x.nbytes, flops=steps * 4 * N * D * O)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

# ----------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass
class Stats:
    """Seconds per timed run of one contender."""

    median: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Contender:
    """``run(round_index)`` does the timed work once. ``setup(round_index)``, if given, runs untimed
    before each timed run (e.g. to reset parameters). ``skip`` is a reason not to run it ("n/a")."""

    name: str
    run: Callable[[int], Any] | None
    setup: Callable[[int], Any] | None = None
    skip: str | None = None


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device="cpu") -> float:
    """Seconds one call of fn takes, synchronised on CUDA (events), perf_counter on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(
    contenders: list[Contender],
    *,
    repeats: int = 7,
    warmup: int = 2,
    device="cpu",
    min_seconds: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Stats | None]:
    """Interleaved timing of the contenders -> {name: Stats, or None for a skipped one}.

    repeats: timed rounds (each times every contender once, in rotated order). warmup: untimed
    runs per contender first. min_seconds: keep adding rounds (at most 100x repeats) until every
    contender has at least this much timed in total (cheap cases then get more samples)."""
    live = [c for c in contenders if c.skip is None]
    for c in live:
        for w in range(warmup):
            if c.setup is not None:
                c.setup(-1 - w)
            c.run(-1 - w)
        _sync(device)
        if log:
            log(f"  warmed up {c.name}")
    samples: dict[str, list[float]] = {c.name: [] for c in live}
    r = 0
    while live and (r < repeats or min(sum(v) for v in samples.values()) < min_seconds) and r < 100 * repeats:
        k = r % len(live)
        for c in live[k:] + live[:k]:
            if c.setup is not None:
                c.setup(r)
                _sync(device)
            samples[c.name].append(time_once(lambda c=c, r=r: c.run(r), device))
        r += 1
    return {c.name: (Stats.of(samples[c.name]) if c.skip is None else None) for c in contenders}


def cache_bytes() -> int:
    """Last-level cache size in bytes (from sysfs; 32 MiB if unknown)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 32 * 1024**2


def rotation_count(nbytes: int, device="cpu", max_copies: int = 8) -> int:
    """How many copies of an input of nbytes to rotate between so that consecutive runs do not find
    it in the last-level cache: enough to pass 2x the cache, at most max_copies. 1 when the input
    alone is already that big, and 1 when even max_copies could not evict it (such an input is
    cache-resident in real use too, like the seed's 400-byte x)."""
    if torch.device(device).type == "cuda":
        llc = torch.cuda.get_device_properties(torch.device(device)).L2_cache_size
    else:
        llc = cache_bytes()
    need = -(-2 * llc // max(1, nbytes))
    return 1 if need <= 1 or need > max_copies else need


# ----------------------------------------------------------------------------------------------
# limits


@dataclasses.dataclass
class Limits:
    """Machine limits measured in this run: read bandwidth (bytes/s) and GEMM rate (flop/s).

    ``measure`` tries the candidates and keeps the fastest read and the fastest GEMM; ``probes()``
    turns those two (and the read of the sample x, when it was not the fastest) into contenders for
    ``measure()``'s rounds and ``update(stats)`` re-derives the rates from their interleaved
    medians, the faster read counting, so the limit drifts with the machine like the contenders do
    (on a shared machine the bandwidth moves by 2x within minutes)."""

    read_bandwidth: float
    read_method: str
    gemm_rate: float
    gemm_method: str
    details: dict
    _read: tuple | None = dataclasses.field(default=None, repr=False)  # (fn, bytes) of the winner
    _gemm: tuple | None = dataclasses.field(default=None, repr=False)  # (fn, flops) of the winner
    _x: tuple | None = dataclasses.field(default=None, repr=False)  # (fn, bytes, name) of x, if not _read
    _read_name: str = dataclasses.field(default="", repr=False)  # the first timings' winner

    @classmethod
    def measure(
        cls,
        device="cpu",
        sample: torch.Tensor | None = None,
        dtypes=(torch.float32,),
        buffer_bytes: int | None = None,
        repeats: int = 5,
    ) -> Limits:
        """Measure both limits. sample: the case's x; when it is far larger than the cache, its read
        is a candidate too (it is what the kernels read), timed again beside the winner in the
        rounds if another buffer wins here; dtypes: GEMM dtypes to try in addition to float32 (the
        fastest counts)."""
        device = torch.device(device)
        details: dict[str, float] = {}
        if buffer_bytes is None:
            # Far larger than any cache: 8x the LLC, at least 256 MiB (the CPU) / 1 GiB (a GPU).
            floor = 1 << 30 if device.type == "cuda" else 1 << 28
            buffer_bytes = max(floor, 8 * (cache_bytes() if device.type == "cpu" else 0))
        buf = torch.ones(
            buffer_bytes // 4, dtype=torch.float32, device=device
        )  # touched: no page faults timed
        mib = buffer_bytes >> 20
        cands: dict[str, tuple[Callable[[], Any], int]] = {
            f"torch.sum(float32 buffer, {mib} MiB)": (lambda: buf.sum(), buf.nbytes),
            f"torch.amax(float32 buffer, {mib} MiB)": (lambda: buf.amax(), buf.nbytes),
        }
        big = 2 * (
            cache_bytes() if device.type == "cpu" else torch.cuda.get_device_properties(device).L2_cache_size
        )
        if sample is not None and sample.nbytes >= big:
            name = f"torch.sum(x {tuple(sample.shape)} {str(sample.dtype).replace('torch.', '')})"
            cands[name] = (lambda: sample.sum(), sample.nbytes)
        for name, (fn, nbytes) in cands.items():
            fn()
            _sync(device)
            t = statistics.median(time_once(fn, device) for _ in range(repeats))
            details[f"read: {name}"] = nbytes / t
        reads = [k for k in details if k.startswith("read:")]
        read_name = max(reads, key=details.get)
        read = cands[read_name[len("read: ") :]]
        x_name = next((k[len("read: ") :] for k in reads if k.startswith("read: torch.sum(x ")), None)
        gemms = {}
        m = 2048 if device.type == "cpu" else 8192
        for dt in dict.fromkeys((torch.float32, *dtypes)):
            a = torch.randn(m, m, device=device).to(dt)
            b = torch.randn(m, m, device=device).to(dt)
            name = f"torch.mm {m}x{m}x{m} {str(dt).replace('torch.', '')}"
            gemms[name] = (lambda a=a, b=b: torch.mm(a, b), 2 * m**3)
            torch.mm(a, b)
            _sync(device)
            t = statistics.median(time_once(gemms[name][0], device) for _ in range(max(3, repeats // 2)))
            details[f"gemm: {name}"] = 2 * m**3 / t
        gemm_name = max((k for k in details if k.startswith("gemm:")), key=details.get)
        return cls(
            details[read_name],
            read_name[len("read: ") :],
            details[gemm_name],
            gemm_name[len("gemm: ") :],
            details,
            read,
            gemms[gemm_name[len("gemm: ") :]],
            (*cands[x_name], x_name) if x_name and "read: " + x_name != read_name else None,
            read_name[len("read: ") :],
        )

    def probes(self) -> list[Contender]:
        """The winning read and GEMM as contenders ("limit: read", "limit: gemm") for measure(), and
        the read of x ("limit: read of x") when it was not the winner."""
        out = [
            Contender("limit: read", lambda r: self._read[0]()),
            Contender("limit: gemm", lambda r: self._gemm[0]()),
        ]
        if self._x is not None:
            out.append(Contender("limit: read of x", lambda r: self._x[0]()))
        return out

    def update(self, stats: dict) -> None:
        """Take the read bandwidth and GEMM rate from the probes' interleaved medians (the faster of
        the two reads when x's was timed too)."""
        if stats.get("limit: read"):
            self.read_bandwidth = self._read[1] / stats["limit: read"].median
            self.read_method = self._read_name or self.read_method
            self.details["read (interleaved median)"] = self.read_bandwidth
        if self._x is not None and stats.get("limit: read of x"):
            bw = self._x[1] / stats["limit: read of x"].median
            self.details["read of x (interleaved median)"] = bw
            if bw > self.read_bandwidth:
                self.read_bandwidth, self.read_method = bw, self._x[2]
        if stats.get("limit: gemm"):
            self.gemm_rate = self._gemm[1] / stats["limit: gemm"].median
            self.details["gemm (interleaved median)"] = self.gemm_rate

    def release(self) -> None:
        """Drop the probe buffers."""
        self._read = self._gemm = self._x = None

    def limit_seconds(self, bytes_read: float, flops: float) -> float:
        """Lower bound on the time to read bytes_read once and do flops: the slower of the two."""
        return max(bytes_read / self.read_bandwidth, flops / self.gemm_rate)

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
# memory


def memory_probe_env() -> dict:
    """Environment for a process that measures CPU peak memory with peak_extra_memory()."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed threshold: no dynamic raise, big blocks never reused
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    return env


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_memory(fn: Callable[[], Any], device="cpu") -> int:
    """Bytes of memory fn needs at its peak beyond what was live before it (see the module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        raise RuntimeError("peak_extra_memory on the CPU needs a process started with memory_probe_env()")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before)


def run_module(module: str, args: list[str], env: dict | None = None, timeout: float = 600) -> str:
    """Run ``python -m module args`` (e.g. a memory probe) from the repository root; its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return out.stdout


# ----------------------------------------------------------------------------------------------
# reporting


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table (first column left-aligned, the others right-aligned)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for j, r in enumerate([headers, *rows]):
        cells = [str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info(device="cpu") -> dict:
    """What the figures came from: CPU model, threads, torch version, and the GPU if any."""
    import platform

    info = {
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "llc_bytes": cache_bytes(),
        # Other jobs on a shared machine: the 1-minute load average vs the CPUs tells how contended it was.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
