"""mmdd: multimodal dataset distillation."""

__version__ = "0.1.0"

from mmdd.identity import register_resolvers as _register_resolvers

_register_resolvers()  # conf/ interpolations such as ${mmdd.store_id:...} resolve wherever mmdd is imported
