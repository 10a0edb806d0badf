"""The ``edgepipe`` commands that run no stage: ``report``, ``import-results``, ``profiles``, ``models``, ``cache``,
``validate`` and ``estimate``."""
from __future__ import annotations

import argparse

from edgepipe.errors import EdgepipeError


def report_command(args: argparse.Namespace) -> int:
    """`edgepipe report --run RUN`: write report.md and report.html."""
    from edgepipe.reporting.report import write_report

    md, html = write_report(args.run)
    print(f"wrote {md} and {html}")
    return 0


def import_results_command(args: argparse.Namespace) -> int:
    """`edgepipe import-results --run RUN results.json`: merge what the device measured into the run."""
    from edgepipe.engine.device_results import import_results

    out = import_results(args.run, args.results)
    print(f"imported {args.results} -> {out}; `edgepipe report --run {args.run}` shows it")
    return 0


def profiles_command(args: argparse.Namespace) -> int:
    """`edgepipe profiles [list|show NAME]`: the hardware profiles, or one in full."""
    import yaml

    from edgepipe.profiles import all_profiles, get_profile

    if args.action == "show":
        if not args.name:
            raise EdgepipeError("usage: edgepipe profiles show NAME")
        print(yaml.safe_dump(get_profile(args.name).model_dump(mode="json"), sort_keys=False), end="")
        return 0
    for name, prof in all_profiles().items():
        aliases = f" (alias: {', '.join(prof.aliases)})" if prof.aliases else ""
        print(f"{name:20s} {prof.backend.value:12s} {','.join(d.value for d in prof.dtypes):18s} "
              f"{prof.description}{aliases}")
    return 0


