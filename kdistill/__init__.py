"""kdistill: knowledge distillation as a Kubernetes resource.

The import root maps onto the repository's top-level folders (see pyproject.toml):
``kdistill.api`` → ``api/``, ``kdistill.operator`` → ``operator/`` and so on.
"""

__version__ = "0.1.0"
