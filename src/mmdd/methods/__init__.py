"""Methods: how a synthetic set is made from the real training split. What a new method needs, in one place:

    from mmdd.methods import LearnedMethod, MethodContext, Objective, ObjectiveStep, OuterSettings

- `MethodContext`: what a method is handed for one distillation (the train split, budget, seed, model factory,
  trajectory store, hardware; `save_set` writes a set), instead of the whole config.
- `Method` (learning-free: implement `synthesize(context)`) and `LearnedMethod` (learned by the shared outer loop: give a
  settings dataclass, an `OuterSettings` subclass, and `make_objective`, which returns an `Objective` whose `step`
  leaves its gradient in the set and returns an `ObjectiveStep`); both return a `DistillResult`.
- The subpackages, by paradigm: `engine` (the outer loop, checkpoints, several processes: what every learned method
  runs on), `trajectory` (trajectory matching: objective, meta-gradients, unrolling, phases, draws, the shortcut
  trajectory), `distribution` (distribution matching: objective, encoder draws, MMD) and `selection` (coresets,
  prototypes, clustering).

mmdd's own modules import from the submodules, never from this face (which would tie them in a circle)."""

from mmdd.methods.base import DistillResult, Method
from mmdd.methods.context import MethodContext
from mmdd.methods.engine.learned import LearnedMethod
from mmdd.methods.engine.outer_loop import Objective, ObjectiveStep, OuterSettings

__all__ = ["DistillResult", "LearnedMethod", "Method", "MethodContext", "Objective", "ObjectiveStep", "OuterSettings"]
