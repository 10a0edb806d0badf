"""The engine: runs stages in order, caches them by content hash, measures and records every stage.

``pipeline`` (runs, manifests, stage keys, measurement records), ``stage`` (the contract a stage module
declares), ``artifacts`` (what a stage hands the next), ``checks``/``sizes`` (everything checked before a
command writes), ``signals`` (Ctrl-C and SIGTERM), ``baselines`` (derived runs), ``device_results``
(figures measured on the device, merged back).
"""
