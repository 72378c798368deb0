"""The algorithms: basis, averaging, the subspace step and its placement, the lr check, BatchNorm, the training
loop, evaluation, selection, variants, PCA. Each works on checkpoints and a Task; none parses flags or prints."""
