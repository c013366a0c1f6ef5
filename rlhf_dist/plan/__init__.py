"""`rlhf-dist plan` and the memory model behind it and `--fallback auto`: will a stage fit in GPU memory?

* `shapes` - what the estimate needs from a model's config (parameter counts, layer sizes, adapter sizes)
* `estimate` - per-GPU bytes of a stage's models per method and strategy (the stage's memory profile:
  `rlhf_dist.registry.StageSpec.memory`); the table of options and the recommendation
* `cli` - the command: a recipe's stage or flags in, a table and a launch command out

Conventions and the tests that check them: docs/memory_model.md. Nothing here imports torch at import time.
"""

from __future__ import annotations

from rlhf_dist.plan.estimate import (  # noqa: F401 - the planner's interface
    GIB,
    HEADROOM,
    METHODS,
    PRECISIONS,
    QLORA_STRATEGIES,
    STRATEGIES,
    activation_bytes,
    estimate,
    frozen_states,
    kv_cache_bytes,
    options,
    plan,
    profile,
    qlora_base_bytes,
    stage_roles,
    trainable_states,
)
from rlhf_dist.plan.shapes import Shape, analytic_param_count, load_config, model_shape, text_config  # noqa: F401