def models_command(args: argparse.Namespace) -> int:
    """`edgepipe models`: the registered architectures, one line each."""
    from edgepipe.models.zoo import ARCHITECTURES

    for name, fn in sorted(ARCHITECTURES.items()):
        print(f"{name:24s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
    return 0


def cache_command(args: argparse.Namespace) -> int:
    """`edgepipe cache [list|clear]`: the decoded-image cache's files, or remove them."""
    from edgepipe.data.decode_cache import clear_decode_cache, decode_cache

    folder, files = decode_cache()
    if args.action == "clear":
        n, freed = clear_decode_cache()
        print(f"removed {n} decoded-image file(s), {freed / 2**20:.1f} MiB, from {folder}")
        return 0
    for f in files:
        print(f"{f.stat().st_size / 2**20:10.1f} MiB  {f.name}")
    print(f"{len(files)} decoded-image file(s) in {folder} ({sum(f.stat().st_size for f in files) / 2**20:.1f} "
          "MiB); `edgepipe cache clear` removes them")
    return 0


def validate_command(args: argparse.Namespace) -> int:
    """`edgepipe validate CONFIG`: load the config, with every check it gets."""
    from edgepipe.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: valid ({cfg.name})")
    return 0


MAX_ESTIMATE_BATCH = 65_536  # the estimate is arithmetic (nothing is allocated per image); a larger batch is a typo
MAX_ESTIMATE_VALUES = 1 << 26  # one image's values: 256 MiB as fp32 before the first layer (e.g. 3,4096,4096 fits)


def estimate_command(args: argparse.Namespace) -> int:
    """`edgepipe estimate`: the calibrated latency ESTIMATE of one model on a target, with its assumptions."""
    import json
    import math

    from edgepipe.errors import short_repr
    from edgepipe.measure.layers import model_layers, onnx_layers
    from edgepipe.measure.roofline import layer_estimate
    from edgepipe.profiles import get_profile
    from edgepipe.types import DType

    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise EdgepipeError(f"--input-shape {args.input_shape}: expected integers C,H,W, e.g. 3,224,224") from None
        if not shape or any(v < 1 for v in shape):
            raise EdgepipeError(f"--input-shape {args.input_shape}: every dimension must be >= 1")
        if math.prod(shape) > MAX_ESTIMATE_VALUES:
            raise EdgepipeError(f"--input-shape {args.input_shape}: {math.prod(shape):,} values per image, more than "
                                f"the {MAX_ESTIMATE_VALUES:,} the layer count's forward pass may hold in memory; give "
                                "one image's real shape, e.g. 3,224,224")
    if args.batch < 1 or args.batch > MAX_ESTIMATE_BATCH:
        raise EdgepipeError(f"--batch {args.batch}: must be between 1 and {MAX_ESTIMATE_BATCH:,} images per inference "
                            "(no edge runtime takes more)")
    profile = get_profile(args.target)
    try:
        dtype = DType(args.dtype) if args.dtype else profile.compile_dtype(quantized=True)
    except ValueError:
        raise EdgepipeError(f"--dtype {args.dtype}: unknown (known: {', '.join(d.value for d in DType)})") from None
    if args.arch:
        from edgepipe.models.zoo import build_arch

        if shape is None:
            raise EdgepipeError("--arch needs --input-shape C,H,W (one image, e.g. 3,224,224)")
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise EdgepipeError(f"--kwargs: not valid JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(kwargs, dict):
            raise EdgepipeError("--kwargs: expected a JSON object, e.g. '{\"num_classes\": 1000}'")
        from edgepipe.config import ModelSpec
        from edgepipe.engine.sizes import check_model

        try:
            check_model(ModelSpec(arch=args.arch, kwargs=kwargs), "--kwargs", trains=False)  # on meta: no storage
            model = build_arch(args.arch, kwargs)
        except EdgepipeError as e:  # sizes names the field as a config path: here it is the --kwargs option
            raise EdgepipeError(str(e).replace("--kwargs.kwargs", "--kwargs")) from None
        except Exception as e:  # noqa: BLE001 - a registered builder raises anything (RuntimeError, ValueError, ...)
            first = (str(e).strip().splitlines() or [""])[0][:200]  # on a value it cannot take: all mean bad kwargs
            raise EdgepipeError(f"--kwargs {short_repr(kwargs)}: architecture {args.arch} cannot be built with these "
                                f"values ({type(e).__name__}: {first}); give sizes >= 1 (widths, classes, depths) "
                                "and check each value") from None
        layers, what = model_layers(model, shape), f"{args.arch} {'x'.join(map(str, shape))}"
    else:
        layers, what = onnx_layers(args.onnx, shape), str(args.onnx)
    result = {"model": what, "target": profile.name, **layer_estimate(profile, dtype, layers, args.batch)}
    if args.json:
        print(json.dumps(result))
        return 0
    ideal, cal = result["lower_bound"], result["calibration"]
    print(f"ESTIMATE (not measured): {what} on {profile.name} ({profile.description}), {result['dtype']}, "
          f"batch {result['batch']}")
    print(f"  latency            {result['latency_ms']:.4g} ms per batch")
    print(f"  throughput         {result['images_per_s']:,.0f} images/s")
    if cal:
        print(f"  breakdown          {result['bound']}-bound: compute-limited layers "
              f"{result['compute_limited_ms']:.3g} ms, "
              f"memory-limited layers {result['memory_limited_ms']:.3g} ms, overheads {result['overhead_ms']:.3g} ms")
    print(f"  ideal lower bound  {ideal['latency_ms']:.4g} ms ({ideal['images_per_s']:,.0f} images/s; "
          f"{ideal['bound']}-bound at datasheet peaks, no overheads)")
    print(f"  model              {result['kernels']} kernels, {result['macs'] / 1e9:.3g} GMACs, "
          f"{result['weight_bytes'] / 1e6:.3g} MB weights, {result['activation_bytes'] / 1e6:.3g} MB activations "
          f"per image ({result['dtype']})")
    if cal:
        print(f"  calibration        {cal['family']}: compute efficiency {cal['compute_efficiency']}, bandwidth "
              f"efficiency {cal['bandwidth_efficiency']}, {cal['kernel_launch_us']} us per kernel, "
              f"{cal['enqueue_us']} us per inference; fitted to {len(cal['fitted_on'])} {cal['source']} results "
              f"({cal['table']}), reproduced within {cal['max_fit_error']}x")
    else:
        print(f"  calibration        none: no published results for {profile.name}; the figure is the ideal "
              "lower bound")
    print(f"  assumptions        {result['assumptions']}")
    return 0
