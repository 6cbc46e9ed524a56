from molora_ds.optim.optimizers import BASE_METHODS, METHODS, OptimConfig, build_optimizer
from molora_ds.optim.zero import GradientPreconditioner

__all__ = ["BASE_METHODS", "METHODS", "GradientPreconditioner", "OptimConfig", "build_optimizer"]
