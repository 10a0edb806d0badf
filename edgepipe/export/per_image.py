"""A model that can only be traced for one image at a time, exported with a dynamic batch all the same.

A two-stage detector (torchvision's Faster R-CNN) handles a batch as a Python list of images: tracing it unrolls
that loop for the example's batch size, so its graph holds for that size only. Traced at batch 1 (its output for one
image has fixed shapes: ``edgepipe.models.detectors.Detector.pad``), the graph is correct for any image; ONNX's
``Scan`` then runs it over the batch axis and stacks each output, which is what the Python loop did. ONNX Runtime and
OpenVINO (its TensorIterator) run ``Scan``; the model inside is the traced one, unchanged.
"""
from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

INNER = "per_image_"
"""Prefix of the traced graph's own input and output names inside the Scan body (each name is assigned once)."""


def _renamed(nodes: Any, rename: dict[str, str]) -> list[onnx.NodeProto]:
    """Copies of ``nodes`` whose input and output names are mapped through ``rename`` (others kept)."""
    out = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename.get(n, n) for n in node.input]
        copy.output[:] = [rename.get(n, n) for n in node.output]
        out.append(copy)
    return out


def scan_over_batch(traced: onnx.ModelProto) -> onnx.ModelProto:
    """``traced`` (one input and its outputs with a leading batch of 1) as a graph of the same names whose batch axis
    is dynamic: a ``Scan`` over the input's first axis whose body is ``traced`` between an Unsqueeze of each image
    and a Squeeze of each output."""
    graph = traced.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"scan_over_batch: expected one input, found {[i.name for i in inputs]}")
    source = inputs[0]
    rename = {source.name: INNER + source.name, **{o.name: INNER + o.name for o in graph.output}}
    nodes = _renamed(graph.node, rename)
    axis = helper.make_tensor(INNER + "axis0", onnx.TensorProto.INT64, [1], [0])
    image = INNER + "image"
    body_nodes = [helper.make_node("Unsqueeze", [image, axis.name], [rename[source.name]], name=INNER + "unsqueeze"),
                  *nodes]
    body_outputs, outputs = [], []
    for out in graph.output:
        body_nodes.append(helper.make_node("Squeeze", [rename[out.name], axis.name], [INNER + out.name + "_one"],
                                           name=INNER + "squeeze_" + out.name))
        dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        elem = out.type.tensor_type.elem_type
        body_outputs.append(helper.make_tensor_value_info(INNER + out.name + "_one", elem, dims[1:]))
        outputs.append(helper.make_tensor_value_info(out.name, elem, ["batch", *dims[1:]]))
    dims = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
    body = helper.make_graph(body_nodes, INNER + "body",
                             [helper.make_tensor_value_info(image, source.type.tensor_type.elem_type, dims[1:])],
                             body_outputs, initializer=[*graph.initializer, axis])
    scan = helper.make_node("Scan", [source.name], [o.name for o in graph.output], num_scan_inputs=1, body=body,
                            name=INNER + "scan")
    main = helper.make_graph([scan], graph.name or "model",
                             [helper.make_tensor_value_info(source.name, source.type.tensor_type.elem_type,
                                                            ["batch", *dims[1:]])], outputs)
    model = helper.make_model(main, opset_imports=list(traced.opset_import), ir_version=traced.ir_version,
                              producer_name=traced.producer_name, producer_version=traced.producer_version)
    return model


def per_image_graph(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The traced one-image graph inside a ``scan_over_batch`` model, as a model of its own under the outer names: input
    without the batch axis (``[C, H, W]``), outputs without it; None for any other model. What a tool that does not
    enter loop bodies (NNCF's post-training quantization) works on: edgepipe.backends.openvino runs it once per image."""
    graph = model.graph
    if len(graph.node) != 1 or graph.node[0].op_type != "Scan" or graph.node[0].name != INNER + "scan":
        return None
    scan = graph.node[0]
    body = next(a.g for a in scan.attribute if a.name == "body")
    outer_in, outer_out = scan.input[0], list(scan.output)
    rename = {body.input[0].name: outer_in, **{b.name: o for b, o in zip(body.output, outer_out)}}
    nodes = _renamed(body.node, rename)
    inputs, outputs = [onnx.ValueInfoProto()], []
    inputs[0].CopyFrom(body.input[0])
    inputs[0].name = outer_in
    for b, name in zip(body.output, outer_out):
        out = onnx.ValueInfoProto()
        out.CopyFrom(b)
        out.name = name
        outputs.append(out)
    single = helper.make_graph(nodes, graph.name, inputs, outputs, initializer=list(body.initializer))
    return helper.make_model(single, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             producer_name=model.producer_name, producer_version=model.producer_version)
