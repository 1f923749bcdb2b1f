"""Chunked IBQ's Triton kernels as the compiler builds them for Hopper (sm_90: H100, H200), on any
machine: no GPU is needed, only Triton with its ptxas and nvdisasm.

For each kernel, with all its paths on, at D = --dim: the registers per thread and the bytes spilled
to local memory (ptxas -v), and the share of FMAs among the instructions of one tile's iteration (the
code tile's loop for the kernels over tokens, the token tile's loop for those over codes, its loop over
D counted D / BLOCK_D times). A Hopper multiprocessor issues one instruction per scheduler and clock and
runs as many fp32 FMAs, so that share bounds the fraction of fp32 peak a kernel can reach; weighted by
each kernel's share of the flops it is the bound for forward + backward. Static figures, the same on
every run: they compare tile choices where no GPU is at hand, and say nothing of memory or latency.
The row kernels of `chunk_kernels=triton_rows`, which stream memory around cuBLAS's products: registers
and spills only.
Run from the repository root: python -m benchmarks.bench_kernels [--dim 256]
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ibq.quantizers import triton_ibq

TARGET = GPUTarget("cuda", 90, 32)
# Compiling without a GPU goes through Triton's compiler API, which took its present form in 3.4
# (ASTSource(constexprs=...) since 3.3, triton.knobs since 3.4); torch 2.4-2.7 ship Triton 3.0-3.3.
COMPILER_API = (3, 4)
ALL_PATHS = dict(SOFT=True, ENTROPY=True, CODE_WEIGHT=True)
# name: (kernel, tiles, constants beside the tiles, its flops in units of N*K*D: 2 per product of a
# (tokens x codes) tile over D, forward and backward)
KERNELS = {
    "row_statistics": (triton_ibq._row_statistics_kernel, triton_ibq.ROW_STATISTICS_TILES, {}, 2),
    "code_average": (triton_ibq._code_average_kernel, triton_ibq.CODE_AVERAGE_TILES, {}, 2),
    "row_sums": (triton_ibq._row_sums_kernel, triton_ibq.ROW_SUMS_TILES, ALL_PATHS, 4),
    "token_gradient": (triton_ibq._token_gradient_kernel, triton_ibq.TOKEN_GRADIENT_TILES, ALL_PATHS, 6),
    "codebook_gradient": (triton_ibq._codebook_gradient_kernel, triton_ibq.CODEBOOK_GRADIENT_TILES, ALL_PATHS, 6),
}
# The row kernels of chunk_kernels=triton_rows stream memory and leave the products to cuBLAS: registers
# and spills only.
ROW_KERNELS = {
    "block_max": (triton_ibq._block_max_kernel, {}),
    "block_sharp": (triton_ibq._block_sharp_kernel, dict(NORMALISED=True)),
    "block_sums": (triton_ibq._block_sums_kernel, ALL_PATHS),
    "block_gradient": (triton_ibq._block_gradient_kernel, ALL_PATHS),
}


def compile_for_hopper(kernel, tiles: dict, constants: dict, dim: int):
    """The kernel compiled for sm_90, its arguments typed as a launch types them: fp32 tensors (the
    indices int64), Python floats as fp32, ints as i32."""
    parameters = list(inspect.signature(kernel.fn).parameters)
    constants = {**{key: value for key, value in tiles.items() if key != "num_warps"}, **constants}
    if "DIMS" in parameters:
        constants["DIMS"] = triton.next_power_of_2(dim)
    signature = {name: "constexpr" if name in constants else "*i64" if name == "index_ptr" else "*fp32" if name.endswith("_ptr")
                 else "fp32" if name in ("inv_temperature", "exp_floor") else "i32" for name in parameters}
    source = ASTSource(kernel, signature, constexprs={(parameters.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=TARGET, options={"num_warps": tiles["num_warps"]})


def registers_and_spills(compiled) -> tuple[int, int]:
    """(registers per thread, bytes spilled: stores + loads) as ptxas reports them."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{TARGET.arch}a", ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    return registers, sum(int(count) for count in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))


def tile_iteration(compiled, dim: int, block_d: int) -> collections.Counter:
    """Opcodes of one iteration of the kernel's tile loop: the outermost loop with the most FMAs, the
    loops inside it (over D) counted dim / block_d times."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    labels, opcodes, targets = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;", line)
        if instruction:
            branch = re.search(r"BRA\b.*`\(\.(L_x_\d+)\)", line)
            targets.append(branch.group(1) if branch else None)
            opcodes.append(instruction.group(1))
    loops = [(labels[target], end) for end, target in enumerate(targets) if target in labels and labels[target] < end]

    def counted(start: int, end: int) -> collections.Counter:
        return collections.Counter(opcodes[start:end + 1])

    outermost = [loop for loop in loops if not any(outer[0] < loop[0] and loop[1] < outer[1] for outer in loops)]
    start, end = max(outermost, key=lambda loop: counted(*loop)["FFMA"])
    iteration = counted(start, end)
    inside = [loop for loop in loops if start < loop[0] and loop[1] < end]
    for inner in inside:
        if not any(outer[0] < inner[0] and inner[1] < outer[1] for outer in inside):  # directly inside
            for opcode, count in counted(*inner).items():
                iteration[opcode] += (dim // block_d - 1) * count
    return iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256, help="the codes' dimension (256 in the paper's tokenizer)")
    args = parser.parse_args()
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < COMPILER_API:
        print(f"bench_kernels: skipped (Triton {triton.__version__}: compiling for sm_90 without a GPU needs Triton "
              f">= {'.'.join(map(str, COMPILER_API))}'s compiler API)")
        return
    print(f"bench_kernels: target=sm_{TARGET.arch}a, triton={triton.__version__}, D={args.dim}, paths=all on")
    issued = flops = 0.0
    for name, (kernel, tiles, constants, kernel_flops) in KERNELS.items():
        compiled = compile_for_hopper(kernel, tiles, constants, args.dim)
        registers, spilled = registers_and_spills(compiled)
        iteration = tile_iteration(compiled, args.dim, tiles["BLOCK_D"])
        share = iteration["FFMA"] / sum(iteration.values())
        print(f"{name}_registers: {registers}")
        print(f"{name}_spill_bytes: {spilled}")
        print(f"{name}_ffma_share: {share:.3f}")
        issued += kernel_flops / share
        flops += kernel_flops
    print(f"ibq_fused_ffma_share: {flops / issued:.3f}")
    for name, (kernel, constants) in ROW_KERNELS.items():
        registers, spilled = registers_and_spills(compile_for_hopper(kernel, triton_ibq.ROW_TILES, constants, args.dim))
        print(f"{name}_registers: {registers}")
        print(f"{name}_spill_bytes: {spilled}")


if __name__ == "__main__":
    main()
