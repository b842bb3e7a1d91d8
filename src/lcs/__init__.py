"""lcs: Learning Compressible Subspaces (Nunez, Horton et al., 2021).

Train one subspace of networks, pick any compression level at inference time:

    >>> import lcs
    >>> model = lcs.models.create("cpreresnet20", num_classes=10)
    >>> sub = lcs.convert(model, lcs.UnstructuredConfig(geometry="line"))
    >>> sub.set_alpha(0.1)            # 10 % of the compressible weights survive
    0.1
    >>> plain = lcs.materialize(sub, 0.1)   # a plain nn.Module at α = 0.1

The names below import only torch and safetensors; training, evaluation and plotting live in
``lcs.train``, ``lcs.eval`` (and ``lcs.data``'s loaders) and are imported on first use.
"""

from . import models
from .data.loaders import LoaderData
from .deploy.artifact import load_compressed, save_compressed
from .deploy.bake import materialize
from .deploy.controller import BudgetController
from .deploy.runtime import Runtime, load_subspace, save_subspace
from .errors import LcsError
from .files import DamagedFileError
from .layers.quant import set_activation_quant
from .regimes import QuantizedConfig, SparseQuantizedConfig, StructuredConfig, UnstructuredConfig
from .subspace import Subspace, convert

__all__ = ["models", "convert", "Subspace", "UnstructuredConfig", "StructuredConfig", "QuantizedConfig",
           "SparseQuantizedConfig", "materialize",
           "save_compressed", "load_compressed", "Runtime", "save_subspace", "load_subspace", "BudgetController",
           "LcsError", "DamagedFileError", "LoaderData", "set_activation_quant", "export_onnx", "Trainer",
           "load_config", "Config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Training-side names are imported lazily so that deploying needs no training dependencies.
    if name == "Trainer":
        from .train.loop import Trainer

        return Trainer
    if name == "export_onnx":  # needs the onnx extra (onnx, onnxscript) only when called
        from .deploy.onnx import export_onnx

        return export_onnx
    if name in ("load_config", "Config"):
        from .train import config

        return getattr(config, name)
    raise AttributeError(f"module 'lcs' has no attribute {name!r}")
