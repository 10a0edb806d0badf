"""Where the activation quantizers go: the placement rule on the torch.fx graph of a float model.

The rule and its sources are in ``edgepipe.quantization.fakequant``'s docstring (Conv/Linear inputs,
residual add inputs, concat inputs with a shared scale, one quantizer per tensor). Here: the node predicates
it reads the graph with (non-negative, shape-only, dropout), the plan, its insertion, and reading the plan
back from a built model. Mixed precision (``edgepipe.quantization.mixed``) walks the same edges.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from edgepipe.quantization.layers import QUANT_LAYER_OF, QUANTIZERS, ActQuant, graph_part

_F = nn.functional
_NONNEG_FUNCTIONS = {torch.relu, _F.relu, _F.relu6, torch.sigmoid, _F.sigmoid, _F.hardsigmoid, torch.softmax,
                     _F.softmax}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "softmax"}
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_KEEPS_SIGN_FUNCTIONS = {_F.max_pool2d, _F.avg_pool2d, _F.adaptive_avg_pool2d, _F.adaptive_max_pool2d, torch.flatten,
                         _F.dropout, torch.cat, torch.concat, torch.reshape}
_KEEPS_SIGN_METHODS = {"flatten", "view", "reshape", "contiguous", "mean", "permute", "squeeze", "unsqueeze"}
_KEEPS_SIGN_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
                       nn.Identity, nn.Dropout)
_SHAPE_ONLY_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_SHAPE_ONLY_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}
_ADDS = {operator.add, operator.iadd, torch.add}
_AVG_POOL_FUNCTIONS = {_F.avg_pool2d, _F.adaptive_avg_pool2d}
_AVG_POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_CATS = {torch.cat, torch.concat}


def _module_of(modules: dict[str, nn.Module], node: fx.Node) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _nonnegative(node: fx.Node, modules: dict[str, nn.Module], memo: dict[fx.Node, bool]) -> bool:
    """The graph proves ``node``'s output >= 0: a ReLU-like op, or sign-keeping ops over such outputs."""
    if node in memo:
        return memo[node]
    module = _module_of(modules, node)
    args = [a for a in (node.args[0] if node.target in _CATS and node.args else node.args) if isinstance(a, fx.Node)]
    if (node.op == "call_function" and node.target in _NONNEG_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _NONNEG_METHODS) or isinstance(module, _NONNEG_MODULES):
        result = True
    elif isinstance(module, nn.Hardtanh):
        result = module.min_val >= 0
    elif ((node.op == "call_function" and node.target in _KEEPS_SIGN_FUNCTIONS | _ADDS)
          or (node.op == "call_method" and node.target in _KEEPS_SIGN_METHODS)
          or isinstance(module, _KEEPS_SIGN_MODULES)) and args:
        inputs = args if node.target in _CATS | _ADDS else args[:1]
        result = all(_nonnegative(a, modules, memo) for a in inputs)
    else:
        result = False
    memo[node] = result
    return result


