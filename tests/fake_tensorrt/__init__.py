"""Strict fake TensorRT 10.3 for device-simulation tests (see ``tensorrt/__init__.py``).

This file only makes ``tests/fake_tensorrt`` a package, so pytest collecting ``test_fake_tensorrt.py``
does not put this folder on ``sys.path`` (which would let the fake shadow ``tensorrt`` in the main test
process). A test that wants the fake prepends this folder to ``sys.path``/``PYTHONPATH`` itself.
"""
