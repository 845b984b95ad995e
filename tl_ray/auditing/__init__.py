"""`tl-ray audit`: what is wrong with a dataset, found with a checkpoint's pooled backbone features.

One room per concern: ``config`` (the options), ``features`` (every item's pooled features and content digest, in
one pass of predict's pipeline), ``labels`` (label suspects: k-fold linear heads' out-of-sample probabilities ranked
by cleanlab), ``duplicates`` (exact and near duplicates, leaks across splits: blocked matrix products), ``outliers``
(far from every class), ``result`` (the typed record the console and the report read), ``writing`` (the CSVs, the
galleries, the fix list) and ``run`` (the command, in order). This module imports nothing: the CLI reads ``config``
before torch and Ray load.
"""
