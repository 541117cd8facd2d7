"""The bottom room: what every package of the project uses, imported from here only.

``errors`` (`UserError`, `run_cli`), ``atomic`` (whole-file writes), ``run_lock`` (one writer per run
folder), ``transforms`` (the ImageNet normalisation and the evaluation view), ``knn`` (exact neighbours
and the weighted k-NN vote), ``scaling`` (the linear learning-rate scaling rule), ``progress`` (progress
bars that write clean lines when the output is not a terminal). It imports nothing of ``data``,
``pretrain``, ``evaluate`` or ``analysis``: the layers are common <- data <- pretrain <- evaluate <- analysis.
"""
