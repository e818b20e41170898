#!/usr/bin/env bash
# `make test`: the whole suite in two lanes that run side by side.
#
#   cluster lane: rung 3 (the control plane, the operator, Kueue), the chart and the images. Its
#                 tests mostly wait on controllers, kwok and containers: one core is idle then.
#   cpu lane:     everything else (rungs 1-2: multi-process gloo runs, the server, the trainer).
#
# Every test runs in exactly one lane: the cpu lane is `tests` minus the cluster lane's paths.
# The cpu lane prints to the terminal; the cluster lane writes build/logs/test-cluster.log and its
# summary (with its failures, if any) follows the cpu lane's. Either lane failing fails the run,
# and pytest's exit code 5 (nothing collected) counts as a failure.
#
#   scripts/test.sh                 # both lanes
#   KDISTILL_TEST_LANES=1 scripts/test.sh   # one pytest process, one lane after the other
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
logs=build/logs
mkdir -p "${logs}"

cluster_lane=(tests/chart tests/cluster tests/images tests/integration tests/trainer/test_progress.py)
ignore=()
for path in "${cluster_lane[@]}"; do ignore+=("--ignore=${path}"); done

if [[ "${KDISTILL_TEST_LANES:-2}" == "1" ]]; then
  exec "${py}" -P -m pytest --durations=30 "$@"
fi

started=$(date +%s)
"${py}" -P -m pytest --durations=30 "${cluster_lane[@]}" "$@" > "${logs}/test-cluster.log" 2>&1 &
cluster_pid=$!
echo "test: the cluster lane (${cluster_lane[*]}) runs beside this one; its log: ${logs}/test-cluster.log"

"${py}" -P -m pytest --durations=30 tests "${ignore[@]}" "$@"
cpu_rc=$?
cpu_done=$(date +%s)
wait "${cluster_pid}"
cluster_rc=$?

echo
echo "test: === the cluster lane (${logs}/test-cluster.log)"
if [[ ${cluster_rc} -ne 0 ]] && grep -q "= FAILURES =" "${logs}/test-cluster.log"; then
  sed -n '/= FAILURES =/,$p' "${logs}/test-cluster.log" | tail -n 200
else
  sed -n '/slowest .* durations/,$p' "${logs}/test-cluster.log" | tail -n 60
  [[ ${cluster_rc} -ne 0 ]] && tail -n 60 "${logs}/test-cluster.log"
fi
echo "test: cpu lane exit ${cpu_rc} after $(( cpu_done - started ))s; cluster lane exit ${cluster_rc};" \
  "both done in $(( $(date +%s) - started ))s"
[[ ${cpu_rc} -eq 0 && ${cluster_rc} -eq 0 ]]
