"""kdistill: knowledge distillation as a Kubernetes resource.

The import root maps onto the repository's top-level folders (see pyproject.toml):
``kdistill.api`` → ``api/``, ``kdistill.operator`` → ``operator/`` and so on.
"""

# The one version of the package, the images and the chart (pyproject reads it; `kdistill chart-version`
# stamps it into charts/kdistill/Chart.yaml).
__version__ = "0.1.0"
