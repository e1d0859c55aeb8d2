"""The names (and the two defaults) that fastlenet's library modules and its command-line tools share.

Imports nothing, so that the tools' parsers can offer these as choices and answer --help without
PyTorch. fastlenet.models keys its networks, and fastlenet.data its datasets, by these names;
tests/cli/test_cli.py holds them equal.
"""

LENET5_NAMES = ("lenet5", "lenet5-classic", "lenet5-nopad")  # fastlenet.models.VARIANTS
PAPER_NAMES = ("lenet5-1998",)  # LeNet-5 as LeCun et al. published it in 1998: fastlenet.lenet1998
TUTORIAL_NAMES = ("cnn", "convnet-bn", "alexnet")  # the PyTorch MNIST tutorials' CNNs
# fastlenet.models.NETWORKS: stock torch.nn networks, whose fused form is what fastlenet.fuse makes of them.
NETWORK_NAMES = PAPER_NAMES + TUTORIAL_NAMES
MODEL_NAMES = LENET5_NAMES + NETWORK_NAMES
DATASET_NAMES = ("mnist", "fashion-mnist")  # fastlenet.data.DATASETS

DEFAULT_DATA_DIR = "./data"  # where datasets are kept unless --data-dir says otherwise
EVAL_BATCH_SIZE = 2000  # inference batch: large, there is no backward to keep memory for
