"""Stage ptq (a baseline, outside the pipeline order): NNCF post-training INT8 quantization for OpenVINO.

What a user gets with one call instead of QAT: the float ONNX (export stage) -> the target backend's
``post_training_quantize`` (OpenVINO: ``nncf.quantize``, edgepipe.backends.openvino) calibrated on
``ptq.subset_size`` un-augmented training images with the ``ptq.preset`` preset for the CPU -> IR. The artifact's dtype is
the precision the CPU plugin runs its convolutions in, read back from the compiled model.
``edgepipe compare`` runs it in derived runs (teacher -> export -> ptq, pruned -> export -> ptq); a
recipe may put it after export in a run's order as well.

NNCF docs: https://docs.openvino.ai/2025/openvino-workflow/model-optimization-guide/quantizing-models-post-training/basic-quantization-flow.html
"""
from __future__ import annotations

from typing import Any

from edgepipe.backends import get_backend
from edgepipe.config import PipelineConfig
from edgepipe.errors import EdgepipeError
from edgepipe.profiles import HardwareProfile
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.types import ArtifactKind

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
    profile, pcfg = ctx.profile, ctx.config.ptq
    backend = get_backend(profile.backend)
    if not backend.POST_TRAINING_QUANTIZATION:
        raise EdgepipeError(f"ptq: NNCF post-training quantization here builds OpenVINO IR; target {profile.name} "
                            f"uses {profile.backend.value}")
    if ctx.input.quantized:
        raise EdgepipeError(f"ptq: needs a float ONNX model, got an INT8 one ({ctx.input.root})")
    samples, how = ctx.task.calibration_samples(ctx.data, pcfg.subset_size)
    artifact, records = backend.post_training_quantize(
        ctx.input.path("onnx"), samples, pcfg.preset, profile, ctx.out_dir,
        meta={"input_shape": ctx.input.meta.get("input_shape"), "num_classes": ctx.input.meta.get("num_classes"),
              **ctx.task_meta()},
        progress=ctx.progress, **how)
    artifact.save()
    return StageResult(artifact, records=records)
