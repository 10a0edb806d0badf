"""edgepipe: turn a large trained PyTorch model into a small, fast one for an edge device, measured at every step."""
__version__ = "0.1.0"
