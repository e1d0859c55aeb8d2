"""fastlenet.analysis: what the compiled kernels say, read without a GPU (nothing here is measured).

    gpu_build.py  compile recorded launch descriptions for sm_80 / sm_90 with Triton's pipeline and
                  ptxas (no GPU needed; cached), and read registers, spills and shared memory
    report.py     the static report of one training step (python -m fastlenet.analysis.report): fill,
                  MMA replication, padded work, bytes and roofline floors, per launch

It sits above the models: record_step builds a LeNet-5 step (fastlenet.profiling) to record its
launches; everything else takes launch descriptions (fastlenet.kernels.launch.describe) as data,
and each kernel's FLOP/byte formulas from the kernel's own file (fastlenet.kernels.accounting).
"""
