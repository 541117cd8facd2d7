"""The linear learning-rate scaling rule (Goyal et al. 2017), used by pretraining and the linear probe."""


def scaled_lr(lr_ref: float, global_batch: int) -> float:
    """lr = lr_ref * global_batch / 256."""
    return lr_ref * global_batch / 256.0
