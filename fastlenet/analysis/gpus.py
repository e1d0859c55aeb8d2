"""The GPUs the analysis speaks of: published figures, never measured ones."""
from __future__ import annotations

from dataclasses import dataclass

from fastlenet.kernels.launch import round_up

from .gpu_build import SmLimits


@dataclass(frozen=True)
class Gpu:
    name: str
    cc: int  # compute capability compiled for
    sms: int
    hbm: float  # bytes/s
    tf32: float  # dense TF32 tensor-core FLOP/s
    fp32: float  # FP32 FLOP/s on the CUDA cores (no tensor cores)

    @property
    def clock(self) -> float:
        """The boost clock the FP32 figure is quoted at: 128 FP32 lanes an SM (sm_80: 64), 2 FLOPs a
        lane a cycle (H100 SXM: 1.98 GHz, A100: 1.41 GHz)."""
        return self.fp32 / (self.sms * (64 if self.cc == 80 else 128) * 2)


# H100 SXM5: NVIDIA H100 Tensor Core GPU Architecture whitepaper, table "H100 SXM5" (132 SMs, FP32
# 66.9 TFLOP/s, TF32 tensor 494.7 TFLOP/s dense) and NVIDIA's H100 datasheet (HBM3, 3.35 TB/s).
# H200 SXM: NVIDIA's H200 datasheet (the H100's SMs and clocks, HBM3e 4.8 TB/s).
# A100 SXM4 80GB: NVIDIA A100 Tensor Core GPU datasheet (FP32 19.5 TFLOP/s, TF32 tensor 156 TFLOP/s
# dense, HBM2e 2,039 GB/s) and the Ampere architecture whitepaper (108 SMs).
GPUS = {"h100": Gpu("H100 SXM", 90, 132, 3.35e12, 494.7e12, 66.9e12),
        "h200": Gpu("H200 SXM", 90, 132, 4.8e12, 494.7e12, 66.9e12),
        "a100": Gpu("A100 SXM 80GB", 80, 108, 2.039e12, 156e12, 19.5e12)}
# The GPU each compiled target's floors and waves are given for.
BY_ARCH = {90: GPUS["h100"], 80: GPUS["a100"]}


@dataclass(frozen=True)
class Occupancy:
    programs: int  # programs (thread blocks) resident on one SM at once
    limiter: str  # the first limit that allows no more: registers, shared memory, threads, blocks
    limits: dict  # programs per SM each resource alone would allow


def occupancy(registers: int, num_warps: int, shared: int, sm: SmLimits) -> Occupancy:
    """Programs of a kernel resident per SM (cudaOccMaxActiveBlocksPerMultiprocessor's rules):

    - registers: each warp holds registers x 32 rounded up to the allocation unit (256), and warps
      are placed per sub-partition (a quarter of the SM's 65536 registers each), so an SM holds
      floor(16384 / per-warp) warps per quarter, times 4, divided by the warps of a program; a
      program whose warps, rounded up to a multiple of 4, would not fit in 65536 gets none;
    - shared memory: shared + the 1 KiB the driver reserves per block, rounded up to 128 bytes,
      into the SM's shared memory at its largest carveout (228 KiB on sm_90, 164 KiB on sm_80);
    - threads: 2048 per SM; blocks: 32 per SM."""
    warp_registers = round_up(registers * 32, sm.register_granularity)
    if warp_registers * round_up(num_warps, sm.sub_partitions) > sm.registers:
        by_registers = 0
    elif warp_registers == 0:
        by_registers = sm.max_blocks
    else:
        warps = sm.registers // sm.sub_partitions // warp_registers * sm.sub_partitions
        by_registers = warps // num_warps
    limits = {"registers": by_registers,
              "shared memory": sm.shared // round_up(shared + sm.reserved_shared, sm.shared_granularity),
              "threads": sm.max_threads // (32 * num_warps),
              "blocks": sm.max_blocks}
    programs = min(limits.values())
    return Occupancy(programs, next(name for name, n in limits.items() if n == programs), limits)
