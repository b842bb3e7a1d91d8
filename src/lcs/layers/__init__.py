"""The torch building blocks regimes are made of: the line and TopK parametrizations, fake
quantization and BatchNorm folding, width-adaptive (slim) layers, per-level BatchNorm statistics,
sparse CSR kernels, and the layer selection rules. Deploy-safe: torch only."""
