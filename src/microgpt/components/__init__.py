"""Built-in components. Importing this package registers them in `microgpt.registry`."""

from microgpt.components import attention, mlp, norm, position  # noqa: F401
