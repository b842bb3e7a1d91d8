"""Deploy side: the one bake path (``bake``: ``materialize``), the compressed artifact
(``artifact``), the subspace file (``subspace_file``), the runtime that switches α (``runtime``),
profiling and the budget controller (``profile``, ``controller``, ``adapt``) and ONNX export
(``onnx``). Imports torch, safetensors and lcs's torch-only modules; no training code."""
