"""CPU kernels in C, built on first use with the system C compiler and loaded with ctypes.

Why C and ctypes rather than a torch C++ extension: a plain C file compiles in about a second with no
torch headers and no ninja, so a fresh machine pays almost nothing and nothing is downloaded. The
shared object is cached under `$EPD_CACHE_DIR/kernels`, keyed by the source, the flags and this CPU
(it is built with `-march=native`, so an image moved to another CPU model builds its own), and found
there without a compiler. When neither the cache nor a compiler has it, the build fails, or
`EPD_CPU_KERNELS=0`, callers get `None` and use their portable torch path instead: the kernels are a
speed-up, never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from serving.config import cache_dir, cpu_kernels_enabled
from serving.engine.kernels import decode_layers

log = logging.getLogger(__name__)

# -ffast-math for the compile only (reassociated reductions, glibc's vector expf): linked with it, gcc
# adds crtfastmath.o, whose constructor sets flush-to-zero for the whole process on load, and every
# float op in the worker (torch's included) would silently lose subnormals.
_COMPILE = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-pthread", "-c"]
_LINK = ["-shared", "-pthread"]
_lock = threading.Lock()


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    wanted = ("model name", "flags")
    lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in wanted]
    return "\n".join(lines[: len(wanted)])


def _build(source: Path, extra: tuple[str, ...] = ()) -> Path | None:
    try:
        text = source.read_text()
    except OSError as e:  # an install that left the source out
        log.warning("kernel source %s unreadable, using the torch path: %s", source, e)
        return None
    # Not keyed by the compiler: a worker without one (a slim image) loads what `make install` or
    # the image build left in the cache; it needs a compiler only to build what is not there.
    parts = [text, *_COMPILE, *_LINK, *extra, _cpu_key()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "kernels"
    target = out_dir / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        missing = "no C compiler (cc, gcc or $CC) and no built kernels in the cache: the CPU kernels"
        _problem(
            "no-compiler",
            f"{missing} are off and the torch paths run instead, 2-5x slower; install a compiler, or "
            "build them with `make install` (`python -m serving.engine.kernels`)",
        )
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: workers starting together may build at once, and a
    # reader must never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    obj = tmp[: -len(".so")] + ".o"
    try:
        compile_cmd = [compiler, *_COMPILE, *extra, "-o", obj, str(source)]
        for cmd in (compile_cmd, [compiler, *_LINK, *extra, "-o", tmp, obj, "-lm"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        _problem(
            "failed", f"building {source.name} failed, using the torch path: {e} {detail.decode()[-500:]}"
        )
        Path(tmp).unlink(missing_ok=True)
        return None
    finally:
        Path(obj).unlink(missing_ok=True)
    return target


def _bind_paged_decode(lib: ctypes.CDLL) -> None:
    fn = lib.epd_paged_decode
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, i32, i64, i64, i64, i32, i32, i32, i32, ptr, ptr, ptr, i32]
    fn.argtypes += [ctypes.c_float, ptr, i32]
    fn.restype = i32


def _bind_paged_prefill(lib: ctypes.CDLL) -> None:
    fn = lib.epd_paged_prefill
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, i32, i64, i64, i64, i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, i32]
    fn.argtypes += [ctypes.c_float, ptr, i32]
    fn.restype = i32


def _bind_fused_ops(lib: ctypes.CDLL) -> None:
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.epd_write_kv.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr]
    lib.epd_write_kv.restype = None
    for suffix in ("", "_bf16"):  # float32 and bfloat16 take the same arguments
        for name, args in (
            ("epd_add_rms_norm", [ptr, ptr, ptr, ptr, ptr, i64, i64, f32]),
            ("epd_rotary", [ptr, i64, i64, i64, i64, ptr, ptr]),
            ("epd_silu_mul", [ptr, ptr, i64, i64]),
        ):
            fn = getattr(lib, name + suffix)
            fn.argtypes, fn.restype = args, None


def _bind_small_linear(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.epd_small_linear
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    fn.restype = None
    lib.epd_small_linear_supports.argtypes = [ctypes.c_int]
    lib.epd_small_linear_supports.restype = ctypes.c_int
    lib.epd_small_linear_parallel.argtypes = []
    lib.epd_small_linear_parallel.restype = ctypes.c_int


# Each C source next to this file, and what declares its functions' signatures once it is loaded.
_SOURCES: dict[str, Callable[[ctypes.CDLL], None]] = {
    "paged_decode": _bind_paged_decode,
    "paged_prefill": _bind_paged_prefill,
    "fused_ops": _bind_fused_ops,
    "small_linear": _bind_small_linear,
    "decode_layers": decode_layers.bind,  # its argument structures live in decode_layers.py
}
# Extra flags per source, tried in order until one builds and loads. The few-row linears split a call
# across threads with OpenMP, which torch already loaded (its libgomp, whose team is waiting): without
# OpenMP they still run, on one thread.
_VARIANTS: dict[str, tuple[tuple[str, ...], ...]] = {"small_linear": (("-fopenmp",), ())}
_libraries: dict[str, ctypes.CDLL | None] = {}
_state = ""  # why a kernel is missing, once one is: "no-compiler" or "failed"


def load(name: str) -> ctypes.CDLL | None:
    """The library built from `name`.c, or None when kernels are off or it could not be built (tried
    once per process)."""
    if name in _libraries:
        return _libraries[name]
    with _lock:
        if name not in _libraries:
            lib = None
            if cpu_kernels_enabled():
                for extra in _VARIANTS.get(name, ((),)):
                    path = _build(Path(__file__).with_name(f"{name}.c"), extra)
                    try:
                        lib = None if path is None else ctypes.CDLL(str(path))
                    except OSError as e:  # e.g. a runtime library the built object needs is missing
                        _problem("failed", f"loading {path} failed, using the torch path: {e}")
                    if lib is not None:
                        _SOURCES[name](lib)
                        break
            _libraries[name] = lib
    return _libraries[name]


def _problem(state: str, message: str) -> None:
    """Say once per process why the kernels are not used (a warning: it is a 2-5x slowdown)."""
    global _state
    if _state not in ("no-compiler", "failed"):
        log.warning(message)
    _state = state


def status() -> str:
    """How this process's CPU kernels stand, after trying them all (`load_all`): `built`, `off`
    (`EPD_CPU_KERNELS=0`), `no-compiler` or `failed` (the torch paths run in the last three)."""
    load_all()
    if not cpu_kernels_enabled():
        return "off"
    if all(_libraries.get(name) is not None for name in _SOURCES):
        return "built"
    return _state if _state in ("no-compiler", "failed") else "failed"


def load_all() -> None:
    """Build (or find in the cache) and load every kernel: a worker does it at start, so its first
    request pays nothing and its status is known; `make install` does it once for the machine."""
    for name in _SOURCES:
        load(name)


def library() -> ctypes.CDLL | None:
    """The decode-attention kernel's library, or None (see `load`)."""
    return load("paged_decode")


