"""fastlenet.analysis: what the compiled kernels say, read without a GPU (nothing here is measured).

    gpu_build.py  compile recorded launch descriptions for sm_80 / sm_90 with Triton's pipeline and
                  ptxas (no GPU needed; cached), and read registers, spills and shared memory
    report.py     the static report of one training step (python -m fastlenet.analysis.report): fill,
                  MMA replication, padded work, bytes and roofline floors, per launch; --predict and
                  --calibration (predict.py) print the timing model's view
    gpus.py       the GPUs' published figures and occupancy (cuda_occupancy.h's rules)
    sass.py       SASS as data: blocks, loops, dependent-load chains, loops ptxas unrolled
    trips.py      the TTGIR's loops and branches evaluated per program id: trip counts
    programs.py   each program's work: SASS blocks weighted by the trips of the regions they run in
    step_work.py  the work of every launch of a step (and the optimizer's ATen kernels)
    timing.py     the timing model: bounds per launch, four constants fitted to a measurement
    predict.py    predictions and the calibration, as tables and JSON

It sits above the models: record_step builds a LeNet-5 step (fastlenet.profiling) to record its
launches; everything else takes launch descriptions (fastlenet.kernels.launch.describe) as data,
and each kernel's FLOP/byte formulas from the kernel's own file (fastlenet.kernels.accounting).
"""
