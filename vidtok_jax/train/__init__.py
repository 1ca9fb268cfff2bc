"""Training: state pytree, the pure GAN train step, mesh/shardings."""

from vidtok_jax.train.mesh import (
                                   batch_sharding,
                                   make_mesh,
                                   replicated,
                                   shard_batch,
                                   state_shardings,
)
from vidtok_jax.train.state import (
                                   TrainState,
                                   abstract_train_state,
                                   create_train_state,
                                   make_discriminator,
                                   make_optimizers,
                                   model_config,
)
from vidtok_jax.train.step import get_last_layer, make_train_step

__all__ = ["TrainState", "abstract_train_state", "batch_sharding", "create_train_state",
           "get_last_layer", "make_discriminator", "make_mesh", "make_optimizers",
           "make_train_step", "model_config", "replicated", "shard_batch", "state_shardings"]