def _pool_args(layer: torch.Tensor, q: torch.Tensor) -> tuple[int, ...] | None:
    """The pool layer's layout as both attention kernels take it (pointer, bfloat16 flag, block / kind /
    slot strides, block size, kv heads, head size, heads), or None when they cannot read it: not on the
    CPU, another dtype, or a (kv head, dim) row that is not one contiguous run."""
    if layer.device.type != "cpu" or layer.dtype not in (torch.float32, torch.bfloat16):
        return None
    if layer.stride(4) != 1 or layer.stride(3) != layer.shape[4]:
        return None
    return (
        layer.data_ptr(),
        int(layer.dtype == torch.bfloat16),
        layer.stride(0),
        layer.stride(1),
        layer.stride(2),
        layer.shape[2],
        layer.shape[3],
        q.shape[2],
        q.shape[1],
    )


# Context tokens per thread below which a thread costs more than it saves: the kernel starts its POSIX
# threads per call (tens of microseconds each), and 4,096 tokens are a few hundred microseconds of work.
_TOKENS_PER_THREAD = 4096


def decode_threads(ctx: torch.Tensor) -> int:
    """How many threads the decode kernel splits sequences of these context lengths across."""
    available = torch.get_num_threads()
    return 1 if available == 1 else max(1, min(available, int(ctx.sum()) // _TOKENS_PER_THREAD))


def paged_decode(
    q: torch.Tensor,
    layer: torch.Tensor,
    blocks: torch.Tensor,
    block_start: torch.Tensor,
    ctx: torch.Tensor,
    scale: float,
    threads: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Decode attention over blocks in place. q (S, H, D) float32 contiguous; layer one layer of the
    pool `(num_blocks, 2, block_size, KV, D)` (a strided view is fine) in float32 or bfloat16; blocks,
    block_start and ctx int64 on the CPU. `threads`: how many to split the sequences across (default:
    torch's intra-op count, fewer for a small context). Returns (S, H, D) float32 -- written into `out`
    when given (contiguous, float32, q's shape) -- or None when the kernel cannot run here (the caller
    then takes its torch path)."""
    lib = library()
    layout = None if lib is None else _pool_args(layer, q)
    if layout is None:
        return None
    seqs, heads, dim = q.shape
    if out is None:
        out = torch.empty(seqs, heads, dim, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.shape != q.shape:
        raise ValueError("out must be a contiguous float32 tensor of q's shape")
    status = lib.epd_paged_decode(
        q.data_ptr(),
        *layout,
        blocks.data_ptr(),
        block_start.data_ptr(),
        ctx.data_ptr(),
        seqs,
        scale,
        out.data_ptr(),
        decode_threads(ctx) if threads is None else threads,
    )
    return out if status == 0 else None


# Query tokens per thread below which a thread costs more than it saves (a tile of 32 queries over a few
# hundred keys is tens of microseconds; a thread start is about as much).
_QUERIES_PER_THREAD = 64


def paged_prefill(
    q: torch.Tensor,
    layer: torch.Tensor,
    blocks: torch.Tensor,
    block_start: torch.Tensor,
    ctx: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    threads: int | None = None,
) -> bool:
    """Causal attention of prompt tokens over their blocks in place. q and out (rows, H, D) contiguous
    float32; sequence i's queries are rows [q_start[i], q_start[i] + q_len[i]), its last q_len[i]
    positions of ctx[i]; layer, blocks, block_start and ctx as for `paged_decode`; the int64 tensors on
    the CPU. Writes those rows of `out` only. False when the kernel cannot run here (nothing written
    that the caller's torch path would not overwrite)."""
    lib = load("paged_prefill")
    layout = None if lib is None else _pool_args(layer, q)
    if layout is None:
        return False
    if q.dtype != torch.float32 or not q.is_contiguous():
        raise ValueError("q must be a contiguous float32 tensor")
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != q.shape:
        raise ValueError("out must be a contiguous float32 tensor of q's shape")
    if threads is None:
        available = torch.get_num_threads()
        threads = 1 if available == 1 else max(1, min(available, int(q_len.sum()) // _QUERIES_PER_THREAD))
    status = lib.epd_paged_prefill(
        q.data_ptr(),
        *layout,
        blocks.data_ptr(),
        block_start.data_ptr(),
        ctx.data_ptr(),
        q_start.data_ptr(),
        q_len.data_ptr(),
        q_len.shape[0],
        scale,
        out.data_ptr(),
        threads,
    )
    return status == 0
