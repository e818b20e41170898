#!/bin/sh
# `train` and `serve` (and any other kdistill subcommand) go to the kdistill CLI; anything
# else (torchrun, python, sh) runs as given, so the operator's torchrun command works too.
set -e
case "${1:-}" in
  train|serve|run|validate|crds|--help|-h|"") exec kdistill "$@" ;;
  *) exec "$@" ;;
esac
