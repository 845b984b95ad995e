"""Training one model: its options (``config``), the driver that sets a run up (``driver``), the function every
Ray Train worker runs (``worker``) and its epoch loop (``loop``), the run state a checkpoint holds (``state``), the
metrics (``metrics``), the learning-rate schedule (``schedule``), the LR range test of ``--lr auto`` and lr-find
(``lr_range``), the searches that run it or ``--lr select``'s candidates (``lr_search``, ``lr_select``) and
result.json (``results``). Importing this package imports nothing heavy: ``training.config`` is read by the CLI
before torch or Ray are."""
