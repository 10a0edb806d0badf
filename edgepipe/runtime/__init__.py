"""Runners: any model behind one protocol (``runner``: named tensors in, named tensors out, timed the same way),
and the PyTorch runner (``torch_runner``). The compiled runtimes' runners live in ``edgepipe.backends``."""
