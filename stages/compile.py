"""Stage 6, compile: build the deployable model for the target with the profile's backend.

The precision comes from the profile: INT8 when the device lists it and the model went through QAT,
otherwise the most preferred float dtype it supports. The backend (edgepipe.backends: openvino,
tensorrt, onnxruntime) writes the artifact and reports what the runtime actually does, e.g. the
precision OpenVINO's convolutions really run in, or why a TensorRT engine could not be built here.
"""
from __future__ import annotations

from edgepipe.backends import check_dtype, get_backend
from edgepipe.stage import StageContext, StageResult
from edgepipe.types import ArtifactKind

NAME = "compile"
INPUT_KINDS = (ArtifactKind.ONNX,)


def run(ctx: StageContext) -> StageResult:
    profile = ctx.profile
    dtype = profile.compile_dtype(ctx.input.quantized)
    check_dtype(profile.backend, dtype)
    backend = get_backend(profile.backend)
    artifact, records = backend.compile(ctx.input.path("onnx"), profile, dtype, ctx.out_dir, progress=ctx.progress)
    artifact.meta.setdefault("input_shape", ctx.input.meta.get("input_shape"))
    artifact.meta.setdefault("num_classes", ctx.input.meta.get("num_classes"))
    artifact.save()
    return StageResult(artifact, records={"backend": profile.backend.value, "target": profile.name,
                                          "requested_dtype": dtype.value, **records})
