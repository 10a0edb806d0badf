"""Stage 5, export: the torch model (float or QAT) to ONNX, checked against PyTorch on ONNX Runtime.

The exporter is the library's (edgepipe.export.onnx_export), with the task's input and output names, dtypes and
dynamic axes (a classifier: input ``input``, output ``logits``, dynamic batch); a QAT model in the QDQ form with its
weights folded to int8 initializers. The result must pass ``onnx.checker`` (full check) and the task's check against
PyTorch on the validation set (``Task.export_check``; a classifier: max |logit difference| <=
``export.float_tolerance`` for a float model, top-1 agreement >= ``export.int8_min_agreement`` for an INT8 one).
Nothing is written unless it does.
"""
from __future__ import annotations

import json
import logging

import onnx

from edgepipe.engine.artifacts import Artifact
from edgepipe.errors import EdgepipeError
from edgepipe.io import atomic_write
from edgepipe.models.loading import load_torch_artifact
from edgepipe.export.onnx_graph import float_layers
from edgepipe.export.check import compare_outputs
from edgepipe.export.onnx_export import export_onnx, fold_weight_quantizers, qdq_report
from edgepipe.engine.stage import StageContext, StageResult
from edgepipe.types import ArtifactKind, DType

NAME = "export"
INPUT_KINDS = (ArtifactKind.TORCH,)
SECTIONS = ("export", "data")
USES_TEACHER = False
MEASURED = True
DISTRIBUTED = False  # under torchrun: rank 0 alone
target_key = None  # the INT8 form is already in the QAT model (see stages.qat.target_key)
ONNX_FILE = "model.onnx"
log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.export
    art = ctx.input
    if art is None or art.kind not in INPUT_KINDS:
        got = "nothing" if art is None else f"an artifact of kind {art.kind.value}"
        raise EdgepipeError(f"export: needs a torch model from an earlier stage, got {got}")
    desc = json.loads(art.path("build").read_text())
    quantized = bool(desc.get("quantization"))
    model = load_torch_artifact(art)
    task = ctx.task
    proto = export_onnx(model, tuple(desc["input_shape"]), cfg.opset, task, desc["num_classes"])
    folded = fold_weight_quantizers(proto) if quantized else 0
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise EdgepipeError(f"export: the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx_bytes, batch, threads = proto.SerializeToString(), ctx.config.data.eval_batch_size, ctx.config.measure.threads
    own = task.export_check(model, onnx_bytes, ctx.data, batch, quantized, cfg.float_tolerance, cfg.int8_min_agreement,
                            threads)
    checks = {"onnx_checker": "passed",
              **(own if own is not None else
                 compare_outputs(task, model, onnx_bytes, ctx.data, batch, quantized, cfg.float_tolerance, threads))}
    path = atomic_write(ctx.out_dir / ONNX_FILE, lambda p: onnx.save(proto, str(p)))
    report = qdq_report(path)
    qdq = {k: report[k] for k in ("quantize_linear", "dequantize_linear", "int8_weight_initializers")}
    log.info("export: %s (%s), %s", path, "int8 QDQ" if quantized else "float", checks)
    artifact = Artifact(kind=ArtifactKind.ONNX, root=ctx.out_dir, files={"onnx": ONNX_FILE},
                        dtype=DType.INT8 if quantized else DType.FP32, quantized=quantized,
                        meta={"input_shape": desc["input_shape"], "num_classes": desc["num_classes"],
                              "opset": cfg.opset, **ctx.task_meta(),
                              # the precision the QAT stage chose for the layers an INT8 model keeps in float
                              **({"fallback_dtype": desc["quantization"]["fallback_dtype"]}
                                 if quantized and desc["quantization"].get("fallback_dtype") else {})})
    artifact.save()
    return StageResult(artifact, records={"opset": cfg.opset, "checks": checks,
                                          "qdq": {**qdq, "weights_folded": folded},
                                          "float_layers": float_layers(proto.graph) if quantized else []})
