"""Everything ONNX and onnxruntime: export, factorization check, parity, profiling, bundles, `edgesvd run`."""
