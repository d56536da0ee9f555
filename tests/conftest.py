"""Test set-up: 4 fake CPU devices (set before JAX is imported), no GPU, no downloads."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")


# -- tiny_workdir (training helper): a small trained ZFNetLowRes run --------------------
import pytest  # noqa: E402


def tiny_config():
  """ZFNetLowRes with narrow widths on a 1024-image Fashion-MNIST subset (48 steps)."""
  from zfnet_jax import configs
  c = configs.default_config()
  c.model.name = "ZFNetLowRes"
  c.model.conv_features = (8, 16, 16, 16, 16)
  c.model.fc_features = 32
  c.model.kernel_init_std = 0.03
  c.model.dropout_rate = 0.0
  c.dataset.name = "fashion_mnist_idx"
  c.dataset.eval_split = "test"
  c.dataset.resize_size = 64
  c.dataset.crop_size = 64
  c.dataset.max_train_examples = 1024
  c.dataset.max_eval_examples = 256
  c.batch_size = 64
  c.num_epochs = 3.0
  c.optimizer = "adam"                 # the quickstart's recipe: learns in a few dozen steps
  c.learning_rate = 3e-3
  c.weight_decay = 0.0
  c.schedule = "cosine"
  c.eval_batch_size = 128
  c.evolution_epochs = (1, 2, 3)
  c.evolution_reference_epochs = 0.0
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 16
  c.report.enabled = False
  c.analyses.evolution.tensorboard_every_steps = 24  # Fig. 4 panels live in TensorBoard
  return c


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """Path of a workdir with a finished tiny run: checkpoints at epochs 1, 2, 3, results.json."""
  from zfnet_jax import train
  config = tiny_config()
  if not os.path.exists(os.path.join(config.dataset.fashion_mnist_dir,
                                     "train-images-idx3-ubyte.gz")):
    # No Debian package here: random IDX files (tests never download).
    from test_input_pipeline import make_fmnist  # pylint: disable=g-import-not-at-top
    d = str(tmp_path_factory.mktemp("fmnist"))
    make_fmnist(d, n_train=1024, n_test=256)
    config.dataset.fashion_mnist_dir = d
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  train.train_and_evaluate(config, workdir)
  return workdir
