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
``against_floor(result: dict) -> list[bench.harness.FloorRow]``
    its rows of the table at the top of ``latest.md`` (and in ``latest.json``, plotted in
    ``against_floor.png``): each figure beside its floor (what no implementation can do with
    less, measured in the same run, or a stated budget), the target for their ratio, or none
    for a context row. A figure the result does not hold is a row whose ``vmpower`` or
    ``floor`` is None ("not measured"), never a made-up one.

A module with a ``PART`` that lacks any of these stops the run: a part missing from the table
would look like a part that passed.

``bench.harness`` has what they share: a fresh subprocess per measured implementation,
best-of-N timing with a separate traced run for memory, the machine description, growth fits
and number formatting.
"""
