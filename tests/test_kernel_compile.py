"""Every Triton kernel compiled for real GPU targets, on a machine without a GPU, at the launches the model makes.

The interpreter (TRITON_INTERPRET=1, the other kernel tests) checks arithmetic, not resources. Here each kernel is
compiled down to a cubin for sm_80 (A100), sm_90 (H100) and, where the installed Triton has a ptxas for it, sm_100
(B200), and the test asserts what decides whether it can launch and run at speed:
- shared memory per block (``metadata.shared``) within the target's limit;
- registers x threads within the 65,536 registers of a block;
- no register spills (ptxas -v with the ptxas and flags Triton itself uses for that target), unless ``SPILL_BOUNDS``
  names the kernel with a byte bound and the reason.

The launches are recorded, not written down: the public functions (``mlstm_chunkwise_triton`` forward and backward,
``mlstm_step_triton``, ``slstm_triton`` forward and backward) run on meta tensors at the shapes of the xLSTM-7B and
paper configurations (head dims from ``xLSTMConfig``), with every kernel replaced by a recorder of its grid,
arguments and options; the recorded arguments are specialised as Triton does at launch. So a change of tiles, warps
or dtypes in a launcher changes what is compiled here. The launchers see the target's capability and SM count.

The default run compiles a representative subset (``DEFAULT``: 7B mLSTM in bfloat16 and full-precision float32, a
short paper prompt, the decode step, sLSTM at DH 256, 192 and 64; about 45 s cold on 2 cores); the full sweep
(``SCENARIOS``: float32 at both precisions, batch 1 and 256, short and long prompts, 4, 8 and 16 sLSTM heads) is
marked slow. Compiles are cached by Triton's own cache (``TRITON_CACHE_DIR``, keep it between CI runs) and ptxas
figures per compiled kernel within a run.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

triton = pytest.importorskip("triton")

try:  # triton's own launch-time specialisation (3.9; older releases name it differently)
    from triton._C.libtriton import native_specialize_impl
except ImportError:
    pytest.skip(f"triton {triton.__version__} has no native_specialize_impl", allow_module_level=True)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(triton.language.standard.cdiv, InterpretedFunction):
    # triton decorates its own library (tl.cdiv, tl.sigmoid, ...) for the interpreter when it is imported under
    # TRITON_INTERPRET=1; a kernel that calls them then cannot be compiled for a GPU in this process
    pytest.skip("triton was imported with TRITON_INTERPRET=1: nothing can be compiled", allow_module_level=True)
from kernel_testing import matmul_precision  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from xlstm_hf import xLSTMConfig  # noqa: E402

SHARED_LIMIT = {80: 166_912, 90: 232_448, 100: 232_448}  # bytes of shared memory per block (opt-in maximum)
SM_COUNT = {80: 108, 90: 132, 100: 148}
REGISTERS_PER_BLOCK = 65_536
# kernel -> (spill bytes per thread allowed, why); every other kernel must not spill.
_SLSTM_SPILLS = (
    "sLSTM kernels: at some head dims ptxas keeps one to four loop-invariant 32-bit values in local memory at 74-104 "
    "registers per thread (the cap is 255 at 8 warps), stored before the time loop and reloaded once per step or "
    "phase (read in the SASS: DH 256 forward on sm_90, DH 64 forward on sm_90, DH 64 backward on sm_100); it follows "
    "the --regAllocOptLevel=2 that Triton 3.9 passes to ptxas (0 B without it at DH 64) and costs at most 32 B from "
    "L1 per step against the step's 4 DH^2 values of r"
)
SPILL_BOUNDS: dict[str, tuple[int, str]] = {
    "_slstm_fwd_kernel": (32, _SLSTM_SPILLS),
    "_slstm_bwd_kernel": (32, _SLSTM_SPILLS),
}


def _has_ptxas(cc: int) -> bool:
    try:
        return subprocess.run([get_ptxas(cc).path, "--version"], capture_output=True).returncode == 0
    except (OSError, RuntimeError):
        return False


TARGETS = [cc for cc in (80, 90, 100) if _has_ptxas(cc)]
KERNEL_MODULES = ("mlstm_chunk", "mlstm_step", "slstm_fused")


@functools.cache
def compiled_modules() -> dict[str, ModuleType]:
    """Fresh imports of the kernel modules with TRITON_INTERPRET unset, so that their kernels are compiled
    JITFunctions even when an interpreted kernel test ran earlier in this process; the modules in sys.modules (and
    the interpreted kernels other tests hold) are restored afterwards."""
    names = [f"xlstm_hf.{n}" for n in ("triton_utils", *KERNEL_MODULES)]
    saved = {n: sys.modules.pop(n, None) for n in names}
    env = os.environ.pop("TRITON_INTERPRET", None)
    package = sys.modules["xlstm_hf"]
    attrs = {n: getattr(package, n.split(".")[-1], None) for n in names}
    try:
        return {n: importlib.import_module(f"xlstm_hf.{n}") for n in KERNEL_MODULES}
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env
        for n in names:
            sys.modules.pop(n, None)
            if saved[n] is not None:
                sys.modules[n] = saved[n]
            short = n.split(".")[-1]
            if attrs[n] is not None:
                setattr(package, short, attrs[n])
            elif hasattr(package, short):
                delattr(package, short)


@dataclass(frozen=True)
class Launch:
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    attrs: tuple[int, ...]  # indices of arguments specialised as divisible by 16
    num_warps: int
    num_stages: int
    grid: tuple[int, ...]


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn, launches: list[Launch]):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return functools.partial(self._record, tuple(grid))

    def _record(self, grid, *args, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.fn.arg_names, args, strict=False)) | kwargs
        signature, constexprs, attrs = [], [], []
        for index, param in enumerate(self.fn.params):
            value = bound[param.name]
            if param.is_constexpr:
                signature.append((param.name, "constexpr"))
                constexprs.append((param.name, value))
                continue
            kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
            signature.append((param.name, kind))
            if kind == "constexpr":
                constexprs.append((param.name, value))
            elif attr == "D":
                attrs.append(index)
        self.launches.append(
            Launch(
                self.fn.__name__,
                tuple(signature),
                tuple(constexprs),
                tuple(attrs),
                options.get("num_warps", 4),
                options.get("num_stages", 3),
                grid,
            )
        )


def record(run, cc: int) -> list[Launch]:
    """The launches ``run(modules)`` makes when the launchers see target cc."""
    modules = compiled_modules()
    launches: list[Launch] = []
    patches = []
    for module in modules.values():
        for name, fn in vars(module).items():
            if isinstance(fn, triton.runtime.JITFunction) and name.endswith("_kernel"):
                patches.append((module, name, fn))
                setattr(module, name, _Recorder(fn, launches))
        if hasattr(module, "device_properties"):
            patches.append((module, "device_properties", module.device_properties))
            module.device_properties = lambda device, cc=cc: ((cc // 10, cc % 10), SM_COUNT[cc])
    try:
        run(modules)
    finally:
        for module, name, fn in patches:
            setattr(module, name, fn)
    return launches


@dataclass(frozen=True)
class Figures:
    shared: int
    registers: int
    threads: int
    spill_bytes: int
    stack: int


@functools.cache
def compile_figures(launch: Launch, cc: int) -> Figures:
    modules = compiled_modules()
    fn = next(getattr(m, launch.kernel) for m in modules.values() if hasattr(m, launch.kernel))
    src = ASTSource(
        fn=fn,
        signature=dict(launch.signature),
        constexprs=dict(launch.constexprs),
        attrs={(i,): [["tt.divisibility", 16]] for i in launch.attrs},
    )
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    registers, spills, stack = _ptxas_figures(compiled.asm["ptx"], cc)
    return Figures(compiled.metadata.shared, registers, launch.num_warps * 32, spills, stack)


def _ptxas_figures(ptx: str, cc: int) -> tuple[int, int, int]:
    """(registers per thread, spill store + load bytes, stack frame bytes) from the ptxas that Triton uses for cc."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        arch = sm_arch_from_capability(cc)
        out = subprocess.run(
            [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path, "-o", path + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    stack = int(re.search(r"(\d+) bytes stack frame", out).group(1))
    return registers, stores + loads, stack


# Configurations: head shapes from the configs the model is built from.
def _mlstm_dims(config: xLSTMConfig) -> tuple[int, int, int]:
    if config.architecture == "7b":
        return config.num_heads, config.qk_head_dim, config.v_head_dim
    head = config.mlstm_inner_dim // config.num_heads
    return config.num_heads, head, head


CONFIGS = {
    "7b": xLSTMConfig(architecture="7b", hidden_size=4096, num_heads=8, num_hidden_layers=32),
    "paper350m": xLSTMConfig(hidden_size=1024, num_heads=4, num_hidden_layers=24, slstm_at=[3]),
    "paper125m": xLSTMConfig(hidden_size=768, num_heads=4, num_hidden_layers=12, slstm_at=[3]),
}
DTYPES = {"bf16": (torch.bfloat16, "high"), "fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high")}


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def mlstm_chunk_run(config: str, dtype: str, B: int, S: int):
    NH, DK, DV = _mlstm_dims(CONFIGS[config])
    chunk = CONFIGS[config].chunk_size
    torch_dtype, precision = DTYPES[dtype]

    def run(modules):
        q, k = _meta(B, NH, S, DK, dtype=torch_dtype, grad=True), _meta(B, NH, S, DK, dtype=torch_dtype, grad=True)
        v = _meta(B, NH, S, DV, dtype=torch_dtype, grad=True)
        i, f = _meta(B, NH, S, grad=True), _meta(B, NH, S, grad=True)
        state = (_meta(B, NH, DK, DV, grad=True), _meta(B, NH, DK, grad=True), _meta(B, NH, grad=True))
        with matmul_precision(precision):
            h, (C, n, m) = modules["mlstm_chunk"].mlstm_chunkwise_triton(q, k, v, i, f, state, chunk_size=chunk)
            (h.float().sum() + C.sum() + n.sum() + m.sum()).backward()

    return run


def mlstm_step_run(config: str, dtype: str, B: int):
    NH, DK, DV = _mlstm_dims(CONFIGS[config])
    torch_dtype, precision = DTYPES[dtype]

    def run(modules):
        q, k = _meta(B, NH, DK, dtype=torch_dtype), _meta(B, NH, DK, dtype=torch_dtype)
        v = _meta(B, NH, DV, dtype=torch_dtype)
        state = (_meta(B, NH, DK, DV), _meta(B, NH, DK), _meta(B, NH))
        with matmul_precision(precision), torch.no_grad():
            modules["mlstm_step"].mlstm_step_triton(q, k, v, _meta(B, NH), _meta(B, NH), state)

    return run


def slstm_run(NH: int, DH: int, dtype: str, B: int, S: int):
    torch_dtype, precision = DTYPES[dtype]

    def run(modules):
        x = _meta(B, NH, S, 4 * DH, dtype=torch_dtype, grad=True)
        r = _meta(NH, DH, 4 * DH, dtype=torch_dtype, grad=True)
        with matmul_precision(precision):
            y, final = modules["slstm_fused"].slstm_triton(x, r)
            (y.float().sum() + sum(t.sum() for t in final)).backward()

    return run


def _slstm_heads(config: str, num_heads: int) -> tuple[int, int]:
    return num_heads, CONFIGS[config].hidden_size // num_heads


SCENARIOS = {
    # mLSTM training / prompt (S 4096) and a short prompt (S 7: one 16-row chunk), decoding at batch 1 and 256
    **{
        f"mlstm_chunk-{cfg}-{dt}-B{B}-S{S}": mlstm_chunk_run(cfg, dt, B, S)
        for cfg in ("7b", "paper350m")
        for dt in DTYPES
        for B in (1, 256)
        for S in (7, 4096)
    },
    **{
        f"mlstm_step-{cfg}-{dt}-B{B}": mlstm_step_run(cfg, dt, B)
        for cfg in ("7b", "paper350m")
        for dt in DTYPES
        for B in (1, 256)
    },
    # sLSTM training at the paper presets' head dims (4 heads: 256, 192) and small heads (8, 16 heads: 128 to 48)
    **{
        f"slstm-{cfg}-NH{nh}-{dt}-B{B}": slstm_run(*_slstm_heads(cfg, nh), dt, B, 64)
        for cfg in ("paper350m", "paper125m")
        for nh in (4, 8, 16)
        for dt in DTYPES
        for B in (1, 256)
    },
}
DEFAULT = [
    "mlstm_chunk-7b-bf16-B1-S4096",
    "mlstm_chunk-7b-fp32-B1-S4096",
    "mlstm_chunk-paper350m-bf16-B256-S7",
    "mlstm_step-7b-bf16-B256",
    "slstm-paper350m-NH4-bf16-B256",
    "slstm-paper125m-NH4-fp32-B1",
    "slstm-paper350m-NH16-bf16-B1",
]


def check_scenario(name: str, cc: int) -> list[str]:
    """Compiles every launch of the scenario for cc; returns one line of figures per launch, fails on the first
    launch over a limit."""
    lines = []
    launches = record(SCENARIOS[name], cc)
    assert launches, f"{name}: no kernel launched"
    for launch in dict.fromkeys(launches):
        fig = compile_figures(launch, cc)
        where = f"{name} {launch.kernel} sm_{cc} (warps {launch.num_warps})"
        lines.append(f"{where}: shared {fig.shared} B, {fig.registers} registers, spills {fig.spill_bytes} B")
        assert fig.shared <= SHARED_LIMIT[cc], f"{where}: {fig.shared} B of shared memory > {SHARED_LIMIT[cc]}"
        assert fig.registers * fig.threads <= REGISTERS_PER_BLOCK, f"{where}: {fig.registers} x {fig.threads} registers"
        bound, _ = SPILL_BOUNDS.get(launch.kernel, (0, ""))
        assert fig.spill_bytes <= bound, f"{where}: spills {fig.spill_bytes} B (bound {bound})"
        assert all(g <= 65535 for g in launch.grid[1:]), f"{where}: grid {launch.grid} above 65,535 on axis 1 or 2"
    return lines


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("name", DEFAULT)
def test_kernels_compile_within_limits(name, cc):
    check_scenario(name, cc)


@pytest.mark.slow
@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("name", sorted(set(SCENARIOS) - set(DEFAULT)))
def test_kernels_compile_within_limits_full_sweep(name, cc):
    check_scenario(name, cc)


def test_recorded_launches_follow_the_launchers():
    """The recorder sees what the launchers choose: bfloat16 dots in tensor-core precision, float32 per torch's
    switch, and batch x heads on grid axis 0."""
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee"), ("tf32", "tf32")):
        launches = record(SCENARIOS[f"mlstm_chunk-7b-{dtype}-B256-S4096"], 90)
        assert {dict(launch.constexprs)["PRECISION"] for launch in launches} == {precision}
        assert all(launch.grid[0] % (256 * 8) == 0 for launch in launches)


REPORT = [
    "mlstm_chunk-7b-bf16-B1-S4096",
    "mlstm_chunk-7b-tf32-B1-S4096",
    "mlstm_chunk-7b-fp32-B1-S4096",
    "mlstm_chunk-paper350m-bf16-B256-S4096",
    "mlstm_step-7b-bf16-B1",
    "mlstm_step-7b-bf16-B256",
    "slstm-paper350m-NH4-bf16-B256",
    "slstm-paper350m-NH4-fp32-B256",
    "slstm-paper125m-NH4-bf16-B256",
    "slstm-paper350m-NH8-bf16-B256",
    "slstm-paper350m-NH16-bf16-B256",
]


def figures_table(names: list[str]) -> str:
    """A markdown table: per scenario and kernel, for each target, shared memory (KB), registers per thread and
    spilled bytes per thread, with the launch's warps and grid at sm_90."""
    header = "| scenario | kernel | warps | grid (sm_90) | " + " | ".join(
        f"sm_{cc} smem KB / regs / spill B" for cc in TARGETS
    )
    rows = [header + " |", "|" + "---|" * (4 + len(TARGETS))]
    for name in names:
        per_target = {cc: list(dict.fromkeys(record(SCENARIOS[name], cc))) for cc in TARGETS}
        for index, launch in enumerate(per_target[90] if 90 in per_target else per_target[TARGETS[0]]):
            cells = []
            for cc in TARGETS:
                fig = compile_figures(per_target[cc][index], cc)
                cells.append(f"{fig.shared / 1024:.1f} / {fig.registers} / {fig.spill_bytes}")
            kernel = launch.kernel.strip("_").removesuffix("_kernel")
            rows.append(f"| {name} | {kernel} | {launch.num_warps} | {launch.grid} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/test_kernel_compile.py: the figures of benchmarks/RESULTS.md
    print(f"triton {triton.__version__}, targets {', '.join(f'sm_{cc}' for cc in TARGETS)}")
    print(figures_table(REPORT))
