"""fastlenet.kernels: pure Triton kernels and their launch helpers.

    activations.py    act / act_backward pairs, chosen by a constexpr name
    conv_act_pool.py  conv2d + bias + activation + 2x2 pooling, forward and backward
    linear_act.py     linear + bias + activation, forward and backward
    cross_entropy.py  log-softmax + mean NLL, forward and backward
    split_reduce.py   deterministic single-launch reduction of weight-gradient partials
    launch.py         the one launch path (counting, recording, poisoned allocation) and the launch
                      descriptions it hands the layers above
    accounting.py     FLOPs and bytes of a launch: Job / Work and the registry each kernel file fills

Each kernel file opens with its trade-off; the reasons at length are in docs/design.md. Nothing here
knows autograd (fastlenet.functional wraps these in autograd Functions) or imports any of fastlenet
outside fastlenet.kernels: the tools that compile and read these kernels are fastlenet.analysis.
"""
