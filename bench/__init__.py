"""vmpower's benchmarks: each part measured against its baseline in one run.

``bench/run.py`` runs every benchmark module in this package and publishes the results. A
benchmark module is any module here that defines:

``PART``
    its part number: the order in which the parts run and appear in the report.
``TITLE``
    a heading for the report.
``run(smoke: bool, scratch: pathlib.Path) -> dict``
    measure and return JSON-serialisable results; ``smoke`` means the smallest size only,
    quickly (CI runs it so the benchmark cannot rot); ``scratch`` is a directory on the same
    filesystem as the results, for files the benchmark needs (removed afterwards).
``markdown(result: dict) -> str``
    its section of ``latest.md``: tables that state the targets and whether they are met.
``plot(result: dict, figure) -> None``
    draw into its own matplotlib ``SubFigure`` of ``latest.png``.

``bench.harness`` has what they share: a fresh subprocess per measured implementation,
best-of-N timing with a separate traced run for memory, the machine description, growth fits
and number formatting.
"""
