"""The model zoo: every model is a `Classifier` (a `body` and a linear `head`), built by name.

    from lfm.models import create_model
    model = create_model("resnet32", num_classes=10, input_shape=(3, 32, 32))

Importing this package registers all models in `MODELS`.
"""

from lfm.models import resnet_cifar, resnet_imagenet, small, vgg, wrn  # noqa: F401  (registers)
from lfm.models.base import Classifier, batchnorm_batch_stats, count_parameters, init_weights
from lfm.models.registry import MODELS, create_model
from lfm.models.weights import LoadReport, load_torchvision_resnet

__all__ = [
    "MODELS",
    "Classifier",
    "batchnorm_batch_stats",
    "LoadReport",
    "count_parameters",
    "create_model",
    "init_weights",
    "load_torchvision_resnet",
]
