"""ONNX export: the one exporter (``onnx_export``: float and QDQ INT8 graphs, checked against PyTorch) and small
lookups over an ONNX graph (``onnx_graph``)."""
