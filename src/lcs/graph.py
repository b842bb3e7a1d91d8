"""Reading a model's dataflow with ``torch.fx``: which norm normalizes which conv's output, and
which add sums a conv's output with a residual.

Both BatchNorm folding (quantization) and LEC channel pruning need "this norm reads the output
of that conv, and nothing else reads it": only then can the norm be merged into the conv (fold)
or the conv's channels removed with the norm's (prune). The sparse kernels compute a whole chain
around a conv in its own pass where nothing else reads its steps (``conv_fusions``: the
pre-activation norm and ReLU before it, the residual add and ReLU after it); the integer kernels
hand a conv's output to the next conv as 8-bit codes where "conv (→ ReLU / identity) → conv" is
one (``conv_chains``). Deploy side: imports only torch.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch import nn

from .errors import LcsError

__all__ = ["trace", "is_plain_conv", "norms_after_convs", "ConvFusion", "conv_fusions", "conv_chains"]


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
_RELUS = (torch.relu, torch.relu_, torch.nn.functional.relu)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    return node.op == "call_function" and node.target in _RELUS and set(node.kwargs) <= {"inplace"}


def _only_reader(node: fx.Node) -> fx.Node | None:
    """The one node that reads ``node`` as its first argument, or None."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if user.args and user.args[0] is node else None


def _fused_operand(add: fx.Node, modules: dict[str, nn.Module], norm_types: tuple[type, ...]) -> fx.Node | None:
    """The operand of a two-tensor add that a conv computing it can add the other to: the first
    that is a plain conv's output (or a ``norm_types`` norm's of one), read by nothing else."""
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or a is b:
        return None
    for operand in (a, b):
        if len(operand.users) != 1:
            continue
        conv = operand
        if operand.op == "call_module" and isinstance(modules[operand.target], norm_types):
            conv = operand.args[0]
            if not isinstance(conv, fx.Node) or len(conv.users) != 1:
                continue
        if is_plain_conv(conv, modules):
            return operand
    return None


@dataclasses.dataclass(frozen=True)
class ConvFusion:
    """A chain around one plain conv that the conv's kernel can compute in its own pass:
    ``relu?(norm?(conv(relu(pre_norm(x)))) + residual?)``.

    ``pre_norm``: a BatchNorm whose output only a ReLU reads, whose output only this conv reads, the
    conv unpadded (a pre-activation block's norm → ReLU → 1×1 conv: the padded zeros of a k×k conv
    would not stay zero). ``norm``: a ``norm_types`` norm that only reads the conv's output (it folds
    into the conv's weights). ``residual``: the other operand of a two-tensor add that reads the
    (normed) conv output and nothing else does. ``relu``: a ReLU is the only reader of the result.
    ``nodes``: every node the fused call replaces, in graph order; the last one's readers read it."""

    conv: fx.Node
    pre_norm: fx.Node | None
    norm: fx.Node | None
    residual: fx.Node | None
    relu: bool
    nodes: tuple[fx.Node, ...]

    @property
    def input(self) -> fx.Node:
        return (self.pre_norm if self.pre_norm is not None else self.conv).args[0]


def conv_fusions(graph: fx.Graph, modules: dict[str, nn.Module], norm_types: tuple[type, ...] = ()
                 ) -> list[ConvFusion]:
    """Every ``ConvFusion`` that fuses something besides a norm (a pre-norm, an add or a ReLU), in
    graph order; a node belongs to one fusion at most (the earlier conv's: a norm → ReLU between two
    convs is better folded into the first than recomputed by the second for each tap that reads it)."""
    found, used = [], set()
    for node in graph.nodes:
        if not is_plain_conv(node, modules) or node.kwargs or len(node.args) != 1:
            continue
        nodes = [node]
        pre_norm = None
        relu_in = node.args[0]
        if isinstance(relu_in, fx.Node) and relu_in not in used and _is_relu(relu_in, modules) \
                and _only_reader(relu_in) is node and all(p == 0 for p in modules[node.target].padding):
            norm_in = relu_in.args[0]
            if isinstance(norm_in, fx.Node) and norm_in not in used and norm_in.op == "call_module" \
                    and type(modules[norm_in.target]) is nn.BatchNorm2d and _only_reader(norm_in) is relu_in:
                pre_norm = norm_in
                nodes = [norm_in, relu_in, node]
        cur, norm, residual, relu = node, None, None, False
        nxt = _only_reader(cur)
        if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], norm_types):
            norm = cur = nxt
            nodes.append(cur)
        if len(cur.users) == 1:
            (add,) = cur.users
            if _fused_operand(add, modules, norm_types) is cur:
                residual = add.args[1] if add.args[0] is cur else add.args[0]
                cur = add
                nodes.append(cur)
        nxt = _only_reader(cur)
        if nxt is not None and _is_relu(nxt, modules):
            relu, cur = True, nxt
            nodes.append(cur)
        if pre_norm is None and residual is None and not relu:
            continue
        found.append(ConvFusion(node, pre_norm, norm, residual, relu, tuple(nodes)))
        used.update(nodes)
    return found


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
