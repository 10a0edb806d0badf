"""Measurement: the figures of a stage artifact (``figures``: metric, params, MACs, size, latency, throughput),
latency estimates for a device that is not this host (``layers`` counts the kernels, ``roofline`` estimates,
``calibrate`` fits the estimate to published results), and ``edgepipe bench`` (``bench``)."""
