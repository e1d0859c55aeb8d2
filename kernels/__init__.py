"""fastlenet.kernels: pure Triton kernels and their launch helpers.

    activations.py    act / act_backward pairs, chosen by a constexpr name
    conv_act_pool.py  conv2d + bias + activation + 2x2 pooling, forward and backward
    linear_act.py     linear + bias + activation, forward and backward
    cross_entropy.py  log-softmax + mean NLL, forward and backward
    split_reduce.py   deterministic single-launch reduction of weight-gradient partials
    launch.py         the one launch path (counting, recording, poisoned allocation)
    gpu_build.py      compile recorded launches for sm_80 / sm_90 and read their resource usage
    report.py         what the compiled kernels of a training step say: fill, MMA replication, padded
                      work, bytes and roofline floors (static analysis, nothing measured)

Nothing here knows autograd: fastlenet.functional wraps these in autograd Functions.
"""
