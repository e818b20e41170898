"""Prints the dependencies of pyproject.toml plus the named extras, one per line, for an image's
dependency layer (installed before the sources are copied, so that it stays cached)."""

import sys
import tomllib

path, extras = sys.argv[1], [e for e in sys.argv[2].split(",") if e]
with open(path, "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"])
for extra in extras:
    deps += project["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(deps)))
