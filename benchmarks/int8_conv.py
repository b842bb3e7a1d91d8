"""Would integer kernels make a quantized cPreResNet20 faster on this CPU? Measured per layer.

Three integer paths against their float references, per conv, interleaved in rounds:
* onnxruntime ConvInteger (the unoptimized op) and QLinearConv (the fused QDQ op: u8 activations,
  s8 weights, requantized u8 output) against onnxruntime's float Conv;
* PyTorch's fbgemm quantized conv (``torch.ao.nn.quantized.Conv2d``, AVX2 int8 kernels; input
  quantized per call, output dequantized, both NCHW and channels-last inputs) against ``F.conv2d``;
* an exact int8 GEMM (``torch._int_mm``, oneDNN) on channels-last columns, int32 sums, float output
  (what a quantized lcs conv computes, with no requantization of its output) against ``F.conv2d``.

A quantized lcs network computes conv(DQ(x), DQ(w)): both operands on a b-bit grid (b ≤ 8), the
output in float. onnxruntime expresses exactly that with integer kernels as
QuantizeLinear(x) → ConvInteger(x_u8, w_u8) → Cast → Mul(s_x·s_w) (int32 accumulation: exact).
This benchmark times that chain against the float Conv that lcs exports today, for every conv
of cPreResNet20 at its real shape (32×32 input), interleaved in rounds, median per layer, in
onnxruntime with ``--threads`` intra-op threads. A sum ratio above 1 means integer kernels win.

    python benchmarks/int8_conv.py [--batch 1,64] [--rounds 15] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import lcs


def conv_shapes(image_size: int = 32) -> list[dict]:
    """(name, in/out channels, kernel, stride, input H×W) of every Conv2d of cPreResNet20."""
    model = lcs.models.create("cpreresnet20", num_classes=10, norm="gn").eval()
    shapes: list[dict] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            def hook(mod, inp, _out, name=name):
                shapes.append({"name": name, "cin": mod.in_channels, "cout": mod.out_channels,
                               "k": mod.kernel_size[0], "stride": mod.stride[0], "pad": mod.padding[0],
                               "hw": inp[0].shape[-1]})
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return shapes


def build(layer: dict, kind: str) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = (layer["cout"], layer["cin"], layer["k"], layer["k"])
    attrs = {"pads": [layer["pad"]] * 4, "strides": [layer["stride"]] * 2}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", layer["cin"], layer["hw"], layer["hw"]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if kind == "float":
        inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
    elif kind == "qlinear":
        inits = [numpy_helper.from_array(rng.integers(-127, 128, shape).astype(np.int8), "w_q"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                 numpy_helper.from_array(np.array(0.004, np.float32), "w_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
                 numpy_helper.from_array(np.array(128, np.uint8), "y_zero")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
                 helper.make_node("QLinearConv", ["x_q", "x_scale", "x_zero", "w_q", "w_scale", "w_zero",
                                                  "y_scale", "y_zero"], ["y_q"], **attrs),
                 helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"])]
    else:
        inits = [numpy_helper.from_array(rng.integers(0, 256, shape).astype(np.uint8), "w_q"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
                 numpy_helper.from_array(np.array(128, np.uint8), "w_zero"),
                 numpy_helper.from_array(np.array(0.02 * 0.004, np.float32), "xw_scale")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
                 helper.make_node("ConvInteger", ["x_q", "w_q", "x_zero", "w_zero"], ["y_int"], **attrs),
                 helper.make_node("Cast", ["y_int"], ["y_f"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["y_f", "xw_scale"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "conv", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


PAIRS = [("integer", "float"), ("qlinear", "float"), ("fbgemm", "torch_float"), ("fbgemm_nhwc", "torch_float"),
         ("int_mm", "torch_float")]


def _ort_fn(session, x):
    return lambda: session.run(None, x)


def _torch_fns(layer: dict, x_np) -> dict:
    """fbgemm's int8 conv (input quantized per call, output dequantized) and torch's float conv."""
    import torch.nn.functional as F

    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "qnnpack"
    x = torch.from_numpy(x_np)
    w = torch.randn(layer["cout"], layer["cin"], layer["k"], layer["k"])
    q = torch.ao.nn.quantized.Conv2d(layer["cin"], layer["cout"], layer["k"], stride=layer["stride"],
                                     padding=layer["pad"])
    q.set_weight_bias(torch.quantize_per_tensor(w, 0.004, 0, torch.qint8), None)
    q.scale, q.zero_point = 0.05, 128
    x_nhwc = x.contiguous(memory_format=torch.channels_last)

    def fbgemm(inp):
        return lambda: q(torch.quantize_per_tensor(inp, 0.02, 0, torch.quint8)).dequantize()

    k, stride, pad = layer["k"], layer["stride"], layer["pad"]
    w_codes = torch.randint(-127, 128, (layer["cout"], layer["cin"], k, k), dtype=torch.int8)
    w_kc = w_codes.permute(2, 3, 1, 0).reshape(k * k * layer["cin"], layer["cout"]).contiguous()  # (kh·kw·C, O)
    w_sum = w_kc.sum(0, dtype=torch.int32)

    def int_mm():
        """Exact int8 × int8 → int32 GEMM (oneDNN, ``torch._int_mm``) on channels-last columns: the
        input quantized to unsigned codes, shifted to int8, the shift undone with the weights' sums;
        the output in float, as lcs's fake-quantized conv gives it."""
        n, c, h, wd = x.shape
        codes = torch.clamp(torch.round(x * 50.0), 0, 255).sub_(128).to(torch.int8)  # scale 0.02, zero point 0
        t = codes.permute(0, 2, 3, 1)  # N, H, W, C (a view)
        if pad:
            t = F.pad(t.permute(0, 3, 1, 2), (pad,) * 4, value=-128).permute(0, 2, 3, 1)
        if k == 1:
            t = t[:, ::stride, ::stride]
            ho, wo = t.shape[1], t.shape[2]
            cols = t.reshape(n * ho * wo, c)
        else:
            win = t.unfold(1, k, stride).unfold(2, k, stride)  # N, Ho, Wo, C, kh, kw
            ho, wo = win.shape[1], win.shape[2]
            cols = win.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, k * k * c)
        acc = torch._int_mm(cols, w_kc) + 128 * w_sum  # (N·Ho·Wo, O) int32, exact
        return (acc.to(torch.float32) * (0.02 * 0.004)).view(n, ho, wo, -1).permute(0, 3, 1, 2)

    return {"torch_float": lambda: F.conv2d(x, w, None, layer["stride"], layer["pad"]),
            "fbgemm": fbgemm(x), "fbgemm_nhwc": fbgemm(x_nhwc), "int_mm": int_mm}


