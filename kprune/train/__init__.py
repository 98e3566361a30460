"""Training detectors of any family with Keras ``fit``, split by concept:

- :mod:`.config`: :class:`TrainConfig` and dataset names;
- :mod:`.detector`: the model a config asks for, fitted to the dataset (modes, anchors, trainable layers);
- :mod:`.trainer`: the Keras model whose train step applies the family's loss;
- :mod:`.schedule`: warm-up and decay of the learning rate;
- :mod:`.pretrain`: trunk pre-training on object crops;
- :mod:`.batchnorm`: batch-norm recalibration;
- :mod:`.distribute`: tf.distribute strategies;
- :mod:`.run`: a run in its directory (checkpoints, resume, metrics) and :func:`train`.
"""

from kprune.train.batchnorm import batch_norm_layers, recalibrate_batch_norm
from kprune.train.config import DATASETS, DISTRIBUTIONS, MODES, TrainConfig, resolve_dataset
from kprune.train.detector import build_detector, class_names, set_anchors, set_trainable, variable_input_view
from kprune.train.distribute import is_chief, make_strategy
from kprune.train.pretrain import object_crops, pretrain_trunk
from kprune.train.run import RunCallback, TrainingError, TrainingRun, train, train_model
from kprune.train.schedule import WarmupCosine
from kprune.train.trainer import DetectorTrainer

__all__ = [
    "DATASETS", "DISTRIBUTIONS", "MODES", "DetectorTrainer", "RunCallback", "TrainConfig", "TrainingError", "TrainingRun",
    "WarmupCosine", "batch_norm_layers", "build_detector", "class_names", "is_chief", "make_strategy", "object_crops",
    "pretrain_trunk", "recalibrate_batch_norm", "resolve_dataset", "set_anchors", "set_trainable", "train",
    "train_model", "variable_input_view",
]
