"""Plain PyTorch models by name. They know nothing of LCS; see ``lcs.convert``."""

from . import cpreresnet, resnet, vgg  # noqa: F401  (register their models)
from ._norms import NORMS, get_norm_layer
from ._registry import create, list_models, register_model

__all__ = ["create", "list_models", "register_model", "get_norm_layer", "NORMS"]