def _interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for kind, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[kind].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/int8_conv.json")
    args = ap.parse_args()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    # onnxruntime's intra-op threads spin after each run by default and take the cores from torch's
    # kernels timed next to them (the fbgemm row of an earlier run was off by 5x for that reason)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    layers = conv_shapes()
    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "int8_conv", "model": "cpreresnet20", "threads": args.threads,
                    "onnxruntime": ort.__version__, "machine": platform.machine(), "rounds": args.rounds,
                    "batches": {}}
    for batch in (int(b) for b in args.batch.split(",")):
        rows = []
        for layer in layers:
            x = {"x": np.random.default_rng(1).random((batch, layer["cin"], layer["hw"], layer["hw"]),
                                                      dtype=np.float32)}
            ort_fns = {kind: _ort_fn(ort.InferenceSession(build(layer, kind), opts,
                                                          providers=["CPUExecutionProvider"]), x)
                       for kind in ("float", "integer", "qlinear")}
            # each engine's contestants interleaved among themselves, the engines one after the other
            times = _interleaved(ort_fns, args.rounds)
            del ort_fns
            times.update(_interleaved(_torch_fns(layer, x["x"]), args.rounds))
            rows.append({**layer, **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}})
        summary = {"layers": rows}
        for kind, ref in PAIRS:
            t_ref = sum(r[f"{ref}_ms"] for r in rows)
            t_int = sum(r[f"{kind}_ms"] for r in rows)
            wins = sum(r[f"{ref}_ms"] > r[f"{kind}_ms"] for r in rows)
            summary[kind] = {"ms": t_int, "reference": ref, "reference_ms": t_ref, "speedup": t_ref / t_int,
                             "layers_faster": wins}
            print(f"batch {batch}: {kind:>14} {t_int:8.2f} ms vs {ref:>11} {t_ref:8.2f} ms: {t_ref / t_int:.2f}x "
                  f"(faster in {wins} of {len(rows)} convs)")
        result["batches"][str(batch)] = summary
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
