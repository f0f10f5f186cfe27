"""robust_u1_jax: Robust-U1 (self-recovering unified multimodal model) in JAX/Flax NNX."""

import flax

# Parameters are placed by explicit jit out_shardings (robust_u1_jax.sharding), not eagerly at
# construction, so modules can be built abstractly or on one CPU without a mesh in scope.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
