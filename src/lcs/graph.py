"""Reading a model's dataflow with ``torch.fx``: which norm normalizes which conv's output, and
which add sums a conv's output with a residual.

Both BatchNorm folding (quantization) and LEC channel pruning need "this norm reads the output
of that conv, and nothing else reads it": only then can the norm be merged into the conv (fold)
or the conv's channels removed with the norm's (prune). The sparse kernels add a residual in the
conv's own pass where "conv (→ norm) → add" is a chain nothing else reads; the integer kernels
hand a conv's output to the next conv as 8-bit codes where "conv (→ ReLU / identity) → conv" is
one (``conv_chains``). Deploy side: imports only torch.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .errors import LcsError

__all__ = ["trace", "is_plain_conv", "norms_after_convs", "residual_adds", "conv_chains"]


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


_ADDS = (operator.add, torch.add)


def residual_adds(graph: fx.Graph, modules: dict[str, nn.Module], norm_types: tuple[type, ...] = ()
                  ) -> list[tuple[fx.Node, fx.Node, fx.Node | None, fx.Node]]:
    """(add node, conv node, norm node or None, residual node) for every two-tensor add one of whose
    operands is a plain conv's output (or that of a ``norm_types`` norm reading only that conv) that
    nothing else reads: the conv can compute ``conv(x) (→ norm) + residual`` in one pass."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
            continue
        for i, operand in enumerate(node.args):
            other = node.args[1 - i]
            if not isinstance(operand, fx.Node) or not isinstance(other, fx.Node) or len(operand.users) != 1:
                continue
            norm = None
            if operand.op == "call_module" and isinstance(modules[operand.target], norm_types):
                norm, operand = operand, operand.args[0]
                if not isinstance(operand, fx.Node) or len(operand.users) != 1:
                    continue
            if is_plain_conv(operand, modules) and operand is not other:
                found.append((node, operand, norm, other))
                break
    return found


_RELUS = (torch.relu, torch.relu_, torch.nn.functional.relu)


def _passes_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An elementwise step that maps 8-bit codes to 8-bit codes on the same grid: a ReLU (the max
    with the zero point) or an identity."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.ReLU, nn.Identity))
    return node.op == "call_function" and node.target in _RELUS


def conv_chains(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[tuple[fx.Node, fx.Node]]:
    """(producer conv, consumer conv) for every plain conv whose output reaches exactly one other
    plain conv through nothing but single-reader ReLUs and identities: the
    producer can emit its output directly on the grid the consumer quantizes its input to."""
    pairs = []
    for node in graph.nodes:
        if not is_plain_conv(node, modules):
            continue
        cur = node
        while len(cur.users) == 1:
            (nxt,) = cur.users
            if is_plain_conv(nxt, modules):
                if nxt.args and nxt.args[0] is cur:
                    pairs.append((node, nxt))
                break
            if not (_passes_through(nxt, modules) and nxt.args and nxt.args[0] is cur):
                break
            cur = nxt
    return pairs
