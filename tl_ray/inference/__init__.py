"""What a trained checkpoint is used for: `tl-ray predict` (``predict``), `tl-ray evaluate` (``evaluate``), both
through one Ray Data pipeline that classifies items (``classify``), and `tl-ray export` (``export``: one file that
runs without tl-ray, never Ray). Their options: ``config``. Importing this package imports nothing heavy."""
