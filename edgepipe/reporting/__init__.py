"""What a person reads: the run report (``report``, ``plots``), ``edgepipe compare`` and its benchmark document
(``compare``, ``benchmarks``), and how figures are written (``formatting``)."""
