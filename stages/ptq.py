"""Stage ptq (a baseline, outside the pipeline order): NNCF post-training INT8 quantization for OpenVINO.

What a user gets with one call instead of QAT: the float ONNX (export stage) -> OpenVINO model
(edgepipe.backends.openvino.convert) -> ``nncf.quantize`` calibrated on ``ptq.subset_size``
un-augmented training images with the ``ptq.preset`` preset for the CPU -> IR. The artifact's dtype is
the precision the CPU plugin runs its convolutions in, read back from the compiled model.
``edgepipe compare`` runs it in derived runs (teacher -> export -> ptq, pruned -> export -> ptq); a
recipe may put it after export in a run's order as well.

NNCF docs: https://docs.openvino.ai/2025/openvino-workflow/model-optimization-guide/quantizing-models-post-training/basic-quantization-flow.html
"""
from __future__ import annotations

from typing import Any

from edgepipe.engine.artifacts import Artifact
from edgepipe.backends import get_backend
from edgepipe.config import PipelineConfig
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.types import ArtifactKind, Backend, DType

NAME = "ptq"
INPUT_KINDS = (ArtifactKind.ONNX,)
SECTIONS = ("ptq", "data", "seed")
USES_TEACHER = False
MEASURED = True
DISTRIBUTED = False  # under torchrun: rank 0 alone (NNCF)


def target_key(profile: HardwareProfile, config: PipelineConfig) -> dict[str, Any]:
    """The profile: NNCF quantizes for its device and the IR runs with its OpenVINO options."""
    return profile.model_dump(mode="json")


def run(ctx: StageContext) -> StageResult:
    import nncf

    profile, pcfg = ctx.profile, ctx.config.ptq
    if profile.backend is not Backend.OPENVINO:
        raise EdgepipeError(f"ptq: NNCF post-training quantization here builds OpenVINO IR; target {profile.name} "
                            f"uses {profile.backend.value}")
    if ctx.input.quantized:
        raise EdgepipeError(f"ptq: needs a float ONNX model, got an INT8 one ({ctx.input.root})")
    ov_backend = get_backend(Backend.OPENVINO)
    images = ctx.data.calibration_batches(1, pcfg.subset_size)[0].numpy()
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    ctx.progress("ptq: nncf.quantize", 0, 1, {})
    quantized = nncf.quantize(ov_backend.convert(ctx.input.path("onnx")), dataset, subset_size=len(images),
                              preset=nncf.QuantizationPreset(pcfg.preset), target_device=nncf.TargetDevice.CPU)
    ctx.progress("ptq: nncf.quantize", 1, 1, {})
    ov_backend.save_ir(quantized, ctx.out_dir)
    config = ov_backend.inference_config(profile, DType.INT8)
    runner = ov_backend.OvRunner(ctx.out_dir / "model.xml", "CPU", config)
    method = (f"nncf {nncf.__version__} nncf.quantize, {len(images)} un-augmented training images, "
              f"{pcfg.preset} preset")
    artifact = Artifact(kind=ArtifactKind.OPENVINO_IR, root=ctx.out_dir, files={"xml": "model.xml", "bin": "model.bin"},
                        dtype=DType(runner.dtype), quantized=True,
                        meta={"backend": "openvino", "device": "CPU", "measured_on": "CPU", "config": config,
                              "requested_dtype": DType.INT8.value, "runtime_dtype": runner.dtype,
                              "input_shape": ctx.input.meta.get("input_shape"),
                              "num_classes": ctx.input.meta.get("num_classes"), "method": method})
    artifact.save()
    return StageResult(artifact, records={"method": method, "nncf_version": nncf.__version__,
                                          "subset_size": len(images), "preset": pcfg.preset,
                                          "conv_precisions": runner.precisions, "runtime_dtype": runner.dtype})