def is_shape_only(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A reshape-like op (flatten, view, reshape, squeeze, ...): moves no value."""
    return ((node.op == "call_function" and node.target in _SHAPE_ONLY_FUNCTIONS)
            or (node.op == "call_method" and node.target in _SHAPE_ONLY_METHODS)
            or isinstance(_module_of(modules, node), nn.Flatten))


def is_dropout(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (node.op == "call_function" and node.target is _F.dropout) or \
        isinstance(_module_of(modules, node), nn.Dropout)


def _is_tensor(node: Any) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return node.op != "get_attr" and meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _feeds_quantized(node: fx.Node, modules: dict[str, nn.Module], seen: set[fx.Node] | None = None) -> bool:
    """Does ``node``'s output reach a Conv/Linear through sign-keeping ops only?"""
    seen = set() if seen is None else seen
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        if type(_module_of(modules, user)) in QUANT_LAYER_OF:
            return True
        keeps = ((user.op == "call_function" and user.target in _KEEPS_SIGN_FUNCTIONS | _NONNEG_FUNCTIONS)
                 or (user.op == "call_method" and user.target in _KEEPS_SIGN_METHODS | _NONNEG_METHODS)
                 or isinstance(_module_of(modules, user), _KEEPS_SIGN_MODULES + _NONNEG_MODULES))
        if keeps and _feeds_quantized(user, modules, seen):
            return True
    return False


def plan_placement(gm: fx.GraphModule, example: torch.Tensor, activations: str) -> list[dict[str, Any]]:
    """The activation quantizers for ``gm`` (a traced float model), by the rule in the module docstring.

    Returns one entry per quantized tensor, in graph order: ``name`` (the producing fx node),
    ``signed``, ``group`` (shared-scale group, or None) and ``consumers`` [[node, op], ...].
    """
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = gm.training
    with torch.no_grad():
        ShapeProp(gm.eval()).propagate(example)
    gm.train(was_training)
    modules = dict(gm.named_modules())
    wanted: dict[fx.Node, list[tuple[fx.Node, str]]] = {}
    parent: dict[fx.Node, fx.Node] = {}

    def root(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    for node in gm.graph.nodes:
        module = _module_of(modules, node)
        if type(module) in QUANT_LAYER_OF and node.args and isinstance(node.args[0], fx.Node):
            # Above a reshape, not below it: OpenVINO fuses the quantizer into the op before the reshape
            # (e.g. the global pooling before a classifier's flatten), as in NNCF's graphs.
            # Above a dropout too (torchvision's classifiers: Dropout -> Linear): it is the identity at inference,
            # but while QAT trains it scales the kept values by 1 / (1 - p), which a quantizer calibrated in eval
            # mode below it would clip (measured on MobileNetV2's classifier, p = 0.2: see tests/test_quant.py).
            src, consumer, op = node.args[0], node, type(module).__name__
            while ((is_shape_only(src, modules) or is_dropout(src, modules)) and len(src.users) == 1 and src.args
                   and isinstance(src.args[0], fx.Node) and _is_tensor(src.args[0])):
                src, consumer, op = src.args[0], src, "Dropout" if is_dropout(src, modules) else "Reshape"
            wanted.setdefault(src, []).append((consumer, op))
        elif ((node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in
                                                                         ("add", "add_"))) and len(node.args) >= 2:
            a, b = node.args[0], node.args[1]
            if (_is_tensor(a) and _is_tensor(b) and a is not b
                    and tuple(a.meta["tensor_meta"].shape) == tuple(b.meta["tensor_meta"].shape)):
                for x in (a, b):
                    wanted.setdefault(x, []).append((node, "Add"))
        elif (((node.op == "call_function" and node.target in _AVG_POOL_FUNCTIONS) or isinstance(module, _AVG_POOL_MODULES))
              and node.args and _is_tensor(node.args[0]) and _feeds_quantized(node, modules)):
            wanted.setdefault(node.args[0], []).append((node, "AvgPool"))
        elif node.op == "call_function" and node.target in _CATS and node.args and _feeds_quantized(node, modules):
            inputs = [x for x in node.args[0] if isinstance(x, fx.Node)]
            if len(inputs) > 1 and all(_is_tensor(x) for x in inputs):
                for x in inputs:
                    wanted.setdefault(x, []).append((node, "Concat"))
                    parent.setdefault(x, x)
                    parent[root(x)] = root(inputs[0])
    memo: dict[fx.Node, bool] = {}
    groups: dict[fx.Node, list[fx.Node]] = {}
    for x in wanted:
        if x in parent:
            groups.setdefault(root(x), []).append(x)
    plan = []
    for x, users in wanted.items():  # graph order: dicts keep insertion order
        members = groups.get(root(x), [x]) if x in parent else [x]
        unsigned = activations == "uint8_after_relu" and all(_nonnegative(m, modules, memo) for m in members)
        plan.append({"name": x.name, "signed": not unsigned,
                     "group": root(x).name if x in parent else None,
                     "consumers": [[u.name, op] for u, op in users]})
    return plan


def apply_placement(gm: fx.GraphModule, plan: list[dict[str, Any]]) -> None:
    """Insert one ActQuant per planned tensor before its first consumer (in place)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    holder = nn.ModuleDict()
    gm.add_module(QUANTIZERS, holder)
    for entry in plan:
        producer, consumers = nodes[entry["name"]], [nodes[c] for c, _ in entry["consumers"]]
        holder[entry["name"]] = ActQuant(entry["signed"], entry["group"])
        with gm.graph.inserting_before(min(consumers, key=order.__getitem__)):
            q = gm.graph.call_module(f"{QUANTIZERS}.{entry['name']}", (producer,))
        for consumer in consumers:
            consumer.replace_input_with(producer, q)
    gm.graph.lint()
    gm.recompile()


def placement_of(model: nn.Module) -> list[dict[str, Any]] | None:
    """The plan a traced QAT model was built with (None for the untraced fallback)."""
    model = graph_part(model)[1]  # the traced part of a model whose forward goes on in Python (a detector's core)
    if not isinstance(model, fx.GraphModule) or not hasattr(model, QUANTIZERS):
        return None
    nodes = {n.name: n for n in model.graph.nodes}
    plan = []
    for name, q in getattr(model, QUANTIZERS).items():
        users = nodes[name].users if name in nodes else {}
        qnode = next((u for u in users if u.op == "call_module" and u.target == f"{QUANTIZERS}.{name}"), None)
        consumers = [[u.name, _op_name(model, u)] for u in (qnode.users if qnode else [])]
        plan.append({"name": name, "signed": q.signed, "group": q.group, "consumers": consumers})
    return plan


def _op_name(model: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__.removeprefix("Quant")
    return "Concat" if node.target in _CATS else "Add" if node.target in _ADDS or node.target in ("add", "add_") \
        else str(getattr(node.target, "__name__", node.target))

