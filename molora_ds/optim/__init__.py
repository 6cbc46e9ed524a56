from molora_ds.optim.optimizers import METHODS, OptimConfig, build_optimizer
from molora_ds.optim.zero import GradientPreconditioner

__all__ = ["METHODS", "GradientPreconditioner", "OptimConfig", "build_optimizer"]
