"""Reading a model's dataflow with ``torch.fx``: which norm normalizes which conv's output.

Both BatchNorm folding (quantization) and LEC channel pruning need "this norm reads the output
of that conv, and nothing else reads it": only then can the norm be merged into the conv (fold)
or the conv's channels removed with the norm's (prune). Deploy side: imports only torch.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .errors import LcsError

__all__ = ["trace", "is_plain_conv", "norms_after_convs"]


def trace(model: nn.Module, purpose: str) -> tuple[fx.Graph, dict[str, nn.Module]]:
    """The model's fx graph and its modules by name; a clear error naming ``purpose`` when the
    model cannot be traced symbolically."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - any tracing failure means: cannot analyse this model
        raise LcsError(f"{purpose} needs a torch.fx-traceable model ({type(e).__name__}: {e})") from None
    return graph, dict(model.named_modules())


def is_plain_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d) and modules[node.target].groups == 1


def norms_after_convs(graph: fx.Graph, modules: dict[str, nn.Module], norm_types: tuple[type, ...]
                      ) -> list[tuple[fx.Node, fx.Node]]:
    """(conv node, norm node) for every norm of ``norm_types`` whose input is the output of a
    plain conv that nothing else reads."""
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], norm_types):
            continue
        producer = node.args[0]
        if isinstance(producer, fx.Node) and is_plain_conv(producer, modules) and len(producer.users) == 1:
            pairs.append((producer, node))
    return pairs
