"""Would integer kernels make a quantized cPreResNet20 faster on this CPU? Measured per layer.

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


def build(layer: dict, integer: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = (layer["cout"], layer["cin"], layer["k"], layer["k"])
    attrs = {"pads": [layer["pad"]] * 4, "strides": [layer["stride"]] * 2}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", layer["cin"], layer["hw"], layer["hw"]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if not integer:
        inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)]
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
    layers = conv_shapes()
    result: dict = {"benchmark": "int8_conv", "model": "cpreresnet20", "threads": args.threads,
                    "onnxruntime": ort.__version__, "machine": platform.machine(), "rounds": args.rounds,
                    "batches": {}}
    for batch in (int(b) for b in args.batch.split(",")):
        rows = []
        for layer in layers:
            x = {"x": np.random.default_rng(1).random((batch, layer["cin"], layer["hw"], layer["hw"]),
                                                      dtype=np.float32)}
            sessions = {kind: ort.InferenceSession(build(layer, kind == "integer"), opts,
                                                   providers=["CPUExecutionProvider"])
                        for kind in ("float", "integer")}
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for s in sessions.values():
                s.run(None, x)
            for _ in range(args.rounds):
                for kind, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, x)
                    times[kind].append(time.perf_counter() - t0)
            rows.append({**layer, **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}})
        total_f = sum(r["float_ms"] for r in rows)
        total_i = sum(r["integer_ms"] for r in rows)
        wins = sum(r["float_ms"] > r["integer_ms"] for r in rows)
        result["batches"][str(batch)] = {"layers": rows, "float_ms": total_f, "integer_ms": total_i,
                                         "speedup": total_f / total_i, "layers_faster": wins}
        print(f"batch {batch}: all {len(rows)} convs float {total_f:.2f} ms, integer {total_i:.2f} ms: "
              f"speedup {total_f / total_i:.2f}x (integer faster in {wins} of {len(rows)} layers)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
