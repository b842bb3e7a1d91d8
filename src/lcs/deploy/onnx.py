"""ONNX export of a materialized (plain) model, for runtimes that do not run PyTorch.

Export a model that ``lcs.materialize`` has produced at one α; a subspace cannot be exported
directly, because its weights are computed from the subspace endpoints at run time.

What ONNX cannot express compactly: unstructured sparsity. The zeroed weights are stored as dense
initializers, zeros included, so the .onnx file has the same size at every α (about the dense
fp32 model). Use the lcs safetensors artifact (``lcs.save_compressed``) when file size matters;
it stores a bit mask plus the surviving values and really shrinks with α.

Quantized networks (≤ 8 bits) keep each quantized weight as uint8 codes plus a standard
``DequantizeLinear`` (QDQ style: a quarter of the float32 bytes, exactly the same values; runtimes
fold it into a constant at load). Activations stay fake-quantized with elementwise ops
(Mul, Round, Clip, Mul; Round is half-to-even as in PyTorch), but a runtime's float convolutions
may sum in another order, so a value within an ulp of a rounding boundary can take the
neighbouring code. Sub-byte packing exists only in the lcs artifact.

onnx, onnxscript and onnxruntime are optional (``pip install 'lcs[onnx]'``) and imported only
inside these functions, so the rest of lcs imports without them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import LcsError

__all__ = ["export_onnx", "run_onnx", "weights_as_codes", "strip_node_metadata", "nonstandard_ops", "STANDARD_DOMAINS"]

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_INSTALL_HINT = "pip install 'lcs[onnx]'"


@contextlib.contextmanager
def _quiet(*loggers: str):
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _require(*modules: str) -> None:
    """Import the optional ONNX packages up front, so a missing one is one clear line, not a traceback."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise LcsError(f"ONNX support needs {name}: {_INSTALL_HINT}") from None


def nonstandard_ops(onnx_model: Any) -> list[str]:
    """``domain::op_type`` of every node outside the standard ONNX domain (empty when portable).

    Custom-domain ops (e.g. ``pkg.onnxscript.torch_lib``) run only where that library exists, so a
    portable file must have none, and no model-local functions either.
    """
    bad = {f"{n.domain}::{n.op_type}" for n in onnx_model.graph.node if n.domain not in STANDARD_DOMAINS}
    bad.update(f"function {f.domain}::{f.name}" for f in onnx_model.functions)
    return sorted(bad)


def _check_input_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise LcsError(f"input_shape must be three positive ints (channels, height, width), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int], *,
                dynamic_batch: bool = True, opset: int | None = None) -> int:
    """Write a plain model as one self-contained .onnx file, atomically; returns its size in bytes.

    Uses the torch.export-based exporter (``dynamo=True``) with its graph optimizer, which gives
    standard ONNX ops only; ``dynamic_batch`` makes the batch dimension symbolic (named ``batch``)
    so the file accepts any batch size, otherwise it is fixed at 1. ``input_shape`` is
    (channels, height, width). ``opset`` is the ai.onnx opset (None: torch's recommended one).

    Weights are embedded in the file (no external-data sidecar), which limits it to ONNX's 2 GB
    protobuf cap; far above any model in lcs.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise LcsError("materialize the subspace at an α first (lcs.materialize)")
    c, h, w = _check_input_shape(input_shape)
    _require("onnxscript", "onnx")
    from ..layers.kernels import SparseConv2d, SparseLinear, dense_kernels

    if any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules()):
        import copy

        model = dense_kernels(copy.deepcopy(model))  # ONNX gets the standard ops; the zeros stay in the weights

    # Batch 2 for tracing: torch.export specializes a size-1 dimension to the constant 1.
    ref = next(iter(model.parameters()), None)
    ref = ref if ref is not None else next(iter(model.buffers()), None)
    example = torch.randn(2 if dynamic_batch else 1, c, h, w,
                          device=ref.device if ref is not None else "cpu",
                          dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None

    path = os.fspath(path)
    was_training = model.training
    model.eval()
    try:
        # The exporter logs notes about unrelated operator libraries (torchvision) and deprecations:
        # noise for users of a plain CNN export, so they are silenced here.
        with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "onnxscript"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=["input"],
                                        output_names=["logits"], opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, external_data=False, optimize=True,
                                        verbose=False)
        onnx_model = program.model_proto
        bad = nonstandard_ops(onnx_model)
        if bad:
            raise LcsError(f"the exported graph uses non-standard ONNX ops: {', '.join(bad)}")
        weights_as_codes(onnx_model, model)
        strip_node_metadata(onnx_model)
        data = onnx_model.SerializeToString()
    finally:
        model.train(was_training)
    from ..files import atomic_write

    with atomic_write(path) as f:  # the one atomic-write helper: complete at ``path`` or not at all
        f.write(data)
    size = len(data)
    return size


def strip_node_metadata(onnx_model: Any) -> int:
    """Drop what the exporter records per node and value for debugging (stack traces, source
    module names, doc strings): over a third of a CIFAR cPreResNet20 file, and nothing onnxruntime
    reads. Returns the number of entries removed."""
    graphs, removed = [onnx_model.graph], 0
    while graphs:
        g = graphs.pop()
        for item in [*g.node, *g.value_info, *g.input, *g.output, *g.initializer]:
            removed += len(item.metadata_props)
            del item.metadata_props[:]
            if getattr(item, "doc_string", ""):
                item.doc_string = ""
                removed += 1
        for node in g.node:
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
    return removed


def weights_as_codes(onnx_model: Any, model: nn.Module) -> int:
    """Replace each quantized layer's float weight initializer (on its ≤ 8-bit grid) by uint8 codes
    feeding a ``DequantizeLinear`` with the layer's scale and zero point; returns how many.

    An initializer is replaced only if dequantizing its codes gives back its float values exactly
    (the exporter may rename or fold weights; those stay float). Edits ``onnx_model`` in place.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    from ..layers.quant import codes_on_grid, layer_quants

    initializers = {init.name: init for init in onnx_model.graph.initializer}
    nodes = []
    for fqn, lq in layer_quants(model).items():
        name = f"{fqn}.weight" if fqn else "weight"
        init = initializers.get(name)
        if init is None or not hasattr(lq, "weight_scale") or lq.current_bits() > 8:
            continue
        w = torch.from_numpy(numpy_helper.to_array(init).copy())
        scale, zero_point = lq.weight_scale.detach().cpu().float(), lq.weight_zero_point.detach().cpu()
        codes = codes_on_grid(w, scale, zero_point, lq.current_bits()) if w.dtype == torch.float32 else None
        if codes is None:
            continue
        onnx_model.graph.initializer.remove(init)
        onnx_model.graph.initializer.extend([
            numpy_helper.from_array(codes.numpy().astype(np.uint8), f"{name}.codes"),
            numpy_helper.from_array(scale.numpy().reshape(()), f"{name}.scale"),
            numpy_helper.from_array(zero_point.numpy().astype(np.uint8).reshape(()), f"{name}.zero_point")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.codes", f"{name}.scale", f"{name}.zero_point"],
                                      [name], name=f"{name}.dequantize"))
    for i, node in enumerate(nodes):  # they read initializers only: first in topological order
        onnx_model.graph.node.insert(i, node)
    return len(nodes)


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file with onnxruntime on CPU: the check that the file, not PyTorch, gives these outputs."""
    if not os.path.isfile(path):
        raise LcsError(f"no such ONNX file: {path}")
    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    out = session.run(None, {name: x.detach().cpu().numpy()})[0]
    return torch.from_numpy(out)
