#!/usr/bin/env bash
# make lint: every check runs, failures are listed at the end, and one line counts what was
# checked (files formatted, modules type-checked, contracts kept).
#
#   scripts/lint.sh                # format (ruff format --check), ruff, mypy, imports (lint-imports)
#   scripts/lint.sh mypy imports   # only these steps (the pre-commit hooks)
#
# mypy and import-linter find packages on disk, but the import root kdistill.* maps onto
# top-level folders (pyproject's package-dir). They read the package from build/lint/kdistill,
# a tree of symlinks onto those folders, and errors are printed with the repository's paths.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"
venv="${VENV:-${root}/.venv}"
tree="${root}/build/lint"
out="$(mktemp -d "${TMPDIR:-/tmp}/kdistill-lint.XXXXXX")"
trap 'rm -rf "${out}"' EXIT
started=$(date +%s)
failed=()

mkdir -p "${tree}/kdistill"
ln -sfn ../../../kdistill/__init__.py "${tree}/kdistill/__init__.py"
for pkg in api operator trainer serving cli; do
  ln -sfn "../../../${pkg}" "${tree}/kdistill/${pkg}"
done

# Paths under the symlink tree back to the files a person edits.
unmap() { sed -E "s#(${tree}/|build/lint/)kdistill/(api|operator|trainer|serving|cli)/#\2/#g; s#(${tree}/|build/lint/)kdistill/__init__#kdistill/__init__#g"; }

only=("$@")
step() {
  local name="$1"; shift
  if (( ${#only[@]} )) && [[ " ${only[*]} " != *" ${name} "* ]]; then
    return
  fi
  touch "${out}/${name}.log"
  printf '== %s\n' "${name}"
  if "$@" > "${out}/${name}.log" 2>&1; then
    tail -n 3 "${out}/${name}.log" | unmap
  else
    unmap < "${out}/${name}.log"
    failed+=("${name}")
  fi
}

step format "${venv}/bin/ruff" format --check .
step ruff "${venv}/bin/ruff" check .
step mypy "${venv}/bin/mypy" -p kdistill.api -p kdistill.operator -p kdistill.trainer -p kdistill.serving -p kdistill.cli
# From inside the tree: lint-imports puts the working directory first on sys.path, and the
# repository root holds the one-file kdistill/ folder.
step imports bash -c "cd '${tree}' && '${venv}/bin/lint-imports' --config '${root}/pyproject.toml' --no-cache"

touch "${out}"/{format,mypy,imports}.log
formatted=$(grep -oE '[0-9]+ files? already formatted' "${out}/format.log" | grep -oE '^[0-9]+' || echo 0)
# mypy says "in N source files" on success and "(checked N source files)" on failure.
checked=$(grep -oE '[0-9]+ source files?' "${out}/mypy.log" | grep -oE '^[0-9]+' | tail -n1 || echo 0)
kept=$(grep -oE 'Contracts: [0-9]+ kept' "${out}/imports.log" | grep -oE '[0-9]+' || echo 0)
broken=$(grep -oE '[0-9]+ broken' "${out}/imports.log" | grep -oE '[0-9]+' || echo 0)
echo "lint: ${formatted:-0} files formatted, ${checked:-0} modules type-checked, ${kept:-0} contracts kept" \
  "(${broken:-0} broken), $(( $(date +%s) - started ))s"
if (( ${#failed[@]} )); then
  echo "lint: failed: ${failed[*]}" >&2
  exit 1
fi
