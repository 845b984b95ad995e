"""Ray Tune over the grid of freeze depths, strategies and learning rates: its options (``config``), the sweep
(``sweep``: the only module that knows Tune) and the report of its trials (``report``)."""
