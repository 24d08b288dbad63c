"""Everything ONNX and onnxruntime, installed as `edgesvd.exporters`: export, graph check, parity,
profiling, budgets on devices, bundles, reports, and the `deploy`/`run` orchestrator."""
