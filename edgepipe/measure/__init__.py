"""Measurement: the figures of a stage artifact (``figures``: metric, params, MACs, size, latency, throughput),
latency estimates for a device that is not this host (``estimate``), and ``edgepipe bench`` (``bench``)."""
