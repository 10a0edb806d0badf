"""Models: the architectures edgepipe builds, and how a model is loaded, trusted and saved.

- ``edgepipe.models.zoo``: the registry of architectures by name (``register``, ``ARCHITECTURES``, ``build_arch``):
  CIFAR-style ResNets, torchvision's classifiers and the CIFAR variants of MobileNetV2/V3 and ShuffleNetV2.
- ``edgepipe.models.loading``: building a config's ``ModelSpec`` (architecture, ``module:function`` factory or
  ``torch.export`` program), the torch artifact (``model.json`` + a weights-only ``model.pt``; ``save_torch_artifact``,
  ``load_torch_artifact``, ``restore_shapes`` for pruned models) and the checks on a model (``check_fits``).
- ``edgepipe.models.trust``: which factories and pickled programs a spec read from a run folder may run
  (``trust_config``, ``check_trusted``, ``forget_trusted``).
"""
