"""Training one model: its options (``config``), the driver that sets a run up (``driver``), the loop every Ray
Train worker runs (``loop``), the learning-rate schedule they share (``schedule``), the LR range test of
``--lr auto`` (``lr_range``) and the choice of ``--lr select`` (``lr_select``). Importing this package imports
nothing heavy: ``training.config`` is read by the CLI before torch or Ray are."""
